// Thin wrappers over the sm_90a PTX that moegemm kernels use: mbarriers, TMA (bulk tensor copies),
// proxy fences, warpgroup MMA control (the instructions themselves and their shared-memory
// descriptors are in mma/), register reallocation, streaming global loads, warp reductions and FP8
// conversion.
// Device code only; no standard headers, so the same sources compile under nvcc and NVRTC.
#pragma once

namespace moegemm {

using u8 = unsigned char;
using u16 = unsigned short;
using u32 = unsigned int;
using u64 = unsigned long long;
using i64 = long long;

// Layout-compatible with CUtensorMap; the driver encodes it on the host (moegemm/jit/launch.c).
struct alignas(64) TmaDescriptor {
    u64 opaque[16];
};

__device__ __forceinline__ u32 smem_addr(const void* ptr) {
    return static_cast<u32>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ u32 lane_id() { return threadIdx.x % 32; }

// Lane 0's value in every lane of the warp: the compiler then knows it warp-uniform (and keeps what
// is built from it in uniform registers). Every lane must call it.
__device__ __forceinline__ u32 broadcast(u32 value) { return __shfl_sync(0xffffffffu, value, 0); }
__device__ __forceinline__ u64 broadcast_u64(u64 value) {
    return (u64(broadcast(u32(value >> 32))) << 32) | broadcast(u32(value));
}

// The warp index as a value the compiler knows is uniform across the warp. A whole-warp shuffle:
// every lane must call it (inside a one-lane branch it never returns).
__device__ __forceinline__ u32 warp_id() { return broadcast(threadIdx.x / 32); }

// ---- mbarrier -------------------------------------------------------------------------------------

struct Barrier {
    u64 state;

    __device__ __forceinline__ void init(u32 arrive_count) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(this)), "r"(arrive_count));
    }
    __device__ __forceinline__ void arrive() {
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(this)) : "memory");
    }
    // Arrive and announce the bytes the TMA copies of this phase will deliver.
    __device__ __forceinline__ void arrive_expect_tx(u32 bytes) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(this)),
                     "r"(bytes)
                     : "memory");
    }
    // Arrive on the barrier at the same shared-memory offset in CTA `cta_rank` of this cluster.
    __device__ __forceinline__ void arrive_cluster(u32 cta_rank) {
        asm volatile(
            "{\n"
            ".reg .b32 remote;\n"
            "mapa.shared::cluster.u32 remote, %0, %1;\n"
            "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
            "}\n" ::"r"(smem_addr(this)),
            "r"(cta_rank)
            : "memory");
    }
    // Whether the phase of this parity has completed, without waiting: a probe issued early, whose
    // result is read only after independent work, hides the barrier's latency under that work.
    __device__ __forceinline__ bool test_wait(u32 parity) {
        u32 done;
        asm volatile(
            "{\n"
            ".reg .pred done;\n"
            "mbarrier.test_wait.parity.shared::cta.b64 done, [%1], %2;\n"
            "selp.u32 %0, 1, 0, done;\n"
            "}\n"
            : "=r"(done)
            : "r"(smem_addr(this)), "r"(parity)
            : "memory");
        return done != 0;
    }
    // Block until the phase of the given parity has completed.
    __device__ __forceinline__ void wait(u32 parity) {
        asm volatile(
            "{\n"
            ".reg .pred done;\n"
            "WAIT_%=:\n"
            "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
            "@!done bra WAIT_%=;\n"
            "}\n" ::"r"(smem_addr(this)),
            "r"(parity)
            : "memory");
    }
};

// Make mbarrier initialisation visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Order this thread's generic-proxy shared-memory writes before later async-proxy (TMA, WGMMA) reads.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ u32 cluster_cta_rank() {
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}

// Every thread of every CTA in the cluster; orders shared-memory writes (barrier inits) before
// the other CTAs' accesses.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Synchronise `num_threads` threads on hardware barrier `id` (0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(u32 id, u32 num_threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}
// named_barrier_sync that also returns whether `predicate` held in every participating thread.
__device__ __forceinline__ bool named_barrier_all(u32 id, u32 num_threads, bool predicate) {
    u32 all;
    asm volatile(
        "{\n"
        ".reg .pred p, q;\n"
        "setp.ne.u32 p, %1, 0;\n"
        "bar.red.and.pred q, %2, %3, p;\n"
        "selp.u32 %0, 1, 0, q;\n"
        "}\n"
        : "=r"(all)
        : "r"(static_cast<u32>(predicate)), "r"(id), "r"(num_threads)
        : "memory");
    return all != 0;
}

