"""Host side of sm90_fp8_gemm.cuh: the FP8 family's tiles and cost terms for the config search, code
generation, and the launch plan.

M, N and K are run-time values, so a new token count or weight shape never recompiles; the compiled
variants are the configs (tile, stages, cluster, output dtype, accumulation, GemmType) the heuristic
picks. Constants of the time model: BENCHMARKS.md, "The config model".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..device import DeviceFacts
from ..gemm.config import KIND_NAMES, GemmConfig, select_tile, settle, smem_layout_bytes
from ..gemm.config import Plan as GemmPlan
from ..gemm.desc import GemmDesc, GemmType
from ..gemm.heuristic import Tile
from ..intmath import align, ceil_div, get_tma_aligned_size
from ..jit import compiler
from ..jit.runtime import (
    SWIZZLE_128B,
    SWIZZLE_NONE,
    TMA_DESCRIPTOR_BYTES,
    KernelFamily,
    ParamsLayout,
    Slot,
    tma_2d,
    tma_3d,
)

BLOCK_K = 128
SFB_SLOT_BYTES = 128  # per stage and SFB row: a TMA box of SFB, aligned as TMA destinations must be
SFB_BOX_K = 4  # K blocks per SFB box: boxes are at least 16 bytes wide
MAX_STAGES = 12
# B bytes one SM keeps in flight: more only queue at the DRAM. Not for splits of three or more CTAs,
# whose few K blocks per CTA are all ramp.
B_BYTES_IN_FLIGHT = 80 * 1024
MIN_CAPPED_STAGES = 4
FP8_FLOPS_PER_SM = 1450e12 / 132  # dense FP8 tensor-core rate of an SM90 SM
SLABS_PROMOTION_COLUMNS = 32  # BLOCK_M 256: the promotion's cost in WGMMA columns (two slabs per warpgroup)
K_BLOCK_LATENCY_S = 300e-9  # the consumer's floor per K block: four dependent WGMMAs, promotion, barriers
TWO_SFB_ROWS_LATENCY_S = 20e-9  # ...plus a second SFB row to load and index (tiles over two SFB blocks)
PARTIAL_ROWS_LATENCY_S = 80e-9  # ...plus TMA's zero fill of a dense GEMM's partial last block-row
MAX_SPLIT_K = 8  # portable cluster size
CONTIGUOUS_ALIGNMENT = 128  # kContiguousAlignment in sm90/scheduler.cuh: rows per expert-segment boundary
# Masked experts' counts vary around expected_m as routing makes them (the bench draws 0.7x to 1.3x):
# the tile is planned for the largest, so that the experts above the mean pay no second block-row.
ROUTING_HEADROOM = 1.3
RECIPE_1D1D = (1, 1, 128)  # B scaled per 1x128 block of its rows like A (weight gradients): FP32 out

# Fp8GemmParams in sm90_fp8_gemm.cuh, member by member; a launch passes OPERANDS' addresses in order
# ("maps": the K-grouped kind's workspace of per-expert descriptors, k_grouped_plan).
OPERANDS = ("a", "b", "sfa", "sfb", "d", "groups", "maps")
PARAMS = ParamsLayout("moegemm::Fp8GemmParams", (
    Slot("tma_a", "tma", "a"), Slot("tma_b", "tma", "b"), Slot("tma_sfa", "tma", "sfa"), Slot("tma_d", "tma", "d"),
    Slot("tma_sfb", "tma", "sfb"), Slot("groups", "ptr", "groups"), Slot("d", "ptr", "d"),
    *(Slot(name, "u32") for name in ("m", "n", "k", "stage_bytes", "k_blocks_per_split", "num_groups", "ld_d",
                                      "sfb_box_rows")),
    Slot("a_data", "ptr", "a"), Slot("b_data", "ptr", "b"), Slot("expert_maps", "ptr", "maps")), OPERANDS)


@dataclass(frozen=True)
class Fp8GemmConfig(GemmConfig):
    sfb_per_column: bool = False  # the 1D1D recipe: one B scale per 1x128 block of a row of B

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.stages, self.out_bytes, self.split_k, self.sfb_per_column)


def sfb_rows(block_n: int) -> int:
    """SFB rows a tile needs: those of the one or two 128-column blocks it overlaps."""
    return 1 if 128 % block_n == 0 else 2


def sfb_stage_bytes(block_n: int, sfb_per_column: bool) -> int:
    """A stage's SFB slot: a box of each SFB row, or (1D1D) the tile's columns' scales."""
    return align(block_n * 4, 128) if sfb_per_column else SFB_SLOT_BYTES * sfb_rows(block_n)


