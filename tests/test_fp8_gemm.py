"""fp8_gemm_nt: argument checks (CPU) and the SM90 kernel against the reference (GPU)."""

import dataclasses

import pytest
import torch
from conftest import H100, gpu_facts

import moegemm
from moegemm import calc_diff, get_mn_major_tma_aligned_tensor, per_block_cast_to_fp8, per_token_cast_to_fp8, reference
from moegemm.gemm.desc import GemmDesc, GemmType
from moegemm.kernels import fp8_gemm
from moegemm.kernels.fp8_gemm import Fp8GemmConfig

gpu = pytest.mark.gpu


def pick(m, n, k, facts=H100, out_dtype=torch.bfloat16):
    """The heuristic's config for a dense m x n x k GEMM."""
    return fp8_gemm.select_config(GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=out_dtype), facts)


def plan(a, b, d, config, num_sms=None):
    """The kernel plan of ``config`` on these tensors (A [M, K], B [N, K], D [M, N])."""
    desc = fp8_gemm.describe(GemmType.NORMAL, a, b, d, accumulate=config.accumulate)
    return fp8_gemm.plan(desc, a, b, d, gpu_facts(num_sms), config)


def make_inputs(m, n, k, device="cuda"):
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    a, sfa = per_token_cast_to_fp8(x)
    b, sfb = per_block_cast_to_fp8(w)
    return x, w, (a, sfa), (b, sfb)


def poisoned(m, n, dtype, device="cuda"):
    return torch.full((m, n), float("nan"), device=device, dtype=dtype)


def expected(a, b, c=None):
    out = torch.empty(a[0].shape[0], b[0].shape[0], device=a[0].device, dtype=torch.float32)
    reference.fp8_gemm_nt(a, b, out, c)
    return out


def assert_close(d, ref, tol=1e-5):
    assert not torch.isnan(d).any(), "unwritten (NaN-poisoned) output elements"
    diff = calc_diff(d.float(), ref)
    assert diff < tol, f"calc_diff {diff:.3e} >= {tol}"


# ---- GPU: shapes through the public API and its heuristic -------------------------------------------

SHAPES = [
    (1, 2112, 7168), (1, 128, 128), (7, 256, 384), (64, 4096, 7168), (127, 7168, 2048), (128, 24576, 1536),
    (129, 136, 512), (300, 32768, 512), (4096, 7168, 2048), (513, 1000, 208), (2, 8, 16), (200, 264, 4096),
]


@gpu
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_shapes_bf16(m, n, k, seed):
    x, w, a, b = make_inputs(m, n, k)
    d = poisoned(m, n, torch.bfloat16)
    moegemm.fp8_gemm_nt(a, b, d)
    assert_close(d, expected(a, b))
    # Against the unquantised inputs the FP8 rounding dominates; a statistic of enough products only.
    if m * n >= 1024 and k >= 128:
        assert calc_diff(d.float(), x.float() @ w.float().t()) < 1e-3


@gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (100, 520, 1000 - 1000 % 16), (1024, 4096, 1024)])
def test_fp32_out_and_accumulate(m, n, k, seed):
    _, _, a, b = make_inputs(m, n, k)
    d = poisoned(m, n, torch.float32)
    moegemm.fp8_gemm_nt(a, b, d)
    assert_close(d, expected(a, b))
    c = torch.randn(m, n, device="cuda")
    d = poisoned(m, n, torch.float32)
    moegemm.fp8_gemm_nt(a, b, d, c)
    assert_close(d, expected(a, b, c))
    d = c.clone()  # in place: D = D + A @ B^T
    moegemm.fp8_gemm_nt(a, b, d, d)
    assert_close(d, expected(a, b, c))


# Every kind of config the heuristic can emit: one, two and three math warpgroups, narrow (unswizzled)
# and wide output tiles, tiles inside one SFB block and tiles straddling two, both output dtypes,
# with and without B multicast across a cluster of two (odd block-row counts included).
CONFIGS = [
    Fp8GemmConfig(64, 8, 6, False, False), Fp8GemmConfig(64, 48, 6, False, False),
    Fp8GemmConfig(128, 64, 5, False, False), Fp8GemmConfig(128, 128, 5, False, False),
    Fp8GemmConfig(128, 192, 4, False, False), Fp8GemmConfig(64, 24, 6, True, False),
    Fp8GemmConfig(128, 96, 4, True, False), Fp8GemmConfig(128, 160, 3, True, True),
    Fp8GemmConfig(64, 128, 6, True, True), Fp8GemmConfig(128, 128, 5, False, False, 2),
    Fp8GemmConfig(192, 128, 4, False, False), Fp8GemmConfig(192, 64, 6, False, False),
    Fp8GemmConfig(192, 96, 4, True, True),
    Fp8GemmConfig(128, 192, 4, False, False, 2), Fp8GemmConfig(64, 32, 6, True, True, 2),
    # Split-K over clusters of 2 to 8 CTAs: swizzled and plain output slices, one and two math
    # warpgroups, both output dtypes, with accumulation.
    Fp8GemmConfig(64, 128, 8, False, False, split_k=2), Fp8GemmConfig(64, 112, 8, False, False, split_k=7),
    Fp8GemmConfig(128, 192, 3, False, False, split_k=8), Fp8GemmConfig(128, 96, 6, True, True, split_k=3),
    Fp8GemmConfig(64, 64, 10, True, False, split_k=4), Fp8GemmConfig(128, 128, 4, False, False, split_k=2),
    # Two math warpgroups of two slabs (BLOCK_M 256), and pairs sharing A side by side along N.
    Fp8GemmConfig(256, 128, 3, False, False), Fp8GemmConfig(256, 64, 3, True, True),
    Fp8GemmConfig(256, 128, 3, False, False, cluster_n=2), Fp8GemmConfig(256, 96, 2, True, False, cluster_m=2),
    Fp8GemmConfig(128, 128, 5, False, False, cluster_n=2), Fp8GemmConfig(128, 192, 4, False, False, cluster_n=2),
    Fp8GemmConfig(64, 32, 6, True, True, cluster_n=2),
]


