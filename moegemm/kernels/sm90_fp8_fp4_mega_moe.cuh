// The MoE layer with FP8 tokens and FP4 weights in one persistent kernel on sm_90a (DeepGEMM's Mega
// MoE, which it has for Blackwell only): route, dispatch, linear 1, SwiGLU, linear 2 and combine,
// with the numerics of the unfused pipeline (moegemm/ops/mega_moe.py, sm90_moe_layer.cuh) bit for bit
// where its GEMMs take K in the same order (one CTA over K, no split).
//
// One CTA an SM, all resident (a cooperative launch), phases split by grid-wide barriers:
//   rank: each routed pair's rank among its expert's pairs (one atomic a warp and expert);
//   lay out (every CTA, in shared memory): expert e's rows from kTokens * tile_begin[e], its pairs
//     first, then padding to a whole token tile; dispatch: each pair's token into its row, its 1x32
//     scales folded per 128 as the fold kernel does for the unfused GEMMs, its routing weight beside;
//   units, round robin over the CTAs, every L1 unit before any L2 unit:
//     L1 unit (a token tile, 128 intermediate columns): the swap-AB kernel's main loop over H, in
//       256 / kRows passes of gate and up rows (the CTA's first and second half of weight rows), their
//       sums rounded to BF16 into a staging tile; then SwiGLU times the routing weight, quantised per
//       1x32 and folded per 128, into the activation rows; then counted done for its tile (release);
//     L2 unit (a token tile, kRows hidden columns, the last block of H perhaps fewer): once its
//       tile's L1 units are done (acquire), the main loop over I, its BF16 rows stored;
//     L1 units wait on nothing and each CTA takes its L1 units first, so no CTA waits on one that
//     is not running;
//   combine (sm90_moe_layer.cuh's), and the counters reset for the next call (CUDA-graph safe: no
//   host read).
// kRanks: one rank of a group (issue 27's expert parallelism, ops/mega_moe.py "across ranks"). The
// caller's tokens and routing, and each of its pairs' outputs (`combined` [T_max, k, H]), live in
// memory every rank addresses (symmetric memory: `peers`, each rank's base). The layer runs over
// num_ranks * T_max token slots (rank s's token t in slot s * T_max + t) with this rank's experts
// [first_expert, first_expert + E): a barrier across ranks first (every rank's tokens, routing and
// token count in place), rank and dispatch read the sources' routing and tokens from their memory,
// and after the units each routed pair's L2 row goes into its source's `combined`; a second barrier,
// then each rank sums its own tokens' outputs. One rank without kRanks reads its own buffer.
// Warps as in the swap-AB kernel (sm90_fp8_fp4_gemm_swap_ab.cuh): the math warpgroups, the producer
// thread (TMA), the permute warp; every ring position carries across units.
#pragma once
#include <moegemm/flags.cuh>

#include "sm90_fp8_fp4_gemm_swap_ab.cuh"
#include "sm90_moe_layer.cuh"

