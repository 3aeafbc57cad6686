"""Host side of sm90_tf32_hc_prenorm_gemm.cuh: the config (BLOCK_N, stages), code generation and the
launch plan. M, N, K and the number of splits are run-time values; the compiled variants are the
configs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device import DeviceFacts
from ..gemm.config import tma_pitch
from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import SWIZZLE_128B, KernelFamily, LaunchPlan, ParamsLayout, Slot, tma_2d

BLOCK_M = 64
BLOCK_K = 64
MAX_N = 256  # one WGMMA spans the tile's columns
# A stream of A: enough K blocks in flight to cover the memory latency (all that fit, up to this).
MAX_STAGES = 12
BARRIER_BYTES = 8

OPERANDS = ("a", "b", "d", "sqr_sum")
PARAMS = ParamsLayout("moegemm::HcPrenormParams", (
    Slot("tma_a", "tma", "a"), Slot("tma_b", "tma", "b"), Slot("d", "ptr", "d"), Slot("sqr_sum", "ptr", "sqr_sum"),
    *(Slot(name, "u32") for name in ("m", "n", "k", "num_splits"))), OPERANDS)


@dataclass(frozen=True)
class HcPrenormConfig:
    block_n: int
    stages: int

    num_threads = 160  # one math warpgroup and the producer's warp

    @property
    def stage_bytes(self) -> int:
        return BLOCK_M * BLOCK_K * 2 + self.block_n * BLOCK_K * 4

    @property
    def smem_bytes(self) -> int:
        return self.stages * (self.stage_bytes + 2 * BARRIER_BYTES)


def select_config(n: int, facts: DeviceFacts) -> HcPrenormConfig:
    """BLOCK_N: N rounded up to WGMMA's multiple of 8; the most stages that fit."""
    if not 0 < n <= MAX_N:
        raise ValueError(f"b: expected N (rows) in [1, {MAX_N}], got {n}")
    block_n = align(n, 8)
    stages = min(MAX_STAGES, facts.smem_per_block // HcPrenormConfig(block_n, 1).smem_bytes)
    return HcPrenormConfig(block_n, stages)


def generate_source(config: HcPrenormConfig) -> str:
    return compiler.kernel_stub(
        "sm90_tf32_hc_prenorm_gemm.cuh", f"moegemm::HcPrenormConfig<{config.block_n}, {config.stages}>",
        PARAMS.cpp_type, "moegemm::sm90_tf32_hc_prenorm_gemm",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}", PARAMS.size_check()), nvcc_checks=PARAMS.offset_checks())


def kernel_name(config: HcPrenormConfig) -> str:
    return f"sm90_tf32_hc_prenorm_gemm_n{config.block_n}s{config.stages}"


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=PARAMS))
build = KERNELS.build


Plan = LaunchPlan  # launch_pointers takes the OPERANDS' addresses


def plan(a: torch.Tensor, b: torch.Tensor, num_splits: int, facts: DeviceFacts, pdl: bool = False) -> Plan:
    """A bf16 [M, K] and B fp32 [N, K], each with a unit inner stride; D and sqr_sum contiguous
    [num_splits, M, N] and [num_splits, M]."""
    m, k = a.shape
    n = b.shape[0]
    config = select_config(n, facts)
    kernel = KERNELS.kernel(config)
    tma = {"tma_a": tma_2d(a.dtype, k, m, tma_pitch(a), BLOCK_K, BLOCK_M, SWIZZLE_128B),
           "tma_b": tma_2d(b.dtype, k, n, tma_pitch(b), BLOCK_K // 2, config.block_n, SWIZZLE_128B)}
    record = kernel.record(ceil_div(m, BLOCK_M) * num_splits, tma, dict(m=m, n=n, k=k, num_splits=num_splits),
                           pdl=pdl)
    return Plan(config, kernel, record)


__all__ = ["OPERANDS", "PARAMS", "HcPrenormConfig", "build", "generate_source", "kernel_name", "plan",
           "select_config"]
