"""``tf32_hc_prenorm_gemm``: the hyper-connection pre-norm GEMM (checks, the bound call, the public
function)."""

from __future__ import annotations

import torch

from .. import checks, device, reference
from ..kernels import hc_prenorm
from . import gemm_common
from .dispatch import Op

FP32 = (torch.float32,)


def _splits(num_splits: int | None) -> int:
    return 1 if num_splits is None else num_splits


def _check(a, b, d, sqr_sum, num_splits) -> None:
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits: expected None or an int >= 1, got {num_splits!r}")
    checks.tensor("a", a, (torch.bfloat16,), 2)
    checks.tensor("b", b, FP32, 2)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"b: expected shape [N, K] with K = {k} (from a), got {tuple(b.shape)}")
    lead = () if num_splits is None else (num_splits,)
    checks.tensor("d", d, FP32, len(lead) + 2)
    checks.shape("d", d, (*lead, m, n))
    checks.tensor("sqr_sum", sqr_sum, FP32, len(lead) + 1)
    checks.shape("sqr_sum", sqr_sum, (*lead, m))
    gemm_common.check_cuda({"a": a, "b": b, "d": d, "sqr_sum": sqr_sum})
    if d.is_cuda:
        if not 0 < n <= hc_prenorm.MAX_N and m and k:
            raise ValueError(f"b: expected N (rows) in [1, {hc_prenorm.MAX_N}], got {n}")
        checks.tma_rows("a", a)
        checks.tma_rows("b", b)
        for name, t in (("d", d), ("sqr_sum", sqr_sum)):
            if not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")


def _bind(a, b, d, sqr_sum, num_splits):
    names = ("d", "sqr_sum", "a", "b")
    spans = gemm_common.spans(d, sqr_sum, a, b)
    sqr_spans = gemm_common.spans(sqr_sum, d, a, b)

    def guard(a, b, d, sqr_sum) -> tuple[int, ...]:
        pointers = (d.data_ptr(), sqr_sum.data_ptr(), a.data_ptr(), b.data_ptr())
        checks.no_overlap(names, pointers, spans)
        checks.no_overlap(("sqr_sum", "d", "a", "b"), (pointers[1], pointers[0], *pointers[2:]), sqr_spans)
        return pointers

    if not d.is_cuda:
        def run_reference(a, b, d, sqr_sum, num_splits):
            guard(a, b, d, sqr_sum)
            reference.tf32_hc_prenorm_gemm(a, b, d, sqr_sum, num_splits)
        return run_reference

    m, k = a.shape
    if m == 0 or k == 0 or d.numel() == 0:
        def run_empty(a, b, d, sqr_sum, num_splits):  # nothing to read: the sums are empty
            guard(a, b, d, sqr_sum)
            d.zero_()
            sqr_sum.zero_()
        return run_empty

    index = d.get_device()
    launch = hc_prenorm.plan(a, b, _splits(num_splits), device.device_facts(index),
                             pdl=device.get_pdl()).launch_pointers

    def run_kernel(a, b, d, sqr_sum, num_splits):
        d_ptr, sqr_ptr, a_ptr, b_ptr = guard(a, b, d, sqr_sum)
        if (a_ptr | b_ptr) & 15:
            checks.tma_rows("a", a)
            checks.tma_rows("b", b)
        launch(index, a_ptr, b_ptr, d_ptr, sqr_ptr)
    return run_kernel


_HC_PRENORM = Op("tf32_hc_prenorm_gemm",
                 "(Tensor a, Tensor b, Tensor(a!) d, Tensor(b!) sqr_sum, int? num_splits) -> ()", ("d", "sqr_sum"),
                 _check, _bind)


def tf32_hc_prenorm_gemm(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor,
                         num_splits: int | None = None) -> None:
    """The hyper-connection pre-norm GEMM: ``D = A @ B^T`` on TF32 tensor cores and ``sqr_sum`` = the
    row sums of A's squares, in one pass over A.

    Args:
        a: bfloat16 [M, K], row-major (K contiguous; K % 8 == 0 for TMA's 16-byte pitches).
        b: float32 [N, K], row-major, N <= 256 (K % 4 == 0). Multiplied as TF32.
        d: float32 [M, N], or [num_splits, M, N] with ``num_splits``; contiguous. Overwritten.
        sqr_sum: float32 [M], or [num_splits, M]; contiguous. Overwritten (exact FP32 sums of A's squares).
        num_splits: None, or K split that many ways (blocks of 64 columns dealt out in order, the first
            ``blocks % num_splits`` splits one more: ``reference.hc_prenorm_split_ranges``); split s
            writes its partial sums into ``d[s]`` and ``sqr_sum[s]`` (zeros where it has no columns).

    CPU tensors run the reference.
    """
    _HC_PRENORM(a, b, d, sqr_sum, num_splits)