namespace moegemm {

struct MegaMoeParams {
    TmaDescriptor tma_tokens;     // tokens e4m3 [rows, H], box {128, kTokens}, 128-byte swizzle
    TmaDescriptor tma_tokens_sf;  // their folded scales fp32 [H / 128, sf_pitch], box {kTokens, 1}
    TmaDescriptor tma_l1;         // L1 packed e2m1 [E * 2I, H / 2] bytes, box {128, kRows / 2}, 128-byte swizzle
    TmaDescriptor tma_l1_sf;      // L1 packed exponents int32 [E * H / 128, 2I], box {kRows / 2, 1}
    TmaDescriptor tma_act;        // activation e4m3 [rows, I], box {128, kTokens}, 128-byte swizzle
    TmaDescriptor tma_act_sf;     // its folded scales fp32 [I / 128, sf_pitch], box {kTokens, 1}
    TmaDescriptor tma_l2;         // L2 packed e2m1 [E * H, I / 2] bytes, box {128, kRows}, 128-byte swizzle
    TmaDescriptor tma_l2_sf;      // L2 packed exponents int32 [E * I / 128, H], box {kRows, 2}
    u8* storage;                  // the layer buffer's one allocation
    u8* y;                        // bf16 [T, H], y_pitch elements between rows
    u8* stats;                    // int32 or int64 [E], or null
    const u64* peers;             // [num_ranks]: each rank's base of x .. header (one rank: storage)
    // Byte offsets from a rank's base: x, x_sf, topk_idx, topk_weights (the caller's); kRanks: combined
    // bf16 [T_max, k, H], header u32 [1 + num_ranks] (the token count, the barrier's flags).
    u64 x, x_sf, topk_idx, topk_weights, combined, header;
    // Byte offsets into storage: tokens, tokens_sf, act, act_sf, l2_out bf16 [rows + 1, H] (its spare
    // row zeros), pair_rows int32 [slots * k], row_weights fp32 [rows], control u32 [3 + E + tiles]:
    // the grid barrier's arrivals and generation, the barrier across ranks' epoch (kept), each
    // expert's pairs, each token tile's finished L1 units (zero between calls).
    u64 tokens, tokens_sf, act, act_sf, l2_out, pair_rows, row_weights, control;
    u64 y_pitch;
    u32 num_tokens;  // this rank's
    u32 max_tokens;  // T_max: token slots of each rank
    u32 rank, num_ranks, first_expert;
    u32 num_topk, num_experts, hidden, intermediate;  // num_experts: this rank's
    u32 sf_pitch;   // rows of the folded scales' views, a multiple of 4
    u32 spare_row;  // the pairs of no expert read L2's output there (zeros)
    u32 stats_bytes;
    u32 clamp_bits;  // the activation clamp as float bits (+inf: none)
};

template <u32 kMathWarpgroups_, u32 kTokens_, u32 kStages_, bool kDoubleBuffer_, bool kRanks_>
struct MegaMoeConfig {
    static constexpr bool kRanks = kRanks_;
    static constexpr u32 kMaxRanks = 8;
    // The swap-AB kernel's ring, barriers and widening table, two K blocks a stage, then our own.
    using Gemm = Fp8Fp4SwapAbConfig<kMathWarpgroups_, kTokens_, kStages_, 1, false, false, GemmType::kNormal, 1, 2,
                                    kDoubleBuffer_>;
    static constexpr u32 kTokens = kTokens_, kStages = kStages_, kKBlocks = Gemm::kKBlocks;
    static constexpr u32 kRows = Gemm::kRows, kHalfRows = kRows / 2;
    static constexpr u32 kNumThreads = Gemm::kNumThreads, kNumMathThreads = Gemm::kNumMathThreads;
    static constexpr u32 kMathWarps = kNumMathThreads / 32;
    static constexpr u32 kChunk = 128;                  // intermediate columns an L1 unit activates
    static constexpr u32 kPasses = 2 * kChunk / kRows;  // of gate and up rows per L1 unit
    static constexpr u32 kMaxExperts = 1024;
    // The staging tile: a token's BF16 gate (columns 0-127) and up (128-255) sums, or its L2 row;
    // padded by 16 bytes so that the accumulators' scattered writes spread over the banks.
    static constexpr u32 kStagingPitch = (2 * kChunk + 8) * 2;
    static constexpr u32 kStagingOffset = align_up(Gemm::kSmemBytes, 16u);
    static constexpr u32 kTablesOffset = kStagingOffset + kTokens * kStagingPitch;
    // tile_begin [E + 1] (each expert's first token tile), counts [E] (its pairs).
    // Then each rank's base and token count.
    static constexpr u32 kSourcesOffset = align_up(kTablesOffset + (2 * kMaxExperts + 1) * 4, 8u);
    static constexpr u32 kSmemBytes = kSourcesOffset + kMaxRanks * 12;
    static constexpr u64 kWaitLimitNs = 20'000'000'000ull;  // a wait on other CTAs traps after this

    static_assert(kRows <= 2 * kChunk && (2 * kChunk) % kRows == 0, "whole passes of gate and up rows");
    static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a block may use");
};

template <class Config>
struct MegaMoeKernel {
    using Gemm = typename Config::Gemm;
    using Swap = Fp8Fp4SwapAbKernel<Gemm>;
    static constexpr u32 BT = Config::kTokens, kAcc = BT / 2, kKBlocks = Config::kKBlocks;

