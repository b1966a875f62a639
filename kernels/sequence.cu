// The sequential (sasrec) tower's kernels; its projections and feed-forward
// layers are cuBLAS SGEMMs followed by bias_act, as every tower layer is.
//
// sasrec_inputs_*: x[w·L + t] = E[row]·scale + P[t + 1] for a window row that
//   holds an item, padding·scale + P[0] for one that does not (row RANKD_NONE).
// layer_norm: each d-wide row in two passes (mean, then the variance of the
//   centred values, as PyTorch computes it), in place or into `out`.
// attention: one block per (query row, head): the logits of the keys the row
//   sees (causal: positions 0..=t of its window; last: the whole window for
//   the window's last position), their softmax, and the weighted values.
// add_f32, copy_f32, last_rows: residual adds, copies, and the last row of
//   each window.

__device__ __forceinline__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, o);
    }
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    const u32 warps = (blockDim.x + 31u) >> 5;
    float total = 0.0f;
    for (u32 i = 0; i < warps; ++i) {
        total += red[i];
    }
    return total;
}

__device__ __forceinline__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    }
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    const u32 warps = (blockDim.x + 31u) >> 5;
    float m = red[0];
    for (u32 i = 1; i < warps; ++i) {
        m = fmaxf(m, red[i]);
    }
    return m;
}

template <class D>
__device__ void sasrec_inputs(const typename D::T* __restrict__ table, u32 ld, u32 d,
                              const u32* __restrict__ rows, u32 len,
                              const float* __restrict__ padding,
                              const float* __restrict__ pos, float scale,
                              float* __restrict__ x) {
    const u32 i = blockIdx.x;
    const u32 t = i % len;
    const u32 r = rows[i];
    const u32 p = r == RANKD_NONE ? 0u : t + 1u;
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        const float e = r == RANKD_NONE ? padding[c] : D::get(table, (size_t)r * ld + c);
        x[(size_t)i * d + c] = e * scale + pos[(size_t)p * d + c];
    }
}

#define RANKD_SASREC_INPUTS(NAME, D)                                                      \
    extern "C" __global__ void sasrec_inputs_##NAME(                                      \
        const D::T* table, u32 ld, u32 d, const u32* rows, u32 len, const float* padding, \
        const float* pos, float scale, float* x) {                                        \
        sasrec_inputs<D>(table, ld, d, rows, len, padding, pos, scale, x);                \
    }

RANKD_SASREC_INPUTS(f32, DtF32)
RANKD_SASREC_INPUTS(f16, DtF16)
RANKD_SASREC_INPUTS(bf16, DtBf16)

extern "C" __global__ void layer_norm(const float* x, float* out, u32 d,
                                      const float* __restrict__ w,
                                      const float* __restrict__ b, float eps) {
    __shared__ float red[32];
    const float* row = x + (size_t)blockIdx.x * d;
    float* dst = out + (size_t)blockIdx.x * d;
    float s = 0.0f;
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        s += row[c];
    }
    const float mean = block_sum(s, red) / (float)d;
    float v = 0.0f;
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        const float z = row[c] - mean;
        v += z * z;
    }
    const float inv = rsqrtf(block_sum(v, red) / (float)d + eps);
    // Every thread has read its values (the sums above synchronised the
    // block), so `out` may be `x`.
    __syncthreads();
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = (row[c] - mean) * inv * w[c] + b[c];
    }
}

// q: [rows, d]; kv: [windows·len, 2d] (keys, then values); out: [rows, d].
// last == 0: row i is position i % len of window i / len; else row i is the
// last position of window i. Dynamic shared memory: len floats.
extern "C" __global__ void attention(const float* __restrict__ q,
                                     const float* __restrict__ kv,
                                     float* __restrict__ out, u32 len, u32 d,
                                     u32 heads, u32 last) {
    extern __shared__ float p[];
    __shared__ float red[32];
    const u32 i = blockIdx.x, h = blockIdx.y;
    const u32 dh = d / heads;
    const u32 w = last ? i : i / len;
    const u32 t = last ? len - 1u : i % len;
    const u32 seen = t + 1u;
    const float* qv = q + (size_t)i * d + h * dh;
    const float* win = kv + (size_t)w * len * 2u * d;
    const float scale = rsqrtf((float)dh);
    float m = -3.402823466e38f;
    for (u32 s = threadIdx.x; s < seen; s += blockDim.x) {
        const float* k = win + (size_t)s * 2u * d + h * dh;
        float dot = 0.0f;
        for (u32 c = 0; c < dh; ++c) {
            dot += qv[c] * k[c];
        }
        p[s] = dot * scale;
        m = fmaxf(m, p[s]);
    }
    const float max = block_max(m, red);
    float z = 0.0f;
    for (u32 s = threadIdx.x; s < seen; s += blockDim.x) {
        p[s] = expf(p[s] - max);
        z += p[s];
    }
    const float total = block_sum(z, red);
    __syncthreads();
    const float inv = 1.0f / total;
    for (u32 c = threadIdx.x; c < dh; c += blockDim.x) {
        float acc = 0.0f;
        for (u32 s = 0; s < seen; ++s) {
            acc += p[s] * win[(size_t)s * 2u * d + d + h * dh + c];
        }
        out[(size_t)i * d + h * dh + c] = acc * inv;
    }
}

extern "C" __global__ void add_f32(float* __restrict__ y, const float* __restrict__ x, u32 n) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        y[i] += x[i];
    }
}

extern "C" __global__ void copy_f32(const float* __restrict__ x, float* __restrict__ y, u32 n) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        y[i] = x[i];
    }
}

// out[w] = x[w·len + len − 1], d wide.
extern "C" __global__ void last_rows(const float* __restrict__ x, float* __restrict__ out,
                                     u32 len, u32 d) {
    const u32 w = blockIdx.x;
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        out[(size_t)w * d + c] = x[((size_t)w * len + len - 1u) * d + c];
    }
}
