// FP4 weights widened once per call for the FP8 x FP4 GEMM's prefill form (sm90_fp8_fp4_gemm.cuh with
// kWidenedB): a memory-bound element-wise kernel writing what the GEMM's transform warps would write
// to shared memory, bit for bit, for every M block that reads the weights instead of once per block.
//
// b: packed e2m1 [rows, K / 2] bytes (rows = G * N), row r at byte r * b_row, element 2i in the low
// nibble of byte i; K % 32 == 0.
// sfb: the packed exponents [G * ceil(K/128), N'] int32 MN-major (N' = N rounded up to 4), byte j of
// an element the UE8M0 exponent of 1x32 block j of the 128-wide block.
// out: e4m3 [rows, K] contiguous, each 1x32 block's values times 2^(its exponent - the block's largest
// + 6) (fp4.cuh), then at byte scale_offset the FP32 column scales [G * ceil(K/128), N'] MN-major,
// 2^(largest - 133) (0 for weights under 2^-120), the layout of SFB's exponents.
// A thread takes one 1x32 block: 16 packed bytes in, 32 e4m3 bytes out; the first of a 128-wide
// block's four threads stores its scale.
#pragma once
#include <moegemm/fp4.cuh>

namespace moegemm {

struct Fp4WidenParams {
    const u8* b;
    const u32* sfb;
    u8* out;
    u64 b_row;         // bytes
    u64 scale_offset;  // bytes, a multiple of 16
    u32 n, k, padded_n, num_parts;  // num_parts: rows * K / 32
};

struct Fp4WidenConfig {
    static constexpr u32 kNumThreads = 256;
};

template <class Config>
__device__ __forceinline__ void sm90_fp4_widen(const Fp4WidenParams& p) {
    const u32 index = blockIdx.x * Config::kNumThreads + threadIdx.x;
    if (index >= p.num_parts) return;
    const u32 parts_per_row = p.k / 32, num_k_blocks = ceil_div(p.k, 128u);
    const u32 row = index / parts_per_row, part = index - row * parts_per_row, block = part / 4;
    const u32 group = row / p.n, column = row - group * p.n;
    const u64 scale_index = (u64(group) * num_k_blocks + block) * p.padded_n + column;

    E2m1Table table;
    const float scale = e2m1_block_table(__ldg(p.sfb + scale_index), part % 4, table);
    u32 packed[4], out[8];
    ld_global_nc_v4(p.b + row * p.b_row + part * 16, packed);
#pragma unroll
    for (u32 w = 0; w < 4; ++w) widen_e2m1x8(packed[w], table, out[2 * w], out[2 * w + 1]);
    uint4* dst = reinterpret_cast<uint4*>(p.out + u64(row) * p.k + part * 32);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
    if (part % 4 == 0) reinterpret_cast<float*>(p.out + p.scale_offset)[scale_index] = scale;
}

}  // namespace moegemm
