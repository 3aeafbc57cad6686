// Persistent tile scheduling shared by the GEMM kernels.
#pragma once
#include "ptx.cuh"

namespace moegemm {

// Output tiles of an M x N product, handed out round-robin to a persistent grid of clusters
// (cluster c takes work items c, c + number of clusters, ...). Items are ordered in groups of kGroupM
// item-rows, column by column inside a group, so the tiles in flight at one time share rows of A and
// columns of B in L2. Two kinds of cluster:
//   kClusterM CTAs stacked along M: the CTA of rank r computes block-row kClusterM * item_row + r,
//     so the CTAs of a cluster share the B tile. A CTA whose block-row lies past M still runs (its
//     loads read zeros, its stores are skipped): its cluster peer needs it.
//   kSplitK CTAs on one tile: rank r computes the r-th share of the K blocks (split-K).
template <u32 kBlockM, u32 kBlockN, u32 kClusterM = 1, u32 kSplitK = 1, u32 kGroupM = 8>
struct TileScheduler {
    static_assert(kClusterM == 1 || kSplitK == 1, "a cluster either stacks tiles along M or splits K");
    static constexpr u32 kClusterSize = kClusterM * kSplitK;
    u32 num_item_rows;
    u32 num_n_blocks;
    u32 num_items;

    __device__ __forceinline__ TileScheduler(u32 m, u32 n)
        : num_item_rows(ceil_div(m, kBlockM * kClusterM)), num_n_blocks(ceil_div(n, kBlockN)),
          num_items(num_item_rows * num_n_blocks) {}

    __device__ __forceinline__ static u32 first_item() { return blockIdx.x / kClusterSize; }
    __device__ __forceinline__ static u32 item_stride() { return gridDim.x / kClusterSize; }

    __device__ __forceinline__ void coords(u32 item, u32& m_block, u32& n_block) const {
        const u32 items_per_group = kGroupM * num_n_blocks;
        const u32 group = item / items_per_group;
        const u32 first_row = group * kGroupM;
        const u32 group_rows = min(kGroupM, num_item_rows - first_row);
        const u32 in_group = item - group * items_per_group;
        m_block = (first_row + in_group % group_rows) * kClusterM + (kClusterM > 1 ? blockIdx.x % kClusterM : 0);
        n_block = in_group / group_rows;
    }

    // The K blocks [begin, end) this CTA computes of every tile: all of them without split-K.
    __device__ __forceinline__ static void k_range(u32 num_k_blocks, u32 k_blocks_per_split, u32& begin, u32& end) {
        begin = 0;
        end = num_k_blocks;
        if constexpr (kSplitK > 1) {
            begin = min(blockIdx.x % kSplitK * k_blocks_per_split, num_k_blocks);
            end = min(begin + k_blocks_per_split, num_k_blocks);
        }
    }
};

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

}  // namespace moegemm
