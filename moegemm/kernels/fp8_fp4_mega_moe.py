"""Host side of sm90_fp8_fp4_mega_moe.cuh: the MoE layer with FP8 tokens and FP4 weights in one
persistent kernel, on one rank or one rank of a group (``ranks``). Its config (token tile, stages),
code generation and launch record; the layer buffer's views it needs (``ops/mega_moe.py`` carves
them) and their sizes.

The kernel is the swap-AB kernel's main loop (fp8_fp4_gemm.py) over units of a token tile of one
expert, so its tile and stage arithmetic is that kernel's, two K blocks a stage. Four math warpgroups
(256 weight rows a CTA: an L1 unit's gate and up rows in one pass) where registers allow, so that
an SM widens at full rate (SWAP_AB_BUSY_WARPS math warps): up to 32 tokens, with one scratch
accumulator at 32; two (two passes) for larger tiles.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass

import torch

from .. import env
from ..device import DeviceFacts
from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import SWIZZLE_128B, SWIZZLE_NONE, Kernel, KernelFamily, ParamsLayout, Slot, tma_2d
from . import fp8_fp4_gemm, fp8_gemm
from .moe_layer import MAX_EXPERTS

K_BLOCKS_PER_STAGE = fp8_fp4_gemm.SWAP_AB_K_BLOCKS_PER_STAGE
TOKEN_TILES = (8, 16, 32, 64)  # kTokens: rows of an expert's token tile (the last: the swap-AB's double buffer)
MAX_TOKENS = TOKEN_TILES[-1]
# Four math warpgroups up to the first tile, and with them two scratch accumulators up to the second:
# beyond, 576 threads' registers (fp8_fp4_gemm.swap_ab_registers) pass 64K.
FOUR_WARPGROUPS_MAX_TOKENS, FOUR_WARPGROUPS_DOUBLE_BUFFER_MAX_TOKENS = 32, 16
CHUNK = 128  # intermediate columns an L1 unit activates: one folded 1x128 block
STAGING_PITCH = (2 * CHUNK + 8) * 2  # MegaMoeConfig::kStagingPitch
MIN_HIDDEN = 256  # H and I: a stage reads 128 bytes of each packed weight row
MAX_RANKS = 8  # MegaMoeConfig::kMaxRanks

# The launch's operands: the buffer's allocation and the views TMA reads, the weights, y, the stats
# and each rank's base address (a device array; one rank: unused).
OPERANDS = ("storage", "tokens", "tokens_sf", "act", "act_sf", "l1", "l1_sf", "l2", "l2_sf", "y", "stats", "peers")
# The caller's views, at the same byte offsets from every rank's base (across ranks: in symmetric memory).
SOURCE_VIEWS = ("x", "x_sf", "topk_idx", "topk_weights")
# The scratch the kernel takes by byte offset in the buffer's storage.
SCRATCH_VIEWS = ("tokens", "folded_tokens_sf", "act", "folded_act_sf", "l2_out", "pair_rows", "row_weights", "control")
VIEWS = SOURCE_VIEWS + SCRATCH_VIEWS
PARAMS = ParamsLayout("moegemm::MegaMoeParams", (
    Slot("tma_tokens", "tma", "tokens"), Slot("tma_tokens_sf", "tma", "tokens_sf"), Slot("tma_l1", "tma", "l1"),
    Slot("tma_l1_sf", "tma", "l1_sf"), Slot("tma_act", "tma", "act"), Slot("tma_act_sf", "tma", "act_sf"),
    Slot("tma_l2", "tma", "l2"), Slot("tma_l2_sf", "tma", "l2_sf"),
    Slot("storage", "ptr", "storage"), Slot("y", "ptr", "y"), Slot("stats", "ptr", "stats"),
    Slot("peers", "ptr", "peers"),
    *(Slot(name, "u64") for name in ("x", "x_sf", "topk_idx", "topk_weights", "combined", "header", "tokens",
                                     "tokens_sf", "act", "act_sf", "l2_out", "pair_rows", "row_weights", "control",
                                     "y_pitch")),
    *(Slot(name, "u32") for name in ("num_tokens", "max_tokens", "rank", "num_ranks", "first_expert", "num_topk",
                                     "num_experts", "hidden", "intermediate", "sf_pitch", "spare_row", "stats_bytes",
                                     "clamp_bits"))), OPERANDS)


def layout_rows(num_pairs: int, num_experts: int) -> int:
    """The most rows the kernel's layout takes: each expert's pairs padded to whole tiles of at most
    MAX_TOKENS rows (at least one tile, which a TMA box of MAX_TOKENS rows reads)."""
    return max(MAX_TOKENS, num_pairs + min(num_experts, num_pairs) * (MAX_TOKENS - 1))


def control_words(rows: int, num_experts: int) -> int:
    """MegaMoeParams::control's u32 words: the grid barrier's two, the epoch of the barrier across
    ranks, each expert's pairs, each tile's finished L1 units."""
    return 3 + num_experts + ceil_div(rows, TOKEN_TILES[0])


def header_words(num_ranks: int) -> int:
    """MegaMoeParams::header's u32 words (across ranks): the token count, each rank's barrier flag."""
    return 1 + num_ranks


def math_warpgroups_for(tokens: int) -> int:
    return 4 if tokens <= FOUR_WARPGROUPS_MAX_TOKENS else 2


def double_buffer_for(tokens: int, math_warpgroups: int) -> bool:
    """Two scratch accumulators (the swap-AB kernel's kDoubleBuffer) where registers allow."""
    return tokens <= (FOUR_WARPGROUPS_DOUBLE_BUFFER_MAX_TOKENS if math_warpgroups == 4
                      else fp8_fp4_gemm.SWAP_AB_DOUBLE_BUFFER_TOKENS)


@dataclass(frozen=True)
class MegaMoeConfig:
    tokens: int  # rows of a token tile
    stages: int  # of K_BLOCKS_PER_STAGE 128-wide K blocks
    math_warpgroups: int
    double_buffer: bool
    ranks: bool = False  # one rank of a group: the exchange through the ranks' memory (kRanks)

    @property
    def rows(self) -> int:
        return 64 * self.math_warpgroups

    @property
    def num_threads(self) -> int:
        return fp8_fp4_gemm.swap_ab_threads(self.math_warpgroups)

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.math_warpgroups, self.tokens, self.stages)


