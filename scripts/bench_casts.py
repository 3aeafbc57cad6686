"""GB/s of the FP8 casts on an SM90 GPU: the CUDA kernel (moegemm.kernels.fp8_cast) beside the PyTorch path
it replaces, for bf16 inputs. Times are profiler kernel times, L2 flushed before every call, median
(moegemm.bench.kernel_time_us); bytes = input + FP8 output + float32 scales. Run from the repository root:

    python scripts/bench_casts.py
"""

from __future__ import annotations

import functools

import torch

from moegemm import utils
from moegemm.bench import kernel_time_us
from moegemm.kernels import fp8_cast

SHAPES = ((8192, 7168), (4096, 16384))
CASTS = (
    ("per_token", fp8_cast.per_token_cast, utils._per_token_cast_torch),
    ("per_block", fp8_cast.per_block_cast, utils._per_block_cast_torch),
)


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return (torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
            and torch.equal(a[1].view(torch.int32), b[1].view(torch.int32)))


def main() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("bench_casts needs an SM90 GPU (H100/H200)")
    print(f"{torch.cuda.get_device_name()}; GB/s = (input + fp8 + sf bytes) / kernel time")
    print(f"{'cast':9s} {'shape':>11s} {'sf':>5s} | {'kernel us':>9s} {'GB/s':>6s} | {'torch us':>8s} {'GB/s':>6s} "
          f"| {'speedup':>7s}")
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for name, kernel, reference in CASTS:
            for ue8m0 in (False, True):
                out = kernel(x, ue8m0)
                if not _same(out, reference(x, ue8m0)):
                    raise SystemExit(f"{name} {m}x{k} ue8m0={ue8m0}: the kernel and the torch path disagree")
                traffic = x.numel() * x.element_size() + out[0].numel() + out[1].numel() * 4
                kernel_us = kernel_time_us(functools.partial(kernel, x, ue8m0))
                torch_us = kernel_time_us(functools.partial(reference, x, ue8m0))
                print(f"{name:9s} {m:>5d}x{k:<5d} {'ue8m0' if ue8m0 else 'fp32':>5s} | {kernel_us:9.1f} "
                      f"{traffic / kernel_us / 1e3:6.0f} | {torch_us:8.1f} {traffic / torch_us / 1e3:6.0f} "
                      f"| {torch_us / kernel_us:6.1f}x")


if __name__ == "__main__":
    main()
