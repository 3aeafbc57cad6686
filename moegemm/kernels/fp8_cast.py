"""Host side of sm90_fp8_cast.cuh: code generation, the kernel cache, per-shape launch records.

M, K and the row pitch are run-time values; the compiled variants are the (input dtype, UE8M0, per token
or per block, aligned) combinations. One launch writes one buffer: x_fp8 ``[M, K]`` first, then the
float32 scales at a 16-byte aligned offset (the launch helper patches at most two pointers into a
kernel's parameters: x and this buffer). The returned tensors are views of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..intmath import align, ceil_div, get_tma_aligned_size
from ..jit import compiler
from ..jit.runtime import Kernel, KernelFamily, ParamsLayout, PlanCache, Slot

BLOCK = 128
INPUT_BYTES = {torch.bfloat16: 2, torch.float32: 4}
UNROLL = 4  # per token: 1x128 blocks of one row a lane holds (Fp8CastConfig::kUnroll)
# Largest unit (block) count: unit indices, plus one CTA's overrun, stay below 2**31 in the kernel.
MAX_UNITS = 2**31 - 2**16
# Fp8CastParams in sm90_fp8_cast.cuh; a launch passes the addresses of x and of the output buffer.
PARAMS = ParamsLayout("moegemm::Fp8CastParams", (
    Slot("x", "ptr", "x"), Slot("out", "ptr", "out"), Slot("x_pitch", "u64"), Slot("sf_offset", "u64"),
    *(Slot(name, "u32") for name in ("m", "k", "num_k_blocks", "num_units"))), ("x", "out"))


@dataclass(frozen=True)
class Fp8CastConfig:
    input_bytes: int  # 2: bf16, 4: fp32
    ue8m0: bool
    per_block: bool
    aligned: bool  # 16-byte loads: x 16-byte aligned, row pitch and K multiples of chunk_elems

    @property
    def chunk_elems(self) -> int:
        return 16 // self.input_bytes

    @property
    def lanes_per_row(self) -> int:
        return BLOCK // self.chunk_elems

    @property
    def num_threads(self) -> int:
        return 512 if self.per_block else 256

    @property
    def cta_rows(self) -> int:
        """Per token: the rows of the rectangle of 1x128 blocks one CTA quantises (UNROLL blocks wide)."""
        return self.num_threads // 32 * (32 // self.lanes_per_row)

    @property
    def units_per_cta(self) -> int:
        """1x128 blocks (per token) or 128x128 tiles (per block) one CTA quantises."""
        return 1 if self.per_block else self.cta_rows * UNROLL


def generate_source(config: Fp8CastConfig) -> str:
    return compiler.kernel_stub(
        "sm90_fp8_cast.cuh",
        f"moegemm::Fp8CastConfig<{config.input_bytes}, {str(config.ue8m0).lower()}, "
        f"{str(config.per_block).lower()}, {str(config.aligned).lower()}>",
        "moegemm::Fp8CastParams", "moegemm::sm90_fp8_cast",
        (f"Config::kNumThreads == {config.num_threads}",
         f'Config::kUnitsPerCta == {config.units_per_cta}, "host and device disagree on the split"',
         f"Config::kPerBlock || Config::kUnroll == {UNROLL}",
         PARAMS.size_check()),
        min_blocks="Config::kMinBlocks", nvcc_checks=PARAMS.offset_checks())


def kernel_name(config: Fp8CastConfig) -> str:
    kind = "per_block" if config.per_block else "per_token"
    dtype = "bf16" if config.input_bytes == 2 else "f32"
    return (f"sm90_fp8_cast_{kind}_{dtype}{'_ue8m0' if config.ue8m0 else ''}"
            f"{'' if config.aligned else '_unaligned'}")


def all_configs() -> list[Fp8CastConfig]:
    """Every variant the launcher can pick."""
    return [Fp8CastConfig(b, u, p, a) for b in (2, 4) for u in (False, True) for p in (False, True)
            for a in (True, False)]


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=0, layout=PARAMS))
build = KERNELS.build


@dataclass(frozen=True)
class Geometry:
    """Everything about a launch that depends only on the shape: grid, scalar parameters and the
    output buffer's layout (x_fp8 at byte 0, sf at ``sf_offset``)."""

    m: int
    k: int
    sf_shape: tuple[int, int]
    sf_strides: tuple[int, int]  # per token: M-major, columns 16-byte aligned; per block: row-major
    sf_offset: int
    buffer_bytes: int
    grid: int
    values: dict[str, int]  # of PARAMS' u32 and u64 slots


