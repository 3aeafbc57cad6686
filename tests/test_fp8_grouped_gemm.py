"""MoE grouped FP8 GEMMs (contiguous, prefix-sum and masked layouts): argument checks (CPU) and the
SM90 kernels against the reference (GPU)."""

import pytest
import torch
from conftest import H100, gpu_facts

import moegemm
from moegemm import align, calc_diff, per_block_cast_to_fp8, per_token_cast_to_fp8, reference
from moegemm.gemm.desc import GemmDesc, GemmType
from moegemm.kernels import fp8_gemm
from moegemm.kernels.fp8_gemm import Fp8GemmConfig

gpu = pytest.mark.gpu
ALIGNMENT = moegemm.get_mk_alignment_for_contiguous_layout()
KINDS = {"contiguous": GemmType.CONTIGUOUS, "psum": GemmType.PSUM, "masked": GemmType.MASKED}


def grouped_weights(num_groups, n, k, device="cuda"):
    return per_block_cast_to_fp8(torch.randn(num_groups, n, k, device=device, dtype=torch.bfloat16))


def tokens(shape, device="cuda"):
    return per_token_cast_to_fp8(torch.randn(*shape, device=device, dtype=torch.bfloat16))


def contiguous_layout(sizes, device="cuda"):
    """Per-row expert ids (-1 on padding) and prefix-sum ends for experts of the given row counts."""
    ends, start = [], 0
    for size in sizes:
        ends.append(start + size)
        start = align(start + size, ALIGNMENT)
    m_total = max(start, ALIGNMENT)
    ids = torch.full((m_total,), -1, dtype=torch.int32)
    begin = 0
    for group, end in enumerate(ends):
        ids[begin:end] = group
        begin = align(end, ALIGNMENT)
    return ids.to(device), torch.tensor(ends, dtype=torch.int32, device=device)


def expected_contiguous(a, b, n, layout, use_psum):
    ref = torch.full((a[0].shape[0], n), float("nan"), device=a[0].device)
    reference.m_grouped_fp8_gemm_nt_contiguous(a, b, ref, layout, use_psum)
    return ref


def expected_masked(a, b, n, masked_m):
    ref = torch.full((*a[0].shape[:2], n), float("nan"), device=a[0].device)
    reference.m_grouped_fp8_gemm_nt_masked(a, b, ref, masked_m, 0)
    return ref


def assert_matches(d, ref):
    """Rows the reference wrote match; rows it left NaN (untouched) are still the poison."""
    written = ~torch.isnan(ref)
    assert torch.isnan(d.float()[~written]).all(), "rows that must stay untouched were written"
    assert not torch.isnan(d.float()[written]).any(), "unwritten (NaN-poisoned) output elements"
    if written.any():
        diff = calc_diff(d.float()[written], ref[written])
        assert diff < 1e-5, f"calc_diff {diff:.3e}"


# ---- GPU ---------------------------------------------------------------------------------------------------

SIZES = [
    [300, 0, 1, 128, 77],  # an empty expert, one of a single row, an exactly aligned one
    [1],
    [0, 0, 5],
    [513, 255, 129, 1, 64, 0, 200, 31],
]


@gpu
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("n,k", [(256, 384), (576, 1024)])
@pytest.mark.parametrize("use_psum", [False, True])
def test_contiguous(sizes, n, k, use_psum, seed):
    ids, ends = contiguous_layout(sizes)
    b = grouped_weights(len(sizes), n, k)
    a = tokens((ids.numel(), k))
    layout = ends if use_psum else ids
    d = torch.full((ids.numel(), n), float("nan"), device="cuda", dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, layout, use_psum_layout=use_psum)
    assert_matches(d, expected_contiguous(a, b, n, layout, use_psum))


@gpu
def test_contiguous_treats_out_of_range_ids_as_padding(seed):
    ids, _ = contiguous_layout([200, 100])
    ids[5] = 2  # G = 2: not an expert
    ids[130] = -7
    ids[256:] = 99  # a whole block of garbage ids
    b = grouped_weights(2, 256, 256)
    a = tokens((ids.numel(), 256))
    d = torch.full((ids.numel(), 256), float("nan"), device="cuda", dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, ids)
    assert_matches(d, expected_contiguous(a, b, 256, ids, False))


