"""moegemm's public operations.

Each operation checks its arguments, then runs the SM90 kernel for CUDA tensors or the pure-PyTorch
reference (``moegemm.reference``) for CPU tensors. Operations write into a caller-provided output,
as DeepGEMM's do, and are registered as torch custom ops (``torch.ops.moegemm.*``) so they trace
under ``torch.compile``; eager calls skip the dispatcher to keep host overhead low.
"""

from __future__ import annotations

import torch

from . import checks, env, reference, utils
from .jit.runtime import PlanCache
from .utils import ceil_div, get_mn_major_tma_aligned_tensor, get_pdl, get_tma_aligned_size, num_sms_of

FP8 = (torch.float8_e4m3fn,)
FP32 = (torch.float32,)
GEMM_OUT = (torch.bfloat16, torch.float32)


def _check_fp8_gemm_nt(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                       d: torch.Tensor, c: torch.Tensor | None) -> None:
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
    checks.shape("sfb", sfb, (ceil_div(n, 128), ceil_div(k, 128)))
    checks.shape("d", d, (m, n))
    if c is not None:
        checks.tensor("c", c, FP32, 2)
        checks.shape("c", c, (m, n))
        if d.dtype != torch.float32:
            raise TypeError(f"d: with c given (D = C + A @ B^T) d must be torch.float32, got {d.dtype}")
    tensors = {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d}
    if c is not None:
        tensors["c"] = c
    device = checks.same_device(**tensors)
    checks.tma_rows("a", a)
    checks.tma_rows("b", b)
    checks.tma_rows("d", d)
    if device.type == "cuda":
        checks.sm90(device)


def _signature(a, sfa, b, sfb, d, c) -> tuple:
    """What the checks and the plan depend on: dtypes, shapes, strides, devices, and the launch
    settings. One flat tuple: this runs on every call, and each attribute read costs ~0.1 us."""
    return (a.dtype, a.shape, a.stride(), sfa.dtype, sfa.shape, sfa.stride(), b.dtype, b.shape, b.stride(),
            sfb.dtype, sfb.shape, sfb.stride(), d.dtype, d.shape, d.stride(), a.device, sfa.device,
            b.device, sfb.device, d.device,
            None if c is None else (c.dtype, c.shape, c.stride(), c.device), get_pdl(), utils._num_sms_override)


def _sfa_ready(sfa: torch.Tensor, m: int) -> bool:
    """SFA's strides are already the kernel's: FP32, M-major, columns TMA-aligned."""
    return sfa.stride(0) == 1 and (sfa.shape[1] == 1 or sfa.stride(1) == get_tma_aligned_size(m, 4))


# Call signatures already checked, mapped to the tuple _fp8_gemm_nt_plan describes.
_fp8_gemm_plans = PlanCache()
_DENSE_NAMES = ("d", "a", "sfa", "b", "sfb")
_DENSE_NAMES_C = ("c", *_DENSE_NAMES)


def _fp8_gemm_nt_plan(key: tuple, a, sfa, b, sfb, d, c) -> tuple:
    """(kernel plan, None for the CPU or an empty problem; d's CUDA device index, None
    on the CPU; whether SFA and SFB arrive in the kernel's layout; the byte spans of d, a, sfa, b, sfb;
    those of c and the same five, None without c; whether c has d's strides, so that it may be d)."""
    _check_fp8_gemm_nt(a, sfa, b, sfb, d, c)
    spans = tuple(checks.byte_span(t) for t in (d, a, sfa, b, sfb))
    c_spans = None if c is None else (checks.byte_span(c), *spans)
    c_like_d = c is not None and c.stride() == d.stride()
    if not d.is_cuda:
        return _fp8_gemm_plans.store(key, (None, None, False, spans, c_spans, c_like_d))
    plan = None
    if a.shape[0] > 0 and d.shape[1] > 0 and a.shape[1] > 0:
        from .kernels import fp8_gemm

        plan = fp8_gemm.plan(a, b, d, c is not None, num_sms=num_sms_of(d.get_device()), pdl=get_pdl())
    scales_ready = _sfa_ready(sfa, a.shape[0]) and sfb.is_contiguous()
    return _fp8_gemm_plans.store(key, (plan, d.get_device(), scales_ready, spans, c_spans, c_like_d))


