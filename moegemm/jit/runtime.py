"""Load compiled kernels through the CUDA driver API and launch them on torch's current stream.

Every kernel takes one ``__grid_constant__`` parameter struct whose first members are its TMA
descriptors. A launch packs one record (grid, block, cluster, stream, the TMA descriptors' tensor
geometry and the scalar parameters) with a precompiled ``struct.Struct`` and hands it to the C
helper in ``launch.c``, which encodes the descriptors and calls ``cuLaunchKernelEx``: one ctypes call
per launch. Loading (``cuLibraryLoadData``) and attribute setup happen once per process and device.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import env
from .compiler import Build, CompileError, cache_subdir
from .compiler import build as compile_source

_HEADER = "Q9I5I4I"
_TMA_SPEC = "3Q3Q3I4I4x"
_MAX_POINTERS = 8  # MG_MAX_POINTERS in launch.c
TMA_DESCRIPTOR_BYTES = 128
MAX_PARAM_BYTES = 4096
MAX_PARAM_POINTERS = 4  # MG_MAX_PARAM_POINTERS in launch.c

# CUtensorMapDataType and CUtensorMapSwizzle values (checked against cuda.h in the tests).
TMA_DTYPES = {torch.uint8: 0, torch.float8_e4m3fn: 0, torch.int32: 3, torch.float32: 7, torch.bfloat16: 9}
SWIZZLE_NONE, SWIZZLE_32B, SWIZZLE_64B, SWIZZLE_128B = 0, 1, 2, 3


class LaunchError(RuntimeError):
    """The driver refused a launch or a load."""


def _host_compiler() -> str:
    for name in (env.get("MOEGEMM_HOST_CC"), os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise CompileError("no C compiler found for moegemm's launch helper: set MOEGEMM_HOST_CC or install gcc")


@functools.lru_cache(maxsize=1)
def host_library() -> ctypes.CDLL:
    """The launch helper, compiled once per source version into the cache and loaded."""
    source = Path(__file__).with_name("launch.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    path = cache_subdir("host") / f"launch_{digest}.so"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp.so")
        cmd = [_host_compiler(), "-O2", "-shared", "-fPIC", str(source), "-o", str(tmp), "-ldl"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CompileError(f"compiling {source} failed\ncommand: {' '.join(cmd)}\n{result.stderr}")
        os.replace(tmp, path)
    lib = ctypes.CDLL(str(path))
    lib.mg_launch.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int))
    lib.mg_launch.restype = ctypes.c_int
    if lib.mg_init() != 0:
        raise LaunchError("could not open the CUDA driver (libcuda.so.1) or find cuLaunchKernelEx in it")
    return lib


def _driver_call(result, what: str):
    """Unwrap a cuda-bindings driver call, raising LaunchError with the driver's error name."""
    from cuda.bindings import driver

    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise LaunchError(f"{what} failed: {_error_name(int(err))}")
    return values[0] if len(values) == 1 else values


def _error_name(code: int) -> str:
    from cuda.bindings import driver

    try:
        return f"{driver.CUresult(code).name} ({code})"
    except ValueError:
        return f"CUresult {code}"


def tma_2d(dtype: torch.dtype, inner: int, outer: int, pitch: int, box_inner: int, box_outer: int, swizzle: int,
           offset: int) -> tuple:
    """Geometry of a 2-D TMA descriptor ([outer, inner] elements, ``pitch`` bytes between rows), to be
    encoded at byte ``offset`` of the parameter struct. Its address is passed at launch."""
    return (inner, outer, 1, pitch, 0, 0, box_inner, box_outer, 1, 2, TMA_DTYPES[dtype], swizzle, offset)


