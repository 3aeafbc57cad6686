"""moegemm: FP8 and BF16 tensor-core GEMMs for Mixture-of-Experts LLMs on NVIDIA Hopper (SM90).

Kernels are CUDA C++ compiled at run time (nvcc or NVRTC), cached on disk and launched on torch's
current stream. CPU tensors run the pure-PyTorch reference. Importing never initialises CUDA.
"""

__version__ = "0.1.0"

from . import _ops  # noqa: F401  (registers torch.ops.moegemm.*)
from .api import (
    fp8_gemm_nt,
    get_mk_alignment_for_contiguous_layout,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from .checks import UnsupportedGPUError
from .utils import (
    align,
    bench_graph,
    bench_kernel,
    calc_diff,
    ceil_div,
    get_mn_major_tma_aligned_tensor,
    get_num_sms,
    get_pdl,
    get_tma_aligned_size,
    pack_fp4,
    pack_ue8m0,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp8,
    set_num_sms,
    set_pdl,
    transform_sf_into_required_layout,
    unpack_fp4,
    unpack_ue8m0,
)

__all__ = [
    "UnsupportedGPUError",
    "align",
    "bench_graph",
    "bench_kernel",
    "calc_diff",
    "ceil_div",
    "fp8_gemm_nt",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor",
    "get_num_sms",
    "get_pdl",
    "get_tma_aligned_size",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "pack_fp4",
    "pack_ue8m0",
    "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8",
    "per_token_cast_to_fp8",
    "set_num_sms",
    "set_pdl",
    "transform_sf_into_required_layout",
    "unpack_fp4",
    "unpack_ue8m0",
]
