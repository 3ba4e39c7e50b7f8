"""Plots of the benchmarks' JSON, for when a picture says it faster than the table: time and
peak memory against sequence length, one line per contender, on log-log axes (so O(n) and
O(n^2) growth are straight lines of slope 1 and 2).

    python benchmarks/plot_bench.py benchmarks/results/attention_cpu_avx2.json   # writes ..._avx2.png
    python benchmarks/plot_bench.py OUT/bench.json --out OUT/bench.png             # the GPU run

It reads the three kinds of JSON the benchmarks write:
- bench_attention.py (the CPU op): fwd+bwd time and peak memory against n;
- bench_transformer.py (a CPU training step): seconds per step and peak memory against N;
- bench_gpu.py (the GPU op): fwd+bwd TFLOP/s against n, one panel per head dim, then peak memory
  and the longest sequence each contender ran.
A size a contender did not run (skipped, out of memory, failed) is marked with an x on the top
edge of its panel, in the contender's colour, and named in the legend; a measured value a log
axis cannot show (a peak memory of 0 or less: the resident size did not grow by a page, as at
tiny sizes) is marked with a triangle on the bottom edge, its value given in the legend.
bench_attention.py and bench_transformer.py call this after writing their JSON; gpu_check.sh
calls it on bench.json.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys

MIB = 2**20


class Panel:
    """One plot: series[label] = [(x, y)], missing[label] = [(x, why)] (sizes that did not run),
    unshown[label] = [(x, y)] (measured values of 0 or less, which a log axis has no place for)."""

    def __init__(self, title, xlabel, ylabel, xticks=None, yscale="log"):
        self.title, self.xlabel, self.ylabel, self.yscale = title, xlabel, ylabel, yscale
        self.xticks = xticks  # {x: tick label}, or None for plain numbers
        self.series: dict[str, list] = {}
        self.missing: dict[str, list] = {}
        self.unshown: dict[str, list] = {}
        self.bars: dict[str, float] | None = None  # a bar chart instead of lines (label -> value)
        self.bar_notes: dict[str, str] = {}

    def add(self, label, x, y):
        if self.yscale == "log" and not y > 0:
            self.unshown.setdefault(label, []).append((x, y))
        else:
            self.series.setdefault(label, []).append((x, y))

    def tick(self, x):
        """The label of size x on the x axis and in the legend."""
        return self.xticks.get(x, str(x)) if self.xticks else str(x)

    def miss(self, label, x, why):
        self.missing.setdefault(label, []).append((x, why))

    def empty(self):
        return not self.series and not self.missing and not self.unshown and not self.bars


def kind_of(data):
    if data.get("benchmark") == "transformer_train_step_cpu":
        return "transformer"
    rows = data.get("results")
    if ("meta" in data or "benchmark" in data) and rows == []:
        raise ValueError("nothing to plot: this benchmark JSON has no results yet")
    rows = rows or []
    if "meta" in data and rows and "seq" in rows[0]:
        return "gpu"
    if "meta" in data and rows and "n" in rows[0]:
        return "attention"
    raise ValueError("not a benchmark JSON this script knows (bench_attention.py, bench_transformer.py "
                     "or bench_gpu.py)")


def _time_and_memory(rows, point, xlabel, time_title, mem_title):
    """The CPU benchmarks' two panels. point(row) -> (label, x, seconds, peak bytes or None,
    why it did not run or None)."""
    time_p = Panel(time_title, xlabel, "seconds (median)")
    mem_p = Panel(mem_title, xlabel, "MiB")
    for r in rows:
        label, x, seconds, peak, why = point(r)
        if why is not None:
            time_p.miss(label, x, why)
            mem_p.miss(label, x, why)
            continue
        time_p.add(label, x, seconds)
        if peak is not None:
            mem_p.add(label, x, peak / MIB)
    return [time_p, mem_p]


def attention_panels(data):
    m = data["meta"]
    title = (f"Attention fwd+bwd on the CPU: {m.get('processor', '?')}, {m.get('threads', '?')} threads, "
             f"torch {m.get('torch', '?')}; b={m.get('batch')}, h={m.get('heads')}, d={m.get('head_dim')}, "
             f"{m.get('dtype', '')}, causal")

    def point(r):
        return r["contender"], r["n"], r.get("fwd_bwd_s"), r.get("peak_mem_bytes"), r.get("skipped")

    return title, _time_and_memory(data["results"], point, "sequence length n", "fwd+bwd time",
                                   "peak memory of one fwd+bwd")


def transformer_panels(data):
    mod, mach = data["model"], data["machine"]
    title = (f"Transformer training step on the CPU: {mach.get('processor') or mach.get('platform', '?')}, "
             f"{mach.get('threads', '?')} threads, torch {mach.get('torch', '?')}; dim {mod['dim']}, depth "
             f"{mod['depth']}, heads {mod['heads']}, R={mod['num_reason_tokens']}, "
             f"W={mod['num_steps_future_can_use_reason']}")

    def point(r):
        status = r.get("status", "failed")
        why = None if status == "ok" else status + (f": {r['error']}" if r.get("error") else "")
        return r["impl"], r["n_positions"], r.get("time_s"), r.get("peak_bytes"), why

    return title, _time_and_memory(data["results"], point, "positions N (tokens and reasoning steps)",
                                   "seconds per training step", "peak memory of the step")


def gpu_panels(data):
    m = data["meta"]
    title = (f"Attention fwd+bwd on {m.get('device', '?')}: torch {m.get('torch', '?')}, CUDA {m.get('cuda')}, "
             f"{m.get('dtype', '')}, causal, hidden {m.get('hidden')} (heads = hidden / d)")
    rows = data["results"]
    ticks = {r["seq"]: f"{r['batch']}x{r['seq']}" for r in rows if "batch" in r}
    panels = []
    for d in sorted({r["head_dim"] for r in rows}):
        p = Panel(f"fwd+bwd TFLOP/s, head dim {d}", "batch x sequence length", "TFLOP/s (FlashAttention count)",
                  xticks=ticks, yscale="linear")
        for r in rows:
            if r["head_dim"] != d:
                continue
            label = f"({r.get('letter', '?')}) {r['contender']}"
            if r.get("fwd_bwd_tflops"):
                p.add(label, r["seq"], r["fwd_bwd_tflops"])
            else:
                why = r.get("skipped") or r.get("error") or ("no fwd+bwd: forward only" if r.get("note_forward_only")
                                                            else "not measured")
                p.miss(label, r["seq"], why)
        panels.append(p)
    mem_rows = [r for r in rows if r.get("peak_mem_bytes")]
    if mem_rows:
        d = max(r["head_dim"] for r in mem_rows)
        p = Panel(f"peak memory of one fwd+bwd, head dim {d}", "batch x sequence length", "MiB", xticks=ticks)
        for r in mem_rows:
            if r["head_dim"] == d:
                p.add(f"({r.get('letter', '?')}) {r['contender']}", r["seq"], r["peak_mem_bytes"] / MIB)
        panels.append(p)
    longest = {k: v for k, v in (data.get("longest_seq") or {}).items() if v.get("longest")}
    if longest:
        a = m.get("args", {})
        p = Panel(f"longest sequence that ran (b=1, h={a.get('longest_heads', '?')}, "
                  f"d={a.get('longest_head_dim', '?')})", "", "n")
        by_letter = sorted(longest.items(), key=lambda kv: kv[1].get("letter", "?"))
        p.bars = {f"({v.get('letter', '?')}) {k}": v["longest"] for k, v in by_letter}
        p.bar_notes = {f"({v.get('letter', '?')}) {k}": ("at least" if v.get("lower_bound") else "")
                       for k, v in by_letter}
        panels.append(p)
    return title, panels


PANELS = {"attention": attention_panels, "transformer": transformer_panels, "gpu": gpu_panels}


def panels_of(data):
    """(title, [Panel]) for a benchmark's JSON (as loaded)."""
    return PANELS[kind_of(data)](data)