@gpu
@pytest.mark.parametrize("config", CONFIGS, ids=fp8_gemm.kernel_name)
@pytest.mark.parametrize("m,n,k", [(1, 1000, 384), (200, 968, 1168), (300, 2048, 512)])
def test_every_config(config, m, n, k, seed):
    _, _, a, b = make_inputs(m, n, k)
    sfa = get_mn_major_tma_aligned_tensor(a[1])
    dtype = torch.float32 if config.out_fp32 else torch.bfloat16
    c = torch.randn(m, n, device="cuda") if config.accumulate else None
    d = c.clone() if config.accumulate else poisoned(m, n, dtype)
    plan(a[0], b[0], d, config).launch(a[0], sfa, b[0], b[1], d)
    assert_close(d, expected(a, b, c))


@gpu
@pytest.mark.parametrize("config", [c for c in CONFIGS if c.cluster_size > c.split_k or c.block_m == 256],
                         ids=fp8_gemm.kernel_name)
@pytest.mark.parametrize("m,n,k", [(600, 1000, 1168), (1100, 1400, 640), (256, 136, 128)])
def test_pairs_and_slabs(config, m, n, k, seed):
    """Pairs and two-slab tiles over odd counts of block-rows and columns (a peer with no rows or
    columns of its own still runs), partial last slabs, and few SMs: each CTA takes many tiles."""
    _, _, a, b = make_inputs(m, n, k)
    sfa = get_mn_major_tma_aligned_tensor(a[1])
    dtype = torch.float32 if config.out_fp32 else torch.bfloat16
    c = torch.randn(m, n, device="cuda") if config.accumulate else None
    for num_sms in (None, 2 * config.cluster_size, 6):
        d = c.clone() if config.accumulate else poisoned(m, n, dtype)
        p = plan(a[0], b[0], d, config, num_sms)
        assert (p.config.cluster_m, p.config.cluster_n) == (config.cluster_m, config.cluster_n)
        p.launch(a[0], sfa, b[0], b[1], d)
        assert_close(d, expected(a, b, c))


@gpu
@pytest.mark.parametrize("config", [c for c in CONFIGS if c.split_k > 1], ids=fp8_gemm.kernel_name)
@pytest.mark.parametrize("m", [257, 40, 20])
def test_split_k_many_tiles_per_cluster(config, m, seed):
    """Few SMs: each cluster reduces many tiles in turn, reusing its reduce buffers. The last
    block-row holds rows of 1, 3 or 2 of a warpgroup's four 16-row warps, or of none (a 128-row
    block's second warpgroup)."""
    n, k = 1000, 1040
    _, _, a, b = make_inputs(m, n, k)
    sfa = get_mn_major_tma_aligned_tensor(a[1])
    dtype = torch.float32 if config.out_fp32 else torch.bfloat16
    c = torch.randn(m, n, device="cuda") if config.accumulate else None
    for num_sms in (config.split_k, 3 * config.split_k):
        d = c.clone() if config.accumulate else poisoned(m, n, dtype)
        plan(a[0], b[0], d, config, num_sms).launch(a[0], sfa, b[0], b[1], d)
        assert_close(d, expected(a, b, c))


@gpu
def test_split_k_is_deterministic(seed):
    _, _, a, b = make_inputs(64, 4096, 7168)
    assert pick(64, 4096, 7168, gpu_facts()).split_k > 1
    first = torch.empty(64, 4096, device="cuda", dtype=torch.bfloat16)
    moegemm.fp8_gemm_nt(a, b, first)
    for _ in range(3):
        d = poisoned(64, 4096, torch.bfloat16)
        moegemm.fp8_gemm_nt(a, b, d)
        assert torch.equal(d, first)


