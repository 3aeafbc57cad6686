"""tf32_hc_prenorm_gemm: argument checks and the CPU path (reference), and the SM90 kernel against
float64 (GPU): D within TF32's rounding of B, sqr_sum within FP32 summation, every split's partial
sums where reference.hc_prenorm_split_ranges puts them."""

import pytest
import torch

import moegemm
from moegemm import calc_diff, reference

gpu = pytest.mark.gpu
BF16 = torch.bfloat16


def _inputs(m: int, n: int, k: int, num_splits: int | None, device: str = "cuda"):
    a = torch.randn(m, k, device=device, dtype=BF16)
    b = torch.randn(n, k, device=device)
    lead = () if num_splits is None else (num_splits,)
    d = torch.full((*lead, m, n), float("nan"), device=device)
    sqr_sum = torch.full((*lead, m), float("nan"), device=device)
    return a, b, d, sqr_sum


def _check_against_float64(a, b, d, sqr_sum, num_splits) -> None:
    """Each split's partial D and sqr_sum over its own columns; D's TF32 products (B rounded to 10
    mantissa bits) stay within calc_diff 1e-6 of the exact sums, sqr_sum's FP32 sums within 1e-10."""
    assert not torch.isnan(d).any() and not torch.isnan(sqr_sum).any(), "unwritten (NaN-poisoned) outputs"
    k = a.shape[1]
    ranges = [slice(0, k)] if num_splits is None else reference.hc_prenorm_split_ranges(k, num_splits)
    d = d.reshape(len(ranges), *d.shape[-2:])
    sqr_sum = sqr_sum.reshape(len(ranges), -1)
    for split, columns in enumerate(ranges):
        a64, b64 = a[:, columns].double(), b[:, columns].double()
        exact_d, exact_sqr = a64 @ b64.t(), a64.square().sum(-1)
        if columns.stop == columns.start:
            assert (d[split] == 0).all() and (sqr_sum[split] == 0).all(), f"split {split} has no columns: zeros"
            continue
        assert calc_diff(d[split].double(), exact_d) < 1e-6, f"split {split}: D"
        assert calc_diff(sqr_sum[split].double(), exact_sqr) < 1e-10, f"split {split}: sqr_sum"


@pytest.mark.parametrize("num_splits", [None, 3])
def test_cpu_runs_the_reference(num_splits):
    inputs = _inputs(5, 24, 320, num_splits, device="cpu")
    moegemm.tf32_hc_prenorm_gemm(*inputs, num_splits=num_splits)
    _check_against_float64(*inputs, num_splits)


def test_checks_name_the_argument():
    a, b, d, sqr_sum = _inputs(4, 24, 64, None, device="cpu")
    with pytest.raises(TypeError, match="b: expected dtype torch.float32"):
        moegemm.tf32_hc_prenorm_gemm(a, b.to(BF16), d, sqr_sum)
    with pytest.raises(ValueError, match=r"b: expected shape \[N, K\] with K = 64"):
        moegemm.tf32_hc_prenorm_gemm(a, b[:, :32], d, sqr_sum)
    with pytest.raises(ValueError, match=r"d: expected a 3-D tensor, got shape \(4, 24\)"):
        moegemm.tf32_hc_prenorm_gemm(a, b, d, sqr_sum, num_splits=2)
    with pytest.raises(ValueError, match=r"sqr_sum: expected shape \(4,\)"):
        moegemm.tf32_hc_prenorm_gemm(a, b, d, sqr_sum[:2])
    with pytest.raises(ValueError, match="num_splits: expected None or an int >= 1, got 0"):
        moegemm.tf32_hc_prenorm_gemm(a, b, d, sqr_sum, num_splits=0)


@gpu
@pytest.mark.parametrize("m", [1, 13, 137, 4096])
@pytest.mark.parametrize("n,k", [(24, 28672), (24, 7168), (8, 200), (17, 520), (256, 1024)])
@pytest.mark.parametrize("num_splits", [None, 1, 16])
def test_shapes(m, n, k, num_splits, seed):
    inputs = _inputs(m, n, k, num_splits)
    moegemm.tf32_hc_prenorm_gemm(*inputs, num_splits=num_splits)
    _check_against_float64(*inputs, num_splits)


@gpu
def test_more_splits_than_blocks_and_empty_inputs():
    inputs = _inputs(70, 24, 200, 7)  # 4 blocks of K for 7 splits: the last three write zeros
    moegemm.tf32_hc_prenorm_gemm(*inputs, num_splits=7)
    _check_against_float64(*inputs, 7)
    a, b, d, sqr_sum = _inputs(3, 24, 0, None)
    moegemm.tf32_hc_prenorm_gemm(a, b, d, sqr_sum)
    assert (d == 0).all() and (sqr_sum == 0).all(), "K = 0: the sums are empty"


@gpu
def test_rejects_n_above_256():
    a, b, d, sqr_sum = _inputs(4, 264, 64, None)
    with pytest.raises(ValueError, match=r"b: expected N \(rows\) in \[1, 256\], got 264"):
        moegemm.tf32_hc_prenorm_gemm(a, b, d, sqr_sum)
