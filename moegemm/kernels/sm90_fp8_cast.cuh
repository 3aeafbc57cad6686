// FP8 (e4m3) casts with fine-grained scales on sm_90a; memory-bound element-wise kernels.
//
// x: [M, K] bf16 or fp32, row-major (unit inner stride, row pitch x_pitch elements).
// x_fp8: [M, K] e4m3, contiguous. sf: float32 at byte sf_offset of the same buffer, in the layout the
// GEMM kernels read:
//   per token (kPerBlock false): one scale per 1x128 block of a row, sf [M, ceil(K/128)] M-major, its
//                                columns align(M, 4) floats apart (16-byte aligned, as TMA needs);
//   per block (kPerBlock true):  one scale per 128x128 tile, sf [ceil(M/128), ceil(K/128)] row-major.
//
// Bit-identical to the torch path of moegemm.utils: amax = max |x| over the block (a ragged last block
// counts its real elements only, which equals torch's zero padding), clamped to >= 1e-4 (NaN passes);
// sf = amax / 448.f, correctly rounded; with kUe8m0, sf rounded up to a power of two by the same bit
// trick; x_fp8 = e4m3(x / sf), the quotient correctly rounded in fp32, then rounded to nearest even.
// |x / sf| <= 448 up to rounding by construction, where cvt's satfinite and torch's conversion agree.
// (Not covered: a block holding NaN with kUe8m0, whose scale becomes 0; x / 0 = +-inf saturates to
// +-448 here and turns into NaN in torch.)
//
// A chunk is 16 bytes of one row (kChunkElems = 8 bf16 or 4 fp32). kLanesPerRow = 128 / kChunkElems
// consecutive lanes hold the 128 elements of one block row, one chunk each, so a warp's load
// instruction reads kRowsPerWarp (2 or 1) block rows of 256 (bf16) or 512 (fp32) contiguous bytes,
// and its store writes each block row's 128 e4m3 bytes contiguously (8 or 4 bytes a lane).
//   per token: a CTA quantises a kCtaRows x kUnroll rectangle of blocks (rows x 128-wide K blocks),
//     warp w rows [w, w + 1) * kRowsPerWarp of it, a lane kUnroll blocks of one row (loads in flight,
//     each row's kUnroll blocks contiguous in x). The CTA's scales of a K block are kCtaRows
//     consecutive floats of sf's M-major column: whole 32-byte sectors. amax: shuffle reduction
//     inside the lane group.
//   per block: one CTA of 512 threads per 128x128 tile (tile = m_block * num_k_blocks + k_block, sf
//     order), kPassRows = 32 (bf16) or 16 (fp32) rows a pass, kUnroll = 4 or 8 passes; every thread
//     keeps its chunks in registers. amax: warp shuffles, then the warps' maxima through shared
//     memory; the scaled writes reuse the registers.
// kAligned (x 16-byte aligned, row pitch and K multiples of kChunkElems, so no chunk straddles K or
// a misaligned address) selects 16-byte loads and 8/4-byte stores; otherwise every element is
// loaded and stored on its own, with the same work split.
#pragma once
#include <moegemm/quant.cuh>

namespace moegemm {

struct Fp8CastParams {
    const void* x;     // [M, K] bf16 or fp32
    u8* out;           // x_fp8 [M, K] contiguous, then the float32 scales at byte sf_offset
    u64 x_pitch;       // elements between consecutive rows of x
    u64 sf_offset;     // multiple of 16
    u32 m, k;
    u32 num_k_blocks;  // ceil(K / 128)
    u32 num_units;     // blocks to quantise: M * num_k_blocks (per token), ceil(M/128) * num_k_blocks (per block)
};

template <u32 kInputBytes_, bool kUe8m0_, bool kPerBlock_, bool kAligned_>
struct Fp8CastConfig {
    static constexpr u32 kInputBytes = kInputBytes_;  // 2: bf16, 4: fp32
    static constexpr bool kUe8m0 = kUe8m0_, kPerBlock = kPerBlock_, kAligned = kAligned_;
    static constexpr u32 kBlock = 128;
    static constexpr u32 kChunkElems = 16 / kInputBytes;
    static constexpr u32 kLanesPerRow = kBlock / kChunkElems;
    static constexpr u32 kRowsPerWarp = 32 / kLanesPerRow;
    static constexpr u32 kNumThreads = kPerBlock ? 512 : 256;
    // Per block: tile rows one pass of the CTA covers (32 bf16, 16 fp32).
    static constexpr u32 kPassRows = kNumThreads / kLanesPerRow;
    // Chunks a thread holds: per token, blocks in flight; per block, the passes over the tile (4 or 8).
    static constexpr u32 kUnroll = kPerBlock ? kBlock / kPassRows : 4;
    static constexpr u32 kNumWarps = kNumThreads / 32;
    // CTAs per SM the register budget must allow (__launch_bounds__): 1024 threads, so loads of some
    // CTAs are in flight while others compute.
    static constexpr u32 kMinBlocks = 1024 / kNumThreads;
    // Per token: rows of the CTA's rectangle of blocks (16 bf16, 8 fp32), each kUnroll blocks wide.
    static constexpr u32 kCtaRows = kNumWarps * kRowsPerWarp;
    static constexpr u32 kUnitsPerCta = kPerBlock ? 1 : kCtaRows * kUnroll;

