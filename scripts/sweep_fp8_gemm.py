"""Time fp8_gemm_nt configs around the heuristic's pick on the small-M benchmark shapes (the sweep
the config model in moegemm/kernels/fp8_gemm.py was fitted to). Needs an SM90 GPU:
    python scripts/sweep_fp8_gemm.py
"""

import functools

import torch

import moegemm
from moegemm.bench import _fp8_inputs, kernel_time_us
from moegemm.kernels import fp8_gemm
from moegemm.kernels.fp8_gemm import Fp8GemmConfig

SHAPES = [(m, n, k) for m in (1, 64, 128)
          for n, k in ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))]


def candidates(m: int, n: int, k: int, num_sms: int) -> set:
    block_m = 64 if m <= 64 else 128
    configs = {fp8_gemm.select_config(m, n, k, False, False, num_sms)}
    for block_n in (32, 64, 96, 128, 192):
        for split_k in (1, 2, 3, 4):
            tiles = -(-m // block_m) * -(-n // block_n)
            if fp8_gemm.valid_block_n(block_n, 2, split_k) and tiles * split_k <= num_sms * (2 if split_k == 1 else 1):
                stages = fp8_gemm._max_stages(block_m, block_n, 2, split_k)
                configs.add(Fp8GemmConfig(block_m, block_n, stages, False, False, split_k=split_k))
    return configs


def main() -> None:
    num_sms = moegemm.get_num_sms()
    for m, n, k in SHAPES:
        _, _, a, sfa, b, sfb = _fp8_inputs(m, n, k)
        sfa = moegemm.get_mn_major_tma_aligned_tensor(sfa)
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        pick = fp8_gemm.select_config(m, n, k, False, False, num_sms)
        results = []
        for config in sorted(candidates(m, n, k, num_sms), key=lambda c: (c.block_n, c.split_k)):
            plan = fp8_gemm.plan(a, b, d, False, num_sms, config)
            launch = functools.partial(plan.launch, a, sfa, b, sfb, d)
            results.append((kernel_time_us(launch, iters=15), config))
        cells = " ".join(f"{'*' if c == pick else ''}m{c.block_m}n{c.block_n}k{c.split_k}:{t:.1f}"
                         for t, c in results)
        print(f"{m:4d} {n:6d} {k:6d} | {cells}", flush=True)


if __name__ == "__main__":
    main()
