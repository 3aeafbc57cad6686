"""Shared test setup: GPU detection, seeds, tool detection (nvcc, a C compiler, cuobjdump, cuda.h),
a private kernel cache per test, and running Python on this checkout."""

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moegemm import device
from moegemm.device import DeviceFacts
from moegemm.jit import compiler, runtime
from moegemm.jit.compiler import CompileError


@functools.lru_cache(maxsize=1)
def has_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    if has_sm90():
        return
    skip = pytest.mark.skip(reason="needs an SM90 GPU (H100/H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test run, printed on failure, so every run draws new inputs."""
    import random

    value = random.randrange(2**31)
    torch.manual_seed(value)
    return value


REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run ``python -c code`` on this checkout, with this process's environment (and its cache)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    popen.setdefault("capture_output", True)
    popen.setdefault("cwd", REPO)
    return subprocess.run([sys.executable, "-c", code, *args], text=True, env=env, timeout=timeout, **popen)


# Variables that change what a compile produces or prints; tests start without them.
COMPILE_VARIABLES = ("MOEGEMM_NVCC_FLAGS", "MOEGEMM_USE_NVRTC", "MOEGEMM_JIT_DEBUG", "MOEGEMM_PTXAS_VERBOSE",
                     "MOEGEMM_DUMP_SASS")


def missing_nvcc() -> str | None:
    try:
        compiler.find_nvcc()
    except CompileError as error:
        return f"nvcc not found: {error}"
    return None


def missing_host_cc() -> str | None:
    try:
        runtime._host_compiler()
    except CompileError as error:
        return str(error)
    return None


def cuda_include() -> Path | None:
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


needs_nvcc = pytest.mark.skipif(missing_nvcc() is not None, reason=str(missing_nvcc()))


def missing_sass_tools() -> str | None:
    if missing_nvcc():
        return missing_nvcc()
    if compiler.find_cuobjdump() is None:
        return "cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    return None


needs_sass_tools = pytest.mark.skipif(missing_sass_tools() is not None, reason=str(missing_sass_tools()))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty kernel cache of this test's own; compiler.py reads the variable on every call."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MOEGEMM_CACHE_DIR", str(root))
    for name in COMPILE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return root


# The H100 SXM the time model was first fitted on: the heuristic tests' GPU (clusters resident at once
# from cuOccupancyMaxActiveClusters, BENCHMARKS.md, 2026-11-25 second session).
H100 = DeviceFacts(num_sms=132, smem_per_block=232448, resident_clusters=(132, 66, 39, 30, 22, 17, 15, 15))


def gpu_facts(num_sms: int | None = None) -> DeviceFacts:
    """The current GPU's facts, with at most ``num_sms`` SMs."""
    facts = device.device_facts(torch.cuda.current_device())
    return dataclasses.replace(facts, num_sms=num_sms) if num_sms else facts
