//! The launches a batch on the device is made of (each kind's forward pass in
//! `model/kind/<name>/cuda.rs` strings them together), as free functions
//! over borrowed device parts so `rankd gpu-check` can drive each kernel
//! alone against the CPU reference.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::error::{Ctx, GpuError};
use super::kernels::Kernels;
use super::plan::{self, BatchSizes, DeviceLimits, PackedPairs, PackedTopk, PackedUsers, TopkPlan};
use super::staging::{Readback, Staged};
use super::tables::{Buf, DeviceTable, ItemDtype};
use crate::backend::{ModelDesc, Scored};

/// The device parts a launch needs, borrowed from the backend.
pub struct Dev<'a> {
    pub stream: &'a Arc<CudaStream>,
    pub blas: &'a CudaBlas,
    pub k: &'a Kernels,
    pub limits: DeviceLimits,
    /// Score bf16 tables on tensor cores (`score_topk_partial_tc_bf16`).
    pub tc: bool,
}

impl Dev<'_> {
    /// Whether the fused top-k over `table` runs on tensor cores.
    pub fn uses_tc(&self, table: &DeviceTable) -> bool {
        self.tc && table.dtype == ItemDtype::Bf16
    }

    fn topk_kernel(&self, table: &DeviceTable) -> &CudaFunction {
        if self.uses_tc(table) {
            &self.k.topk_partial_tc
        } else {
            &self.k.topk_partial[table.dtype.index()]
        }
    }
}

#[derive(Default)]
pub struct UserBufs {
    hist_off: Staged<u32>,
    hist_rows: Staged<u32>,
    feats: Staged<f32>,
    /// [bucket(B), d + fd] embedding-bag output.
    pub xu: Buf<f32>,
}

#[derive(Default)]
pub struct TopkBufs {
    qsel: Staged<u32>,
    ks: Staged<u32>,
    excl_off: Staged<u32>,
    excl_rows: Staged<u32>,
    filt_off: Staged<u32>,
    clauses: Staged<u32>,
    filt_vals: Staged<i64>,
    pub part_key: Buf<i32>,
    pub part_row: Buf<u32>,
    pub top_key: Buf<i32>,
    pub top_row: Buf<u32>,
    out_key: Readback<i32>,
    out_row: Readback<u32>,
}

#[derive(Default)]
pub struct PairBufs {
    pub(crate) pair_q: Staged<u32>,
    pub(crate) pair_row: Staged<u32>,
    out: Buf<f32>,
    /// [P, 3d + fd] ranker inputs.
    pub(crate) rank_x: Buf<f32>,
    pub(crate) scores: Readback<f32>,
}

/// Batch buffers of a sequence tower (sasrec), each up to B·L·2d floats.
#[derive(Default)]
pub struct SeqBufs {
    pub(crate) rows: Staged<u32>,
    pub(crate) x: Buf<f32>,
    pub(crate) n: Buf<f32>,
    pub(crate) last: Buf<f32>,
    pub(crate) q: Buf<f32>,
    pub(crate) kv: Buf<f32>,
    pub(crate) att: Buf<f32>,
    pub(crate) y: Buf<f32>,
    pub(crate) h: Buf<f32>,
    pub(crate) o: Buf<f32>,
    pub(crate) packed: Vec<u32>,
}

impl SeqBufs {
    /// Room for a batch of `rows` window positions, each buffer `floats`
    /// wide in all (B·L·2d), so serving allocates nothing.
    pub fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        floats: usize,
        rows: usize,
    ) -> Result<(), GpuError> {
        if floats == 0 {
            return Ok(());
        }
        self.rows.reserve(stream, rows)?;
        self.packed.reserve(rows);
        for b in [
            &mut self.x,
            &mut self.n,
            &mut self.last,
            &mut self.q,
            &mut self.kv,
            &mut self.att,
            &mut self.y,
            &mut self.h,
            &mut self.o,
        ] {
            b.reserve(stream, floats)?;
        }
        Ok(())
    }
}

/// A batch's inputs packed on the host, before staging.
#[derive(Default)]
pub struct Packed {
    pub users: PackedUsers,
    pub topk: PackedTopk,
    pub pairs: PackedPairs,
}

