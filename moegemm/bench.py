"""Benchmarks behind ``python -m moegemm bench``: moegemm beside cuBLAS in one run.

Kernel times come from the CUDA profiler (CUPTI), L2 flushed before every call, median over calls;
inputs and scale layouts are prepared outside the timed region, for cuBLAS exactly as for moegemm.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import api, device, quant, testing
from .gemm.desc import GemmType

FP8_GEMM_MS = (1, 64, 128, 4096)
# DeepSeek-V3 (N, K) pairs of the dense layers.
FP8_GEMM_NK = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))


def kernel_time_us(fn: Callable[[], object], iters: int = 30) -> float:
    """Median over ``iters`` calls of the summed device time of the kernels ``fn`` launches, with L2
    flushed (outside the measured kernels) before each call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    testing.flush_l2()  # the first flush also allocates its buffer
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        testing.flush_l2()
        torch.cuda.synchronize()
    # The flush's kernel sequence, found again before each call (the calls may launch the same
    # kernels, memsets say, so single names cannot mark the boundaries).
    flush = [e.name for e in _device_events(prof)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            testing.flush_l2()
            torch.cuda.synchronize()
            fn()
        torch.cuda.synchronize()
    events = _device_events(prof)
    per_call: list[float] = []
    i = 0
    while i < len(events):
        if [e.name for e in events[i:i + len(flush)]] == flush:
            per_call.append(0.0)
            i += len(flush)
            continue
        if per_call:
            per_call[-1] += events[i].time_range.elapsed_us()
        i += 1
    if len(per_call) != iters:
        raise RuntimeError(f"profiler saw {len(per_call)} L2 flushes for {iters} calls")
    return statistics.median(per_call)


def _device_events(prof):
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and "memcpy" not in e.name.lower()]
    return sorted(events, key=lambda e: e.time_range.start)


def host_overhead_us(fn: Callable[[], object], calls: int = 100, rounds: int = 20) -> float:
    """Host time of one call: the least, over ``rounds``, of the mean over back-to-back calls (the
    launch queue never fills). The least round filters out the VM's preemptions."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return best


@dataclass
class GemmRow:
    m: int
    n: int
    k: int
    moegemm_us: float
    tflops: float
    tbps: float
    cublaslt_us: float | None
    speedup: float | None
    unscaled_us: float
    bf16_us: float
    diff_dequant: float
    diff_bf16: float


def _fp8_inputs(m: int, n: int, k: int):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a, sfa = api.per_token_cast_to_fp8(x)
    b, sfb = api.per_block_cast_to_fp8(w)
    return x, w, a, sfa, b, sfb


def _cublaslt_blockwise(a, sfa, b, sfb):
    """A callable running torch._scaled_mm with 1x128 / 128x128 scales, or None where torch lacks it.
    cuBLASLt wants M-major activation scales and M a multiple of 4, so A is padded outside the timing."""
    m = a.shape[0]
    pad = -m % 4
    if pad:
        a = torch.cat([a, torch.zeros(pad, a.shape[1], dtype=a.dtype, device=a.device)])
        sfa = torch.cat([sfa, torch.ones(pad, sfa.shape[1], dtype=sfa.dtype, device=sfa.device)])
    scale_a = sfa.t().contiguous().t()
    scale_b = sfb.t()
    try:
        out = torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError) as error:
        print(f"cuBLASLt blockwise unavailable: {str(error).splitlines()[0]}")
        return None, None
    return (lambda: torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=torch.bfloat16)), out[:m]


def _cublas_per_tensor(a, b):
    """A callable running torch._scaled_mm on the same FP8 operands with one scale per tensor: the
    product without the fine-grained scaling's work, a practical bound for a blockwise-scaled kernel
    on the shape. cuBLASLt wants M a multiple of 16, so A is padded outside the timing."""
    pad = -a.shape[0] % 16
    if pad:
        a = torch.cat([a, torch.zeros(pad, a.shape[1], dtype=a.dtype, device=a.device)])
    one = torch.ones((), device=a.device)
    return lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16)


def bench_fp8_gemm_shape(m: int, n: int, k: int, iters: int = 30) -> GemmRow:
    from . import reference

    x, w, a, sfa, b, sfb = _fp8_inputs(m, n, k)
    sfa_required = api.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    t_ours = kernel_time_us(lambda: api.fp8_gemm_nt((a, sfa_required), (b, sfb), d), iters)
    ref = torch.empty(m, n, device="cuda", dtype=torch.float32)
    reference.fp8_gemm_nt((a, sfa), (b, sfb), ref)
    exact = x.float() @ w.float().t()
    cublas, _ = _cublaslt_blockwise(a, sfa, b, sfb)
    t_cublas = kernel_time_us(cublas, iters) if cublas else None
    t_unscaled = kernel_time_us(_cublas_per_tensor(a, b), iters)
    t_bf16 = kernel_time_us(lambda: x @ w.t(), iters)
    bytes_moved = m * k + n * k + 4 * (sfa.numel() + sfb.numel()) + 2 * m * n
    return GemmRow(m, n, k, t_ours, 2 * m * n * k / t_ours / 1e6, bytes_moved / t_ours / 1e6, t_cublas,
                   (t_cublas / t_ours) if t_cublas else None, t_unscaled, t_bf16,
                   api.calc_diff(d.float(), ref), api.calc_diff(d.float(), exact))


def bench_fp8_gemm(ms=FP8_GEMM_MS, nks=FP8_GEMM_NK, iters: int = 30) -> list[GemmRow]:
    return [bench_fp8_gemm_shape(m, n, k, iters) for m in ms for n, k in nks]


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec`` ("[>]width.precisionf"), or "n/a" right-aligned in the same width."""
    if value is None:
        return format("n/a", ">" + spec.lstrip(">").split(".")[0])
    return format(value, spec)


