"""What a GEMM call is, independent of the kernel that runs it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class GemmType(enum.Enum):
    """How A's rows map to products (mirrors ``moegemm::GemmType`` in include/moegemm/sm90/scheduler.cuh).

    NORMAL: one M x N product. CONTIGUOUS: the experts' rows back to back in A, each segment aligned to
    128 rows, a per-row expert id. PSUM: the same rows, cumulative end rows per expert. MASKED: A
    [G, max_M, K], expert g uses its first masked_m[g] rows. K_GROUPED: A [sum_K, M] and B [sum_K, N]
    hold the experts' K segments back to back, D [G, M, N] one product per expert. BATCHED: G products
    of one shape, A [G, M, K], B [G, N, K] and D [G, M, N] as 3-D tensors of any pitches. BATCH_SUM:
    their sum, D [M, N].
    """

    NORMAL = "kNormal"
    CONTIGUOUS = "kContiguous"
    PSUM = "kContiguousPsum"
    MASKED = "kMasked"
    K_GROUPED = "kKGrouped"
    BATCHED = "kBatched"
    BATCH_SUM = "kBatchSum"

    @property
    def grouped(self) -> bool:
        return self is not GemmType.NORMAL


class Major(enum.Enum):
    """Which dimension of an operand is contiguous (mirrors ``moegemm::Major`` in
    include/moegemm/mma/layout.cuh): K (a [M, K] / [N, K] row-major tensor) or M / N (a [K, M] /
    [K, N] one)."""

    K = "kK"
    MN = "kMN"


@dataclass(frozen=True)
class GemmDesc:
    """One GEMM problem as a config heuristic sees it: ``num_groups`` products of ``m`` x ``n`` x ``k``
    (grouped kinds: ``m`` is the rows per expert the caller expects), operand and output dtypes,
    ``D = C + A @ B^T`` when ``accumulate``, and the scale recipe (granularity of A's rows, B's rows
    and K; (1, 128, 128) for FP8 activations x weights)."""

    gemm_type: GemmType
    m: int
    n: int
    k: int
    num_groups: int = 1
    ab_dtype: torch.dtype = torch.float8_e4m3fn
    out_dtype: torch.dtype = torch.bfloat16
    accumulate: bool = False
    recipe: tuple[int, int, int] = (1, 128, 128)

    @property
    def out_bytes(self) -> int:
        return self.out_dtype.itemsize

    @property
    def ab_bytes(self) -> int:
        return self.ab_dtype.itemsize
