// FP8 x FP4 GEMM on sm_90a: D[M, N] (+)= (A * SFA) @ (B * SFB)^T with e2m1 weights, and the MoE
// grouped forms, on the FP8 tensor cores (sm_90a has no FP4 ones).
//
// A, SFA, D and the grouped kinds: as for the FP8 kernel (sm90_fp8_gemm.cuh).
// B: e2m1 [G * N, K / 2] bytes, two values per byte (element 2i in the low nibble), K-major.
// SFB: UE8M0 exponents, one per 1x32 block of a row of B, the four of each 128-wide K block packed
// little-endian in an int32: [G * ceil(K/128), N'] MN-major (N' = N rounded up to 4).
//
// The kernel is the FP8 one (sm90_fp8_gemm.cuh: the sm90 GEMM skeleton with its main loop and
// promotion) but for B: each stage brings B's 64 bytes per row and its packed scales among the
// extras, and the producer warpgroup's warps 1 to 3 (idle in the FP8 kernel) widen them into the
// e4m3 B tile the WGMMAs read (fp4.cuh): per row and 128-wide K block one FP32 scale (the column
// scales, 2^(largest exponent - 133)) and values scaled by the four 1x32 exponents' differences
// from the largest, exact while they span at most 2^14. The promotion multiplies each column by its
// own scale, where the FP8 kernel has one per 128 columns. The widened tile costs no DRAM bytes:
// decode, bound by the weights' bytes, reads half of the FP8 kernel's. (Prefill, where every M block
// would widen the same weights again, runs the FP8 kernel on B widened once: sm90_fp4_widen.cuh.)
#pragma once
#include <moegemm/fp4.cuh>
#include "sm90_fp8_gemm.cuh"

namespace moegemm {

template <u32 kBlockM_, u32 kBlockN_, u32 kStages_, u32 kClusterM_, u32 kClusterN_, u32 kSplitK_, bool kOutFp32_,
          bool kAccumulate_, GemmType kType_ = GemmType::kNormal>
struct Fp8Fp4GemmConfig
    : Fp8GemmConfig<kBlockM_, kBlockN_, kStages_, kClusterM_, kClusterN_, kSplitK_, kOutFp32_, kAccumulate_, kType_> {
    using Base =
        Fp8GemmConfig<kBlockM_, kBlockN_, kStages_, kClusterM_, kClusterN_, kSplitK_, kOutFp32_, kAccumulate_, kType_>;
    using Base::kBlockM, Base::kBlockN, Base::kNumMathWarpgroups, Base::kStages;

    static constexpr bool kTransformsB = true;
    static constexpr u32 kTransformThreads = 96;
    // The transform warps widen kTransformBatch parts of 32 values a trip, all loaded first so that
    // the loads' latencies overlap; two need more registers than the FP8 kernel's split with two math
    // warpgroups leaves them (40 / 232; one filling all 64K registers, 48 / 232, left setmaxnreg.inc
    // waiting forever on the H200: BENCHMARKS.md, "FP8 x FP4").
    static constexpr u32 kTransformBatch = kNumMathWarpgroups == 1 ? 2 : 1;
    static constexpr u32 kProducerRegisters = kNumMathWarpgroups == 1 ? 64 : 40;
    static constexpr u32 kMathRegisters = kNumMathWarpgroups == 1 ? 240 : 232;

    // Per stage: B's packed values (64 bytes a row), SFA, B's packed scales (one int32 a row, in a
    // TMA-aligned slot), the column scales the transform writes, and its barrier (16 bytes).
    static constexpr u32 kPackedBBytes = kBlockN * 64;
    static constexpr u32 kSfaBytes = kBlockM * 4;
    static constexpr u32 kPackedSfbBytes = align_up(kBlockN * 4, 128u);
    static constexpr u32 kColumnScaleBytes = kBlockN * 4;
    static constexpr u32 kSfaOffset = kStages * kPackedBBytes;
    static constexpr u32 kPackedSfbOffset = kSfaOffset + kStages * kSfaBytes;
    static constexpr u32 kColumnScaleOffset = kPackedSfbOffset + kStages * kPackedSfbBytes;
    static constexpr u32 kBarrierOffset = kColumnScaleOffset + kStages * kColumnScaleBytes;
    static constexpr u32 kExtraStageBytes = kPackedBBytes + kSfaBytes + kPackedSfbBytes + kColumnScaleBytes + 16;
    static constexpr u32 kStageBytes = Base::kTileABytes + Base::kTileBBytes + kExtraStageBytes;
    static constexpr u32 kSmemBytes = Base::smem_bytes(kExtraStageBytes);

    static_assert(kBlockM <= 128 && kClusterM_ == 1 && kBlockN <= 128,
                  "one or two math warpgroups, BLOCK_N <= 128, B loaded per CTA (no B multicast)");
};

// The FP8 x FP4 policy of the sm90 GEMM skeleton (hooks: sm90/gemm.cuh); the rest is the FP8 policy's.
template <class Config_>
struct Fp8Fp4GemmKernel : Fp8GemmKernel<Config_> {
    using Config = Config_;
    static constexpr u32 BM = Config::kBlockM, BN = Config::kBlockN, kAcc = BN / 2;

