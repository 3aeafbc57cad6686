"""Pure-PyTorch reference implementations of the public GEMMs (test oracle and CPU fallback).

Signatures and semantics match the CUDA kernels (DeepGEMM's names and argument order): every function
writes its result into the ``d`` it is given and returns None. FP8 operands are dequantised, BF16 ones
converted, to float32 and multiplied with ``torch.matmul`` in float32 (so a caller that enabled TF32 for
float32 matmuls on the GPU gets TF32 here too). Work is split into row chunks so float32 temporaries
stay bounded, and grouped variants loop over groups only. Transposed operands are read through views.

Scale-factor conventions: A (activations) uses one float32 scale per 1x128 block of a row,
``sfa [M, ceil(K/128)]``; B (weights) uses one per 128x128 tile, ``sfb [ceil(N/128), ceil(K/128)]``.
Scales may have any strides; int32 tensors are taken as packed UE8M0 (see ``moegemm.pack_ue8m0``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from . import checks
from .intmath import align, ceil_div
from .quant import BLOCK, per_token_cast_to_fp8, per_token_scale_block, unpack_fp4, unpack_ue8m0

__all__ = [
    "bf16_gemm_nn",
    "bf16_gemm_nt",
    "bf16_gemm_tn",
    "bf16_gemm_tt",
    "bf16_mega_moe",
    "dequantize_per_block",
    "dequantize_per_token",
    "einsum",
    "fp8_einsum",
    "fp8_fp4_mega_moe",
    "fp8_gemm_nt",
    "k_grouped_bf16_gemm_tn_contiguous",
    "k_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nn_contiguous",
    "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "tf32_hc_prenorm_gemm",
]

FP8Operand = tuple[torch.Tensor, torch.Tensor]
RowIndex = slice | torch.Tensor

# Upper bound on the float32 temporaries one row chunk creates.
_CHUNK_BYTES = 1 << 28
_OUTPUT_DTYPES = (torch.bfloat16, torch.float32)
_BF16 = (torch.bfloat16,)
_FP32 = (torch.float32,)


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


def _check_operand(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] = _BF16) -> None:
    _check_dims(name, t, ndim)
    _check_dtype(name, t, dtypes)


def _check_output(
    name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] = _OUTPUT_DTYPES
) -> None:
    _check_dtype(name, t, dtypes)
    _check_shape(name, t, shape)


def _check_addend(c: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """C of the BF16 GEMMs, when given: float32 with D's shape (it may be D itself)."""
    if c is not None:
        _check_output("c", c, shape, _FP32)


def _b_nk_view(b: torch.Tensor, letter: str, lead: tuple[int, ...], k: int) -> torch.Tensor:
    """B's ``[*lead, N, K]`` view after checking its shape: DeepGEMM's letter "t" means B is stored
    ``[*lead, N, K]``, "n" means ``[*lead, K, N]``; N is taken from B, ``lead`` and K from elsewhere."""
    if letter == "t":
        _check_shape("b", b, (*lead, b.shape[-2], k))
        return b
    _check_shape("b", b, (*lead, k, b.shape[-1]))
    return b.transpose(-1, -2)


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


def _fp8_pair(name: str, operand: FP8Operand, dims: int) -> FP8Operand:
    """``(x_fp8, sf)`` of an operand pair, ``x_fp8`` checked (``dims``-D e4m3); ``sf`` as given."""
    if not isinstance(operand, (tuple, list)) or len(operand) != 2:
        raise TypeError(f"{name}: expected a (float8_e4m3fn tensor, scales) pair, got {type(operand).__name__}")
    x, sf = operand
    _check_dims(f"{name}[0]", x, dims)
    _check_dtype(f"{name}[0]", x, (torch.float8_e4m3fn,))
    return x, sf


def _unpack_fp8_operand(name: str, operand: FP8Operand, dims: int) -> FP8Operand:
    """Validate ``(x_fp8, sf)``; returns ``(x_fp8, float32 sf)``. Shapes of ``sf`` are checked later."""
    x, sf = _fp8_pair(name, operand, dims)
    return x, _float_scales(f"{name}[1]", sf, ceil_div(x.shape[-1], BLOCK))


# ---------------------------------------------------------------------------------------------------------
# Dequantisation
# ---------------------------------------------------------------------------------------------------------


def dequantize_per_token(x_fp8: torch.Tensor, sf: torch.Tensor, gran_k: int = BLOCK) -> torch.Tensor:
    """Undo a 1 x ``gran_k`` cast.

    Args:
        x_fp8: ``[..., M, K]``, float8_e4m3fn (any float dtype works).
        sf: ``[..., M, ceil(K/gran_k)]`` float32 (any strides), or int32 packed UE8M0
            ``[..., M, ceil(K/(4 gran_k))]``.

    Returns:
        float32 ``[..., M, K]``: each element times the scale of its ``gran_k``-wide block along K.
    """
    k = x_fp8.shape[-1]
    k_blocks = ceil_div(k, gran_k)
    sf = _float_scales("sf", sf, k_blocks)
    _check_shape("sf", sf, (*x_fp8.shape[:-1], k_blocks))
    return x_fp8.float() * sf.repeat_interleave(gran_k, dim=-1)[..., :k]


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


def _chunked_product_into(
    d: torch.Tensor,
    rows: RowIndex,
    load_a: Callable[[RowIndex], torch.Tensor],
    b_kn: torch.Tensor,
    c: torch.Tensor | None = None,
) -> None:
    """``d[rows] = c[rows] + A[rows] @ b_kn`` in float32, one chunk of rows at a time.

    ``load_a(idx)`` returns float32 ``[rows in idx, K]``; ``b_kn`` float32 ``[K, N]``, any strides;
    ``c``/``d`` ``[M, N]``; ``rows`` selects rows of A, ``c`` and ``d`` alike.
    """
    k, n = b_kn.shape
    for idx in _split_rows(rows, _rows_per_chunk(k, n)):
        out = load_a(idx) @ b_kn
        if c is not None:
            out += c[idx].float()
        # index_put_ (tensor rows) needs matching dtypes; for slices this is a plain copy_.
        d[idx] = out.to(d.dtype)