// ---- TMA --------------------------------------------------------------------------------------------

__device__ __forceinline__ void tma_prefetch_descriptor(const TmaDescriptor* desc) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<u64>(desc)) : "memory");
}

// A 2-D descriptor in global memory made from `base` (a copy of it) for a tensor at `address` whose
// rows are `inner` elements of one byte, `inner` bytes apart; `base` gives the rest (the outer
// dimension, box, swizzle). The K-grouped kernels' per-expert operands: each expert's [rows, k]
// block lies at its own address with its own row pitch. The thread that then loads through it must
// call tma_descriptors_acquire first.
__device__ __forceinline__ void tma_descriptor_rebase(TmaDescriptor* map, const TmaDescriptor& base,
                                                      const void* address, u32 inner) {
#pragma unroll
    for (u32 i = 0; i < 16; i += 2)
        *reinterpret_cast<ulonglong2*>(&map->opaque[i]) = make_ulonglong2(base.opaque[i], base.opaque[i + 1]);
    const u64 map_address = reinterpret_cast<u64>(map);
    asm volatile("tensormap.replace.tile.global_address.global.b1024.b64 [%0], %1;"
                 ::"l"(map_address), "l"(reinterpret_cast<u64>(address)) : "memory");
    asm volatile("tensormap.replace.tile.global_dim.global.b1024.b32 [%0], 0, %1;" ::"l"(map_address), "r"(inner)
                 : "memory");
    asm volatile("tensormap.replace.tile.global_stride.global.b1024.b64 [%0], 0, %1;"
                 ::"l"(map_address), "l"(static_cast<u64>(inner)) : "memory");
}

// The generic-proxy writes of kCount consecutive descriptors made visible to the TMA unit's reads of
// them (the tensormap proxy), for this thread's loads that follow.
template <u32 kCount>
__device__ __forceinline__ void tma_descriptors_acquire(const TmaDescriptor* maps) {
    asm volatile("fence.proxy.tensormap::generic.release.gpu;" ::: "memory");
#pragma unroll
    for (u32 i = 0; i < kCount; ++i)
        asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(reinterpret_cast<u64>(maps + i))
                     : "memory");
}

__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDescriptor* desc, Barrier* bar, int x, int y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
        ::"r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(bar)), "r"(x), "r"(y)
        : "memory");
}

// A box of a 3-D tensor (grouped operands: out-of-bounds rows of one expert read as zero instead of
// the next expert's).
__device__ __forceinline__ void tma_load_3d(void* dst, const TmaDescriptor* desc, Barrier* bar, int x, int y, int z) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];"
        ::"r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(bar)), "r"(x), "r"(y), "r"(z)
        : "memory");
}

// Load a box into the same shared-memory offset of every CTA in `cta_mask`, signalling each CTA's
// barrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TmaDescriptor* desc, Barrier* bar, int x,
                                                      int y, u32 cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%3, %4}], [%2], %5;"
        ::"r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(bar)), "r"(x), "r"(y),
        "h"(static_cast<unsigned short>(cta_mask))
        : "memory");
}

__device__ __forceinline__ void tma_store_2d(const TmaDescriptor* desc, const void* src, int x, int y) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];"
                 ::"l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(src)), "r"(x), "r"(y)
                 : "memory");
}

// Element-wise global += shared, done by the TMA unit (used for D = C + A @ B with D aliasing C).
__device__ __forceinline__ void tma_reduce_add_2d(const TmaDescriptor* desc, const void* src, int x, int y) {
    asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.bulk_group [%0, {%2, %3}], [%1];"
                 ::"l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(src)), "r"(x), "r"(y)
                 : "memory");
}

// The 3-D forms: a box of the 2-D slice z (per-expert outputs [G, M, N]: rows past M are clipped
// instead of written into the next expert's).
__device__ __forceinline__ void tma_store_3d(const TmaDescriptor* desc, const void* src, int x, int y, int z) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];"
                 ::"l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(src)), "r"(x), "r"(y), "r"(z)
                 : "memory");
}

