"""The FP8 x FP4 GEMMs (dense, contiguous, masked): the e2m1 widening's exactness, argument checks
and the reference (CPU), and the SM90 kernels against the reference (GPU)."""

import dataclasses

import pytest
import torch
from conftest import H100, gpu_facts, needs_sass_tools

import moegemm
from moegemm import calc_diff, per_token_cast_to_fp4, per_token_cast_to_fp8, reference
from moegemm.gemm.desc import GemmDesc, GemmType
from moegemm.jit import compiler
from moegemm.kernels import fp4_widen, fp8_fp4_gemm, fp8_gemm
from moegemm.quant import packed_ue8m0_mn_major

gpu = pytest.mark.gpu


def make_inputs(m, n, k, device="cuda", groups=None):
    """BF16 x and w, and their casts: A per 1x128 (FP32 scales), B FP4 per 1x32 (UE8M0)."""
    lead = () if groups is None else (groups,)
    x = torch.randn(*lead, m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(*lead, n, k, device=device, dtype=torch.bfloat16)
    a, sfa = per_token_cast_to_fp8(x.flatten(0, -2))
    b, sfb = per_token_cast_to_fp4(w.flatten(0, -2), use_ue8m0=True, gran_k=32)
    a, sfa = a.view(*lead, m, k), sfa.view(*lead, m, -1)
    b, sfb = b.view(*lead, n, k // 2), sfb.view(*lead, n, -1)
    return x, w, (a, sfa), (b, sfb)


def poisoned(shape, dtype, device="cuda"):
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def assert_close(d, ref, tol=1e-5):
    assert not torch.isnan(d).any(), "unwritten (NaN-poisoned) output elements"
    diff = calc_diff(d.float(), ref.float())
    assert diff < tol, f"calc_diff {diff:.3e} >= {tol}"


def dense_reference(a, b, c=None):
    out = torch.empty(a[0].shape[0], b[0].shape[0], device=a[0].device)
    reference.fp8_fp4_gemm_nt(a, b, out, c)
    return out


# ---- CPU ------------------------------------------------------------------------------------------------------


def test_reference_matches_the_dequantised_product(seed):
    x, w, a, b = make_inputs(40, 72, 256, device="cpu")
    d = torch.empty(40, 72)
    moegemm.fp8_fp4_gemm_nt(a, b, d)
    b_float = moegemm.cast_back_from_fp4(b[0], b[1], gran_k=32)
    a_float = a[0].float() * a[1].repeat_interleave(128, dim=1)
    assert calc_diff(d, a_float @ b_float.t()) < 1e-10
    assert calc_diff(d, x.float() @ w.float().t()) < 0.01  # DeepGEMM's bound against the BF16 inputs


def test_packed_and_float_scales_agree(seed):
    _, _, a, b = make_inputs(8, 40, 384, device="cpu")
    packed = packed_ue8m0_mn_major(b[1], 40, 384)
    assert packed.dtype == torch.int32 and packed.shape == (40, 3) and packed.stride() == (1, 40)
    d_float, d_packed = torch.empty(8, 40), torch.empty(8, 40)
    moegemm.fp8_fp4_gemm_nt(a, b, d_float)
    moegemm.fp8_fp4_gemm_nt(a, (b[0], packed), d_packed)
    assert torch.equal(d_float, d_packed)
    assert packed_ue8m0_mn_major(packed, 40, 384) is packed
    transformed = moegemm.transform_sf_into_required_layout(b[1], 40, 384, (1, 32))
    assert torch.equal(transformed, packed)


def test_fp8_b_runs_the_fp8_gemm(seed):
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    a, b = per_token_cast_to_fp8(x), moegemm.per_block_cast_to_fp8(w)
    d, ref = torch.empty(16, 64), torch.empty(16, 64)
    moegemm.fp8_fp4_gemm_nt(a, b, d)
    moegemm.fp8_gemm_nt(a, b, ref)
    assert torch.equal(d, ref)


@pytest.mark.parametrize("change,error,match", [
    (lambda a, b, d: ((a[0], a[1]), (b[0][:, :-16], b[1]), d), ValueError, "b: expected shape"),
    (lambda a, b, d: ((a[0][:, :80], a[1][:, :1]), (b[0][:, :40], b[1][:, :3]), d), ValueError, "multiple of 32"),
    (lambda a, b, d: (a, (b[0], b[1][:, :-1]), d), ValueError, "sfb: expected shape"),
    (lambda a, b, d: (a, (b[0], b[1].double()), d), TypeError, "sfb: expected dtype"),
    (lambda a, b, d: (a, b, d.half()), TypeError, "d: expected dtype"),
])
def test_bad_arguments_raise(change, error, match):
    _, _, a, b = make_inputs(8, 64, 256, device="cpu")
    a, b, d = change(a, b, torch.empty(8, 64))
    with pytest.raises(error, match=match):
        moegemm.fp8_fp4_gemm_nt(a, b, d)


def test_unsupported_recipes_raise():
    x, _, a, b = make_inputs(8, 64, 256, device="cpu")
    with pytest.raises(ValueError, match="recipe_a: expected \\(1, 128\\) .* or \\(1, 32\\)"):
        moegemm.fp8_fp4_gemm_nt(a, b, torch.empty(8, 64), recipe_a=(1, 64))
    with pytest.raises(ValueError, match="recipe_b: expected \\(1, 32\\)"):
        moegemm.fp8_fp4_gemm_nt(a, b, torch.empty(8, 64), recipe=(1, 128, 128))
    # A recipe that disagrees with the scales given names both.
    with pytest.raises(ValueError, match="sfa: expected float32 \\[..., ceil\\(K/32\\)\\].*recipe_a \\(1, 32\\)"):
        moegemm.fp8_fp4_gemm_nt(a, b, torch.empty(8, 64), recipe_a=(1, 32))
    a32 = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
    with pytest.raises(ValueError, match="sfa: expected float32 \\[..., ceil\\(K/128\\)\\].*recipe_a \\(1, 128\\)"):
        moegemm.fp8_fp4_gemm_nt(a32, b, torch.empty(8, 64), recipe_a=(1, 128))
    with pytest.raises(ValueError, match=r"sfa: expected float32 \(8, 2\) \(1x128 scales\) or \(8, 8\)"):
        moegemm.fp8_fp4_gemm_nt((a32[0], a32[1][:, :5]), b, torch.empty(8, 64))


def _activations_1x32(x, packed):
    """A cast with UE8M0 scales per 1x32: float32 [..., ceil(K/32)] or packed int32 [..., ceil(K/128)]."""
    a, sf = per_token_cast_to_fp8(x.flatten(0, -2), use_ue8m0=True, gran_k=32, use_packed_ue8m0=packed)
    return a.view(x.shape), sf.view(*x.shape[:-1], -1)


def _spread_rows(x, spread_log2=20):
    """x with its 1x32 blocks scaled over 2^spread_log2 (alternate blocks far smaller)."""
    k = x.shape[-1]
    scale = torch.ones(k // 32, device=x.device)
    scale[1::2] = 2.0 ** -spread_log2
    return x * scale.repeat_interleave(32).to(x.dtype)


@pytest.mark.parametrize("packed", [False, True])
def test_activations_with_1x32_scales(packed, seed):
    """A's (1, 32) recipe (CPU: the reference): the product of the exactly dequantised operands, and the
    fold the kernels take it through within 1e-9 of it, even with 1x32 scales 2^20 apart."""
    x, w, _, b = make_inputs(24, 48, 384, device="cpu")
    x = _spread_rows(x)
    a = _activations_1x32(x, packed)
    assert a[1].shape == ((24, 3) if packed else (24, 12))
    d = torch.empty(24, 48)
    moegemm.fp8_fp4_gemm_nt(a, b, d, recipe_a=(1, 32))
    a_float, b_float = reference.dequantize_per_token(*_activations_1x32(x, False), 32), reference.dequantize_fp4(*b)
    assert calc_diff(d, a_float @ b_float.t()) < 1e-10
    folded = moegemm.quant.fold_1x32_scales(*a)
    assert folded[1].shape == (24, 3) and folded[1].stride() == (1, 24)
    d_folded = torch.empty(24, 48)
    moegemm.fp8_fp4_gemm_nt(folded, b, d_folded)
    assert calc_diff(d_folded, d) < 1e-9


def test_heuristic_tiles_fit_the_kernel():
    for m in (1, 64, 128, 4096):
        for n, k in ((2112, 7168), (7168, 2048), (24576, 1536), (576, 512)):
            config = fp8_fp4_gemm.select_config(GemmDesc(GemmType.NORMAL, m, n, k), H100)
            assert config.block_m <= 128 and config.block_n <= 128 and config.cluster_m == 1
            assert config.smem_bytes <= H100.smem_per_block and config.stages >= 3


# ---- GPU: the widening, exact while a block's scales span at most 2^14 ---------------------------------------


def _with_spread(b, sfb, spread_log2):
    """SFB whose four 1x32 exponents in every 128-wide block span 2^spread_log2."""
    sfb = sfb.clone()
    sfb[..., 1::4] *= 2.0 ** -spread_log2
    return b, sfb


@gpu
@pytest.mark.parametrize("m", [64, 256])  # the swap-AB kernel, the widening one
@pytest.mark.parametrize("spread_log2", [0, 8, 11, 12, 14])
def test_scale_spread_within_the_exact_range(spread_log2, m, seed):
    _, _, a, b = make_inputs(m, 256, 512)
    b = _with_spread(*b, spread_log2)
    d = poisoned((m, 256), torch.float32)
    moegemm.fp8_fp4_gemm_nt(a, b, d)
    assert_close(d, dense_reference(a, b), tol=1e-6)


@gpu
@pytest.mark.parametrize("m", [64, 256])
def test_scale_spread_past_the_exact_range_rounds_the_small_blocks(m, seed):
    _, _, a, b = make_inputs(m, 256, 512)
    b = _with_spread(*b, 20)
    d = poisoned((m, 256), torch.float32)
    moegemm.fp8_fp4_gemm_nt(a, b, d)
    assert_close(d, dense_reference(a, b), tol=1e-5)


# ---- GPU: shapes through the public API ------------------------------------------------------------------------

SHAPES = [(1, 2112, 7168), (1, 128, 128), (7, 256, 384), (64, 4096, 7168), (127, 7168, 2048), (128, 24576, 1536),
          (129, 136, 512), (300, 32768, 512), (4096, 7168, 2048), (513, 1000, 224), (2, 8, 32), (200, 264, 4096)]


@gpu
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_shapes(m, n, k, seed):
    x, w, a, b = make_inputs(m, n, k)
    d = poisoned((m, n), torch.bfloat16)
    moegemm.fp8_fp4_gemm_nt(a, b, d)
    assert_close(d, dense_reference(a, b))
    if m * n >= 1024 and k >= 128:
        assert calc_diff(d.float(), x.float() @ w.float().t()) < 0.01


@gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (100, 520, 992), (1024, 4096, 1024)])
def test_fp32_out_and_accumulate(m, n, k, seed):
    _, _, a, b = make_inputs(m, n, k)
    d = poisoned((m, n), torch.float32)
    moegemm.fp8_fp4_gemm_nt(a, b, d)
    assert_close(d, dense_reference(a, b))
    c = torch.randn(m, n, device="cuda")
    d2 = c.clone()
    moegemm.fp8_fp4_gemm_nt(a, b, d2, c=d2)
    assert_close(d2, dense_reference(a, b, c))


def _configs():
    configs = set()
    for m in (1, 64, 128, 1000, 4096):
        for n, k in ((2112, 7168), (7168, 2048), (576, 512), (24, 512)):
            for out_dtype in (torch.bfloat16, torch.float32):
                configs.add(fp8_fp4_gemm.select_config(GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=out_dtype), H100))
    base = fp8_fp4_gemm.Fp8Fp4GemmConfig(128, 128, 4, False, False)
    configs |= {dataclasses.replace(base, block_m=64, block_n=n, stages=6) for n in (8, 40, 64, 128)}
    configs |= {dataclasses.replace(base, block_n=n) for n in (16, 48, 64)}
    configs |= {dataclasses.replace(base, cluster_n=2), dataclasses.replace(base, block_m=64, split_k=2)}
    return sorted(configs, key=fp8_fp4_gemm.kernel_name)


