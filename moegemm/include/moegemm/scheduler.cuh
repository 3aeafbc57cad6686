// Persistent tile scheduling shared by the GEMM kernels.
#pragma once
#include "ptx.cuh"

namespace moegemm {

// Output tiles of an M x N product, handed out round-robin to a persistent grid (block b takes
// tiles b, b + gridDim.x, ...). Tiles are ordered in groups of kGroupM block-rows, column by column
// inside a group, so the tiles in flight at one time share rows of A and columns of B in L2.
template <u32 kBlockM, u32 kBlockN, u32 kGroupM = 8>
struct TileScheduler {
    u32 num_m_blocks;
    u32 num_n_blocks;
    u32 num_tiles;

    __device__ __forceinline__ TileScheduler(u32 m, u32 n)
        : num_m_blocks(ceil_div(m, kBlockM)), num_n_blocks(ceil_div(n, kBlockN)),
          num_tiles(num_m_blocks * num_n_blocks) {}

    __device__ __forceinline__ void coords(u32 tile, u32& m_block, u32& n_block) const {
        const u32 tiles_per_group = kGroupM * num_n_blocks;
        const u32 group = tile / tiles_per_group;
        const u32 first_m = group * kGroupM;
        const u32 group_rows = min(kGroupM, num_m_blocks - first_m);
        const u32 in_group = tile - group * tiles_per_group;
        m_block = first_m + in_group % group_rows;
        n_block = in_group / group_rows;
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
