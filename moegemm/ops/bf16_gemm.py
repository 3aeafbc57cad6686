"""The BF16 GEMMs: ``bf16_gemm_nt`` / ``_nn`` / ``_tn`` / ``_tt`` and the MoE grouped forms
(contiguous nt and nn, masked nt). Checks, the bound calls of the dispatch path, and the public
functions.

Each operand may arrive K-major or MN-major in memory, whatever the function's letters say: the
letters give the logical shapes (n: A [M, K] / B [K, N], t: A [K, M] / B [N, K]), and the kernel
reads either memory order (a transposed view costs no copy).
"""

from __future__ import annotations

import torch

from .. import checks, device, reference
from ..gemm.desc import GemmType, Major
from ..kernels import bf16_gemm
from ..kernels.fp8_gemm import CONTIGUOUS_ALIGNMENT
from . import gemm_common
from .dispatch import Op, get_check_groups

BF16 = (torch.bfloat16,)
FP32 = (torch.float32,)
GEMM_OUT = (torch.bfloat16, torch.float32)


# ---- operands as the kernel sees them ------------------------------------------------------------------------


def _kernel_operand(name: str, logical: torch.Tensor) -> tuple[torch.Tensor, Major]:
    """The view of an operand the kernel reads, ``logical`` being its [rows, K] view (rows: M or N,
    after a leading expert dimension if any): the view itself when K is contiguous (K-major), its
    last two dimensions swapped when M (N) is (MN-major). Raises when neither is, or when TMA cannot
    address it (16-byte aligned pitches and base)."""
    rows, k = logical.shape[-2:]
    if logical.numel() == 0:
        return logical, Major.K
    if logical.stride(-1) == 1 or k == 1:
        view, major = logical, Major.K
    elif logical.stride(-2) == 1 or rows == 1:
        view, major = logical.transpose(-1, -2), Major.MN
    else:
        raise ValueError(f"{name}: expected a K-major or an MN-major operand (unit stride along K or along "
                         f"its rows), got strides {tuple(logical.stride())} for its [..., rows, K] view of shape "
                         f"{tuple(logical.shape)}")
    size = view.element_size()
    for dim in range(view.dim() - 1):
        if view.shape[dim] > 1 and (view.stride(dim) * size) % 16:
            raise ValueError(f"{name}: expected a pitch of a multiple of 16 bytes between the rows of its "
                             f"{major.name}-major layout, got strides {tuple(view.stride())} of {size}-byte elements")
    if view.data_ptr() % 16:
        raise ValueError(f"{name}: expected a 16-byte aligned data pointer, got {view.data_ptr():#x}")
    return view, major


def _aligned(*tensors: torch.Tensor) -> None:
    """TMA's 16-byte alignment of the data pointers, which change between calls of one signature."""
    for name, t in zip(("a", "b", "d"), tensors, strict=True):
        if t.numel() and t.data_ptr() % 16:
            raise ValueError(f"{name}: expected a 16-byte aligned data pointer, got {t.data_ptr():#x}")


# ---- the dense GEMMs ---------------------------------------------------------------------------------------------

# Each layout's logical A [M, K] and B [N, K] views of its arguments.
_LAYOUTS = {
    "nt": (lambda a: a, lambda b: b),
    "nn": (lambda a: a, lambda b: b.t()),
    "tn": (lambda a: a.t(), lambda b: b.t()),
    "tt": (lambda a: a.t(), lambda b: b),
}
_SHAPES = {"nt": ("[M, K]", "[N, K]"), "nn": ("[M, K]", "[K, N]"), "tn": ("[K, M]", "[K, N]"),
           "tt": ("[K, M]", "[N, K]")}
_DENSE_NAMES = ("d", "a", "b")


def _check_dense(layout: str, a, b, d, c) -> None:
    checks.tensor("a", a, BF16, 2)
    checks.tensor("b", b, BF16, 2)
    checks.tensor("d", d, GEMM_OUT, 2)
    a_mk, b_nk = (view(t) for view, t in zip(_LAYOUTS[layout], (a, b), strict=True))
    m, k = a_mk.shape
    n = b_nk.shape[0]
    if b_nk.shape[1] != k:
        raise ValueError(f"b: expected shape {_SHAPES[layout][1]} with K = {k} (from a), got {tuple(b.shape)}")
    checks.shape("d", d, (m, n))
    tensors = {"a": a, "b": b, "d": d}
    gemm_common.check_addend(c, d, (m, n), tensors)
    gemm_common.check_cuda(tensors)
    if d.is_cuda:
        _kernel_operand("a", a_mk)
        _kernel_operand("b", b_nk)
        checks.tma_rows("d", d)


