"""Command line: ``python -m self_reasoning_tokens`` / ``srt``.

    srt compare [--out runs/compare] [--resume]   baseline vs reasoning tokens (R=1, R=3): table, JSON, PNG
    srt train --out DIR [--num-reason-tokens R] [--resume]   one run, atomic checkpoints
    srt generate --checkpoint DIR/checkpoint.pt --prompt "def "   sample with the KV cache
    torchrun --nproc_per_node 2 -m self_reasoning_tokens train ...  data parallel (gloo / nccl)

User errors (bad options, missing or empty data, corrupt checkpoint, ...) print one line on
stderr and exit with code 2; all options are checked and the data is loaded before anything is
written (then --out is checked by writing a file in it, before any training), and files are
replaced atomically, so a failed run never damages earlier results; a folder holding earlier
results is refused unless --overwrite says to replace them (or --resume to continue them).
Ctrl-C, and SIGTERM in a single process, end a run with one line on what is left and how to resume.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_arg(text: str, ok, expected: str) -> int:
    """An integer option's value, when ok(value); otherwise argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_arg(text, lambda value: value >= 1, "a positive integer")


def _nonneg_int(text: str) -> int:
    return _int_arg(text, lambda value: value >= 0, "an integer >= 0")


def _seed(text: str) -> int:
    # what torch.manual_seed takes
    return _int_arg(text, lambda value: 0 <= value < 2**64, "an integer from 0 to 2**64 - 1")


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


# Options that map 1:1 onto RunConfig fields; their argparse default is None so that we know
# which ones the user gave (a resumed run keeps its checkpoint's value for the others).
def _add_run_options(p: argparse.ArgumentParser, defaults) -> None:
    d = defaults
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'stdlib' (default: the Python standard library's .py files, "
                   "byte level), 'arithmetic' (multi-digit additions, most significant digit first) "
                   "or a path to a UTF-8 text file or a folder of text files")
    g.add_argument("--max-data-bytes", type=_positive_int,
                   help="read at most this many bytes of stdlib / PATH data (default: all)")
    g.add_argument("--arith-digits", type=_positive_int, help=f"operand digits for --data arithmetic, "
                   f"1 to 15 (default {d.arith_digits})")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=_positive_int, help=f"model width (default {d.dim})")
    g.add_argument("--depth", type=_positive_int, help=f"layers (default {d.depth})")
    g.add_argument("--heads", type=_positive_int, help=f"attention heads (default {d.heads})")
    g.add_argument("--dim-head", type=_positive_int, help=f"head dim (default {d.dim_head}; use 32, 64, "
                   "96 or 128 on CUDA)")
    g.add_argument("--max-seq-len", type=_positive_int,
                   help="learned positions = longest sequence the model takes, training and "
                   "generation (default: --seq-len)")
    g.add_argument("--max-reason-seq-len", type=_nonneg_int,
                   help=f"most reasoning tokens per step the model holds (default {d.max_reason_seq_len})")
    g = p.add_argument_group("reasoning tokens")
    g.add_argument("--steps-future", type=_nonneg_int, help="W: the next W steps may not train "
                   f"(stop-grad mode) or see (hard mode) a reasoning token (default {d.steps_future})")
    g.add_argument("--hard-mode", action="store_const", const=True, default=None,
                   help="mask the reasoning region out of attention instead of stopping its gradient")
    g.add_argument("--objective", choices=("all", "last"), help="train on every position (default "
                   "'all', the model's return_loss: labels repeated over reasoning positions) or "
                   "only on each step's last position")
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=_positive_int, help=f"real tokens (bytes) per sequence "
                   f"(default {d.seq_len}); a model with R reasoning tokens sees seq-len*(R+1) positions")
    g.add_argument("--batch-size", type=_positive_int, help=f"global batch, split over processes "
                   f"(default {d.batch_size})")
    g.add_argument("--steps", type=_positive_int, help=f"optimizer steps per run (default {d.steps})")
    g.add_argument("--lr", type=_nonneg_float, help=f"peak AdamW learning rate, cosine decay "
                   f"(default {d.lr})")
    g.add_argument("--warmup", type=_nonneg_int, help=f"warmup steps (default {d.warmup})")
    g.add_argument("--weight-decay", type=_nonneg_float, help=f"(default {d.weight_decay})")
    g.add_argument("--grad-clip", type=_nonneg_float, help=f"gradient norm clip, 0 = off (default {d.grad_clip})")
    g.add_argument("--seed", type=_seed, help=f"seed for weights and data (default {d.seed})")
    g.add_argument("--eval-every", type=_positive_int, help=f"validate every N steps (default {d.eval_every})")
    g.add_argument("--eval-windows", type=_positive_int,
                   help=f"validation windows of --seq-len bytes (default {d.eval_windows})")
    g.add_argument("--device", help="cpu (default) or cuda (the CUDA kernels); under torchrun each "
                   "rank takes cuda:LOCAL_RANK")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="float32 (default); bfloat16 / float16 run the model under autocast "
                   "(float16: CUDA only, with a gradient scaler)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each layer in the backward instead of keeping its activations: "
                   "less memory at a long --seq-len, about 1.2-1.6x the time, the same results "
                   "(default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_RUN_FIELDS = ("data", "max_data_bytes", "arith_digits", "dim", "depth", "heads", "dim_head",
               "max_seq_len", "max_reason_seq_len", "steps_future", "hard_mode", "objective",
               "seq_len", "batch_size", "steps", "lr", "warmup", "weight_decay", "grad_clip", "seed",
               "eval_every", "eval_windows", "device", "dtype", "activation_checkpointing")