@gpu
# max_m // 2 is the heuristic's expected_m: 160 picks B multicast across block-row pairs.
@pytest.mark.parametrize("max_m,masked", [(64, [0, 1, 64, 33]), (200, [200, 7, 0, 129, 300, -5]), (32, [32] * 32),
                                          (320, [320, 7, 0, 129, 257, 1000, -5, 128])])
@pytest.mark.parametrize("n,k", [(512, 512), (4096, 1024)])
def test_masked(max_m, masked, n, k, seed):
    num_groups = len(masked)
    b = grouped_weights(num_groups, n, k)
    a = tokens((num_groups, max_m, k))
    masked_m = torch.tensor(masked, dtype=torch.int32, device="cuda")
    d = torch.full((num_groups, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m=max(max_m // 2, 1))
    assert_matches(d, expected_masked(a, b, n, masked_m))


@gpu
@pytest.mark.parametrize("expected_m", [48, 160])
def test_masked_graph_replay_with_changing_counts(expected_m, seed):
    num_groups, max_m, n, k = 6, 96, 512, 512
    b = grouped_weights(num_groups, n, k)
    a = tokens((num_groups, max_m, k))
    masked_m = torch.full((num_groups,), max_m, dtype=torch.int32, device="cuda")
    d = torch.empty(num_groups, max_m, n, device="cuda", dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m)
    for counts in ([0, 1, 95, 96, 50, 3], [96, 0, 0, 64, 65, 1]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(d, expected_masked(a, b, n, masked_m))


# Every kind of config the grouped heuristic can emit, for each layout: one and two math
# warpgroups, narrow (unswizzled) and wide output tiles, tiles straddling SFB blocks (48 columns),
# both dtypes. BLOCK_N stays <= 128: the grouped kernels spill above.
GROUPED_CONFIGS = [
    Fp8GemmConfig(64, 8, 6, False, False), Fp8GemmConfig(64, 128, 8, False, False),
    Fp8GemmConfig(128, 128, 5, False, False), Fp8GemmConfig(128, 64, 6, False, False),
    Fp8GemmConfig(128, 96, 4, True, False), Fp8GemmConfig(64, 48, 6, False, False),
    Fp8GemmConfig(128, 192, 4, False, False),
]
# Masked only: B multicast across the CTA pair of two block-rows; blocks of 192 rows (three math
# warpgroups).
MASKED_CONFIGS = [Fp8GemmConfig(128, 128, 5, False, False, 2), Fp8GemmConfig(64, 48, 6, False, False, 2),
                  Fp8GemmConfig(128, 96, 4, True, False, 2), Fp8GemmConfig(128, 192, 4, False, False, 2),
                  Fp8GemmConfig(192, 128, 4, False, False), Fp8GemmConfig(192, 96, 4, True, False),
                  Fp8GemmConfig(192, 48, 6, False, False)]


def grouped_case(kind, sizes, n, k, max_m, dtype=torch.bfloat16):
    """Inputs of a grouped GEMM with experts of the given row counts (masked: ``max_m`` rows each),
    its layout tensor, a NaN-poisoned D and the reference."""
    b = grouped_weights(len(sizes), n, k)
    if kind == "masked":
        a = tokens((len(sizes), max_m, k))
        groups = torch.tensor(sizes, dtype=torch.int32, device="cuda")
        d = torch.full((len(sizes), max_m, n), float("nan"), device="cuda", dtype=dtype)
        return a, b, groups, d, expected_masked(a, b, n, groups)
    ids, ends = contiguous_layout(sizes)
    a = tokens((ids.numel(), k))
    groups = ends if kind == "psum" else ids
    d = torch.full((ids.numel(), n), float("nan"), device="cuda", dtype=dtype)
    return a, b, groups, d, expected_contiguous(a, b, n, groups, kind == "psum")


def run_plan(kind, a, b, groups, d, num_sms, config):
    desc = fp8_gemm.describe(KINDS[kind], a[0], b[0], d, expected_m=64)
    plan = fp8_gemm.plan(desc, a[0], b[0], d, gpu_facts(num_sms), config)
    plan.launch(a[0], moegemm.get_mn_major_tma_aligned_tensor(a[1]), b[0], b[1], d, groups)


# Contiguous kinds: pairs side by side along N sharing A (and the expert), and pairs stacked along M
# sharing B where one expert holds both block-rows.
CONTIGUOUS_PAIR_CONFIGS = [Fp8GemmConfig(128, 128, 5, False, False, cluster_n=2),
                           Fp8GemmConfig(64, 32, 6, True, False, cluster_n=2),
                           Fp8GemmConfig(128, 128, 5, False, False, cluster_m=2),
                           Fp8GemmConfig(128, 192, 4, False, False, cluster_m=2),
                           Fp8GemmConfig(64, 64, 6, True, False, cluster_m=2)]

EVERY_CONFIG = ([(config, kind) for kind in ("contiguous", "psum", "masked") for config in GROUPED_CONFIGS]
                + [(config, "masked") for config in MASKED_CONFIGS]
                + [(config, kind) for kind in ("contiguous", "psum") for config in CONTIGUOUS_PAIR_CONFIGS])


@gpu
@pytest.mark.parametrize("config,kind", EVERY_CONFIG,
                         ids=lambda value: value if isinstance(value, str) else fp8_gemm.kernel_name(value))
@pytest.mark.parametrize("k", [640, 1024])  # ceil(K/128) % 4 != 0 / == 0: SFB in one- and two-row boxes
def test_every_config(config, kind, k, seed):
    dtype = torch.float32 if config.out_fp32 else torch.bfloat16
    a, b, groups, d, ref = grouped_case(kind, [130, 0, 1, 64, 300], 1000, k, 320, dtype)
    run_plan(kind, a, b, groups, d, None, config)
    assert_matches(d, ref)


@gpu
@pytest.mark.parametrize("num_sms", [1, 6])
@pytest.mark.parametrize("kind,pair", [("contiguous", "cluster_n"), ("contiguous", "cluster_m"), ("psum", "cluster_n"),
                                       ("psum", "cluster_m"), ("masked", "cluster_m")])
def test_many_tiles_per_sm(num_sms, kind, pair, seed):
    """Each CTA (pair) takes many tiles, padding blocks and idle warpgroups or CTAs among them (pairs
    over two experts' block-rows, a last block-row alone): the stage ring must stay in step across
    tiles. On one SM, single CTAs."""
    a, b, groups, d, ref = grouped_case(kind, [513, 0, 190, 1, 64, 129], 384, 512, 520)
    run_plan(kind, a, b, groups, d, num_sms, Fp8GemmConfig(128, 128, 5, False, False, **{pair: 2}))
    assert_matches(d, ref)


@pytest.fixture
def check_groups():
    saved = moegemm.get_check_groups()
    moegemm.set_check_groups(True)
    yield
    moegemm.set_check_groups(saved)


@gpu
@pytest.mark.usefixtures("check_groups")
def test_check_groups_names_bad_values():
    b = grouped_weights(2, 256, 256)
    a = tokens((2, 64, 256))
    d = torch.empty(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"masked_m: .*\[1\] = 65"):
        moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, torch.tensor([3, 65], dtype=torch.int32, device="cuda"), 8)
    ids, _ = contiguous_layout([10, 10])
    ids[3] = 5
    a = tokens((ids.numel(), 256))
    d = torch.empty(ids.numel(), 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"grouped_layout: .*\[3\] = 5"):
        moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, ids)


@gpu
def test_masked_under_torch_compile(seed):
    b = grouped_weights(3, 256, 256)
    a = tokens((3, 64, 256))
    masked_m = torch.tensor([64, 0, 17], dtype=torch.int32, device="cuda")

    @torch.compile(fullgraph=True)
    def f(a0, sfa, b0, sfb, masked_m):
        d = torch.zeros(3, 64, 256, device="cuda", dtype=torch.bfloat16)
        moegemm.m_grouped_fp8_gemm_nt_masked((a0, sfa), (b0, sfb), d, masked_m, 32)
        return d.float()

    out = f(a[0], a[1], b[0], b[1], masked_m)
    ref = expected_masked(a, b, 256, masked_m).nan_to_num(0.0)
    assert calc_diff(out, ref) < 1e-5


# ---- CPU: the reference path and the argument checks ------------------------------------------------------


def test_cpu_runs_reference(seed):
    ids, ends = contiguous_layout([3, 0, 130], device="cpu")
    b = grouped_weights(3, 136, 256, device="cpu")
    a = tokens((ids.numel(), 256), device="cpu")
    d = torch.full((ids.numel(), 136), float("nan"), dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, ids)
    assert_matches(d, expected_contiguous(a, b, 136, ids, False))


def _contiguous_args():
    ids, _ = contiguous_layout([3, 5], device="cpu")
    b = grouped_weights(2, 128, 256, device="cpu")
    a = tokens((ids.numel(), 256), device="cpu")
    return a, b, torch.empty(ids.numel(), 128, dtype=torch.bfloat16), ids


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a, b, d, ids: (a, b, d, ids.long()), TypeError, "grouped_layout: expected dtype"),
    (lambda a, b, d, ids: (a, b, d, ids[:-1]), ValueError, "grouped_layout: expected shape"),
    (lambda a, b, d, ids: ((a[0][:200], a[1][:200]), b, d[:200], ids[:200]), ValueError, "multiple of 128"),
    (lambda a, b, d, ids: (a, (b[0][:, :, :128], b[1]), d, ids), ValueError, "b: expected shape"),
    (lambda a, b, d, ids: (a, (b[0], b[1][:1]), d, ids), ValueError, "sfb: expected shape"),
    (lambda a, b, d, ids: (a, b, d[:, :64], ids), ValueError, "d: expected shape"),
    (lambda a, b, d, ids: (a, (b[0].transpose(0, 1).contiguous().transpose(0, 1), b[1]), d, ids), ValueError,
     "b: expected the experts stacked"),
    (lambda a, b, d, ids: ((a[0].float(), a[1]), b, d, ids), TypeError, "a: expected dtype"),
])
def test_contiguous_bad_arguments_raise(mutate, error, match):
    a, b, d, ids = _contiguous_args()
    with pytest.raises(error, match=match):
        moegemm.m_grouped_fp8_gemm_nt_contiguous(*mutate(a, b, d, ids))


