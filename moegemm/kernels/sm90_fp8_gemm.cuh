// FP8 GEMM with fine-grained scaling on sm_90a: D[M, N] (+)= (A * SFA) @ (B * SFB)^T, and the MoE
// grouped forms (GemmType in sm90/scheduler.cuh): D rows of expert g = A rows of expert g @ B[g]^T.
//
// A: e4m3 [M, K] K-major, SFA: fp32, one per 1x128 block of a row, stored M-major [ceil(K/128), M'].
// B: e4m3 [N, K] K-major, SFB: fp32, one per 128x128 block, [ceil(N/128), ceil(K/128)] row-major.
// D: bf16 or fp32 [M, N]; with kAccumulate the TMA unit adds the tile into D (D = C + A @ B^T).
// Grouped: B [G * N, K] and SFB [G, ceil(N/128), ceil(K/128)]; kMasked A, SFA and D hold G
// experts of max_M rows each. A tile's rows that must stay untouched (padding, rows past an
// expert's count) make its warpgroups store row by row from registers instead of through TMA; in
// kMasked, a warpgroup whose 64 rows all lie past the expert's count skips the tile's math.
//
// Warp roles (kNumMathWarpgroups + 1 warpgroups, persistent grid, one CTA per SM):
//   warpgroups 0..kNumMathWarpgroups-1  math: each owns 64 rows of the BLOCK_M x BLOCK_N tile
//                                       (BLOCK_M 64, 128 or 192: with three, each B tile loaded
//                                       serves 192 rows, and a masked expert of 129 to 192 rows fits
//                                       one block).
//   last warpgroup                      producer: its first thread issues every TMA load.
// Stage ring of kStages shared-memory slots, each holding a 128-wide K slice of A, B and SFA, and
// the SFB of the tile's one or two 128-column blocks (all scales arrive by TMA with the data, so the
// math warps never wait on a global load):
//   full[s]   count 1: the producer's arrive_expect_tx; completes when the TMA bytes have landed.
//   empty[s]  count kClusterM * kNumMathThreads / 32: lane 0 of every math warp of every CTA in the
//             cluster arrives once its WGMMAs on the slot have retired; the producer waits on it
//             before refilling the slot.
// Split-K (kSplitK > 1, for few tiles): a cluster of kSplitK CTAs shares a tile, CTA r taking the
// r-th run of K blocks. The partial tiles are then reduced through distributed shared memory:
// CTA r owns columns [r, r + 1) * BLOCK_N / kSplitK of the tile, receives the other CTAs' partial
// sums of those columns (from the 16-row warps whose rows exist) into its reduce buffer, adds all of
// them in split order (deterministic) and stores them. Per math warpgroup: the senders'
// asynchronous remote stores (st.async) complete the transaction bytes of the owner's reduce_full
// (its wait makes the data visible, no fences), and reduce_free counts the owners' arrivals (they
// have read the buffer: the next tile's partials may overwrite it).
// With kClusterM == 2 the two CTAs of a cluster compute vertically adjacent tiles with the same B
// tile: each loads half of B's rows and multicasts them into both CTAs' slots, halving B's L2
// traffic (kMasked: on an expert of one block-row the pair takes adjacent column blocks instead, each
// CTA loading its own B; Tile::shares_b). A slot may then be refilled only when both CTAs have
// released it, hence the cluster-wide empty barrier; before exiting, the producer drains the ring so
// no remote arrive targets an exited CTA.
// Per 128-wide K slice a math warpgroup issues four m64nNk32 WGMMAs into a scratch accumulator,
// waits for them, releases the slot, and adds the scratch times SFA (per row) times SFB (per
// 128-column block) into FP32 totals: the promotion that keeps FP8 accumulation error bounded.
// With two scratch accumulators (kDoubleBuffer) the next slice's WGMMAs are issued before the
// current one is promoted (H100: 1-2% faster at M = 4096 with four slices per loop trip than two).
// Epilogue: totals -> shared memory in the layout the D descriptor expects (128-byte swizzled
// chunks, or one plain chunk for narrow tiles) -> TMA store issued by one thread per warpgroup,
// overlapping the next tile's main loop; named barrier 1 + warpgroup guards the buffer. It runs once
// the next tile's first WGMMAs are issued, so the tensor cores have work meanwhile (H200, A/B:
// 4096 x 2112 x 7168 8% faster, 1-3% elsewhere).
#pragma once
#include <moegemm/mma/wgmma.cuh>
#include <moegemm/ptx.cuh>
#include <moegemm/sm90/scheduler.cuh>

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
};

template <u32 kBlockM_, u32 kBlockN_, u32 kStages_, u32 kClusterM_, u32 kSplitK_, bool kOutFp32_, bool kAccumulate_,
          GemmType kType_ = GemmType::kNormal>
