"""What every sm90 GEMM family's config shares on the host (mirroring GemmConfigBase in
include/moegemm/sm90/config.cuh): the tile, stages, cluster and output of one compiled kernel, the
persistent grid it launches with, and the choice of BLOCK_M by kind of GEMM that the families share.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import env
from ..device import DeviceFacts
from ..intmath import align, ceil_div
from ..jit.runtime import LaunchPlan
from . import heuristic
from .desc import GemmDesc, GemmType
from .heuristic import CostTerms, Tile


@dataclass(frozen=True)
class GemmConfig:
    """One compiled kernel of a family: tile, stages, output dtype (fp32 or bf16), ``D = C + ...``
    (``accumulate``), cluster and GemmType. A family's config adds its own fields."""

    block_m: int
    block_n: int
    stages: int
    out_fp32: bool
    accumulate: bool
    cluster_m: int = 1  # 2: two CTAs stacked along M share (multicast) the B tile
    split_k: int = 1  # > 1: a cluster of split_k CTAs shares each tile, splitting its K blocks
    gemm_type: GemmType = GemmType.NORMAL
    cluster_n: int = 1  # 2: two CTAs side by side along N share (multicast) the A tile

    @property
    def cluster_size(self) -> int:
        return self.cluster_m * self.cluster_n * self.split_k

    @property
    def out_cols(self) -> int:
        """Columns of a tile one CTA stores (its slice under split-K)."""
        return self.block_n // self.split_k

    @property
    def out_bytes(self) -> int:
        return 4 if self.out_fp32 else 2

    @property
    def num_threads(self) -> int:
        return 128 * math_warpgroups(self.block_m) + 128

    @property
    def store_cols(self) -> int:
        chunk = 128 // self.out_bytes
        return chunk if self.out_cols % chunk == 0 else self.out_cols

    def cpp_common_args(self) -> str:
        """GemmConfigBase's arguments from the stages on, as a family's config template takes them."""
        return (f"{self.stages}, {self.cluster_m}, {self.cluster_n}, {self.split_k}, {str(self.out_fp32).lower()}, "
                f"{str(self.accumulate).lower()}, moegemm::GemmType::{self.gemm_type.value}")

    def name_suffix(self) -> str:
        """The kernel name's tail: tile, stages, cluster."""
        cluster = (f"cm{self.cluster_m}" if self.cluster_m > 1 else f"cn{self.cluster_n}" if self.cluster_n > 1 else "")
        split = f"k{self.split_k}" if self.split_k > 1 else ""
        return f"m{self.block_m}n{self.block_n}s{self.stages}{cluster}{split}"


KIND_NAMES = {GemmType.NORMAL: "", GemmType.CONTIGUOUS: "_contiguous", GemmType.PSUM: "_psum",
              GemmType.MASKED: "_masked", GemmType.K_GROUPED: "_k_grouped",
              GemmType.BATCHED: "_batched", GemmType.BATCH_SUM: "_batch_sum"}


def math_warpgroups(block_m: int) -> int:
    """One per 64 rows, but two (of two 64-row slabs each) for BLOCK_M = 256."""
    return 2 if block_m == 256 else block_m // 64