def smem_bytes(math_warpgroups: int, tokens: int, stages: int) -> int:
    """Mirrors MegaMoeConfig::kSmemBytes: the swap-AB kernel's, the staging tile, the layout tables,
    each rank's base and token count."""
    gemm = fp8_fp4_gemm.swap_ab_smem_bytes(math_warpgroups, tokens, stages, 1, K_BLOCKS_PER_STAGE)
    return align(align(gemm, 16) + tokens * STAGING_PITCH + (2 * MAX_EXPERTS + 1) * 4, 8) + MAX_RANKS * 12


def select_config(num_pairs: int, num_experts: int, facts: DeviceFacts, ranks: bool = False) -> MegaMoeConfig:
    """The smallest token tile that holds the pairs an expert expects with the routing headroom (the
    largest past it), with as many stages as fit."""
    expected = math.ceil(num_pairs / num_experts * fp8_gemm.ROUTING_HEADROOM)
    tokens = next((tile for tile in TOKEN_TILES if tile >= expected), MAX_TOKENS)
    return config_for(tokens, facts, ranks)


def config_for(tokens: int, facts: DeviceFacts, ranks: bool = False) -> MegaMoeConfig:
    """A token tile's config: its warpgroups, and as many stages as fit, up to the swap-AB kernel's
    most K blocks in flight."""
    math_warpgroups, stages = math_warpgroups_for(tokens), 1
    while (stages + 1) * K_BLOCKS_PER_STAGE <= fp8_fp4_gemm.SWAP_AB_MAX_STAGES and \
            smem_bytes(math_warpgroups, tokens, stages + 1) <= facts.smem_per_block:
        stages += 1
    return MegaMoeConfig(tokens, stages, math_warpgroups, double_buffer_for(tokens, math_warpgroups), ranks)


def generate_source(config: MegaMoeConfig) -> str:
    return compiler.kernel_stub(
        "sm90_fp8_fp4_mega_moe.cuh",
        f"moegemm::MegaMoeConfig<{config.math_warpgroups}, {config.tokens}, {config.stages}, "
        f"{str(config.double_buffer).lower()}, {str(config.ranks).lower()}>",
        PARAMS.cpp_type, "moegemm::sm90_fp8_fp4_mega_moe",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}", f"Config::kMaxExperts == {MAX_EXPERTS}",
         f"Config::kStagingPitch == {STAGING_PITCH}", f"Config::kMaxRanks == {MAX_RANKS}", PARAMS.size_check()),
        nvcc_checks=PARAMS.offset_checks())


def kernel_name(config: MegaMoeConfig) -> str:
    ranks = "_ranks" if config.ranks else ""
    single = "" if config.double_buffer else "a1"  # one scratch accumulator
    return f"sm90_fp8_fp4_mega_moe{ranks}_w{config.math_warpgroups}t{config.tokens}{single}s{config.stages}"


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=PARAMS))
build = KERNELS.build


def all_configs(facts: DeviceFacts) -> list[MegaMoeConfig]:
    """Each token tile's config, on one rank and across ranks: what select_config can pick."""
    return [config_for(tile, facts, ranks) for ranks in (False, True) for tile in TOKEN_TILES]


@dataclass(frozen=True)
class Ranks:
    """Where a rank of a group finds the others: the offsets of ``combined`` and ``header`` from each
    rank's base (its symmetric storage), its rank, the group's size, its first expert."""

    combined: int
    header: int
    rank: int
    num_ranks: int
    first_expert: int


