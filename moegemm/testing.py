"""Accuracy and timing helpers for tests and benchmarks: the one accuracy metric (``calc_diff``) and
kernel timers that flush the L2 before every call."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

# ---- accuracy ------------------------------------------------------------------------------------------


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Normalised difference ``1 - 2*sum(x*y) / sum(x*x + y*y)``, computed in float64.

    0 for identical tensors, 1 against zeros, 2 for ``y == -x``; invariant to scaling both. Returns 0.0
    when both tensors are all zero.
    """
    if x.shape != y.shape:
        raise ValueError(f"calc_diff needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator.item() == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


# ---- timing --------------------------------------------------------------------------------------------

L2_FLUSH_BYTES = 256 << 20
_l2_flush_buffers: dict[int, torch.Tensor] = {}


def _require_cuda(name: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{name} needs a CUDA GPU")


def flush_l2() -> None:
    """Read 256 MB (several times an SM90 GPU's L2) so the timed call finds none of its inputs in L2.
    A read, not a rewrite: a rewrite leaves the L2 full of dirty lines whose write-backs then add to
    the timed call's DRAM traffic (BENCHMARKS.md, 2026-11-25 second session). The profiler-based
    timing in moegemm.bench tells calls apart by this reduction kernel, which no benchmarked operation
    launches."""
    device = torch.cuda.current_device()
    buffer = _l2_flush_buffers.get(device)
    if buffer is None:
        buffer = torch.zeros(L2_FLUSH_BYTES, dtype=torch.int8, device=f"cuda:{device}")
        _l2_flush_buffers[device] = buffer
    buffer.sum(dtype=torch.int32)


def _time_calls(call: Callable[[], object], iters: int, flush: bool) -> float:
    """Median GPU time of ``call`` in microseconds, one event pair per call, flush outside the pair."""
    if iters < 1:
        raise ValueError(f"`iters` must be >= 1, got {iters}")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        if flush:
            flush_l2()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


def bench_kernel(
    fn: Callable[[], object], *, warmup: int = 5, iters: int = 30, flush_l2: bool = True
) -> float:
    """Median time of ``fn()`` on the current stream in microseconds (CUDA events, L2 flushed before each).

    Raises:
        RuntimeError: without a CUDA GPU.
    """
    _require_cuda("bench_kernel")
    for _ in range(warmup):
        fn()
    return _time_calls(fn, iters, flush_l2)


def _capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    # Run once on a side stream first so lazy work (JIT loads, workspace allocation) is not captured.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_graph(fn: Callable[[], object], *, iters: int = 30, flush_l2: bool = True) -> float:
    """Capture ``fn`` into a CUDA graph once and return the median replay time in microseconds.

    Raises:
        RuntimeError: without a CUDA GPU.
    """
    _require_cuda("bench_graph")
    graph = _capture_graph(fn)
    graph.replay()
    return _time_calls(graph.replay, iters, flush_l2)
