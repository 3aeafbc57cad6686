// The stage ring of the sm90 GEMM skeleton (gemm.cuh): kStages shared-memory slots that the
// producer thread fills by TMA and the math warpgroups drain, and the barrier protocol that keeps
// them apart.
//
// Slot s holds one K block (Config::kBlockK wide) of the tile: A [kBlockM rows], B [kBlockN rows]
// and the kernel's extra per-stage data (FP8: SFA and SFB), loaded by the kernel's
// load_stage_extras hook with the same barrier. Two mbarriers per slot:
//   full[s]   arrive count 1: the producer's arrive_expect_tx(stage bytes); the phase completes when
//             that arrival is in and every TMA byte announced has landed. Every math thread waits on
//             it before reading the slot.
//   empty[s]  arrive count kMulticast * kNumMathThreads / 32: lane 0 of every math warp of every CTA
//             in the cluster arrives once its reads of the slot (its WGMMAs) have retired
//             (consumer_release_stage). The producer waits on it before refilling the slot.
// Both sides walk the slots in the same order (StageRing); a lap of the ring flips the parity each
// side waits for. The producer starts with parity 1 on empty (a fresh barrier's previous phase
// counts as complete), so the first kStages fills do not wait.
// With kClusterM == 2 the two CTAs of a cluster compute vertically adjacent tiles with the same B
// tile: each loads half of B's rows and multicasts them into both CTAs' slots, halving B's L2
// traffic (kMasked: on an expert of one block-row the pair takes adjacent column blocks instead,
// each CTA loading its own B; Tile::shares_b). With kClusterN == 2 the pair computes horizontally
// adjacent tiles of the same rows and multicasts halves of A likewise, each CTA loading its own B.
// A slot may then be refilled only when both CTAs have released it, hence the cluster-wide empty
// barrier; before exiting, the producer drains the ring so no remote arrive targets an exited CTA.
#pragma once
#include "../ptx.cuh"
#include "scheduler.cuh"

namespace moegemm {

// Position in a ring of kStages shared-memory stages and the mbarrier phase parity of that lap.
template <u32 kStages>
struct StageRing {
    u32 stage = 0;
    u32 phase = 0;

    __device__ __forceinline__ void advance() {
        if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
        }
    }
};

// The producer: one thread issues every TMA load of the CTA. For each of its tiles (the same
// sequence the math warps take) and each of the CTA's K blocks of that tile, it waits for the next
// slot to be empty, announces the stage's bytes (Params::stage_bytes) on its full barrier, and loads
// A, B (multicast over a CTA pair) and the kernel's extras: Kernel::producer_tile gives per-tile
// values once, Kernel::load_stage_extras issues the stage's extra loads on the same full barrier.
template <class Kernel>
__device__ __forceinline__ void gemm_producer(const typename Kernel::Params& p, u8* smem_a, u8* smem_b,
                                              u8* smem_extra, Barrier* full, Barrier* empty) {
    using Config = typename Kernel::Config;
    static_assert(Config::kStages >= 2, "a slot fills while another drains");
    constexpr u32 BM = Config::kBlockM, BN = Config::kBlockN;
    constexpr u32 kPair = Config::kMulticast;
    constexpr u32 kRowBytes = Config::kStageRowBytes;
    TileScheduler<Config::kType, BM, BN, Config::kClusterM, Config::kClusterN, Config::kSplitK> scheduler(
        p.m, p.n, p.groups, p.num_groups);
    const u32 num_k_blocks = ceil_div(p.k, Config::kBlockK);
    u32 k_begin, k_end;
    scheduler.k_range(num_k_blocks, p.k_blocks_per_split, k_begin, k_end);
    const u32 rank = kPair > 1 ? cluster_cta_rank() : 0;
    StageRing<Config::kStages> ring;
    for (Tile tile; scheduler.next(tile);) {
        const int b_row = tile.group * p.n + tile.n_block * BN;
        const auto extras = Kernel::producer_tile(p, tile, num_k_blocks);
        for (u32 k_block = k_begin; k_block < k_end; ++k_block, ring.advance()) {
            const u32 s = ring.stage;
            empty[s].wait(ring.phase ^ 1);
            full[s].arrive_expect_tx(p.stage_bytes);
            const int k = k_block * Config::kBlockK;
            u8* tile_a = smem_a + s * Config::kTileABytes;
            u8* tile_b = smem_b + s * Config::kTileBBytes;
            if constexpr (Config::kClusterN > 1) {
                // Half of A's rows each, into both CTAs of the pair.
                constexpr u32 kSliceRows = BM / kPair;
                tma_load_2d_multicast(tile_a + rank * kSliceRows * kRowBytes, &p.tma_a, &full[s], k,
                                      tile.row + rank * kSliceRows, (1u << kPair) - 1);
            } else {
                tma_load_2d(tile_a, &p.tma_a, &full[s], k, tile.row);
            }
            if constexpr (Config::kClusterM > 1) {
                constexpr u32 kSliceRows = BN / kPair;
                if (tile.shares_b) {
                    tma_load_2d_multicast(tile_b + rank * kSliceRows * kRowBytes, &p.tma_b, &full[s], k,
                                          b_row + rank * kSliceRows, (1u << kPair) - 1);
                } else {
                    // This CTA's own column block: every slice of it, loaded here alone.
#pragma unroll
                    for (u32 r = 0; r < kPair; ++r)
                        tma_load_2d(tile_b + r * kSliceRows * kRowBytes, &p.tma_b, &full[s], k, b_row + r * kSliceRows);
                }
            } else {
                tma_load_2d(tile_b, &p.tma_b, &full[s], k, b_row);
            }
            Kernel::load_stage_extras(p, extras, tile, num_k_blocks, k_block, s, &full[s], smem_extra);
        }
    }
    if constexpr (kPair > 1) {
        for (u32 s = 0; s < Config::kStages; ++s, ring.advance()) empty[ring.stage].wait(ring.phase ^ 1);
    }
}

// A math warp is done reading `stage` (its WGMMAs on it have retired): lane 0 releases the slot
// here and, with a CTA pair, in the peer CTA, whose producer multicasts into this CTA's slot too.
template <class Config>
__device__ __forceinline__ void consumer_release_stage(Barrier* empty, u32 stage, u32 peer) {
    static_assert(Config::kMulticast <= 2, "one peer CTA at most");
    if (lane_id() == 0) {
        empty[stage].arrive();
        if constexpr (Config::kMulticast > 1) empty[stage].arrive_cluster(peer);
    }
}

// The warpgroup of an idle slab still keeps pace with the stage ring, whose empty barriers count
// every math warp: it releases each stage once the stage has landed, leaving the tensor cores to
// the other warpgroups.
template <class Config, class Ring>
__device__ __forceinline__ void consumer_pass_stages(u32 num_k_blocks, Ring& ring, Barrier* full, Barrier* empty,
                                                     u32 peer) {
    for (u32 i = 0; i < num_k_blocks; ++i, ring.advance()) {
        full[ring.stage].wait(ring.phase);
        consumer_release_stage<Config>(empty, ring.stage, peer);
    }
}

}  // namespace moegemm
