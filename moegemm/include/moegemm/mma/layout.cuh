// Operand and accumulator layouts of the sm_90a warpgroup MMA (WGMMA): shared-memory matrix
// descriptors for the tiles TMA writes with the 128-byte swizzle, in K-major and MN-major order, and
// where a thread's accumulators sit in the 64-row output slab of its warpgroup.
#pragma once
#include "../ptx.cuh"

namespace moegemm {

// Which dimension of an operand tile is contiguous in shared memory. K-major: rows of the tile are
// M (or N) indices, each 128-byte row holding consecutive K. MN-major: rows are K indices, each
// holding consecutive M (or N). The values are the WGMMA transpose immediates (imm-trans-a/-b).
enum class Major : u32 { kK = 0, kMN = 1 };

// Descriptor bit fields: start address / 16 (bits 0-13), leading byte offset / 16 (16-29), stride
// byte offset / 16 (32-45), layout (62-63: 1 = 128-byte swizzle).
constexpr u32 kSwizzle128Layout = 1;

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

// The same for K-major rows of kRowBytes (32, 64 or 128) stored with the swizzle of that width, as
// TMA writes a box of that many bytes per row: 8-row core groups 8 * kRowBytes apart. The tile's
// base must be 8 * kRowBytes aligned.
template <u32 kRowBytes>
__device__ __forceinline__ u64 smem_descriptor_k_major(const void* start) {
    static_assert(kRowBytes == 32 || kRowBytes == 64 || kRowBytes == 128, "a 32-, 64- or 128-byte swizzle");
    if constexpr (kRowBytes == 128) return smem_descriptor_k_major_sw128(start);
    constexpr u64 kLayout = kRowBytes == 64 ? 2 : 3;  // bits 62-63: 2 = 64-byte, 3 = 32-byte swizzle
    const u64 address = smem_addr(start);
    return ((address & 0x3FFFF) >> 4) | (u64(1) << 16) | (u64(8 * kRowBytes >> 4) << 32) | (kLayout << 62);
}

// Descriptor of an MN-major tile stored with the 128-byte swizzle: TMA boxes of 128 bytes of M (or
// N) by the tile's K rows, each 8-K-row group 1024 bytes on from the previous one (the stride byte
// offset), and the next 128 bytes of M (or N), the next box, `atom_stride_bytes` on (the leading
// byte offset: K rows * 128 bytes for boxes stored back to back). The canonical MN-major layout
// ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)), T = 16 bytes of elements. One WGMMA's K slice
// (16 bf16 rows) starts 16 * 128 bytes further on: advance `start` (smem_descriptor_advance).
__device__ __forceinline__ u64 smem_descriptor_mn_major_sw128(const void* start, u32 atom_stride_bytes) {
    const u64 address = smem_addr(start);
    u64 desc = (address & 0x3FFFF) >> 4;
    desc |= u64((atom_stride_bytes >> 4) & 0x3FFF) << 16;
    desc |= u64(1024 >> 4) << 32;
    desc |= u64(kSwizzle128Layout) << 62;
    return desc;
}

// Bytes of one MN-major box: 64 indices (128 bytes of 16-bit elements) by 64 K rows.
constexpr u32 kMnMajorBoxBytes = 64 * 128;

// The descriptor of a stage's tile, or of a slab's rows in it, in the operand's major order; the
// MN-major boxes lie back to back.
template <Major kMajor>
__device__ __forceinline__ u64 smem_descriptor_sw128(const void* start) {
    if constexpr (kMajor == Major::kK)
        return smem_descriptor_k_major_sw128(start);
    else
        return smem_descriptor_mn_major_sw128(start, kMnMajorBoxBytes);
}

// Bytes from one 16-wide K slice of a tile (a bf16 WGMMA's K) to the next: along the 128-byte row
// (K-major) or 16 rows of 128 bytes down (MN-major).
template <Major kMajor>
constexpr u32 kK16SliceBytes = kMajor == Major::kK ? 32 : 16 * 128;

// The descriptor of the tile `bytes` (a multiple of 16) further on: the start address field cannot
// carry into the next field since shared memory ends below 256 KB. (Adding to the low half only and
// recombining made worse WGMMA issue code and ran slower: BENCHMARKS.md, 2026-11-25.)
__device__ __forceinline__ u64 smem_descriptor_advance(u64 desc, u32 bytes) { return desc + (bytes >> 4); }

// Accumulators of an m64nNk* WGMMA: thread t of the warpgroup holds N/2 floats d[i] of the 64 x N
// tile, at row slab_row() + 8 * ((i / 2) % 2) and column (i / 4) * 8 + (t % 4) * 2 + i % 2.
// slab_row(): the row of this thread's first accumulator inside its warpgroup's 64-row slab (the
// second is 8 rows below).
__device__ __forceinline__ u32 slab_row() { return (warp_id() % 4) * 16 + lane_id() / 4; }

}  // namespace moegemm
