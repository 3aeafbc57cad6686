// The lightning indexer's MQA logits on sm_90a (DeepSeek-V3.2):
//   logits[i, j] = sum_h w[i, h] * relu(q[i, h] . k[j]) * k_scale[j]   for the keys j query i sees
// q: e4m3 (no scale), keys: e4m3 with one fp32 scale each, w: fp32; logits fp32 or bf16, row i at
// i * ld. k_scale > 0 is taken out of the relu.
// kFp4 (fp8_fp4_mqa_logits): q and keys e2m1, two per byte, with one UE8M0 exponent per 1x32 block
// (four packed in an int32 a row), widened to e4m3 on the chip (fp4.cuh) with a row's blocks folded
// into one power-of-two row scale: a key's is its k_scale, a query head's multiplies its weight
// (relu commutes with a positive scale). The keys widen in registers straight into the WGMMA's A
// fragments, as in sm90_fp8_fp4_gemm_swap_ab.cuh, taking K in that kernel's order (quad lane q's 32
// values of a 128-wide row are its 16 contiguous packed bytes); the math warps widen each q block
// into its e4m3 tile in the same order.
//
// Two problems share one kernel body (sm90_mqa_logits below):
//   MqaDense (fp8_mqa_logits): q [S, H, D], keys [S_kv, D], query i sees [ks[i], ke[i]). A q block is
//     kQueries = 128 / H queries; a CTA takes q blocks blockIdx.x + n * gridDim.x in turn and streams
//     the keys of each block's window, [min ks, max ke) over its queries clamped to [0, S_kv), the
//     start rounded down to 4 (the scales' 16-byte TMA boxes). kCompressed: row i holds key ks[i] + c
//     at column c; only keys inside the range are written.
//   MqaPaged (fp8_paged_mqa_logits): decode over a paged cache of 64-key pages (in each page the
//     64 e4m3 rows, then their 64 scales), q [B, next_n, H, D]: a q block is one batch's kQueries =
//     next_n tokens, token t sees the keys j < context_lens[b, t], page j / 64 of the batch being
//     block_table[b, j / 64]. A batch's keys come in units of 256 (four pages; at least one unit a
//     batch); CTA c takes the units from schedule[c] to schedule[c + 1] (batch, unit), a q block
//     for each batch it touches.
// A q block's kQueries * H query heads are the WGMMA's B (N = 32 to 128), each block of kBlockKv keys
// of the window its A (64 keys per math warpgroup, m64), K = D: accumulator rows are keys, columns (query,
// head). A thread sums its columns of each query, relu'd and weighted, its quad's four lanes add
// their sums (lanes of one parity ending with one key each), and half the warp stores each query's
// 16 keys. Blocks inside every query's range store unchecked: the math loop issues few instructions
// besides its FMNMX and FFMA (BENCHMARKS.md, 2026-12-07, twenty-seventh session).
//   kClean: every element of a row outside the keys it sees becomes -inf: the math warps write it
//     inside the window, the producer warpgroup's three spare warps outside it.
// Warps: kMathWarpgroups math warpgroups (two to four: while some sum their heads, the others' WGMMAs
// run), then the producer warpgroup (its first thread issues the TMA loads).
// Shared memory: kQStages q stages (the tile [kQueries * H, D], D-byte swizzle, and w [kQueries, H];
// kFp4: also the packed tile as it lands and its exponents) and kKvStages key stages (a [kBlockKv, D]
// tile, or [kBlockKv, D / 2] packed, and its scales or packed exponents).
#pragma once
#include <moegemm/fp4.cuh>
#include <moegemm/mma/wgmma.cuh>
#include <moegemm/sm90/pipeline.cuh>