def _missing_label(lab, pts, p):
    """'ref: did not run at 8192 (OOM); 16384, 32768 (skipped)': sizes grouped by reason."""
    by_why = {}
    for x, why in sorted(pts):
        by_why.setdefault(why.split(":")[0], []).append(p.tick(x))
    return f"{lab}: did not run at " + "; ".join(f"{', '.join(xs)} ({why})" for why, xs in by_why.items())


def _plain(y, _pos=None):
    """A tick label: 0.05, 20, 1e-05 (Python's shortest form)."""
    return f"{y:g}"


def _unshown_label(lab, pts, p):
    """'ours: 0 MiB at 32, -0.1 MiB at 64 (not shown: a log axis has no place for 0 or less)'."""
    at = ", ".join(f"{y:g} {p.ylabel} at {p.tick(x)}" for x, y in pts)
    return f"{lab}: {at} (not shown: a log axis has no place for 0 or less)"


def _guides(ax, p):
    """Faint lines growing as n and as n^2 from the panel's lowest first point, so that a reader
    can tell linear from quadratic growth on log-log axes."""
    firsts = [min(pts) for pts in p.series.values() if len(pts) > 1]
    xs = sorted({x for pts in p.series.values() for x, _ in pts})
    if not firsts or len(xs) < 2:
        return
    x0, y0 = min(firsts, key=lambda xy: xy[1])
    x1 = xs[-1]
    for power, text in ((1, "\u221d n"), (2, "\u221d n\u00b2")):
        ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** power], linestyle=":", color="0.55", linewidth=1, zorder=0)
        ax.annotate(text, (x1, y0 * (x1 / x0) ** power), fontsize=8, color="0.4", ha="left", va="center",
                    xytext=(3, 0), textcoords="offset points", annotation_clip=True)


