"""The MoE layer (DeepGEMM's Mega MoE API): the pipeline of moegemm's kernels against the expert-by-expert
reference, routing edge cases, the received-token stats, CUDA-graph replay with new routing, and bad
arguments. On the CPU the pipeline runs the reference GEMMs, so its routing is tested there too. Across
ranks: processes of one host (gloo on the CPU, NCCL with a GPU each) against the one-rank layer."""

import struct

import pytest
import torch
from conftest import H100, needs_sass_tools

import moegemm
from moegemm import quant, reference
from moegemm.intmath import align
from moegemm.jit import compiler, runtime
from moegemm.kernels import fp8_fp4_mega_moe as fused_kernel
from moegemm.kernels import moe_layer
from moegemm.ops import mega_moe
from moegemm.testing import calc_diff

gpu = pytest.mark.gpu
MMA_TYPES = ("fp8xfp4", "bf16xbf16")


def _fp4(weights):
    """FP4 weights ``(int8 [E, N, K/2], packed scales)`` of BF16 ``weights [E, N, K]``."""
    experts, n, k = weights.shape
    packed, sf = moegemm.per_token_cast_to_fp4(weights.flatten(0, 1), use_ue8m0=True, gran_k=32)
    sf = moegemm.transform_sf_into_required_layout(sf.view(experts, n, -1), n, k, (1, 32), experts)
    return packed.view(experts, n, k // 2), sf


def make_layer(mma_type, experts=8, hidden=256, inter=128, topk=3, max_tokens=48, device="cuda"):
    """A buffer and weights of one layer; ``fill`` writes tokens and routing into the buffer."""
    buffer = moegemm.get_symm_buffer_for_mega_moe(None, experts, max_tokens, topk, hidden, inter,
                                                  mma_type=mma_type, device=device)
    l1 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5
    l2 = torch.randn(experts, hidden, inter, device=device, dtype=torch.bfloat16) / inter**0.5
    if mma_type == "fp8xfp4":
        l1, l2 = _fp4(l1), _fp4(l2)
    return buffer, moegemm.transform_weights_for_mega_moe(l1, l2)


def fill(buffer, num_tokens, idx=None, masked_ratio=0.0):
    """Random tokens and routing (top-k of random scores, a share of entries -1) into ``buffer``."""
    device = buffer.x.device
    x = torch.randn(num_tokens, buffer.hidden, device=device, dtype=torch.bfloat16)
    if buffer.mma_type == "fp8xfp4":
        x, sf = moegemm.per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
        buffer.x_sf[:num_tokens].copy_(sf)
    buffer.x[:num_tokens].copy_(x)
    scores = torch.randn(num_tokens, buffer.num_experts, device=device)
    weights, chosen = torch.topk(scores, buffer.num_topk, dim=-1)
    if idx is not None:
        chosen = idx.to(device)
    chosen = chosen.masked_fill(torch.rand(chosen.shape, device=device) < masked_ratio, -1)
    buffer.topk_idx[:num_tokens].copy_(chosen)
    buffer.topk_weights[:num_tokens].copy_(weights.softmax(-1).masked_fill(chosen < 0, 0))


def run(mma_type, buffer, weights, y, stats=None, clamp=None, op=moegemm):
    fn = op.fp8_fp4_mega_moe if mma_type == "fp8xfp4" else op.bf16_mega_moe
    fn(y, *weights, buffer, cumulative_local_expert_recv_stats=stats, activation_clamp=clamp)


# The FP8 path re-quantises the activation from an L1 output whose FP32 rounding differs from the
# reference's in the last bit now and then; an activation that lands on the other side of an e4m3
# rounding boundary moves its token's outputs by up to ~1% at these small I.
TOLERANCE = {"fp8xfp4": 2e-4, "bf16xbf16": 1e-5}


def check_against_reference(mma_type, buffer, weights, num_tokens, clamp=None):
    device = buffer.x.device
    stats = torch.randint(0, 100, (buffer.num_experts,), dtype=torch.int32, device=device)
    expected_stats = stats.clone()
    y = torch.full((num_tokens, buffer.hidden), float("nan"), dtype=torch.bfloat16, device=device)
    ref = torch.empty_like(y)
    run(mma_type, buffer, weights, y, stats, clamp)
    run(mma_type, buffer, weights, ref, expected_stats, clamp, op=reference)
    assert torch.equal(stats, expected_stats)
    assert not y.isnan().any()
    if num_tokens:
        assert calc_diff(y.float(), ref.float()) < TOLERANCE[mma_type]
    return y, ref


# ---- CPU: the pipeline (reference GEMMs) against the expert-by-expert reference ------------------------------


# (experts, max tokens, top-k, the buffer's layout): few pairs an expert take the masked layout, many
# the contiguous one.
LAYOUTS = [(8, 48, 3, True), (4, 200, 3, False)]


@pytest.mark.parametrize("mma_type", MMA_TYPES)
@pytest.mark.parametrize("experts,max_tokens,topk,masked", LAYOUTS)
@pytest.mark.parametrize("num_tokens,masked_ratio", [(48, 0.0), (37, 0.3), (1, 0.0), (5, 1.0), (0, 0.0)])
def test_layer_on_the_cpu(mma_type, experts, max_tokens, topk, masked, num_tokens, masked_ratio, seed):
    buffer, weights = make_layer(mma_type, experts, topk=topk, max_tokens=max_tokens, device="cpu")
    assert buffer.masked == masked
    fill(buffer, num_tokens, masked_ratio=masked_ratio)
    y, ref = check_against_reference(mma_type, buffer, weights, num_tokens)
    if masked_ratio == 1.0:
        assert torch.equal(y, torch.zeros_like(y))  # no token selects an expert


@pytest.mark.parametrize("mma_type", MMA_TYPES)
@pytest.mark.parametrize("experts,max_tokens,topk,masked", LAYOUTS)
def test_one_expert_takes_every_token_and_the_others_none(mma_type, experts, max_tokens, topk, masked, seed):
    buffer, weights = make_layer(mma_type, experts, topk=topk, max_tokens=max_tokens, device="cpu")
    idx = torch.full((48, buffer.num_topk), -1)
    idx[:, 0] = 5
    idx[::3, 2] = 2
    fill(buffer, 48, idx=idx)
    check_against_reference(mma_type, buffer, weights, 48, clamp=0.5)


def test_activation_clamp_changes_the_result(seed):
    buffer, weights = make_layer("bf16xbf16", device="cpu")
    fill(buffer, 16)
    y, _ = check_against_reference("bf16xbf16", buffer, weights, 16, clamp=1e-3)
    free, _ = check_against_reference("bf16xbf16", buffer, weights, 16)
    assert not torch.equal(y, free)


class _TwoRanks:
    """Stands for a process group of two ranks where only its size is asked (no collective is reached)."""

    def size(self):
        return 2

    def rank(self):
        return 0


def test_bad_arguments_raise():
    buffer, weights = make_layer("fp8xfp4", device="cpu")
    y = torch.empty(4, buffer.hidden, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="recipe"):
        moegemm.fp8_fp4_mega_moe(y, *weights, buffer, recipe=(1, 128, 128))
    with pytest.raises(ValueError, match="activation"):
        moegemm.fp8_fp4_mega_moe(y, *weights, buffer, activation="gelu")
    with pytest.raises(ValueError, match="activation_clamp"):
        moegemm.fp8_fp4_mega_moe(y, *weights, buffer, activation_clamp=-1.0)
    with pytest.raises(ValueError, match=r"y: expected \[T, 256\] with T <= 48"):
        moegemm.fp8_fp4_mega_moe(torch.empty(49, 256, dtype=torch.bfloat16), *weights, buffer)
    with pytest.raises(TypeError, match="y: expected dtype torch.bfloat16"):
        moegemm.fp8_fp4_mega_moe(y.float(), *weights, buffer)
    with pytest.raises(ValueError, match="mma_type"):
        moegemm.bf16_mega_moe(y, torch.zeros(8, 256, 256, dtype=torch.bfloat16),
                              torch.zeros(8, 256, 128, dtype=torch.bfloat16), buffer)
    with pytest.raises(ValueError, match="cumulative_local_expert_recv_stats: expected shape"):
        moegemm.fp8_fp4_mega_moe(y, *weights, buffer,
                                 cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cumulative_local_expert_recv_stats: expected a contiguous tensor"):
        moegemm.fp8_fp4_mega_moe(y, *weights, buffer,
                                 cumulative_local_expert_recv_stats=torch.zeros(16, dtype=torch.int32)[::2])
    with pytest.raises(ValueError, match="y: expected a unit inner stride"):
        moegemm.fp8_fp4_mega_moe(torch.empty(256, 4, dtype=torch.bfloat16).t(), *weights, buffer)
    small, _ = make_layer("fp8xfp4", hidden=128, device="cpu")
    with pytest.raises(ValueError, match=r"expected \(E, H, I\) = \(8, 128, 128\)"):
        moegemm.fp8_fp4_mega_moe(y, *weights, small)
    with pytest.raises(ValueError, match="hidden: expected a multiple of 128"):
        moegemm.get_symm_buffer_for_mega_moe(None, 8, 16, 2, 200, 128, device="cpu")
    with pytest.raises(ValueError, match="num_topk: expected at most num_experts"):
        moegemm.get_symm_buffer_for_mega_moe(None, 2, 16, 3, 256, 128, device="cpu")
    with pytest.raises(ValueError, match="mma_type"):
        moegemm.get_symm_buffer_for_mega_moe(None, 8, 16, 2, 256, 128, mma_type="fp4xfp4", device="cpu")

    with pytest.raises(ValueError, match="use_fp8_dispatch: False contradicts mma_type 'fp8xfp4'"):
        moegemm.get_symm_buffer_for_mega_moe(None, 8, 16, 2, 256, 128, use_fp8_dispatch=False, device="cpu")
    small.destroy()
    with pytest.raises(ValueError, match="sym_buffer: destroyed"):
        moegemm.fp8_fp4_mega_moe(y, *weights, small)

    with pytest.raises(ValueError, match="num_experts: expected a multiple of the group's 2 ranks, got 5"):
        moegemm.get_symm_buffer_for_mega_moe(_TwoRanks(), 5, 16, 2, 256, 128, device="cpu")


@pytest.mark.parametrize("mma_type", MMA_TYPES)
def test_check_groups_names_a_token_with_a_repeated_expert(mma_type, seed):
    buffer, weights = make_layer(mma_type, device="cpu")
    assert buffer.masked
    idx = torch.tensor([[0, 1, 2]] * 48)
    idx[7] = torch.tensor([3, -1, 3])
    fill(buffer, 48, idx=idx)
    y = torch.empty(48, buffer.hidden, dtype=torch.bfloat16)
    moegemm.set_check_groups(True)
    try:
        with pytest.raises(ValueError, match=r"sym_buffer.topk_idx: tokens \[7\] name an expert twice"):
            run(mma_type, buffer, weights, y)
        idx[7, 2] = -1  # -1 twice is no expert twice
        fill(buffer, 48, idx=idx)
        run(mma_type, buffer, weights, y)
    finally:
        moegemm.set_check_groups(False)


@needs_sass_tools
@pytest.mark.parametrize("config", moe_layer.all_configs(), ids=moe_layer.kernel_name)
def test_step_kernel_compiles_without_spills(cache, config):
    build = moe_layer.build(config)
    report = build.resources()
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    sass = compiler.disassemble(build.cubin_path)
    if config.step == "activation" and config.fp8:
        assert "F2FP.SATFINITE.E4M3" in sass
    if config.step == "route":
        assert "MATCH.ANY" in sass


@needs_sass_tools
@pytest.mark.parametrize("config", fused_kernel.all_configs(H100), ids=fused_kernel.kernel_name)
def test_fused_kernel_compiles_without_spills(cache, config):
    build = fused_kernel.build(config)
    report = build.resources()
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    sass = compiler.disassemble(build.cubin_path)
    assert "QGMMA" in sass
    assert "LDL" not in sass and "STL" not in sass, "local-memory traffic in the SASS"
    # ptxas' notes C7510-C7519: WGMMAs serialized, or waits it injected.
    assert not [line for line in build.log.splitlines() if "(C751" in line], build.log


@pytest.mark.parametrize("experts,max_tokens,topk", [(8, 48, 3), (384, 128, 6), (32, 1, 6), (1024, 40, 8), (4, 200, 3)])
def test_buffer_holds_the_fused_layout(experts, max_tokens, topk):
    """Any routing's fused layout (each expert's pairs padded to whole token tiles, any tile the kernel
    takes) fits the buffer's rows before the spare row, and its tiles the counters: the worst case
    spreads the pairs one an expert over as many experts as they reach."""
    buffer = moegemm.get_symm_buffer_for_mega_moe(None, experts, max_tokens, topk, 256, 256, device="cpu")
    pairs = max_tokens * topk
    counts = torch.zeros(experts, dtype=torch.int64)
    spread = min(experts, pairs)
    counts[:spread] = 1
    counts[0] += pairs - spread
    for tile in fused_kernel.TOKEN_TILES:
        tiles = int(((counts + tile - 1) // tile).sum())
        assert tiles * tile <= buffer.rows
        assert 3 + experts + tiles <= buffer.control.numel()
    assert buffer.folded_tokens_sf.shape == (2, align(buffer.rows + 1, 4))
    assert torch.equal(buffer.control, torch.zeros_like(buffer.control))


def test_fused_plan_takes_every_view_and_value(monkeypatch):
    """The fused kernel's launch record packs from a CPU buffer's views (no driver: a made-up kernel
    handle), grid one CTA an SM, cooperative."""
    monkeypatch.setattr(runtime.Kernel, "_load_library", lambda kernel: setattr(kernel, "_kernel", 0x1234))
    buffer = moegemm.get_symm_buffer_for_mega_moe(None, 384, 128, 6, 7168, 3072, device="cpu")
    views = {name: getattr(buffer, name) for name in fused_kernel.VIEWS}
    config = fused_kernel.select_config(128 * 6, 384, H100)
    assert (config.tokens, config.math_warpgroups) == (8, 4)
    plan = fused_kernel.plan(config, moe_layer.view_offsets(buffer.storage, views), rows=buffer.rows,
                             sf_pitch=buffer.folded_tokens_sf.shape[1], num_tokens=128, max_tokens=128, num_topk=6,
                             num_experts=384,
                             hidden=7168, intermediate=3072, y_pitch=7168, stats_dtype=torch.int32, clamp=None,
                             num_sms=132)
    grid, flags = struct.unpack_from("<I", plan.record, 8)[0], struct.unpack_from("<I", plan.record, 48)[0]
    assert (grid, flags) == (132, 2)


def test_transform_takes_float_or_packed_scales():
    l1 = torch.randn(2, 256, 256, dtype=torch.bfloat16)
    l2 = torch.randn(2, 256, 128, dtype=torch.bfloat16)
    packed1, sf1 = moegemm.per_token_cast_to_fp4(l1.flatten(0, 1), use_ue8m0=True, gran_k=32)
    packed2, sf2 = moegemm.per_token_cast_to_fp4(l2.flatten(0, 1), use_ue8m0=True, gran_k=32)
    floats = ((packed1.view(2, 256, 128), sf1.view(2, 256, 8)), (packed2.view(2, 256, 64), sf2.view(2, 256, 4)))
    once = moegemm.transform_weights_for_mega_moe(*floats)
    twice = moegemm.transform_weights_for_mega_moe(*once)
    for a, b in zip(once, twice, strict=True):
        assert a[1].dtype == torch.int32 and a[1].shape[-1] == a[0].shape[-1] * 2 // 128
        assert torch.equal(a[1], b[1])


# ---- across ranks: processes of one host --------------------------------------------------------------------


def layer_across_ranks(rank, num_ranks, init_file, backend, mma_type, token_counts, routing, seed):
    """One rank (a process): its share of a layer whose every rank's tokens a one-rank layer also runs;
    each exchange, twice on one buffer, must give this rank's tokens that layer's outputs bit for bit
    (on several GPUs, where the two layers' GEMM configs may differ, within 1e-5; the fused kernel's
    exchange, FP8 x FP4 on GPUs, within the layer's tolerance), and its experts' received-pair stats.
    ``routing``: "random" (some entries -1), or "skip_last" (no token picks the last rank's experts)."""
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                         world_size=num_ranks)
    try:
        torch.manual_seed(seed)  # every rank draws the same weights and every rank's tokens
        experts, topk, max_tokens = 4 * num_ranks, 3, max(token_counts)
        total, local_experts = sum(token_counts), 4
        # On GPUs I = 256, which the fused kernel takes.
        inter = 256 if backend == "nccl" else 128
        full, weights = make_layer(mma_type, experts, inter=inter, topk=topk, max_tokens=max(total, 1), device=device)
        idx = None
        if routing == "skip_last":
            idx = torch.stack([torch.randperm(experts - local_experts)[:topk] for _ in range(total)]) if total else None
        fill(full, total, idx=idx, masked_ratio=0.2 if routing == "random" else 0.0)
        expected = torch.empty(total, full.hidden, dtype=torch.bfloat16, device=device)
        run(mma_type, full, weights, expected)
        begin, count = sum(token_counts[:rank]), token_counts[rank]
        mine = slice(rank * local_experts, (rank + 1) * local_experts)
        local_weights = tuple((w[0][mine], w[1][mine]) if isinstance(w, tuple) else w[mine] for w in weights)
        chosen = full.topk_idx[:total]
        expected_stats = torch.stack([(chosen == e).sum() for e in range(experts)])[mine].to(torch.int32)

        group = torch.distributed.group.WORLD
        buffer = moegemm.get_symm_buffer_for_mega_moe(group, experts, max_tokens, topk, full.hidden,
                                                      full.intermediate_hidden, mma_type=mma_type, device=device)
        assert buffer.ranks is not None and buffer.ranks.local.num_experts == local_experts
        # A first call over every row: what it leaves past this rank's tokens must not count again.
        fill(buffer, max_tokens)
        mega_moe._run(torch.empty(max_tokens, full.hidden, dtype=torch.bfloat16, device=device), *local_weights,
                      buffer, mma_type, None, "swiglu", None, fused=False)
        exchanges = [("symmetric", False), ("all_to_all", False), ("symmetric", False)]
        if backend == "nccl" and mma_type == "fp8xfp4":
            exchanges += [("symmetric", True)] * 2  # the fused kernel's own exchange
        for exchange, fused in exchanges:
            for name in ("x", "x_sf", "topk_idx", "topk_weights"):
                if getattr(buffer, name) is not None:
                    getattr(buffer, name)[:count].copy_(getattr(full, name)[begin:begin + count])
            y = torch.full((count, full.hidden), float("nan"), dtype=torch.bfloat16, device=device)
            stats = torch.zeros(local_experts, dtype=torch.int32, device=device)
            mega_moe._run(y, *local_weights, buffer, mma_type, stats, "swiglu", None, exchange=exchange, fused=fused)
            if fused:
                assert not y.isnan().any(), rank
                if count:
                    assert calc_diff(y.float(), expected[begin:begin + count].float()) < TOLERANCE[mma_type], rank
            elif backend == "gloo" or num_ranks == 1:
                assert torch.equal(y, expected[begin:begin + count]), (rank, exchange)
            elif count:
                assert calc_diff(y.float(), expected[begin:begin + count].float()) < 1e-5, (rank, exchange)
            assert torch.equal(stats, expected_stats), (rank, exchange, fused, stats, expected_stats)
        buffer.destroy()
    finally:
        torch.distributed.destroy_process_group()


def spawn_ranks(num_ranks, backend, *args):
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(layer_across_ranks, args=(num_ranks, f"{directory}/init", backend, *args), nprocs=num_ranks)


# Tokens a rank (a rank with none among them) and the routing.
RANK_CASES = [((24, 13), "random"), ((7, 0, 19), "random"), ((16, 9, 5), "skip_last")]


@pytest.mark.parametrize("mma_type", MMA_TYPES)
@pytest.mark.parametrize("token_counts,routing", RANK_CASES, ids=["2-ranks", "3-ranks-one-empty", "3-ranks-last-idle"])
def test_layer_across_cpu_processes(mma_type, token_counts, routing, seed):
    spawn_ranks(len(token_counts), "gloo", mma_type, token_counts, routing, seed)


@gpu
@pytest.mark.parametrize("mma_type", MMA_TYPES)
def test_layer_through_symmetric_memory_on_one_gpu(mma_type, seed):
    """A group of one through the symmetric-memory path (NCCL, torch's symmetric memory)."""
    spawn_ranks(1, "nccl", mma_type, (37,), "random", seed)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs or more")
@pytest.mark.parametrize("mma_type", MMA_TYPES)
@pytest.mark.parametrize("routing", ["random", "skip_last"])
def test_layer_across_gpus(mma_type, routing, seed):
    """Every visible GPU a rank, the first without tokens."""
    num_ranks = torch.cuda.device_count()
    spawn_ranks(num_ranks, "nccl", mma_type, (0, *(8 * r + 5 for r in range(1, num_ranks))), routing, seed)


# ---- GPU ------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("mma_type", MMA_TYPES)
@pytest.mark.parametrize("experts,hidden,inter,topk,num_tokens,masked_ratio", [
    (8, 256, 128, 3, 48, 0.0), (16, 1024, 512, 6, 200, 0.2), (4, 512, 256, 2, 1, 0.0), (32, 512, 384, 6, 300, 0.5),
    (6, 384, 256, 6, 130, 0.0), (8, 1024, 512, 6, 400, 0.1), (8, 7168, 3072, 6, 64, 0.1),
    (32, 7168, 3072, 6, 1024, 0.0)])
def test_layer_on_the_gpu(mma_type, experts, hidden, inter, topk, num_tokens, masked_ratio, seed):
    buffer, weights = make_layer(mma_type, experts, hidden, inter, topk, max_tokens=num_tokens + 7)
    fill(buffer, num_tokens, masked_ratio=masked_ratio)
    check_against_reference(mma_type, buffer, weights, num_tokens)


def _poison_steps_outputs(buffer):
    """NaN bytes in every row the steps and GEMMs write (the spare rows stay zero)."""
    for name in ("tokens", "tokens_sf", "l1_out", "act", "act_sf", "l2_out", "pair_rows", "groups"):
        view = getattr(buffer, name)
        if view is not None:
            (view[:buffer.rows] if view.dim() == 2 else view).view(torch.uint8).fill_(0xFF)


@gpu
@pytest.mark.parametrize("mma_type", MMA_TYPES)
@pytest.mark.parametrize("experts,topk,max_tokens,num_tokens,masked_ratio,masked", [
    (8, 3, 48, 48, 0.0, True), (8, 3, 48, 37, 0.3, True), (16, 4, 96, 1, 0.0, True), (4, 3, 200, 200, 0.1, False),
    (384, 6, 64, 64, 0.0, False), (1024, 8, 40, 33, 0.2, False), (32, 6, 2100, 2050, 0.05, False)])
def test_step_kernels_match_the_pytorch_steps(mma_type, experts, topk, max_tokens, num_tokens, masked_ratio, masked,
                                              seed):
    """Route, dispatch, activation and combine kernels against the PyTorch steps on the same buffer:
    the same rows, groups and stats, and y bit for bit."""
    buffer, weights = make_layer(mma_type, experts, 256, 128, topk, max_tokens)
    assert buffer.masked == masked
    fill(buffer, num_tokens, masked_ratio=masked_ratio)
    results = []
    for use_kernels in (False, True):
        _poison_steps_outputs(buffer)
        y = torch.full((num_tokens, buffer.hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
        stats = torch.arange(experts, dtype=torch.int64, device="cuda")
        mega_moe._run(y, *weights, buffer, mma_type, stats, "swiglu", 0.75 if masked else None, use_kernels)
        results.append((y, stats))
    routing = mega_moe._route(buffer.topk_idx[:num_tokens], experts, buffer.rows,
                              max_tokens if masked else None)
    assert torch.equal(buffer.pair_rows[:num_tokens * topk].long(), routing.pair_rows)
    assert torch.equal(buffer.groups, routing.groups)
    (y_torch, stats_torch), (y_kernels, stats_kernels) = results
    assert torch.equal(stats_kernels, stats_torch)
    assert torch.equal(y_kernels, y_torch)


def _poison_fused_outputs(buffer):
    """NaN bytes in every row the fused kernel writes (the spare rows stay zero; the counters too)."""
    for name in ("tokens", "act", "l2_out", "folded_tokens_sf", "folded_act_sf", "row_weights", "pair_rows"):
        view = getattr(buffer, name)
        (view[:buffer.rows] if name in ("tokens", "act", "l2_out") else view).view(torch.uint8).fill_(0xFF)


# (experts, hidden, inter, top-k, max tokens, tokens, share of -1 entries): decode over many experts,
# prefill-sized counts, a token alone, K blocks of odd counts (H 384, I 640), every entry -1, no token.
FUSED_LAYERS = [(8, 256, 256, 3, 48, 48, 0.0), (384, 1024, 512, 6, 128, 128, 0.1), (4, 512, 256, 2, 8, 1, 0.0),
                (32, 384, 640, 6, 300, 300, 0.3), (16, 1024, 256, 4, 2100, 2050, 0.0), (1024, 512, 256, 8, 40, 33, 0.2),
                (8, 7168, 3072, 6, 128, 128, 0.0), (32, 7168, 3072, 6, 512, 512, 0.0), (8, 512, 256, 3, 16, 16, 1.0),
                (8, 512, 256, 3, 16, 0, 0.0)]


@gpu
@pytest.mark.parametrize("experts,hidden,inter,topk,max_tokens,num_tokens,masked_ratio", FUSED_LAYERS)
def test_fused_kernel_against_the_unfused_pipeline(experts, hidden, inter, topk, max_tokens, num_tokens, masked_ratio,
                                                   seed):
    """The fused kernel against the unfused pipeline on the same buffer and against the reference:
    its scratch poisoned, called twice (the second finds the counters as the first left them), the
    stats gaining what the pipeline's gain, the counters zero after each call."""
    buffer, weights = make_layer("fp8xfp4", experts, hidden, inter, topk, max_tokens)
    fill(buffer, num_tokens, masked_ratio=masked_ratio)
    outputs = []
    for fused in (False, True, True):
        _poison_fused_outputs(buffer)
        y = torch.full((num_tokens, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
        stats = torch.arange(experts, dtype=torch.int32, device="cuda")
        mega_moe._run(y, *weights, buffer, "fp8xfp4", stats, "swiglu", None, fused=fused)
        assert torch.equal(buffer.control, torch.zeros_like(buffer.control))
        outputs.append((y, stats))
    (y_unfused, stats_unfused), *fused_outputs = outputs
    ref = torch.empty_like(y_unfused)
    run("fp8xfp4", buffer, weights, ref, op=reference)
    for y, stats in fused_outputs:
        assert torch.equal(stats, stats_unfused)
        assert not y.isnan().any()
        if masked_ratio == 1.0:
            assert torch.equal(y, torch.zeros_like(y))
        elif num_tokens:
            assert calc_diff(y.float(), y_unfused.float()) < TOLERANCE["fp8xfp4"]
            assert calc_diff(y.float(), ref.float()) < TOLERANCE["fp8xfp4"]
    assert torch.equal(fused_outputs[0][0], fused_outputs[1][0])


@gpu
@pytest.mark.parametrize("experts,hidden,inter,topk,max_tokens,num_tokens", [(8, 512, 256, 3, 48, 48),
                                                                           (64, 1024, 512, 6, 32, 29)])
def test_fused_kernel_intermediates_match_the_pipeline(experts, hidden, inter, topk, max_tokens, num_tokens, seed):
    """Each routed pair's dispatched token, activation and L2 output in the fused kernel's rows against
    the unfused pipeline's (its tokens and activation folded as its GEMMs fold them): which phase made a
    difference, if any. The dispatch is exact; the GEMMs' sums may differ in the last bit where the
    pipeline's kernels split K, so the activation and L2's output are held to a tolerance."""
    buffer, weights = make_layer("fp8xfp4", experts, hidden, inter, topk, max_tokens)
    fill(buffer, num_tokens, masked_ratio=0.1)
    pairs = num_tokens * topk
    y = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device="cuda")
    stages = []
    for fused in (False, True):
        _poison_fused_outputs(buffer)
        mega_moe._run(y, *weights, buffer, "fp8xfp4", None, "swiglu", None, fused=fused)
        rows = buffer.pair_rows[:pairs].long()
        routed = rows != buffer.rows
        rows = rows[routed]
        assert rows.unique().numel() == rows.numel()
        if fused:
            tokens, tokens_sf = buffer.tokens[rows], buffer.folded_tokens_sf[:, rows].T
            act, act_sf = buffer.act[rows], buffer.folded_act_sf[:, rows].T
        else:
            tokens, tokens_sf = quant.fold_1x32_scales(buffer.tokens[rows], buffer.tokens_sf[rows])
            act, act_sf = quant.fold_1x32_scales(buffer.act[rows], buffer.act_sf[rows])
        stages.append((routed, tokens.clone(), tokens_sf.clone(), act.float(), act_sf.clone(),
                       buffer.l2_out[rows].float()))
    (routed, *unfused), (routed_fused, *fused) = stages
    assert torch.equal(routed, routed_fused)
    assert torch.equal(fused[0].view(torch.uint8), unfused[0].view(torch.uint8)), "dispatch: tokens"
    assert torch.equal(fused[1], unfused[1]), "dispatch: the tokens' folded scales"
    activation = fused[2] * fused[3].repeat_interleave(128, dim=1)
    expected = unfused[2] * unfused[3].repeat_interleave(128, dim=1)
    assert calc_diff(activation, expected) < 1e-4, "L1 and its activation"
    assert calc_diff(fused[4], unfused[4]) < 1e-4, "L2"


@gpu
def test_fused_kernel_takes_an_expert_named_twice_and_a_clamp(seed):
    """A token naming an expert twice (the masked layout's overflow; the fused layout has none) and
    one expert taking every token, with an activation clamp."""
    buffer, weights = make_layer("fp8xfp4", 8, 512, 256, 3, 64)
    idx = torch.randint(0, 8, (64, 3))
    idx[:, 0] = 5
    idx[3] = torch.tensor([2, 2, 2])
    fill(buffer, 64, idx=idx)
    y = torch.empty(64, 512, dtype=torch.bfloat16, device="cuda")
    ref = torch.empty_like(y)
    mega_moe._run(y, *weights, buffer, "fp8xfp4", None, "swiglu", 0.5, fused=True)
    run("fp8xfp4", buffer, weights, ref, clamp=0.5, op=reference)
    assert calc_diff(y.float(), ref.float()) < TOLERANCE["fp8xfp4"]


@gpu
def test_fused_kernel_replays_new_routing_from_a_cuda_graph(seed):
    buffer, weights = make_layer("fp8xfp4", 64, 512, 256, 6, max_tokens=96)
    y = torch.empty(96, buffer.hidden, dtype=torch.bfloat16, device="cuda")
    fill(buffer, 96)
    call = lambda: mega_moe._run(y, *weights, buffer, "fp8xfp4", None, "swiglu", None, fused=True)  # noqa: E731
    call()  # compiles and binds outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for masked_ratio in (0.0, 0.4, 1.0):
        fill(buffer, 96, masked_ratio=masked_ratio)
        y.fill_(float("nan"))
        graph.replay()
        ref = torch.empty_like(y)
        run("fp8xfp4", buffer, weights, ref, op=reference)
        if masked_ratio == 1.0:
            assert torch.equal(y, torch.zeros_like(y))
        else:
            assert calc_diff(y.float(), ref.float()) < TOLERANCE["fp8xfp4"]


@gpu
def test_more_experts_than_the_route_kernel_takes_raise():
    with pytest.raises(ValueError, match=f"num_experts: at most {moe_layer.MAX_EXPERTS} on the GPU"):
        moegemm.get_symm_buffer_for_mega_moe(None, moe_layer.MAX_EXPERTS + 1, 16, 2, 256, 128)


@gpu
@pytest.mark.parametrize("mma_type", MMA_TYPES)
@pytest.mark.parametrize("experts,topk,max_tokens,masked", [(16, 4, 96, True), (2, 2, 160, False)])
def test_cuda_graph_replays_new_routing(mma_type, experts, topk, max_tokens, masked, seed):
    buffer, weights = make_layer(mma_type, experts, 512, 256, topk, max_tokens=max_tokens)
    assert buffer.masked == masked
    y = torch.empty(96, buffer.hidden, dtype=torch.bfloat16, device="cuda")
    fill(buffer, 96)
    run(mma_type, buffer, weights, y)  # compiles and binds outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(mma_type, buffer, weights, y)
    for masked_ratio in (0.0, 0.4, 1.0):
        fill(buffer, 96, masked_ratio=masked_ratio)
        y.fill_(float("nan"))
        graph.replay()
        ref = torch.empty_like(y)
        run(mma_type, buffer, weights, ref, op=reference)
        if masked_ratio == 1.0:
            assert torch.equal(y, torch.zeros_like(y))
        else:
            assert calc_diff(y.float(), ref.float()) < TOLERANCE[mma_type]