def smem_bytes(block_m: int, block_n: int, stages: int, out_bytes: int, split_k: int = 1,
               sfb_per_column: bool = False) -> int:
    """Mirrors Fp8GemmConfig::kSmemBytes (the generated source asserts they agree)."""
    stage = block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4 + sfb_stage_bytes(block_n, sfb_per_column)
    return smem_layout_bytes(block_m, block_n, stages, out_bytes, split_k, stage)


def valid_block_n(block_n: int, out_bytes: int, split_k: int = 1, sfb_per_column: bool = False) -> bool:
    """BLOCK_N values the kernel supports (its static_asserts, and the register budget). 1D1D (FP32
    out): up to 160 columns, stored in swizzled chunks, or (as DeepGEMM does) in one plain box whose
    rows lie 32 or 96 bytes apart modulo 128, so that the staging writes meet no bank conflicts."""
    chunk = 128 // out_bytes
    low_bit = block_n & -block_n
    out_cols = block_n // split_k
    if sfb_per_column:
        return block_n % 8 == 0 and 8 <= block_n <= 160 and (block_n < chunk or block_n % chunk == 0 or
                                                               block_n % 16 == 8)
    return (block_n % (8 * split_k) == 0 and 8 <= block_n <= 192
            and (out_cols < chunk or out_cols % chunk == 0)
            and (block_n <= 128 or block_n % 128 == 0 or block_n <= 128 + low_bit))


