"""CPU tests for moegemm.reference against float64 math written independently here.

The oracle dequantises with explicit loops over the (few) scale blocks and multiplies with numpy in
float64. Output tensors are poisoned with NaN first so rows a function must not touch can be checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moegemm import quant, reference, testing

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------------
# Inputs and float64 oracle
# ---------------------------------------------------------------------------------------------------------


def _fp8(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 4).to(FP8)


def _scales(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Distinct, well separated values per block so a scale applied to the wrong block shows up.
    return torch.rand(shape, generator=gen) * 1.5 + 0.25


def _kb(k: int) -> int:
    return math.ceil(k / 128)


def _deq_token64(x: torch.Tensor, sf: torch.Tensor) -> np.ndarray:
    """float64 [..., M, K]: multiply each 128-column slab by its own scale column."""
    out = x.double().numpy().copy()
    scales = sf.double().numpy()
    for j in range(scales.shape[-1]):
        out[..., j * 128 : (j + 1) * 128] *= scales[..., j : j + 1]
    return out


def _deq_block64(x: torch.Tensor, sf: torch.Tensor) -> np.ndarray:
    """float64 [..., N, K]: multiply each 128x128 tile by its own scale."""
    out = x.double().numpy().copy()
    scales = sf.double().numpy()
    for i in range(scales.shape[-2]):
        for j in range(scales.shape[-1]):
            out[..., i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scales[..., i, j, None, None]
    return out


def _operands(m: int, n: int, k: int, seed: int, groups: int | None = None):
    """Random A (1x128 scales) and B (128x128 scales); B gets a leading group dim when ``groups``."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if groups is None else (groups,)
    a = (_fp8((m, k), gen), _scales((m, _kb(k)), gen))
    b = (_fp8((*lead, n, k), gen), _scales((*lead, _kb(n), _kb(k)), gen))
    return a, b


def _assert_close(actual: torch.Tensor, expected: np.ndarray) -> None:
    """Tolerance scaled to the output dtype and the magnitude of the result."""
    eps = 1e-5 if actual.dtype == torch.float32 else 8e-3
    scale = max(float(np.abs(expected).max()), 1.0) if expected.size else 1.0
    torch.testing.assert_close(actual.double(), torch.from_numpy(expected), rtol=eps, atol=eps * scale)


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Dequantisation helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (5, 384), (2, 4, 130)])
def test_dequantize_per_token(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = _fp8(shape, gen)
    sf = _scales((*shape[:-1], _kb(shape[-1])), gen)
    out = reference.dequantize_per_token(x, sf)
    assert out.dtype == torch.float32 and out.shape == shape
    _assert_close(out, _deq_token64(x, sf))


def test_dequantize_per_token_accepts_strided_and_packed_scales() -> None:
    gen = torch.Generator().manual_seed(40)
    x = _fp8((6, 600), gen)
    sf = torch.exp2(torch.randint(-4, 4, (6, 5), generator=gen).float())
    expected = _deq_token64(x, sf)
    _assert_close(reference.dequantize_per_token(x, quant.get_mn_major_tma_aligned_tensor(sf)), expected)
    _assert_close(reference.dequantize_per_token(x, quant.pack_ue8m0(sf)), expected)


@pytest.mark.parametrize("shape", [(1, 1), (200, 300), (128, 256), (3, 130, 129)])
def test_dequantize_per_block(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    x = _fp8(shape, gen)
    sf = _scales((*shape[:-2], _kb(shape[-2]), _kb(shape[-1])), gen)
    out = reference.dequantize_per_block(x, sf)
    assert out.dtype == torch.float32 and out.shape == shape
    _assert_close(out, _deq_block64(x, sf))


def test_dequantize_rejects_bad_scale_shapes() -> None:
    x = torch.zeros(4, 200, dtype=FP8)
    with pytest.raises(ValueError, match=r"sf: expected shape"):
        reference.dequantize_per_token(x, torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"sf: expected shape"):
        reference.dequantize_per_block(x, torch.ones(4, 2))


# ---------------------------------------------------------------------------------------------------------
# fp8_gemm_nt
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 128), (3, 200, 200), (130, 129, 384), (1, 1, 1)])
def test_fp8_gemm_nt(m: int, n: int, k: int, out_dtype: torch.dtype, with_c: bool) -> None:
    a, b = _operands(m, n, k, seed=m * 100 + n + k)
    c = torch.randn(m, n, generator=torch.Generator().manual_seed(k)) * 10 if with_c else None
    d = _poisoned((m, n), out_dtype)
    assert reference.fp8_gemm_nt(a, b, d, c=c) is None
    expected = _deq_token64(*a) @ _deq_block64(*b).T
    if c is not None:
        expected = expected + c.double().numpy()
    _assert_close(d, expected)


