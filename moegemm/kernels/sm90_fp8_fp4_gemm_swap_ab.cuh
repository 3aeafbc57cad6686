// FP8 x FP4 GEMM for few tokens on sm_90a (decode): D[M, N] (+)= (A * SFA) @ (B * SFB)^T with the
// roles of the operands swapped, so that the weights widen in registers straight into the WGMMAs.
//
// A WGMMA reads its A operand from registers or shared memory, its B operand from shared memory
// only. Here the weights are the WGMMA's A (64 rows of B per math warpgroup) and the tokens its N
// (kTokens <= 128): each math thread widens its own share of the weights' e2m1 codes (fp4.cuh) into
// its A fragment, with the four 1x32 UE8M0 scales of each 128-wide K block folded in as in
// sm90_fp8_fp4_gemm.cuh, and the tokens' e4m3 tile comes by TMA. No widened tile goes through shared
// memory, and every math warp widens: the FP8 x FP4 kernel's transform warps were its bottleneck.
// The accumulators are D transposed (rows: weights, columns: tokens); per K block they are promoted
// with SFA per column and the widened block's scale per row.
//
// K in an order of our own: the fragment gives quad q of a warp (lanes 4i + q) the K positions
// 16h + 4q + b (h, b: half, byte) of each WGMMA, spread over the packed row. A reduction may take K
// in any order shared by both operands, so WGMMA j of a 128-wide K block takes natural K 32q + 8j +
// 4h + b at position 16h + 4q + b: quad q's 32 values of a weight row are its 16 contiguous packed
// bytes (one 16-byte load, one 1x32 scale block, one table) and the permute warp reorders the
// tokens' tile to match (4-byte words: natural 8q + u to position 4u + q, u = 2j + h).
//
// Grid: one CTA per (expert, 64 * kMathWarpgroups weight rows, kTokens tokens, K split), the splits
// of a unit forming a cluster (kSplitK CTAs) whose partial sums the first CTA adds up over
// distributed shared memory. Masked experts' CTAs past the expert's count return at once.
// Warps: kMathWarpgroups math warpgroups, a producer warp whose first thread issues the TMA loads of
// the stage ring (full / empty barriers as in sm90/pipeline.cuh), and the permute warp, which
// reorders each landed tokens' tile in place and then arrives on the stage's `permuted` barrier.
// Per stage, kKBlocks 128-wide K blocks: for each, the tokens' e4m3 tile [kTokens, 128] (128-byte
// swizzle) and SFA [kTokens]; the weights' packed tile [kRows, 64 * kKBlocks] bytes in one box (one
// K block: 64-byte swizzle, a warp's 16-byte reads hit distinct banks; two: each row's 128 bytes in
// one request, 128-byte swizzle) and the packed exponents [kKBlocks][kRows] (int32, four UE8M0 each).
#pragma once
#include <moegemm/fp4.cuh>
#include <moegemm/mma/wgmma.cuh>
#include <moegemm/sm90/pipeline.cuh>
#include <moegemm/sm90/scheduler.cuh>

