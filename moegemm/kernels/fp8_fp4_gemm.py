"""Host side of the FP8 x FP4 family's two kernels: their configs, code generation and launch plans.

sm90_fp8_fp4_gemm.cuh is the FP8 kernel with B widened in shared memory by the producer warpgroup's
spare warps, so its parameters, time model and most of its plan are the FP8 family's
(moegemm.kernels.fp8_gemm). sm90_fp8_fp4_gemm_swap_ab.cuh serves few tokens (dense M <= 128, masked
experts planned for <= 167 rows): the weights widen in the math warps' registers as the WGMMAs' A
operand. From WIDEN_MIN_ROWS planned rows the FP8 kernel itself runs on B that fp4_widen.py widened
before the call. ``plan`` picks among the three.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import env
from ..device import DeviceFacts
from ..gemm import heuristic
from ..gemm.config import KIND_NAMES, GemmConfig, settle, smem_layout_bytes
from ..gemm.desc import GemmDesc, GemmType
from ..gemm.heuristic import Tile
from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import SWIZZLE_64B, SWIZZLE_128B, SWIZZLE_NONE, KernelFamily, ParamsLayout, Slot, tma_2d
from . import fp8_gemm
from .fp4_widen import E2M1_LUT_BYTES
from .fp8_gemm import BLOCK_K, CONTIGUOUS_ALIGNMENT, OPERANDS, PARAMS

TRANSFORM_THREADS = 96  # kTransformThreads: the producer warpgroup's warps 1 to 3
# The transform warps' rate in the model, values per second per SM: fitted to the picks, not their
# measured ~10e9, which favoured narrow tiles that ran up to 54% slower (BENCHMARKS.md, "FP8 x FP4").
TRANSFORM_VALUES_PER_S = 45e9
MAX_STAGES = 8
# Planned rows per expert from which B is widened once per call (fp4_widen.py) and the FP8 kernel
# runs: the pass reads the FP4 weights and writes them as e4m3 once, so it pays back where several
# M blocks read each weight (BENCHMARKS.md, nineteenth session).
WIDEN_MIN_ROWS = 192


@dataclass(frozen=True)
class Fp8Fp4GemmConfig(GemmConfig):
    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.stages, self.out_bytes, self.split_k)


def smem_bytes(block_m: int, block_n: int, stages: int, out_bytes: int, split_k: int = 1) -> int:
    """Mirrors Fp8Fp4GemmConfig::kSmemBytes: per stage A, the widened B, B's packed values (64 bytes a
    row), SFA, B's packed scales (a 128-byte aligned slot), the column scales and a barrier."""
    stage = (block_m + block_n) * BLOCK_K + block_m * 4 + block_n * 64 + align(block_n * 4, 128) + block_n * 4 + 16
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


def _widening_name(config: Fp8Fp4GemmConfig) -> str:
    return fp8_gemm.kernel_name(config).replace("sm90_fp8_gemm", "sm90_fp8_fp4_gemm", 1)


KERNELS = KernelFamily(_widening_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=PARAMS, cluster=config.cluster_size))
# The FP8 plan's launch (A, SFA, B, SFB, D, groups), with B the packed FP4 bytes and SFB the packed
# exponents [G * ceil(K/128), N'] that ``quant.transform_sf_into_required_layout`` makes, or for a
# plan of the FP8 kernel (``takes_widened_b``) what ``fp4_widen.Plan.run`` makes of them.
Plan = fp8_gemm.Plan


# ---- the swap-AB kernel (sm90_fp8_fp4_gemm_swap_ab.cuh) -------------------------------------------------------

