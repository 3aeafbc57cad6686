// FP4 weights widened once per call for prefill, where every M block of the GEMM would widen the same
// weights again: e4m3 values with 128x128 FP32 block scales, the FP8 kernel's B (sm90_fp8_gemm.cuh),
// so prefill runs the FP8 kernel itself.
//
// b: packed e2m1 [G * N, K / 2] bytes, row r at byte r * b_row, element 2i in the low nibble of byte
// i; K % 32 == 0.
// sfb: the packed exponents [G * ceil(K/128), N'] int32 MN-major (N' = N rounded up to 4), byte j of
// an element the UE8M0 exponent of 1x32 block j of the 128-wide block.
// out: e4m3 [G * N, K] contiguous, each 1x32 block's values times 2^(its exponent - the 128x128
// block's largest + 6) (fp4.cuh: exact while a block's exponents span at most 14), then at byte
// scale_offset the FP32 block scales [G, ceil(N/128), ceil(K/128)], 2^(largest - 133) (0 for weights
// under 2^-120).
// A CTA takes one 128x128 block, a thread one 1x32 part of it: 16 packed bytes in, 32 e4m3 bytes out.
#pragma once
#include <moegemm/fp4.cuh>

namespace moegemm {

struct Fp4WidenParams {
    const u8* b;
    const u32* sfb;
    u8* out;
    u64 b_row;         // bytes
    u64 scale_offset;  // bytes, a multiple of 16
    u32 n, k, padded_n, n_blocks;  // n_blocks: ceil(N / 128)
};

struct Fp4WidenConfig {
    static constexpr u32 kNumThreads = 512;  // 128 rows by four 1x32 parts
};

template <class Config>
__device__ __forceinline__ void sm90_fp4_widen(const Fp4WidenParams& p) {
    static_assert(Config::kNumThreads == 128 * 4);
    __shared__ u32 block_top;
    const u32 num_k_blocks = ceil_div(p.k, 128u);
    const u32 k_block = blockIdx.x % num_k_blocks, tile = blockIdx.x / num_k_blocks;
    const u32 group = tile / p.n_blocks, column = (tile - group * p.n_blocks) * 128 + threadIdx.x / 4;
    const u32 quarter = threadIdx.x % 4, part = k_block * 4 + quarter;
    const bool valid = column < p.n && part < p.k / 32;
    const u32 exponent =
        valid ? prmt(__ldg(p.sfb + (u64(group) * num_k_blocks + k_block) * p.padded_n + column), 0u, 0x4440u + quarter)
              : 0u;

    if (threadIdx.x == 0) block_top = 0;
    __syncthreads();
    const u32 warp_top = __reduce_max_sync(0xFFFFFFFFu, exponent);
    if (lane_id() == 0) atomicMax(&block_top, warp_top);
    __syncthreads();
    const u32 top = block_top;
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.out + p.scale_offset)[blockIdx.x] = widened_block_scale(top);
    if (!valid) return;

    const u64 row = u64(group) * p.n + column;
    const E2m1Table table = e2m1_table(int(exponent) - int(top) + kE2m1WidenShift);
    u32 packed[4], out[8];
    ld_global_nc_v4(p.b + row * p.b_row + part * 16, packed);
#pragma unroll
    for (u32 w = 0; w < 4; ++w) widen_e2m1x8(packed[w], table, out[2 * w], out[2 * w + 1]);
    uint4* dst = reinterpret_cast<uint4*>(p.out + row * p.k + part * 32);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
}

}  // namespace moegemm