namespace moegemm {

struct Fp8Fp4SwapAbParams {
    TmaDescriptor tma_a;    // A e4m3 [rows, K], box {128, min(kTokens, rows rounded up to 8)}, 128-byte swizzle
    TmaDescriptor tma_b;    // B packed e2m1 [G * N, K / 2] bytes, box {64, kRows}, 64-byte swizzle
    TmaDescriptor tma_sfa;  // SFA [G * ceil(K/128), M'] fp32, box {min(kTokens, M'), 1}
    TmaDescriptor tma_sfb;  // SFB packed [G * ceil(K/128), N'] int32, box {kRows, 1}
    const int* groups;      // kMasked: masked_m [G]
    u8* d;                  // D [rows, N] (kMasked: [G, max_M, N]), ld_d elements between rows
    u32 m, n, k;            // kMasked: m = max_M
    u32 stage_bytes;        // bytes the TMA loads of one stage deliver
    u32 block_a_bytes;      // of which each K block's tokens' tile and SFA (not loaded past K)
    u32 k_blocks_per_split;
    u32 num_groups;
    u32 ld_d;
    u32 n_blocks;     // ceil(N / kRows)
    u32 token_tiles;  // ceil(m / kTokens)
};

template <u32 kMathWarpgroups_, u32 kTokens_, u32 kStages_, u32 kSplitK_, bool kOutFp32_, bool kAccumulate_,
          GemmType kType_, u32 kCtasPerSm_, u32 kKBlocks_, bool kDoubleBuffer_ = (kTokens_ <= 64)>
struct Fp8Fp4SwapAbConfig {
    static constexpr u32 kCtasPerSm = kCtasPerSm_;  // the launch bounds' minimum: registers for that many
    static constexpr u32 kMathWarpgroups = kMathWarpgroups_, kTokens = kTokens_, kStages = kStages_;
    static constexpr u32 kKBlocks = kKBlocks_;  // 128-wide K blocks per stage
    static constexpr u32 kSplitK = kSplitK_;
    static constexpr bool kOutFp32 = kOutFp32_, kAccumulate = kAccumulate_;
    static constexpr GemmType kType = kType_;
    static constexpr u32 kRows = 64 * kMathWarpgroups;  // weight rows (columns of D) per CTA
    // Two scratch accumulators while registers allow: a stage's widening then runs under the previous
    // stage's WGMMAs (the fused MoE layer's four math warpgroups at 32 tokens have registers for one).
    static constexpr bool kDoubleBuffer = kDoubleBuffer_;
    static constexpr u32 kNumMathThreads = 128 * kMathWarpgroups;
    static constexpr u32 kProducerThread = kNumMathThreads, kPermuteWarp = kNumMathThreads / 32 + 1;
    static constexpr u32 kNumThreads = kNumMathThreads + 64;

    static constexpr u32 kTileABytes = kTokens * 128;  // per K block, as kSfaBytes and kSfbBytes
    static constexpr u32 kRowBytes = 64 * kKBlocks;     // a weight row's packed bytes per stage
    static constexpr u32 kTileBBytes = kRows * kRowBytes;
    static constexpr u32 kSfaBytes = align_up(kTokens * 4, 128u);
    static constexpr u32 kSfbBytes = kRows * 4;
    static constexpr u32 kTileBOffset = kStages * kKBlocks * kTileABytes;
    static constexpr u32 kSfaOffset = kTileBOffset + kStages * kTileBBytes;
    static constexpr u32 kSfbOffset = kSfaOffset + kStages * kKBlocks * kSfaBytes;
    static constexpr u32 kRingBytes = kSfbOffset + kStages * kKBlocks * kSfbBytes;
    // After the main loop the ring's memory holds the split-K partial sums the first CTA receives
    // (each thread's 16-byte pieces thread-contiguous), then the output tile, D^T's [kTokens, kRows]
    // in FP32 with rows padded by 4 floats (conflict-free writes from the accumulator layout).
    static constexpr u32 kReduceBytes = (kSplitK - 1) * kNumMathThreads * kTokens * 2;
    static constexpr u32 kOutPitch = kRows + 4;
    static constexpr u32 kOutBytes = kTokens * kOutPitch * 4;
    static constexpr u32 kBarrierOffset =
        align_up(kRingBytes > kReduceBytes + kOutBytes ? kRingBytes : kReduceBytes + kOutBytes, 8u);
    static constexpr u32 kLutOffset = kBarrierOffset + 3 * kStages * 8;  // after full, empty, permuted
    static constexpr u32 kSmemBytes = kLutOffset + kE2m1LutBytes;

