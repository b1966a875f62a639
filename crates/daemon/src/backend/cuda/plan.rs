//! Host-side planning and packing for the CUDA kernels: launch shapes and
//! shared-memory layouts of the fused top-k, the CSR arrays a batch is
//! uploaded as, and decoding of the kernels' (key, row) candidates. Nothing
//! here touches the device, so all of it is unit-tested on any machine.

use crate::backend::{ModelDesc, Output, Query, Scored, Task};

/// Table rows per step of the fused kernel (`TILE` in score_topk.cu).
pub const TILE: usize = 64;
/// Embedding elements per step (`DK` in score_topk.cu).
pub const DK: usize = 64;
/// Steps of the table buffered per block (`STAGES` in score_topk.cu).
pub const STAGES: usize = 3;
/// Threads per block of every top-k kernel (`THREADS` in score_topk.cu).
pub const THREADS: usize = 256;
/// Most queries one block of the fused kernel scores (`QSPLIT · QPT`).
pub const MAX_GROUP: usize = 32;
/// Row of an empty candidate slot.
pub const NONE_ROW: u32 = u32::MAX;
/// Largest `k` the device path takes; larger requests are refused with a
/// reason rather than silently truncated.
pub const MAX_K: usize = 4096;

/// Maps a score to an i32 whose signed order is `f32::total_cmp`'s (the
/// CPU's order); the map is its own inverse. Same as `order_key` on device.
pub fn order_key(s: f32) -> i32 {
    let i = s.to_bits() as i32;
    i ^ ((i >> 31) & 0x7fff_ffff)
}

pub fn key_score(k: i32) -> f32 {
    f32::from_bits((k ^ ((k >> 31) & 0x7fff_ffff)) as u32)
}

/// Row stride of the device table: rows are padded with zeros to a multiple
/// of 8 elements so every row starts 16-byte aligned in every dtype.
pub fn padded_dim(d: usize) -> usize {
    d.div_ceil(8).max(1) * 8
}

/// Why the fused top-k cannot run a request on this device (or at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("k must be <= {MAX_K} on the GPU, got {k}", MAX_K = MAX_K)]
    KTooLarge { k: usize },
    #[error("item tables of {rows} rows are beyond the GPU kernels' 2^31 limit")]
    TableTooLarge { rows: usize },
    #[error(
        "k = {k} at dim {ld} needs {needs} bytes of shared memory per block, this GPU allows {allows}"
    )]
    SharedMemory {
        k: usize,
        ld: usize,
        needs: usize,
        allows: usize,
    },
    #[error("k = {k} needs {needs} bytes of shared memory to merge, this GPU allows {allows}")]
    MergeSharedMemory {
        k: usize,
        needs: usize,
        allows: usize,
    },
}

/// A batch that names something outside the model or its table: on the
/// device it would read out of bounds, so it is refused before upload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("{what} row {row} is outside the item table of {rows} rows")]
    RowOutOfRange {
        what: &'static str,
        row: u32,
        rows: usize,
    },
    #[error("user features have {got} values, the model takes {want}")]
    FeatureWidth { got: usize, want: usize },
    #[error("a filter names attribute {attribute}, the device table has {attributes}")]
    FilterAttribute { attribute: usize, attributes: usize },
}

/// What the fused kernel's launch shape depends on.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    pub sms: usize,
    /// Largest dynamic shared memory one block may opt in to.
    pub smem_optin: usize,
    pub smem_per_sm: usize,
}

/// Launch shape of one fused top-k call (partial kernel, then merge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopkPlan {
    /// Queries per block and number of query groups (grid.x).
    pub group: usize,
    pub groups: usize,
    /// Kept-list length per query (a power of two >= kmax, >= 2·TILE).
    pub kps: usize,
    /// Rows per block and number of row chunks (grid.y).
    pub chunk_rows: usize,
    pub chunks: usize,
    pub partial_smem: usize,
    pub merge_kps: usize,
    pub merge_smem: usize,
    pub kmax: usize,
    pub nq: usize,
}

impl TopkPlan {
    /// Entries of the partial kernel's output, [nq][chunks][kmax].
    pub fn partial_len(&self) -> usize {
        self.nq * self.chunks * self.kmax
    }
}