    __device__ __forceinline__ static Barrier* transformed(const u8* smem_extra) {
        return reinterpret_cast<Barrier*>(const_cast<u8*>(smem_extra) + Config::kBarrierOffset);
    }

    __device__ __forceinline__ static void init_barriers(u8* smem_extra) {
#pragma unroll
        for (u32 s = 0; s < Config::kStages; ++s) transformed(smem_extra)[s].init(Config::kTransformThreads);
    }

    // ---- producer -------------------------------------------------------------------------------------

    struct ProducerTile {
        int sfa_row, sfa_k;  // SFA box coordinates of the tile's rows (without the K block)
        int b_row, b_col;    // B's first row; the tile's first column of the packed scales
        int sfb_row;         // the packed scales' row of the expert's first K block
    };

    __device__ __forceinline__ static ProducerTile producer_tile(const Fp8GemmParams& p, const Tile& tile,
                                                                u32 num_k_blocks) {
        const bool masked = Config::kType == GemmType::kMasked;
        ProducerTile t;
        t.sfa_row = masked ? tile.m_block * BM : tile.row;
        t.sfa_k = masked ? tile.group * num_k_blocks : 0;
        t.b_row = tile.group * p.n + tile.n_block * BN;
        t.b_col = tile.n_block * BN;
        t.sfb_row = tile.group * num_k_blocks;
        return t;
    }

    __device__ __forceinline__ static void load_stage_extras(const Fp8GemmParams& p, const ProducerTile t,
                                                             const Tile&, u32, u32 k_block, u32 s, Barrier* full,
                                                             u8* smem_extra) {
        tma_load_2d(smem_extra + Config::kSfaOffset + s * Config::kSfaBytes, &p.tma_sfa, full, t.sfa_row,
                    t.sfa_k + k_block);
        tma_load_2d(smem_extra + s * Config::kPackedBBytes, &p.tma_b, full, k_block * 64, t.b_row);
        tma_load_2d(smem_extra + Config::kPackedSfbOffset + s * Config::kPackedSfbBytes, &p.tma_sfb, full, t.b_col,
                    t.sfb_row + k_block);
    }

    // ---- transform warps: the stage's e4m3 B tile and column scales -------------------------------------

