"""fp8_mqa_logits and fp8_fp4_mqa_logits (the lightning indexer), dense and paged: the references
against loops over queries and keys (CPU), argument checks, and the SM90 kernels against the reference
on the same FP8 or FP4 inputs and on the BF16 ones they were cast from (GPU): full logits with and
without cleaning, the compressed form, every key range shape (empty, past the keys, negative starts),
S and S_kv off the blocks, repeated calls bitwise equal."""

from dataclasses import replace

import pytest
import torch
from conftest import H100, needs_sass_tools

import moegemm
from moegemm import calc_diff, device, reference
from moegemm.gemm.config import tma_pitch
from moegemm.jit import compiler
from moegemm.kernels import mqa_logits
from moegemm.ops import attention

gpu = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


# Against the BF16 inputs the casts' error shows (DeepGEMM's bounds): a statistical bound, which a
# logit or a few of them (one query, a short context) can exceed without any fault of the kernel.
# The cast bounds hold over many queries: a query's rounding errors share its q, so over a few rows
# (7 x 300) the metric strays to 0.98e-3 in 30 draws on the CPU reference, 1.03e-3 once on a GPU.
ENOUGH_ROWS_FOR_CAST_BOUNDS = 64


def cast_bound(fp4):
    return 0.02 if fp4 else 1e-3


def cast_fp4(x):
    """DeepGEMM's FP4 form of the rows of x [..., D]: (packed e2m1 [..., D/2], int32 exponents [...])."""
    packed, sf = moegemm.per_token_cast_to_fp4(x.reshape(-1, x.shape[-1]), use_ue8m0=True, gran_k=32,
                                               use_packed_ue8m0=True)
    return packed.view(*x.shape[:-1], -1), sf.view(x.shape[:-1])