    static_assert(kMathWarpgroups == 1 || kMathWarpgroups == 2 || kMathWarpgroups == 4,
                  "one or two math warpgroups (four: the fused MoE layer's, gate and up rows in one tile)");
    static_assert(kTokens % 8 == 0 && kTokens >= 8 && kTokens <= 128, "WGMMA N: 8 to 128 tokens, multiples of 8");
    static_assert(kTileABytes % 1024 == 0, "128-byte-swizzled tiles are 1024-byte aligned");
    static_assert(kSplitK >= 1 && kSplitK <= 8, "portable clusters of <= 8");
    static_assert(kKBlocks == 1 || kKBlocks == 2, "a weight row's 64 or 128 bytes a stage");
    static_assert(kType == GemmType::kNormal || (kType == GemmType::kMasked && !kAccumulate),
                  "dense, or masked without C");
    static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a block may use");
};

template <class Config>
struct Fp8Fp4SwapAbKernel {
    static constexpr u32 BT = Config::kTokens, kAcc = BT / 2, kStages = Config::kStages;

    // The ring's barriers (thread 0) and the widening's table (the whole CTA); a CTA barrier must come
    // before their first use.
    __device__ __forceinline__ static void init_ring(u8* smem, Barrier* full, Barrier* empty, Barrier* permuted) {
        if (threadIdx.x == 0) {
#pragma unroll
            for (u32 s = 0; s < kStages; ++s) {
                full[s].init(1);
                empty[s].init(Config::kNumMathThreads / 32);
                permuted[s].init(1);
            }
            fence_barrier_init();
        }
        e2m1_lut_init(smem_addr(smem + Config::kLutOffset));
    }

    // The producer thread: the stage ring over this CTA's K blocks, kKBlocks a stage. A last stage of one
    // block loads no tokens' tile and SFA for the other (the weights' box reads the next split's block,
    // or zeros past K, unused).
    __device__ __forceinline__ static void produce(const Fp8Fp4SwapAbParams& p, u8* smem, Barrier* full,
                                                   Barrier* empty, u32 group, u32 n_block, u32 token_begin,
                                                   u32 k_begin, u32 k_end) {
        const u32 num_k_blocks = ceil_div(p.k, 128u);
        const int a_row = int(group * p.m + token_begin);
        const int sf_k = int((Config::kType == GemmType::kMasked ? group : 0) * num_k_blocks);
        const int b_row = int(group * p.n + n_block * Config::kRows);
        StageRing<kStages> ring;
        for (u32 k_block = k_begin; k_block < k_end; k_block += Config::kKBlocks, ring.advance()) {
            const u32 s = ring.stage, blocks = min(Config::kKBlocks, k_end - k_block);
            empty[s].wait(ring.phase ^ 1);
            full[s].arrive_expect_tx(p.stage_bytes - (Config::kKBlocks - blocks) * p.block_a_bytes);
            for (u32 b = 0; b < blocks; ++b) {
                const u32 slot = s * Config::kKBlocks + b;
                tma_load_2d(smem + slot * Config::kTileABytes, &p.tma_a, &full[s], int((k_block + b) * 128), a_row);
                tma_load_2d(smem + Config::kSfaOffset + slot * Config::kSfaBytes, &p.tma_sfa, &full[s],
                            int(token_begin), sf_k + int(k_block + b));
            }
            tma_load_2d(smem + Config::kTileBOffset + s * Config::kTileBBytes, &p.tma_b, &full[s], int(k_block * 64),
                        b_row);
            tma_load_2d(smem + Config::kSfbOffset + s * Config::kKBlocks * Config::kSfbBytes, &p.tma_sfb, &full[s],
                        int(n_block * Config::kRows), int(group * num_k_blocks + k_block));
        }
    }