SWAP_AB_MAX_TOKENS = 128  # kTokens: WGMMA columns per CTA (the scratch accumulators and the totals in registers)
SWAP_AB_DOUBLE_BUFFER_TOKENS = 64  # kDoubleBuffer up to this many
# Dense M up to 128 runs in tiles of at most this many tokens or in one tile, as the split model
# says; a masked expert in one tile of its planned rows, up to SWAP_AB_MAX_TOKENS, and the swap-AB
# kernel serves masked experts planned for up to SWAP_AB_MAX_MASKED_ROWS (128 expected with the
# routing headroom): one tile of the planned rows beat tiles of half as many, and 128 tokens beat two
# tiles of 88 (BENCHMARKS.md, nineteenth session).
SWAP_AB_PLANNED_TOKENS = 64
SWAP_AB_MAX_MASKED_ROWS = math.ceil(SWAP_AB_MAX_TOKENS * fp8_gemm.ROUTING_HEADROOM)
SWAP_AB_MAX_STAGES = 16
SWAP_AB_MAX_CTAS_PER_SM = 4
# 128-wide K blocks a stage: two read each weight row's 128 bytes in one box row, not two 64-byte halves
# (BENCHMARKS.md, eighteenth session).
SWAP_AB_K_BLOCKS_PER_STAGE = 2
SWAP_AB_RAMP_K_BLOCKS = 2  # a CTA's fixed cost in the split model, in K blocks of its time...
SWAP_AB_REDUCE_TOKENS_PER_K_BLOCK = 8  # ...and each further split's partial tile (BENCHMARKS.md, "FP8 x FP4 swap-AB")
SWAP_AB_BUSY_WARPS = 16  # math warps an SM needs to widen at full rate (BENCHMARKS.md, "FP8 x FP4 swap-AB")
SM_REGISTERS, SM_SMEM_BYTES, CTA_RESERVED_SMEM = 65536, 233472, 1024

# Fp8Fp4SwapAbParams, member by member; launched with the FP8 operands' order (OPERANDS).
SWAP_AB_PARAMS = ParamsLayout("moegemm::Fp8Fp4SwapAbParams", (
    Slot("tma_a", "tma", "a"), Slot("tma_b", "tma", "b"), Slot("tma_sfa", "tma", "sfa"), Slot("tma_sfb", "tma", "sfb"),
    Slot("groups", "ptr", "groups"), Slot("d", "ptr", "d"),
    *(Slot(name, "u32") for name in ("m", "n", "k", "stage_bytes", "block_a_bytes", "k_blocks_per_split",
                                      "num_groups", "ld_d", "n_blocks", "token_tiles"))), OPERANDS)


@dataclass(frozen=True)
class SwapAbConfig:
    """One compiled swap-AB kernel: 64 * ``math_warpgroups`` weight rows by ``tokens`` tokens per CTA,
    ``split_k`` CTAs (a cluster) per such unit."""

    math_warpgroups: int
    tokens: int
    stages: int
    split_k: int
    out_fp32: bool
    accumulate: bool
    gemm_type: GemmType = GemmType.NORMAL
    ctas_per_sm: int = 1  # the launch bounds' minimum: ptxas keeps the registers for that many
    k_blocks_per_stage: int = 1

    @property
    def rows(self) -> int:
        return 64 * self.math_warpgroups

    @property
    def num_threads(self) -> int:
        return swap_ab_threads(self.math_warpgroups)

    @property
    def cluster_size(self) -> int:
        return self.split_k

    @property
    def smem_bytes(self) -> int:
        return swap_ab_smem_bytes(self.math_warpgroups, self.tokens, self.stages, self.split_k,
                                  self.k_blocks_per_stage)


def swap_ab_smem_bytes(math_warpgroups: int, tokens: int, stages: int, split_k: int, k_blocks_per_stage: int) -> int:
    """Mirrors Fp8Fp4SwapAbConfig::kSmemBytes: the stage ring, or the split-K partial sums and the
    output tile that reuse it, whichever is larger, then the barriers and the widening's table."""
    rows = 64 * math_warpgroups
    ring = stages * k_blocks_per_stage * (tokens * BLOCK_K + rows * 64 + align(tokens * 4, 128) + rows * 4)
    after = (split_k - 1) * 128 * math_warpgroups * tokens * 2 + tokens * (rows + 4) * 4
    return align(max(ring, after), 8) + 24 * stages + E2M1_LUT_BYTES


