"""The FP8 x FP4 GEMMs: FP8 activations against e2m1 weights packed two per byte with 1x32 UE8M0
scales, widened to e4m3 on the chip (kernels/sm90_fp8_fp4_gemm_swap_ab.cuh for few tokens,
kernels/sm90_fp8_fp4_gemm.cuh for more), or at prefill once per call before the FP8 kernel runs
(kernels/sm90_fp4_widen.cuh). ``fp8_fp4_gemm_nt`` and the MoE grouped forms; FP8 weights through
these names run the FP8 kernels."""

from __future__ import annotations

import torch

from .. import checks, device, reference
from ..gemm.desc import GemmDesc, GemmType
from ..intmath import ceil_div
from ..kernels import fp4_widen, fp8_fp4_gemm
from ..quant import fold_1x32_scales, packed_ue8m0_mn_major, per_token_scale_block
from . import fp8_gemm as fp8_ops
from . import gemm_common
from .dispatch import Op, get_check_groups

FP4 = (torch.int8, torch.uint8)
SF_DTYPES = (torch.float32, torch.int32)  # float32, or int32 holding four packed UE8M0 exponents


def _check_recipes(recipe, recipe_a, recipe_b, sfa: object, k: int) -> None:
    """The scales these kernels take, A's (1, 128) or (1, 32) as SFA's shape says, B's (1, 32), against
    the recipes given."""
    a_gran = recipe_a if recipe_a is not None else None if recipe is None else (recipe[0], recipe[2])
    b_gran = recipe_b if recipe_b is not None else None if recipe is None else (recipe[1], recipe[2])
    if a_gran is not None and tuple(a_gran) not in ((1, 128), (1, 32)):
        raise ValueError(f"recipe_a: expected (1, 128) (FP32 scales per 1x128 of A) or (1, 32) (UE8M0 scales "
                         f"per 1x32), got {tuple(a_gran)}")
    if b_gran is not None and tuple(b_gran) != (1, 32):
        raise ValueError(f"recipe_b: expected (1, 32) (UE8M0 scales per 1x32 of the FP4 B), got {tuple(b_gran)}")
    if a_gran is not None and isinstance(sfa, torch.Tensor) and sfa.dim() and k > 32 \
            and per_token_scale_block(sfa, k) != a_gran[1]:
        expected = ("float32 [..., ceil(K/32)] or packed int32 [..., ceil(K/128)]" if a_gran[1] == 32
                    else "float32 [..., ceil(K/128)]")
        raise ValueError(f"sfa: expected {expected} scales for recipe_a {tuple(a_gran)}, got {sfa.dtype} "
                         f"{tuple(sfa.shape)} (K = {k})")


def _k_of(a: object) -> int:
    return a.shape[-1] if isinstance(a, torch.Tensor) and a.dim() else 0


def _check_sfa(sfa: torch.Tensor, rows: tuple[int, ...], k: int) -> None:
    """SFA's shape: 1x128 float32 scales, or 1x32 ones (float32, or packed int32)."""
    per_128, per_32 = (*rows, ceil_div(k, 128)), (*rows, ceil_div(k, 32))
    if sfa.dtype == torch.int32:
        checks.shape("sfa", sfa, per_128)
    elif tuple(sfa.shape) not in (per_128, per_32):
        raise ValueError(f"sfa: expected float32 {per_128} (1x128 scales) or {per_32} (1x32 UE8M0 scales), got "
                         f"shape {tuple(sfa.shape)}")


