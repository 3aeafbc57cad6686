// The constants every sm90 GEMM family's config shares (GemmConfigBase): tile shape, warp roles,
// cluster shape, the output's shared-memory staging and the split-K reduce buffer. A family's
// config derives from it and adds its own constants: its extra bytes per stage, register split and
// main-loop choices (see the Kernel policy in gemm.cuh, and Fp8GemmConfig for an example).
#pragma once
#include "../mma/layout.cuh"
#include "../ptx.cuh"
#include "scheduler.cuh"

namespace moegemm {

// kOperandBytes: bytes of one element of A and B; a stage holds kBlockK of them per row, in rows of
// 128 bytes (the 128-byte swizzle's width). kMajorA / kMajorB: K-major operands fill a stage with
// one 128-byte row per M (N) index; MN-major ones (16-bit types only) with boxes of 64 M (N)
// indices by kBlockK = 64 K rows, the box of indices [64j, 64j + 64) where the K-major row 64j
// would start, so a slab's offset in the tile is the same in both.
// Clusters: kClusterM CTAs stacked along M share (multicast) their B tile; kClusterN CTAs side by side
// along N share their A tile; kSplitK CTAs split one tile's K blocks. At most one of them exceeds 1.
template <u32 kBlockM_, u32 kBlockN_, u32 kBlockK_, u32 kOperandBytes_, u32 kStages_, u32 kClusterM_, u32 kClusterN_,
          u32 kSplitK_, bool kOutFp32_, bool kAccumulate_, GemmType kType_, Major kMajorA_ = Major::kK,
          Major kMajorB_ = Major::kK>
struct GemmConfigBase {
    static constexpr GemmType kType = kType_;
    static constexpr Major kMajorA = kMajorA_, kMajorB = kMajorB_;
    static constexpr u32 kBlockM = kBlockM_, kBlockN = kBlockN_, kBlockK = kBlockK_, kStages = kStages_;
    static constexpr u32 kOperandBytes = kOperandBytes_;
    static constexpr u32 kClusterM = kClusterM_, kClusterN = kClusterN_, kSplitK = kSplitK_;
    static constexpr u32 kMulticast = kClusterM * kClusterN;  // CTAs that fill each other's stage slots
    static constexpr u32 kClusterSize = kMulticast * kSplitK;
    static constexpr bool kOutFp32 = kOutFp32_, kAccumulate = kAccumulate_;
    // The B tile of a stage is not loaded by TMA but written by the producer warpgroup's other warps
    // from the policy's extras (FP4 weights widened to e4m3: Kernel::transform_stage in gemm.cuh).
    // A family's config that does so hides this with true.
    static constexpr bool kTransformsB = false;

    // Warp roles: kNumMathWarpgroups math warpgroups, then one producer warpgroup. A math warpgroup
    // owns kSlabs slabs of 64 consecutive tile rows (two for BLOCK_M = 256, else one), issuing and
    // promoting them one after the other.
    static constexpr u32 kNumMathWarpgroups = kBlockM == 256 ? 2 : kBlockM / 64;
    static constexpr u32 kSlabs = kBlockM / 64 / kNumMathWarpgroups;
    static constexpr u32 kWarpgroupRows = 64 * kSlabs;
    static constexpr u32 kNumMathThreads = 128 * kNumMathWarpgroups;
    static constexpr u32 kNumThreads = kNumMathThreads + 128;

    // The output staged for TMA: D's descriptor boxes are kStoreCols columns by 64 rows, 128-byte
    // swizzled chunks where the slice is whole chunks, else one plain box of the slice's columns.
    static constexpr u32 kOutBytes = kOutFp32 ? 4 : 2;
    static constexpr u32 kChunkCols = 128 / kOutBytes;
    // Columns of the tile this CTA stores: its slice under split-K.
    static constexpr u32 kOutCols = kBlockN / kSplitK;
    static constexpr bool kSwizzleD = kOutCols % kChunkCols == 0;
    static constexpr u32 kStoreCols = kSwizzleD ? kChunkCols : kOutCols;

