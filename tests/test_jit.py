"""CPU tests of the JIT and the tooling around it: the disk cache, compiler errors, the C launch
helper's ABI, generated headers, a compile of every config the heuristic emits, environment
variables and the command line. No GPU is needed; tests that need nvcc, cuobjdump or a C compiler
skip with the reason when the tool is missing."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_python

from moegemm.jit import compiler, runtime
from moegemm.jit.compiler import CompileError
from moegemm.kernels import fp8_gemm

PACKAGE = REPO / "moegemm"
LAUNCH_C = PACKAGE / "jit" / "launch.c"
ENTRY_FILES = {"kernel.cu", "kernel.cubin", "kernel.log", "kernel.sha256"}
# Compiles in well under a second, so cache tests stay cheap.
TINY = 'extern "C" __global__ void moegemm_kernel(float* p) { p[threadIdx.x] *= 2.0f; }\n'
# Variables that change what a compile produces or prints; tests start without them.
_COMPILE_VARIABLES = ("MOEGEMM_NVCC_FLAGS", "MOEGEMM_USE_NVRTC", "MOEGEMM_JIT_DEBUG", "MOEGEMM_PTXAS_VERBOSE",
                      "MOEGEMM_DUMP_SASS")


def _missing_nvcc() -> str | None:
    try:
        compiler.find_nvcc()
    except CompileError as error:
        return f"nvcc not found: {error}"
    return None


def _missing_host_cc() -> str | None:
    try:
        runtime._host_compiler()
    except CompileError as error:
        return str(error)
    return None


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (holding cuda.h), wherever the nvcc in use keeps it."""
    candidates = []
    with contextlib.suppress(CompileError, OSError, subprocess.SubprocessError):
        nvcc = compiler.find_nvcc()
        candidates += [nvcc.parent.parent / "include", nvcc.resolve().parent.parent / "include"]
        # nvcc may be a wrapper script outside the toolkit; its dry run names the real include dir.
        dry = subprocess.run([str(nvcc), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        candidates += [Path(p) for p in re.findall(r'INCLUDES="-I([^"]+)"', dry.stdout + dry.stderr)]
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda.h").is_file()), None)


needs_nvcc = pytest.mark.skipif(_missing_nvcc() is not None, reason=str(_missing_nvcc()))
needs_host_cc = pytest.mark.skipif(_missing_host_cc() is not None, reason=str(_missing_host_cc()))
needs_cuda_h = pytest.mark.skipif(_cuda_include() is None, reason="no cuda.h (CUDA toolkit headers) found")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty kernel cache of this test's own; compiler.py reads the variable on every call."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MOEGEMM_CACHE_DIR", str(root))
    for name in _COMPILE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.fixture
def compiles(monkeypatch) -> list[Path]:
    """The entry directories nvcc ran for, in order: a cache hit leaves this list unchanged."""
    calls: list[Path] = []
    real = compiler._compile_nvcc

    def counted(entry):
        calls.append(entry.directory)
        return real(entry)

    monkeypatch.setattr(compiler, "_compile_nvcc", counted)
    return calls


def _assert_valid_entry(build: compiler.Build) -> None:
    cubin = build.cubin_path.read_bytes()
    assert cubin.startswith(b"\x7fELF"), "the cubin is not an ELF file"
    assert (build.directory / "kernel.sha256").read_text().strip() == hashlib.sha256(cubin).hexdigest()


# ---- the disk cache ------------------------------------------------------------------------------------


@needs_nvcc
def test_same_source_builds_once(cache, compiles):
    first = compiler.build("tiny", TINY)
    mtime = first.cubin_path.stat().st_mtime_ns
    second = compiler.build("tiny", TINY)
    assert second == first
    assert first.directory.parent == cache / "kernels"
    assert compiles == [first.directory]
    assert second.cubin_path.stat().st_mtime_ns == mtime
    _assert_valid_entry(second)


@needs_nvcc
@pytest.mark.parametrize("change", ["source", "flags", "headers"])
def test_changed_input_gets_a_new_entry(cache, compiles, monkeypatch, change):
    base = compiler.build("tiny", TINY)
    base_key = compiler.cache_key(TINY)
    source = TINY
    if change == "source":
        source = TINY + "// another kernel\n"
    elif change == "flags":
        monkeypatch.setenv("MOEGEMM_NVCC_FLAGS", "-DMOEGEMM_TEST_FLAG=1")
    else:
        # _headers_digest is lru_cached, so replace the function rather than editing a header.
        monkeypatch.setattr(compiler, "_headers_digest", lambda: "0" * 64)
    assert compiler.cache_key(source) != base_key
    other = compiler.build("tiny", source)
    assert other.directory != base.directory
    assert compiles == [base.directory, other.directory]
    _assert_valid_entry(other)
    _assert_valid_entry(base)


def test_headers_digest_covers_every_header(tmp_path, monkeypatch):
    """Editing or adding any header under include/ or kernels/ must change the cache key."""
    package = tmp_path / "moegemm"
    shutil.copytree(compiler.INCLUDE_DIR, package / "include")
    shutil.copytree(compiler.KERNEL_DIR, package / "kernels", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(compiler, "PACKAGE_DIR", package)
    monkeypatch.setattr(compiler, "INCLUDE_DIR", package / "include")
    monkeypatch.setattr(compiler, "KERNEL_DIR", package / "kernels")
    digest = compiler._headers_digest.__wrapped__
    headers = sorted(package.rglob("*.cuh"))
    assert len(headers) >= 4, headers
    seen = {digest()}
    for header in headers:
        header.write_bytes(header.read_bytes() + b"\n")
        seen.add(digest())
    (package / "include" / "moegemm" / "new.cuh").write_text("#pragma once\n")
    seen.add(digest())
    assert len(seen) == len(headers) + 2


def _truncate(entry: compiler.Build) -> None:
    data = entry.cubin_path.read_bytes()
    entry.cubin_path.write_bytes(data[: len(data) // 2])


def _overwrite(entry: compiler.Build) -> None:
    entry.cubin_path.write_bytes(b"\0" * entry.cubin_path.stat().st_size)


def _delete_digest(entry: compiler.Build) -> None:
    (entry.directory / "kernel.sha256").unlink()


def _delete_cubin(entry: compiler.Build) -> None:
    entry.cubin_path.unlink()


def _garble_digest(entry: compiler.Build) -> None:
    (entry.directory / "kernel.sha256").write_text("not a digest")


@needs_nvcc
@pytest.mark.parametrize("corrupt", [_truncate, _overwrite, _delete_digest, _delete_cubin, _garble_digest],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_entry_is_rebuilt(cache, compiles, corrupt):
    entry = compiler.build("tiny", TINY)
    corrupt(entry)
    rebuilt = compiler.build("tiny", TINY)
    assert rebuilt.directory == entry.directory
    assert len(compiles) == 2, "the corrupt entry was served from the cache"
    _assert_valid_entry(rebuilt)
    assert {p.name for p in rebuilt.directory.iterdir()} == ENTRY_FILES


def test_cache_size_skips_files_that_vanish(cache, monkeypatch):
    """A concurrent build renames its temporary files away while `moegemm info` sizes the cache."""
    entry = cache / "kernels" / "k_0123"
    entry.mkdir(parents=True)
    (entry / "kernel.cubin").write_bytes(b"x" * 1000)
    (entry / ".kernel.log.tmp").write_bytes(b"y" * 10)
    real_stat = os.stat

    def racing_stat(path, *args, **kwargs):
        if Path(path).name.endswith(".tmp"):
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", racing_stat)
    assert compiler.cache_size() == 1000


# Builds once the parent says go, so both processes miss the cache and compile at the same time.
_RACER = """
import sys, time
from pathlib import Path
from moegemm.jit import compiler
ready, go, source = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
compiler.cache_key(source)  # warm nvcc --version and the header digest before the start line
ready.touch()
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
print(compiler.build("race", source).directory)
"""


@needs_nvcc
def test_concurrent_builds_of_one_kernel(cache, tmp_path):
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(r), str(go), TINY], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env_vars, cwd=REPO) for r in ready]
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in racers), [p.communicate() for p in racers]
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=300) for p in racers]
    finally:
        for p in racers:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in racers] == [0, 0], outputs
    directories = {Path(out.strip()) for out, _ in outputs}
    assert len(directories) == 1, outputs
    (directory,) = directories
    _assert_valid_entry(compiler.Build("race", directory))
    # No temporary file or directory may outlive the builds, next to the entry or inside it.
    leftovers = sorted(p.relative_to(cache) for p in cache.rglob("*")
                       if p not in (cache / "kernels", cache / compiler.CACHE_MARKER) and p.parent != directory
                       and p != directory)
    assert leftovers == []
    assert {p.name for p in directory.iterdir()} == ENTRY_FILES


