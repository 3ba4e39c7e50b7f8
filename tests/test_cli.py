"""The command line, run as a user would (subprocesses): compare, train, generate, bad input."""
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import self_reasoning_tokens
from self_reasoning_tokens.cli import main

REPO = Path(self_reasoning_tokens.__file__).resolve().parent.parent
TINY = ["--seq-len", "16", "--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16",
        "--batch-size", "4", "--eval-every", "4", "--eval-windows", "4", "--warmup", "2", "--no-progress"]


def cli_env() -> dict:
    """The environment of a `python -m self_reasoning_tokens` subprocess: this checkout first on
    PYTHONPATH, and no torchrun WORLD_SIZE (which would make it a rank of a job that is not there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    return env


def srt(*args, subprocess_=False, timeout=300):
    """Run the command line. In-process (through cli.main, as the console script does) unless
    subprocess_: a real `python -m self_reasoning_tokens` (slower: each start imports torch)."""
    args = [str(a) for a in args]
    if subprocess_:
        return subprocess.run([sys.executable, "-m", "self_reasoning_tokens", *args], cwd=REPO,
                              env=cli_env(), capture_output=True, text=True, timeout=timeout)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_user_error(proc, *needles):
    """Exit code 2, exactly one line on stderr, no traceback, the line names the problem."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "error" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    lines = [f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(400)]
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_data):
    """A finished `train` run (R=1): its output folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = srt("train", "--out", out, "--data", text_data, "--steps", 8, "--num-reason-tokens", 1,
               "--save-every", 4, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "validation" in proc.stdout
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory, text_data):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    proc = srt("compare", "--out", out, "--data", text_data, "--steps", 6, "--num-reason-tokens", 1, 2, *TINY,
               subprocess_=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc


# ------------------------------------------------------------------------------------------
# compare


def test_compare_writes_table_json_plot_and_checkpoints(compared):
    out, proc = compared
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    names = [r["name"] for r in results["runs"]]
    assert names == ["baseline", "reasoning R=1", "reasoning R=2"]
    for run, R in zip(results["runs"], (0, 1, 2)):
        cfg = run["config"]
        assert cfg["num_reason_tokens"] == R and cfg["steps"] == 6 and cfg["seq_len"] == 16
        assert cfg["hard_mode"] is False and cfg["steps_future"] == 2 and cfg["seed"] == 0
        assert run["positions_per_sequence"] == 16 * (R + 1)
        assert 0 < run["val_bpb"] < 9 and run["wall_time_s"] > 0 and run["train_time_s"] > 0
        assert [h["step"] for h in run["history"]] == list(range(1, 7))
        assert Path(run["checkpoint"]).is_file()
    # same seed and data: identical initial weights, so identical step-0 validation for R=0
    # and the same first batch; the reasoning runs differ from the first step on
    first_losses = [r["history"][0]["loss"] for r in results["runs"]]
    assert len(set(first_losses)) == 3
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = proc.stdout
    for name in names:
        assert name in table
        assert f"{name}: step 6, validation " in proc.stdout  # a line as each run ends, with --no-progress too
    assert "val bpb" in table and "wall s" in table
    for run in results["runs"]:
        assert f"{run['val_bpb']:.4f}" in table


def test_compare_hard_mode_and_custom_window(tmp_path, text_data):
    out = tmp_path / "hard"
    proc = srt("compare", "--out", out, "--data", text_data, "--steps", 2, "--num-reason-tokens", 1,
               "--hard-mode", "--steps-future", 3, *TINY)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["baseline", "reasoning R=1 (hard)"]
    assert runs[1]["config"]["hard_mode"] is True and runs[1]["config"]["steps_future"] == 3
    assert (out / "reasoning-R1-hard.pt").is_file()


# ------------------------------------------------------------------------------------------
# train and generate


def test_train_writes_checkpoint_metrics_and_plot(trained):
    files = {p.name for p in trained.iterdir()}
    assert files == {"checkpoint.pt", "metrics.json", "loss.png"}
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["step"] == 8 and len(metrics["history"]) == 8
    assert [e["step"] for e in metrics["evals"]] == [0, 4, 8]


def test_train_names_hard_mode_as_compare_does(tmp_path, text_data):
    out = tmp_path / "hard"
    proc = srt("train", "--out", out, "--data", text_data, "--steps", 1, "--num-reason-tokens", 1,
               "--hard-mode", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["name"] == "reasoning R=1 (hard)"
    assert "reasoning R=1 (hard): step 1" in proc.stdout


def test_interrupt_says_what_is_left(monkeypatch, tmp_path, trained):
    from self_reasoning_tokens import cli

    def interrupted(args):
        raise KeyboardInterrupt

    for command in ("cmd_train", "cmd_compare", "cmd_generate"):
        monkeypatch.setattr(cli, command, interrupted)
    proc = srt("train", "--out", trained, "--resume")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert f"{trained / 'checkpoint.pt'} (step 8), is intact" in proc.stderr, proc.stderr
    assert "--resume` continues from it" in proc.stderr
    proc = srt("train", "--out", tmp_path / "new")
    assert proc.returncode == 130 and "no checkpoint was written" in proc.stderr, proc.stderr
    proc = srt("compare", "--out", tmp_path / "cmp")
    assert proc.returncode == 130 and "results.json" in proc.stderr, proc.stderr
    proc = srt("generate", "--checkpoint", trained / "checkpoint.pt", "--prompt", "x")
    assert proc.returncode == 130 and proc.stderr.strip().endswith("no file was written"), proc.stderr


@pytest.mark.parametrize("rank, prints", [("0", True), ("1", False)])
def test_only_rank_zero_prints_the_error_and_interrupt_lines(monkeypatch, tmp_path, rank, prints):
    """Under torchrun every rank would print the same line; the others exit with the same code."""
    from self_reasoning_tokens import cli

    monkeypatch.setenv("RANK", rank)
    (tmp_path / "results.json").write_text("{}")
    proc = srt("compare", "--out", tmp_path, "--steps", 1, *TINY)  # an earlier compare's results
    assert proc.returncode == 2 and ("already holds results" in proc.stderr) == prints, proc.stderr
    assert bool(proc.stderr) == prints and "Traceback" not in proc.stderr

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_compare", interrupted)
    proc = srt("compare", "--out", tmp_path / "cmp")
    assert proc.returncode == 130 and ("interrupted" in proc.stderr) == prints, proc.stderr
    assert bool(proc.stderr) == prints


def test_generate_prints_the_prompt_and_a_continuation(trained):
    ckpt = trained / "checkpoint.pt"
    a = srt("generate", "--checkpoint", ckpt, "--prompt", "def f", "--max-new-tokens", 10, "--temperature", 0)
    b = srt("generate", "--checkpoint", ckpt, "--prompt", "def f", "--max-new-tokens", 10, "--temperature", 0)
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("def f") and a.stdout == b.stdout  # greedy is deterministic
    assert len(a.stdout.rstrip("\n").encode("utf-8", "surrogateescape")) >= len("def f") + 1
    # longer than max_seq_len (16): the context slides, still one sample
    c = srt("generate", "--checkpoint", ckpt, "--prompt", "def", "--max-new-tokens", 40, "--top-k", 5,
            subprocess_=True)
    assert c.returncode == 0, c.stderr
    assert c.stdout.startswith("def")


def test_generate_streams_what_it_samples(monkeypatch, trained):
    import codecs

    import torch

    from self_reasoning_tokens import cli, transformer
    from self_reasoning_tokens.training import build_model, load_checkpoint

    ckpt = trained / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    cfg = state["config"]
    model = build_model(cfg, int(state.get("num_tokens", 256)))
    model.load_state_dict(state["model"])
    model.eval()
    prompt = "h\u00e9llo".encode("utf-8")
    ids = cli.sample(model, torch.tensor([list(prompt)]), 40, cfg.num_reason_tokens, cfg.steps_future, 0., None)
    ids = ids[0].tolist()
    whole = bytes(ids).decode("utf-8", errors="replace")
    proc = srt("generate", "--checkpoint", ckpt, "--prompt", "h\u00e9llo", "--max-new-tokens", 40, "--temperature", 0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == whole + "\n"  # streamed byte by byte, the same text as decoding at the end

    # interrupted while drawing the 4th byte: the prompt and 3 bytes are already out
    real, drawn = transformer.sample, []

    def interrupt_at_the_fourth(*args, **kwargs):
        if len(drawn) == 3:
            raise KeyboardInterrupt
        drawn.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer, "sample", interrupt_at_the_fourth)
    cut = srt("generate", "--checkpoint", ckpt, "--prompt", "h\u00e9llo", "--max-new-tokens", 40, "--temperature", 0)
    assert cut.returncode == 130 and "the text generated so far is above" in cut.stderr
    partial = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(bytes(ids[:len(prompt) + 3]))
    assert cut.stdout == partial


def test_resume_at_the_end_does_nothing_and_rejects_changed_model(trained, text_data):
    before = snapshot(trained)
    done = srt("train", "--out", trained, "--resume", "--data", text_data, "--steps", 8, *TINY)
    assert done.returncode == 0 and "nothing to do" in done.stdout
    changed = srt("train", "--out", trained, "--resume", "--data", text_data, "--steps", 12, *TINY[:-1],
                  "--dim", 64)
    assert_user_error(changed, "--dim")
    # --max-seq-len as the value the checkpoint's model already has (its --seq-len, 16): no change
    same = srt("train", "--out", trained, "--resume", "--data", text_data, "--steps", 8, *TINY, "--max-seq-len", 16)
    assert same.returncode == 0 and "nothing to do" in same.stdout, same.stderr
    assert_user_error(srt("train", "--out", trained, "--resume", "--data", text_data, *TINY, "--max-seq-len", 32),
                      "--max-seq-len 32 differs from the checkpoint's 16")
    assert snapshot(trained) == before


# ------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written or overwritten


def test_unknown_option(tmp_path):
    assert_user_error(srt("compare", "--out", tmp_path / "x", "--bogus-option", 3, subprocess_=True),
                      "--bogus-option")
    assert_user_error(srt("frobnicate"))
    assert_user_error(srt("train", "--steps", "many"), "--steps")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["missing", "empty_file", "empty_folder"])
def test_missing_or_empty_data(tmp_path, kind):
    if kind == "missing":
        path = tmp_path / "no-such-file.txt"
    elif kind == "empty_file":
        path = tmp_path / "empty.txt"
        path.write_text("")
    else:
        path = tmp_path / "empty-folder"
        path.mkdir()
    for command in ("train", "compare"):
        out = tmp_path / f"out-{command}"
        proc = srt(command, "--out", out, "--data", path, "--steps", 1, *TINY,
                   subprocess_=kind == "missing" and command == "train")
        assert_user_error(proc, str(path))
        assert not out.exists()


def test_data_too_small_for_seq_len(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abc\n" * 5)
    assert_user_error(srt("train", "--out", tmp_path / "o", "--data", path, *TINY), "--seq-len")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_reason_tokens_above_max(tmp_path, command, text_data):
    proc = srt(command, "--out", tmp_path / "o", "--data", text_data, "--num-reason-tokens", 5,
               "--max-reason-seq-len", 4, *TINY)
    assert_user_error(proc, "--num-reason-tokens 5", "--max-reason-seq-len 4")
    assert not (tmp_path / "o").exists()


def test_arith_digits_above_limit(tmp_path):
    proc = srt("compare", "--out", tmp_path / "o", "--data", "arithmetic", "--arith-digits", 16, *TINY)
    assert_user_error(proc, "--arith-digits", "at most 15", "got 16")
    assert not (tmp_path / "o").exists()


def test_sequence_longer_than_max_seq_len(tmp_path, text_data):
    proc = srt("train", "--out", tmp_path / "o", "--data", text_data, *TINY, "--seq-len", 64,
               "--max-seq-len", 32)
    assert_user_error(proc, "--seq-len 64", "--max-seq-len 32")


def test_unbuilt_extension_is_named_and_nothing_is_written(tmp_path, text_data):
    """A checkout whose extension was never built: the warning and the CLI's one error line say so
    (Python's own ImportError there reads like a circular import), and no output folder appears."""
    # The package's Python files under another name: an editable install (CI's `pip install -e .`)
    # would map the name self_reasoning_tokens back to this checkout whatever PYTHONPATH says.
    # The package imports itself only relatively, so the copy is the same code, without its _C.
    pkg = tmp_path / "site" / "srt_unbuilt_copy"
    pkg.mkdir(parents=True)
    for source in (REPO / "self_reasoning_tokens").glob("*.py"):
        (pkg / source.name).write_text(source.read_text())
    env = dict(os.environ, PYTHONPATH=str(pkg.parent))
    out = tmp_path / "out"
    for command in (["train", "--out", out, "--data", text_data, "--steps", 1, *TINY],
                    ["compare", "--out", out, "--data", text_data, "--steps", 1, *TINY],
                    ["generate", "--checkpoint", tmp_path / "missing.pt", "--prompt", "x"]):
        proc = subprocess.run([sys.executable, "-m", "srt_unbuilt_copy", *map(str, command)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and "circular import" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"srt {command[0]}: error:") and "it is not built: no _C" in last, last
        assert "RuntimeWarning" in proc.stderr and "it is not built" in proc.stderr  # the import warning
        assert not out.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_checkpoint(tmp_path, trained, damage, text_data):
    good = (trained / "checkpoint.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"garbage": b"not a checkpoint at all" * 40, "truncated": good[: len(good) // 2],
                     "empty": b""}[damage])
    assert_user_error(srt("generate", "--checkpoint", bad, "--prompt", "x", subprocess_=damage == "garbage"),
                      "bad.pt", "corrupt")
    out = tmp_path / "resumed"
    assert_user_error(srt("train", "--out", out, "--resume", bad, "--data", text_data, *TINY), "corrupt")
    assert not out.exists()
    assert_user_error(srt("generate", "--checkpoint", tmp_path / "missing.pt", "--prompt", "x"), "does not exist")


def test_failed_runs_never_overwrite_saved_results(tmp_path, trained, compared, text_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("checkpoint.pt", "metrics.json", "loss.png"):
        (run_dir / name).write_bytes((trained / name).read_bytes())
    before = snapshot(run_dir)
    # a new run into a folder holding a checkpoint, without --resume
    assert_user_error(srt("train", "--out", run_dir, "--data", text_data, "--steps", 2, *TINY), "--resume")
    # bad options, with and without --resume
    assert_user_error(srt("train", "--out", run_dir, "--data", text_data, "--num-reason-tokens", 9, *TINY))
    assert_user_error(srt("train", "--out", run_dir, "--resume", "--data", tmp_path / "nope", *TINY))
    # resuming a corrupt checkpoint into a folder that holds a good one
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    assert_user_error(srt("train", "--out", run_dir, "--resume", tmp_path / "bad.pt", *TINY))
    assert snapshot(run_dir) == before

    cmp_dir, _ = compared
    cmp_before = snapshot(cmp_dir)
    assert_user_error(srt("compare", "--out", cmp_dir, "--data", text_data, "--num-reason-tokens", 7, *TINY))
    assert_user_error(srt("compare", "--out", cmp_dir, "--data", tmp_path / "nope", *TINY))
    assert_user_error(srt("compare", "--out", cmp_dir, "--data", text_data, "--dtype", "float16", *TINY))
    # a good compare into a folder holding an earlier compare's results, without --overwrite
    assert_user_error(srt("compare", "--out", cmp_dir, "--data", text_data, "--steps", 2, *TINY),
                      "results.json", "--overwrite")
    assert snapshot(cmp_dir) == cmp_before


def test_compare_overwrite_replaces_the_earlier_results(tmp_path, compared, text_data):
    cmp_dir, _ = compared
    out = tmp_path / "cmp"
    out.mkdir()
    for name, digest in snapshot(cmp_dir).items():
        (out / name).write_bytes((cmp_dir / name).read_bytes())
    (out / "notes.txt").write_text("mine")
    old = json.loads((out / "results.json").read_text())
    assert (out / "reasoning-R2.pt").is_file()
    proc = srt("compare", "--out", out, "--data", text_data, "--steps", 2, "--num-reason-tokens", 1,
               "--overwrite", *TINY)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results != old
    assert [r["name"] for r in results["runs"]] == ["baseline", "reasoning R=1"]
    assert all(r["config"]["steps"] == 2 for r in results["runs"])
    # nothing of the earlier compare is left beside the new results; other files are not touched
    assert sorted(p.name for p in out.iterdir()) == ["baseline.pt", "loss_curves.png", "notes.txt",
                                                     "reasoning-R1.pt", "results.json"]
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_generate_options(trained):
    ckpt = trained / "checkpoint.pt"
    assert_user_error(srt("generate", "--checkpoint", ckpt, "--prompt", ""), "--prompt")
    assert_user_error(srt("generate", "--checkpoint", ckpt, "--prompt", "x", "--temperature", -1), "--temperature")
    assert_user_error(srt("generate", "--checkpoint", ckpt, "--prompt", "x", "--top-k", 0), "--top-k")


# ------------------------------------------------------------------------------------------
# found by a user trial: where the output goes, resuming from elsewhere, signals, odd prompts


def test_an_out_that_cannot_be_a_writable_folder_is_refused_before_training(tmp_path, text_data):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for command in ("train", "compare"):
        assert_user_error(srt(command, "--out", a_file, "--data", text_data, *TINY), "exists and is not a folder")
        assert_user_error(srt(command, "--out", a_file / "sub", "--data", text_data, *TINY),
                          "which is not a folder")
    assert a_file.read_text() == "mine"
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder nobody can create files in")
    for command in ("train", "compare"):  # used to train every step, then fail at the first save
        proc = srt(command, "--out", "/proc", "--data", text_data, "--steps", 10_000, *TINY)
        assert_user_error(proc, "cannot write to --out /proc")
        assert "step" not in proc.stdout


def test_resume_from_another_folder_takes_the_data_from_its_new_path(tmp_path, text_data, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / "corpus.txt").write_bytes(text_data.read_bytes())
    monkeypatch.chdir(here)
    out = tmp_path / "run"
    proc = srt("train", "--out", out, "--data", "corpus.txt", "--steps", 2, *TINY)  # a relative path
    assert proc.returncode == 0, proc.stderr
    monkeypatch.chdir(elsewhere)
    assert_user_error(srt("train", "--out", out, "--resume", "--steps", 3, *TINY),
                      "'corpus.txt'", "pass --data")
    proc = srt("train", "--out", out, "--resume", "--steps", 3, "--data", here / "corpus.txt", *TINY)
    assert proc.returncode == 0 and "resuming" in proc.stdout, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["step"] == 3
    (elsewhere / "other.txt").write_text("other text " * 500)  # another path, other content: refused
    assert_user_error(srt("train", "--out", out, "--resume", "--steps", 4, "--data", "other.txt", *TINY),
                      "differs from the data")


def test_the_schedule_is_explained_when_it_is_not_what_the_options_suggest(tmp_path, trained, text_data):
    from self_reasoning_tokens.training import RunConfig, lr_at, schedule_notes

    proc = srt("train", "--out", tmp_path / "short", "--data", text_data, "--steps", 1, *TINY)  # --warmup 2
    assert proc.returncode == 0, proc.stderr
    assert "note: --warmup 2 >= --steps 1: the learning rate only warms up" in proc.stdout
    # resuming a run of 8 steps for 12: the cosine decay is stretched, so the rate jumps
    ckpt = tmp_path / "copy.pt"
    ckpt.write_bytes((trained / "checkpoint.pt").read_bytes())
    proc = srt("train", "--resume", ckpt, "--out", tmp_path / "longer", "--steps", 12, "--data", text_data,
               *TINY)
    assert proc.returncode == 0, proc.stderr
    cfg = RunConfig(steps=8, warmup=2)
    new, old = lr_at(RunConfig(steps=12, warmup=2), 8), lr_at(cfg, 8)
    assert new > 2 * old  # the last step of the 8 had the floor rate; step 8 of 12 is well above it
    assert f"note: --steps 8 -> 12: the cosine learning-rate schedule is recomputed for 12 steps, so the " \
           f"rate at step 8 is {new:.3g} (it was {old:.3g})" in proc.stdout
    assert schedule_notes(RunConfig(steps=300, warmup=20)) == []


def test_sigterm_ends_train_as_an_interrupt_does(tmp_path, text_data):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "self_reasoning_tokens", "train", "--out", str(out),
                             "--data", str(text_data), "--steps", "100000", "--save-every", "1", *TINY],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere in the next steps, maybe inside a checkpoint write
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "srt train: terminated (SIGTERM); the last checkpoint" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]  # no temporary file left
    from self_reasoning_tokens.training import load_checkpoint
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 1