def print_gemm_table(title: str, rows: list[GemmRow]) -> None:
    print(f"\n{title}")
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'us':>8} {'TFLOPS':>7} {'TB/s':>5} | {'cuBLASLt us':>11} {'x':>5} | "
          f"{'unscaled us':>11} {'TFLOPS':>7} | {'bf16 us':>8} | {'diff':>8}")
    for r in rows:
        unscaled_tflops = 2 * r.m * r.n * r.k / r.unscaled_us / 1e6
        print(f"{r.m:>5} {r.n:>6} {r.k:>6} | {r.moegemm_us:>8.1f} {r.tflops:>7.0f} {r.tbps:>5.2f} | "
              f"{_fmt(r.cublaslt_us, '>11.1f')} {_fmt(r.speedup, '>5.2f')} | {r.unscaled_us:>11.1f} "
              f"{unscaled_tflops:>7.0f} | {r.bf16_us:>8.1f} | {r.diff_dequant:>8.1e}")
    large = [r for r in rows if r.m >= 4096]
    speedups = [r.speedup for r in large if r.speedup]
    if speedups:
        print(f"geometric-mean speed-up over cuBLASLt at M >= 4096: {statistics.geometric_mean(speedups):.3f}")
    unscaled = [r.unscaled_us / r.moegemm_us for r in large]
    if unscaled:
        print(f"geometric mean of the unscaled product's time over ours at M >= 4096: "
              f"{statistics.geometric_mean(unscaled):.3f}")


def ceilings() -> dict[str, float]:
    """What this GPU sustains, measured in the same run as the kernels it bounds: a copy of 1 GiB by
    an elementwise kernel (TB/s of bytes read plus written; the profiler times kernels, not the
    copy engine's memcpy) and cuBLAS FP8 8192^3 with per-tensor scales (TFLOPS)."""
    src = torch.ones(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy_us = kernel_time_us(lambda: torch.mul(src, 1.0, out=dst), iters=10)
    size = 8192
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    gemm_us = kernel_time_us(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16), iters=10)
    return {"copy_tbps": 2 * (1 << 30) / copy_us / 1e6, "fp8_per_tensor_tflops": 2 * size ** 3 / gemm_us / 1e6}


def launch_overhead() -> dict[str, float]:
    """Host microseconds per cached fp8_gemm_nt call (four TMA descriptors) on a tiny problem."""
    _, _, a, sfa, b, sfb = _fp8_inputs(128, 256, 256)
    sfa = api.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.empty(128, 256, device="cuda", dtype=torch.bfloat16)
    from .kernels import fp8_gemm

    desc = fp8_gemm.describe(GemmType.NORMAL, a, b, d)
    plan = fp8_gemm.plan(desc, a, b, d, device.device_facts(d.get_device()))
    x = torch.zeros(16, device="cuda")
    return {"fp8_gemm_nt_us": host_overhead_us(lambda: api.fp8_gemm_nt((a, sfa), (b, sfb), d)),
            "planned_launch_us": host_overhead_us(lambda: plan.launch(a, sfa, b, sfb, d)),
            "torch_add_us": host_overhead_us(lambda: x.add_(1))}


@dataclass
class CastRow:
    cast: str
    m: int
    k: int
    ue8m0: bool
    kernel_us: float
    kernel_gbps: float
    torch_us: float
    torch_gbps: float


