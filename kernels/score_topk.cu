// Retrieval scoring on the device.
//
// score_topk_partial_*: the fused kernel. Block (g, c) scores row chunk c of
//   the item table against query group g (up to 32 query vectors held in
//   shared memory), streaming the chunk once through shared memory in steps
//   of 64 rows × 64 elements (asynchronous copies keep the next steps in
//   flight while one is scored), and keeps each query's best candidates in
//   shared memory: rows at or above the query's current k-th best key are
//   appended to a staging half, which is merged into the kept half by a
//   block-wide bitonic sort once it could overflow. The chunk's top-k per
//   query is written as (key, row) candidates; the B×N score matrix never
//   exists. Consecutive blocks are the groups of one chunk, so when a batch
//   needs several groups they read the chunk while it is in L2.
// score_topk_partial_tc_bf16: the same kernel for bf16 tables with the
//   scores on tensor cores (mma.sync m16n8k16, sm_80+): each warp computes
//   16 rows × 8 queries tiles of the 64-row step. The f32 query is split into
//   two bf16 terms (hi = bf16(q), lo = bf16(q - hi)), both multiplied with the
//   exact bf16 table values and accumulated in f32, so scores stay within
//   ~1e-5 of the f32 dot product relative to sum |q_i x_i| (|q - hi - lo| <=
//   2^-17 |q|) while
//   the multiply-adds leave the CUDA cores, which at batch 32 would otherwise
//   bound the kernel before memory does.
// topk_merge: one block per query merges the chunks' candidates into the
//   final top-k, with the same staging/sort machinery.
// topk_dense_partial: top-k over an already materialised score matrix; only
//   `rankd gpu-check` uses it, as the "GEMM, then top-k" baseline.
// score_rows_*: one dot product per (query, row) pair, for score requests.
//
// Filters: a recommend's filter arrives as clauses (attribute, values) over
//   the catalogue's integer attribute columns resident beside the table
//   ([attribute][attr_ld] i64); a row that fails a clause never enters its
//   query's candidates, exactly like an excluded row. Attribute columns are
//   read only for rows that would otherwise enter (score at or above the
//   threshold, not excluded).
//
// Order: scores compare by their IEEE total order (the CPU's f32::total_cmp)
// through an order-preserving map to i32 keys, and equal keys by the smaller
// item id (ids[] on the device). NaN scores never enter, as on the CPU.

#define TILE 64      // table rows per step
#define DK 64        // embedding elements per step
#define STAGES 3     // steps of the table in flight or in use per block
#define THREADS 256  // threads per block of every kernel here
#define QSPLIT 4     // THREADS / TILE: each row is scored by 4 threads...
#define QPT 8        // ...each for up to 8 of the group's (at most 32) queries

// Dynamic shared memory of every kernel here (one declaration: NVRTC warns
// when kernels redeclare it).
extern __shared__ uint4 smem[];

// Maps a float to an i32 whose signed order is f32::total_cmp's order; the
// map is its own inverse.
__device__ __forceinline__ int order_key(float s) {
    const int i = __float_as_int(s);
    return i ^ ((i >> 31) & 0x7fffffff);
}

// True when candidate a ranks strictly before b.
__device__ __forceinline__ bool ranks_before(int ka, u32 ra, int kb, u32 rb,
                                             const u64* __restrict__ ids) {
    if (ka != kb) return ka > kb;
    if (ra == rb || ra == RANKD_NONE) return false;
    if (rb == RANKD_NONE) return true;
    return ids[ra] < ids[rb];
}

// Sorts key/row[0..n) best first; n is a power of two; the whole block calls.
__device__ __forceinline__ void block_sort(int* key, u32* row, u32 n, const u64* __restrict__ ids) {
    for (u32 size = 2; size <= n; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 i = threadIdx.x; i < (n >> 1); i += blockDim.x) {
                const u32 lo = 2 * i - (i & (stride - 1));
                const u32 hi = lo + stride;
                const int ka = key[lo], kb = key[hi];
                const u32 ra = row[lo], rb = row[hi];
                const bool best_first = (lo & size) == 0;
                const bool swap = best_first ? ranks_before(kb, rb, ka, ra, ids)
                                             : ranks_before(ka, ra, kb, rb, ids);
                if (swap) {
                    key[lo] = kb;
                    key[hi] = ka;
                    row[lo] = rb;
                    row[hi] = ra;
                }
            }
            __syncthreads();
        }
    }
}