def test_resume_and_overwrite_together_are_refused(trained):
    assert_user_error(srt("train", "--out", trained, "--resume", "--overwrite"), "--resume", "--overwrite")


def test_interrupting_an_overwriting_run_before_its_first_save_names_the_old_checkpoint(
        monkeypatch, tmp_path, trained, text_data):
    from self_reasoning_tokens import training

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes())

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "run", interrupted)
    proc = srt("train", "--out", out, "--overwrite", "--data", text_data, "--steps", 3, *TINY)
    assert proc.returncode == 130
    assert (f"this run saved no checkpoint yet; {out / 'checkpoint.pt'} (step 8) is still the earlier "
            "run's") in proc.stderr, proc.stderr
    assert "--resume` continues" not in proc.stderr

    def interrupted_after_a_save(self, *args, checkpoint=None, **kwargs):
        self.save(checkpoint)  # step 0 of the new run replaces the earlier run's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "run", interrupted_after_a_save)
    proc = srt("train", "--out", out, "--overwrite", "--data", text_data, "--steps", 3, *TINY)
    assert proc.returncode == 130
    assert f"the last checkpoint, {out / 'checkpoint.pt'} (step 0), is intact" in proc.stderr, proc.stderr


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_named(tmp_path, trained, text_data):
    import torch

    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    state["model"]["pos_emb.weight"] = torch.zeros(3, 5)
    del state["model"]["norm.weight"]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "resumed"
    assert_user_error(srt("train", "--out", out, "--resume", bad, "--data", text_data, *TINY),
                      "pos_emb.weight has shape [3, 5]", "no norm.weight")
    assert not out.exists()
    assert_user_error(srt("generate", "--checkpoint", bad, "--prompt", "x"), "pos_emb.weight has shape [3, 5]")


