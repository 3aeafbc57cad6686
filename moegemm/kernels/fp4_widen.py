"""Host side of sm90_fp4_widen.cuh: packed FP4 weights widened to e4m3 with FP32 column scales, once
per call, for the FP8 x FP4 GEMM's prefill form (``Fp8Fp4GemmConfig.widened_b``). One launch writes
one buffer: the e4m3 weights ``[rows, K]`` first, then the column scales at a 16-byte aligned offset,
``[G * ceil(K/128), N']`` MN-major like the packed exponents they come from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import Kernel, KernelFamily, ParamsLayout, PlanCache, Slot

NUM_THREADS = 256  # Fp4WidenConfig::kNumThreads: one 1x32 block each
PARAMS = ParamsLayout("moegemm::Fp4WidenParams", (
    Slot("b", "ptr", "b"), Slot("sfb", "ptr", "sfb"), Slot("out", "ptr", "out"),
    *(Slot(name, "u64") for name in ("b_row", "scale_offset")),
    *(Slot(name, "u32") for name in ("n", "k", "padded_n", "num_parts"))), ("b", "sfb", "out"))


def generate_source(_: None = None) -> str:
    return compiler.kernel_stub(
        "sm90_fp4_widen.cuh", "moegemm::Fp4WidenConfig", "moegemm::Fp4WidenParams", "moegemm::sm90_fp4_widen",
        (f"Config::kNumThreads == {NUM_THREADS}", PARAMS.size_check()), nvcc_checks=PARAMS.offset_checks())


KERNELS = KernelFamily(lambda _: "sm90_fp4_widen", generate_source, lambda _: dict(
    num_threads=NUM_THREADS, smem_bytes=0, layout=PARAMS))


def build():
    return KERNELS.build(None)


@dataclass(frozen=True)
class Plan:
    """The widening of one signature of B: the kernel's launch record and the output's layout."""

    rows: int
    k: int
    scale_offset: int
    scale_shape: tuple[int, int]
    kernel: Kernel
    record: bytes

    @property
    def buffer_bytes(self) -> int:
        return self.scale_offset + 4 * self.scale_shape[0] * self.scale_shape[1]

    def run(self, b: torch.Tensor, sfb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8, device=b.device)
        device = b.get_device()
        with torch.cuda.device(device):
            self.kernel.launch(self.record, device, b.data_ptr(), sfb.data_ptr(), buffer.data_ptr())
        widened = buffer[:self.rows * self.k].view(torch.float8_e4m3fn).view(self.rows, self.k)
        scales = buffer[self.scale_offset:].view(torch.float32).view(self.scale_shape)
        return widened, scales


def plan(b: torch.Tensor, num_groups: int, n: int, k: int) -> Plan:
    """The plan of widening ``b`` (int8 packed e2m1 ``[G * N, K/2]`` rows at one pitch, unit inner
    stride, 16-byte aligned rows; K % 32 == 0) with its packed exponents (the kernels' layout,
    ``quant.packed_ue8m0_mn_major``)."""
    rows, padded_n, num_k_blocks = num_groups * n, align(n, 4), ceil_div(k, 128)
    num_parts = rows * (k // 32)
    if num_parts >= 2**31:
        raise ValueError(f"b: {rows} x {k} weights are too many to widen in one launch")
    scale_offset = align(rows * k, 16)
    scale_shape = (num_groups * num_k_blocks, padded_n)
    values = dict(b_row=b.stride(-2), scale_offset=scale_offset, n=n, k=k, padded_n=padded_n, num_parts=num_parts)
    kernel = KERNELS.kernel(None)
    return Plan(rows, k, scale_offset, scale_shape, kernel, kernel.record(ceil_div(num_parts, NUM_THREADS), {}, values))


_plans = PlanCache()


def widen(b: torch.Tensor, sfb: torch.Tensor, num_groups: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``b``'s e4m3 values ``[G * N, K]`` and FP32 column scales ``[G * ceil(K/128), N']`` (see the
    module's docstring); ``sfb`` in the kernels' packed layout."""
    key = (b.shape, b.stride(), num_groups, n, k, b.device)
    return _plans.get(key, lambda: plan(b, num_groups, n, k)).run(b, sfb)


__all__ = ["Plan", "build", "generate_source", "plan", "widen"]