CONFIGS = _configs()


@gpu
@pytest.mark.parametrize("config", CONFIGS, ids=fp8_fp4_gemm.kernel_name)
@pytest.mark.parametrize("m,n,k", [(1, 1000, 384), (200, 968, 1184), (300, 2048, 512)])
def test_every_config(config, m, n, k, seed):
    _, _, a, b = make_inputs(m, n, k)
    out_dtype = torch.float32 if config.out_fp32 else torch.bfloat16
    d = poisoned((m, n), out_dtype)
    desc = GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=out_dtype, accumulate=config.accumulate)
    plan = fp8_fp4_gemm.plan(desc, a[0], b[0], d, gpu_facts(), config)
    sfa = moegemm.get_mn_major_tma_aligned_tensor(a[1])
    plan.launch(a[0], sfa, b[0], packed_ue8m0_mn_major(b[1], n, k), d)
    assert_close(d, dense_reference(a, b))


# The swap-AB kernel (few tokens): one and two math warpgroups, token tiles of 8 to 128, K split 1 to 8
# ways, one or two K blocks a stage (the test shapes' odd K block counts end on half a stage).
NORMAL = GemmType.NORMAL
SWAP_AB_CONFIGS = [fp8_fp4_gemm.SwapAbConfig(*args) for args in (
    (2, 8, 8, 1, False, False), (1, 8, 6, 3, False, False, NORMAL, 4), (2, 24, 8, 8, True, False),
    (2, 64, 6, 2, False, False), (1, 64, 6, 1, True, True, NORMAL, 2), (2, 40, 8, 4, True, True),
    (1, 128, 4, 2, False, False), (2, 96, 4, 1, True, True),
    (1, 8, 5, 3, False, False, NORMAL, 4, 2), (2, 24, 4, 8, True, False, NORMAL, 1, 2),
    (2, 64, 3, 2, False, False, NORMAL, 1, 2), (1, 40, 4, 4, True, True, NORMAL, 2, 2),
    (1, 128, 2, 2, False, False, NORMAL, 1, 2), (2, 96, 2, 1, True, True, NORMAL, 1, 2))]