def _bind_dense(layout: str, a, b, d, c):
    pointer_guard = gemm_common.overlap_guard(_DENSE_NAMES, (d, a, b), c)
    a_mk, b_nk = (view(t) for view, t in zip(_LAYOUTS[layout], (a, b), strict=True))
    m, k = a_mk.shape
    n = b_nk.shape[0]

    def guard(a, b, d, c) -> tuple[int, int, int, bool]:
        """The data pointers (D, A, B), checked for overlap; whether C is a tensor apart from D."""
        return pointer_guard((d, a, b), c)

    if not d.is_cuda:
        oracle = getattr(reference, f"bf16_gemm_{layout}")

        def run_reference(a, b, d, c):
            guard(a, b, d, c)
            oracle(a, b, d, c)
        return run_reference

    if min(m, n, k) == 0:
        def run_empty(a, b, d, c):  # M, N or K is 0; with K = 0, D = C (or 0: an empty sum)
            separate_c = guard(a, b, d, c)[-1]
            if k == 0 and d.numel() and separate_c:
                d.copy_(c)
            elif k == 0 and d.numel() and c is None:
                d.zero_()
        return run_empty

    index = d.get_device()
    a_view, major_a = _kernel_operand("a", a_mk)
    b_view, major_b = _kernel_operand("b", b_nk)
    desc = bf16_gemm.describe(GemmType.NORMAL, m, n, k, d, accumulate=c is not None)
    launch = bf16_gemm.plan(desc, a_view, b_view, d, major_a, major_b, device.device_facts(index),
                            pdl=device.get_pdl()).launch_pointers

    def run_kernel(a, b, d, c):
        d_ptr, a_ptr, b_ptr, separate_c = guard(a, b, d, c)
        if (a_ptr | b_ptr | d_ptr) & 15:
            _aligned(a, b, d)
        if separate_c:
            d.copy_(c)
        launch(index, a_ptr, b_ptr, d_ptr, 0)
    return run_kernel


def _dense_op(layout: str) -> Op:
    return Op(f"bf16_gemm_{layout}", "(Tensor a, Tensor b, Tensor(a!) d, Tensor? c) -> ()", ("d",),
              lambda *args: _check_dense(layout, *args), lambda *args: _bind_dense(layout, *args))


_DENSE = {layout: _dense_op(layout) for layout in _LAYOUTS}


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """D = C + A @ B^T in BF16 with FP32 accumulation, written into ``d``.

    Args:
        a: bfloat16 [M, K]. b: bfloat16 [N, K]. Each K-major or MN-major in memory (a transposed view
            is read in place), 16-byte aligned with row pitches of a multiple of 16 bytes.
        d: bfloat16 or float32 [M, N], row-major. Overwritten; must not overlap the inputs.
        c: optional float32 [M, N]; then ``d`` must be float32 and D = C + A @ B^T (``c`` may be ``d``).

    Any M, N, K >= 0 (K = 0: D = C, or 0). SM90 GPUs only; CPU tensors use the reference.
    """
    _DENSE["nt"](a, b, d, c)


def bf16_gemm_nn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """D = C + A @ B: A bfloat16 [M, K], B bfloat16 [K, N]; otherwise as ``bf16_gemm_nt``."""
    _DENSE["nn"](a, b, d, c)


def bf16_gemm_tn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """D = C + A^T @ B: A bfloat16 [K, M], B bfloat16 [K, N]; otherwise as ``bf16_gemm_nt``."""
    _DENSE["tn"](a, b, d, c)


def bf16_gemm_tt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """D = C + A^T @ B^T: A bfloat16 [K, M], B bfloat16 [N, K]; otherwise as ``bf16_gemm_nt``."""
    _DENSE["tt"](a, b, d, c)


# ---- the MoE grouped GEMMs ---------------------------------------------------------------------------------------