# ---- compiler failures ---------------------------------------------------------------------------------


@needs_nvcc
def test_compile_error_names_source_and_error(cache):
    source = TINY.replace("*= 2.0f;", "*= moegemm_undeclared_name;")
    source_path = cache / "kernels" / f"broken_{compiler.cache_key(source)}" / "kernel.cu"
    with pytest.raises(CompileError) as error:
        compiler.build("broken", source)
    message = str(error.value)
    assert str(source_path) in message
    assert "moegemm_undeclared_name" in message and "error" in message
    assert source_path.read_text() == source, "the failing source must stay on disk for debugging"
    assert not (source_path.parent / "kernel.sha256").exists()
    with pytest.raises(CompileError):  # a failure is not cached as a success
        compiler.build("broken", source)


def test_bad_nvcc_override_is_named(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEMM_NVCC", str(tmp_path / "no" / "nvcc"))
    compiler._find_nvcc_cached.cache_clear()
    try:
        with pytest.raises(CompileError, match="MOEGEMM_NVCC: expected an executable nvcc"):
            compiler.build("tiny", TINY)
    finally:
        compiler._find_nvcc_cached.cache_clear()


def test_missing_nvcc_is_one_readable_error(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("MOEGEMM_NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(compiler, "_wheel_tools", lambda tool: [])
    # The last resort, /usr/local/cuda/bin/nvcc, is hard-coded: make every nvcc look non-executable.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "nvcc" and real_access(path, mode))
    compiler._find_nvcc_cached.cache_clear()
    try:
        with pytest.raises(CompileError) as error:
            compiler.build("tiny", TINY)
    finally:
        compiler._find_nvcc_cached.cache_clear()
    message = str(error.value)
    assert message.startswith("no nvcc found")
    assert "MOEGEMM_NVCC" in message and "\n" not in message
    assert error.value.__cause__ is None and error.value.__context__ is None
    assert not cache.exists(), "nothing should be written before a compiler is found"


_PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    24 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'moegemm_kernel' for 'sm_90a'
ptxas info    : Function properties for moegemm_kernel
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 16 bytes cumulative stack size
ptxas info    : Compile time = 136.956 ms
"""


def test_parse_ptxas_report():
    report = compiler.parse_ptxas_report(_PTXAS_LOG)
    assert report == compiler.ResourceReport(registers=168, spill_stores=8, spill_loads=12, stack_bytes=16)
    with pytest.raises(CompileError, match="no ptxas resource report"):
        compiler.parse_ptxas_report("nvcc warning : something unrelated\n")


@needs_nvcc
def test_build_records_the_ptxas_report(cache):
    report = compiler.build("tiny", TINY).resources()
    assert report.registers > 0
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0)


# ---- the C launch helper and the driver ABI ------------------------------------------------------------


def _cc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([runtime._host_compiler(), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@needs_host_cc
@needs_cuda_h
def test_launch_helper_abi_matches_cuda_h():
    # -H lists every included header: cuda.h among them shows the MOEGEMM_CHECK_ABI block was compiled.
    result = _cc("-fsyntax-only", "-H", "-DMOEGEMM_CHECK_ABI", f"-I{_cuda_include()}", str(LAUNCH_C))
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
_TMA_DTYPE_NAMES = {torch.uint8: "UINT8", torch.float8_e4m3fn: "UINT8", torch.int32: "INT32",
                    torch.float32: "FLOAT32", torch.bfloat16: "BFLOAT16"}


@needs_host_cc
@needs_cuda_h
def test_tma_enums_match_cuda_h(tmp_path):
    (tmp_path / "enums.c").write_text(_PRINT_ENUMS)
    result = _cc(f"-I{_cuda_include()}", "enums.c", "-o", "enums", cwd=tmp_path)
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
    printf("%llu %u %u %u %u %u %u %u %u %u %u %u %u %u %u %u %u %u %u\\n", (unsigned long long)h.function,
           h.grid[0], h.grid[1], h.grid[2], h.block[0], h.block[1], h.block[2], h.cluster[0], h.cluster[1],
           h.cluster[2], h.smem_bytes, h.pdl, h.num_tma, h.params_bytes, h.num_param_pointers,
           h.param_pointer_offsets[0], h.param_pointer_offsets[1], h.param_pointer_offsets[2],
           h.param_pointer_offsets[3]);
    const unsigned char *specs = record + sizeof h;
    for (uint32_t i = 0; i < h.num_tma; ++i) {
        mg_tma_spec s;
        memcpy(&s, specs + i * sizeof s, sizeof s);
        printf("%llu %llu %llu %llu %llu %llu %u %u %u %u %u %u %u\\n", (unsigned long long)s.dims[0],
               (unsigned long long)s.dims[1], (unsigned long long)s.dims[2], (unsigned long long)s.strides[0],
               (unsigned long long)s.strides[1], (unsigned long long)s.strides[2], s.box[0], s.box[1], s.box[2],
               s.rank, s.dtype, s.swizzle, s.offset);
    }
    const unsigned char *params = specs + h.num_tma * sizeof(mg_tma_spec);
    for (uint32_t i = 0; i < h.params_bytes; ++i) printf("%02x", params[i]);
    printf("\\n");
    return 0;
}
"""


@needs_host_cc
def test_launch_record_layout_matches_launch_c(tmp_path, monkeypatch):
    """runtime.Kernel.record packs what launch.c's mg_header and mg_tma_spec read, field by field."""
    (tmp_path / "decode.c").write_text(_DECODE_RECORD)
    result = _cc(f"-I{LAUNCH_C.parent}", "decode.c", "-o", "decode", "-ldl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    def fake_load(kernel):  # no driver here: a made-up function handle stands in for the loaded kernel
        kernel._kernel = 0x1234_5678_9ABC

    monkeypatch.setattr(runtime.Kernel, "_load_library", fake_load)
    kernel = runtime.Kernel(compiler.Build("fake", tmp_path), num_threads=384, smem_bytes=200_000, num_tma=2,
                            params_format="QQ3I4x", cluster=2)
    tma = [runtime.tma_2d(torch.float8_e4m3fn, 7168, 4096, 7168, 128, 128, runtime.SWIZZLE_128B, 0),
           runtime.tma_2d(torch.bfloat16, 2112, 64, 4224, 64, 32, runtime.SWIZZLE_NONE, 128)]
    params = (0, 0, 11, 22, 33)
    record = kernel.record(grid=132, tma=tma, params=params, num_pointer_params=2, pdl=True)
    decoded = subprocess.run([str(tmp_path / "decode")], input=record, capture_output=True, check=True).stdout
    header, *specs, block = decoded.decode().split("\n")[:-1]

    assert [int(x) for x in header.split()] == [
        0x1234_5678_9ABC, 132, 1, 1, 384, 1, 1, 2, 1, 1, 200_000, 1, 2, kernel.params_bytes, 2, 256, 264, 0, 0]
    assert [tuple(int(x) for x in spec.split()) for spec in specs] == tma
    assert bytes.fromhex(block) == bytes(256) + struct.pack("<QQ3I4x", *params)
    assert kernel.params_bytes == 256 + struct.calcsize("<QQ3I4x")


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


# ---- generated code ------------------------------------------------------------------------------------


def test_wgmma_header_is_fresh():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gen_wgmma.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_wgmma_check_detects_a_stale_header(tmp_path):
    """--check must fail on a stale header, or the freshness test above could never fail."""
    # The generator finds the header relative to itself: give a copy of it a stale header of its own.
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "gen_wgmma.py", tmp_path / "tools" / "gen_wgmma.py")
    header = tmp_path / "moegemm" / "include" / "moegemm" / "wgmma_ops.cuh"
    header.parent.mkdir(parents=True)
    header.write_text((REPO / "moegemm" / "include" / "moegemm" / "wgmma_ops.cuh").read_text() + "// edited\n")
    result = subprocess.run([sys.executable, str(tmp_path / "tools" / "gen_wgmma.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "stale" in result.stderr


def _heuristic_configs() -> list:
    grid = set()
    for m in (1, 64, 128, 129, 1000, 4096, 16384):
        for n in (8, 16, 24, 48, 64, 136, 256, 576, 1000, 2112, 4096, 7168, 16384, 24576, 32768):
            for k in (128, 512, 7168):
                for out_fp32, accumulate in ((False, False), (True, False), (True, True)):
                    grid.add(fp8_gemm.select_config(m, n, k, out_fp32, accumulate, 132))
    for kind in ("contiguous", "psum", "masked"):
        for m, groups in ((1, 32), (32, 32), (160, 32), (256, 32), (4096, 8), (8192, 4)):
            for n, k in ((4096, 7168), (7168, 2048), (576, 512)):
                grid.add(fp8_gemm.select_grouped_config(kind, m, n, k, False, 132, groups))
    return sorted(grid | set(_explicit_configs()), key=fp8_gemm.kernel_name)


def _test_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_moegemm_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _explicit_configs() -> list:
    """The configs the GPU tests force (test_fp8_gemm.CONFIGS, test_fp8_grouped_gemm.EVERY_CONFIG): they
    must compile too."""
    grouped = [dataclasses.replace(config, gemm_type=kind)
               for config, kind in _test_module("test_fp8_grouped_gemm").EVERY_CONFIG]
    return _test_module("test_fp8_gemm").CONFIGS + grouped


def _missing_sass_tools() -> str | None:
    if _missing_nvcc():
        return _missing_nvcc()
    if compiler.find_cuobjdump() is None:
        return "cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    return None


_SPILLS = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(LDL|STL)\b", re.M)


# ptxas' notes that it serialized WGMMAs or inserted waits for them: each costs the overlap of tensor
# cores with everything else.
_WGMMA_SERIALIZED = re.compile(r"\((C751[0-9])\)[^\n]*")


def _compile_and_inspect(config) -> tuple[compiler.ResourceReport, int, list[str], list[str]]:
    build = fp8_gemm.build(config)
    sass = compiler.disassemble(build.cubin_path)
    serialized = [m.group(0) for m in _WGMMA_SERIALIZED.finditer(build.log)]
    return (build.resources(), sass.count("QGMMA"), [m.group(0).strip() for m in _SPILLS.finditer(sass)],
            serialized)


@pytest.fixture(scope="module")
def compiled_configs(tmp_path_factory) -> dict:
    """Every config compiled and disassembled once, in parallel (nvcc runs outside the GIL), into a
    cache shared by this module's config tests. A failure is kept and raised by its own test."""
    configs = _heuristic_configs()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOEGEMM_CACHE_DIR", str(tmp_path_factory.mktemp("config-cache")))
        for name in _COMPILE_VARIABLES:
            patch.delenv(name, raising=False)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            futures = {config: pool.submit(_compile_and_inspect, config) for config in configs}
            return {config: future.exception() or future.result() for config, future in futures.items()}


@pytest.mark.skipif(_missing_sass_tools() is not None, reason=str(_missing_sass_tools()))
@pytest.mark.parametrize("config", _heuristic_configs(), ids=fp8_gemm.kernel_name)
def test_config_compiles_without_spills(compiled_configs, config):
    outcome = compiled_configs[config]
    if isinstance(outcome, BaseException):
        raise outcome
    report, num_qgmma, local_memory, serialized = outcome
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    assert num_qgmma > 0, "no FP8 WGMMA (QGMMA) in the SASS"
    assert local_memory == [], "local-memory traffic in the SASS"
    assert serialized == [], f"ptxas serialized the WGMMAs: {serialized}"


# ---- NVRTC ---------------------------------------------------------------------------------------------


def _nvrtc_missing() -> str | None:
    try:
        compiler._nvrtc_version()
    except Exception as error:  # no libnvrtc: cuda-bindings raises its own loader errors
        return f"NVRTC unavailable ({type(error).__name__}); pip install nvidia-cuda-nvrtc"
    return None


@pytest.mark.skipif(_nvrtc_missing() is not None, reason=str(_nvrtc_missing()))
def test_nvrtc_builds_the_kernels(cache, monkeypatch):
    """MOEGEMM_USE_NVRTC=1 compiles the same stubs: no spills, FP8 WGMMA in the GEMM's SASS, and a
    cache entry apart from nvcc's (the compiler version is in the key)."""
    from moegemm.kernels import fp8_cast

    config = fp8_gemm.Fp8GemmConfig(128, 128, 5, False, False)
    by_nvcc = fp8_gemm.build(config).directory if _missing_sass_tools() is None else None
    monkeypatch.setenv("MOEGEMM_USE_NVRTC", "1")
    for build in (fp8_gemm.build(config), fp8_cast.build(fp8_cast.all_configs()[0])):
        report = build.resources()
        assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    build = fp8_gemm.build(config)
    assert build.directory != by_nvcc
    if compiler.find_cuobjdump() is not None:
        assert "QGMMA" in compiler.disassemble(build.cubin_path)
