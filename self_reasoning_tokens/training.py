"""Training loop, evaluation in bits per byte, atomic checkpoints and data-parallel training.

One :class:`Trainer` trains one model from a :class:`RunConfig` on a :class:`~.data.Corpus`.

- Objective: the model's own loss (``model(x, ..., return_loss=True)``: mean cross entropy over
  every position, each step's label repeated over its reasoning positions), or with
  ``objective="last"`` only the last position of each step.
- Metric: *bits per byte* at the last position of each step, the position ``generate`` samples
  from (for R = 0 it is the only position). The real-token position's figure
  (``remove_reason_tokens_at_end=True``, the prediction made before the step's reasoning tokens)
  is recorded beside it.
- Reproducibility: the batches of step s depend only on (seed, s) (see data.py), and a
  checkpoint holds model, optimizer, grad scaler, step, RNG states, config and the logged curves,
  so a resumed run continues exactly where an uninterrupted one would be.
- Data parallel (torchrun): every rank draws the same global batch and trains on its slice;
  gradients are averaged with one all-reduce per step (gloo on CPU, nccl on CUDA); only rank 0
  writes files and shows progress.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import Corpus, shard, train_batch, val_windows
from .transformer import Transformer

__all__ = [
    "RunConfig",
    "ConfigError",
    "CheckpointError",
    "DistInfo",
    "Trainer",
    "validate_config",
    "lr_at",
    "schedule_notes",
    "check_model_state",
    "position_losses",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
]

CHECKPOINT_FORMAT = "self_reasoning_tokens.checkpoint"
CHECKPOINT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OBJECTIVES = ("all", "last")
LN2 = math.log(2.0)


class ConfigError(ValueError):
    """A user-facing problem with the options."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or not ours."""


@dataclass
class RunConfig:
    """Everything that determines a run (what a checkpoint stores and results.json reports)."""

    # data
    data: str = "stdlib"
    max_data_bytes: Optional[int] = None
    arith_digits: int = 4
    # model
    dim: int = 128
    depth: int = 3
    heads: int = 4
    dim_head: int = 32
    max_seq_len: Optional[int] = None  # real tokens; None = seq_len
    max_reason_seq_len: int = 4
    # reasoning tokens
    num_reason_tokens: int = 0
    steps_future: int = 2
    hard_mode: bool = False
    objective: str = "all"
    # optimisation
    seq_len: int = 128
    batch_size: int = 16  # global: split over data-parallel ranks
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation
    eval_every: int = 50
    eval_windows: int = 64
    # hardware
    device: str = "cpu"
    dtype: str = "float32"
    activation_checkpointing: bool = False  # memory and time only: the same results

    @property
    def model_max_seq_len(self) -> int:
        return self.max_seq_len if self.max_seq_len is not None else self.seq_len

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CheckpointError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