def _gemm_rows_into(
    d: torch.Tensor,
    rows: RowIndex,
    a_fp8: torch.Tensor,
    sfa: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None = None,
    gran_k: int = BLOCK,
) -> None:
    """``d[rows] = c[rows] + dequant(a[rows]) @ b.T`` with float32 accumulation.

    ``a_fp8 [M, K]``, ``sfa`` float32 ``[M, ceil(K/gran_k)]``, ``b`` float32 ``[N, K]`` (already
    dequantised), ``c``/``d`` ``[M, N]``; ``rows`` selects rows of ``a``, ``c`` and ``d`` alike.
    """
    _chunked_product_into(d, rows, lambda idx: dequantize_per_token(a_fp8[idx], sfa[idx], gran_k), b.t(), c)


def _product_into(
    d: torch.Tensor,
    rows: RowIndex,
    a_mk: torch.Tensor,
    b_nk: torch.Tensor,
    c: torch.Tensor | None = None,
) -> None:
    """``d[rows] = c[rows] + a_mk[rows] @ b_nk.T`` in float32: the core of every BF16 GEMM.

    ``a_mk [M, *K]`` and ``b_nk [N, *K]``: bf16 or float32 views, any strides (a transposed operand comes
    as its transposed view); their trailing dims, flattened, are the reduction. ``c`` float32 and ``d``
    ``[M, N]``; ``rows`` selects rows of ``a_mk``, ``c`` and ``d`` alike. K = 0 gives ``c`` (or 0).
    """
    # B is converted once, A chunk by chunk: only A can be as tall as the whole problem.
    b_kn = b_nk.float().flatten(1).t()
    _chunked_product_into(d, rows, lambda idx: a_mk[idx].float().flatten(1), b_kn, c)


# ---------------------------------------------------------------------------------------------------------
# Public GEMMs
# ---------------------------------------------------------------------------------------------------------


