// User-side inputs built on the device from the resident item table.
//
// embedding_bag_*: x[b] = [mean of the history rows' embeddings ‖ features],
//   the two-tower / ranker user input. The sum runs in history order from 0
//   and is then multiplied by 1/len, exactly as the CPU backend does, so with
//   an f32 table the result is bit-identical to the CPU's.
// ranker_inputs_*: one ranker row per (query, candidate) pair,
//   [h ‖ f ‖ e ‖ h⊙e], read from the embedding-bag output and the table.

template <class D>
__device__ void embedding_bag(const typename D::T* __restrict__ table, u32 ld, u32 d,
                              const u32* __restrict__ hist_off,
                              const u32* __restrict__ hist_rows,
                              const float* __restrict__ feats, u32 fd,
                              float* __restrict__ x) {
    const u32 b = blockIdx.x;
    const u32 width = d + fd;
    const u32 lo = hist_off[b];
    const u32 hi = hist_off[b + 1];
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (u32 h = lo; h < hi; ++h) {
            acc += D::get(table, (size_t)hist_rows[h] * ld + c);
        }
        if (hi > lo) {
            const float inv = 1.0f / (float)(hi - lo);
            acc *= inv;
        }
        x[(size_t)b * width + c] = acc;
    }
    for (u32 c = threadIdx.x; c < fd; c += blockDim.x) {
        x[(size_t)b * width + d + c] = feats[(size_t)b * fd + c];
    }
}

template <class D>
__device__ void ranker_inputs(const typename D::T* __restrict__ table, u32 ld, u32 d,
                              const float* __restrict__ xu, u32 fd,
                              const u32* __restrict__ pair_q,
                              const u32* __restrict__ pair_row,
                              float* __restrict__ x) {
    const u32 p = blockIdx.x;
    const u32 width = 3 * d + fd;
    const u32 uwidth = d + fd;
    const float* u = xu + (size_t)pair_q[p] * uwidth;
    const size_t row = pair_row[p];
    float* out = x + (size_t)p * width;
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        const float h = u[c];
        const float e = D::get(table, row * ld + c);
        out[c] = h;
        out[d + fd + c] = e;
        out[2 * d + fd + c] = h * e;
    }
    for (u32 c = threadIdx.x; c < fd; c += blockDim.x) {
        out[d + c] = u[d + c];
    }
}

#define RANKD_EMBEDDING_BAG(NAME, D)                                                      \
    extern "C" __global__ void embedding_bag_##NAME(                                      \
        const D::T* table, u32 ld, u32 d, const u32* hist_off, const u32* hist_rows,      \
        const float* feats, u32 fd, float* x) {                                           \
        embedding_bag<D>(table, ld, d, hist_off, hist_rows, feats, fd, x);                \
    }                                                                                     \
    extern "C" __global__ void ranker_inputs_##NAME(                                      \
        const D::T* table, u32 ld, u32 d, const float* xu, u32 fd, const u32* pair_q,     \
        const u32* pair_row, float* x) {                                                  \
        ranker_inputs<D>(table, ld, d, xu, fd, pair_q, pair_row, x);                      \
    }

RANKD_EMBEDDING_BAG(f32, DtF32)
RANKD_EMBEDDING_BAG(f16, DtF16)
RANKD_EMBEDDING_BAG(bf16, DtBf16)