// One query's candidate buffer is key/row[0..2·kps): the kept list (sorted,
// best first) then the staging half holding `*cnt` unsorted entries. Merges
// them and sets the admission threshold to the k-th best key so far (or
// "admit all" while fewer than k are known). The whole block calls.
__device__ __forceinline__ void flush_query(int* key, u32* row, int* cnt, int* thresh, u32 k, u32 kps,
                            const u64* __restrict__ ids) {
    const u32 c = (u32)*cnt;
    for (u32 i = kps + c + threadIdx.x; i < 2 * kps; i += blockDim.x) {
        key[i] = RANKD_KEY_MIN;
        row[i] = RANKD_NONE;
    }
    __syncthreads();
    block_sort(key, row, 2 * kps, ids);
    if (threadIdx.x == 0) {
        *cnt = 0;
        *thresh = k == 0 ? RANKD_KEY_MAX
                         : (row[k - 1] == RANKD_NONE ? RANKD_KEY_MIN : key[k - 1]);
    }
    __syncthreads();
}

#if __CUDA_ARCH__ >= 800
// d += a · b for one 16 × 8 × 16 tile: a holds 16 table rows × 16 elements,
// b 16 elements × 8 queries, both bf16 pairs in the PTX fragment layout.
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

__device__ __forceinline__ u32 pack_bf16(u16 lo_elem, u16 hi_elem) {
    return (u32)lo_elem | ((u32)hi_elem << 16);
}

__device__ __forceinline__ bool excluded(const u32* __restrict__ ex, u32 lo, u32 hi, u32 row) {
    while (lo < hi) {
        const u32 mid = (lo + hi) >> 1;
        const u32 v = ex[mid];
        if (v == row) return true;
        if (v < row) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return false;
}

// Whether row `row` passes clauses [lo, hi) of `clauses` (attribute,
// first value, end value as u32 triples): its value of each clause's
// attribute is one of that clause's sorted values in `vals`.
__device__ __forceinline__ bool passes(const long long* __restrict__ attrs, u64 attr_ld,
                                       const u32* __restrict__ clauses,
                                       const long long* __restrict__ vals, u32 lo, u32 hi,
                                       u32 row) {
    for (u32 c = lo; c < hi; ++c) {
        const long long v = attrs[(size_t)clauses[3 * c] * attr_ld + row];
        u32 a = clauses[3 * c + 1], b = clauses[3 * c + 2];
        bool found = false;
        while (a < b) {
            const u32 mid = (a + b) >> 1;
            const long long x = vals[mid];
            if (x == v) {
                found = true;
                break;
            }
            if (x < v) {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        if (!found) return false;
    }
    return true;
}

// Asynchronous global → shared copies (sm_80+), so several steps of the
// table are in flight while one is scored; older GPUs copy synchronously
// through the same code path. A copy of 0 bytes zero-fills its 16 bytes.
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const u32 saddr = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src),
                 "r"(valid ? 16 : 0));
#else
    *(uint4*)dst = valid ? *(const uint4*)src : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void copy_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most STAGES - 2 of this thread's copy groups are pending.
__device__ __forceinline__ void copy_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
#endif
}

// Starts copying step s (row tile s / nd, element chunk s % nd) of the
// block's rows into `stage`; units outside the rows or the row are zeros.
template <class D, int UPR, int LPT>
__device__ __forceinline__ void issue_step(const typename D::T* __restrict__ table, u32 ld,
                                           u32 rb, u32 re, u32 nd, u32 s, uint4* stage) {
    const u32 t = s / nd;
    const u32 c = s % nd;
#pragma unroll
    for (int i = 0; i < LPT; ++i) {
        const u32 unit = threadIdx.x + i * THREADS;
        const u32 r = unit / UPR;
        const u32 u = unit % UPR;
        const u32 row = rb + t * TILE + r;
        const u32 col = c * DK + u * D::VEC;
        const bool valid = row < re && col < ld;
        const typename D::T* src = valid ? table + (size_t)row * ld + col : table;
        copy16(stage + r * (UPR + 1) + u, src, valid);
    }
}

