"""The FP8 GEMMs with fine-grained scaling: ``fp8_gemm_nt`` and the MoE grouped forms (contiguous,
masked). Checks, the bound calls of the dispatch path, and the public functions."""

from __future__ import annotations

import torch

from .. import checks, device, reference
from ..gemm.desc import GemmType
from ..intmath import ceil_div, get_tma_aligned_size
from ..kernels import fp8_gemm
from ..quant import get_mn_major_tma_aligned_tensor
from . import gemm_common
from .dispatch import Op, get_check_groups

FP8 = (torch.float8_e4m3fn,)
FP32 = (torch.float32,)
GEMM_OUT = (torch.bfloat16, torch.float32)
_INPUT_NAMES = ("a", "sfa", "b", "sfb")


# ---- checks (once per call signature) ---------------------------------------------------------------------


def _sfb_per_row(sfb: torch.Tensor, n: int, k: int) -> bool:
    """Whether SFB holds one scale per 1x128 block of B's rows (the 1D1D recipe), not one per 128x128
    block; at N = 1 the two are the same."""
    return n > 1 and tuple(sfb.shape) == (n, ceil_div(k, 128))


def _check_dense(a, sfa, b, sfb, d, c) -> None:
    checks.tensor("a", a, FP8, 2)
    checks.tensor("b", b, FP8, 2)
    checks.tensor("sfa", sfa, FP32, 2)
    checks.tensor("sfb", sfb, FP32, 2)
    checks.tensor("d", d, GEMM_OUT, 2)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"b: expected shape (N, K) with K = {k} (from a), got {tuple(b.shape)}")
    checks.shape("sfa", sfa, (m, ceil_div(k, 128)))
    if not _sfb_per_row(sfb, n, k):
        if tuple(sfb.shape) != (ceil_div(n, 128), ceil_div(k, 128)):
            raise ValueError(f"sfb: expected shape {(ceil_div(n, 128), ceil_div(k, 128))} (128x128 blocks) or "
                             f"{(n, ceil_div(k, 128))} (1x128, the 1D1D recipe), got {tuple(sfb.shape)}")
    elif d.dtype != torch.float32:
        raise TypeError(f"d: expected dtype torch.float32 with SFB per 1x128 block of B's rows (the 1D1D recipe), "
                        f"got {d.dtype}")
    checks.shape("d", d, (m, n))
    tensors = {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d}
    gemm_common.check_addend(c, d, (m, n), tensors)
    gemm_common.check_cuda(tensors)
    for name in ("a", "b", "d"):
        checks.tma_rows(name, tensors[name])


def _check_grouped_operands(a, sfa, b, sfb, d, a_dims: int) -> int:
    """Checks shared by the grouped forms; returns G."""
    checks.tensor("a", a, FP8, a_dims)
    checks.tensor("sfa", sfa, FP32, a_dims)
    checks.tensor("b", b, FP8, 3)
    checks.tensor("sfb", sfb, FP32, 3)
    checks.tensor("d", d, GEMM_OUT, a_dims)
    k = a.shape[-1]
    num_groups, n = b.shape[:2]
    if b.shape[2] != k:
        raise ValueError(f"b: expected shape (G, N, K) with K = {k} (from a), got {tuple(b.shape)}")
    if a_dims == 3 and a.shape[0] != num_groups:
        raise ValueError(f"a: expected G = {num_groups} experts (from b), got shape {tuple(a.shape)}")
    checks.shape("sfa", sfa, (*a.shape[:-1], ceil_div(k, 128)))
    checks.shape("sfb", sfb, (num_groups, ceil_div(n, 128), ceil_div(k, 128)))
    checks.shape("d", d, (*a.shape[:-1], n))
    for name, t in (("a", a), ("b", b), ("d", d)):
        checks.tma_rows(name, t)
    gemm_common.check_experts_stacked("b", b)
    return num_groups


