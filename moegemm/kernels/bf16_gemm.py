"""Host side of sm90_bf16_gemm.cuh: the BF16 family's tiles and cost terms for the config search, code
generation, and the launch plan.

Operands reach the plan as the kernel sees them: A K-major ``[rows, K]`` or MN-major ``[K, M]``, B
K-major ``[N, K]`` / ``[G, N, K]`` or MN-major ``[K, N]`` / ``[G, K, N]``, each with a unit inner
stride; K-grouped: A ``[sum_K, M]``, B ``[sum_K, N]`` (both MN-major), D ``[G, M, N]``. M, N and K are
run-time values; the compiled variants are the configs. The cost terms' constants are first
estimates, not yet fitted to sweeps: BENCHMARKS.md, "The BF16 config model".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..device import DeviceFacts
from ..gemm.config import KIND_NAMES, GemmConfig, Plan, select_tile, settle, smem_layout_bytes, tma_pitch
from ..gemm.desc import GemmDesc, GemmType, Major
from ..gemm.heuristic import Tile
from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import SWIZZLE_128B, SWIZZLE_NONE, KernelFamily, ParamsLayout, Slot, tma_2d, tma_3d
from .fp8_gemm import CONTIGUOUS_ALIGNMENT, ROUTING_HEADROOM

BLOCK_K = 64  # one 128-byte swizzle row of bf16
MN_MAJOR_BOX = 64  # indices of an MN-major box (128 bytes of bf16)
MAX_STAGES = 8
MAX_SPLIT_K = 8
BF16_FLOPS_PER_SM = 800e12 / 132  # about what cuBLAS sustains on the H200 at M = 4096
K_BLOCK_LATENCY_S = 120e-9  # the consumer's floor per K block: four WGMMAs issued, a barrier

# Bf16GemmParams in sm90_bf16_gemm.cuh, member by member; a launch passes OPERANDS' addresses in order.
OPERANDS = ("a", "b", "d", "groups")
PARAMS = ParamsLayout("moegemm::Bf16GemmParams", (
    Slot("tma_a", "tma", "a"), Slot("tma_b", "tma", "b"), Slot("tma_d", "tma", "d"), Slot("groups", "ptr", "groups"),
    Slot("d", "ptr", "d"),
    *(Slot(name, "u32") for name in ("m", "n", "k", "stage_bytes", "k_blocks_per_split", "num_groups", "ld_d"))),
    OPERANDS)


@dataclass(frozen=True)
class Bf16GemmConfig(GemmConfig):
    major_a: Major = Major.K
    major_b: Major = Major.K

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.stages, self.out_bytes, self.split_k)


def smem_bytes(block_m: int, block_n: int, stages: int, out_bytes: int, split_k: int = 1) -> int:
    """Mirrors Bf16GemmConfig::kSmemBytes (the generated source asserts they agree)."""
    return smem_layout_bytes(block_m, block_n, stages, out_bytes, split_k, (block_m + block_n) * BLOCK_K * 2)


def valid_block_n(block_n: int, block_m: int, out_bytes: int, major_b: Major, split_k: int = 1) -> bool:
    """BLOCK_N values the kernel supports: WGMMA's N, whole 128-byte output chunks, whole MN-major
    boxes of B, and the registers (three math warpgroups hold 128 columns at most)."""
    chunk = 128 // out_bytes
    out_cols = block_n // split_k
    step = MN_MAJOR_BOX if major_b is Major.MN else 8
    widest = 128 if block_m == 192 else 256
    return (block_n % step == 0 and block_n % (8 * split_k) == 0 and 16 <= block_n <= widest
            and (out_cols < chunk or out_cols % chunk == 0))


def stages_for(block_m: int, block_n: int, out_bytes: int, split_k: int, facts: DeviceFacts) -> int:
    """As many stages as fit, up to MAX_STAGES."""
    stages = 0
    while stages < MAX_STAGES and smem_bytes(block_m, block_n, stages + 1, out_bytes, split_k) <= facts.smem_per_block:
        stages += 1
    return stages


class Bf16CostTerms:
    """The BF16 kernel's part of the time model (moegemm.gemm.heuristic): its tiles and what a K block
    of each costs. ``block_ms``: the BLOCK_M values to try."""

    block_k = BLOCK_K

    def __init__(self, block_ms: tuple[int, ...], major_a: Major, major_b: Major):
        self.block_ms, self.major_a, self.major_b = block_ms, major_a, major_b

    def tiles(self, desc: GemmDesc, facts: DeviceFacts) -> Iterator[Tile]:
        kind = desc.gemm_type
        pairs = facts.clusters(2) > 0
        for block_m in self.block_ms:
            for block_n in range(8, 257, 8):
                if not valid_block_n(block_n, block_m, desc.out_bytes, self.major_b) or \
                        stages_for(block_m, block_n, desc.out_bytes, 1, facts) < 3:
                    continue
                yield Tile(block_m, block_n)
                # Pairs that share B (dense, K-major B). Pairs sharing A, dense or contiguous, ran
                # slower than single CTAs on every shape timed: BENCHMARKS.md, "The BF16 config model".
                if pairs and kind is GemmType.NORMAL and desc.m >= 2 * block_m and block_n % 16 == 0 and \
                        self.major_b is Major.K:
                    yield Tile(block_m, block_n, cluster_m=2)
                num_tiles = desc.num_groups * ceil_div(desc.m, block_m) * ceil_div(desc.n, block_n)
                for split_k in range(2, 2 if kind.grouped or block_m > 128 else MAX_SPLIT_K + 1):
                    if num_tiles * split_k > facts.num_sms or split_k > ceil_div(desc.k, BLOCK_K):
                        break
                    if valid_block_n(block_n, block_m, desc.out_bytes, self.major_b, split_k) and \
                            stages_for(block_m, block_n, desc.out_bytes, split_k, facts) >= 3:
                        yield Tile(block_m, block_n, split_k)

    def tensor_seconds(self, desc: GemmDesc, tile: Tile) -> float:
        # Each WGMMA carries a fixed cost worth about 16 columns; one math warpgroup (BLOCK_M = 64)
        # leaves the tensor cores idle while it waits for a stage.
        efficiency = tile.block_n / (tile.block_n + 16) * (0.8 if tile.block_m == 64 else 1.0)
        return 2 * tile.block_m * tile.block_n * BLOCK_K / (BF16_FLOPS_PER_SM * efficiency)

    def latency_seconds(self, desc: GemmDesc, tile: Tile) -> float:
        return K_BLOCK_LATENCY_S


def select_config(desc: GemmDesc, facts: DeviceFacts, major_a: Major, major_b: Major) -> Bf16GemmConfig:
    """The config of the least estimated time (moegemm.gemm.config.select_tile); dense GEMMs try
    BLOCK_M 64, 128 and 192."""
    tile = select_tile(desc, facts, lambda block_ms: Bf16CostTerms(block_ms, major_a, major_b), (64, 128, 192))
    stages = stages_for(tile.block_m, tile.block_n, desc.out_bytes, tile.split_k, facts)
    return Bf16GemmConfig(tile.block_m, tile.block_n, stages, desc.out_dtype == torch.float32, desc.accumulate,
                          tile.cluster_m, tile.split_k, desc.gemm_type, tile.cluster_n, major_a, major_b)


def generate_source(config: Bf16GemmConfig) -> str:
    return compiler.kernel_stub(
        "sm90_bf16_gemm.cuh",
        f"moegemm::Bf16GemmConfig<{config.block_m}, {config.block_n}, {config.cpp_common_args()}, "
        f"moegemm::Major::{config.major_a.value}, moegemm::Major::{config.major_b.value}>",
        PARAMS.cpp_type, "moegemm::sm90_bf16_gemm",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}",
         f'moegemm::kContiguousAlignment == {CONTIGUOUS_ALIGNMENT}, "host and device disagree on the alignment"',
         PARAMS.size_check()), nvcc_checks=PARAMS.offset_checks())


_LAYOUT_NAMES = {(Major.K, Major.K): "nt", (Major.K, Major.MN): "nn", (Major.MN, Major.MN): "tn",
                 (Major.MN, Major.K): "tt"}


def kernel_name(config: Bf16GemmConfig) -> str:
    out = "f32" if config.out_fp32 else "bf16"
    acc = "_acc" if config.accumulate else ""
    layout = _LAYOUT_NAMES[config.major_a, config.major_b]
    return f"sm90_bf16_gemm_{layout}{KIND_NAMES[config.gemm_type]}_{out}{acc}_{config.name_suffix()}"


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=PARAMS, cluster=config.cluster_size))
build = KERNELS.build


def _slice_pitch(t: torch.Tensor) -> int:
    """Bytes between the slices of a 3-D operand (its outer dimension), whatever one slice's stride."""
    return t.stride(0) * t.element_size() if t.shape[0] > 1 else tma_pitch(t) * t.shape[1]