# What a resumed run may change: run control and hardware, not the model, data or optimizer.
_RESUME_MAY_CHANGE = ("steps", "eval_every", "device", "dtype", "activation_checkpointing")
# What changes the memory and time of a run but not its results (compare --resume may change it).
_RESULT_NEUTRAL = ("activation_checkpointing",)


def build_parser() -> argparse.ArgumentParser:
    from .training import RunConfig

    d = RunConfig()
    parser = _Parser(prog="srt", description="Self reasoning tokens: train and compare byte-level "
                     "language models with and without reasoning tokens (no download needed).")
    sub = parser.add_subparsers(dest="command", metavar="{compare,train,generate}", required=True)

    p = sub.add_parser("compare", help="train a baseline and reasoning-token models from the same "
                       "seed and data; table, results.json and loss_curves.png in --out",
                       description="Train a baseline (no reasoning tokens) and reasoning-token models "
                       "(default R=1 and R=3, stop-grad mode) from the same seed and data; report "
                       "validation bits per byte and wall time as a table, results.json and "
                       "loss_curves.png in --out (each run's final checkpoint is saved there too).")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--num-reason-tokens", type=_nonneg_int, nargs="+", default=[1, 3], metavar="R",
                   help="reasoning tokens per step of the reasoning runs (default 1 3); the baseline "
                   "(R=0) always runs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier compare in --out (its results.json, "
                   "loss_curves.png and checkpoints are deleted first); without it such a folder is refused")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted compare in --out, given the same options: its finished "
                   "runs are kept and the run it was cut short in continues from its last checkpoint")
    p.add_argument("--save-every", type=_positive_int, default=100,
                   help="checkpoint the run in progress every N steps (default 100), and at its end")
    _add_run_options(p, d)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train one model with atomic checkpoints (resumable)",
                       description="Train one model. Saves DIR/checkpoint.pt every --save-every steps "
                       "and at the end (temporary file + rename), DIR/metrics.json and DIR/loss.png. "
                       "--resume continues exactly where the checkpoint stopped.")
    p.add_argument("--out", help="output folder (default runs/train, or the folder of --resume CKPT)")
    p.add_argument("--num-reason-tokens", type=_nonneg_int, metavar="R",
                   help="reasoning tokens per step (default 0)")
    p.add_argument("--save-every", type=_positive_int, default=100,
                   help="checkpoint every N steps (default 100), and always at the end")
    p.add_argument("--resume", nargs="?", const=True, metavar="CKPT",
                   help="continue from --out's checkpoint.pt (or CKPT); starts fresh if --out has "
                   "none yet. Model, data and optimizer options come from the checkpoint.")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if --out already holds a checkpoint")
    p.add_argument("--rank-dumps", help=argparse.SUPPRESS)  # tests: each rank writes its weights here
    _add_run_options(p, d)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache)",
                       description="Print the prompt and a sample continuing it, from a checkpoint "
                       "of train or compare, with the model's KV-cache generate.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by train or compare")
    p.add_argument("--prompt", required=True, help="text to continue (its bytes are the tokens: "
                   "UTF-8, or the raw bytes the shell passed)")
    p.add_argument("--max-new-tokens", type=_nonneg_int, default=256,
                   help="bytes to generate (default 256); beyond the model's max_seq_len the "
                   "context slides (cropped to its last max_seq_len/2 bytes)")
    p.add_argument("--temperature", type=_nonneg_float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=_positive_int, help="sample among the k likeliest bytes")
    p.add_argument("--num-reason-tokens", type=_nonneg_int, metavar="R",
                   help="reasoning tokens per step (default: the R the checkpoint was trained with; "
                   "another R, e.g. 0, probes what the model makes of its reasoning tokens)")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=cmd_generate)
    return parser