namespace moegemm {

struct MqaLogitsParams {
    TmaDescriptor tma_q;         // q as [S * H, D] e4m3, box {D, kQueries * H}, D-byte swizzle (kFp4:
                                 // [S * H, D / 2] bytes, box {D / 2, kQueries * H})
    TmaDescriptor tma_q_scales;  // kFp4: q's exponents as [1, S * H] int32, box {kQueries * H, 1}
    TmaDescriptor tma_kv;        // keys [S_kv, D] e4m3, box {D, 128}, D-byte swizzle (kFp4: [S_kv, D / 2]
                                 // bytes, box {D / 2, 128})
    TmaDescriptor tma_scales;    // their scales as [1, S_kv] fp32 (kFp4: exponents, int32), box {128, 1}
    TmaDescriptor tma_weights;   // w [S, H] fp32, box {H, kQueries}
    const int* ks;              // [S]
    const int* ke;              // [S]
    u8* logits;
    u64 ld_logits;  // elements between rows of logits
    u32 seq_len, seq_len_kv, num_q_blocks;
    u32 columns;  // logits' columns: S_kv, or max_seqlen_k (kCompressed)
};

struct PagedMqaLogitsParams {
    TmaDescriptor tma_q;         // q as [B * next_n * H, D] e4m3, box {D, kQueries * H}, D-byte swizzle
                                 // (kFp4: as MqaLogitsParams)
    TmaDescriptor tma_q_scales;  // kFp4: q's exponents as [1, B * next_n * H] int32
    TmaDescriptor tma_kv;        // the cache as rows of kKeyBytes [pages * kPageRows, kKeyBytes], box
                                 // {kKeyBytes, 64}
    TmaDescriptor tma_scales;    // the cache as 4-byte words [pages, 64 * (kKeyBytes + 4) / 4], box {64, 1}
    TmaDescriptor tma_weights;   // w [B * next_n, H] fp32, box {H, kQueries}
    const int* context_lens;    // [B, next_n]
    const int* block_table;     // [B, ld_block_table]
    const int* schedule;        // [ctas + 1, 2]: (batch, unit) where CTA c starts
    u8* logits;
    u64 ld_logits;
    u32 batch, ld_block_table, columns;  // columns: max_context_len
};

template <u32 kHeads_, u32 kHeadDim_, u32 kKvStages_, bool kBf16Logits_, bool kCompressed_, bool kClean_, u32 kNextN_,
          bool kFp4_, u32 kMathWarpgroups_, u32 kClusterQ_ = 1, bool kPipelined_ = false>
struct MqaLogitsConfig {
    static constexpr u32 kHeads = kHeads_, kHeadDim = kHeadDim_, kKvStages = kKvStages_;
    static constexpr bool kBf16Logits = kBf16Logits_, kCompressed = kCompressed_, kClean = kClean_;
    static constexpr u32 kNextN = kNextN_;  // 0: MqaDense; 1 or 2: MqaPaged
    static constexpr bool kPaged = kNextN > 0;
    static constexpr bool kFp4 = kFp4_;
    static constexpr u32 kKeyBytes = kFp4 ? kHeadDim / 2 : kHeadDim;  // a key row (or q row) as it lands
    static constexpr u32 kPartWords = kHeadDim / 32;  // kFp4: packed words of a quarter row (a lane's share)
    static constexpr u32 kQStages = 2;
    // MqaDense: kClusterQ CTAs of a cluster take adjacent q blocks over the union of their key
    // windows; each loads 1 / kClusterQ of every key block into all of them (TMA multicast).
    static constexpr u32 kClusterQ = kClusterQ_;
    static constexpr u32 kQueries = kPaged ? kNextN : 128 / kHeads;  // queries a q block
    static constexpr u32 kQRows = kQueries * kHeads;                  // WGMMA N
    static constexpr u32 kMathWarpgroups = kMathWarpgroups_;
    static constexpr u32 kBlockKv = 64 * kMathWarpgroups;             // keys a block: 64 per math warpgroup
    static constexpr u32 kPageKeys = 64;
    static constexpr u32 kUnitKeys = 256;  // MqaPaged: the schedule's unit of a batch's keys, one to two blocks
    static constexpr u32 kPageRows = kPageKeys * (kKeyBytes + 4) / kKeyBytes;  // a page in rows of kKeyBytes
    static constexpr u32 kNumMathThreads = 128 * kMathWarpgroups;
    static constexpr u32 kNumThreads = kNumMathThreads + 128;
    // kPipelined (FP8): each math warpgroup has two accumulator sets and issues a block's WGMMAs before
    // it sums the previous block's, so its own WGMMAs run under its sums, not only the other
    // warpgroups'. The sets take two math warpgroups (128 q rows: 232 registers a thread), or four
    // where a q block is at most 64 rows.
    static constexpr bool kPipelined = kPipelined_;
    // Three or four math warpgroups take registers from the producer's through setmaxnreg (152 and 40
    // of 128 a thread, or 112 and 32 of 96), two only when pipelined (232 and 40 of 168).
    static constexpr bool kReallocates = kMathWarpgroups > 2 || kPipelined;
    static constexpr u32 kMathRegisters = kMathWarpgroups == 2 ? 232 : kMathWarpgroups == 3 ? 152 : 112;
    // FP4 at 112 registers, 128 q rows of 128 values: the A fragments, accumulators and weights held
    // through the WGMMAs spill, so the weights are read from shared memory a block, after its WGMMAs.
    static constexpr bool kWeightsPerBlock =
        kFp4 && kMathWarpgroups == 4 && kQueries * kHeads == 128 && kHeadDim == 128;
    static constexpr u32 kProducerRegisters = kMathWarpgroups == 4 ? 32 : 40;
    static constexpr u32 kQTileBytes = kQRows * kHeadDim, kKvTileBytes = kBlockKv * kKeyBytes;
    static constexpr u32 kQPackedBytes = kFp4 ? kQRows * kKeyBytes : 0;
    static constexpr u32 kWeightsBytes = align_up(kQRows * 4, 128u), kScalesBytes = kBlockKv * 4;
    static constexpr u32 kQScalesBytes = kFp4 ? kWeightsBytes : 0;
    static constexpr u32 kQLoadBytes = (kFp4 ? kQPackedBytes + kQRows * 4 : kQTileBytes) + kQRows * 4;
    static constexpr u32 kKvOffset = kQStages * kQTileBytes;
    static constexpr u32 kQPackedOffset = kKvOffset + kKvStages * kKvTileBytes;
    static constexpr u32 kWeightsOffset = kQPackedOffset + kQStages * kQPackedBytes;
    static constexpr u32 kQScalesOffset = kWeightsOffset + kQStages * kWeightsBytes;
    static constexpr u32 kScalesOffset = kQScalesOffset + kQStages * kQScalesBytes;
    static constexpr u32 kBarrierOffset = kScalesOffset + kKvStages * kScalesBytes;
    static constexpr u32 kLutOffset = kBarrierOffset + 2 * (kQStages + kKvStages) * 8;  // kFp4: the widening table
    static constexpr u32 kSmemBytes = kLutOffset + (kFp4 ? kE2m1LutBytes : 0);

