"""moegemm's public operations.

Each operation checks its arguments, then runs the SM90 kernel for CUDA tensors or the pure-PyTorch
reference (``moegemm.reference``) for CPU tensors. Operations write into a caller-provided output,
as DeepGEMM's do, and are registered as torch custom ops (``torch.ops.moegemm.*``) so they trace
under ``torch.compile``; eager calls skip the dispatcher to keep host overhead low.
"""

from __future__ import annotations

import torch

from . import checks, reference
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
    """What the checks and the plan depend on: dtypes, shapes, strides, devices (flat: this runs on
    every call)."""
    return (a.dtype, a.size(), a.stride(), sfa.dtype, sfa.size(), sfa.stride(), b.dtype, b.size(), b.stride(),
            sfb.dtype, sfb.size(), sfb.stride(), d.dtype, d.size(), d.stride(), a.get_device(), sfa.get_device(),
            b.get_device(), sfb.get_device(), d.get_device(),
            None if c is None else (c.dtype, c.size(), c.stride(), c.get_device()))


def _sfa_ready(sfa: torch.Tensor, m: int) -> bool:
    """SFA's strides are already the kernel's: FP32, M-major, columns TMA-aligned."""
    return sfa.stride(0) == 1 and (sfa.shape[1] == 1 or sfa.stride(1) == get_tma_aligned_size(m, 4))


# Call signatures already checked, mapped to (kernel plan or None for an empty problem, whether SFA
# and SFB arrive in the kernel's layout). CPU calls map to None.
_fp8_gemm_plans = PlanCache()


def _fp8_gemm_nt_plan(key: tuple, a, sfa, b, sfb, d, c) -> tuple | None:
    _check_fp8_gemm_nt(a, sfa, b, sfb, d, c)
    entry = None
    if d.is_cuda:
        plan = None
        if a.shape[0] > 0 and d.shape[1] > 0 and a.shape[1] > 0:
            from .kernels import fp8_gemm

            plan = fp8_gemm.plan(a, b, d, c is not None, num_sms=key[-1], pdl=key[-2])
        entry = (plan, _sfa_ready(sfa, a.shape[0]), sfb.is_contiguous())
    return _fp8_gemm_plans.store(key, entry)


def _fp8_gemm_nt(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
                 c: torch.Tensor | None) -> None:
    try:
        key = (_signature(a, sfa, b, sfb, d, c), get_pdl(), num_sms_of(d.get_device()) if d.is_cuda else 0)
    except AttributeError:  # an argument is not a tensor: let the checks name it
        _check_fp8_gemm_nt(a, sfa, b, sfb, d, c)
        raise
    entry = _fp8_gemm_plans.lookup(key)
    if entry is PlanCache.MISSING:
        entry = _fp8_gemm_nt_plan(key, a, sfa, b, sfb, d, c)
    if entry is None:
        reference.fp8_gemm_nt((a, sfa), (b, sfb), d, c)
        return
    plan, sfa_ready, sfb_ready = entry
    # Data pointers change between calls with the same signature, so their alignment is checked here.
    if (a.data_ptr() | b.data_ptr() | d.data_ptr()) & 15:
        for name, t in (("a", a), ("b", b), ("d", d)):
            checks.tma_rows(name, t)
    if c is not None and c.data_ptr() != d.data_ptr():
        d.copy_(c)
    if plan is None:  # an empty problem: M, N or K is 0
        if c is None and a.shape[1] == 0:
            d.zero_()
        return
    if not sfa_ready:
        sfa = get_mn_major_tma_aligned_tensor(sfa)
    elif sfa.data_ptr() & 15:  # the right strides at a misaligned address: re-lay out a fresh copy
        sfa = get_mn_major_tma_aligned_tensor(sfa.clone(memory_format=torch.contiguous_format))
    if not sfb_ready:
        sfb = sfb.contiguous()
    plan.launch(a, sfa, b, sfb, d)


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
