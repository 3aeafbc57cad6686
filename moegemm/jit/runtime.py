"""Load compiled kernels through the CUDA driver API and launch them on torch's current stream.

Every kernel takes one ``__grid_constant__`` parameter struct, described member by member by a
``ParamsLayout`` (TMA descriptors, device pointers, scalars; the generated stub asserts the layout
against the C++ struct). A plan packs one launch record per problem shape (grid, block, cluster, the
TMA descriptors' tensor geometry, the scalars); each launch hands it with the stream and the
operands' addresses to the C helper in ``launch.c``, which encodes the descriptors and calls
``cuLaunchKernelEx``: one ctypes call per launch. Loading (``cuLibraryLoadData``) and attribute setup
happen once per process and device.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import env
from .compiler import Build, CompileError, cache_subdir
from .compiler import build as compile_source

_HEADER = "Q9I5I6I6I"
_TMA_SPEC = "3Q3Q3I5I"
MAX_POINTERS = 12  # MG_MAX_POINTERS in launch.c: operands a launch passes
TMA_DESCRIPTOR_BYTES = 128
MAX_PARAM_BYTES = 4096
MAX_PARAM_POINTERS = 6  # MG_MAX_PARAM_POINTERS in launch.c

# CUtensorMapDataType and CUtensorMapSwizzle values (checked against cuda.h in the tests).
TMA_DTYPES = {torch.uint8: 0, torch.int8: 0, torch.float8_e4m3fn: 0, torch.int32: 3, torch.float32: 7,
              torch.bfloat16: 9}
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


def tma_2d(dtype: torch.dtype, inner: int, outer: int, pitch: int, box_inner: int, box_outer: int,
           swizzle: int) -> tuple:
    """Geometry of a 2-D TMA descriptor ([outer, inner] elements, ``pitch`` bytes between rows): the
    fields of launch.c's mg_tma_spec up to the slot's offset and operand, which the layout adds."""
    return (inner, outer, 1, pitch, 0, 0, box_inner, box_outer, 1, 2, TMA_DTYPES[dtype], swizzle)


def tma_3d(dtype: torch.dtype, dims: tuple[int, int, int], pitches: tuple[int, int], box: tuple[int, int, int],
           swizzle: int) -> tuple:
    """Geometry of a 3-D TMA descriptor: ``dims`` innermost first, ``pitches`` the bytes between
    consecutive indices of dims 1 and 2."""
    return (*dims, *pitches, 0, *box, 3, TMA_DTYPES[dtype], swizzle)


@dataclass(frozen=True)
class Slot:
    """One member of a kernel's parameter struct, in declaration order. ``kind``: "tma" (a 128-byte
    CUtensorMap, encoded at launch), "ptr" (a device pointer, filled in at launch), "u64" or "u32" (a
    value of the launch record). "tma" and "ptr" slots name the launch ``operand`` whose address they
    take."""

    name: str
    kind: str
    operand: str | None = None


_SLOT_FORMATS = {"tma": (f"{TMA_DESCRIPTOR_BYTES}x", 64), "ptr": ("Q", 8), "u64": ("Q", 8), "u32": ("I", 4)}


class ParamsLayout:
    """A kernel's ``__grid_constant__`` parameter struct, member by member, with C's alignment rules:
    the launch record is packed from named values, and the generated stub asserts ``sizeof`` and
    every ``offsetof`` against the C++ struct, so host and device cannot drift apart. ``operands``:
    what a launch passes, in order (data pointers); each "tma" and "ptr" slot takes one of them."""

    def __init__(self, cpp_type: str, slots: Sequence[Slot], operands: Sequence[str]):
        self.cpp_type, self.slots, self.operands = cpp_type, tuple(slots), tuple(operands)
        if len(self.operands) > MAX_POINTERS:
            raise ValueError(f"at most {MAX_POINTERS} launch operands, got {self.operands}")
        fmt, offset, self.offsets = "<", 0, {}
        for slot in self.slots:
            code, alignment = _SLOT_FORMATS[slot.kind]
            if (slot.kind in ("tma", "ptr")) != (slot.operand in self.operands):
                raise ValueError(f"slot {slot.name}: a tma or ptr slot takes one of {self.operands}")
            pad = -offset % alignment
            fmt += f"{pad}x{code}" if pad else code
            self.offsets[slot.name] = offset + pad
            offset += pad + struct.calcsize("<" + code)
        alignment = max((_SLOT_FORMATS[slot.kind][1] for slot in self.slots), default=1)
        fmt += f"{-offset % alignment}x"
        self._struct = struct.Struct(fmt)
        self.size = self._struct.size
        if self.size > MAX_PARAM_BYTES:
            raise ValueError(f"kernel parameters of {self.size} bytes exceed {MAX_PARAM_BYTES}")
        self.tma = tuple(slot for slot in self.slots if slot.kind == "tma")
        self.pointers = tuple(slot for slot in self.slots if slot.kind == "ptr")
        if len(self.pointers) > MAX_PARAM_POINTERS:
            raise ValueError(f"at most {MAX_PARAM_POINTERS} pointer members, got {len(self.pointers)}")

    def size_check(self) -> str:
        """A C++ check of the struct's size, for the generated stub."""
        return f'sizeof({self.cpp_type}) == {self.size}, "host and device disagree on the parameters"'

    def offset_checks(self) -> tuple[str, ...]:
        """C++ checks of each member's offset (``__builtin_offsetof``: nvcc only), for the stub."""
        return tuple(f"__builtin_offsetof({self.cpp_type}, {slot.name}) == {self.offsets[slot.name]}"
                     for slot in self.slots)

    def pack(self, values: dict[str, int]) -> bytes:
        """The parameter block: ``values`` for the "u32" and "u64" slots, zeros for the rest."""
        expected = {slot.name for slot in self.slots if slot.kind in ("u32", "u64")}
        if set(values) != expected:
            raise ValueError(f"parameter values: expected {sorted(expected)}, got {sorted(values)}")
        return self._struct.pack(*(0 if slot.kind == "ptr" else values[slot.name]
                                   for slot in self.slots if slot.kind != "tma"))


