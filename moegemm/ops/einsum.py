"""``einsum`` for the three BF16 contractions DeepGEMM serves, on the BF16 GEMM kernel:

- ``bhr,hdr->bhd`` and ``bhd,hdr->bhr``: one product per head h (``GemmType.BATCHED``), A's, B's and
  D's heads read and written in place through 3-D TMA descriptors (any 16-byte pitches);
- ``bmk,bnk->mn``: the sum of B products into one D (``GemmType.BATCH_SUM``), each work item adding
  the sum of its run of (product, K block) pairs into D, which therefore is FP32 (a BF16 D gets an
  FP32 workspace and a cast).

``fp8_einsum``: ``bhr,hdr->bhd`` with FP8 operands and fine-grained scales, on the FP8 GEMM kernel
(``GemmType.BATCHED`` the same way, SFA per head).
"""

from __future__ import annotations

import torch

from .. import checks, device, reference
from ..gemm.desc import GemmType
from ..intmath import ceil_div
from ..kernels import bf16_gemm, fp8_gemm
from . import gemm_common
from .bf16_gemm import BF16, GEMM_OUT, _aligned, _kernel_operand
from .dispatch import Op
from .fp8_gemm import FP8, FP32, _kernel_sfa, _kernel_sfb, _operands, _sfa_fits

EXPRESSIONS = reference.EINSUM_EXPRESSIONS


def _views(expr: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor):
    """The products as the kernel sees them: A [G, M, K] and B [G, N, K] logical views, D [G, M, N]
    (batch sum: [M, N]), and the GemmType."""
    if expr == "bmk,bnk->mn":
        return a, b, d, GemmType.BATCH_SUM
    a_gmk, d_gmn = a.transpose(0, 1), d.transpose(0, 1)  # heads outermost
    b_gnk = b if expr == "bhr,hdr->bhd" else b.transpose(1, 2)
    return a_gmk, b_gnk, d_gmn, GemmType.BATCHED


