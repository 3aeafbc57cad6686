// Persistent tile scheduling shared by the sm90 GEMM kernels: what a GEMM's rows are (GemmType),
// the output tile (Tile) and the order in which a persistent grid of clusters takes the tiles
// (TileScheduler). The producer thread and every math warp of a CTA each run their own scheduler
// over the same sequence of tiles, so no tile index passes through shared memory.
#pragma once
#include "../ptx.cuh"

namespace moegemm {

// What the rows of A and D are (the B operand is [G, N, K] for the grouped kinds):
//   kNormal          one M x N product.
//   kContiguous      A [M_total, K] holds the experts' rows back to back, each expert's segment
//                    aligned to 128 rows; groups[row] is the row's expert, outside [0, G) padding.
//   kContiguousPsum  the same rows; groups[g] is the end row of expert g's segment (cumulative),
//                    which starts at the end of g - 1 rounded up to 128.
//   kMasked          A [G, max_M, K]: expert g's first clamp(groups[g], 0, max_M) rows are real.
//   kKGrouped        K-grouped (MoE weight gradients): A [sum_K, M] and B [sum_K, N] hold the experts'
//                    K segments back to back, groups[g] the length of expert g's (a multiple of
//                    the block K); D [G, M, N], D[g] = A_g^T @ B_g.
//   kBatched         G independent products of one shape: A [G, M, K], B [G, N, K] and D [G, M, N]
//                    as 3-D tensors of any pitches (the einsum forms); `groups` is unused.
//   kBatchSum        D [M, N] = the sum over g of A[g] @ B[g]^T (A, B 3-D as for kBatched): the blocks of
//                    K of all G products, product by product, are cut into runs of the same length,
//                    and every run of every tile is a work item that adds its sum into D.
// Values read from `groups` are never trusted: a tile of no valid expert is skipped, every row
// range (kKGrouped: every K range) is clamped to the buffers.
enum class GemmType : u32 {
    kNormal = 0, kContiguous = 1, kContiguousPsum = 2, kMasked = 3, kKGrouped = 4, kBatched = 5, kBatchSum = 6
};

// The kinds whose A's rows belong to experts of different lengths (some rows of a tile may be
// padding or another expert's).
__host__ __device__ constexpr bool m_grouped(GemmType type) {
    return type == GemmType::kContiguous || type == GemmType::kContiguousPsum || type == GemmType::kMasked;
}
// The kinds whose A and B are addressed as 3-D tensors with the group as the outer coordinate.
__host__ __device__ constexpr bool sliced_operands(GemmType type) {
    return type == GemmType::kBatched || type == GemmType::kBatchSum;
}
// The kinds that store D into the group's own slice of a 3-D tensor.
__host__ __device__ constexpr bool sliced_output(GemmType type) {
    return type == GemmType::kKGrouped || type == GemmType::kBatched;
}

// The scheduler's k argument for a kernel's parameters: K, or for kBatchSum the K blocks of one product.
template <class Config, class Params>
__device__ __forceinline__ u32 scheduler_k(const Params& p) {
    return Config::kType == GemmType::kBatchSum ? ceil_div(p.k, Config::kBlockK) : p.k;
}

constexpr u32 kContiguousAlignment = 128;  // rows per expert segment boundary (contiguous kinds)

// One output tile: rows [row, row + BLOCK_M) of A's and D's two-dimensional row view, of which
// only those below row_limit may be written (and, for kContiguous, only those whose groups[] entry
// is `group`); columns n_block * BLOCK_N of expert `group` (0 when not grouped). m_block counts
// block-rows inside the expert's rows (kMasked) or inside A.
struct Tile {
    u32 m_block, n_block, group, row, row_limit;
    bool shares_b = true;  // kClusterM > 1: the cluster's CTAs share (multicast) this tile's B
    // kKGrouped: the expert's K segment (rows of A and B); kBatchSum: the item's run of K blocks.
    u32 k_first, k_rows;
};

// Tiles handed out round-robin to a persistent grid of clusters (cluster c takes work items c,
// c + number of clusters, ...). For the kinds other than kMasked, items are ordered in groups of
// kGroupM item-rows, column by column inside a group, so the tiles in flight at one time share rows
// of A and columns of B in L2. kMasked items run expert by expert; kKGrouped and kBatched ones too,
// each group's items rastered as a dense GEMM's. Two kinds of cluster:
//   kClusterM CTAs stacked along M (kNormal, M-grouped kinds): the CTA of rank r computes block-row
//     kClusterM * item_row + r, so the CTAs of a cluster share the B tile. A CTA whose block-row
//     lies past M (contiguous kinds: or holds only padding) still runs (its stores are skipped):
//     its peer needs it. Two block-rows of different contiguous experts each load their own B. A
//     kMasked expert's odd last block-row instead gives the CTAs of a cluster adjacent column
//     blocks, each loading its own B.
//   kClusterN CTAs side by side along N (kNormal, contiguous kinds): the CTA of rank r computes
//     column block kClusterN * item_column + r of the same block-row, so the CTAs share the A tile
//     (and the expert). A CTA whose column block lies past N still runs, for the same reason.
//   kSplitK CTAs on one tile: rank r computes the r-th share of the K blocks (split-K).
// kWholeWarp: next() is called by every lane of the calling warps (the math warps), not by one
// thread alone (the producer); see load_group.
template <GemmType kType, u32 kBlockM, u32 kBlockN, u32 kClusterM = 1, u32 kClusterN = 1, u32 kSplitK = 1,
          bool kWholeWarp = false, u32 kGroupM = 8>
struct TileScheduler {
    static_assert(kClusterM * kClusterN == 1 || kSplitK == 1, "a cluster either shares operands or splits K");
    static_assert(kClusterM == 1 || kClusterN == 1, "a cluster shares A or B, not both");
    static_assert(kClusterN == 1 || kType != GemmType::kMasked, "kMasked pairs share B only");
    static_assert(kType == GemmType::kNormal || (kSplitK == 1 && (kClusterM == 1 || m_grouped(kType))),
                  "of the grouped kinds, only the M-grouped ones multicast B");
    static_assert(kType == GemmType::kNormal || kType == GemmType::kMasked || !m_grouped(kType) ||
                      kContiguousAlignment % kBlockM == 0,
                  "a block never straddles two experts' segments");
    static constexpr u32 kClusterSize = kClusterM * kClusterN * kSplitK;

