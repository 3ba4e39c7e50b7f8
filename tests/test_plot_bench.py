"""benchmarks/plot_bench.py: what it plots is what the benchmark JSON says (every measured point,
in its panel, and every size that did not run, marked as such), for the committed CPU results;
the GPU benchmark's JSON is covered in tests/test_bench_gpu.py (its dry run)."""
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))
import plot_bench  # noqa: E402

MIB = 2**20
PNG = b"\x89PNG\r\n\x1a\n"


def load(name):
    return json.loads((RESULTS / name).read_text())


def as_dict(panel):
    return {lab: sorted(pts) for lab, pts in panel.series.items()}


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("attention_cpu*.json")))
def test_attention_results_are_plotted_point_for_point(name):
    data = load(name)
    title, (time_p, mem_p) = plot_bench.panels_of(data)
    assert data["meta"]["processor"] in title
    want_t, want_m, want_missing = {}, {}, {}
    for r in data["results"]:
        if "skipped" in r:
            want_missing.setdefault(r["contender"], []).append((r["n"], r["skipped"]))
        else:
            want_t.setdefault(r["contender"], []).append((r["n"], r["fwd_bwd_s"]))
            want_m.setdefault(r["contender"], []).append((r["n"], r["peak_mem_bytes"] / MIB))
    assert as_dict(time_p) == {k: sorted(v) for k, v in want_t.items()}
    assert as_dict(mem_p) == {k: sorted(v) for k, v in want_m.items()}
    assert time_p.missing == mem_p.missing == want_missing
    assert plot_bench.render(title, [time_p, mem_p]).startswith(PNG)


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("transformer_cpu*.json")))
def test_transformer_results_are_plotted_point_for_point(name):
    data = load(name)
    title, (time_p, mem_p) = plot_bench.panels_of(data)
    ok = [r for r in data["results"] if r["status"] == "ok"]
    for r in ok:
        assert (r["n_positions"], r["time_s"]) in time_p.series[r["impl"]]
        assert (r["n_positions"], r["peak_bytes"] / MIB) in mem_p.series[r["impl"]]
    assert sum(map(len, time_p.series.values())) == len(ok)
    # the reference's out-of-memory and skipped sizes are marked, with the reason, in both panels
    not_ok = [r for r in data["results"] if r["status"] != "ok"]
    assert not_ok, "the committed results have sizes the reference could not run"
    for r in not_ok:
        assert any(x == r["n_positions"] and why.startswith(r["status"]) for x, why in time_p.missing[r["impl"]])
    assert time_p.missing == mem_p.missing
    assert plot_bench.render(title, [time_p, mem_p]).startswith(PNG)


def test_the_command_line_writes_a_png_beside_the_json(tmp_path):
    src = tmp_path / "a.json"
    src.write_text((RESULTS / "attention_cpu.json").read_text())
    assert plot_bench.main([str(src)]) == 0
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)
    assert plot_bench.main([str(src), "--out", str(tmp_path / "sub" / "b.png")]) == 0
    assert (tmp_path / "sub" / "b.png").read_bytes().startswith(PNG)