    static_assert(kInputBytes == 2 || kInputBytes == 4, "bf16 or fp32 input");
    static_assert(!kPerBlock || kPassRows * kUnroll == kBlock, "the passes cover the tile's 128 rows");
    static_assert(kNumThreads % 32 == 0 && kNumWarps * 32 == kNumThreads);
};

// Load the chunk of row `row` starting at column `col` (a multiple of kChunkElems) as raw words;
// elements outside the matrix read as zero.
template <class Config>
__device__ __forceinline__ void fp8_cast_load(const Fp8CastParams& p, bool row_valid, u32 row, u32 col,
                                              u32 (&words)[4]) {
#pragma unroll
    for (u32 i = 0; i < 4; ++i) words[i] = 0;
    if (!row_valid) return;
    const u8* src = static_cast<const u8*>(p.x) + (u64(row) * p.x_pitch + col) * Config::kInputBytes;
    if constexpr (Config::kAligned) {
        // K % kChunkElems == 0: a chunk starting inside the row lies inside it entirely.
        if (col < p.k) ld_global_nc_v4(src, words);
    } else {
#pragma unroll
        for (u32 e = 0; e < Config::kChunkElems; ++e) {
            if (col + e < p.k) {
                if constexpr (Config::kInputBytes == 2)
                    words[e / 2] |= u32(*reinterpret_cast<const unsigned short*>(src + 2 * e)) << (16 * (e % 2));
                else
                    words[e] = *reinterpret_cast<const u32*>(src + 4 * e);
            }
        }
    }
}

template <class Config>
__device__ __forceinline__ void fp8_cast_unpack(const u32 (&words)[4], float (&v)[Config::kChunkElems]) {
#pragma unroll
    for (u32 i = 0; i < 4; ++i) {
        if constexpr (Config::kInputBytes == 2) {
            v[2 * i] = bf16_lo_to_float(words[i]);
            v[2 * i + 1] = bf16_hi_to_float(words[i]);
        } else {
            v[i] = __uint_as_float(words[i]);
        }
    }
}

template <class Config>
__device__ __forceinline__ float fp8_cast_chunk_amax(const u32 (&words)[4]) {
    float v[Config::kChunkElems];
    fp8_cast_unpack<Config>(words, v);
    float amax = 0.0f;
#pragma unroll
    for (u32 e = 0; e < Config::kChunkElems; ++e) amax = fmax_nan(amax, fabsf(v[e]));
    return amax;
}

// Quantise one chunk and store it at row `row`, column `col` of x_fp8.
template <class Config>
__device__ __forceinline__ void fp8_cast_store(const Fp8CastParams& p, bool row_valid, u32 row, u32 col,
                                               const u32 (&words)[4], float sf, float inv) {
    constexpr u32 kOutWords = Config::kChunkElems / 4;
    float v[Config::kChunkElems];
    fp8_cast_unpack<Config>(words, v);
    u32 packed[kOutWords];
#pragma unroll
    for (u32 i = 0; i < kOutWords; ++i)
        packed[i] = pack_e4m3x4(fp8_quotient<Config::kUe8m0>(v[4 * i], sf, inv),
                                fp8_quotient<Config::kUe8m0>(v[4 * i + 1], sf, inv),
                                fp8_quotient<Config::kUe8m0>(v[4 * i + 2], sf, inv),
                                fp8_quotient<Config::kUe8m0>(v[4 * i + 3], sf, inv));
    if (!row_valid) return;
    u8* dst = p.out + u64(row) * p.k + col;
    if constexpr (Config::kAligned) {
        if (col < p.k) {
            // out is 16-byte aligned and K % kChunkElems == 0, so dst is kChunkElems-byte aligned.
            if constexpr (kOutWords == 2)
                *reinterpret_cast<u64*>(dst) = (u64(packed[1]) << 32) | packed[0];
            else
                *reinterpret_cast<u32*>(dst) = packed[0];
        }
    } else {
#pragma unroll
        for (u32 e = 0; e < Config::kChunkElems; ++e)
            if (col + e < p.k) dst[e] = u8(packed[e / 4] >> (8 * (e % 4)));
    }
}

template <class Config>
__device__ __forceinline__ void fp8_cast_per_token(const Fp8CastParams& p) {
    constexpr u32 kUnroll = Config::kUnroll;
    const u32 lane = lane_id();
    const u32 col_in_block = (lane % Config::kLanesPerRow) * Config::kChunkElems;
    // The CTA's rectangle: kCtaRows rows from row_tile, kUnroll K blocks from k_tile.
    const u32 k_tiles = ceil_div(p.num_k_blocks, kUnroll);
    const u32 row_tile = blockIdx.x / k_tiles, k_tile = blockIdx.x - row_tile * k_tiles;
    const u32 row = row_tile * Config::kCtaRows + warp_id() * Config::kRowsPerWarp + lane / Config::kLanesPerRow;

    u32 cols[kUnroll];
    bool valid[kUnroll];
    u32 words[kUnroll][4];
#pragma unroll
    for (u32 i = 0; i < kUnroll; ++i) {
        const u32 k_block = k_tile * kUnroll + i;
        valid[i] = row < p.m && k_block < p.num_k_blocks;
        cols[i] = k_block * Config::kBlock + col_in_block;
        fp8_cast_load<Config>(p, valid[i], row, cols[i], words[i]);
    }

    float* sf_out = reinterpret_cast<float*>(p.out + p.sf_offset);
    const u32 sf_ld = (p.m + 3) & ~3u;  // floats between the M-major columns of sf
#pragma unroll
    for (u32 i = 0; i < kUnroll; ++i) {
        // Every lane takes part in the shuffles, including those of blocks past the end.
        const float amax = warp_reduce_max_nan<Config::kLanesPerRow>(fp8_cast_chunk_amax<Config>(words[i]));
        const float sf = fp8_scale_from_amax<Config::kUe8m0>(amax);
        const float inv = Config::kUe8m0 ? __frcp_rn(sf) : 0.0f;
        fp8_cast_store<Config>(p, valid[i], row, cols[i], words[i], sf, inv);
        if (valid[i] && col_in_block == 0) sf_out[(k_tile * kUnroll + i) * sf_ld + row] = sf;
    }
}

template <class Config>
__device__ __forceinline__ void fp8_cast_per_block(const Fp8CastParams& p) {
    constexpr u32 kPasses = Config::kUnroll;
    __shared__ float warp_amax[Config::kNumWarps];
    const u32 tile = blockIdx.x;
    const u32 m_block = tile / p.num_k_blocks, k_block = tile - m_block * p.num_k_blocks;
    const u32 row0 = m_block * Config::kBlock + threadIdx.x / Config::kLanesPerRow;
    const u32 col = k_block * Config::kBlock + (threadIdx.x % Config::kLanesPerRow) * Config::kChunkElems;

    u32 words[kPasses][4];
#pragma unroll
    for (u32 i = 0; i < kPasses; ++i) {
        const u32 row = row0 + i * Config::kPassRows;
        fp8_cast_load<Config>(p, row < p.m, row, col, words[i]);
    }

    float amax = 0.0f;
#pragma unroll
    for (u32 i = 0; i < kPasses; ++i) amax = fmax_nan(amax, fp8_cast_chunk_amax<Config>(words[i]));
    amax = warp_reduce_max_nan<32>(amax);
    // warp_id() is a whole-warp shuffle: read it outside the one-lane branch.
    const u32 warp = warp_id();
    if (lane_id() == 0) warp_amax[warp] = amax;
    __syncthreads();
    amax = warp_amax[0];
#pragma unroll
    for (u32 w = 1; w < Config::kNumWarps; ++w) amax = fmax_nan(amax, warp_amax[w]);

    const float sf = fp8_scale_from_amax<Config::kUe8m0>(amax);
    const float inv = Config::kUe8m0 ? __frcp_rn(sf) : 0.0f;
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.out + p.sf_offset)[tile] = sf;
#pragma unroll
    for (u32 i = 0; i < kPasses; ++i) {
        const u32 row = row0 + i * Config::kPassRows;
        fp8_cast_store<Config>(p, row < p.m, row, col, words[i], sf, inv);
    }
}

template <class Config>
__device__ __forceinline__ void sm90_fp8_cast(const Fp8CastParams& p) {
    if constexpr (Config::kPerBlock)
        fp8_cast_per_block<Config>(p);
    else
        fp8_cast_per_token<Config>(p);
}

}  // namespace moegemm