def _given(args) -> dict:
    return {f: getattr(args, f) for f in _RUN_FIELDS if getattr(args, f, None) is not None}


def _load_data(cfg):
    from .data import load_corpus

    corpus = load_corpus(cfg.data, seed=cfg.seed, max_bytes=cfg.max_data_bytes, arith_digits=cfg.arith_digits)
    corpus.check_fits(cfg.seq_len)
    return corpus


def _say(info, text: str) -> None:
    if info.is_main:
        print(text, flush=True)


def _check_out_path(out: Path) -> None:
    """Refuse an --out that cannot be a folder (it, or a folder above it, is a file) before the data
    is even loaded."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "exists and is not a folder" if folder == out else f"is inside {folder}, which is not a folder"
                raise UserError(f"--out {out} {what}")
            return


def _make_out_folder(out: Path) -> None:
    """Create --out and write (then remove) a file in it, so that a folder we cannot write to is
    found before training, not at the first checkpoint, steps or hours later."""
    probe = out / f".srt-write-check-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    finally:
        probe.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# train


def _train_out(args) -> Path:
    """train's output folder: --out, else the folder of --resume CKPT, else runs/train."""
    if args.out:
        return Path(args.out)
    return Path(args.resume).parent if isinstance(args.resume, str) else Path("runs/train")