class Kernel:
    """One compiled kernel, ``extern "C" __global__ void moegemm_kernel(const __grid_constant__ P)``.

    P starts with ``num_tma`` TMA descriptors; ``params_format`` is the ``struct`` format of the
    members after them, in declaration order, with P's natural alignment written out as padding.
    """

    def __init__(self, build: Build, *, num_threads: int, smem_bytes: int, num_tma: int, params_format: str,
                 cluster: int = 1):
        self.build = build
        self.num_threads = num_threads
        self.smem_bytes = smem_bytes
        self.cluster = cluster
        self.num_tma = num_tma
        self.params_format = params_format
        self.params_bytes = num_tma * TMA_DESCRIPTOR_BYTES + struct.calcsize("<" + params_format)
        if self.params_bytes > MAX_PARAM_BYTES:
            raise ValueError(f"kernel parameters of {self.params_bytes} bytes exceed {MAX_PARAM_BYTES}")
        self._library = None  # the CUlibrary: kept referenced so the driver does not unload it
        self._kernel = None  # its CUkernel, loaded on first use
        self._ready_devices: set[int] = set()
        self._failed = ctypes.c_int(-1)

    def record(self, grid: int, tma: Sequence[tuple], params: Sequence, num_pointer_params: int = 0,
               pdl: bool = False) -> bytes:
        """The launch record of one problem shape. ``tma``: ``num_tma`` ``tma_2d`` tuples. ``params``:
        the members after the descriptors; the first ``num_pointer_params`` are device pointers
        (``params_format`` "Q"), given as 0 here and filled in by ``launch``."""
        if len(tma) != self.num_tma:
            raise ValueError(f"expected {self.num_tma} TMA descriptors, got {len(tma)}")
        if not self.params_format.startswith("Q" * num_pointer_params):
            raise ValueError(f"pointer parameters must lead params_format, got {self.params_format!r}")
        if num_pointer_params > MAX_PARAM_POINTERS:
            raise ValueError(f"at most {MAX_PARAM_POINTERS} pointer parameters, got {num_pointer_params}")
        self._load_library()
        base = self.num_tma * TMA_DESCRIPTOR_BYTES
        offsets = [base + 8 * i for i in range(num_pointer_params)] + [0] * (MAX_PARAM_POINTERS - num_pointer_params)
        layout = struct.Struct("<" + _HEADER + _TMA_SPEC * self.num_tma + f"{base}x" + self.params_format)
        return layout.pack(int(self._kernel), grid, 1, 1, self.num_threads, 1, 1, self.cluster, 1, 1, self.smem_bytes,
                           int(pdl), self.num_tma, self.params_bytes, num_pointer_params, *offsets,
                           *(field for spec in tma for field in spec), *params)

    def _load_library(self) -> None:
        from cuda.bindings import driver

        if self._kernel is not None:
            return
        _driver_call(driver.cuInit(0), "cuInit")
        self._library = _driver_call(
            driver.cuLibraryLoadData(self.build.cubin_path.read_bytes(), None, None, 0, None, None, 0),
            f"cuLibraryLoadData({self.build.cubin_path})")
        self._kernel = _driver_call(driver.cuLibraryGetKernel(self._library, b"moegemm_kernel"),
                                    "cuLibraryGetKernel")

    def _setup_device(self, device: int) -> None:
        from cuda.bindings import driver

        self._mg_launch = host_library().mg_launch
        cu_device = _driver_call(driver.cuDeviceGet(device), "cuDeviceGet")
        attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _driver_call(driver.cuKernelSetAttribute(attribute, self.smem_bytes, self._kernel, cu_device),
                     f"setting {self.smem_bytes} bytes of dynamic shared memory")
        self._ready_devices.add(device)

    def max_active_clusters(self, device: int) -> int:
        """How many clusters of this kernel fit on ``device`` at once. Not always SMs / cluster size:
        a cluster must fit in one GPC, so a persistent grid sized by SMs alone could leave some
        clusters waiting for a second wave."""
        from cuda.bindings import driver

        self._load_library()
        if device not in self._ready_devices:
            self._setup_device(device)
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = self.cluster, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = self.num_threads, 1, 1
        config.sharedMemBytes = self.smem_bytes
        attribute = driver.CUlaunchAttribute()
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attribute.value.clusterDim.x, attribute.value.clusterDim.y, attribute.value.clusterDim.z = self.cluster, 1, 1
        config.attrs = [attribute]
        config.numAttrs = 1
        with torch.cuda.device(device):
            return _driver_call(driver.cuOccupancyMaxActiveClusters(driver.CUfunction(int(self._kernel)), config),
                                "cuOccupancyMaxActiveClusters")

    def launch(self, record: bytes, device: int, *pointers: int) -> None:
        """Launch ``record`` on ``device``'s current torch stream. ``pointers``: the TMA descriptors'
        global addresses in order, then the pointer parameters."""
        if device not in self._ready_devices:
            self._setup_device(device)
        err = self._mg_launch(record, _DYNAMIC[len(pointers)](current_stream(device), *pointers), self._failed)
        if err:
            which = f" (TMA descriptor {self._failed.value})" if self._failed.value >= 0 else ""
            self._failed.value = -1
            raise LaunchError(f"launching {self.build.name} failed{which}: {_error_name(err)}")


# struct.pack of (stream, pointers...) zero-padded to the C side's eight pointers, by pointer count.
_DYNAMIC = [struct.Struct(f"<{1 + n}Q{8 * (_MAX_POINTERS - n)}x").pack for n in range(_MAX_POINTERS + 1)]


if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    def current_stream(device: int) -> int:
        return torch._C._cuda_getCurrentRawStream(device)
else:  # pragma: no cover - older torch
    def current_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream


class KernelFamily:
    """The compiled kernels of one family, by config: built (disk cache) and wrapped in a ``Kernel``
    on first use, then kept for the process. ``kernel_args(config)`` gives ``Kernel``'s keyword
    arguments other than the build."""

    def __init__(self, name: Callable[[Any], str], source: Callable[[Any], str],
                 kernel_args: Callable[[Any], dict[str, Any]]):
        self._name, self._source, self._kernel_args = name, source, kernel_args
        self._kernels: dict[Any, Kernel] = {}

    def build(self, config: Any) -> Build:
        return compile_source(self._name(config), self._source(config))

    def kernel(self, config: Any) -> Kernel:
        kernel = self._kernels.get(config)
        if kernel is None:
            kernel = Kernel(self.build(config), **self._kernel_args(config))
            self._kernels[config] = kernel
        return kernel


class PlanCache:
    """Launch plans by call signature. ``lookup`` returns ``MISSING`` for a signature not seen yet;
    the caller checks the arguments, makes the plan and ``store``s it. Cleared when full, so a
    stream of distinct shapes cannot grow it without bound."""

    MISSING = object()

    def __init__(self, max_size: int = 4096):
        self._plans: dict[tuple, Any] = {}
        self._max_size = max_size

    def lookup(self, key: tuple) -> Any:
        return self._plans.get(key, self.MISSING)

    def store(self, key: tuple, plan: Any) -> Any:
        if len(self._plans) >= self._max_size:
            self._plans.clear()
        self._plans[key] = plan
        return plan
