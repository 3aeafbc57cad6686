"""Benchmarks behind ``python -m moegemm bench``: moegemm beside cuBLAS and, when ``deep_gemm``
imports, DeepGEMM, in one run.

Kernel times come from the CUDA profiler (CUPTI), L2 flushed before every call, median over calls;
inputs and scale layouts are prepared outside the timed region, for each library in its own layout.
Ratios "x" are the other library's time over ours: above 1, moegemm is faster.
"""

from __future__ import annotations

import functools
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from . import api, device, quant, reference, testing
from .gemm.desc import GemmType
from .intmath import align

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


def sweep_line(label: str, plans: Iterable[tuple[object, Callable[[], object]]], chosen: object,
               name: Callable[[object], str], peer_call: Callable[[], object] | None, iters: int) -> str:
    """One line of a config sweep (scripts/sweep_*.py): each (config, launch) pair's kernel time, the
    heuristic's ``chosen`` config starred, then DeepGEMM's time where ``peer_call`` is given."""
    cells = [f"{'*' if config == chosen else ''}{name(config)}:{kernel_time_us(launch, iters=iters):.1f}"
             for config, launch in plans]
    if peer_call is not None:
        cells.append(f"DeepGEMM:{kernel_time_us(peer_call, iters=iters):.1f}")
    return f"{label} | {' '.join(cells)}"


def deep_gemm():
    """The DeepGEMM module when it imports (its columns are left out otherwise)."""
    return _import_deep_gemm()


@functools.cache
def _import_deep_gemm():
    try:
        import deep_gemm as module
    except Exception as error:  # not installed, or built for another torch: the bench runs without it
        print(f"DeepGEMM not importable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
              "its columns are left out")
        return None
    return module


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
    deepgemm_us: float | None = None
    vs_deepgemm: float | None = None  # DeepGEMM's time over ours
    deepgemm_diff: float | None = None


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
    row = GemmRow(m, n, k, t_ours, 2 * m * n * k / t_ours / 1e6, bytes_moved / t_ours / 1e6, t_cublas,
                  (t_cublas / t_ours) if t_cublas else None, t_unscaled, t_bf16,
                  api.calc_diff(d.float(), ref), api.calc_diff(d.float(), exact))
    dg = deep_gemm()
    if dg is not None:
        sfa_dg = dg.get_mn_major_tma_aligned_tensor(sfa)
        d_dg = torch.empty_like(d)
        row.deepgemm_us = kernel_time_us(lambda: dg.fp8_gemm_nt((a, sfa_dg), (b, sfb), d_dg), iters)
        row.vs_deepgemm = row.deepgemm_us / t_ours
        row.deepgemm_diff = api.calc_diff(d_dg.float(), ref)
    return row


