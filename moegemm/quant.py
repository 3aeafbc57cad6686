"""Quantisation: the FP8 and FP4 casts with fine-grained scales, scale-factor layouts, UE8M0 and FP4
packing, the FP8 transpose.

Everything here is plain PyTorch and works on CPU and CUDA tensors alike, except that the per-token and
per-block FP8 casts of 2-D bf16/fp32 CUDA tensors on SM90 GPUs run one CUDA kernel (moegemm.kernels.fp8_cast)
with bit-identical results, and the FP8 transpose one of its own (moegemm.kernels.fp8_transpose); the
PyTorch paths, written as a handful of whole-tensor ops (no Python loops over rows or groups), are their
reference. Importing this module never touches CUDA.

Scale-factor conventions (DeepGEMM's):

* FP8 values are ``torch.float8_e4m3fn`` (max finite magnitude 448); FP4 values are e2m1 codes packed
  two per byte (max magnitude 6), the element of even index in the low nibble.
* A "1x128" (per-token) scale covers 128 consecutive elements of one row along K; a "128x128" (per-block)
  scale covers a 128x128 tile; a "128x1" (per-channel) scale covers 128 consecutive rows of one column.
  The (1, 32) recipe's per-token scales cover 32 elements. Ragged edges (sizes that are not multiples of
  the block) get a scale computed over the partial block.
* Dequantisation is ``x_fp8.float() * sf`` broadcast over each block.
* Per-token scales come out in the layout the GEMM kernels read (MN-major, the MN stride padded to
  16 bytes), so they feed the GEMMs without a copy; per-block scales are contiguous, as the kernels
  read them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .device import is_sm90
from .intmath import align, ceil_div, get_tma_aligned_size

BLOCK = 128
FINE_GRANULARITIES = (32, BLOCK)  # elements per per-token scale along K: the (1, 32) and (1, 128) recipes
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
# Floor on a block's amax so all-zero blocks get a finite, non-zero scale instead of 0 (which would make
# x / sf produce NaN).
AMAX_FLOOR = 1e-4


# ---- scale-factor layouts -------------------------------------------------------------------------


def _mn_major_strides(shape: torch.Size, element_size: int) -> tuple[int, ...]:
    """Strides of an MN-major, TMA-aligned tensor of ``shape`` ([MN, K'] or [G, MN, K'])."""
    mn, k = shape[-2], shape[-1]
    aligned_mn = get_tma_aligned_size(mn, element_size)
    if len(shape) == 2:
        return (1, aligned_mn)
    return (aligned_mn * k, 1, aligned_mn)


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Return ``sf`` with identical shape and values but MN-major, TMA-aligned storage.

    Args:
        sf: scale factors ``[MN, K']`` or ``[G, MN, K']``, float32 (or int32 holding packed UE8M0), any
            strides.

    Returns:
        A tensor equal to ``sf`` whose MN stride is 1, whose K' stride is ``get_tma_aligned_size(MN, 4)``
        and (3-D) whose group stride is that times K'. ``sf`` itself is returned when it already has
        exactly these strides; otherwise the data is copied once.
    """
    if sf.dim() not in (2, 3):
        raise ValueError(f"sf: expected a 2-D [MN, K'] or 3-D [G, MN, K'] tensor, got shape {tuple(sf.shape)}")
    strides = _mn_major_strides(sf.shape, sf.element_size())
    if sf.stride() == strides:
        return sf
    out = torch.empty_strided(sf.shape, strides, dtype=sf.dtype, device=sf.device)
    return out.copy_(sf)


def _normalize_recipe(recipe: tuple[int, ...], is_sfa: bool) -> tuple[int, int]:
    """Map a 2-tuple ``(gran_mn, gran_k)`` or DeepGEMM 3-tuple ``(gran_m, gran_n, gran_k)`` to 2-tuple."""
    recipe = tuple(int(r) for r in recipe)
    if len(recipe) == 3:
        recipe = (recipe[0] if is_sfa else recipe[1], recipe[2])
    if recipe not in ((1, BLOCK), (BLOCK, BLOCK), (1, 32)):
        raise ValueError(
            f"recipe: expected (1, 128), (128, 128), (1, 32) or a DeepGEMM 3-tuple such as (1, 128, 128); "
            f"resolved to {recipe} (is_sfa={is_sfa})"
        )
    return recipe