/// Dynamic shared memory of the fused kernel; mirrors its layout. The
/// tensor-core kernel (`tc`) keeps its query fragments for the group rounded
/// up to 8 queries (one mma tile) in the same area.
pub fn partial_smem_bytes(
    group: usize,
    ld: usize,
    elem_bytes: usize,
    kps: usize,
    tc: bool,
) -> usize {
    let tile = STAGES * TILE * (DK * elem_bytes + 16);
    let qld = ld.div_ceil(DK) * DK;
    let gq = if tc { group.div_ceil(8) * 8 } else { group };
    tile + gq * qld * 4 + group * 2 * kps * 8 + 7 * group * 4
}

/// `resident(smem)` is how many blocks of the fused kernel with that much
/// dynamic shared memory fit on one SM (the driver's occupancy answer);
/// `tc` plans the tensor-core kernel.
// Every argument is one number the shape depends on.
#[allow(clippy::too_many_arguments)]
pub fn plan_topk(
    n_rows: usize,
    ld: usize,
    elem_bytes: usize,
    nq: usize,
    kmax: usize,
    limits: DeviceLimits,
    resident: &dyn Fn(usize) -> usize,
    tc: bool,
) -> Result<TopkPlan, PlanError> {
    if kmax > MAX_K {
        return Err(PlanError::KTooLarge { k: kmax });
    }
    if n_rows >= i32::MAX as usize {
        return Err(PlanError::TableTooLarge { rows: n_rows });
    }
    let nq = nq.max(1);
    let kps = kmax.max(1).next_power_of_two().max(2 * TILE);
    let smem = |group: usize| partial_smem_bytes(group, ld, elem_bytes, kps, tc);
    // The most queries (up to MAX_GROUP) whose block fits `budget`.
    let fits = |budget: usize| {
        (1..=MAX_GROUP)
            .rev()
            .find(|&g| smem(g) <= budget)
            .unwrap_or(0)
    };
    // Prefer a size that lets two blocks share an SM; fall back to the whole
    // opt-in budget (one block per SM) for large k or dims.
    let two_per_sm = (limits.smem_per_sm / 2)
        .saturating_sub(1024)
        .min(limits.smem_optin);
    let mut group = fits(two_per_sm);
    if group == 0 {
        group = fits(limits.smem_optin);
    }
    if group == 0 {
        return Err(PlanError::SharedMemory {
            k: kmax,
            ld,
            needs: smem(1),
            allows: limits.smem_optin,
        });
    }
    let group = group.min(MAX_GROUP).min(nq);
    let groups = nq.div_ceil(group);
    // Even groups: 33 queries run as 17 + 16, not 32 + 1.
    let group = nq.div_ceil(groups);
    let partial_smem = smem(group);

    // One full wave of equal chunks: every resident block streams the same
    // number of rows, and none waits for a second wave.
    let wave = limits.sms.max(1) * resident(partial_smem).max(1);
    // A chunk much shorter than the kept list would merge more than it scores.
    let min_chunk = (4 * kps).max(1024);
    let chunks = (wave / groups).min(n_rows.div_ceil(min_chunk)).max(1);
    let chunk_rows = (n_rows.div_ceil(chunks).div_ceil(TILE) * TILE).max(TILE);
    let chunks = n_rows.div_ceil(chunk_rows).max(1);

    let merge_kps = kmax.max(1).next_power_of_two().max(2 * THREADS);
    let merge_smem = 2 * merge_kps * 8;
    // The merge kernel also holds a few bytes of static shared memory.
    if merge_smem + 64 > limits.smem_optin {
        return Err(PlanError::MergeSharedMemory {
            k: kmax,
            needs: merge_smem,
            allows: limits.smem_optin,
        });
    }
    Ok(TopkPlan {
        group,
        groups,
        kps,
        chunk_rows,
        chunks,
        partial_smem,
        merge_kps,
        merge_smem,
        kmax,
        nq,
    })
}

/// The row count a batch of `b` queries runs the tower at: the next power
/// of two, so only a handful of GEMM shapes ever occur and all of them are
/// warmed when the model loads.
pub fn bucket(b: usize) -> usize {
    b.max(1).next_power_of_two()
}

/// Batch sizes that together touch every bucket up to `max_batch`: the
/// powers of two below it, then `max_batch` itself.
pub fn warm_sizes(max_batch: usize) -> Vec<usize> {
    let max_batch = max_batch.max(1);
    let mut sizes: Vec<usize> = (0..usize::BITS)
        .map(|i| 1usize << i)
        .take_while(|&b| b < max_batch)
        .collect();
    sizes.push(max_batch);
    sizes
}

