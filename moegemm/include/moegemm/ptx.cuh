// Thin wrappers over the sm_90a PTX that moegemm kernels use: mbarriers, TMA (bulk tensor copies),
// proxy fences, warpgroup MMA control and shared-memory matrix descriptors, register reallocation.
// Device code only; no standard headers, so the same sources compile under nvcc and NVRTC.
#pragma once

namespace moegemm {

using u8 = unsigned char;
using u32 = unsigned int;
using u64 = unsigned long long;

// Layout-compatible with CUtensorMap; the driver encodes it on the host (moegemm/jit/launch.c).
struct alignas(64) TmaDescriptor {
    u64 opaque[16];
};

__device__ __forceinline__ u32 smem_addr(const void* ptr) {
    return static_cast<u32>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ u32 lane_id() { return threadIdx.x % 32; }

// The warp index as a value the compiler knows is uniform across the warp.
__device__ __forceinline__ u32 warp_id() { return __shfl_sync(0xffffffff, threadIdx.x / 32, 0); }

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

// ---- TMA --------------------------------------------------------------------------------------------

__device__ __forceinline__ void tma_prefetch_descriptor(const TmaDescriptor* desc) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<u64>(desc)) : "memory");
}

__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDescriptor* desc, Barrier* bar, int x, int y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
        ::"r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(bar)), "r"(x), "r"(y)
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

// Shared-memory matrix descriptor of a K-major tile stored with the 128-byte swizzle that TMA
// writes (rows of 128 bytes, 8-row core groups 1024 bytes apart). `start` must lie in a tile whose
// base is 1024-byte aligned; advancing along K within the 128-byte row moves `start` only.
__device__ __forceinline__ u64 smem_descriptor_k_major_sw128(const void* start) {
    const u64 address = smem_addr(start);
    u64 desc = (address & 0x3FFFF) >> 4;  // bits 0-13: start address / 16
    desc |= u64(1) << 16;                   // bits 16-29: leading byte offset (unused when swizzled)
    desc |= u64(1024 >> 4) << 32;           // bits 32-45: stride byte offset between 8-row groups
    desc |= u64(1) << 62;                   // bits 62-63: layout 1 = 128-byte swizzle
    return desc;
}

// ---- registers and conversions ----------------------------------------------------------------------

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
__device__ __forceinline__ void st_shared_v2_f32(u32 address, float x, float y) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(address), "f"(x), "f"(y) : "memory");
}

// Programmatic dependent launch: wait for the previous kernel's results / let the next one start.
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void grid_dependency_launch() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

}  // namespace moegemm