    u32 m, num_n_blocks, num_item_rows, num_items;
    const int* groups;
    u32 num_groups, max_m;
    u32 item;
    // kContiguous tiles alone (kClusterM == 1): the expert of the next tile's first row, loaded while
    // this tile runs, so that its latency does not fall between two tiles. kWholeWarp: each lane loads
    // the entry of a row of its own (lane 0 the one wanted), for a load the compiler knows warp-uniform
    // would be moved into a uniform register at once, which waits for it.
    u32 prefetched_row = ~0u;
    int prefetched_groups = -1;
    u32 cursor_group = 0, cursor_first_item = 0;  // kMasked: the expert whose items start at cursor_first_item
    u32 k_total, cursor_k = 0;  // kKGrouped: K rows of A and B, the first of the cursor expert's
    u32 k_blocks_per_item;      // kBatchSum: the length of a run

    // m: rows of A (kMasked: max_M, rows per expert; kKGrouped: M). groups: see GemmType. k
    // (scheduler_k): kKGrouped's sum_K; kBatchSum's K blocks of one product, in runs of
    // k_blocks_per_item_.
    __device__ __forceinline__ TileScheduler(u32 m_, u32 n, const int* groups_ = nullptr, u32 num_groups_ = 1,
                                             u32 k = 0, u32 k_blocks_per_item_ = 0)
        : m(m_), num_n_blocks(ceil_div(n, kBlockN)), num_item_rows(ceil_div(m_, kBlockM * kClusterM)),
          num_items(num_item_rows * ceil_div(num_n_blocks, kClusterN)), groups(groups_), num_groups(num_groups_), max_m(m_),
          item(blockIdx.x / kClusterSize), k_total(k), k_blocks_per_item(k_blocks_per_item_) {}

    __device__ __forceinline__ static u32 item_stride() { return gridDim.x / kClusterSize; }