def _check_pointers_aligned(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> None:
    """Data pointers change between calls with the same signature, so TMA's 16-byte alignment is
    checked on every call (one OR of three pointers when it holds)."""
    if (a.data_ptr() | b.data_ptr() | d.data_ptr()) & 15:
        for name, t in (("a", a), ("b", b), ("d", d)):
            checks.tma_rows(name, t)


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


def _fp8_gemm_nt(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
                 c: torch.Tensor | None) -> None:
    try:
        key = _signature(a, sfa, b, sfb, d, c)
    except AttributeError:  # an argument is not a tensor: let the checks name it
        _check_fp8_gemm_nt(a, sfa, b, sfb, d, c)
        raise
    entry = _fp8_gemm_plans.lookup(key)
    if entry is PlanCache.MISSING:
        entry = _fp8_gemm_nt_plan(key, a, sfa, b, sfb, d, c)
    plan, device, scales_ready, spans, c_spans, c_like_d = entry
    a_ptr, b_ptr, d_ptr, sfa_ptr, sfb_ptr = a.data_ptr(), b.data_ptr(), d.data_ptr(), sfa.data_ptr(), sfb.data_ptr()
    # Pointers change between calls of one signature: d must not overlap what the kernel reads.
    checks.no_overlap(_DENSE_NAMES, (d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr), spans)
    separate_c = c is not None and (c.data_ptr() != d_ptr or not c_like_d)
    if separate_c:
        checks.no_overlap(_DENSE_NAMES_C, (c.data_ptr(), d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr), c_spans)
    if device is None:
        reference.fp8_gemm_nt((a, sfa), (b, sfb), d, c)
        return
    if plan is None:  # an empty problem: M, N or K is 0
        if a.shape[1] == 0 and d.numel():
            if separate_c:
                d.copy_(c)
            elif c is None:
                d.zero_()
        return
    if (a_ptr | b_ptr | d_ptr) & 15:
        _check_pointers_aligned(a, b, d)
    if separate_c:
        d.copy_(c)
    if not scales_ready or (sfa_ptr | sfb_ptr) & 15:
        sfa, sfb = _kernel_sfa(sfa), _kernel_sfb(sfb)  # each returns its input when already fit
        sfa_ptr, sfb_ptr = sfa.data_ptr(), sfb.data_ptr()
    plan.launch_pointers(device, a_ptr, b_ptr, sfa_ptr, sfb_ptr, d_ptr)


def fp8_gemm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: torch.Tensor | None = None) -> None:
    """D = C + A @ B^T with FP8 operands and fine-grained scales, written into ``d``.

    Args:
        a: ``(A, SFA)``. A: float8_e4m3fn [M, K], K-major (row pitch a multiple of 16 bytes).
            SFA: float32 [M, ceil(K/128)], one scale per 1x128 block of a row, any strides (the
            kernel's M-major TMA-aligned layout, from ``transform_sf_into_required_layout``, avoids a copy).
        b: ``(B, SFB)``. B: float8_e4m3fn [N, K], K-major. SFB: float32 [ceil(N/128), ceil(K/128)],
            one scale per 128x128 block.
        d: bfloat16 or float32 [M, N], row-major (row pitch a multiple of 16 bytes). Overwritten.
        c: optional float32 [M, N]; then ``d`` must be float32 and D = C + A @ B^T (``c`` may be ``d``).

    Any M >= 0; K need not be a multiple of 128 (the last block is ragged). Accumulates in FP32,
    promoting the tensor cores' partial sums every 128 of K. SM90 GPUs only; CPU tensors use the reference.
    """
    try:
        a_data, sfa = a
        b_data, sfb = b
    except (TypeError, ValueError):
        checks.fp8_pair("a", a)
        checks.fp8_pair("b", b)
        raise
    if torch.compiler.is_compiling():
        torch.ops.moegemm.fp8_gemm_nt(a_data, sfa, b_data, sfb, d, c)
    else:
        _fp8_gemm_nt(a_data, sfa, b_data, sfb, d, c)


# ---- MoE grouped GEMMs ------------------------------------------------------------------------------

def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each expert's segment in the contiguous grouped layout (and of M_total)."""
    from .kernels.fp8_gemm import CONTIGUOUS_ALIGNMENT

    return CONTIGUOUS_ALIGNMENT