struct Fp8GemmConfig {
    static constexpr GemmType kType = kType_;
    static constexpr u32 kBlockM = kBlockM_, kBlockN = kBlockN_, kBlockK = 128, kStages = kStages_;
    static constexpr u32 kClusterM = kClusterM_, kSplitK = kSplitK_, kClusterSize = kClusterM * kSplitK;
    static constexpr bool kOutFp32 = kOutFp32_, kAccumulate = kAccumulate_;
    static constexpr u32 kNumMathWarpgroups = kBlockM / 64;
    static constexpr u32 kNumMathThreads = 128 * kNumMathWarpgroups;
    static constexpr u32 kNumThreads = kNumMathThreads + 128;
    // Register split after setmaxnreg: the producer needs few; the totals must fit the math warps
    // (64K registers per SM: 128 x 40 + 384 x 152 with three math warpgroups).
    static constexpr u32 kProducerRegisters = 40;
    static constexpr u32 kMathRegisters = kNumMathWarpgroups == 1 ? 240 : kNumMathWarpgroups == 2 ? 232 : 152;

    static constexpr u32 kOutBytes = kOutFp32 ? 4 : 2;
    static constexpr u32 kChunkCols = 128 / kOutBytes;
    // Columns of the tile this CTA stores: its slice under split-K.
    static constexpr u32 kOutCols = kBlockN / kSplitK;
    static constexpr bool kSwizzleD = kOutCols >= kChunkCols;
    static constexpr u32 kStoreCols = kSwizzleD ? kChunkCols : kOutCols;
    // A tile never straddles two 128-wide SFB blocks when BLOCK_N divides 128.
    static constexpr bool kUniformSfb = 128 % kBlockN == 0;
    // Columns that share their SFB scale in every tile: gcd(BLOCK_N, 128).
    static constexpr u32 kScaleRun = (kBlockN & (0u - kBlockN)) < 128 ? (kBlockN & (0u - kBlockN)) : 128;
    // Two scratch accumulators fit the math warps' registers up to BLOCK_N = 128; with three math
    // warpgroups (152 registers each) only one does.
    static constexpr bool kDoubleBuffer = kBlockN <= 128 && kNumMathWarpgroups < 3;
    // kMasked with two or three math warpgroups: a warpgroup skips the tiles whose rows all lie past
    // its expert's count (at 192 rows per expert in 128-row blocks, the second block's tiles do half
    // the work). Only there: in the other kinds such slabs are rare (M's last block, an expert's last
    // block), and the branch costs a grouped main loop its uniform registers (ptxas cannot prove the
    // warps converged: contiguous SASS IMAD 134 -> 250), the dense kernels their current schedule
    // (H200, dense 192-row tiles: no faster at 4096 x 7168 x 16384).
    static constexpr bool kSkipIdleSlabs = kType == GemmType::kMasked && kNumMathWarpgroups >= 2;
    // A tile's epilogue waits until the next tile's first WGMMAs are in flight. Not where registers
    // cannot hold a scratch accumulator beside the totals being stored (three math warpgroups; grouped
    // tiles over 128 columns, which also keep an expert and a row limit live): ptxas would spill. Not
    // under split-K, where a CTA may have no K blocks: a WGMMA issued under a condition makes ptxas
    // serialize them all (C7514).
    static constexpr bool kDeferEpilogue =
        kNumMathWarpgroups < 3 && (kType == GemmType::kNormal || kBlockN <= 128) && kSplitK == 1;

    static constexpr u32 kTileABytes = kBlockM * kBlockK;
    static constexpr u32 kTileBBytes = kBlockN * kBlockK;
    static constexpr u32 kTileSfaBytes = kBlockM * 4;
    // SFB rows a tile needs, each a TMA box of SFB seen as one flat row (its rows need not be 16
    // bytes apart, as a 2-D view's would): boxes start at 16-byte aligned elements and are 16 bytes
    // wide, so each holds the aligned quad of scales around the one wanted. Slots are aligned as TMA
    // destinations must be. Where the rows are 16-byte aligned, one 2-D box brings both rows into
    // the first slot (H100, A/B: BLOCK_N 192 at 4096 x 2112 x 7168 129 us so, 135 us with two boxes).
    static constexpr u32 kSfbRows = kUniformSfb ? 1 : 2;
    static constexpr u32 kSfbBoxK = 4;
    static constexpr u32 kSfbRowSlotBytes = 128;
    static constexpr u32 kSfbSlotBytes = kSfbRowSlotBytes * kSfbRows;
    static constexpr u32 kStageBytes = kTileABytes + kTileBBytes + kTileSfaBytes + kSfbSlotBytes;
    static constexpr u32 kSmemDBytes = kBlockM * kOutCols * kOutBytes;
    // Split-K reduce buffer, per math warpgroup: one slot per sender, holding each thread's 16-byte
    // pieces (four floats of an 8-column group) thread-contiguous, so accesses are conflict-free.
    static constexpr u32 kReduceSlotBytes = kOutCols / 8 * 128 * 16;
    static constexpr u32 kReduceWarpBytes = kReduceSlotBytes / 4;  // one warp's pieces of a slot
    static constexpr u32 kReduceBytes = kSplitK > 1 ? kNumMathWarpgroups * (kSplitK - 1) * kReduceSlotBytes : 0;
    static constexpr u32 kNumBarriers = 2 * kStages + (kSplitK > 1 ? 2 * kNumMathWarpgroups : 0);
    static constexpr u32 kSmemBytes =
        kSmemDBytes + kStages * kStageBytes + kReduceBytes + kNumBarriers * sizeof(Barrier);

