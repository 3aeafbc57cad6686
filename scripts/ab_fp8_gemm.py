"""Kernel times of the heuristic's fp8_gemm_nt picks at M = 4096 (beside cuBLASLt) and of the grouped
GEMMs, one line per run: the A/B comparisons of two builds in BENCHMARKS.md. Machines lent for a
session differ by several percent, so both builds run alternately in one session, each from its own
checkout and kernel cache (needs an SM90 GPU; `--grouped` / `--dense` times only those GEMMs, `--small`
only the dense picks at M in {1, 64, 128}):

    for round in 1 2; do for tree in new old; do
        PYTHONPATH=$tree MOEGEMM_CACHE_DIR=/tmp/cache-$tree python3 scripts/ab_fp8_gemm.py $tree
    done; done
"""

import sys

import torch

import moegemm
from moegemm import bench
from moegemm.kernels import fp8_gemm

DENSE = ((4096, 7168, 16384), (4096, 4096, 7168), (4096, 7168, 2048), (4096, 2112, 7168), (4096, 24576, 1536),
         (4096, 32768, 512))
MASKED = ((32, 192, 4096, 7168), (32, 192, 7168, 2048), (32, 32, 4096, 7168))
CONTIGUOUS = ((8, 8192, 4096, 7168), (4, 4096, 4096, 7168), (8, 4096, 7168, 2048))
SMALL = tuple((m, n, k) for m in (1, 64, 128) for n, k in bench.FP8_GEMM_NK)


def pick_us(a, sfa, b, sfb, iters: int) -> float:
    """Kernel time of the heuristic's pick on these inputs (``sfa`` as the cast returns it)."""
    sfa = moegemm.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.empty(a.shape[0], b.shape[0], device="cuda", dtype=torch.bfloat16)
    plan = fp8_gemm.plan(a, b, d, False, moegemm.get_num_sms())
    return bench.kernel_time_us(lambda: plan.launch(a, sfa, b, sfb, d), iters=iters)


def dense_us(m: int, n: int, k: int) -> tuple[float, float]:
    """(moegemm, cuBLASLt) kernel times."""
    _, _, a, sfa, b, sfb = bench._fp8_inputs(m, n, k)
    cublas = bench.kernel_time_us(bench._cublaslt_blockwise(a, sfa, b, sfb)[0], iters=20)
    return pick_us(a, sfa, b, sfb, iters=20), cublas


def masked_us(num_groups: int, m: int, n: int, k: int) -> float:
    a, sfa, b, sfb = bench._grouped_inputs(num_groups, m, n, k, True)
    sfa = moegemm.get_mn_major_tma_aligned_tensor(sfa)
    masked_m = torch.full((num_groups,), m, dtype=torch.int32, device="cuda")
    d = torch.empty(num_groups, m, n, device="cuda", dtype=torch.bfloat16)
    plan = fp8_gemm.plan_grouped("masked", a, b, d, moegemm.get_num_sms(), m)
    return bench.kernel_time_us(lambda: plan.launch(a, sfa, b, sfb, d, masked_m), iters=20)


def contiguous_us(num_groups: int, m: int, n: int, k: int) -> float:
    a, sfa, b, sfb = bench._grouped_inputs(num_groups, m, n, k, False)
    sfa = moegemm.get_mn_major_tma_aligned_tensor(sfa)
    groups = torch.arange(num_groups, device="cuda", dtype=torch.int32).repeat_interleave(m)
    d = torch.empty(num_groups * m, n, device="cuda", dtype=torch.bfloat16)
    plan = fp8_gemm.plan_grouped("contiguous", a, b, d, moegemm.get_num_sms(), m)
    return bench.kernel_time_us(lambda: plan.launch(a, sfa, b, sfb, d, groups), iters=20)


def main(tag: str, dense: bool, grouped: bool, small: bool) -> None:
    if small:
        parts = [f"{m}x{n}x{k} {pick_us(*bench._fp8_inputs(m, n, k)[2:], iters=30):.2f}" for m, n, k in SMALL]
        print(tag, " | ".join(parts), flush=True)
        return
    parts = [f"{n}x{k} %.1f/%.1f" % dense_us(m, n, k) for m, n, k in DENSE] if dense else []
    if grouped:
        parts += [f"masked {g}x{m}x{n}x{k} {masked_us(g, m, n, k):.1f}" for g, m, n, k in MASKED]
        parts += [f"contiguous {g}x{m}x{n}x{k} {contiguous_us(g, m, n, k):.1f}" for g, m, n, k in CONTIGUOUS]
    print(tag, " | ".join(parts), flush=True)


if __name__ == "__main__":
    flags = {arg for arg in sys.argv[1:] if arg.startswith("--")}
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    main(args[0] if args else "", "--grouped" not in flags, "--dense" not in flags, "--small" in flags)
