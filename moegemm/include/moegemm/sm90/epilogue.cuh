// The epilogue of the sm90 GEMM skeleton (gemm.cuh): each math warpgroup stores its slabs (64 rows
// each) of the tile's FP32 totals (the m64nNk* accumulator layout, mma/layout.cuh) into D.
//
// The TMA path: totals -> the warpgroup's slice of the D buffer in shared memory, laid out as the D
// descriptor's boxes (128-byte swizzled chunks of kStoreCols columns, or one plain chunk for tiles
// narrower than a chunk) -> one thread of the warpgroup issues the boxes' TMA stores (or, with an
// accumulating epilogue policy, TMA reduce-adds: D += tile). The stores run asynchronously,
// overlapping the next tile's main loop. Protocol, per warpgroup, on named barrier 1 + warpgroup
// (128 threads; barrier 0 is __syncthreads):
//   1. the issuing thread waits until its previous stores have read the buffer (bulk wait_group.read);
//   2. barrier: nobody overwrites the buffer before that;
//   3. every thread writes its totals, then fences them for the async proxy (fence.proxy.async);
//   4. barrier: every write is in before the issuing thread starts the TMA;
//   5. the issuing thread issues the boxes that hold rows and columns of D, and commits them.
// The skeleton waits for all stores (bulk wait_group 0) before the CTA exits.
// The row path, for the M-grouped kinds: a slab with rows that must stay untouched (past the tile's row
// limit, or kContiguous rows of another expert or padding) is stored row by row from registers,
// skipping those rows; the warpgroup decides it by a vote on the same named barrier.
#pragma once
#include "../mma/layout.cuh"
#include "../ptx.cuh"
#include "scheduler.cuh"

