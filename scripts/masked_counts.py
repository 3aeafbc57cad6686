"""Masked grouped GEMM when experts hold fewer rows than ``expected_m`` promised: kernel times of the
CTA-pair config the heuristic picks for expected_m = 192 (B multicast over two 128-row blocks) beside
single-CTA configs, 32 experts, max_M = 192, (N, K) = (4096, 7168). Needs an SM90 GPU:

    python3 scripts/masked_counts.py
"""

import functools

import torch

import moegemm
from moegemm import bench
from moegemm.device import device_facts
from moegemm.gemm.desc import GemmType
from moegemm.kernels import fp8_gemm
from moegemm.kernels.fp8_gemm import Fp8GemmConfig

CONFIGS = {"pair, multicast (m128n128c2)": Fp8GemmConfig(128, 128, 5, False, False, 2),
           "single CTAs (m128n128)": Fp8GemmConfig(128, 128, 5, False, False),
           "single CTAs (m64n128)": Fp8GemmConfig(64, 128, 8, False, False)}


def main(num_groups: int = 32, max_m: int = 192, n: int = 4096, k: int = 7168) -> None:
    a, sfa, b, sfb, _, _ = bench._grouped_inputs([max_m] * num_groups, n, k, True)
    sfa = moegemm.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.empty(num_groups, max_m, n, device="cuda", dtype=torch.bfloat16)
    for rows in (192, 128, 64, 32):
        masked_m = torch.full((num_groups,), rows, dtype=torch.int32, device="cuda")
        times = []
        for name, config in CONFIGS.items():
            desc = fp8_gemm.describe(GemmType.MASKED, a, b, d, expected_m=max_m)
            plan = fp8_gemm.plan(desc, a, b, d, device_facts(torch.cuda.current_device()), config)
            us = bench.kernel_time_us(functools.partial(plan.launch, a, sfa, b, sfb, d, masked_m), iters=20)
            times.append(f"{name} {us:.1f} us")
        print(f"{rows} rows per expert: " + " | ".join(times), flush=True)


if __name__ == "__main__":
    main()
