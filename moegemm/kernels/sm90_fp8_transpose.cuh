// FP8 transpose on sm_90a: out[g] = x[g]^T for x [G, R, C] bytes (e4m3), out [G, C, R] contiguous.
// Hopper's FP8 WGMMA reads K-major operands only, so MN-major FP8 data is transposed once here.
//
// A CTA of 256 threads moves one 128 x 128-byte tile. Warp w reads rows [16 w, 16 w + 16) of it,
// four rows at a time, a lane the 4-byte word at column 4 lane of each (a warp instruction reads
// 128 contiguous bytes of a row); the four words turn into the 4 x 4 transposed bytes by byte
// permutes (word j: column 4 lane + j of the four rows). Those go to shared memory as the tile's
// transposed rows, 32 words each, word index XOR (row / 4) so that a warp's 32 stores (32 rows, one
// word column) hit 32 banks. After the barrier warp w writes transposed rows [16 w, 16 w + 16), a
// lane one word of each: 128 contiguous bytes of out a warp instruction, conflict-free reads.
//
// Needs R and C multiples of 4 and x's base and row pitch 4-byte aligned (the host checks; other
// inputs take the torch path). Words outside the matrix are neither read nor written.
#pragma once
#include <moegemm/ptx.cuh>

namespace moegemm {

struct Fp8TransposeParams {
    const u8* x;     // [G, R, C], unit inner stride
    u8* out;         // [G, C, R] contiguous
    u64 x_pitch;     // bytes between rows of x
    u64 x_batch;     // bytes between matrices of x
    u32 rows, cols;  // R, C
    u32 col_tiles;   // ceil(C / 128); CTA i moves tile (i % col_tiles, (i / col_tiles) % row tiles) of
    u32 matrix_tiles;  // matrix i / matrix_tiles, where matrix_tiles = col_tiles * ceil(R / 128)
};

struct Fp8TransposeConfig {
    static constexpr u32 kTile = 128, kNumThreads = 256, kWords = kTile / 4;
    static constexpr u32 kRowsPerWarp = kTile / (kNumThreads / 32);  // 16
    static constexpr u32 kMinBlocks = 8;  // 2048 threads an SM: loads in flight hide the latency
};

__device__ __forceinline__ void transpose_4x4_bytes(const u32 (&v)[4], u32 (&t)[4]) {
    // v[i] holds row i's bytes 0..3; t[j] gets byte j of rows 0..3.
    const u32 lo01 = __byte_perm(v[0], v[1], 0x5140), hi01 = __byte_perm(v[0], v[1], 0x7362);
    const u32 lo23 = __byte_perm(v[2], v[3], 0x5140), hi23 = __byte_perm(v[2], v[3], 0x7362);
    t[0] = __byte_perm(lo01, lo23, 0x5410);
    t[1] = __byte_perm(lo01, lo23, 0x7632);
    t[2] = __byte_perm(hi01, hi23, 0x5410);
    t[3] = __byte_perm(hi01, hi23, 0x7632);
}

template <class Config>
__device__ __forceinline__ void sm90_fp8_transpose(const Fp8TransposeParams& p) {
    __shared__ u32 tile[Config::kTile][Config::kWords];
    const u32 lane = lane_id(), warp = warp_id();
    const u32 matrix = blockIdx.x / p.matrix_tiles, tile_index = blockIdx.x - matrix * p.matrix_tiles;
    const u32 row_tile = tile_index / p.col_tiles;
    const u32 col0 = (tile_index - row_tile * p.col_tiles) * Config::kTile, row0 = row_tile * Config::kTile;
    const u8* x = p.x + matrix * p.x_batch;
    u8* out = p.out + u64(matrix) * p.rows * p.cols;

    const u32 col = col0 + 4 * lane;
    u32 words[Config::kRowsPerWarp];
#pragma unroll
    for (u32 i = 0; i < Config::kRowsPerWarp; ++i) {
        const u32 row = row0 + warp * Config::kRowsPerWarp + i;
        words[i] = row < p.rows && col < p.cols ? __ldg(reinterpret_cast<const u32*>(x + row * p.x_pitch + col)) : 0u;
    }
#pragma unroll
    for (u32 q = 0; q < Config::kRowsPerWarp / 4; ++q) {
        u32 t[4];
        transpose_4x4_bytes({words[4 * q], words[4 * q + 1], words[4 * q + 2], words[4 * q + 3]}, t);
        const u32 word = warp * (Config::kRowsPerWarp / 4) + q;  // the four source rows' word in a tile row
#pragma unroll
        for (u32 j = 0; j < 4; ++j) tile[4 * lane + j][word ^ lane] = t[j];
    }
    __syncthreads();

    const u32 out_col = row0 + 4 * lane;  // a column of out is a row of x
#pragma unroll
    for (u32 i = 0; i < Config::kRowsPerWarp; ++i) {
        const u32 r = warp * Config::kRowsPerWarp + i, out_row = col0 + r;
        const u32 value = tile[r][lane ^ (r / 4)];
        if (out_row < p.cols && out_col < p.rows)
            *reinterpret_cast<u32*>(out + u64(out_row) * p.rows + out_col) = value;
    }
}

}  // namespace moegemm
