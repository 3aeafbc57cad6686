"""Host side of sm90_fp8_fold.cuh: A's (1, 32) recipe folded into e4m3 values with 1x128 scales, one
launch per call. Shapes and strides are run-time values; the compiled variants are float32 or packed
int32 scales. One launch writes one buffer: x' ``[..., M, K]`` first, then the float32 scales at a
16-byte aligned offset, in the GEMMs' M-major SFA layout; the returned tensors are views of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..intmath import align, ceil_div, get_tma_aligned_size
from ..jit import compiler
from ..jit.runtime import Kernel, KernelFamily, ParamsLayout, PlanCache, Slot

NUM_THREADS = 256  # Fp8FoldConfig::kNumThreads: one 16-byte chunk of a row each
PARAMS = ParamsLayout("moegemm::Fp8FoldParams", (
    Slot("x", "ptr", "x"), Slot("sf", "ptr", "sf"), Slot("out", "ptr", "out"),
    *(Slot(name, "u64") for name in ("x_group", "x_row", "sf_group", "sf_row", "sf_col", "sf_offset")),
    *(Slot(name, "u32") for name in ("group_rows", "k", "num_groups", "num_chunks"))), ("x", "sf", "out"))


def generate_source(packed: bool) -> str:
    return compiler.kernel_stub(
        "sm90_fp8_fold.cuh", f"moegemm::Fp8FoldConfig<{str(packed).lower()}>", "moegemm::Fp8FoldParams",
        "moegemm::sm90_fp8_fold", (f"Config::kNumThreads == {NUM_THREADS}", PARAMS.size_check()),
        nvcc_checks=PARAMS.offset_checks())


def kernel_name(packed: bool) -> str:
    return f"sm90_fp8_fold_1x32{'_packed' if packed else ''}"


KERNELS = KernelFamily(kernel_name, generate_source, lambda packed: dict(
    num_threads=NUM_THREADS, smem_bytes=0, layout=PARAMS))
build = KERNELS.build


@dataclass(frozen=True)
class Plan:
    """The fold of one signature of (x, sf): the kernel's launch record and the output's layout."""

    shape: tuple[int, ...]
    sf_offset: int
    sf_shape: tuple[int, ...]
    sf_strides: tuple[int, ...]
    buffer_bytes: int
    kernel: Kernel | None  # None: nothing to fold
    record: bytes

    def run(self, x: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8, device=x.device)
        if self.kernel is not None:
            device = x.get_device()
            with torch.cuda.device(device):
                self.kernel.launch(self.record, device, x.data_ptr(), sf.data_ptr(), buffer.data_ptr())
        folded = buffer[:x.numel()].view(torch.float8_e4m3fn).view(self.shape)
        scales = buffer[self.sf_offset:].view(torch.float32).as_strided(self.sf_shape, self.sf_strides)
        return folded, scales


def plan(x: torch.Tensor, sf: torch.Tensor) -> Plan:
    """The plan of folding ``x`` (float8_e4m3fn [M, K] or [G, M, K], unit inner stride, 16-byte aligned
    rows, K % 32 == 0) with ``sf`` (float32 [..., M, K/32] or int32 [..., M, ceil(K/128)], shapes checked
    by the caller)."""
    *lead, group_rows, k = x.shape
    num_groups = lead[0] if lead else 1
    num_k_blocks = ceil_div(k, 128)
    padded_rows = get_tma_aligned_size(group_rows, 4)
    sf_offset = align(x.numel(), 16)
    sf_strides = (num_k_blocks * padded_rows, 1, padded_rows) if lead else (1, padded_rows)
    buffer_bytes = sf_offset + 4 * num_groups * num_k_blocks * padded_rows
    num_chunks = x.numel() // 16
    if num_chunks >= 2**31:
        raise ValueError(f"a: {tuple(x.shape)} is too large for the 1x32 scale fold")
    geometry = (tuple(x.shape), sf_offset, (*lead, group_rows, num_k_blocks), sf_strides, buffer_bytes)
    if num_chunks == 0:
        return Plan(*geometry, None, b"")
    x_strides = (x.stride(0) if lead else 0, x.stride(-2))
    sf_group = sf.stride(0) if lead else 0
    values = dict(x_group=x_strides[0], x_row=x_strides[1], sf_group=sf_group, sf_row=sf.stride(-2),
                  sf_col=sf.stride(-1), sf_offset=sf_offset, group_rows=group_rows, k=k, num_groups=num_groups,
                  num_chunks=num_chunks)
    kernel = KERNELS.kernel(sf.dtype == torch.int32)
    return Plan(*geometry, kernel, kernel.record(ceil_div(num_chunks, NUM_THREADS), {}, values))


_plans = PlanCache()


def fold(x: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.fold_1x32_scales`` on an SM90 GPU, bit for bit (see there)."""
    key = (x.shape, x.stride(), sf.dtype, sf.shape, sf.stride(), x.device)
    return _plans.get(key, lambda: plan(x, sf)).run(x, sf)


__all__ = ["Plan", "build", "fold", "generate_source", "kernel_name", "plan"]
