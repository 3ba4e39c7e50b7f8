"""benchmarks/profile_gpu.py: the workload runs (on the CPU: same code paths, nothing profiled), and
the summary reads both of ncu's CSV layouts. The CSV here is synthetic, in the layout ncu writes
(header, optional units row, quoted values with thousands separators, ==PROF== lines mixed in);
the numbers are made up, the test checks the parsing and the per-contender attribution."""
import csv
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import profile_gpu  # noqa: E402

FIXED = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
         "Block Size", "Grid Size", "Device", "CC"]
KERNELS = [  # (name, duration ns, tensor %, stalls {reason: ratio})
    ("void srt::cuda::attn_fwd_tc_kernel<__nv_bfloat16, 128>(srt::cuda::KernelParams)", 1000, 40.0,
     {"barrier": 1.0, "long_scoreboard": 3.0, "selected": 5.0, "not_selected": 2.0}),  # the last two: not stalls
    ("void srt::cuda::attn_bwd_dsum_kernel<__nv_bfloat16>(srt::cuda::KernelParams)", 100, 0.0, {}),
    ("void srt::cuda::attn_bwd_tc_kernel<__nv_bfloat16, 128>(srt::cuda::KernelParams)", 3000, 30.0,
     {"mio_throttle": 2.0}),
    ("void srt::cuda::attn_fwd_tc_kernel<__nv_bfloat16, 128>(srt::cuda::KernelParams)", 900, 41.0, {}),
    ("void srt::cuda::attn_bwd_dsum_kernel<__nv_bfloat16>(srt::cuda::KernelParams)", 100, 0.0, {}),
    ("void srt::cuda::attn_bwd_tc_kernel<__nv_bfloat16, 128>(srt::cuda::KernelParams)", 2800, 31.0, {}),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>(Flash_fwd_params)",
     500, 70.0, {}),
    ("void pytorch_flash::flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<128>>(Flash_bwd_params)",
     50, 0.0, {}),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>"
     "(Flash_bwd_params)", 1450, 60.0, {}),
]
TENSOR = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


def kernel_metrics(i, duration, tensor, stalls):
    m = {"gpu__time_duration.sum": ("nsecond", f"{duration:,}"), TENSOR: ("%", f"{tensor:.2f}"),
         "launch__registers_per_thread": ("register/thread", str(200 + i))}
    for reason, ratio in stalls.items():
        m[STALL.format(reason)] = ("", f"{ratio}")
    return m


def raw_csv(with_units=True):
    per_kernel = [kernel_metrics(i, *rest) for i, (_, *rest) in enumerate(KERNELS)]
    names = sorted({n for m in per_kernel for n in m})
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    buf.write("==PROF== Connected to process 4242 (/usr/bin/python3.12)\n")
    w.writerow(FIXED + names)
    if with_units:
        w.writerow([""] * len(FIXED) + [per_kernel[0].get(n, ("", ""))[0] for n in names])
    for i, (name, *_) in enumerate(KERNELS):
        w.writerow([str(i), "4242", "python3", "host", name, "1", "7", "(128, 1, 1)", "(64, 16, 2)", "0", "9.0"]
                   + [per_kernel[i].get(n, ("", ""))[1] for n in names])
    buf.write("==PROF== Disconnected from process 4242\n")
    return buf.getvalue()


def details_csv():
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(FIXED + ["Section Name", "Metric Name", "Metric Unit", "Metric Value"])
    for i, (name, *rest) in enumerate(KERNELS):
        for metric, (unit, value) in kernel_metrics(i, *rest).items():
            w.writerow([str(i), "4242", "python3", "host", name, "1", "7", "(128, 1, 1)", "(64, 16, 2)", "0",
                        "9.0", "Section", metric, unit, value])
    return buf.getvalue()


def table_rows(table):
    return [line for line in table.splitlines() if line.split(" ")[0] in profile_gpu.CONTENDERS]