def _check_grouped(kind: GemmType, b_layout: str, a, b, d, groups) -> None:
    a_dims = 3 if kind is GemmType.MASKED else 2
    checks.tensor("a", a, BF16, a_dims)
    checks.tensor("b", b, BF16, 3)
    checks.tensor("d", d, GEMM_OUT, a_dims)
    k = a.shape[-1]
    num_groups = b.shape[0]
    n = b.shape[1] if b_layout == "n_k" else b.shape[2]
    expected_b = (num_groups, n, k) if b_layout == "n_k" else (num_groups, k, n)
    if tuple(b.shape) != expected_b:
        shape = "(G, N, K)" if b_layout == "n_k" else "(G, K, N)"
        raise ValueError(f"b: expected shape {shape} with K = {k} (from a), got {tuple(b.shape)}")
    if kind is GemmType.MASKED and a.shape[0] != num_groups:
        raise ValueError(f"a: expected G = {num_groups} experts (from b), got shape {tuple(a.shape)}")
    checks.shape("d", d, (*a.shape[:-1], n))
    name = "masked_m" if kind is GemmType.MASKED else "grouped_layout"
    checks.tensor(name, groups, (torch.int32,), 1)
    if kind is GemmType.MASKED:
        checks.shape(name, groups, (num_groups,))
        gemm_common.check_experts_stacked("a", a)
        gemm_common.check_experts_stacked("d", d)
    else:
        m_total = a.shape[0]
        checks.shape(name, groups, (num_groups,) if kind is GemmType.PSUM else (m_total,))
        if m_total % CONTIGUOUS_ALIGNMENT:
            raise ValueError(f"a: expected M_total a multiple of {CONTIGUOUS_ALIGNMENT} "
                             f"(get_mk_alignment_for_contiguous_layout()), got {m_total}")
        if groups.stride(0) != 1 and groups.shape[0] > 1:
            raise ValueError(f"{name}: expected a contiguous tensor, got stride {groups.stride(0)}")
    gemm_common.check_cuda({"a": a, "b": b, "d": d, name: groups})
    if d.is_cuda:
        for operand_name, t in (("a", a), ("b", b), ("d", d)):
            checks.tma_rows(operand_name, t)
        if b_layout == "n_k":  # seen as one [G * N, K] matrix; [G, K, N] is read as a 3-D tensor
            gemm_common.check_experts_stacked("b", b)


def _bind_grouped(kind: GemmType, b_layout: str, a, b, d, groups, expected_m: int):
    names = ("d", "a", "b", "masked_m" if kind is GemmType.MASKED else "grouped_layout")
    spans = gemm_common.spans(d, a, b, groups)
    num_groups, k = b.shape[0], a.shape[-1]
    n = d.shape[-1]
    rows = a.shape[-2] if kind is GemmType.MASKED else a.shape[0]

    def guard(a, b, d, groups) -> tuple[int, ...]:
        pointers = (d.data_ptr(), a.data_ptr(), b.data_ptr(), groups.data_ptr())
        checks.no_overlap(names, pointers, spans)
        return pointers

    if not d.is_cuda:
        def run_reference(a, b, d, groups, _):
            guard(a, b, d, groups)
            if kind is GemmType.MASKED:
                reference.m_grouped_bf16_gemm_nt_masked(a, b, d, groups, expected_m)
            else:
                oracle = (reference.m_grouped_bf16_gemm_nt_contiguous if b_layout == "n_k"
                          else reference.m_grouped_bf16_gemm_nn_contiguous)
                oracle(a, b, d, groups, kind is GemmType.PSUM)
        return run_reference

    if d.numel() == 0 or num_groups == 0 or k == 0:
        def run_empty(a, b, d, groups, _):  # nothing to compute; with K = 0 the experts' rows are 0
            guard(a, b, d, groups)
            if d.numel() and num_groups and k == 0:
                gemm_common.zero_expert_rows(kind, d, groups, num_groups)
        return run_empty

    index = d.get_device()
    major_b = Major.K if b_layout == "n_k" else Major.MN
    desc = bf16_gemm.describe(kind, expected_m, n, k, d, num_groups)
    launch = bf16_gemm.plan(desc, a, b, d, Major.K, major_b, device.device_facts(index),
                            pdl=device.get_pdl()).launch_pointers

    def run_kernel(a, b, d, groups, _):
        d_ptr, a_ptr, b_ptr, groups_ptr = guard(a, b, d, groups)
        if (a_ptr | b_ptr | d_ptr) & 15:
            _aligned(a, b, d)
        if get_check_groups():
            gemm_common.check_group_values(kind, groups, num_groups, rows)
        launch(index, a_ptr, b_ptr, d_ptr, groups_ptr)
    return run_kernel


