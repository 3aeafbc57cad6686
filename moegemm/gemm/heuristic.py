"""The config search every GEMM family uses: a time model of a persistent, warp-specialized SM90 GEMM
ranks the tiles a family offers, and the least estimated time wins.

The model, for a tile of BLOCK_M x BLOCK_N (split over ``split_k`` CTAs of a cluster, or computed by
one CTA of a pair that shares A or B with its peer by multicast):
  time = fixed ramp + max(busiest SM, DRAM, L2)
  busiest SM = waves * (K blocks per CTA * time per K block + split-K exchange)
  time per K block = the slowest of: the family's latency floor, its tensor-core time (the family's
      efficiency), shared-memory traffic (TMA writes plus every 64-row slab's WGMMA operand reads), and
      the L2 reads this SM's TMA loads issue (half of the shared operand's rows in a pair);
  DRAM = A and B read once, D written once, at the sustained rate;
  L2 = every tile's A and B rows read from L2 (a pair's shared operand once), at the L2's rate.
Ties (DRAM-bound problems) go to smaller clusters, fewer padding rows, the least busy SMs, then the
larger tile. The constants are fitted to sweeps of the configs around the picks: BENCHMARKS.md,
"The config model".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..device import DeviceFacts
from ..intmath import ceil_div
from .desc import GemmDesc

DRAM_BYTES_PER_S = 2.9e12
SM_LOAD_BYTES_PER_S = 90e9  # what one SM's TMA loads sustain
SMEM_BYTES_PER_S = 172e9  # shared-memory traffic one SM sustains
L2_BYTES_PER_S = 7.9e12  # what the L2 delivers to all SMs' TMA loads together
KERNEL_FIXED_S = 3e-6  # ramp-up (first loads) and drain (last stores)
SPLIT_K_REDUCE_S = 0.75e-6  # one split-K exchange, per CTA of the cluster: barrier round trips...
SPLIT_K_REDUCE_BYTES_PER_S = 20e9  # ...and each CTA's partial sums sent to the others


@dataclass(frozen=True)
class Tile:
    """A candidate: the output tile, the CTAs of a cluster that split its K blocks, and the pair
    (cluster_m = 2: stacked along M, sharing B; cluster_n = 2: side by side, sharing A)."""

    block_m: int
    block_n: int
    split_k: int = 1
    cluster_m: int = 1
    cluster_n: int = 1

    @property
    def cluster_size(self) -> int:
        return self.split_k * self.cluster_m * self.cluster_n


class CostTerms(Protocol):
    """What a family tells the search: its tiles and what one of its K blocks costs."""

    block_k: int

    def tiles(self, desc: GemmDesc, facts: DeviceFacts) -> Iterable[Tile]:
        """The candidates, valid for the kernel and the GPU, each with stages that fit."""

    def tensor_seconds(self, desc: GemmDesc, tile: Tile) -> float:
        """Tensor-core time of one K block of the tile on one SM, its own overheads included."""

    def latency_seconds(self, desc: GemmDesc, tile: Tile) -> float:
        """The consumer's floor per K block (dependent WGMMAs, barriers, scale loads)."""


def estimate(desc: GemmDesc, tile: Tile, facts: DeviceFacts, terms: CostTerms) -> tuple[float, float]:
    """(Estimated seconds of the whole GEMM, seconds of its busiest SM)."""
    m, n, k, block_k = desc.m, desc.n, desc.k, terms.block_k
    pair = tile.cluster_m * tile.cluster_n
    # A pair's tiles come in twos: an odd count of block-rows (columns) still runs the peer.
    num_tiles = desc.num_groups * (ceil_div(ceil_div(m, tile.block_m), tile.cluster_m) * tile.cluster_m *
                                   ceil_div(ceil_div(n, tile.block_n), tile.cluster_n) * tile.cluster_n)
    waves = ceil_div(num_tiles, facts.clusters(tile.cluster_size) * pair)
    k_blocks = ceil_div(ceil_div(k, block_k), tile.split_k)
    rows_a = min(tile.block_m, m)
    loaded_rows = rows_a + tile.block_n
    fetched_rows = rows_a / tile.cluster_n + tile.block_n / tile.cluster_m
    wgmma_rows = tile.block_m + tile.block_m // 64 * tile.block_n
    operand_bytes = desc.ab_bytes * block_k
    per_block = max(terms.latency_seconds(desc, tile), terms.tensor_seconds(desc, tile),
                    (loaded_rows + wgmma_rows) * operand_bytes / SMEM_BYTES_PER_S,
                    fetched_rows * operand_bytes / SM_LOAD_BYTES_PER_S)
    reduce = 0.0
    if tile.split_k > 1:
        partial_bytes = (tile.split_k - 1) / tile.split_k * tile.block_m * tile.block_n * 4
        reduce = SPLIT_K_REDUCE_S * tile.split_k + partial_bytes / SPLIT_K_REDUCE_BYTES_PER_S
    busiest_sm = waves * (k_blocks * per_block + reduce)
    dram = desc.num_groups * ((m + n) * k * desc.ab_bytes + m * n * desc.out_bytes) / DRAM_BYTES_PER_S
    l2 = num_tiles * k_blocks * tile.split_k * fetched_rows * operand_bytes / L2_BYTES_PER_S
    return KERNEL_FIXED_S + max(busiest_sm, dram, l2), busiest_sm


def search(desc: GemmDesc, facts: DeviceFacts, terms: CostTerms) -> Tile:
    """The tile with the least estimated time (ties broken as the module docstring says)."""
    best, best_key = None, None
    for tile in terms.tiles(desc, facts):
        seconds, busiest_sm = estimate(desc, tile, facts, terms)
        key = (round(seconds * 1e9), tile.cluster_size, ceil_div(desc.m, tile.block_m) * tile.block_m,
               round(busiest_sm * 1e9), -tile.block_m * tile.block_n)
        if best_key is None or key < best_key:
            best, best_key = tile, key
    if best is None:
        raise ValueError(f"no tile of the kernel fits {desc}")
    return best
