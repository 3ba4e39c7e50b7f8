"""Static instruction mix of a kernel's main loop, from `cuobjdump -sass` output (no GPU needed).

The tensor-core kernels issue one instruction per cycle per SM sub-partition; every instruction
that is not an HMMA competes with the matrix products for that slot. This prints, for one kernel
function, the outermost loop (the longest backward branch) split into branch-free straight-line
segments with their opcode counts, so the instructions a tile costs can be read off (the segments
that hold HMMA, LDSM, LDGSTS, BAR, RED; long segments of mask code run only on masked tiles).

    nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 --expt-relaxed-constexpr \\
         -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \\
         $(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))") \\
         -cubin csrc/cuda/attn_fwd_bf16.cu -o fwd.cubin
    cuobjdump -sass fwd.cubin > fwd.sass     # cuobjdump + nvdisasm: CUDA toolkit, or the PyPI wheels
                                             # nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm
    python benchmarks/sass_loop.py fwd.sass attn_fwd_tc_kernelI13__nv_bfloat16Li128ELi64E

These are static counts: which segments run per tile depends on the branches taken.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
HOT = ("HMMA", "LDSM", "LDGSTS", "BAR", "RED", "REDG", "ATOM")


def opcode(text):
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate guard
    return text.split()[0].split(".")[0]


def function_instructions(sass, name):
    """[(address, text)] of the first function whose mangled name contains `name`."""
    start = next((m.end() for m in re.finditer(r"Function : (\S+)", sass) if name in m.group(1)), None)
    if start is None:
        raise ValueError(f"no function matching {name!r} in the SASS")
    end = sass.find("Function :", start)
    body = sass[start:end if end >= 0 else None]
    return [(int(m.group(1), 16), m.group(2)) for m in map(INSTR.match, body.splitlines()) if m]


def main_loop(ins):
    """(first, last) address of the longest backward branch's span."""
    best = None
    for addr, text in ins:
        if opcode(text) == "BRA":
            m = re.search(r"0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) < addr:
                span = (int(m.group(1), 16), addr)
                if best is None or span[1] - span[0] > best[1] - best[0]:
                    best = span
    if best is None:
        raise ValueError("no backward branch: the function has no loop")
    return best


def segments(ins, lo, hi):
    """Straight-line pieces of [lo, hi], each ending at a branch or call."""
    out, cur = [], []
    for addr, text in ins:
        if lo <= addr <= hi:
            cur.append((addr, text))
            if opcode(text) in ("BRA", "CALL", "EXIT", "RET"):
                out.append(cur)
                cur = []
    if cur:
        out.append(cur)
    return out


def report(sass, name, min_len=20):
    ins = function_instructions(sass, name)
    lo, hi = main_loop(ins)
    loop = [t for a, t in ins if lo <= a <= hi]
    lines = [f"main loop {lo:#x}..{hi:#x}: {len(loop)} instructions, "
             f"{sum(opcode(t) == 'HMMA' for t in loop)} HMMA (static)"]
    for seg in segments(ins, lo, hi):
        c = Counter(opcode(t) for _, t in seg)
        if len(seg) >= min_len or any(k in c for k in HOT):
            mix = ", ".join(f"{k} {v}" for k, v in c.most_common(8))
            lines.append(f"  {seg[0][0]:#07x}-{seg[-1][0]:#07x} {len(seg):5d}  {mix}  | ends {seg[-1][1][:40]}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sass", help="cuobjdump -sass output")
    ap.add_argument("function", help="part of the mangled kernel name, e.g. attn_bwd_tc_kernelI13__nv_bfloat16Li128E")
    ap.add_argument("--min-len", type=int, default=20, help="also list segments without hot opcodes this long")
    args = ap.parse_args(argv)
    with open(args.sass, encoding="utf-8", errors="replace") as f:
        sys.stdout.write(report(f.read(), args.function, args.min_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
