"""Compile generated CUDA sources to sm_90a cubins with nvcc or NVRTC, cached on disk.

A cache entry is a directory ``<cache>/kernels/<name>_<key>/`` holding ``kernel.cu`` (the generated
stub), ``kernel.cubin``, ``kernel.log`` (the compiler's resource report) and ``kernel.sha256`` (the
digest of the cubin, written last). The key hashes the stub, every moegemm header, the flags, the
compiler's version, the architecture and the library version. Files are written under a temporary
name and renamed into place, so a reader never sees half a file; an entry whose cubin does not match
its digest is rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import env

PACKAGE_DIR = Path(__file__).resolve().parent.parent
INCLUDE_DIR = PACKAGE_DIR / "include"
KERNEL_DIR = PACKAGE_DIR / "kernels"
ARCH = "sm_90a"
_NVCC_FLAGS = (
    "-std=c++17", "-O3", "-cubin", "--expt-relaxed-constexpr", "-Xptxas=-v",
    "-gencode=arch=compute_90a,code=sm_90a",
    # Kernels never touch denormals; flush them so no slow path is emitted.
    "--ftz=true",
)
_NVRTC_FLAGS = ("-std=c++17", "--gpu-architecture=sm_90a", "--ptxas-options=-v", "--ftz=true")


class CompileError(RuntimeError):
    """The compiler is missing or rejected a generated source."""


@dataclass(frozen=True)
class Build:
    """A compiled kernel in the disk cache."""

    name: str
    directory: Path

    @property
    def cubin_path(self) -> Path:
        return self.directory / "kernel.cubin"

    @property
    def source_path(self) -> Path:
        return self.directory / "kernel.cu"

    @property
    def log(self) -> str:
        path = self.directory / "kernel.log"
        return path.read_text() if path.exists() else ""

    def resources(self) -> ResourceReport:
        return parse_ptxas_report(self.log)


@dataclass(frozen=True)
class ResourceReport:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


def parse_ptxas_report(log: str) -> ResourceReport:
    """Registers, spills and stack frame of ``moegemm_kernel`` in a ptxas ``-v`` report."""
    entry = log.rfind("Compiling entry function 'moegemm_kernel'")
    log = log[entry:] if entry >= 0 else log
    regs = re.findall(r"Used (\d+) registers", log)
    frame = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not frame:
        raise CompileError(f"no ptxas resource report in the compiler's output:\n{log}")
    stack, stores, loads = (int(x) for x in frame[0])
    return ResourceReport(int(regs[0]), stores, loads, stack)


# Written into every cache directory moegemm creates; `cache clear` touches no directory without it.
CACHE_MARKER = ".moegemm-cache"
# The subdirectories moegemm writes: compiled kernels and the host launch helper.
CACHE_SUBDIRS = ("kernels", "host")


def cache_dir() -> Path:
    return Path(os.path.expanduser(env.get("MOEGEMM_CACHE_DIR")))


def cache_subdir(name: str) -> Path:
    """``<cache>/<name>`` (one of CACHE_SUBDIRS), created with the cache's marker file if need be."""
    root = cache_dir()
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    marker = root / CACHE_MARKER
    if not marker.exists():
        _write_atomic(marker, b"moegemm's kernel cache: `python -m moegemm cache clear` removes what moegemm "
                              b"wrote here (kernels/, host/ and this file).\n")
    return path


def use_nvrtc() -> bool:
    return env.flag("MOEGEMM_USE_NVRTC")