def geometry(config: Fp8CastConfig, m: int, k: int, x_pitch: int) -> Geometry:
    num_k_blocks = ceil_div(k, BLOCK)
    sf_rows = ceil_div(m, BLOCK) if config.per_block else m
    num_units = sf_rows * num_k_blocks
    if m >= 2**31 or k >= 2**31 or num_units > MAX_UNITS:
        raise ValueError(f"x of shape ({m}, {k}) is too large for the FP8 cast kernel")
    sf_offset = align(m * k, 16)
    grid = num_units if config.per_block else ceil_div(m, config.cta_rows) * ceil_div(num_k_blocks, UNROLL)
    values = dict(x_pitch=x_pitch, sf_offset=sf_offset, m=m, k=k, num_k_blocks=num_k_blocks, num_units=num_units)
    sf_strides = (num_k_blocks, 1) if config.per_block else (1, get_tma_aligned_size(m, 4))
    sf_bytes = 4 * (num_units if config.per_block else num_k_blocks * get_tma_aligned_size(m, 4))
    return Geometry(m, k, (sf_rows, num_k_blocks), sf_strides, sf_offset, sf_offset + sf_bytes, grid, values)


def is_aligned(x: torch.Tensor) -> bool:
    """Whether the 16-byte vector path can read ``x`` (2-D, bf16 or fp32, unit inner stride)."""
    chunk = 16 // x.element_size()
    pitch_ok = x.shape[0] <= 1 or x.stride(0) % chunk == 0
    return x.data_ptr() % 16 == 0 and pitch_ok and x.shape[1] % chunk == 0


@dataclass(frozen=True)
class Plan:
    """A cast of one input signature: the kernel, its launch record and the output layout."""

    config: Fp8CastConfig
    geometry: Geometry
    kernel: Kernel | None  # None: an empty input, nothing to launch
    record: bytes

    def run(self, x: torch.Tensor, buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cast ``x`` (of the planned signature). ``buffer``: optional uint8 tensor of
        ``geometry.buffer_bytes`` contiguous, 16-byte aligned bytes to write into (tests poison it);
        by default a new one. Returns views of it: ``(x_fp8 [M, K], sf)``."""
        g = self.geometry
        if buffer is None:
            buffer = torch.empty(g.buffer_bytes, dtype=torch.uint8, device=x.device)
        elif (buffer.dtype != torch.uint8 or buffer.numel() != g.buffer_bytes or not buffer.is_contiguous()
              or buffer.data_ptr() % 16 or buffer.device != x.device):
            raise ValueError(f"buffer: expected {g.buffer_bytes} contiguous, 16-byte aligned uint8 bytes on "
                             f"{x.device}")
        if self.kernel is not None:
            device = x.get_device()
            if device != torch.cuda.current_device():
                with torch.cuda.device(device):
                    self.kernel.launch(self.record, device, x.data_ptr(), buffer.data_ptr())
            else:
                self.kernel.launch(self.record, device, x.data_ptr(), buffer.data_ptr())
        x_fp8 = buffer[:g.m * g.k].view(torch.float8_e4m3fn).view(g.m, g.k)
        sf = buffer[g.sf_offset:].view(torch.float32).as_strided(g.sf_shape, g.sf_strides)
        return x_fp8, sf


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in INPUT_BYTES or not x.is_cuda:
        raise ValueError(f"x: expected a 2-D bf16 or fp32 CUDA tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x: expected a unit inner stride, got strides {tuple(x.stride())}")


def plan(x: torch.Tensor, use_ue8m0: bool, per_block: bool) -> Plan:
    """The plan of casting ``x`` (checked: 2-D bf16/fp32 CUDA tensor, unit inner stride)."""
    _check(x)
    m, k = x.shape
    config = Fp8CastConfig(x.element_size(), bool(use_ue8m0), bool(per_block), is_aligned(x))
    g = geometry(config, m, k, x.stride(0))
    if g.values["num_units"] == 0:  # M or K is 0
        return Plan(config, g, None, b"")
    kernel = KERNELS.kernel(config)
    return Plan(config, g, kernel, kernel.record(g.grid, {}, g.values))


_plans = PlanCache()


def _cast(x: torch.Tensor, use_ue8m0: bool, per_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        key = (per_block, bool(use_ue8m0), x.dtype, x.shape, x.stride(), x.device, x.data_ptr() % 16 == 0)
    except AttributeError:  # not a tensor: let the checks name it
        _check(x)
        raise
    return _plans.get(key, lambda: plan(x, use_ue8m0, per_block)).run(x)


def per_token_cast(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``moegemm.per_token_cast_to_fp8`` on the GPU, bit for bit: ``x`` [M, K] bf16/fp32 CUDA tensor with
    unit inner stride (any row pitch) -> ``(x_fp8 [M, K] e4m3 contiguous, sf [M, ceil(K/128)] float32
    M-major with 16-byte aligned columns)``."""
    return _cast(x, use_ue8m0, False)


def per_block_cast(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``moegemm.per_block_cast_to_fp8`` on the GPU, bit for bit: ``x`` [M, K] bf16/fp32 CUDA tensor with
    unit inner stride -> ``(x_fp8 [M, K] e4m3, sf [ceil(M/128), ceil(K/128)] float32)``, both contiguous."""
    return _cast(x, use_ue8m0, True)


__all__ = ["Fp8CastConfig", "Geometry", "Plan", "all_configs", "build", "generate_source", "geometry", "kernel_name",
           "per_block_cast", "per_token_cast", "plan"]