def test_psum_layout_length_is_checked():
    a, b, d, _ = _contiguous_args()
    with pytest.raises(ValueError, match="grouped_layout: expected shape"):
        moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, torch.tensor([3], dtype=torch.int32), use_psum_layout=True)


def _masked_args():
    b = grouped_weights(2, 128, 256, device="cpu")
    a = tokens((2, 32, 256), device="cpu")
    return a, b, torch.empty(2, 32, 128, dtype=torch.bfloat16), torch.tensor([3, 32], dtype=torch.int32)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a, b, d, m, e: ((a[0][:1], a[1][:1]), b, d, m, e), ValueError, "a: expected G = 2 experts"),
    (lambda a, b, d, m, e: (a, b, d, m[:1], e), ValueError, "masked_m: expected shape"),
    (lambda a, b, d, m, e: (a, b, d, m.float(), e), TypeError, "masked_m: expected dtype"),
    (lambda a, b, d, m, e: (a, b, d, m, -1), ValueError, "expected_m"),
    (lambda a, b, d, m, e: (a, b, d[:, :16], m, e), ValueError, "d: expected shape"),
])
def test_masked_bad_arguments_raise(mutate, error, match):
    a, b, d, masked_m = _masked_args()
    with pytest.raises(error, match=match):
        moegemm.m_grouped_fp8_gemm_nt_masked(*mutate(a, b, d, masked_m, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the mixed-device case")
def test_masked_m_on_cpu_raises():
    a, b, d, masked_m = _masked_args()
    a = (a[0].cuda(), a[1].cuda())
    b = (b[0].cuda(), b[1].cuda())
    with pytest.raises(ValueError, match="masked_m on cpu"):
        moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d.cuda(), masked_m, 16)


def test_grouped_heuristic_never_splits_k():
    for kind in ("contiguous", "psum", "masked"):
        for m, groups in ((32, 32), (129, 32), (192, 32), (193, 32), (8192, 4), (1, 8)):
            config = fp8_gemm.select_config(GemmDesc(KINDS[kind], m, 4096, 7168, groups), H100)
            assert config.split_k == 1 and config.gemm_type is KINDS[kind]
            # Masked experts of 129 to 192 rows: one block of three warpgroups; larger ones span two
            # block-rows, which share B by multicast, as contiguous experts of two block-rows or more do
            # in tiles of up to 128 columns (contiguous 128 x 192 tiles run alone).
            assert config.block_m == 192 if kind == "masked" and 128 < m <= 192 else config.block_m in (64, 128)
            shares_b = (m > config.block_m if kind == "masked"
                        else m >= 2 * config.block_m and config.block_n <= 128)
            assert config.cluster_m == (2 if shares_b else 1)


# ---- bad memory: meta tensors, overlapping operands; empty problems ---------------------------------------


def test_meta_tensor_raises_even_after_a_cpu_call_of_the_same_shapes():
    a, b, d, ids = _contiguous_args()
    moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, ids)
    with pytest.raises(ValueError, match="d: expected a CUDA or CPU tensor, got one on meta"):
        moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d.to("meta"), ids)
    a, b, d, masked_m = _masked_args()
    moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 16)
    with pytest.raises(ValueError, match="masked_m: expected a CUDA or CPU tensor"):
        moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m.to("meta"), 16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_output_overlapping_an_input_raises(device):
    b = grouped_weights(2, 128, 256, device=device)
    a = tokens((2, 32, 256), device=device)
    masked_m = torch.tensor([3, 32], dtype=torch.int32, device=device)
    d = a[0].view(torch.bfloat16)  # [2, 32, 128]: A's own bytes
    with pytest.raises(ValueError, match="d: expected memory apart from a's"):
        moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 16)
    ids = torch.zeros(128, dtype=torch.int32, device=device)
    a = tokens((128, 256), device=device)
    d = torch.empty(129, 128, device=device, dtype=torch.bfloat16)
    ids = d.view(torch.int32).view(-1)[:128]  # the layout lies in D
    with pytest.raises(ValueError, match="d: expected memory apart from grouped_layout's"):
        moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d[1:], ids)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("use_psum", [False, True])