def smem_layout_bytes(block_m: int, block_n: int, stages: int, out_bytes: int, split_k: int,
                      stage_bytes: int) -> int:
    """GemmConfigBase::smem_bytes: the D staging buffer, the stages (``stage_bytes`` each, the family's
    extras included), the split-K reduce buffer and the barriers."""
    out_cols = block_n // split_k
    reduce_buffer = block_m // 64 * (split_k - 1) * out_cols * 256
    barriers = 2 * stages + (2 * block_m // 64 if split_k > 1 else 0)
    return block_m * out_cols * out_bytes + stages * stage_bytes + reduce_buffer + barriers * 8


def select_tile(desc: GemmDesc, facts: DeviceFacts, terms: Callable[[tuple[int, ...]], CostTerms],
                dense_block_ms: tuple[int, ...]) -> Tile:
    """The tile of the least estimated time (moegemm.gemm.heuristic) among a family's, ``terms(block_ms)``
    giving its cost terms over those BLOCK_M values. Dense GEMMs try ``dense_block_ms``. Grouped
    (``desc.m`` the rows per expert planned for): BLOCK_M 64 or 128; masked experts of 129 to 192
    rows in one block of three math warpgroups (in 128-row blocks the second block would keep one
    warpgroup idle); larger masked experts with B multicast across the CTA pair of each two
    block-rows (each block-row of an expert reads all of its B: the L2 was the busiest unit).
    K-grouped and batched GEMMs are dense products, one per group. BENCHMARKS.md, "The config model"."""
    kind = desc.gemm_type
    if kind is GemmType.MASKED and 128 < desc.m <= 192:
        return heuristic.search(desc, facts, terms((192,)))
    if kind in (GemmType.CONTIGUOUS, GemmType.PSUM, GemmType.MASKED):
        desc = dataclasses.replace(desc, m=max(desc.m, 1))
        tile = heuristic.search(desc, facts, terms((64, 128)))
        if kind is GemmType.MASKED and desc.m > tile.block_m and tile.block_n % 16 == 0:
            tile = dataclasses.replace(tile, cluster_m=2)
        return tile
    return heuristic.search(desc, facts, terms(dense_block_ms))


def grid_size(config: GemmConfig, desc: GemmDesc, rows: int, facts: DeviceFacts) -> int:
    """The persistent grid: one CTA per SM in whole clusters and (dense GEMMs) no more than there are
    tiles; split-K clusters no more than fit at once (a cluster must fit in one GPC: more would run a
    second, nearly empty wave)."""
    c = config.cluster_size
    clusters = facts.num_sms // c
    if desc.gemm_type in (GemmType.NORMAL, GemmType.BATCHED):
        clusters = min(clusters, desc.num_groups * ceil_div(rows, config.block_m * config.cluster_m) *
                       ceil_div(ceil_div(desc.n, config.block_n), config.cluster_n))
    if config.split_k > 1:
        clusters = min(clusters, max(facts.resident_clusters[c - 1], 1))
    return clusters * c


def _multicast_pays(config: GemmConfig, grid: int, facts: DeviceFacts) -> bool:
    """Multicast pays only while (nearly) every SM can hold a CTA of a resident cluster."""
    resident = facts.resident_clusters[config.cluster_size - 1] * config.cluster_size
    return grid > 0 and resident >= 0.95 * min(facts.num_sms, grid)


def settle(config: GemmConfig, desc: GemmDesc, rows: int, group_rows: int, facts: DeviceFacts,
           family: str) -> tuple[GemmConfig, int]:
    """The config a launch runs and its grid: ``config`` for this GemmType, without a pair that
    shares A where A's tiles are not whole (few rows load boxes of only the rows that exist) nor
    pairs where multicast does not pay; printed with MOEGEMM_PRINT_CONFIGS."""
    config = dataclasses.replace(config, gemm_type=desc.gemm_type)
    if config.cluster_n > 1 and group_rows < config.block_m:
        config = dataclasses.replace(config, cluster_n=1)
    if config.cluster_size > config.split_k and not _multicast_pays(config, grid_size(config, desc, rows, facts),
                                                                     facts):
        config = dataclasses.replace(config, cluster_m=1, cluster_n=1)
    grid = grid_size(config, desc, rows, facts)
    if env.flag("MOEGEMM_PRINT_CONFIGS"):
        print(f"[moegemm] {family} gemm {desc}: {config}, grid {grid}", file=sys.stderr)
    return config, grid


Plan = LaunchPlan  # a GEMM family's plan: its config is a GemmConfig


def tma_pitch(t: torch.Tensor) -> int:
    """Bytes between the rows of a row-major matrix view for a TMA descriptor: its row stride, or
    for a single row (whose stride means nothing) the row's bytes rounded up to 16."""
    if t.shape[-2] > 1:
        return t.stride(-2) * t.element_size()
    return align(t.shape[-1] * t.element_size(), 16)