def cmd_train(args) -> int:
    from .data import DataError, is_data_path
    from .training import (CheckpointError, DistInfo, RunConfig, Trainer, atomic_write_bytes,
                           atomic_write_text, check_model_state, load_checkpoint, schedule_notes,
                           validate_config)

    info = DistInfo.from_env()
    given = _given(args)
    if args.num_reason_tokens is not None:
        given["num_reason_tokens"] = args.num_reason_tokens

    explicit_ckpt = isinstance(args.resume, str)
    out = _train_out(args)
    ckpt = out / "checkpoint.pt"
    _check_out_path(out)
    if args.resume is True and args.overwrite:
        raise UserError(f"--resume continues {ckpt} and --overwrite starts over: pass one of them")
    state = source = None
    if args.resume is not None:
        source = Path(args.resume) if explicit_ckpt else ckpt
        if source.exists() or explicit_ckpt:
            state = load_checkpoint(source)  # CheckpointError if missing or corrupt
            check_model_state(state, source)
            if ckpt.exists() and source.resolve() != ckpt.resolve() and not args.overwrite:
                raise UserError(f"{ckpt} already exists and is not the checkpoint being resumed; "
                                "choose another --out or pass --overwrite")
        else:
            _say(info, f"no checkpoint in {out} yet: starting from step 0")
    elif ckpt.exists() and not args.overwrite:
        raise UserError(f"{ckpt} already exists; pass --resume to continue it, --overwrite to start "
                        "over, or choose another --out")

    if state is not None:
        cfg = state["config"]
        changes = {}
        for key, value in given.items():
            saved = getattr(cfg, key)
            if key == "max_seq_len" and saved is None:  # the checkpoint's model took --seq-len's value
                saved = cfg.model_max_seq_len
            if value == saved:
                continue
            if key == "data" and is_data_path(value) and is_data_path(saved):
                changes[key] = value  # another path to the same data: its content is compared below
                continue
            if key not in _RESUME_MAY_CHANGE:
                flag = "--" + key.replace("_", "-")
                shown = "all" if saved is None and key == "max_data_bytes" else saved
                raise UserError(f"{flag} {value} differs from the checkpoint's {shown}; a "
                                f"resumed run keeps its model, data and optimizer settings (it may change "
                                f"{', '.join('--' + k.replace('_', '-') for k in _RESUME_MAY_CHANGE)})")
            changes[key] = value
        cfg = replace(cfg, **changes)
    else:
        cfg = RunConfig(**given)
    validate_config(cfg, info.world_size)
    try:
        corpus = _load_data(cfg)
    except DataError as e:
        if state is None or "data" in given or not is_data_path(cfg.data):
            raise
        raise DataError(f"{e}; the checkpoint was trained on --data {cfg.data!r} (a relative path is "
                        "taken from the current folder): pass --data with that data's path from here "
                        "(its content is checked)") from None
    if state is not None:
        if state["data_fingerprint"] != corpus.fingerprint():
            raise CheckpointError(f"the data ({cfg.data}) differs from the data the checkpoint was "
                                  f"trained on; resuming would not continue the same run{_cap_note(cfg)}")
        if state["step"] >= cfg.steps:
            _say(info, f"the checkpoint is already at step {state['step']} of --steps {cfg.steps}: "
                 "nothing to do (a larger --steps trains on; the cosine learning-rate schedule is then "
                 "recomputed for the new --steps, so the rate rises again)")
            return 0
    # for the interrupt note: a checkpoint in --out that this run does not continue is an earlier run's
    # until this run's first save replaces it (os.replace: a new file)
    if ckpt.exists() and not (state is not None and source.resolve() == ckpt.resolve()):
        args.earlier_checkpoint = _file_identity(ckpt)
    # Everything is checked: from here on we write.
    name = _run_name(cfg)[0]
    if info.is_main:
        _make_out_folder(out)
        _say(info, f"data: {corpus.description}")
        if state is not None:
            _say(info, f"resuming {ckpt if not explicit_ckpt else args.resume} at step {state['step']}")
        for note in schedule_notes(cfg, state["config"] if state is not None else None,
                                   state["step"] if state is not None else 0):
            _say(info, f"note: {note}")

    def write_metrics(trainer) -> None:
        atomic_write_text(out / "metrics.json", json.dumps({
            "name": trainer.name, "config": asdict(trainer.cfg), "step": trainer.step,
            "train_time_s": trainer.train_time, "history": trainer.history, "evals": trainer.evals,
        }, indent=1))

    def print_eval(ev) -> None:
        from tqdm import tqdm

        tqdm.write(f"step {ev['step']}: validation {ev['val_bpb']:.4f} bits/byte")

    info.init(cfg.device)
    try:
        trainer = Trainer(cfg, corpus, info, state=state, name=name)
        result = trainer.run(progress=not args.no_progress, save_every=args.save_every, checkpoint=ckpt,
                             on_save=write_metrics, on_eval=print_eval)
        if args.rank_dumps:
            import torch

            Path(args.rank_dumps).mkdir(parents=True, exist_ok=True)
            torch.save({"model": trainer.model.state_dict(), "history": trainer.history},
                       Path(args.rank_dumps) / f"rank{info.rank}.pt")
    finally:
        info.close()
    if info.is_main:
        from .plotting import plot_runs

        atomic_write_bytes(out / "loss.png", plot_runs([result.to_json()], title=name))
        final = result.evals[-1]
        _say(info, f"{name}: step {result.step}, validation {final['val_bpb']:.4f} bits/byte, "
                   f"training time {result.train_time_s:.1f} s; wrote {ckpt}, {out / 'metrics.json'}, "
                   f"{out / 'loss.png'}")
    return 0


# ------------------------------------------------------------------------------------------
# compare


