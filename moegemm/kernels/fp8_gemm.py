"""Host side of sm90_fp8_gemm.cuh: the config heuristic, code generation and the launch.

M, N and K are run-time values, so a new token count or weight shape never recompiles; the
compiled variants are the (BLOCK_M, BLOCK_N, stages, output dtype, accumulate) combinations the
heuristic picks.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch

from .. import env
from ..jit import compiler
from ..jit.runtime import SWIZZLE_128B, SWIZZLE_NONE, Kernel, KernelFamily, tma_2d
from ..utils import align, ceil_div, get_tma_aligned_size

BLOCK_K = 128
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
BARRIER_BYTES = 8
SFB_SLOT_BYTES = 128  # per stage and SFB row: a TMA box of SFB, aligned as TMA destinations must be
SFB_BOX_K = 4  # K blocks per SFB box: boxes are at least 16 bytes wide
MAX_STAGES = 12
# B bytes one SM keeps in flight: more only queue at the DRAM (H100 at M = 1: 1 x 4096 x 7168 in
# 8 / 12 stages of 64 columns 13.09 / 13.31 us, 1 x 24576 x 1536 in 3 / 6 stages of 192 15.01 /
# 15.36 us; A/Bs of the capped picks at M <= 64: up to 2.2% faster on H100, 2.9% on H200, none more
# than 0.7% slower). Not for splits of three or more CTAs, whose few K blocks per CTA are all ramp:
# on H200 1 x 2112 x 7168 (96 columns, split 4) took 8.03 us in 6 stages, 7.65 in 10.
B_BYTES_IN_FLIGHT = 80 * 1024
MIN_CAPPED_STAGES = 4
# The time model that ranks configs (H100 SXM; fitted on 2026-11-25 to 100 small-M runs of
# 18 shapes, L2 flushed: mean error 9%, the pick 1.6% slower than the best config on average;
# refitted on 2026-12-02 to H200 sweeps, scripts/sweep_fp8_gemm.py: the pick 1.3% slower than the
# best config timed on those 18 shapes, the best on the six M = 4096 ones; the split-K terms below
# refitted on 2026-12-02 (fourth session) to 55 A/Bs of picks at M <= 512, BENCHMARKS.md).
FP8_FLOPS_PER_SM = 1450e12 / 132  # dense FP8 tensor-core rate
DRAM_BYTES_PER_S = 2.9e12
SM_LOAD_BYTES_PER_S = 90e9  # what one SM's TMA loads sustain
K_BLOCK_LATENCY_S = 300e-9  # the consumer's floor per K block: four dependent WGMMAs, promotion, barriers
# ...and its extra for tiles over two SFB blocks (a second SFB row to load and index): H100,
# 2026-11-25, BLOCK_N 64 instead of 56 ran 2-5% faster at M <= 64, N = 7168 (BENCHMARKS.md; measured
# with one TMA box per SFB row, before two-row boxes of a 2-D view).
TWO_SFB_ROWS_LATENCY_S = 20e-9
# ...and for tiles of a dense GEMM whose last block-row is partial (TMA fills the missing rows of its
# A box): H200, 64 x 64 tiles split in two, 96 x 2112 x 7168 11.2 us against 8.9 at M = 128.
PARTIAL_ROWS_LATENCY_S = 80e-9
# Shared-memory traffic per K block, WGMMA operand reads (every warpgroup reads its A rows and all
# of B) plus the TMA writes, at what one SM sustains: set so that a 128 x 128 tile is as busy here as
# on its tensor cores (ncu, H200, 2026-12-02: tensor pipe 80% busy, flagged the bottleneck). Narrow
# tiles re-read A per column: BLOCK_N 64 ran 0.66-0.76x as fast per column as 128 at M = 4096.
SMEM_BYTES_PER_S = 172e9
KERNEL_FIXED_S = 3e-6  # ramp-up (first loads) and drain (last stores)
SPLIT_K_REDUCE_S = 0.75e-6  # one split-K exchange, per CTA of the cluster: barrier round trips...
SPLIT_K_REDUCE_BYTES_PER_S = 20e9  # ...and each CTA's partial sums sent to the others
MAX_SPLIT_K = 8  # portable cluster size
# Clusters of each size that fit on an H100 at once (cuOccupancyMaxActiveClusters, one CTA per SM):
# a cluster must fit in one GPC, so sizes that do not divide the GPCs' SM counts waste SMs.
RESIDENT_CLUSTERS = {1: 132, 2: 66, 3: 39, 4: 30, 5: 22, 6: 17, 7: 15, 8: 15}


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    stages: int
    out_fp32: bool
    accumulate: bool
    cluster_m: int = 1  # 2: two CTAs stacked along M share (multicast) the B tile
    split_k: int = 1  # > 1: a cluster of split_k CTAs shares each tile, splitting its K blocks
    gemm_type: str = "normal"  # or a grouped kind: "contiguous", "psum", "masked" (GemmType)

    @property
    def cluster_size(self) -> int:
        return self.cluster_m * self.split_k

    @property
    def out_cols(self) -> int:
        """Columns of a tile one CTA stores (its slice under split-K)."""
        return self.block_n // self.split_k

    @property
    def out_bytes(self) -> int:
        return 4 if self.out_fp32 else 2

    @property
    def num_threads(self) -> int:
        return self.block_m * 2 + 128

    @property
    def store_cols(self) -> int:
        chunk = 128 // self.out_bytes
        return chunk if self.out_cols >= chunk else self.out_cols

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.stages, self.out_bytes, self.split_k)


def sfb_rows(block_n: int) -> int:
    """SFB rows a tile needs: those of the one or two 128-column blocks it overlaps."""
    return 1 if 128 % block_n == 0 else 2


def smem_bytes(block_m: int, block_n: int, stages: int, out_bytes: int, split_k: int = 1) -> int:
    """Mirrors Fp8GemmConfig::kSmemBytes (the generated source asserts they agree)."""
    stage = block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4 + SFB_SLOT_BYTES * sfb_rows(block_n)
    out_cols = block_n // split_k
    reduce_buffer = block_m // 64 * (split_k - 1) * out_cols * 256
    barriers = 2 * stages + (2 * block_m // 64 if split_k > 1 else 0)
    return block_m * out_cols * out_bytes + stages * stage + reduce_buffer + barriers * BARRIER_BYTES


def valid_block_n(block_n: int, out_bytes: int, split_k: int = 1) -> bool:
    """BLOCK_N values the kernel supports (its static_asserts, and the register budget)."""
    chunk = 128 // out_bytes
    low_bit = block_n & -block_n
    out_cols = block_n // split_k
    return (block_n % (8 * split_k) == 0 and 8 <= block_n <= 192
            and (out_cols < chunk or out_cols % chunk == 0)
            and (block_n <= 128 or block_n % 128 == 0 or block_n <= 128 + low_bit))


def _max_stages(block_m: int, block_n: int, out_bytes: int, split_k: int = 1) -> int:
    stages = 0
    while stages < MAX_STAGES and smem_bytes(block_m, block_n, stages + 1, out_bytes, split_k) <= SMEM_LIMIT:
        stages += 1
    return stages


def stages_for(block_m: int, block_n: int, out_bytes: int, split_k: int = 1) -> int:
    """The stages the heuristic gives a tile: as many as fit, up to B_BYTES_IN_FLIGHT of B where the
    cap applies; fewer than 3 (the tile does not pay) when shared memory holds no more."""
    stages = _max_stages(block_m, block_n, out_bytes, split_k)
    if stages < 3 or split_k > 2:
        return stages
    return min(stages, max(MIN_CAPPED_STAGES, B_BYTES_IN_FLIGHT // (block_n * BLOCK_K)))


def _math_efficiency(block_m: int, block_n: int) -> float:
    """Share of the tensor-core rate a tile keeps: the per-K-block promotion costs about as much as
    32 columns of WGMMA. With one math warpgroup (BLOCK_M = 64) nothing hides it. With three (BLOCK_M
    = 192) each B tile loaded serves 192 rows: such tiles ran 4-6% faster per FLOP, fitted as a
    promotion worth 24 columns (the promotion itself takes 9-11% of the main loop with two warpgroups
    or three). A tile over two SFB blocks chooses its columns' scales at run time, once per run of
    gcd(BLOCK_N, 128) columns sharing one: runs of 8 or 16 columns make that promotion dearer than
    runs of 32 or more. Fitted to H100 runs at M = 4096 (2026-11-25: BLOCK_M 64 45% slower on
    N = 32768) and H200 sweeps (2026-12-02: at M = 128, N = 7168, BLOCK_N 56 ran 1.36x slower per
    column than 64 in the same single wave; later, with per-run scales, 192 x 128 and 128 x 192 tiles
    ran 4% faster per FLOP than 128 x 128 at K >= 2048; every pick of those sweeps at M <= 128 and
    M = 4096 is a config they timed, on average 0.4% slower than the best)."""
    if block_m == 192:
        return block_n / (block_n + 24)
    promotion = 1.0 if sfb_rows(block_n) == 1 else 0.85 if math.gcd(block_n, 128) >= 32 else 0.75
    return block_n / (block_n + 32) * (1.0 if block_m == 128 else 0.7) * promotion


def _estimated_seconds(m: int, n: int, k: int, block_m: int, block_n: int, num_sms: int, out_bytes: int,
                       split_k: int = 1, num_groups: int = 1) -> tuple[float, float]:
    """(Fixed ramp plus the slower of the two below, the busiest SM's time): the busiest SM's K
    blocks (each the longest of its tensor-core time, its shared-memory traffic, its load time and
    the consumer's latency floor) with its split-K exchanges; the problem's DRAM traffic (A and B
    once, D written).
    Grouped: ``num_groups`` products of M = ``m`` rows each."""
    num_tiles = num_groups * ceil_div(m, block_m) * ceil_div(n, block_n)
    clusters = min(num_sms // split_k, RESIDENT_CLUSTERS[split_k])
    waves = ceil_div(num_tiles, clusters)
    k_blocks = ceil_div(ceil_div(k, BLOCK_K), split_k)
    latency = K_BLOCK_LATENCY_S + (TWO_SFB_ROWS_LATENCY_S if sfb_rows(block_n) == 2 else 0.0)
    if num_groups == 1 and m > block_m and m % block_m:
        latency += PARTIAL_ROWS_LATENCY_S
    loaded_rows = min(block_m, m) + block_n
    wgmma_rows = block_m + block_m // 64 * block_n
    per_block = max(latency,
                    2 * block_m * block_n * BLOCK_K / (FP8_FLOPS_PER_SM * _math_efficiency(block_m, block_n)),
                    (loaded_rows + wgmma_rows) * BLOCK_K / SMEM_BYTES_PER_S,
                    loaded_rows * BLOCK_K / SM_LOAD_BYTES_PER_S)
    reduce = 0.0
    if split_k > 1:
        partial_bytes = (split_k - 1) / split_k * block_m * block_n * 4
        reduce = SPLIT_K_REDUCE_S * split_k + partial_bytes / SPLIT_K_REDUCE_BYTES_PER_S
    busiest_sm = waves * (k_blocks * per_block + reduce)
    dram = num_groups * (m * k + n * k + m * n * out_bytes) / DRAM_BYTES_PER_S
    return KERNEL_FIXED_S + max(busiest_sm, dram), busiest_sm


def select_config(m: int, n: int, k: int, out_fp32: bool, accumulate: bool, num_sms: int, num_groups: int = 1,
                  grouped: bool = False, block_ms: tuple[int, ...] | None = None) -> Fp8GemmConfig:
    """The config with the least estimated time; ties (DRAM-bound problems) go to less splitting,
    then to fewer padding rows (no wasted tensor work), then to the least busy SMs (slack for the
    last wave), then to the larger tile (fewer re-reads). Split-K is considered only while the split
    tiles fit on the SMs at once, and not for grouped GEMMs (``num_groups`` products of ``m`` rows)."""
    out_bytes = 4 if out_fp32 else 2
    best, best_key = None, None
    for block_m in block_ms or ((64, 128) if grouped else (64, 128, 192)):
        # Three math warpgroups have registers for 128 columns at most. Grouped tiles over 128
        # columns keep an expert and a row limit live, which costs them the deferred epilogue, and
        # ran no faster (H200, contiguous 128 x 192 against 128 x 128: 7% slower on N = 4096).
        for block_n in range(8, (128 if grouped or block_m == 192 else 192) + 1, 8):
            num_tiles = num_groups * ceil_div(m, block_m) * ceil_div(n, block_n)
            for split_k in range(1, 2 if grouped or block_m == 192 else MAX_SPLIT_K + 1):
                if split_k > 1 and (num_tiles * split_k > num_sms or split_k > ceil_div(k, BLOCK_K)):
                    break
                if not valid_block_n(block_n, out_bytes, split_k):
                    continue
                stages = stages_for(block_m, block_n, out_bytes, split_k)
                if stages < 3:
                    continue
                seconds, busiest_sm = _estimated_seconds(m, n, k, block_m, block_n, num_sms, out_bytes, split_k,
                                                         num_groups)
                key = (round(seconds * 1e9), split_k, ceil_div(m, block_m) * block_m, round(busiest_sm * 1e9),
                       -block_m * block_n)
                if best_key is None or key < best_key:
                    best = Fp8GemmConfig(block_m, block_n, stages, out_fp32, accumulate, split_k=split_k)
                    best_key = key
    # B multicast across CTA pairs (cluster_m=2) is never chosen for now: on H100 (2026-11-25,
    # BENCHMARKS.md) it ran from 2% slower to 2.8% faster than single CTAs at M = 4096, too little to
    # model. Such configs stay available and tested.
    assert best is not None
    return best


def grid_size(config: Fp8GemmConfig, m: int, n: int, num_sms: int) -> int:
    """Persistent grid: one CTA per SM, no more than there are tiles, whole clusters."""
    c = config.cluster_size
    items = -(-m // (config.block_m * config.cluster_m)) * -(-n // config.block_n)
    return min(num_sms // c, items) * c


GEMM_TYPES = {"normal": "kNormal", "contiguous": "kContiguous", "psum": "kContiguousPsum", "masked": "kMasked"}
CONTIGUOUS_ALIGNMENT = 128  # kContiguousAlignment in scheduler.cuh: rows per expert-segment boundary


def generate_source(config: Fp8GemmConfig) -> str:
    return compiler.kernel_stub(
        "sm90_fp8_gemm.cuh",
        f"moegemm::Fp8GemmConfig<{config.block_m}, {config.block_n}, {config.stages}, {config.cluster_m}, "
        f"{config.split_k}, {str(config.out_fp32).lower()}, {str(config.accumulate).lower()}, "
        f"moegemm::GemmType::{GEMM_TYPES[config.gemm_type]}>",
        "moegemm::Fp8GemmParams", "moegemm::sm90_fp8_gemm",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}",
         f'moegemm::kContiguousAlignment == {CONTIGUOUS_ALIGNMENT}, "host and device disagree on the alignment"'))


def kernel_name(config: Fp8GemmConfig) -> str:
    out = "f32" if config.out_fp32 else "bf16"
    acc = "_acc" if config.accumulate else ""
    cluster = f"c{config.cluster_m}" if config.cluster_m > 1 else ""
    split = f"k{config.split_k}" if config.split_k > 1 else ""
    kind = "" if config.gemm_type == "normal" else f"_{config.gemm_type}"
    return (f"sm90_fp8_gemm_nt{kind}_{out}{acc}_m{config.block_m}n{config.block_n}s{config.stages}"
            f"{cluster}{split}")


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, num_tma=5, params_format="QQ8I",
    cluster=config.cluster_size))
build = KERNELS.build


@dataclass(frozen=True)
class Plan:
    """Everything about a call that depends only on shapes and strides, made once per signature."""

    config: Fp8GemmConfig
    kernel: Kernel
    record: bytes

    def launch(self, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
               groups: torch.Tensor | None = None) -> None:
        """Run on inputs of the planned signature (``sfa`` M-major TMA-aligned, ``sfb`` contiguous, both
        16-byte aligned; ``groups`` the grouped kinds' int32 layout or masked_m)."""
        self.launch_pointers(d.get_device(), a.data_ptr(), b.data_ptr(), sfa.data_ptr(), sfb.data_ptr(), d.data_ptr(),
                             0 if groups is None else groups.data_ptr())

    def launch_pointers(self, device: int, a: int, b: int, sfa: int, sfb: int, d: int, groups: int = 0) -> None:
        """``launch`` given the tensors' device index and data pointers (the dense call's hot path)."""
        # D's pointer twice: its TMA descriptor's address, and the pointer of the row-by-row stores.
        self.kernel.launch(self.record, device, a, b, sfa, d, sfb, groups, d)


def _grid(config: Fp8GemmConfig, m: int, n: int, num_groups: int, num_sms: int, device: int) -> tuple:
    """The persistent grid, and the config with multicast dropped where clusters would not fill the GPU."""
    def persistent_grid(config: Fp8GemmConfig) -> int:
        if num_groups == 1:
            return grid_size(config, m, n, num_sms)
        return num_sms // config.cluster_size * config.cluster_size

    grid = persistent_grid(config)
    if config.cluster_m > 1:
        # Multicast pays only while (nearly) every SM can hold a CTA of a resident cluster.
        resident = KERNELS.kernel(config).max_active_clusters(device) * config.cluster_m
        if resident < 0.95 * min(num_sms, grid) or grid == 0:
            config = dataclasses.replace(config, cluster_m=1)
            grid = persistent_grid(config)
    if config.split_k > 1:
        # A cluster must fit in one GPC, so fewer clusters than SMs / split_k may fit at once; a
        # grid larger than that would run a second, nearly empty wave.
        resident = KERNELS.kernel(config).max_active_clusters(device)
        grid = min(grid, max(resident, 1) * config.split_k)
    return config, grid


def _record(config: Fp8GemmConfig, grid: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, rows: int,
            group_rows: int, num_groups: int, pdl: bool) -> bytes:
    """The launch record; A and D are seen as [rows, K] and [rows, N], B as [G * N, K], SFA as
    ``[G * ceil(K/128), group_rows]`` M-major (G = 1 but for masked), SFB as one flat row (or as
    ``[G * ceil(N/128), ceil(K/128)]`` for boxes of two rows)."""
    k = a.shape[-1]
    n = b.shape[-2]
    num_k_blocks = ceil_div(k, BLOCK_K)
    sfa_groups = num_groups if config.gemm_type == "masked" else 1
    d_swizzle = SWIZZLE_128B if config.store_cols * config.out_bytes == 128 else SWIZZLE_NONE
    # Few rows: load only the rows that exist instead of zero-filled boxes (SFA in 16-byte boxes); the
    # rows of shared memory left stale feed only output rows that are never stored. (H200, M = 1, boxes
    # of 8 A rows and 64 SFA floats before: 1 x 7168 x 16384 36.6 -> 30.7 us, 1 x 4096 x 7168
    # 11.1 -> 10.2.)
    a_rows = min(config.block_m, group_rows if group_rows < 8 else align(group_rows, 8))
    sfa_rows = min(config.block_m, align(group_rows, 4))
    sfb_numel = num_groups * ceil_div(n, 128) * num_k_blocks
    # Tiles over two SFB blocks take both rows in one box where rows are 16-byte aligned.
    sfb_box_rows = 2 if sfb_rows(config.block_n) == 2 and num_k_blocks % SFB_BOX_K == 0 else 1
    if sfb_box_rows == 2:
        sfb_descriptor = tma_2d(torch.float32, num_k_blocks, num_groups * ceil_div(n, 128), num_k_blocks * 4,
                                SFB_BOX_K, 2, SWIZZLE_NONE, 512)
    else:
        sfb_descriptor = tma_2d(torch.float32, sfb_numel, 1, align(sfb_numel * 4, 16), SFB_BOX_K, 1, SWIZZLE_NONE, 512)
    stage_bytes = (a_rows + config.block_n) * BLOCK_K + sfa_rows * 4 + sfb_rows(config.block_n) * SFB_BOX_K * 4
    tma = (tma_2d(a.dtype, k, rows, a.stride(-2), BLOCK_K, a_rows, SWIZZLE_128B, 0),
           tma_2d(b.dtype, k, num_groups * n, b.stride(-2), BLOCK_K, config.block_n // config.cluster_m,
                  SWIZZLE_128B, 128),
           tma_2d(torch.float32, group_rows, sfa_groups * num_k_blocks, get_tma_aligned_size(group_rows, 4) * 4,
                  sfa_rows, 1, SWIZZLE_NONE, 256),
           tma_2d(d.dtype, n, rows, d.stride(-2) * d.element_size(), config.store_cols, 64, d_swizzle, 384),
           sfb_descriptor)
    params = (0, 0, group_rows, n, k, stage_bytes, ceil_div(num_k_blocks, config.split_k), num_groups,
              d.stride(-2), sfb_box_rows)
    return KERNELS.kernel(config).record(grid, tma, params, num_pointer_params=2, pdl=pdl)


def plan(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, accumulate: bool, num_sms: int,
         config: Fp8GemmConfig | None = None, pdl: bool = False) -> Plan:
    """The plan of D (+)= A @ B^T for these shapes; ``config`` overrides the heuristic (tests use it
    to cover every kind of config); ``pdl``: launch with programmatic dependent launch."""
    m, k = a.shape
    n = b.shape[0]
    if config is None:
        config = select_config(m, n, k, d.dtype == torch.float32, accumulate, num_sms)
    config, grid = _grid(config, m, n, 1, num_sms, d.device.index)
    if env.flag("MOEGEMM_PRINT_CONFIGS"):
        print(f"[moegemm] fp8_gemm_nt m={m} n={n} k={k}: {config}, grid {grid}", file=sys.stderr)
    return Plan(config, KERNELS.kernel(config), _record(config, grid, a, b, d, m, m, 1, pdl))


def select_grouped_config(kind: str, expected_m: int, n: int, k: int, out_fp32: bool, num_sms: int,
                          num_groups: int) -> Fp8GemmConfig:
    """The grouped heuristic: select_config for ``num_groups`` products of ``expected_m`` rows; masked
    experts of 129 to 192 rows in one block of three math warpgroups, larger ones with B multicast
    across the CTA pair of each two block-rows."""
    if kind == "masked" and 128 < expected_m <= 192:
        # In 128-row blocks the second block of such an expert would keep one warpgroup idle while
        # its pair runs the full block.
        config = select_config(expected_m, n, k, out_fp32, False, num_sms, num_groups=num_groups, grouped=True,
                               block_ms=(192,))
        return dataclasses.replace(config, gemm_type=kind)
    config = select_config(max(expected_m, 1), n, k, out_fp32, False, num_sms, num_groups=num_groups, grouped=True)
    if kind == "masked" and expected_m > config.block_m and config.block_n % 16 == 0:
        # Each block-row of an expert reads all of its B: at 192 rows the L2 was the busiest unit
        # (ncu, H100: 94% of its throughput; 1.4 GB read from DRAM for 1.0 GB of inputs).
        config = dataclasses.replace(config, cluster_m=2)
    return dataclasses.replace(config, gemm_type=kind)


def plan_grouped(kind: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, num_sms: int, expected_m: int,
                 config: Fp8GemmConfig | None = None, pdl: bool = False) -> Plan:
    """The plan of a grouped GEMM (``kind``: contiguous, psum or masked). A [M_total, K] or
    [G, max_M, K], B [G, N, K], D like A with N columns; ``expected_m``: rows per expert the
    heuristic assumes."""
    num_groups, n, k = b.shape
    rows = a.shape[0] if a.dim() == 2 else num_groups * a.shape[1]
    group_rows = rows if kind != "masked" else a.shape[1]
    if config is None:
        config = select_grouped_config(kind, expected_m, n, k, d.dtype == torch.float32, num_sms, num_groups)
    config = dataclasses.replace(config, gemm_type=kind)
    config, grid = _grid(config, rows, n, num_groups, num_sms, d.device.index)
    if env.flag("MOEGEMM_PRINT_CONFIGS"):
        print(f"[moegemm] grouped ({kind}) G={num_groups} rows={rows} expected_m={expected_m} n={n} k={k}: "
              f"{config}, grid {grid}", file=sys.stderr)
    return Plan(config, KERNELS.kernel(config), _record(config, grid, a, b, d, rows, group_rows, num_groups, pdl))


__all__ = ["Fp8GemmConfig", "Plan", "build", "generate_source", "plan", "plan_grouped", "select_config",
           "select_grouped_config", "stages_for"]