    const MegaMoeParams& p;
    u8* smem;
    u32* control;      // arrivals, generation, epoch, counts [E], tile_done [tiles]
    u32* tile_begin;   // shared: [E + 1]
    u32* counts;       // shared: [E]
    u8** source_base;  // shared: [num_ranks] each rank's base (x, x_sf, topk_idx, topk_weights, combined)
    u32* source_tokens;  // shared: [num_ranks] each rank's token count
    u32 chunks, n_blocks, kb1, kb2;  // L1 units a tile, L2 units a tile, K blocks of L1 and L2

    __device__ __forceinline__ u32* expert_pairs() const { return control + 3; }
    __device__ __forceinline__ u32* tile_done() const { return control + 3 + p.num_experts; }
    template <class T>
    __device__ __forceinline__ T* view(u64 offset) const {
        return reinterpret_cast<T*>(p.storage + offset);
    }
    // Token slots' pairs: kRanks, num_ranks * T_max * k (source s's from s * T_max * k); else this call's.
    __device__ __forceinline__ u32 slot_pairs() const {
        return Config::kRanks ? p.num_ranks * p.max_tokens * p.num_topk : p.num_tokens * p.num_topk;
    }
    // Slot pair q's source rank, and its pair index there.
    __device__ __forceinline__ u32 source_of(u32 q, u32& pair) const {
        const u32 s = Config::kRanks ? q / (p.max_tokens * p.num_topk) : 0;
        pair = q - s * p.max_tokens * p.num_topk;
        return s;
    }

    // Slot pair q's local expert, or E for a pair of no expert here (or past its source's tokens). The
    // routing may be a peer's: read through L2 (written before the barrier across ranks).
    __device__ __forceinline__ u32 expert_of(u32 q) const {
        u32 pair;
        const u32 s = source_of(q, pair);
        if (pair >= source_tokens[s] * p.num_topk) return p.num_experts;
        const long long e = __ldcg(reinterpret_cast<const long long*>(source_base[s] + p.topk_idx) + pair);
        const long long local = e - (long long)p.first_expert;
        return local >= 0 && local < (long long)p.num_experts ? u32(local) : p.num_experts;
    }

    // Every thread of every CTA; the CTAs all resident. The last to arrive resets the count and
    // releases the others by the generation word.
    __device__ __forceinline__ void grid_sync() const {
        __syncthreads();
        if (threadIdx.x == 0) {
            u32* arrivals = control;
            u32* generation = control + 1;
            const u32 current = ld_acquire_gpu(generation);
            __threadfence();
            if (atom_acq_rel_gpu_add(arrivals, 1) == gridDim.x - 1) {
                *reinterpret_cast<volatile u32*>(arrivals) = 0;
                st_release_gpu(generation, current + 1);
            } else {
                spin_until([&] { return ld_acquire_gpu(generation) != current; }, Config::kWaitLimitNs);
            }
            __threadfence();
        }
        __syncthreads();
    }

    // kRanks: the barrier across ranks, flags in each rank's header at the epoch's count (kept across
    // calls: every rank passes the same barriers), between two grid barriers. Every rank's writes
    // before it, to any rank's memory, are visible to every rank after it.
    __device__ __forceinline__ void ranks_sync() const {
        grid_sync();
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            const u32 epoch = control[2] + 1;
            control[2] = epoch;
            __threadfence_system();
            for (u32 r = 0; r < p.num_ranks; ++r)
                st_release_sys(reinterpret_cast<u32*>(source_base[r] + p.header) + 1 + p.rank, epoch);
            const u32* flags = reinterpret_cast<const u32*>(source_base[p.rank] + p.header) + 1;
            for (u32 r = 0; r < p.num_ranks; ++r)
                spin_until([&] { return int(ld_acquire_sys(flags + r) - epoch) >= 0; }, Config::kWaitLimitNs);
        }
        grid_sync();
    }

    // Each rank's base and token count into shared memory (kRanks: after the first barrier across
    // ranks, when every count is in place).
    __device__ __forceinline__ void read_sources() const {
        if (threadIdx.x < p.num_ranks) {
            source_base[threadIdx.x] = Config::kRanks ? reinterpret_cast<u8*>(__ldg(p.peers + threadIdx.x)) : p.storage;
            source_tokens[threadIdx.x] = Config::kRanks
                ? __ldcg(reinterpret_cast<const u32*>(reinterpret_cast<u8*>(__ldg(p.peers + threadIdx.x)) + p.header))
                : p.num_tokens;
        }
        __syncthreads();
    }

