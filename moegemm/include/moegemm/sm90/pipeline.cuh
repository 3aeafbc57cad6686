// The stage ring of the sm90 GEMM skeleton (gemm.cuh): kStages shared-memory slots that the
// producer thread fills by TMA and the math warpgroups drain, and the barrier protocol that keeps
// them apart.
//
// Slot s holds one K block (Config::kBlockK wide) of the tile: A [kBlockM rows], B [kBlockN rows]
// (K-major, or in MN-major boxes: config.cuh) and the kernel's extra per-stage data (FP8: SFA and SFB), loaded by the kernel's
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
// traffic (kMasked: on an expert's odd last block-row the pair takes adjacent column blocks
// instead, each CTA loading its own B; contiguous kinds: block-rows of two experts each load their
// own B; Tile::shares_b). With kClusterN == 2 the pair computes horizontally adjacent tiles of the
// same rows and multicasts halves of A likewise, each CTA loading its own B.
// A slot may then be refilled only when both CTAs have released it, hence the cluster-wide empty
// barrier; before exiting, the producer drains the ring so no remote arrive targets an exited CTA.
#pragma once
#include "../mma/layout.cuh"
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

// One operand's rows [row, row + kRows) of a stage at K offset k into `tile` (multicast to the CTAs
// of `mask` with kMulticast): one box of K-major rows at (k, row), or kRows / 64 MN-major boxes of 64
// rows at (row + 64 j, k). kSliced: the operand is a 3-D tensor and the rows lie in its slice `slice`.
template <Major kMajor, u32 kRows, bool kMulticast, bool kSliced = false>
__device__ __forceinline__ void load_rows(u8* tile, const TmaDescriptor* desc, Barrier* bar, int k, int row,
                                          u32 mask = 0, int slice = 0) {
    static_assert(!(kSliced && kMulticast), "3-D loads are not multicast");
    static_assert(kMajor == Major::kK || kRows % 64 == 0, "whole MN-major boxes");
    constexpr bool kKMajor = kMajor == Major::kK;
#pragma unroll
    for (u32 box = 0; box < (kKMajor ? 1 : kRows / 64); ++box) {
        u8* dst = tile + box * kMnMajorBoxBytes;
        const int x = kKMajor ? k : row + int(box) * 64, y = kKMajor ? row : k;
        if constexpr (kSliced)
            tma_load_3d(dst, desc, bar, x, y, slice);
        else if constexpr (kMulticast)
            tma_load_2d_multicast(dst, desc, bar, x, y, mask);
        else
            tma_load_2d(dst, desc, bar, x, y);
    }
}

// kKGrouped with K-major operands (FP8): expert g's A [M, k_g] and B [N, k_g] lie at their own
// addresses (Params::a_data and ::b_data plus k_first times M or N bytes) with their own row pitch
// k_g, so each expert takes descriptors of its own, rebased from tma_a and tma_b by the producer
// when its tiles reach the expert, into the next of this CTA's kSlots pairs in Params::expert_maps.
// A pair is rewritten only after every load through it has landed: each expert's tiles issue one
// load at least, and kStages loads later the stage of its last one has been drained.
template <class Config>
struct ExpertMaps {
    static constexpr bool kEnabled = Config::kType == GemmType::kKGrouped && Config::kMajorA == Major::kK;
    static constexpr u32 kSlots = Config::kStages + 1;
    u32 group = ~0u, slot = 0;