def bench_casts(shapes=((8192, 7168), (4096, 16384)), iters: int = 30) -> list[CastRow]:
    """The FP8 cast kernels beside the PyTorch path they replace (bf16 input), checked bit for bit;
    bytes = input + FP8 output + float32 scales."""
    from .kernels import fp8_cast

    casts = (("per_token", fp8_cast.per_token_cast, quant._per_token_cast_torch),
             ("per_block", fp8_cast.per_block_cast, quant._per_block_cast_torch))
    rows = []
    for m, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for name, kernel, torch_path in casts:
            for ue8m0 in (False, True):
                out, ref = kernel(x, ue8m0), torch_path(x, ue8m0)
                if not (torch.equal(out[0].view(torch.uint8), ref[0].view(torch.uint8))
                        and torch.equal(out[1], ref[1])):
                    raise RuntimeError(f"{name} {m}x{k} ue8m0={ue8m0}: the kernel and the torch path disagree")
                traffic = x.numel() * x.element_size() + out[0].numel() + out[1].numel() * 4
                t_kernel = kernel_time_us(functools.partial(kernel, x, ue8m0), iters)
                t_torch = kernel_time_us(functools.partial(torch_path, x, ue8m0), iters)
                rows.append(CastRow(name, m, k, ue8m0, t_kernel, traffic / t_kernel / 1e3, t_torch,
                                    traffic / t_torch / 1e3))
    return rows


@dataclass
class GroupedRow:
    layout: str
    groups: int
    m_per_group: int
    n: int
    k: int
    moegemm_us: float
    tflops: float
    tbps: float
    cublaslt_loop_us: float | None
    speedup: float | None
    unscaled_loop_us: float
    diff_dequant: float


GROUPED_CONTIGUOUS = [(g, m, n, k) for g in (4, 8) for m in (8192, 4096) for n, k in ((4096, 7168), (7168, 2048))]
GROUPED_MASKED = [(32, m, n, k) for m in (32, 192) for n, k in ((4096, 7168), (7168, 2048))]


def _grouped_inputs(num_groups: int, m: int, n: int, k: int, masked: bool):
    x = torch.randn(num_groups * m, k, device="cuda", dtype=torch.bfloat16)
    a, sfa = api.per_token_cast_to_fp8(x)
    b = torch.empty(num_groups, n, k, device="cuda", dtype=torch.float8_e4m3fn)
    sfb = torch.empty(num_groups, -(-n // 128), -(-k // 128), device="cuda")
    for g in range(num_groups):
        b[g], sfb[g] = api.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    if masked:
        a, sfa = a.view(num_groups, m, k), sfa.view(num_groups, m, -1)
    return a, sfa, b, sfb


def _expert_rows(t: torch.Tensor, g: int, m: int) -> torch.Tensor:
    """Expert ``g``'s ``m`` rows of A or of its scales ([G, m, ...] masked, [G * m, ...] contiguous)."""
    return t[g] if t.dim() == 3 else t[g * m:(g + 1) * m]


def _cublaslt_loop(a, sfa, b, sfb, num_groups: int, m: int):
    """One cuBLASLt blockwise call per expert, scale layouts prepared outside the timing."""
    calls = []
    for g in range(num_groups):
        call, _ = _cublaslt_blockwise(_expert_rows(a, g, m), _expert_rows(sfa, g, m), b[g], sfb[g])
        if call is None:
            return None
        calls.append(call)
    return lambda: [call() for call in calls]


def _unscaled_loop(a, b, num_groups: int, m: int):
    """One cuBLAS call per expert on the same FP8 operands with per-tensor scales (the unscaled bound)."""
    calls = [_cublas_per_tensor(_expert_rows(a, g, m), b[g]) for g in range(num_groups)]
    return lambda: [call() for call in calls]


def bench_grouped_shape(layout: str, num_groups: int, m: int, n: int, k: int, iters: int = 20) -> GroupedRow:
    from . import reference

    masked = layout == "masked"
    a, sfa, b, sfb = _grouped_inputs(num_groups, m, n, k, masked)
    sfa_required = api.get_mn_major_tma_aligned_tensor(sfa)
    if masked:
        groups = torch.full((num_groups,), m, dtype=torch.int32, device="cuda")
        d = torch.empty(num_groups, m, n, device="cuda", dtype=torch.bfloat16)
        run = functools.partial(api.m_grouped_fp8_gemm_nt_masked, (a, sfa_required), (b, sfb), d, groups, m)
        ref = torch.empty(d.shape, device="cuda")
        reference.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), ref, groups, m)
    else:
        groups = torch.arange(num_groups, device="cuda", dtype=torch.int32).repeat_interleave(m)
        d = torch.empty(num_groups * m, n, device="cuda", dtype=torch.bfloat16)
        run = functools.partial(api.m_grouped_fp8_gemm_nt_contiguous, (a, sfa_required), (b, sfb), d, groups)
        ref = torch.empty(d.shape, device="cuda")
        reference.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), ref, groups)
    t_ours = kernel_time_us(run, iters)
    diff = api.calc_diff(d.float(), ref)
    del ref
    cublas = _cublaslt_loop(a, sfa, b, sfb, num_groups, m)
    t_cublas = kernel_time_us(cublas, iters) if cublas else None
    t_unscaled = kernel_time_us(_unscaled_loop(a, b, num_groups, m), iters)
    rows = num_groups * m
    bytes_moved = rows * k + b.numel() + 4 * (sfa.numel() + sfb.numel()) + 2 * rows * n
    return GroupedRow(layout, num_groups, m, n, k, t_ours, 2 * rows * n * k / t_ours / 1e6, bytes_moved / t_ours / 1e6,
                      t_cublas, (t_cublas / t_ours) if t_cublas else None, t_unscaled, diff)