    // The permute warp: each landed tokens' tile (its `tokens` valid rows) of `num_k_blocks` K blocks
    // from `ring`'s stage, reordered in place one row per lane (the eight 16-byte chunks of a row
    // swizzled by row % 8), announced on `permuted`.
    __device__ __forceinline__ static void permute(u8* smem, Barrier* full, Barrier* permuted, u32 tokens,
                                                   u32 num_k_blocks, StageRing<kStages>& ring) {
        for (u32 i = 0; i < num_k_blocks; i += Config::kKBlocks, ring.advance()) {
            full[ring.stage].wait(ring.phase);
            const u32 tiles = smem_addr(smem + ring.stage * Config::kKBlocks * Config::kTileABytes);
            // A stage's tiles are back to back: its rows run on across them (swizzled by row % 8 all
            // the same, kTokens being a multiple of 8).
            const u32 rows = min(Config::kKBlocks, num_k_blocks - i) * Config::kTokens;
            for (u32 row = lane_id(); row < rows; row += 32) {
                if (row % Config::kTokens >= tokens) continue;
                const u32 line = tiles + row * 128, swizzle = row % 8;
                u32 words[8][4];
#pragma unroll
                for (u32 c = 0; c < 8; ++c) ld_shared_v4_u32(line + (c ^ swizzle) * 16, words[c]);
                // Position chunk u holds natural words 8q + u, q = 0..3: word u % 4 of chunks u / 4 + 2q.
#pragma unroll
                for (u32 u = 0; u < 8; ++u)
                    st_shared_v4_u32(line + (u ^ swizzle) * 16, words[u / 4][u % 4], words[u / 4 + 2][u % 4],
                                     words[u / 4 + 4][u % 4], words[u / 4 + 6][u % 4]);
            }
            // The WGMMAs read the tile through the async proxy.
            fence_proxy_async();
            __syncwarp();
            if (lane_id() == 0) permuted[ring.stage].arrive();
        }
    }

    // What a stage's promotion needs once its WGMMAs are done: the widened blocks' scales of the
    // thread's two weight rows.
    struct RowScales {
        float r0, r1;
    };

    // A K block's place in the stage ring: its stage, the stage's phase, the block within the stage.
    struct Cursor {
        StageRing<kStages> ring;
        u32 block = 0;

        __device__ __forceinline__ void advance() {
            if (++block == Config::kKBlocks) block = 0, ring.advance();
        }
    };

    // Widen the thread's share of a K block's weights into A fragments and issue the block's four
    // WGMMAs (K 32 each) into `scratch`. Thread (warp w, lane 4i + q) holds rows 16w + i and 8 below:
    // of each its packed bytes 16q to 16q + 15 of the block (16-byte chunk c = 4 * block + q of the
    // row, at chunk c ^ ((r / 2) % 4) under the 64-byte swizzle, c ^ (r % 8) under the 128-byte one),
    // 1x32 block q. Word j of them (natural K 32q + 8j to + 7) is WGMMA j's halves.
    __device__ __forceinline__ static RowScales issue(const u8* smem, Barrier* full, Barrier* permuted,
                                                      const Cursor& at, u64 desc_a, u32 row, float* scratch) {
        const u32 stage = at.ring.stage;
        const bool first = Config::kKBlocks == 1 || at.block == 0;
        if (first) full[stage].wait(at.ring.phase);
        const u32 tile = smem_addr(smem + Config::kTileBOffset + stage * Config::kTileBBytes);
        const u32 slot = stage * Config::kKBlocks + at.block;
        const u32 sfb = smem_addr(smem + Config::kSfbOffset + slot * Config::kSfbBytes);
        const u32 lut = smem_addr(smem + Config::kLutOffset);
        const u32 chunk = at.block * 4 + lane_id() % 4;
        u32 packed[2][4], exponents[2];
#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            const u32 r = row + 8 * h;
            const u32 swizzle = Config::kKBlocks == 1 ? (r / 2) % 4 : r % 8;
            ld_shared_v4_u32(tile + r * Config::kRowBytes + (chunk ^ swizzle) * 16, packed[h]);
            exponents[h] = ld_shared_u32(sfb + r * 4);
        }
        E2m1Table tables[2];
        RowScales scales;
        scales.r0 = e2m1_block_table(lut, exponents[0], lane_id() % 4, tables[0]);
        scales.r1 = e2m1_block_table(lut, exponents[1], lane_id() % 4, tables[1]);
        u32 fragments[4][4];
#pragma unroll
        for (u32 j = 0; j < 4; ++j) {
#pragma unroll
            for (u32 h = 0; h < 2; ++h) widen_e2m1x8(packed[h][j], tables[h], fragments[j][h], fragments[j][2 + h]);
        }
        // Broadcast, so that the compiler knows the stage warp-uniform and keeps the descriptors in
        // uniform registers.
        desc_a = smem_descriptor_advance(desc_a, broadcast(slot) * Config::kTileABytes);
        if (first) permuted[stage].wait(at.ring.phase);
        wgmma_fence();
#pragma unroll
        for (u32 j = 0; j < 4; ++j)
            WgmmaFp8RegistersA<BT>::mma(fragments[j], smem_descriptor_advance(desc_a, j * 32), scratch, j > 0);
        wgmma_commit();
        return scales;
    }