def test_the_command_line_refuses_what_it_cannot_plot(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [{"x": 1}]}))
    assert plot_bench.main([str(bad)]) == 1
    assert "not a benchmark JSON" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()
    assert plot_bench.main([str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        plot_bench.main([str(bad), str(bad), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2


def test_a_json_with_nothing_measured_gives_no_plot_but_a_reason(tmp_path, capsys):
    data = {"meta": {}, "results": [{"n": 64, "contender": "reference", "skipped": "estimated 20 GB"}]}
    src = tmp_path / "nothing.json"
    src.write_text(json.dumps(data))
    # the benchmarks' own call: a plot that cannot be made is reported, never raised
    plot_bench.plot_after_benchmark(str(src))
    assert "no plot" in capsys.readouterr().err and not os.path.exists(tmp_path / "nothing.png")


def test_the_axes_hold_every_point_and_the_crosses_sit_on_the_top_edge():
    # a linear TFLOP/s panel (the GPU run's: hundreds of TFLOP/s) starts at 0 and still reaches
    # its largest value; a log panel's missing sizes are drawn in axes coordinates (y = 1, the
    # top edge), so they neither stretch the axis nor read as values
    lin = plot_bench.Panel("tflops", "n", "TFLOP/s", yscale="linear")
    for x, y in ((1024, 310.0), (2048, 455.0), (4096, 470.0)):
        lin.add("(a) ours", x, y)
    lin.miss("(e) flex", 4096, "out of memory")
    log = plot_bench.Panel("time", "n", "s")
    for x, y in ((1024, 0.01), (2048, 0.04)):
        log.add("ours", x, y)
    log.miss("reference", 4096, "OOM: cap")
    fig = plot_bench.figure("t", [lin, log])
    try:
        ax_lin, ax_log = fig.axes[:2]
        lo, hi = ax_lin.get_ylim()
        assert lo == 0 and hi >= 470.0
        lo, hi = ax_log.get_ylim()
        assert lo <= 0.01 and 0.04 <= hi < 1.0  # the cross did not push the axis up
        for ax in (ax_lin, ax_log):
            crosses = [c for c in ax.collections if "did not run" in c.get_label()]
            assert len(crosses) == 1 and crosses[0].get_offsets()[0][1] == 1.0
        assert "did not run at 4096 (OOM)" in crosses[0].get_label()
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_a_json_with_no_results_says_so(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"meta": {"device": "cuda"}, "results": []}))
    assert plot_bench.main([str(src)]) == 1
    assert "no results yet" in capsys.readouterr().err


def test_a_peak_memory_of_zero_is_marked_on_the_bottom_edge_with_its_value(tmp_path):
    # at tiny sizes the resident size may not grow by a page: a peak of 0 (or less) is a
    # measurement, which a log axis has no place for; it is marked on the bottom edge, its value
    # in the legend, and matplotlib is not left to drop it with a warning
    import warnings

    rows = [{"n": n, "contender": c, "fwd_bwd_s": 0.001 * n, "peak_mem_bytes": peak}
            for n, c, peak in ((32, "ours", 0), (64, "ours", 2 * MIB), (32, "sdpa", -4096), (64, "sdpa", 0))]
    src = tmp_path / "tiny.json"
    src.write_text(json.dumps({"meta": {"processor": "cpu"}, "results": rows}))
    _, (time_p, mem_p) = plot_bench.panels_of(json.loads(src.read_text()))
    assert as_dict(mem_p) == {"ours": [(64, 2.0)]}
    assert mem_p.unshown == {"ours": [(32, 0.0)], "sdpa": [(32, -4096 / MIB), (64, 0.0)]}
    assert as_dict(time_p) == {"ours": [(32, 0.032), (64, 0.064)], "sdpa": [(32, 0.032), (64, 0.064)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_bench.figure("t", [time_p, mem_p])
    try:
        marks = [c for c in fig.axes[1].collections if "not shown" in c.get_label()]
        assert sorted(c.get_label() for c in marks) == [
            "ours: 0 MiB at 32 (not shown: a log axis has no place for 0 or less)",
            "sdpa: -0.00390625 MiB at 32, 0 MiB at 64 (not shown: a log axis has no place for 0 or less)"]
        assert all(y == 0.0 for c in marks for _, y in c.get_offsets())  # the bottom edge
        assert not [c for c in fig.axes[0].collections if "not shown" in c.get_label()]
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    # every value 0, from a contender no other panel has: the panel still draws, with nothing but
    # its marks, in a colour of its own
    zero = plot_bench.Panel("mem", "n", "MiB")
    zero.add("only-here", 32, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_bench.render("t", [time_p, zero]).startswith(PNG)
    assert plot_bench.main([str(src)]) == 0 and (tmp_path / "tiny.png").read_bytes().startswith(PNG)


def test_a_log_panel_within_one_decade_still_labels_its_y_axis():
    # the GPU run's peak memory at a constant token count (batch x seq) changes little: a log
    # panel from 300 to 600 MiB has no power of ten on it, so its 2x..9x ticks carry the labels,
    # as plain numbers; a panel over decades labels only the powers of ten
    narrow = plot_bench.Panel("mem", "n", "MiB")
    for x, y in ((1024, 300.0), (2048, 450.0), (4096, 600.0)):
        narrow.add("ours", x, y)
    wide = plot_bench.Panel("time", "n", "s")
    for x, y in ((1024, 0.01), (2048, 0.3), (4096, 20.0)):
        wide.add("ours", x, y)
    fig = plot_bench.figure("t", [narrow, wide])
    try:
        fig.canvas.draw()
        ax_narrow, ax_wide = fig.axes[:2]

        def shown(ax, minor):
            lo, hi = ax.get_ylim()
            return {t.get_text() for t in ax.get_yticklabels(minor=minor)
                    if t.get_text() and lo <= t.get_position()[1] <= hi}

        assert {"300", "400", "500", "600"} <= shown(ax_narrow, minor=True), shown(ax_narrow, True)
        assert shown(ax_wide, minor=False) >= {"0.01", "0.1", "1", "10"} and not shown(ax_wide, minor=True)
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
