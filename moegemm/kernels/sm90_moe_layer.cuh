// The MoE layer's steps around its two grouped GEMMs (moegemm/ops/mega_moe.py), on sm_90a: route,
// dispatch, activation and combine, one memory-bound launch each, in place of PyTorch's sort, scatter
// and element-wise kernels.
//
// Every tensor of the layer is a view of one allocation, the buffer's `storage`; the parameters give
// each one's byte offset (multiples of 16). A pair p = t * k + j is token t's j-th routed expert.
//   route (one CTA): each pair's row of the grouped layout, the GEMMs' group values, the stats. The
//     pairs sorted by expert, stably (by pair index within an expert); expert e's rows from
//     e * masked_stride (masked layout) or from the sum of the earlier experts' counts, each rounded
//     up to `alignment` (contiguous). A pair of no expert (index outside [0, E)), or past its expert's
//     masked rows (a token naming an expert twice), gets the spare row, whose L2 output is zeros.
//   dispatch: each routed pair's token (and its packed 1x32 scales) copied into the pair's row.
//   activation: each routed pair's SiLU(gate) * up * routing weight from its row of L1's output, in
//     FP32 as PyTorch computes it, quantised per 1x32 with UE8M0 scales (kFp8) or rounded to BF16.
//   combine: y[t] = BF16 of the FP32 sum over j in ascending order of L2's row of pair (t, j).
#pragma once
#include <moegemm/quant.cuh>