@pytest.mark.parametrize("m_groups_n_k", [(0, 2, 128, 256), (256, 2, 0, 256), (256, 2, 128, 0), (256, 0, 128, 256)],
                         ids=["M=0", "N=0", "K=0", "G=0"])
def test_contiguous_empty_problems(device, use_psum, m_groups_n_k):
    """Nothing to compute: D untouched, except that with K = 0 the experts' rows are 0 (an empty sum)."""
    m_total, num_groups, n, k = m_groups_n_k
    ids, ends = contiguous_layout([100, 28][:num_groups] if m_total else [0] * num_groups, device=device)
    ids = torch.cat([ids, ids.new_full((m_total,), -1)])[:m_total]
    layout = ends if use_psum else ids
    b = grouped_weights(num_groups, n, k, device=device)
    a = tokens((m_total, k), device=device)
    d = torch.full((m_total, n), float("nan"), device=device, dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, layout, use_psum_layout=use_psum)
    assert_matches(d, expected_contiguous(a, b, n, layout, use_psum))
    if k == 0 and num_groups:
        owned = ids >= 0
        assert (d[owned] == 0).all() and torch.isnan(d[~owned].float()).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("shape", [(2, 0, 128, 256), (2, 32, 0, 256), (2, 32, 128, 0), (0, 32, 128, 256)],
                         ids=["max_M=0", "N=0", "K=0", "G=0"])
