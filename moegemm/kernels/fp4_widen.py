"""Host side of sm90_fp4_widen.cuh: packed FP4 weights widened once per call to the FP8 kernel's B,
e4m3 values with 128x128 FP32 block scales, for the FP8 x FP4 GEMMs' prefill. One launch writes one
buffer: the e4m3 weights ``[G, N, K]`` first, then the block scales ``[G, ceil(N/128), ceil(K/128)]``
at a 16-byte aligned offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import Kernel, KernelFamily, ParamsLayout, Slot

NUM_THREADS = 512  # Fp4WidenConfig::kNumThreads: a 128x128 block, one 1x32 part each
# kE2m1LutBytes (include/moegemm/fp4.cuh): the shared table of every 1x32 block's widening, which the
# kernels that widen in their main loops keep in shared memory.
E2M1_LUT_BYTES = 21 * 8
PARAMS = ParamsLayout("moegemm::Fp4WidenParams", (
    Slot("b", "ptr", "b"), Slot("sfb", "ptr", "sfb"), Slot("out", "ptr", "out"),
    *(Slot(name, "u64") for name in ("b_row", "scale_offset")),
    *(Slot(name, "u32") for name in ("n", "k", "padded_n", "n_blocks"))), ("b", "sfb", "out"))


def generate_source(_: None = None) -> str:
    return compiler.kernel_stub(
        "sm90_fp4_widen.cuh", "moegemm::Fp4WidenConfig", "moegemm::Fp4WidenParams", "moegemm::sm90_fp4_widen",
        (f"Config::kNumThreads == {NUM_THREADS}", PARAMS.size_check()), nvcc_checks=PARAMS.offset_checks())


KERNELS = KernelFamily(lambda _: "sm90_fp4_widen", generate_source, lambda _: dict(
    num_threads=NUM_THREADS, smem_bytes=0, layout=PARAMS))


def build():
    return KERNELS.build(None)


def _scale_offset(shape: tuple[int, int, int]) -> int:
    """Where the block scales start in the widening's buffer: after the e4m3 weights, 16-byte aligned."""
    return align(math.prod(shape), 16)


@dataclass(frozen=True)
class Plan:
    """The widening of one signature of B: the kernel's launch record and the output's layout."""

    shape: tuple[int, int, int]  # G, N, K
    kernel: Kernel
    record: bytes

    @property
    def scale_offset(self) -> int:
        return _scale_offset(self.shape)

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        num_groups, n, k = self.shape
        return num_groups, ceil_div(n, 128), ceil_div(k, 128)

    def run(self, b: torch.Tensor, sfb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty(self.scale_offset + 4 * math.prod(self.scale_shape), dtype=torch.uint8, device=b.device)
        device = b.get_device()
        with torch.cuda.device(device):
            self.kernel.launch(self.record, device, b.data_ptr(), sfb.data_ptr(), buffer.data_ptr())
        widened = buffer[:math.prod(self.shape)].view(torch.float8_e4m3fn).view(self.shape)
        scales = buffer[self.scale_offset:].view(torch.float32).view(self.scale_shape)
        return widened, scales


def plan(b: torch.Tensor, num_groups: int, n: int, k: int) -> Plan:
    """The plan of widening ``b`` (int8 packed e2m1 ``[G * N, K/2]`` rows at one pitch, unit inner
    stride, 16-byte aligned rows; K % 32 == 0) with its packed exponents (the kernels' layout,
    ``quant.packed_ue8m0_mn_major``)."""
    n_blocks = ceil_div(n, 128)
    num_blocks = num_groups * n_blocks * ceil_div(k, 128)
    if num_blocks >= 2**31:
        raise ValueError(f"b: {num_groups} x {n} x {k} weights are too many to widen in one launch")
    values = dict(b_row=b.stride(-2), scale_offset=_scale_offset((num_groups, n, k)), n=n, k=k, padded_n=align(n, 4),
                  n_blocks=n_blocks)
    kernel = KERNELS.kernel(None)
    return Plan((num_groups, n, k), kernel, kernel.record(num_blocks, {}, values))


__all__ = ["Plan", "build", "generate_source", "plan"]
