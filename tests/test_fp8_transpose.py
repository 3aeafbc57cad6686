"""transpose_fp8: the SM90 kernel (moegemm.kernels.fp8_transpose) against x.mT bit for bit (GPU); the
torch path, the argument checks and the kernel's compile report (CPU)."""

from __future__ import annotations

import pytest
import torch

import moegemm
from moegemm.jit import compiler
from moegemm.kernels import fp8_transpose

gpu = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


def random_fp8(*shape: int, device: str = "cuda") -> torch.Tensor:
    """Every byte pattern but NaN's: a transpose must move each bit."""
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return codes.masked_fill((codes & 0x7F) == 0x7F, 0).view(FP8)


def assert_transposed(out: torch.Tensor, x: torch.Tensor) -> None:
    assert out.dtype == FP8 and out.is_contiguous() and out.shape == x.mT.shape, (out.dtype, out.shape, out.stride())
    assert torch.equal(out.view(torch.uint8).cpu(), x.mT.view(torch.uint8).cpu())


# ---- GPU ------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("shape", [(4, 4), (128, 128), (7168, 2048), (2048, 7168), (132, 260), (4, 1028),
                                   (1000, 12), (3, 256, 384), (5, 132, 68)])
def test_kernel_matches_torch(shape):
    x = random_fp8(*shape)
    assert fp8_transpose.handles(x)
    poisoned = torch.full(x.mT.shape, 0x7F, dtype=torch.uint8, device="cuda").view(FP8)  # NaN in every byte
    out = fp8_transpose.plan(x).run(x, poisoned)
    assert_transposed(out, x)


@gpu
def test_strided_rows_and_batches():
    """A view: row pitch and batch pitch wider than the data."""
    base = random_fp8(4, 260, 520)
    x = base[::2, 4:132, 8:264]
    assert fp8_transpose.handles(x)
    assert_transposed(moegemm.transpose_fp8(x)[0], x)


@gpu
@pytest.mark.parametrize("shape", [(6, 130), (130, 6), (1, 128)])
def test_shapes_the_kernel_declines_take_the_torch_path(shape):
    x = random_fp8(*shape)
    assert not fp8_transpose.handles(x)
    assert_transposed(moegemm.transpose_fp8(x)[0], x)


@gpu
def test_scales_transpose_with_the_data():
    w = torch.randn(2048, 7168, device="cuda")
    w_fp8, sf = moegemm.per_block_cast_to_fp8(w)
    w_t, sf_t = moegemm.transpose_fp8(w_fp8, sf)
    assert_transposed(w_t, w_fp8)
    assert sf_t.is_contiguous() and torch.equal(sf_t, sf.T)
    # The transposed pair dequantises to the transpose of the original's dequantisation.
    dequant = moegemm.reference.dequantize_per_block
    assert torch.equal(dequant(w_t, sf_t), dequant(w_fp8, sf).T)


# ---- CPU ------------------------------------------------------------------------------------------------


def test_torch_path_on_cpu():
    x = random_fp8(2, 12, 20, device="cpu")
    sf = torch.rand(2, 1, 1)
    out, sf_t = moegemm.transpose_fp8(x, sf)
    assert_transposed(out, x)
    assert sf_t.shape == (2, 1, 1)
    assert moegemm.transpose_fp8(x[0])[1] is None


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 4), "float8_e4m3fn"),
    (torch.zeros(4, dtype=FP8), "2-D or 3-D"),
    ("x", "torch.Tensor"),
])
def test_bad_x_is_named(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        moegemm.transpose_fp8(bad)


def test_bad_scales_are_named():
    x = torch.zeros(2, 8, 8, dtype=FP8)
    with pytest.raises(ValueError, match="sf: expected x's block scales"):
        moegemm.transpose_fp8(x, torch.ones(3, 1, 1))


def test_kernel_compiles_without_spills(cache):
    build = fp8_transpose.build(None)
    report = build.resources()
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    assert report.registers <= 32, report  # eight CTAs of 256 threads an SM
    sass = compiler.disassemble(build.cubin_path)
    assert "PRMT" in sass and "STG.E " in sass  # byte permutes, 4-byte stores