namespace moegemm {

// Epilogue policies: how one staged box of D (64 rows x kStoreCols columns at column x, row y)
// reaches global memory.
// store_box_3d: the same into slice z of a 3-D D (kKGrouped, kBatched: [G, M, N]).
struct TmaStoreEpilogue {
    __device__ __forceinline__ static void store_box(const TmaDescriptor* d, const void* box, int x, int y) {
        tma_store_2d(d, box, x, y);
    }
    __device__ __forceinline__ static void store_box_3d(const TmaDescriptor* d, const void* box, int x, int y, int z) {
        tma_store_3d(d, box, x, y, z);
    }
};
// D += tile, done by the TMA unit (D = C + A @ B^T with D aliasing C).
struct TmaReduceAddEpilogue {
    __device__ __forceinline__ static void store_box(const TmaDescriptor* d, const void* box, int x, int y) {
        tma_reduce_add_2d(d, box, x, y);
    }
    __device__ __forceinline__ static void store_box_3d(const TmaDescriptor* d, const void* box, int x, int y, int z) {
        tma_reduce_add_3d(d, box, x, y, z);
    }
};
// The policy of a config's kAccumulate.
template <bool kAccumulate>
struct TmaEpilogueOf {
    using type = TmaStoreEpilogue;
};
template <>
struct TmaEpilogueOf<true> {
    using type = TmaReduceAddEpilogue;
};

// Write one warpgroup's 64 x kOutCols totals (columns [slice, slice + 1) * kOutCols of the tile)
// into its shared-memory slice, laid out as the D descriptor's boxes: chunks of kStoreCols
// columns, 128-byte swizzled when kSwizzleD.
template <class Config>
__device__ __forceinline__ void epilogue_stage_slab(const float* totals, u8* smem_d_wg, u32 slice) {
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

// kContiguous: the experts of this thread's two rows of its warpgroup's 64-row slab at row y,
// requested when the tile starts so that its epilogue does not wait for them.
struct SlabRows {
    int group[2];

    template <class Config, class Params>
    __device__ __forceinline__ void load(const Params& p, u32 y) {
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
__device__ __forceinline__ bool epilogue_slab_writable(const Tile& tile, u32 y, const SlabRows& rows) {
    bool writable = y + 64 <= tile.row_limit;
    if constexpr (Config::kType == GemmType::kContiguous)
        writable = writable && rows.group[0] == int(tile.group) && rows.group[1] == int(tile.group);
    return named_barrier_all(1 + threadIdx.x / 128, 128, writable);
}

// Store this thread's totals row by row straight from registers, skipping the rows that must stay
// untouched: rows past the tile's limit, and (kContiguous) rows of another expert or padding.
template <class Config, class Params>
__device__ __forceinline__ void epilogue_store_rows(const Params& p, const Tile& tile, const float* totals, u32 y,
                                                    u32 n0, const SlabRows& rows) {
    // The thread's first column (even; N is even, so the column after each stored one exists too) and
    // how many columns of D lie from it on: the stores go at constant offsets from one pointer per
    // row, with constant bounds, so that they need few registers.
    const u32 first_col = n0 + lane_id() % 4 * 2, first_row = y + slab_row();
    const int cols_left = int(p.n) - int(first_col);
#pragma unroll
    for (u32 half = 0; half < 2; ++half) {
        const u32 row = first_row + half * 8;
        bool writable = row < tile.row_limit;
        if constexpr (Config::kType == GemmType::kContiguous)
            writable = writable && rows.group[half] == int(tile.group);
        if (!writable) continue;
        u8* out = p.d + (static_cast<u64>(row) * p.ld_d + first_col) * Config::kOutBytes;
#pragma unroll
        for (u32 i = half * 2; i < Config::kBlockN / 2; i += 4) {
            const int col = int(i / 4 * 8);
            if (col >= cols_left) break;
            if constexpr (Config::kOutFp32)
                *reinterpret_cast<float2*>(out + col * 4) = make_float2(totals[i], totals[i + 1]);
            else
                *reinterpret_cast<u32*>(out + col * 2) = pack_bf16x2(totals[i], totals[i + 1]);
        }
    }
}

// Store this warpgroup's rows of the tile: through shared memory and TMA boxes stored by the
// Epilogue policy, overlapping the next tile's main loop, or row by row (grouped kinds, a slab with
// rows that must stay untouched). `slice`: the CTA's column slice of the tile (split-K), else 0.
// With two slabs per warpgroup, both are staged before any is stored.
template <class Config, class Epilogue, class Params>
__device__ __forceinline__ void epilogue_store(const Params& p, const Tile& tile, const float* totals, u8* smem_d_wg,
                                               u32 slice, const SlabRows& rows) {
    const u32 n0 = tile.n_block * Config::kBlockN;
    const u32 y = tile.row + threadIdx.x / 128 * Config::kWarpgroupRows;
    const bool store_issuer = threadIdx.x % 128 == 0;
    // The other kinds' tiles hold no rows that must stay untouched (rows past M: TMA clips them).
    if constexpr (m_grouped(Config::kType)) {
        if (!epilogue_slab_writable<Config>(tile, y, rows)) {
            epilogue_store_rows<Config>(p, tile, totals, y, n0, rows);
            return;
        }
    }

    // The previous tile's store must have read the buffer before it is overwritten.
    if (store_issuer) tma_store_wait_read();
    named_barrier_sync(1 + threadIdx.x / 128, 128);
#pragma unroll
    for (u32 slab = 0; slab < Config::kSlabs; ++slab)
        epilogue_stage_slab<Config>(totals + slab * Config::kBlockN / 2, smem_d_wg + slab * Config::kSlabDBytes, slice);
    fence_proxy_async();
    named_barrier_sync(1 + threadIdx.x / 128, 128);
    if (store_issuer) {
        constexpr u32 kChunkBytes = 64 * Config::kStoreCols * Config::kOutBytes;
#pragma unroll
        for (u32 slab = 0; slab < Config::kSlabs; ++slab) {
            const u32 slab_y = y + slab * 64;
#pragma unroll
            for (u32 chunk = 0; chunk < Config::kOutCols / Config::kStoreCols; ++chunk) {
                const int x = n0 + slice * Config::kOutCols + chunk * Config::kStoreCols;
                if (x >= int(p.n) || slab_y >= tile.row_limit) break;
                const u8* box = smem_d_wg + slab * Config::kSlabDBytes + chunk * kChunkBytes;
                if constexpr (sliced_output(Config::kType))
                    Epilogue::store_box_3d(&p.tma_d, box, x, int(slab_y), int(tile.group));
                else
                    Epilogue::store_box(&p.tma_d, box, x, int(slab_y));
            }
        }
        tma_store_commit();
    }
}

}  // namespace moegemm