def test_fp8_gemm_nt_scale_layouts_agree() -> None:
    a, b = _operands(37, 150, 300, seed=5)
    d_contiguous = torch.empty(37, 150)
    reference.fp8_gemm_nt(a, b, d_contiguous)
    d_mn_major = torch.empty(37, 150)
    sfa_mn_major = quant.get_mn_major_tma_aligned_tensor(a[1])
    sfb_transposed = b[1].t().contiguous().t()
    reference.fp8_gemm_nt((a[0], sfa_mn_major), (b[0], sfb_transposed), d_mn_major)
    assert torch.equal(d_mn_major, d_contiguous)
    _assert_close(d_contiguous, _deq_token64(*a) @ _deq_block64(*b).T)


def test_fp8_gemm_nt_c_may_alias_d() -> None:
    a, b = _operands(9, 40, 256, seed=6)
    c = torch.randn(9, 40, generator=torch.Generator().manual_seed(60))
    d = c.clone()
    reference.fp8_gemm_nt(a, b, d, c=d)
    _assert_close(d, c.double().numpy() + _deq_token64(*a) @ _deq_block64(*b).T)


def test_fp8_gemm_nt_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 3 rows exercise the chunk boundaries (including a short last chunk).
    m, n, k = 11, 20, 200
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 4 * k * 3)
    a, b = _operands(m, n, k, seed=7)
    c = torch.randn(m, n, generator=torch.Generator().manual_seed(70))
    d = _poisoned((m, n), torch.float32)
    reference.fp8_gemm_nt(a, b, d, c=c)
    _assert_close(d, c.double().numpy() + _deq_token64(*a) @ _deq_block64(*b).T)


def test_fp8_gemm_nt_empty_m() -> None:
    a, b = _operands(0, 16, 128, seed=8)
    d = torch.empty(0, 16)
    reference.fp8_gemm_nt(a, b, d)
    assert d.shape == (0, 16)


def test_fp8_gemm_nt_end_to_end_with_casts() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(64, 320, generator=gen).to(torch.bfloat16)
    w = torch.randn(200, 320, generator=gen).to(torch.bfloat16)
    expected = x.double() @ w.double().T
    for use_ue8m0 in (False, True):
        d = torch.empty(64, 200, dtype=torch.bfloat16)
        a = quant.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
        b = quant.per_block_cast_to_fp8(w, use_ue8m0=use_ue8m0)
        reference.fp8_gemm_nt(a, b, d)
        assert testing.calc_diff(d, expected) < 1e-3


