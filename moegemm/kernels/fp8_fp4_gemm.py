"""Host side of sm90_fp8_fp4_gemm.cuh: the FP8 x FP4 family's tiles, cost terms, code generation and
launch plan. The kernel is the FP8 one with B widened on the chip, so the parameters, the time model
and most of the plan are the FP8 family's (moegemm.kernels.fp8_gemm)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..device import DeviceFacts
from ..gemm import heuristic
from ..gemm.config import GemmConfig, settle, smem_layout_bytes
from ..gemm.desc import GemmDesc
from ..gemm.heuristic import Tile
from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import SWIZZLE_NONE, KernelFamily, tma_2d
from . import fp8_gemm
from .fp8_gemm import BLOCK_K, CONTIGUOUS_ALIGNMENT, PARAMS

TRANSFORM_THREADS = 96  # kTransformThreads: the producer warpgroup's warps 1 to 3
# The transform warps' rate in the model, values per second per SM: fitted to the picks, not their
# measured ~10e9, which favoured narrow tiles that ran up to 54% slower (BENCHMARKS.md, "FP8 x FP4").
TRANSFORM_VALUES_PER_S = 45e9
MAX_STAGES = 8


@dataclass(frozen=True)
class Fp8Fp4GemmConfig(GemmConfig):
    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.stages, self.out_bytes, self.split_k)


def smem_bytes(block_m: int, block_n: int, stages: int, out_bytes: int, split_k: int = 1) -> int:
    """Mirrors Fp8Fp4GemmConfig::kSmemBytes: per stage A, the widened B, B's packed values (64 bytes a
    row), SFA, B's packed scales (a 128-byte aligned slot), the column scales and a barrier."""
    stage = (block_m + block_n) * BLOCK_K + block_n * 64 + block_m * 4 + align(block_n * 4, 128) + block_n * 4 + 16
    return smem_layout_bytes(block_m, block_n, stages, out_bytes, split_k, stage)


def stages_for(block_m: int, block_n: int, out_bytes: int, split_k: int, facts: DeviceFacts) -> int:
    stages = 0
    while stages < MAX_STAGES and smem_bytes(block_m, block_n, stages + 1, out_bytes, split_k) <= facts.smem_per_block:
        stages += 1
    return stages


class Fp8Fp4CostTerms(fp8_gemm.Fp8CostTerms):
    """The FP8 kernel's terms over the tiles this kernel has (BLOCK_M 64 or 128, BLOCK_N <= 128, no
    pair sharing B), with the transform warps' time as a floor of each K block."""

    def tiles(self, desc: GemmDesc, facts: DeviceFacts) -> Iterator[Tile]:
        for tile in super().tiles(desc, facts):
            if tile.block_m <= 128 and tile.block_n <= 128 and tile.cluster_m == 1 and \
                    stages_for(tile.block_m, tile.block_n, desc.out_bytes, tile.split_k, facts) >= 3:
                yield tile

    def tensor_seconds(self, desc: GemmDesc, tile: Tile) -> float:
        transform = tile.block_n * BLOCK_K / TRANSFORM_VALUES_PER_S
        return max(super().tensor_seconds(desc, tile), transform)


def select_config(desc: GemmDesc, facts: DeviceFacts) -> Fp8Fp4GemmConfig:
    """The tile of the least estimated time among Fp8Fp4CostTerms' (the model counts B's bytes as
    FP8's)."""
    desc = dataclasses.replace(desc, m=max(desc.m, 1))
    tile = heuristic.search(desc, facts, Fp8Fp4CostTerms((64, 128)))
    stages = stages_for(tile.block_m, tile.block_n, desc.out_bytes, tile.split_k, facts)
    return Fp8Fp4GemmConfig(tile.block_m, tile.block_n, stages, desc.out_dtype == torch.float32, desc.accumulate,
                            tile.cluster_m, tile.split_k, desc.gemm_type, tile.cluster_n)


def generate_source(config: Fp8Fp4GemmConfig) -> str:
    return compiler.kernel_stub(
        "sm90_fp8_fp4_gemm.cuh",
        f"moegemm::Fp8Fp4GemmConfig<{config.block_m}, {config.block_n}, {config.cpp_common_args()}>",
        PARAMS.cpp_type, "moegemm::sm90_fp8_fp4_gemm",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}", f"Config::kTransformThreads == {TRANSFORM_THREADS}",
         f'moegemm::kContiguousAlignment == {CONTIGUOUS_ALIGNMENT}, "host and device disagree on the alignment"',
         PARAMS.size_check()), nvcc_checks=PARAMS.offset_checks())


def kernel_name(config: Fp8Fp4GemmConfig) -> str:
    return fp8_gemm.kernel_name(config).replace("sm90_fp8_gemm", "sm90_fp8_fp4_gemm", 1)


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=PARAMS, cluster=config.cluster_size))
build = KERNELS.build
# The FP8 plan's launch (A, SFA, B, SFB, D, groups), with B the packed FP4 bytes and SFB the packed
# exponents [G * ceil(K/128), N'] that ``quant.transform_sf_into_required_layout`` makes.
Plan = fp8_gemm.Plan


def plan(desc: GemmDesc, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, facts: DeviceFacts,
         config: Fp8Fp4GemmConfig | None = None, pdl: bool = False) -> Plan:
    """The plan of ``desc`` (fp8_gemm.describe's, with B's K the unpacked one) on these tensors: A
    e4m3 [rows, K] or [G, max_M, K], B int8 [N, K/2] or [G, N, K/2], D like A with N columns."""
    num_groups = desc.num_groups
    rows, group_rows = fp8_gemm.row_counts(desc, a)
    if config is None:
        config = select_config(fp8_gemm.planned_desc(desc, group_rows), facts)
    config, grid = settle(config, desc, rows, group_rows, facts, "fp8 x fp4")
    k, n = a.shape[-1], b.shape[-2]
    num_k_blocks = ceil_div(k, BLOCK_K)
    tma, a_side_bytes = fp8_gemm.a_side_tma(config, a, d, rows, group_rows, num_groups)
    tma["tma_b"] = tma_2d(torch.int8, k // 2, num_groups * n, b.stride(-2), BLOCK_K // 2, config.block_n, SWIZZLE_NONE)
    padded_n = align(n, 4)
    tma["tma_sfb"] = tma_2d(torch.int32, padded_n, num_groups * num_k_blocks, padded_n * 4, config.block_n, 1,
                            SWIZZLE_NONE)
    stage_bytes = a_side_bytes + config.block_n * (BLOCK_K // 2 + 4)
    values = dict(m=group_rows, n=n, k=k, stage_bytes=stage_bytes,
                  k_blocks_per_split=ceil_div(num_k_blocks, config.split_k), num_groups=num_groups,
                  ld_d=d.stride(-2), sfb_box_rows=1)
    record = KERNELS.kernel(config).record(grid, tma, values, pdl=pdl)
    return Plan(config, KERNELS.kernel(config), record)


__all__ = ["Fp8Fp4GemmConfig", "Plan", "build", "generate_source", "kernel_name", "plan", "select_config"]