def stages_for(block_m: int, block_n: int, out_bytes: int, split_k: int, facts: DeviceFacts,
               sfb_per_column: bool = False) -> int:
    """The stages the heuristic gives a tile: as many as fit, up to B_BYTES_IN_FLIGHT of B where the
    cap applies; fewer than 3 (the tile does not pay) when shared memory holds no more."""
    stages = 0
    while stages < MAX_STAGES and smem_bytes(block_m, block_n, stages + 1, out_bytes, split_k,
                                             sfb_per_column) <= facts.smem_per_block:
        stages += 1
    if stages < 3 or split_k > 2:
        return stages
    return min(stages, max(MIN_CAPPED_STAGES, B_BYTES_IN_FLIGHT // (block_n * BLOCK_K)))


def _math_efficiency(block_m: int, block_n: int, grouped: bool = False, sfb_per_column: bool = False) -> float:
    """Share of the tensor-core rate a tile keeps. The per-K-block promotion costs about as much as 32
    columns of WGMMA; with one math warpgroup (BLOCK_M = 64) nothing hides it; with three (BLOCK_M =
    192) each B tile loaded serves 192 rows, fitted as a promotion worth 24 columns. A tile over two
    SFB blocks chooses its columns' scales once per run of gcd(BLOCK_N, 128) columns sharing one:
    runs of 8 or 16 columns make that promotion dearer than runs of 32 or more. Grouped 128 x 192
    tiles (runs of 64) pay nothing for it: refitted to the grouped sweep of BENCHMARKS.md, 2026-12-06
    (twenty-first session); the dense factor awaits its own sweep. 1D1D tiles scale every column by
    its own scale, whatever the SFB blocks: no choice to pay for."""
    if block_m == 192:
        return block_n / (block_n + 24)
    if block_m == 256:
        return block_n / (block_n + SLABS_PROMOTION_COLUMNS)
    run = math.gcd(block_n, 128)
    uniform = sfb_rows(block_n) == 1 or sfb_per_column
    promotion = 1.0 if uniform or (grouped and run >= 64) else 0.85 if run >= 32 else 0.75
    return block_n / (block_n + 32) * (1.0 if block_m == 128 else 0.7) * promotion


class Fp8CostTerms:
    """The FP8 kernel's part of the time model (moegemm.gemm.heuristic): its tiles and what a K block
    of each costs. ``block_ms``: the BLOCK_M values to try."""

    block_k = BLOCK_K

    def __init__(self, block_ms: tuple[int, ...]):
        self.block_ms = block_ms

    def tiles(self, desc: GemmDesc, facts: DeviceFacts) -> Iterator[Tile]:
        kind = desc.gemm_type
        # 1D1D: a K block's column scales take registers of their own: 64 or 128 rows, 160 columns at
        # most, no split-K (sm90_fp8_gemm.cuh's static_assert); 4 stages at least, no pairs (3 stages
        # and pairs ran slower: BENCHMARKS.md, 2026-12-07, twenty-sixth session).
        per_column = desc.recipe == RECIPE_1D1D
        min_stages = 4 if per_column else 3
        for block_m in self.block_ms:
            if per_column and block_m > 128:
                continue
            # Three math warpgroups, or two of two slabs, have registers for 128 columns at most. Over
            # 128 columns, grouped tiles take 192 only (BENCHMARKS.md, 2026-12-06, twenty-first session).
            wide = block_m == 128 or (block_m < 128 and not kind.grouped)
            for block_n in range(8, (160 if per_column else 192 if wide else 128) + 1, 8):
                if kind.grouped and not per_column and 128 < block_n < 192:
                    continue
                if valid_block_n(block_n, desc.out_bytes, 1, per_column) and \
                        stages_for(block_m, block_n, desc.out_bytes, 1, facts, per_column) >= min_stages:
                    yield Tile(block_m, block_n)
                    # Pairs that share an operand, B (stacked along M) or A (side by side), for dense
                    # GEMMs with whole A tiles and SMs for a pair; contiguous GEMMs whose experts hold
                    # two block-rows share B (pairs sharing A ran slower: BENCHMARKS.md, "The config
                    # model"), in tiles of 128 columns at most (in pairs, 192 ran slower than alone:
                    # BENCHMARKS.md, 2026-12-06, twenty-first session).
                    pairs = facts.clusters(2) > 0 and not per_column
                    if pairs and kind is GemmType.NORMAL and desc.m >= block_m:
                        yield Tile(block_m, block_n, cluster_n=2)
                    stacked = kind is GemmType.NORMAL or (kind in (GemmType.CONTIGUOUS, GemmType.PSUM) and
                                                          block_n <= 128)
                    if pairs and stacked and desc.m >= 2 * block_m and block_n % 16 == 0:
                        yield Tile(block_m, block_n, cluster_m=2)
                # Split-K only while the split tiles fit on the SMs at once, and not for grouped GEMMs.
                num_tiles = desc.num_groups * ceil_div(desc.m, block_m) * ceil_div(desc.n, block_n)
                for split_k in range(2, 2 if kind.grouped or block_m > 128 or per_column else MAX_SPLIT_K + 1):
                    if num_tiles * split_k > facts.num_sms or split_k > ceil_div(desc.k, BLOCK_K):
                        break
                    if valid_block_n(block_n, desc.out_bytes, split_k) and \
                            stages_for(block_m, block_n, desc.out_bytes, split_k, facts) >= 3:
                        yield Tile(block_m, block_n, split_k)

    def tensor_seconds(self, desc: GemmDesc, tile: Tile) -> float:
        flops = 2 * tile.block_m * tile.block_n * BLOCK_K
        efficiency = _math_efficiency(tile.block_m, tile.block_n, desc.gemm_type.grouped, desc.recipe == RECIPE_1D1D)
        return flops / (FP8_FLOPS_PER_SM * efficiency)

    def latency_seconds(self, desc: GemmDesc, tile: Tile) -> float:
        two_rows = sfb_rows(tile.block_n) == 2 and desc.recipe != RECIPE_1D1D
        latency = K_BLOCK_LATENCY_S + (TWO_SFB_ROWS_LATENCY_S if two_rows else 0.0)
        if desc.gemm_type is GemmType.NORMAL and desc.m > tile.block_m and desc.m % tile.block_m:
            latency += PARTIAL_ROWS_LATENCY_S
        return latency


def _config(desc: GemmDesc, tile: Tile, facts: DeviceFacts) -> Fp8GemmConfig:
    per_column = desc.recipe == RECIPE_1D1D
    stages = stages_for(tile.block_m, tile.block_n, desc.out_bytes, tile.split_k, facts, per_column)
    return Fp8GemmConfig(tile.block_m, tile.block_n, stages, desc.out_dtype == torch.float32, desc.accumulate,
                         tile.cluster_m, tile.split_k, desc.gemm_type, tile.cluster_n, per_column)


def select_config(desc: GemmDesc, facts: DeviceFacts) -> Fp8GemmConfig:
    """The config of the least estimated time (moegemm.gemm.config.select_tile): dense GEMMs with
    BLOCK_M 64, 128, 192 or 256, split-K for few tiles, CTA pairs sharing A or B where the L2 binds;
    grouped ones as select_tile says."""
    tile = select_tile(desc, facts, Fp8CostTerms, (64, 128, 192, 256))
    return _config(desc, tile, facts)


def generate_source(config: Fp8GemmConfig) -> str:
    per_column = ", true" if config.sfb_per_column else ""
    return compiler.kernel_stub(
        "sm90_fp8_gemm.cuh",
        f"moegemm::Fp8GemmConfig<{config.block_m}, {config.block_n}, {config.cpp_common_args()}{per_column}>",
        PARAMS.cpp_type, "moegemm::sm90_fp8_gemm",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}",
         f'moegemm::kContiguousAlignment == {CONTIGUOUS_ALIGNMENT}, "host and device disagree on the alignment"',
         PARAMS.size_check()), nvcc_checks=PARAMS.offset_checks())


