// Flags, fences and waits between the CTAs of one kernel and between GPUs: the fused MoE layer's
// phases (grid barriers, per-tile counters) and its barrier across ranks.
#pragma once
#include "ptx.cuh"

namespace moegemm {

// Global memory written by other CTAs of this kernel: loads that bypass the SM's L1 (which is not
// coherent with other SMs' stores), atomics and flags at GPU scope.
__device__ __forceinline__ u32 ld_acquire_gpu(const u32* ptr) {
    u32 value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}
__device__ __forceinline__ void red_release_gpu_add(u32* ptr, u32 value) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}
__device__ __forceinline__ u32 atom_acq_rel_gpu_add(u32* ptr, u32 value) {
    u32 old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(value) : "memory");
    return old;
}
__device__ __forceinline__ void st_release_gpu(u32* ptr, u32 value) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}
// Flags between GPUs (a peer's memory over NVLink): system scope.
__device__ __forceinline__ u32 ld_acquire_sys(const u32* ptr) {
    u32 value;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}
__device__ __forceinline__ void st_release_sys(u32* ptr, u32 value) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}
// Between generic-proxy stores to global memory and TMA (async-proxy) loads of them, on both sides.
__device__ __forceinline__ void fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;" ::: "memory");
}
__device__ __forceinline__ u64 global_timer_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Spin until `ready()`, trapping after `limit_ns` (a CTA that never arrives becomes a launch error,
// not a hung GPU).
template <class Ready>
__device__ __forceinline__ void spin_until(Ready ready, u64 limit_ns) {
    const u64 start = global_timer_ns();
    while (!ready()) {
        __nanosleep(64);
        if (global_timer_ns() - start > limit_ns) __trap();
    }
}

}  // namespace moegemm
