"""Built-in data (stdlib source, arithmetic, any text path) and the batches drawn from it."""
import re

import numpy as np
import pytest

from self_reasoning_tokens import data as D


@pytest.fixture(scope="module")
def stdlib():
    return D.load_stdlib()


def test_stdlib_corpus_is_deterministic_and_split_by_file(stdlib):
    again = D.load_stdlib()
    assert again.fingerprint() == stdlib.fingerprint()
    assert stdlib.num_tokens == 256 and stdlib.train.dtype == np.uint8
    total = len(stdlib.train) + len(stdlib.val)
    assert total > 1_000_000, "the standard library's source should be megabytes"
    assert 0.01 < len(stdlib.val) / total < 0.15
    text = bytes(stdlib.train[:20000]).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text


def test_stdlib_cap_reads_a_deterministic_prefix(stdlib):
    capped = D.load_stdlib(max_bytes=200_000)
    # each split's share of the cap, cut at a character boundary
    assert 190_000 - 3 <= len(capped.train) <= 190_000 and 10_000 - 3 <= len(capped.val) <= 10_000
    assert capped.fingerprint() == D.load_stdlib(max_bytes=200_000).fingerprint()
    # a prefix of the uncapped splits, file by file in the same order
    assert bytes(capped.train) == bytes(stdlib.train[:len(capped.train)])
    assert bytes(capped.val) == bytes(stdlib.val[:len(capped.val)])


@pytest.mark.parametrize("cap", [5_000, 20_000])
def test_a_small_cap_still_gives_validation_its_share(cap):
    # Taking files in order until the cap used to leave validation whatever the first few files
    # hashed into: 97 bytes at 20,000 and 50,000, none at 5,000.
    corpus = D.load_stdlib(max_bytes=cap)
    assert len(corpus.val) == cap * D.VAL_PERCENT // 100
    assert len(corpus.train) == cap - len(corpus.val)


def test_byte_caps_cut_at_utf8_character_boundaries(tmp_path):
    text = tmp_path / "accents.txt"
    text.write_text("é" * 5000)  # two bytes a character
    for cap in (1000, 1001, 1002):
        corpus = D.load_path(text, max_bytes=cap)
        data = bytes(corpus.train) + bytes(corpus.val)
        assert len(data) == cap - cap % 2
        assert data.decode("utf-8") == "é" * (cap // 2)
    with pytest.raises(D.DataError, match="first 1 bytes .* hold no text"):  # not "is empty"
        D.load_path(text, max_bytes=1)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(6):
        (folder / f"g{i}.txt").write_text(f"{i}€" * 100)  # 1 + 3 bytes a repeat, 400 a file
    assert not any(D._in_val(f"g{i}.txt") for i in range(6))  # so the training share takes them all
    corpus = D.load_path(folder, max_bytes=1002)  # g0, g1, then g2 cut inside a '€'
    data = bytes(corpus.train) + bytes(corpus.val)  # no validation file: all the cap, its bytes split
    assert data == b"".join((folder / f"g{i}.txt").read_bytes() for i in range(2)) + ("2€" * 50 + "2").encode()


def test_arithmetic_digit_limit():
    a = D.load_arithmetic(seed=0, max_digits=D.MAX_ARITH_DIGITS, train_problems=500, val_problems=10)
    longest = 0
    for line in bytes(a.train).decode().splitlines():
        x, rest = line.split("+")
        y, z = rest.split("=")
        assert int(x) + int(y) == int(z)
        longest = max(longest, len(x), len(y))
    assert longest == D.MAX_ARITH_DIGITS == 15
    for digits in (0, 16, 25):
        with pytest.raises(D.DataError, match="1 to 15 digits"):
            D.load_arithmetic(seed=0, max_digits=digits, train_problems=5, val_problems=5)


def test_folder_split_keeps_each_file_whole_and_ignores_order(tmp_path):
    contents = {}
    for i in range(60):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        text = f"file number {i:03d} unique-token-{i:03d}\n" * 3
        (sub / f"f{i}.txt").write_text(text)
        contents[f"d{i % 3}/f{i}.txt"] = text.encode()
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))           # not a text suffix
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("HIDDEN\n")       # hidden folder skipped
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    (tmp_path / "zeros.txt").write_bytes(bytes(64))                    # NUL bytes: binary, skipped
    (tmp_path / "Makefile").write_text("all:\n")                       # no text suffix: skipped

    corpus = D.load_path(tmp_path)
    train, val = bytes(corpus.train), bytes(corpus.val)
    assert val and train
    for rel, text in contents.items():
        in_train, in_val = text in train, text in val
        assert in_train != in_val, rel
        assert in_val == D._in_val(rel)
    assert b"HIDDEN" not in train + val and b"caf" not in train + val and b"\0" not in train + val
    assert len(train) + len(val) == sum(map(len, contents.values()))
    # what was left out is said, not silently dropped
    assert "(60 text files; skipped 2 not UTF-8 text, 2 without a text suffix)" in corpus.description