def test_decode_plans_the_swap_ab_kernel():
    for m, n, k in ((1, 7168, 16384), (64, 2112, 7168), (128, 24576, 1536)):
        config = fp8_fp4_gemm.select_swap_ab(GemmDesc(GemmType.NORMAL, m, n, k), H100)
        assert config is not None and config.smem_bytes <= H100.smem_per_block and config.stages >= 3
    assert fp8_fp4_gemm.select_swap_ab(GemmDesc(GemmType.NORMAL, 129, 7168, 2048), H100) is None
    # Masked: one tile of the planned rows, at most 128 tokens, up to 167 rows (128 with the headroom).
    for m, tokens in ((32, 32), (84, 88), (166, 128), (167, 128), (168, None)):
        config = fp8_fp4_gemm.select_swap_ab(GemmDesc(GemmType.MASKED, m, 4096, 7168, 32), H100)
        assert (config and config.tokens) == tokens, m
    # Dense: tiles of up to 64 tokens or one tile, by the split model (BENCHMARKS.md, nineteenth session).
    assert fp8_fp4_gemm.swap_ab_token_tiles(GemmDesc(GemmType.NORMAL, 100, 4096, 7168)) == (56, 104)
    assert fp8_fp4_gemm.select_swap_ab(GemmDesc(GemmType.NORMAL, 100, 4096, 7168), H100).tokens == 56
    assert fp8_fp4_gemm.select_swap_ab(GemmDesc(GemmType.NORMAL, 128, 7168, 16384), H100).tokens == 128
    assert fp8_fp4_gemm.select_swap_ab(GemmDesc(GemmType.CONTIGUOUS, 32, 4096, 7168, 32), H100) is None
    for config in SWAP_AB_CONFIGS:
        assert config.smem_bytes <= H100.smem_per_block