@gpu
def test_programmatic_dependent_launch(seed):
    """Back-to-back dependent GEMMs with PDL: each reads the D the previous one wrote."""
    m, n, k = 512, 2048, 1024
    _, _, a, b = make_inputs(m, n, k)
    c = torch.randn(m, n, device="cuda")
    product = expected(a, b)
    moegemm.set_pdl(True)
    try:
        d = c.clone()
        for _ in range(4):
            moegemm.fp8_gemm_nt(a, b, d, d)
        assert_close(d, c + 4 * product)
        small = poisoned(1, n, torch.bfloat16)  # a split-K config after the accumulating ones
        moegemm.fp8_gemm_nt((a[0][:1], a[1][:1]), b, small)
        assert_close(small, product[:1])
    finally:
        moegemm.set_pdl(False)


@gpu
def test_zero_m_and_num_sms(seed):
    _, _, a, b = make_inputs(0, 256, 256)
    d = torch.empty(0, 256, device="cuda", dtype=torch.bfloat16)
    moegemm.fp8_gemm_nt(a, b, d)
    _, _, a, b = make_inputs(1000, 2048, 512)
    ref = expected(a, b)
    try:
        for sms in (1, 7, 66):
            moegemm.set_num_sms(sms)
            d = poisoned(1000, 2048, torch.bfloat16)
            moegemm.fp8_gemm_nt(a, b, d)
            assert_close(d, ref)
    finally:
        moegemm.set_num_sms(torch.cuda.get_device_properties(0).multi_processor_count)


@gpu
def test_cuda_graph_replay_sees_new_inputs(seed):
    m, n, k = 256, 1024, 512
    _, _, a, b = make_inputs(m, n, k)
    sfa = get_mn_major_tma_aligned_tensor(a[1])
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    moegemm.fp8_gemm_nt((a[0], sfa), b, d)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moegemm.fp8_gemm_nt((a[0], sfa), b, d)
    for _ in range(2):
        _, _, a2, b2 = make_inputs(m, n, k)
        a[0].copy_(a2[0])
        sfa.copy_(a2[1])
        b[0].copy_(b2[0])
        b[1].copy_(b2[1])
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(d, expected(a2, b2))


@gpu
def test_sfb_of_any_strides_and_address(seed):
    """SFB reaches the kernel through TMA, which needs it contiguous and 16-byte aligned: other
    strides or addresses are copied first, never read wrongly. ceil(K/128) = 10 scales per row, so
    rows also start at unaligned addresses."""
    m, n, k = 200, 968, 1168
    _, _, a, b = make_inputs(m, n, k)
    want = expected(a, b)
    column_major = b[1].t().contiguous().t()
    storage = torch.empty(b[1].numel() + 1, device="cuda")
    shifted = storage[1:].view_as(b[1])
    shifted.copy_(b[1])
    for sfb in (column_major, shifted, b[1]):
        d = poisoned(m, n, torch.bfloat16)
        moegemm.fp8_gemm_nt(a, (b[0], sfb), d)
        assert_close(d, want)


@gpu
def test_torch_compile(seed):
    _, _, a, b = make_inputs(64, 512, 256)

    @torch.compile(fullgraph=True)
    def f(a0, sfa, b0, sfb):
        d = torch.empty(a0.shape[0], b0.shape[0], device=a0.device, dtype=torch.bfloat16)
        moegemm.fp8_gemm_nt((a0, sfa), (b0, sfb), d)
        return d.float() * 2

    out = f(a[0], a[1], b[0], b[1])
    assert_close(out / 2, expected(a, b))


