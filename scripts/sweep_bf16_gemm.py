"""Time BF16 GEMM configs around the heuristic's pick (what the BF16 config model in
moegemm/kernels/bf16_gemm.py is checked against), beside DeepGEMM where it imports
(`DG_PRINT_CONFIGS=1` makes it print its own picks). Needs an SM90 GPU:
    python scripts/sweep_bf16_gemm.py            # bf16_gemm_nt at M = 4096, the bench's N x K
    python scripts/sweep_bf16_gemm.py --grouped  # the bench's contiguous shapes (routing counts)
    python scripts/sweep_bf16_gemm.py --k-grouped  # the bench's K-grouped shapes (FP32 D += A^T B)
"""

import argparse
import functools

import torch

from moegemm import bench
from moegemm.device import DeviceFacts, device_facts
from moegemm.gemm.desc import GemmDesc, GemmType, Major
from moegemm.intmath import align
from moegemm.kernels import bf16_gemm
from moegemm.kernels.bf16_gemm import Bf16GemmConfig


def candidates(kind: GemmType, m: int, out_bytes: int, major_b: Major, facts: DeviceFacts) -> set:
    """Tiles of 64, 128 and 192 rows and 96-256 columns that the kernel supports with three stages or
    more, alone and (dense, contiguous) in pairs sharing B or A; K-grouped: alone."""
    pairs = ((1, 1), (2, 1), (1, 2)) if kind in (GemmType.NORMAL, GemmType.CONTIGUOUS) else ((1, 1),)
    major_a = major_b if kind is GemmType.K_GROUPED else Major.K
    configs = set()
    for block_m in (64, 128, 192):
        for block_n in range(96, 257, 32):
            stages = bf16_gemm.stages_for(block_m, block_n, out_bytes, 1, facts)
            if stages < 3 or not bf16_gemm.valid_block_n(block_n, block_m, out_bytes, major_b) or \
                    (block_m == 64 and block_n < 256) or (kind is GemmType.CONTIGUOUS and block_m > 128):
                continue
            for cluster_m, cluster_n in pairs:
                if cluster_m * block_m <= m:
                    configs.add(Bf16GemmConfig(block_m, block_n, stages, out_bytes == 4, kind is GemmType.K_GROUPED,
                                               cluster_m, 1, kind, cluster_n, major_a, major_b))
    return configs


def name(config: Bf16GemmConfig) -> str:
    pair = "cm2" if config.cluster_m > 1 else "cn2" if config.cluster_n > 1 else ""
    return f"m{config.block_m}n{config.block_n}s{config.stages}{pair}"


def sweep(desc: GemmDesc, label: str, a, b, d, groups, facts: DeviceFacts, peer_call, major: Major = Major.K) -> None:
    """``major``: of both operands (K-grouped: MN), else A K-major and B ``major``."""
    major_a = major if desc.gemm_type is GemmType.K_GROUPED else Major.K
    chosen = bf16_gemm.plan(desc, a, b, d, major_a, major, facts).config
    pointers = (a.data_ptr(), b.data_ptr(), d.data_ptr(), groups.data_ptr() if groups is not None else 0)
    configs = sorted(candidates(desc.gemm_type, desc.m, desc.out_bytes, major, facts) | {chosen}, key=name)
    plans = (bf16_gemm.plan(desc, a, b, d, major_a, major, facts, config) for config in configs)
    launches = ((plan.config, functools.partial(plan.launch_pointers, d.get_device(), *pointers)) for plan in plans)
    print(bench.sweep_line(label, launches, chosen, name, peer_call, iters=15), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grouped", action="store_true", help="the bench's contiguous shapes")
    parser.add_argument("--k-grouped", action="store_true", help="the bench's K-grouped shapes")
    args = parser.parse_args()
    facts = device_facts(torch.cuda.current_device())
    peer = bench.deep_gemm()
    if args.k_grouped:
        for num_groups, mean_k, m, n in bench.BF16_K_GROUPED:
            ks = [align(count, 128) for count in bench.routing_counts(num_groups, mean_k)]
            layout = torch.tensor(ks, device="cuda", dtype=torch.int32)
            a = torch.randn(sum(ks), m, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(sum(ks), n, device="cuda", dtype=torch.bfloat16)
            d = torch.zeros(num_groups, m, n, device="cuda")
            d_peer = torch.zeros_like(d)
            call = functools.partial(peer.k_grouped_bf16_gemm_tn_contiguous, a, b, d_peer, ks, layout, d_peer) \
                if peer else None
            desc = bf16_gemm.describe(GemmType.K_GROUPED, m, n, sum(ks) // num_groups, d, num_groups, accumulate=True)
            sweep(desc, f"k_grouped {num_groups} x {mean_k} {m} {n}", a, b, d, layout, facts, call, Major.MN)
        return
    if not args.grouped:
        for n, k in bench.FP8_GEMM_NK:
            a = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            d = torch.empty(4096, n, device="cuda", dtype=torch.bfloat16)
            call = functools.partial(peer.bf16_gemm_nt, a, b, torch.empty_like(d)) if peer else None
            sweep(bf16_gemm.describe(GemmType.NORMAL, 4096, n, k, d), f"4096 {n} {k}", a, b, d, None, facts, call)
        return
    for num_groups, mean, n, k in bench.BF16_GROUPED_CONTIGUOUS:
        counts = bench.routing_counts(num_groups, mean)
        _, _, _, _, layout, real = bench._grouped_inputs(counts, 128, 128, False)
        a = torch.randn(real.shape[0], k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(num_groups, n, k, device="cuda", dtype=torch.bfloat16)
        d = torch.empty(real.shape[0], n, device="cuda", dtype=torch.bfloat16)
        call = functools.partial(peer.m_grouped_bf16_gemm_nt_contiguous, a, b, torch.empty_like(d), layout) \
            if peer else None
        desc = bf16_gemm.describe(GemmType.CONTIGUOUS, a.shape[0] // num_groups, n, k, d, num_groups)
        sweep(desc, f"contiguous {num_groups} x {mean} {n} {k}", a, b, d, layout, facts, call)


if __name__ == "__main__":
    main()