__device__ __forceinline__ void tma_reduce_add_3d(const TmaDescriptor* desc, const void* src, int x, int y, int z) {
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.bulk_group [%0, {%2, %3, %4}], [%1];"
                 ::"l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(src)), "r"(x), "r"(y), "r"(z)
                 : "memory");
}

__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Wait until every committed store has finished reading shared memory (the buffer may be reused).
__device__ __forceinline__ void tma_store_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// Wait until every committed store has completed (its writes are visible in global memory).
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// ---- warpgroup MMA ----------------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keep the compiler from moving accumulator reads/writes across wgmma fences.
__device__ __forceinline__ void fence_register(float& reg) { asm volatile("" : "+f"(reg)::"memory"); }

// ---- registers and conversions ----------------------------------------------------------------------

// setmaxnreg moves registers only within the block's launch allocation: its threads times the count
// ptxas gives each under __launch_bounds__(threads, 1), 64K / threads rounded down to a multiple of 8.
// A split asking for more leaves setmaxnreg.inc waiting forever (BENCHMARKS.md, "FP8 x FP4").
__host__ __device__ constexpr bool register_split_fits(u32 threads, u32 math_threads, u32 math_registers,
                                                    u32 producer_registers) {
    return math_threads * math_registers + (threads - math_threads) * producer_registers <=
           65536 / threads / 8 * 8 * threads;
}

template <u32 kRegisters>
__device__ __forceinline__ void warpgroup_reg_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <u32 kRegisters>
__device__ __forceinline__ void warpgroup_reg_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

// Two floats to a packed bf16x2 (lo in the low half), round to nearest even.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}

__device__ __forceinline__ void st_shared_u32(u32 address, u32 value) {
    asm volatile("st.shared.u32 [%0], %1;" ::"r"(address), "r"(value) : "memory");
}
__device__ __forceinline__ void st_shared_f32(u32 address, float value) {
    asm volatile("st.shared.f32 [%0], %1;" ::"r"(address), "f"(value) : "memory");
}
__device__ __forceinline__ void st_shared_v2_f32(u32 address, float x, float y) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(address), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void ld_shared_v4_f32(u32 address, float (&v)[4]) {
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
                 : "r"(address)
                 : "memory");
}
__device__ __forceinline__ u32 ld_shared_u32(u32 address) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address) : "memory");
    return v;
}
__device__ __forceinline__ void st_shared_v2_u32(u32 address, u32 x, u32 y) {
    asm volatile("st.shared.v2.u32 [%0], {%1, %2};" ::"r"(address), "r"(x), "r"(y) : "memory");
}
__device__ __forceinline__ void ld_shared_v2_u32(u32 address, u32& x, u32& y) {
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(x), "=r"(y) : "r"(address) : "memory");
}
__device__ __forceinline__ void ld_shared_v2_f32(u32 address, float& x, float& y) {
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(x), "=f"(y) : "r"(address) : "memory");
}
__device__ __forceinline__ void ld_shared_v4_u32(u32 address, u32 (&v)[4]) {
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                 : "r"(address)
                 : "memory");
}
// kWords (1, 2 or 4) consecutive 32-bit words in one shared-memory load (address aligned to their size).
template <u32 kWords>
__device__ __forceinline__ void ld_shared_words(u32 address, u32 (&v)[kWords]) {
    static_assert(kWords == 1 || kWords == 2 || kWords == 4, "one, two or four words");
    if constexpr (kWords == 4)
        ld_shared_v4_u32(address, v);
    else if constexpr (kWords == 2)
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v[0]), "=r"(v[1]) : "r"(address) : "memory");
    else
        v[0] = ld_shared_u32(address);
}
__device__ __forceinline__ void st_shared_v4_u32(u32 address, u32 x, u32 y, u32 z, u32 w) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(address), "r"(x), "r"(y), "r"(z), "r"(w)
                 : "memory");
}
// Byte permute: byte i of the result is byte (selector nibble i & 7) of {hi, lo} (lo's bytes are
// 0-3), or with the nibble's bit 3 set, that byte's sign bit replicated into all eight bits.
__device__ __forceinline__ u32 prmt(u32 lo, u32 hi, u32 selector) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(lo), "r"(hi), "r"(selector));
    return d;
}
// Asynchronous store into the shared memory of CTA `cta_rank` of this cluster, at the offset
// `address` has here; completes 16 bytes of the transaction count of the barrier at `barrier`'s
// offset there, so the receiver's barrier wait is what makes the data visible (no fences).
__device__ __forceinline__ void st_async_cluster_v4_f32(u32 address, const Barrier* barrier, u32 cta_rank, float x,
                                                        float y, float z, float w) {
    asm volatile(
        "{\n"
        ".reg .b32 remote, remote_barrier;\n"
        "mapa.shared::cluster.u32 remote, %0, %2;\n"
        "mapa.shared::cluster.u32 remote_barrier, %1, %2;\n"
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [remote], {%3, %4, %5, %6}, [remote_barrier];\n"
        "}\n" ::"r"(address),
        "r"(smem_addr(barrier)), "r"(cta_rank), "f"(x), "f"(y), "f"(z), "f"(w)
        : "memory");
}

