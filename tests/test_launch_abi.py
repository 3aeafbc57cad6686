"""The launch path's ABI: launch.c's driver types against cuda.h, the TMA enums, the launch record
that runtime.py packs against what launch.c reads, and the parameter layouts against the C++ structs.
CPU only; tests that need a C compiler or cuda.h skip with the reason."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, cuda_include, missing_host_cc, needs_nvcc, run_python

from moegemm.jit import compiler, runtime

LAUNCH_C = REPO / "moegemm" / "jit" / "launch.c"
needs_host_cc = pytest.mark.skipif(missing_host_cc() is not None, reason=str(missing_host_cc()))
needs_cuda_h = pytest.mark.skipif(cuda_include() is None, reason="no cuda.h (CUDA toolkit headers) found")


# ---- the C launch helper and the driver ABI ------------------------------------------------------------


def _cc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([runtime._host_compiler(), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@needs_host_cc
@needs_cuda_h
def test_launch_helper_abi_matches_cuda_h():
    # -H lists every included header: cuda.h among them shows the MOEGEMM_CHECK_ABI block was compiled.
    result = _cc("-fsyntax-only", "-H", "-DMOEGEMM_CHECK_ABI", f"-I{cuda_include()}", str(LAUNCH_C))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\. .*/cuda\.h$", result.stderr, re.M), result.stderr


_PRINT_ENUMS = """
#include <stdio.h>
#include <cuda.h>
int main(void) {
    printf("UINT8 %d\\nINT32 %d\\nFLOAT32 %d\\nBFLOAT16 %d\\n", CU_TENSOR_MAP_DATA_TYPE_UINT8,
           CU_TENSOR_MAP_DATA_TYPE_INT32, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16);
    printf("SWIZZLE_NONE %d\\nSWIZZLE_32B %d\\nSWIZZLE_64B %d\\nSWIZZLE_128B %d\\n", CU_TENSOR_MAP_SWIZZLE_NONE,
           CU_TENSOR_MAP_SWIZZLE_32B, CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_SWIZZLE_128B);
    return 0;
}
"""
# TMA has no FP8 element type on sm_90: e4m3 moves as raw bytes.
_TMA_DTYPE_NAMES = {torch.uint8: "UINT8", torch.int8: "UINT8", torch.float8_e4m3fn: "UINT8", torch.int32: "INT32",
                    torch.float32: "FLOAT32", torch.bfloat16: "BFLOAT16"}


@needs_host_cc
@needs_cuda_h
def test_tma_enums_match_cuda_h(tmp_path):
    (tmp_path / "enums.c").write_text(_PRINT_ENUMS)
    result = _cc(f"-I{cuda_include()}", "enums.c", "-o", "enums", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = subprocess.run([str(tmp_path / "enums")], capture_output=True, text=True, check=True).stdout
    values = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    assert set(runtime.TMA_DTYPES) == set(_TMA_DTYPE_NAMES), "a TMA dtype was added: name its cuda.h enum here"
    assert {d: runtime.TMA_DTYPES[d] for d in _TMA_DTYPE_NAMES} == {d: values[n] for d, n in _TMA_DTYPE_NAMES.items()}
    ours = (runtime.SWIZZLE_NONE, runtime.SWIZZLE_32B, runtime.SWIZZLE_64B, runtime.SWIZZLE_128B)
    assert ours == tuple(values[f"SWIZZLE_{s}"] for s in ("NONE", "32B", "64B", "128B"))


# Decodes a launch record with launch.c's own structs, as mg_launch reads it.
_DECODE_RECORD = """
#include <stdio.h>
#include "launch.c"
int main(void) {
    static unsigned char record[1 << 16];
    fread(record, 1, sizeof record, stdin);
    mg_header h;
    memcpy(&h, record, sizeof h);
    printf("%llu %u %u %u %u %u %u %u %u %u %u %u %u %u %u", (unsigned long long)h.function,
           h.grid[0], h.grid[1], h.grid[2], h.block[0], h.block[1], h.block[2], h.cluster[0], h.cluster[1],
           h.cluster[2], h.smem_bytes, h.flags, h.num_tma, h.params_bytes, h.num_param_pointers);
    for (int i = 0; i < MG_MAX_PARAM_POINTERS; ++i) printf(" %u", h.param_pointer_offsets[i]);
    for (int i = 0; i < MG_MAX_PARAM_POINTERS; ++i) printf(" %u", h.param_pointer_operands[i]);
    printf("\\n");
    const unsigned char *specs = record + sizeof h;
    for (uint32_t i = 0; i < h.num_tma; ++i) {
        mg_tma_spec s;
        memcpy(&s, specs + i * sizeof s, sizeof s);
        printf("%llu %llu %llu %llu %llu %llu %u %u %u %u %u %u %u %u\\n", (unsigned long long)s.dims[0],
               (unsigned long long)s.dims[1], (unsigned long long)s.dims[2], (unsigned long long)s.strides[0],
               (unsigned long long)s.strides[1], (unsigned long long)s.strides[2], s.box[0], s.box[1], s.box[2],
               s.rank, s.dtype, s.swizzle, s.offset, s.operand);
    }
    const unsigned char *params = specs + h.num_tma * sizeof(mg_tma_spec);
    for (uint32_t i = 0; i < h.params_bytes; ++i) printf("%02x", params[i]);
    printf("\\n");
    return 0;
}
"""


@needs_host_cc
def test_launch_record_layout_matches_launch_c(tmp_path, monkeypatch):
    """runtime.Kernel.record packs what launch.c's mg_header and mg_tma_spec read, field by field:
    each descriptor and pointer member at its layout offset, naming the operand it takes."""
    (tmp_path / "decode.c").write_text(_DECODE_RECORD)
    result = _cc(f"-I{LAUNCH_C.parent}", "decode.c", "-o", "decode", "-ldl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    def fake_load(kernel):  # no driver here: a made-up function handle stands in for the loaded kernel
        kernel._kernel = 0x1234_5678_9ABC

    monkeypatch.setattr(runtime.Kernel, "_load_library", fake_load)
    layout = runtime.ParamsLayout("P", (
        runtime.Slot("x", "tma", "b"), runtime.Slot("y", "tma", "a"), runtime.Slot("count", "u32"),
        runtime.Slot("out", "ptr", "c"), runtime.Slot("pitch", "u64"), runtime.Slot("in", "ptr", "a"),
        runtime.Slot("n", "u32")), ("a", "b", "c"))
    assert layout.offsets == {"x": 0, "y": 128, "count": 256, "out": 264, "pitch": 272, "in": 280, "n": 288}
    assert layout.size == 320  # the CUtensorMaps' 64-byte alignment rounds the struct up
    kernel = runtime.Kernel(compiler.Build("fake", tmp_path), num_threads=384, smem_bytes=200_000, layout=layout,
                            cluster=2)
    tma = {"x": runtime.tma_2d(torch.float8_e4m3fn, 7168, 4096, 7168, 128, 128, runtime.SWIZZLE_128B),
           "y": runtime.tma_2d(torch.bfloat16, 2112, 64, 4224, 64, 32, runtime.SWIZZLE_NONE)}
    record = kernel.record(grid=132, tma=tma, values={"count": 11, "pitch": 22, "n": 33}, pdl=True,
                           cooperative=True)
    decoded = subprocess.run([str(tmp_path / "decode")], input=record, capture_output=True, check=True).stdout
    header, *specs, block = decoded.decode().split("\n")[:-1]

    assert [int(x) for x in header.split()] == [
        0x1234_5678_9ABC, 132, 1, 1, 384, 1, 1, 2, 1, 1, 200_000, 3, 2, 320, 2, 264, 280, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0]
    assert [tuple(int(x) for x in spec.split()) for spec in specs] == [(*tma["x"], 0, 1), (*tma["y"], 128, 0)]
    assert bytes.fromhex(block) == bytes(256) + struct.pack("<I4xQQQI28x", 11, 0, 22, 0, 33)
    with pytest.raises(ValueError, match="expected"):
        kernel.record(grid=1, tma=tma, values={"count": 1})


@needs_nvcc
@pytest.mark.parametrize("family", ["fp8_gemm", "fp8_cast"])
def test_params_layouts_match_the_cpp_structs(cache, family):
    """The stub's static_asserts hold for the real structs, and fail for a layout that is off."""
    import importlib

    module = importlib.import_module(f"moegemm.kernels.{family}")
    header = "sm90_fp8_gemm.cuh" if family == "fp8_gemm" else "sm90_fp8_cast.cuh"
    layout = module.PARAMS

    def source(checks):
        return f'#include "{header}"\n' + "".join(f"static_assert({c});\n" for c in checks) + \
            'extern "C" __global__ void moegemm_kernel() {}\n'

    compiler.build(f"layout_{family}", source((layout.size_check(), *layout.offset_checks())))
    swapped = runtime.ParamsLayout(layout.cpp_type, (layout.slots[1], layout.slots[0], *layout.slots[2:]),
                                   layout.operands)
    with pytest.raises(compiler.CompileError, match="static assertion|static_assert"):
        compiler.build(f"layout_{family}_swapped", source(swapped.offset_checks()))


_LOAD_HELPER = """
import ctypes
from moegemm.jit import runtime
try:
    runtime.host_library()
    outcome = "loaded"
except runtime.LaunchError:
    outcome = "no-driver"
(helper,) = runtime.cache_subdir("host").iterdir()
status = ctypes.CDLL(str(helper)).mg_init()
try:
    ctypes.CDLL("libcuda.so.1")
    driver = "driver"
except OSError:
    driver = "none"
print(outcome, status, driver, helper.name)
"""


@needs_host_cc
def test_launch_helper_compiles_and_loads(cache):
    result = run_python(_LOAD_HELPER)
    assert result.returncode == 0, result.stderr
    outcome, status, driver, name = result.stdout.split()
    assert re.fullmatch(r"launch_[0-9a-f]{16}\.so", name), "a temporary file was left in the host cache"
    if driver == "none":  # without libcuda.so.1 mg_init reports it instead of crashing
        assert (outcome, int(status)) == ("no-driver", -1)
    else:
        assert (outcome, int(status)) == ("loaded", 0)