@gpu
def test_input_on_wrong_device_raises():
    _, _, a, b = make_inputs(4, 128, 128)
    d = torch.empty(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one device"):
        moegemm.fp8_gemm_nt(a, b, d)


# ---- CPU: argument checks and the reference path ------------------------------------------------------


def test_cpu_runs_reference(seed):
    x, w, a, b = make_inputs(5, 136, 208, device="cpu")
    d = poisoned(5, 136, torch.bfloat16, device="cpu")
    moegemm.fp8_gemm_nt(a, b, d)
    assert_close(d, expected(a, b))


# ---- the 1D1D recipe (weight gradients): B's scales per 1x128 block of its rows, like A's -----------------


def make_1d1d_inputs(m, n, k, device="cuda"):
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    return x, w, per_token_cast_to_fp8(x), per_token_cast_to_fp8(w)


def test_1d1d_reference_is_the_dequantised_product(seed):
    _, _, a, b = make_1d1d_inputs(5, 136, 300, device="cpu")
    c = torch.randn(5, 136)
    d = torch.empty(5, 136)
    reference.fp8_gemm_nt(a, b, d, c)
    exact = c.double() + reference.dequantize_per_token(*a).double() @ reference.dequantize_per_token(*b).double().t()
    assert calc_diff(d.double(), exact) < 1e-12


def test_1d1d_recipe_on_the_cpu_and_its_checks(seed):
    _, _, a, b = make_1d1d_inputs(8, 136, 256, device="cpu")
    d, named = torch.empty(8, 136), torch.empty(8, 136)
    moegemm.fp8_gemm_nt(a, b, d)
    moegemm.fp8_gemm_nt(a, b, named, recipe=(1, 1, 128))
    assert torch.equal(d, expected(a, b)) and torch.equal(named, d)
    with pytest.raises(TypeError, match="d: expected dtype torch.float32 with SFB per 1x128 block"):
        moegemm.fp8_gemm_nt(a, b, torch.empty(8, 136, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"sfb: expected shape \(2, 2\) for recipe \(1, 128, 128\)"):
        moegemm.fp8_gemm_nt(a, b, d, recipe=(1, 128, 128))
    with pytest.raises(ValueError, match="recipe: expected"):
        moegemm.fp8_gemm_nt(a, b, d, recipe=(1, 2, 128))


@gpu
@pytest.mark.parametrize("m,n,k", [(7168, 2112, 4096), (1536, 24576, 4096), (1, 256, 512), (129, 136, 1000 - 1000 % 16),
                                   (300, 8, 128), (64, 4096, 7168)])
def test_1d1d_kernel(m, n, k, seed):
    _, _, a, b = make_1d1d_inputs(m, n, k)
    c = torch.randn(m, n, device="cuda") * 32
    d = poisoned(m, n, torch.float32)
    moegemm.fp8_gemm_nt(a, b, d, recipe=(1, 1, 128))
    assert_close(d, expected(a, b))
    d = poisoned(m, n, torch.float32)
    moegemm.fp8_gemm_nt(a, b, d, c)
    assert_close(d, expected(a, b, c))
    d = c.clone()  # in place, C accumulated once: D = D + A @ B^T
    contiguous_sfb = (b[0], b[1].contiguous())  # SFB off the kernel's layout: re-laid out per call
    moegemm.fp8_gemm_nt(a, contiguous_sfb, d, d)
    assert_close(d, expected(a, b, c))


# 1D1D tiles: swizzled D chunks (BLOCK_N a multiple of 32) and one plain D box (BLOCK_N = 16j + 8), up
# to 160 columns, alone and in pairs sharing B or A.
WGRAD_CONFIGS = [
    Fp8GemmConfig(block_m, block_n, fp8_gemm.stages_for(block_m, block_n, 4, 1, H100, sfb_per_column=True), True,
                  True, cluster_m, cluster_n=cluster_n, sfb_per_column=True)
    for block_m, block_n, cluster_m, cluster_n in ((64, 40, 1, 1), (64, 152, 1, 1), (128, 64, 2, 1), (128, 136, 1, 1),
                                                   (128, 152, 1, 1), (128, 152, 1, 2), (128, 160, 2, 1),
                                                   (128, 24, 1, 1))]


@gpu
@pytest.mark.parametrize("config", WGRAD_CONFIGS, ids=fp8_gemm.kernel_name)
def test_1d1d_every_tile(config, seed):
    """Ragged rows, columns and K, and few SMs (each CTA takes many tiles): D += A @ B^T exactly once."""
    m, n, k = 300, 1000, 1040
    _, _, a, b = make_1d1d_inputs(m, n, k)
    sfa, sfb = get_mn_major_tma_aligned_tensor(a[1]), get_mn_major_tma_aligned_tensor(b[1])
    c = torch.randn(m, n, device="cuda")
    for num_sms in (None, 6):
        d = c.clone()
        desc = fp8_gemm.describe(GemmType.NORMAL, a[0], b[0], d, accumulate=True, recipe=fp8_gemm.RECIPE_1D1D)
        fp8_gemm.plan(desc, a[0], b[0], d, gpu_facts(num_sms), config).launch(a[0], sfa, b[0], sfb, d)
        assert_close(d, expected(a, b, c))


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a, b, d: ((a[0].to(torch.bfloat16), a[1]), b, d), TypeError, "a: expected dtype"),
    (lambda a, b, d: (a, (b[0], b[1].double()), d), TypeError, "sfb: expected dtype"),
    (lambda a, b, d: (a, b, d.to(torch.float16)), TypeError, "d: expected dtype"),
    (lambda a, b, d: (a, (b[0][:, :128], b[1]), d), ValueError, "b: expected shape"),
    (lambda a, b, d: ((a[0], a[1][:, :1]), b, d), ValueError, "sfa: expected shape"),
    (lambda a, b, d: (a, (b[0], b[1][:1]), d), ValueError, "sfb: expected shape"),
    (lambda a, b, d: (a, b, d[:, :128]), ValueError, "d: expected shape"),
    (lambda a, b, d: ((a[0].t().contiguous().t(), a[1]), b, d), ValueError, "a: expected the last dimension"),
    (lambda a, b, d: (a, b, d.t().contiguous().t()), ValueError, "d: expected the last dimension"),
    (lambda a, b, d: (a[0], b, d), TypeError, "a: expected a"),
    (lambda a, b, d: (a[0][:2], b, d), TypeError, "a: expected a"),  # two rows unpack like a pair
    (lambda a, b, d: (a, b, None), TypeError, "d: expected a torch.Tensor"),
])
def test_bad_arguments_raise(mutate, error, match):
    _, _, a, b = make_inputs(8, 256, 256, device="cpu")
    d = torch.empty(8, 256, dtype=torch.bfloat16)
    with pytest.raises(error, match=match):
        moegemm.fp8_gemm_nt(*mutate(a, b, d))


