// FP8 GEMM with fine-grained scaling on sm_90a: D[M, N] (+)= (A * SFA) @ (B * SFB)^T, and the MoE
// grouped forms (GemmType in sm90/scheduler.cuh): D rows of expert g = A rows of expert g @ B[g]^T.
//
// A: e4m3 [M, K] K-major, SFA: fp32, one per 1x128 block of a row, stored M-major [ceil(K/128), M'].
// B: e4m3 [N, K] K-major, SFB: fp32, one per 128x128 block, [ceil(N/128), ceil(K/128)] row-major;
// with kSfbPerColumn (the 1D1D recipe of weight gradients) one per 1x128 block of a row of B, stored
// N-major like SFA, [ceil(K/128), N'] (N' = N rounded up to 4).
// D: bf16 or fp32 [M, N]; with kAccumulate the TMA unit adds the tile into D (D = C + A @ B^T).
// Grouped: B [G * N, K] and SFB [G, ceil(N/128), ceil(K/128)]; kMasked A, SFA and D hold G
// experts of max_M rows each; kBatched (fp8_einsum) reads A, B and D as 3-D tensors of any pitches,
// SFA per product like kMasked's; kKGrouped (expert weight gradients, kSfbPerColumn) adds
// A_g [M, k_g] @ B_g^T [k_g, N] into D[g] [G, M, N] for each expert's K segment, A_g and B_g
// through descriptors of their own (ExpertMaps, sm90/pipeline.cuh), SFA and SFB [sum_K / 128, M'
// or N']. A tile's rows that must stay untouched (padding, rows past an
// expert's count) make its warpgroups store row by row from registers instead of through TMA; in
// kMasked, a warpgroup whose 64 rows all lie past the expert's count skips the tile's math.
//
// The kernel is the sm90 GEMM skeleton (sm90/gemm.cuh: warp roles, shared memory, the persistent
// tile loop and the main loop's schedule, the deferred epilogue; sm90/pipeline.cuh: the stage ring
// and its barriers; sm90/split_k.cuh; sm90/epilogue.cuh) instantiated with the policy
// Fp8GemmKernel below, which adds:
//   - per stage, beside the 128-wide K slice of A and B: SFA of the tile's rows and the SFB of its
//     one or two 128-column blocks, loaded by TMA with the data (load_stage_extras), so the math
//     warps never wait on a global load;
//   - the main loop's steps: per 128-wide K slice a math warpgroup issues four m64nNk32 WGMMAs into
//     a scratch accumulator (issue), waits for them, releases the slot and adds the scratch times
//     SFA (per row) times SFB (per 128-column block) into FP32 totals (retire): the promotion that
//     keeps FP8 accumulation error bounded. With two scratch accumulators (kDoubleBuffer) the next
//     slice's WGMMAs are issued before the current one is promoted, four slices per loop trip
//     (BENCHMARKS.md, 2026-11-25);
//   - the epilogue policy: TMA stores, or TMA reduce-adds with kAccumulate.
// BLOCK_M 64, 128 or 192 (one to three math warpgroups): with three, each B tile loaded serves 192
// rows, and a masked expert of 129 to 192 rows fits one block. BLOCK_M 256 (dense): two math
// warpgroups of two slabs each, so each B tile serves 256 rows.
#pragma once
#include <moegemm/mma/wgmma.cuh>
#include <moegemm/ptx.cuh>
#include <moegemm/sm90/gemm.cuh>

