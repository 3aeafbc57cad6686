"""CPU tests of the quantisation utilities (moegemm.quant) and the integer helpers behind their
layouts: casts, scale layouts, UE8M0 and FP4 packing.

Expected values are computed independently in float64 with explicit loops over (few, small) blocks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moegemm import intmath, quant, testing

FP8 = torch.float8_e4m3fn
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# ---- independent float64 oracle for the casts -----------------------------------------------------


def _expected_scales(x: torch.Tensor, block_rows: int, block_cols: int, use_ue8m0: bool) -> torch.Tensor:
    """float64 [ceil(R/br), ceil(C/bc)] scales of a 2-D ``x``, one explicit loop iteration per block."""
    rows, cols = x.shape
    x64 = x.double()
    out = torch.empty(math.ceil(rows / block_rows), math.ceil(cols / block_cols), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = x64[i * block_rows : (i + 1) * block_rows, j * block_cols : (j + 1) * block_cols]
            scale = max(block.abs().max().item(), 1e-4) / 448.0
            out[i, j] = 2.0 ** math.ceil(math.log2(scale)) if use_ue8m0 else scale
    return out


def _expand(sf: torch.Tensor, block_rows: int, block_cols: int, rows: int, cols: int) -> torch.Tensor:
    """Broadcast a 2-D block-scale grid to a [rows, cols] float64 tensor with loops over blocks."""
    out = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(sf.shape[0]):
        for j in range(sf.shape[1]):
            rows_i = slice(i * block_rows, (i + 1) * block_rows)
            out[rows_i, j * block_cols : (j + 1) * block_cols] = sf[i, j].item()
    return out


def _check_cast(x: torch.Tensor, x_fp8: torch.Tensor, sf: torch.Tensor, block: tuple[int, int], ue8m0: bool):
    """Check one 2-D slice of a cast against the float64 oracle (scales, then exact FP8 bytes)."""
    rows, cols = x.shape
    assert x_fp8.dtype == FP8 and x_fp8.shape == x.shape
    assert sf.dtype == torch.float32
    expected_sf = _expected_scales(x, *block, ue8m0)
    assert sf.shape == expected_sf.shape
    # amax is exact and float64 rounding then float32 rounding of a quotient equals float32 rounding, so
    # the scales must match bit for bit.
    assert torch.equal(sf, expected_sf.float())
    # float64 division rounded to float32 equals float32 division (53 >= 2*24 + 2), so the FP8 bytes
    # must match exactly given the returned scales.
    quotient = (x.double() / _expand(sf.double(), *block, rows, cols)).float()
    assert torch.equal(x_fp8.view(torch.uint8), quotient.to(FP8).view(torch.uint8))


# ---- integer helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "div", "aligned"),
    [(0, 4, 0, 0), (1, 4, 1, 4), (4, 4, 1, 4), (5, 4, 2, 8), (200, 128, 2, 256), (128, 128, 1, 128)],
)
def test_ceil_div_and_align(a: int, b: int, div: int, aligned: int) -> None:
    assert intmath.ceil_div(a, b) == div
    assert intmath.align(a, b) == aligned


@pytest.mark.parametrize(
    ("x", "element_size", "expected"),
    [
        (1, 4, 4),
        (4, 4, 4),
        (5, 4, 8),
        (130, 4, 132),
        (1, 2, 8),
        (9, 2, 16),
        (1, 1, 16),
        (17, 1, 32),
        (3, 8, 4),
        (0, 4, 0),
    ],
)
def test_get_tma_aligned_size(x: int, element_size: int, expected: int) -> None:
    assert intmath.get_tma_aligned_size(x, element_size) == expected


def test_get_tma_aligned_size_rejects_bad_element_size() -> None:
    with pytest.raises(ValueError, match="element_size"):
        intmath.get_tma_aligned_size(8, 3)


# ---- get_mn_major_tma_aligned_tensor --------------------------------------------------------------


@pytest.mark.parametrize(("mn", "k", "aligned_mn"), [(1, 1, 4), (5, 3, 8), (8, 2, 8), (130, 4, 132)])
def test_mn_major_2d(mn: int, k: int, aligned_mn: int) -> None:
    sf = torch.randn(mn, k, generator=torch.Generator().manual_seed(mn * 31 + k))
    out = quant.get_mn_major_tma_aligned_tensor(sf)
    assert out.shape == sf.shape and out.dtype == sf.dtype
    assert out.stride() == (1, aligned_mn)
    assert torch.equal(out, sf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_mn_major_3d(dtype: torch.dtype) -> None:
    g, mn, k = 3, 6, 5
    sf = torch.randint(-1000, 1000, (g, mn, k), generator=torch.Generator().manual_seed(7)).to(dtype)
    out = quant.get_mn_major_tma_aligned_tensor(sf)
    assert out.shape == sf.shape and out.dtype == dtype
    assert out.stride() == (8 * k, 1, 8)
    assert torch.equal(out, sf)


def test_mn_major_from_non_contiguous_input() -> None:
    base = torch.randn(7, 10, generator=torch.Generator().manual_seed(3))
    sf = base[:, ::2]  # [7, 5], strides (10, 2)
    out = quant.get_mn_major_tma_aligned_tensor(sf)
    assert out.stride() == (1, 8)
    assert torch.equal(out, sf)


def test_mn_major_returns_input_when_already_laid_out() -> None:
    sf = torch.empty_strided((6, 3), (1, 8)).copy_(torch.randn(6, 3))
    assert quant.get_mn_major_tma_aligned_tensor(sf) is sf
    grouped = torch.empty_strided((2, 6, 3), (24, 1, 8)).copy_(torch.randn(2, 6, 3))
    assert quant.get_mn_major_tma_aligned_tensor(grouped) is grouped
    # Same values but a padded group stride is a different layout and must be copied.
    loose = torch.empty_strided((2, 6, 3), (32, 1, 8)).copy_(grouped)
    out = quant.get_mn_major_tma_aligned_tensor(loose)
    assert out is not loose and out.stride() == (24, 1, 8) and torch.equal(out, loose)


def test_mn_major_rejects_1d() -> None:
    with pytest.raises(ValueError, match="sf"):
        quant.get_mn_major_tma_aligned_tensor(torch.ones(4))


# ---- fp8 casts ------------------------------------------------------------------------------------

CAST_DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", CAST_DTYPES)
@pytest.mark.parametrize(("m", "k"), [(1, 128), (1, 200), (5, 384), (7, 200), (3, 1)])
def test_per_token_cast(m: int, k: int, dtype: torch.dtype, use_ue8m0: bool) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    x_fp8, sf = quant.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert sf.shape == (m, math.ceil(k / 128))
    _check_cast(x, x_fp8, sf, (1, 128), use_ue8m0)


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_token_cast_3d(use_ue8m0: bool) -> None:
    x = torch.randn(3, 4, 200, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    x[1] *= 100  # groups with different magnitudes catch scale mixing between groups
    x_fp8, sf = quant.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert x_fp8.shape == (3, 4, 200) and sf.shape == (3, 4, 2)
    for g in range(3):
        _check_cast(x[g], x_fp8[g], sf[g], (1, 128), use_ue8m0)


def test_per_token_cast_non_contiguous_input() -> None:
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(12)).t()  # [6, 256], not contiguous
    x_fp8, sf = quant.per_token_cast_to_fp8(x)
    _check_cast(x, x_fp8, sf, (1, 128), False)


def test_per_token_cast_zero_rows_use_clamped_scale() -> None:
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(13))
    x[1] = 0
    x[2, 128:] = 0  # only the ragged tail block of row 2 is zero
    x_fp8, sf = quant.per_token_cast_to_fp8(x)
    floor = torch.tensor(1e-4, dtype=torch.float32) / 448
    assert torch.equal(sf[1], floor.expand(2))
    assert sf[2, 1] == floor and sf[2, 0] > floor
    assert not x_fp8.float()[1].any() and not x_fp8.float()[2, 128:].any()
    assert torch.isfinite(x_fp8.float()).all()


def test_per_token_cast_block_max_maps_to_448() -> None:
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(14))
    x_fp8, _ = quant.per_token_cast_to_fp8(x)
    q = x_fp8.float()
    for start in range(0, 300, 128):
        torch.testing.assert_close(q[:, start : start + 128].abs().amax(dim=1), torch.full((4,), 448.0))


def test_ue8m0_scales_are_powers_of_two_and_not_smaller() -> None:
    gen = torch.Generator().manual_seed(15)
    magnitudes = torch.exp2(torch.randint(-20, 20, (16, 1), generator=gen).float())
    x = torch.randn(16, 384, generator=gen) * magnitudes
    _, sf = quant.per_token_cast_to_fp8(x, use_ue8m0=True)
    _, sf_fp32 = quant.per_token_cast_to_fp8(x, use_ue8m0=False)
    mantissa, _ = torch.frexp(sf)
    assert torch.all(mantissa == 0.5)
    assert torch.all(sf >= sf_fp32) and torch.all(sf < 2 * sf_fp32)


def test_ue8m0_keeps_exact_powers_of_two() -> None:
    # amax = 448 * 2**e gives an FP32 scale of exactly 2**e, which must not be rounded up to 2**(e+1).
    exponents = torch.arange(-12, 12, dtype=torch.float32)
    x = torch.zeros(exponents.numel(), 128)
    x[:, 5] = 448 * torch.exp2(exponents)
    x[:, 6] = -x[:, 5] / 4
    x_fp8, sf = quant.per_token_cast_to_fp8(x, use_ue8m0=True)
    assert torch.equal(sf[:, 0], torch.exp2(exponents))
    assert torch.all(x_fp8.float()[:, 5] == 448) and torch.all(x_fp8.float()[:, 6] == -112)


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", CAST_DTYPES)
@pytest.mark.parametrize(("n", "k"), [(1, 1), (128, 128), (200, 300), (130, 256), (64, 129)])
def test_per_block_cast(n: int, k: int, dtype: torch.dtype, use_ue8m0: bool) -> None:
    gen = torch.Generator().manual_seed(n * 7 + k)
    x = (torch.randn(n, k, generator=gen) * 3).to(dtype)
    x_fp8, sf = quant.per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert sf.shape == (math.ceil(n / 128), math.ceil(k / 128))
    _check_cast(x, x_fp8, sf, (128, 128), use_ue8m0)


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_block_cast_3d(use_ue8m0: bool) -> None:
    x = torch.randn(2, 130, 200, generator=torch.Generator().manual_seed(21))
    x[0, 128:] *= 50  # the ragged row block of group 0 has a distinct scale
    x_fp8, sf = quant.per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert x_fp8.shape == x.shape and sf.shape == (2, 2, 2)
    for g in range(2):
        _check_cast(x[g], x_fp8[g], sf[g], (128, 128), use_ue8m0)


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize(("m", "n"), [(1, 3), (128, 4), (200, 5), (300, 1)])
def test_per_channel_cast(m: int, n: int, use_ue8m0: bool) -> None:
    gen = torch.Generator().manual_seed(m + 100 * n)
    x = torch.randn(m, n, generator=gen) * torch.rand(1, n, generator=gen) * 5
    x_fp8, sf = quant.per_channel_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert sf.shape == (math.ceil(m / 128), n)
    _check_cast(x, x_fp8, sf, (128, 1), use_ue8m0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cast_round_trip_error(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 200, generator=gen).to(torch.bfloat16)
    for use_ue8m0 in (False, True):
        q, sf = quant.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
        deq = q.double() * _expand(sf.double(), 1, 128, 64, 200)
        assert testing.calc_diff(deq, x) < 1e-3
        q, sf = quant.per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0)
        deq = q.double() * _expand(sf.double(), 128, 128, 64, 200)
        assert testing.calc_diff(deq, x) < 1e-3
        q, sf = quant.per_channel_cast_to_fp8(x, use_ue8m0=use_ue8m0)
        deq = q.double() * _expand(sf.double(), 128, 1, 64, 200)
        assert testing.calc_diff(deq, x) < 1e-3


@pytest.mark.parametrize(
    "cast", [quant.per_token_cast_to_fp8, quant.per_block_cast_to_fp8, quant.per_channel_cast_to_fp8]
)
def test_casts_reject_bad_inputs(cast) -> None:
    with pytest.raises(ValueError, match="x: expected a 2 or 3-D tensor, got shape"):
        cast(torch.ones(128))
    with pytest.raises(TypeError, match="x: expected a 16- or 32-bit float dtype, got torch.int32"):
        cast(torch.ones(2, 128, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        cast([[1.0] * 128] * 2)


@pytest.mark.parametrize(
    "cast", [quant.per_token_cast_to_fp8, quant.per_block_cast_to_fp8, quant.per_channel_cast_to_fp8]
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_casts_take_weights_that_require_grad(cast, device) -> None:
    """Quantising a model's weights: the copies carry no autograd history."""
    weight = torch.nn.Linear(256, 256, device=device).weight
    q, sf = cast(weight)
    assert not q.requires_grad and not sf.requires_grad
    q_ref, sf_ref = cast(weight.detach())
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(sf, sf_ref)