def transform_sf_into_required_layout(
    sf: torch.Tensor,
    mn: int,
    k: int,
    recipe: tuple[int, ...],
    num_groups: int | None = None,
    is_sfa: bool = False,
) -> torch.Tensor:
    """Bring scale factors into the layout the SM90 kernels read.

    Args:
        sf: float32 ``[mn_blocks, ceil(k/128)]`` (or ``[num_groups, mn_blocks, ceil(k/128)]``), any strides;
            or int32 packed UE8M0 with last dim ``ceil(ceil(k/128) / 4)``, which is unpacked first.
            ``mn_blocks`` is ``mn`` for recipe (1, 128) and ``ceil(mn/128)`` for (128, 128).
        mn: rows of the scaled operand (M for A, N for B).
        k: reduction length of the scaled operand.
        recipe: ``(1, 128)`` per-token, ``(128, 128)`` per-block, ``(1, 32)`` the FP4 weights' UE8M0
            scales (see :func:`packed_ue8m0_mn_major`, which this returns), or a DeepGEMM 3-tuple
            ``(gran_m, gran_n, gran_k)`` from which ``gran_m`` (A) or ``gran_n`` (B) is picked by ``is_sfa``.
        num_groups: number of groups for a 3-D ``sf``; ``None`` for 2-D.
        is_sfa: whether ``sf`` scales the A operand (only used with a 3-tuple recipe).

    Returns:
        float32, same logical shape as the unpacked ``sf``. (1, 128): MN-major and TMA-aligned
        (see :func:`get_mn_major_tma_aligned_tensor`). (128, 128): contiguous.
    """
    gran_mn, gran_k = _normalize_recipe(recipe, is_sfa)
    if gran_k == 32:
        return packed_ue8m0_mn_major(sf, mn, k, num_groups)
    mn_blocks = mn if gran_mn == 1 else ceil_div(mn, gran_mn)
    k_blocks = ceil_div(k, gran_k)
    lead = () if num_groups is None else (num_groups,)

    if sf.dtype == torch.int32:
        expected = (*lead, mn_blocks, ceil_div(k_blocks, 4))
    elif sf.dtype == torch.float32:
        expected = (*lead, mn_blocks, k_blocks)
    else:
        raise TypeError(f"sf: expected dtype torch.float32 or torch.int32 (packed UE8M0), got {sf.dtype}")
    if tuple(sf.shape) != expected:
        raise ValueError(f"sf: expected shape {expected} (mn={mn}, k={k}, recipe={(gran_mn, gran_k)}, "
                         f"num_groups={num_groups}, dtype={sf.dtype}), got {tuple(sf.shape)}")

    if sf.dtype == torch.int32:
        sf = unpack_ue8m0(sf, k_blocks)
    if gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(sf)
    return sf.contiguous()