namespace moegemm {

struct Fp8GemmParams {
    TmaDescriptor tma_a;    // A [M, K] e4m3, box {128, min(BLOCK_M, M rounded up to 8)}, 128-byte swizzle
    TmaDescriptor tma_b;    // B [N, K] e4m3, box {128, BLOCK_N}, 128-byte swizzle
    TmaDescriptor tma_sfa;  // SFA [ceil(K/128), M] fp32, box {BLOCK_M, 1}
    TmaDescriptor tma_d;    // D [M, N], box {kStoreCols, 64}
    // SFB as one row of G * ceil(N/128) * ceil(K/128) floats, box {kSfbBoxK, 1}; or, for tiles over two
    // SFB blocks when ceil(K/128) % kSfbBoxK == 0, as [G * ceil(N/128), ceil(K/128)], box {kSfbBoxK, 2}
    TmaDescriptor tma_sfb;
    const int* groups;      // grouped kinds: see GemmType
    u8* d;                  // D itself, for the row-by-row stores
    u32 m, n, k;            // kMasked: m = max_M, the rows of each expert
    u32 stage_bytes;         // bytes the TMA loads of one stage deliver (A's box shrinks for small M)
    u32 k_blocks_per_split;  // split-K: K blocks per CTA of a cluster (the last may get fewer)
    u32 num_groups;
    u32 ld_d;  // elements between rows of D
    u32 sfb_box_rows;  // SFB rows one box of tma_sfb holds: 1 (flat view) or 2 (2-D view)
    // kKGrouped: A and B (each expert's [M, k_g] and [N, k_g] blocks back to back), and the
    // workspace of the experts' descriptors (sm90/pipeline.cuh, ExpertMaps)
    const u8* a_data;
    const u8* b_data;
    TmaDescriptor* expert_maps;
};

template <u32 kBlockM_, u32 kBlockN_, u32 kStages_, u32 kClusterM_, u32 kClusterN_, u32 kSplitK_, bool kOutFp32_,
          bool kAccumulate_, GemmType kType_ = GemmType::kNormal, bool kSfbPerColumn_ = false>
struct Fp8GemmConfig : GemmConfigBase<kBlockM_, kBlockN_, 128, 1, kStages_, kClusterM_, kClusterN_, kSplitK_,
                                      kOutFp32_, kAccumulate_, kType_> {
    using Base = GemmConfigBase<kBlockM_, kBlockN_, 128, 1, kStages_, kClusterM_, kClusterN_, kSplitK_, kOutFp32_,
                                kAccumulate_, kType_>;
    using Base::kBlockM, Base::kBlockN, Base::kNumMathWarpgroups, Base::kSlabs, Base::kSplitK, Base::kStages,
        Base::kType;

    // Register split after setmaxnreg: the producer needs few; the totals must fit the math warps
    // (64K registers per SM: 128 x 40 + 384 x 152 with three math warpgroups). Two warpgroups of
    // two slabs hold two slabs' totals and one scratch accumulator: 192 floats at BLOCK_N = 128.
    static constexpr u32 kProducerRegisters = 40;
    static constexpr u32 kMathRegisters = kNumMathWarpgroups == 1 ? 240 : kNumMathWarpgroups == 2 ? 232 : 152;
    static constexpr bool kSfbPerColumn = kSfbPerColumn_;

    // A tile never straddles two 128-wide SFB blocks when BLOCK_N divides 128.
    static constexpr bool kUniformSfb = 128 % kBlockN == 0;
    // Columns that share their SFB scale in every tile: gcd(BLOCK_N, 128).
    static constexpr u32 kScaleRun = (kBlockN & (0u - kBlockN)) < 128 ? (kBlockN & (0u - kBlockN)) : 128;
    // Two scratch accumulators fit the math warps' registers up to BLOCK_N = 128; with three math
    // warpgroups (152 registers each) only one does.
    // Per-column SFB (kSfbPerColumn) takes registers of its own for a K block's scales: one scratch.
    static constexpr bool kDoubleBuffer = kBlockN <= 128 && kNumMathWarpgroups < 3 && kSlabs == 1 && !kSfbPerColumn;
    static constexpr bool kIssueIntoTotals = false;  // every K block is promoted
    // kMasked with two or three math warpgroups: a warpgroup skips the tiles whose rows all lie past
    // its expert's count (at 192 rows per expert in 128-row blocks, the second block's tiles do half
    // the work). Only there: in the other kinds such slabs are rare (M's last block, an expert's last
    // block), and the branch costs a grouped main loop its uniform registers (ptxas cannot prove the
    // warps converged: BENCHMARKS.md, 2026-11-25), the dense kernels their current schedule (dense
    // 192-row tiles ran no faster with it: BENCHMARKS.md, 2026-12-02).
    static constexpr bool kSkipIdleSlabs = kType == GemmType::kMasked && kNumMathWarpgroups >= 2;
    // A tile's epilogue waits until the next tile's first WGMMAs are in flight (BENCHMARKS.md,
    // 2026-12-02). Not where registers cannot hold a scratch accumulator beside the totals being
    // stored (three math warpgroups): ptxas would spill. Not under split-K, where a CTA may have no K
    // blocks: a WGMMA issued under a condition makes ptxas serialize them all (C7514).
    static constexpr bool kDeferEpilogue = kNumMathWarpgroups < 3 && kSplitK == 1;

    static constexpr u32 kTileSfaBytes = kBlockM * 4;
    // SFB rows a tile needs, each a TMA box of SFB seen as one flat row (its rows need not be 16
    // bytes apart, as a 2-D view's would): boxes start at 16-byte aligned elements and are 16 bytes
    // wide, so each holds the aligned quad of scales around the one wanted. Slots are aligned as TMA
    // destinations must be. Where the rows are 16-byte aligned, one 2-D box brings both rows into
    // the first slot, which is faster than two boxes (BENCHMARKS.md, 2026-11-25).
    static constexpr u32 kSfbRows = kUniformSfb ? 1 : 2;
    static constexpr u32 kSfbBoxK = 4;
    static constexpr u32 kSfbRowSlotBytes = 128;
    static constexpr u32 kSfbSlotBytes = kSfbPerColumn ? align_up(kBlockN * 4, 128u) : kSfbRowSlotBytes * kSfbRows;
    // Per stage beside A and B: SFA of every stage, then SFB of every stage (sm90/gemm.cuh's carve-up).
    static constexpr u32 kExtraStageBytes = kTileSfaBytes + kSfbSlotBytes;
    static constexpr u32 kStageBytes = Base::kTileABytes + Base::kTileBBytes + kExtraStageBytes;
    static constexpr u32 kSmemBytes = Base::smem_bytes(kExtraStageBytes);

    static_assert(kBlockM <= 128 || (kBlockN <= 128 && kSplitK == 1 &&
                                     (kType == GemmType::kNormal || kType == GemmType::kMasked ||
                                      kType == GemmType::kBatched)),
                  "BLOCK_M is 64 or 128 (one or two math warpgroups), or 192 or 256 (three warpgroups, or two of "
                  "two slabs: BLOCK_N <= 128, no split-K, not for the contiguous kinds, whose experts are 128-row "
                  "aligned)");
    static_assert(kSfbPerColumn || kBlockN <= 128 || kBlockN % 128 == 0 ||
                      kBlockN <= 128 + (kBlockN & (0u - kBlockN)),
                  "a tile may span at most two 128-wide SFB blocks");
    static_assert(!kSfbPerColumn || (kNumMathWarpgroups <= 2 && kSlabs == 1 && kBlockN <= 160 && kOutFp32_ &&
                                     (kType == GemmType::kNormal || kType == GemmType::kKGrouped)),
                  "per-column SFB: BLOCK_M 64 or 128, BLOCK_N <= 160, FP32 out, dense or K-grouped");
    static_assert(kType != GemmType::kKGrouped || (kSfbPerColumn && kAccumulate_),
                  "K-grouped: the 1D1D recipe, added into D");
};

// The tile's first SFB row (of all experts' [G * ceil(N/128), ceil(K/128)] rows).
__device__ __forceinline__ u32 sfb_first_row(const Tile& tile, u32 block_n, u32 n) {
    return tile.group * ceil_div(n, 128u) + tile.n_block * block_n / 128;
}

// Flat index (SFB seen as one row) of the first scale of the tile's first SFB row; the producer's
// boxes and the consumer's lookups must agree on it.
__device__ __forceinline__ u32 sfb_first_index(const Tile& tile, u32 block_n, u32 n, u32 num_k_blocks) {
    return sfb_first_row(tile, block_n, n) * num_k_blocks;
}

// The scales of one K block for this thread: SFA of its two rows, and SFB of its columns 8g + 2 (lane %
// 4) and the next, of each group g of 8 (kColumnGroups, the 1D1D recipe), or of the tile's (up to)
// two 128-column blocks.
template <u32 kColumnGroups>
struct BlockScales {
    float a0, a1;
    float columns[kColumnGroups][2];
};
template <>
struct BlockScales<0> {
    float a0, a1, b0, b1;
};

// For each of a tile's SFB rows, the flat index of its first scale modulo the box width: added to a
// K block (modulo the width again) it gives where that block's scale sits in the stage's box of the
// row, whose start the producer aligned down. row1_offset: floats from the stage's SFB slot to the
// second row's box.
struct SfbShifts {
    u32 row0, row1, row1_offset;
};

// The FP8 policy of the sm90 GEMM skeleton (the hooks are described in sm90/gemm.cuh).
template <class Config_>
struct Fp8GemmKernel {
    using Config = Config_;
    using Params = Fp8GemmParams;
    using Epilogue = typename TmaEpilogueOf<Config::kAccumulate>::type;
    static constexpr u32 BM = Config::kBlockM, BN = Config::kBlockN, kAcc = BN / 2;

