"""Kernel times of the FP8 GEMMs through the public API (the heuristic's picks): the dense GEMMs at
M = 4096, the grouped GEMMs and the FP8 casts, and with ``--small`` the dense GEMMs at M in
{1, 64, 128}; one line per run. The A/B comparisons of two builds in BENCHMARKS.md: machines lent for
a session differ by several percent, so both builds run alternately in one session, each from its
own checkout and kernel cache. Only public names and ``moegemm.bench.kernel_time_us`` are used, so
any two versions compare (needs an SM90 GPU):

    for round in 1 2; do for tree in new old; do
        PYTHONPATH=$tree MOEGEMM_CACHE_DIR=/tmp/cache-$tree python3 scripts/ab_fp8_gemm.py $tree
    done; done
"""

import functools
import sys

import torch

import moegemm
from moegemm.bench import FP8_GEMM_NK, kernel_time_us

DENSE = ((4096, 7168, 16384), (4096, 4096, 7168), (4096, 7168, 2048), (4096, 2112, 7168), (4096, 24576, 1536),
         (4096, 32768, 512))
MASKED = ((32, 192, 4096, 7168), (32, 192, 7168, 2048), (32, 32, 4096, 7168))
CONTIGUOUS = ((8, 8192, 4096, 7168), (4, 4096, 4096, 7168), (8, 4096, 7168, 2048))
SMALL = tuple((m, n, k) for m in (1, 64, 128) for n, k in FP8_GEMM_NK)
CASTS = ((8192, 7168), (4096, 16384))
PIPELINES = ((4096, 7168, 2048), (64, 4096, 7168))


def _tokens(rows: int, k: int):
    a, sfa = moegemm.per_token_cast_to_fp8(torch.randn(rows, k, device="cuda", dtype=torch.bfloat16))
    return a, moegemm.get_mn_major_tma_aligned_tensor(sfa)


def _weights(groups: int, n: int, k: int):
    return moegemm.per_block_cast_to_fp8(torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))


def dense_us(m: int, n: int, k: int, iters: int = 20) -> float:
    a = _tokens(m, k)
    b = moegemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    return kernel_time_us(functools.partial(moegemm.fp8_gemm_nt, a, b, d), iters=iters)


def masked_us(groups: int, m: int, n: int, k: int) -> float:
    a, sfa = _tokens(groups * m, k)
    a = (a.view(groups, m, k), moegemm.get_mn_major_tma_aligned_tensor(sfa.view(groups, m, -1)))
    masked_m = torch.full((groups,), m, dtype=torch.int32, device="cuda")
    d = torch.empty(groups, m, n, device="cuda", dtype=torch.bfloat16)
    run = functools.partial(moegemm.m_grouped_fp8_gemm_nt_masked, a, _weights(groups, n, k), d, masked_m, m)
    return kernel_time_us(run, iters=20)


def contiguous_us(groups: int, m: int, n: int, k: int) -> float:
    layout = torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(m)
    d = torch.empty(groups * m, n, device="cuda", dtype=torch.bfloat16)
    run = functools.partial(moegemm.m_grouped_fp8_gemm_nt_contiguous, _tokens(groups * m, k), _weights(groups, n, k),
                            d, layout)
    return kernel_time_us(run, iters=20)


def cast_us(cast, m: int, k: int) -> float:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return kernel_time_us(functools.partial(cast, x), iters=20)


def pipeline_us(m: int, n: int, k: int) -> float:
    """per_token_cast_to_fp8 and fp8_gemm_nt on its output as it comes: what a caller that does not
    re-lay out the scales itself pays (every kernel launched counts)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = moegemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    return kernel_time_us(lambda: moegemm.fp8_gemm_nt(moegemm.per_token_cast_to_fp8(x), b, d), iters=20)


def main(tag: str, dense: bool, grouped: bool, small: bool) -> None:
    if small:
        print(tag, " | ".join(f"{m}x{n}x{k} {dense_us(m, n, k, iters=30):.2f}" for m, n, k in SMALL), flush=True)
        return
    parts = [f"{m}x{n}x{k} {dense_us(m, n, k):.1f}" for m, n, k in DENSE] if dense else []
    if grouped:
        parts += [f"masked {g}x{m}x{n}x{k} {masked_us(g, m, n, k):.1f}" for g, m, n, k in MASKED]
        parts += [f"contiguous {g}x{m}x{n}x{k} {contiguous_us(g, m, n, k):.1f}" for g, m, n, k in CONTIGUOUS]
        parts += [f"{cast.__name__} {m}x{k} {cast_us(cast, m, k):.1f}" for m, k in CASTS
                  for cast in (moegemm.per_token_cast_to_fp8, moegemm.per_block_cast_to_fp8)]
        parts += [f"cast+gemm {m}x{n}x{k} {pipeline_us(m, n, k):.1f}" for m, n, k in PIPELINES]
    print(tag, " | ".join(parts), flush=True)


if __name__ == "__main__":
    flags = {arg for arg in sys.argv[1:] if arg.startswith("--")}
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    main(args[0] if args else "", "--grouped" not in flags, "--dense" not in flags, "--small" in flags)