def packed_ue8m0_mn_major(sf: torch.Tensor, mn: int, k: int, num_groups: int | None = None) -> torch.Tensor:
    """1x32 UE8M0 scales in the layout the FP8 x FP4 kernels read: int32 ``[..., mn, ceil(k/128)]``, each
    element the four exponents of a 128-wide block (byte i: the i-th 1x32 block), MN-major with the
    MN stride rounded up to 4 elements (DeepGEMM's packed layout).

    Args:
        sf: float32 ``[..., mn, ceil(k/32)]`` powers of two (the exponent bits are taken, the mantissa
            ignored), or int32 ``[..., mn, ceil(k/128)]`` already packed (:func:`pack_ue8m0`), any strides.
    Returns ``sf`` itself when it already is in that layout."""
    lead = () if num_groups is None else (num_groups,)
    k_blocks = ceil_div(k, BLOCK)
    if sf.dtype == torch.float32:
        if tuple(sf.shape) != (*lead, mn, ceil_div(k, 32)):
            raise ValueError(f"sf: expected float32 {(*lead, mn, ceil_div(k, 32))} (1x32 scales), got "
                             f"{tuple(sf.shape)}")
        sf = ue8m0_exponents(sf, k).to(torch.uint8).contiguous().view(torch.int32)
    elif sf.dtype != torch.int32 or tuple(sf.shape) != (*lead, mn, k_blocks):
        raise ValueError(f"sf: expected int32 {(*lead, mn, k_blocks)} (packed 1x32 UE8M0) or float32 "
                         f"{(*lead, mn, ceil_div(k, 32))}, got {sf.dtype} {tuple(sf.shape)}")
    return get_mn_major_tma_aligned_tensor(sf)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as uint8, little-endian, from a copy with unit strides where needed: contiguous()
    keeps a size-1 dimension's odd stride (an M = 1 scale tensor's), which view() refuses."""
    if t.stride(-1) != 1 or not t.is_contiguous():
        t = t.new_empty(t.shape).copy_(t)
    return t.view(torch.uint8)


def per_token_scale_block(sf: torch.Tensor, k: int) -> int:
    """The elements along K one per-token scale covers, by the scales' dtype and shape: 32 for int32
    (packed UE8M0 of 1x32 blocks) or float32 with ceil(K/32) columns, else 128 (the two agree for
    K <= 32, where either is one block)."""
    if sf.dtype == torch.int32:
        return 32
    return 32 if sf.shape[-1] == ceil_div(k, 32) != ceil_div(k, BLOCK) else BLOCK


def ue8m0_exponents(sf: torch.Tensor, k: int) -> torch.Tensor:
    """The biased exponents (int32 ``[..., 4 * ceil(k/128)]``, 0 past the last 1x32 block) of 1x32 UE8M0
    scales: float32 ``[..., ceil(k/32)]`` powers of two (their exponent bits; the mantissa is ignored) or
    int32 ``[..., ceil(k/128)]`` packed four per element (:func:`pack_ue8m0`)."""
    k_blocks = ceil_div(k, BLOCK)
    if sf.dtype == torch.int32:
        return _as_bytes(sf).to(torch.int32)
    exponents = (sf.view(torch.int32) >> 23) & 0xFF
    return F.pad(exponents, (0, 4 * k_blocks - exponents.shape[-1]))


def fold_1x32_scales(x: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values with UE8M0 scales per 1x32 as FP8 values with one float32 scale per 1x128: each
    128-wide block's values times 2^(their 1x32 exponent - the block's largest), the block's scale
    2^(largest - 127) (0 for exponent 0). Exact while the shifted values stay in e4m3's normal range
    (>= 2^-6); smaller ones round to nearest even, an error below 2^-10 of the block's scale. This is
    how the FP8 x FP4 GEMMs take A's (1, 32) recipe. On an SM90 GPU one CUDA kernel
    (moegemm.kernels.fp8_fold), bit-identical to the torch path.

    Args:
        x: float8_e4m3fn ``[..., M, K]`` (2-D or 3-D), K a multiple of 32.
        sf: float32 ``[..., M, K/32]`` powers of two (their exponent bits are read), or int32
            ``[..., M, ceil(K/128)]`` packed UE8M0 (:func:`pack_ue8m0`); any strides.

    Returns:
        ``(float8_e4m3fn [..., M, K] contiguous, float32 [..., M, ceil(K/128)])``, the scales MN-major and
        TMA-aligned (:func:`get_mn_major_tma_aligned_tensor`), as the GEMMs read them.
    """
    if _use_fold_kernel(x):
        from .kernels import fp8_fold

        return fp8_fold.fold(x, sf)
    return _fold_1x32_scales_torch(x, sf)


def _use_fold_kernel(x: torch.Tensor) -> bool:
    """Whether the SM90 fold kernel takes ``x``: 16-byte aligned rows with unit inner stride, 2-D or
    3-D, on an SM90 GPU outside torch.compile tracing."""
    if not x.is_cuda or x.dim() not in (2, 3) or x.stride(-1) != 1 or x.shape[-1] % 32:
        return False
    aligned = x.data_ptr() % 16 == 0 and all(stride % 16 == 0 for stride in x.stride()[:-1])
    return aligned and is_sm90(x.device) and not torch.compiler.is_compiling()


def _fold_1x32_scales_torch(x: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of :func:`fold_1x32_scales`: the reference of the kernel."""
    k = x.shape[-1]
    exponents = ue8m0_exponents(sf, k).unflatten(-1, (ceil_div(k, BLOCK), 4))
    top = exponents.amax(-1)
    # Exact powers of two; a shift past -126 leaves no e4m3 value above zero anyway.
    shift = (exponents - top.unsqueeze(-1)).clamp(min=-126).flatten(-2)[..., :ceil_div(k, 32)]
    factor = ((shift + 127) << 23).view(torch.float32).repeat_interleave(32, dim=-1)[..., :k]
    folded = (x.float() * factor).to(torch.float8_e4m3fn)
    scale = torch.where(top > 0, top << 23, 0).view(torch.float32)
    return folded, get_mn_major_tma_aligned_tensor(scale)


# ---- fp8 casts ------------------------------------------------------------------------------------


def _ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``x`` for positive, normal float32 ``x`` (exact, elementwise)."""
    bits = x.view(torch.int32)
    # Adding an all-ones mantissa carries into the exponent unless the mantissa is already zero, so masking
    # the mantissa off afterwards rounds up exactly; exp2(ceil(log2(x))) can land one ulp low.
    return ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)