// TC: scores on tensor cores (bf16 tables only; see the file header).
template <class D, bool TC>
__device__ void score_topk_partial(
    const typename D::T* __restrict__ table, u32 ld, u32 n_rows,
    const u64* __restrict__ ids, const u8* __restrict__ live,
    const float* __restrict__ queries, u32 qdim, const u32* __restrict__ qsel, u32 nq,
    const u32* __restrict__ ks, u32 kps,
    const u32* __restrict__ excl_off, const u32* __restrict__ excl_rows,
    const long long* __restrict__ attrs, u64 attr_ld, const u32* __restrict__ filt_off,
    const u32* __restrict__ clauses, const long long* __restrict__ fvals,
    u32 group, u32 chunk_rows, u32 kmax,
    int* __restrict__ out_key, u32* __restrict__ out_row) {
    typedef typename D::T T;
    const int UPR = DK * (int)sizeof(T) / 16;  // 16-byte units per tile row
    const int ROW_U4 = UPR + 1;                // +16 bytes: conflict-free rows
    const int LPT = TILE * UPR / THREADS;      // units each thread copies per step

    // Layout must match partial_smem_bytes on the host. With TC the query
    // area holds bf16 fragments for a group rounded up to 8 queries (gq).
    uint4* tile = smem;
    float* qv = (float*)(tile + STAGES * TILE * ROW_U4);
    const u32 nd = (ld + DK - 1) / DK;
    const u32 qld = nd * DK;
    const u32 gq = TC ? (group + 7) / 8 * 8 : group;
    int* keys = (int*)(qv + (size_t)gq * qld);
    u32* rows = (u32*)(keys + (size_t)group * 2 * kps);
    int* thresh = (int*)(rows + (size_t)group * 2 * kps);
    int* cnt = thresh + group;
    u32* kq = (u32*)(cnt + group);
    u32* exlo = kq + group;
    u32* exhi = exlo + group;
    u32* flo = exhi + group;
    u32* fhi = flo + group;

    const u32 tid = threadIdx.x;
    const u32 q0 = blockIdx.x * group;
    const u32 qn = min(group, nq - q0);
    const u32 chunk = blockIdx.y;
    const u32 rb = min(n_rows, chunk * chunk_rows);
    const u32 re = min(n_rows, rb + chunk_rows);

    // Query fragments, one uint4 per (chunk c, k16 step kk, query tile nt,
    // lane): for query n = nt·8 + lane/4 and elements e = c·DK + kk·16 +
    // 2·(lane%4) + {0, 1} and e + {8, 9}, the hi pair, the hi pair at +8,
    // the lo pair, the lo pair at +8 (B operands of mma.m16n8k16).
    const u32 ntg = gq / 8;
    if constexpr (TC) {
        uint4* qf = (uint4*)qv;
        for (u32 i = tid; i < nd * 4 * ntg * 32; i += THREADS) {
            const u32 lane = i % 32;
            const u32 nt = (i / 32) % ntg;
            const u32 kk = (i / (32 * ntg)) % 4;
            const u32 c = i / (32 * ntg * 4);
            const u32 n = nt * 8 + lane / 4;
            const u32 e = c * DK + kk * 16 + 2 * (lane % 4);
            const u32 es[4] = {e, e + 1, e + 8, e + 9};
            u16 hi[4], lo[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float v = n < qn && es[j] < qdim
                                    ? queries[(size_t)qsel[q0 + n] * qdim + es[j]]
                                    : 0.0f;
                const bool finite = (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
                hi[j] = f32_to_bf16(v);
                if (finite && (hi[j] & 0x7f80u) == 0x7f80u) {
                    hi[j] = (u16)(__float_as_uint(v) >> 16);  // would round to Inf: truncate
                }
                // Inf and NaN stay whole in hi, as in an f32 product.
                lo[j] = finite ? f32_to_bf16(v - bf16_to_f32(hi[j])) : (u16)0;
            }
            qf[i] = make_uint4(pack_bf16(hi[0], hi[1]), pack_bf16(hi[2], hi[3]),
                               pack_bf16(lo[0], lo[1]), pack_bf16(lo[2], lo[3]));
        }
    } else {
        for (u32 i = tid; i < qn * qld; i += THREADS) {
            const u32 q = i / qld;
            const u32 j = i % qld;
            qv[i] = j < qdim ? queries[(size_t)qsel[q0 + q] * qdim + j] : 0.0f;
        }
    }
    for (u32 i = tid; i < qn * 2 * kps; i += THREADS) {
        keys[i] = RANKD_KEY_MIN;
        rows[i] = RANKD_NONE;
    }
    if (tid < qn) {
        const u32 k = ks[q0 + tid];
        kq[tid] = k;
        cnt[tid] = 0;
        thresh[tid] = k == 0 ? RANKD_KEY_MAX : RANKD_KEY_MIN;
        exlo[tid] = excl_off[q0 + tid];
        exhi[tid] = excl_off[q0 + tid + 1];
        flo[tid] = filt_off[q0 + tid];
        fhi[tid] = filt_off[q0 + tid + 1];
    }
    __syncthreads();

    const u32 r = tid % TILE;
    const u32 qs = tid / TILE;
    const u32 ntiles = (re - rb + TILE - 1) / TILE;
    const u32 steps = ntiles * nd;
    float acc[QPT];
    // Tensor-core tiles of this warp: rows mt·16.., queries nt·8.. for
    // nt = warp/4 + 2j; the 8 warps cover 64 rows × 32 queries.
    const u32 warp = tid / 32;
    const u32 lane = tid % 32;
    const u32 mt = warp % 4;
    const u32 ntn = (qn + 7) / 8;
    float cf[2][4];
    // Prologue: steps 0..STAGES-2 in flight. Every iteration commits one
    // group (empty past the end), so group s is step s.
    for (u32 s = 0; s < STAGES - 1; ++s) {
        if (s < steps) issue_step<D, UPR, LPT>(table, ld, rb, re, nd, s, tile + s * TILE * ROW_U4);
        copy_commit();
    }
    for (u32 s = 0; s < steps; ++s) {
        const u32 t = s / nd;
        const u32 c = s % nd;
        copy_wait();      // this thread's copies of step s have landed
        __syncthreads();  // everyone's have, and step s-1's stage is free
        const u32 next = s + STAGES - 1;
        if (next < steps) {
            issue_step<D, UPR, LPT>(table, ld, rb, re, nd, next, tile + (next % STAGES) * TILE * ROW_U4);
        }
        copy_commit();
        const uint4* cur = tile + (s % STAGES) * TILE * ROW_U4;
        if constexpr (TC) {
#if __CUDA_ARCH__ >= 800
            if (c == 0) {
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int x = 0; x < 4; ++x) cf[j][x] = 0.0f;
            }
            // A fragments: rows mt·16 + lane/4 (+8), element pairs kk·16 +
            // 2·(lane%4) (+8), read as 32-bit words from the padded tile rows
            // (row stride ROW_U4·4 words: conflict-free).
            const u32* cw = (const u32*)cur;
            const u32 rw = ROW_U4 * 4;
            const uint4* qf = (const uint4*)qv;
#pragma unroll
            for (u32 kk = 0; kk < 4; ++kk) {
                const u32 w0 = (mt * 16 + lane / 4) * rw + kk * 8 + lane % 4;
                const u32 a[4] = {cw[w0], cw[w0 + 8 * rw], cw[w0 + 4], cw[w0 + 8 * rw + 4]};
#pragma unroll
                for (u32 j = 0; j < 2; ++j) {
                    const u32 nt = warp / 4 + 2 * j;
                    if (nt < ntn) {  // the same for the whole warp
                        const uint4 b = qf[((c * 4 + kk) * ntg + nt) * 32 + lane];
                        mma_bf16(cf[j], a, b.x, b.y);
                        mma_bf16(cf[j], a, b.z, b.w);
                    }
                }
            }
#else
            __trap();  // the host selects this kernel on sm_80+ only
#endif
        } else {
        if (c == 0) {
#pragma unroll
            for (int i = 0; i < QPT; ++i) acc[i] = 0.0f;
        }
        const uint4* trow = cur + r * ROW_U4;
        const float* qbase = qv + c * DK;
#pragma unroll 2
        for (int u = 0; u < UPR; ++u) {
            float x[D::VEC];
            D::unpack(trow[u], x);
#pragma unroll
            for (int i = 0; i < QPT; ++i) {
                const u32 q = qs + i * QSPLIT;
                if (q < qn) {
                    const float4* w = (const float4*)(qbase + q * qld + u * D::VEC);
#pragma unroll
                    for (int v = 0; v < D::VEC / 4; ++v) {
                        const float4 wv = w[v];
                        acc[i] = fmaf(x[4 * v + 0], wv.x, acc[i]);
                        acc[i] = fmaf(x[4 * v + 1], wv.y, acc[i]);
                        acc[i] = fmaf(x[4 * v + 2], wv.z, acc[i]);
                        acc[i] = fmaf(x[4 * v + 3], wv.w, acc[i]);
                    }
                }
            }
        }
        }
        if (c + 1 < nd) continue;  // the row tile's scores are not complete yet
        if constexpr (TC) {
            // Accumulator fragments (rows lane/4 and +8, queries 2·(lane%4)
            // and +1) to a [TILE][gq + 1] f32 score tile (the +1 spreads a
            // warp's reads of one query over the banks), then each thread's
            // (row, query) scores as the CUDA-core path has them. The tile
            // takes the place of the stage just scored (9,216 bytes >= 64 ·
            // 33 · 4): no copy targets it until the next step's copy, which
            // is issued after the barrier that ends this step.
            __syncthreads();  // every warp has read its A fragments
            float* sc = (float*)cur;
            const u32 sld = gq + 1;
#pragma unroll
            for (u32 j = 0; j < 2; ++j) {
                const u32 nt = warp / 4 + 2 * j;
                if (nt < ntn) {
                    const u32 row0 = mt * 16 + lane / 4;
                    const u32 col = nt * 8 + 2 * (lane % 4);
                    sc[row0 * sld + col] = cf[j][0];
                    sc[row0 * sld + col + 1] = cf[j][1];
                    sc[(row0 + 8) * sld + col] = cf[j][2];
                    sc[(row0 + 8) * sld + col + 1] = cf[j][3];
                }
            }
            __syncthreads();
#pragma unroll
            for (int i = 0; i < QPT; ++i) {
                const u32 q = qs + i * QSPLIT;
                acc[i] = q < qn ? sc[r * sld + q] : 0.0f;
            }
        }

        const u32 row = rb + t * TILE + r;
        if (row < re && live[row]) {
#pragma unroll
            for (int i = 0; i < QPT; ++i) {
                const u32 q = qs + i * QSPLIT;
                if (q < qn) {
                    const float sc = acc[i];
                    const int key = order_key(sc);
                    if (sc == sc && key >= thresh[q] &&
                        !excluded(excl_rows, exlo[q], exhi[q], row) &&
                        passes(attrs, attr_ld, clauses, fvals, flo[q], fhi[q], row)) {
                        const int pos = atomicAdd(&cnt[q], 1);
                        keys[(size_t)q * 2 * kps + kps + pos] = key;
                        rows[(size_t)q * 2 * kps + kps + pos] = row;
                    }
                }
            }
        }
        __syncthreads();
        // A query whose staging half could not take another full tile is merged now.
        for (u32 q = 0; q < qn; ++q) {
            if (cnt[q] > (int)(kps - TILE)) {
                flush_query(keys + (size_t)q * 2 * kps, rows + (size_t)q * 2 * kps, &cnt[q],
                            &thresh[q], kq[q], kps, ids);
            }
        }
    }
    for (u32 q = 0; q < qn; ++q) {
        if (cnt[q] > 0) {
            flush_query(keys + (size_t)q * 2 * kps, rows + (size_t)q * 2 * kps, &cnt[q],
                        &thresh[q], kq[q], kps, ids);
        }
    }
    const u32 nchunks = gridDim.y;
    for (u32 i = tid; i < qn * kmax; i += THREADS) {
        const u32 q = i / kmax;
        const u32 j = i % kmax;
        const size_t o = ((size_t)(q0 + q) * nchunks + chunk) * kmax + j;
        out_key[o] = keys[(size_t)q * 2 * kps + j];
        out_row[o] = rows[(size_t)q * 2 * kps + j];
    }
}