def _earlier_compare_files(out: Path, slugs: list) -> list:
    """The files of an earlier compare in `out`: its results.json and loss_curves.png, the
    checkpoints its results.json names (inside `out`), and any checkpoint this compare would write."""
    if not out.is_dir():
        return []
    names = {"results.json", "loss_curves.png", *(f"{slug}.pt" for slug in slugs)}
    try:
        for run in json.loads((out / "results.json").read_text()).get("runs", []):
            names.add(Path(str(run.get("checkpoint", ""))).name)
    except (OSError, ValueError, AttributeError):
        pass  # no (readable) results.json: the fixed names above still count
    order = lambda name: (not name.endswith(".json"), not name.endswith(".png"), name)  # noqa: E731
    return [out / name for name in sorted(names, key=order)
            if name.endswith((".json", ".png", ".pt")) and (out / name).is_file()]


def _run_name(cfg) -> tuple[str, str]:
    if cfg.num_reason_tokens == 0:
        return "baseline", "baseline"
    mode = " (hard)" if cfg.hard_mode else ""
    return (f"reasoning R={cfg.num_reason_tokens}{mode}",
            f"reasoning-R{cfg.num_reason_tokens}{'-hard' if cfg.hard_mode else ''}")


def _cap_note(cfg) -> str:
    if cfg.max_data_bytes is None or cfg.data == "arithmetic":
        return ""
    return (" (or it was written before 2026-11-30, when --max-data-bytes began to give validation "
            "its 5% share of the cap: such checkpoints saw another split of the same files)")


def _as_resumable(saved: dict, now: dict) -> dict:
    """``saved`` with what compare --resume may change taken from ``now``: the data when both
    name a path (another path to the same data; its content is compared through the
    fingerprint), and the settings that do not change results (_RESULT_NEUTRAL; absent from
    records written before they existed)."""
    from .data import is_data_path

    paths = is_data_path(saved.get("data")) and is_data_path(now.get("data"))
    return {**saved, **({"data": now.get("data")} if paths else {}),
            **{key: now[key] for key in _RESULT_NEUTRAL if key in now}}


def _differences(saved: dict, now: dict) -> str:
    keys = [k for k in now if saved.get(k) != now[k]]
    return ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {now[k]})" for k in keys[:3]) + \
        (", ..." if len(keys) > 3 else "")


def _resume_plan(out: Path, configs: list, corpus) -> list:
    """compare --resume: per run, ("done", its record in results.json), ("continue", the state of
    the checkpoint it was cut short at) or None (not started). Refuses anything that was run with
    other options or on other data, so that a resumed compare is the one an uninterrupted run gives."""
    from .training import CheckpointError, check_model_state, load_checkpoint

    results = out / "results.json"
    try:
        earlier = json.loads(results.read_text())
        records = {run["name"]: run for run in earlier.get("runs", [])}
    except FileNotFoundError:
        records = {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"--resume: {results} is unreadable ({type(e).__name__}); pass --overwrite to "
                        "start over") from None
    names = [_run_name(cfg)[0] for cfg in configs]
    others = [name for name in records if name not in names]
    if others:
        raise UserError(f"--resume: {results} holds runs this compare does not ({', '.join(others)}); "
                        "pass the same --num-reason-tokens and --hard-mode, or --overwrite to start over")
    plan = []
    for cfg, name in zip(configs, names):
        ckpt = out / f"{_run_name(cfg)[1]}.pt"
        want = json.loads(json.dumps(asdict(cfg)))
        record = records.get(name)
        recorded = _as_resumable(record.get("config") or {}, want) if record is not None else want
        if recorded != want:
            raise UserError(f"--resume: {name} in {results} ran with other options "
                            f"({_differences(recorded, want)}); pass the same "
                            "options, or --overwrite to start over")
        if not ckpt.is_file():
            if record is not None:
                raise UserError(f"--resume: the checkpoint of the finished run {name}, {ckpt}, is missing; "
                                "pass --overwrite to start over")
            plan.append(None)
            continue
        state = load_checkpoint(ckpt)
        check_model_state(state, ckpt)
        saved = _as_resumable(json.loads(json.dumps(asdict(state["config"]))), want)
        if saved != want:
            raise UserError(f"--resume: {ckpt} ran with other options ({_differences(saved, want)}); pass "
                            "the same options, or --overwrite to start over")
        if state["data_fingerprint"] != corpus.fingerprint():
            raise CheckpointError(f"--resume: the data ({corpus.name}) differs from the data {ckpt} was "
                                  f"trained on{_cap_note(cfg)}")
        plan.append(("done", record) if record is not None else ("continue", state))
    return plan