/// Element counts of the batch buffers for a model's largest batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSizes {
    pub queries: usize,
    pub hist_rows: usize,
    pub feats: usize,
    /// Embedding-bag output, at the bucketed row count.
    pub xu: usize,
    /// Each tower activation buffer.
    pub act: usize,
    /// Excluded rows: the request's list plus the user's history.
    pub excl_rows: usize,
    /// (query, row) pairs of score tasks.
    pub pairs: usize,
    /// Ranker inputs, [pairs, 3d + fd] (zero for a two-tower model).
    pub rank_x: usize,
    /// Merged top-k entries, [queries, max_k] (zero for a ranker).
    pub topk_out: usize,
    /// Each buffer of a sequence tower, [queries · window, 2d] (zero for
    /// the towers of linear layers), and the window positions.
    pub seq: usize,
    pub seq_rows: usize,
}

/// The buffers every kind sizes alike, from `desc.bounds`: `max_batch`
/// users with their histories, features and exclusions, and the embedding
/// bag's [h ‖ f] output at the bucketed row count. The rest (the tower's
/// activations, pairs, ranker inputs, top-k output, a sequence tower's
/// buffers) are zero: each kind's
/// `batch_sizes` (in `kind/`) fills them in.
pub fn user_sizes(desc: &ModelDesc) -> BatchSizes {
    let z = desc.bounds;
    let (b, d, fd) = (z.max_batch, desc.dim, desc.user_feature_dim);
    BatchSizes {
        queries: b,
        hist_rows: b * z.history_len,
        feats: b * fd,
        xu: bucket(b) * (d + fd),
        act: 0,
        excl_rows: b * (z.max_exclude + z.history_max),
        pairs: 0,
        rank_x: 0,
        topk_out: 0,
        seq: 0,
        seq_rows: 0,
    }
}

/// Histories (CSR) and features of a batch, as `embedding_bag` reads them.
#[derive(Debug, Default, PartialEq)]
pub struct PackedUsers {
    pub hist_off: Vec<u32>,
    pub hist_rows: Vec<u32>,
    /// [B, fd]; zeros for users without features.
    pub feats: Vec<f32>,
}

/// Top-k tasks of a batch: which query vector each uses, its k, its
/// sorted exclusions (CSR) and its filter's clauses (CSR: each clause is
/// (attribute, first value, end value) into `filt_vals`, values sorted).
#[derive(Debug, Default, PartialEq)]
pub struct PackedTopk {
    pub qsel: Vec<u32>,
    pub ks: Vec<u32>,
    pub excl_off: Vec<u32>,
    pub excl_rows: Vec<u32>,
    pub filt_off: Vec<u32>,
    pub clauses: Vec<u32>,
    pub filt_vals: Vec<i64>,
    pub kmax: usize,
}

/// (query, row) pairs of a batch's score tasks, in request order.
#[derive(Debug, Default, PartialEq)]
pub struct PackedPairs {
    pub pair_q: Vec<u32>,
    pub pair_row: Vec<u32>,
}

/// Checks every row and attribute a batch names against the table (`n_rows`
/// rows, `n_attrs` attribute columns): an out-of-range read on the device
/// is an illegal address that poisons the context.
pub fn check_rows(
    queries: &[Query<'_>],
    n_rows: usize,
    n_attrs: usize,
    fd: usize,
) -> Result<(), BatchError> {
    let bad = |what: &'static str, row: u32| BatchError::RowOutOfRange {
        what,
        row,
        rows: n_rows,
    };
    for q in queries {
        if let Some(&r) = q.history.iter().find(|&&r| r as usize >= n_rows) {
            return Err(bad("history", r));
        }
        if let Some(f) = q.features {
            if f.len() != fd {
                return Err(BatchError::FeatureWidth {
                    got: f.len(),
                    want: fd,
                });
            }
        }
        let rows = match q.task {
            Task::TopK {
                exclude, filter, ..
            } => {
                let clauses = filter.map_or(&[][..], |f| f.clauses());
                if let Some(&(a, _)) = clauses.iter().find(|(a, _)| *a >= n_attrs) {
                    return Err(BatchError::FilterAttribute {
                        attribute: a,
                        attributes: n_attrs,
                    });
                }
                exclude
            }
            Task::Score { rows } => rows,
        };
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= n_rows) {
            return Err(bad("candidate", r));
        }
    }
    Ok(())
}

