"""Byte-level training data that needs no download, and the batches drawn from it.

Three sources, all turned into a train and a validation byte array (tokens are bytes, so a
cross-entropy in nats divided by ln 2 is directly *bits per byte*):

- ``stdlib`` (default): the Python standard library's own ``.py`` files (no tests, no
  site-packages), about 12 MB on CPython 3.11. Split by file: a file goes to validation iff a
  hash of its relative path says so, so the split never depends on the order files are found.
- ``arithmetic``: multi-digit additions written most-significant digit first, ``"123+989=1112\\n"``.
  The first digit of the sum depends on every carry below it, so a model that can "think ahead"
  before writing it should gain. Generated from the seed; validation uses its own stream.
- any path: a UTF-8 text file (its last 10% is validation) or a folder, read recursively
  (text-like extensions, hidden folders skipped, files that are not UTF-8 or hold NUL bytes
  skipped and counted in the description, split by file like ``stdlib``).

A byte cap (``--max-data-bytes``) reads no more than it needs (a byte past it, to cut at a character
boundary); for ``stdlib`` and folders validation takes its VAL_PERCENT share of the cap from the
validation files and training the rest (a split with no file leaves the other the whole cap).

Batches are random windows of ``seq_len + 1`` bytes. The windows of step ``s`` come from a
generator seeded with ``(seed, s)``, so the sampler's whole state is the step number: a resumed
run draws exactly the batches an uninterrupted run would, and every rank of a data-parallel run
draws the same global batch and keeps its own slice of it.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Corpus",
    "DataError",
    "load_corpus",
    "load_stdlib",
    "load_arithmetic",
    "load_path",
    "make_addition_problems",
    "train_batch",
    "val_windows",
    "shard",
    "encode",
    "decode",
]

NUM_TOKENS = 256  # bytes
VAL_PERCENT = 5  # of files (stdlib, folders) that go to validation
TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .py .pyi .c .h .cc .cpp .hpp .cu .cuh .rs .go .java .js .ts .json .toml .yaml .yml "
    ".cfg .ini .csv .tsv .html .htm .css .xml .tex .sh .bash .sql .r .jl .lua .rb .pl .org .log".split()
)
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DataError(ValueError):
    """A user-facing problem with the data (missing, empty, not UTF-8, too small)."""


@dataclass
class Corpus:
    name: str  # "stdlib", "arithmetic" or the path given
    train: np.ndarray  # uint8
    val: np.ndarray  # uint8
    description: str
    num_tokens: int = NUM_TOKENS

    def fingerprint(self) -> str:
        """sha1 of both splits: a checkpoint refuses to resume on data that has changed."""
        h = hashlib.sha1()
        h.update(len(self.train).to_bytes(8, "little"))
        h.update(self.train.tobytes())
        h.update(self.val.tobytes())
        return h.hexdigest()

    def check_fits(self, seq_len: int) -> None:
        need = seq_len + 1
        for split, arr in (("training", self.train), ("validation", self.val)):
            if len(arr) < need:
                raise DataError(
                    f"data {self.name!r} has only {len(arr)} {split} bytes, but --seq-len {seq_len} "
                    f"needs at least {need}; use more data or a shorter --seq-len")


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _in_val(rel: str) -> bool:
    # md5 of the path, not Python's hash(): stable across processes and machines.
    return int(hashlib.md5(rel.encode("utf-8")).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def _split_files(root: Path, files: list[Path], max_bytes: int | None) -> tuple[bytes, bytes, int, int, int]:
    """Concatenate the text files among ``files`` (sorted by relative path) into train and
    validation by path hash; returns (train, val, files with text, text files in all (empty ones
    too), files skipped as not text).

    ``max_bytes`` caps what is read: validation takes VAL_PERCENT of it from its files (all of it
    when no file hashes into training), training the rest, each in sorted order, the last file cut
    at a character boundary; so a small cap still leaves validation its share, not whatever the
    first few files hashed into. A file is read only as far as its split still has room."""
    rel = {f: f.relative_to(root).as_posix() for f in files}
    split = {True: [], False: []}
    for f in sorted(files, key=rel.get):
        split[_in_val(rel[f])].append(f)
    parts: dict = {True: [], False: []}
    used = texts = skipped = 0
    room = None
    for is_val in (True, False):  # validation first: what its share leaves over goes to training
        if max_bytes is not None and is_val:
            room = max_bytes * VAL_PERCENT // 100 if split[False] else max_bytes
        elif max_bytes is not None:
            room = max_bytes - sum(map(len, parts[True]))
        for f in split[is_val]:
            if room is not None and room <= 0:
                break
            data, cut_short = _read_prefix(f, room)
            if not _is_text(data):
                skipped += 1
                continue
            texts += 1
            if data:
                parts[is_val].append(data)
                used += 1
            if room is not None:  # a file cut short fills its split: nothing after it fits
                room = 0 if cut_short else room - len(data)
    return b"".join(parts[False]), b"".join(parts[True]), used, texts, skipped


def _read_prefix(path: Path, limit: int | None) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of a file (all of it when ``limit`` is None), cut so as not to end
    inside a UTF-8 character, and whether the file goes on after them. Reads no more than that."""
    with open(path, "rb") as f:
        if limit is None:
            return f.read(), False
        head = f.read(limit + 1)
    return _utf8_prefix(head, limit), len(head) > limit