@dataclass(frozen=True)
class Plan:
    """One call signature's launch: the kernel and its record; the operands come with each call."""

    kernel: Kernel
    record: bytes

    def launch(self, device: int, operands: dict[str, int]) -> None:
        self.kernel.launch(self.record, device, *(operands[name] for name in OPERANDS))


def plan(config: MegaMoeConfig, offsets: dict[str, int], *, rows: int, sf_pitch: int, num_tokens: int,
         max_tokens: int, num_topk: int, num_experts: int, hidden: int, intermediate: int, y_pitch: int,
         stats_dtype: torch.dtype | None, clamp: float | None, num_sms: int, ranks: Ranks | None = None) -> Plan:
    """The launch of a call of ``num_tokens`` tokens (of at most ``max_tokens``) over a buffer of ``rows``
    layout rows (plus the spare row), its views at ``offsets`` (VIEWS': SOURCE_VIEWS' from each rank's
    base, SCRATCH_VIEWS' from the storage), folded scales ``[K / 128, sf_pitch]``; ``num_experts`` this
    rank's. ``ranks``: one rank of a group (``config.ranks``)."""
    if (ranks is not None) != config.ranks:
        raise ValueError(f"ranks: expected {'a Ranks' if config.ranks else 'None'} for {config}, got {ranks!r}")
    e4m3 = torch.float8_e4m3fn
    tiles, half = config.tokens, config.rows // 2
    tma = {
        "tma_tokens": tma_2d(e4m3, hidden, rows + 1, hidden, 128, tiles, SWIZZLE_128B),
        "tma_tokens_sf": tma_2d(torch.float32, sf_pitch, hidden // 128, sf_pitch * 4, tiles, 1, SWIZZLE_NONE),
        "tma_l1": tma_2d(torch.int8, hidden // 2, num_experts * 2 * intermediate, hidden // 2, 128, half, SWIZZLE_128B),
        "tma_l1_sf": tma_2d(torch.int32, 2 * intermediate, num_experts * (hidden // 128), 2 * intermediate * 4, half, 1,
                            SWIZZLE_NONE),
        "tma_act": tma_2d(e4m3, intermediate, rows + 1, intermediate, 128, tiles, SWIZZLE_128B),
        "tma_act_sf": tma_2d(torch.float32, sf_pitch, intermediate // 128, sf_pitch * 4, tiles, 1, SWIZZLE_NONE),
        "tma_l2": tma_2d(torch.int8, intermediate // 2, num_experts * hidden, intermediate // 2, 128, config.rows,
                         SWIZZLE_128B),
        "tma_l2_sf": tma_2d(torch.int32, hidden, num_experts * (intermediate // 128), hidden * 4, config.rows,
                            K_BLOCKS_PER_STAGE, SWIZZLE_NONE),
    }
    clamp_bits = struct.unpack("<I", struct.pack("<f", math.inf if clamp is None else clamp))[0]
    values = dict(x=offsets["x"], x_sf=offsets["x_sf"], topk_idx=offsets["topk_idx"],
                  topk_weights=offsets["topk_weights"], tokens=offsets["tokens"],
                  tokens_sf=offsets["folded_tokens_sf"], act=offsets["act"], act_sf=offsets["folded_act_sf"],
                  l2_out=offsets["l2_out"], pair_rows=offsets["pair_rows"], row_weights=offsets["row_weights"],
                  control=offsets["control"], combined=0 if ranks is None else ranks.combined,
                  header=0 if ranks is None else ranks.header, y_pitch=y_pitch, num_tokens=num_tokens,
                  max_tokens=max_tokens, rank=0 if ranks is None else ranks.rank,
                  num_ranks=1 if ranks is None else ranks.num_ranks,
                  first_expert=0 if ranks is None else ranks.first_expert, num_topk=num_topk, num_experts=num_experts,
                  hidden=hidden, intermediate=intermediate, sf_pitch=sf_pitch, spare_row=rows,
                  stats_bytes=0 if stats_dtype is None else stats_dtype.itemsize, clamp_bits=clamp_bits)
    if env.flag("MOEGEMM_PRINT_CONFIGS"):
        print(f"[moegemm] fp8 x fp4 mega moe {num_tokens} tokens x {num_topk} over {num_experts} experts: {config}, "
              f"grid {num_sms}", file=sys.stderr)
    kernel = KERNELS.kernel(config)
    return Plan(kernel, kernel.record(num_sms, tma, values, cooperative=True))


__all__ = ["CHUNK", "MAX_RANKS", "MAX_TOKENS", "MIN_HIDDEN", "MegaMoeConfig", "OPERANDS", "PARAMS", "Plan", "Ranks",
           "SCRATCH_VIEWS", "SOURCE_VIEWS", "TOKEN_TILES", "VIEWS", "all_configs", "build", "config_for",
           "control_words", "double_buffer_for", "generate_source", "header_words", "kernel_name", "layout_rows",
           "math_warpgroups_for", "plan", "select_config", "smem_bytes"]