def test_misaligned_row_pitch_raises():
    _, _, a, b = make_inputs(8, 256, 256, device="cpu")
    d = torch.empty(8, 260, dtype=torch.bfloat16)[:, 2:258]
    with pytest.raises(ValueError, match="d: expected every row pitch|d: expected a 16-byte aligned"):
        moegemm.fp8_gemm_nt(a, b, d)


def test_c_requires_fp32_d():
    _, _, a, b = make_inputs(8, 256, 256, device="cpu")
    d = torch.empty(8, 256, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="d: with c given"):
        moegemm.fp8_gemm_nt(a, b, d, torch.zeros(8, 256))


def test_heuristic_splits_k_only_where_split_tiles_fit_the_sms():
    assert pick(1, 2112, 7168).split_k > 1
    for m in (1, 64, 128, 256, 4096):
        for n, k in ((2112, 7168), (7168, 16384), (32768, 512), (256, 128), (1000, 384)):
            config = pick(m, n, k)
            tiles = -(-m // config.block_m) * -(-n // config.block_n)
            if config.split_k > 1:
                assert tiles * config.split_k <= 132 and config.split_k <= -(-k // 128), (m, n, k, config)
                assert config.block_n % (8 * config.split_k) == 0
    assert pick(4096, 7168, 16384).split_k == 1


# H200 A/B of 2026-12-02 (fourth session, BENCHMARKS.md), us: split tiles filling all 132 SMs beat
# the picks of the old rule, which wanted SMs left idle (128 x 2112 x 7168 8.9 against 9.9,
# 256 x 2112 x 7168 11.0 against 13.9); a partial 64-row block-row lost (96 x 2112 x 16384 22.4
# against 15.7 for one 128-row block-row).
@pytest.mark.parametrize("m, n, k, tile", [
    (128, 2112, 7168, (64, 64, 2)), (256, 2112, 7168, (128, 64, 2)), (96, 2112, 16384, (128, 96, 4))])
def test_heuristic_picks_the_measured_best_split(m, n, k, tile):
    config = pick(m, n, k)
    assert (config.block_m, config.block_n, config.split_k) == tile


# H200 sweep of 2026-12-04 (BENCHMARKS.md, eleventh session; `scripts/sweep_fp8_gemm.py --large`), us:
# 256 x 128 tiles are best at K >= 7168 on N = 7168 and 4096 (682.0 against 712.8 for 192 x 128 and
# 720.8 for 128 x 128 at K = 16384); 192-row tiles in CTA pairs at K <= 1536 (231.9 / 128.3 against
# 244.4 / 143.0 for 256 x 128), where the L2 binds; 192 x 128 on N = 2112 (92.6 against 110.0 for
# 128 x 128).
@pytest.mark.parametrize("n, k, tile", [
    (2112, 7168, (192, 128, 1)), (24576, 1536, (192, 128, 2)), (7168, 16384, (256, 128, 1)),
    (4096, 7168, (256, 128, 1))])
def test_heuristic_picks_the_measured_best_tile_at_large_m(n, k, tile):
    config = pick(4096, n, k)
    assert (config.block_m, config.block_n, config.cluster_size) == tile


# H100 and H200 A/Bs of 2026-12-02 (fifth session, BENCHMARKS.md): memory-bound tiles run faster
# with at most 80 KB of B in flight per SM, except those split over three or more CTAs.
@pytest.mark.parametrize("m, n, k, stages", [
    (1, 24576, 1536, 4), (64, 32768, 512, 5), (64, 7168, 16384, 10), (1, 4096, 7168, 10), (1, 2112, 7168, 10)])
def test_heuristic_caps_the_b_bytes_in_flight(m, n, k, stages):
    config = pick(m, n, k)
    assert config.stages == stages, config


@pytest.mark.parametrize("k", [2048, 16384])
def test_heuristic_avoids_tiles_over_two_sfb_blocks_where_one_wave_fits_either(k):
    # H200 sweep of 2026-12-02: at M = 128, N = 7168, BLOCK_N 56 (tiles over two 128-column SFB
    # blocks, 128 tiles) ran 11-19% slower than BLOCK_N 64 (112 tiles), though both fill one wave.
    config = pick(128, 7168, k)
    assert fp8_gemm.sfb_rows(config.block_n) == 1, config


# ---- bad memory: meta tensors, overlapping operands; empty problems ---------------------------------------


@pytest.mark.parametrize("which", ["a", "d"])
def test_meta_tensor_raises_even_after_a_cpu_call_of_the_same_shapes(which):
    """The checks are cached per signature, which once keyed on get_device() (-1 for CPU and meta)."""
    _, _, a, b = make_inputs(8, 256, 256, device="cpu")
    d = torch.empty(8, 256, dtype=torch.bfloat16)
    moegemm.fp8_gemm_nt(a, b, d)
    if which == "a":
        a = (a[0].to("meta"), a[1])
    else:
        d = d.to("meta")
    with pytest.raises(ValueError, match=f"{which}: expected a CUDA or CPU tensor, got one on meta"):
        moegemm.fp8_gemm_nt(a, b, d)


@pytest.mark.parametrize("case", ["d in a", "d in sfb", "d in b", "c overlaps d", "c in a"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_output_overlapping_an_input_raises(case, device):
    """d (64 x 256 FP32, 64 KB) or c laid over the bytes of an input: the kernel would read what it
    already overwrote."""
    _, _, a, b = make_inputs(64, 256, 1024, device=device)
    d = torch.empty(64, 256, device=device)
    c = None

    def holding(t):  # t's values in fresh memory that is also a 64 x 256 FP32 matrix
        storage = torch.zeros(max(t.numel() * t.element_size(), 64 * 256 * 4), dtype=torch.uint8, device=device)
        view = storage[:t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
        return view, storage[:64 * 256 * 4].view(torch.float32).view(64, 256)

    if case == "d in a":
        a_fp8, d = holding(a[0])
        a = (a_fp8, a[1])
    elif case == "d in sfb":
        sfb, d = holding(b[1])
        b = (b[0], sfb)
    elif case == "d in b":
        b_fp8, d = holding(b[0])
        b = (b_fp8, b[1])
    elif case == "c overlaps d":
        storage = torch.zeros(65, 256, device=device)
        d, c = storage[1:], storage[:64]
    else:
        a_fp8, c = holding(a[0])
        a = (a_fp8, a[1])
    with pytest.raises(ValueError, match="expected memory apart from"):
        moegemm.fp8_gemm_nt(a, b, d, c)


@pytest.mark.parametrize("m,n,k", [(0, 256, 256), (8, 0, 256), (8, 256, 0), (0, 0, 0)])
@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_empty_problems(m, n, k, with_c, device):
    """M or N of 0: nothing to write. K of 0: D = C, or 0 without C (an empty sum)."""
    _, _, a, b = make_inputs(m, n, k, device=device)
    d = torch.full((m, n), float("nan"), device=device)
    c = torch.randn(m, n, device=device) if with_c else None
    moegemm.fp8_gemm_nt(a, b, d, c)
    assert torch.equal(d, c if with_c else torch.zeros_like(d))


def test_heuristic_on_one_sm_offers_no_pairs():
    """One SM holds no CTA pair: the search must not divide by the pairs that fit (none)."""
    config = fp8_gemm.select_config(GemmDesc(GemmType.NORMAL, 4096, 4096, 7168), dataclasses.replace(H100, num_sms=1))
    assert config.cluster_size == 1


# ---- fp8_einsum: one product per head (GemmType.BATCHED) --------------------------------------------


def make_einsum_inputs(batch, heads, r, d_dim, device="cuda"):
    x = torch.randn(batch, heads, r, device=device, dtype=torch.bfloat16)
    w = torch.randn(heads, d_dim, r, device=device, dtype=torch.bfloat16)
    a, sfa = per_token_cast_to_fp8(x.view(batch * heads, r))
    b, sfb = per_block_cast_to_fp8(w.view(heads * d_dim, r)) if d_dim % 128 == 0 else (None, None)
    if b is None:  # 128x128 blocks per head: cast head by head
        pairs = [per_block_cast_to_fp8(w[h]) for h in range(heads)]
        b, sfb = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    else:
        b, sfb = b.view(heads, d_dim, r), sfb.view(heads, -1, sfb.shape[-1])
    return (a.view(batch, heads, r), sfa.reshape(batch, heads, -1)), (b, sfb)


def einsum_expected(a, b, c=None):
    batch, heads, _ = a[0].shape
    out = torch.empty(batch, heads, b[0].shape[1], device=a[0].device)
    reference.fp8_einsum("bhr,hdr->bhd", a, b, out, c)
    return out


def test_fp8_einsum_reference_is_the_dequantised_product(seed):
    a, b = make_einsum_inputs(5, 3, 256, 136, device="cpu")
    c = torch.randn(5, 3, 136)
    d = torch.empty(5, 3, 136)
    moegemm.fp8_einsum("bhr,hdr->bhd", a, b, d, c)
    a_float = reference.dequantize_per_token(*a).double()
    b_float = reference.dequantize_per_block(*b).double()
    exact = c.double() + torch.einsum("bhr,hdr->bhd", a_float, b_float)
    assert calc_diff(d.double(), exact) < 1e-12


@pytest.mark.parametrize("mutate,error,match", [
    (lambda args: {**args, "expr": "bhd,hdr->bhr"}, ValueError, "expr: expected one of"),
    (lambda args: {**args, "recipe": (1, 1, 128)}, ValueError, "recipe: expected"),
    (lambda args: {**args, "b": (args["b"][0][:, :, :128], args["b"][1])}, ValueError, "b: expected shape"),
    (lambda args: {**args, "d": args["d"][:, :, :8]}, ValueError, "d: expected shape"),
    (lambda args: {**args, "c": torch.zeros(4, 2, 136)}, TypeError, "d: with c given"),
])
def test_fp8_einsum_bad_arguments_raise(mutate, error, match):
    a, b = make_einsum_inputs(4, 2, 256, 136, device="cpu")
    args = mutate(dict(expr="bhr,hdr->bhd", a=a, b=b, d=torch.empty(4, 2, 136, dtype=torch.bfloat16)))
    with pytest.raises(error, match=match):
        moegemm.fp8_einsum(**args)


@gpu
@pytest.mark.parametrize("batch,heads,r,d_dim", [(4096, 16, 512, 128), (1, 128, 512, 128), (300, 8, 128, 136),
                                                 (129, 3, 1024, 256), (64, 128, 7168 // 14, 128)])
def test_fp8_einsum_kernel(batch, heads, r, d_dim, seed):
    a, b = make_einsum_inputs(batch, heads, r, d_dim)
    d = torch.full((batch, heads, d_dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    moegemm.fp8_einsum("bhr,hdr->bhd", a, b, d)
    assert_close(d, einsum_expected(a, b))
    # In place with FP32 C accumulated once, SFA in the kernel's layout (no copy per call).
    c = torch.randn(batch, heads, d_dim, device="cuda") * 32
    sfa_ready = get_mn_major_tma_aligned_tensor(a[1].transpose(0, 1)).transpose(0, 1)
    d = c.clone()
    moegemm.fp8_einsum("bhr,hdr->bhd", (a[0], sfa_ready), b, d, d)
    assert_close(d, einsum_expected(a, b, c))


@gpu
def test_fp8_einsum_strided_views(seed):
    """A and D as views of wider tensors: their heads and rows read and written in place."""
    a, b = make_einsum_inputs(200, 4, 256, 128)
    wide_a = torch.zeros(200, 6, 384, device="cuda", dtype=torch.float8_e4m3fn)
    wide_a[:, 1:5, :256] = a[0]
    wide_d = torch.full((200, 6, 256), float("nan"), device="cuda")
    d = wide_d[:, 1:5, 64:192]
    moegemm.fp8_einsum("bhr,hdr->bhd", (wide_a[:, 1:5, :256], a[1]), b, d)
    assert_close(d, einsum_expected(a, b))
    assert torch.isnan(wide_d[:, 0]).all() and torch.isnan(wide_d[:, :, :64]).all()


# ---- k_grouped_fp8_gemm_nt_contiguous: expert weight gradients ------------------------------------------------


def make_k_grouped_inputs(ks, m, n, device="cuda"):
    """DeepGEMM's K-grouped operands: each expert's [M, k_g] block K-major, back to back, and the scales
    [M, sum_k / 128] M-major (the transposes of a per-channel cast of the tokens-major activations)."""
    sum_k = sum(ks)

    def operand(rows):
        x = torch.randn(sum_k, rows, device=device, dtype=torch.bfloat16)
        x_fp8, sf = moegemm.per_channel_cast_to_fp8(x)
        blocks, start = [], 0
        for k in ks:
            blocks.append(moegemm.transpose_fp8(x_fp8[start:start + k])[0].reshape(-1))
            start += k
        return torch.cat(blocks) if blocks else x_fp8.reshape(-1), sf.T

    return operand(m), operand(n)


def k_grouped_expected(a, b, ks, c=None):
    m, n = a[1].shape[0], b[1].shape[0]
    out = torch.empty(len(ks), m, n, device=a[0].device)
    reference.k_grouped_fp8_gemm_nt_contiguous(a, b, out, ks, c=c)
    return out


def test_k_grouped_reference_is_the_dequantised_product(seed):
    ks = [256, 0, 128]
    a, b = make_k_grouped_inputs(ks, 8, 136, device="cpu")
    c = torch.randn(3, 8, 136)
    d = k_grouped_expected(a, b, ks, c)
    start = 0
    for g, k in enumerate(ks):
        a_g = a[0][start * 8:(start + k) * 8].view(8, k).double() * a[1][:, start // 128:(start + k) // 128].double(
        ).repeat_interleave(128, -1)
        b_g = b[0][start * 136:(start + k) * 136].view(136, k).double() * b[1][:, start // 128:(
            start + k) // 128].double().repeat_interleave(128, -1)
        assert calc_diff(d[g].double(), c[g].double() + a_g @ b_g.T) < 1e-12
        start += k


def test_k_grouped_on_the_cpu_and_its_checks(seed):
    ks = [128, 256]
    a, b = make_k_grouped_inputs(ks, 8, 16, device="cpu")
    layout = torch.tensor(ks, dtype=torch.int32)
    d = torch.empty(2, 8, 16)
    moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout)
    assert torch.equal(d, k_grouped_expected(a, b, ks))
    with pytest.raises(ValueError, match="ks: expected 2 lengths"):
        moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, [384], layout)
    with pytest.raises(ValueError, match=r"ks\[1\]: expected a multiple of 128"):
        moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, [128, 200], layout)
    with pytest.raises(ValueError, match="a: expected 3072 contiguous elements"):
        moegemm.k_grouped_fp8_gemm_nt_contiguous((a[0][:-8], a[1]), b, d, ks, layout)
    with pytest.raises(ValueError, match="recipe: expected"):
        moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout, recipe=(1, 128, 128))
    with pytest.raises(TypeError, match="d: expected dtype"):
        moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d.bfloat16(), ks, layout)


@gpu
@pytest.mark.parametrize("ks,m,n", [([4096, 0, 1280, 8192, 128, 2560], 4096, 7168), ([0, 0], 256, 128),
                                    ([640, 384, 0, 1024], 7168, 2048), ([128], 100, 136)])
def test_k_grouped_kernel(ks, m, n, seed):
    a, b = make_k_grouped_inputs(ks, m, n)
    layout = torch.tensor(ks, dtype=torch.int32, device="cuda")
    c = torch.randn(len(ks), m, n, device="cuda") * 32
    d = torch.full((len(ks), m, n), float("nan"), device="cuda")
    moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout)
    assert_close(d, k_grouped_expected(a, b, ks))
    d = torch.full((len(ks), m, n), float("nan"), device="cuda")
    moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout, c)
    assert_close(d, k_grouped_expected(a, b, ks, c))
    d = c.clone()  # in place: D += A @ B^T, C accumulated once
    moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout, d)
    assert_close(d, k_grouped_expected(a, b, ks, c))


K_GROUPED_CONFIGS = [
    Fp8GemmConfig(block_m, block_n, fp8_gemm.stages_for(block_m, block_n, 4, 1, H100, sfb_per_column=True), True,
                  True, gemm_type=GemmType.K_GROUPED, sfb_per_column=True)
    for block_m, block_n in ((64, 104), (128, 128), (128, 152), (128, 160))]


@gpu
@pytest.mark.parametrize("config", K_GROUPED_CONFIGS, ids=fp8_gemm.kernel_name)
def test_k_grouped_every_tile(config, seed):
    """Each tile over ragged M and N and experts of 0 to 640 tokens, on every SM and on 3 (each CTA
    then takes tiles of many experts in turn, rewriting its ring of expert descriptors many times)."""
    ks = [0, 128, 640, 0, 256] + [128] * 12 + [384, 0]
    m, n = 200, 328
    a, b = make_k_grouped_inputs(ks, m, n)
    sfa, sfb = get_mn_major_tma_aligned_tensor(a[1]), get_mn_major_tma_aligned_tensor(b[1])
    layout = torch.tensor(ks, dtype=torch.int32, device="cuda")
    c = torch.randn(len(ks), m, n, device="cuda")
    for num_sms in (None, 3):
        d = c.clone()
        plan, map_bytes = fp8_gemm.k_grouped_plan(a[0].view(m, -1), b[0].view(n, -1), d, gpu_facts(num_sms), config)
        maps = torch.full((map_bytes,), 255, dtype=torch.uint8, device="cuda")
        plan.launch(a[0], sfa, b[0], sfb, d, layout, maps)
        assert_close(d, k_grouped_expected(a, b, ks, c))


@gpu
def test_k_grouped_bad_layout_stays_in_bounds(seed):
    """Lengths the host list does not match, negative or misaligned ones: the kernel clamps them and
    finishes (a wrong result, no fault)."""
    ks = [256, 128]
    a, b = make_k_grouped_inputs(ks, 64, 64)
    d = torch.zeros(2, 64, 64, device="cuda")
    for values in ([100, 1000], [-128, 4096], [24, 8]):
        moegemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, torch.tensor(values, dtype=torch.int32, device="cuda"))
        torch.cuda.synchronize()
    assert not torch.isnan(d).any()


@gpu
@pytest.mark.parametrize("block_m,block_n", [(64, 64), (128, 128), (128, 192), (192, 128), (256, 128)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_fp8_einsum_every_tile(block_m, block_n, accumulate, seed):
    """The batched kind with each BLOCK_M (one to three warpgroups, two of two slabs), ragged rows and
    columns: a head's tiles must stay inside its slice of A, B and D."""
    batch, heads, r, d_dim = 300, 3, 384, 200
    a, b = make_einsum_inputs(batch, heads, r, d_dim)
    stages = fp8_gemm.stages_for(block_m, block_n, 4 if accumulate else 2, 1, gpu_facts())
    config = Fp8GemmConfig(block_m, block_n, stages, accumulate, accumulate, gemm_type=GemmType.BATCHED)
    c = torch.randn(batch, heads, d_dim, device="cuda") if accumulate else None
    d = c.clone() if accumulate else torch.full((batch, heads, d_dim), float("nan"), device="cuda",
                                                dtype=torch.bfloat16)
    a_gmk, d_gmn = a[0].transpose(0, 1), d.transpose(0, 1)
    desc = fp8_gemm.describe(GemmType.BATCHED, a_gmk, b[0], d_gmn, accumulate=accumulate)
    sfa = get_mn_major_tma_aligned_tensor(a[1].transpose(0, 1))
    fp8_gemm.plan(desc, a_gmk, b[0], d_gmn, gpu_facts(), config).launch(a_gmk, sfa, b[0], b[1].contiguous(), d_gmn)
    assert_close(d, einsum_expected(a, b, c))