    static_assert(kBlockM == 64 || kBlockM == 128 ||
                      (kBlockM == 192 && kBlockN <= 128 && kSplitK == 1 &&
                       (kType == GemmType::kNormal || kType == GemmType::kMasked)),
                  "BLOCK_M is 64 or 128 (one or two math warpgroups), or 192 (three: BLOCK_N <= 128, no "
                  "split-K, not for the contiguous kinds, whose experts are 128-row aligned)");
    static_assert(kBlockN % 8 == 0 && kBlockN >= 8 && kBlockN <= 256, "WGMMA needs N in [8, 256], N % 8 == 0");
    static_assert(!kSwizzleD || kOutCols % kChunkCols == 0, "wide tiles store whole 128-byte chunks");
    static_assert(kBlockN % (8 * kSplitK) == 0, "split-K slices are whole 8-column groups");
    static_assert(kSplitK >= 1 && kSplitK <= 8 && (kClusterM == 1 || kSplitK == 1), "portable clusters of <= 8");
    static_assert(kType == GemmType::kNormal || (kSplitK == 1 && !kAccumulate), "grouped: no split-K, no C");
    static_assert(kType == GemmType::kNormal || kType == GemmType::kMasked || kClusterM == 1,
                  "contiguous kinds: no multicast");
    static_assert(kBlockN <= 128 || kBlockN % 128 == 0 || kBlockN <= 128 + (kBlockN & (0u - kBlockN)),
                  "a tile may span at most two 128-wide SFB blocks");
    // 128-byte-swizzled tiles need 1024-byte alignment; the layout below keeps every A/B/D tile so.
    static_assert(kSmemDBytes % 1024 == 0 && kTileABytes % 1024 == 0 && kTileBBytes % 1024 == 0);
    static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a block may use");
    static_assert(kClusterM == 1 || (kClusterM == 2 && kBlockN % 16 == 0),
                  "multicast halves of B must stay 1024-byte aligned (8-row swizzle groups)");
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

// Whether this warpgroup's 64-row slab of the tile lies wholly at or past the rows that may be
// written: it has nothing to compute. A warp vote, so that the compiler knows it warp-uniform.
__device__ __forceinline__ bool fp8_gemm_slab_idle(const Tile& tile, u32 wg) {
    return __all_sync(0xffffffffu, tile.row + wg * 64 >= tile.row_limit);
}

template <class Config>
__device__ __forceinline__ void fp8_gemm_producer(const Fp8GemmParams& p, u8* smem_a, u8* smem_b,
                                                  float* smem_sfa, float* smem_sfb, Barrier* full, Barrier* empty) {
    constexpr u32 BM = Config::kBlockM, BN = Config::kBlockN;
    constexpr u32 kCluster = Config::kClusterM;
    constexpr u32 kSliceRows = BN / kCluster;
    TileScheduler<Config::kType, BM, BN, kCluster, Config::kSplitK> scheduler(p.m, p.n, p.groups, p.num_groups);
    const u32 num_k_blocks = ceil_div(p.k, Config::kBlockK);
    u32 k_begin, k_end;
    scheduler.k_range(num_k_blocks, p.k_blocks_per_split, k_begin, k_end);
    const u32 rank = kCluster > 1 ? cluster_cta_rank() : 0;
    StageRing<Config::kStages> ring;
    for (Tile tile; scheduler.next(tile);) {
        const int b_row = tile.group * p.n + tile.n_block * BN;
        // SFA is [ceil(K/128), rows] M-major, per expert for kMasked.
        const bool masked = Config::kType == GemmType::kMasked;
        const int sfa_row = masked ? tile.m_block * BM : tile.row;
        const int sfa_k = masked ? tile.group * num_k_blocks : 0;
        const u32 sfb_row = sfb_first_index(tile, BN, p.n, num_k_blocks);
        for (u32 k_block = k_begin; k_block < k_end; ++k_block, ring.advance()) {
            const u32 s = ring.stage;
            empty[s].wait(ring.phase ^ 1);
            full[s].arrive_expect_tx(p.stage_bytes);
            const int k = k_block * Config::kBlockK;
            tma_load_2d(smem_a + s * Config::kTileABytes, &p.tma_a, &full[s], k, tile.row);
            u8* slice_b = smem_b + s * Config::kTileBBytes + rank * kSliceRows * Config::kBlockK;
            if constexpr (kCluster > 1) {
                if (tile.shares_b) {
                    tma_load_2d_multicast(slice_b, &p.tma_b, &full[s], k, b_row + rank * kSliceRows,
                                          (1u << kCluster) - 1);
                } else {
                    // This CTA's own column block: every slice of it, loaded here alone.
#pragma unroll
                    for (u32 r = 0; r < kCluster; ++r)
                        tma_load_2d(smem_b + s * Config::kTileBBytes + r * kSliceRows * Config::kBlockK, &p.tma_b,
                                    &full[s], k, b_row + r * kSliceRows);
                }
            } else {
                tma_load_2d(slice_b, &p.tma_b, &full[s], k, b_row);
            }
            tma_load_2d(smem_sfa + s * BM, &p.tma_sfa, &full[s], sfa_row, sfa_k + k_block);
            if (Config::kSfbRows == 2 && p.sfb_box_rows == 2) {
                tma_load_2d(smem_sfb + s * Config::kSfbSlotBytes / 4, &p.tma_sfb, &full[s],
                            k_block / Config::kSfbBoxK * Config::kSfbBoxK, sfb_first_row(tile, BN, p.n));
            } else {
#pragma unroll
                for (u32 r = 0; r < Config::kSfbRows; ++r) {
                    const u32 index = sfb_row + r * num_k_blocks + k_block;
                    tma_load_2d(smem_sfb + (s * Config::kSfbSlotBytes + r * Config::kSfbRowSlotBytes) / 4,
                                &p.tma_sfb, &full[s], index / Config::kSfbBoxK * Config::kSfbBoxK, 0);
                }
            }
        }
    }
    if constexpr (kCluster > 1) {
        for (u32 s = 0; s < Config::kStages; ++s, ring.advance()) empty[ring.stage].wait(ring.phase ^ 1);
    }
}

// Write one warpgroup's 64 x kOutCols totals (columns [slice, slice + 1) * kOutCols of the tile)
// into its shared-memory slice, laid out as the D descriptor's boxes: chunks of kStoreCols
// columns, 128-byte swizzled when kSwizzleD.
template <class Config>
__device__ __forceinline__ void fp8_gemm_stage_output(const float* totals, u8* smem_d_wg, u32 slice) {
    constexpr u32 kChunkBytes = 64 * Config::kStoreCols * Config::kOutBytes;
    const u32 lane = lane_id(), warp_in_wg = warp_id() % 4;
    const u32 base = smem_addr(smem_d_wg);
#pragma unroll
    for (u32 i = 0; i < Config::kBlockN / 2; i += 2) {
        if ((i / 4) * 8 / Config::kOutCols != slice) continue;
        const u32 row = warp_in_wg * 16 + lane / 4 + ((i / 2) % 2) * 8;
        const u32 col = (i / 4) * 8 % Config::kOutCols + (lane % 4) * 2;
        const u32 chunk = col / Config::kStoreCols;
        const u32 byte = (col % Config::kStoreCols) * Config::kOutBytes;
        u32 offset;
        if constexpr (Config::kSwizzleD)
            offset = row * 128 + ((((byte >> 4) ^ (row & 7)) << 4) | (byte & 15));
        else
            offset = row * Config::kStoreCols * Config::kOutBytes + byte;
        const u32 address = base + chunk * kChunkBytes + offset;
        if constexpr (Config::kOutFp32)
            st_shared_v2_f32(address, totals[i], totals[i + 1]);
        else
            st_shared_u32(address, pack_bf16x2(totals[i], totals[i + 1]));
    }
}

// The scales of one K block for this thread: SFA of its two rows, SFB of the tile's (up to) two
// 128-column blocks.
struct BlockScales {
    float a0, a1, b0, b1;
};

// For each of a tile's SFB rows, the flat index of its first scale modulo the box width: added to a
// K block (modulo the width again) it gives where that block's scale sits in the stage's box of the
// row, whose start the producer aligned down. row1_offset: floats from the stage's SFB slot to the
// second row's box.
struct SfbShifts {
    u32 row0, row1, row1_offset;
};

// Wait for the stage of K block `k_block`, read its scales, and issue its four WGMMAs into `scratch`.
// desc_a / desc_b: descriptors of stage 0's tiles (A's at this warpgroup's rows); adding the stage
// and K offsets to them is cheaper than building descriptors from addresses.
template <class Config>
__device__ __forceinline__ BlockScales fp8_gemm_issue(u32 k_block, SfbShifts sfb_shifts, u32 stage, u32 phase,
                                                      u64 desc_a, u64 desc_b,
                                                      const float* smem_sfa, const float* smem_sfb, Barrier* full,
                                                      u32 sfa_row, float* scratch) {
    BlockScales scales;
    full[stage].wait(phase);
    scales.a0 = smem_sfa[stage * Config::kBlockM + sfa_row];
    scales.a1 = smem_sfa[stage * Config::kBlockM + sfa_row + 8];
    const float* sfb = smem_sfb + stage * Config::kSfbSlotBytes / 4;
    scales.b0 = sfb[(k_block + sfb_shifts.row0) % Config::kSfbBoxK];
    scales.b1 = Config::kUniformSfb
                    ? scales.b0
                    : sfb[sfb_shifts.row1_offset + (k_block + sfb_shifts.row1) % Config::kSfbBoxK];
    desc_a = smem_descriptor_advance(desc_a, stage * Config::kTileABytes);
    desc_b = smem_descriptor_advance(desc_b, stage * Config::kTileBBytes);
    // No register fence here: touching one scratch buffer while the other's WGMMAs are in flight
    // makes ptxas serialize every WGMMA (warning C7514); the asm operands already order the
    // promotion's reads before these writes.
    wgmma_fence();
#pragma unroll
    for (u32 kk = 0; kk < Config::kBlockK / 32; ++kk) {
        WgmmaFp8<Config::kBlockN>::mma(smem_descriptor_advance(desc_a, kk * 32),
                                       smem_descriptor_advance(desc_b, kk * 32), scratch, kk > 0);
    }
    wgmma_commit();
    return scales;
}

// After the WGMMAs of a stage have retired: release the stage and add the scaled scratch into the
// totals (the promotion to FP32).
template <class Config>
__device__ __forceinline__ void fp8_gemm_retire(u32 stage, const BlockScales& scales, float* scratch, float* totals,
                                                u32 boundary, Barrier* empty, u32 peer) {
#pragma unroll
    for (u32 i = 0; i < Config::kBlockN / 2; ++i) fence_register(scratch[i]);
    if (lane_id() == 0) {
        empty[stage].arrive();
        if constexpr (Config::kClusterM > 1) empty[stage].arrive_cluster(peer);
    }
    // Tiles start at multiples of BLOCK_N, so the SFB boundary is a multiple of kScaleRun: each run of
    // kScaleRun columns has one scale per row, chosen once, and the first run (boundary >= kScaleRun)
    // and runs at or past column 128 (boundary <= 128) need no choice at all.
    constexpr u32 kRun = Config::kScaleRun, kRuns = Config::kBlockN / kRun;
    float run_scale[2][kRuns];
#pragma unroll
    for (u32 r = 0; r < kRuns; ++r) {
        const bool next_block = !Config::kUniformSfb && (r * kRun >= 128 || (r > 0 && r * kRun >= boundary));
        run_scale[0][r] = scales.a0 * (next_block ? scales.b1 : scales.b0);
        run_scale[1][r] = scales.a1 * (next_block ? scales.b1 : scales.b0);
    }
#pragma unroll
    for (u32 i = 0; i < Config::kBlockN / 2; ++i) totals[i] += run_scale[(i / 2) % 2][(i / 4) * 8 / kRun] * scratch[i];
}

// The warpgroup of an idle slab still keeps pace with the stage ring, whose empty barriers count
// every math warp: it releases each stage once the stage has landed, leaving the tensor cores to
// the other warpgroup.
template <class Config, class Ring>
__device__ __forceinline__ void fp8_gemm_pass_stages(u32 num_k_blocks, Ring& ring, Barrier* full, Barrier* empty,
                                                     u32 peer) {
    for (u32 i = 0; i < num_k_blocks; ++i, ring.advance()) {
        full[ring.stage].wait(ring.phase);
        if (lane_id() == 0) {
            empty[ring.stage].arrive();
            if constexpr (Config::kClusterM > 1) empty[ring.stage].arrive_cluster(peer);
        }
    }
}

// Split-K: sum the cluster's partial tiles into this CTA's column slice (see the top of the file).
// `y` is the warpgroup's first row; `round` counts the tiles this CTA has reduced before. Only the
// warps of the warpgroup that hold rows of D (16 each) exchange: the others send, wait for and add
// nothing (at M = 1 a quarter of the traffic). At least one warp exchanges in every round, even with
// no rows: waiting for a peer's bytes keeps the cluster's CTAs within a round of each other. Without
// it a CTA could arrive twice on a peer's reduce_free before the peer waits once, and the parity the
// peer polls would never show completion.
template <class Config>
__device__ __forceinline__ void fp8_gemm_reduce_split_k(float* totals, const Tile& tile, u32 y, u32 reduce_wg,
                                                        Barrier& reduce_full, Barrier& reduce_free, u32 rank,
                                                        u32 round) {
    constexpr u32 S = Config::kSplitK, kGroups = Config::kOutCols / 8;
    const u32 thread_offset = threadIdx.x % 128 * 16;
    auto piece = [&](u32 slot, u32 group) { return reduce_wg + (slot * kGroups + group) * 128 * 16 + thread_offset; };
    const u32 row_warps = tile.row_limit > y ? min(4u, ceil_div(tile.row_limit - y, 16u)) : 1;
    const bool has_rows = warp_id() % 4 < row_warps;
    // The owners must have read the previous tile's partials before they are overwritten.
    if (round > 0) reduce_free.wait((round - 1) & 1);
    if (threadIdx.x % 128 == 0) reduce_full.arrive_expect_tx((S - 1) * Config::kReduceWarpBytes * row_warps);
#pragma unroll
    for (u32 owner = 0; owner < S; ++owner) {
        if (owner == rank || !has_rows) continue;
        const u32 slot = rank - (rank > owner);
#pragma unroll
        for (u32 g = 0; g < kGroups; ++g) {
            const float* v = totals + (owner * kGroups + g) * 4;
            st_async_cluster_v4_f32(piece(slot, g), &reduce_full, owner, v[0], v[1], v[2], v[3]);
        }
    }
    if (has_rows) reduce_full.wait(round & 1);
#pragma unroll
    for (u32 owner = 0; owner < S; ++owner) {
        if (owner != rank || !has_rows) continue;
#pragma unroll
        for (u32 g = 0; g < kGroups; ++g) {
            float* mine = totals + (owner * kGroups + g) * 4;
            float sum[4], part[4];
#pragma unroll
            for (u32 split = 0; split < S; ++split) {
                if (split == owner) {
#pragma unroll
                    for (u32 j = 0; j < 4; ++j) part[j] = mine[j];
                } else {
                    ld_shared_v4_f32(piece(split - (split > owner), g), part);
                }
#pragma unroll
                for (u32 j = 0; j < 4; ++j) sum[j] = split == 0 ? part[j] : sum[j] + part[j];
            }
#pragma unroll
            for (u32 j = 0; j < 4; ++j) mine[j] = sum[j];
        }
    }
    // Every thread of the warpgroup has read its pieces; then one thread releases the buffer.
    named_barrier_sync(1 + threadIdx.x / 128, 128);
    if (threadIdx.x % 128 == 0) {
#pragma unroll
        for (u32 owner = 0; owner < S; ++owner)
            if (owner != rank) reduce_free.arrive_cluster(owner);
    }
}

// kContiguous: the experts of this thread's two rows of its warpgroup's 64-row slab at row y,
// requested when the tile starts so that its epilogue does not wait for them.
struct SlabRows {
    int group[2];

