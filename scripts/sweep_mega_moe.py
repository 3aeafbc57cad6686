"""Time the fused MoE kernel's configs (token tile, math warpgroups) around select_config's pick on the
bench's MoE layers, the unfused pipeline beside them: which tile and warpgroup count win at decode
and prefill (the pick's rule rests on the swap-AB kernel's measurements until this has run). Each
config's output must be within the layer's tolerance of the pipeline's. Needs an SM90 GPU:
    python scripts/sweep_mega_moe.py             # every layer of the bench
    python scripts/sweep_mega_moe.py --decode    # 128 and 512 tokens only
"""

import argparse
import dataclasses
import functools

import torch

from moegemm import api, bench
from moegemm.device import device_facts
from moegemm.kernels import fp8_fp4_mega_moe as fused_kernel
from moegemm.ops import mega_moe


def candidates(pick: fused_kernel.MegaMoeConfig, facts) -> list[fused_kernel.MegaMoeConfig]:
    """The pick, each token tile's config, and two math warpgroups where the pick has four."""
    configs = [pick, *(fused_kernel.config_for(tile, facts) for tile in fused_kernel.TOKEN_TILES)]
    if pick.math_warpgroups == 4:
        two = dataclasses.replace(pick, math_warpgroups=2,
                                  double_buffer=fused_kernel.double_buffer_for(pick.tokens, 2))
        configs.append(dataclasses.replace(two, stages=max(
            s for s in range(1, 9) if fused_kernel.smem_bytes(2, pick.tokens, s) <= facts.smem_per_block)))
    return list(dict.fromkeys(configs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode", action="store_true", help="128 and 512 tokens only")
    args = parser.parse_args()
    facts = device_facts(torch.cuda.current_device())
    select = fused_kernel.select_config
    print(f"{torch.cuda.get_device_name()}: us of each config (tile t, warpgroups w), the unfused pipeline beside")
    for experts in sorted({e for _, e in bench.MOE_LAYERS}):
        l1 = bench._random_fp4(experts, 2 * bench.MOE_INTERMEDIATE, bench.MOE_HIDDEN)
        l2 = bench._random_fp4(experts, bench.MOE_HIDDEN, bench.MOE_INTERMEDIATE)
        for tokens in sorted(t for t, e in bench.MOE_LAYERS if e == experts and (not args.decode or t <= 512)):
            buffer = api.get_symm_buffer_for_mega_moe(None, experts, tokens, bench.MOE_TOPK, bench.MOE_HIDDEN,
                                                      bench.MOE_INTERMEDIATE)
            bench._fill_moe_buffer(buffer, tokens, experts)
            pick = select(tokens * bench.MOE_TOPK, experts, facts)
            y_unfused = torch.empty(tokens, bench.MOE_HIDDEN, device="cuda", dtype=torch.bfloat16)
            unfused = functools.partial(mega_moe._run, y_unfused, l1, l2, buffer, "fp8xfp4", None, "swiglu", None,
                                        fused=False)
            line = f"{tokens:5d} tokens {experts:4d} experts | unfused {bench.kernel_time_us(unfused, 10):8.1f} |"
            for config in candidates(pick, facts):
                fused_kernel.select_config = lambda *_, config=config, **__: config
                buffer.plans.clear()
                y = torch.empty_like(y_unfused)
                call = functools.partial(mega_moe._run, y, l1, l2, buffer, "fp8xfp4", None, "swiglu", None,
                                         fused=True)
                us = bench.kernel_time_us(call, 10)
                diff = api.calc_diff(y.float(), y_unfused.float())
                mark = "*" if config == pick else " "
                name = fused_kernel.kernel_name(config).removeprefix("sm90_fp8_fp4_mega_moe_")
                line += f" {mark}{name} {us:8.1f}{'' if diff < 2e-4 else ' DIFF'}"
            fused_kernel.select_config = select
            print(line, flush=True)
            buffer.destroy()
        del l1, l2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
