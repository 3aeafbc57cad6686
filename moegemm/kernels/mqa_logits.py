"""Host side of sm90_fp8_mqa_logits.cuh: the config (heads, head dim, key stages, output form, next_n
of the paged problem, FP8 or FP4 inputs), code generation, the paged schedule and the launch plans.
Sequence lengths, key ranges, context lengths and block tables are run-time values."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..device import DeviceFacts
from ..intmath import align, ceil_div
from ..jit import compiler
from ..jit.runtime import (
    SWIZZLE_32B,
    SWIZZLE_64B,
    SWIZZLE_128B,
    SWIZZLE_NONE,
    KernelFamily,
    LaunchPlan,
    ParamsLayout,
    Slot,
    tma_2d,
)
from .fp4_widen import E2M1_LUT_BYTES

HEADS = (32, 64)
HEAD_DIMS = (32, 64, 128)
PAGED_UNIT = 256  # keys of a unit of the paged schedule: a block of four math warpgroups, two of two
PAGE_KEYS = 64  # the paged cache's block_kv
NEXT_NS = (1, 2)
Q_STAGES = 2
MAX_KV_STAGES = 8  # keys in flight: a block is 2 to 32 KB
BARRIER_BYTES = 8
SWIZZLES = {32: SWIZZLE_32B, 64: SWIZZLE_64B, 128: SWIZZLE_128B}

# q_scales: FP4 q's packed exponents; the FP8 kernels take no such operand and are passed q's address.
OPERANDS = ("q", "q_scales", "kv", "scales", "weights", "ks", "ke", "logits")
PARAMS = ParamsLayout("moegemm::MqaLogitsParams", (
    Slot("tma_q", "tma", "q"), Slot("tma_q_scales", "tma", "q_scales"), Slot("tma_kv", "tma", "kv"),
    Slot("tma_scales", "tma", "scales"),
    Slot("tma_weights", "tma", "weights"), Slot("ks", "ptr", "ks"), Slot("ke", "ptr", "ke"),
    Slot("logits", "ptr", "logits"), Slot("ld_logits", "u64"),
    *(Slot(name, "u32") for name in ("seq_len", "seq_len_kv", "num_q_blocks", "columns"))), OPERANDS)
PAGED_OPERANDS = ("q", "q_scales", "kv_cache", "weights", "context_lens", "block_table", "schedule", "logits")
PAGED_PARAMS = ParamsLayout("moegemm::PagedMqaLogitsParams", (
    Slot("tma_q", "tma", "q"), Slot("tma_q_scales", "tma", "q_scales"), Slot("tma_kv", "tma", "kv_cache"),
    Slot("tma_scales", "tma", "kv_cache"),
    Slot("tma_weights", "tma", "weights"), Slot("context_lens", "ptr", "context_lens"),
    Slot("block_table", "ptr", "block_table"), Slot("schedule", "ptr", "schedule"), Slot("logits", "ptr", "logits"),
    Slot("ld_logits", "u64"), *(Slot(name, "u32") for name in ("batch", "ld_block_table", "columns"))),
    PAGED_OPERANDS)


def key_bytes(head_dim: int, fp4: bool) -> int:
    """A key row (and a q row) as it lands: D e4m3 values, or D / 2 bytes of packed e2m1."""
    return head_dim // 2 if fp4 else head_dim


@dataclass(frozen=True)
class MqaLogitsConfig:
    heads: int
    head_dim: int
    kv_stages: int
    bf16_logits: bool
    compressed: bool
    clean: bool
    next_n: int = 0  # 0: fp8_mqa_logits; 1 or 2: fp8_paged_mqa_logits
    fp4: bool = False  # e2m1 q and keys with 1x32 UE8M0 scales (fp8_fp4_mqa_logits)
    math_warpgroups: int = 4  # 64 keys of a block each (2 or 3: the sweep's alternatives)
    cluster_q: int = 1  # dense: CTAs of a cluster sharing (multicasting) their key blocks, 1 or 2
    pipelined: bool = False  # FP8: two accumulator sets a math warpgroup (kPipelined), a sweep option

    @property
    def num_threads(self) -> int:
        return 128 * (self.math_warpgroups + 1)  # and the producer warpgroup

    @property
    def block_kv(self) -> int:
        return 64 * self.math_warpgroups

    @property
    def queries(self) -> int:
        """Queries of a q block: 128 WGMMA columns of heads, or a batch's next_n tokens (paged)."""
        return self.next_n or 128 // self.heads

    @property
    def key_bytes(self) -> int:
        return key_bytes(self.head_dim, self.fp4)

    @property
    def smem_bytes(self) -> int:
        rows = self.queries * self.heads
        q_stage = rows * self.head_dim + align(rows * 4, 128)  # the e4m3 tile, the weights
        if self.fp4:
            q_stage += rows * self.key_bytes + align(rows * 4, 128)  # the packed tile, its exponents
        kv_stage = self.block_kv * (self.key_bytes + 4)
        barriers = 2 * (Q_STAGES + self.kv_stages) * BARRIER_BYTES
        return Q_STAGES * q_stage + self.kv_stages * kv_stage + barriers + (E2M1_LUT_BYTES if self.fp4 else 0)