def test_masked_empty_problems(device, shape):
    num_groups, max_m, n, k = shape
    b = grouped_weights(num_groups, n, k, device=device)
    a = tokens((num_groups, max_m, k), device=device)
    masked_m = torch.tensor([5, 40][:num_groups], dtype=torch.int32, device=device)
    d = torch.full((num_groups, max_m, n), float("nan"), device=device, dtype=torch.bfloat16)
    moegemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, max_m)
    assert_matches(d, expected_masked(a, b, n, masked_m))
    if k == 0:
        assert (d[0, :5] == 0).all() and torch.isnan(d[0, 5:].float()).all() and (d[1] == 0).all()


@pytest.mark.parametrize("kind", ["contiguous", "psum", "masked"])
def test_k0_row_rule_matches_the_reference(kind):
    """The GPU's K = 0 path (whole-tensor ops, no host read) zeroes the rows the reference writes."""
    from moegemm.ops import gemm_common

    b = grouped_weights(3, 64, 0, device="cpu")
    if kind == "masked":
        a = tokens((3, 40, 0), device="cpu")
        groups = torch.tensor([5, 0, 99], dtype=torch.int32)
        ref = expected_masked(a, b, 64, groups)
    else:
        ids, ends = contiguous_layout([100, 0, 129], device="cpu")
        groups = ends if kind == "psum" else ids
        a = tokens((ids.numel(), 0), device="cpu")
        ref = expected_contiguous(a, b, 64, groups, kind == "psum")
    d = torch.full(ref.shape, float("nan"))
    gemm_common.zero_expert_rows(KINDS[kind], d, groups, 3)
    assert torch.equal(d.isnan(), ref.isnan()) and (d[~d.isnan()] == 0).all()
