"""An MoE layer through DeepGEMM's Mega MoE API: dispatch, linear 1, SwiGLU, linear 2 and combine.

By default this runs moegemm's own kernels one after another (the unfused pipeline that the fused
kernel is measured against): route (each routed (token, expert) pair's row in a grouped layout, the
pairs of an expert in pair order), dispatch (the tokens into their rows), the grouped FP8 x FP4 (or
BF16) GEMM, the activation (SwiGLU times the routing weight, re-quantised per 1x32 with UE8M0
scales), the second grouped GEMM, and combine (the weighted outputs summed back per token). On the GPU the four steps
around the GEMMs are kernels (kernels/sm90_moe_layer.cuh), elsewhere PyTorch (``_layer_torch``, the
kernels' reference). The layout is the masked one (``[E, num_max_tokens_per_rank]`` rows, each
expert's pairs first) where experts get few pairs and there are not too many of them (see
MASKED_MAX_EXPERTS_PER_TOPK), else the contiguous one (each expert's rows from a multiple of 128,
``use_psum_layout``), whose 128-row tiles are mostly padding at decode. The CPU reads no GPU value,
so a call can be captured in a CUDA graph and replayed with other routing. The buffer holds every
intermediate, sized for the worst case, in one allocation. With MOEGEMM_FUSED_MOE=1, FP8 x FP4 on the
GPU runs as one fused kernel instead (kernels/sm90_fp8_fp4_mega_moe.cuh), over the same buffer; across
ranks that kernel moves the tokens and outputs itself.

Numerics (DeepGEMM's): for each token t and each k with e = topk_idx[t, k] in [0, E): h = L1_e(x[t])
in FP32, gate and up rounded to BF16 (with a clamp c: gate = min(gate, c), up = clamp(up, -c, c));
a = SiLU(gate) * up * topk_weights[t, k] in FP32; FP8: a quantised per 1x32 with power-of-two scales
(BF16: a rounded to BF16); o_k = BF16(L2_e(a)); y[t] = BF16 of the FP32 sum of o_k over k in
ascending order (0 for a token with no expert). SiLU is torch's (``fast_math`` changes nothing).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import checks, env, reference, symmetric
from ..device import device_facts, get_num_sms
from ..intmath import align
from ..kernels import fp8_fp4_mega_moe as fused_kernel
from ..kernels import moe_layer
from ..quant import BLOCK, per_token_cast_to_fp8, transform_sf_into_required_layout
from .bf16_gemm import m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked
from .dispatch import get_check_groups
from .fp8_fp4_gemm import m_grouped_fp8_fp4_gemm_nt_contiguous, m_grouped_fp8_fp4_gemm_nt_masked
from .fp8_gemm import get_mk_alignment_for_contiguous_layout

MMA_TYPES = ("fp8xfp4", "bf16xbf16")
ACTIVATIONS = ("swiglu",)
FP8_RECIPE = (1, 1, 32)
# The masked layout where experts expect at most this many pairs (the swap-AB kernel's range) and
# E <= this many times top-k: an expert's T_max rows are E / k times the pairs it expects, and the
# masked kernels launch CTAs for all of them, most of which find no pair and return.
MASKED_MAX_EXPECTED_ROWS = 128
MASKED_MAX_EXPERTS_PER_TOPK = 16


@dataclass
class MegaMoeBuffer:
    """The layer's inputs and scratch for up to ``num_max_tokens_per_rank`` tokens.

    The caller writes its tokens and routing into the first rows of ``x``, ``x_sf`` (fp8xfp4),
    ``topk_idx`` and ``topk_weights``, then calls ``fp8_fp4_mega_moe`` / ``bf16_mega_moe`` with a
    ``y`` of as many rows as tokens.

    - ``x``: float8_e4m3fn (bf16xbf16: bfloat16) ``[num_max_tokens_per_rank, hidden]``.
    - ``x_sf``: int32 ``[num_max_tokens_per_rank, hidden / 128]``, the 1x32 UE8M0 scales packed four
      per int32 (``per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)``);
      None for bf16xbf16.
    - ``topk_idx``: int64 ``[num_max_tokens_per_rank, num_topk]``, the experts (-1: none).
    - ``topk_weights``: float32 ``[num_max_tokens_per_rank, num_topk]``.
    """

    group: object
    storage: torch.Tensor  # uint8: every tensor below is a view of it
    num_experts: int
    num_max_tokens_per_rank: int
    num_topk: int
    hidden: int
    intermediate_hidden: int
    mma_type: str
    x: torch.Tensor
    x_sf: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    # Scratch, [rows, ...] in the grouped layout (masked: [E, num_max_tokens_per_rank] rows) plus one
    # spare row that the routed pairs of no expert point at: the dispatched tokens (and scales), L1's
    # output, the activation (and scales), L2's output (its spare row zeros); each routed pair's row
    # (int32 [T_max * k]) and the GEMMs' grouped layout (int32 [E]).
    masked: bool
    rows: int
    tokens: torch.Tensor
    tokens_sf: torch.Tensor | None
    l1_out: torch.Tensor
    act: torch.Tensor
    act_sf: torch.Tensor | None
    l2_out: torch.Tensor
    pair_rows: torch.Tensor
    groups: torch.Tensor
    # The fused kernel's (fp8xfp4): the tokens' and the activation's scales folded per 128, fp32
    # [K / 128, rows + 1 rounded up to 4]; each row's routing weight; its counters (zeros between calls).
    folded_tokens_sf: torch.Tensor | None = None
    folded_act_sf: torch.Tensor | None = None
    row_weights: torch.Tensor | None = None
    control: torch.Tensor | None = None
    # The GPU steps' launch plans, by call signature.
    plans: dict = field(default_factory=dict, repr=False)
    # A buffer over several ranks (a process group): where the layer runs and the exchange's views.
    ranks: _Ranks | None = field(default=None, repr=False)

    def destroy(self) -> None:
        """Drop the buffer's memory (DeepGEMM's name; it is freed once no view is referenced)."""
        for name in ("storage", *moe_layer.VIEWS, *fused_kernel.VIEWS):
            setattr(self, name, None)
        self.plans.clear()
        if self.ranks is not None:
            self.ranks.local.destroy()
            self.ranks = None


@dataclass
class _Ranks:
    """A buffer across ranks: the symmetric storage, the one-rank buffer over every rank's token slots
    with this rank's experts, every rank's views (``peers[r]``: x, x_sf, topk_idx, topk_weights,
    combined, header of rank r, as this rank addresses them), their byte offsets in each rank's
    storage, and the storages' addresses (int64 ``[R]`` on the device, for the fused kernel)."""

    storage: symmetric.SymmetricStorage
    local: MegaMoeBuffer
    peers: list[dict]
    offsets: dict
    addresses: torch.Tensor

    @property
    def combined(self) -> torch.Tensor:
        """This rank's pairs' outputs, ``[T_max, k, H]``."""
        return self.peers[self.storage.rank]["combined"]