    // Once a K block's WGMMAs are done: read its SFA, release the stage after its last block (`last`),
    // add the scaled scratch into the totals. Accumulator i of the thread is row (i / 2) % 2 of its
    // two, token 8 (i / 4) + 2 (l % 4) + i % 2.
    __device__ __forceinline__ static void retire(const u8* smem, Barrier* empty, const Cursor& at, bool last,
                                                  const RowScales& rows, float* scratch, float* totals) {
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i) fence_register(scratch[i]);
        const u32 slot = at.ring.stage * Config::kKBlocks + at.block;
        const u32 sfa = smem_addr(smem + Config::kSfaOffset + slot * Config::kSfaBytes) + lane_id() % 4 * 8;
        float columns[kAcc / 2];
#pragma unroll
        for (u32 g = 0; g < BT / 8; ++g) ld_shared_v2_f32(sfa + g * 32, columns[2 * g], columns[2 * g + 1]);
        if (last && lane_id() == 0) empty[at.ring.stage].arrive();
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i)
            totals[i] += columns[(i / 4) * 2 + i % 2] * ((i / 2) % 2 ? rows.r1 : rows.r0) * scratch[i];
    }

    // The math warpgroups' main loop over K blocks [k_begin, k_end) from `at`, with kDoubleBuffer two
    // scratch accumulators alternating. No WGMMA stays in flight across the loop's back edge (ptxas
    // would serialize them all). A stage is released after its last block, or the range's last
    // (stages start at k_begin, so a pair of blocks never straddles two stages of two); `at` is left
    // at the next stage.
    __device__ __forceinline__ static void consume(const u8* smem, Barrier* full, Barrier* empty, Barrier* permuted,
                                                   Cursor& at, u32 k_begin, u32 k_end, float* totals) {
        const u32 wg = broadcast(threadIdx.x / 128);
        const u32 row = wg * 64 + slab_row();
        const u64 desc_a = smem_descriptor_k_major_sw128(smem);
        float scratch0[kAcc], scratch1[Config::kDoubleBuffer ? kAcc : 1];
        auto last = [&](const Cursor& block, u32 k_block) {
            return block.block + 1 == Config::kKBlocks || k_block + 1 == k_end;
        };
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i) totals[i] = 0.0f;
        u32 k_block = k_begin;
        for (; Config::kDoubleBuffer && k_block + 2 <= k_end; k_block += 2) {
            const Cursor at0 = at;
            const RowScales rows0 = issue(smem, full, permuted, at0, desc_a, row, scratch0);
            at.advance();
            const Cursor at1 = at;
            const RowScales rows1 = issue(smem, full, permuted, at1, desc_a, row, scratch1);
            at.advance();
            wgmma_wait<1>();
            retire(smem, empty, at0, last(at0, k_block), rows0, scratch0, totals);
            wgmma_wait<0>();
            retire(smem, empty, at1, last(at1, k_block + 1), rows1, scratch1, totals);
        }
        for (; k_block < k_end; ++k_block) {
            const Cursor here = at;
            const RowScales rows = issue(smem, full, permuted, here, desc_a, row, scratch0);
            at.advance();
            wgmma_wait<0>();
            retire(smem, empty, here, last(here, k_block), rows, scratch0, totals);
        }
        if (at.block != 0) at.block = 0, at.ring.advance();  // past a last stage of fewer blocks
    }

    // The first CTA of a split-K cluster gathers the others' totals: each sends its 16-byte pieces
    // into slot rank - 1 of the first CTA's reduce buffer (in the ring's memory: every CTA is past its
    // main loop at the first cluster barrier), and the first adds them in rank order after the second.
    // Returns whether this CTA stores the tile.
    __device__ __forceinline__ static bool reduce_splits(u8* smem, float* totals) {
        if constexpr (Config::kSplitK == 1) {
            return true;
        } else {
            constexpr u32 kPieces = kAcc / 4;
            const u32 rank = cluster_cta_rank();
            const bool math = threadIdx.x < Config::kNumMathThreads;
            auto piece = [&](u32 slot, u32 i) {
                return smem_addr(smem) + ((slot * kPieces + i) * Config::kNumMathThreads + threadIdx.x) * 16;
            };
            cluster_sync();
            if (math && rank > 0) {
#pragma unroll
                for (u32 i = 0; i < kPieces; ++i)
                    st_cluster_v4_f32(piece(rank - 1, i), 0, totals[4 * i], totals[4 * i + 1], totals[4 * i + 2],
                                      totals[4 * i + 3]);
            }
            cluster_sync();
            if (rank > 0) return false;
            if (math) {
                for (u32 slot = 0; slot + 1 < Config::kSplitK; ++slot) {
#pragma unroll
                    for (u32 i = 0; i < kPieces; ++i) {
                        float part[4];
                        ld_shared_v4_f32(piece(slot, i), part);
#pragma unroll
                        for (u32 j = 0; j < 4; ++j) totals[4 * i + j] += part[j];
                    }
                }
            }
            return true;
        }
    }

    // The tile through shared memory as D's rows (tokens), then coalesced stores of the valid tokens
    // and columns (kAccumulate: added to D's FP32 values).
    __device__ __forceinline__ static void store(const Fp8Fp4SwapAbParams& p, u8* smem, const float* totals,
                                                 u32 group, u32 n_block, u32 token_begin, u32 tokens) {
        const u32 out = smem_addr(smem) + Config::kReduceBytes;
        const u32 row = threadIdx.x / 128 * 64 + slab_row();
        // The other warpgroup may still read the ring (without split-K no cluster barrier came between).
        named_barrier_sync(1, Config::kNumMathThreads);
#pragma unroll
        for (u32 i = 0; i < kAcc; ++i) {
            const u32 token = (i / 4) * 8 + lane_id() % 4 * 2 + i % 2;
            st_shared_f32(out + (token * Config::kOutPitch + row + 8 * ((i / 2) % 2)) * 4, totals[i]);
        }
        named_barrier_sync(2, Config::kNumMathThreads);
        constexpr u32 kQuads = Config::kRows / 4, kOutBytes = Config::kOutFp32 ? 4 : 2;
        const u32 col0 = n_block * Config::kRows;
        const bool vector = p.ld_d % 4 == 0;
        for (u32 index = threadIdx.x; index < tokens * kQuads; index += Config::kNumMathThreads) {
            const u32 token = index / kQuads, col = index % kQuads * 4;
            float v[4];
            ld_shared_v4_f32(out + (token * Config::kOutPitch + col) * 4, v);
            const u64 offset = (u64(group * p.m + token_begin + token) * p.ld_d + col0 + col) * kOutBytes;
            u8* dst = p.d + offset;
            if (vector && col0 + col + 4 <= p.n) {
                if constexpr (Config::kOutFp32) {
                    float4* d4 = reinterpret_cast<float4*>(dst);
                    if constexpr (Config::kAccumulate) {
                        const float4 c = *d4;
                        v[0] += c.x, v[1] += c.y, v[2] += c.z, v[3] += c.w;
                    }
                    *d4 = make_float4(v[0], v[1], v[2], v[3]);
                } else {
                    *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]));
                }
            } else {
#pragma unroll
                for (u32 j = 0; j < 4; ++j) {
                    if (col0 + col + j >= p.n) break;
                    if constexpr (Config::kOutFp32) {
                        float* d1 = reinterpret_cast<float*>(dst) + j;
                        *d1 = Config::kAccumulate ? *d1 + v[j] : v[j];
                    } else {
                        reinterpret_cast<u16*>(dst)[j] = u16(pack_bf16x2(v[j], 0.0f) & 0xFFFFu);
                    }
                }
            }
        }
    }
};

