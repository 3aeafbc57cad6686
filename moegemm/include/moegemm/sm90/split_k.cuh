// Split-K reduction of the sm90 GEMM skeleton (gemm.cuh), over distributed shared memory.
//
// With kSplitK > 1 (for problems of few tiles) a cluster of kSplitK CTAs shares each tile, CTA r
// taking the r-th run of K blocks (TileScheduler::k_range). The partial tiles are then reduced:
// CTA r owns columns [r, r + 1) * kOutCols of the tile (kOutCols = BLOCK_N / kSplitK), receives the
// other CTAs' partial sums of those columns into its reduce buffer, adds all of them in split order
// (deterministic, whichever CTA finishes first) and stores them through the epilogue.
// Reduce buffer, per math warpgroup: kSplitK - 1 slots (one per sender, in rank order without the
// owner), each holding every thread's 16-byte pieces (four floats of an 8-column group)
// thread-contiguous, so the accesses are free of bank conflicts. Two mbarriers per math warpgroup:
//   reduce_full  arrive count 1: the owner's thread 0 arrives with the bytes it expects this round
//                (arrive_expect_tx); the senders' asynchronous remote stores (st.async) complete
//                them. Its wait makes the data visible: no fences.
//   reduce_free  arrive count kSplitK - 1: every other CTA of the cluster arrives on it (remotely)
//                once it has read the pieces this CTA sent it this round; this CTA waits on it
//                before sending the next tile's partials over them.
// The warpgroup's threads meet on named barrier 1 + warpgroup (the epilogue's, used in turn) before
// one thread releases the buffer. Only the warps of a warpgroup that hold rows of D (16 each)
// exchange: the others send, wait for and add nothing (at M = 1 a quarter of the traffic). At least
// one warp exchanges in every round, even with no rows: waiting for a peer's bytes keeps the
// cluster's CTAs within a round of each other. Without it a CTA could arrive twice on a peer's
// reduce_free before the peer waits once, and the parity the peer polls would never show
// completion. Before exiting, a CTA waits for the last round's reduce_free (gemm.cuh), so no peer's
// arrival targets an exited CTA.
#pragma once
#include "../ptx.cuh"
#include "scheduler.cuh"

namespace moegemm {

// Sum the cluster's partial tiles into this CTA's column slice. `y` is the warpgroup's first row;
// `reduce_wg` the shared address of its reduce buffer; `round` counts the tiles this CTA has
// reduced before. On return the totals of the owned columns hold the sums (the others are stale).
template <class Config>
__device__ __forceinline__ void split_k_reduce(float* totals, const Tile& tile, u32 y, u32 reduce_wg,
                                               Barrier& reduce_full, Barrier& reduce_free, u32 rank, u32 round) {
    constexpr u32 S = Config::kSplitK, kGroups = Config::kOutCols / 8;
    static_assert(Config::kReduceSlotBytes == kGroups * 128 * 16, "a slot: 16 bytes per thread and 8-column group");
    static_assert(Config::kReduceWarpBytes * 4 == Config::kReduceSlotBytes, "a warp's share of a slot");
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

}  // namespace moegemm