# ---- ue8m0 packing --------------------------------------------------------------------------------


def _to_int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def test_pack_ue8m0_byte_layout() -> None:
    exponents = [-126, 127, 0, -1, 2]  # biased 1, 254, 127, 126, 129
    sf = torch.tensor([2.0**e for e in exponents], dtype=torch.float32)
    packed = quant.pack_ue8m0(sf)
    assert packed.dtype == torch.int32 and packed.shape == (2,)
    biased = [e + 127 for e in exponents] + [0, 0, 0]
    expected = [_to_int32(sum(biased[4 * j + i] << (8 * i) for i in range(4))) for j in range(2)]
    assert packed.tolist() == expected


@pytest.mark.parametrize("shape", [(1,), (4,), (3, 5), (2, 3, 9)])
def test_ue8m0_round_trip(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 10 + shape[-1])
    sf = torch.exp2(torch.randint(-126, 128, shape, generator=gen).float())
    packed = quant.pack_ue8m0(sf)
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] / 4))
    # Independent decode of each byte with numpy.
    raw = packed.numpy().astype(np.int64) & 0xFFFFFFFF
    decoded = np.stack([(raw >> (8 * i)) & 0xFF for i in range(4)], axis=-1).reshape(*shape[:-1], -1)
    assert np.array_equal(decoded[..., : shape[-1]], np.log2(sf.double().numpy()).astype(np.int64) + 127)
    assert not decoded[..., shape[-1] :].any()
    assert torch.equal(quant.unpack_ue8m0(packed, shape[-1]), sf)