@pytest.mark.parametrize("layout", ["raw", "raw-no-units", "details"])
def test_summary_attributes_kernels_to_contenders(layout):
    text = {"raw": raw_csv(), "raw-no-units": raw_csv(with_units=False), "details": details_csv()}[layout]
    table = profile_gpu.summarize(text, ["ours", "ours+reasoning", "sdpa-flash"])
    rows = table_rows(table)
    assert [r.split()[:2] for r in rows] == [
        ["ours", "attn_fwd_tc_kernel"], ["ours", "attn_bwd_dsum_kernel"], ["ours", "attn_bwd_tc_kernel"],
        ["ours+reasoning", "attn_fwd_tc_kernel"], ["ours+reasoning", "attn_bwd_dsum_kernel"],
        ["ours+reasoning", "attn_bwd_tc_kernel"], ["sdpa-flash", "flash_fwd_kernel"],
        ["sdpa-flash", "flash_bwd_dot_do_o_kernel"], ["sdpa-flash", "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel"]]
    # durations in ms, tensor-pipe %, registers, stall shares (long_scoreboard 3 of 4 stall units)
    assert rows[0].split()[2:4] == ["0.001", "-"] and "40" in rows[0].split() and "200" in rows[0].split()
    assert "long_scoreboard 75%, barrier 25%" in rows[0]
    assert "mio_throttle 100%" in rows[2]
    # totals per contender, against SDPA's: 4.1 us, 3.8 us, 2.0 us
    assert "ours 0.004 ms (2.05x sdpa-flash)" in table
    assert "ours+reasoning 0.004 ms (1.90x sdpa-flash)" in table
    assert "sdpa-flash 0.002 ms" in table


def test_summary_rejects_non_csv_and_tolerates_missing_metrics():
    with pytest.raises(ValueError, match="no ncu CSV header"):
        profile_gpu.summarize("==ERROR== the profiler could not start\n", ["ours"])
    text = '"ID","Kernel Name"\n"0","void srt::cuda::attn_fwd_tc_kernel<half, 64>(P)"\n'
    rows = table_rows(profile_gpu.summarize(text, ["ours"]))
    assert len(rows) == 1 and rows[0].split()[2:5] == ["-", "-", "-"]


def test_global_sectors_per_request():
    hw = "l1tex__t_{}_pipe_lsu_mem_global_op_{}.sum"
    sass = "sm__sass_l1tex_t_{}_pipe_lsu_mem_global_op_{}.sum"
    m = {hw.format("sectors", "red"): ("1,600", ""), hw.format("requests", "red"): ("200", ""),
         hw.format("sectors", "atom"): ("120", ""), hw.format("requests", "atom"): ("40", ""),
         sass.format("sectors", "ldgsts_cache_bypass"): ("3,200", ""),
         sass.format("requests", "ldgsts_cache_bypass"): ("200", "")}
    ops = profile_gpu.GLOBAL_OPS
    assert profile_gpu.sectors_per_request(m, ops["atomic"]) == pytest.approx(1720 / 240)  # summed over RED, ATOM
    assert profile_gpu.sectors_per_request(m, ops["cp.async"]) == pytest.approx(16.0)  # the SASS-patched twin
    assert profile_gpu.sectors_per_request(m, ops["store"]) is None  # not collected
    # the hardware counter is taken over its twin, not added to it
    m[hw.format("sectors", "ldgsts_cache_bypass")] = ("1,600", "")
    m[hw.format("requests", "ldgsts_cache_bypass")] = ("200", "")
    assert profile_gpu.sectors_per_request(m, ops["cp.async"]) == pytest.approx(8.0)
    m[hw.format("requests", "red")] = m[hw.format("requests", "atom")] = ("0", "")
    assert profile_gpu.sectors_per_request(m, ops["atomic"]) is None  # no request
    # and the table shows them
    text = ('"ID","Kernel Name",' + ",".join(f'"{k}"' for k in m) + '\n"0","void srt::cuda::attn_fwd_tc_kernel<half, 64>(P)",'
            + ",".join(f'"{v}"' for v, _ in m.values()) + "\n")
    table = profile_gpu.summarize(text, ["ours"])
    assert "cpa s/r" in table.splitlines()[0]
    assert table_rows(table)[0].split()[-4:-1] == ["8.0", "-", "-"], table


def test_unit_scaling():
    for unit, value, ms in (("nsecond", "2,000,000", 2.0), ("usecond", "1,500.5", 1.5005), ("msecond", "3", 3.0)):
        assert profile_gpu.duration_ms({"gpu__time_duration.sum": (value, unit)}) == pytest.approx(ms)


def test_run_on_cpu_executes_every_contender(capsys):
    assert profile_gpu.main(["run", "--device", "cpu", "--batch", "1", "--seq", "64", "--head-dim", "32",
                             "--hidden", "64", "--dtype", "float32", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "ours, ours-fwd128, ours-bwd128, ours+reasoning, sdpa-flash" in out and "b=1 h=2 n=64 d=32" in out


def test_cli_summarize_writes_the_table(tmp_path, capsys):
    raw = tmp_path / "raw.csv"
    raw.write_text(raw_csv())
    out = tmp_path / "profile.txt"
    assert profile_gpu.main(["summarize", str(raw), "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out
    assert len(table_rows(out.read_text())) == len(KERNELS)