def _utf8_prefix(data: bytes, limit: int) -> bytes:
    """``data[:limit]``, shortened so that it does not end inside a UTF-8 character (a cap in bytes
    must not turn a UTF-8 file into one that is not)."""
    if len(data) <= limit:
        return data
    end = max(limit, 0)
    while end > max(limit - 3, 0) and (data[end] & 0xC0) == 0x80:  # data[end] continues a character
        end -= 1
    return data[:end]


def _as_array(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).copy()


def load_stdlib(max_bytes: int | None = None) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not (_STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))]
    if not files:
        raise DataError(f"found no .py files in the Python standard library at {root}")
    train, val, used, _, skipped = _split_files(root, files, max_bytes)
    return Corpus("stdlib", _as_array(train), _as_array(val),
                  f"Python {sysconfig.get_python_version()} standard library source ({used} .py files "
                  f"under {root}, tests excluded{_skipped_note(skipped, 0)}): {len(train):,} train / "
                  f"{len(val):,} validation bytes")


# Operands are drawn as floor(uniform * 10^d): every integer below 10^d is equally likely while
# 10^d is well under 2^53 (the spacing of the float draws, 10^d / 2^53, stays below 1).
MAX_ARITH_DIGITS = 15


def make_addition_problems(rng: np.random.Generator, count: int, max_digits: int) -> bytes:
    """``count`` lines ``a+b=c`` with a, b having 1..max_digits digits (uniform digit count)."""
    if not 1 <= max_digits <= MAX_ARITH_DIGITS:
        raise DataError(f"arithmetic operands take 1 to {MAX_ARITH_DIGITS} digits, "
                        f"got {max_digits}")
    digits_a = rng.integers(1, max_digits + 1, size=count)
    digits_b = rng.integers(1, max_digits + 1, size=count)
    a = (rng.random(count) * 10.0 ** digits_a).astype(np.int64)
    b = (rng.random(count) * 10.0 ** digits_b).astype(np.int64)
    return "".join(f"{x}+{y}={x + y}\n" for x, y in zip(a.tolist(), b.tolist())).encode("ascii")


def load_arithmetic(seed: int, max_digits: int = 4, train_problems: int = 200_000,
                    val_problems: int = 4_000) -> Corpus:
    train = make_addition_problems(np.random.default_rng([seed, 1]), train_problems, max_digits)
    val = make_addition_problems(np.random.default_rng([seed, 2]), val_problems, max_digits)
    return Corpus("arithmetic", _as_array(train), _as_array(val),
                  f"synthetic addition, up to {max_digits}-digit operands, most-significant digit "
                  f"first (seed {seed}): {len(train):,} train / {len(val):,} validation bytes")


