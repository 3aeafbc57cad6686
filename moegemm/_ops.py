"""torch custom-op registrations of the public operations, so they trace under torch.compile.

No ``from __future__ import annotations`` here: torch infers each op's schema from real annotations.
"""


import torch

from . import api


def _writes_only_d(*args) -> None:
    """The ops' fake (meta) implementation: they return nothing and write only ``d``, in place."""
    return None


@torch.library.custom_op("moegemm::fp8_gemm_nt", mutates_args=("d",))
def fp8_gemm_nt(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
                c: torch.Tensor | None) -> None:
    api._fp8_gemm_nt(a, sfa, b, sfb, d, c)


@torch.library.custom_op("moegemm::m_grouped_fp8_gemm_nt_contiguous", mutates_args=("d",))
def m_grouped_fp8_gemm_nt_contiguous(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                                     d: torch.Tensor, grouped_layout: torch.Tensor, use_psum_layout: bool) -> None:
    api._m_grouped_contiguous(a, sfa, b, sfb, d, grouped_layout, use_psum_layout)


@torch.library.custom_op("moegemm::m_grouped_fp8_gemm_nt_masked", mutates_args=("d",))
def m_grouped_fp8_gemm_nt_masked(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                                 d: torch.Tensor, masked_m: torch.Tensor, expected_m: int) -> None:
    api._m_grouped_masked(a, sfa, b, sfb, d, masked_m, expected_m)


for _op in (fp8_gemm_nt, m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked):
    _op.register_fake(_writes_only_d)