/// Batch buffers: sized for a model's largest batch when it is loaded
/// (`reserve_for`), grown only by a batch larger than any seen before.
#[derive(Default)]
pub struct Scratch {
    pub users: UserBufs,
    pub act: [Buf<f32>; 2],
    pub topk: TopkBufs,
    pub pairs: PairBufs,
    /// A sequence tower's buffers (sasrec).
    pub seq: SeqBufs,
    pub(crate) packed: Packed,
}

/// Sizes every batch buffer for `z`, the largest batch `desc` allows (as
/// its kind computes it), so serving that model never allocates (device or
/// page-locked host memory).
pub fn reserve_for(
    dev: &Dev<'_>,
    table: &DeviceTable,
    desc: &ModelDesc,
    z: &BatchSizes,
    s: &mut Scratch,
) -> Result<(), GpuError> {
    if z.queries == 0 {
        return Ok(());
    }
    let st = dev.stream;
    let pk = &mut s.packed;
    pk.users.hist_off.reserve(z.queries + 1);
    pk.users.hist_rows.reserve(z.hist_rows);
    pk.users.feats.reserve(z.feats);
    pk.pairs.pair_q.reserve(z.pairs);
    pk.pairs.pair_row.reserve(z.pairs);
    if z.topk_out > 0 {
        pk.topk.qsel.reserve(z.queries);
        pk.topk.ks.reserve(z.queries);
        pk.topk.excl_off.reserve(z.queries + 1);
        pk.topk.excl_rows.reserve(z.excl_rows);
    }
    s.seq.reserve(st, z.seq, z.seq_rows)?;
    let u = &mut s.users;
    u.hist_off.reserve(st, z.queries + 1)?;
    u.hist_rows.reserve(st, z.hist_rows)?;
    u.feats.reserve(st, z.feats)?;
    u.xu.reserve(st, z.xu)?;
    for a in &mut s.act {
        a.reserve(st, z.act)?;
    }
    let p = &mut s.pairs;
    p.pair_q.reserve(st, z.pairs)?;
    p.pair_row.reserve(st, z.pairs)?;
    p.out.reserve(st, z.pairs)?;
    p.rank_x.reserve(st, z.rank_x)?;
    p.scores.reserve(st, z.pairs)?;
    if z.topk_out > 0 {
        let t = &mut s.topk;
        t.qsel.reserve(st, z.queries)?;
        t.ks.reserve(st, z.queries)?;
        t.excl_off.reserve(st, z.queries + 1)?;
        t.excl_rows.reserve(st, z.excl_rows)?;
        // The partial output is not monotonic in the query count (groups
        // and chunks are rounded), so take the largest over every count. A k
        // this device cannot run is refused per request with the plan's
        // reason; it is no reason to refuse the model.
        let kmax = desc.bounds.max_k.min(plan::MAX_K);
        let partial = (1..=z.queries)
            .filter_map(|nq| topk_plan(dev, table, nq, kmax).ok())
            .map(|p| p.partial_len())
            .max();
        if let Some(len) = partial {
            t.part_key.reserve(st, len)?;
            t.part_row.reserve(st, len)?;
        }
        t.top_key.reserve(st, z.topk_out)?;
        t.top_row.reserve(st, z.topk_out)?;
        t.out_key.reserve(st, z.topk_out)?;
        t.out_row.reserve(st, z.topk_out)?;
    }
    Ok(())
}

/// The fused top-k's launch shape for `nq` queries of up to `kmax` over
/// `table` on this device.
fn topk_plan(
    dev: &Dev<'_>,
    table: &DeviceTable,
    nq: usize,
    kmax: usize,
) -> Result<TopkPlan, GpuError> {
    let f = dev.topk_kernel(table);
    let resident = |smem: usize| {
        f.occupancy_max_active_blocks_per_multiprocessor(plan::THREADS as u32, smem, None)
            .map_or(1, |b| b as usize)
    };
    plan::plan_topk(
        table.rows,
        table.ld,
        table.dtype.bytes(),
        nq,
        kmax,
        dev.limits,
        &resident,
        dev.uses_tc(table),
    )
    .map_err(GpuError::from)
}

pub(crate) fn grid(blocks: usize) -> (u32, u32, u32) {
    (blocks.max(1) as u32, 1, 1)
}