def format_table(runs: list) -> str:
    header = ("run", "R", "W", "mode", "positions/seq", "val bpb", "val bpb @real tok", "train bpb",
              "train s", "wall s", "ms/step")
    rows = []
    for r in runs:
        c = r["config"]
        R = c["num_reason_tokens"]
        rows.append((
            r["name"], str(R), str(c["steps_future"]) if R else "-",
            ("hard" if c["hard_mode"] else "stop-grad") if R else "-",
            str(r["positions_per_sequence"]), f"{r['val_bpb']:.4f}",
            f"{r['val_bpb_real_token_position']:.4f}", f"{r['train_bpb_recent']:.4f}",
            f"{r['train_time_s']:.1f}", f"{r['wall_time_s']:.1f}", f"{1000 * r['s_per_step']:.0f}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda row: "  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)  # noqa: E731
                                for i, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), line, *map(fmt, rows)])


def cmd_compare(args) -> int:
    import torch

    from .plotting import plot_runs
    from .training import (DistInfo, RunConfig, Trainer, atomic_write_bytes, atomic_write_text,
                           schedule_notes, validate_config)

    info = DistInfo.from_env()
    out = Path(args.out)
    _check_out_path(out)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the compare in --out and --overwrite starts over: pass one of them")
    base = RunConfig(**_given(args))
    counts = [0] + [R for i, R in enumerate(args.num_reason_tokens) if R and R not in args.num_reason_tokens[:i]]
    configs = [replace(base, num_reason_tokens=R) for R in counts]
    for cfg in configs:
        validate_config(cfg, info.world_size)
    corpus = _load_data(base)
    plan = _resume_plan(out, configs, corpus) if args.resume else [None] * len(configs)
    earlier = [] if args.resume else _earlier_compare_files(out, [_run_name(c)[1] for c in configs])
    if earlier and not args.overwrite:
        raise UserError(f"--out {out} already holds results of an earlier compare "
                        f"({len(earlier)} file{'s' * (len(earlier) > 1)}: {', '.join(p.name for p in earlier[:3])}"
                        f"{', ...' if len(earlier) > 3 else ''}); "
                        "pass --resume to continue them, --overwrite to replace them, or choose another --out")
    # Everything is checked: from here on we write.
    if info.is_main:
        _make_out_folder(out)
        for path in earlier:  # --overwrite: no stale file of the earlier compare stays next to the new ones
            path.unlink()
    _say(info, f"data: {corpus.description}")
    for note in schedule_notes(base):
        _say(info, f"note: {note}")
    _say(info, f"runs: {', '.join(_run_name(c)[0] for c in configs)}; {base.steps} steps of "
         f"{base.batch_size} x {base.seq_len} bytes each, model dim {base.dim}, depth {base.depth}, "
         f"heads {base.heads}, device {base.device}, {base.dtype}, {info.world_size} process(es)")

    started = time.time()
    summary = {
        "command": "python -m self_reasoning_tokens " + " ".join(shlex.quote(a) for a in args.argv),
        "data": corpus.description,
        "metric": "validation bits per byte at the last position of each step (the position "
                  "generate samples from); val_bpb_real_token_position is the prediction made at the "
                  "real token, before that step's reasoning tokens (remove_reason_tokens_at_end=True)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "processes": info.world_size,
                    "device": torch.cuda.get_device_name() if base.device.startswith("cuda") else "cpu"},
        "complete": False,
        "runs": [],
    }
    info.init(base.device)
    try:
        for cfg, resumed in zip(configs, plan):
            name, slug = _run_name(cfg)
            if resumed is not None and resumed[0] == "done":
                summary["runs"].append(resumed[1])
                _say(info, f"{name}: kept from the earlier compare (step {resumed[1]['steps']}, validation "
                           f"{resumed[1]['val_bpb']:.4f} bits/byte)")
                continue
            state = resumed[1] if resumed is not None else None
            if state is not None:
                _say(info, f"{name}: resuming {out / f'{slug}.pt'} at step {state['step']}")
            trainer = Trainer(cfg, corpus, info, state=state, name=name)
            result = trainer.run(progress=not args.no_progress, save_every=args.save_every,
                                 checkpoint=out / f"{slug}.pt")
            record = result.to_json()
            record["checkpoint"] = str(out / f"{slug}.pt")
            summary["runs"].append(record)
            if info.is_main:  # partial results survive a later crash
                atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
            _say(info, f"{name}: step {result.step}, validation {result.evals[-1]['val_bpb']:.4f} bits/byte, "
                       f"training time {result.train_time_s:.1f} s; wrote {out / f'{slug}.pt'}")
    finally:
        info.close()
    if info.is_main:
        summary["complete"] = True
        summary["total_wall_time_s"] = time.time() - started
        atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
        title = (f"{corpus.name}: dim {base.dim}, depth {base.depth}, seq {base.seq_len}, batch "
                 f"{base.batch_size}, {base.steps} steps, W={base.steps_future}")
        atomic_write_bytes(out / "loss_curves.png", plot_runs(summary["runs"], title=title))
        print()
        print(format_table(summary["runs"]))
        print("val bpb: validation bits per byte predicted at each step's last position (the one "
              "generate samples from); @real tok: at the real token, before its reasoning tokens "
              "(remove_reason_tokens_at_end=True).\npositions/seq = seq-len*(R+1): a model with R "
              "reasoning tokens does about R+1 times the compute per byte (see ms/step).")
        total = summary["total_wall_time_s"]
        print(f"\ntotal {total:.0f} s" if total >= 10 else f"\ntotal {total:.1f} s", end="")
        print(f"; wrote {out / 'results.json'}, "
              f"{out / 'loss_curves.png'} and one checkpoint per run in {out}/")
    return 0