template <class D>
__device__ void score_rows(const typename D::T* __restrict__ table, u32 ld, u32 d,
                           const float* __restrict__ q, const u32* __restrict__ pair_q,
                           const u32* __restrict__ pair_row, u32 np, float* __restrict__ out) {
    const u32 warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u32 lane = threadIdx.x % 32;
    if (warp >= np) return;  // whole warps leave together
    const float* qq = q + (size_t)pair_q[warp] * d;
    const size_t row = pair_row[warp];
    float s = 0.0f;
    for (u32 j = lane; j < d; j += 32) {
        s = fmaf(qq[j], D::get(table, row * ld + j), s);
    }
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_down_sync(0xffffffffu, s, off);
    }
    if (lane == 0) out[warp] = s;
}

#define RANKD_SCORE(NAME, D)                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) score_topk_partial_##NAME(   \
        const D::T* table, u32 ld, u32 n_rows, const u64* ids, const u8* live,            \
        const float* queries, u32 qdim, const u32* qsel, u32 nq, const u32* ks, u32 kps,  \
        const u32* excl_off, const u32* excl_rows, const long long* attrs, u64 attr_ld,   \
        const u32* filt_off, const u32* clauses, const long long* fvals, u32 group,       \
        u32 chunk_rows, u32 kmax, int* out_key, u32* out_row) {                           \
        score_topk_partial<D, false>(table, ld, n_rows, ids, live, queries, qdim, qsel, nq, \
                                     ks, kps, excl_off, excl_rows, attrs, attr_ld,        \
                                     filt_off, clauses, fvals, group, chunk_rows, kmax,   \
                                     out_key, out_row);                                   \
    }                                                                                     \
    extern "C" __global__ void score_rows_##NAME(const D::T* table, u32 ld, u32 d,        \
                                                 const float* q, const u32* pair_q,       \
                                                 const u32* pair_row, u32 np,             \
                                                 float* out) {                            \
        score_rows<D>(table, ld, d, q, pair_q, pair_row, np, out);                        \
    }

