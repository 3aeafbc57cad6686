"""Time fp8_gemm_nt configs around the heuristic's pick (the sweeps the config model in
moegemm/kernels/fp8_gemm.py was fitted to), beside DeepGEMM where it imports. Needs an SM90 GPU:
    python scripts/sweep_fp8_gemm.py            # M in {1, 64, 128}: BLOCK_N and split-K
    python scripts/sweep_fp8_gemm.py --large    # M = 4096: each BLOCK_M and BLOCK_N, alone or in pairs
    python scripts/sweep_fp8_gemm.py --grouped  # the bench's grouped shapes (uneven counts): tiles, pairs
    python scripts/sweep_fp8_gemm.py --masked   # only the masked ones of those
    python scripts/sweep_fp8_gemm.py --1d1d     # the 1D1D recipe on the wgrad shapes: tiles, pairs
    python scripts/sweep_fp8_gemm.py --k-grouped  # the K-grouped bench cases: tiles
"""

import argparse
import concurrent.futures
import functools
import os

import torch

import moegemm
from moegemm import bench
from moegemm.bench import _fp8_inputs
from moegemm.device import DeviceFacts, device_facts
from moegemm.gemm.desc import GemmDesc, GemmType
from moegemm.kernels import fp8_gemm
from moegemm.kernels.fp8_gemm import Fp8GemmConfig

PAIRS = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))


def pick(m: int, n: int, k: int, facts: DeviceFacts) -> Fp8GemmConfig:
    return fp8_gemm.select_config(GemmDesc(GemmType.NORMAL, m, n, k), facts)