pub fn pack_users(queries: &[Query<'_>], fd: usize) -> PackedUsers {
    let mut p = PackedUsers::default();
    pack_users_into(&mut p, queries, fd);
    p
}

/// `pack_users` into `p`, reusing its memory.
pub fn pack_users_into(p: &mut PackedUsers, queries: &[Query<'_>], fd: usize) {
    p.hist_off.clear();
    p.hist_rows.clear();
    p.feats.clear();
    p.feats.resize(queries.len() * fd, 0.0);
    p.hist_off.push(0);
    for (i, q) in queries.iter().enumerate() {
        p.hist_rows.extend_from_slice(q.history);
        p.hist_off.push(p.hist_rows.len() as u32);
        if let Some(f) = q.features {
            p.feats[i * fd..(i + 1) * fd].copy_from_slice(f);
        }
    }
}

pub fn pack_topk(queries: &[Query<'_>]) -> PackedTopk {
    let mut p = PackedTopk::default();
    pack_topk_into(&mut p, queries);
    p
}

/// `pack_topk` into `p`, reusing its memory.
pub fn pack_topk_into(p: &mut PackedTopk, queries: &[Query<'_>]) {
    p.qsel.clear();
    p.ks.clear();
    p.excl_rows.clear();
    p.excl_off.clear();
    p.excl_off.push(0);
    p.filt_off.clear();
    p.filt_off.push(0);
    p.clauses.clear();
    p.filt_vals.clear();
    p.kmax = 0;
    for (i, q) in queries.iter().enumerate() {
        if let Task::TopK {
            k, exclude, filter, ..
        } = q.task
        {
            // The resolved filter's values are sorted and distinct, as the
            // kernel's binary search needs.
            for (a, values) in filter.map_or(&[][..], |f| f.clauses()) {
                let start = p.filt_vals.len() as u32;
                p.filt_vals.extend_from_slice(values);
                p.clauses
                    .extend([*a as u32, start, p.filt_vals.len() as u32]);
            }
            p.filt_off.push((p.clauses.len() / 3) as u32);
            p.qsel.push(i as u32);
            p.ks.push(k as u32);
            p.kmax = p.kmax.max(k);
            if exclude.is_sorted() {
                p.excl_rows.extend_from_slice(exclude);
            } else {
                // The kernel binary-searches; the contract says sorted, but a
                // wrong order must not silently skip exclusions.
                let start = p.excl_rows.len();
                p.excl_rows.extend_from_slice(exclude);
                p.excl_rows[start..].sort_unstable();
            }
            p.excl_off.push(p.excl_rows.len() as u32);
        }
    }
}

pub fn pack_pairs(queries: &[Query<'_>]) -> PackedPairs {
    let mut p = PackedPairs::default();
    pack_pairs_into(&mut p, queries);
    p
}

/// `pack_pairs` into `p`, reusing its memory.
pub fn pack_pairs_into(p: &mut PackedPairs, queries: &[Query<'_>]) {
    p.pair_q.clear();
    p.pair_row.clear();
    for (i, q) in queries.iter().enumerate() {
        if let Task::Score { rows } = q.task {
            p.pair_q.extend(std::iter::repeat_n(i as u32, rows.len()));
            p.pair_row.extend_from_slice(rows);
        }
    }
}

/// Turns the merge kernel's output ([nq][kmax] keys and rows, best first)
/// into results; empty slots (fewer eligible items than k) end a list.
pub fn decode_topk(
    keys: &[i32],
    rows: &[u32],
    ks: &[u32],
    kmax: usize,
    ids: &[u64],
) -> Vec<Vec<Scored>> {
    ks.iter()
        .enumerate()
        .map(|(q, &k)| {
            let base = q * kmax;
            (0..k as usize)
                .map(|i| (keys[base + i], rows[base + i]))
                .take_while(|&(_, row)| row != NONE_ROW)
                .map(|(key, row)| Scored {
                    id: ids[row as usize],
                    score: key_score(key),
                })
                .collect()
        })
        .collect()
}

/// Puts top-k lists and pair scores back in request order.
pub fn assemble(queries: &[Query<'_>], topk: Vec<Vec<Scored>>, scores: &[f32]) -> Vec<Output> {
    let mut topk = topk.into_iter();
    let mut at = 0;
    queries
        .iter()
        .map(|q| match q.task {
            Task::TopK { .. } => Output::TopK(topk.next().expect("one list per top-k query")),
            Task::Score { rows } => {
                let s = scores[at..at + rows.len()].to_vec();
                at += rows.len();
                Output::Scores(s)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