    __device__ __forceinline__ static void prefetch_descriptors(const Params& p) {
        tma_prefetch_descriptor(&p.tma_a);
        tma_prefetch_descriptor(&p.tma_b);
        tma_prefetch_descriptor(&p.tma_sfa);
        tma_prefetch_descriptor(&p.tma_d);
        tma_prefetch_descriptor(&p.tma_sfb);
    }

    // ---- producer: the scales of each stage --------------------------------------------------------

    struct ProducerTile {
        // SFA box coordinates of the tile's rows (without the K block); kSfbPerColumn's SFB shares
        // the K coordinate
        int sfa_row, sfa_k;
        u32 sfb_row;  // sfb_first_index, or kSfbPerColumn's first column
    };

    __device__ __forceinline__ static ProducerTile producer_tile(const Params& p, const Tile& tile, u32 num_k_blocks) {
        // SFA is [ceil(K/128), rows] M-major, per expert (product) for kMasked (kBatched); kKGrouped's
        // [sum_K / 128, M] and SFB's [sum_K / 128, N] hold the experts' K blocks back to back.
        const bool per_group = Config::kType == GemmType::kMasked || Config::kType == GemmType::kBatched;
        ProducerTile t;
        t.sfa_row = per_group ? tile.m_block * BM : tile.row;
        t.sfa_k = per_group ? tile.group * num_k_blocks
                            : Config::kType == GemmType::kKGrouped ? tile.k_first / Config::kBlockK : 0;
        t.sfb_row = Config::kSfbPerColumn ? tile.n_block * BN : sfb_first_index(tile, BN, p.n, num_k_blocks);
        return t;
    }