def test_ue8m0_round_trip_of_cast_scales() -> None:
    _, sf = quant.per_token_cast_to_fp8(torch.randn(5, 700, generator=torch.Generator().manual_seed(4)), True)
    assert torch.equal(quant.unpack_ue8m0(quant.pack_ue8m0(sf), sf.shape[-1]), sf)


@pytest.mark.parametrize("bad", [3.0, 0.0, -2.0, float("inf"), float("nan"), 1e-40])
def test_pack_ue8m0_rejects_non_powers_of_two(bad: float) -> None:
    sf = torch.tensor([1.0, 2.0, bad, 4.0])
    with pytest.raises(ValueError, match="power"):
        quant.pack_ue8m0(sf)


def test_ue8m0_rejects_bad_dtypes_and_sizes() -> None:
    with pytest.raises(ValueError, match="float32"):
        quant.pack_ue8m0(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="packed"):
        quant.unpack_ue8m0(torch.ones(2, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="packed"):
        quant.unpack_ue8m0(torch.ones(2, dtype=torch.int64), 8)


# ---- fp4 e2m1 packing -----------------------------------------------------------------------------


def _e2m1_value(code: int) -> float:
    magnitude = E2M1_VALUES[code & 7]
    return -magnitude if code & 8 else magnitude


def _nearest_e2m1_code(value: float) -> int:
    """Brute force: nearest magnitude, ties to the even code, sign from the sign bit."""
    magnitude = min(abs(value), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1_VALUES[c] - magnitude), c % 2))
    return best | (8 if math.copysign(1.0, value) < 0 else 0)