@gpu
@pytest.mark.parametrize("config", SWAP_AB_CONFIGS, ids=fp8_fp4_gemm.kernel_name)
@pytest.mark.parametrize("m,n,k", [(1, 1000, 384), (37, 968, 1184), (64, 2056, 512), (150, 264, 640)])
def test_every_swap_ab_config(config, m, n, k, seed):
    _, _, a, b = make_inputs(m, n, k)
    out_dtype = torch.float32 if config.out_fp32 else torch.bfloat16
    c = torch.randn(m, n, device="cuda") if config.accumulate else None
    d = c.clone() if config.accumulate else poisoned((m, n), out_dtype)
    desc = GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=out_dtype, accumulate=config.accumulate)
    plan = fp8_fp4_gemm.plan(desc, a[0], b[0], d, gpu_facts(), config)
    sfa = moegemm.get_mn_major_tma_aligned_tensor(a[1])
    plan.launch(a[0], sfa, b[0], packed_ue8m0_mn_major(b[1], n, k), d)
    assert_close(d, dense_reference(a, b, c))


@gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("m,n,k,pitch", [(1, 2112, 7168, 7168), (64, 520, 1024, 1024), (300, 1000, 512, 512),
                                         (33, 264, 384, 512)])
def test_activations_with_1x32_scales_on_the_gpu(m, n, k, pitch, packed, seed):
    """A's (1, 32) recipe, folded per call (both kernels; 1x32 scales 2^20 apart; a row pitch over K)."""
    x, _, _, b = make_inputs(m, n, k)
    a = _activations_1x32(_spread_rows(x), packed)
    if pitch != k:
        a = (torch.zeros(m, pitch, device="cuda", dtype=a[0].dtype)[:, :k].copy_(a[0]), a[1])
    d = poisoned((m, n), torch.bfloat16)
    moegemm.fp8_fp4_gemm_nt(a, b, d, recipe_a=(1, 32))
    assert_close(d, dense_reference(a, b))


