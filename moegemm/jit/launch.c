/*
 * The hot path of every moegemm launch: encode the kernel's TMA descriptors into its parameter
 * block and launch it with cuLaunchKernelEx. Doing this in C keeps a cached launch to one ctypes
 * call; building three tensor maps through Python bindings costs tens of microseconds.
 *
 * The driver is opened with dlopen, so the helper needs no CUDA headers or import library.
 * The few driver types used are declared below with the ABI of cuda.h; compiling with
 * -DMOEGEMM_CHECK_ABI checks them against the real header (tests/test_jit.py does).
 */
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int mg_result;
typedef struct { _Alignas(64) uint64_t opaque[16]; } mg_tensor_map;
typedef struct { uint32_t x, y, z; } mg_dim3;
typedef union { char pad[64]; mg_dim3 cluster; int programmatic; int cooperative; } mg_attr_value;
typedef struct { int id; char pad[4]; mg_attr_value value; } mg_attr;
typedef struct {
    uint32_t grid_x, grid_y, grid_z, block_x, block_y, block_z, smem_bytes;
    void *stream;
    mg_attr *attrs;
    uint32_t num_attrs;
} mg_launch_config;

enum { MG_ATTR_COOPERATIVE = 2, MG_ATTR_CLUSTER_DIMENSION = 4, MG_ATTR_PROGRAMMATIC_SERIALIZATION = 6 };
/* mg_header.flags: programmatic dependent launch; a cooperative launch (every CTA resident at once, or
 * the launch fails: kernels whose CTAs wait on each other). */
enum { MG_FLAG_PDL = 1, MG_FLAG_COOPERATIVE = 2 };
enum { MG_ERROR_INVALID_VALUE = 1, MG_ERROR_NOT_FOUND = 500 };
enum { MG_MAX_PARAM_BYTES = 4096, MG_MAX_TMA_RANK = 3 };

typedef mg_result (*encode_tiled_fn)(mg_tensor_map *, int, uint32_t, void *, const uint64_t *, const uint64_t *,
                                     const uint32_t *, const uint32_t *, int, int, int, int);
typedef mg_result (*launch_ex_fn)(const mg_launch_config *, void *, void **, void **);

/* A launch record, packed once per (kernel, problem shape) by moegemm/jit/runtime.py (struct formats
 * _HEADER and _TMA_SPEC, laid out by its ParamsLayout): header, num_tma TMA specs, then the parameter
 * block. Device pointers change from call to call, so they are not in the record but passed to
 * mg_launch as the kernel's operands, in the order of its ParamsLayout: each TMA spec and each
 * pointer member of the parameter block names the operand whose address it takes. */
enum { MG_MAX_PARAM_POINTERS = 6, MG_MAX_POINTERS = 12 };
typedef struct {
    uint64_t function;
    uint32_t grid[3], block[3], cluster[3];
    uint32_t smem_bytes, flags, num_tma, params_bytes, num_param_pointers;
    uint32_t param_pointer_offsets[MG_MAX_PARAM_POINTERS];
    uint32_t param_pointer_operands[MG_MAX_PARAM_POINTERS];
} mg_header;

typedef struct {
    uint64_t dims[MG_MAX_TMA_RANK];    /* elements, innermost first */
    uint64_t strides[MG_MAX_TMA_RANK]; /* bytes, of dims 1..rank-1; strides[rank-1..] unused */
    uint32_t box[MG_MAX_TMA_RANK];
    uint32_t rank, dtype, swizzle;
    uint32_t offset;  /* of the descriptor in the parameter block */
    uint32_t operand; /* whose address the descriptor takes */
} mg_tma_spec;

_Static_assert(sizeof(mg_header) == 112, "record header layout");
_Static_assert(sizeof(mg_tma_spec) == 80, "record TMA spec layout");

static encode_tiled_fn encode_tiled;
static launch_ex_fn launch_ex;

/* Encoded descriptors by (spec, global address): a descriptor is a pure function of the two, and the
 * weights' and reused buffers' addresses repeat from call to call, so most launches encode nothing.
 * Direct-mapped, per thread (ctypes drops the GIL during the call). */
enum { MG_TMA_CACHE_SIZE = 64 };
typedef struct {
    unsigned char spec[sizeof(mg_tma_spec)];
    uint64_t address;
    int valid;
    mg_tensor_map map;
} mg_tma_cache_entry;
static _Thread_local mg_tma_cache_entry tma_cache[MG_TMA_CACHE_SIZE];

static mg_result encode_cached(mg_tensor_map *out, const mg_tma_spec *spec, uint64_t address) {
    uint64_t h = (address >> 4) * 0x9E3779B97F4A7C15ull;
    h ^= (spec->dims[0] * 31 + spec->dims[1]) * 0xC2B2AE3D27D4EB4Full + spec->box[0] * 131 + spec->box[1];
    mg_tma_cache_entry *entry = &tma_cache[(h >> 32) % MG_TMA_CACHE_SIZE];
    if (entry->valid && entry->address == address && memcmp(entry->spec, spec, sizeof entry->spec) == 0) {
        memcpy(out, &entry->map, sizeof *out);
        return 0;
    }
    static const uint32_t unit_strides[MG_MAX_TMA_RANK] = {1, 1, 1};
    /* L2 promotion 256B (3), no interleave (0), out-of-bounds elements read as zero (0). */
    mg_result err = encode_tiled(out, (int)spec->dtype, spec->rank, (void *)(uintptr_t)address, spec->dims,
                                 spec->strides, spec->box, unit_strides, 0, (int)spec->swizzle, 3, 0);
    if (err == 0) {
        memcpy(entry->spec, spec, sizeof entry->spec);
        entry->address = address;
        memcpy(&entry->map, out, sizeof *out);
        entry->valid = 1;
    }
    return err;
}