    // The next tile of this CTA, false when there is none.
    __device__ __forceinline__ bool next(Tile& tile) {
        if constexpr (kType == GemmType::kMasked) {
            return next_masked(tile);
        } else if constexpr (kType == GemmType::kKGrouped) {
            return next_k_grouped(tile);
        } else if constexpr (kType == GemmType::kBatchSum) {
            return next_batch_sum(tile);
        } else {
            // kBatched: num_items is one group's, the groups' items follow each other.
            const u32 total_items = kType == GemmType::kBatched ? num_items * num_groups : num_items;
            for (; item < total_items; item += item_stride()) {
                const u32 group = kType == GemmType::kBatched ? item / num_items : 0;
                raster(item - group * num_items, tile.m_block, tile.n_block);
                tile.row = tile.m_block * kBlockM;
                tile.row_limit = m;
                tile.group = group;
                if (kType == GemmType::kNormal || kType == GemmType::kBatched || find_pair_group(tile)) {
                    item += item_stride();
                    if constexpr (kType == GemmType::kContiguous && kClusterM == 1) prefetch_group(total_items);
                    return true;
                }
            }
            return false;
        }
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

   private:
    __device__ __forceinline__ int load_group(u32 index) const { return __ldg(groups + index); }

    // A condition on values of `groups`, the same in every lane. Whole warps decide it by a vote,
    // which the compiler knows to be warp-uniform: the branches stay uniform and the main loop
    // inside them keeps its uniform registers. (Branching on the loaded values themselves, it
    // assumed divergence and rebuilt every WGMMA descriptor in ordinary registers.)
    __device__ __forceinline__ static bool uniform(bool condition) {
        if constexpr (kWholeWarp) return __all_sync(0xffffffff, condition);
        return condition;
    }

    __device__ __forceinline__ void raster(u32 index, u32& m_block, u32& n_block) const {
        const u32 items_per_group = kGroupM * ceil_div(num_n_blocks, kClusterN);
        const u32 group = index / items_per_group;
        const u32 first_row = group * kGroupM;
        const u32 group_rows = min(kGroupM, num_item_rows - first_row);
        const u32 in_group = index - group * items_per_group;
        m_block = (first_row + in_group % group_rows) * kClusterM + (kClusterM > 1 ? blockIdx.x % kClusterM : 0);
        n_block = in_group / group_rows * kClusterN + (kClusterN > 1 ? blockIdx.x % kClusterN : 0);
    }

    // kContiguous: load the expert of the next item's first row (item is the next one already).
    __device__ __forceinline__ void prefetch_group(u32 total_items) {
        if (item < total_items) {
            u32 m_block, n_block;
            raster(item, m_block, n_block);
            prefetched_row = m_block * kBlockM;
            prefetched_groups = load_group(kWholeWarp ? min(prefetched_row + lane_id(), m - 1) : prefetched_row);
        }
    }

    // Contiguous kinds: the expert of the tile's rows; false for a padding block.
    __device__ __forceinline__ bool find_group(Tile& tile) const {
        if constexpr (kType == GemmType::kContiguous) {
            int group;
            if (tile.row == prefetched_row)
                group = kWholeWarp ? int(broadcast(u32(prefetched_groups))) : prefetched_groups;
            else
                group = load_group(tile.row);
            tile.group = static_cast<u32>(group);
            return uniform(group >= 0 && static_cast<u32>(group) < num_groups);
        } else {
            // The first expert whose aligned end lies past the tile: ends ascend in valid input, and
            // the search stays in bounds whatever they hold.
            u32 low = 0, high = num_groups;
            while (low < high) {
                const u32 mid = (low + high) / 2;
                const u32 end = static_cast<u32>(max(load_group(mid), 0));
                if (uniform(align_up(end, kContiguousAlignment) <= tile.row)) low = mid + 1; else high = mid;
            }
            if (low == num_groups) return false;
            const u32 end = min(static_cast<u32>(max(load_group(low), 0)), m);
            tile.group = low;
            tile.row_limit = end;
            return uniform(tile.row < end);
        }
    }

    // Contiguous kinds: the expert of the tile's rows. Under kClusterM, the pair's two block-rows
    // share B only when one expert holds both; a block-row of padding (or past M) still runs, with
    // nothing to write, while its peer's is real: the pair walks the stage ring in step. False when
    // neither is real.
    __device__ __forceinline__ bool find_pair_group(Tile& tile) const {
        if constexpr (kClusterM == 1) {
            return find_group(tile);
        } else {
            const bool mine = tile.row < m && find_group(tile);
            Tile peer = tile;
            peer.m_block = tile.m_block ^ 1;
            peer.row = peer.m_block * kBlockM;
            const bool theirs = peer.row < m && find_group(peer);
            tile.shares_b = mine && theirs && peer.group == tile.group;
            if (!mine) {
                tile.group = peer.group;  // an expert whose B is in bounds; no row is written
                tile.row_limit = tile.row;
            }
            return mine || theirs;
        }
    }

    // kKGrouped: num_items is one expert's; the experts' K segments follow each other, each clamped
    // to what is left of sum_K and rounded down to 16 (valid ones are multiples of 128): a bad length
    // cannot misalign the next experts' TMA descriptors (ExpertMaps, pipeline.cuh). An expert with no
    // K has no tiles: D holds C already (the kernels add into D). The segment's length is broadcast
    // from lane 0 so that the main loop's bound is known warp-uniform.
    __device__ __forceinline__ bool next_k_grouped(Tile& tile) {
        for (; cursor_group < num_groups; ++cursor_group) {
            const u32 k_rows = min(static_cast<u32>(max(load_group(cursor_group), 0)), k_total - cursor_k) & ~15u;
            if (uniform(k_rows == 0)) continue;
            if (item < cursor_first_item + num_items) {
                raster(item - cursor_first_item, tile.m_block, tile.n_block);
                tile.row = tile.m_block * kBlockM;
                tile.row_limit = m;
                tile.group = cursor_group;
                tile.k_first = cursor_k;
                tile.k_rows = kWholeWarp ? broadcast(k_rows) : k_rows;
                item += item_stride();
                return true;
            }
            cursor_first_item += num_items;
            cursor_k += k_rows;
        }
        return false;
    }

    // kBatchSum: num_items is one run's; the runs' items follow each other.
    __device__ __forceinline__ bool next_batch_sum(Tile& tile) {
        const u32 num_k_blocks = k_total * num_groups;
        if (item >= num_items * ceil_div(num_k_blocks, k_blocks_per_item)) return false;
        const u32 run = item / num_items;
        raster(item - run * num_items, tile.m_block, tile.n_block);
        tile.row = tile.m_block * kBlockM;
        tile.row_limit = m;
        tile.group = 0;
        tile.k_first = run * k_blocks_per_item;
        tile.k_rows = min(k_blocks_per_item, num_k_blocks - tile.k_first);
        item += item_stride();
        return true;
    }

    __device__ __forceinline__ bool next_masked(Tile& tile) {
        for (; cursor_group < num_groups; ++cursor_group) {
            const u32 rows = min(static_cast<u32>(max(load_group(cursor_group), 0)), max_m);
            // Pairs share B over two block-rows of the expert. An odd last block-row (or the only one)
            // would leave one CTA of its pair idle: there the pair takes adjacent column blocks
            // instead, each CTA loading its own B.
            const u32 block_rows = ceil_div(rows, kBlockM);
            const u32 paired_items = block_rows / kClusterM * num_n_blocks;
            const u32 group_items =
                paired_items + (kClusterM > 1 && block_rows % kClusterM ? ceil_div(num_n_blocks, kClusterM) : 0);
            if (uniform(item < cursor_first_item + group_items)) {
                const u32 local = item - cursor_first_item;
                const u32 rank = kClusterM > 1 ? blockIdx.x % kClusterM : 0;
                const bool shares_b = kClusterM == 1 || uniform(local < paired_items);
                const u32 item_row = shares_b ? local / num_n_blocks : block_rows / kClusterM;
                tile.m_block = item_row * kClusterM + (shares_b ? rank : 0);
                tile.n_block = shares_b ? local - item_row * num_n_blocks : (local - paired_items) * kClusterM + rank;
                tile.shares_b = shares_b;
                tile.group = cursor_group;
                tile.row = cursor_group * max_m + tile.m_block * kBlockM;
                // A column block past N (odd counts) has no rows to write.
                tile.row_limit = tile.n_block < num_n_blocks ? cursor_group * max_m + rows : tile.row;
                item += item_stride();
                return true;
            }
            cursor_first_item += group_items;
        }
        return false;
    }
};

}  // namespace moegemm