RANKD_SCORE(f32, DtF32)
RANKD_SCORE(f16, DtF16)
RANKD_SCORE(bf16, DtBf16)

extern "C" __global__ void __launch_bounds__(THREADS, 2) score_topk_partial_tc_bf16(
    const u16* table, u32 ld, u32 n_rows, const u64* ids, const u8* live, const float* queries,
    u32 qdim, const u32* qsel, u32 nq, const u32* ks, u32 kps, const u32* excl_off,
    const u32* excl_rows, const long long* attrs, u64 attr_ld, const u32* filt_off,
    const u32* clauses, const long long* fvals, u32 group, u32 chunk_rows, u32 kmax,
    int* out_key, u32* out_row) {
    score_topk_partial<DtBf16, true>(table, ld, n_rows, ids, live, queries, qdim, qsel, nq, ks,
                                     kps, excl_off, excl_rows, attrs, attr_ld, filt_off, clauses,
                                     fvals, group, chunk_rows, kmax, out_key, out_row);
}

// Shared layout of the two single-query-per-block kernels below: key/row
// buffers of 2·kps entries in dynamic shared memory. Their launch bounds ask
// for 4 blocks per SM, i.e. up to 64 registers: given the thread count alone,
// ptxas aims at full occupancy (32 registers) and spilled on sm_80.
extern "C" __global__ void __launch_bounds__(THREADS, 4) topk_merge(
    const int* __restrict__ in_key, const u32* __restrict__ in_row, u32 nchunks, u32 kmax,
    const u32* __restrict__ ks, u32 kps, const u64* __restrict__ ids,
    int* __restrict__ out_key, u32* __restrict__ out_row) {
    int* keys = (int*)smem;
    u32* rows = (u32*)(keys + 2 * kps);
    __shared__ int cnt, thresh;
    const u32 q = blockIdx.x;
    const u32 k = ks[q];
    for (u32 i = threadIdx.x; i < 2 * kps; i += THREADS) {
        keys[i] = RANKD_KEY_MIN;
        rows[i] = RANKD_NONE;
    }
    if (threadIdx.x == 0) {
        cnt = 0;
        thresh = k == 0 ? RANKD_KEY_MAX : RANKD_KEY_MIN;
    }
    __syncthreads();
    const size_t total = (size_t)nchunks * k;
    for (size_t base = 0; base < total; base += THREADS) {
        __syncthreads();  // every thread has read `cnt` for the last round's flush test
        const size_t e = base + threadIdx.x;
        if (e < total) {
            const size_t src = ((size_t)q * nchunks + e / k) * kmax + e % k;
            const int key = in_key[src];
            const u32 row = in_row[src];
            if (row != RANKD_NONE && key >= thresh) {
                const int pos = atomicAdd(&cnt, 1);
                keys[kps + pos] = key;
                rows[kps + pos] = row;
            }
        }
        __syncthreads();
        if (cnt > (int)(kps - THREADS)) flush_query(keys, rows, &cnt, &thresh, k, kps, ids);
    }
    if (cnt > 0) flush_query(keys, rows, &cnt, &thresh, k, kps, ids);
    for (u32 i = threadIdx.x; i < k; i += THREADS) {
        out_key[(size_t)q * kmax + i] = keys[i];
        out_row[(size_t)q * kmax + i] = rows[i];
    }
}