def test_unpack_fp4_every_code() -> None:
    packed = torch.arange(256, dtype=torch.uint8)
    values = quant.unpack_fp4(packed)
    assert values.dtype == torch.float32 and values.shape == (512,)
    for byte in range(256):
        low, high = values[2 * byte].item(), values[2 * byte + 1].item()
        assert low == _e2m1_value(byte & 15) and high == _e2m1_value(byte >> 4)
        assert math.copysign(1.0, low) == (-1.0 if byte & 8 else 1.0)  # code 8 must decode to -0.0


def test_fp4_round_trip_every_byte() -> None:
    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(quant.pack_fp4(quant.unpack_fp4(packed)), packed)


def test_pack_fp4_nibble_order() -> None:
    packed = quant.pack_fp4(torch.tensor([[0.5, 6.0, -1.0, 0.0]]))
    assert packed.tolist() == [[0x71, 0x0A]]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.2, 0.0),
        (0.25, 0.0),
        (0.26, 0.5),
        (0.74, 0.5),
        (0.75, 1.0),
        (1.25, 1.0),
        (1.3, 1.5),
        (1.75, 2.0),
        (2.4, 2.0),
        (2.5, 2.0),
        (2.6, 3.0),
        (3.5, 4.0),
        (4.9, 4.0),
        (5.0, 4.0),
        (5.1, 6.0),
        (7.0, 6.0),
        (1e9, 6.0),
        (float("inf"), 6.0),
        (-0.75, -1.0),
        (-2.6, -3.0),
        (-5.0, -4.0),
        (-100.0, -6.0),
    ],
)
def test_pack_fp4_rounding(value: float, expected: float) -> None:
    x = torch.tensor([value, 1.5])
    assert quant.unpack_fp4(quant.pack_fp4(x))[0].item() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pack_fp4_matches_brute_force(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(99)
    # Random values plus every midpoint and its neighbours, positive and negative.
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    nudged = [midpoints * (1 + sign * 2.0**-bits) for sign in (1, -1) for bits in (20, 30)]
    special = torch.cat([midpoints, -midpoints, *nudged])
    x = torch.cat([torch.randn(998, generator=gen, dtype=torch.float64) * 3, special]).to(dtype)
    if x.numel() % 2:
        x = torch.cat([x, x[:1]])
    packed = quant.pack_fp4(x.reshape(2, -1))
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten().tolist()
    expected = [_nearest_e2m1_code(v) for v in x.double().tolist()]
    assert codes == expected


def test_pack_fp4_rejects_odd_k() -> None:
    with pytest.raises(ValueError, match="even"):
        quant.pack_fp4(torch.ones(2, 3))
    with pytest.raises(ValueError, match="uint8"):
        quant.unpack_fp4(torch.ones(2, dtype=torch.int32))


# ---- DeepGEMM's FP4 cast and the 1x32 scales ------------------------------------------------------


def _deepgemm_e2m1_code(value: float) -> int:
    """Brute force of DeepGEMM's FP4 rounding: nearest magnitude, a tie to the smaller, saturating at
    6; the sign only on a non-zero code."""
    magnitude = min(abs(value), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1_VALUES[c] - magnitude), c))
    return best | (8 if value < 0 and best else 0)