    template <class Params>
    __device__ __forceinline__ void select(const Params& p, const Tile& tile, const TmaDescriptor*& tma_a,
                                           const TmaDescriptor*& tma_b) {
        if (tile.group == group) return;
        group = tile.group;
        TmaDescriptor* maps = p.expert_maps + (blockIdx.x * kSlots + slot) * 2;
        slot = slot + 1 == kSlots ? 0 : slot + 1;
        tma_descriptor_rebase(maps, p.tma_a, p.a_data + static_cast<u64>(tile.k_first) * p.m, tile.k_rows);
        tma_descriptor_rebase(maps + 1, p.tma_b, p.b_data + static_cast<u64>(tile.k_first) * p.n, tile.k_rows);
        tma_descriptors_acquire<2>(maps);
        tma_a = maps;
        tma_b = maps + 1;
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
        p.m, p.n, p.groups, p.num_groups, scheduler_k<Config>(p), p.k_blocks_per_split);
    const u32 num_k_blocks = ceil_div(p.k, Config::kBlockK);
    u32 k_begin, k_end;
    scheduler.k_range(num_k_blocks, p.k_blocks_per_split, k_begin, k_end);
    const u32 rank = kPair > 1 ? cluster_cta_rank() : 0;
    constexpr bool kSliced = sliced_operands(Config::kType);
    StageRing<Config::kStages> ring;
    ExpertMaps<Config> expert_maps;
    const TmaDescriptor* tma_a = &p.tma_a;
    const TmaDescriptor* tma_b = &p.tma_b;
    for (Tile tile; scheduler.next(tile);) {
        const int b_row = (Config::kType == GemmType::kKGrouped ? 0 : tile.group * p.n) + tile.n_block * BN;
        const auto extras = Kernel::producer_tile(p, tile, num_k_blocks);
        // kKGrouped: the expert's own K segment (its own descriptors start at it, K-major); kBatchSum:
        // the item's run of (product, K block) pairs.
        u32 tile_k_end = k_end, k_first = 0;
        if constexpr (Config::kType == GemmType::kKGrouped) {
            tile_k_end = ceil_div(tile.k_rows, Config::kBlockK);
            k_first = ExpertMaps<Config>::kEnabled ? 0 : tile.k_first;
        }
        if constexpr (ExpertMaps<Config>::kEnabled) expert_maps.select(p, tile, tma_a, tma_b);
        if constexpr (Config::kType == GemmType::kBatchSum) tile_k_end = tile.k_rows;
        for (u32 k_block = k_begin; k_block < tile_k_end; ++k_block, ring.advance()) {
            const u32 s = ring.stage;
            empty[s].wait(ring.phase ^ 1);
            full[s].arrive_expect_tx(p.stage_bytes);
            int k = k_first + k_block * Config::kBlockK;
            int slice = int(tile.group);
            if constexpr (Config::kType == GemmType::kBatchSum) {
                const u32 blocks_per_product = ceil_div(p.k, Config::kBlockK), block = tile.k_first + k_block;
                slice = int(block / blocks_per_product);
                k = int(block - slice * blocks_per_product) * Config::kBlockK;
            }
            u8* tile_a = smem_a + s * Config::kTileABytes;
            u8* tile_b = smem_b + s * Config::kTileBBytes;
            if constexpr (Config::kClusterN > 1) {
                // Half of A's rows each, into both CTAs of the pair.
                constexpr u32 kSliceRows = BM / kPair;
                load_rows<Config::kMajorA, kSliceRows, true>(tile_a + rank * kSliceRows * kRowBytes, tma_a, &full[s],
                                                             k, tile.row + rank * kSliceRows, (1u << kPair) - 1);
            } else {
                load_rows<Config::kMajorA, BM, false, kSliced>(tile_a, tma_a, &full[s], k, tile.row, 0, slice);
            }
            if constexpr (Config::kTransformsB) {
                // B arrives among the extras and the transform warps write the tile (gemm_transformer).
            } else if constexpr (Config::kMajorB == Major::kMN || kSliced) {
                // B as a 3-D tensor: MN-major [G, K, N], where a ragged last K block reads zeros, not the
                // next expert's rows (kKGrouped: [1, sum_K, N], the experts' segments along K), or
                // kBatched's [G, N, K].
                static_assert(Config::kClusterM == 1, "3-D B is not multicast");
                load_rows<Config::kMajorB, BN, false, true>(tile_b, tma_b, &full[s], k, tile.n_block * BN, 0,
                                                           Config::kType == GemmType::kKGrouped ? 0 : slice);
            } else if constexpr (Config::kClusterM > 1) {
                constexpr u32 kSliceRows = BN / kPair;
                if (tile.shares_b) {
                    tma_load_2d_multicast(tile_b + rank * kSliceRows * kRowBytes, tma_b, &full[s], k,
                                          b_row + rank * kSliceRows, (1u << kPair) - 1);
                } else {
                    // This CTA's own column block: every slice of it, loaded here alone.
#pragma unroll
                    for (u32 r = 0; r < kPair; ++r)
                        tma_load_2d(tile_b + r * kSliceRows * kRowBytes, tma_b, &full[s], k, b_row + r * kSliceRows);
                }
            } else {
                tma_load_2d(tile_b, tma_b, &full[s], k, b_row);
            }
            Kernel::load_stage_extras(p, extras, tile, num_k_blocks, k_block, s, &full[s], smem_extra);
        }
    }
    if constexpr (kPair > 1) {
        for (u32 s = 0; s < Config::kStages; ++s, ring.advance()) empty[ring.stage].wait(ring.phase ^ 1);
    }
}

// With Config::kTransformsB, the producer warpgroup's warps 1 to 3 (`thread` 0..95 among them) walk
// the stage ring as the math warps do: once a stage has landed (full), Kernel::transform_stage writes
// its B tile from the stage's extras and arrives on the policy's own barrier of the stage, which
// the math warps wait for beside full. They release nothing: the math warps' release comes after
// the transform, so the producer never refills a stage still being read.
template <class Kernel>
__device__ __forceinline__ void gemm_transformer(const typename Kernel::Params& p, u8* smem_b, u8* smem_extra,
                                                 Barrier* full, u32 thread) {
    using Config = typename Kernel::Config;
    static_assert(Config::kType == GemmType::kNormal || m_grouped(Config::kType),
                  "dense and M-grouped kinds: the same K blocks for every tile");
    TileScheduler<Config::kType, Config::kBlockM, Config::kBlockN, Config::kClusterM, Config::kClusterN,
                  Config::kSplitK>
        scheduler(p.m, p.n, p.groups, p.num_groups, p.k, p.k_blocks_per_split);
    u32 k_begin, k_end;
    scheduler.k_range(ceil_div(p.k, Config::kBlockK), p.k_blocks_per_split, k_begin, k_end);
    StageRing<Config::kStages> ring;
    for (Tile tile; scheduler.next(tile);) {
        for (u32 k_block = k_begin; k_block < k_end; ++k_block, ring.advance()) {
            full[ring.stage].wait(ring.phase);
            Kernel::transform_stage(ring.stage, smem_b + ring.stage * Config::kTileBBytes, smem_extra, thread);
        }
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
