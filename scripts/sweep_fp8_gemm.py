"""Time fp8_gemm_nt configs around the heuristic's pick (the sweeps the config model in
moegemm/kernels/fp8_gemm.py was fitted to). Needs an SM90 GPU:
    python scripts/sweep_fp8_gemm.py            # M in {1, 64, 128}: BLOCK_N and split-K
    python scripts/sweep_fp8_gemm.py --large    # M = 4096: each BLOCK_M and BLOCK_N, B multicast or not
"""

import argparse
import functools

import torch

import moegemm
from moegemm.bench import _fp8_inputs, kernel_time_us
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
    """BF16-out tiles of 128 rows with and without multicast and of 192 rows, and FP32-out ones,
    whose 32-column store chunks allow BLOCK_N 96 and 160 (what finer BLOCK_N would gain on the last
    wave)."""
    configs = {pick(m, n, k, facts)}
    for out_fp32 in (False, True):
        for block_n in range(64, 193, 8):
            if fp8_gemm.valid_block_n(block_n, 4 if out_fp32 else 2):
                stages = fp8_gemm.stages_for(128, block_n, 4 if out_fp32 else 2, 1, facts)
                configs.add(Fp8GemmConfig(128, block_n, stages, out_fp32, False))
                if not out_fp32:
                    configs.add(Fp8GemmConfig(128, block_n, stages, False, False, cluster_m=2))
                if block_n <= 128:
                    stages = fp8_gemm.stages_for(192, block_n, 4 if out_fp32 else 2, 1, facts)
                    configs.add(Fp8GemmConfig(192, block_n, stages, out_fp32, False))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true", help="M = 4096 instead of M in {1, 64, 128}")
    large = parser.parse_args().large
    shapes = [(m, n, k) for m in ((4096,) if large else (1, 64, 128)) for n, k in PAIRS]
    candidates = large_m_candidates if large else small_m_candidates
    facts = device_facts(torch.cuda.current_device())
    for m, n, k in shapes:
        _, _, a, sfa, b, sfb = _fp8_inputs(m, n, k)
        sfa = moegemm.get_mn_major_tma_aligned_tensor(sfa)
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        d32 = torch.empty(m, n, device="cuda", dtype=torch.float32)
        chosen = pick(m, n, k, facts)
        results = []
        order = sorted(candidates(m, n, k, facts), key=lambda c: (c.out_fp32, c.block_n, c.split_k, c.cluster_m))
        for config in order:
            out = d32 if config.out_fp32 else d
            plan = fp8_gemm.plan(fp8_gemm.describe(GemmType.NORMAL, a, b, out), a, b, out, facts, config)
            launch = functools.partial(plan.launch, a, sfa, b, sfb, out)
            results.append((kernel_time_us(launch, iters=15), plan.config))
        cells = " ".join(f"{'*' if c == chosen else ''}m{c.block_m}n{c.block_n}k{c.split_k}"
                         f"{'c2' if c.cluster_m > 1 else ''}{'f32' if c.out_fp32 else ''}:{t:.1f}" for t, c in results)
        print(f"{m:4d} {n:6d} {k:6d} | {cells}", flush=True)


if __name__ == "__main__":
    main()