def test_fp8_gemm_nt_validates_arguments() -> None:
    a, b = _operands(4, 8, 200, seed=10)
    d = torch.empty(4, 8)
    with pytest.raises(ValueError, match=r"d: expected shape"):
        reference.fp8_gemm_nt(a, b, torch.empty(4, 9))
    with pytest.raises(TypeError, match=r"d: expected dtype"):
        reference.fp8_gemm_nt(a, b, torch.empty(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"b\[0\]: expected shape"):
        reference.fp8_gemm_nt(a, (b[0][:, :100], b[1]), d)
    with pytest.raises(ValueError, match=r"a\[1\]: expected shape"):
        reference.fp8_gemm_nt((a[0], a[1][:, :1]), b, d)
    with pytest.raises(ValueError, match=r"b\[1\]: expected shape"):
        reference.fp8_gemm_nt(a, (b[0], torch.ones(2, 2)), d)
    with pytest.raises(TypeError, match=r"a\[0\]: expected dtype"):
        reference.fp8_gemm_nt((a[0].float(), a[1]), b, d)
    with pytest.raises(ValueError, match=r"c: expected shape"):
        reference.fp8_gemm_nt(a, b, d, c=torch.zeros(8, 4))


# ---------------------------------------------------------------------------------------------------------
# m_grouped_fp8_gemm_nt_contiguous
# ---------------------------------------------------------------------------------------------------------


def _grouped_expected(a, b) -> np.ndarray:
    """float64 [G, M, N]: every row of A against every group's B (rows picked by the caller)."""
    a64 = _deq_token64(*a)
    b64 = _deq_block64(*b)
    return np.stack([a64 @ b64[g].T for g in range(b64.shape[0])])


def _check_rows(d: torch.Tensor, owner: list[int], expected: np.ndarray) -> None:
    """Rows with owner g >= 0 must match ``expected[g, row]``; rows with owner -1 must still be NaN."""
    for row, group in enumerate(owner):
        if group < 0:
            assert torch.isnan(d[row]).all(), f"row {row} should be untouched"
        else:
            _assert_close(d[row], expected[group, row])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_contiguous_with_padding_and_empty_group(out_dtype: torch.dtype) -> None:
    m_total, n, k, groups = 300, 200, 200, 4
    a, b = _operands(m_total, n, k, seed=20, groups=groups)
    gen = torch.Generator().manual_seed(21)
    # Ids -1 and G (= 4) are padding; group 2 gets no rows.
    choices = torch.tensor([0, 1, 3, -1, groups])
    layout = choices[torch.randint(0, 5, (m_total,), generator=gen)].to(torch.int32)
    d = _poisoned((m_total, n), out_dtype)
    reference.m_grouped_fp8_gemm_nt_contiguous(a, b, d, layout)
    owner = [g if 0 <= g < groups else -1 for g in layout.tolist()]
    assert 2 not in owner and -1 in owner
    _check_rows(d, owner, _grouped_expected(a, b))


def test_contiguous_aligned_segments_with_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    # DeepGEMM-style layout: each group's segment padded to 128 rows with -1.
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 4 * 256 * 50)  # 50-row chunks
    sizes, n, k, groups = [100, 0, 130], 256, 256, 3
    layout: list[int] = []
    for g, size in enumerate(sizes):
        layout += [g] * size + [-1] * (math.ceil(size / 128) * 128 - size)
    m_total = len(layout)
    a, b = _operands(m_total, n, k, seed=22, groups=groups)
    d = _poisoned((m_total, n), torch.float32)
    reference.m_grouped_fp8_gemm_nt_contiguous(a, b, d, torch.tensor(layout, dtype=torch.int32))
    _check_rows(d, layout, _grouped_expected(a, b))


def _psum_owner(ends: list[int], m_total: int) -> list[int]:
    owner = [-1] * m_total
    for g, end in enumerate(ends):
        start = 0 if g == 0 else -(-ends[g - 1] // 128) * 128
        for row in range(start, end):
            owner[row] = g
    return owner


@pytest.mark.parametrize(
    "ends",
    [[50, 200, 260], [100, 100, 300], [128, 256, 384], [0, 130, 256], [384, 384, 384]],
)
def test_contiguous_psum_layout(ends: list[int]) -> None:
    m_total, n, k = 384, 130, 160
    a, b = _operands(m_total, n, k, seed=sum(ends), groups=len(ends))
    d = _poisoned((m_total, n), torch.float32)
    grouped_layout = torch.tensor(ends, dtype=torch.int32)
    reference.m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, use_psum_layout=True)
    _check_rows(d, _psum_owner(ends, m_total), _grouped_expected(a, b))


def test_contiguous_psum_layout_rejects_out_of_range_end() -> None:
    a, b = _operands(256, 64, 128, seed=23, groups=2)
    with pytest.raises(ValueError, match="grouped_layout"):
        reference.m_grouped_fp8_gemm_nt_contiguous(
            a, b, torch.empty(256, 64), torch.tensor([100, 300], dtype=torch.int32), use_psum_layout=True
        )
    with pytest.raises(ValueError, match="grouped_layout"):
        reference.m_grouped_fp8_gemm_nt_contiguous(
            a, b, torch.empty(256, 64), torch.tensor([100, 200, 256], dtype=torch.int32), use_psum_layout=True
        )