int mg_init(void) {
    void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!driver) return -1;
    encode_tiled = (encode_tiled_fn)dlsym(driver, "cuTensorMapEncodeTiled");
    launch_ex = (launch_ex_fn)dlsym(driver, "cuLaunchKernelEx");
    return encode_tiled && launch_ex ? 0 : -2;
}

/* Returns a CUresult. When a TMA descriptor is the cause, its index goes to *failed_tma. */
/* `dynamic` holds what changes from call to call: the stream, then MG_MAX_POINTERS operand addresses (unused ones 0).
 * One bytes argument converts faster in ctypes than seven integers. */
int mg_launch(const unsigned char *record, const unsigned char *dynamic, int *failed_tma) {
    uint64_t stream, pointers[MG_MAX_POINTERS];
    memcpy(&stream, dynamic, 8);
    memcpy(pointers, dynamic + 8, sizeof pointers);
    mg_header header;
    memcpy(&header, record, sizeof header);
    if (header.params_bytes > MG_MAX_PARAM_BYTES || header.num_param_pointers > MG_MAX_PARAM_POINTERS)
        return MG_ERROR_INVALID_VALUE;
    _Alignas(64) unsigned char params[MG_MAX_PARAM_BYTES];
    const unsigned char *specs = record + sizeof header;
    memcpy(params, specs + header.num_tma * sizeof(mg_tma_spec), header.params_bytes);
    for (uint32_t i = 0; i < header.num_param_pointers; ++i) {
        if (header.param_pointer_offsets[i] % 8 || header.param_pointer_offsets[i] + 8 > header.params_bytes ||
            header.param_pointer_operands[i] >= MG_MAX_POINTERS)
            return MG_ERROR_INVALID_VALUE;
        memcpy(params + header.param_pointer_offsets[i], &pointers[header.param_pointer_operands[i]], 8);
    }

    for (uint32_t i = 0; i < header.num_tma; ++i) {
        mg_tma_spec spec;
        memcpy(&spec, specs + i * sizeof spec, sizeof spec);
        if (spec.offset % 64 || spec.offset + sizeof(mg_tensor_map) > header.params_bytes ||
            spec.rank < 1 || spec.rank > MG_MAX_TMA_RANK || spec.operand >= MG_MAX_POINTERS) {
            *failed_tma = (int)i;
            return MG_ERROR_INVALID_VALUE;
        }
        mg_result err = encode_cached((mg_tensor_map *)(params + spec.offset), &spec, pointers[spec.operand]);
        if (err) {
            *failed_tma = (int)i;
            return err;
        }
    }

    mg_attr attrs[3];
    uint32_t num_attrs = 0;
    memset(attrs, 0, sizeof attrs);
    if (header.cluster[0] * header.cluster[1] * header.cluster[2] > 1) {
        attrs[num_attrs].id = MG_ATTR_CLUSTER_DIMENSION;
        attrs[num_attrs].value.cluster = (mg_dim3){header.cluster[0], header.cluster[1], header.cluster[2]};
        ++num_attrs;
    }
    if (header.flags & MG_FLAG_PDL) {
        attrs[num_attrs].id = MG_ATTR_PROGRAMMATIC_SERIALIZATION;
        attrs[num_attrs].value.programmatic = 1;
        ++num_attrs;
    }
    if (header.flags & MG_FLAG_COOPERATIVE) {
        attrs[num_attrs].id = MG_ATTR_COOPERATIVE;
        attrs[num_attrs].value.cooperative = 1;
        ++num_attrs;
    }
    mg_launch_config config = {header.grid[0], header.grid[1],  header.grid[2],   header.block[0],
                               header.block[1], header.block[2], header.smem_bytes, (void *)(uintptr_t)stream,
                               attrs,           num_attrs};
    void *args[1] = {params};
    return launch_ex(&config, (void *)(uintptr_t)header.function, args, NULL);
}

#ifdef MOEGEMM_CHECK_ABI
#include <cuda.h>
_Static_assert(sizeof(mg_tensor_map) == sizeof(CUtensorMap), "CUtensorMap");
_Static_assert(sizeof(mg_attr) == sizeof(CUlaunchAttribute), "CUlaunchAttribute");
_Static_assert(offsetof(mg_attr, value) == offsetof(CUlaunchAttribute, value), "CUlaunchAttribute.value");
_Static_assert(sizeof(mg_launch_config) == sizeof(CUlaunchConfig), "CUlaunchConfig");
_Static_assert(offsetof(mg_launch_config, stream) == offsetof(CUlaunchConfig, hStream), "hStream");
_Static_assert(offsetof(mg_launch_config, num_attrs) == offsetof(CUlaunchConfig, numAttrs), "numAttrs");
_Static_assert(MG_ATTR_CLUSTER_DIMENSION == (int)CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, "cluster attribute");
_Static_assert(MG_ATTR_COOPERATIVE == (int)CU_LAUNCH_ATTRIBUTE_COOPERATIVE, "cooperative attribute");
_Static_assert(MG_ATTR_PROGRAMMATIC_SERIALIZATION == (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
               "programmatic attribute");
_Static_assert(CU_TENSOR_MAP_L2_PROMOTION_L2_256B == 3, "L2 promotion");
_Static_assert(CU_TENSOR_MAP_DATA_TYPE_UINT8 == 0 && CU_TENSOR_MAP_DATA_TYPE_FLOAT32 == 7 &&
                   CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 == 9, "tensor map data types");
_Static_assert(CU_TENSOR_MAP_SWIZZLE_128B == 3, "swizzle");
#endif