template <class Config>
__device__ __forceinline__ void sm90_fp8_fp4_gemm_swap_ab(const Fp8Fp4SwapAbParams& p) {
    using Kernel = Fp8Fp4SwapAbKernel<Config>;
    extern __shared__ __align__(1024) u8 smem[];
    Barrier* full = reinterpret_cast<Barrier*>(smem + Config::kBarrierOffset);
    Barrier* empty = full + Config::kStages;
    Barrier* permuted = empty + Config::kStages;

    // This CTA's unit of work; its cluster shares it, this CTA taking split `rank` of the K blocks.
    const u32 rank = Config::kSplitK > 1 ? cluster_cta_rank() : 0;
    u32 unit = blockIdx.x / Config::kSplitK;
    const u32 token_tile = unit % p.token_tiles;
    unit /= p.token_tiles;
    const u32 n_block = unit % p.n_blocks, group = unit / p.n_blocks;
    const u32 token_begin = token_tile * Config::kTokens;

    // With programmatic dependent launch, inputs written by the previous kernel are ready only now.
    grid_dependency_wait();
    u32 rows = p.m;
    if constexpr (Config::kType == GemmType::kMasked) rows = min(u32(max(__ldg(p.groups + group), 0)), p.m);
    // The cluster's CTAs decide alike: none waits at a cluster barrier for one that returned. Most
    // CTAs of a masked launch over many experts find no token: they return before any setup.
    if (token_begin >= rows) return;
    if (threadIdx.x == Config::kProducerThread) {
        tma_prefetch_descriptor(&p.tma_a);
        tma_prefetch_descriptor(&p.tma_b);
        tma_prefetch_descriptor(&p.tma_sfa);
        tma_prefetch_descriptor(&p.tma_sfb);
    }
    Kernel::init_ring(smem, full, empty, permuted);
    __syncthreads();
    const u32 tokens = min(Config::kTokens, rows - token_begin);
    const u32 num_k_blocks = ceil_div(p.k, 128u);
    const u32 k_begin = min(rank * p.k_blocks_per_split, num_k_blocks);
    const u32 k_end = min(k_begin + p.k_blocks_per_split, num_k_blocks);

    float totals[Kernel::kAcc];
    if (threadIdx.x >= Config::kNumMathThreads) {
        StageRing<Config::kStages> ring;
        if (threadIdx.x / 32 == Config::kPermuteWarp)
            Kernel::permute(smem, full, permuted, tokens, k_end - k_begin, ring);
        else if (threadIdx.x == Config::kProducerThread)
            Kernel::produce(p, smem, full, empty, group, n_block, token_begin, k_begin, k_end);
    } else {
        typename Kernel::Cursor at;
        Kernel::consume(smem, full, empty, permuted, at, k_begin, k_end, totals);
    }
    if (!Kernel::reduce_splits(smem, totals)) return;
    if (threadIdx.x < Config::kNumMathThreads) Kernel::store(p, smem, totals, group, n_block, token_begin, tokens);
}

}  // namespace moegemm
