// The sm90 GEMM skeleton: a persistent, warp-specialized kernel body that a GEMM family
// instantiates with its Kernel policy (described below; sm90_fp8_gemm.cuh holds the FP8 one).
//
// Warp roles (Config::kNumMathWarpgroups + 1 warpgroups, persistent grid, one CTA per SM):
//   warpgroups 0..kNumMathWarpgroups-1  math: each owns kSlabs slabs of 64 rows of the BLOCK_M x
//                                       BLOCK_N tile (two for BLOCK_M 256, else one): the main loop
//                                       into FP32 totals, then the split-K reduce (split_k.cuh) and
//                                       the epilogue (epilogue.cuh).
//   last warpgroup                      producer: its first thread issues every TMA load
//                                       (gemm_producer, pipeline.cuh); its other threads exit, or
//                                       with kTransformsB its warps 1 to 3 write each stage's B
//                                       tile from the extras (gemm_transformer).
// After setup the producer warpgroup gives up registers (setmaxnreg.dec to kProducerRegisters) and
// the math warpgroups take them (setmaxnreg.inc to kMathRegisters).
// Shared memory, in order: the D staging buffer (kSmemDBytes: 64 rows x kOutCols per slab),
// kStages A tiles, kStages B tiles, kStages x kExtraStageBytes of the policy's own
// per-stage data, the split-K reduce buffer, then the barriers: full[kStages], empty[kStages]
// (pipeline.cuh), reduce_full[kNumMathWarpgroups], reduce_free[kNumMathWarpgroups] (split-K only,
// split_k.cuh). Thread 0 initializes them; a cluster sync (__syncthreads without a cluster)
// publishes the inits to the cluster before any remote arrive or multicast. With programmatic
// dependent launch, global inputs are read only after grid_dependency_wait.
// Every math warp runs its own TileScheduler over the same tiles as the producer. Per tile:
//   - kSkipIdleSlabs: a warpgroup whose 64 rows all lie past the tile's row limit only passes the
//     stages (consumer_pass_stages): the empty barriers count every math warp;
//   - the main loop: for each of the CTA's K blocks, issue the block's WGMMAs into a scratch
//     accumulator (Kernel::issue, which waits for the stage's full barrier), wait for them, and
//     retire the block (Kernel::retire: release the stage, fold the scratch into the totals). With
//     two scratch accumulators (kDoubleBuffer) the next block's WGMMAs are issued before the
//     previous block is retired; no WGMMA stays in flight across a loop's back edge. With two
//     slabs, each slab's WGMMAs are issued, waited for and retired in turn, and the skeleton waits
//     for the stages itself (probing the next one early), as it does with one scratch accumulator;
//     With kIssueIntoTotals (no promotion) the WGMMAs accumulate into the totals themselves, one K
//     block's in flight while the next block's are issued;
//   - split-K: the cluster's partial tiles are summed into this CTA's column slice;
//   - the epilogue stores the totals. With kDeferEpilogue it waits until the next tile's first
//     WGMMAs are issued (into a scratch accumulator, while the totals still hold the stored tile),
//     so the tensor cores work through it.
// Before exiting, a math warpgroup's issuing thread waits for its last TMA stores (shared memory
// must outlive their reads), and under split-K the warpgroup waits for the peers' last arrivals.
//
// The Kernel policy, a struct of types, constants and static hooks (all __forceinline__):
//   using Config    GemmConfigBase-derived constants (config.cuh) plus the family's own:
//                   kExtraStageBytes, kSmemBytes (== Config::smem_bytes(kExtraStageBytes)),
//                   kProducerRegisters, kMathRegisters, kSkipIdleSlabs, kDeferEpilogue, kDoubleBuffer,
//                   kIssueIntoTotals (the WGMMAs accumulate into the totals: no scratch, no promotion).
//   using Params    the kernel's parameter struct; the skeleton reads tma_a, tma_b, tma_d, groups, d,
//                   m, n, k, stage_bytes, k_blocks_per_split, num_groups and ld_d.
//   using Epilogue  how staged boxes reach D (epilogue.cuh: TmaStoreEpilogue, TmaReduceAddEpilogue).
//   prefetch_descriptors(const Params&)          the producer thread prefetches the TMA descriptors.
//   producer_tile(const Params&, const Tile&, u32 num_k_blocks) -> P
//                                                per-tile values of the extra loads (P: any type).
//   load_stage_extras(const Params&, const P, const Tile&, u32 num_k_blocks, u32 k_block, u32 stage,
//                     Barrier* full, u8* smem_extra)
//                                                the stage's extra TMA loads, completing on `full`.
//   begin_tile(const Params&, const Tile&, const u32& num_k_blocks) -> T
//                                                per-tile values of the math (T: any type).
//   issue(const T&, u32 k_block, u32 stage, u32 phase, u64 desc_a, u64 desc_b, const u8* smem_extra,
//         Barrier* full, u32 acc_row, float* scratch, bool wait_full = true) -> B
//                                                wait for full[stage] (parity `phase`; not when
//                                                wait_full is false: the skeleton waited) and for
//                                                the policy's own barriers of the stage, then issue
//                                                and commit the K block's WGMMAs into `scratch`
//                                                (kBlockN / 2 floats); B: what retire needs of it.
//   retire<kRelease = true>(const T&, u32 stage, const B&, float* scratch, float* totals, Barrier* empty,
//          u32 peer)                             once those WGMMAs are done: consumer_release_stage
//                                                (not for a slab before the last), then fold
//                                                `scratch` into `totals`.
// With Config::kTransformsB, also:
//   init_barriers(u8* smem_extra)                thread 0 initializes the policy's barriers.
//   transform_stage(u32 stage, u8* tile_b, u8* smem_extra, u32 thread)
//                                                thread `thread` (0..95) of the transform warps writes
//                                                its share of the stage's B tile once the stage has
//                                                landed, and signals the math warps (whose issue
//                                                waits for that) when the tile is written.
// desc_a / desc_b describe stage 0's A tile (at the slab's 64 rows) and B tile, K-major with
// the 128-byte swizzle (mma/layout.cuh); acc_row is the thread's first accumulator row in the tile.
// The schedule of the main loop is the skeleton's and the per-block steps the policy's so that the
// loops stay in one function with the tile loop: the FP8 kernel's SASS was checked identical so
// (tools/compare_sass.py); with the loops in a function of their own, the compiler numbered and
// moved registers differently. Hooks take their parameters as written above for the same reason.
#pragma once
#include "../mma/layout.cuh"
#include "../ptx.cuh"
#include "config.cuh"
#include "epilogue.cuh"
#include "pipeline.cuh"
#include "scheduler.cuh"
#include "split_k.cuh"

