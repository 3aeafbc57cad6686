"""The BF16 GEMMs (dense in four layouts, M-grouped contiguous and masked): argument checks and the
CPU path (reference), and the SM90 kernel against the FP32 reference (GPU)."""

import dataclasses

import pytest
import torch
from conftest import gpu_facts

import moegemm
from moegemm import calc_diff, reference
from moegemm.gemm.desc import GemmType, Major
from moegemm.kernels import bf16_gemm
from moegemm.kernels.bf16_gemm import Bf16GemmConfig

gpu = pytest.mark.gpu
LAYOUTS = ("nt", "nn", "tn", "tt")
BF16 = torch.bfloat16


def operands(layout: str, m: int, n: int, k: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in the shapes the layout's letters give (n: A [M, K] / B [K, N]; t: A [K, M] / B [N, K])."""
    a = torch.randn((m, k) if layout[0] == "n" else (k, m), device=device, dtype=BF16)
    b = torch.randn((k, n) if layout[1] == "n" else (n, k), device=device, dtype=BF16)
    return a, b


def expected(layout: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    a_mk = a.double() if layout[0] == "n" else a.double().t()
    b_kn = b.double() if layout[1] == "n" else b.double().t()
    out = a_mk @ b_kn
    return out if c is None else out + c.double()


def poisoned(*shape: int, dtype: torch.dtype = BF16, device: str = "cuda") -> torch.Tensor:
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def assert_close(d: torch.Tensor, ref: torch.Tensor) -> None:
    assert not torch.isnan(d).any(), "unwritten (NaN-poisoned) output elements"
    # BF16 output rounds each element (relative 2^-9); FP32 output keeps the FP32 sums.
    tol = 1e-5 if d.dtype == BF16 else 1e-6
    diff = calc_diff(d.double(), ref)
    assert diff < tol, f"calc_diff {diff:.3e} >= {tol}"


def gemm(layout: str):
    return getattr(moegemm, f"bf16_gemm_{layout}")


# ---- CPU: checks and the reference path ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_runs_the_reference(layout):
    a, b = operands(layout, 5, 24, 40, device="cpu")
    d = poisoned(5, 24, dtype=torch.float32, device="cpu")
    gemm(layout)(a, b, d)
    assert_close(d, expected(layout, a, b))
    c = torch.randn(5, 24)
    gemm(layout)(a, b, d, c)
    assert_close(d, expected(layout, a, b, c))


def test_checks_name_the_argument():
    a, b = operands("nt", 4, 16, 32, device="cpu")
    with pytest.raises(TypeError, match="a: expected dtype torch.bfloat16"):
        moegemm.bf16_gemm_nt(a.float(), b, torch.empty(4, 16))
    with pytest.raises(ValueError, match=r"b: expected shape \[N, K\] with K = 32"):
        moegemm.bf16_gemm_nt(a, b[:, :16], torch.empty(4, 16))
    with pytest.raises(ValueError, match=r"b: expected shape \[K, N\] with K = 32"):
        moegemm.bf16_gemm_nn(a, b, torch.empty(4, 16))
    with pytest.raises(ValueError, match=r"d: expected shape \(4, 16\)"):
        moegemm.bf16_gemm_nt(a, b, torch.empty(4, 17))
    with pytest.raises(TypeError, match="d: with c given"):
        moegemm.bf16_gemm_nt(a, b, torch.empty(4, 16, dtype=BF16), torch.zeros(4, 16))
    groups = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"b: expected shape \(G, K, N\) with K = 32"):
        moegemm.m_grouped_bf16_gemm_nn_contiguous(torch.randn(128, 32, dtype=BF16), torch.randn(2, 16, 32, dtype=BF16),
                                                  torch.empty(128, 16, dtype=BF16), groups)
    with pytest.raises(ValueError, match="expected_m: expected an int >= 0"):
        moegemm.m_grouped_bf16_gemm_nt_masked(torch.randn(2, 8, 32, dtype=BF16), torch.randn(2, 16, 32, dtype=BF16),
                                              torch.empty(2, 8, 16, dtype=BF16), torch.zeros(2, dtype=torch.int32),
                                              -1)


@pytest.mark.parametrize("use_psum_layout", [False, True])
def test_cpu_contiguous_runs_the_reference(use_psum_layout):
    a = torch.randn(256, 64, dtype=BF16)
    b = torch.randn(2, 64, 24, dtype=BF16)
    layout = torch.tensor([128, 200], dtype=torch.int32) if use_psum_layout else \
        torch.cat([torch.zeros(128, dtype=torch.int32), torch.ones(72, dtype=torch.int32),
                   torch.full((56,), -1, dtype=torch.int32)])
    d = poisoned(256, 24, device="cpu")
    moegemm.m_grouped_bf16_gemm_nn_contiguous(a, b, d, layout, use_psum_layout)
    assert_close(d[:128], a[:128].double() @ b[0].double())
    assert_close(d[128:200], a[128:200].double() @ b[1].double())
    assert torch.isnan(d[200:]).all(), "padding rows must stay untouched"


# ---- GPU: the public functions and their heuristic ----------------------------------------------------------

SHAPES = [(1, 2112, 7168), (7, 256, 384), (127, 7168, 2048), (129, 136, 512), (300, 4096, 520), (4096, 7168, 2048),
          (513, 1000, 200), (2, 64, 16), (200, 256, 4096)]


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_shapes(layout, m, n, k, seed):
    a, b = operands(layout, m, n, k)
    d = poisoned(m, n)
    if layout[0] == "t" and m > 1 and m * 2 % 16:
        # A [K, M] with rows of M bf16 that TMA cannot address: a clear error, not a copy.
        with pytest.raises(ValueError, match="a: expected a pitch of a multiple of 16 bytes"):
            gemm(layout)(a, b, d)
        return
    gemm(layout)(a, b, d)
    assert_close(d, expected(layout, a, b))


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_out_accumulate_and_transposed_views(layout, seed):
    m, n, k = 264, 520, 1000
    a, b = operands(layout, m, n, k)
    c = torch.randn(m, n, device="cuda")
    d = poisoned(m, n, dtype=torch.float32)
    gemm(layout)(a, b, d, c)
    assert_close(d, expected(layout, a, b, c))
    d = c.clone()  # in place: D = D + A @ B
    gemm(layout)(a, b, d, d)
    assert_close(d, expected(layout, a, b, c))
    # The same product from the other layout's letters, through transposed views read in place.
    flipped = {"n": "t", "t": "n"}[layout[0]] + layout[1]
    d = poisoned(m, n)
    gemm(flipped)(a.t(), b, d)
    assert_close(d, expected(layout, a, b))


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_dims(layout):
    a, b = operands(layout, 64, 128, 0)
    d = poisoned(64, 128, dtype=torch.float32)
    gemm(layout)(a, b, d)
    assert (d == 0).all(), "K = 0: D is the empty sum"
    a, b = operands(layout, 0, 128, 64)
    gemm(layout)(a, b, torch.empty(0, 128, device="cuda", dtype=BF16))


# Every kind of config: one to three math warpgroups, narrow and wide tiles, both output dtypes,
# accumulation, pairs sharing A or B, split-K; each in the layouts it allows.
CONFIGS = [
    Bf16GemmConfig(64, 16, 8, False, False), Bf16GemmConfig(64, 128, 8, True, True),
    Bf16GemmConfig(128, 64, 8, False, False), Bf16GemmConfig(128, 256, 3, False, False),
    Bf16GemmConfig(128, 192, 3, True, False), Bf16GemmConfig(192, 128, 4, False, False),
    Bf16GemmConfig(128, 256, 3, False, False, cluster_n=2), Bf16GemmConfig(128, 128, 4, True, True, cluster_m=2),
    Bf16GemmConfig(64, 64, 8, False, False, split_k=4), Bf16GemmConfig(128, 192, 3, True, True, split_k=2),
]


def _layouts_of(config: Bf16GemmConfig) -> list[str]:
    allowed = []
    for layout in LAYOUTS:
        major_b = Major.MN if layout[1] == "n" else Major.K
        if major_b is Major.MN and (config.block_n % 64 or config.cluster_m > 1):
            continue
        allowed.append(layout)
    return allowed


EVERY_CONFIG = [(config, layout) for config in CONFIGS for layout in _layouts_of(config)]


@gpu
@pytest.mark.parametrize("config,layout", EVERY_CONFIG,
                         ids=[f"{bf16_gemm.kernel_name(c)}-{layout}" for c, layout in EVERY_CONFIG])
# M and N multiples of 8: the MN-major layouts' rows are then whole 16-byte pitches.
@pytest.mark.parametrize("m,n,k", [(8, 1000, 384), (200, 968, 1168), (296, 2048, 520)])
def test_every_config(config, layout, m, n, k, seed):
    a, b = operands(layout, m, n, k)
    major_a = Major.K if layout[0] == "n" else Major.MN
    major_b = Major.MN if layout[1] == "n" else Major.K
    config = dataclasses.replace(config, major_a=major_a, major_b=major_b)
    dtype = torch.float32 if config.out_fp32 else BF16
    c = torch.randn(m, n, device="cuda") if config.accumulate else None
    d = c.clone() if c is not None else poisoned(m, n, dtype=dtype)
    desc = bf16_gemm.describe(GemmType.NORMAL, m, n, k, d, accumulate=config.accumulate)
    # A [M, K] or [K, M] and B [N, K] or [K, N], each with a unit inner stride: the kernel's operands.
    bf16_gemm.plan(desc, a, b, d, major_a, major_b, gpu_facts(), config).launch_pointers(
        d.get_device(), a.data_ptr(), b.data_ptr(), d.data_ptr(), 0)
    assert_close(d, expected(layout, a, b, c))


# ---- GPU: the grouped GEMMs ------------------------------------------------------------------------------------


def _contiguous_inputs(counts: list[int], n: int, k: int, b_layout: str):
    """A with each expert's rows (counts) in a 128-aligned segment, B [G, N, K] or [G, K, N], the
    per-row layout (padding -1) and the psum layout."""
    segments = [moegemm.align(c, 128) for c in counts]
    m_total = max(sum(segments), 128)
    a = torch.randn(m_total, k, device="cuda", dtype=BF16)
    shape = (len(counts), n, k) if b_layout == "nt" else (len(counts), k, n)
    b = torch.randn(shape, device="cuda", dtype=BF16)
    per_row = torch.full((m_total,), -1, dtype=torch.int32)
    ends, start = [], 0
    for g, (count, segment) in enumerate(zip(counts, segments, strict=True)):
        per_row[start:start + count] = g
        ends.append(start + count)
        start += segment
    return a, b, per_row.cuda(), torch.tensor(ends, dtype=torch.int32, device="cuda")


@gpu
@pytest.mark.parametrize("b_layout", ["nt", "nn"])
@pytest.mark.parametrize("use_psum_layout", [False, True])
@pytest.mark.parametrize("counts,n,k", [([128, 0, 300, 77], 4096, 7168), ([1], 256, 64), ([1000, 1500], 520, 1000),
                                        ([256] * 16, 2048, 512)])
def test_contiguous(b_layout, use_psum_layout, counts, n, k, seed):
    a, b, per_row, ends = _contiguous_inputs(counts, n, k, b_layout)
    d = poisoned(a.shape[0], n)
    fn = getattr(moegemm, f"m_grouped_bf16_gemm_{b_layout}_contiguous")
    fn(a, b, d, ends if use_psum_layout else per_row, use_psum_layout)
    ref = poisoned(a.shape[0], n, dtype=torch.float32)
    oracle = getattr(reference, f"m_grouped_bf16_gemm_{b_layout}_contiguous")
    oracle(a, b, ref, ends if use_psum_layout else per_row, use_psum_layout)
    owned = ~torch.isnan(ref[:, 0])
    assert torch.isnan(d[~owned]).all(), "padding rows must stay untouched"
    if owned.any():
        assert_close(d[owned], ref[owned])


@gpu
@pytest.mark.parametrize("use_psum_layout", [False, True])
@pytest.mark.parametrize("config", [Bf16GemmConfig(128, 256, 3, False, False, cluster_n=2),
                                    Bf16GemmConfig(128, 256, 3, False, False, cluster_m=2),
                                    Bf16GemmConfig(64, 128, 8, False, False, cluster_m=2)],
                         ids=lambda config: bf16_gemm.kernel_name(config))
def test_contiguous_pairs(config, use_psum_layout, seed):
    """Pairs sharing A, or B where one expert holds both block-rows (pairs over two experts, over
    padding and past the last row among them), on few SMs so that each pair takes many tiles."""
    a, b, per_row, ends = _contiguous_inputs([513, 0, 190, 1, 64, 129], 520, 1000, "nt")
    layout = ends if use_psum_layout else per_row
    kind = GemmType.PSUM if use_psum_layout else GemmType.CONTIGUOUS
    d = poisoned(a.shape[0], 520)
    desc = bf16_gemm.describe(kind, 128, 520, 1000, d, b.shape[0])
    config = dataclasses.replace(config, gemm_type=kind)
    bf16_gemm.plan(desc, a, b, d, Major.K, Major.K, gpu_facts(6), config).launch_pointers(
        d.get_device(), a.data_ptr(), b.data_ptr(), d.data_ptr(), layout.data_ptr())
    ref = poisoned(a.shape[0], 520, dtype=torch.float32)
    reference.m_grouped_bf16_gemm_nt_contiguous(a, b, ref, layout, use_psum_layout)
    owned = ~torch.isnan(ref[:, 0])
    assert torch.isnan(d[~owned]).all(), "padding rows must stay untouched"
    assert_close(d[owned], ref[owned])


@gpu
@pytest.mark.parametrize("num_groups,max_m,expected_m,n,k", [(8, 256, 128, 4096, 7168), (32, 192, 160, 576, 512),
                                                           (4, 64, 1, 7168, 2048), (8, 300, 256, 256, 1000)])
def test_masked(num_groups, max_m, expected_m, n, k, seed):
    a = torch.randn(num_groups, max_m, k, device="cuda", dtype=BF16)
    b = torch.randn(num_groups, n, k, device="cuda", dtype=BF16)
    counts = torch.randint(0, max_m + 1, (num_groups,), dtype=torch.int32)
    counts[0] = 0
    counts[-1] = max_m
    masked_m = counts.cuda()
    d = poisoned(num_groups, max_m, n)
    moegemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
    for g, count in enumerate(counts.tolist()):
        assert torch.isnan(d[g, count:]).all(), f"expert {g}: rows past masked_m must stay untouched"
        if count:
            assert_close(d[g, :count], a[g, :count].double() @ b[g].double().t())


# ---- the K-grouped GEMM ------------------------------------------------------------------------------------------


def _k_grouped_inputs(ks: list[int], m: int, n: int, device: str = "cuda"):
    a = torch.randn(sum(ks), m, device=device, dtype=BF16)
    b = torch.randn(sum(ks), n, device=device, dtype=BF16)
    return a, b, torch.tensor(ks, dtype=torch.int32, device=device)


def _k_grouped_expected(a, b, ks, c=None) -> torch.Tensor:
    out, start = [], 0
    for length in ks:
        out.append(a[start:start + length].double().t() @ b[start:start + length].double())
        start += length
    expected = torch.stack(out)
    return expected if c is None else expected + c.double()


def test_k_grouped_checks():
    a, b, layout = _k_grouped_inputs([128, 128], 8, 16, device="cpu")
    d = torch.empty(2, 8, 16)
    with pytest.raises(ValueError, match=r"ks\[1\]: expected an int >= 0, a multiple of 128, got 100"):
        moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, [128, 100], layout)
    with pytest.raises(ValueError, match="ks: expected lengths summing to 256"):
        moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, [128, 0], layout)
    with pytest.raises(ValueError, match=r"ks: expected one length per expert, 2"):
        moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, [256], layout)
    with pytest.raises(TypeError, match="d: expected dtype torch.float32"):
        moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d.to(BF16), [128, 128], layout)
    with pytest.raises(ValueError, match=r"b: expected shape \[sum_k, N\] with sum_k = 256"):
        moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b[:128], d, [128, 128], layout)


