"""Loss-curve plots for `train` and `compare` (matplotlib, no display needed)."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

__all__ = ["plot_runs"]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if len(values) == 0 or window <= 1:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_runs(runs: Sequence[dict], title: str = "") -> bytes:
    """PNG bytes: train (smoothed) and validation bits per byte of each run, against step (left)
    and against training time (right). ``runs``: dicts with name, history, evals (as in
    results.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ymax = 0.0
    ymin = float("inf")
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        hist, evals = run.get("history", []), run.get("evals", [])
        steps = np.array([h["step"] for h in hist], dtype=float)
        times = np.array([h["time"] for h in hist], dtype=float)
        bpb = np.array([h["bpb"] for h in hist], dtype=float)
        smooth = _smooth(bpb, max(1, len(bpb) // 40))
        esteps = np.array([e["step"] for e in evals], dtype=float)
        etimes = np.array([e.get("time", 0.0) for e in evals], dtype=float)
        ebpb = np.array([e["val_bpb"] for e in evals], dtype=float)
        for ax, x_train, x_eval in ((axes[0], steps, esteps), (axes[1], times, etimes)):
            ax.plot(x_train, smooth, color=color, alpha=0.45, linewidth=1.2, label=f"{run['name']} train")
            ax.plot(x_eval, ebpb, color=color, marker="o", markersize=3.5, linewidth=1.8,
                    label=f"{run['name']} validation")
        tail = np.concatenate([smooth[len(smooth) // 10:], ebpb[1:]]) if len(ebpb) else smooth
        if len(tail):
            ymax = max(ymax, float(np.max(tail)))
            ymin = min(ymin, float(np.min(tail)))
    for ax, xlabel in ((axes[0], "step"), (axes[1], "training time (s, evaluation excluded)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per byte")
        ax.grid(True, alpha=0.3)
        if ymax > 0 and np.isfinite(ymin):  # the first steps (~8 bpb) would flatten the rest
            pad = 0.05 * (ymax - ymin + 1e-9)
            ax.set_ylim(ymin - pad, ymax + pad)
    axes[0].legend(fontsize=8)
    axes[0].set_title("bits per byte vs step")
    axes[1].set_title("bits per byte vs training time")
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
