// FP8 (e4m3) quantisation of one block from its absolute maximum, bit for bit as moegemm/quant.py's
// PyTorch path computes it: the casts and the MoE layer's activation share it. Then the fold of four
// 1x32 UE8M0 blocks into one 1x128 block (sm90_fp8_fold.cuh has the numerics), shared by the fold
// kernel and the fused MoE layer.
#pragma once
#include "ptx.cuh"

namespace moegemm {

// The block's scale: amax clamped to >= 1e-4 (NaN passes: the comparison is false for it), divided
// by 448 correctly rounded; with kUe8m0 rounded up to a power of two by the same bit trick as torch's.
template <bool kUe8m0>
__device__ __forceinline__ float fp8_scale_from_amax(float amax) {
    const float clamped = amax < 1e-4f ? 1e-4f : amax;
    float sf = __fdiv_rn(clamped, 448.0f);
    if constexpr (kUe8m0) sf = __uint_as_float((__float_as_uint(sf) + 0x007FFFFFu) & 0x7F800000u);
    return sf;
}

// x / sf, correctly rounded. A UE8M0 scale is a power of two (or 0 / inf for NaN / inf input), whose
// reciprocal `inv` (__frcp_rn(sf)) is exact, so the product equals the quotient in every case.
template <bool kUe8m0>
__device__ __forceinline__ float fp8_quotient(float x, float sf, float inv) {
    if constexpr (kUe8m0)
        return x * inv;
    else
        return __fdiv_rn(x, sf);
}

// A 1x32 block spread over kLanes aligned lanes, 32 / kLanes values each, quantised to e4m3 with a
// UE8M0 scale from the block's amax: the lane's values packed four a word, and the scale's exponent
// returned. Every lane of the warp must call it.
template <u32 kLanes>
__device__ __forceinline__ u32 quantize_ue8m0_block(const float (&v)[32 / kLanes], u32 (&packed)[8 / kLanes]) {
    float amax = 0.0f;
#pragma unroll
    for (u32 i = 0; i < 32 / kLanes; ++i) amax = fmax_nan(amax, fabsf(v[i]));
    amax = warp_reduce_max_nan<kLanes>(amax);
    const float sf = fp8_scale_from_amax<true>(amax), inv = __frcp_rn(sf);
#pragma unroll
    for (u32 w = 0; w < 8 / kLanes; ++w)
        packed[w] = pack_e4m3x4(fp8_quotient<true>(v[4 * w], sf, inv), fp8_quotient<true>(v[4 * w + 1], sf, inv),
                                fp8_quotient<true>(v[4 * w + 2], sf, inv), fp8_quotient<true>(v[4 * w + 3], sf, inv));
    return __float_as_uint(sf) >> 23;
}

// Four e4m3 bytes times `factor` (a power of two, both halves of an f16x2), rounded to e4m3.
__device__ __forceinline__ u32 scale_e4m3x4(u32 packed, u32 factor) {
    u32 out;
    asm("{\n"
        ".reg .b16 lo, hi;\n"
        ".reg .b32 wide_lo, wide_hi;\n"
        "mov.b32 {lo, hi}, %1;\n"
        "cvt.rn.f16x2.e4m3x2 wide_lo, lo;\n"
        "cvt.rn.f16x2.e4m3x2 wide_hi, hi;\n"
        "mul.rn.f16x2 wide_lo, wide_lo, %2;\n"
        "mul.rn.f16x2 wide_hi, wide_hi, %2;\n"
        "cvt.rn.satfinite.e4m3x2.f16x2 lo, wide_lo;\n"
        "cvt.rn.satfinite.e4m3x2.f16x2 hi, wide_hi;\n"
        "mov.b32 %0, {lo, hi};\n"
        "}\n"
        : "=r"(out)
        : "r"(packed), "r"(factor));
    return out;
}

// 2^shift (shift <= 0) as f16 bits: normal down to 2^-14, subnormal to 2^-24, then 0.
__device__ __forceinline__ u32 f16_power_of_two(int shift) {
    if (shift >= -14) return u32(shift + 15) << 10;
    return shift >= -24 ? 1u << (shift + 24) : 0u;
}

// The largest of a 128-wide block's four 1x32 exponents: the folded block's.
__device__ __forceinline__ u32 fold_top(const u32 (&exponents)[4]) {
    return max(max(exponents[0], exponents[1]), max(exponents[2], exponents[3]));
}

// The f16x2 factor (scale_e4m3x4's) that takes a 1x32 block of `exponent` to the folded block's `top`.
__device__ __forceinline__ u32 fold_factor(u32 exponent, u32 top) {
    const u32 half = f16_power_of_two(int(exponent) - int(top));
    return half | (half << 16);
}

// The folded block's float32 scale, 2^(top - 127) (0 for exponent 0).
__device__ __forceinline__ float folded_scale(u32 top) { return top > 0 ? __uint_as_float(top << 23) : 0.0f; }

}  // namespace moegemm
