"""The JIT's disk cache and compilers: one entry per input, rebuilt when corrupt, safe under
concurrent builds; readable compiler errors; the ptxas report; NVRTC. CPU only; tests that need nvcc
skip with the reason when it is missing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, missing_sass_tools, needs_nvcc

from moegemm.jit import compiler
from moegemm.jit.compiler import CompileError
from moegemm.kernels import fp8_gemm

ENTRY_FILES = {"kernel.cu", "kernel.cubin", "kernel.log", "kernel.sha256"}
# Compiles in well under a second, so cache tests stay cheap.
TINY = 'extern "C" __global__ void moegemm_kernel(float* p) { p[threadIdx.x] *= 2.0f; }\n'


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
    by_nvcc = fp8_gemm.build(config).directory if missing_sass_tools() is None else None
    monkeypatch.setenv("MOEGEMM_USE_NVRTC", "1")
    for build in (fp8_gemm.build(config), fp8_cast.build(fp8_cast.all_configs()[0])):
        report = build.resources()
        assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    build = fp8_gemm.build(config)
    assert build.directory != by_nvcc
    if compiler.find_cuobjdump() is not None:
        assert "QGMMA" in compiler.disassemble(build.cubin_path)