def _contiguous_op(b_layout: str, letters: str) -> Op:
    def bind(a, b, d, layout, use_psum_layout):
        kind = GemmType.PSUM if use_psum_layout else GemmType.CONTIGUOUS
        return _bind_grouped(kind, b_layout, a, b, d, layout, a.shape[0] // max(b.shape[0], 1))

    def check(a, b, d, layout, use_psum_layout):
        _check_grouped(GemmType.PSUM if use_psum_layout else GemmType.CONTIGUOUS, b_layout, a, b, d, layout)

    return Op(f"m_grouped_bf16_gemm_{letters}_contiguous",
              "(Tensor a, Tensor b, Tensor(a!) d, Tensor grouped_layout, bool use_psum_layout) -> ()", ("d",),
              check, bind)


def _check_masked(a, b, d, masked_m, expected_m) -> None:
    if isinstance(expected_m, bool) or not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m: expected an int >= 0, got {expected_m!r}")
    _check_grouped(GemmType.MASKED, "n_k", a, b, d, masked_m)


_CONTIGUOUS_NT = _contiguous_op("n_k", "nt")
_CONTIGUOUS_NN = _contiguous_op("k_n", "nn")
_MASKED = Op("m_grouped_bf16_gemm_nt_masked",
             "(Tensor a, Tensor b, Tensor(a!) d, Tensor masked_m, int expected_m) -> ()", ("d",), _check_masked,
             lambda a, b, d, masked_m, expected_m: _bind_grouped(GemmType.MASKED, "n_k", a, b, d, masked_m,
                                                                 expected_m))


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
    """MoE prefill in BF16: ``D[rows of expert g] = A[rows of expert g] @ B[g]^T`` for every expert g.

    Args:
        a: bfloat16 [M_total, K], K-major: the experts' rows back to back, each expert's segment
            starting at a multiple of ``get_mk_alignment_for_contiguous_layout()`` rows (M_total too).
        b: bfloat16 [G, N, K], K-major, the experts stacked without gaps.
        d: bfloat16 or float32 [M_total, N]. Rows of no expert (padding) are left untouched.
        grouped_layout: int32 on the GPU, as for ``m_grouped_fp8_gemm_nt_contiguous``: [M_total]
            per-row expert ids (outside [0, G): padding), or with ``use_psum_layout`` [G] cumulative
            end rows.

    The GPU never trusts the layout's values and the CPU never reads them (``set_check_groups(True)``
    has them checked). K = 0 sets the experts' rows to 0. CPU tensors run the reference.
    """
    _CONTIGUOUS_NT(a, b, d, grouped_layout, bool(use_psum_layout))


def m_grouped_bf16_gemm_nn_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
    """As ``m_grouped_bf16_gemm_nt_contiguous`` with B bfloat16 [G, K, N] (N contiguous):
    ``D[rows of expert g] = A[rows of expert g] @ B[g]``."""
    _CONTIGUOUS_NN(a, b, d, grouped_layout, bool(use_psum_layout))


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int) -> None:
    """MoE decode in BF16: ``D[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T`` for every expert g.

    Args:
        a: bfloat16 [G, max_M, K], K-major. b: bfloat16 [G, N, K], K-major.
        d: bfloat16 or float32 [G, max_M, N]; rows at or past ``masked_m[g]`` stay untouched.
        masked_m: int32 [G] on the GPU, clamped to [0, max_M] there; the CPU never reads it (safe in a
            CUDA graph whose counts change between replays).
        expected_m: the rows per expert the config heuristic plans for (a hint only).
    """
    _MASKED(a, b, d, masked_m, expected_m)


# ---- the K-grouped GEMM (MoE weight gradients) -------------------------------------------------------------------


def _check_k_grouped(a, b, d, grouped_layout, c) -> None:
    checks.tensor("a", a, BF16, 2)
    checks.tensor("b", b, BF16, 2)
    checks.tensor("d", d, FP32, 3)
    sum_k, m = a.shape
    num_groups, n = d.shape[0], b.shape[-1]
    if b.shape[0] != sum_k:
        raise ValueError(f"b: expected shape [sum_k, N] with sum_k = {sum_k} (from a), got {tuple(b.shape)}")
    checks.shape("d", d, (num_groups, m, n))
    checks.tensor("grouped_layout", grouped_layout, (torch.int32,), 1)
    checks.shape("grouped_layout", grouped_layout, (num_groups,))
    tensors = {"a": a, "b": b, "d": d, "grouped_layout": grouped_layout}
    gemm_common.check_addend(c, d, tuple(d.shape), tensors)
    gemm_common.check_cuda(tensors)
    if d.is_cuda:
        # The kernel reads A [sum_k, M] and B [sum_k, N] row by row of K: M (N) contiguous.
        for name, t in (("a", a), ("b", b)):
            checks.tma_rows(name, t)
        checks.tma_rows("d", d)
        if grouped_layout.numel() > 1 and grouped_layout.stride(0) != 1:
            raise ValueError(f"grouped_layout: expected a contiguous tensor, got stride {grouped_layout.stride(0)}")