def _block_scales(x: torch.Tensor, gran_k: int, max_value: float, use_ue8m0: bool) -> list[list[float]]:
    """float64 scales of each 1 x gran_k block of a 2-D ``x`` (explicit loops)."""
    out = []
    for row in x.double().tolist():
        scales = []
        for j in range(0, len(row), gran_k):
            scale = max(max(abs(v) for v in row[j : j + gran_k]), 1e-4) / max_value
            scales.append(2.0 ** math.ceil(math.log2(scale)) if use_ue8m0 else scale)
        out.append(scales)
    return out


@pytest.mark.parametrize("gran_k", [32, 128])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_cast_to_fp4_matches_brute_force(gran_k: int, use_ue8m0: bool, dtype: torch.dtype) -> None:
    x = (torch.randn(3, 100, generator=torch.Generator().manual_seed(gran_k)) * 5).to(dtype)  # ragged last block
    x[1, :40] = 0.0  # an all-zero block takes the amax floor
    packed, sf = quant.per_token_cast_to_fp4(x, use_ue8m0, gran_k)
    assert packed.dtype == torch.int8 and packed.shape == (3, 50)
    assert sf.dtype == torch.float32 and sf.shape == (3, math.ceil(100 / gran_k)) and sf.is_contiguous()
    expected = torch.tensor(_block_scales(x, gran_k, 6.0, use_ue8m0), dtype=torch.float64)
    assert torch.allclose(sf.double(), expected, rtol=2.0**-23, atol=0.0)
    codes = packed.view(torch.uint8)
    codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    x32, sf32 = x.float().numpy(), sf.numpy()
    for i in range(3):
        for j in range(100):
            q = float(np.float32(x32[i, j]) / np.float32(sf32[i, j // gran_k]))
            assert codes[i, j].item() == _deepgemm_e2m1_code(q), (i, j, q)


def test_per_token_cast_to_fp4_ties_signs_and_nibbles() -> None:
    # amax 6 makes the UE8M0 scale exactly 1: the values are the codes' inputs.
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.2, -0.75, 6.0]])
    packed, sf = quant.per_token_cast_to_fp4(x, use_ue8m0=True)
    assert sf.tolist() == [[1.0]]
    # Ties go to the smaller magnitude; -0.2 rounds to zero, which carries no sign; element 2j is the
    # low nibble.
    assert packed.view(torch.uint8).tolist() == [[0x10, 0x32, 0x54, 0x06, 0x79]]