    static_assert(kHeads == 32 || kHeads == 64, "H: 32 or 64");
    static_assert(kHeadDim == 32 || kHeadDim == 64 || kHeadDim == 128, "D: 32, 64 or 128");
    static_assert(kNextN <= 2, "next_n: 1 or 2");
    static_assert(kClusterQ == 1 || (kClusterQ == 2 && !kPaged), "clusters of two CTAs, dense only");
    static_assert(kMathWarpgroups == 2 || kMathWarpgroups == 4 || (kMathWarpgroups == 3 && !kPaged),
                  "two to four math warpgroups (a paged block a half or whole unit)");
    static_assert(!kPipelined || (!kFp4 && (kMathWarpgroups == 2 || kQRows <= 64)),
                  "pipelined: FP8, with two math warpgroups or q blocks of at most 64 rows");
    static_assert(!kReallocates ||
                      register_split_fits(kNumThreads, kNumMathThreads, kMathRegisters, kProducerRegisters),
                  "the register split exceeds the block's launch allocation");
    static_assert(kQTileBytes % 1024 == 0, "q tiles 1024-byte aligned");
    static_assert(!(kCompressed && (kClean || kPaged)), "compressed logits: dense, not cleaned");
    static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a block may use");
};

// A q block and the keys its CTA computes for it: [key_begin, key_begin + blocks * 128).
struct MqaSegment {
    u32 q_block, key_begin, blocks;
    bool valid;
};

__device__ __forceinline__ float negative_infinity() { return -__int_as_float(0x7f800000); }

// One logit (or -inf) at element `index` from `base` (bounds checked by the caller).
template <class Config>
__device__ __forceinline__ void mqa_store(u8* base, u64 index, float value) {
    if constexpr (Config::kBf16Logits)
        reinterpret_cast<u16*>(base)[index] = u16(pack_bf16x2(value, 0.0f) & 0xFFFFu);
    else
        reinterpret_cast<float*>(base)[index] = value;
}

template <class Config>
__device__ __forceinline__ void mqa_write(u8* logits, u64 ld, u32 row, u64 column, float value) {
    mqa_store<Config>(logits, u64(row) * ld + column, value);
}

// The quad's four lanes hold partial sums of the same 2 Q values, value 2i + h being query i at key
// row key_row + 8h. Lane l ends with the full sums of the Q queries at key row key_row + 8 (l % 2):
// Q + Q shuffles where reducing every value on every lane takes 4 Q.
template <u32 kQueries>
__device__ __forceinline__ void mqa_quad_sums(const float (&sums)[2 * kQueries], float (&out)[kQueries]) {
    const bool odd = lane_id() % 2;
#pragma unroll
    for (u32 i = 0; i < kQueries; ++i) {
        out[i] = (odd ? sums[2 * i + 1] : sums[2 * i]) +
                 __shfl_xor_sync(0xffffffffu, odd ? sums[2 * i] : sums[2 * i + 1], 1);
        out[i] += __shfl_xor_sync(0xffffffffu, out[i], 2);
    }
}

template <class Config>
struct MqaDense {
    using Params = MqaLogitsParams;