def _bind_k_grouped(a, b, d, grouped_layout, c):
    pointer_guard = gemm_common.overlap_guard(("d", "a", "b", "grouped_layout"), (d, a, b, grouped_layout), c)
    num_groups, m, n = d.shape
    sum_k = a.shape[0]

    def guard(a, b, d, grouped_layout, c) -> tuple[int, ...]:
        """The data pointers (D, A, B, layout), checked for overlap, and whether C is a tensor apart from D."""
        return pointer_guard((d, a, b, grouped_layout), c)

    if not d.is_cuda:
        def run_reference(a, b, d, grouped_layout, c):
            guard(a, b, d, grouped_layout, c)
            reference.k_grouped_bf16_gemm_tn_contiguous(a, b, d, grouped_layout.tolist(), grouped_layout, c)
        return run_reference

    if d.numel() == 0 or sum_k == 0:
        def run_empty(a, b, d, grouped_layout, c):
            gemm_common.start_sum(d, c, guard(a, b, d, grouped_layout, c)[-1])
        return run_empty

    index = d.get_device()
    desc = bf16_gemm.describe(GemmType.K_GROUPED, m, n, max(sum_k // num_groups, 1), d, num_groups, accumulate=True)
    launch = bf16_gemm.plan(desc, a, b, d, Major.MN, Major.MN, device.device_facts(index),
                            pdl=device.get_pdl()).launch_pointers

    def run_kernel(a, b, d, grouped_layout, c):
        d_ptr, a_ptr, b_ptr, groups_ptr, separate_c = guard(a, b, d, grouped_layout, c)
        if (a_ptr | b_ptr | d_ptr) & 15:
            _aligned(a, b, d)
        if get_check_groups():
            gemm_common.check_group_values(GemmType.K_GROUPED, grouped_layout, num_groups, sum_k)
        gemm_common.start_sum(d, c, separate_c)
        launch(index, a_ptr, b_ptr, d_ptr, groups_ptr)
    return run_kernel


_K_GROUPED = Op("k_grouped_bf16_gemm_tn_contiguous",
                "(Tensor a, Tensor b, Tensor(a!) d, Tensor grouped_layout, Tensor? c) -> ()", ("d",), _check_k_grouped,
                _bind_k_grouped)


def k_grouped_bf16_gemm_tn_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks: list[int],
                                      grouped_layout: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """MoE weight gradients in BF16: ``D[g] = C[g] + A_g^T @ B_g`` for every expert g, in FP32.

    Args:
        a: bfloat16 [sum_k, M], row-major (M contiguous): the experts' token segments back to back.
        b: bfloat16 [sum_k, N], row-major, the same segments.
        d: float32 [G, M, N], row-major. Overwritten (an expert with no tokens gets C[g], or 0).
        ks: the G segments' lengths on the host, each a multiple of
            ``get_mk_alignment_for_contiguous_layout()`` (0 allowed), summing to sum_k.
        grouped_layout: int32 [G] on the GPU: the same lengths, which the kernel reads (clamped to
            sum_k, never trusted; ``set_check_groups(True)`` has them checked).
        c: optional float32 [G, M, N]; may be ``d`` itself (then D += A^T @ B).

    CPU tensors run the reference.
    """
    if isinstance(ks, torch.Tensor) or not isinstance(ks, list | tuple):
        raise TypeError(f"ks: expected a list of ints (the segments' lengths, on the host), got {type(ks).__name__}")
    checks.tensor("a", a, BF16, 2)
    checks.tensor("d", d, FP32, 3)
    if len(ks) != d.shape[0]:
        raise ValueError(f"ks: expected one length per expert, {d.shape[0]} (d's first dim), got {len(ks)}")
    for i, length in enumerate(ks):
        if isinstance(length, bool) or not isinstance(length, int) or length < 0 or length % CONTIGUOUS_ALIGNMENT:
            raise ValueError(f"ks[{i}]: expected an int >= 0, a multiple of {CONTIGUOUS_ALIGNMENT}, got {length!r}")
    if sum(ks) != a.shape[0]:
        raise ValueError(f"ks: expected lengths summing to {a.shape[0]} (a's rows), got {sum(ks)}")
    _K_GROUPED(a, b, d, grouped_layout, c)
