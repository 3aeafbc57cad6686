// The hyper-connection pre-norm GEMM on sm_90a: D[M, N] = A @ B^T on TF32 tensor cores and
// sqr_sum[M] = the row sums of A's squares, in one pass over A (A bf16 [M, K], B fp32 [N, K],
// N <= 256: the hyper-connection width, 24 in DeepSeek-V4's layers).
//
// A dominates the bytes (N is small), so the kernel is a stream over A: each CTA takes 64 rows and
// one split of K (the K blocks dealt out as reference.hc_prenorm_split_ranges says), a producer
// thread keeps kStages 64-wide K blocks of A and B in flight by TMA, and one math warpgroup turns
// each block of A into the TF32 WGMMA's register fragment (bf16 to fp32 is exact), squaring the
// same registers for sqr_sum, while B comes from shared memory. Split s writes D[s] and sqr_sum[s].
#pragma once
#include <moegemm/mma/wgmma.cuh>
#include <moegemm/ptx.cuh>
#include <moegemm/sm90/pipeline.cuh>

namespace moegemm {

struct HcPrenormParams {
    TmaDescriptor tma_a;  // A bf16 [M, K], box {64, 64}, 128-byte swizzle
    TmaDescriptor tma_b;  // B fp32 [N, K], box {32, BLOCK_N}, 128-byte swizzle
    float* d;             // D fp32 [num_splits, M, N], contiguous
    float* sqr_sum;       // fp32 [num_splits, M], contiguous
    u32 m, n, k, num_splits;
};

template <u32 kBlockN_, u32 kStages_>
struct HcPrenormConfig {
    static constexpr u32 kBlockM = 64, kBlockK = 64, kBlockN = kBlockN_, kStages = kStages_;
    static constexpr u32 kNumMathThreads = 128, kNumThreads = kNumMathThreads + 32;
    static constexpr u32 kTileABytes = kBlockM * kBlockK * 2;
    // B's 64 fp32 of K per row are two 128-byte halves, each a [kBlockN rows x 128 B] swizzled tile.
    static constexpr u32 kHalfBBytes = kBlockN * 128, kTileBBytes = 2 * kHalfBBytes;
    static constexpr u32 kSmemBytes = kStages * (kTileABytes + kTileBBytes) + 2 * kStages * sizeof(Barrier);
    static_assert(kBlockN % 8 == 0 && kBlockN <= 256, "one m64nNk8 WGMMA per K slice");
};

template <class Config>
__device__ __forceinline__ void sm90_tf32_hc_prenorm_gemm(const HcPrenormParams& p) {
    constexpr u32 kStages = Config::kStages, BN = Config::kBlockN;
    extern __shared__ __align__(1024) u8 smem[];
    u8* smem_a = smem;
    u8* smem_b = smem_a + kStages * Config::kTileABytes;
    Barrier* full = reinterpret_cast<Barrier*>(smem_b + kStages * Config::kTileBBytes);
    Barrier* empty = full + kStages;

    const u32 m_block = blockIdx.x / p.num_splits, split = blockIdx.x % p.num_splits;
    const u32 num_k_blocks = ceil_div(p.k, Config::kBlockK);
    const u32 per_split = num_k_blocks / p.num_splits, extra = num_k_blocks % p.num_splits;
    const u32 k_block_begin = split * per_split + min(split, extra);
    const u32 k_blocks = per_split + (split < extra ? 1 : 0);

    if (threadIdx.x == 0) {
        for (u32 s = 0; s < kStages; ++s) {
            full[s].init(1);
            empty[s].init(Config::kNumMathThreads / 32);
        }
        fence_barrier_init();
    }
    __syncthreads();
    grid_dependency_wait();

    StageRing<kStages> ring;
    if (threadIdx.x >= Config::kNumMathThreads) {
        if (threadIdx.x != Config::kNumMathThreads) return;
        tma_prefetch_descriptor(&p.tma_a);
        tma_prefetch_descriptor(&p.tma_b);
        for (u32 i = 0; i < k_blocks; ++i, ring.advance()) {
            const u32 s = ring.stage;
            empty[s].wait(ring.phase ^ 1);
            full[s].arrive_expect_tx(Config::kTileABytes + Config::kTileBBytes);
            const int k = int(k_block_begin + i) * Config::kBlockK;
            u8* tile_b = smem_b + s * Config::kTileBBytes;
            tma_load_2d(smem_a + s * Config::kTileABytes, &p.tma_a, &full[s], k, int(m_block * Config::kBlockM));
            tma_load_2d(tile_b, &p.tma_b, &full[s], k, 0);
            tma_load_2d(tile_b + Config::kHalfBBytes, &p.tma_b, &full[s], k + 32, 0);
        }
        return;
    }

    // This thread's A fragment rows (r, r + 8) and column c of each 8-wide K slice (the WGMMA's
    // tf32 A layout); row r's 16-byte chunk j sits at chunk j ^ (r % 8) of its 128-byte row.
    const u32 r = slab_row(), c = lane_id() % 4;
    float acc[BN / 2];
#pragma unroll
    for (u32 i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
    float sqr_upper = 0.0f, sqr_lower = 0.0f;
    const u64 desc_b = smem_descriptor_sw128<Major::kK>(smem_b);
    // Wait for the ring's next stage and read its block of A into a fragment, adding the squares.
    auto load_fragment = [&](float (&a)[8][4]) {
        full[ring.stage].wait(ring.phase);
        const u16* tile_a = reinterpret_cast<const u16*>(smem_a + ring.stage * Config::kTileABytes);
#pragma unroll
        for (u32 j = 0; j < 8; ++j) {
            const u16* upper = tile_a + r * 64 + ((j ^ (r % 8)) * 8);
            const u16* lower = upper + 8 * 64;
            a[j][0] = __uint_as_float(u32(upper[c]) << 16);
            a[j][1] = __uint_as_float(u32(lower[c]) << 16);
            a[j][2] = __uint_as_float(u32(upper[c + 4]) << 16);
            a[j][3] = __uint_as_float(u32(lower[c + 4]) << 16);
            sqr_upper += a[j][0] * a[j][0] + a[j][2] * a[j][2];
            sqr_lower += a[j][1] * a[j][1] + a[j][3] * a[j][3];
        }
    };
    // Issue the ring's stage's WGMMAs on fragment `a`; returns the stage, released once they are done.
    auto issue = [&](float (&a)[8][4]) {
        const u32 s = ring.stage;
        wgmma_fence();
#pragma unroll
        for (u32 j = 0; j < 8; ++j) {
            const u32 offset = s * Config::kTileBBytes + (j / 4) * Config::kHalfBBytes + (j % 4) * 32;
            WgmmaTf32RegistersA<BN>::mma(a[j], smem_descriptor_advance(desc_b, offset), acc, true);
        }
        wgmma_commit();
        ring.advance();
        return s;
    };
    // Two fragments: the next block's is read from shared memory while this block's WGMMAs run
    // (their registers stay read until the WGMMAs are done, hence two). Each trip takes two blocks,
    // so that the fragments keep their registers.
    // Block i: issue it on `current`, read block i + 1 into `next`, then release block i's stage.
    auto step = [&](float (&current)[8][4], float (&next)[8][4], u32 i) {
        const u32 s = issue(current);
        if (i + 1 < k_blocks) load_fragment(next);
        wgmma_wait<0>();
        if (lane_id() == 0) empty[s].arrive();
    };
    float a0[8][4], a1[8][4];
    if (k_blocks > 0) load_fragment(a0);
    for (u32 i = 0; i < k_blocks; i += 2) {
        step(a0, a1, i);
        if (i + 1 < k_blocks) step(a1, a0, i + 1);
    }

    // The four lanes of a row hold its columns c, c + 4 of every slice: sum them.
#pragma unroll
    for (u32 mask = 1; mask < 4; mask *= 2) {
        sqr_upper += __shfl_xor_sync(0xffffffff, sqr_upper, mask);
        sqr_lower += __shfl_xor_sync(0xffffffff, sqr_lower, mask);
    }
    const u32 row = m_block * Config::kBlockM + r;
    float* sqr_sum = p.sqr_sum + u64(split) * p.m;
    if (c == 0 && row < p.m) sqr_sum[row] = sqr_upper;
    if (c == 0 && row + 8 < p.m) sqr_sum[row + 8] = sqr_lower;
    float* d = p.d + u64(split) * p.m * p.n;
#pragma unroll
    for (u32 i = 0; i < BN / 2; ++i) {
        const u32 y = row + 8 * ((i / 2) % 2), x = (i / 4) * 8 + c * 2 + i % 2;
        if (y < p.m && x < p.n) d[u64(y) * p.n + x] = acc[i];
    }
}

}  // namespace moegemm