def figure(title, panels):
    """A matplotlib Figure with the panels side by side (three per row at most)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    panels = [p for p in panels if not p.empty()]
    if not any(p.series or p.bars for p in panels):
        raise ValueError("nothing to plot: no size in this JSON was measured")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), constrained_layout=True, squeeze=False)
    labels = sorted({lab for p in panels for lab in [*p.series, *p.missing, *p.unshown, *(p.bars or {})]})
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for ax, p in zip(axes.flat, panels):
        ax.set_title(p.title, fontsize=10)
        ax.set_ylabel(p.ylabel)
        if p.bars is not None:
            names = list(p.bars)
            ax.bar(range(len(names)), [p.bars[k] for k in names], color=[colors[k] for k in names])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_yscale("log", base=2)
            for i, k in enumerate(names):
                ax.annotate(f"{p.bar_notes.get(k, '')} {p.bars[k]}".strip(), (i, p.bars[k]), ha="center",
                            va="bottom", fontsize=8)
            continue
        ax.set_xlabel(p.xlabel)
        ax.set_xscale("log", base=2)
        ax.set_yscale(p.yscale)
        for lab, pts in sorted(p.series.items()):
            pts = sorted(pts)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=4, linewidth=1.6,
                    color=colors[lab], label=lab)
        if p.yscale == "log":
            limits = ax.get_ylim()  # the data's; the guides are clipped to them
            _guides(ax, p)
            ax.set_ylim(*limits)
            # plain numbers (0.05, 20, not 5x10^-2); a panel spanning under a decade has at most
            # one power of ten on it, so its minor ticks (2x, 3x, ...) are labelled and gridded too
            ax.yaxis.set_major_formatter(FuncFormatter(_plain))
            narrow = limits[1] < 10 * limits[0]
            ax.yaxis.set_minor_formatter(FuncFormatter(_plain) if narrow else NullFormatter())
            if narrow:
                ax.grid(True, which="minor", axis="y", alpha=0.3)
        else:
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1])  # from 0 to the autoscaled top (the data are in)
        # sizes that did not run: crosses on the panel's top edge (axes coordinates, so they
        # cannot be read as values), with their reasons in the legend
        top_edge = ax.get_xaxis_transform()
        for lab, pts in sorted(p.missing.items()):
            ax.scatter([x for x, _ in pts], [1.0] * len(pts), marker="x", s=50, color=colors[lab],
                       transform=top_edge, clip_on=False, zorder=3, label=_missing_label(lab, pts, p))
        # measured values a log axis cannot show: triangles on the bottom edge, values in the legend
        for lab, pts in sorted(p.unshown.items()):
            pts = sorted(pts)
            ax.scatter([x for x, _ in pts], [0.0] * len(pts), marker="v", s=40, color=colors[lab],
                       transform=top_edge, clip_on=False, zorder=3, label=_unshown_label(lab, pts, p))
        xs = sorted({x for pts in [*p.series.values(), *p.missing.values(), *p.unshown.values()] for x, *_ in pts})
        if xs:
            ax.set_xticks(xs, [p.tick(x) for x in xs], fontsize=8)
            # x: the sizes only (y keeps its minor ticks: labelled above where a log panel spans
            # under a decade)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return fig


def render(title, panels):
    """PNG bytes of figure(title, panels)."""
    import matplotlib.pyplot as plt

    fig = figure(title, panels)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def default_png(json_path):
    root, ext = os.path.splitext(json_path)
    return (root if ext == ".json" else json_path) + ".png"


def plot_file(json_path, out=None):
    """Reads a benchmark JSON and writes its plot (default: the same path with .png); returns
    the PNG's path."""
    with open(json_path) as f:
        data = json.load(f)
    png = render(*panels_of(data))
    out = out or default_png(json_path)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        f.write(png)
    return out


def plot_after_benchmark(json_path):
    """For the benchmark scripts: plot what they just wrote; a plot that fails (no matplotlib,
    nothing measured) is reported and costs nothing else: the JSON and the table stand."""
    try:
        print(f"wrote {plot_file(json_path)}")
    except Exception as e:  # noqa: BLE001 - the plot is an extra; the results are already saved
        print(f"no plot: {type(e).__name__}: {e}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="benchmark JSON files")
    ap.add_argument("--out", help="PNG to write (one JSON only; default: the JSON's path with .png)")
    args = ap.parse_args(argv)
    if args.out and len(args.json) > 1:
        ap.error("--out names one PNG: give one JSON with it")
    for path in args.json:
        try:
            print(f"wrote {plot_file(path, args.out)}")
        except (OSError, ValueError, KeyError) as e:
            print(f"plot_bench.py: {path}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