def _batch_sum_run(config: Bf16GemmConfig, grid: int, m: int, n: int, k: int, num_products: int) -> int:
    """The length of a batch sum's runs of K blocks: as many runs per tile as give every CTA of the
    grid one work item."""
    tiles = ceil_div(m, config.block_m) * ceil_div(n, config.block_n)
    num_k_blocks = ceil_div(k, BLOCK_K) * num_products
    return max(ceil_div(num_k_blocks, max(grid // tiles, 1)), 1)


def _record(config: Bf16GemmConfig, grid: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m: int, n: int,
            k: int, rows: int, group_rows: int, num_groups: int, pdl: bool) -> bytes:
    """The launch record. A: K-major, seen as [rows, K]; MN-major, [K, M]. B: K-major, seen as
    [G * N, K]; MN-major, the 3-D [G, K, N] (K-grouped: [1, sum_K, N]). D as [rows, N]. Batched: A, B
    and D as the 3-D tensors they are (batch sum: A and B); K-grouped: D too. ``k``: the K extent of A
    and B (K-grouped: sum_K)."""
    kind = config.gemm_type
    sliced = kind in (GemmType.BATCHED, GemmType.BATCH_SUM)
    d_swizzle = SWIZZLE_128B if config.store_cols * config.out_bytes == 128 else SWIZZLE_NONE
    if config.major_a is Major.K:
        # Few rows: load only the rows that exist instead of zero-filled boxes; the rows of shared
        # memory left stale feed only output rows that are never stored.
        a_rows = min(config.block_m, group_rows if group_rows < 8 else align(group_rows, 8))
        a_box = (BLOCK_K, a_rows // config.cluster_n)
        a_dims = (k, m if sliced else rows)
    else:
        a_rows = config.block_m
        a_box, a_dims = (MN_MAJOR_BOX, BLOCK_K), (m, k)
    if sliced:
        tma_a = tma_3d(a.dtype, (*a_dims, num_groups), (tma_pitch(a), _slice_pitch(a)), (*a_box, 1), SWIZZLE_128B)
    else:
        tma_a = tma_2d(a.dtype, *a_dims, tma_pitch(a), *a_box, SWIZZLE_128B)
    if config.major_b is Major.K and not sliced:
        tma_b = tma_2d(b.dtype, k, num_groups * n, tma_pitch(b), BLOCK_K, config.block_n // config.cluster_m,
                       SWIZZLE_128B)
    else:
        b_groups = 1 if kind is GemmType.K_GROUPED else num_groups
        b_dims, b_box = ((k, n), (BLOCK_K, config.block_n)) if config.major_b is Major.K else \
            ((n, k), (MN_MAJOR_BOX, BLOCK_K))
        b_3d = b if b.dim() == 3 else b.unsqueeze(0)
        tma_b = tma_3d(b.dtype, (*b_dims, b_groups), (tma_pitch(b), _slice_pitch(b_3d)), (*b_box, 1), SWIZZLE_128B)
    if kind in (GemmType.BATCHED, GemmType.K_GROUPED):
        tma_d = tma_3d(d.dtype, (n, m, num_groups), (tma_pitch(d), _slice_pitch(d)), (config.store_cols, 64, 1),
                       d_swizzle)
    else:
        tma_d = tma_2d(d.dtype, n, rows, tma_pitch(d), config.store_cols, 64, d_swizzle)
    tma = {"tma_a": tma_a, "tma_b": tma_b, "tma_d": tma_d}
    k_blocks_per_split = ceil_div(ceil_div(k, BLOCK_K), config.split_k)
    if kind is GemmType.BATCH_SUM:
        k_blocks_per_split = _batch_sum_run(config, grid, m, n, k, num_groups)
    values = dict(m=group_rows, n=n, k=k, stage_bytes=(a_rows + config.block_n) * BLOCK_K * 2,
                  k_blocks_per_split=k_blocks_per_split, num_groups=num_groups, ld_d=d.stride(-2))
    return KERNELS.kernel(config).record(grid, tma, values, pdl=pdl)


def describe(gemm_type: GemmType, m: int, n: int, k: int, d: torch.Tensor, num_groups: int = 1,
             accumulate: bool = False) -> GemmDesc:
    """The GemmDesc of a call (M-grouped kinds: ``m`` the rows per expert planned for; K-grouped:
    ``k`` the mean K per expert)."""
    return GemmDesc(gemm_type, m, n, k, num_groups, ab_dtype=torch.bfloat16, out_dtype=d.dtype, accumulate=accumulate)


def plan(desc: GemmDesc, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, major_a: Major, major_b: Major,
         facts: DeviceFacts, config: Bf16GemmConfig | None = None, pdl: bool = False) -> Plan:
    """The plan of the GEMM ``desc`` on kernel operands of these shapes and strides (see the module
    docstring; masked A and D are [G, max_M, ...]; batched A [G, M, K] or [G, K, M], B [G, N, K] or
    [G, K, N], D [G, M, N]; batch sum: the same A and B, D [M, N]). ``config`` overrides the heuristic."""
    kind = desc.gemm_type
    num_groups = desc.num_groups
    k = a.shape[0] if kind is GemmType.K_GROUPED else desc.k
    if kind in (GemmType.BATCHED, GemmType.BATCH_SUM):
        m = rows = a.shape[-2] if major_a is Major.K else a.shape[-1]
    elif major_a is Major.K:
        rows = a.shape[0] if a.dim() == 2 else num_groups * a.shape[1]
        m = rows
    else:
        m = rows = a.shape[1]
    group_rows = a.shape[1] if kind is GemmType.MASKED else rows
    n = d.shape[-1]
    if config is None:
        rows_planned = desc.m
        if kind is GemmType.MASKED:
            rows_planned = min(math.ceil(desc.m * ROUTING_HEADROOM), max(group_rows, desc.m))
        config = select_config(GemmDesc(kind, rows_planned, desc.n, desc.k, num_groups, desc.ab_dtype,
                                        desc.out_dtype, desc.accumulate), facts, major_a, major_b)
    config, grid = settle(config, desc, rows, group_rows, facts, "bf16")
    record = _record(config, grid, a, b, d, m, n, k, rows, group_rows, num_groups, pdl)
    return Plan(config, KERNELS.kernel(config), record)


__all__ = ["OPERANDS", "PARAMS", "Bf16GemmConfig", "build", "describe", "generate_source", "kernel_name", "plan",
           "select_config", "stages_for"]
