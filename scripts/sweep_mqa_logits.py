"""Time the indexer kernels' configs (math warpgroups, key stages) around select_config's pick, FP8 and
FP4, on the bench's dense shapes and paged decode cases (the measurements its warpgroup rule rests
on). Needs an SM90 GPU:
    python scripts/sweep_mqa_logits.py            # dense and paged
    python scripts/sweep_mqa_logits.py --paged    # paged only
"""

import argparse
import concurrent.futures
import dataclasses
import os

import torch

import moegemm
from moegemm import bench
from moegemm.device import device_facts
from moegemm.kernels import mqa_logits

FP8 = torch.float8_e4m3fn


def candidates(pick: mqa_logits.MqaLogitsConfig, facts) -> list[mqa_logits.MqaLogitsConfig]:
    """The pick, and each warpgroup count the kernel allows with the most and half the key stages that
    fit (a config whose registers would spill is a compile error here: ptxas reports, the build goes on);
    FP8 dense: each of those in CTA pairs too; FP8: the pipelined form with the most and half the stages."""
    configs = [pick]
    for warpgroups in (2, 4) if pick.next_n else (2, 3, 4):
        most = mqa_logits.with_most_stages(dataclasses.replace(pick, math_warpgroups=warpgroups), facts)
        configs += [most, dataclasses.replace(most, kv_stages=max(2, most.kv_stages // 2))]
    if not pick.next_n and not pick.fp4:  # FP8 dense: each alone and in CTA pairs sharing their key blocks
        configs += [dataclasses.replace(config, cluster_q=3 - config.cluster_q) for config in configs]
    pipelined = mqa_logits.pipelined(pick, facts)  # FP8: two accumulator sets a math warpgroup
    if pipelined is not None:
        configs += [pipelined, dataclasses.replace(pipelined, kv_stages=max(2, pipelined.kv_stages // 2))]
    return list(dict.fromkeys(configs))


def label(config: mqa_logits.MqaLogitsConfig, pick: mqa_logits.MqaLogitsConfig) -> str:
    pair = "c2" if config.cluster_q > 1 else ""
    pipelined = "p" if config.pipelined else ""
    return f"{'*' if config == pick else ''}w{config.math_warpgroups}s{config.kv_stages}{pair}{pipelined}"


def sweep_dense(facts) -> None:
    for heads, head_dim, seq_len, seq_len_kv in bench.MQA_SHAPES:
        q = torch.randn(seq_len, heads, head_dim, device="cuda")
        kv = torch.randn(seq_len_kv, head_dim, device="cuda")
        weights = torch.randn(seq_len, heads, device="cuda")
        scales = kv.abs().amax(dim=1) / 448
        inputs = {False: ((q.to(FP8), None), ((kv / scales[:, None]).to(FP8), scales)),
                  True: (bench._fp4_rows(q), bench._fp4_rows(kv))}
        half, ranks = seq_len // 2, seq_len_kv // seq_len
        rank = ranks // 3
        ke = torch.cat([torch.arange(half) + rank * half + 1,
                        torch.arange(half) + (2 * ranks - 1 - rank) * half + 1]).to(torch.int32).cuda()
        ks = torch.zeros(seq_len, dtype=torch.int32, device="cuda")
        logits = torch.empty(seq_len, seq_len_kv, device="cuda")
        for fp4 in (False, True):
            (q_values, q_sf), (kv_values, kv_sf) = inputs[fp4]
            q_sf = q_sf if fp4 else q_values  # the FP8 kernels take q's address for the exponents' operand
            pick = mqa_logits.select_config(heads, head_dim, False, False, True, facts, fp4=fp4)
            times = []
            for config in candidates(pick, facts):
                plan = mqa_logits.plan(seq_len, seq_len_kv, heads, head_dim, heads * 4, logits, False, True, facts,
                                       fp4=fp4, config=config)
                pointers = (q_values.data_ptr(), q_sf.data_ptr(), kv_values.data_ptr(), kv_sf.data_ptr(),
                            weights.data_ptr(), ks.data_ptr(), ke.data_ptr(), logits.data_ptr())
                us = bench.kernel_time_us(lambda plan=plan, pointers=pointers: plan.launch_pointers(0, *pointers), 10)
                times.append(f"{label(config, pick)}:{us:.1f}")
            print(f"dense {'fp4' if fp4 else 'fp8'} H={heads} D={head_dim} {seq_len} x {seq_len_kv} | "
                  + " ".join(times), flush=True)


def sweep_paged(facts) -> None:
    heads, head_dim = bench.PAGED_MQA_HEADS, bench.PAGED_MQA_HEAD_DIM
    for batch, next_n, context in bench.PAGED_MQA_CASES:
        lens, table, *caches = bench.random_paged_batch(batch, context, head_dim)
        pages_per_batch = table.shape[1]
        q = torch.randn(batch, next_n, heads, head_dim, device="cuda")
        queries = {False: (q.to(FP8), None), True: bench._fp4_rows(q)}
        weights = torch.randn(batch * next_n, heads, device="cuda")
        context_lens = lens[:, None].expand(batch, next_n).contiguous()
        schedule = moegemm.get_paged_mqa_logits_metadata(context_lens, 64, facts.num_sms)
        logits = torch.empty(batch * next_n, pages_per_batch * 64, device="cuda")
        for fp4 in (False, True):
            q_values, q_sf = queries[fp4]
            q_sf = q_sf if fp4 else q_values
            pick = mqa_logits.select_config(heads, head_dim, False, False, False, facts, next_n, fp4)
            times = []
            for config in candidates(pick, facts):
                plan = mqa_logits.plan_paged(batch, next_n, heads, head_dim, table.numel(), pages_per_batch, heads * 4,
                                             logits, False, facts.num_sms, facts, fp4=fp4, config=config)
                pointers = (q_values.data_ptr(), q_sf.data_ptr(), caches[fp4].data_ptr(), weights.data_ptr(),
                            context_lens.data_ptr(), table.data_ptr(), schedule.data_ptr(), logits.data_ptr())
                us = bench.kernel_time_us(lambda plan=plan, pointers=pointers: plan.launch_pointers(0, *pointers), 10)
                times.append(f"{label(config, pick)}:{us:.1f}")
            print(f"paged {'fp4' if fp4 else 'fp8'} B={batch} next_n={next_n} context={context} | " + " ".join(times),
                  flush=True)
        del caches


def compile_all(facts, paged_only: bool) -> None:
    """Compile every config the sweep times, on all cores at once (one at a time, compiles would
    take most of a device call)."""
    picks = [] if paged_only else [mqa_logits.select_config(heads, head_dim, False, False, True, facts, fp4=fp4)
                                   for heads, head_dim, _, _ in bench.MQA_SHAPES for fp4 in (False, True)]
    picks += [mqa_logits.select_config(bench.PAGED_MQA_HEADS, bench.PAGED_MQA_HEAD_DIM, False, False, False, facts,
                                       next_n, fp4) for _, next_n, _ in bench.PAGED_MQA_CASES for fp4 in (False, True)]
    configs = list(dict.fromkeys(config for pick in picks for config in candidates(pick, facts)))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(mqa_logits.build, configs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paged", action="store_true", help="the paged decode cases only")
    args = parser.parse_args()
    facts = device_facts(0)
    print(f"{torch.cuda.get_device_name()}: kernel us per config (w: math warpgroups, s: key stages, *: the pick)")
    compile_all(facts, args.paged)
    if not args.paged:
        sweep_dense(facts)
    sweep_paged(facts)


if __name__ == "__main__":
    main()