def validate_config(cfg: RunConfig, world_size: int = 1) -> None:
    """Raise ConfigError naming the option for anything that would fail later."""
    def positive(name, value, flag):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")

    for name, flag in (("dim", "--dim"), ("depth", "--depth"), ("heads", "--heads"),
                       ("dim_head", "--dim-head"), ("seq_len", "--seq-len"),
                       ("batch_size", "--batch-size"), ("steps", "--steps"),
                       ("eval_every", "--eval-every"), ("eval_windows", "--eval-windows"),
                       ("arith_digits", "--arith-digits")):
        positive(name, getattr(cfg, name), flag)
    from .data import MAX_ARITH_DIGITS
    if cfg.arith_digits > MAX_ARITH_DIGITS:
        raise ConfigError(f"--arith-digits must be at most {MAX_ARITH_DIGITS} (operands are drawn "
                          f"uniformly from float64 draws), got {cfg.arith_digits}")
    if cfg.max_seq_len is not None:
        positive("max_seq_len", cfg.max_seq_len, "--max-seq-len")
        if cfg.seq_len > cfg.max_seq_len:
            raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the model's --max-seq-len "
                              f"{cfg.max_seq_len}")
    if cfg.max_data_bytes is not None:
        positive("max_data_bytes", cfg.max_data_bytes, "--max-data-bytes")
    if cfg.max_reason_seq_len < 0:
        raise ConfigError(f"--max-reason-seq-len must be >= 0, got {cfg.max_reason_seq_len}")
    if cfg.num_reason_tokens < 0:
        raise ConfigError(f"--num-reason-tokens must be >= 0, got {cfg.num_reason_tokens}")
    if cfg.num_reason_tokens > cfg.max_reason_seq_len:
        raise ConfigError(f"--num-reason-tokens {cfg.num_reason_tokens} is above --max-reason-seq-len "
                          f"{cfg.max_reason_seq_len} (the most reasoning tokens the model holds)")
    if cfg.steps_future < 0:
        raise ConfigError(f"--steps-future must be >= 0, got {cfg.steps_future}")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {cfg.warmup}")
    for name, flag in (("lr", "--lr"), ("weight_decay", "--weight-decay"), ("grad_clip", "--grad-clip"),
                       ("min_lr_ratio", "--min-lr-ratio")):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
            raise ConfigError(f"{flag} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value}")
    if cfg.batch_size % world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
                          f"({world_size}): each rank trains on an equal slice of the global batch")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    dev = cfg.device
    if dev != "cpu" and not (dev == "cuda" or dev.startswith("cuda:")):
        raise ConfigError(f"--device must be cpu or cuda, got {dev!r}")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {dev}: CUDA is not available here (torch {torch.__version__})")
        from . import _ops
        if not _ops.cuda_kernels_available():
            raise ConfigError(f"--device {dev}: self_reasoning_tokens was built without its CUDA kernels; "
                              "rebuild it with nvcc available")
    elif cfg.dtype == "float16":
        raise ConfigError("--dtype float16 needs --device cuda; use --dtype bfloat16 on CPU")