@pytest.mark.parametrize("gran_k", [32, 128])
def test_cast_back_from_fp4_round_trip(gran_k: int) -> None:
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(11)) * 3
    for use_ue8m0 in (False, True):
        packed, sf = quant.per_token_cast_to_fp4(x, use_ue8m0, gran_k)
        y = quant.cast_back_from_fp4(packed, sf, gran_k)
        assert y.dtype == torch.float32 and y.shape == x.shape
        scale = sf.repeat_interleave(gran_k, dim=1)[:, :300]
        q = (x / scale).abs()
        # Half the gap between neighbouring e2m1 magnitudes: 0.25 up to 2, 0.5 up to 4, 1 up to 6.
        half_gap = torch.where(q <= 2, 0.25, torch.where(q <= 4, 0.5, 1.0))
        assert bool(((y - x).abs() <= half_gap * scale * (1 + 1e-6)).all())
    # Packed UE8M0 scales (the last loop's): the same codes, the same dequantised values.
    packed_codes, packed_sf = quant.per_token_cast_to_fp4(x, True, gran_k, use_packed_ue8m0=True)
    assert packed_sf.dtype == torch.int32 and packed_sf.shape == (4, math.ceil(math.ceil(300 / gran_k) / 4))
    assert torch.equal(packed_codes, packed)
    assert torch.equal(quant.unpack_ue8m0(packed_sf, sf.shape[1]), sf)
    assert torch.equal(quant.cast_back_from_fp4(packed_codes, packed_sf, gran_k, use_packed_ue8m0=True), y)