def small_m_candidates(m: int, n: int, k: int, facts: DeviceFacts) -> set:
    block_m = 64 if m <= 64 else 128
    configs = {pick(m, n, k, facts)}
    for block_n in (32, 64, 96, 128, 192):
        for split_k in (1, 2, 3, 4):
            tiles = -(-m // block_m) * -(-n // block_n)
            if fp8_gemm.valid_block_n(block_n, 2, split_k) and \
                    tiles * split_k <= facts.num_sms * (2 if split_k == 1 else 1):
                stages = fp8_gemm.stages_for(block_m, block_n, 2, split_k, facts)
                configs.add(Fp8GemmConfig(block_m, block_n, stages, False, False, split_k=split_k))
    return configs


def large_m_candidates(m: int, n: int, k: int, facts: DeviceFacts) -> set:
    """BF16-out tiles of 128 rows (BLOCK_N 96-192) and of 192 and 256 rows (BLOCK_N 64-128), each alone,
    in pairs sharing B (stacked along M) and in pairs sharing A (side by side)."""
    configs = {pick(m, n, k, facts)}
    for block_m, block_ns in ((128, range(96, 193, 16)), (192, (96, 128)), (256, range(64, 129, 16))):
        for block_n in block_ns:
            if fp8_gemm.valid_block_n(block_n, 2):
                stages = fp8_gemm.stages_for(block_m, block_n, 2, 1, facts)
                for cluster_m, cluster_n in ((1, 1), (2, 1), (1, 2)):
                    configs.add(Fp8GemmConfig(block_m, block_n, stages, False, False, cluster_m,
                                              cluster_n=cluster_n))
    return configs


def grouped_candidates(kind: GemmType, expected_m: int, n: int, k: int, facts: DeviceFacts) -> set:
    configs = set()
    for block_m in (64, 128) + ((192,) if kind is GemmType.MASKED else ()):
        for block_n in (64, 128) + ((192,) if block_m == 128 else ()):
            stages = fp8_gemm.stages_for(block_m, block_n, 2, 1, facts)
            for pair in (1, 2) if block_m < 192 else (1,):
                configs.add(Fp8GemmConfig(block_m, block_n, stages, False, False, pair))
                if kind is not GemmType.MASKED and pair > 1:
                    configs.add(Fp8GemmConfig(block_m, block_n, stages, False, False, cluster_n=pair))
    return configs


def wgrad_candidates(facts: DeviceFacts) -> set:
    """1D1D tiles (FP32 accumulated into D): 128 rows by 96 to 160 columns, each alone and in pairs
    sharing B or A, and 64 rows by 128 or 152 columns alone."""
    configs = set()
    for block_m, block_ns, pairs in ((128, range(96, 161, 8), ((1, 1), (2, 1), (1, 2))), (64, (128, 152), ((1, 1),))):
        for block_n in block_ns:
            if fp8_gemm.valid_block_n(block_n, 4, sfb_per_column=True):
                stages = fp8_gemm.stages_for(block_m, block_n, 4, 1, facts, sfb_per_column=True)
                for cluster_m, cluster_n in pairs:
                    if cluster_m == 1 or block_n % 16 == 0:  # multicast halves of B: whole swizzle groups
                        configs.add(Fp8GemmConfig(block_m, block_n, stages, True, True, cluster_m,
                                                  cluster_n=cluster_n, sfb_per_column=True))
    return configs


def sweep_wgrad(facts: DeviceFacts) -> None:
    """The bench's 1D1D shapes (D += A @ B^T) in each candidate config, beside DeepGEMM."""
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # compiles first, on every core
        list(pool.map(fp8_gemm.build, wgrad_candidates(facts)))
    peer = bench.deep_gemm()
    for m, n, k in bench.WGRAD_SHAPES:
        a, sfa = moegemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        b, sfb = moegemm.per_token_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        sfb = moegemm.get_mn_major_tma_aligned_tensor(sfb)
        d = torch.randn(m, n, device="cuda")
        desc = fp8_gemm.describe(GemmType.NORMAL, a, b, d, accumulate=True, recipe=fp8_gemm.RECIPE_1D1D)
        chosen = fp8_gemm.plan(desc, a, b, d, facts).config
        plans = (fp8_gemm.plan(desc, a, b, d, facts, config)
                 for config in sorted(wgrad_candidates(facts) | {chosen}, key=name))
        launches = ((plan.config, functools.partial(plan.launch, a, sfa, b, sfb, d)) for plan in plans)
        call = None
        if peer is not None:
            call = functools.partial(peer.fp8_gemm_nt, (a, sfa), (b, sfb), d, d, recipe=(1, 1, 128))
        print(bench.sweep_line(f"1d1d {m:5d} {n:6d} {k:6d}", launches, chosen, name, call, iters=10), flush=True)


def sweep_k_grouped(facts: DeviceFacts) -> None:
    """The bench's K-grouped cases (its seed) in 128-row tiles of 128 to 160 columns, beside DeepGEMM."""
    configs = [Fp8GemmConfig(128, block_n, fp8_gemm.stages_for(128, block_n, 4, 1, facts, sfb_per_column=True), True,
                             True, gemm_type=GemmType.K_GROUPED, sfb_per_column=True)
               for block_n in (128, 136, 152, 160)]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(fp8_gemm.build, configs))
    peer = bench.deep_gemm()
    generator = torch.Generator().manual_seed(0)
    for groups, m, n in bench.K_GROUPED_CASES:
        ks = [128 * int(v) for v in torch.randint(0, 65, (groups,), generator=generator)]
        a, b = bench._k_grouped_operand(ks, m), bench._k_grouped_operand(ks, n)
        sfa, sfb = moegemm.get_mn_major_tma_aligned_tensor(a[1]), moegemm.get_mn_major_tma_aligned_tensor(b[1])
        layout = torch.tensor(ks, dtype=torch.int32, device="cuda")
        d = torch.zeros(groups, m, n, device="cuda")
        a_view, b_view = a[0].view(m, -1), b[0].view(n, -1)
        plans = {config: fp8_gemm.k_grouped_plan(a_view, b_view, d, facts, config) for config in configs}
        chosen = fp8_gemm.k_grouped_plan(a_view, b_view, d, facts)[0].config
        launches = ((config, functools.partial(plan.launch, a[0], sfa, b[0], sfb, d, layout,
                                               torch.empty(map_bytes, dtype=torch.uint8, device="cuda")))
                    for config, (plan, map_bytes) in plans.items())
        call = None
        if peer is not None:
            call = functools.partial(peer.k_grouped_fp8_gemm_nt_contiguous, a, b, d, ks, layout, d, recipe=(1, 1, 128))
        print(bench.sweep_line(f"k-grouped {groups} x {m} x {n} (sum K {sum(ks)})", launches, chosen, name, call,
                               iters=5), flush=True)


def name(config: Fp8GemmConfig) -> str:
    pair = "cm2" if config.cluster_m > 1 else "cn2" if config.cluster_n > 1 else ""
    return f"m{config.block_m}n{config.block_n}k{config.split_k}{pair}{'f32' if config.out_fp32 else ''}"