def bench_grouped(iters: int = 20) -> list[GroupedRow]:
    return ([bench_grouped_shape("contiguous", *shape, iters=iters) for shape in GROUPED_CONTIGUOUS]
            + [bench_grouped_shape("masked", *shape, iters=iters) for shape in GROUPED_MASKED])


def print_grouped_table(rows: list[GroupedRow]) -> None:
    print("\nMoE grouped FP8 GEMMs (BF16 out) vs one cuBLASLt blockwise call per expert "
          "(torch._scaled_grouped_mm has no 1x128/128x128 blockwise scaling) and one unscaled cuBLAS call "
          "(per-tensor scales) per expert")
    print(f"{'layout':>10} {'G':>3} {'M/G':>5} {'N':>6} {'K':>6} | {'us':>8} {'TFLOPS':>7} {'TB/s':>5} | "
          f"{'cuBLASLt loop us':>16} {'x':>5} | {'unscaled loop us':>16} {'TFLOPS':>7} | {'diff':>8}")
    for r in rows:
        unscaled_tflops = 2 * r.groups * r.m_per_group * r.n * r.k / r.unscaled_loop_us / 1e6
        print(f"{r.layout:>10} {r.groups:3d} {r.m_per_group:5d} {r.n:6d} {r.k:6d} | {r.moegemm_us:8.1f} "
              f"{r.tflops:7.0f} {r.tbps:5.2f} | {_fmt(r.cublaslt_loop_us, '16.1f')} {_fmt(r.speedup, '5.2f')} | "
              f"{r.unscaled_loop_us:16.1f} {unscaled_tflops:7.0f} | {r.diff_dequant:8.1e}")


def print_cast_table(rows: list[CastRow]) -> None:
    print("\nFP8 casts (bf16 in), GB/s of bytes read plus written")
    print(f"{'cast':9} {'shape':>11} {'sf':>5} | {'kernel us':>9} {'GB/s':>6} | {'torch us':>8} {'GB/s':>6}")
    for r in rows:
        sf = "ue8m0" if r.ue8m0 else "fp32"
        print(f"{r.cast:9} {r.m:>5}x{r.k:<5} {sf:>5} | {r.kernel_us:9.1f} {r.kernel_gbps:6.0f} | "
              f"{r.torch_us:8.1f} {r.torch_gbps:6.0f}")


def main(json_path: str | None = None) -> None:
    device = torch.cuda.get_device_name()
    print(f"moegemm benchmarks on {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    # Host time first: once torch.profiler has run in a process, every kernel launch costs several us
    # more (BENCHMARKS.md, 2026-12-02), which users don't pay.
    overhead = launch_overhead()
    limits = ceilings()
    print(f"ceilings measured now: device-to-device copy {limits['copy_tbps']:.2f} TB/s, cuBLAS FP8 8192^3 "
          f"per-tensor {limits['fp8_per_tensor_tflops']:.0f} TFLOPS")
    print(f"host overhead per cached call: fp8_gemm_nt {overhead['fp8_gemm_nt_us']:.2f} us, its planned "
          f"launch alone {overhead['planned_launch_us']:.2f} us; for scale, torch's x.add_(1) "
          f"{overhead['torch_add_us']:.2f} us")
    rows = bench_fp8_gemm()
    print_gemm_table("fp8_gemm_nt (BF16 out) vs cuBLASLt blockwise 1x128/128x128, cuBLAS unscaled (per-tensor "
                     "scales, same FP8 operands) and BF16 torch.matmul", rows)
    grouped = bench_grouped()
    print_grouped_table(grouped)
    casts = bench_casts()
    print_cast_table(casts)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "ceilings": limits, "overhead": overhead,
                       "fp8_gemm_nt": [asdict(r) for r in rows], "grouped": [asdict(r) for r in grouped],
                       "casts": [asdict(r) for r in casts]}, f, indent=1)