# ------------------------------------------------------------------------------------------
# generate


def sample(model, prompt, max_new_tokens: int, num_reason_tokens: int, steps_future: int,
           temperature: float, top_k: Optional[int], on_token=None):
    """``model.generate`` (KV cache) for any length: while prompt + output fits max_seq_len it is
    one call; beyond, the context is cropped to its last max_seq_len // 2 tokens (positions are
    absolute, learned up to max_seq_len) and generation goes on in chunks, each with a fresh cache."""
    import torch

    limit = model.max_seq_len
    out, remaining = prompt, max_new_tokens
    while remaining > 0:
        ctx = out if out.shape[1] + remaining <= limit else out[:, -min(out.shape[1], max(1, limit // 2)):]
        chunk = min(remaining, limit - ctx.shape[1])
        if chunk < 1:
            raise UserError(f"the model's max_seq_len {limit} leaves no room to generate")
        new = model.generate(ctx, chunk, num_reason_tokens=num_reason_tokens,
                             num_steps_future_can_use_reason=steps_future,
                             temperature=temperature, top_k=top_k, on_token=on_token)
        out = torch.cat((out, new[:, ctx.shape[1]:]), dim=1)
        remaining -= chunk
    return out


def cmd_generate(args) -> int:
    import torch

    from .training import build_model, check_model_state, load_checkpoint

    device = args.device
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    state = load_checkpoint(args.checkpoint)
    check_model_state(state, args.checkpoint)
    cfg = state["config"]
    # the bytes the shell passed: UTF-8 text as typed, and any byte that is not UTF-8 as it was
    prompt = os.fsencode(args.prompt)
    if not prompt:
        raise UserError("--prompt is empty; give at least one character to continue")
    R = cfg.num_reason_tokens if args.num_reason_tokens is None else args.num_reason_tokens
    if R > cfg.max_reason_seq_len:
        raise UserError(f"--num-reason-tokens {R} is above the checkpoint's max_reason_seq_len "
                        f"{cfg.max_reason_seq_len} (the most reasoning tokens its model holds)")
    if args.max_new_tokens and cfg.model_max_seq_len < 2:
        raise UserError(f"the model's max_seq_len {cfg.model_max_seq_len} leaves no room to generate "
                        "(a context of one byte and the next one need 2)")
    model = build_model(cfg, int(state.get("num_tokens", 256)))
    model.load_state_dict(state["model"])
    model = model.to(device).eval()
    torch.manual_seed(args.seed)
    x = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    # streamed: the prompt, then each byte as it is drawn (a character once its UTF-8 bytes are
    # complete; invalid bytes as U+FFFD), so that the text so far survives an interrupt
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    write(text.decode(prompt))
    sample(model, x, args.max_new_tokens, R, cfg.steps_future, args.temperature,
           args.top_k, on_token=lambda token: write(text.decode(bytes([int(token[0])]))))
    write(text.decode(b"", final=True) + "\n")
    return 0


# ------------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    with _sigterm_as_interrupt():
        return _run(args)


def _run(args) -> int:
    from .data import DataError
    from .training import CheckpointError, ConfigError

    try:
        from . import _ops
        if not _ops.HAS_EXTENSION:  # every command runs the compiled ops; stop before writing anything
            raise UserError(f"the compiled extension self_reasoning_tokens._C is not available "
                            f"({_ops.EXTENSION_ERROR}); build it with `pip install --no-build-isolation .` "
                            "or `python setup.py build_ext --inplace`")
        return args.func(args)
    except (UserError, DataError, ConfigError, CheckpointError) as e:
        if _prints_for_the_job():
            message = " ".join(str(e).split())  # one line
            print(f"srt {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        if _prints_for_the_job():
            how = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
            print(f"srt {args.command}: {how}; {_interrupted_note(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, _Terminated) else 130
    except BrokenPipeError:  # e.g. `srt generate ... | head`: the reader has all it wanted
        try:  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 128 + signal.SIGPIPE


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, torchrun stopping the other ranks), raised where the program is,
    so that it ends as an interrupt does: temporary files removed, what is left said, exit 143."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within it, SIGTERM raises _Terminated. Not under torchrun: a Python handler runs only when
    the interpreter gets control back, and a rank blocked in a collective (as the others are when
    one rank fails and torchrun stops the rest with SIGTERM) would then wait for torchrun's SIGKILL.
    Nor where SIGTERM is ignored (the parent's choice), nor outside the main thread."""
    def raise_terminated(signum, frame):
        raise _Terminated()

    try:
        single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    except ValueError:
        single = False
    previous = None
    if single and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        try:
            previous = signal.signal(signal.SIGTERM, raise_terminated)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        if previous is not None:  # None: none installed, or the previous one was not set from Python
            signal.signal(signal.SIGTERM, previous)


def _prints_for_the_job() -> bool:
    """Under torchrun every rank runs main() with the same arguments and files, so each of them
    would print the same error or interrupt line: only rank 0 prints it (the others still exit
    with the same code, which torchrun reports). A plain run has no RANK and prints."""
    return os.environ.get("RANK", "0") == "0"


def _file_identity(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _interrupted_note(args) -> str:
    """What an interrupted command leaves behind (its files are written atomically)."""
    if args.command == "train":
        out = _train_out(args)
        ckpt = out / "checkpoint.pt"
        if not ckpt.is_file():
            return f"no checkpoint was written to {out} yet"
        earlier = _file_identity(ckpt) == getattr(args, "earlier_checkpoint", None)
        try:  # the step it holds (loaded onto the CPU)
            from .training import load_checkpoint

            step = load_checkpoint(ckpt).get("step")
        except Exception:  # noqa: BLE001 - only for the message
            step = None
        at = f" (step {step})" if isinstance(step, int) else ""
        if earlier:
            return (f"this run saved no checkpoint yet; {ckpt}{at} is still the earlier run's, which "
                    "this run would have replaced at its first save")
        return (f"the last checkpoint, {ckpt}{at}, is intact; `srt train --out {shlex.quote(str(out))} "
                "--resume` continues from it")
    if args.command == "compare":
        overwrite = lambda a: len(a) > 3 and "--overwrite".startswith(a)  # noqa: E731 (argparse takes --ov)
        again = shlex.join(["srt", *(a for a in args.argv if not overwrite(a))]
                           + ([] if args.resume else ["--resume"]))
        return (f"the runs finished so far are in {Path(args.out) / 'results.json'} (if any) with their "
                f"checkpoints, the run in progress in its checkpoint (every --save-every steps); `{again}` "
                "continues")
    return "the text generated so far is above; no file was written"


if __name__ == "__main__":
    sys.exit(main())
