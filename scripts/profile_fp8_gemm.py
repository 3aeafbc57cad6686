"""One launch of an FP8 GEMM between cudaProfilerStart and cudaProfilerStop, for Nsight Compute's
`--profile-from-start off`: moegemm's kernel in the heuristic's config or a given one, or DeepGEMM's
on the same inputs (the bench's shapes and routing counts). Needs an SM90 GPU, e.g.:

    ncu --profile-from-start off --clock-control none --cache-control all --set full \\
        python scripts/profile_fp8_gemm.py contiguous --groups 4 --rows 8192 --config 128x192cm2
    ... python scripts/profile_fp8_gemm.py dense --m 4096 --n 7168 --k 16384 --deepgemm

Three warm-up launches (compiles included) run before the profiled one.
"""

import argparse
import functools
import re
import sys

import torch

import moegemm
from moegemm import bench
from moegemm.device import device_facts
from moegemm.gemm.desc import GemmType
from moegemm.kernels import fp8_gemm
from moegemm.kernels.fp8_gemm import Fp8GemmConfig

KINDS = {"dense": GemmType.NORMAL, "contiguous": GemmType.CONTIGUOUS, "masked": GemmType.MASKED}


def parse_config(text: str) -> Fp8GemmConfig:
    """`<BLOCK_M>x<BLOCK_N>[cm2|cn2]` with BF16 D, as many stages as fit (the heuristic's rule)."""
    match = re.fullmatch(r"(\d+)x(\d+)(cm2|cn2)?", text)
    if match is None:
        raise SystemExit(f"--config: expected e.g. 128x192 or 128x128cm2, got {text!r}")
    block_m, block_n = int(match[1]), int(match[2])
    stages = fp8_gemm.stages_for(block_m, block_n, 2, 1, device_facts(torch.cuda.current_device()))
    return Fp8GemmConfig(block_m, block_n, stages, False, False, 2 if match[3] == "cm2" else 1,
                         cluster_n=2 if match[3] == "cn2" else 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--m", type=int, default=4096, help="dense: rows of A")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--groups", type=int, default=8, help="grouped: experts")
    parser.add_argument("--rows", type=int, default=4096, help="grouped: mean rows per expert (routing counts)")
    parser.add_argument("--config", help="moegemm's config instead of the heuristic's, e.g. 128x192cm2")
    parser.add_argument("--deepgemm", action="store_true", help="profile DeepGEMM's kernel instead")
    args = parser.parse_args()
    kind = KINDS[args.kind]
    facts = device_facts(torch.cuda.current_device())
    if kind is GemmType.NORMAL:
        _, _, a, sfa, b, sfb = bench._fp8_inputs(args.m, args.n, args.k)
        groups = None
    else:
        counts = bench.routing_counts(args.groups, args.rows)
        a, sfa, b, sfb, groups, _ = bench._grouped_inputs(counts, args.n, args.k, kind is GemmType.MASKED)
    d = torch.empty(*a.shape[:-1], args.n, device="cuda", dtype=torch.bfloat16)
    if args.deepgemm:
        peer = bench.deep_gemm()
        if peer is None:
            sys.exit("DeepGEMM does not import")
        a_dg, b_dg = (a, peer.get_mn_major_tma_aligned_tensor(sfa)), (b, sfb)
        call = {GemmType.NORMAL: functools.partial(peer.fp8_gemm_nt, a_dg, b_dg, d),
                GemmType.CONTIGUOUS: functools.partial(peer.m_grouped_fp8_gemm_nt_contiguous, a_dg, b_dg, d, groups),
                GemmType.MASKED: functools.partial(peer.m_grouped_fp8_gemm_nt_masked, a_dg, b_dg, d, groups,
                                                   args.rows)}[kind]
    else:
        config = parse_config(args.config) if args.config else None
        desc = fp8_gemm.describe(kind, a, b, d, expected_m=None if kind is GemmType.NORMAL else args.rows)
        plan = fp8_gemm.plan(desc, a, b, d, facts, config)
        print(f"moegemm config: {plan.config}", file=sys.stderr)
        operands = (a, moegemm.get_mn_major_tma_aligned_tensor(sfa), b, sfb, d)
        call = functools.partial(plan.launch, *operands) if groups is None else \
            functools.partial(plan.launch, *operands, groups)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