def test_a_capped_file_or_folder_is_read_only_as_far_as_the_cap(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text("word " * 200_000)  # 1 MB
    reads = []  # the sizes asked of every binary read
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return CountingFile(f) if "b" in mode else f

    monkeypatch.setattr("builtins.open", counting_open)
    corpus = D.load_path(big, max_bytes=1000)
    assert len(corpus.train) + len(corpus.val) == 1000 and reads == [1001]
    reads.clear()
    corpus = D.load_path(tmp_path, max_bytes=1000)  # one file, in training: the whole cap is its
    assert len(corpus.train) + len(corpus.val) == 1000 and reads == [1001]


@pytest.mark.parametrize("name, is_val", [("g0.txt", False), ("9.txt", True)])
def test_a_split_with_no_file_leaves_the_other_the_whole_cap(tmp_path, name, is_val):
    assert D._in_val(name) == is_val
    (tmp_path / name).write_text("abc def " * 30_000)
    for cap in (100_000, 10):  # validation's share of 10 bytes would be 0
        corpus = D.load_path(tmp_path, max_bytes=cap)
        assert (len(corpus.train), len(corpus.val)) == (cap - cap // 10, cap // 10)  # then split by bytes
    (tmp_path / "blank.txt").write_text("   \n" * 10_000)
    with pytest.raises(D.DataError, match="blank.txt' is empty"):  # raising the cap would not help
        D.load_path(tmp_path / "blank.txt", max_bytes=100)


def test_single_file_last_tenth_is_validation(tmp_path):
    f = tmp_path / "t.md"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    corpus = D.load_path(f)
    raw = f.read_bytes()
    assert bytes(corpus.train) + bytes(corpus.val) == raw
    assert len(corpus.val) == len(raw) // 10


@pytest.mark.parametrize("case", ["missing", "empty_file", "blank_file", "empty_folder", "binary_only", "not_utf8",
                                  "nul_bytes"])
def test_bad_paths_raise_data_error(tmp_path, case):
    if case == "missing":
        path = tmp_path / "nope"
    elif case in ("empty_file", "blank_file"):
        path = tmp_path / "e.txt"
        path.write_text("" if case == "empty_file" else "  \n\n")
    elif case == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "binary_only":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "x.bin").write_bytes(b"\x00\x01")
    elif case == "nul_bytes":
        path = tmp_path / "zeros.txt"
        path.write_bytes(bytes(1000))
    else:
        path = tmp_path / "x.txt"
        path.write_bytes(b"\xff\xfe\xfa abc")
    message = {"nul_bytes": "binary", "not_utf8": "not UTF-8"}.get(case)
    with pytest.raises(D.DataError, match=message):
        D.load_corpus(str(path))


def test_check_fits_names_the_problem(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("x" * 100)
    corpus = D.load_path(f)
    corpus.check_fits(8)
    with pytest.raises(D.DataError, match="seq-len"):
        corpus.check_fits(64)


def test_arithmetic_is_correct_msd_first_and_seeded():
    a = D.load_arithmetic(seed=3, max_digits=4, train_problems=2000, val_problems=200)
    lines = bytes(a.train).decode().splitlines()
    assert len(lines) == 2000
    for line in lines:
        m = re.fullmatch(r"(\d{1,4})\+(\d{1,4})=(\d{1,5})", line)
        assert m, line
        x, y, z = map(int, m.groups())
        assert x + y == z and m.group(3) == str(z)  # most significant digit first, no padding
    b = D.load_arithmetic(seed=3, max_digits=4, train_problems=2000, val_problems=200)
    c = D.load_arithmetic(seed=4, max_digits=4, train_problems=2000, val_problems=200)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert bytes(a.val) != bytes(a.train)[:len(a.val)]


def test_train_batches_depend_only_on_seed_and_step():
    data = np.arange(1000, dtype=np.int64) % 256
    data = data.astype(np.uint8)
    b1 = D.train_batch(data, step=5, seed=1, batch_size=8, seq_len=16)
    assert b1.shape == (8, 17)
    np.testing.assert_array_equal(b1, D.train_batch(data, step=5, seed=1, batch_size=8, seq_len=16))
    assert not np.array_equal(b1, D.train_batch(data, step=6, seed=1, batch_size=8, seq_len=16))
    assert not np.array_equal(b1, D.train_batch(data, step=5, seed=2, batch_size=8, seq_len=16))
    # windows are contiguous slices of the data
    assert ((np.diff(b1.astype(np.int64), axis=1) % 256) == 1).all()
    # the shards of the ranks tile the global batch
    np.testing.assert_array_equal(np.concatenate([D.shard(b1, r, 4) for r in range(4)]), b1)
    # every start position can be drawn, and none past the end
    starts = np.concatenate([D.train_batch(np.zeros(20, np.uint8) + np.arange(20, dtype=np.uint8), s, 0, 64, 4)[:, 0]
                             for s in range(20)])
    assert starts.min() == 0 and starts.max() == 20 - 5


def test_val_windows_are_fixed_and_in_range():
    data = np.arange(500, dtype=np.int64).astype(np.uint8)
    w = D.val_windows(data, seq_len=31, count=10)
    assert w.shape == (10, 32)
    assert w[0, 0] == 0 and w[-1, -1] == data[-1]
    np.testing.assert_array_equal(w, D.val_windows(data, seq_len=31, count=10))
    assert D.val_windows(data[:40], seq_len=31, count=100).shape == (9, 32)  # only 9 starts exist


def test_encode_decode_round_trip():
    text = "héllo → wörld"
    assert D.decode(D.encode(text)) == text