def kernel_name(config: Fp8GemmConfig) -> str:
    out = "f32" if config.out_fp32 else "bf16"
    acc = "_acc" if config.accumulate else ""
    recipe = "_1d1d" if isinstance(config, Fp8GemmConfig) and config.sfb_per_column else ""
    return f"sm90_fp8_gemm_nt{KIND_NAMES[config.gemm_type]}{recipe}_{out}{acc}_{config.name_suffix()}"


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=PARAMS, cluster=config.cluster_size))
build = KERNELS.build


class Plan(GemmPlan):
    def launch(self, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
               groups: torch.Tensor | None = None, maps: torch.Tensor | None = None) -> None:
        """Run on inputs of the planned signature (``sfa`` M-major TMA-aligned, ``sfb`` contiguous, both
        16-byte aligned; ``groups`` the grouped kinds' int32 layout or masked_m, or K-grouped's
        segment lengths; ``maps`` K-grouped's workspace, of the bytes k_grouped_plan gives)."""
        self.launch_pointers(d.get_device(), a.data_ptr(), b.data_ptr(), sfa.data_ptr(), sfb.data_ptr(), d.data_ptr(),
                             0 if groups is None else groups.data_ptr(), 0 if maps is None else maps.data_ptr())


def a_side_tma(config: GemmConfig, a: torch.Tensor, d: torch.Tensor, rows: int, group_rows: int,
               num_groups: int) -> tuple[dict[str, tuple], int]:
    """The descriptors of A, SFA and D (A and D seen as [rows, K] and [rows, N], SFA as
    ``[G * ceil(K/128), group_rows]`` M-major, G = 1 but for masked) and the bytes a stage's loads of
    A and SFA deliver."""
    n = d.shape[-1]
    d_swizzle = SWIZZLE_128B if config.store_cols * config.out_bytes == 128 else SWIZZLE_NONE
    tma, a_side_bytes = activation_tma(a, rows, group_rows, config.gemm_type, num_groups, config.block_m,
                                       config.cluster_n)
    if config.gemm_type in (GemmType.BATCHED, GemmType.K_GROUPED):  # D [G, M, N]
        tma["tma_d"] = tma_3d(d.dtype, (n, group_rows, num_groups), (d.stride(-2) * d.element_size(),
                              d.stride(0) * d.element_size()), (config.store_cols, 64, 1), d_swizzle)
    else:
        tma["tma_d"] = tma_2d(d.dtype, n, rows, d.stride(-2) * d.element_size(), config.store_cols, 64, d_swizzle)
    return tma, a_side_bytes


