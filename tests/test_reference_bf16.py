"""CPU tests for the BF16 references (dense, M-grouped, K-grouped, einsum, the hyper-connection GEMM)
against float64 math written independently here with ``torch.einsum``. Outputs are poisoned with NaN
first so rows a function must not touch can be checked."""

from __future__ import annotations

import pytest
import torch

from moegemm import reference

BF16 = torch.bfloat16


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=BF16)


def _poisoned(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert not torch.isnan(got).any()
    # float32 sums of bf16 products against float64: relative error far below bf16's 2^-9.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("with_c", [False, True])
def test_dense_layouts(layout, with_c):
    m, n, k = 7, 24, 300
    a = _bf16(m, k) if layout[0] == "n" else _bf16(k, m)
    b = _bf16(k, n) if layout[1] == "n" else _bf16(n, k)
    equation = ("mk" if layout[0] == "n" else "km") + "," + ("kn" if layout[1] == "n" else "nk") + "->mn"
    want = torch.einsum(equation, a.double(), b.double())
    c = torch.randn(m, n) if with_c else None
    if with_c:
        want = want + c.double()
    d = _poisoned(m, n)
    getattr(reference, f"bf16_gemm_{layout}")(a, b, d, c)
    _close(d, want)


def test_dense_c_may_be_d_and_k_zero():
    a, b = _bf16(5, 64), _bf16(9, 64)
    d = torch.randn(5, 9)
    want = d.double() + a.double() @ b.double().t()
    reference.bf16_gemm_nt(a, b, d, d)
    _close(d, want)
    d = _poisoned(5, 9)
    reference.bf16_gemm_nt(_bf16(5, 0), _bf16(9, 0), d)
    assert (d == 0).all()


def test_dense_checks():
    with pytest.raises(TypeError, match="a: expected dtype"):
        reference.bf16_gemm_nt(torch.randn(4, 8), _bf16(4, 8), torch.empty(4, 4))
    with pytest.raises(ValueError, match="b: expected shape"):
        reference.bf16_gemm_nn(_bf16(4, 8), _bf16(4, 8), torch.empty(4, 8))
    with pytest.raises(TypeError, match="c: expected dtype"):
        reference.bf16_gemm_nt(_bf16(4, 8), _bf16(4, 8), torch.empty(4, 4), torch.zeros(4, 4, dtype=BF16))


@pytest.mark.parametrize("b_letter", ["t", "n"])
@pytest.mark.parametrize("use_psum_layout", [False, True])
def test_m_grouped_contiguous(b_letter, use_psum_layout):
    # Expert 0: rows 0-2, expert 1: none, expert 2: rows 128-227 (its start aligned up to 128).
    k, n = 64, 16
    a = _bf16(256, k)
    b = _bf16(3, n, k) if b_letter == "t" else _bf16(3, k, n)
    if use_psum_layout:
        layout = torch.tensor([3, 3, 228], dtype=torch.int32)
    else:
        layout = torch.full((256,), -1, dtype=torch.int32)
        layout[:3], layout[128:228] = 0, 2
    d = _poisoned(256, n)
    getattr(reference, f"m_grouped_bf16_gemm_n{b_letter}_contiguous")(a, b, d, layout, use_psum_layout)
    b_nk = b if b_letter == "t" else b.transpose(1, 2)
    _close(d[:3], a[:3].double() @ b_nk[0].double().t())
    _close(d[128:228], a[128:228].double() @ b_nk[2].double().t())
    assert torch.isnan(d[3:128]).all() and torch.isnan(d[228:]).all()


def test_m_grouped_masked():
    a, b = _bf16(3, 10, 64), _bf16(3, 16, 64)
    masked_m = torch.tensor([0, 4, 99], dtype=torch.int32)  # above max_M clamps to it
    d = _poisoned(3, 10, 16, dtype=BF16)
    reference.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 5)
    assert torch.isnan(d[0]).all() and torch.isnan(d[1, 4:]).all()
    torch.testing.assert_close(d[1, :4].double(), a[1, :4].double() @ b[1].double().t(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d[2].double(), a[2].double() @ b[2].double().t(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("with_c", [False, True])
def test_k_grouped(with_c):
    ks, m, n = [128, 0, 256], 24, 40
    a, b = _bf16(sum(ks), m), _bf16(sum(ks), n)
    c = torch.randn(3, m, n) if with_c else None
    d = _poisoned(3, m, n)
    reference.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks, dtype=torch.int32), c)
    start = 0
    for g, length in enumerate(ks):
        want = a[start:start + length].double().t() @ b[start:start + length].double()
        _close(d[g], want + (c[g].double() if with_c else 0))
        start += length


def test_k_grouped_checks():
    a, b, d = _bf16(256, 8), _bf16(256, 8), torch.empty(2, 8, 8)
    with pytest.raises(ValueError, match=r"ks\[1\]: expected a multiple of 128, got 100"):
        reference.k_grouped_bf16_gemm_tn_contiguous(a, b, d, [128, 100])
    with pytest.raises(ValueError, match="ks: expected lengths summing to 256"):
        reference.k_grouped_bf16_gemm_tn_contiguous(a, b, d, [128, 0])
    with pytest.raises(TypeError, match="ks: expected a list of ints"):
        reference.k_grouped_bf16_gemm_tn_contiguous(a, b, d, torch.tensor([128, 128]))
    with pytest.raises(TypeError, match="d: expected dtype"):
        reference.k_grouped_bf16_gemm_tn_contiguous(a, b, d.to(BF16), [128, 128])


@pytest.mark.parametrize("expr", reference.EINSUM_EXPRESSIONS)
@pytest.mark.parametrize("with_c", [False, True])
def test_einsum(expr, with_c):
    shapes = {"b": 5, "m": 6, "n": 7, "k": 64, "h": 3, "r": 40, "d": 24}
    inputs, output = expr.split("->")
    a, b = (_bf16(*(shapes[x] for x in term)) for term in inputs.split(","))
    if expr == "bhr,hdr->bhd":
        b = _bf16(shapes["h"], shapes["d"], shapes["r"] + 8)[..., :shapes["r"]]  # strided, as DeepGEMM's tests
    want = torch.einsum(expr, a.double(), b.double())
    c = torch.randn(want.shape) if with_c else None
    d = _poisoned(*want.shape)
    reference.einsum(" " + expr.replace(",", ", "), a, b, d, c)
    _close(d, want + (c.double() if with_c else 0))


def test_einsum_rejects_other_expressions():
    with pytest.raises(ValueError, match=r"expr: expected one of .*bmk,bnk->mn.*got 'mk,nk->mn'"):
        reference.einsum("mk,nk->mn", _bf16(2, 3), _bf16(2, 3), torch.empty(2, 2))


def test_hc_prenorm_split_ranges():
    assert reference.hc_prenorm_split_ranges(64 * 10 + 5, 4) == [slice(0, 192), slice(192, 384), slice(384, 576),
                                                                 slice(576, 645)]
    ranges = reference.hc_prenorm_split_ranges(100, 4)  # two blocks: the last two splits get none
    assert [r.stop - r.start for r in ranges] == [64, 36, 0, 0]


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_hc_prenorm(num_splits):
    m, n, k = 9, 24, 700
    a, b = _bf16(m, k), torch.randn(n, k)
    lead = () if num_splits is None else (num_splits,)
    d, sqr_sum = _poisoned(*lead, m, n), _poisoned(*lead, m)
    reference.tf32_hc_prenorm_gemm(a, b, d, sqr_sum, num_splits)
    if num_splits is not None:
        for split, columns in enumerate(reference.hc_prenorm_split_ranges(k, num_splits)):
            _close(d[split], a[:, columns].double() @ b[:, columns].double().t())
        d, sqr_sum = d.sum(0), sqr_sum.sum(0)
    _close(d, a.double() @ b.double().t())
    _close(sqr_sum, a.double().square().sum(-1))