def select_config(heads: int, head_dim: int, bf16_logits: bool, compressed: bool, clean: bool,
                  facts: DeviceFacts, next_n: int = 0, fp4: bool = False) -> MqaLogitsConfig:
    """Four math warpgroups (while some sum their heads, the others' WGMMAs run, 112 registers a
    thread); the most key stages that fit (up to MAX_KV_STAGES), but half of them for FP8 paged decode
    of one query a sequence. Single CTAs: pairs sharing their key blocks (cluster_q = 2) win some of
    the sweep's dense shapes and lose the bench's 2048 x 8192 with 64 heads of 64. The sweeps behind
    these: BENCHMARKS.md, 2026-12-07 (twenty-sixth and twenty-eighth sessions)."""
    config = with_most_stages(MqaLogitsConfig(heads, head_dim, MAX_KV_STAGES, bf16_logits, compressed, clean,
                                              next_n, fp4), facts)
    if next_n == 1 and not fp4:
        config = replace(config, kv_stages=max(2, config.kv_stages // 2))
    return config


def with_most_stages(config: MqaLogitsConfig, facts: DeviceFacts) -> MqaLogitsConfig:
    """``config`` with the most key stages (up to MAX_KV_STAGES) that fit ``facts``' shared memory."""
    config = replace(config, kv_stages=MAX_KV_STAGES)
    while config.smem_bytes > facts.smem_per_block:
        config = replace(config, kv_stages=config.kv_stages - 1)
    return config


def pipelined(config: MqaLogitsConfig, facts: DeviceFacts) -> MqaLogitsConfig | None:
    """The pipelined form of an FP8 ``config`` (two accumulator sets a math warpgroup: four warpgroups
    where a q block is at most 64 rows, else two), with the most key stages that fit; None for FP4.
    Not picked until the sweep measures it."""
    if config.fp4:
        return None
    warpgroups = 4 if config.queries * config.heads <= 64 else 2
    return with_most_stages(replace(config, pipelined=True, math_warpgroups=warpgroups), facts)


def _flag(value: bool) -> str:
    return str(value).lower()


def _layout(config: MqaLogitsConfig) -> ParamsLayout:
    return PAGED_PARAMS if config.next_n else PARAMS


def generate_source(config: MqaLogitsConfig) -> str:
    layout = _layout(config)
    return compiler.kernel_stub(
        "sm90_fp8_mqa_logits.cuh",
        f"moegemm::MqaLogitsConfig<{config.heads}, {config.head_dim}, {config.kv_stages}, "
        f"{_flag(config.bf16_logits)}, {_flag(config.compressed)}, {_flag(config.clean)}, {config.next_n}, "
        f"{_flag(config.fp4)}, {config.math_warpgroups}, {config.cluster_q}, {_flag(config.pipelined)}>",
        layout.cpp_type, "moegemm::sm90_fp8_paged_mqa_logits" if config.next_n else "moegemm::sm90_fp8_mqa_logits",
        (f'Config::kSmemBytes == {config.smem_bytes}, "host and device disagree on shared memory"',
         f"Config::kNumThreads == {config.num_threads}", layout.size_check()), nvcc_checks=layout.offset_checks())


def kernel_name(config: MqaLogitsConfig) -> str:
    form = "_compressed" if config.compressed else "_clean" if config.clean else ""
    kind = f"paged_mqa_logits_n{config.next_n}" if config.next_n else "mqa_logits"
    return (f"sm90_{'fp4' if config.fp4 else 'fp8'}_{kind}_h{config.heads}d{config.head_dim}s{config.kv_stages}"
            f"w{config.math_warpgroups}{f'c{config.cluster_q}' if config.cluster_q > 1 else ''}"
            f"{'p' if config.pipelined else ''}"
            f"_{'bf16' if config.bf16_logits else 'f32'}{form}")


def all_configs(facts: DeviceFacts) -> list[MqaLogitsConfig]:
    """Every config the launchers can pick on ``facts``' GPU, each FP8 dense one with the other cluster
    size, and each FP8 one pipelined (the sweep's)."""
    dense = [select_config(h, d, bf16, compressed, clean, facts, fp4=fp4) for h in HEADS for d in HEAD_DIMS
             for bf16 in (False, True) for compressed, clean in ((False, False), (False, True), (True, False))
             for fp4 in (False, True)]
    dense += [replace(config, cluster_q=3 - config.cluster_q) for config in dense if not config.fp4]
    paged = [select_config(h, d, False, False, clean, facts, next_n, fp4) for h in HEADS for d in HEAD_DIMS
             for clean in (False, True) for next_n in NEXT_NS for fp4 in (False, True)]
    picks = dense + paged
    return picks + [p for p in (pipelined(c, facts) for c in picks if c.cluster_q == 1) if p is not None]


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=_layout(config), cluster=config.cluster_q))
build = KERNELS.build