def activation_tma(a: torch.Tensor, rows: int, group_rows: int, gemm_type: GemmType, num_groups: int,
                   tile_rows: int, box_split: int = 1) -> tuple[dict[str, tuple], int]:
    """The descriptors of A (``[rows, K]``, boxes of a tile's ``tile_rows`` rows, ``box_split`` CTAs
    of a pair loading a share each) and SFA (``[G * ceil(K/128), group_rows]`` M-major, G = 1 but for
    masked), and the bytes a stage's loads of them deliver to each CTA."""
    k = a.shape[-1]
    sfa_groups = num_groups if gemm_type in (GemmType.MASKED, GemmType.BATCHED) else 1
    # Few rows: load only the rows that exist instead of zero-filled boxes (SFA in 16-byte boxes); the
    # rows of shared memory left stale feed only output rows that are never stored.
    a_rows = min(tile_rows, group_rows if group_rows < 8 else align(group_rows, 8))
    sfa_rows = min(tile_rows, align(group_rows, 4))
    if gemm_type is GemmType.BATCHED:  # [G, M, K] of any pitches
        tma_a = tma_3d(a.dtype, (k, group_rows, num_groups), (a.stride(-2), a.stride(0)), (BLOCK_K, a_rows, 1),
                       SWIZZLE_128B)
    else:
        tma_a = tma_2d(a.dtype, k, rows, a.stride(-2), BLOCK_K, a_rows // box_split, SWIZZLE_128B)
    tma = {"tma_a": tma_a,
           "tma_sfa": tma_2d(torch.float32, group_rows, sfa_groups * ceil_div(k, BLOCK_K),
                             get_tma_aligned_size(group_rows, 4) * 4, sfa_rows, 1, SWIZZLE_NONE)}
    return tma, a_rows * BLOCK_K + sfa_rows * 4


def _record(config: Fp8GemmConfig, grid: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, rows: int,
            group_rows: int, num_groups: int, pdl: bool) -> bytes:
    """The launch record; A, SFA and D as ``a_side_tma`` says, B as [G * N, K] (K-grouped: [N, sum_K]),
    SFB as one flat row (or as ``[G * ceil(N/128), ceil(K/128)]`` for boxes of two rows; 1D1D as
    ``[ceil(K/128), N']``)."""
    k = a.shape[-1]
    n = b.shape[-2]
    num_k_blocks = ceil_div(k, BLOCK_K)
    tma, a_side_bytes = a_side_tma(config, a, d, rows, group_rows, num_groups)
    sfb_numel = num_groups * ceil_div(n, 128) * num_k_blocks
    # Tiles over two SFB blocks take both rows in one box where rows are 16-byte aligned.
    sfb_box_rows = 2 if sfb_rows(config.block_n) == 2 and num_k_blocks % SFB_BOX_K == 0 else 1
    if config.sfb_per_column:  # [ceil(K/128), N'] N-major like SFA, a box of the tile's columns
        pitch = get_tma_aligned_size(n, 4) * 4
        sfb = tma_2d(torch.float32, n, num_k_blocks, pitch, config.block_n, 1, SWIZZLE_NONE)
        sfb_bytes = config.block_n * 4
    elif sfb_box_rows == 2:
        sfb = tma_2d(torch.float32, num_k_blocks, num_groups * ceil_div(n, 128), num_k_blocks * 4, SFB_BOX_K, 2,
                     SWIZZLE_NONE)
        sfb_bytes = 2 * SFB_BOX_K * 4
    else:
        sfb = tma_2d(torch.float32, sfb_numel, 1, align(sfb_numel * 4, 16), SFB_BOX_K, 1, SWIZZLE_NONE)
        sfb_bytes = sfb_rows(config.block_n) * SFB_BOX_K * 4
    stage_bytes = a_side_bytes + config.block_n * BLOCK_K + sfb_bytes
    if config.gemm_type is GemmType.BATCHED:
        tma["tma_b"] = tma_3d(b.dtype, (k, n, num_groups), (b.stride(-2), b.stride(0)), (BLOCK_K, config.block_n, 1),
                              SWIZZLE_128B)
    else:
        b_rows = n if config.gemm_type is GemmType.K_GROUPED else num_groups * n
        tma["tma_b"] = tma_2d(b.dtype, k, b_rows, b.stride(-2), BLOCK_K, config.block_n // config.cluster_m,
                              SWIZZLE_128B)
    tma["tma_sfb"] = sfb
    values = dict(m=group_rows, n=n, k=k, stage_bytes=stage_bytes,
                  k_blocks_per_split=ceil_div(num_k_blocks, config.split_k), num_groups=num_groups,
                  ld_d=d.stride(-2), sfb_box_rows=sfb_box_rows)
    return KERNELS.kernel(config).record(grid, tma, values, pdl=pdl)


def describe(gemm_type: GemmType, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, accumulate: bool = False,
             expected_m: int | None = None, recipe: tuple[int, int, int] = (1, 128, 128)) -> GemmDesc:
    """The GemmDesc of a call: A [M, K] (grouped: [M_total, K] or [G, max_M, K]; batched: [G, M, K]), B
    [N, K] or [G, N, K], D like A with N columns; ``expected_m``: the rows per expert a grouped call
    plans for; ``recipe``: (1, 128, 128), or RECIPE_1D1D for dense GEMMs; ``accumulate``: dense and
    batched."""
    if gemm_type is GemmType.NORMAL:
        return GemmDesc(gemm_type, a.shape[0], b.shape[0], a.shape[1], out_dtype=d.dtype, accumulate=accumulate,
                        recipe=recipe)
    num_groups, n, k = b.shape
    if gemm_type is GemmType.BATCHED:
        return GemmDesc(gemm_type, a.shape[1], n, k, num_groups, out_dtype=d.dtype, accumulate=accumulate)
    return GemmDesc(gemm_type, expected_m, n, k, num_groups, out_dtype=d.dtype)


def plan(desc: GemmDesc, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, facts: DeviceFacts,
         config: Fp8GemmConfig | None = None, pdl: bool = False) -> Plan:
    """The plan of the GEMM ``desc`` (see ``describe``) on tensors of these shapes and strides.
    ``config`` overrides the heuristic (tests use it to cover every kind of config); ``pdl``: launch
    with programmatic dependent launch."""
    rows, group_rows = row_counts(desc, a)
    if config is None:
        config = select_config(planned_desc(desc, group_rows), facts)
    config, grid = settle(config, desc, rows, group_rows, facts, "fp8")
    return Plan(config, KERNELS.kernel(config),
                _record(config, grid, a, b, d, rows, group_rows, desc.num_groups, pdl))


def k_grouped_plan(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, facts: DeviceFacts,
                   config: Fp8GemmConfig | None = None, pdl: bool = False) -> tuple[Plan, int]:
    """The plan of a K-grouped GEMM (MoE weight gradients, the 1D1D recipe): ``D[g] += A_g @ B_g^T`` for
    D float32 [G, M, N] (row-major), A_g [M, k_g] and B_g [N, k_g] K-major, each expert's block after
    the previous one's, here seen as A [M, sum_k] and B [N, sum_k] (the templates of the experts'
    descriptors, which the producer rebases per expert: ExpertMaps in sm90/pipeline.cuh); SFA
    [sum_k / 128, M'] and SFB [sum_k / 128, N'] M- and N-major (TMA-aligned); the segment lengths
    k_g (multiples of 128) are read on the GPU. Also the bytes of the launch's descriptor workspace."""
    num_groups, m, n = d.shape
    desc = GemmDesc(GemmType.K_GROUPED, m, n, max(a.shape[-1] // max(num_groups, 1), BLOCK_K), num_groups,
                    out_dtype=torch.float32, accumulate=True, recipe=RECIPE_1D1D)
    k_grouped = plan(desc, a, b, d, facts, config, pdl)
    # ExpertMaps::kSlots descriptor pairs per CTA, for a grid of at most one CTA per SM.
    return k_grouped, facts.num_sms * (k_grouped.config.stages + 1) * 2 * TMA_DESCRIPTOR_BYTES


def row_counts(desc: GemmDesc, a: torch.Tensor) -> tuple[int, int]:
    """A's rows as the kernels see them ([rows, K]) and the rows per expert (masked: max_M)."""
    if desc.gemm_type is GemmType.BATCHED:  # the grid counts one product's rows
        return a.shape[1], a.shape[1]
    rows = a.shape[0] if a.dim() == 2 else desc.num_groups * a.shape[1]
    return rows, a.shape[1] if desc.gemm_type is GemmType.MASKED else rows


def planned_desc(desc: GemmDesc, group_rows: int) -> GemmDesc:
    """The problem the heuristic plans for: masked experts' counts with ROUTING_HEADROOM."""
    if desc.gemm_type is not GemmType.MASKED:
        return desc
    return dataclasses.replace(desc, m=min(math.ceil(desc.m * ROUTING_HEADROOM), max(group_rows, desc.m)))


__all__ = ["CONTIGUOUS_ALIGNMENT", "OPERANDS", "PARAMS", "RECIPE_1D1D", "Fp8GemmConfig", "Plan", "a_side_tma",
           "activation_tma", "build", "describe", "generate_source", "k_grouped_plan", "kernel_name", "plan",
           "planned_desc", "row_counts", "select_config", "stages_for"]