    // Thread `thread` widens the 32-value parts thread, thread + 96, ... of the tile's 4 * BLOCK_N, four
    // consecutive threads a row (conflict-free 16-byte reads of the packed rows), into the tile's
    // 128-byte-swizzled rows.
    __device__ __forceinline__ static void transform_stage(u32 stage, u8* tile_b, u8* smem_extra, u32 thread) {
        const u32 packed_b = smem_addr(smem_extra + stage * Config::kPackedBBytes);
        const u32 packed_sfb = smem_addr(smem_extra + Config::kPackedSfbOffset + stage * Config::kPackedSfbBytes);
        const u32 column_scales =
            smem_addr(smem_extra + Config::kColumnScaleOffset + stage * Config::kColumnScaleBytes);
        const u32 tile = smem_addr(tile_b);
        constexpr u32 kParts = 4 * BN, kStride = Config::kTransformThreads, kBatch = Config::kTransformBatch;
        for (u32 first = thread; first < kParts; first += kBatch * kStride) {
            u32 packed[kBatch][4], exponents[kBatch];
#pragma unroll
            for (u32 i = 0; i < kBatch; ++i) {
                const u32 part = first + i * kStride;
                if (part < kParts) {
                    ld_shared_v4_u32(packed_b + part * 16, packed[i]);
                    exponents[i] = ld_shared_u32(packed_sfb + part / 4 * 4);
                }
            }
#pragma unroll
            for (u32 i = 0; i < kBatch; ++i) {
                const u32 part = first + i * kStride;
                if (part >= kParts) break;
                const u32 row = part / 4, quarter = part % 4;
                E2m1Table table;
                const float scale = e2m1_block_table(exponents[i], quarter, table);
                u32 out[8];
#pragma unroll
                for (u32 w = 0; w < 4; ++w) widen_e2m1x8(packed[i][w], table, out[2 * w], out[2 * w + 1]);
                // The part's 32 bytes are 16-byte chunks 2 * quarter and 2 * quarter + 1 of the row, swizzled.
                const u32 line = tile + row * 128, swizzle = row % 8;
                st_shared_v4_u32(line + ((2 * quarter) ^ swizzle) * 16, out[0], out[1], out[2], out[3]);
                st_shared_v4_u32(line + ((2 * quarter + 1) ^ swizzle) * 16, out[4], out[5], out[6], out[7]);
                if (quarter == 0) st_shared_u32(column_scales + row * 4, __float_as_uint(scale));
            }
        }
        // The WGMMAs read the tile through the async proxy.
        fence_proxy_async();
        transformed(smem_extra)[stage].arrive();
    }

    // ---- math warpgroups ---------------------------------------------------------------------------------

    struct TileScales {};

    __device__ __forceinline__ static TileScales begin_tile(const Fp8GemmParams&, const Tile&, const u32&) {
        return {};
    }

    // SFA of the thread's two rows; the address of its first column's scale in the stage.
    struct BlockScales {
        float a0, a1;
        u32 columns;
    };

    // As Fp8GemmKernel::issue, once the stage has also been widened.
    __device__ __forceinline__ static BlockScales issue(const TileScales&, u32, u32 stage, u32 phase, u64 desc_a,
                                                        u64 desc_b, const u8* smem_extra, Barrier* full, u32 sfa_row,
                                                        float* scratch, bool wait_full = true) {
        if (wait_full) full[stage].wait(phase);
        transformed(smem_extra)[stage].wait(phase);  // the skeleton never waits for this one
        const float* smem_sfa = reinterpret_cast<const float*>(smem_extra + Config::kSfaOffset);
        BlockScales scales;
        scales.a0 = smem_sfa[stage * BM + sfa_row];
        scales.a1 = smem_sfa[stage * BM + sfa_row + 8];
        scales.columns = smem_addr(smem_extra + Config::kColumnScaleOffset + stage * Config::kColumnScaleBytes) +
                         lane_id() % 4 * 8;
        Fp8GemmKernel<Config_>::issue_wgmmas(stage, desc_a, desc_b, scratch);
        return scales;
    }

    // The promotion with a scale per row (SFA) and per column: the thread's accumulators are, per
    // 8-column group j, columns 8j + 2 (lane % 4) + {0, 1} of its two rows.
    template <bool kRelease = true>
    __device__ __forceinline__ static void retire(const TileScales&, u32 stage, const BlockScales& scales,
                                                  float* scratch, float* totals, Barrier* empty, u32 peer) {
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i) fence_register(scratch[i]);
        float column[kAcc / 2];
#pragma unroll
        for (u32 j = 0; j < BN / 8; ++j) ld_shared_v2_f32(scales.columns + j * 32, column[2 * j], column[2 * j + 1]);
        if constexpr (kRelease) consumer_release_stage<Config>(empty, stage, peer);
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i)
            totals[i] += ((i / 2) % 2 ? scales.a1 : scales.a0) * column[(i / 4) * 2 + i % 2] * scratch[i];
    }
};

template <class Config>
__device__ __forceinline__ void sm90_fp8_fp4_gemm(const Fp8GemmParams& p) {
    sm90_gemm<Fp8Fp4GemmKernel<Config>>(p);
}

}  // namespace moegemm