def _wheel_tools(tool: str) -> list[Path]:
    """``tool`` as shipped by NVIDIA's PyPI wheels (nvidia/cu13/bin, nvidia/cuda_nvcc/bin, ...)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [path for root in spec.submodule_search_locations for path in sorted(Path(root).glob(f"*/bin/{tool}"))]


@functools.cache
def _find_nvcc_cached(override: str, cuda_home: str, path: str) -> str:
    if override:
        if not (Path(override).is_file() and os.access(override, os.X_OK)):
            raise CompileError(f"MOEGEMM_NVCC: expected an executable nvcc, got {override!r}")
        return override
    candidates = []
    if cuda_home:
        candidates.append(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc", path=path)
    if found:
        candidates.append(Path(found))
    candidates.extend(_wheel_tools("nvcc"))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise CompileError(
        "no nvcc found: set MOEGEMM_NVCC or CUDA_HOME, put nvcc on PATH, `pip install nvidia-cuda-nvcc`, "
        "or set MOEGEMM_USE_NVRTC=1"
    )


def find_nvcc() -> Path:
    """The nvcc that compiles kernels: MOEGEMM_NVCC, CUDA_HOME, PATH, then the nvidia-cuda-nvcc wheel."""
    return Path(_find_nvcc_cached(env.get("MOEGEMM_NVCC"), os.environ.get("CUDA_HOME", ""),
                                  os.environ.get("PATH", "")))


def find_cuobjdump() -> Path | None:
    """cuobjdump beside nvcc, on PATH, or from the nvidia-cuda-cuobjdump wheel."""
    candidates = []
    with contextlib.suppress(CompileError):
        candidates.append(find_nvcc().parent / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    candidates.extend(_wheel_tools("cuobjdump"))
    return next((c for c in candidates if c.is_file()), None)


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def _nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    _check_nvrtc(err, "nvrtcVersion")
    return f"nvrtc {major}.{minor}"


def compiler_version() -> str:
    return _nvrtc_version() if use_nvrtc() else f"{find_nvcc()}: {_nvcc_version(str(find_nvcc()))}"


@functools.lru_cache(maxsize=1)
def _headers_digest() -> str:
    """One digest over every header a kernel can include (ours; all of them, a superset of the
    transitive includes of any one stub, so no include graph needs parsing)."""
    digest = hashlib.sha256()
    for root in (INCLUDE_DIR, KERNEL_DIR):
        for path in sorted(root.rglob("*.cuh")):
            digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _flags() -> list[str]:
    flags = list(_NVRTC_FLAGS if use_nvrtc() else _NVCC_FLAGS)
    flags.append(f"-I{INCLUDE_DIR}")
    flags.append(f"-I{KERNEL_DIR}")
    if env.flag("MOEGEMM_JIT_DEBUG"):
        flags.append("-lineinfo")
    flags.extend(env.get("MOEGEMM_NVCC_FLAGS").split())
    return flags


def kernel_stub(header: str, config: str, params: str, entry: str, checks: tuple[str, ...] = (),
                min_blocks: str = "1", nvcc_checks: tuple[str, ...] = ()) -> str:
    """The generated source of one kernel: include the family's header, instantiate its config
    template (``config``, a C++ type) as ``Config``, assert what the host assumed about it, and
    define the ``moegemm_kernel`` entry point that calls ``entry<Config>`` with the ``params`` struct.
    ``nvcc_checks`` need what NVRTC lacks (``__builtin_offsetof``): nvcc builds of the stub check them."""
    lines = [f'#include "{header}"', f"using Config = {config};"]
    lines += [f"static_assert({check});" for check in checks]
    if nvcc_checks:
        lines += ["#ifndef __CUDACC_RTC__", *(f"static_assert({check});" for check in nvcc_checks), "#endif"]
    lines += [
        f'extern "C" __global__ void __launch_bounds__(Config::kNumThreads, {min_blocks})',
        f"moegemm_kernel(const __grid_constant__ {params} params) {{",
        f"    {entry}<Config>(params);",
        "}",
    ]
    return "\n".join(lines) + "\n"


def cache_key(source: str) -> str:
    from .._version import __version__

    digest = hashlib.sha256()
    for part in (source, _headers_digest(), " ".join(_flags()), compiler_version(), ARCH, __version__):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _is_valid(build: Build) -> bool:
    digest_path = build.directory / "kernel.sha256"
    try:
        expected = digest_path.read_text().strip()
        return hashlib.sha256(build.cubin_path.read_bytes()).hexdigest() == expected
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _debug(message: str) -> None:
    if env.flag("MOEGEMM_JIT_DEBUG"):
        print(f"[moegemm.jit] {message}", file=sys.stderr)


def build(name: str, source: str) -> Build:
    """Compile ``source`` (a stub defining ``extern "C" __global__ moegemm_kernel``) unless the cache
    has it; returns the cache entry. Safe against concurrent processes building the same source."""
    key = cache_key(source)
    entry = Build(name, cache_subdir("kernels") / f"{name}_{key}")
    if _is_valid(entry):
        _debug(f"cache hit {entry.directory}")
        return entry
    _debug(f"compiling {entry.directory}")
    entry.directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(entry.source_path, source.encode())
    cubin, log = _compile_nvrtc(source, entry) if use_nvrtc() else _compile_nvcc(entry)
    _write_atomic(entry.directory / "kernel.log", log.encode())
    _write_atomic(entry.cubin_path, cubin)
    _write_atomic(entry.directory / "kernel.sha256", hashlib.sha256(cubin).hexdigest().encode())
    if env.flag("MOEGEMM_PTXAS_VERBOSE"):
        print(f"[moegemm.jit] {name}: {log.strip()}", file=sys.stderr)
    if env.flag("MOEGEMM_DUMP_SASS"):
        sass_path = entry.directory / "kernel.sass"
        _write_atomic(sass_path, disassemble(entry.cubin_path).encode())
        print(f"[moegemm.jit] SASS of {name}: {sass_path}", file=sys.stderr)
    return entry


def _compile_nvcc(entry: Build) -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory(dir=entry.directory) as tmp:
        out = Path(tmp) / "kernel.cubin"
        cmd = [str(find_nvcc()), *_flags(), str(entry.source_path), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        log = result.stdout + result.stderr
        if result.returncode != 0:
            raise CompileError(f"nvcc failed on {entry.source_path}\ncommand: {' '.join(cmd)}\n{log}")
        return out.read_bytes(), log


def _check_nvrtc(err, what: str) -> None:
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {err!r}")


def _compile_nvrtc(source: str, entry: Build) -> tuple[bytes, str]:
    from cuda.bindings import nvrtc

    err, program = nvrtc.nvrtcCreateProgram(source.encode(), str(entry.source_path).encode(), 0, [], [])
    _check_nvrtc(err, "nvrtcCreateProgram")
    try:
        options = [f.encode() for f in _flags()]
        (compile_err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        err, size = nvrtc.nvrtcGetProgramLogSize(program)
        _check_nvrtc(err, "nvrtcGetProgramLogSize")
        log_buf = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(program, log_buf)
        _check_nvrtc(err, "nvrtcGetProgramLog")
        log = log_buf.decode(errors="replace").rstrip("\0")
        if compile_err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC failed on {entry.source_path}\n{log}")
        err, size = nvrtc.nvrtcGetCUBINSize(program)
        _check_nvrtc(err, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(program, cubin)
        _check_nvrtc(err, "nvrtcGetCUBIN")
        return cubin, log
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def disassemble(cubin_path: Path) -> str:
    """The SASS of a cubin, via cuobjdump."""
    tool = find_cuobjdump()
    if tool is None:
        raise CompileError("cuobjdump not found: `pip install nvidia-cuda-cuobjdump` or add the CUDA "
                           "toolkit's bin directory to PATH")
    result = subprocess.run([str(tool), "-sass", str(cubin_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CompileError(f"cuobjdump failed on {cubin_path}: {result.stderr}")
    return result.stdout


class CacheClearRefused(ValueError):
    """``clear_cache`` was pointed at a directory that is not (only) moegemm's cache."""


