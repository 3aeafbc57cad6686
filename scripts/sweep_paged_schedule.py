"""Paged decode with its schedule split over k times the SMs' CTAs (k = 1, 2, 4), FP8 and FP4, on the
bench's paged cases, DeepGEMM's FP8 kernel beside them when it imports: whether later CTAs filling
the SMs that finish first shorten the tail (BENCHMARKS.md, twenty-eighth session: our SMs sat idle 17%
of the time, DeepGEMM's 9.5%). Each split's logits must equal the single split's. Needs an SM90 GPU:
    python scripts/sweep_paged_schedule.py
"""

import functools

import torch

from moegemm import api, bench
from moegemm.kernels import mqa_logits

SPLITS = (1, 2, 4)


def main() -> None:
    sms, dg = api.get_num_sms(), bench.deep_gemm()
    heads, head_dim = bench.PAGED_MQA_HEADS, bench.PAGED_MQA_HEAD_DIM
    print(f"{torch.cuda.get_device_name()}: us (TB/s) per CTAs-an-SM split, DeepGEMM {'beside' if dg else 'absent'}")
    for batch, next_n, context in bench.PAGED_MQA_CASES:
        torch.manual_seed(0)
        lens, table, cache8, cache4 = bench.random_paged_batch(batch, context, head_dim)
        pages_per_batch = table.shape[1]
        q = torch.randn(batch, next_n, heads, head_dim, device="cuda")
        q8, q4 = q.to(torch.float8_e4m3fn), bench._fp4_rows(q)
        weights = torch.randn(batch * next_n, heads, device="cuda")
        context_lens = lens[:, None].expand(batch, next_n).contiguous()
        columns, read = pages_per_batch * 64, int(lens.sum()) * (head_dim + 4)
        line, first = f"B {batch:5d} next_n {next_n} context {context:6d} |", None
        for split in SPLITS:
            schedule = mqa_logits.paged_schedule(context_lens, split * sms)
            fp8 = functools.partial(api.fp8_paged_mqa_logits, q8, cache8, weights, context_lens, table, schedule,
                                    columns)
            fp4 = functools.partial(api.fp8_fp4_paged_mqa_logits, q4, cache4, weights, context_lens, table, schedule,
                                    columns)
            out = (fp8().nan_to_num(), fp4().nan_to_num())
            first = first or out
            same = all(torch.equal(a, b) for a, b in zip(out, first, strict=True))
            us8, us4 = bench.kernel_time_us(fp8, 20), bench.kernel_time_us(fp4, 20)
            line += f" x{split}: {us8:.1f} ({read / us8 / 1e6:.2f}) fp4 {us4:.1f}{'' if same else ' DIFFERS'} |"
        if dg is not None:
            schedule = dg.get_paged_mqa_logits_metadata(context_lens, 64, sms)
            us = bench._deepgemm_us("fp8_paged_mqa_logits", 20, q8, cache8, weights, context_lens, table, schedule,
                                    columns, clean_logits=False)
            line += f" DeepGEMM {us:.1f}"
        print(line, flush=True)
        del cache8, cache4
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
