"""Host side of sm90_fp8_gemm.cuh: the config heuristic, code generation and the launch.

M, N and K are run-time values, so a new token count or weight shape never recompiles; the
compiled variants are the (BLOCK_M, BLOCK_N, stages, output dtype, accumulate) combinations the
heuristic picks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .. import env
from ..jit import compiler
from ..jit.runtime import SWIZZLE_128B, SWIZZLE_NONE, Kernel, tma_2d
from ..utils import get_tma_aligned_size

BLOCK_K = 128
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
BARRIER_BYTES = 8
MAX_STAGES = 12
# Rough sm_90 rates used to compare configs (H100 SXM): dense FP8 tensor-core rate per SM, DRAM
# bandwidth, and what one SM's TMA loads sustain from L2.
FP8_FLOPS_PER_SM = 1450e12 / 132
DRAM_BYTES_PER_S = 3.0e12
SM_LOAD_BYTES_PER_S = 90e9


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    stages: int
    out_fp32: bool
    accumulate: bool

    @property
    def out_bytes(self) -> int:
        return 4 if self.out_fp32 else 2

    @property
    def num_threads(self) -> int:
        return self.block_m * 2 + 128

    @property
    def store_cols(self) -> int:
        chunk = 128 // self.out_bytes
        return chunk if self.block_n >= chunk else self.block_n

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.stages, self.out_bytes)


def smem_bytes(block_m: int, block_n: int, stages: int, out_bytes: int) -> int:
    stage = block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4
    return block_m * block_n * out_bytes + stages * (stage + 2 * BARRIER_BYTES)


def valid_block_n(block_n: int, out_bytes: int) -> bool:
    """BLOCK_N values the kernel supports (its static_asserts, and the register budget)."""
    chunk = 128 // out_bytes
    low_bit = block_n & -block_n
    return (block_n % 8 == 0 and 8 <= block_n <= 192
            and (block_n < chunk or block_n % chunk == 0)
            and (block_n <= 128 or block_n % 128 == 0 or block_n <= 128 + low_bit))


def _max_stages(block_m: int, block_n: int, out_bytes: int) -> int:
    stages = 0
    while stages < MAX_STAGES and smem_bytes(block_m, block_n, stages + 1, out_bytes) <= SMEM_LIMIT:
        stages += 1
    return stages


def _estimated_seconds(m: int, n: int, k: int, block_m: int, block_n: int, num_sms: int, out_bytes: int) -> float:
    """Time of the busiest SM: its waves of tiles, each bound by tensor-core rate or its own loads,
    and no less than the whole problem's DRAM traffic (A and B once, D written)."""
    num_m_blocks, num_n_blocks = -(-m // block_m), -(-n // block_n)
    waves = -(-(num_m_blocks * num_n_blocks) // num_sms)
    k_padded = -(-k // BLOCK_K) * BLOCK_K
    tile_flops = 2 * block_m * block_n * k_padded
    tile_bytes = (min(block_m, m) + block_n) * k_padded
    per_tile = max(tile_flops / FP8_FLOPS_PER_SM, tile_bytes / SM_LOAD_BYTES_PER_S)
    dram = (m * k + n * k + m * n * out_bytes) / DRAM_BYTES_PER_S
    return max(waves * per_tile, dram)


def select_config(m: int, n: int, k: int, out_fp32: bool, accumulate: bool, num_sms: int) -> Fp8GemmConfig:
    """The config with the least estimated time; ties go to the larger tile (fewer re-reads)."""
    out_bytes = 4 if out_fp32 else 2
    best, best_key = None, None
    for block_m in (64, 128):
        for block_n in range(8, 193, 8):
            if not valid_block_n(block_n, out_bytes):
                continue
            stages = _max_stages(block_m, block_n, out_bytes)
            if stages < 3:
                continue
            seconds = _estimated_seconds(m, n, k, block_m, block_n, num_sms, out_bytes)
            key = (round(seconds * 1e9), -block_m * block_n)
            if best_key is None or key < best_key:
                best, best_key = Fp8GemmConfig(block_m, block_n, stages, out_fp32, accumulate), key
    assert best is not None
    return best


def generate_source(config: Fp8GemmConfig) -> str:
    return (
        '#include "sm90_fp8_gemm.cuh"\n'
        f"using Config = moegemm::Fp8GemmConfig<{config.block_m}, {config.block_n}, {config.stages}, "
        f"{str(config.out_fp32).lower()}, {str(config.accumulate).lower()}>;\n"
        f"static_assert(Config::kSmemBytes == {config.smem_bytes}, \"host and device disagree on shared memory\");\n"
        f"static_assert(Config::kNumThreads == {config.num_threads});\n"
        "extern \"C\" __global__ void __launch_bounds__(Config::kNumThreads, 1)\n"
        "moegemm_kernel(const __grid_constant__ moegemm::Fp8GemmParams params) {\n"
        "    moegemm::sm90_fp8_gemm<Config>(params);\n"
        "}\n"
    )


def kernel_name(config: Fp8GemmConfig) -> str:
    out = "f32" if config.out_fp32 else "bf16"
    acc = "_acc" if config.accumulate else ""
    return f"sm90_fp8_gemm_nt_{out}{acc}_m{config.block_m}n{config.block_n}s{config.stages}"


def build(config: Fp8GemmConfig) -> compiler.Build:
    return compiler.build(kernel_name(config), generate_source(config))


_kernels: dict[Fp8GemmConfig, Kernel] = {}


def _kernel(config: Fp8GemmConfig) -> Kernel:
    kernel = _kernels.get(config)
    if kernel is None:
        kernel = Kernel(build(config), num_threads=config.num_threads, smem_bytes=config.smem_bytes,
                        num_tma=4, params_format="Q3I")
        _kernels[config] = kernel
    return kernel


@dataclass(frozen=True)
class Plan:
    """Everything about a call that depends only on shapes and strides, made once per signature."""

    config: Fp8GemmConfig
    kernel: Kernel
    record: bytes

    def launch(self, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
               d: torch.Tensor) -> None:
        """Run on inputs of the planned signature (``sfa`` M-major TMA-aligned, ``sfb`` contiguous)."""
        self.kernel.launch(self.record, d.device.index, a.data_ptr(), b.data_ptr(), sfa.data_ptr(), d.data_ptr(),
                           sfb.data_ptr())


def plan(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, accumulate: bool, num_sms: int,
         config: Fp8GemmConfig | None = None) -> Plan:
    """The plan of D (+)= A @ B^T for these shapes; ``config`` overrides the heuristic (tests use it
    to cover every kind of config)."""
    m, k = a.shape
    n = b.shape[0]
    if config is None:
        config = select_config(m, n, k, d.dtype == torch.float32, accumulate, num_sms)
    grid = min(num_sms, -(-m // config.block_m) * -(-n // config.block_n))
    if env.flag("MOEGEMM_PRINT_CONFIGS"):
        print(f"[moegemm] fp8_gemm_nt m={m} n={n} k={k}: {config}, grid {grid}", file=sys.stderr)
    d_swizzle = SWIZZLE_128B if config.store_cols * config.out_bytes == 128 else SWIZZLE_NONE
    tma = (tma_2d(a.dtype, k, m, a.stride(0), BLOCK_K, config.block_m, SWIZZLE_128B, 0),
           tma_2d(b.dtype, k, n, b.stride(0), BLOCK_K, config.block_n, SWIZZLE_128B, 128),
           tma_2d(torch.float32, m, -(-k // BLOCK_K), get_tma_aligned_size(m, 4) * 4, config.block_m, 1,
                  SWIZZLE_NONE, 256),
           tma_2d(d.dtype, n, m, d.stride(0) * d.element_size(), config.store_cols, 64, d_swizzle, 384))
    kernel = _kernel(config)
    return Plan(config, kernel, kernel.record(grid, tma, (0, m, n, k), num_pointer_params=1))


__all__ = ["Fp8GemmConfig", "Plan", "build", "generate_source", "plan", "select_config"]