    static constexpr u32 kStageRowBytes = kBlockK * kOperandBytes;  // one row of A or B in a stage
    static constexpr u32 kTileABytes = kBlockM * kBlockK * kOperandBytes;
    static constexpr u32 kTileBBytes = kBlockN * kBlockK * kOperandBytes;
    static constexpr u32 kSmemDBytes = kBlockM * kOutCols * kOutBytes;
    static constexpr u32 kSlabDBytes = 64 * kOutCols * kOutBytes;  // one slab's rows of the D staging buffer
    // Split-K reduce buffer, per math warpgroup: one slot per sender, holding each thread's 16-byte
    // pieces (four floats of an 8-column group) thread-contiguous, so accesses are conflict-free.
    static constexpr u32 kReduceSlotBytes = kOutCols / 8 * 128 * 16;
    static constexpr u32 kReduceWarpBytes = kReduceSlotBytes / 4;  // one warp's pieces of a slot
    static constexpr u32 kReduceBytes = kSplitK > 1 ? kNumMathWarpgroups * (kSplitK - 1) * kReduceSlotBytes : 0;
    // full and empty per stage; reduce_full and reduce_free per math warpgroup under split-K.
    static constexpr u32 kNumBarriers = 2 * kStages + (kSplitK > 1 ? 2 * kNumMathWarpgroups : 0);

    // Shared memory of the skeleton's carve-up (gemm.cuh) given the family's extra bytes per stage.
    __host__ __device__ static constexpr u32 smem_bytes(u32 extra_stage_bytes) {
        return kSmemDBytes + kStages * (kTileABytes + kTileBBytes + extra_stage_bytes) + kReduceBytes +
               kNumBarriers * sizeof(Barrier);
    }

    static_assert(kBlockM == 64 || kBlockM == 128 || kBlockM == 192 || kBlockM == 256,
                  "one, two or three math warpgroups of one slab, or two of two");
    static_assert(kSlabs == 1 || ((kType == GemmType::kNormal || kType == GemmType::kBatched) && kSplitK == 1),
                  "two slabs per warpgroup: dense or batched GEMMs without split-K (the row-by-row stores and the "
                  "split-K reduce handle one slab)");
    static_assert(kStageRowBytes == 128, "stage rows are one 128-byte swizzle row");
    static_assert(kBlockN % 8 == 0 && kBlockN >= 8 && kBlockN <= 256, "WGMMA needs N in [8, 256], N % 8 == 0");
    static_assert(kOutCols * kOutBytes % 16 == 0 && kStoreCols <= 256, "a TMA box: 16-byte rows, <= 256 columns");
    static_assert(kBlockN % (8 * kSplitK) == 0, "split-K slices are whole 8-column groups");
    static_assert(kSplitK >= 1 && kSplitK <= 8 && (kMulticast == 1 || kSplitK == 1), "portable clusters of <= 8");
    static_assert(kMulticast <= 2, "multicast within a CTA pair: the peer is rank ^ 1");
    static_assert(kType == GemmType::kNormal || (kSplitK == 1 && (!kAccumulate || !m_grouped(kType))),
                  "grouped: no split-K; the M-grouped kinds take no C");
    static_assert(kType != GemmType::kBatchSum || kAccumulate, "kBatchSum: each run adds its sum into D");
    static_assert(kType != GemmType::kKGrouped || (kMajorA == Major::kMN && kMajorB == Major::kMN && kClusterM == 1) ||
                      (kMajorA == Major::kK && kMajorB == Major::kK && kMulticast == 1),
                  "kKGrouped: A [sum_K, M] and B [sum_K, N], MN-major, no B multicast; or each expert's [M, k_g] and "
                  "[N, k_g] K-major blocks back to back (pipeline.cuh, ExpertMaps), no multicast");
    static_assert(!sliced_operands(kType) || kMulticast == 1, "3-D loads (kBatched, kBatchSum): no multicast");
    static_assert(kType == GemmType::kNormal || m_grouped(kType) || kClusterM == 1,
                  "B multicast: dense and M-grouped kinds");
    static_assert(kType != GemmType::kMasked || kClusterN == 1, "masked: B multicast only");
    // 128-byte-swizzled tiles need 1024-byte alignment; the carve-up keeps every A/B/D tile so.
    static_assert(kSmemDBytes % 1024 == 0 && kTileABytes % 1024 == 0 && kTileBBytes % 1024 == 0);
    static_assert(kClusterM == 1 || kBlockN % 16 == 0,
                  "multicast halves of B must stay 1024-byte aligned (8-row swizzle groups)");
    static_assert(kClusterN == 1 || kBlockM % 16 == 0, "multicast halves of A likewise");
    static_assert((kMajorA == Major::kK && kMajorB == Major::kK) || (kOperandBytes == 2 && kBlockK == 64),
                  "MN-major operands: 16-bit types, stages of one 64-wide box");
    static_assert(kMajorA == Major::kK || kBlockM % (64 * kClusterN) == 0, "MN-major A: whole 64-row boxes");
    static_assert(kMajorB == Major::kK || kBlockN % (64 * kClusterM) == 0, "MN-major B: whole 64-column boxes");
};

}  // namespace moegemm
