"""A's (1, 32) recipe folded into 1x128 scales (quant.fold_1x32_scales): exact within e4m3's normal
range, the packed and float32 scales alike (CPU)."""

import torch

import moegemm
from moegemm import quant, reference


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