@pytest.mark.parametrize("shape", [(5, 300), (2, 3, 96)])
def test_per_token_cast_to_fp8_one_scale_per_32(shape) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(12)) * 10
    x_fp8, sf = quant.per_token_cast_to_fp8(x, gran_k=32)
    k_blocks = math.ceil(shape[-1] / 32)
    assert x_fp8.dtype == FP8 and x_fp8.shape == x.shape
    assert sf.shape == (*shape[:-1], k_blocks) and sf.is_contiguous()
    rows = x.reshape(-1, shape[-1])
    expected = torch.tensor(_block_scales(rows, 32, 448.0, False), dtype=torch.float64)
    assert torch.allclose(sf.reshape(-1, k_blocks).double(), expected, rtol=2.0**-23, atol=0.0)
    scale = sf.repeat_interleave(32, dim=-1)[..., : shape[-1]]
    # e4m3: 3 mantissa bits; below 2^-6 subnormals 2^-9 apart
    assert bool(((x_fp8.float() * scale - x).abs() <= x.abs() * 2.0**-4 + scale * 2.0**-10).all())
    x_fp8_packed, packed = quant.per_token_cast_to_fp8(x, True, 32, use_packed_ue8m0=True)
    _, sf_ue8m0 = quant.per_token_cast_to_fp8(x, True, 32)
    assert packed.dtype == torch.int32 and torch.equal(packed, quant.pack_ue8m0(sf_ue8m0))
    assert torch.equal(x_fp8_packed.view(torch.uint8), quant.per_token_cast_to_fp8(x, True, 32)[0].view(torch.uint8))


def test_fine_grained_casts_reject_bad_arguments() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"gran_k: expected one of \(32, 128\), got 64"):
        quant.per_token_cast_to_fp4(x, True, gran_k=64)
    with pytest.raises(ValueError, match="gran_k"):
        quant.per_token_cast_to_fp8(x, gran_k=16)
    with pytest.raises(ValueError, match="use_packed_ue8m0"):
        quant.per_token_cast_to_fp4(x, False, use_packed_ue8m0=True)
    with pytest.raises(ValueError, match="use_packed_ue8m0"):
        quant.per_token_cast_to_fp8(x, False, 32, use_packed_ue8m0=True)
    with pytest.raises(ValueError, match="even K"):
        quant.per_token_cast_to_fp4(torch.randn(4, 63), True)
    with pytest.raises(ValueError, match="2-D"):
        quant.per_token_cast_to_fp4(torch.randn(2, 4, 64), True)
    packed, sf = quant.per_token_cast_to_fp4(x, True, 32)
    with pytest.raises(ValueError, match=r"sf: expected float32 \(4, 2\)"):
        quant.cast_back_from_fp4(packed, sf[:, :1], 32)
    with pytest.raises(ValueError, match="sf: expected int32"):
        quant.cast_back_from_fp4(packed, sf, 32, use_packed_ue8m0=True)
    with pytest.raises(ValueError, match="packed: expected a 2-D int8 or uint8"):
        quant.cast_back_from_fp4(packed.float(), sf, 32)


# ---- transform_sf_into_required_layout ------------------------------------------------------------


@pytest.mark.parametrize(("recipe", "is_sfa"), [((1, 128), False), ((1, 128, 128), True)])
def test_transform_per_token(recipe: tuple[int, ...], is_sfa: bool) -> None:
    mn, k = 5, 300
    sf = torch.rand(3, mn, generator=torch.Generator().manual_seed(5)).t()  # [5, 3], non-contiguous
    out = quant.transform_sf_into_required_layout(sf, mn, k, recipe, is_sfa=is_sfa)
    assert out.dtype == torch.float32 and out.shape == (5, 3)
    assert out.stride() == (1, 8)
    assert torch.equal(out, sf)