// Scores per thread per round of topk_dense_partial: four coalesced loads in
// flight per thread keep the score matrix streaming at memory speed. Its kps
// must be >= 2 · DENSE_ROUND (the host sees to it).
#define DENSE_ROUND (4 * THREADS)

extern "C" __global__ void __launch_bounds__(THREADS, 4) topk_dense_partial(
    const float* __restrict__ scores, u32 n, const u32* __restrict__ ks, u32 kps,
    u32 chunk_rows, u32 kmax, const u64* __restrict__ ids, int* __restrict__ out_key,
    u32* __restrict__ out_row) {
    int* keys = (int*)smem;
    u32* rows = (u32*)(keys + 2 * kps);
    __shared__ int cnt, thresh;
    const u32 chunk = blockIdx.x;
    const u32 q = blockIdx.y;
    const u32 k = ks[q];
    const u32 rb = min(n, chunk * chunk_rows);
    const u32 re = min(n, rb + chunk_rows);
    const float* sq = scores + (size_t)q * n;
    for (u32 i = threadIdx.x; i < 2 * kps; i += THREADS) {
        keys[i] = RANKD_KEY_MIN;
        rows[i] = RANKD_NONE;
    }
    if (threadIdx.x == 0) {
        cnt = 0;
        thresh = k == 0 ? RANKD_KEY_MAX : RANKD_KEY_MIN;
    }
    __syncthreads();
    for (u32 base = rb; base < re; base += DENSE_ROUND) {
        __syncthreads();  // every thread has read `cnt` for the last round's flush test
        const int th = thresh;
        const u32 r0 = base + threadIdx.x;
        const u32 r1 = r0 + THREADS;
        const u32 r2 = r1 + THREADS;
        const u32 r3 = r2 + THREADS;
        // Four independent loads first; rows past the chunk read as NaN,
        // which never enters.
        const float nan = __int_as_float(0x7fffffff);
        const float v0 = r0 < re ? sq[r0] : nan;
        const float v1 = r1 < re ? sq[r1] : nan;
        const float v2 = r2 < re ? sq[r2] : nan;
        const float v3 = r3 < re ? sq[r3] : nan;
        const auto offer = [&](float v, u32 row) {
            const int key = order_key(v);
            if (v == v && key >= th) {
                const int pos = atomicAdd(&cnt, 1);
                keys[kps + pos] = key;
                rows[kps + pos] = row;
            }
        };
        offer(v0, r0);
        offer(v1, r1);
        offer(v2, r2);
        offer(v3, r3);
        __syncthreads();
        if (cnt > (int)(kps - DENSE_ROUND)) flush_query(keys, rows, &cnt, &thresh, k, kps, ids);
    }
    if (cnt > 0) flush_query(keys, rows, &cnt, &thresh, k, kps, ids);
    const u32 nchunks = gridDim.x;
    for (u32 i = threadIdx.x; i < kmax; i += THREADS) {
        const size_t o = ((size_t)q * nchunks + chunk) * kmax + i;
        out_key[o] = keys[i];
        out_row[o] = rows[i];
    }
}
