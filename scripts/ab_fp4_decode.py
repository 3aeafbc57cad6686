"""One line of FP8 x FP4 decode kernel times through the public API: dense rows at M = 1 and 64,
masked experts of 32 and 64 rows, FP4 paged decode at 65536 context. For an A/B of two builds, each
from its own checkout and kernel cache, alternately (machines differ by several percent):

    for round in 1 2; do for tree in new old; do
        PYTHONPATH=$tree MOEGEMM_CACHE_DIR=/tmp/cache-$tree python3 scripts/ab_fp4_decode.py $tree
    done; done

(the old tree e.g. `git archive <commit> moegemm | tar -x -C .ab-base`). Needs an SM90 GPU.
"""

import functools
import sys

import torch

from moegemm import api, bench

DENSE = ((1, 7168, 16384), (1, 4096, 7168), (64, 4096, 7168), (64, 7168, 16384), (128, 7168, 2048))
MASKED = ((8, 32), (32, 64))  # experts, mean rows (N 4096, K 7168)


def main() -> None:
    torch.manual_seed(0)
    times = []
    for m, n, k in DENSE:
        a, sfa = api.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        _, b, _, sfb = bench._fp4_weights((), n, k)
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        call = functools.partial(api.fp8_fp4_gemm_nt, (a, api.get_mn_major_tma_aligned_tensor(sfa)), (b, sfb), d)
        times.append(f"{m}x{n}x{k} {bench.kernel_time_us(call, 30):.1f}")
    for groups, rows in MASKED:
        row = bench.bench_fp4_shape("masked", groups, rows, 4096, 7168, 4.29, 1480.0)
        times.append(f"masked {groups}x{rows} {row.fp4_us:.1f}")
    batch, context = 256, 65536
    lens, table, _, cache = bench.random_paged_batch(batch, context, 128)
    pages_per_batch = table.shape[1]
    for next_n in (1, 2):
        q = bench._fp4_rows(torch.randn(batch, next_n, 64, 128, device="cuda"))
        weights = torch.randn(batch * next_n, 64, device="cuda")
        context_lens = lens[:, None].expand(batch, next_n).contiguous()
        schedule = api.get_paged_mqa_logits_metadata(context_lens, 64, api.get_num_sms())
        call = functools.partial(api.fp8_fp4_paged_mqa_logits, q, cache, weights, context_lens, table, schedule,
                                 pages_per_batch * 64)
        times.append(f"paged next_n {next_n} {bench.kernel_time_us(call, 20):.1f}")
    print(sys.argv[1] if len(sys.argv) > 1 else "", " | ".join(times), flush=True)


if __name__ == "__main__":
    main()
