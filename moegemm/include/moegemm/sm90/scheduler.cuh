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
// Values read from `groups` are never trusted: a tile of no valid expert is skipped, every row
// range is clamped to the buffers.
enum class GemmType : u32 { kNormal = 0, kContiguous = 1, kContiguousPsum = 2, kMasked = 3 };

constexpr u32 kContiguousAlignment = 128;  // rows per expert segment boundary (contiguous kinds)

// One output tile: rows [row, row + BLOCK_M) of A's and D's two-dimensional row view, of which
// only those below row_limit may be written (and, for kContiguous, only those whose groups[] entry
// is `group`); columns n_block * BLOCK_N of expert `group` (0 when not grouped). m_block counts
// block-rows inside the expert's rows (kMasked) or inside A.
struct Tile {
    u32 m_block, n_block, group, row, row_limit;
    bool shares_b = true;  // kClusterM > 1: the cluster's CTAs share (multicast) this tile's B
};

// Tiles handed out round-robin to a persistent grid of clusters (cluster c takes work items c,
// c + number of clusters, ...). For the kinds other than kMasked, items are ordered in groups of
// kGroupM item-rows, column by column inside a group, so the tiles in flight at one time share rows
// of A and columns of B in L2. kMasked items run expert by expert. Two kinds of cluster:
//   kClusterM CTAs stacked along M (kNormal, kMasked): the CTA of rank r computes block-row
//     kClusterM * item_row + r, so the CTAs of a cluster share the B tile. A CTA whose block-row
//     lies past M still runs (its stores are skipped): its peer needs it. A kMasked expert of one
//     block-row instead gives the CTAs of a cluster adjacent column blocks, each loading its own B.
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
    static_assert(kType == GemmType::kNormal || (kSplitK == 1 && (kClusterM == 1 || kType == GemmType::kMasked)),
                  "of the grouped kinds, only kMasked multicasts");
    static_assert(kType == GemmType::kNormal || kType == GemmType::kMasked || kContiguousAlignment % kBlockM == 0,
                  "a block never straddles two experts' segments");
    static constexpr u32 kClusterSize = kClusterM * kClusterN * kSplitK;

    u32 m, num_n_blocks, num_item_rows, num_items;
    const int* groups;
    u32 num_groups, max_m;
    u32 item;
    u32 cursor_group = 0, cursor_first_item = 0;  // kMasked: the expert whose items start at cursor_first_item

    // m: rows of A (kMasked: max_M, rows per expert). groups: see GemmType.
    __device__ __forceinline__ TileScheduler(u32 m_, u32 n, const int* groups_ = nullptr, u32 num_groups_ = 1)
        : m(m_), num_n_blocks(ceil_div(n, kBlockN)), num_item_rows(ceil_div(m_, kBlockM * kClusterM)),
          num_items(num_item_rows * ceil_div(num_n_blocks, kClusterN)), groups(groups_), num_groups(num_groups_), max_m(m_),
          item(blockIdx.x / kClusterSize) {}

    __device__ __forceinline__ static u32 item_stride() { return gridDim.x / kClusterSize; }

    // The next tile of this CTA, false when there is none.
    __device__ __forceinline__ bool next(Tile& tile) {
        if constexpr (kType == GemmType::kMasked) {
            return next_masked(tile);
        } else {
            for (; item < num_items; item += item_stride()) {
                raster(item, tile.m_block, tile.n_block);
                tile.row = tile.m_block * kBlockM;
                tile.row_limit = m;
                tile.group = 0;
                if (kType == GemmType::kNormal || find_group(tile)) {
                    item += item_stride();
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

    // Contiguous kinds: the expert of the tile's rows; false for a padding block.
    __device__ __forceinline__ bool find_group(Tile& tile) const {
        if constexpr (kType == GemmType::kContiguous) {
            const int group = load_group(tile.row);
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

    __device__ __forceinline__ bool next_masked(Tile& tile) {
        const u32 item_rows_per_group = ceil_div(max_m, kBlockM * kClusterM);
        for (; cursor_group < num_groups; ++cursor_group) {
            const u32 rows = min(static_cast<u32>(max(load_group(cursor_group), 0)), max_m);
            // A cluster on an expert of one block-row would leave all but one CTA idle.
            const bool shares_b = kClusterM == 1 || !uniform(rows <= kBlockM);
            const u32 group_items = shares_b
                                        ? min(ceil_div(rows, kBlockM * kClusterM), item_rows_per_group) * num_n_blocks
                                        : ceil_div(num_n_blocks, kClusterM) * (rows > 0);
            if (uniform(item < cursor_first_item + group_items)) {
                const u32 local = item - cursor_first_item;
                const u32 rank = kClusterM > 1 ? blockIdx.x % kClusterM : 0;
                const u32 item_row = shares_b ? local / num_n_blocks : 0;
                tile.m_block = shares_b ? item_row * kClusterM + rank : 0;
                tile.n_block = shares_b ? local - item_row * num_n_blocks : local * kClusterM + rank;
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