namespace moegemm {

enum class MoeStep : u32 { kRoute, kDispatch, kActivation, kCombine };

struct MoeLayerParams {
    u8* storage;  // every view of the layer's buffer
    u8* out;      // combine: y (bf16, unit inner stride); route: the stats (int32 or int64) or null
    // Byte offsets into storage: x [T_max, H] (e4m3 or bf16), x_sf int32 [T_max, H / 128], topk_idx
    // int64 and topk_weights fp32 [T_max, k], the layout's rows (plus the spare row) of tokens [.., H],
    // tokens_sf, l1_out bf16 [.., 2I], act [.., I], act_sf int32 [.., I / 128], l2_out bf16 [.., H];
    // pair_rows int32 [T_max * k], groups int32 [E].
    u64 x, x_sf, topk_idx, topk_weights, tokens, tokens_sf, l1_out, act, act_sf, l2_out, pair_rows, groups;
    u64 y_pitch;        // elements between y's rows
    u32 num_pairs;      // T * k of this call
    u32 num_topk, num_experts, hidden, intermediate;
    u32 masked_stride;  // rows an expert (masked layout), 0: contiguous
    u32 alignment;      // contiguous: each expert's first row a multiple of it
    u32 spare_row;
    u32 stats_bytes;    // 0: no stats, 4: int32, 8: int64
    u32 clamp_bits;     // the activation clamp as float bits (+inf: none)
};

template <MoeStep kStep_, bool kFp8_>
struct MoeLayerConfig {
    static constexpr MoeStep kStep = kStep_;
    static constexpr bool kFp8 = kFp8_;  // e4m3 tokens and activation with 1x32 scales, else bf16
    static constexpr u32 kNumThreads = kStep == MoeStep::kRoute ? 1024 : 256;
    static constexpr u32 kNumWarps = kNumThreads / 32;
    // Route: rows of the layout fit int32 and the per-warp counts u16 (the host checks E <= this).
    static constexpr u32 kMaxExperts = 1024;
    static constexpr u32 kRouteSmemBytes = kMaxExperts * 4 + kNumWarps * kMaxExperts * 2;
    static constexpr u32 kSmemBytes = kStep == MoeStep::kRoute ? kRouteSmemBytes : 0;
};

template <class T>
__device__ __forceinline__ T* moe_view(const MoeLayerParams& p, u64 offset) {
    return reinterpret_cast<T*>(p.storage + offset);
}

__device__ __forceinline__ u32 lanes_below() {
    u32 mask;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
    return mask;
}

// Pair `pair`'s expert, or `experts` for a pair past `num_pairs` or of no expert (outside [0, E)).
__device__ __forceinline__ u32 moe_expert_of(const long long* topk_idx, u32 pair, u32 num_pairs, u32 experts) {
    if (pair >= num_pairs) return experts;
    const long long e = topk_idx[pair];
    return e >= 0 && e < (long long)experts ? u32(e) : experts;
}

// One CTA. Pass 1 gives each routed pair its rank among its expert's pairs, chunk by chunk of one
// pair a thread: the pairs before it in its warp (match_any), in earlier warps of the chunk (per-warp
// counts in shared memory) and in earlier chunks (running counts). Then warp 0 lays out the experts'
// rows, and pass 2 turns ranks into rows.
template <class Config>
__device__ __forceinline__ void moe_route(const MoeLayerParams& p) {
    extern __shared__ __align__(16) u8 smem[];
    const u32 experts = p.num_experts, warp = threadIdx.x / 32, lane = lane_id();
    u32* seen = reinterpret_cast<u32*>(smem);                            // [E] pairs of earlier chunks
    u16* warp_counts = reinterpret_cast<u16*>(smem + experts * 4);       // [warps][E] of this chunk
    for (u32 i = threadIdx.x; i < experts; i += Config::kNumThreads) seen[i] = 0;
    for (u32 i = threadIdx.x; i < Config::kNumWarps * experts; i += Config::kNumThreads) warp_counts[i] = 0;
    grid_dependency_wait();
    const long long* topk_idx = moe_view<const long long>(p, p.topk_idx);
    int* pair_rows = moe_view<int>(p, p.pair_rows);
    auto expert_of = [&](u32 pair) { return moe_expert_of(topk_idx, pair, p.num_pairs, experts); };
    __syncthreads();

    u32 next = expert_of(threadIdx.x);
    for (u32 chunk = 0; chunk < p.num_pairs; chunk += Config::kNumThreads) {
        const u32 pair = chunk + threadIdx.x, e = next;
        next = expert_of(pair + Config::kNumThreads);  // in flight during this chunk
        const u32 peers = __match_any_sync(0xffffffffu, e);
        const u32 rank_in_warp = __popc(peers & lanes_below()), in_warp = __popc(peers);
        const bool leader = e < experts && rank_in_warp == 0;
        if (leader) warp_counts[warp * experts + e] = u16(in_warp);
        __syncthreads();
        if (e < experts) {
            u32 rank = seen[e] + rank_in_warp;
            for (u32 w = 0; w < warp; ++w) rank += warp_counts[w * experts + e];
            pair_rows[pair] = int(rank);
        }
        __syncthreads();
        if (leader) {
            atomicAdd(&seen[e], in_warp);
            warp_counts[warp * experts + e] = 0;
        }
        __syncwarp();
    }
    __syncthreads();

    // Warp 0: each expert's first row (into warp_counts' memory, as u32) and the GEMMs' group values.
    u32* first_row = reinterpret_cast<u32*>(warp_counts);
    if (warp == 0) {
        const u32 per_lane = ceil_div(experts, 32u), begin = min(lane * per_lane, experts);
        const u32 end = min(begin + per_lane, experts);
        u32 rows = 0;
        for (u32 e = begin; e < end; ++e) rows += align_up(seen[e], p.alignment);
        u32 before = rows;  // inclusive scan over the lanes, then exclusive
#pragma unroll
        for (u32 offset = 1; offset < 32; offset *= 2) {
            const u32 other = __shfl_up_sync(0xffffffffu, before, offset);
            if (lane >= offset) before += other;
        }
        before -= rows;
        int* groups = moe_view<int>(p, p.groups);
        for (u32 e = begin; e < end; ++e) {
            const u32 count = seen[e];
            if (p.masked_stride) {
                first_row[e] = e * p.masked_stride;
                groups[e] = int(min(count, p.masked_stride));
            } else {
                first_row[e] = before;
                groups[e] = int(before + count);  // the psum layout: each expert's end row
                before += align_up(count, p.alignment);
            }
            if (p.stats_bytes == 4) reinterpret_cast<int*>(p.out)[e] += int(count);
            if (p.stats_bytes == 8) reinterpret_cast<long long*>(p.out)[e] += (long long)count;
        }
    }
    __syncthreads();

    for (u32 pair = threadIdx.x; pair < p.num_pairs; pair += Config::kNumThreads) {
        const u32 e = expert_of(pair);
        u32 row = p.spare_row;
        if (e < experts) {
            const u32 rank = u32(pair_rows[pair]);  // this thread's own pass-1 write
            if (!p.masked_stride || rank < p.masked_stride) row = first_row[e] + rank;
        }
        pair_rows[pair] = int(row);
    }
}

__device__ __forceinline__ void st_global_v4(void* ptr, const u32 (&v)[4]) {
    *reinterpret_cast<uint4*>(ptr) = make_uint4(v[0], v[1], v[2], v[3]);
}

// Warp per routed pair: the token's row, then its scales, in 16-byte pieces.
template <class Config>
__device__ __forceinline__ void moe_dispatch(const MoeLayerParams& p) {
    grid_dependency_wait();
    const int* pair_rows = moe_view<const int>(p, p.pair_rows);
    const u32 row_bytes = p.hidden * (Config::kFp8 ? 1 : 2), sf_words = p.hidden / 128;
    const u32 lane = lane_id(), warps = gridDim.x * Config::kNumWarps;
    for (u32 pair = blockIdx.x * Config::kNumWarps + threadIdx.x / 32; pair < p.num_pairs; pair += warps) {
        const u32 row = u32(pair_rows[pair]), token = pair / p.num_topk;
        if (row == p.spare_row) continue;
        const u8* src = p.storage + p.x + u64(token) * row_bytes;
        u8* dst = p.storage + p.tokens + u64(row) * row_bytes;
        for (u32 offset = lane * 16; offset < row_bytes; offset += 32 * 16) {
            u32 v[4];
            ld_global_nc_v4(src + offset, v);
            st_global_v4(dst + offset, v);
        }
        if constexpr (Config::kFp8) {
            const u32* sf_src = moe_view<const u32>(p, p.x_sf) + u64(token) * sf_words;
            u32* sf_dst = moe_view<u32>(p, p.tokens_sf) + u64(row) * sf_words;
            for (u32 i = lane; i < sf_words; i += 32) sf_dst[i] = sf_src[i];
        }
    }
}

// PyTorch's SiLU of a float (x / (1 + exp(-x)), IEEE division, the accurate expf).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// A pair's activation of 2 * kWords columns from their BF16 gate and up values (two a word, the lower
// column in the low half), in FP32 as PyTorch computes it: torch's clamp (NaN stays NaN: the
// comparisons are false for it), SiLU(gate) * up * routing weight.
template <u32 kWords>
__device__ __forceinline__ void moe_swiglu(const u32 (&gate)[kWords], const u32 (&up)[kWords], float weight,
                                           float clamp, float (&a)[2 * kWords]) {
#pragma unroll
    for (u32 i = 0; i < 2 * kWords; ++i) {
        float g = i % 2 ? bf16_hi_to_float(gate[i / 2]) : bf16_lo_to_float(gate[i / 2]);
        float u = i % 2 ? bf16_hi_to_float(up[i / 2]) : bf16_lo_to_float(up[i / 2]);
        g = g > clamp ? clamp : g;
        u = u < -clamp ? -clamp : (u > clamp ? clamp : u);
        a[i] = silu(g) * u * weight;
    }
}

// Warp per routed pair; lane l takes columns 256 i + 8 l to + 7 of gate and up (16-byte loads), so a
// 1x32 block is four lanes and the int32 of four packed UE8M0 exponents sixteen.
template <class Config>
__device__ __forceinline__ void moe_activation(const MoeLayerParams& p) {
    grid_dependency_wait();
    const int* pair_rows = moe_view<const int>(p, p.pair_rows);
    const float* routing_weights = moe_view<const float>(p, p.topk_weights);
    const float clamp = __uint_as_float(p.clamp_bits);
    const u32 inter = p.intermediate, lane = lane_id(), warps = gridDim.x * Config::kNumWarps;
    for (u32 pair = blockIdx.x * Config::kNumWarps + threadIdx.x / 32; pair < p.num_pairs; pair += warps) {
        const u32 row = u32(pair_rows[pair]);
        if (row == p.spare_row) continue;
        const float weight = routing_weights[pair];
        const u8* h = p.storage + p.l1_out + u64(row) * inter * 4;  // 2I bf16: gate, then up
        // I is a multiple of 128: a half warp's 128 columns are all in or all out.
        for (u32 col = lane * 8; col < align_up(inter, 256u); col += 256) {
            const bool valid = col < inter;
            u32 gate[4] = {0, 0, 0, 0}, up[4] = {0, 0, 0, 0};
            if (valid) {
                ld_global_nc_v4(h + col * 2, gate);
                ld_global_nc_v4(h + (inter + col) * 2, up);
            }
            float a[8];
            moe_swiglu(gate, up, weight, clamp, a);
            if constexpr (Config::kFp8) {
                u32 packed[2];
                const u32 exponent = quantize_ue8m0_block<4>(a, packed);
                // Byte b of a 128-column word: the exponent of block b, held by lane 16 * half + 4 * b.
                const u32 first = lane & 16u;
                u32 word = 0;
#pragma unroll
                for (u32 b = 0; b < 4; ++b) word |= __shfl_sync(0xffffffffu, exponent, first + 4 * b) << (8 * b);
                if (valid) {
                    *reinterpret_cast<uint2*>(p.storage + p.act + u64(row) * inter + col) =
                        make_uint2(packed[0], packed[1]);
                    if (lane % 16 == 0) moe_view<u32>(p, p.act_sf)[u64(row) * (inter / 128) + col / 128] = word;
                }
            } else if (valid) {
                const u32 v[4] = {pack_bf16x2(a[0], a[1]), pack_bf16x2(a[2], a[3]), pack_bf16x2(a[4], a[5]),
                                  pack_bf16x2(a[6], a[7])};
                st_global_v4(p.storage + p.act + (u64(row) * inter + col) * 2, v);
            }
        }
    }
}

// One token's output: y[token] = BF16 of the FP32 sum over j in ascending order of L2's row of pair
// (token, j) (`l2_out` [.., hidden] bf16, `pair_rows` the pairs' rows; null: row token * topk + j,
// the pairs' outputs in pair order). Threads `thread` of
// `num_threads` take columns 8 thread, 8 (thread + num_threads), ... (16-byte pieces of each row).
// kReadOnly: L2's rows were written before the kernel started (else by its own earlier phase, which
// the non-coherent read-only path may not see).
template <bool kReadOnly>
__device__ __forceinline__ void moe_combine_token(const u8* l2_out, const int* pair_rows, u8* y_base, u64 y_pitch,
                                                  u32 hidden, u32 topk, u32 token, u32 thread, u32 num_threads) {
    if (pair_rows != nullptr) pair_rows += u64(token) * topk;
    u16* y = reinterpret_cast<u16*>(y_base) + u64(token) * y_pitch;
    const bool vector = (reinterpret_cast<u64>(y_base) | y_pitch * 2) % 16 == 0;
    for (u32 col = thread * 8; col < hidden; col += num_threads * 8) {
        float total[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (u32 j = 0; j < topk; ++j) {
            u32 v[4];
            if constexpr (kReadOnly) {
                ld_global_nc_v4(l2_out + (u64(pair_rows[j]) * hidden + col) * 2, v);
            } else {  // through L2 only
                const u32 row = pair_rows != nullptr ? u32(__ldcg(pair_rows + j)) : token * topk + j;
                const uint4 w = __ldcg(reinterpret_cast<const uint4*>(l2_out + (u64(row) * hidden + col) * 2));
                v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
            }
#pragma unroll
            for (u32 i = 0; i < 8; ++i)
                total[i] += i % 2 ? bf16_hi_to_float(v[i / 2]) : bf16_lo_to_float(v[i / 2]);
        }
        const u32 out[4] = {pack_bf16x2(total[0], total[1]), pack_bf16x2(total[2], total[3]),
                            pack_bf16x2(total[4], total[5]), pack_bf16x2(total[6], total[7])};
        if (vector) {
            st_global_v4(y + col, out);
        } else {
#pragma unroll
            for (u32 i = 0; i < 8; ++i) y[col + i] = u16(out[i / 2] >> (16 * (i % 2)));
        }
    }
}

// CTA per token.
template <class Config>
__device__ __forceinline__ void moe_combine(const MoeLayerParams& p) {
    grid_dependency_wait();
    moe_combine_token<true>(p.storage + p.l2_out, moe_view<const int>(p, p.pair_rows), p.out, p.y_pitch, p.hidden,
                      p.num_topk, blockIdx.x, threadIdx.x, Config::kNumThreads);
}

template <class Config>
__device__ __forceinline__ void sm90_moe_layer(const MoeLayerParams& p) {
    if constexpr (Config::kStep == MoeStep::kRoute)
        moe_route<Config>(p);
    else if constexpr (Config::kStep == MoeStep::kDispatch)
        moe_dispatch<Config>(p);
    else if constexpr (Config::kStep == MoeStep::kActivation)
        moe_activation<Config>(p);
    else
        moe_combine<Config>(p);
}

}  // namespace moegemm