def _check_b(b, sfb, k: int, lead: tuple[int, ...]) -> None:
    checks.tensor("b", b, FP4, len(lead) + 2)
    checks.tensor("sfb", sfb, SF_DTYPES, len(lead) + 2)
    n = b.shape[-2]
    if k % 32:
        raise ValueError(f"a: expected K a multiple of 32 with FP4 B (16-byte rows of packed B), got K = {k}")
    checks.shape("b", b, (*lead, n, k // 2))
    scales = ceil_div(k, 32) if sfb.dtype == torch.float32 else ceil_div(k, 128)
    checks.shape("sfb", sfb, (*lead, n, scales))


def _check_dense(a, sfa, b, sfb, d, c) -> None:
    checks.tensor("a", a, fp8_ops.FP8, 2)
    checks.tensor("sfa", sfa, SF_DTYPES, 2)
    checks.tensor("d", d, fp8_ops.GEMM_OUT, 2)
    m, k = a.shape
    _check_b(b, sfb, k, ())
    _check_sfa(sfa, (m,), k)
    checks.shape("d", d, (m, b.shape[0]))
    tensors = {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d}
    gemm_common.check_addend(c, d, (m, b.shape[0]), tensors)
    gemm_common.check_cuda(tensors)
    for name in ("a", "b", "d"):
        checks.tma_rows(name, tensors[name])


def _check_grouped(a, sfa, b, sfb, d, groups, a_dims: int, groups_name: str) -> None:
    checks.tensor("a", a, fp8_ops.FP8, a_dims)
    checks.tensor("sfa", sfa, SF_DTYPES, a_dims)
    checks.tensor("d", d, fp8_ops.GEMM_OUT, a_dims)
    checks.tensor(groups_name, groups, (torch.int32,), 1)
    k = a.shape[-1]
    num_groups, n = b.shape[:2] if b.dim() == 3 else (0, 0)
    _check_b(b, sfb, k, (num_groups,))
    if a_dims == 3 and a.shape[0] != num_groups:
        raise ValueError(f"a: expected G = {num_groups} experts (from b), got shape {tuple(a.shape)}")
    _check_sfa(sfa, tuple(a.shape[:-1]), k)
    checks.shape("d", d, (*a.shape[:-1], n))
    for name, t in (("a", a), ("b", b), ("d", d)):
        checks.tma_rows(name, t)
    gemm_common.check_experts_stacked("b", b)
    if a_dims == 3:
        gemm_common.check_experts_stacked("a", a)
        gemm_common.check_experts_stacked("d", d)
    elif a.shape[0] % fp8_fp4_gemm.CONTIGUOUS_ALIGNMENT:
        raise ValueError(f"a: expected M_total a multiple of {fp8_fp4_gemm.CONTIGUOUS_ALIGNMENT}, got {a.shape[0]}")
    gemm_common.check_cuda({"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d, groups_name: groups})


def _kernel_scales(sfa: torch.Tensor, sfb: torch.Tensor, n: int, k: int, num_groups: int | None):
    """SFA M-major TMA-aligned, SFB packed MN-major, both at 16-byte aligned addresses: each returns
    its input when already so."""
    if sfb.data_ptr() & 15:  # the right strides at a misaligned address: re-lay out a fresh copy
        sfb = sfb.clone(memory_format=torch.contiguous_format)
    return fp8_ops._kernel_sfa(sfa), packed_ue8m0_mn_major(sfb, n, k, num_groups)


def _scales_ready(sfa: torch.Tensor, sfb: torch.Tensor, n: int, k: int, num_groups: int | None) -> bool:
    """Whether SFA and SFB (shapes checked) arrive in the kernel's layout; their addresses are
    checked per call. 1x32 SFA counts as ready: each call's fold (``_fold_a``) writes it so."""
    fold = per_token_scale_block(sfa, k) == 32
    return (fold or fp8_ops._sfa_fits(sfa)) and packed_ue8m0_mn_major(sfb, n, k, num_groups) is sfb


def _a_for_plan(a: torch.Tensor, fold: bool) -> torch.Tensor:
    """The A the plan's descriptors describe: with 1x32 scales the folded copy, contiguous."""
    return torch.empty(a.shape, dtype=a.dtype, device="meta") if fold and not a.is_contiguous() else a


def _fold_a(a: torch.Tensor, sfa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A with 1x32 scales as the kernels take it (quant.fold_1x32_scales), and its addresses."""
    a, sfa = fold_1x32_scales(a, sfa)
    return a, sfa, a.data_ptr(), sfa.data_ptr()


# ---- fp8_fp4_gemm_nt -----------------------------------------------------------------------------------------


def _bind_dense(a, sfa, b, sfb, d, c):
    guard = gemm_common.overlap_guard(("d", "a", "sfa", "b", "sfb"), (d, a, sfa, b, sfb), c)
    if not d.is_cuda:
        def run_reference(a, sfa, b, sfb, d, c):
            guard((d, a, sfa, b, sfb), c)
            reference.fp8_fp4_gemm_nt((a, sfa), (b, sfb), d, c)
        return run_reference

    m, k = a.shape
    n = b.shape[0]
    if min(m, n, k) == 0:
        def run_empty(a, sfa, b, sfb, d, c):
            separate_c = guard((d, a, sfa, b, sfb), c)[-1]
            if k == 0 and separate_c:
                d.copy_(c)
            elif k == 0 and c is None:
                d.zero_()
        return run_empty

    index = d.get_device()
    desc = GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=d.dtype, accumulate=c is not None)
    fold = per_token_scale_block(sfa, k) == 32
    plan = fp8_fp4_gemm.plan(desc, _a_for_plan(a, fold), b, d, device.device_facts(index), pdl=device.get_pdl())
    launch = plan.launch_pointers
    widen = fp4_widen.plan(b, 1, n, k).run if fp8_fp4_gemm.takes_widened_b(plan) else None
    scales_ready = _scales_ready(sfa, sfb, n, k, None)

    def run_kernel(a, sfa, b, sfb, d, c):
        d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr, separate_c = guard((d, a, sfa, b, sfb), c)
        if fold:
            a, sfa, a_ptr, sfa_ptr = _fold_a(a, sfa)
        if (a_ptr | b_ptr | d_ptr) & 15:
            fp8_ops._check_aligned(a, b, d)
        if separate_c:
            d.copy_(c)
        if not scales_ready or (sfa_ptr | sfb_ptr) & 15:
            sfa, sfb = _kernel_scales(sfa, sfb, n, k, None)
            sfa_ptr, sfb_ptr = sfa.data_ptr(), sfb.data_ptr()
        if widen is not None:
            b, sfb = widen(b, sfb)
            b_ptr, sfb_ptr = b.data_ptr(), sfb.data_ptr()
        launch(index, a_ptr, b_ptr, sfa_ptr, sfb_ptr, d_ptr)
    return run_kernel


_FP8_FP4_GEMM_NT = Op("fp8_fp4_gemm_nt", "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor? c) -> ()",
                      ("d",), _check_dense, _bind_dense)


def _fp4_b(b: object) -> bool:
    """Whether ``b`` is a pair whose data is packed FP4 (else it goes to the FP8 kernels)."""
    return isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], torch.Tensor) and b[0].dtype in FP4


def fp8_fp4_gemm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                    c: torch.Tensor | None = None, recipe: tuple[int, int, int] | None = None,
                    recipe_a: tuple[int, int] | None = None, recipe_b: tuple[int, int] | None = None) -> None:
    """D = C + A @ B^T with FP8 A and FP4 (e2m1) B, written into ``d``.

    Args:
        a: ``(A, SFA)``: float8_e4m3fn [M, K] K-major; SFA float32 [M, ceil(K/128)] 1x128 scales, or
            UE8M0 scales per 1x32 (the (1, 32) recipe): float32 [M, K/32] powers of two or int32
            [M, ceil(K/128)] packed four per element, folded into 1x128 scales per call
            (``quant.fold_1x32_scales``: exact but for values below e4m3's normal range after the shift).
        b: ``(B, SFB)``: int8 [N, K/2], two e2m1 codes per byte (element 2i in the low nibble: bit 3
            the sign, bits 0-2 indexing {0, 0.5, 1, 1.5, 2, 3, 4, 6}), as ``per_token_cast_to_fp4``
            makes it; SFB one power of two per 1x32 block: float32 [N, ceil(K/32)], or int32
            [N, ceil(K/128)] packed four UE8M0 bytes per element (best in the MN-major layout
            ``transform_sf_into_required_layout(sfb, N, K, (1, 32))`` returns: no copy per call).
            FP8 B (float8_e4m3fn [N, K] with 128x128 FP32 scales) runs ``fp8_gemm_nt``.
        d: bfloat16 or float32 [M, N]. c: optional float32 [M, N] (then d float32; may be d).
        recipe, recipe_a, recipe_b: DeepGEMM's scale granularities, checked against SFA and SFB: A
            (1, 128) or (1, 32), B (1, 32).

    K a multiple of 32. The weights are widened to e4m3 on the chip with their 1x32 scales folded
    in: exact while those of each 128-wide block (at prefill sizes, each 128x128 block) span at
    most 2^14 (README, "FP4 on Hopper").
    SM90 GPUs only; CPU tensors use the reference.
    """
    if not _fp4_b(b):
        fp8_ops.fp8_gemm_nt(a, b, d, c)
        return
    a_data, sfa, b_data, sfb = fp8_ops._operands(a, b)
    _check_recipes(recipe, recipe_a, recipe_b, sfa, _k_of(a_data))
    _FP8_FP4_GEMM_NT(a_data, sfa, b_data, sfb, d, c)


# ---- the MoE grouped forms -------------------------------------------------------------------------------------


def _bind_grouped(kind: GemmType, a, sfa, b, sfb, d, groups, expected_m: int):
    names = ("d", "a", "sfa", "b", "sfb", "masked_m" if kind is GemmType.MASKED else "grouped_layout")
    guard = gemm_common.overlap_guard(names, (d, a, sfa, b, sfb, groups), None)
    num_groups, n, k = b.shape[0], b.shape[1], a.shape[-1]
    rows = a.shape[-2] if kind is GemmType.MASKED else a.shape[0]
    if not d.is_cuda:
        def run_reference(a, sfa, b, sfb, d, groups, _):
            guard((d, a, sfa, b, sfb, groups), None)
            if kind is GemmType.MASKED:
                reference.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), (b, sfb), d, groups, expected_m)
            else:
                reference.m_grouped_fp8_fp4_gemm_nt_contiguous((a, sfa), (b, sfb), d, groups, kind is GemmType.PSUM)
        return run_reference

    if d.numel() == 0 or num_groups == 0 or k == 0:
        def run_empty(a, sfa, b, sfb, d, groups, _):
            guard((d, a, sfa, b, sfb, groups), None)
            if d.numel() and num_groups and k == 0:
                gemm_common.zero_expert_rows(kind, d, groups, num_groups)
        return run_empty

    index = d.get_device()
    desc = GemmDesc(kind, expected_m, n, k, num_groups, out_dtype=d.dtype)
    fold = per_token_scale_block(sfa, k) == 32
    plan = fp8_fp4_gemm.plan(desc, _a_for_plan(a, fold), b, d, device.device_facts(index), pdl=device.get_pdl())
    launch = plan.launch_pointers
    widen = fp4_widen.plan(b, num_groups, n, k).run if fp8_fp4_gemm.takes_widened_b(plan) else None
    scales_ready = _scales_ready(sfa, sfb, n, k, num_groups)

    def run_kernel(a, sfa, b, sfb, d, groups, _):
        d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr, groups_ptr, _ = guard((d, a, sfa, b, sfb, groups), None)
        if fold:
            a, sfa, a_ptr, sfa_ptr = _fold_a(a, sfa)
        if (a_ptr | b_ptr | d_ptr) & 15:
            fp8_ops._check_aligned(a, b, d)
        if get_check_groups():
            gemm_common.check_group_values(kind, groups, num_groups, rows)
        if not scales_ready or (sfa_ptr | sfb_ptr) & 15:
            sfa, sfb = _kernel_scales(sfa, sfb, n, k, num_groups)
            sfa_ptr, sfb_ptr = sfa.data_ptr(), sfb.data_ptr()
        if widen is not None:
            b, sfb = widen(b, sfb)
            b_ptr, sfb_ptr = b.data_ptr(), sfb.data_ptr()
        launch(index, a_ptr, b_ptr, sfa_ptr, sfb_ptr, d_ptr, groups_ptr)
    return run_kernel


def _check_contiguous(a, sfa, b, sfb, d, layout, use_psum_layout) -> None:
    _check_grouped(a, sfa, b, sfb, d, layout, 2, "grouped_layout")
    checks.shape("grouped_layout", layout, (b.shape[0],) if use_psum_layout else (a.shape[0],))


def _check_masked(a, sfa, b, sfb, d, masked_m, expected_m) -> None:
    _check_grouped(a, sfa, b, sfb, d, masked_m, 3, "masked_m")
    checks.shape("masked_m", masked_m, (b.shape[0],))
    if isinstance(expected_m, bool) or not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m: expected an int >= 0, got {expected_m!r}")


def _bind_contiguous(a, sfa, b, sfb, d, layout, use_psum_layout):
    kind = GemmType.PSUM if use_psum_layout else GemmType.CONTIGUOUS
    return _bind_grouped(kind, a, sfa, b, sfb, d, layout, a.shape[0] // max(b.shape[0], 1))


def _bind_masked(a, sfa, b, sfb, d, masked_m, expected_m):
    return _bind_grouped(GemmType.MASKED, a, sfa, b, sfb, d, masked_m, expected_m)


_CONTIGUOUS = Op("m_grouped_fp8_fp4_gemm_nt_contiguous",
                 "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor grouped_layout, "
                 "bool use_psum_layout) -> ()", ("d",), _check_contiguous, _bind_contiguous)
_MASKED = Op("m_grouped_fp8_fp4_gemm_nt_masked",
             "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor masked_m, int expected_m) -> ()",
             ("d",), _check_masked, _bind_masked)


def m_grouped_fp8_fp4_gemm_nt_contiguous(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                         d: torch.Tensor, grouped_layout: torch.Tensor, use_psum_layout: bool = False,
                                         recipe: tuple[int, int, int] | None = None,
                                         recipe_a: tuple[int, int] | None = None,
                                         recipe_b: tuple[int, int] | None = None) -> None:
    """``m_grouped_fp8_gemm_nt_contiguous`` with FP4 B: ``(int8 [G, N, K/2], 1x32 scales)``, the scales
    float32 [G, N, ceil(K/32)] or packed int32 [G, N, ceil(K/128)]; A's scales 1x128 or 1x32 (see
    ``fp8_fp4_gemm_nt``)."""
    if not _fp4_b(b):
        fp8_ops.m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, use_psum_layout)
        return
    a_data, sfa, b_data, sfb = fp8_ops._operands(a, b)
    _check_recipes(recipe, recipe_a, recipe_b, sfa, _k_of(a_data))
    _CONTIGUOUS(a_data, sfa, b_data, sfb, d, grouped_layout, bool(use_psum_layout))


def m_grouped_fp8_fp4_gemm_nt_masked(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
                                     recipe: tuple[int, int, int] | None = None,
                                     recipe_a: tuple[int, int] | None = None,
                                     recipe_b: tuple[int, int] | None = None) -> None:
    """``m_grouped_fp8_gemm_nt_masked`` with FP4 B: ``(int8 [G, N, K/2], 1x32 scales)`` as for
    ``m_grouped_fp8_fp4_gemm_nt_contiguous``. CUDA-graph safe: the CPU never reads ``masked_m``."""
    if not _fp4_b(b):
        fp8_ops.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m)
        return
    a_data, sfa, b_data, sfb = fp8_ops._operands(a, b)
    _check_recipes(recipe, recipe_a, recipe_b, sfa, _k_of(a_data))
    _MASKED(a_data, sfa, b_data, sfb, d, masked_m, expected_m)