    template <class Config>
    __device__ __forceinline__ void load(const Fp8GemmParams& p, u32 y) {
        if constexpr (Config::kType == GemmType::kContiguous) {
            const u32 row = y + slab_row();
            group[0] = __ldg(p.groups + row);
            group[1] = __ldg(p.groups + row + 8);
        }
    }
};

// Grouped kinds: whether every row of the warpgroup's 64-row slab may be written (then TMA stores
// it); the warpgroup votes, each thread for its two rows.
template <class Config>
__device__ __forceinline__ bool fp8_gemm_slab_writable(const Tile& tile, u32 y, const SlabRows& rows) {
    bool writable = y + 64 <= tile.row_limit;
    if constexpr (Config::kType == GemmType::kContiguous)
        writable = writable && rows.group[0] == int(tile.group) && rows.group[1] == int(tile.group);
    return named_barrier_all(1 + threadIdx.x / 128, 128, writable);
}

// Store this thread's totals row by row straight from registers, skipping the rows that must stay
// untouched: rows past the tile's limit, and (kContiguous) rows of another expert or padding.
template <class Config>
__device__ __forceinline__ void fp8_gemm_store_rows(const Fp8GemmParams& p, const Tile& tile, const float* totals,
                                                    u32 y, u32 n0, const SlabRows& rows) {
    const u32 lane = lane_id(), first_row = y + slab_row();
#pragma unroll
    for (u32 half = 0; half < 2; ++half) {
        const u32 row = first_row + half * 8;
        bool writable = row < tile.row_limit;
        if constexpr (Config::kType == GemmType::kContiguous)
            writable = writable && rows.group[half] == int(tile.group);
        if (!writable) continue;
        u8* out = p.d + static_cast<u64>(row) * p.ld_d * Config::kOutBytes;
#pragma unroll
        for (u32 i = half * 2; i < Config::kBlockN / 2; i += 4) {
            const u32 col = n0 + (i / 4) * 8 + (lane % 4) * 2;  // even; N is even, so col + 1 < N too
            if (col >= p.n) continue;
            if constexpr (Config::kOutFp32)
                *reinterpret_cast<float2*>(out + col * 4) = make_float2(totals[i], totals[i + 1]);
            else
                *reinterpret_cast<u32*>(out + col * 2) = pack_bf16x2(totals[i], totals[i + 1]);
        }
    }
}

// Store this warpgroup's 64 rows of the tile: through shared memory and a TMA store that overlaps
// the next tile's main loop, or row by row (grouped kinds, a slab with rows that must stay untouched).
template <class Config>
__device__ __forceinline__ void fp8_gemm_epilogue(const Fp8GemmParams& p, const Tile& tile, const float* totals,
                                                  u8* smem_d_wg, u32 slice, const SlabRows& rows) {
    const u32 n0 = tile.n_block * Config::kBlockN;
    const u32 y = tile.row + threadIdx.x / 128 * 64;
    const bool store_issuer = threadIdx.x % 128 == 0;
    if constexpr (Config::kType != GemmType::kNormal) {
        if (!fp8_gemm_slab_writable<Config>(tile, y, rows)) {
            fp8_gemm_store_rows<Config>(p, tile, totals, y, n0, rows);
            return;
        }
    }

    // The previous tile's store must have read the buffer before it is overwritten.
    if (store_issuer) tma_store_wait_read();
    named_barrier_sync(1 + threadIdx.x / 128, 128);
    fp8_gemm_stage_output<Config>(totals, smem_d_wg, slice);
    fence_proxy_async();
    named_barrier_sync(1 + threadIdx.x / 128, 128);
    if (store_issuer) {
        constexpr u32 kChunkBytes = 64 * Config::kStoreCols * Config::kOutBytes;
#pragma unroll
        for (u32 chunk = 0; chunk < Config::kOutCols / Config::kStoreCols; ++chunk) {
            const int x = n0 + slice * Config::kOutCols + chunk * Config::kStoreCols;
            if (x >= int(p.n) || y >= tile.row_limit) break;
            if constexpr (Config::kAccumulate)
                tma_reduce_add_2d(&p.tma_d, smem_d_wg + chunk * kChunkBytes, x, int(y));
            else
                tma_store_2d(&p.tma_d, smem_d_wg + chunk * kChunkBytes, x, int(y));
        }
        tma_store_commit();
    }
}

template <class Config>
__device__ __forceinline__ void fp8_gemm_consumer(const Fp8GemmParams& p, u8* smem_d, const u8* smem_a,
                                                  const u8* smem_b, const float* smem_sfa, const float* smem_sfb,
                                                  Barrier* full, Barrier* empty, u8* smem_reduce,
                                                  Barrier* reduce_full, Barrier* reduce_free) {
    constexpr u32 BM = Config::kBlockM, BN = Config::kBlockN;
    constexpr u32 kAcc = BN / 2;
    TileScheduler<Config::kType, BM, BN, Config::kClusterM, Config::kSplitK, true> scheduler(p.m, p.n, p.groups,
                                                                                             p.num_groups);
    const u32 num_k_blocks = ceil_div(p.k, Config::kBlockK);
    u32 k_begin, k_end;
    scheduler.k_range(num_k_blocks, p.k_blocks_per_split, k_begin, k_end);
    const u32 rank = Config::kClusterSize > 1 ? cluster_cta_rank() : 0;
    const u32 peer = rank ^ 1;
    const u32 slice = Config::kSplitK > 1 ? rank : 0;
    u32 round = 0;
    const u32 wg = threadIdx.x / 128;
    const u32 sfa_row = wg * 64 + slab_row();
    const u64 desc_a = smem_descriptor_k_major_sw128(smem_a + wg * 64 * Config::kBlockK);
    const u64 desc_b = smem_descriptor_k_major_sw128(smem_b);
    u8* smem_d_wg = smem_d + wg * 64 * Config::kOutCols * Config::kOutBytes;
    const u32 reduce_wg = smem_addr(smem_reduce) + wg * (Config::kSplitK - 1) * Config::kReduceSlotBytes;

    // Two scratch accumulators when registers allow: the WGMMAs of the next K block run while
    // this one is promoted, so the tensor cores never wait for the promotion.
    float scratch0[kAcc], scratch1[Config::kDoubleBuffer ? kAcc : 1], totals[kAcc];
    StageRing<Config::kStages> ring;
    // A tile's epilogue is deferred until the next tile's first WGMMAs are in flight (kDeferEpilogue),
    // so the tensor cores work through it instead of waiting for it.
    Tile done;
    SlabRows done_rows;
    bool pending = false;
    auto flush_epilogue = [&]() {
        if (pending) fp8_gemm_epilogue<Config>(p, done, totals, smem_d_wg, slice, done_rows);
        pending = false;
    };
    for (Tile tile; scheduler.next(tile);) {
        if (Config::kSkipIdleSlabs && fp8_gemm_slab_idle(tile, wg)) {
            flush_epilogue();
            fp8_gemm_pass_stages<Config>(k_end - k_begin, ring, full, empty, peer);
            continue;
        }
        const u32 n0 = tile.n_block * BN;
        // Columns at or past `boundary` take the second SFB row's scale.
        const u32 boundary = (n0 / 128 + 1) * 128 - n0;
        const u32 sfb_row = sfb_first_index(tile, BN, p.n, num_k_blocks);
        const SfbShifts sfb_shifts{sfb_row % Config::kSfbBoxK, (sfb_row + num_k_blocks) % Config::kSfbBoxK,
                                   p.sfb_box_rows == 2 ? Config::kSfbBoxK : Config::kSfbRowSlotBytes / 4};
        const u32 y = tile.row + wg * 64;  // the warpgroup's first row
        SlabRows slab_rows{};  // filled by load() for kContiguous only
        slab_rows.load<Config>(p, y);
        u32 next_k_block = k_begin;  // of the next issue
        auto issue = [&](float* scratch) {
            const BlockScales scales = fp8_gemm_issue<Config>(next_k_block++, sfb_shifts, ring.stage, ring.phase,
                                                              desc_a, desc_b, smem_sfa, smem_sfb, full, sfa_row,
                                                              scratch);
            ring.advance();
            return scales;
        };
        auto retire = [&](u32 stage, const BlockScales& scales, float* scratch) {
            fp8_gemm_retire<Config>(stage, scales, scratch, totals, boundary, empty, peer);
        };

        // kDeferEpilogue: the first K block, then the previous tile's epilogue while its WGMMAs run.
        u32 k_block = k_begin;
        if constexpr (Config::kDeferEpilogue) {
            const u32 stage = ring.stage;
            const BlockScales scales = issue(scratch0);
            flush_epilogue();
#pragma unroll
            for (u32 i = 0; i < kAcc; ++i) totals[i] = 0.0f;
            wgmma_wait<0>();
            retire(stage, scales, scratch0);
            ++k_block;
        } else {
#pragma unroll
            for (u32 i = 0; i < kAcc; ++i) totals[i] = 0.0f;
        }

        if constexpr (Config::kDoubleBuffer) {
            // The two scratch accumulators alternate: each K block's WGMMAs are issued before the
            // previous block is promoted. No WGMMA stays in flight across a loop's back edge: ptxas
            // would serialize them all (C7514). So the main loop takes four K blocks per trip (one
            // promotion in four not overlapped), a second loop the remaining pairs. (Peeling the
            // second block too, to promote the first under it: H200, 1-1.5% slower at K = 2048,
            // 2% faster at K = 512.)
            for (; k_block + 4 <= k_end; k_block += 4) {
                u32 stage0 = ring.stage;
                BlockScales scales0 = issue(scratch0);
                u32 stage1 = ring.stage;
                BlockScales scales1 = issue(scratch1);
                wgmma_wait<1>();
                retire(stage0, scales0, scratch0);
                stage0 = ring.stage;
                scales0 = issue(scratch0);
                wgmma_wait<1>();
                retire(stage1, scales1, scratch1);
                stage1 = ring.stage;
                scales1 = issue(scratch1);
                wgmma_wait<1>();
                retire(stage0, scales0, scratch0);
                wgmma_wait<0>();
                retire(stage1, scales1, scratch1);
            }
            for (; k_block < k_end; k_block += 2) {
                const u32 stage0 = ring.stage;
                const BlockScales scales0 = issue(scratch0);
                if (k_block + 1 < k_end) {
                    const u32 stage1 = ring.stage;
                    const BlockScales scales1 = issue(scratch1);
                    wgmma_wait<1>();
                    retire(stage0, scales0, scratch0);
                    wgmma_wait<0>();
                    retire(stage1, scales1, scratch1);
                } else {
                    wgmma_wait<0>();
                    retire(stage0, scales0, scratch0);
                }
            }
        } else {
            for (; k_block < k_end; ++k_block) {
                const u32 stage = ring.stage;
                const BlockScales scales = issue(scratch0);
                wgmma_wait<0>();
                retire(stage, scales, scratch0);
            }
        }

        if constexpr (Config::kSplitK > 1)
            fp8_gemm_reduce_split_k<Config>(totals, tile, y, reduce_wg, reduce_full[wg], reduce_free[wg], rank,
                                            round++);

        done = tile;
        done_rows = slab_rows;
        pending = true;
        if constexpr (!Config::kDeferEpilogue) flush_epilogue();
    }
    flush_epilogue();
    // Shared memory must outlive the last store's reads, and the peers' last arrivals on this CTA's
    // reduce barriers.
    if (threadIdx.x % 128 == 0) tma_store_wait_all();
    if constexpr (Config::kSplitK > 1)
        if (round > 0) reduce_free[wg].wait((round - 1) & 1);
}

template <class Config>
__device__ __forceinline__ void sm90_fp8_gemm(const Fp8GemmParams& p) {
    extern __shared__ __align__(1024) u8 smem[];
    u8* smem_d = smem;
    u8* smem_a = smem_d + Config::kSmemDBytes;
    u8* smem_b = smem_a + Config::kStages * Config::kTileABytes;
    float* smem_sfa = reinterpret_cast<float*>(smem_b + Config::kStages * Config::kTileBBytes);
    float* smem_sfb = smem_sfa + Config::kStages * Config::kBlockM;
    u8* smem_reduce = reinterpret_cast<u8*>(smem_sfb + Config::kStages * Config::kSfbSlotBytes / 4);
    Barrier* full = reinterpret_cast<Barrier*>(smem_reduce + Config::kReduceBytes);
    Barrier* empty = full + Config::kStages;
    Barrier* reduce_full = empty + Config::kStages;
    Barrier* reduce_free = reduce_full + Config::kNumMathWarpgroups;

    if (threadIdx.x == Config::kNumMathThreads) {
        tma_prefetch_descriptor(&p.tma_a);
        tma_prefetch_descriptor(&p.tma_b);
        tma_prefetch_descriptor(&p.tma_sfa);
        tma_prefetch_descriptor(&p.tma_d);
        tma_prefetch_descriptor(&p.tma_sfb);
    }
    if (threadIdx.x == 0) {
#pragma unroll
        for (u32 s = 0; s < Config::kStages; ++s) {
            full[s].init(1);
            empty[s].init(Config::kClusterM * Config::kNumMathThreads / 32);
        }
        if constexpr (Config::kSplitK > 1) {
            for (u32 wg = 0; wg < Config::kNumMathWarpgroups; ++wg) {
                reduce_full[wg].init(1);
                reduce_free[wg].init(Config::kSplitK - 1);
            }
        }
        fence_barrier_init();
    }
    if constexpr (Config::kClusterSize > 1)
        cluster_sync();
    else
        __syncthreads();
    // With programmatic dependent launch, inputs written by the previous kernel are ready only now.
    grid_dependency_wait();

    if (threadIdx.x >= Config::kNumMathThreads) {
        warpgroup_reg_dealloc<Config::kProducerRegisters>();
        if (threadIdx.x == Config::kNumMathThreads)
            fp8_gemm_producer<Config>(p, smem_a, smem_b, smem_sfa, smem_sfb, full, empty);
    } else {
        warpgroup_reg_alloc<Config::kMathRegisters>();
        fp8_gemm_consumer<Config>(p, smem_d, smem_a, smem_b, smem_sfa, smem_sfb, full, empty, smem_reduce,
                                  reduce_full, reduce_free);
    }
}

}  // namespace moegemm