def fp8_gemm_nt(a: FP8Operand, b: FP8Operand, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + dequant(A) @ dequant(B).T`` computed in float32, written into ``d``.

    Args:
        a: ``(a_fp8 [M, K] float8_e4m3fn, sfa float32 [M, ceil(K/128)])``, 1x128 scales, any strides.
        b: ``(b_fp8 [N, K] float8_e4m3fn, sfb float32 [ceil(N/128), ceil(K/128)])``, 128x128 scales, or
            ``sfb [N, ceil(K/128)]``, 1x128 scales like A's (the 1D1D recipe of weight gradients).
        d: output ``[M, N]``, bf16 or float32; may alias ``c``.
        c: optional addend ``[M, N]`` (any float dtype, promoted to float32).
    """
    a_fp8, sfa = _unpack_fp8_operand("a", a, 2)
    b_fp8, sfb = _unpack_fp8_operand("b", b, 2)
    m, k = a_fp8.shape
    n = b_fp8.shape[0]
    _check_shape("b[0]", b_fp8, (n, k))
    _check_shape("a[1]", sfa, (m, ceil_div(k, BLOCK)))
    per_row = tuple(sfb.shape) == (n, ceil_div(k, BLOCK))
    if not per_row:
        _check_shape("b[1]", sfb, (ceil_div(n, BLOCK), ceil_div(k, BLOCK)))
    _check_shape("d", d, (m, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    if c is not None:
        _check_shape("c", c, (m, n))
    b_float = dequantize_per_token(b_fp8, sfb) if per_row else dequantize_per_block(b_fp8, sfb)
    _gemm_rows_into(d, slice(0, m), a_fp8, sfa, b_float, c)


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


def _contiguous_segments(
    grouped_layout: torch.Tensor, num_groups: int, m_total: int, use_psum_layout: bool
) -> list[RowIndex]:
    """Each group's rows in the M-grouped contiguous layout, after checking ``grouped_layout``."""
    _check_index_dtype("grouped_layout", grouped_layout)
    if use_psum_layout:
        return list(_rows_by_psum(grouped_layout, num_groups, m_total))
    _check_shape("grouped_layout", grouped_layout, (m_total,))
    return list(_rows_by_expert_id(grouped_layout, num_groups))


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
    num_groups, n = _check_grouped_b(b_fp8, sfb, a_fp8.shape[1])
    _contiguous_into(a_fp8, sfa, lambda g: dequantize_per_block(b_fp8[g], sfb[g]), num_groups, n, d, grouped_layout,
                     use_psum_layout)


def _contiguous_into(a_fp8: torch.Tensor, sfa: torch.Tensor, b_of: Callable[[int], torch.Tensor], num_groups: int,
                     n: int, d: torch.Tensor, grouped_layout: torch.Tensor, use_psum_layout: bool,
                     gran_k: int = BLOCK) -> None:
    """The contiguous grouped GEMM given expert g's dequantised B ``b_of(g)`` (float32 [N, K])."""
    m_total, k = a_fp8.shape
    _check_shape("a[1]", sfa, (m_total, ceil_div(k, gran_k)))
    _check_shape("d", d, (m_total, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    for group, rows in enumerate(_contiguous_segments(grouped_layout, num_groups, m_total, use_psum_layout)):
        if _row_count(rows) == 0:
            continue
        _gemm_rows_into(d, rows, a_fp8, sfa, b_of(group), gran_k=gran_k)


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
    _, n = _check_grouped_b(b_fp8, sfb, k)
    _check_shape("b[0]", b_fp8, (num_groups, n, k))
    _masked_into(a_fp8, sfa, lambda g: dequantize_per_block(b_fp8[g], sfb[g]), n, d, masked_m)


def _masked_into(a_fp8: torch.Tensor, sfa: torch.Tensor, b_of: Callable[[int], torch.Tensor], n: int, d: torch.Tensor,
                 masked_m: torch.Tensor, gran_k: int = BLOCK) -> None:
    """The masked grouped GEMM given expert g's dequantised B ``b_of(g)`` (float32 [N, K])."""
    num_groups, max_m, k = a_fp8.shape
    _check_shape("a[1]", sfa, (num_groups, max_m, ceil_div(k, gran_k)))
    _check_shape("d", d, (num_groups, max_m, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    _check_index_dtype("masked_m", masked_m)
    _check_shape("masked_m", masked_m, (num_groups,))
    for group, m in enumerate(masked_m.clamp(0, max_m).tolist()):
        if m == 0:
            continue
        _gemm_rows_into(d[group], slice(0, m), a_fp8[group], sfa[group], b_of(group), gran_k=gran_k)


# ---------------------------------------------------------------------------------------------------------
# FP8 x FP4 GEMMs: B e2m1 packed two per byte (int8 [..., N, K/2]) with 1x32 UE8M0 scales
# ---------------------------------------------------------------------------------------------------------

FP4Operand = tuple[torch.Tensor, torch.Tensor]


def dequantize_fp4(packed: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., N, K]`` of FP4 codes ``packed`` (int8 or uint8 ``[..., N, K/2]``, element 2i in the
    low nibble) times their 1x32 scales ``sf``: float32 ``[..., N, ceil(K/32)]`` or int32 packed UE8M0
    ``[..., N, ceil(K/128)]``, any strides."""
    _check_dtype("b[0]", packed, (torch.int8, torch.uint8))
    k = 2 * packed.shape[-1]
    if sf.dtype == torch.int32:
        sf = unpack_ue8m0(sf.contiguous(), ceil_div(k, 32))
    _check_dtype("b[1]", sf, (torch.float32, torch.int32))
    _check_shape("b[1]", sf, (*packed.shape[:-1], ceil_div(k, 32)))
    values = unpack_fp4(packed.view(torch.uint8))
    return values * sf.repeat_interleave(32, dim=-1)[..., :k]


def _unpack_fp4_operand(operand: FP4Operand, dims: int) -> torch.Tensor:
    """B of ``(packed, sf)``, dequantised."""
    if not isinstance(operand, (tuple, list)) or len(operand) != 2:
        raise TypeError(f"b: expected an (int8 packed FP4 tensor, scales) pair, got {type(operand).__name__}")
    packed, sf = operand
    _check_dims("b[0]", packed, dims)
    return dequantize_fp4(packed, sf)


def _fp4_gemm_activation(operand: FP8Operand, dims: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A of the FP8 x FP4 GEMMs: ``(e4m3 [..., M, K], float32 scales, the scales' block along K)``, from
    1x128 float32 scales ``[..., M, ceil(K/128)]`` or 1x32 UE8M0 ones: float32 ``[..., M, ceil(K/32)]``
    or int32 packed ``[..., M, ceil(K/128)]``."""
    x, sf = _fp8_pair("a", operand, dims)
    _check_dtype("a[1]", sf, (torch.float32, torch.int32))
    k = x.shape[-1]
    if sf.dtype == torch.int32:
        _check_shape("a[1]", sf, (*x.shape[:-1], ceil_div(k, BLOCK)))
        return x, unpack_ue8m0(sf, ceil_div(k, 32)), 32
    return x, sf, per_token_scale_block(sf, k)


def fp8_fp4_gemm_nt(a: FP8Operand, b: FP4Operand, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + dequant(A) @ dequant(B).T`` in float32: A ``(e4m3 [M, K], scales)`` with float32 1x128
    scales or 1x32 UE8M0 ones (float32 ``[M, ceil(K/32)]`` or packed int32 ``[M, ceil(K/128)]``), B
    ``(int8 [N, K/2], 1x32 scales)`` (see :func:`dequantize_fp4`), D bf16 or float32 ``[M, N]``."""
    a_fp8, sfa, gran_k = _fp4_gemm_activation(a, 2)
    b_float = _unpack_fp4_operand(b, 2)
    m, k = a_fp8.shape
    n = b_float.shape[0]
    _check_shape("b[0]", b[0], (n, k // 2))
    _check_shape("a[1]", sfa, (m, ceil_div(k, gran_k)))
    _check_shape("d", d, (m, n))
    _check_dtype("d", d, _OUTPUT_DTYPES)
    if c is not None:
        _check_shape("c", c, (m, n))
    _gemm_rows_into(d, slice(0, m), a_fp8, sfa, b_float, c, gran_k)


def m_grouped_fp8_fp4_gemm_nt_contiguous(a: FP8Operand, b: FP4Operand, d: torch.Tensor,
                                         grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
    """:func:`m_grouped_fp8_gemm_nt_contiguous` with B ``(int8 [G, N, K/2], 1x32 scales)`` and A's scales as
    for :func:`fp8_fp4_gemm_nt`."""
    a_fp8, sfa, gran_k = _fp4_gemm_activation(a, 2)
    b_float = _unpack_fp4_operand(b, 3)
    _check_shape("b[0]", b[0], (b_float.shape[0], b_float.shape[1], a_fp8.shape[1] // 2))
    _contiguous_into(a_fp8, sfa, lambda g: b_float[g], b_float.shape[0], b_float.shape[1], d, grouped_layout,
                     use_psum_layout, gran_k)


def m_grouped_fp8_fp4_gemm_nt_masked(a: FP8Operand, b: FP4Operand, d: torch.Tensor, masked_m: torch.Tensor,
                                     expected_m: int) -> None:
    """:func:`m_grouped_fp8_gemm_nt_masked` with B ``(int8 [G, N, K/2], 1x32 scales)`` and A's scales as for
    :func:`fp8_fp4_gemm_nt`."""
    del expected_m
    a_fp8, sfa, gran_k = _fp4_gemm_activation(a, 3)
    b_float = _unpack_fp4_operand(b, 3)
    _check_shape("b[0]", b[0], (a_fp8.shape[0], b_float.shape[1], a_fp8.shape[2] // 2))
    _masked_into(a_fp8, sfa, lambda g: b_float[g], b_float.shape[1], d, masked_m, gran_k)


# ---------------------------------------------------------------------------------------------------------
# BF16 GEMMs (DeepGEMM's letters: n = A [M, K] / B [K, N], t = A [K, M] / B [N, K])
# ---------------------------------------------------------------------------------------------------------


def _bf16_dense(layout: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None) -> None:
    _check_operand("a", a, 2)
    _check_operand("b", b, 2)
    a_mk = a if layout[0] == "n" else a.t()
    m, k = a_mk.shape
    b_nk = _b_nk_view(b, layout[1], (), k)
    n = b_nk.shape[0]
    _check_output("d", d, (m, n))
    _check_addend(c, (m, n))
    _product_into(d, slice(0, m), a_mk, b_nk, c)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + A @ B.T`` in float32, written into ``d``.

    Args:
        a: bf16 ``[M, K]``. b: bf16 ``[N, K]``. Any strides.
        d: output ``[M, N]``, bf16 or float32; may be ``c``.
        c: optional float32 addend ``[M, N]``.
    """
    _bf16_dense("nt", a, b, d, c)


def bf16_gemm_nn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + A @ B``: A bf16 ``[M, K]``, B bf16 ``[K, N]``; otherwise as ``bf16_gemm_nt``."""
    _bf16_dense("nn", a, b, d, c)


def bf16_gemm_tn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + A.T @ B``: A bf16 ``[K, M]``, B bf16 ``[K, N]``; otherwise as ``bf16_gemm_nt``."""
    _bf16_dense("tn", a, b, d, c)


def bf16_gemm_tt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + A.T @ B.T``: A bf16 ``[K, M]``, B bf16 ``[N, K]``; otherwise as ``bf16_gemm_nt``."""
    _bf16_dense("tt", a, b, d, c)


def _m_grouped_bf16_contiguous(
    b_letter: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, grouped_layout: torch.Tensor,
    use_psum_layout: bool,
) -> None:
    _check_operand("a", a, 2)
    _check_operand("b", b, 3)
    m_total, k = a.shape
    num_groups = b.shape[0]
    b_nk = _b_nk_view(b, b_letter, (num_groups,), k)
    _check_output("d", d, (m_total, b_nk.shape[1]))
    for group, rows in enumerate(_contiguous_segments(grouped_layout, num_groups, m_total, use_psum_layout)):
        if _row_count(rows):
            _product_into(d, rows, a, b_nk[group])


def m_grouped_bf16_gemm_nt_contiguous(
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, grouped_layout: torch.Tensor, use_psum_layout: bool = False
) -> None:
    """``d[rows_g] = A[rows_g] @ B[g].T`` per expert g: A bf16 ``[M_total, K]``, B bf16 ``[G, N, K]``,
    D bf16 or float32 ``[M_total, N]``; ``grouped_layout`` as for ``m_grouped_fp8_gemm_nt_contiguous``."""
    _m_grouped_bf16_contiguous("t", a, b, d, grouped_layout, use_psum_layout)


def m_grouped_bf16_gemm_nn_contiguous(
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, grouped_layout: torch.Tensor, use_psum_layout: bool = False
) -> None:
    """As ``m_grouped_bf16_gemm_nt_contiguous`` with B bf16 ``[G, K, N]``: ``d[rows_g] = A[rows_g] @ B[g]``."""
    _m_grouped_bf16_contiguous("n", a, b, d, grouped_layout, use_psum_layout)


def m_grouped_bf16_gemm_nt_masked(
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int
) -> None:
    """``d[g, :m_g] = A[g, :m_g] @ B[g].T`` with ``m_g = clamp(masked_m[g], 0, max_M)``: A bf16
    ``[G, max_M, K]``, B bf16 ``[G, N, K]``, D bf16 or float32 ``[G, max_M, N]`` (other rows untouched).
    ``expected_m`` is the kernels' tuning hint, ignored here."""
    del expected_m
    _check_operand("a", a, 3)
    _check_operand("b", b, 3)
    num_groups, max_m, k = a.shape
    b_nk = _b_nk_view(b, "t", (num_groups,), k)
    _check_output("d", d, (num_groups, max_m, b_nk.shape[1]))
    _check_index_dtype("masked_m", masked_m)
    _check_shape("masked_m", masked_m, (num_groups,))
    for group, m in enumerate(masked_m.clamp(0, max_m).tolist()):
        if m:
            _product_into(d[group], slice(0, m), a[group], b_nk[group])


def k_grouped_bf16_gemm_tn_contiguous(
    a: torch.Tensor,
    b: torch.Tensor,
    d: torch.Tensor,
    ks: Sequence[int],
    grouped_layout: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
) -> None:
    """MoE weight gradients: ``D[g] = C[g] + A_g.T @ B_g`` in float32, A_g and B_g the g-th segment of rows.

    Args:
        a: bf16 ``[sum_k, M]``. b: bf16 ``[sum_k, N]``: the experts' segments back to back.
        d: float32 ``[G, M, N]``; may be ``c``.
        ks: the G segments' lengths, multiples of 128 (0 allowed), summing to ``sum_k``.
        grouped_layout: the same lengths on the kernels' device (int32 ``[G]``); only its shape and dtype
            are checked here.
        c: optional float32 addend ``[G, M, N]``.
    """
    _check_operand("a", a, 2)
    _check_operand("b", b, 2)
    sum_k, m = a.shape
    n = b.shape[1]
    _check_shape("b", b, (sum_k, n))
    lengths = checks.k_segments(ks, sum_k, BLOCK)
    if grouped_layout is not None:
        _check_index_dtype("grouped_layout", grouped_layout)
        _check_shape("grouped_layout", grouped_layout, (len(lengths),))
    _check_output("d", d, (len(lengths), m, n), _FP32)
    _check_addend(c, (len(lengths), m, n))
    start = 0
    for group, length in enumerate(lengths):
        segment = slice(start, start + length)
        _product_into(d[group], slice(0, m), a[segment].t(), b[segment].t(), None if c is None else c[group])
        start += length


def k_grouped_fp8_segment(x: FP8Operand, rows: int, start: int, length: int) -> FP8Operand:
    """Expert segment ``[start, start + length)`` of K of a K-grouped FP8 operand: the data
    ``[rows, length]`` K-major (the experts' blocks lie back to back in ``x[0]``, contiguous) and its
    scales ``[rows, length / 128]`` (columns ``start / 128`` on of ``x[1]`` ``[rows, sum_k / 128]``)."""
    data, sf = x
    block = data.reshape(-1)[start * rows:(start + length) * rows].view(rows, length)
    return block, sf[:, start // BLOCK:(start + length) // BLOCK]


def _k_grouped_fp8_operand(name: str, operand: FP8Operand, rows: int, sum_k: int) -> FP8Operand:
    """A K-grouped operand checked: contiguous e4m3 of ``sum_k * rows`` elements, float32 scales
    ``[rows, sum_k / 128]``."""
    if not isinstance(operand, (tuple, list)) or len(operand) != 2:
        raise TypeError(f"{name}: expected a (float8_e4m3fn tensor, scales) pair, got {type(operand).__name__}")
    x, sf = operand
    checks.is_tensor(f"{name}[0]", x)
    _check_dtype(f"{name}[0]", x, (torch.float8_e4m3fn,))
    if x.numel() != sum_k * rows or not x.is_contiguous():
        raise ValueError(f"{name}[0]: expected {sum_k * rows} contiguous elements (the experts' [{rows}, k_g] "
                         f"blocks back to back), got shape {tuple(x.shape)} with strides {tuple(x.stride())}")
    checks.is_tensor(f"{name}[1]", sf)
    sf = _float_scales(f"{name}[1]", sf, sum_k // BLOCK)
    _check_shape(f"{name}[1]", sf, (rows, sum_k // BLOCK))
    return x, sf


def k_grouped_fp8_gemm_nt_contiguous(
    a: FP8Operand,
    b: FP8Operand,
    d: torch.Tensor,
    ks: Sequence[int],
    grouped_layout: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    recipe: tuple[int, int, int] = (1, 1, 128),
) -> None:
    """MoE weight gradients in FP8: ``D[g] = C[g] + dequant(A_g) @ dequant(B_g).T`` in float32.

    Args:
        a: ``(a_fp8, sfa)``: ``a_fp8`` contiguous e4m3 of ``sum_k * M`` elements (any shape) holding each
            expert's ``A_g [M, k_g]`` (K-major) back to back; ``sfa`` float32 ``[M, sum_k / 128]``, one
            scale per 1x128 block along K, any strides.
        b: ``(b_fp8, sfb)`` likewise with N.
        d: float32 ``[G, M, N]``; may be ``c``.
        ks: the G segments' lengths, multiples of 128 (0 allowed).
        grouped_layout: the same lengths on the kernels' device (int32 ``[G]``); only its shape and dtype
            are checked here.
        c: optional float32 addend ``[G, M, N]``.
        recipe: (1, 1, 128), the only one.
    """
    if tuple(recipe) != (1, 1, BLOCK):
        raise ValueError(f"recipe: expected (1, 1, 128), got {recipe!r}")
    _check_dims("d", d, 3)
    _check_dtype("d", d, _FP32)
    num_groups, m, n = d.shape
    ks = checks.k_segments(ks, None, BLOCK)
    if len(ks) != num_groups:
        raise ValueError(f"ks: expected {num_groups} lengths (d's first dim), got {len(ks)}")
    sum_k = sum(ks)
    a = _k_grouped_fp8_operand("a", a, m, sum_k)
    b = _k_grouped_fp8_operand("b", b, n, sum_k)
    if grouped_layout is not None:
        _check_index_dtype("grouped_layout", grouped_layout)
        _check_shape("grouped_layout", grouped_layout, (num_groups,))
    _check_addend(c, (num_groups, m, n))
    start = 0
    for group, length in enumerate(ks):
        a_g = dequantize_per_token(*k_grouped_fp8_segment(a, m, start, length))
        b_g = dequantize_per_token(*k_grouped_fp8_segment(b, n, start, length))
        _product_into(d[group], slice(0, m), a_g, b_g, None if c is None else c[group])
        start += length


EINSUM_EXPRESSIONS = ("bmk,bnk->mn", "bhr,hdr->bhd", "bhd,hdr->bhr")


def einsum(expr: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """``D = C + einsum(expr, A, B)`` in float32 for the expressions of ``EINSUM_EXPRESSIONS``.

    Args:
        expr: ``"bmk,bnk->mn"`` (A ``[B, M, K]``, B ``[B, N, K]``, D ``[M, N]``: reduces over b and k),
            ``"bhr,hdr->bhd"`` (A ``[B, H, R]``, B ``[H, D, R]``, D ``[B, H, D]``) or
            ``"bhd,hdr->bhr"`` (A ``[B, H, D]``, B ``[H, D, R]``, D ``[B, H, R]``); spaces are ignored.
        a, b: bf16, any strides. d: bf16 or float32; may be ``c``. c: optional float32 addend, D's shape.
    """
    expr = _einsum_expression(expr)
    _check_operand("a", a, 3)
    _check_operand("b", b, 3)
    if expr == "bmk,bnk->mn":
        batch, m, k = a.shape
        _check_shape("b", b, (batch, b.shape[1], k))
        _check_output("d", d, (m, b.shape[1]))
        _check_addend(c, tuple(d.shape))
        # [M, B, K] and [N, B, K]: the product reduces over the flattened (b, k).
        _product_into(d, slice(0, m), a.permute(1, 0, 2), b.permute(1, 0, 2), c)
        return
    batch, heads, k = a.shape
    # B is [H, D, R]: "bhr,hdr" reduces over its last dim (an [N, K] view per head), "bhd,hdr" over its middle.
    b_nk = _b_nk_view(b, "t" if expr == "bhr,hdr->bhd" else "n", (heads,), k)
    _check_output("d", d, (batch, heads, b_nk.shape[1]))
    _check_addend(c, tuple(d.shape))
    for head in range(heads):
        _product_into(d[:, head], slice(0, batch), a[:, head], b_nk[head], None if c is None else c[:, head])


FP8_EINSUM_EXPRESSIONS = ("bhr,hdr->bhd",)


def fp8_einsum(expr: str, a: FP8Operand, b: FP8Operand, d: torch.Tensor, c: torch.Tensor | None = None,
               recipe: tuple[int, int, int] = (1, 128, 128)) -> None:
    """``D = C + einsum(expr, dequant(A), dequant(B))`` in float32, one product per head.

    Args:
        expr: ``"bhr,hdr->bhd"`` (spaces ignored).
        a: ``(a_fp8 [B, H, R] float8_e4m3fn, sfa float32 [B, H, ceil(R/128)])``, 1x128 scales, any strides.
        b: ``(b_fp8 [H, D, R] float8_e4m3fn, sfb float32 [H, ceil(D/128), ceil(R/128)])``, 128x128 scales.
        d: ``[B, H, D]`` bf16 or float32; may be ``c``. c: optional float32 addend of D's shape.
        recipe: (1, 128, 128), the only one.
    """
    normal = expr.replace(" ", "") if isinstance(expr, str) else expr
    if normal not in FP8_EINSUM_EXPRESSIONS:
        raise ValueError(f"expr: expected one of {FP8_EINSUM_EXPRESSIONS}, got {expr!r}")
    if tuple(recipe) != (1, BLOCK, BLOCK):
        raise ValueError(f"recipe: expected (1, 128, 128), got {recipe!r}")
    a_fp8, sfa = _unpack_fp8_operand("a", a, 3)
    b_fp8, sfb = _unpack_fp8_operand("b", b, 3)
    batch, heads, k = a_fp8.shape
    _check_shape("a[1]", sfa, (batch, heads, ceil_div(k, BLOCK)))
    num_heads, n = _check_grouped_b(b_fp8, sfb, k)
    _check_shape("b[0]", b_fp8, (heads, n, k))
    _check_output("d", d, (batch, heads, n))
    _check_addend(c, tuple(d.shape))
    for head in range(heads):
        _gemm_rows_into(d[:, head], slice(0, batch), a_fp8[:, head], sfa[:, head],
                        dequantize_per_block(b_fp8[head], sfb[head]), None if c is None else c[:, head])


def _einsum_expression(expr: object) -> str:
    if not isinstance(expr, str):
        raise TypeError(f"expr: expected a str, one of {EINSUM_EXPRESSIONS}, got {type(expr).__name__}")
    normal = expr.replace(" ", "")
    if normal not in EINSUM_EXPRESSIONS:
        raise ValueError(f"expr: expected one of {EINSUM_EXPRESSIONS}, got {expr!r}")
    return normal


# K is cut into blocks of this many columns before the blocks are dealt out to the splits (the kernel's
# BLOCK_K), so a split's partial sums cover whole blocks.
HC_PRENORM_BLOCK_K = 64


def hc_prenorm_split_ranges(k: int, num_splits: int) -> list[slice]:
    """The K columns of each split: the ``ceil(K/64)`` blocks of 64 dealt out in order, the first
    ``blocks % num_splits`` splits one block more than the others (empty splits when blocks run out)."""
    blocks = ceil_div(k, HC_PRENORM_BLOCK_K)
    quotient, remainder = divmod(blocks, num_splits)
    ranges, start = [], 0
    for split in range(num_splits):
        stop = start + quotient + (split < remainder)
        ranges.append(slice(min(start * HC_PRENORM_BLOCK_K, k), min(stop * HC_PRENORM_BLOCK_K, k)))
        start = stop
    return ranges


def tf32_hc_prenorm_gemm(
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor, num_splits: int | None = None
) -> None:
    """The hyper-connection pre-norm GEMM: ``D = A @ B.T`` and ``sqr_sum`` = the row sums of A's squares.

    Args:
        a: bf16 ``[M, K]``. b: float32 ``[N, K]``.
        d: float32 ``[M, N]``, or ``[num_splits, M, N]`` with ``num_splits``.
        sqr_sum: float32 ``[M]``, or ``[num_splits, M]`` with ``num_splits``.
        num_splits: None, or K split that many ways (``hc_prenorm_split_ranges``): split s holds the
            partial results over its columns (0 where it has none); their sum is the whole.

    The kernels multiply on TF32 tensor cores; this runs float32 matmul (TF32 only where the caller
    enabled it).
    """
    _check_operand("a", a, 2)
    _check_operand("b", b, 2, _FP32)
    m, k = a.shape
    n = b.shape[0]
    _check_shape("b", b, (n, k))
    if num_splits is None:
        _check_output("d", d, (m, n), _FP32)
        _check_output("sqr_sum", sqr_sum, (m,), _FP32)
        d, sqr_sum, ranges = d.unsqueeze(0), sqr_sum.unsqueeze(0), [slice(0, k)]
    else:
        splits = checks.int_at_least("num_splits", num_splits, 1)
        _check_output("d", d, (splits, m, n), _FP32)
        _check_output("sqr_sum", sqr_sum, (splits, m), _FP32)
        ranges = hc_prenorm_split_ranges(k, splits)
    for split, columns in enumerate(ranges):
        _product_into(d[split], slice(0, m), a[:, columns], b[:, columns])
        for idx in _split_rows(slice(0, m), _rows_per_chunk(columns.stop - columns.start, 1)):
            sqr_sum[split, idx] = a[idx, columns].float().square().sum(-1)


# ---------------------------------------------------------------------------------------------------------
# The MoE layer (DeepGEMM's Mega MoE API)
# ---------------------------------------------------------------------------------------------------------


def swiglu(h: torch.Tensor, weights: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """The MoE layer's activation in FP32: SiLU(gate) * up * the routing weight, gate and up the two
    halves of ``h`` (with a clamp c: gate <= c, -c <= up <= c)."""
    gate, up = h.float().chunk(2, dim=-1)
    if clamp is not None:
        gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
    return torch.nn.functional.silu(gate) * up * weights.unsqueeze(-1)


def sum_over_topk(outputs: torch.Tensor, y: torch.Tensor) -> None:
    """``y`` = the FP32 sum of ``outputs [T, k, H]`` over k in ascending order, rounded to y's dtype."""
    total = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    for k in range(outputs.shape[1]):
        total += outputs[:, k]
    y.copy_(total)


def _mega_moe(y: torch.Tensor, buffer, x: torch.Tensor, l1_of: Callable[[int], torch.Tensor],
              l2_of: Callable[[int], torch.Tensor], requantise: Callable[[torch.Tensor], torch.Tensor],
              stats: torch.Tensor | None, clamp: float | None) -> None:
    """The layer expert by expert: ``x`` the tokens in float32, ``l1_of(e)`` / ``l2_of(e)`` expert e's
    weights in float32, ``requantise`` what becomes of the activation before L2."""
    num_tokens, hidden = y.shape
    experts = buffer.topk_idx[:num_tokens].long()
    weights = buffer.topk_weights[:num_tokens].float()
    outputs = torch.zeros(num_tokens, buffer.num_topk, hidden, device=y.device)
    for expert in range(buffer.num_experts):
        tokens, ks = (experts == expert).nonzero(as_tuple=True)
        if stats is not None:
            stats[expert] += tokens.numel()
        if tokens.numel() == 0:
            continue
        h = (x[tokens] @ l1_of(expert).t()).bfloat16()
        act = requantise(swiglu(h, weights[tokens, ks], clamp))
        outputs[tokens, ks] = (act @ l2_of(expert).t()).bfloat16().float()
    sum_over_topk(outputs, y)


def fp8_fp4_mega_moe(y: torch.Tensor, l1_weights: FP4Operand, l2_weights: FP4Operand, sym_buffer,
                     cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                     recipe: tuple[int, int, int] = (1, 1, 32), activation: str = "swiglu",
                     activation_clamp: float | None = None, fast_math: bool = True) -> None:
    """The MoE layer of ``moegemm.fp8_fp4_mega_moe`` from the dequantised tokens and weights, expert by
    expert in float32, the activation quantised per 1x32 with power-of-two scales."""
    del recipe, activation, fast_math
    x = dequantize_per_token(sym_buffer.x[: y.shape[0]], sym_buffer.x_sf[: y.shape[0]], 32)
    l1, l2 = dequantize_fp4(*l1_weights), dequantize_fp4(*l2_weights)

    def requantise(act: torch.Tensor) -> torch.Tensor:
        return dequantize_per_token(*per_token_cast_to_fp8(act, use_ue8m0=True, gran_k=32), 32)

    _mega_moe(y, sym_buffer, x, lambda e: l1[e], lambda e: l2[e], requantise, cumulative_local_expert_recv_stats,
              activation_clamp)


def bf16_mega_moe(y: torch.Tensor, l1_weights: torch.Tensor, l2_weights: torch.Tensor, sym_buffer,
                  cumulative_local_expert_recv_stats: torch.Tensor | None = None, activation: str = "swiglu",
                  activation_clamp: float | None = None, fast_math: bool = True) -> None:
    """The MoE layer of ``moegemm.bf16_mega_moe`` in float32, the activation rounded to BF16."""
    del activation, fast_math
    _mega_moe(y, sym_buffer, sym_buffer.x[: y.shape[0]].float(), lambda e: l1_weights[e].float(),
              lambda e: l2_weights[e].float(), lambda act: act.bfloat16().float(), cumulative_local_expert_recv_stats,
              activation_clamp)


def fp8_mqa_logits(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                   cu_seq_len_k_start: torch.Tensor, cu_seq_len_k_end: torch.Tensor, clean_logits: bool = True,
                   max_seqlen_k: int = 0, logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The lightning indexer's logits in FP32: ``logits[i, j] = sum_h w[i, h] * relu(q[i, h] . k[j])`` with
    k = kv's e4m3 rows times their scales, for ``ks[i] <= j < ke[i]``, -inf elsewhere; with
    ``max_seqlen_k`` > 0 the compressed form, column c of row i being key ``ks[i] + c`` (-inf past
    ``ke[i]`` and past the keys). ``clean_logits`` changes nothing here: every element outside a row's
    range is -inf (the GPU leaves them unwritten without it). Keys are taken in chunks, so that the
    [H, S, chunk] scores stay near 256 MB."""
    kv_fp8, kv_sf = kv
    return _mqa_logits(q.float(), kv_fp8.float() * kv_sf.float().unsqueeze(1), weights, cu_seq_len_k_start,
                       cu_seq_len_k_end, max_seqlen_k, logits_dtype)


def _dequantize_fp4_rows(packed: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """float32 rows of packed e2m1 ``[..., D/2]`` with one int32 of packed 1x32 UE8M0 scales each ``[...]``."""
    return dequantize_fp4(packed, sf.unsqueeze(-1))


def fp8_fp4_mqa_logits(q: tuple[torch.Tensor, torch.Tensor | None], kv: tuple[torch.Tensor, torch.Tensor],
                       weights: torch.Tensor, cu_seq_len_k_start: torch.Tensor, cu_seq_len_k_end: torch.Tensor,
                       clean_logits: bool = True, max_seqlen_k: int = 0,
                       logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`fp8_mqa_logits` of FP4 inputs, dequantised: q ``(int8 [S, H, D/2], int32 [S, H])`` and kv
    ``(int8 [S_kv, D/2], int32 [S_kv])``, e2m1 codes with packed 1x32 UE8M0 scales; ``(q, None)`` with
    e4m3 q takes the FP8 inputs of :func:`fp8_mqa_logits`."""
    q_values, q_sf = q
    if q_sf is None:
        return fp8_mqa_logits(q_values, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits,
                              max_seqlen_k, logits_dtype)
    return _mqa_logits(_dequantize_fp4_rows(q_values, q_sf), _dequantize_fp4_rows(*kv), weights, cu_seq_len_k_start,
                       cu_seq_len_k_end, max_seqlen_k, logits_dtype)


def _mqa_logits(queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, cu_seq_len_k_start: torch.Tensor,
                cu_seq_len_k_end: torch.Tensor, max_seqlen_k: int, logits_dtype: torch.dtype) -> torch.Tensor:
    """The logits of float32 queries [S, H, D] and keys [S_kv, D]."""
    seq_len, heads, _ = queries.shape
    seq_len_kv = keys.shape[0]
    w = weights.float().t()  # [H, S]
    ks, ke = cu_seq_len_k_start.long(), cu_seq_len_k_end.long()
    full = torch.full((seq_len, seq_len_kv), float("-inf"), device=queries.device)
    chunk = max(1, 2**26 // max(1, seq_len * heads))
    for begin in range(0, seq_len_kv, chunk):
        end = min(begin + chunk, seq_len_kv)
        scores = torch.einsum("shd,nd->hsn", queries, keys[begin:end]).relu()
        logits = torch.einsum("hsn,hs->sn", scores, w)
        columns = torch.arange(begin, end, device=queries.device)
        inside = (columns[None, :] >= ks[:, None]) & (columns[None, :] < ke[:, None])
        full[:, begin:end] = logits.masked_fill(~inside, float("-inf"))
    if max_seqlen_k > 0:
        columns = ks[:, None] + torch.arange(max_seqlen_k, device=queries.device)[None, :]
        valid = (columns < ke[:, None]) & (columns >= 0) & (columns < seq_len_kv)
        full = full.gather(1, columns.clamp(0, max(seq_len_kv - 1, 0))) if seq_len_kv else full.new_empty(
            seq_len, max_seqlen_k)
        full = full.masked_fill(~valid, float("-inf"))
    return full.to(logits_dtype)


def _paged_keys(kv_cache: torch.Tensor, fp4: bool = False) -> torch.Tensor:
    """The keys of a paged cache (uint8 [pages, block_kv, 1, R + 4]: per page the block_kv rows of R
    bytes, then their block_kv 4-byte scales: e4m3 rows and fp32 scales, or with ``fp4`` packed e2m1
    rows and int32 packed 1x32 UE8M0 scales) as float32 [pages, block_kv, D], rows times scales."""
    pages, block_kv, _, row_bytes = kv_cache.shape
    row = row_bytes - 4
    flat = kv_cache.reshape(pages, block_kv * row_bytes)
    values = flat[:, :block_kv * row].contiguous().view(pages, block_kv, row)
    if fp4:
        return _dequantize_fp4_rows(values, flat[:, block_kv * row:].contiguous().view(torch.int32))
    scales = flat[:, block_kv * row:].contiguous().view(torch.float32)
    return values.view(torch.float8_e4m3fn).float() * scales.unsqueeze(-1)


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, schedule_meta: torch.Tensor | None, max_context_len: int,
                         clean_logits: bool = False) -> torch.Tensor:
    """The indexer's logits of decode over a paged cache, in FP32 ``[B * next_n, max_context_len]``: row
    b * next_n + t holds, for each key j < ``context_lens[b, t]``, ``sum_h w[row, h] * relu(q[b, t, h] .
    k_b[j])``, key j of batch b being row j % block_kv of page ``block_table[b, j // block_kv]``; -inf
    elsewhere (``clean_logits`` and ``schedule_meta`` change nothing here)."""
    return _paged_logits(q.float(), _paged_keys(kv_cache), weights, context_lens, block_table, max_context_len)


def fp8_fp4_paged_mqa_logits(q: tuple[torch.Tensor, torch.Tensor | None], kv_cache: torch.Tensor,
                             weights: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
                             schedule_meta: torch.Tensor | None, max_context_len: int,
                             clean_logits: bool = False) -> torch.Tensor:
    """:func:`fp8_paged_mqa_logits` of FP4 inputs, dequantised: q ``(int8 [B, next_n, H, D/2], int32
    [B, next_n, H])``, the cache uint8 [pages, block_kv, 1, D/2 + 4] (packed e2m1 rows, then int32
    scales); ``(q, None)`` with e4m3 q takes the FP8 inputs."""
    q_values, q_sf = q
    if q_sf is None:
        return fp8_paged_mqa_logits(q_values, kv_cache, weights, context_lens, block_table, schedule_meta,
                                    max_context_len, clean_logits)
    return _paged_logits(_dequantize_fp4_rows(q_values, q_sf), _paged_keys(kv_cache, fp4=True), weights, context_lens,
                         block_table, max_context_len)


def _paged_logits(queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                  block_table: torch.Tensor, max_context_len: int) -> torch.Tensor:
    """The paged logits of float32 queries [B, next_n, H, D] and keys [pages, block_kv, D]."""
    batch, next_n, _, _ = queries.shape
    pages, block_kv = keys.shape[:2]
    logits = torch.full((batch * next_n, max_context_len), float("-inf"), device=queries.device)
    table_pages = min(block_table.shape[1], -(-max_context_len // block_kv))
    lens = context_lens.clamp(min=0, max=min(max_context_len, table_pages * block_kv)).tolist()
    for b in range(batch):
        length = max(lens[b])
        if length == 0:
            continue
        table = block_table[b, :-(-length // block_kv)].long().clamp(0, pages - 1)
        k = keys[table].reshape(-1, keys.shape[-1])[:length]
        scores = torch.einsum("thd,nd->thn", queries[b], k).relu()
        rows = torch.einsum("thn,th->tn", scores, weights[b * next_n:(b + 1) * next_n].float())
        for t in range(next_n):
            logits[b * next_n + t, :lens[b][t]] = rows[t, :lens[b][t]]
    return logits