def _scale_from_amax(amax: torch.Tensor, use_ue8m0: bool, max_value: float = FP8_E4M3_MAX) -> torch.Tensor:
    """Per-block amax (any float dtype) -> float32 scale such that ``amax / scale <= max_value``."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    # A Python-scalar divisor makes CUDA multiply by its reciprocal (off by an ulp from the CPU result);
    # a 0-dim device tensor keeps the division correctly rounded on every device.
    sf = amax / amax.new_full((), max_value)
    return _ceil_pow2(sf) if use_ue8m0 else sf


def _check_cast_input(name: str, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` checked, and detached: quantised copies never carry autograd history (weights that
    require grad are what these casts are first used on)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        raise ValueError(f"{name}: expected a {' or '.join(map(str, dims))}-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.element_size() < 2:
        raise TypeError(f"{name}: expected a 16- or 32-bit float dtype, got {x.dtype}")
    return x.detach()


def _pad_dims(x: torch.Tensor, dims: tuple[int, ...], multiple: int = BLOCK) -> torch.Tensor:
    """Zero-pad the given negative dims of ``x`` up to multiples of ``multiple`` (no copy when already
    aligned)."""
    pad = [0] * (2 * max(-d for d in dims))
    for d in dims:
        # F.pad lists (left, right) pairs starting from the last dim.
        pad[2 * (-d - 1) + 1] = align(x.shape[d], multiple) - x.shape[d]
    return F.pad(x, pad) if any(pad) else x


def _abs_max(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """max |x| over ``dim`` in one reduction (no |x| temporary), in x's dtype (exact)."""
    return torch.linalg.vector_norm(x, ord=math.inf, dim=dim)


def _divide_to_fp8(x: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """``(x / sf).to(float8_e4m3fn)`` as one kernel: the quotient is computed in float32 (type promotion
    with the float32 ``sf``) and rounded to FP8 on store, so no float32 temporary is written."""
    out = torch.empty(torch.broadcast_shapes(x.shape, sf.shape), dtype=torch.float8_e4m3fn, device=x.device)
    return torch.div(x, sf, out=out)


def _use_cast_kernel(x: torch.Tensor) -> bool:
    """Whether the SM90 cast kernel (moegemm.kernels.fp8_cast) handles ``x``: a 2-D bf16/fp32 CUDA tensor
    with unit inner stride on an SM90 GPU, outside torch.compile tracing. Everything else takes the torch path."""
    return (x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float32) and x.stride(1) == 1
            and is_sm90(x.device) and not torch.compiler.is_compiling())