def swap_ab_threads(math_warpgroups: int) -> int:
    """Fp8Fp4SwapAbConfig::kNumThreads: the math warpgroups, the producer warp and the permute warp."""
    return 128 * math_warpgroups + 64


def swap_ab_registers(tokens: int) -> int:
    """Registers per thread the swap-AB kernel needs (fitted to ptxas' counts: 80 at 8 tokens, 160 at
    64; one scratch accumulator fewer past SWAP_AB_DOUBLE_BUFFER_TOKENS), rounded up to the
    allocation's multiple of 8."""
    accumulators = 3 * tokens // 2 if tokens <= SWAP_AB_DOUBLE_BUFFER_TOKENS else tokens
    return align(66 + accumulators, 8)


def swap_ab_ctas_per_sm(math_warpgroups: int, tokens: int) -> int:
    """CTAs an SM holds by registers, at most SWAP_AB_MAX_CTAS_PER_SM."""
    threads = swap_ab_threads(math_warpgroups)
    return max(1, min(SWAP_AB_MAX_CTAS_PER_SM, SM_REGISTERS // (threads * swap_ab_registers(tokens))))


def swap_ab_stages(math_warpgroups: int, tokens: int, split_k: int, ctas_per_sm: int, k_blocks_per_stage: int,
                   facts: DeviceFacts) -> int:
    """As many stages as fit the shared memory of one of ``ctas_per_sm`` CTAs, up to SWAP_AB_MAX_STAGES
    K blocks."""
    limit = min(facts.smem_per_block, SM_SMEM_BYTES // ctas_per_sm - CTA_RESERVED_SMEM)
    stages = 0
    while (stages + 1) * k_blocks_per_stage <= SWAP_AB_MAX_STAGES and \
            swap_ab_smem_bytes(math_warpgroups, tokens, stages + 1, split_k, k_blocks_per_stage) <= limit:
        stages += 1
    return stages


def swap_ab_token_tiles(desc: GemmDesc) -> tuple[int, ...]:
    """The token tiles the swap-AB kernel may take for ``desc`` (the planned rows per expert), none
    where it does not serve it (prefill-sized M, contiguous layouts)."""
    m = max(desc.m, 1)
    if desc.gemm_type is GemmType.NORMAL and m <= SWAP_AB_MAX_TOKENS:
        return tuple(dict.fromkeys((align(ceil_div(m, ceil_div(m, SWAP_AB_PLANNED_TOKENS)), 8), align(m, 8))))
    if desc.gemm_type is GemmType.MASKED and m <= SWAP_AB_MAX_MASKED_ROWS:
        return (align(min(m, SWAP_AB_MAX_TOKENS), 8),)
    return ()


def select_swap_ab(desc: GemmDesc, facts: DeviceFacts) -> SwapAbConfig | None:
    """The swap-AB config for ``desc`` (masked: the planned rows per expert), or None. Each CTA widens
    its weight rows' share of K and an SM's widening bounds the time: the split model minimises the
    most any SM widens, in waves of the CTAs the SMs hold at once (by registers, shared memory sized
    to match), each SM's rate falling below SWAP_AB_BUSY_WARPS math warps; over the token tiles
    (smaller first: a tie keeps it), one or two math warpgroups and 1 to 8 CTAs splitting K."""
    num_k_blocks = ceil_div(desc.k, BLOCK_K)
    per_stage = SWAP_AB_K_BLOCKS_PER_STAGE if num_k_blocks > 1 else 1
    best, best_cost = None, math.inf
    for tokens, math_warpgroups in itertools.product(swap_ab_token_tiles(desc), (1, 2)):
        units = desc.num_groups * ceil_div(desc.n, 64 * math_warpgroups) * ceil_div(max(desc.m, 1), tokens)
        ctas_per_sm = swap_ab_ctas_per_sm(math_warpgroups, tokens)
        rate = min(1.0, 4 * math_warpgroups * ctas_per_sm / SWAP_AB_BUSY_WARPS)
        for split_k in range(1, min(fp8_gemm.MAX_SPLIT_K, num_k_blocks) + 1):
            stages = swap_ab_stages(math_warpgroups, tokens, split_k, ctas_per_sm, per_stage, facts)
            if stages * per_stage < 3:
                break
            waves = ceil_div(units * split_k, facts.num_sms * ctas_per_sm)
            fixed = SWAP_AB_RAMP_K_BLOCKS + (split_k - 1) * tokens / SWAP_AB_REDUCE_TOKENS_PER_K_BLOCK
            cost = waves * ctas_per_sm * math_warpgroups * (ceil_div(num_k_blocks, split_k) + fixed)
            if cost / rate < best_cost:
                best_cost = cost / rate
                best = SwapAbConfig(math_warpgroups, tokens, stages, split_k, desc.out_dtype == torch.float32,
                                    desc.accumulate, desc.gemm_type, ctas_per_sm, per_stage)
    return best


def _swap_ab_source(config: SwapAbConfig) -> str:
    return compiler.kernel_stub(
        "sm90_fp8_fp4_gemm_swap_ab.cuh",
        f"moegemm::Fp8Fp4SwapAbConfig<{config.math_warpgroups}, {config.tokens}, {config.stages}, {config.split_k}, "
        f"{str(config.out_fp32).lower()}, {str(config.accumulate).lower()}, "
        f"moegemm::GemmType::{config.gemm_type.value}, {config.ctas_per_sm}, {config.k_blocks_per_stage}>",
        SWAP_AB_PARAMS.cpp_type, "moegemm::sm90_fp8_fp4_gemm_swap_ab",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}", SWAP_AB_PARAMS.size_check()),
        min_blocks="Config::kCtasPerSm", nvcc_checks=SWAP_AB_PARAMS.offset_checks())


def _swap_ab_name(config: SwapAbConfig) -> str:
    out = "f32" if config.out_fp32 else "bf16"
    acc = "_acc" if config.accumulate else ""
    split = f"k{config.split_k}" if config.split_k > 1 else ""
    return (f"sm90_fp8_fp4_gemm_swap_ab{KIND_NAMES[config.gemm_type]}_{out}{acc}_"
            f"w{config.math_warpgroups}t{config.tokens}s{config.stages}{split}r{config.ctas_per_sm}"
            f"b{config.k_blocks_per_stage}")


SWAP_AB_KERNELS = KernelFamily(_swap_ab_name, _swap_ab_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=SWAP_AB_PARAMS, cluster=config.split_k))


def _plan_swap_ab(config: SwapAbConfig, desc: GemmDesc, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                  rows: int, group_rows: int, pdl: bool) -> Plan:
    config = dataclasses.replace(config, gemm_type=desc.gemm_type)
    num_groups, k, n = desc.num_groups, a.shape[-1], b.shape[-2]
    num_k_blocks = ceil_div(k, BLOCK_K)
    # The tokens' tiles as the FP8 kernel loads A's: stale rows feed columns of D never stored.
    tma, a_side_bytes = fp8_gemm.activation_tma(a, rows, group_rows, desc.gemm_type, num_groups, config.tokens)
    padded_n = align(n, 4)
    per_stage = config.k_blocks_per_stage
    tma["tma_b"] = tma_2d(torch.int8, k // 2, num_groups * n, b.stride(-2), per_stage * BLOCK_K // 2, config.rows,
                          SWIZZLE_64B if per_stage == 1 else SWIZZLE_128B)
    tma["tma_sfb"] = tma_2d(torch.int32, padded_n, num_groups * num_k_blocks, padded_n * 4, config.rows, per_stage,
                            SWIZZLE_NONE)
    n_blocks, token_tiles = ceil_div(n, config.rows), ceil_div(group_rows, config.tokens)
    values = dict(m=group_rows, n=n, k=k, stage_bytes=per_stage * (a_side_bytes + config.rows * (64 + 4)),
                  block_a_bytes=a_side_bytes,
                  k_blocks_per_split=ceil_div(num_k_blocks, config.split_k), num_groups=num_groups,
                  ld_d=d.stride(-2), n_blocks=n_blocks, token_tiles=token_tiles)
    grid = num_groups * n_blocks * token_tiles * config.split_k
    if env.flag("MOEGEMM_PRINT_CONFIGS"):
        print(f"[moegemm] fp8 x fp4 gemm {desc}: {config}, grid {grid}", file=sys.stderr)
    kernel = SWAP_AB_KERNELS.kernel(config)
    return Plan(config, kernel, kernel.record(grid, tma, values, pdl=pdl))


def kernel_name(config: Fp8Fp4GemmConfig | SwapAbConfig) -> str:
    return _swap_ab_name(config) if isinstance(config, SwapAbConfig) else _widening_name(config)


def build(config: Fp8Fp4GemmConfig | SwapAbConfig):
    """The compiled kernel of either of the family's own configs."""
    return SWAP_AB_KERNELS.build(config) if isinstance(config, SwapAbConfig) else KERNELS.build(config)


def takes_widened_b(plan: Plan) -> bool:
    """Whether ``plan`` runs the FP8 kernel, on B as ``fp4_widen.Plan.run`` makes it."""
    return isinstance(plan.config, fp8_gemm.Fp8GemmConfig)


# ---- planning -------------------------------------------------------------------------------------------------


def plan(desc: GemmDesc, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, facts: DeviceFacts,
         config: Fp8Fp4GemmConfig | SwapAbConfig | fp8_gemm.Fp8GemmConfig | None = None, pdl: bool = False) -> Plan:
    """The plan of ``desc`` (fp8_gemm.describe's, with B's K the unpacked one) on these tensors: A
    e4m3 [rows, K] or [G, max_M, K], B int8 [N, K/2] or [G, N, K/2], D like A with N columns. Without
    ``config``, the swap-AB kernel where it serves the planned rows, the FP8 kernel on B widened
    before the call from WIDEN_MIN_ROWS of them, else the widening kernel's heuristic pick."""
    num_groups = desc.num_groups
    rows, group_rows = fp8_gemm.row_counts(desc, a)
    planned = fp8_gemm.planned_desc(desc, group_rows)
    if (config is None and planned.m >= WIDEN_MIN_ROWS) or isinstance(config, fp8_gemm.Fp8GemmConfig):
        widened = torch.empty((*b.shape[:-1], desc.k), dtype=torch.float8_e4m3fn, device="meta")
        return fp8_gemm.plan(desc, a, widened, d, facts, config, pdl)
    if config is None:
        config = select_swap_ab(planned, facts) or select_config(planned, facts)
    if isinstance(config, SwapAbConfig):
        return _plan_swap_ab(config, desc, a, b, d, rows, group_rows, pdl)
    config, grid = settle(config, desc, rows, group_rows, facts, "fp8 x fp4")
    k, n = a.shape[-1], b.shape[-2]
    num_k_blocks = ceil_div(k, BLOCK_K)
    tma, a_side_bytes = fp8_gemm.a_side_tma(config, a, d, rows, group_rows, num_groups)
    padded_n = align(n, 4)
    tma["tma_b"] = tma_2d(torch.int8, k // 2, num_groups * n, b.stride(-2), BLOCK_K // 2, config.block_n, SWIZZLE_NONE)
    tma["tma_sfb"] = tma_2d(torch.int32, padded_n, num_groups * num_k_blocks, padded_n * 4, config.block_n, 1,
                            SWIZZLE_NONE)
    values = dict(m=group_rows, n=n, k=k, stage_bytes=a_side_bytes + config.block_n * (BLOCK_K // 2 + 4),
                  k_blocks_per_split=ceil_div(num_k_blocks, config.split_k), num_groups=num_groups,
                  ld_d=d.stride(-2), sfb_box_rows=1)
    record = KERNELS.kernel(config).record(grid, tma, values, pdl=pdl)
    return Plan(config, KERNELS.kernel(config), record)


__all__ = ["SWAP_AB_KERNELS", "Fp8Fp4GemmConfig", "Plan", "SwapAbConfig", "build", "generate_source", "kernel_name",
           "plan", "select_config", "select_swap_ab", "swap_ab_token_tiles", "takes_widened_b"]