def bench_fp8_gemm(ms=FP8_GEMM_MS, nks=FP8_GEMM_NK, iters: int = 30) -> list[GemmRow]:
    return [bench_fp8_gemm_shape(m, n, k, iters) for m in ms for n, k in nks]


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec`` ("[>]width.precisionf"), or "n/a" right-aligned in the same width."""
    if value is None:
        return format("n/a", ">" + spec.lstrip(">").split(".")[0])
    return format(value, spec)


def _summary(label: str, ratios: list[float | None]) -> None:
    """Geometric mean and least of the ratios that exist."""
    ratios = [r for r in ratios if r]
    if ratios:
        print(f"{label}: geometric mean {statistics.geometric_mean(ratios):.3f}, least {min(ratios):.3f}")


def print_gemm_table(title: str, rows: list[GemmRow]) -> None:
    print(f"\n{title}")
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'us':>8} {'TFLOPS':>7} {'TB/s':>5} | {'DeepGEMM us':>11} {'x':>5} | "
          f"{'cuBLASLt us':>11} {'x':>5} | {'unscaled us':>11} {'TFLOPS':>7} | {'bf16 us':>8} | {'diff':>8}")
    for r in rows:
        unscaled_tflops = 2 * r.m * r.n * r.k / r.unscaled_us / 1e6
        print(f"{r.m:>5} {r.n:>6} {r.k:>6} | {r.moegemm_us:>8.1f} {r.tflops:>7.0f} {r.tbps:>5.2f} | "
              f"{_fmt(r.deepgemm_us, '>11.1f')} {_fmt(r.vs_deepgemm, '>5.3f')} | "
              f"{_fmt(r.cublaslt_us, '>11.1f')} {_fmt(r.speedup, '>5.2f')} | {r.unscaled_us:>11.1f} "
              f"{unscaled_tflops:>7.0f} | {r.bf16_us:>8.1f} | {r.diff_dequant:>8.1e}")
    large = [r for r in rows if r.m >= 4096]
    small = [r for r in rows if r.m <= 128]
    _summary("DeepGEMM's time over ours at M >= 4096", [r.vs_deepgemm for r in large])
    _summary("DeepGEMM's time over ours at M <= 128", [r.vs_deepgemm for r in small])
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
class TransposeRow:
    shape: tuple[int, ...]
    kernel_us: float
    kernel_tbps: float
    torch_us: float  # x.mT.contiguous() on the same bytes
    torch_tbps: float


def bench_transpose(shapes=((7168, 2048), (2048, 7168), (7168, 16384), (24576, 1536), (8, 4096, 7168)),
                    iters: int = 30) -> list[TransposeRow]:
    """transpose_fp8's kernel beside torch's strided copy, checked bit for bit; bytes = read + written."""
    from .kernels import fp8_transpose

    rows = []
    for shape in shapes:
        x = torch.randint(0, 126, shape, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
        if not torch.equal(fp8_transpose.transpose(x).view(torch.uint8), x.mT.contiguous().view(torch.uint8)):
            raise RuntimeError(f"transpose_fp8 {shape}: the kernel and torch disagree")
        t_kernel = kernel_time_us(functools.partial(fp8_transpose.transpose, x), iters)
        t_torch = kernel_time_us(lambda x=x: x.view(torch.uint8).mT.contiguous(), iters)
        traffic = 2 * x.numel()
        rows.append(TransposeRow(shape, t_kernel, traffic / t_kernel / 1e6, t_torch, traffic / t_torch / 1e6))
    return rows


def print_transpose_table(rows: list[TransposeRow], copy_tbps: float) -> None:
    print(f"\ntranspose_fp8, TB/s of bytes read plus written (device-to-device copy: {copy_tbps:.2f} TB/s)")
    print(f"{'shape':>16} | {'kernel us':>9} {'TB/s':>5} | {'torch us':>8} {'TB/s':>5}")
    for r in rows:
        shape = "x".join(map(str, r.shape))
        print(f"{shape:>16} | {r.kernel_us:9.1f} {r.kernel_tbps:5.2f} | {r.torch_us:8.1f} {r.torch_tbps:5.2f}")


@dataclass
class GroupedRow:
    layout: str
    groups: int
    m_per_group: int  # the mean rows per expert (expected_m)
    n: int
    k: int
    rows: int  # rows of all experts together
    moegemm_us: float
    tflops: float
    tbps: float
    cublaslt_loop_us: float | None
    speedup: float | None
    unscaled_loop_us: float
    diff_dequant: float
    deepgemm_us: float | None = None
    vs_deepgemm: float | None = None
    deepgemm_diff: float | None = None


# (experts, mean rows per expert, N, K); the counts vary per expert as routing makes them.
GROUPED_CONTIGUOUS = [(g, 32768 // g, n, k) for g in (4, 8, 16, 32) for n, k in ((4096, 7168), (7168, 2048))]
GROUPED_MASKED = [(g, m, n, k) for g in (8, 32) for m in (32, 128, 192, 256) for n, k in ((4096, 7168), (7168, 2048))]
ROUTING_SPREAD = (0.7, 1.3)  # an expert's count over the mean, drawn uniformly
ROUTING_SEED = 0


def routing_counts(num_groups: int, mean: int, seed: int = ROUTING_SEED) -> list[int]:
    """Rows per expert drawn uniformly in ROUTING_SPREAD times ``mean`` (a fixed seed: every run
    and library sees the same counts)."""
    generator = torch.Generator().manual_seed(seed)
    low, high = ROUTING_SPREAD
    factors = low + (high - low) * torch.rand(num_groups, generator=generator)
    return [round(mean * float(f)) for f in factors]


def _grouped_inputs(counts: list[int], n: int, k: int, masked: bool, alignment: int = 128):
    """A and its scales (masked: [G, max_M, ...], max_M the largest count rounded up to 64;
    contiguous: the experts' rows back to back, each segment padded to ``alignment``), B, SFB, the
    int32 layout (masked_m, or each row's expert with -1 for padding) and a mask of the real rows."""
    num_groups = len(counts)
    if masked:
        max_m = -(-max(counts) // 64) * 64
        rows = num_groups * max_m
        real = torch.zeros(num_groups, max_m, dtype=torch.bool, device="cuda")
        for g, count in enumerate(counts):
            real[g, :count] = True
        layout = torch.tensor(counts, dtype=torch.int32, device="cuda")
    else:
        segments = [-(-c // alignment) * alignment for c in counts]
        rows = sum(segments)
        ids = torch.full((rows,), -1, dtype=torch.int32)
        start = 0
        for g, (count, segment) in enumerate(zip(counts, segments, strict=True)):
            ids[start:start + count] = g
            start += segment
        layout = ids.cuda()
        real = layout >= 0
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    a, sfa = api.per_token_cast_to_fp8(x)
    b = torch.empty(num_groups, n, k, device="cuda", dtype=torch.float8_e4m3fn)
    sfb = torch.empty(num_groups, -(-n // 128), -(-k // 128), device="cuda")
    for g in range(num_groups):
        b[g], sfb[g] = api.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    if masked:
        a, sfa = a.view(num_groups, max_m, k), sfa.view(num_groups, max_m, -1)
    return a, sfa, b, sfb, layout, real


def _expert_rows(t: torch.Tensor, counts: list[int], g: int, alignment: int = 128) -> torch.Tensor:
    """Expert ``g``'s real rows of A or of its scales ([G, max_M, ...] masked, contiguous otherwise)."""
    if t.dim() == 3:
        return t[g, :counts[g]]
    start = sum(-(-c // alignment) * alignment for c in counts[:g])
    return t[start:start + counts[g]]


def _cublaslt_loop(a, sfa, b, sfb, counts: list[int]):
    """One cuBLASLt blockwise call per expert with rows, scale layouts prepared outside the timing."""
    calls = []
    for g, count in enumerate(counts):
        if count == 0:
            continue
        call, _ = _cublaslt_blockwise(_expert_rows(a, counts, g), _expert_rows(sfa, counts, g), b[g], sfb[g])
        if call is None:
            return None
        calls.append(call)
    return lambda: [call() for call in calls]


def _unscaled_loop(a, b, counts: list[int]):
    """One cuBLAS call per expert on the same FP8 operands with per-tensor scales (the unscaled bound)."""
    calls = [_cublas_per_tensor(_expert_rows(a, counts, g), b[g]) for g, count in enumerate(counts) if count]
    return lambda: [call() for call in calls]


def bench_grouped_shape(layout: str, num_groups: int, m: int, n: int, k: int, iters: int = 20) -> GroupedRow:
    from . import reference

    masked = layout == "masked"
    counts = routing_counts(num_groups, m)
    a, sfa, b, sfb, groups, real = _grouped_inputs(counts, n, k, masked)
    sfa_required = api.get_mn_major_tma_aligned_tensor(sfa)
    d = torch.empty(*a.shape[:-1], n, device="cuda", dtype=torch.bfloat16)
    ref = torch.zeros(d.shape, device="cuda")
    if masked:
        run = functools.partial(api.m_grouped_fp8_gemm_nt_masked, (a, sfa_required), (b, sfb), d, groups, m)
        reference.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), ref, groups, m)
    else:
        run = functools.partial(api.m_grouped_fp8_gemm_nt_contiguous, (a, sfa_required), (b, sfb), d, groups)
        reference.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), ref, groups)
    t_ours = kernel_time_us(run, iters)
    diff = api.calc_diff(d.float()[real], ref[real])
    rows = sum(counts)
    bytes_moved = rows * k + b.numel() + 4 * (rows * sfa.shape[-1] + sfb.numel()) + 2 * rows * n
    row = GroupedRow(layout, num_groups, m, n, k, rows, t_ours, 2 * rows * n * k / t_ours / 1e6,
                     bytes_moved / t_ours / 1e6, None, None, 0.0, diff)
    dg = deep_gemm()
    if dg is not None:
        sfa_dg = dg.get_mn_major_tma_aligned_tensor(sfa)
        d_dg = torch.empty_like(d)
        if masked:
            call = functools.partial(dg.m_grouped_fp8_gemm_nt_masked, (a, sfa_dg), (b, sfb), d_dg, groups, m)
        else:
            call = functools.partial(dg.m_grouped_fp8_gemm_nt_contiguous, (a, sfa_dg), (b, sfb), d_dg, groups)
        row.deepgemm_us = kernel_time_us(call, iters)
        row.vs_deepgemm = row.deepgemm_us / t_ours
        row.deepgemm_diff = api.calc_diff(d_dg.float()[real], ref[real])
    del ref
    cublas = _cublaslt_loop(a, sfa, b, sfb, counts)
    row.cublaslt_loop_us = kernel_time_us(cublas, iters) if cublas else None
    row.speedup = (row.cublaslt_loop_us / t_ours) if row.cublaslt_loop_us else None
    row.unscaled_loop_us = kernel_time_us(_unscaled_loop(a, b, counts), iters)
    return row


def bench_grouped(iters: int = 20) -> list[GroupedRow]:
    return ([bench_grouped_shape("contiguous", *shape, iters=iters) for shape in GROUPED_CONTIGUOUS]
            + [bench_grouped_shape("masked", *shape, iters=iters) for shape in GROUPED_MASKED])


def print_grouped_table(rows: list[GroupedRow]) -> None:
    low, high = ROUTING_SPREAD
    print(f"\nMoE grouped FP8 GEMMs (BF16 out), rows per expert drawn uniformly in {low}-{high}x the mean "
          f"(seed {ROUTING_SEED}), beside DeepGEMM, one cuBLASLt blockwise call per expert "
          "(torch._scaled_grouped_mm has no 1x128/128x128 blockwise scaling) and one unscaled cuBLAS call "
          "(per-tensor scales) per expert")
    print(f"{'layout':>10} {'G':>3} {'M/G':>5} {'N':>6} {'K':>6} {'rows':>6} | {'us':>8} {'TFLOPS':>7} {'TB/s':>5} | "
          f"{'DeepGEMM us':>11} {'x':>5} | {'cuBLASLt loop us':>16} {'x':>5} | {'unscaled loop us':>16} | "
          f"{'diff':>8}")
    for r in rows:
        print(f"{r.layout:>10} {r.groups:3d} {r.m_per_group:5d} {r.n:6d} {r.k:6d} {r.rows:6d} | {r.moegemm_us:8.1f} "
              f"{r.tflops:7.0f} {r.tbps:5.2f} | {_fmt(r.deepgemm_us, '11.1f')} {_fmt(r.vs_deepgemm, '5.3f')} | "
              f"{_fmt(r.cublaslt_loop_us, '16.1f')} {_fmt(r.speedup, '5.2f')} | {r.unscaled_loop_us:16.1f} | "
              f"{r.diff_dequant:8.1e}")
    for layout in ("contiguous", "masked"):
        _summary(f"DeepGEMM's time over ours, {layout}", [r.vs_deepgemm for r in rows if r.layout == layout])


@dataclass
class Bf16Row:
    op: str  # a dense layout (nt, nn, tn, tt) or a grouped form (contiguous, masked)
    groups: int
    m: int  # M, or the mean rows per expert
    n: int
    k: int
    moegemm_us: float
    tflops: float
    diff: float  # against the FP32 product
    cublas_us: float  # torch.matmul, one call per expert for the grouped forms
    vs_cublas: float
    grouped_mm_us: float | None = None  # torch._grouped_mm (contiguous only)
    vs_grouped_mm: float | None = None
    deepgemm_us: float | None = None
    vs_deepgemm: float | None = None


BF16_LAYOUTS = ("nt", "nn", "tn", "tt")
# (experts, mean rows per expert, N, K): 1k-8k rows per expert, then 256 or fewer over 32-128 experts.
BF16_GROUPED_CONTIGUOUS = ([(g, 32768 // g, n, k) for g in (4, 8, 16, 32) for n, k in ((4096, 7168), (7168, 2048))]
                           + [(g, m, 4096, 7168) for g in (32, 128) for m in (64, 256)])
BF16_GROUPED_MASKED = [(g, m, n, k) for g in (8, 32) for m in (32, 256) for n, k in ((4096, 7168), (7168, 2048))]


def _bf16_row(op: str, groups: int, m: int, n: int, k: int, rows: int, ours: Callable[[], object],
              diff: Callable[[], float], cublas: Callable[[], object], iters: int) -> Bf16Row:
    """Time ours and cuBLAS; ``diff`` measures our output (after the timed calls) against FP32."""
    t_ours = kernel_time_us(ours, iters)
    t_cublas = kernel_time_us(cublas, iters)
    return Bf16Row(op, groups, m, n, k, t_ours, 2 * rows * n * k / t_ours / 1e6, diff(), t_cublas, t_cublas / t_ours)


def bench_bf16_dense(m: int = 4096, nks=FP8_GEMM_NK, iters: int = 30) -> list[Bf16Row]:
    """The four layouts at M = 4096 beside torch.matmul on the same views (cuBLAS transposes in place)
    and DeepGEMM's function of the same name."""
    rows = []
    for layout in BF16_LAYOUTS:
        for n, k in nks:
            a = torch.randn((m, k) if layout[0] == "n" else (k, m), device="cuda", dtype=torch.bfloat16)
            b = torch.randn((k, n) if layout[1] == "n" else (n, k), device="cuda", dtype=torch.bfloat16)
            a_mk = a if layout[0] == "n" else a.t()
            b_kn = b if layout[1] == "n" else b.t()
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ours = functools.partial(getattr(api, f"bf16_gemm_{layout}"), a, b, d)
            row = _bf16_row(layout, 1, m, n, k, m, ours,
                            lambda d=d, a_mk=a_mk, b_kn=b_kn: api.calc_diff(d.float(), a_mk.float() @ b_kn.float()),
                            lambda a_mk=a_mk, b_kn=b_kn: a_mk @ b_kn, iters)
            dg = deep_gemm()
            if dg is not None and hasattr(dg, f"bf16_gemm_{layout}"):
                d_dg = torch.empty_like(d)
                row.deepgemm_us = kernel_time_us(functools.partial(getattr(dg, f"bf16_gemm_{layout}"), a, b, d_dg),
                                                 iters)
                row.vs_deepgemm = row.deepgemm_us / row.moegemm_us
            rows.append(row)
    return rows


def bench_bf16_grouped(iters: int = 20) -> list[Bf16Row]:
    """The grouped forms with routing counts, beside one torch.matmul per expert, torch._grouped_mm
    (contiguous) and DeepGEMM."""
    rows = []
    for op, shapes in (("contiguous", BF16_GROUPED_CONTIGUOUS), ("masked", BF16_GROUPED_MASKED)):
        for num_groups, mean, n, k in shapes:
            counts = routing_counts(num_groups, mean)
            masked = op == "masked"
            _, _, _, _, layout, real = _grouped_inputs(counts, 128, 128, masked)
            shape = (num_groups, real.shape[1], k) if masked else (real.shape[0], k)
            a = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(num_groups, n, k, device="cuda", dtype=torch.bfloat16)
            d = torch.zeros(*a.shape[:-1], n, device="cuda", dtype=torch.bfloat16)
            experts = [(_expert_rows(a, counts, g), b[g]) for g in range(num_groups) if counts[g]]
            if masked:
                ours = functools.partial(api.m_grouped_bf16_gemm_nt_masked, a, b, d, layout, mean)
            else:
                ours = functools.partial(api.m_grouped_bf16_gemm_nt_contiguous, a, b, d, layout)

            def diff(experts=experts, d=d, counts=counts):
                exact = torch.cat([x.float() @ w.float().t() for x, w in experts])
                got = torch.cat([_expert_rows(d, counts, g) for g in range(len(counts)) if counts[g]])
                return api.calc_diff(got.float(), exact)

            row = _bf16_row(op, num_groups, mean, n, k, sum(counts), ours, diff,
                            lambda experts=experts: [x @ w.t() for x, w in experts], iters)
            if not masked:
                row.grouped_mm_us = _grouped_mm_us(a, b, counts, iters)
                row.vs_grouped_mm = row.grouped_mm_us / row.moegemm_us if row.grouped_mm_us else None
            dg = deep_gemm()
            if dg is not None:
                d_dg = torch.empty_like(d)
                if masked:
                    call = functools.partial(dg.m_grouped_bf16_gemm_nt_masked, a, b, d_dg, layout, mean)
                else:
                    call = functools.partial(dg.m_grouped_bf16_gemm_nt_contiguous, a, b, d_dg, layout)
                row.deepgemm_us = kernel_time_us(call, iters)
                row.vs_deepgemm = row.deepgemm_us / row.moegemm_us
            rows.append(row)
    return rows


# (experts, mean K per expert, M, N): DeepSeek-V3's expert weight gradients, about 32k tokens in all.
BF16_K_GROUPED = [(g, 32768 // g, m, n) for g in (4, 8, 16) for m, n in ((4096, 7168), (7168, 2048))]


def bench_bf16_k_grouped(iters: int = 20) -> list[Bf16Row]:
    """The K-grouped GEMM (D[g] += A_g^T @ B_g in place, FP32) with routing counts, beside one torch.matmul
    per expert (BF16 out: torch has no FP32 out for BF16 inputs) and DeepGEMM. The row's ``m`` is M;
    ``k`` the mean K per expert."""
    rows = []
    for num_groups, mean_k, m, n in BF16_K_GROUPED:
        ks = [align(count, 128) for count in routing_counts(num_groups, mean_k)]
        layout = torch.tensor(ks, device="cuda", dtype=torch.int32)
        a = torch.randn(sum(ks), m, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(sum(ks), n, device="cuda", dtype=torch.bfloat16)
        d = torch.zeros(num_groups, m, n, device="cuda")
        segments = [(a[start - length:start], b[start - length:start])
                    for start, length in zip(itertools.accumulate(ks), ks, strict=True)]
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)  # torch.matmul's out: the inputs' dtype

        def diff(a=a, b=b, d=d, ks=ks, layout=layout, segments=segments):
            d.zero_()
            api.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, d)
            exact = torch.stack([x.float().t() @ y.float() for x, y in segments])
            return api.calc_diff(d, exact)

        row = _bf16_row("k_grouped", num_groups, m, n, mean_k, sum(ks),
                        functools.partial(api.k_grouped_bf16_gemm_tn_contiguous, a, b, d, ks, layout, d), diff,
                        lambda segments=segments, out=out: [torch.matmul(x.t(), y, out=out) for x, y in segments],
                        iters)
        row.tflops = 2 * sum(ks) * m * n / row.moegemm_us / 1e6
        dg = deep_gemm()
        if dg is not None and hasattr(dg, "k_grouped_bf16_gemm_tn_contiguous"):
            d_dg = torch.zeros_like(d)
            row.deepgemm_us = kernel_time_us(
                functools.partial(dg.k_grouped_bf16_gemm_tn_contiguous, a, b, d_dg, ks, layout, d_dg), iters)
            row.vs_deepgemm = row.deepgemm_us / row.moegemm_us
        rows.append(row)
    return rows


# (expression, sizes): DeepSeek's per-head projections (DeepGEMM's einsum tests) and the batch sum.
BF16_EINSUM = [(e, dict(b=b, h=h, r=r, d=dd)) for e in ("bhr,hdr->bhd", "bhd,hdr->bhr")
               for b, h, r, dd in ((128, 128, 512, 128), (4096, 128, 512, 128), (4096, 8, 4096, 1024))] + \
              [("bmk,bnk->mn", dict(b=s, m=m, n=n, k=k)) for s in (4096, 8192) for m, n, k in ((128, 384, 128),
                                                                                          (384, 384, 256))]


def bench_bf16_einsum(iters: int = 20) -> list[Bf16Row]:
    """``einsum`` (BF16 out; the batch sum FP32 D += ...) beside torch.einsum and DeepGEMM. The row's
    groups is the batch (b), m/n/k the product's; op the expression."""
    rows = []
    for expr, sizes in BF16_EINSUM:
        terms = expr.split("->")[0].split(",")
        a, b = (torch.randn(*(sizes[x] for x in term), device="cuda", dtype=torch.bfloat16) for term in terms)
        exact = torch.einsum(expr, a.float(), b.float())
        batch_sum = expr == "bmk,bnk->mn"
        d = torch.zeros(exact.shape, device="cuda", dtype=torch.float32 if batch_sum else torch.bfloat16)
        c = d if batch_sum else None
        if batch_sum:
            m, n, k, products = sizes["m"], sizes["n"], sizes["k"], sizes["b"]
        else:
            m, n, k, products = sizes["b"], d.shape[2], a.shape[2], sizes["h"]

        def diff(expr=expr, a=a, b=b, d=d, c=c, exact=exact):
            d.zero_()
            api.einsum(expr, a, b, d, c)
            return api.calc_diff(d, exact)

        row = _bf16_row(expr, products, m, n, k, products * m, functools.partial(api.einsum, expr, a, b, d, c),
                        diff, lambda expr=expr, a=a, b=b: torch.einsum(expr, a, b), iters)
        dg = deep_gemm()
        if dg is not None and hasattr(dg, "einsum"):
            d_dg = torch.zeros_like(d)
            row.deepgemm_us = kernel_time_us(
                functools.partial(dg.einsum, expr, a, b, d_dg, d_dg if batch_sum else None), iters)
            row.vs_deepgemm = row.deepgemm_us / row.moegemm_us
        rows.append(row)
    return rows


@dataclass
class HcPrenormRow:
    m: int
    n: int
    k: int
    num_splits: int  # 0: None
    moegemm_us: float
    gbps: float  # A, B, D and sqr_sum bytes over the kernel time
    diff: float  # the summed splits' D against the FP32 product
    torch_us: float  # torch: A to FP32, the TF32 matmul, the squares' row sums
    vs_torch: float
    deepgemm_us: float | None = None
    vs_deepgemm: float | None = None


HC_PRENORM = [(m, 24, k, splits) for m in (4096, 8192) for k in (28672, 7168) for splits in (0, 16)]


def bench_hc_prenorm(iters: int = 30) -> list[HcPrenormRow]:
    """tf32_hc_prenorm_gemm beside the torch ops that compute the same (TF32 on) and DeepGEMM."""
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for m, n, k, splits in HC_PRENORM:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k, device="cuda")
            lead = (splits,) if splits else ()
            d, sqr_sum = torch.empty(*lead, m, n, device="cuda"), torch.empty(*lead, m, device="cuda")
            call = functools.partial(api.tf32_hc_prenorm_gemm, a, b, d, sqr_sum, splits or None)
            t_ours = kernel_time_us(call, iters)
            call()
            diff = api.calc_diff(d.sum(0) if splits else d, a.float() @ b.t())

            def with_torch(a=a, b=b):
                x = a.float()
                return x @ b.t(), x.square().sum(-1)

            t_torch = kernel_time_us(with_torch, iters)
            nbytes = a.numel() * 2 + (b.numel() + d.numel() + sqr_sum.numel()) * 4
            row = HcPrenormRow(m, n, k, splits, t_ours, nbytes / t_ours / 1e3, diff, t_torch, t_torch / t_ours)
            dg = deep_gemm()
            if dg is not None and hasattr(dg, "tf32_hc_prenorm_gemm"):
                d_dg, s_dg = torch.empty_like(d), torch.empty_like(sqr_sum)
                row.deepgemm_us = kernel_time_us(
                    functools.partial(dg.tf32_hc_prenorm_gemm, a, b, d_dg, s_dg, num_splits=splits or None), iters)
                row.vs_deepgemm = row.deepgemm_us / t_ours
            rows.append(row)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows


def print_hc_prenorm_table(rows: list[HcPrenormRow]) -> None:
    print("\ntf32_hc_prenorm_gemm (A bf16 [M, K], B fp32 [N, K]): GB/s of A, B, D and sqr_sum against the copy "
          "ceiling; torch = A.float() @ B.T (TF32) and the squares' sums")
    print(f"{'M':>5} {'N':>4} {'K':>6} {'splits':>6} | {'us':>8} {'GB/s':>6} | {'torch us':>8} {'x':>5} | "
          f"{'DeepGEMM us':>11} {'x':>5} | {'diff':>8}")
    for r in rows:
        print(f"{r.m:5d} {r.n:4d} {r.k:6d} {r.num_splits:6d} | {r.moegemm_us:8.1f} {r.gbps:6.0f} | "
              f"{r.torch_us:8.1f} {r.vs_torch:5.2f} | {_fmt(r.deepgemm_us, '11.1f')} {_fmt(r.vs_deepgemm, '5.3f')} | "
              f"{r.diff:8.1e}")
    _summary("DeepGEMM's time over ours, tf32_hc_prenorm_gemm", [r.vs_deepgemm for r in rows])


def _grouped_mm_us(a, b, counts: list[int], iters: int) -> float | None:
    """torch._grouped_mm on the experts' rows packed without padding (its layout), or None where
    torch lacks it or refuses the shapes."""
    packed = torch.cat([_expert_rows(a, counts, g) for g in range(len(counts))])
    offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    b_t = b.transpose(-2, -1)
    try:
        torch._grouped_mm(packed, b_t, offs=offsets)
    except (AttributeError, RuntimeError, TypeError) as error:
        print(f"torch._grouped_mm unavailable: {str(error).splitlines()[0]}")
        return None
    return kernel_time_us(lambda: torch._grouped_mm(packed, b_t, offs=offsets), iters)


def print_bf16_table(rows: list[Bf16Row]) -> None:
    print("\nBF16 GEMMs (BF16 out): dense at M = 4096 in four layouts beside torch.matmul on the same views; "
          "grouped forms (rows per expert drawn as for FP8) beside one torch.matmul per expert and torch._grouped_mm; "
          "k_grouped: FP32 D += A^T @ B per expert, M and N as given, K the mean per expert; einsum: G the batch "
          "(bmk,bnk->mn: FP32 D += ..., beside torch.einsum)")
    print(f"{'op':>12} {'G':>5} {'M':>5} {'N':>6} {'K':>6} | {'us':>8} {'TFLOPS':>7} | {'cuBLAS us':>9} {'x':>5} | "
          f"{'grouped_mm us':>13} {'x':>5} | {'DeepGEMM us':>11} {'x':>5} | {'diff':>8}")
    for r in rows:
        print(f"{r.op:>12} {r.groups:5d} {r.m:5d} {r.n:6d} {r.k:6d} | {r.moegemm_us:8.1f} {r.tflops:7.0f} | "
              f"{r.cublas_us:9.1f} {r.vs_cublas:5.3f} | {_fmt(r.grouped_mm_us, '13.1f')} "
              f"{_fmt(r.vs_grouped_mm, '5.3f')} | {_fmt(r.deepgemm_us, '11.1f')} {_fmt(r.vs_deepgemm, '5.3f')} | "
              f"{r.diff:8.1e}")
    dense = [r for r in rows if r.op in BF16_LAYOUTS]
    _summary("cuBLAS's time over ours, dense", [r.vs_cublas for r in dense])
    _summary("DeepGEMM's time over ours, dense", [r.vs_deepgemm for r in dense])
    large = [r for r in rows if r.op == "contiguous" and r.m >= 1024]
    small = [r for r in rows if r.op == "contiguous" and r.m <= 256]
    _summary("DeepGEMM's time over ours, contiguous, >= 1k rows per expert", [r.vs_deepgemm for r in large])
    _summary("cuBLAS per expert over ours, contiguous, <= 256 rows per expert", [r.vs_cublas for r in small])
    _summary("torch._grouped_mm over ours, contiguous, <= 256 rows per expert", [r.vs_grouped_mm for r in small])
    _summary("DeepGEMM's time over ours, masked", [r.vs_deepgemm for r in rows if r.op == "masked"])
    _summary("DeepGEMM's time over ours, K-grouped", [r.vs_deepgemm for r in rows if r.op == "k_grouped"])
    _summary("DeepGEMM's time over ours, einsum", [r.vs_deepgemm for r in rows if "->" in r.op])


def print_cast_table(rows: list[CastRow]) -> None:
    print("\nFP8 casts (bf16 in), GB/s of bytes read plus written")
    print(f"{'cast':9} {'shape':>11} {'sf':>5} | {'kernel us':>9} {'GB/s':>6} | {'torch us':>8} {'GB/s':>6}")
    for r in rows:
        sf = "ue8m0" if r.ue8m0 else "fp32"
        print(f"{r.cast:9} {r.m:>5}x{r.k:<5} {sf:>5} | {r.kernel_us:9.1f} {r.kernel_gbps:6.0f} | "
              f"{r.torch_us:8.1f} {r.torch_gbps:6.0f}")


@dataclass
class Fp4Row:
    layout: str  # dense, contiguous or masked
    groups: int
    m: int  # dense: M; grouped: the mean rows per expert
    n: int
    k: int
    rows: int
    fp4_us: float
    fp8_us: float
    speedup: float  # the FP8 kernel's time over the FP8 x FP4 kernel's
    read_tbps: float  # the bytes the FP4 kernel reads (A, B, scales) over its time
    copy_share: float  # read_tbps over the measured copy ceiling
    # The most `speedup` the GPU allows here: the FP8 kernel's time over the least time of the FP4
    # kernel's reads at the copy ceiling and of the product's FLOPs at the FP8 ceiling (both measured).
    bound: float
    diff_dequant: float
    diff_fp8: float  # the FP8 kernel's calc_diff against its own reference


FP4_DENSE = [(m, n, k) for m in (1, 64, 128, 4096) for n, k in FP8_GEMM_NK]
FP4_GROUPED = ([("masked", g, m, n, k) for g in (8, 32) for m in (32, 64, 128, 256)
                for n, k in ((4096, 7168), (7168, 2048))]
               + [("contiguous", g, 32768 // g, 4096, 7168) for g in (4, 8, 32)])


def _fp4_weights(lead: tuple[int, ...], n: int, k: int):
    """BF16 weights and their FP4 cast (1x32 UE8M0 scales in the kernels' packed layout)."""
    w = torch.randn(*lead, n, k, device="cuda", dtype=torch.bfloat16)
    b, sfb = api.per_token_cast_to_fp4(w.flatten(0, -2), use_ue8m0=True, gran_k=32)
    b, sfb = b.view(*lead, n, k // 2), sfb.view(*lead, n, -1)
    packed = api.transform_sf_into_required_layout(sfb, n, k, (1, 32), lead[0] if lead else None)
    return w, b, sfb, packed


def bench_fp4_shape(layout: str, groups: int, m: int, n: int, k: int, copy_tbps: float, fp8_tflops: float,
                    iters: int = 20) -> Fp4Row:
    """The FP8 x FP4 kernel beside the FP8 kernel on the same activations and (FP8-cast) weights."""
    from . import reference

    if layout == "dense":
        counts = [m]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a, sfa = api.per_token_cast_to_fp8(x)
        w, b4, sfb4, packed = _fp4_weights((), n, k)
        b8, sfb8 = api.per_block_cast_to_fp8(w)
        real = torch.ones(m, dtype=torch.bool, device="cuda")
    else:
        counts = routing_counts(groups, m)
        a, sfa, b8, sfb8, groups_t, real = _grouped_inputs(counts, n, k, layout == "masked")
        w, b4, sfb4, packed = _fp4_weights((groups,), n, k)
    sfa_required = api.get_mn_major_tma_aligned_tensor(sfa)
    d4 = torch.empty(*a.shape[:-1], n, device="cuda", dtype=torch.bfloat16)
    d8 = torch.empty_like(d4)
    ref = torch.zeros(d4.shape, device="cuda")
    if layout == "dense":
        fp4 = functools.partial(api.fp8_fp4_gemm_nt, (a, sfa_required), (b4, packed), d4)
        fp8 = functools.partial(api.fp8_gemm_nt, (a, sfa_required), (b8, sfb8), d8)
        reference.fp8_fp4_gemm_nt((a, sfa), (b4, sfb4), ref)
    elif layout == "masked":
        fp4 = functools.partial(api.m_grouped_fp8_fp4_gemm_nt_masked, (a, sfa_required), (b4, packed), d4, groups_t, m)
        fp8 = functools.partial(api.m_grouped_fp8_gemm_nt_masked, (a, sfa_required), (b8, sfb8), d8, groups_t, m)
        reference.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), (b4, sfb4), ref, groups_t, m)
    else:
        fp4 = functools.partial(api.m_grouped_fp8_fp4_gemm_nt_contiguous, (a, sfa_required), (b4, packed), d4,
                                groups_t)
        fp8 = functools.partial(api.m_grouped_fp8_gemm_nt_contiguous, (a, sfa_required), (b8, sfb8), d8, groups_t)
        reference.m_grouped_fp8_fp4_gemm_nt_contiguous((a, sfa), (b4, sfb4), ref, groups_t)
    t4, t8 = kernel_time_us(fp4, iters), kernel_time_us(fp8, iters)
    diff4 = api.calc_diff(d4.float()[real], ref[real])
    ref.zero_()
    if layout == "dense":
        reference.fp8_gemm_nt((a, sfa), (b8, sfb8), ref)
    elif layout == "masked":
        reference.m_grouped_fp8_gemm_nt_masked((a, sfa), (b8, sfb8), ref, groups_t, m)
    else:
        reference.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b8, sfb8), ref, groups_t)
    diff8 = api.calc_diff(d8.float()[real], ref[real])
    rows = sum(counts)
    read = rows * (k + 4 * sfa.shape[-1]) + b4.numel() + 4 * packed.numel()
    read_tbps = read / t4 / 1e6
    least_us = max(read / copy_tbps / 1e6, 2 * rows * n * k / fp8_tflops / 1e6)
    return Fp4Row(layout, groups, m, n, k, rows, t4, t8, t8 / t4, read_tbps, read_tbps / copy_tbps, t8 / least_us,
                  diff4, diff8)


def bench_fp4(copy_tbps: float, fp8_tflops: float, iters: int = 20) -> list[Fp4Row]:
    """Every FP4 shape, each row printed as soon as it is measured (the table's rows)."""
    print("\nFP8 x FP4 (e2m1 B, 1x32 UE8M0 scales) beside the FP8 kernel on the same shapes (BF16 out); "
          "read TB/s: A, B and scales read by the FP4 kernel over its time; bound: the most x fp8 the measured "
          "ceilings allow (the FP4 reads at the copy ceiling, the FLOPs at the FP8 one)")
    print(f"{'layout':>10} {'G':>3} {'M':>5} {'N':>6} {'K':>6} | {'fp4 us':>8} {'fp8 us':>8} {'x fp8':>6} "
          f"{'bound':>6} | {'read TB/s':>9} {'of copy':>7} | {'diff':>8} {'fp8 diff':>8}")
    rows = []
    for shape in [("dense", 1, *shape) for shape in FP4_DENSE] + FP4_GROUPED:
        r = bench_fp4_shape(*shape, copy_tbps=copy_tbps, fp8_tflops=fp8_tflops, iters=iters)
        print(f"{r.layout:>10} {r.groups:>3} {r.m:>5} {r.n:>6} {r.k:>6} | {r.fp4_us:>8.1f} {r.fp8_us:>8.1f} "
              f"{r.speedup:>6.2f} {r.bound:>6.2f} | {r.read_tbps:>9.2f} {r.copy_share:>7.1%} | "
              f"{r.diff_dequant:>8.1e} {r.diff_fp8:>8.1e}")
        rows.append(r)
    return rows


def print_fp4_summary(rows: list[Fp4Row]) -> None:
    decode = [r for r in rows if r.m <= 256 and r.layout != "contiguous"]
    if decode:
        speedups = [r.speedup for r in decode]
        print(f"decode (M <= 128 dense, masked): geometric mean {statistics.geometric_mean(speedups):.2f}x the FP8 "
              f"kernel; least {min(speedups):.2f}x; rows whose bound is under 1.7x: "
              f"{sum(r.bound < 1.7 for r in decode)} of {len(decode)}")


@dataclass
class MoeRow:
    mma_type: str
    tokens: int
    experts: int
    touched: int  # experts that receive a token
    unfused_us: float  # every kernel of moegemm's unfused pipeline (fp8_fp4_mega_moe's default today)
    weight_tbps: float  # the touched experts' weight bytes over unfused_us
    copy_share: float
    fused_us: float  # the one fused kernel (MOEGEMM_FUSED_MOE=1)
    fused_tbps: float
    speedup: float  # unfused_us / fused_us
    diff: float  # calc_diff of the fused kernel's y against the unfused pipeline's


# DeepSeek-style layers: hidden 7168, intermediate 3072, top-6 (issue 24's shapes).
MOE_LAYERS = [(tokens, experts) for tokens in (128, 512, 4096, 8192) for experts in (32, 384)]
MOE_HIDDEN, MOE_INTERMEDIATE, MOE_TOPK = 7168, 3072, 6


def _random_fp4(experts: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e2m1 codes with random 1x32 UE8M0 scales (2^-8 to 2^-1), in the layout the calls take."""
    packed = torch.randint(-128, 128, (experts, n, k // 2), dtype=torch.int8, device="cuda")
    sf = torch.exp2(-torch.randint(1, 9, (experts, n, k // 32), device="cuda").float())
    return packed, api.transform_sf_into_required_layout(sf, n, k, (1, 32), experts)


def _fill_moe_buffer(buffer, tokens: int, experts: int) -> torch.Tensor:
    """Random FP8 tokens and top-k routing (of random scores) into ``buffer``'s first ``tokens`` rows;
    returns the experts picked."""
    x = torch.randn(tokens, MOE_HIDDEN, device="cuda", dtype=torch.bfloat16)
    x, sf = api.per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
    buffer.x[:tokens].copy_(x)
    buffer.x_sf[:tokens].copy_(sf)
    weights, idx = torch.topk(torch.randn(tokens, experts, device="cuda"), MOE_TOPK, dim=-1)
    buffer.topk_idx[:tokens].copy_(idx)
    buffer.topk_weights[:tokens].copy_(weights.softmax(-1))
    return idx


def bench_moe_layer(copy_tbps: float, iters: int = 10) -> list[MoeRow]:
    """The MoE layer (FP8 tokens, FP4 weights) through moegemm's unfused pipeline, all its kernels timed
    together, and through the one fused kernel, on random routing (top-6 of random scores); TB/s over
    the weights of the experts touched."""
    from .ops import mega_moe

    print(f"\nMoE layer, fp8 x fp4 (hidden {MOE_HIDDEN}, intermediate {MOE_INTERMEDIATE}, top-{MOE_TOPK}): moegemm's "
          f"unfused pipeline (dispatch, grouped GEMM, SwiGLU + FP8 cast, grouped GEMM, combine), all its kernels, "
          f"and the fused kernel; weight TB/s: the touched experts' FP4 weights and scales over the time; x: "
          f"unfused over fused; diff: calc_diff of their outputs")
    print(f"{'tokens':>6} {'experts':>7} {'touched':>7} | {'unfused us':>10} {'TB/s':>5} {'of copy':>7} | "
          f"{'fused us':>9} {'TB/s':>5} {'of copy':>7} | {'x':>5} {'diff':>8}")
    rows = []
    for experts in sorted({e for _, e in MOE_LAYERS}):
        l1 = _random_fp4(experts, 2 * MOE_INTERMEDIATE, MOE_HIDDEN)
        l2 = _random_fp4(experts, MOE_HIDDEN, MOE_INTERMEDIATE)
        per_expert = sum(t[0].numel() + 4 * t[1].numel() for t in (l1, l2)) // experts
        for tokens in sorted(t for t, e in MOE_LAYERS if e == experts):
            buffer = api.get_symm_buffer_for_mega_moe(None, experts, tokens, MOE_TOPK, MOE_HIDDEN, MOE_INTERMEDIATE)
            idx = _fill_moe_buffer(buffer, tokens, experts)
            touched = int(idx.unique().numel())
            times, outputs = [], []
            for fused in (False, True):
                y = torch.empty(tokens, MOE_HIDDEN, device="cuda", dtype=torch.bfloat16)
                times.append(kernel_time_us(functools.partial(mega_moe._run, y, l1, l2, buffer, "fp8xfp4", None,
                                                              "swiglu", None, fused=fused), iters))
                outputs.append(y)
            (us, fused_us), tbps = times, [touched * per_expert / t / 1e6 for t in times]
            row = MoeRow("fp8xfp4", tokens, experts, touched, us, tbps[0], tbps[0] / copy_tbps, fused_us, tbps[1],
                         us / fused_us, api.calc_diff(outputs[1].float(), outputs[0].float()))
            print(f"{tokens:>6} {experts:>7} {touched:>7} | {us:>10.1f} {tbps[0]:>5.2f} {row.copy_share:>7.1%} | "
                  f"{fused_us:>9.1f} {tbps[1]:>5.2f} {tbps[1] / copy_tbps:>7.1%} | {row.speedup:>5.2f} "
                  f"{row.diff:>8.1e}")
            rows.append(row)
            buffer.destroy()
        del l1, l2
        torch.cuda.empty_cache()
    return rows


@dataclass
class MoeRanksRow:
    ranks: int
    tokens: int  # a rank's
    experts: int
    symmetric_us: float  # the slowest rank's call, the exchange through symmetric memory
    all_to_all_us: float  # the same with the all_to_all_single baseline
    speedup: float  # all_to_all_us / symmetric_us
    equal: bool  # both exchanges' outputs bit for bit the same on every rank
    fused_us: float  # the fused kernel, which moves the tokens and outputs itself
    fused_speedup: float  # all_to_all_us / fused_us (issue 27's target: 1.3)
    fused_diff: float  # the largest calc_diff of its outputs against the symmetric exchange's, over the ranks


# Issue 27's layers: hidden 7168, intermediate 3072, top-6, tokens a rank (those whose experts split
# evenly over the ranks run).
MOE_RANKS_LAYERS = [(tokens, experts) for tokens in (128, 4096) for experts in (256, 384)]


def _moe_ranks_worker(rank: int, num_ranks: int, init_file: str, results, iters: int) -> None:
    """One GPU's rank: each layer's call under both exchanges, timed with events (a barrier before
    each call lines the ranks up); rank 0 puts the rows into ``results``."""
    import torch.distributed as dist

    from .ops import mega_moe

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        for tokens, experts in MOE_RANKS_LAYERS:
            if experts % num_ranks:
                continue
            local = experts // num_ranks
            l1 = _random_fp4(local, 2 * MOE_INTERMEDIATE, MOE_HIDDEN)
            l2 = _random_fp4(local, MOE_HIDDEN, MOE_INTERMEDIATE)
            buffer = api.get_symm_buffer_for_mega_moe(dist.group.WORLD, experts, tokens, MOE_TOPK, MOE_HIDDEN,
                                                      MOE_INTERMEDIATE)
            torch.manual_seed(rank)
            _fill_moe_buffer(buffer, tokens, experts)
            outputs, times = {}, {}
            variants = {"symmetric": ("symmetric", False), "all_to_all": ("all_to_all", False),
                        "fused": ("symmetric", True)}
            for name, (exchange, fused) in variants.items():
                y = outputs[name] = torch.empty(tokens, MOE_HIDDEN, device="cuda", dtype=torch.bfloat16)
                call = functools.partial(mega_moe._run, y, l1, l2, buffer, "fp8xfp4", None, "swiglu", None,
                                         exchange=exchange, fused=fused)
                call()  # compiles
                samples = []
                for _ in range(iters):
                    dist.barrier()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call()
                    end.record()
                    end.synchronize()
                    samples.append(start.elapsed_time(end) * 1e3)
                times[name] = statistics.median(samples)
            equal = torch.equal(outputs["symmetric"], outputs["all_to_all"])
            diff = testing.calc_diff(outputs["fused"].float(), outputs["symmetric"].float())
            gathered = [None] * num_ranks
            dist.all_gather_object(gathered, (times, equal, diff))
            if rank == 0:
                slowest = {name: max(t[name] for t, _, _ in gathered) for name in variants}
                baseline = slowest["all_to_all"]
                results.put(MoeRanksRow(num_ranks, tokens, experts, slowest["symmetric"], baseline,
                                        baseline / slowest["symmetric"], all(e for _, e, _ in gathered),
                                        slowest["fused"], baseline / slowest["fused"],
                                        max(d for _, _, d in gathered)))
            buffer.destroy()
            del l1, l2
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()


def bench_moe_across_ranks(iters: int = 10) -> list[MoeRanksRow]:
    """The MoE layer across every visible GPU (a process each), FP8 tokens and FP4 weights: the call
    with the exchange through symmetric memory (PyTorch around the unfused layer, and inside the fused
    kernel) beside the all_to_all_single baseline; the slowest
    rank's median time (call to call on the stream, host reads included; no L2 flush: the layers' weights
    are gigabytes)."""
    import tempfile

    import torch.multiprocessing as mp

    num_ranks = torch.cuda.device_count()
    print(f"\nMoE layer across {num_ranks} GPUs, fp8 x fp4 (hidden {MOE_HIDDEN}, intermediate {MOE_INTERMEDIATE}, "
          f"top-{MOE_TOPK}): the exchange through symmetric memory beside the all_to_all_single baseline, both "
          f"around the unfused one-rank layer, and the fused kernel's own exchange; us of the slowest rank; x: "
          f"the baseline over each")
    if num_ranks < 2:
        print(f"(needs two GPUs or more; this machine has {num_ranks})")
        return []
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_moe_ranks_worker, args=(num_ranks, f"{directory}/init", results, iters), nprocs=num_ranks)
    rows = []
    print(f"{'ranks':>5} {'tokens':>6} {'experts':>7} | {'symmetric us':>12} {'all_to_all us':>13} {'x':>6} "
          f"{'equal':>5} | {'fused us':>9} {'x':>6} {'diff':>8}")
    while not results.empty():
        r = results.get()
        print(f"{r.ranks:>5} {r.tokens:>6} {r.experts:>7} | {r.symmetric_us:>12.1f} {r.all_to_all_us:>13.1f} "
              f"{r.speedup:>6.3f} {str(r.equal):>5} | {r.fused_us:>9.1f} {r.fused_speedup:>6.3f} {r.fused_diff:>8.1e}")
        rows.append(r)
    return rows


@dataclass
class BesideDeepGemmRow:
    """One case of an operation timed beside DeepGEMM's: its sizes (the table's columns), our time,
    TFLOPS and difference to the reference on the same FP8 inputs, DeepGEMM's time and its ratio."""

    shape: tuple[int, ...]
    moegemm_us: float
    tflops: float
    diff: float
    deepgemm_us: float | None = None
    vs_deepgemm: float | None = None


def _beside_deepgemm(shape: tuple[int, ...], flops: float, us: float, diff: float,
                     deepgemm_us: float | None) -> BesideDeepGemmRow:
    return BesideDeepGemmRow(shape, us, flops / us / 1e6, diff, deepgemm_us, deepgemm_us and deepgemm_us / us)


def print_beside_deepgemm_table(title: str, columns: tuple[str, ...], rows: list[BesideDeepGemmRow]) -> None:
    """``rows`` under ``title``, the shape in ``columns``, and the summary of DeepGEMM's time over ours."""
    print(f"\n{title}")
    print(" ".join(f"{c:>6}" for c in columns) + f" | {'us':>8} {'TFLOPS':>7} | {'DeepGEMM us':>11} {'x':>5} | "
          f"{'diff':>8}")
    for r in rows:
        print(" ".join(f"{v:6d}" for v in r.shape) + f" | {r.moegemm_us:8.1f} {r.tflops:7.0f} | "
              f"{_fmt(r.deepgemm_us, '11.1f')} {_fmt(r.vs_deepgemm, '5.3f')} | {r.diff:8.1e}")
    _summary(f"DeepGEMM's time over ours, {title.split(' (')[0]}", [r.vs_deepgemm for r in rows])


# Issue 26's weight-gradient shapes (M x N x K, K the tokens): DeepGEMM's three, and two of the forward's.
WGRAD_TITLE = "the 1D1D recipe (fp8_gemm_nt, B scaled per 1x128 like A; D = D + A @ B^T in FP32)"
WGRAD_SHAPES = [(7168, 2112, 4096), (1536, 24576, 4096), (7168, 4096, 4096), (4096, 4096, 7168), (4096, 7168, 16384)]


def bench_fp8_1d1d(iters: int = 10) -> list[BesideDeepGemmRow]:
    """fp8_gemm_nt with the 1D1D recipe (both operands scaled per 1x128 along K), FP32 accumulated into
    D, beside DeepGEMM's with each library's scales in its own layout."""
    rows = []
    for m, n, k in WGRAD_SHAPES:
        a = api.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        b = api.per_token_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        b = (b[0], api.get_mn_major_tma_aligned_tensor(b[1]))
        d = torch.randn(m, n, device="cuda")
        ref = torch.empty_like(d)
        reference.fp8_gemm_nt(a, b, ref, d)
        out = d.clone()
        api.fp8_gemm_nt(a, b, out, out, recipe=(1, 1, 128))
        us = kernel_time_us(functools.partial(api.fp8_gemm_nt, a, b, d, d, recipe=(1, 1, 128)), iters)
        rows.append(_beside_deepgemm((m, n, k), 2 * m * n * k, us, api.calc_diff(out, ref),
                                     _deepgemm_us("fp8_gemm_nt", iters, a, b, d, d, recipe=(1, 1, 128))))
    return rows


# Issue 26's K-grouped cases: experts' K from 0 to 8192 in steps of 128 (a fixed seed).
K_GROUPED_TITLE = "K-grouped (k_grouped_fp8_gemm_nt_contiguous, 1D1D; D += A_g @ B_g^T in FP32)"
K_GROUPED_CASES = [(8, 4096, 7168), (16, 7168, 2048), (32, 4096, 7168)]


def _k_grouped_operand(ks: list[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's K-grouped operand layout: each expert's [rows, k_g] block K-major, back to back, and the
    scales [rows, sum_k / 128] M-major."""
    x_fp8, sf = api.per_channel_cast_to_fp8(torch.randn(sum(ks), rows, device="cuda", dtype=torch.bfloat16))
    blocks, start = [], 0
    for k in ks:
        blocks.append(api.transpose_fp8(x_fp8[start:start + k])[0].reshape(-1))
        start += k
    return torch.cat(blocks), sf.T


def bench_fp8_k_grouped(iters: int = 5) -> list[BesideDeepGemmRow]:
    """k_grouped_fp8_gemm_nt_contiguous (D += A_g @ B_g^T in place) beside DeepGEMM's on the same inputs."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for groups, m, n in K_GROUPED_CASES:
        ks = [128 * int(v) for v in torch.randint(0, 65, (groups,), generator=generator)]
        a, b = _k_grouped_operand(ks, m), _k_grouped_operand(ks, n)
        layout = torch.tensor(ks, dtype=torch.int32, device="cuda")
        c = torch.randn(groups, m, n, device="cuda")
        ref = torch.empty_like(c)
        reference.k_grouped_fp8_gemm_nt_contiguous(a, b, ref, ks, layout, c)
        d = c.clone()
        api.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout, d)
        diff = api.calc_diff(d, ref)
        us = kernel_time_us(functools.partial(api.k_grouped_fp8_gemm_nt_contiguous, a, b, d, ks, layout, d), iters)
        rows.append(_beside_deepgemm((groups, m, n, sum(ks)), 2 * m * n * sum(ks), us, diff, _deepgemm_us(
            "k_grouped_fp8_gemm_nt_contiguous", iters, a, b, d, ks, layout, d, recipe=(1, 1, 128))))
        del a, b, c, d, ref
    return rows


# DeepGEMM's fp8_einsum test shapes (H = 8, R = 4096, D = 1024), and DeepSeek-V3's absorbed output
# projection (128 heads, R = 512, D = 128).
EINSUM_TITLE = 'fp8_einsum ("bhr,hdr->bhd", BF16 out)'
EINSUM_SHAPES = [(b, 8, 4096, 1024) for b in (4, 128, 4096, 8192)] + [(4096, 128, 512, 128)]


def bench_fp8_einsum(iters: int = 10) -> list[BesideDeepGemmRow]:
    """fp8_einsum "bhr,hdr->bhd" beside DeepGEMM's on the same inputs, SFA in the layout both read."""
    rows = []
    for batch, heads, r, d_dim in EINSUM_SHAPES:
        a, sfa = api.per_token_cast_to_fp8(torch.randn(batch * heads, r, device="cuda", dtype=torch.bfloat16))
        sfa = api.get_mn_major_tma_aligned_tensor(sfa.reshape(batch, heads, -1).transpose(0, 1)).transpose(0, 1)
        b, sfb = api.per_block_cast_to_fp8(torch.randn(heads * d_dim, r, device="cuda", dtype=torch.bfloat16))
        a, b = (a.view(batch, heads, r), sfa), (b.view(heads, d_dim, r), sfb.view(heads, d_dim // 128, -1))
        d = torch.empty(batch, heads, d_dim, device="cuda", dtype=torch.bfloat16)
        ref = torch.empty(batch, heads, d_dim, device="cuda")
        reference.fp8_einsum("bhr,hdr->bhd", a, b, ref)
        api.fp8_einsum("bhr,hdr->bhd", a, b, d)
        us = kernel_time_us(functools.partial(api.fp8_einsum, "bhr,hdr->bhd", a, b, d), iters)
        rows.append(_beside_deepgemm((batch, heads, r, d_dim), 2 * batch * heads * r * d_dim, us,
                                     api.calc_diff(d, ref), _deepgemm_us("fp8_einsum", iters, "bhr,hdr->bhd", a, b, d)))
    return rows


@dataclass
class MqaRow:
    heads: int
    head_dim: int
    seq_len: int
    seq_len_kv: int
    pairs: int  # (query, key) pairs inside the ranges
    moegemm_us: float
    tflops: float  # 2 * H * D per pair over the time
    diff: float  # against the reference on the same FP8 inputs, over the pairs of every few queries
    fp4_us: float  # fp8_fp4_mqa_logits on FP4 inputs
    fp4_diff: float
    deepgemm_us: float | None = None
    vs_deepgemm: float | None = None


# Issue 25's shapes: FP32 logits, cleaned; the keys of two chunks of a context-parallel rank.
MQA_SHAPES = [(heads, d, s, s_kv) for heads in (64, 32) for d in (128, 64)
              for s, s_kv in ((2048, 8192), (2048, 65536), (8192, 65536))]


def _fp4_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_fp4_mqa_logits' form of the rows of x [..., D]: packed e2m1 and one int32 of exponents a row."""
    packed, sf = api.per_token_cast_to_fp4(x.reshape(-1, x.shape[-1]), use_ue8m0=True, gran_k=32,
                                           use_packed_ue8m0=True)
    return packed.view(*x.shape[:-1], -1), sf.view(x.shape[:-1])


def _finite_diff(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """calc_diff over the elements where the reference is finite."""
    inside = torch.isfinite(ref)
    return api.calc_diff(logits[inside].double(), ref[inside].double())


def _deepgemm_us(name: str, iters: int, *args: object, **kwargs: object) -> float | None:
    """Kernel time of DeepGEMM's ``name`` on the arguments; None where DeepGEMM does not import, lacks
    it, or refuses them (the error printed)."""
    dg = deep_gemm()
    if dg is None or not hasattr(dg, name):
        return None
    try:
        return kernel_time_us(functools.partial(getattr(dg, name), *args, **kwargs), iters)
    except (RuntimeError, TypeError) as error:
        print(f"DeepGEMM's {name} failed: {str(error).splitlines()[0]}")
        return None


def bench_mqa_logits(iters: int = 10) -> list[MqaRow]:
    """fp8_mqa_logits beside DeepGEMM's on the same inputs, and fp8_fp4_mqa_logits on their FP4 casts."""
    rows = []
    for heads, head_dim, seq_len, seq_len_kv in MQA_SHAPES:
        q = torch.randn(seq_len, heads, head_dim, device="cuda")
        kv = torch.randn(seq_len_kv, head_dim, device="cuda")
        weights = torch.randn(seq_len, heads, device="cuda")
        scales = kv.abs().amax(dim=1) / 448
        q8, kv8 = q.to(torch.float8_e4m3fn), ((kv / scales[:, None]).to(torch.float8_e4m3fn), scales)
        q4, kv4 = _fp4_rows(q), _fp4_rows(kv)
        del q, kv
        half, ranks = seq_len // 2, seq_len_kv // seq_len
        rank = ranks // 3  # DeepGEMM's tests' pick
        ke = torch.cat([torch.arange(half) + rank * half + 1,
                        torch.arange(half) + (2 * ranks - 1 - rank) * half + 1]).to(torch.int32).cuda()
        ks = torch.zeros(seq_len, dtype=torch.int32, device="cuda")
        pairs = int((ke.clamp(max=seq_len_kv) - ks).clamp(min=0).sum())
        call = functools.partial(api.fp8_mqa_logits, q8, kv8, weights, ks, ke)
        call4 = functools.partial(api.fp8_fp4_mqa_logits, q4, kv4, weights, ks, ke)
        us, fp4_us = kernel_time_us(call, iters), kernel_time_us(call4, iters)
        sample = slice(0, seq_len, max(1, seq_len // 256))  # the reference on every few queries
        diff = _finite_diff(call()[sample], reference.fp8_mqa_logits(q8[sample], kv8, weights[sample], ks[sample],
                                                                      ke[sample]))
        fp4_diff = _finite_diff(call4()[sample], reference.fp8_fp4_mqa_logits(
            (q4[0][sample], q4[1][sample]), kv4, weights[sample], ks[sample], ke[sample]))
        row = MqaRow(heads, head_dim, seq_len, seq_len_kv, pairs, us, 2 * heads * head_dim * pairs / us / 1e6, diff,
                     fp4_us, fp4_diff)
        row.deepgemm_us = _deepgemm_us("fp8_mqa_logits", iters, q8, kv8, weights, ks, ke, clean_logits=True)
        row.vs_deepgemm = row.deepgemm_us and row.deepgemm_us / us
        rows.append(row)
        del q8, kv8, q4, kv4
    torch.cuda.empty_cache()
    return rows


def print_mqa_table(rows: list[MqaRow]) -> None:
    print("\nfp8_mqa_logits (FP32 logits, cleaned; two context-parallel chunks of keys): TFLOPS over the pairs "
          "inside the ranges; FP4: fp8_fp4_mqa_logits on the same inputs cast to FP4")
    print(f"{'H':>3} {'D':>4} {'S':>5} {'S_kv':>6} | {'us':>8} {'TFLOPS':>7} | {'DeepGEMM us':>11} {'x':>5} | "
          f"{'FP4 us':>8} {'FP8/FP4':>7} | {'diff':>8} {'FP4 diff':>8}")
    for r in rows:
        print(f"{r.heads:3d} {r.head_dim:4d} {r.seq_len:5d} {r.seq_len_kv:6d} | {r.moegemm_us:8.1f} {r.tflops:7.0f} | "
              f"{_fmt(r.deepgemm_us, '11.1f')} {_fmt(r.vs_deepgemm, '5.3f')} | {r.fp4_us:8.1f} "
              f"{r.moegemm_us / r.fp4_us:7.3f} | {r.diff:8.1e} {r.fp4_diff:8.1e}")
    _summary("DeepGEMM's time over ours, fp8_mqa_logits", [r.vs_deepgemm for r in rows])


@dataclass
class PagedMqaRow:
    batch: int
    next_n: int
    context: int  # mean context length (0.7x to 1.3x across the batch, as DeepGEMM's tests draw them)
    moegemm_us: float
    tbps: float  # the keys' bytes (values and scales), q and the weights, read over the time
    copy_share: float
    fp4_us: float
    fp4_tbps: float
    deepgemm_us: float | None = None
    vs_deepgemm: float | None = None


# Issue 25's decode cases: H = 64, D = 128; at most 32M cached tokens (DeepGEMM's tests' bound).
PAGED_MQA_CASES = [(batch, next_n, context) for batch, context in ((256, 8192), (256, 65536), (4096, 8192))
                   for next_n in (1, 2)]
PAGED_MQA_HEADS, PAGED_MQA_HEAD_DIM = 64, 128


def _random_paged_caches(pages: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 and an FP4 cache of random keys in DeepGEMM's page layouts (made in parts: no
    full-size float temporaries)."""
    fp8 = torch.empty(pages, 64 * (head_dim + 4), dtype=torch.uint8, device="cuda")
    fp4 = torch.empty(pages, 64 * (head_dim // 2 + 4), dtype=torch.uint8, device="cuda")
    for begin in range(0, pages, 4096):
        keys = torch.randn(min(4096, pages - begin), 64, head_dim, device="cuda")
        scales = keys.abs().amax(dim=2) / 448
        values = (keys / scales[..., None]).to(torch.float8_e4m3fn).view(torch.uint8)
        fp8[begin:begin + keys.shape[0]] = torch.cat([values.flatten(1), scales.view(torch.uint8).flatten(1)], 1)
        packed, sf = _fp4_rows(keys)
        fp4[begin:begin + keys.shape[0]] = torch.cat([packed.view(torch.uint8).flatten(1),
                                                       sf.view(torch.uint8).flatten(1)], 1)
    return fp8.view(pages, 64, 1, head_dim + 4), fp4.view(pages, 64, 1, head_dim // 2 + 4)


def random_paged_batch(batch: int, context: int, head_dim: int):
    """A paged decode batch: context lengths 0.7-1.3x ``context`` (int32 [B]), a shuffled block table
    (int32 [B, pages a batch]) and its FP8 and FP4 caches of random keys."""
    lens = torch.randint(int(0.7 * context), int(1.3 * context), (batch,), device="cuda", dtype=torch.int32)
    pages_per_batch = -(-int(lens.max()) // 64)
    table = torch.randperm(batch * pages_per_batch, device="cuda", dtype=torch.int32).view(batch, -1)
    return (lens, table, *_random_paged_caches(batch * pages_per_batch, head_dim))


def bench_paged_mqa_logits(copy_tbps: float, iters: int = 10) -> list[PagedMqaRow]:
    """fp8_paged_mqa_logits beside DeepGEMM's on the same cache, and fp8_fp4_paged_mqa_logits."""
    rows = []
    heads, head_dim = PAGED_MQA_HEADS, PAGED_MQA_HEAD_DIM
    for batch, next_n, context in PAGED_MQA_CASES:
        lens, table, cache8, cache4 = random_paged_batch(batch, context, head_dim)
        pages_per_batch = table.shape[1]
        q = torch.randn(batch, next_n, heads, head_dim, device="cuda")
        q8, q4 = q.to(torch.float8_e4m3fn), _fp4_rows(q)
        del q
        weights = torch.randn(batch * next_n, heads, device="cuda")
        context_lens = lens[:, None].expand(batch, next_n).contiguous()
        schedule = api.get_paged_mqa_logits_metadata(context_lens, 64, api.get_num_sms())
        columns, keys = pages_per_batch * 64, int(lens.sum())
        extra = 4 * weights.numel() + 4 * context_lens.numel() + 4 * table.numel()
        bytes8 = keys * (head_dim + 4) + q8.numel() + extra
        bytes4 = keys * (head_dim // 2 + 4) + q4[0].numel() + 4 * q4[1].numel() + extra
        us = kernel_time_us(functools.partial(api.fp8_paged_mqa_logits, q8, cache8, weights, context_lens, table,
                                              schedule, columns), iters)
        fp4_us = kernel_time_us(functools.partial(api.fp8_fp4_paged_mqa_logits, q4, cache4, weights, context_lens,
                                                  table, schedule, columns), iters)
        row = PagedMqaRow(batch, next_n, context, us, bytes8 / us / 1e6, bytes8 / us / 1e6 / copy_tbps, fp4_us,
                          bytes4 / fp4_us / 1e6)
        dg = deep_gemm()
        if dg is not None and hasattr(dg, "get_paged_mqa_logits_metadata"):
            dg_schedule = dg.get_paged_mqa_logits_metadata(context_lens, 64, api.get_num_sms())
            row.deepgemm_us = _deepgemm_us("fp8_paged_mqa_logits", iters, q8, cache8, weights, context_lens, table,
                                           dg_schedule, columns, clean_logits=False)
            row.vs_deepgemm = row.deepgemm_us and row.deepgemm_us / us
        rows.append(row)
        del cache8, cache4, q8, q4
        torch.cuda.empty_cache()
    return rows


def print_paged_mqa_table(rows: list[PagedMqaRow]) -> None:
    print(f"\nfp8_paged_mqa_logits (H = {PAGED_MQA_HEADS}, D = {PAGED_MQA_HEAD_DIM}, 64-key pages, FP32 logits, "
          "not cleaned): TB/s over the bytes read; FP4: fp8_fp4_paged_mqa_logits on an FP4 cache")
    print(f"{'B':>5} {'next_n':>6} {'context':>7} | {'us':>8} {'TB/s':>6} {'copy':>6} | {'DeepGEMM us':>11} "
          f"{'x':>5} | {'FP4 us':>8} {'TB/s':>6} {'FP8/FP4':>7}")
    for r in rows:
        print(f"{r.batch:5d} {r.next_n:6d} {r.context:7d} | {r.moegemm_us:8.1f} {r.tbps:6.2f} {r.copy_share:6.1%} | "
              f"{_fmt(r.deepgemm_us, '11.1f')} {_fmt(r.vs_deepgemm, '5.3f')} | {r.fp4_us:8.1f} {r.fp4_tbps:6.2f} "
              f"{r.moegemm_us / r.fp4_us:7.3f}")
    _summary("DeepGEMM's time over ours, fp8_paged_mqa_logits", [r.vs_deepgemm for r in rows])


SECTIONS = ("fp8", "bf16", "fp4", "moe", "mqa", "moe_ranks")


def main(json_path: str | None = None, sections: tuple[str, ...] = SECTIONS) -> None:
    """Run the benchmark ``sections``: "fp8" (the FP8 GEMMs with the training forms, casts and transpose),
    "bf16" (the BF16 GEMMs, einsum and the hyper-connection GEMM), "fp4" (the FP8 x FP4 GEMMs beside the
    FP8 ones), "moe" (the MoE layer of DeepGEMM's Mega MoE API), "mqa" (the lightning indexer, dense and
    paged, FP8 and FP4), "moe_ranks" (the MoE layer across every visible GPU, two or more)."""
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
    results = {"device": device, "torch": torch.__version__, "ceilings": limits, "overhead": overhead}
    if "fp8" in sections:
        rows = bench_fp8_gemm()
        print_gemm_table("fp8_gemm_nt (BF16 out) vs cuBLASLt blockwise 1x128/128x128, cuBLAS unscaled (per-tensor "
                         "scales, same FP8 operands) and BF16 torch.matmul", rows)
        grouped = bench_grouped()
        print_grouped_table(grouped)
        casts = bench_casts()
        print_cast_table(casts)
        transposes = bench_transpose()
        print_transpose_table(transposes, limits["copy_tbps"])
        wgrad = bench_fp8_1d1d()
        print_beside_deepgemm_table(WGRAD_TITLE, ("M", "N", "K"), wgrad)
        einsums = bench_fp8_einsum()
        print_beside_deepgemm_table(EINSUM_TITLE, ("B", "H", "R", "D"), einsums)
        k_grouped = bench_fp8_k_grouped()
        print_beside_deepgemm_table(K_GROUPED_TITLE, ("G", "M", "N", "sum K"), k_grouped)
        results.update(fp8_gemm_nt=[asdict(r) for r in rows], grouped=[asdict(r) for r in grouped],
                       casts=[asdict(r) for r in casts], transpose=[asdict(r) for r in transposes],
                       fp8_1d1d=[asdict(r) for r in wgrad], fp8_einsum=[asdict(r) for r in einsums],
                       k_grouped=[asdict(r) for r in k_grouped])
    if "fp4" in sections:
        fp4 = bench_fp4(limits["copy_tbps"], limits["fp8_per_tensor_tflops"])
        print_fp4_summary(fp4)
        results.update(fp4=[asdict(r) for r in fp4])
    if "moe" in sections:
        moe = bench_moe_layer(limits["copy_tbps"])
        results.update(moe=[asdict(r) for r in moe])
    if "moe_ranks" in sections:
        results.update(moe_ranks=[asdict(r) for r in bench_moe_across_ranks()])
    if "mqa" in sections:
        mqa = bench_mqa_logits()
        print_mqa_table(mqa)
        paged = bench_paged_mqa_logits(limits["copy_tbps"])
        print_paged_mqa_table(paged)
        results.update(mqa=[asdict(r) for r in mqa], paged_mqa=[asdict(r) for r in paged])
    if "bf16" in sections:
        bf16 = bench_bf16_dense() + bench_bf16_grouped() + bench_bf16_k_grouped() + bench_bf16_einsum()
        print_bf16_table(bf16)
        hc = bench_hc_prenorm()
        print_hc_prenorm_table(hc)
        results.update(bf16=[asdict(r) for r in bf16], hc_prenorm=[asdict(r) for r in hc])
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