class Kernel:
    """One compiled kernel, ``extern "C" __global__ void moegemm_kernel(const __grid_constant__ P)``,
    P described by ``layout``."""

    def __init__(self, build: Build, *, num_threads: int, smem_bytes: int, layout: ParamsLayout, cluster: int = 1):
        self.build = build
        self.num_threads = num_threads
        self.smem_bytes = smem_bytes
        self.cluster = cluster
        self.layout = layout
        self._library = None  # the CUlibrary: kept referenced so the driver does not unload it
        self._kernel = None  # its CUkernel, loaded on first use
        self._ready_devices: set[int] = set()
        self._failed = ctypes.c_int(-1)

    def record(self, grid: int, tma: dict[str, tuple], values: dict[str, int], pdl: bool = False,
               cooperative: bool = False) -> bytes:
        """The launch record of one problem shape: the grid, a ``tma_2d`` geometry for each "tma" slot
        and the values of the "u32" / "u64" slots, by name. The operands' addresses come with each
        launch. ``cooperative``: every CTA must be resident at once (the launch fails otherwise), for
        kernels whose CTAs wait on each other."""
        layout = self.layout
        if set(tma) != {slot.name for slot in layout.tma}:
            raise ValueError(f"TMA descriptors: expected {[slot.name for slot in layout.tma]}, got {sorted(tma)}")
        self._load_library()
        flags = int(pdl) | 2 * int(cooperative)  # launch.c's MG_FLAG_PDL, MG_FLAG_COOPERATIVE
        operand = layout.operands.index
        pointers = [(layout.offsets[slot.name], operand(slot.operand)) for slot in layout.pointers]
        pointers += [(0, 0)] * (MAX_PARAM_POINTERS - len(pointers))
        specs = [field for slot in layout.tma
                 for field in (*tma[slot.name], layout.offsets[slot.name], operand(slot.operand))]
        head = struct.pack("<" + _HEADER + _TMA_SPEC * len(layout.tma), int(self._kernel), grid, 1, 1,
                           self.num_threads, 1, 1, self.cluster, 1, 1, self.smem_bytes, flags, len(layout.tma),
                           layout.size, len(layout.pointers), *(offset for offset, _ in pointers),
                           *(index for _, index in pointers), *specs)
        return head + layout.pack(values)

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

    def max_active_clusters(self, device: int, cluster: int | None = None) -> int:
        """How many clusters of this kernel (of ``cluster`` CTAs, default its own) fit on ``device`` at
        once. Not always SMs / cluster size: a cluster must fit in one GPC."""
        from cuda.bindings import driver

        self._load_library()
        if device not in self._ready_devices:
            self._setup_device(device)
        cluster = cluster or self.cluster
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = cluster, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = self.num_threads, 1, 1
        config.sharedMemBytes = self.smem_bytes
        attribute = driver.CUlaunchAttribute()
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attribute.value.clusterDim.x, attribute.value.clusterDim.y, attribute.value.clusterDim.z = cluster, 1, 1
        config.attrs = [attribute]
        config.numAttrs = 1
        # The query needs a current context: the device's primary one (torch's), which may not exist yet.
        cu_device = _driver_call(driver.cuDeviceGet(device), "cuDeviceGet")
        context = _driver_call(driver.cuDevicePrimaryCtxRetain(cu_device), "cuDevicePrimaryCtxRetain")
        _driver_call(driver.cuCtxPushCurrent(context), "cuCtxPushCurrent")
        try:
            return _driver_call(driver.cuOccupancyMaxActiveClusters(driver.CUfunction(int(self._kernel)), config),
                                "cuOccupancyMaxActiveClusters")
        finally:
            driver.cuCtxPopCurrent()
            driver.cuDevicePrimaryCtxRelease(cu_device)

    def launch(self, record: bytes, device: int, *operands: int) -> None:
        """Launch ``record`` on ``device``'s current torch stream. ``operands``: the data pointers of
        ``layout.operands``, in that order."""
        if device not in self._ready_devices:
            self._setup_device(device)
        err = self._mg_launch(record, _DYNAMIC[len(operands)](current_stream(device), *operands), self._failed)
        if err:
            which = f" (TMA descriptor {self._failed.value})" if self._failed.value >= 0 else ""
            self._failed.value = -1
            raise LaunchError(f"launching {self.build.name} failed{which}: {_error_name(err)}")


