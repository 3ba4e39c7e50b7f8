"""Training loop: losses, schedule, atomic checkpoints, exact resume, data-parallel training."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import self_reasoning_tokens
from self_reasoning_tokens.data import Corpus
from self_reasoning_tokens.training import (CheckpointError, ConfigError, RunConfig, Trainer,
                                            build_model, load_checkpoint, position_losses,
                                            validate_config)

REPO = Path(self_reasoning_tokens.__file__).resolve().parent.parent
TINY = dict(dim=32, depth=1, heads=2, dim_head=16, seq_len=24, batch_size=4, eval_every=4,
            eval_windows=6, warmup=2, lr=3e-3, data="memory")


def make_corpus(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    words = [b"def ", b"return ", b"self", b"(x)", b":\n    ", b" = ", b"1", b"\n"]
    text = b"".join(words[i] for i in rng.integers(0, len(words), size=n))
    arr = np.frombuffer(text, dtype=np.uint8).copy()
    cut = len(arr) * 9 // 10
    return Corpus("memory", arr[:cut], arr[cut:], "in-memory test text")


def env_with_package():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    return env


def write_text_data(path: Path) -> Path:
    corpus = make_corpus(20000)
    path.write_bytes(bytes(corpus.train) + bytes(corpus.val))
    return path


CLI_TINY = ["--steps", "{steps}", "--seq-len", "24", "--dim", "32", "--depth", "1", "--heads", "2",
            "--dim-head", "16", "--batch-size", "4", "--eval-every", "5", "--eval-windows", "6",
            "--warmup", "3", "--no-progress"]


def cli_args(steps, data, *extra):
    return [a.format(steps=steps) for a in CLI_TINY] + ["--data", str(data), *extra]


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("R", [0, 2])
def test_position_losses_match_the_models_own_losses(R):
    torch.manual_seed(0)
    model = build_model(RunConfig(**{**TINY, "max_reason_seq_len": 3}), 256).double()
    with torch.no_grad():
        model.reason_tokens.normal_()
    x = torch.randint(0, 256, (3, 13))
    ce = position_losses(model(x[:, :-1], num_reason_tokens=R), x[:, 1:], R)
    assert ce.shape == (3, 12, R + 1)
    all_positions = model(x, num_reason_tokens=R, return_loss=True)
    real_token = model(x, num_reason_tokens=R, remove_reason_tokens_at_end=True, return_loss=True)
    torch.testing.assert_close(ce.mean(), all_positions.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce[..., 0].mean(), real_token.float(), rtol=1e-6, atol=1e-6)
    if R:  # the last position is a different prediction from the real token's
        assert not torch.allclose(ce[..., -1].mean(), ce[..., 0].mean())


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    trainer = Trainer(RunConfig(**{**TINY, "steps": 50, "warmup": 10}), make_corpus())
    lrs = [trainer.lr_at(s) for s in range(50)]
    assert lrs[0] == pytest.approx(3e-3 / 10)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert max(lrs) == pytest.approx(3e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert trainer.lr_at(50) == pytest.approx(3e-3 * 0.1)


@pytest.mark.parametrize("change, match", [
    (dict(num_reason_tokens=5, max_reason_seq_len=4), "max-reason-seq-len"),
    (dict(seq_len=300, max_seq_len=256), "max-seq-len"),
    (dict(batch_size=3), "divisible"),
    (dict(dtype="float16"), "cuda"),
    (dict(device="tpu"), "device"),
    (dict(lr=0.0), "lr"),
    (dict(objective="middle"), "objective"),
])
def test_validate_config_rejects_bad_settings(change, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(replace(RunConfig(), **change), world_size=2)


def test_training_lowers_the_loss_and_bf16_autocast_runs():
    corpus = make_corpus()
    result = Trainer(RunConfig(**{**TINY, "steps": 30, "num_reason_tokens": 1}), corpus).run(progress=False)
    assert result.evals[0]["step"] == 0 and result.evals[-1]["step"] == 30
    assert result.evals[-1]["val_bpb"] < result.evals[0]["val_bpb"] - 1.0
    assert [h["step"] for h in result.history] == list(range(1, 31))
    bf16 = Trainer(RunConfig(**{**TINY, "steps": 3, "num_reason_tokens": 1, "dtype": "bfloat16"}), corpus)
    res = bf16.run(progress=False)
    assert all(math.isfinite(h["loss"]) for h in res.history)


def test_objective_last_trains_only_the_last_position():
    corpus = make_corpus()
    cfg = RunConfig(**{**TINY, "steps": 3, "num_reason_tokens": 2})
    last = Trainer(replace(cfg, objective="last"), corpus).run(progress=False)
    every = Trainer(cfg, corpus).run(progress=False)
    for h in last.history:  # the objective is the last position's loss, which bpb reports
        assert h["loss"] == pytest.approx(h["bpb"] * math.log(2), rel=1e-6)
    assert every.history[0]["loss"] != pytest.approx(every.history[0]["bpb"] * math.log(2), rel=1e-3)
    assert last.history[0]["bpb"] == every.history[0]["bpb"]  # same start, same first batch
    assert last.history[-1]["bpb"] != every.history[-1]["bpb"]


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    corpus = make_corpus()
    cfg = RunConfig(**{**TINY, "steps": 12, "num_reason_tokens": 2, "hard_mode": True})
    straight = Trainer(cfg, corpus)
    full = straight.run(progress=False)

    class Killed(Exception):
        pass

    def kill(trainer):
        raise Killed

    first = Trainer(cfg, corpus)
    with pytest.raises(Killed):  # dies right after its checkpoint at step 5
        first.run(progress=False, save_every=5, checkpoint=tmp_path / "ckpt.pt", on_save=kill)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["step"] == 5 and state["config"] == cfg
    torch.manual_seed(1234)  # resuming must not depend on the RNG state of the new process
    resumed = Trainer(cfg, corpus, state=state)
    assert resumed.step == 5
    res = resumed.run(progress=False)

    strip = lambda hist: [(h["step"], h["loss"], h["bpb"], h["lr"]) for h in hist]  # noqa: E731
    assert strip(res.history) == strip(full.history)
    assert [(e["step"], e["val_bpb"]) for e in res.evals] == [(e["step"], e["val_bpb"]) for e in full.evals]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    trainer = Trainer(RunConfig(**{**TINY, "steps": 2}), make_corpus())
    trainer.run(progress=False, checkpoint=path)
    before = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    trainer.cfg = replace(trainer.cfg, steps=4)
    with pytest.raises(OSError):
        trainer.run(progress=False, checkpoint=path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind


def test_load_checkpoint_rejects_garbage(tmp_path):
    good = tmp_path / "good.pt"
    Trainer(RunConfig(**{**TINY, "steps": 1}), make_corpus()).run(progress=False, checkpoint=good)
    cases = {
        "random.pt": os.urandom(4096),
        "truncated.pt": good.read_bytes()[:2000],
        "empty.pt": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    torch.save({"hello": torch.zeros(2)}, tmp_path / "other.pt")
    state = torch.load(good, weights_only=True)
    state["version"] = 99
    torch.save(state, tmp_path / "future.pt")
    for name in [*cases, "other.pt", "future.pt", "missing.pt"]:
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)
    assert load_checkpoint(good)["step"] == 1


# ------------------------------------------------------------------------------------------
# through the command line, in subprocesses


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "self_reasoning_tokens", *args], cwd=REPO,
                          env=env_with_package(), capture_output=True, text=True, timeout=300, **kw)


def history_of(out: Path):
    metrics = json.loads((out / "metrics.json").read_text())
    return ([(h["step"], h["loss"], h["bpb"], h["lr"]) for h in metrics["history"]],
            [(e["step"], e["val_bpb"]) for e in metrics["evals"]])


def test_killed_train_resumes_to_the_same_loss_curve(tmp_path):
    data = write_text_data(tmp_path / "data.txt")
    args = cli_args(60, data, "--num-reason-tokens", "1", "--save-every", "3", "--eval-every", "20")
    straight = run_cli(["train", "--out", str(tmp_path / "straight"), *args])
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "self_reasoning_tokens", "train", "--out", str(out), *args],
                            cwd=REPO, env=env_with_package(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["step"]  # whatever the kill left is a complete checkpoint
    assert 0 < killed_at < 60, "the run should have been killed part-way"

    resumed = run_cli(["train", "--out", str(out), "--resume", *args])
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {killed_at}" in resumed.stdout
    assert history_of(out) == history_of(tmp_path / "straight")
    a = load_checkpoint(out / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    data = write_text_data(tmp_path / "data.txt")
    args = cli_args(6, data, "--num-reason-tokens", "1", "--batch-size", "8", "--eval-every", "3")
    dumps = tmp_path / "dumps"
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "self_reasoning_tokens", "train", "--out", str(tmp_path / "ddp"),
                          "--rank-dumps", str(dumps), *args],
                         cwd=REPO, env={**env_with_package(), "TMPDIR": str(tmp_path)},  # torchrun's log folders
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single = run_cli(["train", "--out", str(tmp_path / "single"), *args])
    assert single.returncode == 0, single.stderr

    r0 = torch.load(dumps / "rank0.pt", weights_only=True)
    r1 = torch.load(dumps / "rank1.pt", weights_only=True)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]

    (ddp_hist, ddp_evals), (one_hist, one_evals) = history_of(tmp_path / "ddp"), history_of(tmp_path / "single")
    assert len(ddp_hist) == len(one_hist) == 6
    for (s1, loss1, bpb1, lr1), (s2, loss2, bpb2, lr2) in zip(ddp_hist, one_hist):
        assert s1 == s2 and lr1 == lr2
        assert abs(loss1 - loss2) < 1e-5 and abs(bpb1 - bpb2) < 1e-5
    for (s1, v1), (s2, v2) in zip(ddp_evals, one_evals):
        assert s1 == s2 and abs(v1 - v2) < 1e-5
    single_weights = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model"]
    for k, w in single_weights.items():
        torch.testing.assert_close(r0["model"][k], w, rtol=1e-4, atol=1e-5)
    # only rank 0 wrote the run's files
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "loss.png", "metrics.json"]
