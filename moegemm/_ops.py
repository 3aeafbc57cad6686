"""torch custom-op registrations of the public operations, so they trace under torch.compile.

No ``from __future__ import annotations`` here: torch infers each op's schema from real annotations.
"""


import torch

from . import api


@torch.library.custom_op("moegemm::fp8_gemm_nt", mutates_args=("d",))
def fp8_gemm_nt(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
                c: torch.Tensor | None) -> None:
    api._fp8_gemm_nt(a, sfa, b, sfb, d, c)


@fp8_gemm_nt.register_fake
def _(a, sfa, b, sfb, d, c) -> None:
    return None