def lr_at(cfg: RunConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warmup over cfg.warmup steps, then
    cosine decay to min_lr_ratio * lr at the last step, cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def schedule_notes(cfg: RunConfig, resumed_from: Optional[RunConfig] = None, step: int = 0) -> list:
    """What a user may not expect of the learning-rate schedule: a warmup as long as the run
    (the rate never reaches --lr, nor decays), or, on resuming with another --steps, the cosine
    decay recomputed for the new length (so the rate jumps)."""
    notes = []
    if cfg.warmup >= cfg.steps:
        notes.append(f"--warmup {cfg.warmup} >= --steps {cfg.steps}: the learning rate only warms up, "
                     f"to {lr_at(cfg, cfg.steps - 1):.3g} at the last step (--lr {cfg.lr:g}), and never "
                     "decays; a shorter --warmup gives the run its full schedule")
    if resumed_from is not None and resumed_from.steps != cfg.steps and step < cfg.steps:
        notes.append(f"--steps {resumed_from.steps} -> {cfg.steps}: the cosine learning-rate schedule is "
                     f"recomputed for {cfg.steps} steps, so the rate at step {step} is "
                     f"{lr_at(cfg, step):.3g} (it was {lr_at(resumed_from, step):.3g})")
    return notes


# ------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: str) -> None:
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(cfg: RunConfig, info: DistInfo) -> torch.device:
    if cfg.device.startswith("cuda"):
        index = info.local_rank if info.enabled else (torch.device(cfg.device).index or 0)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------
# losses


def position_losses(logits: torch.Tensor, targets: torch.Tensor, num_reason_tokens: int) -> torch.Tensor:
    """Cross entropy (nats) of every position: logits (b, L*(R+1), c), targets (b, L) next bytes
    -> (b, L, R+1); entry [.., t, r] is position r of step t predicting targets[:, t]."""
    period = num_reason_tokens + 1
    b, L = targets.shape
    labels = targets.repeat_interleave(period, dim=1)                     # (b, L*(R+1))
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return ce.view(b, L, period)


# ------------------------------------------------------------------------------------------
# checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file beside ``path``, fsync it, then os.replace: a reader (or a
    killed run) sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    _atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path, state: dict) -> None:
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and check a checkpoint; any problem raises CheckpointError with one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, garbage, not a torch file, ...
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a checkpoint file "
                              f"(torch.load failed with {type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a self_reasoning_tokens checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {state.get('version')!r}; "
                              f"this code reads version {CHECKPOINT_VERSION}")
    for key in ("config", "model", "optimizer", "step", "rng", "history", "evals", "data_fingerprint"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no {key!r})")
    try:
        state["config"] = RunConfig.from_dict(state["config"])
    except (TypeError, CheckpointError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable config ({e})") from None
    return state


def build_model(cfg: RunConfig, num_tokens: int) -> Transformer:
    return Transformer(dim=cfg.dim, num_tokens=num_tokens, depth=cfg.depth,
                       max_seq_len=cfg.model_max_seq_len, max_reason_seq_len=cfg.max_reason_seq_len,
                       dim_head=cfg.dim_head, heads=cfg.heads,
                       stop_grad_next_tokens_to_reason=not cfg.hard_mode,
                       activation_checkpointing=cfg.activation_checkpointing)


def check_model_state(state: dict, path) -> None:
    """CheckpointError, naming the first differences, unless the checkpoint's weights are those of
    the model its own config describes (same names and shapes). The model is built on the meta
    device: nothing is allocated, so this can run before anything is written."""
    with torch.device("meta"):
        model = build_model(state["config"], int(state.get("num_tokens", 256)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = state["model"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no model weights")
    found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in weights.items()}
    problems = [f"{k} has shape {list(found[k]) if found[k] is not None else 'none (not a tensor)'}, "
                f"its config's model {list(expected[k])}"
                for k in expected if k in found and found[k] != expected[k]]
    problems += [f"no {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own config: "
                              f"{'; '.join(problems[:3])}{more}")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------
# the trainer


@dataclass
class RunResult:
    name: str
    config: RunConfig
    step: int
    params: int
    history: list = field(default_factory=list)  # per step: step, loss, bpb, lr, time
    evals: list = field(default_factory=list)    # per eval: step, val_bpb, val_bpb_real_token, time
    train_time_s: float = 0.0
    wall_time_s: float = 0.0

    def to_json(self) -> dict:
        last = self.evals[-1] if self.evals else {}
        tail = [h["bpb"] for h in self.history[-self.config.eval_every:]]
        R = self.config.num_reason_tokens
        return {
            "name": self.name,
            "config": asdict(self.config),
            "params": self.params,
            "steps": self.step,
            "positions_per_sequence": self.config.seq_len * (R + 1),
            "val_bpb": last.get("val_bpb"),
            "val_bpb_real_token_position": last.get("val_bpb_real_token"),
            "best_val_bpb": min((e["val_bpb"] for e in self.evals), default=None),
            "train_bpb_recent": float(np.mean(tail)) if tail else None,
            "train_time_s": self.train_time_s,
            "wall_time_s": self.wall_time_s,
            "s_per_step": self.train_time_s / max(1, len(self.history)),
            "history": self.history,
            "evals": self.evals,
        }


class Trainer:
    """Trains one model. ``state`` (from :func:`load_checkpoint`) resumes a run."""

    def __init__(self, cfg: RunConfig, corpus: Corpus, info: Optional[DistInfo] = None,
                 state: Optional[dict] = None, name: str = "run"):
        self.cfg, self.corpus, self.name = cfg, corpus, name
        self.info = info or DistInfo()
        self.device = resolve_device(cfg, self.info)
        self.autocast_dtype = None if cfg.dtype == "float32" else DTYPES[cfg.dtype]

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.model = build_model(cfg, corpus.num_tokens).to(self.device)
        self.params = [p for p in self.model.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "float16")
        self.step = 0
        self.history: list = []
        self.evals: list = []
        self.train_time = 0.0

        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.history = list(state["history"])
            self.evals = list(state["evals"])
            self.train_time = float(state.get("train_time", 0.0))
            _set_rng_state(state["rng"])
        elif self.info.enabled:  # same seed gives the same weights, but make sure of it
            for p in self.model.state_dict().values():
                dist.broadcast(p, src=0)

        windows = val_windows(corpus.val, cfg.seq_len, cfg.eval_windows)
        self.val = torch.from_numpy(windows[self.info.rank::self.info.world_size].astype(np.int64))

    # -- pieces of a step

    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg, step)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _losses(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.model(rows[:, :-1], num_reason_tokens=self.cfg.num_reason_tokens,
                                num_steps_future_can_use_reason=self.cfg.steps_future)
        return position_losses(logits, rows[:, 1:], self.cfg.num_reason_tokens)

    def _all_reduce_mean_(self, tensors) -> None:
        if not self.info.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat.div_(self.info.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        batch = train_batch(self.corpus.train, step, cfg.seed, cfg.batch_size, cfg.seq_len)
        rows = torch.from_numpy(shard(batch, self.info.rank, self.info.world_size).astype(np.int64))
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr

        self.model.train()
        ce = self._losses(rows)                                            # (b, L, R+1)
        loss = ce.mean() if cfg.objective == "all" else ce[..., -1].mean()
        self.scaler.scale(loss).backward()

        # Average gradients over ranks (grads are None on the same parameters on every rank,
        # e.g. reason_tokens when R = 0, so AdamW skips the same ones as a single process).
        self._all_reduce_mean_([p.grad for p in self.params if p.grad is not None])
        self.scaler.unscale_(self.opt)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

        logged = torch.stack([loss.detach().float(), ce[..., -1].detach().mean()])
        self._all_reduce_mean_([logged])
        self.step += 1
        return {"step": self.step, "loss": logged[0].item(), "bpb": logged[1].item() / LN2, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation bits per byte over the fixed windows (sharded over ranks)."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # last-position CE, real-token CE, count
        chunk = max(1, self.cfg.batch_size)
        for i in range(0, len(self.val), chunk):
            ce = self._losses(self.val[i:i + chunk]).double().cpu()
            sums += torch.stack([ce[..., -1].sum(), ce[..., 0].sum(), torch.tensor(float(ce[..., 0].numel()))])
        if self.info.enabled:
            sums = sums.to(self.device) if self.device.type == "cuda" else sums
            dist.all_reduce(sums)
            sums = sums.cpu()
        count = max(sums[2].item(), 1.0)
        return {"step": self.step, "val_bpb": sums[0].item() / count / LN2,
                "val_bpb_real_token": sums[1].item() / count / LN2}

    # -- checkpoint

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "name": self.name,
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "rng": _rng_state(),
            "data_sampler": {"kind": "per-step generator seeded with (seed, step)", "seed": self.cfg.seed,
                             "next_step": self.step},
            "history": self.history,
            "evals": self.evals,
            "train_time": self.train_time,
            "data_fingerprint": self.corpus.fingerprint(),
            "data_description": self.corpus.description,
            "num_tokens": self.corpus.num_tokens,
        }

    def save(self, path) -> None:
        if self.info.is_main:
            save_checkpoint(path, self.state_dict())

    # -- the loop

    def run(self, progress: bool = True, save_every: Optional[int] = None,
            checkpoint: Optional[Path] = None, on_save: Optional[Callable[["Trainer"], None]] = None,
            on_eval: Optional[Callable[[dict], None]] = None) -> RunResult:
        from tqdm import tqdm

        cfg = self.cfg
        start_wall = time.perf_counter()
        show = progress and self.info.is_main
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, unit="step", disable=not show,
                   dynamic_ncols=True, leave=True)
        postfix = {"train": "-"}  # bits per byte of the step's batch, as the table's "train bpb" averages

        def save():
            if checkpoint is not None:
                self.save(checkpoint)
            if on_save is not None and self.info.is_main:
                on_save(self)

        try:
            if self.step == 0 and not self.evals:
                self._record_eval(on_eval, postfix)
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.train_time += time.perf_counter() - t0
                rec["time"] = self.train_time
                self.history.append(rec)
                postfix["train"] = f"{rec['bpb']:.3f}bpb"
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    self._record_eval(on_eval, postfix)
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if save_every and self.step % save_every == 0 and self.step < cfg.steps:
                    save()
            save()
        finally:
            bar.close()
        return RunResult(self.name, cfg, self.step, sum(p.numel() for p in self.params),
                         list(self.history), list(self.evals), self.train_time,
                         time.perf_counter() - start_wall)

    def _record_eval(self, on_eval, postfix) -> None:
        if self.evals and self.evals[-1]["step"] == self.step:
            return
        ev = self.evaluate()
        ev["time"] = self.train_time
        self.evals.append(ev)
        postfix["val"] = f"{ev['val_bpb']:.3f}bpb"
        if on_eval is not None and self.info.is_main:
            on_eval(ev)
