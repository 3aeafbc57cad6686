// BF16 GEMM on sm_90a: D[M, N] (+)= A @ B with FP32 accumulation, in the four layouts of A and B
// (each K-major or MN-major) and the MoE grouped forms (GemmType in sm90/scheduler.cuh).
//
// A: K-major [M, K] (nt, nn) or MN-major [K, M] (tn, tt). B: K-major [N, K] (nt, tt) or MN-major
// [K, N] (nn). Grouped: B [G, N, K] or [G, K, N]; the rows of A and D as for the FP8 kernel.
// D: bf16 or fp32 [M, N]; with kAccumulate the TMA unit adds the tile into D (D = C + A @ B).
//
// The kernel is the sm90 GEMM skeleton (sm90/gemm.cuh) instantiated with the policy Bf16GemmKernel
// below: stages of 64 K (one 128-byte swizzle row of bf16), no per-stage extras, and four m64nNk16
// WGMMAs per stage straight into the totals (kIssueIntoTotals: BF16 products need no promotion).
// MN-major operands arrive in boxes of 64 M (N) indices by 64 K rows (sm90/config.cuh); MN-major B
// is read as the 3-D tensor [G, K, N].
#pragma once
#include <moegemm/mma/wgmma.cuh>
#include <moegemm/ptx.cuh>
#include <moegemm/sm90/gemm.cuh>

namespace moegemm {

struct Bf16GemmParams {
    TmaDescriptor tma_a;  // K-major A [rows, K], box {64, BLOCK_M (fewer for small M)}; MN-major [K, M], box {64, 64}
    TmaDescriptor tma_b;  // K-major B [G * N, K], box {64, BLOCK_N}; MN-major [G, K, N], box {64, 64, 1}
    TmaDescriptor tma_d;  // D [M, N], box {kStoreCols, 64}
    const int* groups;    // grouped kinds: see GemmType
    u8* d;                // D itself, for the row-by-row stores
    u32 m, n, k;          // kMasked: m = max_M, the rows of each expert
    u32 stage_bytes;         // bytes the TMA loads of one stage deliver (A's box shrinks for small M)
    u32 k_blocks_per_split;  // split-K: K blocks per CTA of a cluster (the last may get fewer)
    u32 num_groups;
    u32 ld_d;  // elements between rows of D
};

template <u32 kBlockM_, u32 kBlockN_, u32 kStages_, u32 kClusterM_, u32 kClusterN_, u32 kSplitK_, bool kOutFp32_,
          bool kAccumulate_, GemmType kType_, Major kMajorA_, Major kMajorB_>
struct Bf16GemmConfig : GemmConfigBase<kBlockM_, kBlockN_, 64, 2, kStages_, kClusterM_, kClusterN_, kSplitK_,
                                       kOutFp32_, kAccumulate_, kType_, kMajorA_, kMajorB_> {
    using Base = GemmConfigBase<kBlockM_, kBlockN_, 64, 2, kStages_, kClusterM_, kClusterN_, kSplitK_, kOutFp32_,
                                kAccumulate_, kType_, kMajorA_, kMajorB_>;
    using Base::kNumMathWarpgroups, Base::kSlabs, Base::kType;

    // The totals (BLOCK_N / 2 floats) are the only accumulator: 128 of them at BLOCK_N = 256 fit two
    // math warpgroups' 232 registers; three warpgroups have 152 each.
    static constexpr u32 kProducerRegisters = 40;
    static constexpr u32 kMathRegisters = kNumMathWarpgroups == 1 ? 240 : kNumMathWarpgroups == 2 ? 232 : 152;
    static constexpr bool kIssueIntoTotals = true;
    static constexpr bool kDoubleBuffer = false;
    // The totals hold the tile until it is stored: no next tile's WGMMAs can run under its epilogue.
    static constexpr bool kDeferEpilogue = false;
    // As for FP8 (sm90_fp8_gemm.cuh): masked experts' idle slabs skip their math.
    static constexpr bool kSkipIdleSlabs = kType == GemmType::kMasked && kNumMathWarpgroups >= 2;
    static constexpr u32 kExtraStageBytes = 0;
    static constexpr u32 kStageBytes = Base::kTileABytes + Base::kTileBBytes;
    static constexpr u32 kSmemBytes = Base::smem_bytes(kExtraStageBytes);

    static_assert(kSlabs == 1, "one 64-row slab per math warpgroup: BLOCK_M 64, 128 or 192");
};

// The BF16 policy of the sm90 GEMM skeleton (the hooks are described in sm90/gemm.cuh).
template <class Config_>
struct Bf16GemmKernel {
    using Config = Config_;
    using Params = Bf16GemmParams;
    using Epilogue = typename TmaEpilogueOf<Config::kAccumulate>::type;
    struct Nothing {};
    using Wgmma = WgmmaBf16<Config::kBlockN, Config::kMajorA, Config::kMajorB>;

    __device__ __forceinline__ static void prefetch_descriptors(const Params& p) {
        tma_prefetch_descriptor(&p.tma_a);
        tma_prefetch_descriptor(&p.tma_b);
        tma_prefetch_descriptor(&p.tma_d);
    }

    __device__ __forceinline__ static Nothing producer_tile(const Params&, const Tile&, u32) { return {}; }

    __device__ __forceinline__ static void load_stage_extras(const Params&, const Nothing, const Tile&, u32, u32, u32,
                                                             Barrier*, u8*) {}

    __device__ __forceinline__ static Nothing begin_tile(const Params&, const Tile&, const u32&) { return {}; }

    // Wait for the stage (unless `wait_full` is false) and issue its four WGMMAs, accumulating into
    // `totals`.
    __device__ __forceinline__ static Nothing issue(const Nothing&, u32, u32 stage, u32 phase, u64 desc_a, u64 desc_b,
                                                    const u8*, Barrier* full, u32, float* totals,
                                                    bool wait_full = true) {
        if (wait_full) full[stage].wait(phase);
        desc_a = smem_descriptor_advance(desc_a, stage * Config::kTileABytes);
        desc_b = smem_descriptor_advance(desc_b, stage * Config::kTileBBytes);
        wgmma_fence();
#pragma unroll
        for (u32 kk = 0; kk < Config::kBlockK / 16; ++kk) {
            Wgmma::mma(smem_descriptor_advance(desc_a, kk * kK16SliceBytes<Config::kMajorA>),
                       smem_descriptor_advance(desc_b, kk * kK16SliceBytes<Config::kMajorB>), totals, true);
        }
        wgmma_commit();
        return {};
    }

    // Once the stage's WGMMAs are done: release it. Nothing to fold.
    template <bool kRelease = true>
    __device__ __forceinline__ static void retire(const Nothing&, u32 stage, const Nothing&, float*, float*,
                                                  Barrier* empty, u32 peer) {
        if constexpr (kRelease) consumer_release_stage<Config>(empty, stage, peer);
    }
};

template <class Config>
__device__ __forceinline__ void sm90_bf16_gemm(const Bf16GemmParams& p) {
    sm90_gemm<Bf16GemmKernel<Config>>(p);
}

}  // namespace moegemm
