"""Host side of sm90_moe_layer.cuh: the MoE layer's route, dispatch, activation and combine kernels.

Every tensor they touch is a view of the layer buffer's one allocation (``MegaMoeBuffer.storage``):
a launch passes its address and, per step, y or the stats; the views' byte offsets and the layer's
sizes are values of the launch record, made once per (buffer, tokens, y's row pitch, stats, clamp).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from ..intmath import ceil_div
from ..jit import compiler
from ..jit.runtime import Kernel, KernelFamily, ParamsLayout, Slot

STEPS = ("route", "dispatch", "activation", "combine")
# The storage views whose byte offsets the kernels take (MoeLayerParams' order).
VIEWS = ("x", "x_sf", "topk_idx", "topk_weights", "tokens", "tokens_sf", "l1_out", "act", "act_sf", "l2_out",
         "pair_rows", "groups")
PARAMS = ParamsLayout("moegemm::MoeLayerParams", (
    Slot("storage", "ptr", "storage"), Slot("out", "ptr", "out"),
    *(Slot(name, "u64") for name in (*VIEWS, "y_pitch")),
    *(Slot(name, "u32") for name in ("num_pairs", "num_topk", "num_experts", "hidden", "intermediate",
                                     "masked_stride", "alignment", "spare_row", "stats_bytes", "clamp_bits"))),
    ("storage", "out"))
MAX_EXPERTS = 1024  # MoeLayerConfig::kMaxExperts: the route kernel's shared memory
ROUTE_THREADS, STEP_THREADS = 1024, 256
WARPS_PER_SM = 64  # dispatch and activation: a warp per pair, at most this many warps per SM launched


@dataclass(frozen=True)
class MoeLayerConfig:
    step: str  # one of STEPS
    fp8: bool  # e4m3 tokens and activation with packed 1x32 scales, else bf16

    @property
    def num_threads(self) -> int:
        return ROUTE_THREADS if self.step == "route" else STEP_THREADS

    @property
    def smem_bytes(self) -> int:
        return MAX_EXPERTS * 4 + ROUTE_THREADS // 32 * MAX_EXPERTS * 2 if self.step == "route" else 0


def generate_source(config: MoeLayerConfig) -> str:
    return compiler.kernel_stub(
        "sm90_moe_layer.cuh",
        f"moegemm::MoeLayerConfig<moegemm::MoeStep::k{config.step.capitalize()}, {str(config.fp8).lower()}>",
        "moegemm::MoeLayerParams", "moegemm::sm90_moe_layer",
        (f"Config::kNumThreads == {config.num_threads}", f"Config::kSmemBytes == {config.smem_bytes}",
         f"Config::kMaxExperts == {MAX_EXPERTS}", PARAMS.size_check()),
        nvcc_checks=PARAMS.offset_checks())


def kernel_name(config: MoeLayerConfig) -> str:
    return f"sm90_moe_{config.step}_{'fp8' if config.fp8 else 'bf16'}"


def all_configs() -> list[MoeLayerConfig]:
    return sorted({config_of(step, fp8) for step in STEPS for fp8 in (True, False)}, key=kernel_name)


KERNELS = KernelFamily(kernel_name, generate_source, lambda config: dict(
    num_threads=config.num_threads, smem_bytes=config.smem_bytes, layout=PARAMS))
build = KERNELS.build


def view_offsets(storage: torch.Tensor, views: dict[str, torch.Tensor | None]) -> dict[str, int]:
    """Each view's byte offset in ``storage`` (16-byte aligned, as the kernels' vector accesses need);
    0 for a view that is None (bf16xbf16's scales, which its kernels never read)."""
    base = storage.data_ptr()
    offsets = {name: 0 if view is None else view.data_ptr() - base for name, view in views.items()}
    if any(offset % 16 for offset in offsets.values()):
        raise ValueError(f"the layer buffer's views must be 16-byte aligned, got offsets {offsets}")
    return offsets


@dataclass(frozen=True)
class Plan:
    """The launches of one call signature: per step, the kernel, its record and the operand it writes
    besides the storage ("y", "stats" or None)."""

    launches: dict[str, tuple[Kernel, bytes, str | None]]

    def launch(self, step: str, storage: torch.Tensor, y: torch.Tensor, stats: torch.Tensor | None) -> None:
        """Run ``step`` on the current stream (the storage's device is the current one)."""
        kernel, record, out = self.launches[step]
        pointer = y.data_ptr() if out == "y" else stats.data_ptr() if out == "stats" else 0
        kernel.launch(record, storage.get_device(), storage.data_ptr(), pointer)


def config_of(step: str, fp8: bool) -> MoeLayerConfig:
    """Route and combine read no token or activation values: one variant each."""
    return MoeLayerConfig(step, fp8 and step in ("dispatch", "activation"))


def plan(fp8: bool, offsets: dict[str, int], *, num_tokens: int, num_topk: int, num_experts: int, hidden: int,
         intermediate: int, masked_stride: int, alignment: int, spare_row: int, y_pitch: int,
         stats_dtype: torch.dtype | None, clamp: float | None, num_sms: int) -> Plan:
    """The launches of a call of ``num_tokens`` (> 0) tokens. ``masked_stride``: rows an expert in the
    masked layout, 0 for the contiguous one."""
    num_pairs = num_tokens * num_topk
    clamp_bits = struct.unpack("<I", struct.pack("<f", math.inf if clamp is None else clamp))[0]
    values = dict(offsets, y_pitch=y_pitch, num_pairs=num_pairs, num_topk=num_topk, num_experts=num_experts,
                  hidden=hidden, intermediate=intermediate, masked_stride=masked_stride, alignment=alignment,
                  spare_row=spare_row, stats_bytes=0 if stats_dtype is None else stats_dtype.itemsize,
                  clamp_bits=clamp_bits)
    warps = STEP_THREADS // 32
    per_pair = min(ceil_div(num_pairs, warps), num_sms * WARPS_PER_SM // warps)
    grids = dict(route=1, dispatch=per_pair, activation=per_pair, combine=num_tokens)
    outs = dict(route="stats" if stats_dtype is not None else None, dispatch=None, activation=None, combine="y")
    launches = {}
    for step in STEPS:
        kernel = KERNELS.kernel(config_of(step, fp8))
        launches[step] = (kernel, kernel.record(grids[step], {}, values), outs[step])
    return Plan(launches)


__all__ = ["MAX_EXPERTS", "MoeLayerConfig", "Plan", "all_configs", "build", "config_of", "generate_source",
           "kernel_name", "plan", "view_offsets"]