def test_k_grouped_cpu_runs_the_reference():
    ks = [128, 0, 256]
    a, b, layout = _k_grouped_inputs(ks, 24, 40, device="cpu")
    c = torch.randn(3, 24, 40)
    d = poisoned(3, 24, 40, dtype=torch.float32, device="cpu")
    moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, c)
    assert_close(d, _k_grouped_expected(a, b, ks, c))


@gpu
@pytest.mark.parametrize("ks,m,n", [([8192, 6016, 10112, 9088], 4096, 7168), ([2048, 0, 1536, 2560], 7168, 2048),
                                    ([128] * 3 + [0, 384], 256, 576), ([0, 0], 128, 128), ([640], 200, 136)])
@pytest.mark.parametrize("with_c", [False, True])
def test_k_grouped(ks, m, n, with_c, seed):
    a, b, layout = _k_grouped_inputs(ks, m, n)
    c = torch.randn(len(ks), m, n, device="cuda") * 32 if with_c else None
    d = poisoned(len(ks), m, n, dtype=torch.float32)
    moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, c)
    assert_close(d, _k_grouped_expected(a, b, ks, c))
    if with_c:  # in place, as DeepGEMM's callers do: D += A^T @ B
        d = c.clone()
        moegemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, d)
        assert_close(d, _k_grouped_expected(a, b, ks, c))