    __device__ __forceinline__ static void load_stage_extras(const Params& p, const ProducerTile t, const Tile& tile,
                                                             u32 num_k_blocks, u32 k_block, u32 s, Barrier* full,
                                                             u8* smem_extra) {
        float* smem_sfa = reinterpret_cast<float*>(smem_extra);
        float* smem_sfb = smem_sfa + Config::kStages * BM;
        tma_load_2d(smem_sfa + s * BM, &p.tma_sfa, full, t.sfa_row, t.sfa_k + k_block);
        if constexpr (Config::kSfbPerColumn) {
            tma_load_2d(smem_sfb + s * Config::kSfbSlotBytes / 4, &p.tma_sfb, full, int(t.sfb_row),
                        t.sfa_k + int(k_block));
        } else if (Config::kSfbRows == 2 && p.sfb_box_rows == 2) {
            tma_load_2d(smem_sfb + s * Config::kSfbSlotBytes / 4, &p.tma_sfb, full,
                        k_block / Config::kSfbBoxK * Config::kSfbBoxK, sfb_first_row(tile, BN, p.n));
        } else {
#pragma unroll
            for (u32 r = 0; r < Config::kSfbRows; ++r) {
                const u32 index = t.sfb_row + r * num_k_blocks + k_block;
                tma_load_2d(smem_sfb + (s * Config::kSfbSlotBytes + r * Config::kSfbRowSlotBytes) / 4, &p.tma_sfb,
                            full, index / Config::kSfbBoxK * Config::kSfbBoxK, 0);
            }
        }
    }

    // ---- math warpgroups: WGMMAs into scratch accumulators, promotion into the totals ---------------

    // Per tile: where the tile's SFB scales sit in the stages' SFB boxes. boundary: the tile's first
    // column of the second SFB block (columns at or past it take the second SFB row's scale).
    struct TileScales {
        u32 boundary;
        SfbShifts sfb_shifts;
    };

    __device__ __forceinline__ static TileScales begin_tile(const Params& p, const Tile& tile,
                                                            const u32& num_k_blocks) {
        TileScales t;
        const u32 n0 = tile.n_block * BN;
        t.boundary = (n0 / 128 + 1) * 128 - n0;
        const u32 sfb_row = sfb_first_index(tile, BN, p.n, num_k_blocks);
        t.sfb_shifts = SfbShifts{sfb_row % Config::kSfbBoxK, (sfb_row + num_k_blocks) % Config::kSfbBoxK,
                                 p.sfb_box_rows == 2 ? Config::kSfbBoxK : Config::kSfbRowSlotBytes / 4};
        // Broadcast, so that the compiler knows them warp-uniform and keeps them in uniform registers
        // instead of recomputing them every K block (the accumulators leave few ordinary ones).
        t.boundary = broadcast(t.boundary);
        t.sfb_shifts.row0 = broadcast(t.sfb_shifts.row0);
        t.sfb_shifts.row1 = broadcast(t.sfb_shifts.row1);
        t.sfb_shifts.row1_offset = broadcast(t.sfb_shifts.row1_offset);
        return t;
    }

    using Scales = BlockScales<Config::kSfbPerColumn ? kAcc / 4 : 0>;

