// A's (1, 32) recipe for the GEMMs that read 1x128 scales; a memory-bound element-wise kernel. e4m3
// values with one UE8M0 scale per 1x32 block become e4m3 values with one float32 scale per 1x128
// block: each 1x32 block's values times 2^(its exponent - the largest of its 128-wide block), rounded
// to nearest even (exact while they stay in e4m3's normal range), the block's scale 2^(largest - 127)
// (0 for exponent 0). Bit-identical to quant._fold_1x32_scales_torch, its reference.
//
// x: e4m3 [G, M, K] (G = 1 for 2-D), element (g, m, k) at byte g * x_group + m * x_row + k; 16-byte
// aligned rows, K % 32 == 0.
// sf: float32 [G, M, ceil(K/32)] powers of two (their exponent bits are read) or, kPacked, int32
// [G, M, ceil(K/128)] four exponents each (byte j: 1x32 block j); element (g, m, j) at 4-byte index
// g * sf_group + m * sf_row + j * sf_col.
// out: x' [G, M, K] contiguous, then at byte sf_offset the scales [G, ceil(K/128), M'] (M rounded up
// to 4), the GEMMs' M-major SFA layout.
// A thread takes 16 values of a row: eight threads a 128-wide block, the first of them storing its
// scale. The values go through f16x2: the power-of-two product is exact there while it can round to
// anything but 0 in e4m3 (f16 keeps 2^-24, e4m3 rounds below 2^-10 to 0).
#pragma once
#include <moegemm/quant.cuh>

namespace moegemm {

struct Fp8FoldParams {
    const u8* x;
    const u8* sf;
    u8* out;
    u64 x_group, x_row;         // bytes
    u64 sf_group, sf_row, sf_col;  // 4-byte elements
    u64 sf_offset;              // multiple of 16
    u32 group_rows, k, num_groups, num_chunks;  // num_chunks: G * M * K / 16
};

template <bool kPacked_>
struct Fp8FoldConfig {
    static constexpr bool kPacked = kPacked_;
    static constexpr u32 kNumThreads = 256;
};

template <class Config>
__device__ __forceinline__ void sm90_fp8_fold(const Fp8FoldParams& p) {
    const u32 index = blockIdx.x * Config::kNumThreads + threadIdx.x;
    if (index >= p.num_chunks) return;
    const u32 chunks_per_row = p.k / 16, num_k_blocks = ceil_div(p.k, 128u);
    const u32 row = index / chunks_per_row, chunk = index - row * chunks_per_row, block = chunk / 8;
    const u32 group = row / p.group_rows, m = row - group * p.group_rows;

    const u32* sf = reinterpret_cast<const u32*>(p.sf) + group * p.sf_group + m * p.sf_row;
    u32 exponents[4];
    if constexpr (Config::kPacked) {
        const u32 word = __ldg(sf + block * p.sf_col);
#pragma unroll
        for (u32 j = 0; j < 4; ++j) exponents[j] = (word >> (8 * j)) & 0xFF;
    } else {
        const u32 num_scales = p.k / 32;
#pragma unroll
        for (u32 j = 0; j < 4; ++j) {
            const u32 column = 4 * block + j;
            exponents[j] = column < num_scales ? (__ldg(sf + column * p.sf_col) >> 23) & 0xFF : 0;
        }
    }
    const u32 top = fold_top(exponents);
    const u32 factor = fold_factor(exponents[chunk % 8 / 2], top);

    u32 values[4];
    ld_global_nc_v4(p.x + group * p.x_group + m * p.x_row + chunk * 16, values);
#pragma unroll
    for (u32 i = 0; i < 4; ++i) values[i] = scale_e4m3x4(values[i], factor);
    *reinterpret_cast<uint4*>(p.out + u64(row) * p.k + chunk * 16) =
        make_uint4(values[0], values[1], values[2], values[3]);
    if (chunk % 8 == 0) {
        const u32 padded_rows = (p.group_rows + 3) & ~3u;
        float* scales = reinterpret_cast<float*>(p.out + p.sf_offset);
        scales[(u64(group) * num_k_blocks + block) * padded_rows + m] = folded_scale(top);
    }
}

}  // namespace moegemm