    // kRanks, before the first barrier across ranks: this rank's token count into its header, and
    // zeros into `combined` for its pairs of no expert of any rank (no rank writes those).
    __device__ __forceinline__ void open_call() const {
        u8* own = source_base[p.rank];
        if (blockIdx.x == 0 && threadIdx.x == 0)
            *reinterpret_cast<volatile u32*>(own + p.header) = p.num_tokens;
        const long long* topk_idx = reinterpret_cast<const long long*>(own + p.topk_idx);
        const long long experts = (long long)p.num_experts * p.num_ranks;
        const u32 warps = gridDim.x * Config::kNumThreads / 32;
        for (u32 pair = blockIdx.x * Config::kNumThreads / 32 + threadIdx.x / 32; pair < p.num_tokens * p.num_topk;
             pair += warps) {
            const long long e = topk_idx[pair];
            if (e >= 0 && e < experts) continue;
            u8* row = own + p.combined + u64(pair) * p.hidden * 2;
            for (u32 offset = lane_id() * 16; offset < p.hidden * 2; offset += 32 * 16)
                *reinterpret_cast<uint4*>(row + offset) = make_uint4(0, 0, 0, 0);
        }
    }

    // kRanks, after the units: each routed slot pair's L2 row into its source's `combined`.
    __device__ __forceinline__ void send() const {
        const int* pair_rows = view<const int>(p.pair_rows);
        const u32 warps = gridDim.x * Config::kNumThreads / 32;
        for (u32 q = blockIdx.x * Config::kNumThreads / 32 + threadIdx.x / 32; q < slot_pairs(); q += warps) {
            const u32 row = u32(__ldcg(pair_rows + q));
            if (row == p.spare_row) continue;
            u32 pair;
            const u32 s = source_of(q, pair);
            const u8* from = p.storage + p.l2_out + u64(row) * p.hidden * 2;
            u8* to = source_base[s] + p.combined + u64(pair) * p.hidden * 2;
            for (u32 offset = lane_id() * 16; offset < p.hidden * 2; offset += 32 * 16)
                *reinterpret_cast<uint4*>(to + offset) = __ldcg(reinterpret_cast<const uint4*>(from + offset));
        }
    }

    // Each routed slot pair's rank among its expert's pairs into pair_rows (one atomic a warp and
    // expert; the order within an expert is the atomics', which changes no pair's result).
    __device__ __forceinline__ void rank() const {
        int* pair_rows = view<int>(p.pair_rows);
        const u32 num_pairs = slot_pairs(), lane = lane_id();
        const u32 warps = gridDim.x * Config::kNumThreads / 32;
        for (u32 first = (blockIdx.x * Config::kNumThreads / 32 + threadIdx.x / 32) * 32; first < num_pairs;
             first += warps * 32) {
            const u32 pair = first + lane, e = pair < num_pairs ? expert_of(pair) : p.num_experts;
            const u32 peers = __match_any_sync(0xffffffffu, e), leader = __ffs(peers) - 1;
            u32 base = 0;
            if (e < p.num_experts && lane == leader) base = atomicAdd(expert_pairs() + e, __popc(peers));
            base = __shfl_sync(0xffffffffu, base, leader);
            if (e < p.num_experts) pair_rows[pair] = int(base + __popc(peers & lanes_below()));
        }
    }

    // Warp 0 of each CTA: each expert's first token tile and pairs into shared memory (CTA 0 adds the
    // pairs to the stats).
    __device__ __forceinline__ void lay_out() const {
        const u32 experts = p.num_experts, lane = lane_id();
        if (threadIdx.x >= 32) return;
        const u32 per_lane = ceil_div(experts, 32u), begin = min(lane * per_lane, experts);
        const u32 end = min(begin + per_lane, experts);
        u32 tiles = 0;
        for (u32 e = begin; e < end; ++e) {
            counts[e] = __ldcg(expert_pairs() + e);
            tiles += ceil_div(counts[e], BT);
        }
        u32 before = tiles;  // inclusive scan over the lanes, then exclusive
#pragma unroll
        for (u32 offset = 1; offset < 32; offset *= 2) {
            const u32 other = __shfl_up_sync(0xffffffffu, before, offset);
            if (lane >= offset) before += other;
        }
        if (lane == 31) tile_begin[experts] = before;
        before -= tiles;
        for (u32 e = begin; e < end; ++e) {
            tile_begin[e] = before;
            before += ceil_div(counts[e], BT);
            if (blockIdx.x == 0 && p.stats_bytes == 4) reinterpret_cast<int*>(p.stats)[e] += int(counts[e]);
            if (blockIdx.x == 0 && p.stats_bytes == 8) reinterpret_cast<long long*>(p.stats)[e] += counts[e];
        }
    }

