"""Host side of sm90_fp8_transpose.cuh: one compiled kernel, per-shape launch records.

R, C, G and x's pitches are run-time values, so one kernel serves every shape; the launch passes the
addresses of x and of the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..intmath import ceil_div
from ..jit import compiler
from ..jit.runtime import Kernel, KernelFamily, ParamsLayout, PlanCache, Slot

TILE = 128  # Fp8TransposeConfig::kTile: a CTA moves a 128 x 128-byte tile
NUM_THREADS = 256
PARAMS = ParamsLayout("moegemm::Fp8TransposeParams", (
    Slot("x", "ptr", "x"), Slot("out", "ptr", "out"), Slot("x_pitch", "u64"), Slot("x_batch", "u64"),
    *(Slot(name, "u32") for name in ("rows", "cols", "col_tiles", "matrix_tiles"))), ("x", "out"))


def generate_source(config: None = None) -> str:
    return compiler.kernel_stub(
        "sm90_fp8_transpose.cuh", "moegemm::Fp8TransposeConfig", "moegemm::Fp8TransposeParams",
        "moegemm::sm90_fp8_transpose",
        (f"Config::kNumThreads == {NUM_THREADS}", f"Config::kTile == {TILE}", PARAMS.size_check()),
        min_blocks="Config::kMinBlocks", nvcc_checks=PARAMS.offset_checks())


KERNELS = KernelFamily(lambda config: "sm90_fp8_transpose", generate_source, lambda config: dict(
    num_threads=NUM_THREADS, smem_bytes=0, layout=PARAMS))
build = KERNELS.build


def handles(x: torch.Tensor) -> bool:
    """Whether the kernel takes ``x`` ([R, C] or [G, R, C] e4m3 CUDA, unit inner stride): R and C
    multiples of 4 and every row 4-byte aligned (it moves 4-byte words)."""
    rows, cols = x.shape[-2:]
    pitches = x.stride()[:-1]
    return (x.stride(-1) == 1 and rows % 4 == 0 and cols % 4 == 0 and x.data_ptr() % 4 == 0
            and all(p % 4 == 0 for p in pitches))


@dataclass(frozen=True)
class Plan:
    kernel: Kernel
    record: bytes
    out_shape: tuple[int, ...]

    def run(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Transpose ``x`` (of the planned signature) into ``out`` (contiguous, of ``out_shape``;
        tests poison it) or a new tensor."""
        if out is None:
            out = torch.empty(self.out_shape, dtype=x.dtype, device=x.device)
        self.kernel.launch(self.record, x.get_device(), x.data_ptr(), out.data_ptr())
        return out


def plan(x: torch.Tensor) -> Plan:
    """The plan of transposing ``x`` (``handles(x)``, non-empty)."""
    batched = x.dim() == 3
    groups, (rows, cols) = (x.shape[0] if batched else 1), x.shape[-2:]
    if groups * rows * cols >= 2**40 or rows >= 2**31 or cols >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} is too large for the FP8 transpose kernel")
    col_tiles = ceil_div(cols, TILE)
    matrix_tiles = col_tiles * ceil_div(rows, TILE)
    if groups * matrix_tiles >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} is too large for the FP8 transpose kernel")
    values = dict(x_pitch=x.stride(-2), x_batch=x.stride(0) if batched else 0, rows=rows, cols=cols,
                  col_tiles=col_tiles, matrix_tiles=matrix_tiles)
    kernel = KERNELS.kernel(None)
    out_shape = (*x.shape[:-2], cols, rows)
    return Plan(kernel, kernel.record(groups * matrix_tiles, {}, values), out_shape)


_plans = PlanCache()


def transpose(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.mT.contiguous()`` for a checked e4m3 CUDA ``x`` that the kernel ``handles``, non-empty."""
    key = (x.shape, x.stride(), x.device)
    return _plans.get(key, lambda: plan(x)).run(x, out)


__all__ = ["NUM_THREADS", "PARAMS", "TILE", "build", "generate_source", "handles", "plan", "transpose"]
