// Writes into the resident item table.
//
// scatter_rows_*: one launch applies a batch of item writes (upserts, deletes,
//   appended rows): row r of the batch sets table row rows[r] to src[r]
//   (converted to the table dtype, padding columns zeroed), its live flag and
//   its id. Rows in one batch are distinct (the host dedups them).
// scatter_attrs: the same batch's integer attributes: row r sets
//   attrs[a][rows[r]] to vals[r][a] for each of the catalogue's attributes.
// fill_uniform_*, fill_u8, iota_u64: device-side filling of synthetic tables
//   for `rankd gpu-check`, so a 10M-row benchmark table needs no host upload.

template <class D>
__device__ void scatter_rows(typename D::T* __restrict__ table, u32 ld, u32 d,
                             const u32* __restrict__ rows, const float* __restrict__ src,
                             u32 m, u8* __restrict__ live, const u8* __restrict__ live_vals,
                             u64* __restrict__ ids, const u64* __restrict__ id_vals) {
    const size_t n = (size_t)m * ld;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const u32 r = (u32)(i / ld);
        const u32 c = (u32)(i % ld);
        const size_t row = rows[r];
        table[row * ld + c] = D::put(c < d ? src[(size_t)r * d + c] : 0.0f);
        if (c == 0) {
            live[row] = live_vals[r];
            ids[row] = id_vals[r];
        }
    }
}

// A stateless hash (splitmix64 finaliser) so any element can be filled
// independently of the others.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Uniform values in [-scale, scale) in the first d columns, zeros in padding.
template <class D>
__device__ void fill_uniform(typename D::T* __restrict__ table, u32 ld, u32 d, u64 rows,
                             u64 seed, float scale) {
    const u64 n = rows * ld;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const u32 c = (u32)(i % ld);
        float v = 0.0f;
        if (c < d) {
            const u64 h = mix64(seed ^ (i * 0x9e3779b97f4a7c15ull));
            v = ((float)(h >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale;
        }
        table[i] = D::put(v);
    }
}

#define RANKD_SCATTER(NAME, D)                                                            \
    extern "C" __global__ void scatter_rows_##NAME(D::T* table, u32 ld, u32 d,            \
                                                   const u32* rows, const float* src,     \
                                                   u32 m, u8* live, const u8* live_vals,  \
                                                   u64* ids, const u64* id_vals) {        \
        scatter_rows<D>(table, ld, d, rows, src, m, live, live_vals, ids, id_vals);       \
    }                                                                                     \
    extern "C" __global__ void fill_uniform_##NAME(D::T* table, u32 ld, u32 d, u64 rows,  \
                                                   u64 seed, float scale) {               \
        fill_uniform<D>(table, ld, d, rows, seed, scale);                                 \
    }

RANKD_SCATTER(f32, DtF32)
RANKD_SCATTER(f16, DtF16)
RANKD_SCATTER(bf16, DtBf16)

extern "C" __global__ void fill_u8(u8* __restrict__ p, u64 n, u32 value) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        p[i] = (u8)value;
    }
}

extern "C" __global__ void iota_u64(u64* __restrict__ p, u64 n, u64 start) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        p[i] = start + i;
    }
}

extern "C" __global__ void scatter_attrs(long long* __restrict__ attrs, u64 attr_ld, u32 n_attrs,
                                         const u32* __restrict__ rows,
                                         const long long* __restrict__ vals, u32 m) {
    const u64 n = (u64)m * n_attrs;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / n_attrs;
        const u64 a = i % n_attrs;
        attrs[a * attr_ld + rows[r]] = vals[i];
    }
}