# ---- einsum -------------------------------------------------------------------------------------------------------


def _einsum_operands(expr: str, sizes: dict[str, int], pad: int = 0):
    """A and B for ``expr`` with dims of these sizes; B's last dim padded by ``pad`` columns and sliced
    off (a strided view, as DeepGEMM's tests pass)."""
    terms = expr.split("->")[0].split(",")
    a = torch.randn(*(sizes[x] for x in terms[0]), device="cuda", dtype=BF16)
    b_shape = [sizes[x] for x in terms[1]]
    b = torch.randn(*b_shape[:-1], b_shape[-1] + pad, device="cuda", dtype=BF16)[..., :b_shape[-1]]
    return a, b


def test_einsum_checks():
    a, b = torch.randn(4, 3, 64, dtype=BF16), torch.randn(3, 8, 64, dtype=BF16)
    with pytest.raises(ValueError, match=r"expr: expected one of .*bhr,hdr->bhd.*got 'bhr,hrd->bhd'"):
        moegemm.einsum("bhr,hrd->bhd", a, b, torch.empty(4, 3, 8))
    with pytest.raises(ValueError, match=r"b: expected shape \[H, D, R\] = \(3, 8, 32\)"):
        moegemm.einsum("bhr,hdr->bhd", a[..., :32], b, torch.empty(4, 3, 8))
    with pytest.raises(ValueError, match=r"d: expected shape \(4, 3, 8\)"):
        moegemm.einsum("bhr,hdr->bhd", a, b, torch.empty(4, 8, 3))
    with pytest.raises(TypeError, match="d: with c given"):
        moegemm.einsum("bhr,hdr->bhd", a, b, torch.empty(4, 3, 8, dtype=BF16), torch.zeros(4, 3, 8))
    d = poisoned(4, 3, 8, dtype=torch.float32, device="cpu")
    moegemm.einsum("bhr, hdr -> bhd", a, b, d)  # spaces are ignored; the CPU runs the reference
    assert_close(d, torch.einsum("bhr,hdr->bhd", a.double(), b.double()))