    // Warp per slot pair: its row into pair_rows (the spare row for a pair of no expert here), its
    // token (from its source) folded into the row, the folded scales (fp32 [H / 128, sf_pitch]) and
    // its routing weight.
    __device__ __forceinline__ void dispatch() const {
        int* pair_rows = view<int>(p.pair_rows);
        const u32 num_pairs = slot_pairs(), lane = lane_id(), sf_words = p.hidden / 128;
        const u32 warps = gridDim.x * Config::kNumThreads / 32;
        for (u32 q = blockIdx.x * Config::kNumThreads / 32 + threadIdx.x / 32; q < num_pairs; q += warps) {
            const u32 e = expert_of(q);
            const u32 row = e < p.num_experts ? tile_begin[e] * BT + u32(__ldcg(pair_rows + q)) : p.spare_row;
            __syncwarp();
            if (lane == 0) pair_rows[q] = int(row);
            if (row == p.spare_row) continue;
            u32 pair;
            const u32 s = source_of(q, pair), token = pair / p.num_topk;
            const u8* source = source_base[s];
            if (lane == 0)
                view<float>(p.row_weights)[row] = __ldcg(reinterpret_cast<const float*>(source + p.topk_weights) + pair);
            const u8* x = source + p.x + u64(token) * p.hidden;
            const u32* x_sf = reinterpret_cast<const u32*>(source + p.x_sf) + u64(token) * sf_words;
            for (u32 chunk = lane; chunk < p.hidden / 16; chunk += 32) {
                const u32 word = __ldcg(x_sf + chunk / 8);
                u32 exponents[4];
#pragma unroll
                for (u32 j = 0; j < 4; ++j) exponents[j] = (word >> (8 * j)) & 0xFF;
                // The chunk's own 1x32 block's exponent by a shift: an indexed array would go to local memory.
                const u32 own = (word >> (8 * (chunk % 8 / 2))) & 0xFF;
                const u32 top = fold_top(exponents), factor = fold_factor(own, top);
                const uint4 packed = __ldcg(reinterpret_cast<const uint4*>(x + chunk * 16));
                u32 v[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
                for (u32 i = 0; i < 4; ++i) v[i] = scale_e4m3x4(v[i], factor);
                st_global_v4(p.storage + p.tokens + u64(row) * p.hidden + chunk * 16, v);
                if (chunk % 8 == 0) view<float>(p.tokens_sf)[u64(chunk / 8) * p.sf_pitch + row] = folded_scale(top);
            }
        }
    }

    struct Unit {
        bool l2;
        u32 expert, column_block, tile, tokens;  // column_block: L1's 128-column chunk, or L2's kRows block
    };

    // Units of an expert in the order (column block, tile), so that CTAs running at once share
    // their weights in L2; all L1 units, then all L2 units.
    __device__ __forceinline__ Unit unit_of(u32 u, u32 l1_units) const {
        Unit unit;
        unit.l2 = u >= l1_units;
        if (unit.l2) u -= l1_units;
        const u32 per_tile = unit.l2 ? n_blocks : chunks;
        // The last expert whose first unit is at or before u has tiles (one of none shares its start
        // with the next).
        u32 lo = 0, hi = p.num_experts;
        while (hi - lo > 1) {
            const u32 mid = (lo + hi) / 2;
            if (tile_begin[mid] * per_tile <= u) lo = mid; else hi = mid;
        }
        const u32 tiles = tile_begin[lo + 1] - tile_begin[lo], local = u - tile_begin[lo] * per_tile;
        const u32 j = local % tiles;
        unit.expert = lo;
        unit.column_block = local / tiles;
        unit.tile = tile_begin[lo] + j;
        unit.tokens = min(BT, counts[lo] - j * BT);
        return unit;
    }

    // The producer thread: a unit's stages, kKBlocks K blocks each; an L2 unit's first once its tile's
    // activation is complete. A last stage of one block loads no tokens' tile for the other.
    __device__ __forceinline__ void produce(const Unit& unit, Barrier* full, Barrier* empty,
                                            StageRing<Config::kStages>& ring) const {
        const int token_row = int(unit.tile * BT), e = int(unit.expert);
        const u32 tile_a_bytes = BT * 128, sfa_bytes = BT * 4;
        const TmaDescriptor *tma_a = &p.tma_tokens, *tma_sfa = &p.tma_tokens_sf;
        u32 num_k_blocks = kb1, passes = Config::kPasses;
        if (unit.l2) {
            tma_a = &p.tma_act, tma_sfa = &p.tma_act_sf, num_k_blocks = kb2, passes = 1;
            spin_until([&] { return ld_acquire_gpu(tile_done() + unit.tile) >= chunks; }, Config::kWaitLimitNs);
            fence_proxy_async_global();  // the activation was stored by the generic proxy
        }
        for (u32 pass = 0; pass < passes; ++pass) {
            // L1: gate rows, then up rows of the pass's columns; L2: the unit's hidden columns.
            const u32 column = unit.column_block * Config::kChunk + pass * Config::kHalfRows;
            const int gate_row = e * int(2 * p.intermediate) + int(column);
            const int up_row = gate_row + int(p.intermediate);
            for (u32 k_block = 0; k_block < num_k_blocks; k_block += kKBlocks, ring.advance()) {
                const u32 s = ring.stage, blocks = min(kKBlocks, num_k_blocks - k_block);
                u8* b_tile = smem + Gemm::kTileBOffset + s * Gemm::kTileBBytes;
                u8* sfb = smem + Gemm::kSfbOffset + s * kKBlocks * Gemm::kSfbBytes;
                const u32 sfb_bytes = unit.l2 ? kKBlocks * Config::kRows * 4 : blocks * Config::kRows * 4;
                empty[s].wait(ring.phase ^ 1);
                full[s].arrive_expect_tx(blocks * (tile_a_bytes + sfa_bytes) + Gemm::kTileBBytes + sfb_bytes);
                for (u32 b = 0; b < blocks; ++b) {
                    const u32 slot = s * kKBlocks + b;
                    tma_load_2d(smem + slot * Gemm::kTileABytes, tma_a, &full[s], int((k_block + b) * 128), token_row);
                    tma_load_2d(smem + Gemm::kSfaOffset + slot * Gemm::kSfaBytes, tma_sfa, &full[s], token_row,
                                int(k_block + b));
                }
                if (unit.l2) {
                    const int row = e * int(p.hidden) + int(unit.column_block * Config::kRows);
                    tma_load_2d(b_tile, &p.tma_l2, &full[s], int(k_block * 64), row);
                    tma_load_2d(sfb, &p.tma_l2_sf, &full[s], int(unit.column_block * Config::kRows),
                                e * int(kb2) + int(k_block));
                } else {
                    tma_load_2d(b_tile, &p.tma_l1, &full[s], int(k_block * 64), gate_row);
                    tma_load_2d(b_tile + Config::kHalfRows * Gemm::kRowBytes, &p.tma_l1, &full[s], int(k_block * 64),
                                up_row);
                    for (u32 b = 0; b < blocks; ++b) {
                        const int sf_row = e * int(kb1) + int(k_block + b);
                        u8* block_sfb = sfb + b * Gemm::kSfbBytes;
                        tma_load_2d(block_sfb, &p.tma_l1_sf, &full[s], int(column), sf_row);
                        tma_load_2d(block_sfb + Config::kHalfRows * 4, &p.tma_l1_sf, &full[s],
                                    int(column + p.intermediate), sf_row);
                    }
                }
            }
        }
    }

    // The thread's sums as BF16 into the staging tile: weight row r (L1 pass `pass`: gate rows in the
    // first half, up rows in the second) of token t at column `column_of(r)` of row t.
    template <class ColumnOf>
    __device__ __forceinline__ void stage(const float* totals, ColumnOf column_of) const {
        const u32 staging = smem_addr(smem + Config::kStagingOffset);
        const u32 row = threadIdx.x / 128 * 64 + slab_row();
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i) {
            const u32 token = (i / 4) * 8 + lane_id() % 4 * 2 + i % 2;
            const u32 bits = pack_bf16x2(totals[i], 0.0f) & 0xFFFFu;
            asm volatile("st.shared.u16 [%0], %1;" ::"r"(staging + token * Config::kStagingPitch +
                                                        column_of(row + 8 * ((i / 2) % 2)) * 2),
                         "h"(u16(bits)));
        }
    }