def make_inputs(seq_len, seq_len_kv, heads, head_dim, device="cuda", fp4=False):
    """BF16 q, kv and FP32 weights, and the kernels' forms as fp8_fp4_mqa_logits takes them: q cast as it
    is and kv per row with a scale ((q, None), (kv, scales), weights), or both in FP4."""
    q = torch.randn(seq_len, heads, head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(seq_len_kv, head_dim, device=device, dtype=torch.bfloat16)
    weights = torch.randn(seq_len, heads, device=device)
    if fp4:
        return (q, kv, weights), (cast_fp4(q), cast_fp4(kv), weights)
    scales = kv.float().abs().amax(dim=1).clamp(min=1e-4) / 448
    kv_fp8 = (kv.float() / scales[:, None]).to(FP8)
    return (q, kv, weights), ((q.to(FP8), None), (kv_fp8, scales), weights)


def key_ranges(seq_len, seq_len_kv, kind, device="cuda"):
    """(ks, ke) int32: "causal" (query i sees the keys up to S_kv - S + i), "cp" (two chunks of a
    context-parallel rank, as DeepGEMM's tests make them), "random" (any order, empty, past S_kv,
    negative starts)."""
    if kind == "causal":
        ks = torch.zeros(seq_len, dtype=torch.int32)
        ke = torch.arange(seq_len, dtype=torch.int32) + (seq_len_kv - seq_len + 1)
    elif kind == "cp":
        half = seq_len // 2
        ks = torch.zeros(seq_len, dtype=torch.int32)
        ke = torch.cat([torch.arange(half) + half, torch.arange(seq_len - half) + seq_len_kv - seq_len + half])
    else:
        ks = torch.randint(-20, seq_len_kv + 20, (seq_len,), dtype=torch.int32)
        ke = ks + torch.randint(-10, seq_len_kv // 2 + 30, (seq_len,), dtype=torch.int32)
    return ks.to(torch.int32).to(device), ke.to(torch.int32).to(device)


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_reference_against_loops(fp4, seed):
    (_, _, _), (q, kv, weights) = make_inputs(5, 13, 4, 64 if fp4 else 8, device="cpu", fp4=fp4)
    ks, ke = key_ranges(5, 13, "random", device="cpu")
    logits = reference.fp8_fp4_mqa_logits(q, kv, weights, ks, ke)
    if fp4:  # through DeepGEMM's dequantisation, cast_back_from_fp4
        queries = moegemm.cast_back_from_fp4(q[0].view(20, -1), q[1].view(20, 1), 32, True).view(5, 4, -1)
        keys = moegemm.cast_back_from_fp4(kv[0], kv[1].view(13, 1), 32, True)
    else:
        queries, keys = q[0].float(), kv[0].float() * kv[1][:, None]
    for i in range(5):
        for j in range(13):
            if ks[i] <= j < ke[i]:
                expected = sum(float(weights[i, h]) * max(float(queries[i, h] @ keys[j]), 0.0) for h in range(4))
                assert abs(float(logits[i, j]) - expected) <= 1e-4 * (1 + abs(expected))
            else:
                assert logits[i, j] == float("-inf")
    compressed = reference.fp8_fp4_mqa_logits(q, kv, weights, ks, ke, clean_logits=False, max_seqlen_k=6)
    for i in range(5):
        for c in range(6):
            j = int(ks[i]) + c
            expected = logits[i, j] if 0 <= j < 13 and j < ke[i] else float("-inf")
            assert compressed[i, c] == expected


def test_cpu_runs_the_reference(seed):
    (_, _, _), (q, kv, weights) = make_inputs(6, 40, 4, 16, device="cpu")
    ks, ke = key_ranges(6, 40, "causal", device="cpu")
    out = moegemm.fp8_mqa_logits(q[0], kv, weights, ks, ke, logits_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (6, 40)
    assert torch.equal(out, reference.fp8_mqa_logits(q[0], kv, weights, ks, ke).to(torch.bfloat16))
    assert torch.equal(out, moegemm.fp8_fp4_mqa_logits(q, kv, weights, ks, ke, logits_dtype=torch.bfloat16))
    (_, _, _), (q, kv, weights) = make_inputs(6, 40, 4, 64, device="cpu", fp4=True)
    out = moegemm.fp8_fp4_mqa_logits(q, kv, weights, ks, ke, clean_logits=False, max_seqlen_k=9)
    assert out.shape == (6, 9)
    assert torch.equal(out, reference.fp8_fp4_mqa_logits(q, kv, weights, ks, ke, max_seqlen_k=9))


def test_fp4_checks_name_the_argument():
    (_, _, _), (q, kv, weights) = make_inputs(4, 16, 4, 64, device="cpu", fp4=True)
    ks, ke = key_ranges(4, 16, "causal", device="cpu")
    with pytest.raises(TypeError, match=r"q: expected a \(values, scales or None\) pair"):
        moegemm.fp8_fp4_mqa_logits(q[0], kv, weights, ks, ke)
    with pytest.raises(ValueError, match=r"q\[1\]: expected shape \(4, 4\)"):
        moegemm.fp8_fp4_mqa_logits((q[0], q[1][:, :2]), kv, weights, ks, ke)
    with pytest.raises(TypeError, match=r"q\[1\]: expected dtype torch.int32"):
        moegemm.fp8_fp4_mqa_logits((q[0], q[1].float()), kv, weights, ks, ke)
    with pytest.raises(ValueError, match=r"q\[0\]: expected D / 2 = 1 to 64 bytes"):
        moegemm.fp8_fp4_mqa_logits((torch.cat([q[0], q[0], q[0]], -1), q[1]), kv, weights, ks, ke)
    with pytest.raises(TypeError, match=r"kv\[0\]: expected dtype torch.int8 or torch.uint8"):
        moegemm.fp8_fp4_mqa_logits(q, (kv[0].float(), kv[1]), weights, ks, ke)
    with pytest.raises(ValueError, match=r"kv\[0\]: expected \[S_kv, 32\] \(D / 2 bytes with D = 64"):
        moegemm.fp8_fp4_mqa_logits(q, (kv[0][:, :16], kv[1]), weights, ks, ke)
    with pytest.raises(TypeError, match=r"kv\[1\]: expected dtype torch.int32"):
        moegemm.fp8_fp4_mqa_logits(q, (kv[0], kv[1].float()), weights, ks, ke)


def test_checks_name_the_argument():
    (_, _, _), (q, kv, weights) = make_inputs(4, 16, 4, 16, device="cpu")
    q = q[0]
    ks, ke = key_ranges(4, 16, "causal", device="cpu")
    with pytest.raises(TypeError, match="q: expected dtype torch.float8_e4m3fn"):
        moegemm.fp8_mqa_logits(q.float(), kv, weights, ks, ke)
    with pytest.raises(ValueError, match=r"kv\[0\]: expected \[S_kv, 16\]"):
        moegemm.fp8_mqa_logits(q, (kv[0][:, :8], kv[1]), weights, ks, ke)
    with pytest.raises(ValueError, match=r"kv\[1\]: expected shape \(16,\)"):
        moegemm.fp8_mqa_logits(q, (kv[0], kv[1][:3]), weights, ks, ke)
    with pytest.raises(TypeError, match="kv: expected a"):
        moegemm.fp8_mqa_logits(q, kv[0], weights, ks, ke)
    with pytest.raises(ValueError, match=r"weights: expected shape \(4, 4\)"):
        moegemm.fp8_mqa_logits(q, kv, weights[:, :2], ks, ke)
    with pytest.raises(TypeError, match="cu_seq_len_k_end: expected dtype torch.int32"):
        moegemm.fp8_mqa_logits(q, kv, weights, ks, ke.long())
    with pytest.raises(ValueError, match="clean_logits: compressed logits"):
        moegemm.fp8_mqa_logits(q, kv, weights, ks, ke, max_seqlen_k=4)
    with pytest.raises(ValueError, match="max_seqlen_k: expected an int >= 0"):
        moegemm.fp8_mqa_logits(q, kv, weights, ks, ke, clean_logits=False, max_seqlen_k=-1)
    with pytest.raises(ValueError, match="logits_dtype"):
        moegemm.fp8_mqa_logits(q, kv, weights, ks, ke, logits_dtype=torch.float16)


def _poisoned_call(inputs, ks, ke, clean, max_seqlen_k, dtype):
    """The kernel into a NaN-filled output, so that an element it should write and did not shows."""
    q, kv, weights = inputs
    columns = max_seqlen_k or kv[0].shape[0]
    logits = torch.full((q[0].shape[0], columns), float("nan"), dtype=dtype, device="cuda")
    attention._MQA_LOGITS(q[0], q[1], kv[0], kv[1], weights, ks, ke, logits, clean, max_seqlen_k)
    return logits


def _inside(ks, ke, seq_len_kv, columns, compressed):
    """Which elements hold a logit: key in [ks, ke) and in [0, S_kv)."""
    c = torch.arange(columns, device=ks.device)[None, :]
    keys = ks[:, None].long() + c if compressed else c.expand(ks.shape[0], -1)
    return (keys >= ks[:, None]) & (keys < ke[:, None]) & (keys >= 0) & (keys < seq_len_kv)


@gpu
@pytest.mark.parametrize("heads,head_dim", [(64, 128), (32, 128), (64, 64), (32, 32)])
@pytest.mark.parametrize("seq_len,seq_len_kv,kind", [(128, 1024, "cp"), (7, 300, "causal"), (130, 4099, "random"),
                                                     (1, 129, "causal"), (256, 8192, "causal")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["clean", "raw", "compressed"])
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_kernel_against_the_reference(heads, head_dim, seq_len, seq_len_kv, kind, dtype, form, fp4, seed):
    bf16_inputs, inputs = make_inputs(seq_len, seq_len_kv, heads, head_dim, fp4=fp4)
    ks, ke = key_ranges(seq_len, seq_len_kv, kind)
    compressed = form == "compressed"
    max_seqlen_k = max(1, int((ke - ks).max())) if compressed else 0
    logits = _poisoned_call(inputs, ks, ke, form == "clean", max_seqlen_k, dtype)
    ref = reference.fp8_fp4_mqa_logits(*inputs, ks, ke, max_seqlen_k=max_seqlen_k)
    inside = _inside(ks, ke, seq_len_kv, logits.shape[1], compressed)
    if form == "clean":
        assert torch.equal(torch.isneginf(logits), ~inside), "-inf exactly outside each row's keys"
    assert not logits[inside].isnan().any() and not logits[inside].isinf().any()
    if inside.any():
        got, expected = logits[inside].double(), ref[inside].double()
        assert calc_diff(got, expected) < (3e-5 if dtype == torch.bfloat16 else 5e-6)
    if inside.any(1).sum() >= ENOUGH_ROWS_FOR_CAST_BOUNDS:
        q, kv, weights = bf16_inputs
        exact = reference._mqa_logits(q.float(), kv.float(), weights, ks, ke, max_seqlen_k, torch.float32)
        assert calc_diff(logits[inside].double(), exact[inside].double()) < cast_bound(fp4)
    again = _poisoned_call(inputs, ks, ke, form == "clean", max_seqlen_k, dtype)
    assert torch.equal(again[inside], logits[inside]), "repeated calls bitwise equal"


@gpu
@pytest.mark.parametrize("heads,head_dim", [(64, 128), (32, 64), (64, 64)])
@pytest.mark.parametrize("seq_len,seq_len_kv,kind", [(130, 4099, "random"), (7, 300, "causal"), (256, 8192, "cp")])
@pytest.mark.parametrize("form", ["clean", "raw", "compressed"])
@pytest.mark.parametrize("variant", ["other_cluster_size", "pipelined"])
def test_unpicked_configs_against_the_reference(heads, head_dim, seq_len, seq_len_kv, kind, form, variant, seed):
    """Configs select_config does not pick (the sweep's, planned directly): the other cluster size
    (pairs of CTAs sharing their key blocks by multicast, or single CTAs where pairs are picked; an odd
    number of q blocks among the shapes), and the pipelined form (odd and even block counts a q block)."""
    _, inputs = make_inputs(seq_len, seq_len_kv, heads, head_dim)
    (q, _), (kv, kv_sf), weights = inputs
    ks, ke = key_ranges(seq_len, seq_len_kv, kind)
    compressed, clean = form == "compressed", form == "clean"
    max_seqlen_k = max(1, int((ke - ks).max())) if compressed else 0
    logits = torch.full((seq_len, max_seqlen_k or seq_len_kv), float("nan"), device="cuda")
    facts = device.device_facts(0)
    pick = mqa_logits.select_config(heads, head_dim, False, compressed, clean, facts)
    config = (replace(pick, cluster_q=3 - pick.cluster_q) if variant == "other_cluster_size"
              else mqa_logits.pipelined(pick, facts))
    plan = mqa_logits.plan(seq_len, seq_len_kv, heads, head_dim, tma_pitch(weights), logits, compressed, clean,
                           facts, config=config)
    plan.launch_pointers(0, q.data_ptr(), q.data_ptr(), kv.data_ptr(), kv_sf.data_ptr(), weights.data_ptr(),
                         ks.data_ptr(), ke.data_ptr(), logits.data_ptr())
    ref = reference.fp8_fp4_mqa_logits(*inputs, ks, ke, max_seqlen_k=max_seqlen_k)
    inside = _inside(ks, ke, seq_len_kv, logits.shape[1], compressed)
    if clean:
        assert torch.equal(torch.isneginf(logits), ~inside), "-inf exactly outside each row's keys"
    assert not logits[inside].isnan().any() and not logits[inside].isinf().any()
    if inside.any():
        assert calc_diff(logits[inside].double(), ref[inside].double()) < 5e-6


@gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_public_function_on_the_gpu(fp4, seed):
    _, (q, kv, weights) = make_inputs(100, 700, 64, 128, fp4=fp4)
    ks, ke = key_ranges(100, 700, "causal")
    logits = moegemm.fp8_fp4_mqa_logits(q, kv, weights, ks, ke)
    assert logits.shape == (100, 700) and logits.is_contiguous()
    if not fp4:
        assert torch.equal(logits, moegemm.fp8_mqa_logits(q[0], kv, weights, ks, ke))
    ref = reference.fp8_fp4_mqa_logits(q, kv, weights, ks, ke)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(logits), finite)
    assert calc_diff(logits[finite].double(), ref[finite].double()) < 5e-6


@gpu
def test_fp4_rows_of_widely_spread_scales(seed):
    """Blocks of one row 2^-20 to 2^12 apart: the small ones round in the widening (fp4.cuh), their
    share of a logit too small to show."""
    _, (q, kv, weights) = make_inputs(64, 512, 64, 128, fp4=True)
    spread = torch.tensor([0, 20, 8, 32], dtype=torch.int32, device="cuda")  # exponent offsets of the 4 blocks
    as_bytes = kv[1].view(torch.uint8).view(-1, 4).int()
    kv = (kv[0], ((as_bytes - 20 + spread).clamp(1, 254).to(torch.uint8)).view(torch.int32).view(-1))
    ks, ke = key_ranges(64, 512, "random")
    logits = moegemm.fp8_fp4_mqa_logits(q, kv, weights, ks, ke)
    ref = reference.fp8_fp4_mqa_logits(q, kv, weights, ks, ke)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(logits), finite)
    assert calc_diff(logits[finite].double(), ref[finite].double()) < 5e-6


@gpu
def test_gpu_checks():
    _, (q, kv, weights) = make_inputs(4, 64, 16, 64)
    ks, ke = key_ranges(4, 64, "causal")
    with pytest.raises(ValueError, match=r"q: expected H in \(32, 64\)"):
        moegemm.fp8_mqa_logits(q[0], kv, weights, ks, ke)
    _, (q, kv, weights) = make_inputs(4, 64, 32, 64)
    with pytest.raises(ValueError, match="kv\\[1\\]: expected a contiguous tensor"):
        moegemm.fp8_mqa_logits(q[0], (kv[0], torch.stack([kv[1], kv[1]], 1)[:, 0]), weights, ks, ke)
    _, (q, kv, weights) = make_inputs(4, 64, 32, 64, fp4=True)
    with pytest.raises(ValueError, match=r"q\[1\]: expected a contiguous tensor"):
        moegemm.fp8_fp4_mqa_logits((q[0], torch.stack([q[1], q[1]], -1)[..., 0]), kv, weights, ks, ke)


@needs_sass_tools
@pytest.mark.parametrize("config", mqa_logits.all_configs(H100), ids=mqa_logits.kernel_name)
def test_config_compiles_without_spills(cache, config):
    build = mqa_logits.build(config)
    report = build.resources()
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    assert "QGMMA" in compiler.disassemble(build.cubin_path)
    # ptxas' notes C7510-C7519: WGMMAs serialized, or waits it injected (the pipelined configs' risk).
    assert not [line for line in build.log.splitlines() if "(C751" in line], build.log


# ---- the paged form ------------------------------------------------------------------------------------------


def make_paged(batch, next_n, heads, head_dim, max_context_len, device="cuda", spare_pages=3, fp4=False,
               originals=None):
    """Random context lengths (0 among them), a shuffled block table, the cache in DeepGEMM's layout
    (FP8 or FP4), q as fp8_fp4_paged_mqa_logits takes it. ``originals``: a list that receives the BF16
    q and keys [pages, 64, D] the casts started from."""
    pages_per_batch = -(-max_context_len // 64)
    pages = batch * pages_per_batch + spare_pages
    lens = torch.randint(0, max_context_len + 1, (batch, 1))
    lens[0] = 0
    lens = torch.cat([lens, (lens + 1).clamp(max=max_context_len)], dim=1)[:, :next_n]
    table = torch.randperm(pages)[:batch * pages_per_batch].view(batch, pages_per_batch)
    keys = torch.randn(pages, 64, head_dim, dtype=torch.bfloat16)
    q = torch.randn(batch, next_n, heads, head_dim, dtype=torch.bfloat16)
    if originals is not None:
        originals += [q.to(device), keys.to(device)]
    if fp4:
        values, scales = cast_fp4(keys)
        q = cast_fp4(q)
    else:
        scales = keys.float().abs().amax(dim=2).clamp(min=1e-4) / 448
        values = (keys.float() / scales[..., None]).to(FP8)
        q = (q.to(FP8), None)
    cache = torch.cat([values.reshape(pages, -1).view(torch.uint8), scales.view(torch.uint8).view(pages, -1)], dim=1)
    weights = torch.randn(batch * next_n, heads)
    q = tuple(t if t is None else t.to(device) for t in q)
    return (q, *(t.to(device) for t in (cache.view(pages, 64, 1, -1), weights, lens.to(torch.int32),
                                        table.to(torch.int32))))


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_paged_reference_against_loops(fp4, seed):
    q, cache, weights, lens, table = make_paged(3, 2, 4, 64 if fp4 else 32, 150, device="cpu", fp4=fp4)
    logits = reference.fp8_fp4_paged_mqa_logits(q, cache, weights, lens, table, None, 150)
    flat = cache.view(cache.shape[0], -1)
    if fp4:  # through DeepGEMM's dequantisation, cast_back_from_fp4
        keys = moegemm.cast_back_from_fp4(flat[:, :64 * 32].reshape(-1, 32).view(torch.int8),
                                          flat[:, 64 * 32:].contiguous().view(torch.int32).view(-1, 1), 32, True)
        keys = keys.view(-1, 64, 64)
        queries = moegemm.cast_back_from_fp4(q[0].view(24, -1), q[1].view(24, 1), 32, True).view(3, 2, 4, -1)
    else:
        values = flat[:, :64 * 32].contiguous().view(FP8).float().view(-1, 64, 32)
        keys = values * flat[:, 64 * 32:].contiguous().view(torch.float32)[..., None]
        queries = q[0].float()
    for b in range(3):
        for t in range(2):
            row = b * 2 + t
            for j in range(150):
                if j < lens[b, t]:
                    k = keys[table[b, j // 64], j % 64]
                    expected = sum(float(weights[row, h]) * max(float(queries[b, t, h] @ k), 0.0) for h in range(4))
                    assert abs(float(logits[row, j]) - expected) <= 1e-4 * (1 + abs(expected))
                else:
                    assert logits[row, j] == float("-inf")


def test_paged_schedule_covers_every_unit_once():
    lens = torch.tensor([[300, 330], [0, 0], [1100, 1280], [1, 1]], dtype=torch.int32)  # in units of 256 keys
    units = [2, 1, 5, 1]
    for ctas in (1, 3, 4, 9, 10, 40):
        schedule = moegemm.get_paged_mqa_logits_metadata(lens, 64, ctas)
        assert schedule.shape == (ctas + 1, 2) and schedule.dtype == torch.int32
        flat = [sum(units[:b]) + u for b, u in schedule.tolist()]
        assert flat[0] == 0 and flat[-1] == sum(units) and flat == sorted(flat)
        assert max(b - a for a, b in zip(flat, flat[1:], strict=False)) <= -(-sum(units) // ctas)


def test_paged_cpu_runs_the_reference_and_checks(seed):
    q, cache, weights, lens, table = make_paged(2, 1, 4, 64, 100, device="cpu", fp4=True)
    schedule = moegemm.get_paged_mqa_logits_metadata(lens, 64, 4)
    out = moegemm.fp8_fp4_paged_mqa_logits(q, cache, weights, lens, table, schedule, 100)
    assert torch.equal(out, reference.fp8_fp4_paged_mqa_logits(q, cache, weights, lens, table, schedule, 100))
    with pytest.raises(ValueError, match=r"kv_cache: expected \[pages, 64, 1, 36\] \(D / 2 \+ 4 bytes a key\)"):
        moegemm.fp8_fp4_paged_mqa_logits(q, cache[..., :20], weights, lens, table, schedule, 100)
    with pytest.raises(ValueError, match=r"q\[1\]: expected shape \(2, 1, 4\)"):
        moegemm.fp8_fp4_paged_mqa_logits((q[0], q[1][:1]), cache, weights, lens, table, schedule, 100)
    q, cache, weights, lens, table = make_paged(2, 1, 4, 32, 100, device="cpu")
    q = q[0]
    out = moegemm.fp8_paged_mqa_logits(q, cache, weights, lens, table, schedule, 100)
    assert torch.equal(out, reference.fp8_paged_mqa_logits(q, cache, weights, lens, table, schedule, 100))
    with pytest.raises(ValueError, match=r"kv_cache: expected \[pages, 64, 1, 36\]"):
        moegemm.fp8_paged_mqa_logits(q, cache[:, :32], weights, lens, table, schedule, 100)
    with pytest.raises(ValueError, match=r"context_lens: expected shape \(2, 1\)"):
        moegemm.fp8_paged_mqa_logits(q, cache, weights, lens[:1], table, schedule, 100)
    with pytest.raises(ValueError, match="block_kv: expected 64"):
        moegemm.get_paged_mqa_logits_metadata(lens, 32, 4)
    with pytest.raises(ValueError, match="max_context_len: expected an int >= 0"):
        moegemm.fp8_paged_mqa_logits(q, cache, weights, lens, table, schedule, -1)
    with pytest.raises(ValueError, match=r"schedule_meta: expected \[num_sms \+ 1, 2\]"):
        moegemm.fp8_paged_mqa_logits(q, cache, weights, lens, table, schedule[:, :1], 100)


def check_paged_logits(logits, q, cache, weights, lens, table, schedule, max_context_len, clean):
    """The paged kernel's logits against the reference on the same inputs: -inf exactly past each
    token's context (``clean``), no NaN left inside it; returns which elements are inside."""
    ref = reference.fp8_fp4_paged_mqa_logits(q, cache, weights, lens, table, schedule, max_context_len)
    inside = torch.arange(max_context_len, device="cuda")[None, :] < lens.view(-1, 1)
    if clean:
        assert torch.equal(torch.isneginf(logits), ~inside), "-inf exactly past each token's context"
    assert not logits[inside].isnan().any()
    if inside.any():
        assert calc_diff(logits[inside].double(), ref[inside].double()) < 5e-6
    return inside


@gpu
@pytest.mark.parametrize("heads,head_dim", [(64, 128), (32, 128), (64, 64), (32, 32)])
@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("batch,max_context_len,ctas", [(1, 100, 132), (7, 1000, 132), (64, 4096, 132),
                                                         (5, 700, 2)])
@pytest.mark.parametrize("clean", [False, True])
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_paged_kernel_against_the_reference(heads, head_dim, next_n, batch, max_context_len, ctas, clean, fp4, seed):
    originals = []
    q, cache, weights, lens, table = make_paged(batch, next_n, heads, head_dim, max_context_len, fp4=fp4,
                                                originals=originals)
    schedule = moegemm.get_paged_mqa_logits_metadata(lens, 64, ctas)

    def poisoned_call():
        logits = torch.full((batch * next_n, max_context_len), float("nan"), device="cuda")
        attention._PAGED_MQA_LOGITS(q[0], q[1], cache, weights, lens, table, schedule, logits, clean)
        return logits

    logits = poisoned_call()
    inside = check_paged_logits(logits, q, cache, weights, lens, table, schedule, max_context_len, clean)
    if inside.any(1).sum() >= ENOUGH_ROWS_FOR_CAST_BOUNDS:
        q_bf16, keys_bf16 = originals
        exact = reference._paged_logits(q_bf16.float(), keys_bf16.float(), weights, lens, table, max_context_len)
        assert calc_diff(logits[inside].double(), exact[inside].double()) < cast_bound(fp4)
    assert torch.equal(poisoned_call()[inside], logits[inside]), "repeated calls bitwise equal"


@gpu
@pytest.mark.parametrize("heads,head_dim", [(64, 128), (32, 64)])
@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("batch,max_context_len,ctas", [(7, 1000, 132), (64, 4096, 132), (5, 700, 2)])
@pytest.mark.parametrize("clean", [False, True])
def test_paged_pipelined_against_the_reference(heads, head_dim, next_n, batch, max_context_len, ctas, clean, seed):
    """The pipelined form of the FP8 paged kernel (the sweep's, planned directly): CTAs with odd, even
    and single-block runs of a batch's keys."""
    q, cache, weights, lens, table = make_paged(batch, next_n, heads, head_dim, max_context_len)
    schedule = moegemm.get_paged_mqa_logits_metadata(lens, 64, ctas)
    facts = device.device_facts(0)
    config = mqa_logits.pipelined(mqa_logits.select_config(heads, head_dim, False, False, clean, facts, next_n), facts)
    logits = torch.full((batch * next_n, max_context_len), float("nan"), device="cuda")
    plan = mqa_logits.plan_paged(batch, next_n, heads, head_dim, cache.shape[0], table.shape[1], tma_pitch(weights),
                                 logits, clean, ctas, facts, config=config)
    plan.launch_pointers(0, q[0].data_ptr(), q[0].data_ptr(), cache.data_ptr(), weights.data_ptr(), lens.data_ptr(),
                         table.data_ptr(), schedule.data_ptr(), logits.data_ptr())
    check_paged_logits(logits, q, cache, weights, lens, table, schedule, max_context_len, clean)


@gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_paged_cuda_graph_replays_new_context_lengths(fp4, seed):
    q, cache, weights, lens, table = make_paged(8, 2, 64, 128, 512, fp4=fp4)
    num_sms = moegemm.get_num_sms()

    def step():
        schedule = moegemm.get_paged_mqa_logits_metadata(lens, 64, num_sms)
        return moegemm.fp8_fp4_paged_mqa_logits(q, cache, weights, lens, table, schedule, 512, clean_logits=True)

    step()  # compiles and binds outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        lens.copy_(torch.randint(0, 513, lens.shape, device="cuda", dtype=torch.int32))
        graph.replay()
        ref = reference.fp8_fp4_paged_mqa_logits(q, cache, weights, lens, table, None, 512)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(out), finite)
        assert calc_diff(out[finite].double(), ref[finite].double()) < 5e-6