    // The cluster's q blocks from (blockIdx.x / kClusterQ + index * clusters) * kClusterQ, this CTA's
    // its rank's (past the last q block: one with no rows); the keys: the union of their windows.
    __device__ __forceinline__ static MqaSegment segment(const Params& p, u32 index) {
        constexpr u32 kCluster = Config::kClusterQ;
        const u32 first = (blockIdx.x / kCluster + index * (gridDim.x / kCluster)) * kCluster;
        if (first >= p.num_q_blocks) return {0, 0, 0, false};
        const u32 block = first + blockIdx.x % kCluster;
        int begin = int(p.seq_len_kv), end = 0;
        for (u32 i = 0; i < kCluster * Config::kQueries; ++i) {
            const u32 query = min(first * Config::kQueries + i, p.seq_len - 1);
            begin = min(begin, max(__ldg(p.ks + query), 0));
            end = max(end, min(__ldg(p.ke + query), int(p.seq_len_kv)));
        }
        begin = begin / 4 * 4;
        return {block, u32(begin), end > begin ? ceil_div(u32(end - begin), Config::kBlockKv) : 0u, true};
    }
    __device__ __forceinline__ static int q_row(u32 q_block) { return int(q_block * Config::kQueries); }
    // Query i of the block: its logits row (or -1 past the last) and the keys it sees.
    __device__ __forceinline__ static int row(const Params& p, u32 q_block, u32 i) {
        const u32 query = q_block * Config::kQueries + i;
        return query < p.seq_len ? int(query) : -1;
    }
    __device__ __forceinline__ static void range(const Params& p, u32 q_block, u32 i, int& ks, int& ke) {
        const u32 query = min(q_block * Config::kQueries + i, p.seq_len - 1);
        ks = __ldg(p.ks + query);
        ke = __ldg(p.ke + query);
    }
    __device__ __forceinline__ static u32 keys(const Params& p) { return p.seq_len_kv; }
    // kClean: the keys of the segment's rows no other segment computes, [0, head_end) and
    // [tail_begin, keys): all but the window.
    __device__ __forceinline__ static u32 head_end(const Params& p, const MqaSegment& s) {
        return min(s.key_begin, p.seq_len_kv);
    }
    __device__ __forceinline__ static u32 tail_begin(const Params& p, const MqaSegment& s) {
        return min(s.key_begin + s.blocks * Config::kBlockKv, p.seq_len_kv);
    }
    // The kBlockKv keys from `key` and their scales into one stage; returns the bytes the stage
    // receives. In a cluster, this CTA loads its rank's share into every CTA's stage.
    __device__ __forceinline__ static u32 load_keys(const Params& p, u8* tile, u8* scales, Barrier* bar, u32,
                                                    u32 key) {
        if constexpr (Config::kClusterQ > 1) {
            constexpr u32 kShare = Config::kBlockKv / Config::kClusterQ, kAll = (1u << Config::kClusterQ) - 1;
            const u32 rank = cluster_cta_rank();
            tma_load_2d_multicast(tile + rank * kShare * Config::kKeyBytes, &p.tma_kv, bar, 0, int(key + rank * kShare),
                                  kAll);
            tma_load_2d_multicast(scales + rank * kShare * 4, &p.tma_scales, bar, int(key + rank * kShare), 0, kAll);
        } else {
            tma_load_2d(tile, &p.tma_kv, bar, 0, int(key));
            tma_load_2d(scales, &p.tma_scales, bar, int(key), 0);
        }
        return Config::kKvTileBytes + Config::kScalesBytes;
    }
    // The keys of query i whose logits are stored as computed, with no check: [lo, hi) (none past the
    // last query); and where its row's column 0 lies, in elements (kCompressed: key ks).
    __device__ __forceinline__ static void interior(const Params& p, int row, int ks, int ke, int& lo, int& hi) {
        lo = 0;
        hi = row < 0 ? 0 : int(p.seq_len_kv);
        if constexpr (Config::kClean || Config::kCompressed) {
            lo = max(ks, 0);
            hi = min(hi, ke);
        }
        if constexpr (Config::kCompressed) hi = int(min(i64(hi), i64(ks) + p.columns));
    }
    __device__ __forceinline__ static i64 row_offset(const Params& p, int row, int ks) {
        return i64(row) * i64(p.ld_logits) - (Config::kCompressed ? i64(ks) : 0);
    }
    __device__ __forceinline__ static void store(const Params& p, int row, u32 key, int ks, int ke, float value) {
        if (row < 0 || key >= p.seq_len_kv) return;
        const bool inside = int(key) >= ks && int(key) < ke;
        u64 column = key;
        if constexpr (Config::kCompressed) {
            if (!inside || u32(int(key) - ks) >= p.columns) return;
            column = u64(int(key) - ks);
        } else if constexpr (Config::kClean) {
            if (!inside) value = negative_infinity();
        }
        mqa_write<Config>(p.logits, p.ld_logits, u32(row), column, value);
    }
};

template <class Config>
struct MqaPaged {
    using Params = PagedMqaLogitsParams;