EINSUM_CASES = [
    ("bhr,hdr->bhd", dict(b=4096, h=128, r=512, d=128)), ("bhr,hdr->bhd", dict(b=32, h=8, r=4096, d=1024)),
    ("bhr,hdr->bhd", dict(b=1, h=3, r=200, d=72)),
    ("bhd,hdr->bhr", dict(b=4096, h=128, r=512, d=128)), ("bhd,hdr->bhr", dict(b=4, h=8, r=4096, d=1024)),
    ("bhd,hdr->bhr", dict(b=7, h=2, r=192, d=136)),
    ("bmk,bnk->mn", dict(b=4096, m=128, n=384, k=128)), ("bmk,bnk->mn", dict(b=129, m=384, n=128, k=384)),
    ("bmk,bnk->mn", dict(b=3, m=1, n=72, k=200)),
]


@gpu
@pytest.mark.parametrize("expr,sizes", EINSUM_CASES,
                         ids=[f"{e}-{'-'.join(map(str, s.values()))}" for e, s in EINSUM_CASES])
@pytest.mark.parametrize("out", ["bf16", "fp32", "fp32+c"])
def test_einsum(expr, sizes, out, seed):
    a, b = _einsum_operands(expr, sizes, pad=64 if expr != "bmk,bnk->mn" else 0)
    exact = torch.einsum(expr, a.double(), b.double())
    c = torch.randn(exact.shape, device="cuda") if out == "fp32+c" else None
    d = poisoned(*exact.shape, dtype=BF16 if out == "bf16" else torch.float32)
    moegemm.einsum(expr, a, b, d, c)
    assert_close(d, exact if c is None else exact + c.double())
    if c is not None:  # in place: D += einsum(...)
        d = c.clone()
        moegemm.einsum(expr, a, b, d, d)
        assert_close(d, exact + c.double())
