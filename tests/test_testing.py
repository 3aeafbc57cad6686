"""CPU tests of the accuracy metric and the timers' guards (moegemm.testing)."""

from __future__ import annotations

import pytest
import torch

from moegemm import testing

# ---- calc_diff ------------------------------------------------------------------------------------


def test_calc_diff_properties() -> None:
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(17, 33, generator=gen)
    y = torch.randn(17, 33, generator=gen)
    assert testing.calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert testing.calc_diff(x, -x) == pytest.approx(2.0, abs=1e-12)
    assert testing.calc_diff(x, torch.zeros_like(x)) == pytest.approx(1.0, abs=1e-12)
    assert testing.calc_diff(x, 2 * x) == pytest.approx(0.2, abs=1e-12)  # 1 - 4/5
    assert testing.calc_diff(x, y) == pytest.approx(testing.calc_diff(y, x), abs=1e-15)
    assert testing.calc_diff(4 * x, 4 * y) == pytest.approx(testing.calc_diff(x, y), abs=1e-12)  # exact scaling
    xs, ys = x.double().numpy(), y.double().numpy()
    expected = 1 - 2 * (xs * ys).sum() / (xs * xs + ys * ys).sum()
    assert testing.calc_diff(x, y) == pytest.approx(expected, abs=1e-12)
    assert 0 <= testing.calc_diff(x, y) <= 2


def test_calc_diff_zeros_and_types() -> None:
    result = testing.calc_diff(torch.zeros(4, 4), torch.zeros(4, 4))
    assert result == 0.0 and isinstance(result, float)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(32)).to(torch.bfloat16)
    result = testing.calc_diff(x, x.float() * (1 + 1e-3))
    assert isinstance(result, float) and 0 < result < 1e-5


def test_calc_diff_uses_float64() -> None:
    # In float32 the two sums round to the same value and the difference would vanish.
    x = torch.full((1 << 16,), 1.0, dtype=torch.float32)
    y = x.clone()
    y[0] = 1.0 + 2**-10
    expected = (2**-10) ** 2 / (2 * (1 << 16))  # 1 - 2xy/(x^2+y^2) = (x-y)^2/(x^2+y^2), summed
    assert testing.calc_diff(x, y) == pytest.approx(expected, rel=1e-3)


def test_calc_diff_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        testing.calc_diff(torch.ones(2, 3), torch.ones(3, 2))


# ---- timing and import hygiene --------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_bench_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="bench_kernel needs a CUDA GPU"):
        testing.bench_kernel(lambda: None)
    with pytest.raises(RuntimeError, match="bench_graph needs a CUDA GPU"):
        testing.bench_graph(lambda: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_gpu() -> None:
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    t_kernel = testing.bench_kernel(lambda: torch.matmul(a, a, out=out), iters=5)
    t_graph = testing.bench_graph(lambda: torch.matmul(a, a, out=out), iters=5)
    assert 0 < t_kernel < 1e5 and 0 < t_graph < 1e5