@gpu
def test_grouped_activations_with_1x32_scales(seed):
    _, _, _, b = make_inputs(1, 264, 512, groups=4)
    x = torch.randn(4, 96, 512, device="cuda", dtype=torch.bfloat16)
    a = _activations_1x32(_spread_rows(x), packed=True)
    masked_m = torch.tensor([0, 96, 40, 7], dtype=torch.int32, device="cuda")
    d = poisoned((4, 96, 264), torch.bfloat16)
    moegemm.m_grouped_fp8_fp4_gemm_nt_masked(a, b, d, masked_m, 48)
    ref = torch.zeros(4, 96, 264, device="cuda")
    reference.m_grouped_fp8_fp4_gemm_nt_masked(a, b, ref, masked_m, 48)
    for g, m in enumerate(masked_m.tolist()):
        if m:
            assert_close(d[g, :m], ref[g, :m])
    layout, m_total = _contiguous_layout([130, 0, 64, 1])
    a = _activations_1x32(torch.randn(m_total, 512, device="cuda", dtype=torch.bfloat16), packed=False)
    d = poisoned((m_total, 264), torch.bfloat16)
    moegemm.m_grouped_fp8_fp4_gemm_nt_contiguous(a, b, d, layout)
    ref = torch.zeros(m_total, 264, device="cuda")
    reference.m_grouped_fp8_fp4_gemm_nt_contiguous(a, b, ref, layout)
    rows = layout >= 0
    assert_close(d[rows], ref[rows])


# ---- B widened before the GEMM (prefill: fp4_widen.py, then the FP8 kernel) ---------------------------------------


@gpu
def test_prefill_plans_the_fp8_kernel_on_b_widened_first():
    threshold = fp8_fp4_gemm.WIDEN_MIN_ROWS
    for m, expected in ((4096, True), (threshold, True), (threshold - 1, False), (128, False)):
        _, _, a, b = make_inputs(m, 512, 256)
        desc = GemmDesc(GemmType.NORMAL, m, 512, 256)
        d = torch.empty(m, 512, device="cuda")
        plan = fp8_fp4_gemm.plan(desc, a[0], b[0], d, gpu_facts())
        assert fp8_fp4_gemm.takes_widened_b(plan) == expected, m
        if expected:
            fp8_b = torch.empty(512, 256, device="cuda", dtype=torch.float8_e4m3fn)
            assert plan.config == fp8_gemm.plan(desc, a[0], fp8_b, d, gpu_facts()).config