Plan = LaunchPlan  # launch_pointers takes the OPERANDS' (or PAGED_OPERANDS') addresses


def _q_tma(config: MqaLogitsConfig, rows: int) -> dict[str, tuple]:
    """q [rows, D] (e4m3, or packed e2m1 with one int32 of exponents a row) in boxes of a q block's rows.
    The FP8 kernels never load the exponents: their descriptor spans q's own bytes."""
    box = config.queries * config.heads
    swizzle = SWIZZLE_NONE if config.fp4 else SWIZZLES[config.head_dim]
    return {"tma_q": tma_2d(torch.uint8, config.key_bytes, rows, config.key_bytes, config.key_bytes, box, swizzle),
            "tma_q_scales": tma_2d(torch.int32, rows, 1, align(rows * 4, 16), box, 1, SWIZZLE_NONE)}


def plan(seq_len: int, seq_len_kv: int, heads: int, head_dim: int, weights_pitch: int, logits: torch.Tensor,
         compressed: bool, clean: bool, facts: DeviceFacts, pdl: bool = False, fp4: bool = False,
         config: MqaLogitsConfig | None = None) -> Plan:
    """q [S, H, D] and kv [S_kv, D] contiguous e4m3, kv's scales contiguous fp32 [S_kv] (``fp4``: q
    [S, H, D / 2] and kv [S_kv, D / 2] packed e2m1, their exponents int32 [S, H] and [S_kv]), weights
    fp32 [S, H] with ``weights_pitch`` bytes between rows (a multiple of 16), ``logits`` [S, columns]
    with a unit inner stride; S and S_kv > 0. ``config``: another than select_config's (the sweeps)."""
    config = config or select_config(heads, head_dim, logits.dtype == torch.bfloat16, compressed, clean, facts,
                                     fp4=fp4)
    kernel = KERNELS.kernel(config)
    row, share = config.key_bytes, config.block_kv // config.cluster_q  # the keys a CTA loads a block
    tma = {**_q_tma(config, seq_len * heads),
           "tma_kv": tma_2d(torch.uint8, row, seq_len_kv, row, row, share, SWIZZLE_NONE if fp4 else SWIZZLES[head_dim]),
           "tma_scales": tma_2d(torch.int32, seq_len_kv, 1, align(seq_len_kv * 4, 16), share, 1, SWIZZLE_NONE),
           "tma_weights": tma_2d(torch.float32, heads, seq_len, weights_pitch, heads, config.queries, SWIZZLE_NONE)}
    num_q_blocks = ceil_div(seq_len, config.queries)
    values = dict(ld_logits=logits.stride(0), seq_len=seq_len, seq_len_kv=seq_len_kv, num_q_blocks=num_q_blocks,
                  columns=logits.shape[1])
    grid = min(ceil_div(num_q_blocks, config.cluster_q), facts.clusters(config.cluster_q)) * config.cluster_q
    return Plan(config, kernel, kernel.record(grid, tma, values, pdl=pdl))