    // L1's epilogue, warp per token of the tile: lane l takes columns 4 l to 4 l + 3 of the chunk
    // (a 1x32 block is eight lanes), quantised as the activation kernel does and folded as the fold
    // kernel does; then the tile's count of finished L1 units gains one.
    __device__ __forceinline__ void activate(const Unit& unit) const {
        const u32 staging = smem_addr(smem + Config::kStagingOffset), lane = lane_id();
        const float clamp = __uint_as_float(p.clamp_bits);
        for (u32 t = threadIdx.x / 32; t < unit.tokens; t += Config::kMathWarps) {
            const u32 row = unit.tile * BT + t;
            const float weight = __ldcg(view<const float>(p.row_weights) + row);
            u32 gate[2], up[2];
            ld_shared_v2_u32(staging + t * Config::kStagingPitch + lane * 8, gate[0], gate[1]);
            ld_shared_v2_u32(staging + t * Config::kStagingPitch + (Config::kChunk + lane * 4) * 2, up[0], up[1]);
            float a[4];
            moe_swiglu(gate, up, weight, clamp, a);
            u32 packed[1];
            const u32 exponent = quantize_ue8m0_block<8>(a, packed);
            u32 exponents[4];
#pragma unroll
            for (u32 b = 0; b < 4; ++b) exponents[b] = __shfl_sync(0xffffffffu, exponent, 8 * b);
            const u32 top = fold_top(exponents);
            const u64 column = u64(unit.column_block) * Config::kChunk;
            *reinterpret_cast<u32*>(p.storage + p.act + u64(row) * p.intermediate + column + lane * 4) =
                scale_e4m3x4(packed[0], fold_factor(exponent, top));
            if (lane == 0) view<float>(p.act_sf)[u64(unit.column_block) * p.sf_pitch + row] = folded_scale(top);
        }
        fence_proxy_async_global();  // L2 units read the activation by TMA
        named_barrier_sync(1, Config::kNumMathThreads);
        if (threadIdx.x == 0) {
            __threadfence();
            red_release_gpu_add(tile_done() + unit.tile, 1);
        }
    }