    // The units of kUnitKeys keys of batch b: at least one, so that every row is written (as
    // get_paged_mqa_logits_metadata counts them).
    __device__ __forceinline__ static u32 units(const Params& p, u32 b) {
        int keys = 0;
        for (u32 t = 0; t < Config::kNextN; ++t) keys = max(keys, __ldg(p.context_lens + b * Config::kNextN + t));
        return max(1u, ceil_div(u32(max(keys, 0)), Config::kUnitKeys));
    }
    __device__ __forceinline__ static MqaSegment segment(const Params& p, u32 index) {
        const int* start = p.schedule + 2 * blockIdx.x;
        const u32 first_batch = u32(__ldg(start)), first_unit = u32(__ldg(start + 1));
        const u32 end_batch = u32(__ldg(start + 2)), end_unit = u32(__ldg(start + 3));
        const u32 b = first_batch + index;
        if (b > end_batch || (b == end_batch && end_unit == 0) || b >= p.batch) return {0, 0, 0, false};
        const u32 begin = index == 0 ? first_unit : 0, end = b == end_batch ? end_unit : units(p, b);
        return {b, begin * Config::kUnitKeys, end > begin ? (end - begin) * (Config::kUnitKeys / Config::kBlockKv) : 0u,
                true};
    }
    __device__ __forceinline__ static int q_row(u32 q_block) { return int(q_block * Config::kQueries); }
    __device__ __forceinline__ static int row(const Params&, u32 q_block, u32 i) {
        return int(q_block * Config::kQueries + i);
    }
    __device__ __forceinline__ static void range(const Params& p, u32 q_block, u32 i, int& ks, int& ke) {
        ks = 0;
        ke = __ldg(p.context_lens + q_block * Config::kQueries + i);
    }
    __device__ __forceinline__ static u32 keys(const Params& p) { return p.columns; }
    // kClean: a batch's keys past its last unit, cleaned by the segment that computes that unit.
    __device__ __forceinline__ static u32 head_end(const Params&, const MqaSegment&) { return 0; }
    __device__ __forceinline__ static u32 tail_begin(const Params& p, const MqaSegment& s) {
        const u32 end = s.key_begin + s.blocks * Config::kBlockKv;
        return end == units(p, s.q_block) * Config::kUnitKeys ? min(end, p.columns) : p.columns;
    }
    // Keys [key, key + kBlockKv) of batch b: its pages (those the table has). Their numbers are read
    // all at once before any load is issued: one trip to memory a block, not one a page. (Read before
    // the producer's wait for a free stage, they would spill the math warps' registers.)
    __device__ __forceinline__ static u32 load_keys(const Params& p, u8* tile, u8* scales, Barrier* bar, u32 b,
                                                    u32 key) {
        constexpr u32 kPages = Config::kBlockKv / Config::kPageKeys;
        const u32 first = key / Config::kPageKeys;
        const u32 count = min(kPages, p.ld_block_table - min(first, p.ld_block_table));
        int pages[kPages];
#pragma unroll
        for (u32 i = 0; i < kPages; ++i)
            pages[i] = i < count ? __ldg(p.block_table + u64(b) * p.ld_block_table + first + i) : 0;
        u32 bytes = 0;
#pragma unroll
        for (u32 i = 0; i < kPages; ++i) {
            if (i >= count) break;
            const int page = pages[i];
            tma_load_2d(tile + i * Config::kPageKeys * Config::kKeyBytes, &p.tma_kv, bar, 0,
                        page * int(Config::kPageRows));
            tma_load_2d(scales + i * Config::kPageKeys * 4, &p.tma_scales, bar,
                        int(Config::kPageKeys * Config::kKeyBytes / 4), page);
            bytes += Config::kPageKeys * (Config::kKeyBytes + 4);
        }
        return bytes;
    }
    __device__ __forceinline__ static void interior(const Params& p, int, int, int ke, int& lo, int& hi) {
        lo = 0;
        hi = min(ke, int(p.columns));
    }
    __device__ __forceinline__ static i64 row_offset(const Params& p, int row, int) {
        return i64(row) * i64(p.ld_logits);
    }
    __device__ __forceinline__ static void store(const Params& p, int row, u32 key, int, int ke, float value) {
        if (key >= p.columns) return;
        if (int(key) >= ke) {
            if (!Config::kClean) return;
            value = negative_infinity();
        }
        mqa_write<Config>(p.logits, p.ld_logits, u32(row), key, value);
    }
};

// kFp4: the math warps widen q stage s's packed tile into its e4m3 tile, a lane one quarter row
// (a 1x32 block for D = 128) at a time. Packed word j of quarter q (natural K (D / 4) q + 8j to + 7)
// goes to K positions 32j + 4q (its low four values) and 32j + 16 + 4q (its high four), in 4-byte
// words 8j + q and 8j + 4 + q of the row: where a key lane's A fragment puts them. A q row's weight
// takes its widened row scale.
template <class Config>
__device__ __forceinline__ void mqa_widen_q(u8* smem, u32 s) {
    constexpr u32 kD = Config::kHeadDim, kWords = Config::kPartWords;
    const u32 packed = smem_addr(smem + Config::kQPackedOffset + s * Config::kQPackedBytes);
    const u32 exponents = smem_addr(smem + Config::kQScalesOffset + s * Config::kQScalesBytes);
    const u32 weights = smem_addr(smem + Config::kWeightsOffset + s * Config::kWeightsBytes);
    const u32 tile = smem_addr(smem + s * Config::kQTileBytes), lut = smem_addr(smem + Config::kLutOffset);
    for (u32 part = threadIdx.x; part < Config::kQRows * 4; part += Config::kNumMathThreads) {
        const u32 row = part / 4, quarter = part % 4;
        u32 words[kWords];
        ld_shared_words(packed + row * Config::kKeyBytes + quarter * kWords * 4, words);
        E2m1Table table;
        const float row_scale = e2m1_block_table<kD / 32>(lut, ld_shared_u32(exponents + row * 4), quarter * kD / 128,
                                                          table);
        if (quarter == 0)
            st_shared_f32(weights + row * 4, __uint_as_float(ld_shared_u32(weights + row * 4)) * row_scale);
        // The D-byte swizzle TMA would write: 16-byte chunk c of the row at c ^ ((row * D / 128) % (D / 16)).
        const u32 line = tile + row * kD, swizzle = (row * kD / 128) % (kD / 16);
#pragma unroll
        for (u32 j = 0; j < kWords; ++j) {
            u32 lo, hi;
            widen_e2m1x8(words[j], table, lo, hi);
            const u32 low_word = 8 * j + quarter, high_word = low_word + 4;
            st_shared_u32(line + ((low_word / 4) ^ swizzle) * 16 + (low_word % 4) * 4, lo);
            st_shared_u32(line + ((high_word / 4) ^ swizzle) * 16 + (high_word % 4) * 4, hi);
        }
    }
    // The WGMMAs read the tile through the async proxy, after both math warpgroups' writes.
    fence_proxy_async();
    named_barrier_sync(1, Config::kNumMathThreads);
}

// A math warp is done with a key stage: lane 0 releases it here and, in a cluster, in the peer CTA,
// whose producer multicasts into this CTA's stage too.
template <class Config>
__device__ __forceinline__ void mqa_release(Barrier& empty) {
    __syncwarp();
    if (lane_id() == 0) {
        empty.arrive();
        if constexpr (Config::kClusterQ > 1) empty.arrive_cluster(cluster_cta_rank() ^ 1);
    }
}

// Issues the WGMMAs of key stage t's tile [kBlockKv, D] e4m3 against the q tile into `acc`: the
// warpgroup's 64 keys (`desc_keys`: their descriptor in stage 0).
template <class Config>
__device__ __forceinline__ void mqa_issue_fp8(u32 t, u64 desc_keys, u64 desc_q, float* acc) {
    const u64 desc_kv = smem_descriptor_advance(desc_keys, t * Config::kKvTileBytes);
    wgmma_fence();
#pragma unroll
    for (u32 k = 0; k < Config::kHeadDim / 32; ++k)
        WgmmaFp8<Config::kQRows>::mma(smem_descriptor_advance(desc_kv, k * 32), smem_descriptor_advance(desc_q, k * 32),
                                      acc, k > 0);
    wgmma_commit();
}

// Once no more than kPending of the warpgroup's WGMMA groups run (the oldest, stage t's, is done): the
// scale of key row `scale_row` (the thread's row its quad's sums end on); the stage released.
template <class Config, u32 kPending>
__device__ __forceinline__ float mqa_retire_fp8(u8* smem, Barrier* empty_kv, u32 t, u32 scale_row, float* acc) {
    const float scale = __uint_as_float(
        ld_shared_u32(smem_addr(smem + Config::kScalesOffset + t * Config::kScalesBytes) + scale_row * 4));
    wgmma_wait<kPending>();
#pragma unroll
    for (u32 i = 0; i < Config::kQRows / 2; ++i) fence_register(acc[i]);
    mqa_release<Config>(empty_kv[t]);
    return scale;
}

// kFp4: the same from stage t's packed tile [kBlockKv, D / 2]: the thread's quarter of its two key rows
// and their exponents into registers (the stage released at once), widened into the A fragments.
template <class Config>
__device__ __forceinline__ float mqa_keys_fp4(u8* smem, Barrier* empty_kv, u32 t, u32 key_row, u32 scale_row,
                                              u64 desc_q, float* acc) {
    constexpr u32 kWords = Config::kPartWords;
    const u32 tile = smem_addr(smem + Config::kKvOffset + t * Config::kKvTileBytes);
    const u32 scales = smem_addr(smem + Config::kScalesOffset + t * Config::kScalesBytes);
    const u32 quarter = lane_id() % 4;
    u32 packed[2][kWords], exponents[2];
#pragma unroll
    for (u32 h = 0; h < 2; ++h) {
        ld_shared_words(tile + (key_row + 8 * h) * Config::kKeyBytes + quarter * kWords * 4, packed[h]);
        exponents[h] = ld_shared_u32(scales + (key_row + 8 * h) * 4);
    }
    mqa_release<Config>(empty_kv[t]);
    const u32 lut = smem_addr(smem + Config::kLutOffset), block = quarter * Config::kHeadDim / 128;
    E2m1Table tables[2];
    const float scale0 = e2m1_block_table<Config::kHeadDim / 32>(lut, exponents[0], block, tables[0]);
    const float scale1 = e2m1_block_table<Config::kHeadDim / 32>(lut, exponents[1], block, tables[1]);
    u32 fragments[kWords][4];
#pragma unroll
    for (u32 j = 0; j < kWords; ++j) {
#pragma unroll
        for (u32 h = 0; h < 2; ++h) widen_e2m1x8(packed[h][j], tables[h], fragments[j][h], fragments[j][2 + h]);
    }
    wgmma_fence();
#pragma unroll
    for (u32 j = 0; j < kWords; ++j)
        WgmmaFp8RegistersA<Config::kQRows>::mma(fragments[j], smem_descriptor_advance(desc_q, j * 32), acc, j > 0);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (u32 i = 0; i < Config::kQRows / 2; ++i) fence_register(acc[i]);
    return scale_row == key_row ? scale0 : scale1;
}

template <class Config, class Problem>
__device__ __forceinline__ void sm90_mqa_logits(const typename Problem::Params& p) {
    extern __shared__ __align__(1024) u8 smem[];
    Barrier* full_q = reinterpret_cast<Barrier*>(smem + Config::kBarrierOffset);
    Barrier* empty_q = full_q + Config::kQStages;
    Barrier* full_kv = empty_q + Config::kQStages;
    Barrier* empty_kv = full_kv + Config::kKvStages;
    const u32 warp = warp_id();

    if (threadIdx.x == Config::kNumMathThreads) {
        tma_prefetch_descriptor(&p.tma_q);
        if constexpr (Config::kFp4) tma_prefetch_descriptor(&p.tma_q_scales);
        tma_prefetch_descriptor(&p.tma_kv);
        tma_prefetch_descriptor(&p.tma_scales);
        tma_prefetch_descriptor(&p.tma_weights);
#pragma unroll
        for (u32 s = 0; s < Config::kQStages; ++s) {
            full_q[s].init(1);
            empty_q[s].init(Config::kNumMathThreads / 32);
        }
#pragma unroll
        for (u32 s = 0; s < Config::kKvStages; ++s) {
            full_kv[s].init(1);
            empty_kv[s].init(Config::kClusterQ * Config::kNumMathThreads / 32);
        }
        fence_barrier_init();
    }
    if constexpr (Config::kFp4) e2m1_lut_init(smem_addr(smem + Config::kLutOffset));
    // A cluster's barriers are initialised before any CTA multicasts into another or arrives there.
    if constexpr (Config::kClusterQ > 1)
        cluster_sync();
    else
        __syncthreads();
    grid_dependency_wait();

    if (threadIdx.x >= Config::kNumMathThreads) {
        if constexpr (Config::kReallocates) warpgroup_reg_dealloc<Config::kProducerRegisters>();
        if (threadIdx.x == Config::kNumMathThreads) {
            StageRing<Config::kQStages> q_ring;
            StageRing<Config::kKvStages> kv_ring;
            for (u32 index = 0;; ++index, q_ring.advance()) {
                const MqaSegment segment = Problem::segment(p, index);
                if (!segment.valid) break;
                const u32 s = q_ring.stage;
                empty_q[s].wait(q_ring.phase ^ 1);
                full_q[s].arrive_expect_tx(Config::kQLoadBytes);
                const int q_row = Problem::q_row(segment.q_block) * int(Config::kHeads);
                if constexpr (Config::kFp4) {
                    tma_load_2d(smem + Config::kQPackedOffset + s * Config::kQPackedBytes, &p.tma_q, &full_q[s], 0,
                                q_row);
                    tma_load_2d(smem + Config::kQScalesOffset + s * Config::kQScalesBytes, &p.tma_q_scales,
                                &full_q[s], q_row, 0);
                } else {
                    tma_load_2d(smem + s * Config::kQTileBytes, &p.tma_q, &full_q[s], 0, q_row);
                }
                tma_load_2d(smem + Config::kWeightsOffset + s * Config::kWeightsBytes, &p.tma_weights, &full_q[s], 0,
                            Problem::q_row(segment.q_block));
                for (u32 b = 0; b < segment.blocks; ++b, kv_ring.advance()) {
                    const u32 t = kv_ring.stage;
                    empty_kv[t].wait(kv_ring.phase ^ 1);
                    // The bytes are known only once the loads are issued: the arrival comes last.
                    const u32 bytes = Problem::load_keys(p, smem + Config::kKvOffset + t * Config::kKvTileBytes,
                                                         smem + Config::kScalesOffset + t * Config::kScalesBytes,
                                                         &full_kv[t], segment.q_block,
                                                         segment.key_begin + b * Config::kBlockKv);
                    full_kv[t].arrive_expect_tx(bytes);
                }
            }
        } else if (Config::kClean && threadIdx.x >= Config::kNumMathThreads + 32) {
            // The three spare warps: -inf in each row outside the keys the segments compute.
            const u32 lane = threadIdx.x - Config::kNumMathThreads - 32, keys = Problem::keys(p);
            for (u32 index = 0;; ++index) {
                const MqaSegment segment = Problem::segment(p, index);
                if (!segment.valid) break;
                const u32 head_end = Problem::head_end(p, segment), tail_begin = Problem::tail_begin(p, segment);
                const u32 outside = head_end + (keys - tail_begin);
                for (u32 i = 0; i < Config::kQueries; ++i) {
                    const int row = Problem::row(p, segment.q_block, i);
                    if (row < 0) break;
                    for (u32 c = lane; c < outside; c += 96) {
                        const u32 key = c < head_end ? c : tail_begin + (c - head_end);
                        mqa_write<Config>(p.logits, p.ld_logits, u32(row), key, negative_infinity());
                    }
                }
            }
        }
        // A CTA of a cluster exits only once its peer is done with it (arrivals on its barriers).
        __syncwarp();
        if constexpr (Config::kClusterQ > 1) cluster_sync();
        return;
    }

    // Math warpgroups: warpgroup w's 64 keys of each block from 64 w, its thread's rows `key_row` and
    // `key_row + 8`; once its quad has summed them (mqa_quad_sums), each query's logit at `out_row`.
    if constexpr (Config::kReallocates) warpgroup_reg_alloc<Config::kMathRegisters>();
    constexpr u32 kAcc = Config::kQRows / 2, kHeadsPerThread = Config::kHeads / 4;
    const u32 lane = lane_id(), key_row = (warp / 4) * 64 + slab_row(), out_row = key_row + 8 * (lane % 2);
    const u64 desc_keys = smem_descriptor_k_major<Config::kHeadDim>(smem + Config::kKvOffset +
                                                                    (warp / 4) * 64 * Config::kKeyBytes);
    StageRing<Config::kQStages> q_ring;
    StageRing<Config::kKvStages> kv_ring;
    float acc[kAcc], acc1[Config::kPipelined ? kAcc : 1];  // kPipelined: the second set
    for (u32 index = 0;; ++index, q_ring.advance()) {
        const MqaSegment segment = Problem::segment(p, index);
        if (!segment.valid) break;
        const u32 s = q_ring.stage;
        // Where each query's logits go, and [lo, hi): the keys every query of the block stores unchecked.
        // The same on every lane: shuffles from lane 0 let the compiler keep them in uniform registers.
        int lo = 0, hi = 0x7fffffff;
        u8* row_bases[Config::kQueries];
#pragma unroll
        for (u32 i = 0; i < Config::kQueries; ++i) {
            int ks, ke, query_lo, query_hi;
            Problem::range(p, segment.q_block, i, ks, ke);
            const int row = Problem::row(p, segment.q_block, i);
            Problem::interior(p, row, ks, ke, query_lo, query_hi);
            lo = max(lo, query_lo);
            hi = min(hi, query_hi);
            const i64 offset = Problem::row_offset(p, row, ks) * (Config::kBf16Logits ? 2 : 4);
            row_bases[i] = p.logits + ((i64(__shfl_sync(0xffffffffu, int(offset >> 32), 0)) << 32) |
                                       u32(__shfl_sync(0xffffffffu, u32(offset), 0)));
        }
        lo = __shfl_sync(0xffffffffu, lo, 0);
        hi = __shfl_sync(0xffffffffu, hi, 0);
        full_q[s].wait(q_ring.phase);
        if constexpr (Config::kFp4) mqa_widen_q<Config>(smem, s);
        // Head h of query i is column i * H + h; the thread's are 8 (j / 2) + 2 (lane % 4) + j % 2.
        float weights[Config::kQueries][kHeadsPerThread];
        const u32 weights_smem = smem_addr(smem + Config::kWeightsOffset + s * Config::kWeightsBytes);
        const auto load_weights = [&] {
#pragma unroll
            for (u32 i = 0; i < Config::kQueries; ++i) {
#pragma unroll
                for (u32 j = 0; j < kHeadsPerThread; j += 2)
                    ld_shared_v2_f32(weights_smem + (i * Config::kHeads + 8 * (j / 2) + 2 * (lane % 4)) * 4,
                                     weights[i][j], weights[i][j + 1]);
            }
        };
        if constexpr (!Config::kWeightsPerBlock) load_weights();
        const u64 desc_q = smem_descriptor_k_major<Config::kHeadDim>(smem + s * Config::kQTileBytes);
        // Block b's logits from its accumulators (scaled by the thread's key row's scale): each query's
        // sum over its heads of the relu'd, weighted values, added up across the quad, then stored.
        const auto finish = [&](const float* values, u32 b, float scale) {
            if constexpr (Config::kWeightsPerBlock) load_weights();
            float sums[2 * Config::kQueries];
#pragma unroll
            for (u32 i = 0; i < Config::kQueries; ++i) {
                // Accumulator a: column 8 (a / 4) + 2 (lane % 4) + a % 2, key row + 8 ((a / 2) % 2). Four
                // partial sums (the two rows by column parity) keep the dependent chains short.
                float partial[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (u32 j = 0; j < kHeadsPerThread; ++j) {
                    const u32 a0 = i * (Config::kHeads / 2) + (j / 2) * 4 + j % 2;
                    partial[j % 2] += fmaxf(values[a0], 0.0f) * weights[i][j];
                    partial[2 + j % 2] += fmaxf(values[a0 + 2], 0.0f) * weights[i][j];
                }
                sums[2 * i] = partial[0] + partial[1];
                sums[2 * i + 1] = partial[2] + partial[3];
            }
            float out[Config::kQueries];
            mqa_quad_sums<Config::kQueries>(sums, out);
            // Query i's logits from the lanes with (lane / 2) % 2 == i % 2: 16 keys in a row a store.
            const u32 first = segment.key_begin + b * Config::kBlockKv, key = first + out_row;
            if (int(first) >= lo && int(first + Config::kBlockKv) <= hi) {
#pragma unroll
                for (u32 i = 0; i < Config::kQueries; ++i)
                    if ((lane / 2) % 2 == i % 2) mqa_store<Config>(row_bases[i], key, out[i] * scale);
            } else {  // a block at a range's edge: each key checked (ranges read again, off the common path)
#pragma unroll
                for (u32 i = 0; i < Config::kQueries; ++i) {
                    int ks, ke;
                    Problem::range(p, segment.q_block, i, ks, ke);
                    if ((lane / 2) % 2 == i % 2)
                        Problem::store(p, Problem::row(p, segment.q_block, i), key, ks, ke, out[i] * scale);
                }
            }
        };
        if constexpr (Config::kPipelined) {
            // Block b's WGMMAs into set b % 2, issued before block b - 1 is summed; each wait's count fixed
            // where it is written (a count chosen at run time serializes the WGMMAs), the last block alone.
            // The loop ends only where the last block is retired: no WGMMA is in flight past it.
            // The next block's stage, once landed, into `set`; returns the stage.
            const auto issue = [&](float* set) {
                const u32 t = kv_ring.stage;
                full_kv[t].wait(kv_ring.phase);
                mqa_issue_fp8<Config>(t, desc_keys, desc_q, set);
                kv_ring.advance();
                return t;
            };
            if (segment.blocks > 0) {
                u32 t0 = issue(acc), t1;
                for (u32 b = 0;; b += 2) {
                    if (b + 1 == segment.blocks) {
                        finish(acc, b, mqa_retire_fp8<Config, 0>(smem, empty_kv, t0, out_row, acc));
                        break;
                    }
                    t1 = issue(acc1);
                    finish(acc, b, mqa_retire_fp8<Config, 1>(smem, empty_kv, t0, out_row, acc));
                    if (b + 2 == segment.blocks) {
                        finish(acc1, b + 1, mqa_retire_fp8<Config, 0>(smem, empty_kv, t1, out_row, acc1));
                        break;
                    }
                    t0 = issue(acc);
                    finish(acc1, b + 1, mqa_retire_fp8<Config, 1>(smem, empty_kv, t1, out_row, acc1));
                }
            }
        } else {
            for (u32 b = 0; b < segment.blocks; ++b, kv_ring.advance()) {
                const u32 t = kv_ring.stage;
                full_kv[t].wait(kv_ring.phase);
                float scale;
                if constexpr (Config::kFp4) {
                    scale = mqa_keys_fp4<Config>(smem, empty_kv, t, key_row, out_row, desc_q, acc);
                } else {
                    mqa_issue_fp8<Config>(t, desc_keys, desc_q, acc);
                    scale = mqa_retire_fp8<Config, 0>(smem, empty_kv, t, out_row, acc);
                }
                finish(acc, b, scale);
            }
        }
        __syncwarp();
        if (lane == 0) empty_q[s].arrive();
    }
    if constexpr (Config::kClusterQ > 1) cluster_sync();
}

template <class Config>
__device__ __forceinline__ void sm90_fp8_mqa_logits(const MqaLogitsParams& p) {
    sm90_mqa_logits<Config, MqaDense<Config>>(p);
}

template <class Config>
__device__ __forceinline__ void sm90_fp8_paged_mqa_logits(const PagedMqaLogitsParams& p) {
    sm90_mqa_logits<Config, MqaPaged<Config>>(p);
}

}  // namespace moegemm
