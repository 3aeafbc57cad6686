"""A's (1, 32) recipe folded into 1x128 scales (quant.fold_1x32_scales): the PyTorch path's exactness
(CPU), the SM90 kernel (moegemm.kernels.fp8_fold) against it bit for bit (GPU), and both variants
compiled without spills (CPU)."""

import pytest
import torch
from conftest import needs_sass_tools

import moegemm
from moegemm import quant, reference
from moegemm.jit import compiler
from moegemm.kernels import fp8_fold

gpu = pytest.mark.gpu


def make_activations(shape, packed, spread_log2=0, device="cuda"):
    """An e4m3 cast with 1x32 UE8M0 scales of random data whose 1x32 blocks span 2^spread_log2."""
    x = torch.randn(*shape, device=device)
    blocks = torch.randint(-spread_log2, 1, (*shape[:-1], shape[-1] // 32), device=device)
    x = (x * torch.exp2(blocks.float()).repeat_interleave(32, dim=-1)).to(torch.bfloat16)
    a, sf = moegemm.per_token_cast_to_fp8(x.flatten(0, -2), use_ue8m0=True, gran_k=32, use_packed_ue8m0=packed)
    return a.view(shape), sf.view(*shape[:-1], -1)


def test_fold_is_exact_within_e4m3_normal_range(seed):
    a, sf = make_activations((16, 512), packed=False, spread_log2=12, device="cpu")
    folded, scale = quant.fold_1x32_scales(a, sf)
    assert scale.shape == (16, 4) and scale.stride() == (1, 16)
    exact = reference.dequantize_per_token(a, sf, 32)
    shifted = reference.dequantize_per_token(folded, scale)
    normal = exact.abs() >= scale.repeat_interleave(128, dim=1) * 2.0 ** -6
    assert torch.equal(shifted[normal], exact[normal])
    assert (shifted - exact).abs().max() <= 2.0 ** -10 * scale.max()
    packed = quant.fold_1x32_scales(a, quant.pack_ue8m0(sf))
    assert torch.equal(packed[0].view(torch.uint8), folded.view(torch.uint8)) and torch.equal(packed[1], scale)


@gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape", [(1, 32), (5, 224), (64, 7168), (4, 96, 512), (3, 7, 1056)])
@pytest.mark.parametrize("spread_log2", [0, 12, 40])
def test_kernel_matches_the_torch_path(shape, packed, spread_log2, seed):
    a, sf = make_activations(shape, packed, spread_log2)
    if packed:  # the layout the GEMMs read: MN-major
        sf = moegemm.get_mn_major_tma_aligned_tensor(sf)
    assert quant._use_fold_kernel(a)
    folded, scale = quant.fold_1x32_scales(a, sf)
    ref_folded, ref_scale = quant._fold_1x32_scales_torch(a, sf)
    assert torch.equal(folded.view(torch.uint8), ref_folded.view(torch.uint8))
    assert scale.shape == ref_scale.shape and scale.stride() == ref_scale.stride()
    assert torch.equal(scale, ref_scale)


@gpu
def test_kernel_reads_strided_rows(seed):
    a, sf = make_activations((40, 256), packed=False, spread_log2=6)
    wide = torch.zeros(40, 384, device="cuda", dtype=a.dtype)
    wide[:, :256] = a
    strided = wide[:, :256]
    assert quant._use_fold_kernel(strided)
    ref = quant._fold_1x32_scales_torch(a, sf)
    folded, scale = quant.fold_1x32_scales(strided, sf)
    assert torch.equal(folded.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(scale, ref[1])


@needs_sass_tools
@pytest.mark.parametrize("packed", [False, True])
def test_variant_compiles_without_spills(cache, packed):
    build = fp8_fold.build(packed)
    report = build.resources()
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    sass = compiler.disassemble(build.cubin_path)
    assert "F2FP.SATFINITE.E4M3" in sass and "HMUL2" in sass


def test_packed_scales_of_one_row_with_an_odd_stride(seed):
    # get_mn_major_tma_aligned_tensor gives M = 1 scales the stride (1, 4), which contiguous() keeps.
    a, sf = make_activations((1, 128), packed=True, device="cpu")
    strided = sf.repeat(1, 4).flatten().as_strided((1, 1), (1, 4))
    folded, scale = quant.fold_1x32_scales(a, strided)
    ref_folded, ref_scale = quant.fold_1x32_scales(a, sf)
    assert torch.equal(folded.view(torch.uint8), ref_folded.view(torch.uint8)) and torch.equal(scale, ref_scale)
    assert torch.equal(quant.unpack_ue8m0(strided, 4), quant.unpack_ue8m0(sf, 4))