def test_contiguous_validates_arguments() -> None:
    a, b = _operands(128, 64, 128, seed=24, groups=2)
    with pytest.raises(ValueError, match="grouped_layout"):
        reference.m_grouped_fp8_gemm_nt_contiguous(
            a, b, torch.empty(128, 64), torch.zeros(127, dtype=torch.int32)
        )
    with pytest.raises(TypeError, match="grouped_layout: expected an integer dtype"):
        reference.m_grouped_fp8_gemm_nt_contiguous(a, b, torch.empty(128, 64), torch.zeros(128))
    with pytest.raises(ValueError, match=r"d: expected shape"):
        reference.m_grouped_fp8_gemm_nt_contiguous(
            a, b, torch.empty(128, 65), torch.zeros(128, dtype=torch.int32)
        )
    with pytest.raises(ValueError, match=r"b\[1\]: expected shape"):
        reference.m_grouped_fp8_gemm_nt_contiguous(
            a, (b[0], b[1][:1]), torch.empty(128, 64), torch.zeros(128, dtype=torch.int32)
        )


# ---------------------------------------------------------------------------------------------------------
# m_grouped_fp8_gemm_nt_masked
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_masked(out_dtype: torch.dtype) -> None:
    groups, max_m, n, k = 5, 6, 150, 200
    gen = torch.Generator().manual_seed(30)
    a = (_fp8((groups, max_m, k), gen), _scales((groups, max_m, _kb(k)), gen))
    b = (_fp8((groups, n, k), gen), _scales((groups, _kb(n), _kb(k)), gen))
    masked_m = torch.tensor([0, 3, 9, 6, -2], dtype=torch.int32)  # 9 clamps to 6, -2 to 0
    d = _poisoned((groups, max_m, n), out_dtype)
    reference.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m=4)
    a64, b64 = _deq_token64(*a), _deq_block64(*b)
    for g, valid in enumerate([0, 3, 6, 6, 0]):
        _assert_close(d[g, :valid], a64[g, :valid] @ b64[g].T)
        assert torch.isnan(d[g, valid:]).all(), f"group {g}: rows from {valid} should be untouched"


def test_masked_validates_arguments() -> None:
    gen = torch.Generator().manual_seed(31)
    a = (_fp8((2, 4, 128), gen), _scales((2, 4, 1), gen))
    b = (_fp8((2, 32, 128), gen), _scales((2, 1, 1), gen))
    d = torch.empty(2, 4, 32)
    with pytest.raises(ValueError, match="masked_m"):
        reference.m_grouped_fp8_gemm_nt_masked(a, b, d, torch.ones(3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"b\[0\]: expected shape"):
        b3 = (_fp8((3, 32, 128), gen), _scales((3, 1, 1), gen))
        reference.m_grouped_fp8_gemm_nt_masked(a, b3, d, torch.ones(2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"d: expected shape"):
        reference.m_grouped_fp8_gemm_nt_masked(a, b, d[:, :3], torch.ones(2, dtype=torch.int32), 4)


# ---------------------------------------------------------------------------------------------------------
# bf16_gemm_nt
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 128), (7, 130, 200), (129, 3, 64)])
def test_bf16_gemm_nt(m: int, n: int, k: int, out_dtype: torch.dtype, with_c: bool) -> None:
    gen = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    c = torch.randn(m, n, generator=gen) * 5 if with_c else None
    d = _poisoned((m, n), out_dtype)
    reference.bf16_gemm_nt(a, b, d, c=c)
    expected = a.double().numpy() @ b.double().numpy().T
    if c is not None:
        expected = expected + c.double().numpy()
    _assert_close(d, expected)


def test_bf16_gemm_nt_validates_arguments() -> None:
    a = torch.zeros(4, 16, dtype=torch.bfloat16)
    b = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"a: expected dtype"):
        reference.bf16_gemm_nt(a.float(), b, torch.empty(4, 8))
    with pytest.raises(ValueError, match=r"b: expected shape"):
        reference.bf16_gemm_nt(a, b[:, :8], torch.empty(4, 8))
    with pytest.raises(ValueError, match=r"d: expected shape"):
        reference.bf16_gemm_nt(a, b, torch.empty(8, 4))