def test_transform_per_token_grouped() -> None:
    sf = torch.rand(2, 6, 2, generator=torch.Generator().manual_seed(6))
    out = quant.transform_sf_into_required_layout(sf, 6, 256, (1, 128), num_groups=2)
    assert out.stride() == (16, 1, 8)
    assert torch.equal(out, sf)


@pytest.mark.parametrize(("recipe", "is_sfa"), [((128, 128), True), ((1, 128, 128), False)])
def test_transform_per_block(recipe: tuple[int, ...], is_sfa: bool) -> None:
    mn, k = 200, 300  # 2 x 3 blocks
    sf = torch.rand(3, 2, generator=torch.Generator().manual_seed(8)).t()
    out = quant.transform_sf_into_required_layout(sf, mn, k, recipe, is_sfa=is_sfa)
    assert out.shape == (2, 3) and out.is_contiguous() and out.dtype == torch.float32
    assert torch.equal(out, sf)
    grouped = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(9)).transpose(0, 1)
    out = quant.transform_sf_into_required_layout(grouped, 256, 300, recipe, num_groups=2, is_sfa=is_sfa)
    assert out.shape == (2, 2, 3) and out.is_contiguous() and torch.equal(out, grouped)


def test_transform_unpacks_ue8m0() -> None:
    sf = torch.exp2(torch.randint(-10, 10, (7, 6), generator=torch.Generator().manual_seed(10)).float())
    out = quant.transform_sf_into_required_layout(quant.pack_ue8m0(sf), 7, 6 * 128, (1, 128))
    assert out.dtype == torch.float32 and out.stride() == (1, 8) and torch.equal(out, sf)
    block_sf = sf[:2]
    out = quant.transform_sf_into_required_layout(quant.pack_ue8m0(block_sf), 256, 700, (128, 128))
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, block_sf)


@pytest.mark.parametrize(
    ("shape", "mn", "k", "recipe", "num_groups"),
    [
        ((5, 2), 5, 300, (1, 128), None),  # k needs 3 blocks
        ((4, 3), 5, 300, (1, 128), None),  # mn rows
        ((5, 3), 5, 300, (128, 128), None),  # per-block wants ceil(5/128) = 1 row
        ((5, 3), 5, 300, (1, 128), 2),  # 2-D given where 3-D expected
        ((2, 5, 3), 5, 300, (1, 128), None),  # 3-D given where 2-D expected
        ((3, 5, 3), 5, 300, (1, 128), 2),
    ],  # wrong group count
)
def test_transform_rejects_bad_shapes(shape, mn, k, recipe, num_groups) -> None:
    with pytest.raises(ValueError, match=r"sf: expected shape"):
        quant.transform_sf_into_required_layout(torch.ones(shape), mn, k, recipe, num_groups=num_groups)


def test_transform_rejects_bad_packed_shape_recipe_and_dtype() -> None:
    with pytest.raises(ValueError, match="sf: expected shape"):
        quant.transform_sf_into_required_layout(torch.ones(5, 2, dtype=torch.int32), 5, 128 * 9, (1, 128))
    with pytest.raises(ValueError, match="recipe"):
        quant.transform_sf_into_required_layout(torch.ones(5, 3), 5, 300, (1, 64))
    with pytest.raises(ValueError, match="recipe"):
        quant.transform_sf_into_required_layout(torch.ones(5, 3), 5, 300, (1,))
    with pytest.raises(TypeError, match="sf: expected dtype"):
        quant.transform_sf_into_required_layout(torch.ones(5, 3, dtype=torch.float64), 5, 300, (1, 128))


@pytest.mark.parametrize("shape", [(5, 300), (8, 128), (1, 1), (0, 256), (3, 7, 300)])
def test_per_token_scales_come_in_the_kernels_layout(shape) -> None:
    """M-major with 16-byte aligned columns: they feed the GEMMs with no per-call copy."""
    _, sf = quant.per_token_cast_to_fp8(torch.randn(shape))
    assert sf.stride() == quant._mn_major_strides(sf.shape, 4)
    assert quant.get_mn_major_tma_aligned_tensor(sf) is sf