@needs_sass_tools
def test_widen_kernel_compiles_without_spills(cache):
    build = fp4_widen.build()
    report = build.resources()
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    assert "PRMT" in compiler.disassemble(build.cubin_path)


def _widened_values(b, packed, groups, n, k):
    """The widening's e4m3 weights times their block scales, [G, N, K] float32."""
    rows = b.view(groups * n, k // 2)
    widened, scales = fp4_widen.plan(rows, groups, n, k).run(rows, packed)
    assert widened.shape == (groups, n, k) and scales.shape == (groups, -(-n // 128), -(-k // 128))
    blocks = scales.repeat_interleave(128, dim=1).repeat_interleave(128, dim=2)[:, :n, :k]
    return widened.float() * blocks, blocks


@gpu
@pytest.mark.parametrize("groups,n,k", [(1, 520, 1184), (3, 264, 512), (1, 2048, 7168), (2, 100, 96)])
def test_widened_weights_times_their_block_scales_are_the_weights(groups, n, k, seed):
    _, _, _, (b, sfb) = make_inputs(1, n, k, groups=groups)
    packed = packed_ue8m0_mn_major(sfb, n, k, groups)
    values, _ = _widened_values(b, packed, groups, n, k)
    exact = moegemm.cast_back_from_fp4(b.view(groups * n, -1), sfb.view(groups * n, -1), 32).view(groups, n, k)
    assert torch.equal(values, exact)


@gpu
def test_widening_a_wide_spread_of_scales_rounds_only_the_small_ones(seed):
    """1x32 scales 2^20 apart inside a 128x128 block: the blocks within 2^14 of the largest stay
    exact, the others round to e4m3's subnormal steps (an error at most 2^-10 of the block's scale)."""
    n, k = 256, 512
    _, _, _, (b, sfb) = make_inputs(1, n, k)
    sfb = sfb.clone()
    sfb[::3, 1::4] *= 2.0**-20
    sfb[1::7, 2::4] *= 2.0**-10
    packed = packed_ue8m0_mn_major(sfb, n, k)
    values, blocks = _widened_values(b, packed, 1, n, k)
    exact = moegemm.cast_back_from_fp4(b, sfb, 32).view(1, n, k)
    far = (sfb.repeat_interleave(32, dim=1)[:, :k] < 2.0**-19).view(1, n, k)
    assert torch.equal(values[~far], exact[~far])
    assert ((values - exact).abs() <= blocks * 2.0**-10).all()


FP8_CONFIGS_FOR_WIDENED_B = [
    fp8_gemm.Fp8GemmConfig(block_m, block_n, fp8_gemm.stages_for(block_m, block_n, 4 if fp32 else 2, 1, H100), fp32,
                           fp32 and block_m == 128, *cluster)
    for block_m, block_n, fp32, cluster in ((128, 128, False, ()), (256, 128, False, (1, 1, GemmType.NORMAL, 2)),
                                            (128, 192, True, (2,)), (64, 48, False, ()), (64, 64, True, ()))]


@gpu
@pytest.mark.parametrize("config", FP8_CONFIGS_FOR_WIDENED_B, ids=fp8_gemm.kernel_name)
@pytest.mark.parametrize("m,n,k", [(300, 968, 1184), (1024, 2048, 512), (1, 264, 128)])
def test_fp8_configs_on_widened_b(config, m, n, k, seed):
    _, _, a, b = make_inputs(m, n, k)
    out_dtype = torch.float32 if config.out_fp32 else torch.bfloat16
    c = torch.randn(m, n, device="cuda") if config.accumulate else None
    d = c.clone() if config.accumulate else poisoned((m, n), out_dtype)
    desc = GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=out_dtype, accumulate=config.accumulate)
    plan = fp8_fp4_gemm.plan(desc, a[0], b[0], d, gpu_facts(), config)
    assert fp8_fp4_gemm.takes_widened_b(plan)
    widened, scales = fp4_widen.plan(b[0], 1, n, k).run(b[0], packed_ue8m0_mn_major(b[1], n, k))
    plan.launch(a[0], moegemm.get_mn_major_tma_aligned_tensor(a[1]), widened, scales, d)
    assert_close(d, dense_reference(a, b, c))


# ---- GPU: the grouped forms --------------------------------------------------------------------------------------


def _contiguous_layout(counts):
    """Per-row expert ids with each expert's rows padded to 128 (-1), and M_total."""
    ids = []
    for g, count in enumerate(counts):
        ids += [g] * count + [-1] * ((-count) % 128)
    return torch.tensor(ids, dtype=torch.int32, device="cuda"), len(ids)


@gpu
@pytest.mark.parametrize("use_psum", [False, True])
@pytest.mark.parametrize("counts,n,k", [([300, 0, 128, 77], 512, 1024), ([4096, 3500, 4200, 4000], 4096, 7168),
                                         ([1, 129, 255], 264, 224)])
def test_contiguous(counts, n, k, use_psum, seed):
    layout, m_total = _contiguous_layout(counts)
    _, _, a, b = make_inputs(m_total, n, k)
    _, _, _, b = make_inputs(1, n, k, groups=len(counts))
    # The psum layout: each expert's end row, its rows starting at the previous end aligned to 128.
    starts = torch.tensor([0] + [-(-c // 128) * 128 for c in counts[:-1]]).cumsum(0)
    ends = (starts + torch.tensor(counts)).to(device="cuda", dtype=torch.int32)
    groups = ends if use_psum else layout
    d = poisoned((m_total, n), torch.bfloat16)
    moegemm.m_grouped_fp8_fp4_gemm_nt_contiguous(a, b, d, groups, use_psum_layout=use_psum)
    ref = poisoned((m_total, n), torch.float32)
    reference.m_grouped_fp8_fp4_gemm_nt_contiguous(a, b, ref, groups, use_psum)
    rows = layout >= 0
    assert torch.isnan(d[~rows].float()).all(), "padding rows were written"
    assert_close(d[rows], ref[rows])


@gpu
@pytest.mark.parametrize("groups,max_m,expected_m,n,k", [(8, 256, 64, 4096, 7168), (32, 384, 256, 576, 512),
                                                         (4, 64, 1, 264, 160), (6, 80, 20, 520, 640),
                                                         (32, 128, 32, 4096, 7168), (8, 320, 128, 2112, 7168)])
def test_masked(groups, max_m, expected_m, n, k, seed):
    _, _, a, b = make_inputs(max_m, n, k, groups=groups)
    masked_m = torch.randint(0, max_m + 1, (groups,), dtype=torch.int32, device="cuda")
    masked_m[0] = 0
    d = poisoned((groups, max_m, n), torch.bfloat16)
    moegemm.m_grouped_fp8_fp4_gemm_nt_masked(a, b, d, masked_m, expected_m)
    ref = torch.zeros(groups, max_m, n, device="cuda")
    reference.m_grouped_fp8_fp4_gemm_nt_masked(a, b, ref, masked_m, expected_m)
    for g, m in enumerate(masked_m.tolist()):
        assert torch.isnan(d[g, m:].float()).all(), f"expert {g}: rows past masked_m were written"
        if m:
            assert_close(d[g, :m], ref[g, :m])


@gpu
# B widened first and the FP8 kernel, the widening kernel, the swap-AB one (128 and 16 tokens)
@pytest.mark.parametrize("expected_m", [256, 180, 100, 16])
def test_masked_cuda_graph_sees_new_counts(expected_m, seed):
    _, _, a, b = make_inputs(128, 512, 512, groups=4)
    b = (b[0], packed_ue8m0_mn_major(b[1], 512, 512, 4))
    masked_m = torch.tensor([128, 5, 0, 77], dtype=torch.int32, device="cuda")
    d = torch.zeros(4, 128, 512, device="cuda", dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_fp4_gemm_nt_masked(a, b, d, masked_m, expected_m)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moegemm.m_grouped_fp8_fp4_gemm_nt_masked(a, b, d, masked_m, expected_m)
    masked_m.copy_(torch.tensor([3, 128, 64, 0], dtype=torch.int32))
    d.zero_()
    graph.replay()
    ref = torch.zeros(4, 128, 512, device="cuda")
    reference.m_grouped_fp8_fp4_gemm_nt_masked(a, b, ref, masked_m, expected_m)
    assert_close(d.float(), ref)
