"""CPU tests of the device headers themselves: every generated WGMMA wrapper family compiles to the
tensor-core instruction it names, without spills, and the headers stay small enough to read. No GPU
is needed; compile tests skip with the reason when nvcc or cuobjdump is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, needs_sass_tools

from moegemm.jit import compiler

N_VALUES = (8, 64, 128, 256)
MAX_HEADER_LINES = 450


# One WGMMA into fresh accumulators, retired, summed so that every accumulator is live.
_PRELUDE = """#include <moegemm/mma/wgmma.cuh>
using namespace moegemm;

template <class Mma, int N>
__device__ __forceinline__ float run(u64 desc_a, u64 desc_b) {
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
    wgmma_fence();
    Mma::mma(desc_a, desc_b, d, false);
    wgmma_commit();
    wgmma_wait<0>();
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) sum += d[i];
    return sum;
}
"""

# Descriptors of a 1024-byte aligned operand tile: K-major, or MN-major in 128-byte wide boxes of
# 64 K rows each (8 KB apart).
_DESCRIPTOR = {
    "K": "smem_descriptor_k_major_sw128({tile})",
    "MN": "smem_descriptor_mn_major_sw128({tile}, 64 * 128)",
}


def _kernel(calls: list[str], operands: tuple[str, str] = ("K", "K")) -> str:
    desc_a = _DESCRIPTOR[operands[0]].format(tile="smem")
    desc_b = _DESCRIPTOR[operands[1]].format(tile="smem + 65536")
    body = "\n".join(f"    sum += {call}(desc_a, desc_b);" for call in calls)
    return (f"{_PRELUDE}\n"
            'extern "C" __global__ void __launch_bounds__(128, 1) moegemm_kernel(float* out) {\n'
            "    extern __shared__ __align__(1024) u8 smem[];\n"
            f"    const u64 desc_a = {desc_a};\n"
            f"    const u64 desc_b = {desc_b};\n"
            "    float sum = 0.0f;\n"
            f"{body}\n"
            "    out[threadIdx.x] = sum;\n"
            "}\n")


def _families() -> dict[str, tuple[str, str, tuple[str, str]]]:
    """name -> (kernel source, SASS mnemonic, expected K of the instruction)."""
    families = {
        "fp8": (_kernel([f"run<WgmmaFp8<{n}>, {n}>" for n in N_VALUES]), "QGMMA", "32"),
        "tf32": (_kernel([f"run<WgmmaTf32<{n}>, {n}>" for n in N_VALUES]), "HGMMA", "8"),
    }
    for major_a in ("K", "MN"):
        for major_b in ("K", "MN"):
            calls = [f"run<WgmmaBf16<{n}, Major::k{major_a}, Major::k{major_b}>, {n}>" for n in N_VALUES]
            families[f"bf16_a{major_a}_b{major_b}"] = (_kernel(calls, (major_a, major_b)), "HGMMA", "16")
    return families


FAMILIES = _families()


@needs_sass_tools
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wgmma_wrappers_compile_to_tensor_core_instructions(cache, family):
    source, mnemonic, k = FAMILIES[family]
    build = compiler.build(f"test_wgmma_{family}", source)
    report = build.resources()
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    sass = compiler.disassemble(build.cubin_path)
    shapes = re.findall(rf"\b{mnemonic}\.64x(\d+)x(\d+)\b", sass)
    assert {int(n) for n, _ in shapes} == set(N_VALUES), f"{mnemonic} shapes in the SASS: {shapes}"
    assert {kk for _, kk in shapes} == {k}, shapes
    assert not re.search(r"\b(LDL|STL)\b", sass), "local-memory traffic in the SASS"


@needs_sass_tools
@pytest.mark.parametrize("major_a", ["K", "MN"])
@pytest.mark.parametrize("major_b", ["K", "MN"])
def test_bf16_operand_majors_reach_the_instruction(cache, major_a, major_b):
    """An MN-major operand is a transposed one in the SASS (.tnspA / .tnspB), a K-major one is not."""
    family = f"bf16_a{major_a}_b{major_b}"
    sass = compiler.disassemble(compiler.build(f"test_wgmma_{family}", FAMILIES[family][0]).cubin_path)
    instructions = re.findall(r"\bHGMMA\.64x\d+x16\.F32\.BF16 [^;]*;", sass)
    assert len(instructions) == len(N_VALUES), instructions
    for instruction in instructions:
        assert ("tnspA" in instruction) == (major_a == "MN"), instruction
        assert ("tnspB" in instruction) == (major_b == "MN"), instruction


def _device_headers() -> list:
    root = REPO / "moegemm"
    return sorted((root / "include").rglob("*.cuh")) + [root / "kernels" / "sm90_fp8_gemm.cuh"]


@pytest.mark.parametrize("header", _device_headers(), ids=lambda p: str(p.relative_to(REPO / "moegemm")))
def test_device_headers_stay_short(header):
    lines = len(header.read_text().splitlines())
    assert lines < MAX_HEADER_LINES, f"{header.name}: {lines} lines; split it by role"


# ---- generated code ------------------------------------------------------------------------------------


def test_wgmma_headers_are_fresh():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gen_wgmma.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_wgmma_check_detects_a_stale_header(tmp_path):
    """--check must fail on a stale header, or the freshness test above could never fail."""
    # The generator finds the headers relative to itself: give a copy of it stale headers of its own.
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "gen_wgmma.py", tmp_path / "tools" / "gen_wgmma.py")
    mma = Path("moegemm", "include", "moegemm", "mma")
    shutil.copytree(REPO / mma, tmp_path / mma)
    header = tmp_path / mma / "wgmma_fp8.cuh"
    header.write_text(header.read_text() + "// edited\n")
    result = subprocess.run([sys.executable, str(tmp_path / "tools" / "gen_wgmma.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "stale" in result.stderr
