"""benchmarks/sass_loop.py on a small SASS listing in cuobjdump's layout (synthetic: two functions,
the second with a loop of two straight-line segments)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import sass_loop  # noqa: E402

SASS = """
\t\tFunction : _ZN3srt4cuda18attn_fwd_tc_kernelI6__halfLi64ELi64EEEvNS0_12KernelParamsE
        /*0000*/                   MOV R1, c[0x0][0x28] ;           /* 0x00000a0000017a02 */
        /*0010*/                   EXIT ;                           /* 0x000000000000794d */
\t\tFunction : _ZN3srt4cuda18attn_fwd_tc_kernelI13__nv_bfloat16Li128ELi64EEEvNS0_12KernelParamsE
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0040*/                   HMMA.16816.F32.BF16 R12, R4, R7, R12 ;
        /*0050*/              @P0 BRA 0x80 ;
        /*0060*/                   FMUL R8, R8, R9 ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R10.64] ;
        /*0080*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;
        /*0090*/              @P1 BRA 0x20 ;
        /*00a0*/                   EXIT ;
"""


def test_finds_the_loop_and_its_segments():
    out = sass_loop.report(SASS, "nv_bfloat16Li128ELi64E", min_len=99)
    lines = out.splitlines()
    assert lines[0] == "main loop 0x20..0x90: 8 instructions, 2 HMMA (static)"
    assert lines[1].split()[:2] == ["0x00020-0x00050", "4"] and "HMMA 2" in lines[1] and "LDSM 1" in lines[1]
    assert lines[2].split()[:2] == ["0x00060-0x00090", "4"] and "LDGSTS 1" in lines[2]
    assert len(lines) == 3


def test_predicates_and_modifiers_are_not_opcodes():
    assert sass_loop.opcode("@!P1 BRA 0x20") == "BRA"
    assert sass_loop.opcode("@UP0 HMMA.16816.F32.BF16 R8, R4, R6, R8") == "HMMA"


def test_errors():
    with pytest.raises(ValueError, match="no function matching"):
        sass_loop.report(SASS, "attn_bwd")
    with pytest.raises(ValueError, match="no loop"):
        sass_loop.report(SASS, "__halfLi64ELi64E")