# The caller's views of a buffer; the rest of moe_layer.VIEWS is the layer's scratch, which a buffer
# across ranks shares with its local one.
_INPUTS = ("x", "x_sf", "topk_idx", "topk_weights")
_SCRATCH = tuple(name for name in moe_layer.VIEWS if name not in _INPUTS)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def get_symm_buffer_for_mega_moe(group: object, num_experts: int, num_max_tokens_per_rank: int, num_topk: int,
                                 hidden: int, intermediate_hidden: int, use_fp8_dispatch: bool | None = None,
                                 mma_type: str = "fp8xfp4", activation: str = "swiglu",
                                 device: torch.device | str | None = None) -> MegaMoeBuffer:
    """The buffer of ``fp8_fp4_mega_moe`` / ``bf16_mega_moe`` (see :class:`MegaMoeBuffer`).

    Args:
        group: None (plain device memory), or a process group of R ranks: the experts are split evenly,
            rank r holding experts [r E / R, (r + 1) E / R) and passing their weights; each rank
            passes its own tokens and gets their outputs. The tokens, routing and the pairs' outputs
            live in memory every rank addresses (torch's symmetric memory on CUDA, shared files for a
            ``gloo`` group of CPU processes on one host); see "The MoE layer across ranks" in README.md.
        num_experts: experts of the layer (all of them, over all ranks).
        num_max_tokens_per_rank: the most tokens a call takes.
        num_topk: experts per token.
        hidden, intermediate_hidden: H and I, multiples of 128; L1 maps H to 2 * I, L2 I to H.
        use_fp8_dispatch: DeepGEMM's older spelling of ``mma_type`` (True: fp8xfp4).
        mma_type: "fp8xfp4" (FP8 tokens, FP4 weights) or "bf16xbf16".
        activation: "swiglu".
        device: where to allocate (default: the current CUDA device; "cpu" runs the reference GEMMs).
    """
    if use_fp8_dispatch is not None and use_fp8_dispatch != (mma_type == "fp8xfp4"):
        raise ValueError(f"use_fp8_dispatch: {use_fp8_dispatch} contradicts mma_type {mma_type!r}")
    if mma_type not in MMA_TYPES:
        raise ValueError(f"mma_type: expected one of {MMA_TYPES}, got {mma_type!r}")
    _check_activation(activation)
    num_experts, tokens, num_topk = (_positive(name, value) for name, value in (
        ("num_experts", num_experts), ("num_max_tokens_per_rank", num_max_tokens_per_rank), ("num_topk", num_topk)))
    for name, value in (("hidden", hidden), ("intermediate_hidden", intermediate_hidden)):
        if _positive(name, value) % BLOCK:
            raise ValueError(f"{name}: expected a multiple of {BLOCK}, got {value}")
    if num_topk > num_experts:
        raise ValueError(f"num_topk: expected at most num_experts ({num_experts}), got {num_topk}")
    device = torch.device(device if device is not None else "cuda")
    if group is not None:
        return _buffer_across_ranks(group, num_experts, tokens, num_topk, hidden, intermediate_hidden, mma_type,
                                    activation, device)
    if device.type == "cuda" and num_experts > moe_layer.MAX_EXPERTS:
        raise ValueError(f"num_experts: at most {moe_layer.MAX_EXPERTS} on the GPU, got {num_experts}")
    fp8 = mma_type == "fp8xfp4"
    act_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    # Contiguous: each expert's rows start at a multiple of the alignment, so the routed pairs plus at
    # most alignment - 1 padding rows an expert.
    alignment = get_mk_alignment_for_contiguous_layout()
    rows = align(tokens * num_topk + num_experts * (alignment - 1), alignment)
    masked = (tokens * num_topk <= MASKED_MAX_EXPECTED_ROWS * num_experts
              and num_experts <= MASKED_MAX_EXPERTS_PER_TOPK * num_topk)
    if masked:
        rows = num_experts * tokens
    if fp8:  # the fused kernel's layout in the same rows (the masked GEMMs take the first E * T)
        rows = max(rows, fused_kernel.layout_rows(tokens * num_topk, num_experts))

    sf_dtype = torch.int32 if fp8 else None
    fused_dtype = torch.float32 if fp8 else None
    sf_pitch = align(rows + 1, 4)
    views = _carve(device, (
        *_input_parts(mma_type, tokens, num_topk, hidden),
        ("tokens", (rows + 1, hidden), act_dtype), ("tokens_sf", (rows + 1, hidden // BLOCK), sf_dtype),
        ("l1_out", (rows + 1, 2 * intermediate_hidden), torch.bfloat16),
        ("act", (rows + 1, intermediate_hidden), act_dtype),
        ("act_sf", (rows + 1, intermediate_hidden // BLOCK), sf_dtype),
        ("l2_out", (rows + 1, hidden), torch.bfloat16), ("pair_rows", (tokens * num_topk,), torch.int32),
        ("groups", (num_experts,), torch.int32),
        ("folded_tokens_sf", (hidden // BLOCK, sf_pitch), fused_dtype),
        ("folded_act_sf", (intermediate_hidden // BLOCK, sf_pitch), fused_dtype),
        ("row_weights", (rows,), fused_dtype),
        ("control", (fused_kernel.control_words(rows, num_experts),), torch.int32 if fp8 else None)))
    views["topk_idx"].fill_(-1)
    views["topk_weights"].zero_()
    # The GEMMs never write the spare row: the pairs of no expert read zeros there.
    views["l1_out"][rows].zero_()
    views["l2_out"][rows].zero_()
    if fp8:
        views["control"].zero_()  # the fused kernel's counters start at zero and end each call so
    return MegaMoeBuffer(group, num_experts=num_experts, num_max_tokens_per_rank=tokens, num_topk=num_topk,
                         hidden=hidden, intermediate_hidden=intermediate_hidden, mma_type=mma_type, masked=masked,
                         rows=rows, **views)


def _input_parts(mma_type: str, tokens: int, num_topk: int, hidden: int) -> tuple:
    """The caller's views of a buffer, as ``_layout`` parts."""
    fp8 = mma_type == "fp8xfp4"
    return (("x", (tokens, hidden), torch.float8_e4m3fn if fp8 else torch.bfloat16),
            ("x_sf", (tokens, hidden // BLOCK), torch.int32 if fp8 else None),
            ("topk_idx", (tokens, num_topk), torch.int64), ("topk_weights", (tokens, num_topk), torch.float32))


def _buffer_across_ranks(group: object, num_experts: int, tokens: int, num_topk: int, hidden: int, inter: int,
                         mma_type: str, activation: str, device: torch.device) -> MegaMoeBuffer:
    """A buffer over a process group's R ranks: the caller's views and ``combined`` (each of its pairs'
    BF16 outputs, ``[T_max, k, H]``, written there by the pair's expert's rank) in symmetric memory,
    and a one-rank buffer over R * T_max slots (rank s's token t in slot s * T_max + t) with this rank's
    E / R experts, where the layer runs."""
    num_ranks, rank = group.size(), group.rank()
    if num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a multiple of the group's {num_ranks} ranks, got {num_experts}")
    # header: the fused kernel's (its token count and the flags of its barrier across ranks).
    parts = (*_input_parts(mma_type, tokens, num_topk, hidden),
             ("combined", (tokens, num_topk, hidden), torch.bfloat16),
             ("header", (fused_kernel.header_words(num_ranks),), torch.int32))
    offsets, total = _layout(parts)
    storage = symmetric.allocate(group, total, device)
    peers = [_views(peer, parts, offsets) for peer in storage.peers]
    own = peers[rank]
    own["topk_idx"].fill_(-1)
    own["topk_weights"].zero_()
    own["header"].zero_()
    local = get_symm_buffer_for_mega_moe(None, num_experts // num_ranks, num_ranks * tokens, num_topk, hidden, inter,
                                         mma_type=mma_type, activation=activation, device=device)
    scratch = {name: getattr(local, name) for name in _SCRATCH}
    buffer = MegaMoeBuffer(group, storage.local, num_experts, tokens, num_topk, hidden, inter, mma_type, own["x"],
                           own["x_sf"], own["topk_idx"], own["topk_weights"], local.masked, local.rows, **scratch)
    addresses = torch.tensor([peer.data_ptr() for peer in storage.peers], dtype=torch.int64, device=device)
    buffer.ranks = _Ranks(storage, local, peers, offsets, addresses)
    storage.barrier()  # every rank's routing routes nowhere, and its flags are zero, before a peer reads them
    return buffer


def _layout(parts: tuple) -> tuple[dict, int]:
    """Each ``(name, shape, dtype)`` part's byte offset (256-byte aligned; dtype None: no part) and the
    total."""
    offsets, total = {}, 0
    for name, shape, dtype in parts:
        if dtype is not None:
            offsets[name] = total
            total = align(total + math.prod(shape) * dtype.itemsize, 256)
    return offsets, total


def _views(storage: torch.Tensor, parts: tuple, offsets: dict) -> dict:
    """``{name: view of storage}`` at ``_layout``'s offsets (None for a part of dtype None)."""
    return {name: None if dtype is None else
            storage[offsets[name]:offsets[name] + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, shape, dtype in parts}


def _carve(device: torch.device, parts: tuple) -> dict:
    """``{"storage": one uint8 allocation, name: view}`` for ``(name, shape, dtype)`` parts."""
    offsets, total = _layout(parts)
    storage = torch.empty(total, dtype=torch.uint8, device=device)
    return {"storage": storage, **_views(storage, parts, offsets)}


def _fp4_weights(name: str, weights: object, experts: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 weights ``(int8 [E, n, k/2], 1x32 scales)`` checked, the scales as the GEMMs take them."""
    if not isinstance(weights, (tuple, list)) or len(weights) != 2:
        raise TypeError(f"{name}: expected an (int8 packed FP4 tensor, scales) pair, got {type(weights).__name__}")
    packed, sf = weights
    checks.tensor(f"{name}[0]", packed, (torch.int8, torch.uint8), 3)
    checks.shape(f"{name}[0]", packed, (experts, n, k // 2))
    checks.is_tensor(f"{name}[1]", sf)
    if sf.dtype == torch.float32:
        checks.shape(f"{name}[1]", sf, (experts, n, k // 32))
        sf = transform_sf_into_required_layout(sf, n, k, (1, 32), experts)
    checks.dtype(f"{name}[1]", sf, (torch.int32,))
    checks.shape(f"{name}[1]", sf, (experts, n, k // BLOCK))
    return packed, sf


def _bf16_weights(name: str, weights: object, experts: int, n: int, k: int) -> torch.Tensor:
    checks.tensor(name, weights, (torch.bfloat16,), 3)
    checks.shape(name, weights, (experts, n, k))
    return weights


def _layer_dims(l1_weights: object, l2_weights: object) -> tuple[int, int, int]:
    """(E, H, I) from L1 ``[E, 2I, H(/2)]`` and L2 ``[E, H, I(/2)]`` (FP4 pairs or BF16 tensors)."""
    l1 = l1_weights[0] if isinstance(l1_weights, (tuple, list)) else l1_weights
    l2 = l2_weights[0] if isinstance(l2_weights, (tuple, list)) else l2_weights
    checks.is_tensor("l1_weights", l1)
    checks.is_tensor("l2_weights", l2)
    if l1.dim() != 3 or l2.dim() != 3:
        raise ValueError(f"l1_weights, l2_weights: expected [E, 2I, H] and [E, H, I], got shapes "
                         f"{tuple(l1.shape)} and {tuple(l2.shape)}")
    experts, hidden = l2.shape[:2]
    if l1.shape[1] % 2:
        raise ValueError(f"l1_weights: expected 2 * I rows (gate, then up), got {l1.shape[1]}")
    return experts, hidden, l1.shape[1] // 2


def _checked_weights(l1_weights: object, l2_weights: object, weights_of) -> tuple[tuple[int, int, int], tuple]:
    """((E, H, I), (L1, L2)): the layer's dimensions and its weights checked by ``weights_of``
    (``_fp4_weights`` or ``_bf16_weights``), FP4 scales in the GEMMs' layout."""
    experts, hidden, inter = _layer_dims(l1_weights, l2_weights)
    return (experts, hidden, inter), (weights_of("l1_weights", l1_weights, experts, 2 * inter, hidden),
                                      weights_of("l2_weights", l2_weights, experts, hidden, inter))


def transform_weights_for_mega_moe(l1_weights: object, l2_weights: object, activation: str = "swiglu"):
    """The layer's weights in the layout the calls take: FP4 pairs ``(int8 [E, 2I, H/2], scales)`` and
    ``(int8 [E, H, I/2], scales)`` with their 1x32 UE8M0 scales (float32 ``[.., K/32]`` or packed int32)
    as packed int32 ``[E, N, K/128]``; BF16 ``[E, 2I, H]`` and ``[E, H, I]`` as they are. L1's rows are
    gate (the first I) then up. Do it once, when the weights are loaded."""
    _check_activation(activation)
    return _checked_weights(l1_weights, l2_weights,
                            _fp4_weights if isinstance(l1_weights, (tuple, list)) else _bf16_weights)[1]


def _check_call(y: torch.Tensor, buffer: MegaMoeBuffer, layer: MegaMoeBuffer, mma_type: str, experts: int,
                hidden: int, inter: int, stats: torch.Tensor | None, activation: str,
                activation_clamp: float | None) -> int:
    """The call's arguments against the buffer (``layer``: where the layer runs, the buffer itself or
    across ranks its local one); returns the number of tokens."""
    if not isinstance(buffer, MegaMoeBuffer):
        raise TypeError(f"sym_buffer: expected what get_symm_buffer_for_mega_moe returns, got {type(buffer).__name__}")
    if buffer.x is None:
        raise ValueError("sym_buffer: destroyed")
    if buffer.mma_type != mma_type:
        raise ValueError(f"sym_buffer: expected one made with mma_type={mma_type!r}, got {buffer.mma_type!r}")
    got = (layer.num_experts, buffer.hidden, buffer.intermediate_hidden)
    if got != (experts, hidden, inter):
        which = "this rank's experts " if layer is not buffer else ""
        raise ValueError(f"l1_weights, l2_weights: expected (E, H, I) = {got} ({which}as the buffer was made), got "
                         f"{(experts, hidden, inter)}")
    checks.tensor("y", y, (torch.bfloat16,), 2)
    if y.shape[1] != hidden or y.shape[0] > buffer.num_max_tokens_per_rank:
        raise ValueError(f"y: expected [T, {hidden}] with T <= {buffer.num_max_tokens_per_rank}, got "
                         f"{tuple(y.shape)}")
    if y.device != buffer.x.device:
        raise ValueError(f"y: expected a tensor on the buffer's device {buffer.x.device}, got {y.device}")
    if y.shape[0] > 1 and y.stride(1) != 1:
        raise ValueError(f"y: expected a unit inner stride, got strides {tuple(y.stride())}")
    if stats is not None:
        name = "cumulative_local_expert_recv_stats"
        checks.tensor(name, stats, (torch.int32, torch.int64), 1)
        checks.shape(name, stats, (experts,))
        if stats.device != buffer.x.device:
            raise ValueError(f"{name}: expected a tensor on the buffer's device {buffer.x.device}, got {stats.device}")
        if experts > 1 and stats.stride(0) != 1:
            raise ValueError(f"{name}: expected a contiguous tensor, got stride {stats.stride(0)}")
    _check_activation(activation)
    if activation_clamp is not None and not activation_clamp > 0:
        raise ValueError(f"activation_clamp: expected None or a positive number, got {activation_clamp!r}")
    return y.shape[0]


@dataclass
class _Routing:
    """Where the routed pairs go: ``pair_rows`` [T * k] each (token, k) pair's row in the layout (the
    spare row for a pair of no expert), ``groups`` int32 [E] the grouped GEMMs' layout (contiguous:
    each expert's end row, the psum layout; masked: its pairs), ``counts`` [E] the pairs each expert
    receives."""

    pair_rows: torch.Tensor
    groups: torch.Tensor
    counts: torch.Tensor


def _route(topk_idx: torch.Tensor, num_experts: int, spare_row: int, masked_stride: int | None) -> _Routing:
    """The pairs sorted by expert (then token, then k: a stable sort), expert e's from row e *
    ``masked_stride`` (masked) or from a multiple of the contiguous layout's alignment; on the device,
    reading nothing back. The GPU's route kernel (kernels/moe_layer.py) gives the same rows. A masked
    expert's pairs past its ``masked_stride`` rows (only a token naming an expert twice makes them) get
    the spare row: ``set_check_groups(True)`` raises on such tokens instead."""
    alignment = get_mk_alignment_for_contiguous_layout()
    experts = topk_idx.flatten()
    experts = torch.where((experts >= 0) & (experts < num_experts), experts, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    counts.index_add_(0, experts, torch.ones_like(experts))
    order = torch.sort(experts, stable=True).indices
    sorted_experts = experts[order]
    first = torch.cumsum(counts, 0) - counts  # each expert's first place in the sorted order
    if masked_stride is None:
        padded = (counts[:num_experts] + alignment - 1) // alignment * alignment
        starts = torch.cumsum(padded, 0) - padded
    else:
        starts = torch.arange(num_experts, device=experts.device) * masked_stride
    starts = torch.cat((starts, counts.new_full((1,), spare_row)))
    rank = torch.arange(experts.numel(), device=experts.device) - first[sorted_experts]
    fits = sorted_experts < num_experts
    if masked_stride is not None:
        fits &= rank < masked_stride
    rows = torch.where(fits, starts[sorted_experts] + rank, spare_row)
    pair_rows = torch.empty_like(rows).scatter_(0, order, rows)
    groups = (counts[:num_experts].clamp(max=masked_stride) if masked_stride is not None
              else starts[:num_experts] + counts[:num_experts])
    return _Routing(pair_rows, groups.to(torch.int32), counts[:num_experts])


def _by_expert(t: torch.Tensor, buffer: MegaMoeBuffer) -> torch.Tensor:
    """The masked layout's rows (the first E * num_max_tokens_per_rank) as [E, num_max_tokens_per_rank, ...]."""
    experts, tokens = buffer.num_experts, buffer.num_max_tokens_per_rank
    return t[:experts * tokens].view(experts, tokens, *t.shape[1:])


def _grouped_gemm(buffer: MegaMoeBuffer, num_tokens: int, weights: tuple, masked_gemm, contiguous_gemm):
    """``gemm(a, index, d, groups)``: ``weights[index]`` by the grouped GEMM of the buffer's layout, A (a
    tensor, or FP8 data and scales) and D given as [rows, ...]."""
    expected_rows = max(1, -(-num_tokens * buffer.num_topk // buffer.num_experts))  # the masked GEMMs' hint

    def gemm(a, index: int, d: torch.Tensor, groups: torch.Tensor) -> None:
        if not buffer.masked:
            contiguous_gemm(a, weights[index], d, groups, use_psum_layout=True)
            return
        a = tuple(_by_expert(t, buffer) for t in a) if isinstance(a, tuple) else _by_expert(a, buffer)
        masked_gemm(a, weights[index], _by_expert(d, buffer), groups, expected_rows)

    return gemm


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _layer(y: torch.Tensor | None, buffer: MegaMoeBuffer, num_tokens: int, gemm, stats: torch.Tensor | None,
           activation_clamp: float | None, use_kernels: bool) -> None:
    """The unfused pipeline; ``gemm`` (``_grouped_gemm``'s) runs L1 (index 0) and L2 (1). The steps
    around the GEMMs run as the GPU's kernels (``use_kernels``) or in PyTorch (on the CPU; on the GPU,
    the kernels' reference in the tests). With ``y`` None no combine: each pair's output stays in its
    row of ``l2_out`` (``pair_rows``)."""
    if num_tokens == 0:
        return
    if use_kernels:
        _layer_kernels(y, buffer, num_tokens, gemm, stats, activation_clamp)
    else:
        _layer_torch(y, buffer, num_tokens, gemm, stats, activation_clamp)


def _gemm_operands(buffer: MegaMoeBuffer, name: str):
    """A GEMM's A over the layout's rows: the tensor, or FP8 values and packed scales."""
    values, sf = getattr(buffer, name)[:buffer.rows], getattr(buffer, f"{name}_sf")
    return values if sf is None else (values, sf[:buffer.rows])


def _layer_kernels(y: torch.Tensor | None, buffer: MegaMoeBuffer, num_tokens: int, gemm,
                   stats: torch.Tensor | None, activation_clamp: float | None) -> None:
    num_sms = get_num_sms()
    y_pitch = 0 if y is None else y.stride(0)
    key = (num_tokens, y_pitch, None if stats is None else stats.dtype, activation_clamp, num_sms)
    plan = buffer.plans.get(key)
    if plan is None:
        views = {name: getattr(buffer, name) for name in moe_layer.VIEWS}
        plan = buffer.plans[key] = moe_layer.plan(
            buffer.mma_type == "fp8xfp4", moe_layer.view_offsets(buffer.storage, views), num_tokens=num_tokens,
            num_topk=buffer.num_topk, num_experts=buffer.num_experts, hidden=buffer.hidden,
            intermediate=buffer.intermediate_hidden,
            masked_stride=buffer.num_max_tokens_per_rank if buffer.masked else 0,
            alignment=get_mk_alignment_for_contiguous_layout(), spare_row=buffer.rows, y_pitch=y_pitch,
            stats_dtype=None if stats is None else stats.dtype, clamp=activation_clamp, num_sms=num_sms)
    rows, storage = buffer.rows, buffer.storage
    # The launches go to the current device's stream: the buffer's device, made current only if it is not.
    device = buffer.storage.device
    with torch.cuda.device(device) if device.index != torch.cuda.current_device() else contextlib.nullcontext():
        plan.launch("route", storage, y, stats)
        plan.launch("dispatch", storage, y, stats)
        gemm(_gemm_operands(buffer, "tokens"), 0, buffer.l1_out[:rows], buffer.groups)
        plan.launch("activation", storage, y, stats)
        gemm(_gemm_operands(buffer, "act"), 1, buffer.l2_out[:rows], buffer.groups)
        if y is not None:
            plan.launch("combine", storage, y, stats)


def _layer_torch(y: torch.Tensor | None, buffer: MegaMoeBuffer, num_tokens: int, gemm,
                 stats: torch.Tensor | None, activation_clamp: float | None) -> None:
    topk, fp8 = buffer.num_topk, buffer.mma_type == "fp8xfp4"
    routing = _route(buffer.topk_idx[:num_tokens], buffer.num_experts, buffer.rows,
                     buffer.num_max_tokens_per_rank if buffer.masked else None)
    # Each routed pair's token into its row, only those: the layout's other rows feed no output. FP8
    # moves as bytes (index_copy_ takes no float8 dtype on every device).
    pair_tokens = torch.arange(num_tokens * topk, device=buffer.x.device) // topk
    _bytes(buffer.tokens).index_copy_(0, routing.pair_rows, _bytes(buffer.x[:num_tokens])[pair_tokens])
    if fp8:
        buffer.tokens_sf.index_copy_(0, routing.pair_rows, buffer.x_sf[:num_tokens][pair_tokens])
    gemm(_gemm_operands(buffer, "tokens"), 0, buffer.l1_out[:buffer.rows], routing.groups)
    # The activation of the routed pairs only, into their rows (the pairs of no expert read the zero
    # spare row, so their unused activation stays finite).
    act = reference.swiglu(buffer.l1_out[routing.pair_rows], buffer.topk_weights[:num_tokens].flatten(),
                           activation_clamp)
    if fp8:
        act, act_sf = per_token_cast_to_fp8(act, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
        buffer.act_sf.index_copy_(0, routing.pair_rows, act_sf)
    _bytes(buffer.act).index_copy_(0, routing.pair_rows, _bytes(act.to(buffer.act.dtype)))
    gemm(_gemm_operands(buffer, "act"), 1, buffer.l2_out[:buffer.rows], routing.groups)
    buffer.pair_rows[:num_tokens * topk] = routing.pair_rows
    # The pairs of no expert read L2's zero spare row: they add nothing.
    if y is not None:
        reference.sum_over_topk(buffer.l2_out[routing.pair_rows].view(num_tokens, topk, -1), y)
    if stats is not None:
        stats += routing.counts.to(stats.dtype)


def _check_distinct_experts(buffer: MegaMoeBuffer, num_tokens: int) -> None:
    """set_check_groups: a token naming an expert twice overflows that expert's masked rows (a
    synchronisation)."""
    experts = buffer.topk_idx[:num_tokens].sort(dim=1).values
    valid = (experts[:, 1:] >= 0) & (experts[:, 1:] < buffer.num_experts)
    repeated = (valid & (experts[:, 1:] == experts[:, :-1])).any(dim=1).nonzero().flatten()
    if repeated.numel():
        raise ValueError(f"sym_buffer.topk_idx: tokens {repeated[:8].tolist()} name an expert twice, which the "
                         f"masked layout does not take")


# Per mma_type: the weights' check (and scale layout), the masked and the contiguous grouped GEMM.
_FAMILIES = {
    "fp8xfp4": (_fp4_weights, m_grouped_fp8_fp4_gemm_nt_masked, m_grouped_fp8_fp4_gemm_nt_contiguous),
    "bf16xbf16": (_bf16_weights, m_grouped_bf16_gemm_nt_masked, m_grouped_bf16_gemm_nt_contiguous),
}


# fp8_fp4_mega_moe on the GPU as one fused kernel (kernels/sm90_fp8_fp4_mega_moe.cuh) instead of the
# unfused pipeline: off until a GPU has tested and timed it.
_FUSED = env.Toggle("MOEGEMM_FUSED_MOE")


def _fused_serves(buffer: MegaMoeBuffer, mma_type: str, use_kernels: bool) -> bool:
    """Whether the fused kernel takes a call: FP8 x FP4 on the GPU, H and I of at least MIN_HIDDEN, one
    rank or a group of at most MAX_RANKS."""
    ranks = buffer.ranks
    return (mma_type == "fp8xfp4" and use_kernels and buffer.storage.is_cuda
            and min(buffer.hidden, buffer.intermediate_hidden) >= fused_kernel.MIN_HIDDEN
            and (ranks is None or ranks.storage.num_ranks <= fused_kernel.MAX_RANKS))


def _layer_fused(y: torch.Tensor, buffer: MegaMoeBuffer, num_tokens: int, weights: tuple,
                 stats: torch.Tensor | None, activation_clamp: float | None) -> None:
    """The layer as one launch of the fused kernel (its numerics are the unfused pipeline's). Across
    ranks the kernel moves the tokens and outputs itself, and every rank launches it, with or without
    tokens of its own."""
    ranks = buffer.ranks
    layer = buffer if ranks is None else ranks.local
    if num_tokens == 0 and ranks is None:
        return
    (l1, l1_sf), (l2, l2_sf) = weights
    # Its descriptors see each operand as one 2-D tensor over all experts: packed rows back to back,
    # the scales [E * K / 128, N] (MN-major, N a multiple of 4 here).
    for name, packed, sf in (("l1_weights", l1, l1_sf), ("l2_weights", l2, l2_sf)):
        experts, n, k_blocks = sf.shape
        for label, t, strides in ((f"{name}[0]", packed, (n * packed.shape[2], packed.shape[2], 1)),
                                  (f"{name}[1]", sf, (k_blocks * n, 1, n))):
            if t.stride() != strides:
                raise ValueError(f"{label}: the fused kernel takes strides {strides}, got {tuple(t.stride())}")
    device = buffer.storage.device
    num_sms = get_num_sms()
    key = ("fused", num_tokens, y.stride(0), None if stats is None else stats.dtype, activation_clamp, num_sms)
    plan = buffer.plans.get(key)
    if plan is None:
        num_ranks = 1 if ranks is None else ranks.storage.num_ranks
        # One rank: every view in its storage; across ranks the caller's at each rank's symmetric offsets.
        names = fused_kernel.VIEWS if ranks is None else fused_kernel.SCRATCH_VIEWS
        offsets = moe_layer.view_offsets(layer.storage, {name: getattr(layer, name) for name in names})
        where = None
        if ranks is not None:
            offsets.update({name: ranks.offsets[name] for name in fused_kernel.SOURCE_VIEWS})
            where = fused_kernel.Ranks(ranks.offsets["combined"], ranks.offsets["header"], ranks.storage.rank,
                                       num_ranks, ranks.storage.rank * layer.num_experts)
        # The pairs an expert expects: every rank's tokens over all experts, about this rank's share.
        config = fused_kernel.select_config(max(num_tokens, 1) * buffer.num_topk * num_ranks,
                                            layer.num_experts * num_ranks, device_facts(device.index),
                                            ranks is not None)
        plan = buffer.plans[key] = fused_kernel.plan(
            config, offsets, rows=layer.rows, sf_pitch=layer.folded_tokens_sf.shape[1], num_tokens=num_tokens,
            max_tokens=buffer.num_max_tokens_per_rank, num_topk=buffer.num_topk, num_experts=layer.num_experts,
            hidden=buffer.hidden, intermediate=buffer.intermediate_hidden, y_pitch=y.stride(0),
            stats_dtype=None if stats is None else stats.dtype, clamp=activation_clamp, num_sms=num_sms,
            ranks=where)
    operands = dict(storage=layer.storage, tokens=layer.tokens, tokens_sf=layer.folded_tokens_sf, act=layer.act,
                    act_sf=layer.folded_act_sf, l1=l1, l1_sf=l1_sf, l2=l2, l2_sf=l2_sf, y=y, stats=stats,
                    peers=None if ranks is None else ranks.addresses)
    pointers = {name: 0 if t is None else t.data_ptr() for name, t in operands.items()}
    with torch.cuda.device(device) if device.index != torch.cuda.current_device() else contextlib.nullcontext():
        plan.launch(device.index, pointers)


# The ways a buffer across ranks moves tokens and outputs: "symmetric", each rank reading its experts'
# tokens from their sources' buffers and writing each pair's output into its source's (symmetric
# memory; PyTorch around the unfused layer, or inside the fused kernel where it serves);
# "all_to_all", the baseline of NCCL's (gloo's on the CPU) all_to_all_single before and after.
EXCHANGES = ("symmetric", "all_to_all")


def _run(y: torch.Tensor, l1_weights: object, l2_weights: object, buffer: MegaMoeBuffer, mma_type: str,
         stats: torch.Tensor | None, activation: str, activation_clamp: float | None,
         use_kernels: bool | None = None, exchange: str = "symmetric", fused: bool | None = None) -> None:
    """Either public call, its arguments checked; ``use_kernels``: see ``_layer`` (default: on the GPU);
    ``exchange``: one of EXCHANGES, for a buffer across ranks; ``fused``: the fused kernel where it
    serves (default: MOEGEMM_FUSED_MOE)."""
    weights_of, masked_gemm, contiguous_gemm = _FAMILIES[mma_type]
    (experts, hidden, inter), weights = _checked_weights(l1_weights, l2_weights, weights_of)
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange: expected one of {EXCHANGES}, got {exchange!r}")
    ranks = getattr(buffer, "ranks", None)
    layer = buffer if ranks is None else ranks.local
    num_tokens = _check_call(y, buffer, layer, mma_type, experts, hidden, inter, stats, activation, activation_clamp)
    if use_kernels is None:
        use_kernels = y.is_cuda
    if (_FUSED.get() if fused is None else fused) and exchange == "symmetric" and \
            _fused_serves(buffer, mma_type, use_kernels):
        _layer_fused(y, buffer, num_tokens, weights, stats, activation_clamp)
        return
    if ranks is None:
        if buffer.masked and get_check_groups():
            _check_distinct_experts(buffer, num_tokens)
        _layer(y, buffer, num_tokens, _grouped_gemm(buffer, num_tokens, weights, masked_gemm, contiguous_gemm), stats,
               activation_clamp, use_kernels)
        return
    across = _layer_all_to_all if exchange == "all_to_all" else _layer_across_ranks
    across(y, buffer, num_tokens, lambda count: _grouped_gemm(layer, count, weights, masked_gemm, contiguous_gemm),
           stats, activation_clamp, use_kernels)


def _local_routing(topk_idx: torch.Tensor, buffer: MegaMoeBuffer) -> torch.Tensor:
    """Global expert ids as this rank's local ones, -1 for the other ranks' experts and for none."""
    ranks = buffer.ranks
    first = ranks.storage.rank * ranks.local.num_experts
    local = topk_idx - first
    return torch.where((topk_idx >= 0) & (local >= 0) & (local < ranks.local.num_experts), local, -1)


def _run_local(buffer: MegaMoeBuffer, count: int, gemm_of, stats: torch.Tensor | None,
               activation_clamp: float | None, use_kernels: bool) -> torch.Tensor:
    """The local layer over its first ``count`` token slots (their routing in local ids), without the
    combine: each pair's BF16 output, ``[count, k, H]`` (zeros for the pairs of no local expert)."""
    local = buffer.ranks.local
    if local.masked and get_check_groups():
        _check_distinct_experts(local, count)
    _layer(None, local, count, gemm_of(count), stats, activation_clamp, use_kernels)
    pair_rows = local.pair_rows[:count * local.num_topk].long()
    return local.l2_out[pair_rows].view(count, local.num_topk, local.hidden)


def _layer_across_ranks(y: torch.Tensor, buffer: MegaMoeBuffer, num_tokens: int, gemm_of,
                        stats: torch.Tensor | None, activation_clamp: float | None, use_kernels: bool) -> None:
    """The symmetric exchange: rank s's token t takes slot s * T_max + t of the local layer on every rank
    holding one of its experts; each pair's output goes to ``combined[t, k]`` of its source, which sums
    a token's pairs in ascending k as the one-rank layer does (the same BF16 values, the same sum)."""
    ranks, tokens = buffer.ranks, buffer.num_max_tokens_per_rank
    local = ranks.local
    # This call's tokens only; the pairs of no expert add the zeros they start with.
    buffer.topk_idx[num_tokens:].fill_(-1)
    ranks.combined[:num_tokens].zero_()
    ranks.storage.barrier()
    here = []
    for s, peer in enumerate(ranks.peers):
        slots = slice(s * tokens, (s + 1) * tokens)
        routing = _local_routing(peer["topk_idx"], buffer)
        local.topk_idx[slots] = routing
        local.topk_weights[slots] = peer["topk_weights"]
        rows = (routing >= 0).any(dim=1).nonzero().flatten()
        _bytes(local.x)[s * tokens + rows] = _bytes(peer["x"])[rows]
        if local.x_sf is not None:
            local.x_sf[s * tokens + rows] = peer["x_sf"][rows]
        here.append(routing >= 0)
    outputs = _run_local(buffer, ranks.storage.num_ranks * tokens, gemm_of, stats, activation_clamp, use_kernels)
    for s, peer in enumerate(ranks.peers):
        token, k = here[s].nonzero(as_tuple=True)
        peer["combined"][token, k] = outputs[s * tokens + token, k]
    ranks.storage.barrier()
    reference.sum_over_topk(ranks.combined[:num_tokens], y)


def _layer_all_to_all(y: torch.Tensor, buffer: MegaMoeBuffer, num_tokens: int, gemm_of,
                      stats: torch.Tensor | None, activation_clamp: float | None, use_kernels: bool) -> None:
    """The baseline: each token sent (all_to_all_single) to every rank holding one of its experts, the
    local layer over the tokens received, each pair's output sent back, summed by the source."""
    ranks = buffer.ranks
    group, num_ranks, local = ranks.storage.group, ranks.storage.num_ranks, ranks.local
    topk_idx = buffer.topk_idx[:num_tokens]
    owner = torch.where((topk_idx >= 0) & (topk_idx < buffer.num_experts), topk_idx // local.num_experts, -1)
    sent = [(owner == r).any(dim=1).nonzero().flatten() for r in range(num_ranks)]
    order = torch.cat(sent)
    send_counts = [int(t.numel()) for t in sent]
    counts = torch.tensor(send_counts, dtype=torch.int64, device=y.device)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    recv_counts = received.tolist()
    count = sum(recv_counts)

    def exchange(t: torch.Tensor, back: bool = False) -> torch.Tensor:
        """t's rows to their ranks (``back``: the received rows' outputs to their sources)."""
        splits_out, splits_in = (send_counts, recv_counts) if back else (recv_counts, send_counts)
        out = t.new_empty((sum(splits_out), *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), splits_out, splits_in, group=group)
        return out

    _bytes(local.x)[:count] = exchange(_bytes(buffer.x)[order])
    if local.x_sf is not None:
        local.x_sf[:count] = exchange(buffer.x_sf[order])
    routing = _local_routing(exchange(topk_idx[order]), buffer)
    local.topk_idx[:count] = routing
    local.topk_weights[:count] = exchange(buffer.topk_weights[:num_tokens][order])
    outputs = _run_local(buffer, count, gemm_of, stats, activation_clamp, use_kernels)
    back = exchange(outputs, back=True)  # [sum(send_counts), k, H], in `order`
    # Each pair from its expert's rank alone; the pairs of no expert stay zero.
    combined = ranks.combined[:num_tokens]
    combined.zero_()
    rank_of = torch.repeat_interleave(torch.arange(num_ranks, device=y.device), counts)
    mine = owner[order] == rank_of[:, None]
    token, k = mine.nonzero(as_tuple=True)
    combined[order[token], k] = back[token, k]
    reference.sum_over_topk(combined, y)


def fp8_fp4_mega_moe(y: torch.Tensor, l1_weights: tuple[torch.Tensor, torch.Tensor],
                     l2_weights: tuple[torch.Tensor, torch.Tensor], sym_buffer: MegaMoeBuffer,
                     cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                     recipe: tuple[int, int, int] = FP8_RECIPE, activation: str = "swiglu",
                     activation_clamp: float | None = None, fast_math: bool = True) -> None:
    """The MoE layer with FP8 tokens and FP4 weights: ``y[t] = sum over k of L2_e(act(L1_e(x[t])))``
    (e = ``topk_idx[t, k]``; the module docstring has the numerics), written into ``y``.

    Args:
        y: bfloat16 ``[T, H]``, T <= the buffer's ``num_max_tokens_per_rank``; tokens, scales and
            routing are the buffer's first T rows.
        l1_weights: ``(int8 [E, 2I, H/2], scales)``: e2m1 codes packed two per byte (element 2i in the
            low nibble), gate rows then up rows, 1x32 UE8M0 scales (``transform_weights_for_mega_moe``).
        l2_weights: ``(int8 [E, H, I/2], scales)`` likewise.
        sym_buffer: from ``get_symm_buffer_for_mega_moe(..., mma_type="fp8xfp4")``.
        cumulative_local_expert_recv_stats: int32 ``[E]``, each expert's received pairs added.
        recipe: (1, 1, 32), the only one: 1x32 UE8M0 scales for tokens and weights.
        activation: "swiglu". activation_clamp: None or c > 0 (see the module docstring).
        fast_math: accepted for DeepGEMM's signature; SiLU is torch's either way.
    """
    del fast_math
    if tuple(recipe) != FP8_RECIPE:
        raise ValueError(f"recipe: expected {FP8_RECIPE} (1x32 UE8M0 scales for tokens and weights), got {recipe!r}")
    _run(y, l1_weights, l2_weights, sym_buffer, "fp8xfp4", cumulative_local_expert_recv_stats, activation,
         activation_clamp)


def bf16_mega_moe(y: torch.Tensor, l1_weights: torch.Tensor, l2_weights: torch.Tensor, sym_buffer: MegaMoeBuffer,
                  cumulative_local_expert_recv_stats: torch.Tensor | None = None, activation: str = "swiglu",
                  activation_clamp: float | None = None, fast_math: bool = True) -> None:
    """:func:`fp8_fp4_mega_moe` with BF16 tokens (the buffer's ``x``) and BF16 weights ``[E, 2I, H]``
    and ``[E, H, I]``; the activation is rounded to BF16 instead of quantised."""
    del fast_math
    _run(y, l1_weights, l2_weights, sym_buffer, "bf16xbf16", cumulative_local_expert_recv_stats, activation,
         activation_clamp)