def _check_contiguous(a, sfa, b, sfb, d, layout, use_psum_layout) -> None:
    num_groups = _check_grouped_operands(a, sfa, b, sfb, d, 2)
    checks.tensor("grouped_layout", layout, (torch.int32,), 1)
    m_total = a.shape[0]
    checks.shape("grouped_layout", layout, (num_groups,) if use_psum_layout else (m_total,))
    if m_total % fp8_gemm.CONTIGUOUS_ALIGNMENT:
        raise ValueError(f"a: expected M_total a multiple of {fp8_gemm.CONTIGUOUS_ALIGNMENT} "
                         f"(get_mk_alignment_for_contiguous_layout()), got {m_total}")
    if layout.stride(0) != 1 and layout.shape[0] > 1:
        raise ValueError(f"grouped_layout: expected a contiguous tensor, got stride {layout.stride(0)}")
    gemm_common.check_cuda({"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d, "grouped_layout": layout})


def _check_masked(a, sfa, b, sfb, d, masked_m, expected_m) -> None:
    num_groups = _check_grouped_operands(a, sfa, b, sfb, d, 3)
    checks.tensor("masked_m", masked_m, (torch.int32,), 1)
    checks.shape("masked_m", masked_m, (num_groups,))
    if isinstance(expected_m, bool) or not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m: expected an int >= 0, got {expected_m!r}")
    gemm_common.check_experts_stacked("a", a)
    gemm_common.check_experts_stacked("d", d)
    gemm_common.check_cuda({"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d, "masked_m": masked_m})


# ---- per-call pieces of the bound calls -----------------------------------------------------------------


def _sfa_ready(sfa: torch.Tensor) -> bool:
    """SFA's strides are already the kernel's: M-major, columns TMA-aligned (as the casts make it)."""
    return sfa.stride(-2) == 1 and (sfa.shape[-1] == 1 or sfa.stride(-1) == get_tma_aligned_size(sfa.shape[-2], 4))


def _sfa_fits(sfa: torch.Tensor) -> bool:
    """SFA (shape checked) is in the kernels' layout, a grouped one's experts stacked; its address
    is checked per call."""
    stacked = sfa.dim() == 2 or sfa.shape[0] <= 1 or sfa.stride(0) == sfa.shape[-1] * sfa.stride(-1)
    return _sfa_ready(sfa) and stacked


def _scales_ready(sfa: torch.Tensor, sfb: torch.Tensor) -> bool:
    """Whether SFA and SFB (shapes checked) arrive in the kernel's layout; their addresses are
    checked per call."""
    return _sfa_fits(sfa) and sfb.is_contiguous()


def _kernel_sfa(sfa: torch.Tensor) -> torch.Tensor:
    """SFA in the kernels' layout (M-major, TMA-aligned) at a 16-byte aligned address."""
    if sfa.data_ptr() & 15:  # the right strides at a misaligned address: re-lay out a fresh copy
        sfa = sfa.clone(memory_format=torch.contiguous_format)
    return get_mn_major_tma_aligned_tensor(sfa)


def _kernel_sfb(sfb: torch.Tensor) -> torch.Tensor:
    """SFB as the kernels read it through TMA: contiguous at a 16-byte aligned address."""
    if sfb.is_contiguous() and not sfb.data_ptr() & 15:
        return sfb
    return sfb.clone(memory_format=torch.contiguous_format)


def _check_aligned(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> None:
    """TMA's 16-byte alignment of the data pointers, which change between calls of one signature."""
    for name, t in (("a", a), ("b", b), ("d", d)):
        checks.tma_rows(name, t)


# ---- fp8_gemm_nt ---------------------------------------------------------------------------------------------

_DENSE_NAMES = ("d", *_INPUT_NAMES)
_DENSE_NAMES_C = ("c", *_DENSE_NAMES)


def _bind_dense(a, sfa, b, sfb, d, c):
    spans = gemm_common.spans(d, a, sfa, b, sfb)
    c_spans = None if c is None else gemm_common.spans(c, d, a, sfa, b, sfb)
    c_like_d = c is not None and c.stride() == d.stride()
    empty_k = a.shape[1] == 0 and d.numel() > 0

    def guard(a, sfa, b, sfb, d, c) -> tuple[int, int, int, int, int, bool]:
        """The data pointers, checked for overlap; whether C is a tensor apart from D."""
        a_ptr, b_ptr, d_ptr, sfa_ptr, sfb_ptr = a.data_ptr(), b.data_ptr(), d.data_ptr(), sfa.data_ptr(), sfb.data_ptr()
        checks.no_overlap(_DENSE_NAMES, (d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr), spans)
        separate_c = c is not None and (c.data_ptr() != d_ptr or not c_like_d)
        if separate_c:
            checks.no_overlap(_DENSE_NAMES_C, (c.data_ptr(), d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr), c_spans)
        return a_ptr, b_ptr, d_ptr, sfa_ptr, sfb_ptr, separate_c

    if not d.is_cuda:
        def run_reference(a, sfa, b, sfb, d, c):
            guard(a, sfa, b, sfb, d, c)
            reference.fp8_gemm_nt((a, sfa), (b, sfb), d, c)
        return run_reference

    if min(a.shape[0], d.shape[1], a.shape[1]) == 0:
        def run_empty(a, sfa, b, sfb, d, c):  # M, N or K is 0; with K = 0, D = C (or 0: an empty sum)
            separate_c = guard(a, sfa, b, sfb, d, c)[-1]
            if empty_k and separate_c:
                d.copy_(c)
            elif empty_k and c is None:
                d.zero_()
        return run_empty

    index = d.get_device()
    per_row = _sfb_per_row(sfb, b.shape[0], a.shape[1])
    desc = fp8_gemm.describe(GemmType.NORMAL, a, b, d, accumulate=c is not None,
                             recipe=fp8_gemm.RECIPE_1D1D if per_row else (1, 128, 128))
    launch = fp8_gemm.plan(desc, a, b, d, device.device_facts(index), pdl=device.get_pdl()).launch_pointers
    # 1D1D: SFB in SFA's layout (N-major, TMA-aligned).
    scales_ready = _sfa_fits(sfa) and _sfa_fits(sfb) if per_row else _scales_ready(sfa, sfb)
    kernel_sfb = _kernel_sfa if per_row else _kernel_sfb

    def run_kernel(a, sfa, b, sfb, d, c):
        a_ptr, b_ptr, d_ptr, sfa_ptr, sfb_ptr, separate_c = guard(a, sfa, b, sfb, d, c)
        if (a_ptr | b_ptr | d_ptr) & 15:
            _check_aligned(a, b, d)
        if separate_c:
            d.copy_(c)
        if not scales_ready or (sfa_ptr | sfb_ptr) & 15:
            sfa, sfb = _kernel_sfa(sfa), kernel_sfb(sfb)  # each returns its input when already fit
            sfa_ptr, sfb_ptr = sfa.data_ptr(), sfb.data_ptr()
        launch(index, a_ptr, b_ptr, sfa_ptr, sfb_ptr, d_ptr)
    return run_kernel


_FP8_GEMM_NT = Op("fp8_gemm_nt", "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor? c) -> ()",
                  ("d",), _check_dense, _bind_dense)


_PAIRS = (tuple, list)


def _operands(a: object, b: object) -> tuple:
    """(A, SFA, B, SFB) of the (FP8 data, FP32 scales) pairs ``a`` and ``b``, or a TypeError naming
    the one that is not a pair."""
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, _PAIRS) or len(value) != 2:
            raise TypeError(f"{name}: expected a (float8_e4m3fn tensor, float32 scales) pair, got "
                            f"{type(value).__name__}")
    (a_data, sfa), (b_data, sfb) = a, b
    return a_data, sfa, b_data, sfb


def fp8_gemm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: torch.Tensor | None = None, recipe: tuple[int, int, int] | None = None) -> None:
    """D = C + A @ B^T with FP8 operands and fine-grained scales, written into ``d``.

    Args:
        a: ``(A, SFA)``. A: float8_e4m3fn [M, K], K-major (row pitch a multiple of 16 bytes).
            SFA: float32 [M, ceil(K/128)], one scale per 1x128 block of a row, any strides (the
            kernel's M-major TMA-aligned layout, which ``per_token_cast_to_fp8`` returns, avoids a copy).
        b: ``(B, SFB)``. B: float8_e4m3fn [N, K], K-major. SFB: float32 [ceil(N/128), ceil(K/128)],
            one scale per 128x128 block; or (the 1D1D recipe of weight gradients) [N, ceil(K/128)],
            one per 1x128 block of a row like SFA's (any strides; SFA's layout avoids a copy).
        d: bfloat16 or float32 [M, N], row-major (row pitch a multiple of 16 bytes); float32 with the
            1D1D recipe. Overwritten; must not overlap the inputs.
        c: optional float32 [M, N]; then ``d`` must be float32 and D = C + A @ B^T (``c`` may be ``d``).
        recipe: (1, 128, 128) or (1, 1, 128), the scales' blocks of A's rows, B's rows and K; None
            takes it from SFB's shape.

    Any M, N, K >= 0 (K = 0: D = C, or 0); K need not be a multiple of 128 (the last block is
    ragged). Accumulates in FP32, promoting the tensor cores' partial sums every 128 of K. SM90 GPUs
    only; CPU tensors use the reference.
    """
    a_data, sfa, b_data, sfb = _operands(a, b)
    if recipe is not None:
        _check_recipe(recipe, sfb, b_data)
    _FP8_GEMM_NT(a_data, sfa, b_data, sfb, d, c)


def _check_recipe(recipe: object, sfb: torch.Tensor, b: torch.Tensor) -> None:
    """The recipe named and SFB's shape agree."""
    if recipe not in ((1, 128, 128), fp8_gemm.RECIPE_1D1D):
        raise ValueError(f"recipe: expected (1, 128, 128) or (1, 1, 128), got {recipe!r}")
    checks.is_tensor("b[0]", b)
    checks.is_tensor("b[1]", sfb)
    n, k = b.shape[0], b.shape[-1]
    rows = n if recipe == fp8_gemm.RECIPE_1D1D else ceil_div(n, 128)
    if tuple(sfb.shape) != (rows, ceil_div(k, 128)):
        raise ValueError(f"sfb: expected shape {(rows, ceil_div(k, 128))} for recipe {tuple(recipe)}, got "
                         f"{tuple(sfb.shape)}")


# ---- the MoE grouped GEMMs ---------------------------------------------------------------------------------


def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each expert's segment in the contiguous grouped layout (and of M_total)."""
    return fp8_gemm.CONTIGUOUS_ALIGNMENT


def _bind_grouped(kind: GemmType, a, sfa, b, sfb, d, groups, expected_m: int):
    names = ("d", *_INPUT_NAMES, "masked_m" if kind is GemmType.MASKED else "grouped_layout")
    spans = gemm_common.spans(d, a, sfa, b, sfb, groups)
    num_groups, k = b.shape[0], a.shape[-1]
    rows = a.shape[-2] if kind is GemmType.MASKED else a.shape[0]

    def guard(a, sfa, b, sfb, d, groups) -> tuple[int, ...]:
        pointers = (d.data_ptr(), a.data_ptr(), sfa.data_ptr(), b.data_ptr(), sfb.data_ptr(), groups.data_ptr())
        checks.no_overlap(names, pointers, spans)
        return pointers

    if not d.is_cuda:
        def run_reference(a, sfa, b, sfb, d, groups, _):
            guard(a, sfa, b, sfb, d, groups)
            if kind is GemmType.MASKED:
                reference.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, groups, expected_m)
            else:
                reference.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, groups, kind is GemmType.PSUM)
        return run_reference

    if d.numel() == 0 or num_groups == 0 or k == 0:
        def run_empty(a, sfa, b, sfb, d, groups, _):  # nothing to compute; with K = 0 the experts' rows are 0
            guard(a, sfa, b, sfb, d, groups)
            if d.numel() and num_groups and k == 0:
                gemm_common.zero_expert_rows(kind, d, groups, num_groups)
        return run_empty

    index = d.get_device()
    desc = fp8_gemm.describe(kind, a, b, d, expected_m=expected_m)
    launch = fp8_gemm.plan(desc, a, b, d, device.device_facts(index), pdl=device.get_pdl()).launch_pointers
    scales_ready = _scales_ready(sfa, sfb)

    def run_kernel(a, sfa, b, sfb, d, groups, _):
        d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr, groups_ptr = guard(a, sfa, b, sfb, d, groups)
        if (a_ptr | b_ptr | d_ptr) & 15:
            _check_aligned(a, b, d)
        if get_check_groups():
            gemm_common.check_group_values(kind, groups, num_groups, rows)
        if not scales_ready or (sfa_ptr | sfb_ptr) & 15:
            sfa, sfb = _kernel_sfa(sfa), _kernel_sfb(sfb)
            sfa_ptr, sfb_ptr = sfa.data_ptr(), sfb.data_ptr()
        launch(index, a_ptr, b_ptr, sfa_ptr, sfb_ptr, d_ptr, groups_ptr)
    return run_kernel


def _bind_contiguous(a, sfa, b, sfb, d, layout, use_psum_layout):
    kind = GemmType.PSUM if use_psum_layout else GemmType.CONTIGUOUS
    return _bind_grouped(kind, a, sfa, b, sfb, d, layout, a.shape[0] // max(b.shape[0], 1))


def _bind_masked(a, sfa, b, sfb, d, masked_m, expected_m):
    return _bind_grouped(GemmType.MASKED, a, sfa, b, sfb, d, masked_m, expected_m)


_CONTIGUOUS = Op("m_grouped_fp8_gemm_nt_contiguous",
                 "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor grouped_layout, "
                 "bool use_psum_layout) -> ()", ("d",), _check_contiguous, _bind_contiguous)
_MASKED = Op("m_grouped_fp8_gemm_nt_masked",
             "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor masked_m, int expected_m) -> ()",
             ("d",), _check_masked, _bind_masked)


def m_grouped_fp8_gemm_nt_contiguous(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, grouped_layout: torch.Tensor,
                                     use_psum_layout: bool = False) -> None:
    """MoE prefill: ``D[rows of expert g] = A[rows of expert g] @ B[g]^T`` for every expert g.

    Args:
        a: ``(A, SFA)``: float8_e4m3fn [M_total, K] holding the experts' rows back to back, each
            expert's segment starting at a multiple of ``get_mk_alignment_for_contiguous_layout()``
            rows (M_total too); float32 [M_total, ceil(K/128)] 1x128 scales.
        b: ``(B, SFB)``: float8_e4m3fn [G, N, K], K-major; float32 [G, ceil(N/128), ceil(K/128)].
        d: bfloat16 (or float32) [M_total, N]. Rows of no expert (padding) are left untouched.
        grouped_layout: int32 on the GPU. [M_total]: each row's expert, -1 (any value outside [0, G))
            for padding. With ``use_psum_layout``: [G], the cumulative end row of each expert's
            rows; expert g owns rows [align(end[g - 1], 128), end[g]).

    The GPU never trusts the layout's values (``set_check_groups(True)`` has them checked) and the
    CPU never reads them. K = 0 sets the experts' rows to 0. CPU tensors run the reference.
    """
    a_data, sfa, b_data, sfb = _operands(a, b)
    _CONTIGUOUS(a_data, sfa, b_data, sfb, d, grouped_layout, bool(use_psum_layout))


def m_grouped_fp8_gemm_nt_masked(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                 d: torch.Tensor, masked_m: torch.Tensor, expected_m: int) -> None:
    """MoE decode: ``D[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T`` for every expert g.

    Args:
        a: ``(A, SFA)``: float8_e4m3fn [G, max_M, K]; float32 [G, max_M, ceil(K/128)].
        b: ``(B, SFB)``: float8_e4m3fn [G, N, K], K-major; float32 [G, ceil(N/128), ceil(K/128)].
        d: bfloat16 (or float32) [G, max_M, N]; rows at or past ``masked_m[g]`` stay untouched.
        masked_m: int32 [G] on the GPU, clamped to [0, max_M] there. The CPU never reads it, so the
            call can sit in a CUDA graph whose token counts change between replays.
        expected_m: the rows per expert the config heuristic plans for (a hint only; any masked_m
            gives the right result). From 129 to 192 rows, one CTA of three math warpgroups takes
            an expert's 192-row block; above 192, pairs of CTAs share each B tile over an expert's
            two 128-row blocks (experts that then hold 128 rows or fewer give the pair two column
            blocks instead).
    """
    a_data, sfa, b_data, sfb = _operands(a, b)
    _MASKED(a_data, sfa, b_data, sfb, d, masked_m, expected_m)


# ---- the K-grouped GEMM of expert weight gradients -----------------------------------------------------------


def _check_k_grouped(a, sfa, b, sfb, d, grouped_layout, c) -> None:
    """Dtypes, shapes and devices; sum_k is SFA's K blocks times 128 (the public function checked the
    lengths against it)."""
    checks.tensor("d", d, FP32, 3)
    num_groups, m, n = d.shape
    checks.tensor("sfa", sfa, FP32, 2)
    checks.tensor("sfb", sfb, FP32, 2)
    sum_k = sfa.shape[1] * 128
    checks.shape("sfa", sfa, (m, sum_k // 128))
    checks.shape("sfb", sfb, (n, sum_k // 128))
    for name, data, rows in (("a", a, m), ("b", b, n)):
        checks.tensor(name, data, FP8, data.dim())
        if data.numel() != sum_k * rows or not data.is_contiguous():
            raise ValueError(f"{name}: expected {sum_k * rows} contiguous elements (the experts' [{rows}, k_g] "
                             f"blocks back to back), got shape {tuple(data.shape)}, strides {tuple(data.stride())}")
    checks.tensor("grouped_layout", grouped_layout, (torch.int32,), 1)
    checks.shape("grouped_layout", grouped_layout, (num_groups,))
    tensors = {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d, "grouped_layout": grouped_layout}
    gemm_common.check_addend(c, d, (num_groups, m, n), tensors)
    gemm_common.check_cuda(tensors)
    if d.is_cuda:
        checks.tma_rows("d", d)
        if grouped_layout.numel() > 1 and grouped_layout.stride(0) != 1:
            raise ValueError(f"grouped_layout: expected a contiguous tensor, got stride {grouped_layout.stride(0)}")


def _bind_k_grouped(a, sfa, b, sfb, d, grouped_layout, c):
    names = ("d", "a", "sfa", "b", "sfb", "grouped_layout")
    pointer_guard = gemm_common.overlap_guard(names, (d, a, sfa, b, sfb, grouped_layout), c)
    num_groups, m, n = d.shape
    sum_k = sfa.shape[1] * 128

    def guard(a, sfa, b, sfb, d, grouped_layout, c) -> tuple[int, ...]:
        """The data pointers (D, A, SFA, B, SFB, layout), checked for overlap, and whether C is a
        tensor apart from D."""
        return pointer_guard((d, a, sfa, b, sfb, grouped_layout), c)

    if not d.is_cuda:
        def run_reference(a, sfa, b, sfb, d, grouped_layout, c):
            guard(a, sfa, b, sfb, d, grouped_layout, c)
            reference.k_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, grouped_layout.tolist(), grouped_layout,
                                                       c)
        return run_reference

    if d.numel() == 0 or sum_k == 0:
        def run_empty(a, sfa, b, sfb, d, grouped_layout, c):
            gemm_common.start_sum(d, c, guard(a, sfa, b, sfb, d, grouped_layout, c)[-1])
        return run_empty

    index = d.get_device()
    plan, map_bytes = fp8_gemm.k_grouped_plan(a.view(m, sum_k), b.view(n, sum_k), d, device.device_facts(index),
                                              pdl=device.get_pdl())
    scales_ready = _sfa_fits(sfa) and _sfa_fits(sfb)

    def run_kernel(a, sfa, b, sfb, d, grouped_layout, c):
        d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr, groups_ptr, separate_c = guard(a, sfa, b, sfb, d, grouped_layout, c)
        if (a_ptr | b_ptr | d_ptr) & 15:
            _check_aligned(a, b, d)
        if get_check_groups():
            gemm_common.check_group_values(GemmType.K_GROUPED, grouped_layout, num_groups, sum_k)
        gemm_common.start_sum(d, c, separate_c)
        if not scales_ready or (sfa_ptr | sfb_ptr) & 15:
            sfa_ptr, sfb_ptr = _kernel_sfa(sfa).data_ptr(), _kernel_sfa(sfb).data_ptr()
        maps = torch.empty(map_bytes, dtype=torch.uint8, device=d.device)
        plan.launch_pointers(index, a_ptr, b_ptr, sfa_ptr, sfb_ptr, d_ptr, groups_ptr, maps.data_ptr())
    return run_kernel


_K_GROUPED = Op("k_grouped_fp8_gemm_nt_contiguous",
                "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor grouped_layout, Tensor? c) -> ()",
                ("d",), _check_k_grouped, _bind_k_grouped)


def k_grouped_fp8_gemm_nt_contiguous(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, ks: list[int], grouped_layout: torch.Tensor,
                                     c: torch.Tensor | None = None,
                                     recipe: tuple[int, int, int] = (1, 1, 128)) -> None:
    """MoE weight gradients in FP8: ``D[g] = C[g] + A_g @ B_g^T`` for every expert g, FP32 accumulated,
    both operands scaled per 1x128 block along K (the tokens). DeepGEMM's layout on Hopper.

    Args:
        a: ``(A, SFA)``: A contiguous float8_e4m3fn of ``sum_k * M`` elements (any shape) holding each
            expert's ``A_g [M, k_g]``, K-major, back to back; SFA float32 ``[M, sum_k / 128]``, any
            strides (M-major, as DeepGEMM's casts give it, with M a multiple of 4 avoids copies).
        b: ``(B, SFB)`` likewise with N.
        d: float32 ``[G, M, N]``, row-major. Overwritten (an expert with no tokens gets C[g], or 0).
        ks: the G segments' lengths on the host, multiples of 128 (0 allowed).
        grouped_layout: int32 ``[G]`` on the GPU, the same lengths, which the kernel reads (never
            trusted: clamped to sum_k; ``set_check_groups(True)`` has them checked).
        c: optional float32 ``[G, M, N]``; may be ``d`` itself (then D += A @ B^T).
        recipe: (1, 1, 128), the only one.

    One persistent kernel over every expert's tiles (the 1D1D kernel of ``fp8_gemm_nt``, its A and B
    descriptors rebased per expert on the GPU). CPU tensors run the reference.
    """
    if tuple(recipe) != fp8_gemm.RECIPE_1D1D:
        raise ValueError(f"recipe: expected (1, 1, 128), got {recipe!r}")
    a_data, sfa, b_data, sfb = _operands(a, b)
    checks.tensor("d", d, FP32, 3)
    checks.tensor("sfa", sfa, FP32, 2)
    lengths = checks.k_segments(ks, None, 128)
    if len(lengths) != d.shape[0]:
        raise ValueError(f"ks: expected {d.shape[0]} lengths (d's first dim), got {len(lengths)}")
    if sum(lengths) != 128 * sfa.shape[1]:
        raise ValueError(f"ks: expected lengths summing to {128 * sfa.shape[1]} (sfa's K blocks times 128), "
                         f"got {sum(lengths)}")
    _K_GROUPED(a_data, sfa, b_data, sfb, d, grouped_layout, c)