def _cast(x: torch.Tensor, use_ue8m0: bool, per_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token or per-block cast: the SM90 kernel where it applies, else the torch path."""
    x = _check_cast_input("x", x, (2, 3))
    if _use_cast_kernel(x):
        from .kernels import fp8_cast

        return (fp8_cast.per_block_cast if per_block else fp8_cast.per_token_cast)(x, use_ue8m0)
    return (_per_block_cast_torch if per_block else _per_token_cast_torch)(x, use_ue8m0)


def _check_gran_k(gran_k: int) -> None:
    if isinstance(gran_k, bool) or not isinstance(gran_k, int) or gran_k not in FINE_GRANULARITIES:
        raise ValueError(f"gran_k: expected one of {FINE_GRANULARITIES}, got {gran_k!r}")


def _check_packing(use_ue8m0: bool, use_packed_ue8m0: bool) -> None:
    if use_packed_ue8m0 and not use_ue8m0:
        raise ValueError("use_packed_ue8m0: packed UE8M0 scales need use_ue8m0=True (powers of two)")


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = BLOCK,
                          use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise with one scale per 1 x ``gran_k`` block of each row.

    Args:
        x: ``[M, K]`` or ``[G, M, K]``, bf16/fp16/fp32; K need not be a multiple of ``gran_k``.
        use_ue8m0: round every scale up to a power of two.
        gran_k: elements per scale along K: 128 (the FP8 GEMMs' recipe) or 32 (the (1, 32) UE8M0 recipe).
        use_packed_ue8m0: return the scales as UE8M0 bytes packed four per int32 (:func:`pack_ue8m0`);
            needs ``use_ue8m0``.

    Returns:
        ``(x_fp8, sf)``: ``x_fp8`` float8_e4m3fn, same shape as ``x``, contiguous. ``sf`` float32
        ``[M, ceil(K/gran_k)]`` (or ``[G, M, ...]``); at ``gran_k`` 128 in the GEMM kernels' layout:
        M-major, its K' stride ``get_tma_aligned_size(M, 4)`` (see :func:`get_mn_major_tma_aligned_tensor`),
        otherwise contiguous. Packed: int32 ``[M, ceil(ceil(K/gran_k)/4)]``, contiguous.

    At ``gran_k`` 128 without packing, a 2-D bf16/fp32 CUDA tensor with unit inner stride on an SM90 GPU
    runs one CUDA kernel with identical results (then ``x_fp8`` and ``sf`` are views of one allocation);
    anything else runs in PyTorch.
    """
    _check_gran_k(gran_k)
    _check_packing(use_ue8m0, use_packed_ue8m0)
    if gran_k == BLOCK and not use_packed_ue8m0:
        return _cast(x, use_ue8m0, per_block=False)
    x = _check_cast_input("x", x, (2, 3))
    x_fp8, sf = _per_token_cast_torch(x, use_ue8m0, gran_k)
    # The scales are powers of two by construction (UE8M0 rounds them up): packed unchecked, so the
    # cast captures into a CUDA graph.
    return x_fp8, _pack_exponents(sf) if use_packed_ue8m0 else sf


def _per_token_blocks(x: torch.Tensor, gran_k: int, max_value: float,
                      use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` zero-padded and viewed as ``[..., ceil(K/gran_k), gran_k]`` blocks, and each block's
    float32 scale (contiguous) for values up to ``max_value``."""
    padded = _pad_dims(x, (-1,), gran_k)
    blocks = padded.reshape(*x.shape[:-1], padded.shape[-1] // gran_k, gran_k)
    return blocks, _scale_from_amax(_abs_max(blocks, -1), use_ue8m0, max_value)


def _per_token_cast_torch(x: torch.Tensor, use_ue8m0: bool, gran_k: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of :func:`per_token_cast_to_fp8`: the reference of the kernel. The
    scales of 1x128 blocks come in the GEMM kernels' M-major layout, those of 1x32 blocks contiguous."""
    blocks, sf = _per_token_blocks(x, gran_k, FP8_E4M3_MAX, use_ue8m0)
    x_fp8 = _divide_to_fp8(blocks, sf.unsqueeze(-1))
    x_fp8 = x_fp8.flatten(-2)[..., : x.shape[-1]].contiguous()
    return x_fp8, get_mn_major_tma_aligned_tensor(sf) if gran_k == BLOCK else sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise with one scale per 128x128 tile.

    Args:
        x: ``[N, K]`` or ``[G, N, K]``, bf16/fp16/fp32; N and K need not be multiples of 128.
        use_ue8m0: round every scale up to a power of two.

    Returns:
        ``(x_fp8, sf)``: ``x_fp8`` float8_e4m3fn, same shape as ``x``, contiguous;
        ``sf`` float32 ``[ceil(N/128), ceil(K/128)]`` (or with leading G), contiguous.

    A 2-D bf16/fp32 CUDA tensor with unit inner stride on an SM90 GPU runs one CUDA kernel with identical
    results (then ``x_fp8`` and ``sf`` are views of one allocation); anything else runs in PyTorch.
    """
    return _cast(x, use_ue8m0, per_block=True)


def _per_block_cast_torch(x: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of :func:`per_block_cast_to_fp8`: the reference of the kernel."""
    n, k = x.shape[-2:]
    padded = _pad_dims(x, (-2, -1))
    blocks = padded.reshape(*x.shape[:-2], padded.shape[-2] // BLOCK, BLOCK, padded.shape[-1] // BLOCK, BLOCK)
    sf = _scale_from_amax(_abs_max(blocks, (-3, -1)), use_ue8m0)
    x_fp8 = _divide_to_fp8(blocks, sf[..., :, None, :, None])
    return x_fp8.view(padded.shape)[..., :n, :k].contiguous(), sf


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise with one scale per 128x1 block (128 consecutive rows of one column).

    Used for K-grouped GEMMs, where the reduction dim K runs along the rows of ``x``.

    Args:
        x: ``[M, N]`` (or ``[G, M, N]``), bf16/fp16/fp32; M need not be a multiple of 128.
        use_ue8m0: round every scale up to a power of two.

    Returns:
        ``(x_fp8, sf)``: ``x_fp8`` float8_e4m3fn, same shape as ``x``, contiguous;
        ``sf`` float32 ``[ceil(M/128), N]`` (or with leading G), contiguous.
    """
    x = _check_cast_input("x", x, (2, 3))
    m = x.shape[-2]
    padded = _pad_dims(x, (-2,))
    blocks = padded.reshape(*x.shape[:-2], padded.shape[-2] // BLOCK, BLOCK, x.shape[-1])
    sf = _scale_from_amax(_abs_max(blocks, -2), use_ue8m0)
    x_fp8 = _divide_to_fp8(blocks, sf.unsqueeze(-2))
    return x_fp8.view(padded.shape)[..., :m, :].contiguous(), sf


# ---- transpose ------------------------------------------------------------------------------------


def transpose_fp8(x: torch.Tensor, sf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transpose FP8 data held MN-major into the K-major layout the FP8 GEMMs read (Hopper's FP8
    WGMMA takes K-major operands only), e.g. a weight ``W [N, K]`` into ``W^T [K, N]`` for the
    data-gradient GEMM.

    Args:
        x: float8_e4m3fn ``[R, C]`` or ``[G, R, C]``, any strides.
        sf: None, or x's block scales as a grid over its last two dims (``[ceil(R/br), ceil(C/bc)]``,
            or with leading G), e.g. the 128x128 scales of :func:`per_block_cast_to_fp8`.

    Returns:
        ``(x_t, sf_t)``: ``x_t`` ``[C, R]`` (or ``[G, C, R]``) contiguous, ``x_t[..., c, r] = x[..., r, c]``;
        ``sf_t`` the grid transposed, contiguous (x_t's scales for blocks of bc x br), or None.

    On an SM90 GPU with R and C multiples of 4 and 4-byte aligned rows, x moves through one CUDA
    kernel (moegemm.kernels.fp8_transpose) at memory speed; anything else runs in PyTorch, bit for bit
    the same.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float8_e4m3fn or x.dim() not in (2, 3):
        raise ValueError(f"x: expected a 2-D or 3-D float8_e4m3fn tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if sf is not None:
        if not isinstance(sf, torch.Tensor) or sf.dim() != x.dim() or sf.shape[:-2] != x.shape[:-2]:
            raise ValueError(f"sf: expected x's block scales, a {x.dim()}-D tensor with leading dims "
                             f"{tuple(x.shape[:-2])}, got {getattr(sf, 'dtype', type(sf).__name__)} of shape "
                             f"{tuple(getattr(sf, 'shape', ()))}")
        sf = sf.mT.contiguous()
    x = x.detach()
    if x.numel() and _use_transpose_kernel(x):
        from .kernels import fp8_transpose

        with torch.cuda.device(x.device):
            return fp8_transpose.transpose(x), sf
    return x.mT.contiguous(), sf


def _use_transpose_kernel(x: torch.Tensor) -> bool:
    if not (x.is_cuda and is_sm90(x.device) and not torch.compiler.is_compiling()):
        return False
    from .kernels import fp8_transpose

    return fp8_transpose.handles(x)


# ---- ue8m0 packing --------------------------------------------------------------------------------


def pack_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales into UE8M0 bytes, four per int32.

    Args:
        sf: float32 ``[..., K']``; every value must be a positive, normal power of two.

    Returns:
        int32 ``[..., ceil(K'/4)]``, contiguous. Byte ``i`` (little-endian, byte 0 least significant) of
        element ``j`` holds the biased exponent (float bits 23..30) of ``sf[..., 4j+i]``; padding bytes are 0.

    Raises:
        ValueError: if ``sf`` is not float32 or holds a value that is not a positive power of two.
    """
    if sf.dtype != torch.float32 or sf.dim() == 0:
        raise ValueError(f"sf: expected a float32 tensor of at least 1 dim, got {sf.dtype} {sf.dim()}-D")
    bits = sf.view(torch.int32)
    exponent = bits >> 23
    # bits > 0 rejects negatives, +-0; a zero mantissa rejects non-powers and subnormals; 255 is inf/NaN.
    valid = (bits > 0) & ((bits & 0x007FFFFF) == 0) & (exponent < 255)
    if not bool(valid.all()):
        bad = sf[~valid].flatten()[:4].tolist()
        raise ValueError(f"sf: expected only positive powers of two (UE8M0 packing), got e.g. {bad}")
    return _pack_exponents(sf)


def _pack_exponents(sf: torch.Tensor) -> torch.Tensor:
    """:func:`pack_ue8m0` without the check, which reads the GPU back: for scales that are powers of two
    by construction, also under CUDA-graph capture."""
    k = sf.shape[-1]
    exponent = F.pad((sf.view(torch.int32) >> 23).to(torch.uint8), (0, align(k, 4) - k))
    # Reinterpreting 4 consecutive bytes as one int32 gives exactly the little-endian packing (x86, Arm
    # and NVIDIA GPUs are all little-endian) without overflowing a signed shift for exponents >= 128.
    return exponent.contiguous().view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`.

    Args:
        packed: int32 ``[..., ceil(k/4)]``.
        k: number of scales per row to recover.

    Returns:
        float32 ``[..., k]``, contiguous; biased exponent ``e`` becomes ``2**(e - 127)`` (0 becomes 0.0).
    """
    if packed.dtype != torch.int32 or packed.dim() == 0:
        raise ValueError(f"packed: expected an int32 tensor of at least 1 dim, got {packed.dtype}")
    if k < 0 or ceil_div(k, 4) != packed.shape[-1]:
        raise ValueError(f"packed: expected last dim ceil(k/4) = {ceil_div(k, 4)}, got {packed.shape[-1]}")
    exponent = _as_bytes(packed)[..., :k]
    return (exponent.to(torch.int32) << 23).view(torch.float32)


# ---- fp4 (e2m1) packing ---------------------------------------------------------------------------

FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@functools.cache
def _fp4_rounding_bounds(device: torch.device, dtype: torch.dtype, ties_to_even: bool = True) -> torch.Tensor:
    """Bucket boundaries for rounding to the nearest e2m1 magnitude (7 values, ``dtype``): ties to the
    even code, or (``ties_to_even`` False) to the smaller magnitude.

    bucketize(right=False) sends a value equal to a boundary to the lower code. That is the even code for
    midpoints 0.25, 1.25, 2.5 and 5; for 0.75, 1.75 and 3.5 the even code is the upper one, so to round
    ties to even those boundaries are moved one ulp down.
    """
    mags = torch.tensor(FP4_E2M1_MAGNITUDES, dtype=dtype)
    mids = (mags[:-1] + mags[1:]) / 2
    if not ties_to_even:
        return mids.to(device)
    lower_is_odd = torch.arange(7) % 2 == 1
    bounds = torch.where(lower_is_odd, torch.nextafter(mids, torch.zeros_like(mids)), mids)
    return bounds.to(device)


@functools.cache
def _fp4_decode_table(device: torch.device) -> torch.Tensor:
    """float32 [16]: value of each 4-bit code (bit 3 = sign, so code 8 is -0.0)."""
    mags = torch.tensor(FP4_E2M1_MAGNITUDES, dtype=torch.float32)
    return torch.cat([mags, -mags]).to(device)


def pack_fp4(x: torch.Tensor) -> torch.Tensor:
    """Round to FP4 e2m1 and pack two values per byte.

    Args:
        x: float tensor ``[..., K]``, K even.

    Returns:
        uint8 ``[..., K // 2]``. Each magnitude rounds to the nearest of {0, 0.5, 1, 1.5, 2, 3, 4, 6}
        (ties to the even code, saturating at 6); bit 3 of a nibble is the sign (taken from the sign bit,
        so -0.0 and small negatives become code 8). Element ``2j`` goes to the low nibble, ``2j+1`` to the
        high nibble.
    """
    if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x: expected a float tensor with an even last dim, got {x.dtype} {tuple(x.shape)}")
    # Compare in float64 for float64 input so no value is rounded onto a boundary before bucketing.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    magnitude = x.abs().to(dtype)
    code = torch.bucketize(magnitude, _fp4_rounding_bounds(x.device, dtype)).to(torch.uint8)
    code = code | (torch.signbit(x).to(torch.uint8) << 3)
    return code[..., 0::2] | (code[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``[..., K']`` -> float32 ``[..., 2*K']``."""
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise ValueError(f"packed: expected a uint8 tensor of at least 1 dim, got {packed.dtype}")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return _fp4_decode_table(packed.device)[codes.long()]


def _e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 FP4 codes of ``q`` as DeepGEMM's casts write them: the magnitude rounds to the nearest of
    {0, 0.5, 1, 1.5, 2, 3, 4, 6}, a tie to the smaller one, saturating at 6; bit 3 is the sign of a
    non-zero code (zero is always code 0)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    code = torch.bucketize(q.abs().to(dtype), _fp4_rounding_bounds(q.device, dtype, ties_to_even=False))
    code = code.to(torch.uint8)
    return code | (((q < 0) & (code != 0)).to(torch.uint8) << 3)


def per_token_cast_to_fp4(x: torch.Tensor, use_ue8m0: bool, gran_k: int = BLOCK,
                          use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise to FP4 e2m1 with one scale per 1 x ``gran_k`` block of each row (DeepGEMM's cast).

    Args:
        x: ``[M, K]``, bf16/fp16/fp32, K even; K need not be a multiple of ``gran_k``.
        use_ue8m0: round every scale up to a power of two.
        gran_k: elements per scale along K, 32 or 128.
        use_packed_ue8m0: return the scales packed four per int32 (:func:`pack_ue8m0`: a row's last
            int32 padded with zero bytes); needs ``use_ue8m0``.

    Returns:
        ``(packed, sf)``: ``packed`` int8 ``[M, K/2]``, element ``2j`` in the low nibble and ``2j+1`` in
        the high one, each nibble an FP4 code (bit 3 the sign, bits 0-2 indexing
        {0, 0.5, 1, 1.5, 2, 3, 4, 6}; the magnitude of ``x / sf`` rounded to the nearest, a tie to the
        smaller); ``sf`` float32 ``[M, ceil(K/gran_k)]`` with ``amax / sf <= 6`` per block, contiguous,
        or int32 ``[M, ceil(ceil(K/gran_k)/4)]`` packed.

    Plain PyTorch on any device; :func:`cast_back_from_fp4` dequantises.
    """
    x = _check_cast_input("x", x, (2,))
    _check_gran_k(gran_k)
    _check_packing(use_ue8m0, use_packed_ue8m0)
    k = x.shape[1]
    if k % 2:
        raise ValueError(f"x: expected an even K (two FP4 values per byte), got shape {tuple(x.shape)}")
    blocks, sf = _per_token_blocks(x, gran_k, FP4_E2M1_MAX, use_ue8m0)
    codes = _e2m1_codes(blocks / sf.unsqueeze(-1)).flatten(-2)[:, :k]
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous().view(torch.int8)
    return packed, pack_ue8m0(sf) if use_packed_ue8m0 else sf


def cast_back_from_fp4(packed: torch.Tensor, sf: torch.Tensor, gran_k: int = BLOCK,
                       use_packed_ue8m0: bool = False) -> torch.Tensor:
    """Dequantise the output of :func:`per_token_cast_to_fp4`.

    Args:
        packed: int8 (or uint8) ``[M, K/2]``, two FP4 codes per byte, the low nibble first.
        sf: float32 ``[M, ceil(K/gran_k)]``, or with ``use_packed_ue8m0`` int32 UE8M0 scales packed four
            per element (:func:`pack_ue8m0`).
        gran_k: elements per scale along K, 32 or 128.

    Returns:
        float32 ``[M, K]``: each code's value times its block's scale.
    """
    _check_gran_k(gran_k)
    if packed.dtype not in (torch.int8, torch.uint8) or packed.dim() != 2:
        raise ValueError(f"packed: expected a 2-D int8 or uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    m, k = packed.shape[0], 2 * packed.shape[1]
    k_blocks = ceil_div(k, gran_k)
    if use_packed_ue8m0:
        if sf.dtype != torch.int32 or tuple(sf.shape) != (m, ceil_div(k_blocks, 4)):
            raise ValueError(f"sf: expected int32 {(m, ceil_div(k_blocks, 4))} (packed UE8M0), "
                             f"got {sf.dtype} {tuple(sf.shape)}")
        sf = unpack_ue8m0(sf, k_blocks)
    elif sf.dtype != torch.float32 or tuple(sf.shape) != (m, k_blocks):
        raise ValueError(f"sf: expected float32 {(m, k_blocks)}, got {sf.dtype} {tuple(sf.shape)}")
    values = unpack_fp4(packed.view(torch.uint8))
    return values * sf.repeat_interleave(gran_k, dim=1)[:, :k]