def paged_schedule(context_lens: torch.Tensor, num_ctas: int) -> torch.Tensor:
    """int32 ``[num_ctas + 1, 2]``: the (batch, unit) where each CTA of the paged kernel starts its run
    of PAGED_UNIT-key units (a batch has max(1, ceil(its longest context / PAGED_UNIT)) of them), the
    units split evenly; the last row is (B, 0). ``context_lens`` int32 [B >= 1, next_n >= 1]. On the device of
    ``context_lens``, reading no value back."""
    keys = context_lens.amax(dim=1).clamp(min=0).long()
    units = ((keys + PAGED_UNIT - 1) // PAGED_UNIT).clamp(min=1)
    ends = units.cumsum(0)
    starts = torch.arange(num_ctas + 1, device=context_lens.device) * ends[-1] // num_ctas
    batch = torch.searchsorted(ends, starts, right=True)
    before = torch.cat([ends.new_zeros(1), ends])[batch]  # the units of the batches before
    return torch.stack([batch, starts - before], dim=1).to(torch.int32)


def plan_paged(batch: int, next_n: int, heads: int, head_dim: int, num_pages: int, ld_block_table: int,
               weights_pitch: int, logits: torch.Tensor, clean: bool, num_ctas: int, facts: DeviceFacts,
               pdl: bool = False, fp4: bool = False, config: MqaLogitsConfig | None = None) -> Plan:
    """q [B, next_n, H, D] contiguous e4m3, the cache uint8 [pages, 64, 1, D + 4] contiguous (``fp4``: q
    [B, next_n, H, D / 2] packed e2m1 with int32 exponents [B, next_n, H], the cache [pages, 64, 1,
    D / 2 + 4]), weights fp32 [B * next_n, H] (``weights_pitch`` bytes between rows), logits fp32
    [B * next_n, columns] with a unit inner stride; the schedule of ``num_ctas`` CTAs. ``config``: as
    ``plan``'s."""
    config = config or select_config(heads, head_dim, False, False, clean, facts, next_n, fp4)
    kernel = KERNELS.kernel(config)
    row = config.key_bytes
    page_bytes = PAGE_KEYS * (row + 4)
    tma = {**_q_tma(config, batch * next_n * heads),
           "tma_kv": tma_2d(torch.uint8, row, num_pages * page_bytes // row, row, row, PAGE_KEYS,
                            SWIZZLE_NONE if fp4 else SWIZZLES[head_dim]),
           "tma_scales": tma_2d(torch.int32, page_bytes // 4, num_pages, page_bytes, PAGE_KEYS, 1, SWIZZLE_NONE),
           "tma_weights": tma_2d(torch.float32, heads, batch * next_n, weights_pitch, heads, next_n, SWIZZLE_NONE)}
    values = dict(ld_logits=logits.stride(0), batch=batch, ld_block_table=ld_block_table, columns=logits.shape[1])
    return Plan(config, kernel, kernel.record(num_ctas, tma, values, pdl=pdl))


__all__ = ["HEADS", "HEAD_DIMS", "NEXT_NS", "OPERANDS", "PAGED_OPERANDS", "PAGED_PARAMS", "PAGE_KEYS", "PAGED_UNIT",
           "PARAMS", "MqaLogitsConfig", "all_configs", "build", "generate_source", "key_bytes", "kernel_name",
           "paged_schedule", "pipelined", "plan", "plan_paged", "select_config"]