# struct.pack of (stream, operands...) zero-padded to the C side's MAX_POINTERS, by operand count.
_DYNAMIC = [struct.Struct(f"<{1 + n}Q{8 * (MAX_POINTERS - n)}x").pack for n in range(MAX_POINTERS + 1)]


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


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about a call that depends only on shapes and strides, made once per signature: the
    config, its kernel and the launch record (grid, TMA geometry, scalars)."""

    config: Any
    kernel: Kernel
    record: bytes

    def launch_pointers(self, device: int, *pointers: int) -> None:
        """Launch on ``device`` given the data pointers of the family's operands, in order (the ops'
        hot path)."""
        self.kernel.launch(self.record, device, *pointers)


class PlanCache:
    """Launch plans by call signature. ``lookup`` returns ``MISSING`` for a signature not seen yet;
    the caller checks the arguments, makes the plan and ``store``s it (``get`` does both with a
    maker). Cleared when full, so a stream of distinct shapes cannot grow it without bound."""

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

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The plan stored for ``key``, made by ``make()`` and stored the first time."""
        plan = self._plans.get(key, self.MISSING)
        return self.store(key, make()) if plan is self.MISSING else plan


_PROBE = 'extern "C" __global__ void moegemm_kernel() {}\n'


def max_active_clusters_per_size(device: int, smem_bytes: int, max_size: int) -> tuple[int, ...]:
    """Clusters of 1 .. ``max_size`` CTAs of one CTA per SM (``smem_bytes`` of shared memory each)
    that fit on ``device`` at once, asked of the driver with an empty probe kernel."""
    probe = Kernel(compile_source("occupancy_probe", _PROBE), num_threads=128, smem_bytes=smem_bytes,
                   layout=ParamsLayout("", (), ()))
    return tuple(probe.max_active_clusters(device, size) for size in range(1, max_size + 1))