def clear_cache(root: str | Path | None = None) -> tuple[list[Path], int]:
    """Delete what moegemm wrote into the cache ``root`` (default: ``cache_dir()``): its
    CACHE_SUBDIRS and marker, then ``root`` itself if nothing else is left in it. Returns the paths
    removed (none when there was no cache) and the bytes freed.

    Raises:
        CacheClearRefused: ``root`` is empty, ``/`` or the home directory, or a directory without the
            marker file moegemm writes when it creates a cache.
    """
    if root is None:
        root = cache_dir()
    if not str(root).strip():
        raise CacheClearRefused("cache directory: expected a path, got an empty string")
    root = Path(os.path.expanduser(str(root)))
    if not root.exists():
        return [], 0
    resolved = root.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise CacheClearRefused(f"cache directory: refusing to clear {root} (the filesystem root or the home "
                                f"directory); point MOEGEMM_CACHE_DIR at moegemm's own cache")
    if not (root / CACHE_MARKER).is_file():
        raise CacheClearRefused(f"cache directory: {root} has no {CACHE_MARKER} marker, so moegemm did not create "
                                f"it; not deleting anything (remove it by hand if it is an old moegemm cache)")
    removed, freed = [], 0
    for name in CACHE_SUBDIRS:
        path = root / name
        if path.exists():
            freed += _tree_size(path)
            # ignore_errors: another process may be adding or replacing entries meanwhile.
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    marker = root / CACHE_MARKER
    freed += marker.stat().st_size
    marker.unlink()
    removed.append(marker)
    with contextlib.suppress(OSError):  # something else lives there too: leave the directory
        root.rmdir()
        removed.append(root)
    return removed, freed


def cache_size() -> int:
    return _tree_size(cache_dir())


def _tree_size(root: Path) -> int:
    # Concurrent builds rename and remove their temporary files while we look: os.walk skips a
    # directory that vanishes mid-walk, and a file may vanish between the listing and its stat.
    total = 0
    for parent, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total