    // L2's epilogue: the staging tile's valid tokens and columns (a last block may pass H) as rows of
    // l2_out, 16 bytes a thread.
    __device__ __forceinline__ void store(const Unit& unit) const {
        const u32 staging = smem_addr(smem + Config::kStagingOffset);
        constexpr u32 kPieces = Config::kRows / 8;
        for (u32 index = threadIdx.x; index < unit.tokens * kPieces; index += Config::kNumMathThreads) {
            const u32 t = index / kPieces, piece = index % kPieces;
            const u32 column = unit.column_block * Config::kRows + piece * 8;
            if (column >= p.hidden) continue;
            u32 v[4];
            ld_shared_v4_u32(staging + t * Config::kStagingPitch + piece * 16, v);
            st_global_v4(p.storage + p.l2_out + ((u64(unit.tile) * BT + t) * p.hidden + column) * 2, v);
        }
    }

    // The math warpgroups: each unit's passes through the swap-AB main loop, then its epilogue. The
    // named barriers keep one unit's staging reads before the next unit's writes.
    __device__ __forceinline__ void compute(const Unit& unit, Barrier* full, Barrier* empty, Barrier* permuted,
                                            typename Swap::Cursor& at) const {
        float totals[kAcc];
        if (unit.l2) {
            Swap::consume(smem, full, empty, permuted, at, 0, kb2, totals);
            stage(totals, [](u32 r) { return r; });
        } else {
            for (u32 pass = 0; pass < Config::kPasses; ++pass) {
                Swap::consume(smem, full, empty, permuted, at, 0, kb1, totals);
                stage(totals, [&](u32 r) {
                    const u32 half = r >= Config::kHalfRows;
                    return half * Config::kChunk + pass * Config::kHalfRows + r - half * Config::kHalfRows;
                });
            }
        }
        named_barrier_sync(1, Config::kNumMathThreads);
        if (unit.l2)
            store(unit);
        else
            activate(unit);
        named_barrier_sync(1, Config::kNumMathThreads);
    }
};

