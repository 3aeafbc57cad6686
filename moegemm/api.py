"""moegemm's public API, in one place: the operations, the quantisation utilities, the launch
settings and the test and benchmark helpers. ``import moegemm`` exposes exactly these names."""

from __future__ import annotations

from .device import UnsupportedGPUError, get_num_sms, get_pdl, set_num_sms, set_pdl
from .intmath import align, ceil_div, get_tma_aligned_size
from .ops.attention import (
    fp8_fp4_mqa_logits,
    fp8_fp4_paged_mqa_logits,
    fp8_mqa_logits,
    fp8_paged_mqa_logits,
    get_paged_mqa_logits_metadata,
)
from .ops.bf16_gemm import (
    bf16_gemm_nn,
    bf16_gemm_nt,
    bf16_gemm_tn,
    bf16_gemm_tt,
    k_grouped_bf16_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
)
from .ops.dispatch import get_check_groups, register_custom_ops, set_check_groups
from .ops.einsum import einsum, fp8_einsum
from .ops.fp8_fp4_gemm import (
    fp8_fp4_gemm_nt,
    m_grouped_fp8_fp4_gemm_nt_contiguous,
    m_grouped_fp8_fp4_gemm_nt_masked,
)
from .ops.fp8_gemm import (
    fp8_gemm_nt,
    get_mk_alignment_for_contiguous_layout,
    k_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from .ops.hc_prenorm import tf32_hc_prenorm_gemm
from .ops.mega_moe import (
    MegaMoeBuffer,
    bf16_mega_moe,
    fp8_fp4_mega_moe,
    get_symm_buffer_for_mega_moe,
    transform_weights_for_mega_moe,
)
from .quant import (
    cast_back_from_fp4,
    get_mn_major_tma_aligned_tensor,
    pack_fp4,
    pack_ue8m0,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp4,
    per_token_cast_to_fp8,
    transform_sf_into_required_layout,
    transpose_fp8,
    unpack_fp4,
    unpack_ue8m0,
)
from .testing import bench_graph, bench_kernel, calc_diff

register_custom_ops()

__all__ = [
    "MegaMoeBuffer",
    "UnsupportedGPUError",
    "align",
    "bench_graph",
    "bench_kernel",
    "bf16_gemm_nn",
    "bf16_gemm_nt",
    "bf16_gemm_tn",
    "bf16_gemm_tt",
    "bf16_mega_moe",
    "calc_diff",
    "cast_back_from_fp4",
    "ceil_div",
    "einsum",
    "fp8_einsum",
    "fp8_fp4_gemm_nt",
    "fp8_fp4_mega_moe",
    "fp8_fp4_mqa_logits",
    "fp8_fp4_paged_mqa_logits",
    "fp8_gemm_nt",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "get_check_groups",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor",
    "get_num_sms",
    "get_paged_mqa_logits_metadata",
    "get_pdl",
    "get_symm_buffer_for_mega_moe",
    "get_tma_aligned_size",
    "k_grouped_bf16_gemm_tn_contiguous",
    "k_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nn_contiguous",
    "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked",
    "m_grouped_fp8_fp4_gemm_nt_contiguous",
    "m_grouped_fp8_fp4_gemm_nt_masked",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "pack_fp4",
    "pack_ue8m0",
    "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8",
    "per_token_cast_to_fp4",
    "per_token_cast_to_fp8",
    "set_check_groups",
    "set_num_sms",
    "set_pdl",
    "tf32_hc_prenorm_gemm",
    "transform_sf_into_required_layout",
    "transform_weights_for_mega_moe",
    "transpose_fp8",
    "unpack_fp4",
    "unpack_ue8m0",
]