def _check_experts_stacked(name: str, t: torch.Tensor) -> None:
    """A [G, rows, K]-like tensor whose experts follow each other at the row pitch, so the kernels
    can see it as one [G * rows, K] matrix."""
    if t.shape[0] > 1 and t.numel() and t.stride(0) != t.shape[1] * t.stride(1):
        raise ValueError(f"{name}: expected the experts stacked without gaps (stride(0) == shape[1] * stride(1)), "
                         f"got strides {tuple(t.stride())} for shape {tuple(t.shape)}")


def _check_grouped_operands(a, sfa, b, sfb, d, a_dims: int) -> tuple[int, int, int]:
    """Checks shared by the grouped forms; returns (G, N, K)."""
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
    _check_experts_stacked("b", b)
    return num_groups, n, k


def _check_contiguous(a, sfa, b, sfb, d, layout, use_psum_layout: bool) -> None:
    num_groups, _, _ = _check_grouped_operands(a, sfa, b, sfb, d, 2)
    checks.tensor("grouped_layout", layout, (torch.int32,), 1)
    m_total = a.shape[0]
    checks.shape("grouped_layout", layout, (num_groups,) if use_psum_layout else (m_total,))
    alignment = get_mk_alignment_for_contiguous_layout()
    if m_total % alignment:
        raise ValueError(f"a: expected M_total a multiple of {alignment} (get_mk_alignment_for_contiguous_layout()), "
                         f"got {m_total}")
    if layout.stride(0) != 1 and layout.shape[0] > 1:
        raise ValueError(f"grouped_layout: expected a contiguous tensor, got stride {layout.stride(0)}")
    device = checks.same_device(a=a, sfa=sfa, b=b, sfb=sfb, d=d, grouped_layout=layout)
    if device.type == "cuda":
        checks.sm90(device)


def _check_masked(a, sfa, b, sfb, d, masked_m, expected_m) -> None:
    num_groups, _, _ = _check_grouped_operands(a, sfa, b, sfb, d, 3)
    checks.tensor("masked_m", masked_m, (torch.int32,), 1)
    checks.shape("masked_m", masked_m, (num_groups,))
    if isinstance(expected_m, bool) or not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m: expected an int >= 0, got {expected_m!r}")
    _check_experts_stacked("a", a)
    _check_experts_stacked("d", d)
    device = checks.same_device(a=a, sfa=sfa, b=b, sfb=sfb, d=d, masked_m=masked_m)
    if device.type == "cuda":
        checks.sm90(device)


def _check_group_values(kind: str, groups: torch.Tensor, num_groups: int, rows: int) -> None:
    """MOEGEMM_CHECK_GROUPS: read the layout or masked_m (a synchronisation) and name bad entries,
    which the kernels would otherwise treat as padding or clamp."""
    values = groups.cpu()
    if kind == "contiguous":
        bad = ((values < -1) | (values >= num_groups)).nonzero().flatten()
        what = f"expert ids in [0, {num_groups}) or -1 (padding)"
    elif kind == "psum":
        previous = torch.cat([values.new_zeros(1), values[:-1]])
        bad = ((values < previous) | (values > rows)).nonzero().flatten()
        what = f"non-decreasing end rows in [0, {rows}]"
    else:
        bad = ((values < 0) | (values > rows)).nonzero().flatten()
        what = f"row counts in [0, {rows}]"
    if bad.numel():
        name = "masked_m" if kind == "masked" else "grouped_layout"
        shown = ", ".join(f"[{i}] = {values[i].item()}" for i in bad[:8].tolist())
        raise ValueError(f"{name}: expected {what}; {bad.numel()} entries are not: {shown}")


