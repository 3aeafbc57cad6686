"""Command line: ``python -m moegemm info | bench [--json PATH] [--only SECTION] | cache clear | --version``."""

from __future__ import annotations

import argparse
import os
import sys


def _info() -> int:
    import torch

    from . import device, env
    from ._version import __version__
    from .jit import compiler

    print(f"moegemm {__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            arch = f"sm_{props.major}{props.minor}"
            runs = "yes" if (props.major, props.minor) == (9, 0) else "no (needs sm_90)"
            print(f"GPU {index}: {props.name}, {arch}, {props.multi_processor_count} SMs; "
                  f"fp8_gemm_nt kernels run here: {runs}")
            if (props.major, props.minor) == (9, 0):
                try:
                    facts = device.device_facts(index)
                    print(f"  shared memory per block {facts.smem_per_block} B; clusters of 1..8 CTAs resident at "
                          f"once: {', '.join(map(str, facts.resident_clusters))}")
                except (compiler.CompileError, RuntimeError) as error:  # no compiler for the probe kernel
                    print(f"  device facts unavailable: {str(error).splitlines()[0]}")
    else:
        print("GPU: none visible (CPU tensors use the pure-PyTorch reference)")
    try:
        print(f"compiler: {compiler.compiler_version()}")
    except compiler.CompileError as error:
        print(f"compiler: none ({error})")
    print(f"NVRTC mode: {'on' if compiler.use_nvrtc() else 'off'} (MOEGEMM_USE_NVRTC)")
    cuobjdump = compiler.find_cuobjdump()
    print(f"cuobjdump: {cuobjdump or 'not found'}")
    size = compiler.cache_size()
    print(f"cache: {compiler.cache_dir()} ({size / 2**20:.1f} MiB)")
    overridden = [v.name for v in env.VARIABLES if v.name in os.environ]
    print(f"environment: {', '.join(overridden) or 'defaults'}")
    return 0


def _bench(json_path: str | None, only: str | None) -> int:
    import torch

    if not torch.cuda.is_available():
        print("moegemm bench needs an SM90 GPU (H100/H200); this machine has no CUDA GPU.", file=sys.stderr)
        return 1
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        print(f"moegemm bench needs an SM90 GPU; {torch.cuda.get_device_name()} is sm_{major}{minor}.",
              file=sys.stderr)
        return 1
    from . import bench

    bench.main(json_path, bench.SECTIONS if only is None else (only,))
    return 0


def _cache_clear() -> int:
    from .jit import compiler

    root = compiler.cache_dir()
    try:
        removed, freed = compiler.clear_cache(root)
    except compiler.CacheClearRefused as error:
        print(f"moegemm cache clear: {error}", file=sys.stderr)
        return 2
    if not removed:
        print(f"nothing to remove: {root} does not exist")
    for path in removed:
        print(f"removed {path}")
    if removed:
        print(f"freed {freed / 2**20:.1f} MiB")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        return _info()
    if args.command == "bench":
        return _bench(args.json, args.only)
    return _cache_clear()


def main(argv: list[str] | None = None) -> int:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="python -m moegemm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moegemm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="GPU, compiler, cache and which kernels this GPU runs")
    bench = commands.add_parser("bench", help="benchmarks beside cuBLAS (needs an SM90 GPU)")
    bench.add_argument("--json", help="also write the results to this file")
    bench.add_argument("--only", choices=["fp8", "bf16", "fp4", "moe", "mqa", "moe_ranks"],
                       help="run one section: the FP8 GEMMs (with the training forms), casts and transpose, the "
                       "BF16 GEMMs, einsum and the hyper-connection GEMM, the FP8 x FP4 GEMMs, the MoE layer, the "
                       "lightning indexer's logits, or the MoE layer across every visible GPU")
    cache = commands.add_parser("cache", help="manage the kernel cache: `clear` deletes the kernels/ and host/ "
                                "folders moegemm wrote under MOEGEMM_CACHE_DIR, its marker file, and the folder "
                                "itself once empty")
    cache.add_argument("action", choices=["clear"])
    args = parser.parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`python -m moegemm info | head -2`): stop quietly. Output still
        # buffered for the closed pipe goes to /dev/null, so the flush at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
