"""Pure-PyTorch reference implementations of the public GEMMs (test oracle and CPU fallback).

Signatures and semantics match the CUDA kernels: every function writes its result into the ``d`` it is
given and returns None. Operands are dequantised to float32 and multiplied with ``torch.matmul`` in
float32 (so a caller that enabled TF32 for float32 matmuls on the GPU gets TF32 here too). Work is split
into row chunks so float32 temporaries stay bounded, and grouped variants loop over groups only.

Scale-factor conventions: A (activations) uses one float32 scale per 1x128 block of a row,
``sfa [M, ceil(K/128)]``; B (weights) uses one per 128x128 tile, ``sfb [ceil(N/128), ceil(K/128)]``.
Scales may have any strides; int32 tensors are taken as packed UE8M0 (see ``moegemm.pack_ue8m0``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import checks
from .intmath import align, ceil_div
from .quant import BLOCK, unpack_ue8m0

__all__ = [
    "bf16_gemm_nt",
    "dequantize_per_block",
    "dequantize_per_token",
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
]

FP8Operand = tuple[torch.Tensor, torch.Tensor]
RowIndex = slice | torch.Tensor

# Upper bound on the float32 temporaries one row chunk creates.
_CHUNK_BYTES = 1 << 28
_OUTPUT_DTYPES = (torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


_check_shape = checks.shape


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    checks.is_tensor(name, t)
    checks.dtype(name, t, allowed)


def _check_dims(name: str, t: torch.Tensor, ndim: int) -> None:
    checks.is_tensor(name, t)
    checks.dims(name, t, ndim)


def _float_scales(name: str, sf: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """float32 scales as given, or int32 packed UE8M0 unpacked to float32 ``[..., k_blocks]``."""
    if sf.dtype == torch.float32:
        return sf
    if sf.dtype == torch.int32:
        if sf.dim() == 0 or sf.shape[-1] != ceil_div(k_blocks, 4):
            raise ValueError(f"{name}: expected packed UE8M0 scales with last dim ceil({k_blocks}/4) = "
                             f"{ceil_div(k_blocks, 4)}, got shape {tuple(sf.shape)}")
        return unpack_ue8m0(sf, k_blocks)
    raise TypeError(f"{name}: expected dtype torch.float32 or torch.int32 (packed UE8M0), got {sf.dtype}")


def _unpack_fp8_operand(name: str, operand: FP8Operand, dims: int) -> FP8Operand:
    """Validate ``(x_fp8, sf)``; returns ``(x_fp8, float32 sf)``. Shapes of ``sf`` are checked later."""
    if not isinstance(operand, (tuple, list)) or len(operand) != 2:
        raise TypeError(f"{name}: expected a (float8_e4m3fn tensor, scales) pair, got {type(operand).__name__}")
    x, sf = operand
    _check_dims(f"{name}[0]", x, dims)
    _check_dtype(f"{name}[0]", x, (torch.float8_e4m3fn,))
    return x, _float_scales(f"{name}[1]", sf, ceil_div(x.shape[-1], BLOCK))


# ---------------------------------------------------------------------------------------------------------
# Dequantisation
# ---------------------------------------------------------------------------------------------------------


def dequantize_per_token(x_fp8: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """Undo a 1x128 cast.

    Args:
        x_fp8: ``[..., M, K]``, float8_e4m3fn (any float dtype works).
        sf: ``[..., M, ceil(K/128)]`` float32 (any strides), or int32 packed UE8M0 ``[..., M, ceil(K/512)]``.

    Returns:
        float32 ``[..., M, K]``: each element times the scale of its 128-wide block along K.
    """
    k = x_fp8.shape[-1]
    k_blocks = ceil_div(k, BLOCK)
    sf = _float_scales("sf", sf, k_blocks)
    _check_shape("sf", sf, (*x_fp8.shape[:-1], k_blocks))
    return x_fp8.float() * sf.repeat_interleave(BLOCK, dim=-1)[..., :k]


def dequantize_per_block(x_fp8: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """Undo a 128x128 cast.

    Args:
        x_fp8: ``[..., N, K]``, float8_e4m3fn (any float dtype works).
        sf: ``[..., ceil(N/128), ceil(K/128)]`` float32 (any strides), or int32 packed UE8M0 along K.

    Returns:
        float32 ``[..., N, K]``: each element times the scale of its 128x128 tile.
    """
    n, k = x_fp8.shape[-2:]
    k_blocks = ceil_div(k, BLOCK)
    sf = _float_scales("sf", sf, k_blocks)
    _check_shape("sf", sf, (*x_fp8.shape[:-2], ceil_div(n, BLOCK), k_blocks))
    expanded = sf.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return x_fp8.float() * expanded[..., :n, :k]


# ---------------------------------------------------------------------------------------------------------
# Row-chunked GEMM core
# ---------------------------------------------------------------------------------------------------------


def _rows_per_chunk(k: int, n: int) -> int:
    """Rows per chunk so one float32 temporary ``[rows, max(K, N)]`` stays under ``_CHUNK_BYTES``."""
    return max(1, _CHUNK_BYTES // (4 * max(k, n, 1)))


def _split_rows(rows: RowIndex, chunk: int) -> Iterator[RowIndex]:
    """Split a row slice (``step`` 1, explicit bounds) or an int64 row-index tensor into chunks."""
    if isinstance(rows, torch.Tensor):
        yield from rows.split(chunk)
        return
    for start in range(rows.start, rows.stop, chunk):
        yield slice(start, min(start + chunk, rows.stop))


def _gemm_rows_into(
    d: torch.Tensor,
    rows: RowIndex,
    a_fp8: torch.Tensor,
    sfa: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None = None,
) -> None:
    """``d[rows] = c[rows] + dequant(a[rows]) @ b.T`` with float32 accumulation.

    ``a_fp8 [M, K]``, ``sfa`` float32 ``[M, ceil(K/128)]``, ``b`` float32 ``[N, K]`` (already dequantised),
    ``c``/``d`` ``[M, N]``; ``rows`` selects rows of ``a``, ``c`` and ``d`` alike.
    """
    b_t = b.t()
    for idx in _split_rows(rows, _rows_per_chunk(b.shape[1], b.shape[0])):
        out = dequantize_per_token(a_fp8[idx], sfa[idx]) @ b_t
        if c is not None:
            out += c[idx].float()
        # index_put_ (tensor rows) needs matching dtypes; for slices this is a plain copy_.
        d[idx] = out.to(d.dtype)


# ---------------------------------------------------------------------------------------------------------
# Public GEMMs
# ---------------------------------------------------------------------------------------------------------


def fp8_gemm_nt(a: FP8Operand, b: FP8Operand, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + dequant(A) @ dequant(B).T`` computed in float32, written into ``d``.

    Args:
        a: ``(a_fp8 [M, K] float8_e4m3fn, sfa float32 [M, ceil(K/128)])``, 1x128 scales, any strides.
        b: ``(b_fp8 [N, K] float8_e4m3fn, sfb float32 [ceil(N/128), ceil(K/128)])``, 128x128 scales.
        d: output ``[M, N]``, bf16 or float32; may alias ``c``.
        c: optional addend ``[M, N]`` (any float dtype, promoted to float32).
    """
    a_fp8, sfa = _unpack_fp8_operand("a", a, 2)
    b_fp8, sfb = _unpack_fp8_operand("b", b, 2)
    m, k = a_fp8.shape
    n = b_fp8.shape[0]
    _check_shape("b[0]", b_fp8, (n, k))
    _check_shape("a[1]", sfa, (m, ceil_div(k, BLOCK)))
    _check_shape("b[1]", sfb, (ceil_div(n, BLOCK), ceil_div(k, BLOCK)))
    _check_shape("d", d, (m, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    if c is not None:
        _check_shape("c", c, (m, n))
    _gemm_rows_into(d, slice(0, m), a_fp8, sfa, dequantize_per_block(b_fp8, sfb), c)


def _check_grouped_b(b_fp8: torch.Tensor, sfb: torch.Tensor, k: int) -> tuple[int, int]:
    """Validate grouped B ``[G, N, K]`` and its scales; returns ``(G, N)``."""
    num_groups, n = b_fp8.shape[:2]
    _check_shape("b[0]", b_fp8, (num_groups, n, k))
    _check_shape("b[1]", sfb, (num_groups, ceil_div(n, BLOCK), ceil_div(k, BLOCK)))
    return num_groups, n


def _check_index_dtype(name: str, t: torch.Tensor) -> None:
    checks.is_tensor(name, t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (torch.int32), got {t.dtype}")


def _rows_by_expert_id(layout: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """Per-group int64 row indices from a per-row expert id; ids outside [0, G) are dropped."""
    layout = layout.long()
    valid = (layout >= 0) & (layout < num_groups)
    rows = valid.nonzero().squeeze(1)
    ids = layout[rows]
    # A stable sort keeps each group's rows in ascending order, then one split hands them out.
    order = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids, minlength=num_groups).tolist()
    return list(rows[order].split(counts))


def _rows_by_psum(ends: torch.Tensor, num_groups: int, m_total: int) -> list[slice]:
    """Per-group row ranges from cumulative end rows; group g starts at ``align(ends[g-1], 128)``."""
    _check_shape("grouped_layout", ends, (num_groups,))
    segments = []
    previous_end = 0
    for end in ends.tolist():
        if end > m_total:
            raise ValueError(f"grouped_layout: expected end rows (psum) in [0, {m_total}], got {end}")
        start = align(previous_end, BLOCK)
        segments.append(slice(start, max(start, end)))
        previous_end = end
    return segments


def _row_count(rows: RowIndex) -> int:
    return rows.numel() if isinstance(rows, torch.Tensor) else rows.stop - rows.start


def m_grouped_fp8_gemm_nt_contiguous(
    a: FP8Operand,
    b: FP8Operand,
    d: torch.Tensor,
    grouped_layout: torch.Tensor,
    use_psum_layout: bool = False,
) -> None:
    """Grouped GEMM over rows of A that are contiguous per expert: ``d[rows_g] = A[rows_g] @ B[g].T``.

    Args:
        a: ``(a_fp8 [M_total, K], sfa float32 [M_total, ceil(K/128)])``.
        b: ``(b_fp8 [G, N, K], sfb float32 [G, ceil(N/128), ceil(K/128)])``.
        d: output ``[M_total, N]``, bf16 or float32. Rows belonging to no group are left untouched.
        grouped_layout: int32. Default: ``[M_total]`` expert id of each row; ids outside ``[0, G)`` mark
            padding rows. With ``use_psum_layout``: ``[G]`` cumulative end rows; group g owns rows
            ``[align(end[g-1], 128), end[g])`` (starting at row 0 for g = 0).
        use_psum_layout: selects the meaning of ``grouped_layout`` as above.
    """
    a_fp8, sfa = _unpack_fp8_operand("a", a, 2)
    b_fp8, sfb = _unpack_fp8_operand("b", b, 3)
    m_total, k = a_fp8.shape
    _check_shape("a[1]", sfa, (m_total, ceil_div(k, BLOCK)))
    num_groups, n = _check_grouped_b(b_fp8, sfb, k)
    _check_shape("d", d, (m_total, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    _check_index_dtype("grouped_layout", grouped_layout)
    if use_psum_layout:
        segments: list[RowIndex] = list(_rows_by_psum(grouped_layout, num_groups, m_total))
    else:
        _check_shape("grouped_layout", grouped_layout, (m_total,))
        segments = list(_rows_by_expert_id(grouped_layout, num_groups))
    for group, rows in enumerate(segments):
        if _row_count(rows) == 0:
            continue
        _gemm_rows_into(d, rows, a_fp8, sfa, dequantize_per_block(b_fp8[group], sfb[group]))


def m_grouped_fp8_gemm_nt_masked(
    a: FP8Operand,
    b: FP8Operand,
    d: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
) -> None:
    """Batched grouped GEMM where group g uses only its first ``masked_m[g]`` rows.

    Args:
        a: ``(a_fp8 [G, max_M, K], sfa float32 [G, max_M, ceil(K/128)])``.
        b: ``(b_fp8 [G, N, K], sfb float32 [G, ceil(N/128), ceil(K/128)])``.
        d: output ``[G, max_M, N]``, bf16 or float32; rows ``>= clamp(masked_m[g], 0, max_M)`` of group g
            are left untouched.
        masked_m: int32 ``[G]`` valid rows per group.
        expected_m: the kernels' tuning hint; ignored here.
    """
    del expected_m
    a_fp8, sfa = _unpack_fp8_operand("a", a, 3)
    b_fp8, sfb = _unpack_fp8_operand("b", b, 3)
    num_groups, max_m, k = a_fp8.shape
    _check_shape("a[1]", sfa, (num_groups, max_m, ceil_div(k, BLOCK)))
    _, n = _check_grouped_b(b_fp8, sfb, k)
    _check_shape("b[0]", b_fp8, (num_groups, n, k))
    _check_shape("d", d, (num_groups, max_m, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    _check_index_dtype("masked_m", masked_m)
    _check_shape("masked_m", masked_m, (num_groups,))
    for group, m in enumerate(masked_m.clamp(0, max_m).tolist()):
        if m == 0:
            continue
        b_deq = dequantize_per_block(b_fp8[group], sfb[group])
        _gemm_rows_into(d[group], slice(0, m), a_fp8[group], sfa[group], b_deq)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + A @ B.T`` computed in float32, written into ``d``.

    Args:
        a: ``[M, K]`` bf16.
        b: ``[N, K]`` bf16.
        d: output ``[M, N]``, bf16 or float32; may alias ``c``.
        c: optional addend ``[M, N]`` (any float dtype, promoted to float32).
    """
    _check_dims("a", a, 2)
    _check_dtype("a", a, (torch.bfloat16,))
    _check_dtype("b", b, (torch.bfloat16,))
    m, k = a.shape
    n = b.shape[0]
    _check_shape("b", b, (n, k))
    _check_shape("d", d, (m, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    if c is not None:
        _check_shape("c", c, (m, n))
    b_t = b.float().t()
    for idx in _split_rows(slice(0, m), _rows_per_chunk(k, n)):
        out = a[idx].float() @ b_t
        if c is not None:
            out += c[idx].float()
        d[idx] = out.to(d.dtype)
