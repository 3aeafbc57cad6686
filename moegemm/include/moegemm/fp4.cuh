// FP4 (e2m1) on sm_90a, which has no FP4 tensor cores: widening packed e2m1 values to e4m3 for the
// FP8 WGMMAs, with the power-of-two (UE8M0) scales of 1x32 blocks folded into the widened values.
//
// e2m1: bit 3 the sign, bits 0-2 a code indexing the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6};
// element 2i of a row in the low nibble of byte i. Every e2m1 value times 2^s is exact in e4m3 for
// -8 <= s <= 6 (6 * 2^6 = 384 <= 448; 0.5 * 2^-8 is e4m3's least subnormal): a 128-wide block whose
// four 1x32 scales span at most 2^14 widens exactly with one scale per block (2^(max exponent - 6)),
// and a wider spread rounds the smaller blocks' values to e4m3 (to nearest even).
#pragma once
#include "ptx.cuh"

namespace moegemm {

// The headroom the widening leaves above the largest block's values: they are scaled by 2^6.
constexpr int kE2m1WidenShift = 6;

// The e4m3 bytes of the eight e2m1 magnitudes times 2^shift (shift <= 6), codes 0-3 in `lo`, 4-7 in `hi`.
struct E2m1Table {
    u32 lo, hi;
};

__device__ __forceinline__ E2m1Table e2m1_table(int shift) {
    if (shift >= -5) {
        // Every nonzero magnitude stays a normal e4m3 number: the shift adds to its exponent (bits 3-6).
        return {0x3C383000u + u32(shift) * 0x08080800u, 0x4C484440u + u32(shift) * 0x08080808u};
    }
    const float scale = __uint_as_float(u32(max(shift, -126) + 127) << 23);
    return {pack_e4m3x4(0.0f, 0.5f * scale, scale, 1.5f * scale),
            pack_e4m3x4(2.0f * scale, 3.0f * scale, 4.0f * scale, 6.0f * scale)};
}

// The tables of every shift a 1x32 block can have in shared memory, for kernels that build one a block
// in their main loop: a load there instead of the shift's arithmetic and a branch for shifts under -5.
// At shift -14 every value rounds to zero in e4m3 (6 * 2^-14 is under half its least subnormal), as at
// any lower one.
constexpr int kE2m1LutMinShift = -14;
constexpr u32 kE2m1LutEntries = u32(kE2m1WidenShift - kE2m1LutMinShift + 1);
constexpr u32 kE2m1LutBytes = kE2m1LutEntries * 8;

// Fills the table at shared address `lut` (8-byte aligned), the CTA's threads an entry each. The
// caller's barrier makes it visible.
__device__ __forceinline__ void e2m1_lut_init(u32 lut) {
    for (u32 i = threadIdx.x; i < kE2m1LutEntries; i += blockDim.x) {
        const E2m1Table table = e2m1_table(kE2m1LutMinShift + int(i));
        st_shared_v2_u32(lut + i * 8, table.lo, table.hi);
    }
}

__device__ __forceinline__ E2m1Table e2m1_lut_table(u32 lut, int shift) {
    E2m1Table table;
    ld_shared_v2_u32(lut + u32(max(shift, kE2m1LutMinShift) - kE2m1LutMinShift) * 8, table.lo, table.hi);
    return table;
}

// Eight e2m1 values (element i in nibble i of `packed`) to eight e4m3 bytes (element i in byte i of
// out0, out1): the magnitudes through the table, the signs replicated from the nibbles' top bits
// (prmt's sign mode reads a byte's bit 7: bytes of `packed` give the odd elements', of packed << 4
// the even ones'). The codes are masked once: prmt reads only its selector's low 16 bits.
__device__ __forceinline__ void widen_e2m1x8(u32 packed, const E2m1Table& table, u32& out0, u32& out1) {
    const u32 shifted = packed << 4, codes = packed & 0x77777777u;
    const u32 signs0 = prmt(packed, shifted, 0x9D8Cu), signs1 = prmt(packed, shifted, 0xBFAEu);
    out0 = prmt(table.lo, table.hi, codes) | (signs0 & 0x80808080u);
    out1 = prmt(table.lo, table.hi, codes >> 16) | (signs1 & 0x80808080u);
}

// The FP32 scale of a block widened with largest exponent `top`: 2^(top - 127 - kE2m1WidenShift);
// 0 below FP32's normal range (weights under 2^-120).
__device__ __forceinline__ float widened_block_scale(u32 top) {
    return top > u32(kE2m1WidenShift) ? __uint_as_float((top - kE2m1WidenShift) << 23) : 0.0f;
}

// The largest of the kBlocks (1, 2 or 4) UE8M0 exponents packed in `exponents` (block j in byte j; the
// bytes past kBlocks are padding), by scalar byte extracts and a max: the packed-byte max is no
// instruction of sm_90 and costs more.
template <u32 kBlocks = 4>
__device__ __forceinline__ u32 e2m1_top_exponent(u32 exponents) {
    static_assert(kBlocks == 1 || kBlocks == 2 || kBlocks == 4, "one, two or four 1x32 blocks a packed word");
    u32 e[4];
#pragma unroll
    for (u32 j = 0; j < kBlocks; ++j) e[j] = prmt(exponents, 0u, 0x4440u + j);
    if constexpr (kBlocks == 4) return max(max(e[0], e[1]), max(e[2], e[3]));
    if constexpr (kBlocks == 2) return max(e[0], e[1]);
    return e[0];
}

// Of 1x32 block `block` of a row of kBlocks blocks with those exponents: its table's shift, relative to
// the largest exponent `top`.
template <u32 kBlocks>
__device__ __forceinline__ int e2m1_block_shift(u32 exponents, u32 block, u32& top) {
    top = e2m1_top_exponent<kBlocks>(exponents);
    return int(prmt(exponents, 0u, 0x4440u + block)) - int(top) + kE2m1WidenShift;
}

// The table of 1x32 block `block` of a row of kBlocks blocks with those exponents, scaled relative to
// the largest, and the row's FP32 scale.
template <u32 kBlocks = 4>
__device__ __forceinline__ float e2m1_block_table(u32 exponents, u32 block, E2m1Table& table) {
    u32 top;
    table = e2m1_table(e2m1_block_shift<kBlocks>(exponents, block, top));
    return widened_block_scale(top);
}

// The same from the shared table at `lut` (e2m1_lut_init).
template <u32 kBlocks = 4>
__device__ __forceinline__ float e2m1_block_table(u32 lut, u32 exponents, u32 block, E2m1Table& table) {
    u32 top;
    table = e2m1_lut_table(lut, e2m1_block_shift<kBlocks>(exponents, block, top));
    return widened_block_scale(top);
}

}  // namespace moegemm