// Store into the shared memory of CTA `cta_rank` of this cluster, at the offset `address` has here;
// visible there after a cluster barrier.
__device__ __forceinline__ void st_cluster_v4_f32(u32 address, u32 cta_rank, float x, float y, float z, float w) {
    asm volatile(
        "{\n"
        ".reg .b32 remote;\n"
        "mapa.shared::cluster.u32 remote, %0, %1;\n"
        "st.shared::cluster.v4.f32 [remote], {%2, %3, %4, %5};\n"
        "}\n" ::"r"(address),
        "r"(cta_rank), "f"(x), "f"(y), "f"(z), "f"(w)
        : "memory");
}

// ---- global memory, warp reductions and FP8 conversion (element-wise kernels) -----------------------

// 16-byte global load through the read-only path, not allocated in L1: for inputs read exactly once
// that no thread of the kernel writes. `ptr` must be 16-byte aligned. volatile: never hoisted out of
// the bounds check that guards it.
__device__ __forceinline__ void ld_global_nc_v4(const void* ptr, u32 (&v)[4]) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.b32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                 : "l"(ptr));
}

// The two bf16 halves of a 32-bit word as floats (exact): the low half is the element at the lower address.
__device__ __forceinline__ float bf16_lo_to_float(u32 word) { return __uint_as_float(word << 16); }
__device__ __forceinline__ float bf16_hi_to_float(u32 word) { return __uint_as_float(word & 0xFFFF0000u); }

// IEEE maximum that propagates NaN (fmaxf drops it), as torch's max reductions do.
__device__ __forceinline__ float fmax_nan(float a, float b) {
    float d;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

// fmax_nan over aligned groups of kLanes consecutive lanes (a power of two <= 32); every lane of the
// warp must call it, and every lane of a group gets the group's result.
template <u32 kLanes>
__device__ __forceinline__ float warp_reduce_max_nan(float value) {
    static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a power of two <= 32");
#pragma unroll
    for (u32 offset = kLanes / 2; offset > 0; offset /= 2)
        value = fmax_nan(value, __shfl_xor_sync(0xffffffff, value, offset));
    return value;
}

// Four floats to four e4m3 bytes packed little-endian (v0 in the lowest byte), rounded to nearest even.
// satfinite: magnitudes beyond 448 become +-448 (torch's .to(float8_e4m3fn) agrees for |v| <= 448), NaN stays NaN.
__device__ __forceinline__ u32 pack_e4m3x4(float v0, float v1, float v2, float v3) {
    u32 packed;
    // cvt puts its first source in the upper byte.
    asm("{\n"
        ".reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
        "cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
        "mov.b32 %0, {lo, hi};\n"
        "}\n"
        : "=r"(packed)
        : "f"(v0), "f"(v1), "f"(v2), "f"(v3));
    return packed;
}

// Programmatic dependent launch: wait until the previous kernel's results are visible (a no-op
// when the kernel was not launched with the programmatic-serialization attribute).
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}
template <typename T>
__host__ __device__ constexpr T align_up(T a, T b) {
    return ceil_div(a, b) * b;
}

}  // namespace moegemm