def _is_text(data: bytes) -> bool:
    """UTF-8 with no NUL byte (a NUL is valid UTF-8, but text files do not hold one; binary files,
    such as a file of zeros, do)."""
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _skipped_note(not_text: int, no_suffix: int) -> str:
    notes = [f"{not_text} not UTF-8 text"] if not_text else []
    if no_suffix:
        notes.append(f"{no_suffix} without a text suffix")
    return f"; skipped {', '.join(notes)}" if notes else ""


def load_path(path: str | os.PathLike, max_bytes: int | None = None) -> Corpus:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if p.is_file():
        data, cut_short = _read_prefix(p, max_bytes)
        if not data.strip():
            if cut_short and p.read_bytes().strip():  # (read whole only on the way to this error)
                raise DataError(f"the first {max_bytes} bytes of data file {str(path)!r} hold no text "
                                "(raise --max-data-bytes)")
            raise DataError(f"data file {str(path)!r} is empty")
        if not _is_text(data):
            what = "binary (it holds NUL bytes)" if b"\0" in data else "not UTF-8 text"
            raise DataError(f"data file {str(path)!r} is {what}")
        cut = len(data) - max(1, len(data) // 10)
        return Corpus(str(path), _as_array(data[:cut]), _as_array(data[cut:]),
                      f"{p}: {cut:,} train / {len(data) - cut:,} validation bytes (last 10%)")
    if not p.is_dir():
        raise DataError(f"data path {str(path)!r} is neither a file nor a folder")
    files, no_suffix = [], 0
    for f in p.rglob("*"):
        if any(part.startswith(".") for part in f.relative_to(p).parts) or not f.is_file():
            continue
        if f.suffix.lower() in TEXT_SUFFIXES:
            files.append(f)
        else:
            no_suffix += 1
    train, val, used, texts, not_text = _split_files(p, files, max_bytes)
    skipped = _skipped_note(not_text, no_suffix)
    if not texts:
        raise DataError(f"data folder {str(path)!r} holds no UTF-8 text files "
                        f"({', '.join(sorted(TEXT_SUFFIXES)[:6])}, ...{skipped})")
    if not (train + val).strip():
        raise DataError(f"data folder {str(path)!r} holds only empty text files")
    how = "by file"
    if not train or not val:  # too few files for a split by file: split the bytes instead
        data = train + val
        cut = len(data) - max(1, len(data) // 10)
        train, val, how = data[:cut], data[cut:], "last 10% of the concatenation"
    return Corpus(str(path), _as_array(train), _as_array(val),
                  f"{p} ({used} text files{skipped}): {len(train):,} train / {len(val):,} validation "
                  f"bytes (split {how})")


BUILT_IN = ("stdlib", "arithmetic")  # the data names load_corpus takes; anything else is a path


def is_data_path(spec: str) -> bool:
    return spec not in BUILT_IN


def load_corpus(spec: str, seed: int = 0, max_bytes: int | None = None, arith_digits: int = 4) -> Corpus:
    """``spec``: "stdlib", "arithmetic" or a path to a UTF-8 text file or folder."""
    if spec == "stdlib":
        return load_stdlib(max_bytes)
    if spec == "arithmetic":
        return load_arithmetic(seed, arith_digits)
    if not spec:
        raise DataError("data path is empty")
    return load_path(spec, max_bytes)


def train_batch(data: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
    """The global batch of step ``step``: (batch_size, seq_len + 1) random windows of ``data``."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)
    return data[starts[:, None] + np.arange(seq_len + 1)]


def val_windows(data: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """(count', seq_len + 1) windows spread evenly over ``data`` (fixed: no randomness), with
    count' = min(count, how many distinct starts there are)."""
    last = len(data) - seq_len - 1
    count = max(1, min(count, last + 1))
    starts = np.unique(np.linspace(0, last, count).round().astype(np.int64))
    return data[starts[:, None] + np.arange(seq_len + 1)]


def shard(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of a global batch whose size world_size divides."""
    n = len(rows) // world_size
    return rows[rank * n:(rank + 1) * n]