def _expected_shapes(expr: str, a: torch.Tensor, b: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """B's and D's shapes for this A (B's leading dims and K from A, its free dim from B), and B's name."""
    x, y, z = a.shape
    if expr == "bmk,bnk->mn":
        return (x, b.shape[1], z), (y, b.shape[1]), "[B, N, K]"
    if expr == "bhr,hdr->bhd":
        return (y, b.shape[1], z), (x, y, b.shape[1]), "[H, D, R]"
    return (y, z, b.shape[2]), (x, y, b.shape[2]), "[H, D, R]"


def _check(expr, a, b, d, c) -> None:
    if expr not in EXPRESSIONS:
        raise ValueError(f"expr: expected one of {EXPRESSIONS}, got {expr!r}")
    checks.tensor("a", a, BF16, 3)
    checks.tensor("b", b, BF16, 3)
    checks.tensor("d", d, GEMM_OUT, 3 if expr != "bmk,bnk->mn" else 2)
    b_shape, d_shape, b_letters = _expected_shapes(expr, a, b)
    if tuple(b.shape) != b_shape:
        raise ValueError(f"b: expected shape {b_letters} = {b_shape} (from a's {tuple(a.shape)}), got {tuple(b.shape)}")
    checks.shape("d", d, d_shape)
    tensors = {"a": a, "b": b, "d": d}
    gemm_common.check_addend(c, d, d_shape, tensors)
    gemm_common.check_cuda(tensors)
    if d.is_cuda:
        a_gmk, b_gnk, _, _ = _views(expr, a, b, d)
        _kernel_operand("a", a_gmk)
        _kernel_operand("b", b_gnk)
        checks.tma_rows("d", d)


def _bind(expr, a, b, d, c):
    pointer_guard = gemm_common.overlap_guard(("d", "a", "b"), (d, a, b), c)

    def guard(a, b, d, c) -> tuple[int, ...]:
        """The data pointers (D, A, B), checked for overlap, and whether C is a tensor apart from D."""
        return pointer_guard((d, a, b), c)

    if not d.is_cuda:
        def run_reference(expr, a, b, d, c):
            guard(a, b, d, c)
            reference.einsum(expr, a, b, d, c)
        return run_reference

    a_gmk, b_gnk, d_view, kind = _views(expr, a, b, d)
    num_groups, m, k = a_gmk.shape
    n = b_gnk.shape[1]
    if min(num_groups, m, n, k) == 0:
        def run_empty(expr, a, b, d, c):  # an empty sum: D = C (or 0)
            separate_c = guard(a, b, d, c)[-1]
            if separate_c:
                d.copy_(c)
            elif c is None:
                d.zero_()
        return run_empty

    index = d.get_device()
    a_kernel, major_a = _kernel_operand("a", a_gmk)
    b_kernel, major_b = _kernel_operand("b", b_gnk)
    batch_sum = kind is GemmType.BATCH_SUM
    # The batch sum adds into FP32: D itself, or a workspace that a BF16 D is cast from (one per call:
    # calls on two streams must not share it).
    needs_workspace = batch_sum and d.dtype != torch.float32
    out = torch.empty(d.shape, device=d.device) if needs_workspace else d_view
    desc = bf16_gemm.describe(kind, m, n, k, out, num_groups, accumulate=batch_sum or c is not None)
    launch = bf16_gemm.plan(desc, a_kernel, b_kernel, out, major_a, major_b, device.device_facts(index),
                            pdl=device.get_pdl()).launch_pointers

    def run_kernel(expr, a, b, d, c):
        _, a_ptr, b_ptr, separate_c = guard(a, b, d, c)
        if (a_ptr | b_ptr | d.data_ptr()) & 15:
            _aligned(a, b, d)
        if separate_c:
            d.copy_(c)
        workspace = torch.zeros(d.shape, device=d.device) if needs_workspace else None
        if batch_sum and c is None and workspace is None:
            d.zero_()
        launch(index, a_ptr, b_ptr, d.data_ptr() if workspace is None else workspace.data_ptr(), 0)
        if workspace is not None:
            d.copy_(workspace)
    return run_kernel


_EINSUM = Op("einsum", "(str expr, Tensor a, Tensor b, Tensor(a!) d, Tensor? c) -> ()", ("d",),
             lambda expr, a, b, d, c: _check(expr, a, b, d, c), lambda expr, a, b, d, c: _bind(expr, a, b, d, c))


def einsum(expr: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + einsum(expr, A, B)`` in BF16 with FP32 accumulation, written into ``d``.

    Args:
        expr: one of ``EXPRESSIONS`` (spaces ignored):
            ``"bmk,bnk->mn"``: A bfloat16 [B, M, K], B bfloat16 [B, N, K], D [M, N] (the B products summed);
            ``"bhr,hdr->bhd"``: A bfloat16 [B, H, R], B bfloat16 [H, D, R], D [B, H, D];
            ``"bhd,hdr->bhr"``: A bfloat16 [B, H, D], B bfloat16 [H, D, R], D [B, H, R].
        a, b: any strides with one unit-stride dimension among each product's two (K, or M / N), 16-byte
            aligned pitches; views are read in place.
        d: bfloat16 or float32, unit stride in the last dimension, 16-byte pitches. Overwritten.
        c: optional float32 of D's shape; then ``d`` must be float32 (``c`` may be ``d``).

    CPU tensors run the reference. Other expressions raise ValueError naming the supported ones.
    """
    if not isinstance(expr, str):
        raise TypeError(f"expr: expected a str, one of {EXPRESSIONS}, got {type(expr).__name__}")
    _EINSUM(expr.replace(" ", ""), a, b, d, c)


# ---- fp8_einsum ---------------------------------------------------------------------------------------------

FP8_EXPRESSIONS = reference.FP8_EINSUM_EXPRESSIONS


def _check_fp8(expr, a, sfa, b, sfb, d, c) -> None:
    if expr not in FP8_EXPRESSIONS:
        raise ValueError(f"expr: expected one of {FP8_EXPRESSIONS}, got {expr!r}")
    checks.tensor("a", a, FP8, 3)
    checks.tensor("sfa", sfa, FP32, 3)
    checks.tensor("b", b, FP8, 3)
    checks.tensor("sfb", sfb, FP32, 3)
    checks.tensor("d", d, GEMM_OUT, 3)
    batch, heads, k = a.shape
    n = b.shape[1]
    if tuple(b.shape) != (heads, n, k):
        raise ValueError(f"b: expected shape [H, D, R] = {(heads, n, k)} (from a's {tuple(a.shape)}), got "
                         f"{tuple(b.shape)}")
    checks.shape("sfa", sfa, (batch, heads, ceil_div(k, 128)))
    checks.shape("sfb", sfb, (heads, ceil_div(n, 128), ceil_div(k, 128)))
    checks.shape("d", d, (batch, heads, n))
    tensors = {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "d": d}
    gemm_common.check_addend(c, d, tuple(d.shape), tensors)
    gemm_common.check_cuda(tensors)
    for name in ("a", "b", "d"):
        checks.tma_rows(name, tensors[name])


def _bind_fp8(expr, a, sfa, b, sfb, d, c):
    pointer_guard = gemm_common.overlap_guard(("d", "a", "sfa", "b", "sfb"), (d, a, sfa, b, sfb), c)

    if not d.is_cuda:
        def run_reference(expr, a, sfa, b, sfb, d, c):
            pointer_guard((d, a, sfa, b, sfb), c)
            reference.fp8_einsum(expr, (a, sfa), (b, sfb), d, c)
        return run_reference

    batch, heads, k = a.shape
    if min(batch, heads, k, d.shape[2]) == 0:
        def run_empty(expr, a, sfa, b, sfb, d, c):  # with R = 0, D = C (or 0: an empty sum)
            separate_c = pointer_guard((d, a, sfa, b, sfb), c)[-1]
            if d.numel() and k == 0 and separate_c:
                d.copy_(c)
            elif d.numel() and k == 0 and c is None:
                d.zero_()
        return run_empty

    # Heads outermost: A [H, B, R], D [H, B, D], SFA [H, B, R / 128], read and written in place.
    a_gmk, d_gmn = a.transpose(0, 1), d.transpose(0, 1)
    index = d.get_device()
    desc = fp8_gemm.describe(GemmType.BATCHED, a_gmk, b, d_gmn, accumulate=c is not None)
    launch = fp8_gemm.plan(desc, a_gmk, b, d_gmn, device.device_facts(index), pdl=device.get_pdl()).launch_pointers
    scales_ready = _sfa_fits(sfa.transpose(0, 1)) and sfb.is_contiguous()

    def run_kernel(expr, a, sfa, b, sfb, d, c):
        d_ptr, a_ptr, sfa_ptr, b_ptr, sfb_ptr, separate_c = pointer_guard((d, a, sfa, b, sfb), c)
        if (a_ptr | b_ptr | d_ptr) & 15:
            for name, t in (("a", a), ("b", b), ("d", d)):
                checks.tma_rows(name, t)
        if separate_c:
            d.copy_(c)
        if not scales_ready or (sfa_ptr | sfb_ptr) & 15:
            sfa_ptr, sfb_ptr = _kernel_sfa(sfa.transpose(0, 1)).data_ptr(), _kernel_sfb(sfb).data_ptr()
        launch(index, a_ptr, b_ptr, sfa_ptr, sfb_ptr, d_ptr)
    return run_kernel


_FP8_EINSUM = Op("fp8_einsum",
                 "(str expr, Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor? c) -> ()", ("d",),
                 _check_fp8, _bind_fp8)


def fp8_einsum(expr: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
               d: torch.Tensor, c: torch.Tensor | None = None, recipe: tuple[int, int, int] = (1, 128, 128)) -> None:
    """``D = C + einsum(expr, A, B)`` with FP8 operands and fine-grained scales (the absorbed attention
    projections), FP32 accumulation promoted every 128 of R, written into ``d``.

    Args:
        expr: ``"bhr,hdr->bhd"`` (spaces ignored): one product per head h, ``D[:, h] = A[:, h] @ B[h]^T``.
        a: ``(A, SFA)``: float8_e4m3fn [B, H, R], unit inner stride, 16-byte pitches (read in place);
            float32 [B, H, ceil(R/128)], one scale per 1x128 block, any strides (the kernel's layout,
            ``get_mn_major_tma_aligned_tensor(sfa.transpose(0, 1)).transpose(0, 1)``, avoids a copy).
        b: ``(B, SFB)``: float8_e4m3fn [H, D, R], K-major; float32 [H, ceil(D/128), ceil(R/128)].
        d: bfloat16 or float32 [B, H, D], unit inner stride, 16-byte pitches. Overwritten.
        c: optional float32 of D's shape; then ``d`` must be float32 (``c`` may be ``d``).
        recipe: (1, 128, 128), the only one.

    CPU tensors run the reference.
    """
    if not isinstance(expr, str):
        raise TypeError(f"expr: expected a str, one of {FP8_EXPRESSIONS}, got {type(expr).__name__}")
    if tuple(recipe) != (1, 128, 128):
        raise ValueError(f"recipe: expected (1, 128, 128), got {recipe!r}")
    a_data, sfa, b_data, sfb = _operands(a, b)
    _FP8_EINSUM(expr.replace(" ", ""), a_data, sfa, b_data, sfb, d, c)