    // Wait for the stage of K block `k_block` (unless `wait_full` is false: a later slab's issue on a
    // stage already waited for), read its scales, and issue its four WGMMAs into `scratch`.
    // desc_a / desc_b: descriptors of stage 0's tiles (A's at this slab's rows).
    __device__ __forceinline__ static Scales issue(const TileScales& t, u32 k_block, u32 stage, u32 phase, u64 desc_a,
                                                   u64 desc_b, const u8* smem_extra, Barrier* full, u32 sfa_row,
                                                   float* scratch, bool wait_full = true) {
        const float* smem_sfa = reinterpret_cast<const float*>(smem_extra);
        const float* smem_sfb = smem_sfa + Config::kStages * BM;
        Scales scales;
        if (wait_full) full[stage].wait(phase);
        scales.a0 = smem_sfa[stage * BM + sfa_row];
        scales.a1 = smem_sfa[stage * BM + sfa_row + 8];
        const float* sfb = smem_sfb + stage * Config::kSfbSlotBytes / 4;
        // Read before the WGMMAs are issued, so that the reads' latency passes under them.
        if constexpr (Config::kSfbPerColumn) {
            const u32 columns = smem_addr(sfb) + 2 * (lane_id() % 4) * 4;
#pragma unroll
            for (u32 g = 0; g < kAcc / 4; ++g)
                ld_shared_v2_f32(columns + 8 * g * 4, scales.columns[g][0], scales.columns[g][1]);
        } else {
            scales.b0 = sfb[(k_block + t.sfb_shifts.row0) % Config::kSfbBoxK];
            scales.b1 = Config::kUniformSfb
                            ? scales.b0
                            : sfb[t.sfb_shifts.row1_offset + (k_block + t.sfb_shifts.row1) % Config::kSfbBoxK];
        }
        issue_wgmmas(stage, desc_a, desc_b, scratch);
        return scales;
    }

    // The K block's four WGMMAs on stage `stage`'s tiles into `scratch`, committed as one group.
    __device__ __forceinline__ static void issue_wgmmas(u32 stage, u64 desc_a, u64 desc_b, float* scratch) {
        desc_a = smem_descriptor_advance(desc_a, stage * Config::kTileABytes);
        desc_b = smem_descriptor_advance(desc_b, stage * Config::kTileBBytes);
        // No register fence here: touching one scratch buffer while the other's WGMMAs are in flight
        // makes ptxas serialize every WGMMA (warning C7514); the asm operands already order the
        // promotion's reads before these writes.
        wgmma_fence();
#pragma unroll
        for (u32 kk = 0; kk < Config::kBlockK / 32; ++kk) {
            WgmmaFp8<BN>::mma(smem_descriptor_advance(desc_a, kk * 32), smem_descriptor_advance(desc_b, kk * 32),
                              scratch, kk > 0);
        }
        wgmma_commit();
    }

    // After the WGMMAs of a stage have retired: release the stage (kRelease: the last slab's WGMMAs
    // on it) and add the scaled scratch into the totals (the promotion to FP32).
    template <bool kRelease = true>
    __device__ __forceinline__ static void retire(const TileScales& t, u32 stage, const Scales& scales,
                                                  float* scratch, float* totals, Barrier* empty, u32 peer) {
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i) fence_register(scratch[i]);
        if constexpr (kRelease) consumer_release_stage<Config>(empty, stage, peer);
        if constexpr (Config::kSfbPerColumn) {
#pragma unroll
            for (u32 i = 0; i < kAcc; ++i)
                totals[i] += ((i / 2) % 2 ? scales.a1 : scales.a0) * scales.columns[i / 4][i % 2] * scratch[i];
        } else {
            // Tiles start at multiples of BLOCK_N, so the SFB boundary is a multiple of kScaleRun: each
            // run of kScaleRun columns has one scale per row, chosen once, and the first run (boundary
            // >= kScaleRun) and runs at or past column 128 (boundary <= 128) need no choice at all.
            constexpr u32 kRun = Config::kScaleRun, kRuns = BN / kRun;
            float run_scale[2][kRuns];
#pragma unroll
            for (u32 r = 0; r < kRuns; ++r) {
                const bool next_block =
                    !Config::kUniformSfb && (r * kRun >= 128 || (r > 0 && r * kRun >= t.boundary));
                run_scale[0][r] = scales.a0 * (next_block ? scales.b1 : scales.b0);
                run_scale[1][r] = scales.a1 * (next_block ? scales.b1 : scales.b0);
            }
#pragma unroll
            for (u32 i = 0; i < kAcc; ++i)
                totals[i] += run_scale[(i / 2) % 2][(i / 4) * 8 / kRun] * scratch[i];
        }
    }
};

template <class Config>
__device__ __forceinline__ void sm90_fp8_gemm(const Fp8GemmParams& p) {
    sm90_gemm<Fp8GemmKernel<Config>>(p);
}

}  // namespace moegemm