def sweep_grouped(facts: DeviceFacts, masked_only: bool = False) -> None:
    """Each grouped bench shape (uneven counts, the bench's seed) in each candidate config, beside
    DeepGEMM; the heuristic's pick is starred."""
    peer = bench.deep_gemm()
    shapes = [] if masked_only else [("contiguous", *s) for s in bench.GROUPED_CONTIGUOUS]
    shapes += [("masked", *s) for s in bench.GROUPED_MASKED]
    for layout, num_groups, mean, n, k in shapes:
        kind = GemmType.MASKED if layout == "masked" else GemmType.CONTIGUOUS
        counts = bench.routing_counts(num_groups, mean)
        a, sfa, b, sfb, groups, _ = bench._grouped_inputs(counts, n, k, kind is GemmType.MASKED)
        sfa_required = moegemm.get_mn_major_tma_aligned_tensor(sfa)
        d = torch.empty(*a.shape[:-1], n, device="cuda", dtype=torch.bfloat16)
        desc = fp8_gemm.describe(kind, a, b, d, expected_m=mean)
        chosen = fp8_gemm.plan(desc, a, b, d, facts).config
        plans = (fp8_gemm.plan(desc, a, b, d, facts, config)
                 for config in sorted(grouped_candidates(kind, mean, n, k, facts) | {chosen}, key=name))
        launches = ((plan.config, functools.partial(plan.launch, a, sfa_required, b, sfb, d, groups))
                    for plan in plans)
        call = None
        if peer is not None:
            sfa_dg = peer.get_mn_major_tma_aligned_tensor(sfa)
            if kind is GemmType.MASKED:
                call = functools.partial(peer.m_grouped_fp8_gemm_nt_masked, (a, sfa_dg), (b, sfb), d, groups, mean)
            else:
                call = functools.partial(peer.m_grouped_fp8_gemm_nt_contiguous, (a, sfa_dg), (b, sfb), d, groups)
        label = f"{layout} {num_groups} x {mean} ({sum(counts)} rows) {n} {k}"
        print(bench.sweep_line(label, launches, chosen, name, call, iters=10), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true", help="M = 4096 instead of M in {1, 64, 128}")
    parser.add_argument("--grouped", action="store_true", help="the grouped bench shapes")
    parser.add_argument("--masked", action="store_true", help="the masked ones of the grouped bench shapes")
    parser.add_argument("--1d1d", dest="wgrad", action="store_true", help="the 1D1D recipe on the wgrad shapes")
    parser.add_argument("--k-grouped", action="store_true", help="the K-grouped bench cases")
    args = parser.parse_args()
    facts = device_facts(torch.cuda.current_device())
    if args.wgrad:
        sweep_wgrad(facts)
        return
    if args.k_grouped:
        sweep_k_grouped(facts)
        return
    if args.grouped or args.masked:
        sweep_grouped(facts, masked_only=args.masked)
        return
    shapes = [(m, n, k) for m in ((4096,) if args.large else (1, 64, 128)) for n, k in PAIRS]
    candidates = large_m_candidates if args.large else small_m_candidates
    peer = bench.deep_gemm()
    for m, n, k in shapes:
        _, _, a, sfa0, b, sfb = _fp8_inputs(m, n, k)
        sfa = moegemm.get_mn_major_tma_aligned_tensor(sfa0)
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        d32 = torch.empty(m, n, device="cuda", dtype=torch.float32)
        outs = {config: d32 if config.out_fp32 else d for config in sorted(candidates(m, n, k, facts), key=name)}
        plans = ((fp8_gemm.plan(fp8_gemm.describe(GemmType.NORMAL, a, b, out), a, b, out, facts, config), out)
                 for config, out in outs.items())
        launches = ((plan.config, functools.partial(plan.launch, a, sfa, b, sfb, out)) for plan, out in plans)
        call = None
        if peer is not None:
            call = functools.partial(peer.fp8_gemm_nt, (a, peer.get_mn_major_tma_aligned_tensor(sfa0)), (b, sfb), d)
        print(bench.sweep_line(f"{m:4d} {n:6d} {k:6d}", launches, pick(m, n, k, facts), name, call, iters=15),
              flush=True)


if __name__ == "__main__":
    main()