namespace moegemm {

// Checks of what the skeleton needs from a Kernel policy's Config.
template <class Config>
struct GemmConfigChecks {
    static_assert(Config::kSmemBytes == Config::smem_bytes(Config::kExtraStageBytes),
                  "kSmemBytes is the skeleton's carve-up");
    static_assert(Config::kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a block may use");
    static_assert(Config::kExtraStageBytes % 16 == 0, "the reduce buffer after the extras stays 16-byte aligned");
    static_assert(Config::kProducerRegisters % 8 == 0 && Config::kMathRegisters % 8 == 0 &&
                      Config::kProducerRegisters >= 24 && Config::kMathRegisters <= 256,
                  "setmaxnreg takes multiples of 8 in [24, 256]");
    static_assert(register_split_fits(Config::kNumMathThreads + 128, Config::kNumMathThreads, Config::kMathRegisters,
                                      Config::kProducerRegisters),
                  "the register split exceeds the block's launch allocation");
    static_assert(!Config::kSkipIdleSlabs || Config::kNumMathWarpgroups >= 2, "an idle slab needs a busy one");
    // The deferred epilogue's tile issues its first K block unconditionally, but a split-K CTA may
    // have none (and a WGMMA issued under a condition makes ptxas serialize them all: C7514).
    static_assert(!Config::kDeferEpilogue || Config::kSplitK == 1, "no deferred epilogue under split-K");
    static constexpr bool kOk = true;
};

// Whether this warpgroup's 64-row slab of the tile lies wholly at or past the rows that may be
// written: it has nothing to compute. A warp vote, so that the compiler knows it warp-uniform.
template <class Config>
__device__ __forceinline__ bool slab_idle(const Tile& tile, u32 wg) {
    return __all_sync(0xffffffffu, tile.row + wg * Config::kWarpgroupRows >= tile.row_limit);
}

// The math warpgroups: the persistent tile loop and its main loop (see the top of the file).
template <class Kernel>
__device__ __forceinline__ void gemm_consumer(const typename Kernel::Params& p, u8* smem_d, const u8* smem_a,
                                              const u8* smem_b, const u8* smem_extra, Barrier* full, Barrier* empty,
                                              u8* smem_reduce, Barrier* reduce_full, Barrier* reduce_free) {
    using Config = typename Kernel::Config;
    constexpr u32 BM = Config::kBlockM, BN = Config::kBlockN;
    constexpr u32 kAcc = BN / 2;
    TileScheduler<Config::kType, BM, BN, Config::kClusterM, Config::kClusterN, Config::kSplitK, true> scheduler(
        p.m, p.n, p.groups, p.num_groups, scheduler_k<Config>(p), p.k_blocks_per_split);
    const u32 num_k_blocks = ceil_div(p.k, Config::kBlockK);
    u32 k_begin, k_end;
    scheduler.k_range(num_k_blocks, p.k_blocks_per_split, k_begin, k_end);
    const u32 rank = Config::kClusterSize > 1 ? cluster_cta_rank() : 0;
    const u32 peer = rank ^ 1;
    const u32 slice = Config::kSplitK > 1 ? rank : 0;
    u32 round = 0;
    // Broadcast, so that the compiler knows it warp-uniform and keeps the WGMMA descriptors built
    // from it in uniform registers.
    const u32 wg = broadcast(threadIdx.x / 128);
    const u32 acc_row = wg * Config::kWarpgroupRows + slab_row();  // this thread's first accumulator row
    // Descriptors of stage 0's A (at this warpgroup's rows) and B tiles; adding the stage and K
    // offsets to them is cheaper than building descriptors from addresses. Broadcast, so that the
    // compiler keeps them in uniform registers rather than rebuilding them every K block.
    const u64 desc_a = broadcast_u64(
        smem_descriptor_sw128<Config::kMajorA>(smem_a + wg * Config::kWarpgroupRows * Config::kStageRowBytes));
    const u64 desc_b = broadcast_u64(smem_descriptor_sw128<Config::kMajorB>(smem_b));
    u8* smem_d_wg = smem_d + wg * Config::kSlabs * Config::kSlabDBytes;
    const u32 reduce_wg = smem_addr(smem_reduce) + wg * (Config::kSplitK - 1) * Config::kReduceSlotBytes;

    // Scratch accumulators, two when registers allow (kDoubleBuffer): the WGMMAs of the next K block
    // run while this one is retired, so the tensor cores never wait for the retirement.
    float scratch0[kAcc], scratch1[Config::kDoubleBuffer ? kAcc : 1], totals[Config::kSlabs * kAcc];
    StageRing<Config::kStages> ring;
    // A tile's epilogue is deferred until the next tile's first WGMMAs are in flight (kDeferEpilogue),
    // so the tensor cores work through it instead of waiting for it.
    Tile done;
    SlabRows done_rows;
    bool pending = false;
    auto flush_epilogue = [&]() {
        if (pending) epilogue_store<Config, typename Kernel::Epilogue>(p, done, totals, smem_d_wg, slice, done_rows);
        pending = false;
    };
    for (Tile tile; scheduler.next(tile);) {
        if (Config::kSkipIdleSlabs && slab_idle<Config>(tile, wg)) {
            flush_epilogue();
            consumer_pass_stages<Config>(k_end - k_begin, ring, full, empty, peer);
            continue;
        }
        if constexpr (Config::kSkipIdleSlabs) {
            // Past the skip's branch the compiler no longer knows the ring warp-uniform and would keep
            // it, and the WGMMA descriptors built from it, in ordinary registers: broadcast it.
            ring.stage = broadcast(ring.stage);
            ring.phase = broadcast(ring.phase);
        }
        const auto tile_state = Kernel::begin_tile(p, tile, num_k_blocks);
        const u32 y = tile.row + wg * Config::kWarpgroupRows;  // the warpgroup's first row
        SlabRows slab_rows{};  // filled by load() for kContiguous only
        slab_rows.load<Config>(p, y);
        u32 next_k_block = k_begin;  // of the next issue
        // wait_full false: the caller has waited for the stage's full barrier.
        auto issue = [&](float* scratch, bool wait_full = true) {
            const auto token = Kernel::issue(tile_state, next_k_block++, ring.stage, ring.phase, desc_a, desc_b,
                                             smem_extra, full, acc_row, scratch, wait_full);
            ring.advance();
            return token;
        };
        // The token's type by name: NVRTC takes a lambda with an `auto` parameter for a host function.
        using Token = decltype(Kernel::issue(tile_state, 0u, 0u, 0u, desc_a, desc_b, smem_extra, full, acc_row,
                                             scratch0));
        auto retire = [&](u32 stage, const Token& token, float* scratch) {
            Kernel::retire(tile_state, stage, token, scratch, totals, empty, peer);
        };

        u32 k_block = k_begin;
        // kKGrouped: the expert's own K segment (the scheduler skips empty ones); kBatchSum: the
        // item's run.
        u32 tile_k_end = k_end;
        if constexpr (Config::kType == GemmType::kKGrouped) tile_k_end = ceil_div(tile.k_rows, Config::kBlockK);
        if constexpr (Config::kType == GemmType::kBatchSum) tile_k_end = tile.k_rows;
        if constexpr (Config::kIssueIntoTotals) {
            // No promotion: the WGMMAs accumulate into the totals themselves, each K block's issued
            // before the previous block's are waited for, so the tensor cores go from one straight to
            // the next; a stage is released once the WGMMAs reading it are done.
            static_assert(Config::kSlabs == 1 && !Config::kDeferEpilogue, "the totals are the accumulator");
#pragma unroll
            for (u32 i = 0; i < kAcc; ++i) totals[i] = 0.0f;
            if (k_block < tile_k_end) {
                u32 stage = ring.stage;
                auto token = issue(totals);
                for (++k_block; k_block < tile_k_end; ++k_block) {
                    const u32 next_stage = ring.stage;
                    const auto next_token = issue(totals);
                    wgmma_wait<1>();
                    retire(stage, token, totals);
                    stage = next_stage;
                    token = next_token;
                }
                wgmma_wait<0>();
                retire(stage, token, totals);
            }
        } else if constexpr (Config::kSlabs > 1) {
            static_assert(Config::kType != GemmType::kKGrouped && Config::kType != GemmType::kBatchSum,
                          "kKGrouped and kBatchSum issue into the totals");
            // Two slabs per warpgroup and one scratch accumulator (the totals of both take the
            // registers a second one would need): per K block, each slab's WGMMAs are issued, waited
            // for and retired in turn, the stage released with the last. The tensor cores stay busy
            // with the other warpgroup's WGMMAs meanwhile. kDeferEpilogue: the previous tile's
            // epilogue runs under the first slab's first WGMMAs.
            static_assert(Config::kSlabs == 2 && !Config::kDoubleBuffer, "two slabs, one scratch accumulator");
            auto issue_slab = [&](u32 slab) {
                return Kernel::issue(tile_state, k_block, ring.stage, ring.phase,
                                     smem_descriptor_advance(desc_a, slab * 64 * Config::kStageRowBytes), desc_b,
                                     smem_extra, full, acc_row + slab * 64, scratch0, false);
            };
            // One K block; the tile's first (`first`) zeroes the totals, with kDeferEpilogue after the
            // previous tile's epilogue, issued under its first WGMMAs. The next block's stage is
            // probed before the last slab's promotion, so that the probe's latency passes under it.
            bool ready = false;
            auto run_k_block = [&](bool first) {
                if (!ready) full[ring.stage].wait(ring.phase);
                auto token = issue_slab(0);
                if (first) {
                    if constexpr (Config::kDeferEpilogue) flush_epilogue();
#pragma unroll
                    for (u32 i = 0; i < Config::kSlabs * kAcc; ++i) totals[i] = 0.0f;
                }
                wgmma_wait<0>();
                Kernel::template retire<false>(tile_state, ring.stage, token, scratch0, totals, empty, peer);
                token = issue_slab(1);
                wgmma_wait<0>();
                const u32 stage = ring.stage;
                ++k_block;
                ring.advance();
                ready = k_block < k_end && full[ring.stage].test_wait(ring.phase);
                Kernel::template retire<true>(tile_state, stage, token, scratch0, totals + kAcc, empty, peer);
            };
            run_k_block(true);
            while (k_block < k_end) run_k_block(false);
        } else {
            if constexpr (Config::kDeferEpilogue) {
                // The first K block, then the previous tile's epilogue while its WGMMAs run.
                const u32 stage = ring.stage;
                const auto token = issue(scratch0);
                flush_epilogue();
#pragma unroll
                for (u32 i = 0; i < kAcc; ++i) totals[i] = 0.0f;
                wgmma_wait<0>();
                retire(stage, token, scratch0);
                ++k_block;
            } else {
#pragma unroll
                for (u32 i = 0; i < kAcc; ++i) totals[i] = 0.0f;
            }

            if constexpr (Config::kDoubleBuffer) {
                // The two scratch accumulators alternate: each K block's WGMMAs are issued before the
                // previous block is retired. No WGMMA stays in flight across a loop's back edge: ptxas
                // would serialize them all (C7514). So the main loop takes four K blocks per trip (one
                // retirement in four not overlapped), a second loop the remaining pairs. (Peeling the
                // second block too, to retire the first under it, was not taken: BENCHMARKS.md,
                // 2026-12-02.)
                for (; k_block + 4 <= tile_k_end; k_block += 4) {
                    u32 stage0 = ring.stage;
                    auto token0 = issue(scratch0);
                    u32 stage1 = ring.stage;
                    auto token1 = issue(scratch1);
                    wgmma_wait<1>();
                    retire(stage0, token0, scratch0);
                    stage0 = ring.stage;
                    token0 = issue(scratch0);
                    wgmma_wait<1>();
                    retire(stage1, token1, scratch1);
                    stage1 = ring.stage;
                    token1 = issue(scratch1);
                    wgmma_wait<1>();
                    retire(stage0, token0, scratch0);
                    wgmma_wait<0>();
                    retire(stage1, token1, scratch1);
                }
                for (; k_block < tile_k_end; k_block += 2) {
                    const u32 stage0 = ring.stage;
                    const auto token0 = issue(scratch0);
                    if (k_block + 1 < tile_k_end) {
                        const u32 stage1 = ring.stage;
                        const auto token1 = issue(scratch1);
                        wgmma_wait<1>();
                        retire(stage0, token0, scratch0);
                        wgmma_wait<0>();
                        retire(stage1, token1, scratch1);
                    } else {
                        wgmma_wait<0>();
                        retire(stage0, token0, scratch0);
                    }
                }
            } else {
                // One scratch accumulator: the tensor cores wait for each retirement, so the next
                // stage's barrier is probed before it and only waited for after it if not yet ready.
                bool ready = false;
                for (; k_block < tile_k_end; ++k_block) {
                    const u32 stage = ring.stage;
                    if (!ready) full[stage].wait(ring.phase);
                    const auto token = issue(scratch0, false);
                    wgmma_wait<0>();
                    ready = k_block + 1 < tile_k_end && full[ring.stage].test_wait(ring.phase);
                    retire(stage, token, scratch0);
                }
            }
        }

        if constexpr (Config::kSplitK > 1)
            split_k_reduce<Config>(totals, tile, y, reduce_wg, reduce_full[wg], reduce_free[wg], rank, round++);

        done = tile;
        done_rows = slab_rows;
        pending = true;
        if constexpr (!Config::kDeferEpilogue) flush_epilogue();
    }
    flush_epilogue();
    // Shared memory must outlive the last store's reads, and the peers' last arrivals on this CTA's
    // reduce barriers.
    if (threadIdx.x % 128 == 0) tma_store_wait_all();
    if constexpr (Config::kSplitK > 1)
        if (round > 0) reduce_free[wg].wait((round - 1) & 1);
}

// The kernel body: shared-memory carve-up, barrier init, cluster sync, warp roles.
template <class Kernel>
__device__ __forceinline__ void sm90_gemm(const typename Kernel::Params& p) {
    using Config = typename Kernel::Config;
    static_assert(GemmConfigChecks<Config>::kOk);
    extern __shared__ __align__(1024) u8 smem[];
    u8* smem_d = smem;
    u8* smem_a = smem_d + Config::kSmemDBytes;
    u8* smem_b = smem_a + Config::kStages * Config::kTileABytes;
    u8* smem_extra = smem_b + Config::kStages * Config::kTileBBytes;
    u8* smem_reduce = smem_extra + Config::kStages * Config::kExtraStageBytes;
    Barrier* full = reinterpret_cast<Barrier*>(smem_reduce + Config::kReduceBytes);
    Barrier* empty = full + Config::kStages;
    Barrier* reduce_full = empty + Config::kStages;
    Barrier* reduce_free = reduce_full + Config::kNumMathWarpgroups;

    if (threadIdx.x == Config::kNumMathThreads) Kernel::prefetch_descriptors(p);
    if (threadIdx.x == 0) {
#pragma unroll
        for (u32 s = 0; s < Config::kStages; ++s) {
            full[s].init(1);
            empty[s].init(Config::kMulticast * Config::kNumMathThreads / 32);
        }
        if constexpr (Config::kSplitK > 1) {
            for (u32 wg = 0; wg < Config::kNumMathWarpgroups; ++wg) {
                reduce_full[wg].init(1);
                reduce_free[wg].init(Config::kSplitK - 1);
            }
        }
        if constexpr (Config::kTransformsB) Kernel::init_barriers(smem_extra);
        fence_barrier_init();
    }
    if constexpr (Config::kClusterSize > 1)
        cluster_sync();
    else
        __syncthreads();
    // With programmatic dependent launch, inputs written by the previous kernel are ready only now.
    grid_dependency_wait();

    if (threadIdx.x >= Config::kNumMathThreads) {
        warpgroup_reg_dealloc<Config::kProducerRegisters>();
        if (threadIdx.x == Config::kNumMathThreads)
            gemm_producer<Kernel>(p, smem_a, smem_b, smem_extra, full, empty);
        if constexpr (Config::kTransformsB)
            if (threadIdx.x >= Config::kNumMathThreads + 32)
                gemm_transformer<Kernel>(p, smem_b, smem_extra, full, threadIdx.x - Config::kNumMathThreads - 32);
    } else {
        warpgroup_reg_alloc<Config::kMathRegisters>();
        gemm_consumer<Kernel>(p, smem_d, smem_a, smem_b, smem_extra, full, empty, smem_reduce, reduce_full,
                              reduce_free);
    }
}

}  // namespace moegemm