def test_generate_takes_the_prompt_bytes_the_shell_passed(trained):
    # a byte that is not UTF-8 reaches Python as a surrogate (surrogateescape); it used to fail to encode
    proc = srt("generate", "--checkpoint", trained / "checkpoint.pt", "--prompt", "\udcff ok",
               "--max-new-tokens", 3, "--temperature", 0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("\ufffd ok")


def test_generate_into_a_pipe_closed_early_exits_quietly(trained):
    proc = subprocess.Popen([sys.executable, "-m", "self_reasoning_tokens", "generate", "--checkpoint",
                             str(trained / "checkpoint.pt"), "--prompt", "def", "--max-new-tokens", "100000"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(20)[:3] == b"def"
    proc.stdout.close()  # as `| head -c 20` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and stderr == "", stderr


def test_seeds_are_checked_against_what_torch_takes(tmp_path):
    from self_reasoning_tokens.cli import build_parser

    assert build_parser().parse_args(["train", "--seed", str(2**64 - 1)]).seed == 2**64 - 1
    for command in (["train", "--out", tmp_path / "o"], ["generate", "--checkpoint", "x", "--prompt", "x"]):
        proc = srt(*command, "--seed", 2**64)
        assert proc.returncode == 2 and "2**64 - 1" in proc.stderr, proc.stderr


def test_generate_with_no_room_says_so_before_printing(tmp_path, text_data):
    out = tmp_path / "one"
    proc = srt("train", "--out", out, "--data", text_data, "--steps", 1, *TINY, "--seq-len", 1)
    assert proc.returncode == 0, proc.stderr
    proc = srt("generate", "--checkpoint", out / "checkpoint.pt", "--prompt", "de")
    assert_user_error(proc, "max_seq_len 1 leaves no room")
    assert proc.stdout == ""


def test_an_interrupted_compare_resumes_to_the_uninterrupted_results(monkeypatch, tmp_path, text_data):
    from self_reasoning_tokens import training

    options = ["--data", text_data, "--steps", 6, "--num-reason-tokens", 1, "--save-every", 2, *TINY]
    straight = srt("compare", "--out", tmp_path / "straight", *options)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "cut"
    real = training.Trainer.train_step

    def cut_in_the_second_run(self):
        if self.name == "reasoning R=1" and self.step == 5:  # its step-4 checkpoint is on disk
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(training.Trainer, "train_step", cut_in_the_second_run)
    cut = srt("compare", "--out", out, *options, "--overw")  # argparse takes the abbreviation
    assert cut.returncode == 130
    assert "--resume` continues" in cut.stderr and "--save-every 2" in cut.stderr, cut.stderr
    assert "--overw" not in cut.stderr  # the command given would refuse --resume with --overwrite
    monkeypatch.setattr(training.Trainer, "train_step", real)
    assert_user_error(srt("compare", "--out", out, *options), "--resume")  # not without saying so
    assert_user_error(srt("compare", "--out", out, *options, "--resume", "--overwrite"), "one of them")
    changed = [*options[:-len(TINY)], *TINY[:-1], "--lr", "0.01", "--no-progress"]
    assert_user_error(srt("compare", "--out", out, *changed, "--resume"), "--lr 0.003 (now 0.01)")

    moved = tmp_path / "moved.txt"  # another path to the same data is taken, as train takes it
    moved.write_bytes(text_data.read_bytes())
    resumed = srt("compare", "--out", out, *options[:2], "--data", moved, *options[2:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "baseline: kept from the earlier compare" in resumed.stdout
    assert f"reasoning R=1: resuming {out / 'reasoning-R1.pt'} at step 4" in resumed.stdout
    a = json.loads((out / "results.json").read_text())
    b = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert a["complete"] is True
    for x, y in zip(a["runs"], b["runs"], strict=True):
        assert x["name"] == y["name"] and x["val_bpb"] == y["val_bpb"]
        assert [(h["step"], h["loss"]) for h in x["history"]] == [(h["step"], h["loss"]) for h in y["history"]]
    # resuming a complete compare keeps every run
    again = srt("compare", "--out", out, *options, "--resume")
    assert again.returncode == 0 and again.stdout.count("kept from the earlier compare") == 2, again.stderr


def test_activation_checkpointing_gives_the_same_runs_and_may_change_on_resuming(monkeypatch, tmp_path, text_data,
                                                                                 trained):
    """--activation-checkpointing changes memory and time, not results: a compare cut short with it
    and resumed without it equals an uninterrupted compare without it (every loss and val bpb),
    and train --resume takes it (or --no-activation-checkpointing) like --device."""
    from self_reasoning_tokens import training

    options = ["--data", text_data, "--steps", 6, "--num-reason-tokens", 1, "--save-every", 2, *TINY]
    straight = srt("compare", "--out", tmp_path / "straight", *options)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "cut"
    real = training.Trainer.train_step
    seen = set()

    def cut_in_the_second_run(self):
        seen.add(self.model.activation_checkpointing)
        if self.name == "reasoning R=1" and self.step == 5:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(training.Trainer, "train_step", cut_in_the_second_run)
    assert srt("compare", "--out", out, *options, "--activation-checkpointing").returncode == 130
    assert seen == {True}
    monkeypatch.setattr(training.Trainer, "train_step", real)
    changed = [*options[:-len(TINY)], *TINY[:-1], "--lr", "0.01", "--no-progress"]
    refused = srt("compare", "--out", out, *changed, "--resume")
    assert_user_error(refused, "--lr 0.003 (now 0.01)")
    assert "--activation-checkpointing" not in refused.stderr  # not a difference that counts
    resumed = srt("compare", "--out", out, *options, "--resume", "--no-activation-checkpointing")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((out / "results.json").read_text())
    b = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert [run["config"]["activation_checkpointing"] for run in a["runs"]] == [True, False]
    for x, y in zip(a["runs"], b["runs"], strict=True):
        assert x["name"] == y["name"] and x["val_bpb"] == y["val_bpb"]
        assert [(h["step"], h["loss"]) for h in x["history"]] == [(h["step"], h["loss"]) for h in y["history"]]

    before = snapshot(trained)
    for flag in ("--activation-checkpointing", "--no-activation-checkpointing"):
        done = srt("train", "--out", trained, "--resume", "--data", text_data, "--steps", 8, *TINY, flag)
        assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr
    assert snapshot(trained) == before


def test_sigterm_is_an_interrupt_only_in_a_single_process_that_does_not_ignore_it(monkeypatch):
    import signal

    from self_reasoning_tokens.cli import _sigterm_as_interrupt, _Terminated

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with _sigterm_as_interrupt():
        with pytest.raises(_Terminated):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    # under torchrun a rank blocked in a collective would never run a Python handler, and torchrun
    # would SIGKILL it after its grace period: SIGTERM keeps its default there
    monkeypatch.setenv("WORLD_SIZE", "2")
    with _sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.delenv("WORLD_SIZE")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent's choice stands
    try:
        with _sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_generate_can_probe_another_number_of_reasoning_tokens(trained):
    import torch

    from self_reasoning_tokens import cli
    from self_reasoning_tokens.training import build_model, load_checkpoint

    ckpt = trained / "checkpoint.pt"  # trained with R=1, max_reason_seq_len 4
    state = load_checkpoint(ckpt)
    model = build_model(state["config"], 256)
    model.load_state_dict(state["model"])
    model.eval()
    for R in (0, 1, 3):
        ids = cli.sample(model, torch.tensor([list(b"def")]), 12, R, state["config"].steps_future, 0., None)
        proc = srt("generate", "--checkpoint", ckpt, "--prompt", "def", "--max-new-tokens", 12, "--temperature", 0,
                   *(["--num-reason-tokens", R] if R != 1 else []))  # R=1: the checkpoint's own
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == bytes(ids[0].tolist()).decode("utf-8", errors="replace") + "\n"
    assert_user_error(srt("generate", "--checkpoint", ckpt, "--prompt", "x", "--num-reason-tokens", 5),
                      "max_reason_seq_len 4")
