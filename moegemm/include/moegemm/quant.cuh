// FP8 (e4m3) quantisation of one block from its absolute maximum, bit for bit as moegemm/quant.py's
// PyTorch path computes it: the casts and the MoE layer's activation share it.
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

}  // namespace moegemm