def _zero_expert_rows(kind: str, d: torch.Tensor, groups: torch.Tensor, num_groups: int) -> None:
    """K = 0: the rows of D that belong to an expert are zero (an empty sum), as the kernels' row
    rules would pick them; the rest stays untouched. Whole-tensor ops on the GPU, no host read, so
    CUDA graphs can capture it."""
    if kind == "masked":
        counts = groups.clamp(0, d.shape[1])
        owned = torch.arange(d.shape[1], device=d.device) < counts[:, None]
    elif kind == "contiguous":
        owned = (groups >= 0) & (groups < num_groups)
    else:  # psum: the first expert whose aligned end lies past the row owns it if the row is below its end
        rows = torch.arange(d.shape[0], device=d.device)
        ends = groups.clamp(min=0).long()
        first = torch.searchsorted((ends + 127) // 128 * 128, rows, right=True)
        owned = (first < num_groups) & (rows < ends.clamp(max=d.shape[0])[first.clamp(max=num_groups - 1)])
    d.masked_fill_(owned[..., None], 0)


_grouped_plans = PlanCache()
_GROUPED_NAMES = ("d", "a", "sfa", "b", "sfb", "grouped_layout")
_MASKED_NAMES = ("d", "a", "sfa", "b", "sfb", "masked_m")


def _grouped_call(kind: str, a, sfa, b, sfb, d, groups, expected_m: int, check) -> None:
    """A grouped GEMM: checks (once per signature), then the kernel, or the reference for CPU tensors."""
    try:
        key = (kind, _signature(a, sfa, b, sfb, d, None), groups.dtype, groups.shape, groups.stride(),
               groups.device, expected_m)
    except AttributeError:  # an argument is not a tensor: let the checks name it
        check()
        raise
    entry = _grouped_plans.lookup(key)
    if entry is PlanCache.MISSING:
        check()
        plan = None
        num_groups, k = b.shape[0], a.shape[-1]
        if d.is_cuda and d.numel() > 0 and k > 0 and num_groups > 0:
            from .kernels import fp8_gemm

            plan = fp8_gemm.plan_grouped(kind, a, b, d, num_sms_of(d.get_device()), expected_m, pdl=get_pdl())
        zero_rows = d.numel() > 0 and k == 0 and num_groups > 0
        spans = tuple(checks.byte_span(t) for t in (d, a, sfa, b, sfb, groups))
        entry = _grouped_plans.store(key, (plan, zero_rows, spans))
    plan, zero_rows, spans = entry
    checks.no_overlap(_MASKED_NAMES if kind == "masked" else _GROUPED_NAMES,
                      (d.data_ptr(), a.data_ptr(), sfa.data_ptr(), b.data_ptr(), sfb.data_ptr(), groups.data_ptr()),
                      spans)
    if not d.is_cuda:
        if kind == "masked":
            reference.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, groups, expected_m)
        else:
            reference.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, groups, kind == "psum")
        return
    if plan is None:  # an empty problem (no rows, columns or experts: nothing to write) or K = 0
        if zero_rows:
            _zero_expert_rows(kind, d, groups, b.shape[0])
        return
    _check_pointers_aligned(a, b, d)
    if env.flag("MOEGEMM_CHECK_GROUPS"):
        _check_group_values(kind, groups, b.shape[0], a.shape[-2] if kind == "masked" else a.shape[0])
    plan.launch(a, _kernel_sfa(sfa), b, _kernel_sfb(sfb), d, groups)


def _m_grouped_contiguous(a, sfa, b, sfb, d, grouped_layout, use_psum_layout: bool) -> None:
    expected_m = a.shape[0] // max(b.shape[0], 1) if hasattr(a, "shape") and hasattr(b, "shape") else 0
    _grouped_call("psum" if use_psum_layout else "contiguous", a, sfa, b, sfb, d, grouped_layout, expected_m,
                  lambda: _check_contiguous(a, sfa, b, sfb, d, grouped_layout, use_psum_layout))


def _m_grouped_masked(a, sfa, b, sfb, d, masked_m, expected_m: int) -> None:
    _grouped_call("masked", a, sfa, b, sfb, d, masked_m, expected_m,
                  lambda: _check_masked(a, sfa, b, sfb, d, masked_m, expected_m))


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

    The GPU never trusts the layout's values (set MOEGEMM_CHECK_GROUPS=1 to have them checked) and
    the CPU never reads them. CPU tensors run the reference.
    """
    a_data, sfa = checks.fp8_pair("a", a)
    b_data, sfb = checks.fp8_pair("b", b)
    if torch.compiler.is_compiling():
        torch.ops.moegemm.m_grouped_fp8_gemm_nt_contiguous(a_data, sfa, b_data, sfb, d, grouped_layout,
                                                          bool(use_psum_layout))
    else:
        _m_grouped_contiguous(a_data, sfa, b_data, sfb, d, grouped_layout, bool(use_psum_layout))


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
    a_data, sfa = checks.fp8_pair("a", a)
    b_data, sfb = checks.fp8_pair("b", b)
    if torch.compiler.is_compiling():
        torch.ops.moegemm.m_grouped_fp8_gemm_nt_masked(a_data, sfa, b_data, sfb, d, masked_m, expected_m)
    else:
        _m_grouped_masked(a_data, sfa, b_data, sfb, d, masked_m, expected_m)