template <class Config>
__device__ __forceinline__ void sm90_fp8_fp4_mega_moe(const MegaMoeParams& p) {
    using Kernel = MegaMoeKernel<Config>;
    using Gemm = typename Config::Gemm;
    extern __shared__ __align__(1024) u8 smem[];
    Barrier* full = reinterpret_cast<Barrier*>(smem + Gemm::kBarrierOffset);
    Barrier* empty = full + Config::kStages;
    Barrier* permuted = empty + Config::kStages;
    u32* tables = reinterpret_cast<u32*>(smem + Config::kTablesOffset);
    u8** source_base = reinterpret_cast<u8**>(smem + Config::kSourcesOffset);
    const Kernel kernel{p, smem, reinterpret_cast<u32*>(p.storage + p.control), tables,
                        tables + Config::kMaxExperts + 1, source_base,
                        reinterpret_cast<u32*>(source_base + Config::kMaxRanks), p.intermediate / 128,
                        ceil_div(p.hidden, Config::kRows), p.hidden / 128, p.intermediate / 128};

    if (threadIdx.x == Gemm::kProducerThread) {
        tma_prefetch_descriptor(&p.tma_l1);
        tma_prefetch_descriptor(&p.tma_l1_sf);
        tma_prefetch_descriptor(&p.tma_l2);
        tma_prefetch_descriptor(&p.tma_l2_sf);
    }
    Kernel::Swap::init_ring(smem, full, empty, permuted);

    if constexpr (Config::kRanks) {
        kernel.read_sources();  // the bases; the counts are read again once every rank has written its own
        kernel.open_call();
        kernel.ranks_sync();
    }
    kernel.read_sources();
    kernel.rank();
    kernel.grid_sync();
    kernel.lay_out();
    __syncthreads();
    kernel.dispatch();
    fence_proxy_async_global();  // the GEMMs read the dispatched rows by TMA
    kernel.grid_sync();

    const u32 tiles = tables[p.num_experts], l1_units = tiles * kernel.chunks;
    const u32 units = l1_units + tiles * kernel.n_blocks;
    if (threadIdx.x >= Config::kNumMathThreads) {
        StageRing<Config::kStages> ring;
        if (threadIdx.x == Gemm::kProducerThread) {
            fence_proxy_async_global();  // the dispatched rows, stored by the generic proxy
            for (u32 u = blockIdx.x; u < units; u += gridDim.x)
                kernel.produce(kernel.unit_of(u, l1_units), full, empty, ring);
        } else if (threadIdx.x / 32 == Gemm::kPermuteWarp) {
            for (u32 u = blockIdx.x; u < units; u += gridDim.x) {
                const typename Kernel::Unit unit = kernel.unit_of(u, l1_units);
                const u32 passes = unit.l2 ? 1 : Config::kPasses;
                for (u32 pass = 0; pass < passes; ++pass)
                    Kernel::Swap::permute(smem, full, permuted, unit.tokens, unit.l2 ? kernel.kb2 : kernel.kb1, ring);
            }
        }
    } else {
        typename Kernel::Swap::Cursor at;
        for (u32 u = blockIdx.x; u < units; u += gridDim.x)
            kernel.compute(kernel.unit_of(u, l1_units), full, empty, permuted, at);
    }
    kernel.grid_sync();

    if constexpr (Config::kRanks) {
        kernel.send();
        kernel.ranks_sync();
    }
    // kRanks: this rank's pairs' outputs from `combined`, [T_max * k, H] in pair order.
    const u8* outputs = Config::kRanks ? source_base[p.rank] + p.combined : p.storage + p.l2_out;
    const int* rows = Config::kRanks ? nullptr : kernel.template view<const int>(p.pair_rows);
    for (u32 token = blockIdx.x; token < p.num_tokens; token += gridDim.x)
        moe_combine_token<false>(outputs, rows, p.y, p.y_pitch, p.hidden, p.num_topk, token, threadIdx.x,
                                 Config::kNumThreads);
    // Every CTA is past its reads of the counters (the last barrier): zero them for the next call.
    if (blockIdx.x == 0) {
        for (u32 i = threadIdx.x; i < p.num_experts + tiles; i += Config::kNumThreads) kernel.control[3 + i] = 0;
    }
}

}  // namespace moegemm