pub fn download<T: DeviceRepr + Clone + Default>(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<T>,
    len: usize,
) -> Result<Vec<T>, GpuError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut out = vec![T::default(); len];
    stream
        .memcpy_dtoh(&src.slice(..len), &mut out)
        .ctx("copying results to the host")?;
    stream.synchronize().ctx("waiting for the batch")?;
    Ok(out)
}

/// x[b] = [mean of history rows ‖ features] for every query, into `u.xu`.
pub fn embedding_bag(
    dev: &Dev<'_>,
    table: &DeviceTable,
    u: &mut UserBufs,
    packed: &PackedUsers,
    fd: usize,
) -> Result<(), GpuError> {
    let b = packed.hist_off.len() - 1;
    u.hist_off.upload(dev.stream, &packed.hist_off)?;
    u.hist_rows.upload(dev.stream, &packed.hist_rows)?;
    u.feats.upload(dev.stream, &packed.feats)?;
    // Rows past `b` up to the bucket are never read back; the tower runs
    // over them so that only bucketed GEMM shapes occur.
    u.xu.reserve(dev.stream, plan::bucket(b) * (table.dim + fd))?;
    if b == 0 {
        return Ok(());
    }
    let (ld, d, fd32) = (table.ld as u32, table.dim as u32, fd as u32);
    let cfg = LaunchConfig {
        grid_dim: grid(b),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches embedding_bag_* in embedding_bag.cu; offsets index
    // hist_rows, whose rows are < table.rows (checked by the caller).
    unsafe {
        dev.stream
            .launch_builder(&dev.k.embedding_bag[table.dtype.index()])
            .arg(&table.emb)
            .arg(&ld)
            .arg(&d)
            .arg(u.hist_off.get())
            .arg(u.hist_rows.get())
            .arg(u.feats.get())
            .arg(&fd32)
            .arg(u.xu.get_mut())
            .launch(cfg)
    }
    .ctx("embedding_bag launch")?;
    Ok(())
}

/// Launches the fused score + top-k over `queries` ([*, qdim] f32, rows
/// picked by `t.qsel`) and the merge; the result stays in `b.top_*`.
pub fn topk_launch(
    dev: &Dev<'_>,
    table: &DeviceTable,
    b: &mut TopkBufs,
    queries: &CudaSlice<f32>,
    qdim: usize,
    t: &PackedTopk,
) -> Result<TopkPlan, GpuError> {
    let nq = t.qsel.len();
    if t.excl_off.len() != nq + 1 || t.filt_off.len() != nq + 1 {
        return Err(GpuError::Invalid(format!(
            "a top-k batch of {nq} queries has {} exclusion and {} filter offsets: this is a bug",
            t.excl_off.len(),
            t.filt_off.len()
        )));
    }
    let f = dev.topk_kernel(table);
    let p = topk_plan(dev, table, nq, t.kmax)?;
    b.qsel.upload(dev.stream, &t.qsel)?;
    b.ks.upload(dev.stream, &t.ks)?;
    b.excl_off.upload(dev.stream, &t.excl_off)?;
    b.excl_rows.upload(dev.stream, &t.excl_rows)?;
    b.filt_off.upload(dev.stream, &t.filt_off)?;
    b.clauses.upload(dev.stream, &t.clauses)?;
    b.filt_vals.upload(dev.stream, &t.filt_vals)?;
    b.part_key.reserve(dev.stream, p.partial_len())?;
    b.part_row.reserve(dev.stream, p.partial_len())?;
    b.top_key.reserve(dev.stream, nq * p.kmax)?;
    b.top_row.reserve(dev.stream, nq * p.kmax)?;
    let u = |v: usize| v as u32;
    let (ld, n, qd, nq32, kps) = (u(table.ld), u(table.rows), u(qdim), u(nq), u(p.kps));
    let (group, chunk_rows, kmax, chunks, mkps) = (
        u(p.group),
        u(p.chunk_rows),
        u(p.kmax),
        u(p.chunks),
        u(p.merge_kps),
    );
    let cfg = LaunchConfig {
        grid_dim: (u(p.groups), chunks, 1),
        block_dim: (plan::THREADS as u32, 1, 1),
        shared_mem_bytes: u(p.partial_smem),
    };
    let attr_ld = table.cap as u64;
    // SAFETY: matches score_topk_partial_* in score_topk.cu; the plan sized
    // the shared memory and the output ([nq][chunks][kmax]); qsel indexes
    // rows of `queries`; exclusions and filter clauses are CSR over nq
    // queries, and every clause's attribute is < table.n_attrs (checked by
    // `plan::check_rows`).
    unsafe {
        dev.stream
            .launch_builder(f)
            .arg(&table.emb)
            .arg(&ld)
            .arg(&n)
            .arg(&table.ids)
            .arg(&table.live)
            .arg(queries)
            .arg(&qd)
            .arg(b.qsel.get())
            .arg(&nq32)
            .arg(b.ks.get())
            .arg(&kps)
            .arg(b.excl_off.get())
            .arg(b.excl_rows.get())
            .arg(&table.attrs)
            .arg(&attr_ld)
            .arg(b.filt_off.get())
            .arg(b.clauses.get())
            .arg(b.filt_vals.get())
            .arg(&group)
            .arg(&chunk_rows)
            .arg(&kmax)
            .arg(b.part_key.get_mut())
            .arg(b.part_row.get_mut())
            .launch(cfg)
    }
    .ctx("score_topk_partial launch")?;
    merge_launch(dev, &table.ids, b, &p, chunks, mkps)?;
    Ok(p)
}

/// Merges `b.part_*` ([nq][chunks][kmax]) into `b.top_*` ([nq][kmax]).
pub fn merge_launch(
    dev: &Dev<'_>,
    ids: &CudaSlice<u64>,
    b: &mut TopkBufs,
    p: &TopkPlan,
    chunks: u32,
    merge_kps: u32,
) -> Result<(), GpuError> {
    let kmax = p.kmax as u32;
    let cfg = LaunchConfig {
        grid_dim: grid(p.nq),
        block_dim: (plan::THREADS as u32, 1, 1),
        shared_mem_bytes: p.merge_smem as u32,
    };
    // SAFETY: matches topk_merge in score_topk.cu; sizes from the plan.
    unsafe {
        dev.stream
            .launch_builder(&dev.k.topk_merge)
            .arg(b.part_key.get())
            .arg(b.part_row.get())
            .arg(&chunks)
            .arg(&kmax)
            .arg(b.ks.get())
            .arg(&merge_kps)
            .arg(ids)
            .arg(b.top_key.get_mut())
            .arg(b.top_row.get_mut())
            .launch(cfg)
    }
    .ctx("topk_merge launch")
    .map(|_| ())
}

/// Top-k over a materialised score matrix ([nq, n] f32, rows are table
/// rows): the "GEMM, then select" baseline gpu-check compares the fused
/// kernel with. No live mask or exclusions. The result lands in `b.top_*`.
pub fn dense_topk_launch(
    dev: &Dev<'_>,
    ids: &CudaSlice<u64>,
    b: &mut TopkBufs,
    scores: &CudaSlice<f32>,
    n: usize,
    t: &PackedTopk,
) -> Result<TopkPlan, GpuError> {
    let nq = t.qsel.len();
    let kmax = t.kmax.max(1);
    // The kernel admits up to 4 · THREADS scores per round (DENSE_ROUND).
    let kps = kmax.next_power_of_two().max(8 * plan::THREADS);
    // Chunks of ~64k scores: many blocks per SM, few candidates to merge.
    let chunk_rows = n.div_ceil(n.div_ceil(1 << 16).max(1)).max(1);
    let chunks = n.div_ceil(chunk_rows).max(1);
    let merge_kps = kmax.next_power_of_two().max(2 * plan::THREADS);
    let p = TopkPlan {
        group: 1,
        groups: nq,
        kps,
        chunk_rows,
        chunks,
        partial_smem: 2 * kps * 8,
        merge_kps,
        merge_smem: 2 * merge_kps * 8,
        kmax,
        nq,
    };
    b.ks.upload(dev.stream, &t.ks)?;
    b.part_key.reserve(dev.stream, p.partial_len())?;
    b.part_row.reserve(dev.stream, p.partial_len())?;
    b.top_key.reserve(dev.stream, nq * kmax)?;
    b.top_row.reserve(dev.stream, nq * kmax)?;
    let u = |v: usize| v as u32;
    let (n32, kps32, cr, kmax32) = (u(n), u(kps), u(chunk_rows), u(kmax));
    let cfg = LaunchConfig {
        grid_dim: (u(chunks), u(nq), 1),
        block_dim: (plan::THREADS as u32, 1, 1),
        shared_mem_bytes: u(p.partial_smem),
    };
    // SAFETY: matches topk_dense_partial in score_topk.cu; scores hold nq·n
    // floats, the output nq·chunks·kmax entries.
    unsafe {
        dev.stream
            .launch_builder(&dev.k.topk_dense_partial)
            .arg(scores)
            .arg(&n32)
            .arg(b.ks.get())
            .arg(&kps32)
            .arg(&cr)
            .arg(&kmax32)
            .arg(ids)
            .arg(b.part_key.get_mut())
            .arg(b.part_row.get_mut())
            .launch(cfg)
    }
    .ctx("topk_dense_partial launch")?;
    merge_launch(dev, ids, b, &p, u(chunks), u(merge_kps))?;
    Ok(p)
}

/// Queues the copy of the merged top-k to the host (`topk_decode` reads it
/// once the stream is synchronised).
pub fn topk_fetch(dev: &Dev<'_>, b: &mut TopkBufs, p: &TopkPlan) -> Result<(), GpuError> {
    let len = p.nq * p.kmax;
    b.out_key.fetch(dev.stream, b.top_key.get(), len)?;
    b.out_row.fetch(dev.stream, b.top_row.get(), len)
}

/// The fetched top-k as results; call after the stream is synchronised.
/// `ids` is the host copy of the table's ids.
pub fn topk_decode(
    b: &TopkBufs,
    p: &TopkPlan,
    t: &PackedTopk,
    ids: &[u64],
) -> Result<Vec<Vec<Scored>>, GpuError> {
    let (keys, rows) = (b.out_key.read()?, b.out_row.read()?);
    Ok(plan::decode_topk(keys, rows, &t.ks, p.kmax, ids))
}

/// Reads the merged top-k back: fetch, wait, decode.
pub fn topk_collect(
    dev: &Dev<'_>,
    b: &mut TopkBufs,
    p: &TopkPlan,
    t: &PackedTopk,
    ids: &[u64],
) -> Result<Vec<Vec<Scored>>, GpuError> {
    topk_fetch(dev, b, p)?;
    dev.stream.synchronize().ctx("waiting for the batch")?;
    topk_decode(b, p, t, ids)
}

/// One dot product per (query, row) pair: `queries` is [*, d]. Waits for
/// the batch and returns the scores.
pub fn score_pairs(
    dev: &Dev<'_>,
    table: &DeviceTable,
    b: &mut PairBufs,
    queries: &CudaSlice<f32>,
    pairs: &PackedPairs,
) -> Result<Vec<f32>, GpuError> {
    score_pairs_launch(dev, table, b, queries, pairs)?;
    dev.stream.synchronize().ctx("waiting for the batch")?;
    Ok(b.scores.read()?.to_vec())
}

/// Launches the pair scores and queues their copy into `b.scores`.
pub fn score_pairs_launch(
    dev: &Dev<'_>,
    table: &DeviceTable,
    b: &mut PairBufs,
    queries: &CudaSlice<f32>,
    pairs: &PackedPairs,
) -> Result<(), GpuError> {
    let np = pairs.pair_q.len();
    b.scores.clear();
    if np == 0 {
        return Ok(());
    }
    b.pair_q.upload(dev.stream, &pairs.pair_q)?;
    b.pair_row.upload(dev.stream, &pairs.pair_row)?;
    b.out.reserve(dev.stream, np)?;
    let (ld, d, np32) = (table.ld as u32, table.dim as u32, np as u32);
    let cfg = LaunchConfig {
        grid_dim: grid((np * 32).div_ceil(256)),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches score_rows_* in score_topk.cu; pair arrays hold np
    // entries, rows < table.rows, query indices < rows of `queries`.
    unsafe {
        dev.stream
            .launch_builder(&dev.k.score_rows[table.dtype.index()])
            .arg(&table.emb)
            .arg(&ld)
            .arg(&d)
            .arg(queries)
            .arg(b.pair_q.get())
            .arg(b.pair_row.get())
            .arg(&np32)
            .arg(b.out.get_mut())
            .launch(cfg)
    }
    .ctx("score_rows launch")?;
    b.scores.fetch(dev.stream, b.out.get(), np)
}
