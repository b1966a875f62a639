//! A check of the fused score + top-k kernels when the backend opens, on the
//! device it will serve from, against f64 dot products on the host: a small
//! table (3,000 rows, d = 100, so several row chunks, a partial last tile and
//! padded columns) and two batches: 11 queries with k from 1 to 300 and
//! exclusions, and 29 queries of small k that fill a block's query tiles. It
//! takes milliseconds. A CUDA-core kernel that disagrees keeps the GPU out of
//! service (the daemon serves on the CPU and says why); a tensor-core kernel
//! that disagrees is switched off and the CUDA-core one serves instead.

use super::ops::{self, Dev, TopkBufs};
use super::plan::PackedTopk;
use super::tables::{DeviceTable, ItemDtype};
use crate::backend::Scored;
use crate::model::demo::Rng;

const ROWS: usize = 3000;
const DIM: usize = 100;
/// Allowed score difference: f32 accumulation over d = 100 terms of
/// magnitude <= 1 (and, on tensor cores, the two-term bf16 split of the
/// query, <= 2^-17 relative per term) stays far below it.
const TOL: f64 = 2e-3;

/// Why a kernel did not pass.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The device failed (launch, copy, fault): the context may be unusable.
    Device(String),
    /// The kernel ran and its answers are wrong.
    Wrong(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Device(m) | Failure::Wrong(m) => f.write_str(m),
        }
    }
}

/// The checked batches: k per query and whether it has exclusions. The
/// first goes deep (k up to 300, so the kept lists are merged many times,
/// with exclusions); the second goes wide (29 queries of small k: one block
/// holds up to 32 queries, so every warp's query tiles and a partial last
/// tile of 8 are used).
fn batches() -> [Vec<(u32, bool)>; 2] {
    let deep = [1, 5, 10, 10, 64, 100, 100, 300, 7, 2, 50]
        .iter()
        .enumerate()
        .map(|(q, &k)| (k, q % 3 == 1))
        .collect();
    let wide = (0..29u32).map(|q| (1 + (q * 7) % 64, q % 5 == 2)).collect();
    [deep, wide]
}

/// Runs the fused top-k over a synthetic `dtype` table on `dev` (whose `tc`
/// picks the kernel) and compares every list with the host's.
pub fn fused_topk(dev: &Dev<'_>, bufs: &mut TopkBufs, dtype: ItemDtype) -> Result<(), Failure> {
    let e = |what: &'static str| {
        move |err: super::error::GpuError| Failure::Device(format!("{what}: {err}"))
    };
    let table = DeviceTable::synthetic(dev.stream, dev.k, ROWS, DIM, dtype, 0x5e1f)
        .map_err(e("building the table"))?;
    let (ids, _, emb) = table.download(dev.stream).map_err(e("reading the table"))?;
    let mut rng = Rng::new(0x7e57);
    for (b, spec) in batches().iter().enumerate() {
        let nq = spec.len();
        let queries: Vec<f32> = (0..nq * DIM)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect();
        let mut t = PackedTopk {
            excl_off: vec![0],
            filt_off: vec![0; nq + 1],
            ..Default::default()
        };
        for (q, &(k, excl)) in spec.iter().enumerate() {
            t.qsel.push(q as u32);
            t.ks.push(k);
            t.kmax = t.kmax.max(k as usize);
            if excl {
                let mut ex: Vec<u32> = (0..40).map(|_| rng.below(ROWS as u64) as u32).collect();
                ex.sort_unstable();
                ex.dedup();
                t.excl_rows.extend(ex);
            }
            t.excl_off.push(t.excl_rows.len() as u32);
        }
        let qdev = dev
            .stream
            .clone_htod(&queries)
            .map_err(|err| Failure::Device(format!("uploading queries: {err}")))?;
        let p = ops::topk_launch(dev, &table, bufs, &qdev, DIM, &t).map_err(e("launching"))?;
        let got = ops::topk_collect(dev, bufs, &p, &t, &ids).map_err(e("reading results"))?;
        for (q, list) in got.iter().enumerate() {
            let excluded = &t.excl_rows[t.excl_off[q] as usize..t.excl_off[q + 1] as usize];
            let qv = &queries[q * DIM..(q + 1) * DIM];
            let score = |row: usize| -> f64 {
                qv.iter()
                    .zip(&emb[row * DIM..(row + 1) * DIM])
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            };
            let mut want: Vec<(f64, u64)> = (0..ROWS)
                .filter(|&r| excluded.binary_search(&(r as u32)).is_err())
                .map(|r| (score(r), ids[r]))
                .collect();
            want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            want.truncate(t.ks[q] as usize);
            check_list(q, list, &want, |id| score(id as usize), excluded)
                .map_err(|m| Failure::Wrong(format!("batch {b}, {m}")))?;
        }
    }
    Ok(())
}

/// A returned list is right when it has k distinct, allowed items whose true
/// scores match the reference's rank by rank within TOL (near ties may trade
/// places) and whose reported scores are their true scores within TOL. Ids
/// are row numbers in the synthetic table.
fn check_list(
    q: usize,
    got: &[Scored],
    want: &[(f64, u64)],
    true_score: impl Fn(u64) -> f64,
    excluded: &[u32],
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "query {q}: {} results, expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !seen.insert(g.id) || excluded.binary_search(&(g.id as u32)).is_ok() {
            return Err(format!(
                "query {q} rank {i}: item {} repeated or excluded",
                g.id
            ));
        }
        let truth = true_score(g.id);
        if (truth - w.0).abs() > TOL || (f64::from(g.score) - truth).abs() > TOL {
            return Err(format!(
                "query {q} rank {i}: item {} score {} (true {truth:.6}), expected item {} score {:.6}",
                g.id, g.score, w.1, w.0
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: u64, score: f32) -> Scored {
        Scored { id, score }
    }

    #[test]
    fn lists_pass_within_tolerance_and_fail_beyond_it() {
        let truth = |id: u64| [5.0, 4.0, 3.9995, 1.0][id as usize];
        let want = [(5.0, 0), (4.0, 1), (3.9995, 2)];
        // Exact, and a near tie traded.
        check_list(0, &[s(0, 5.0), s(1, 4.0), s(2, 3.9995)], &want, truth, &[]).unwrap();
        check_list(0, &[s(0, 5.0), s(2, 3.9995), s(1, 4.0)], &want, truth, &[]).unwrap();
        // A wrong item, a wrong score, a short list, a repeat, an exclusion.
        for (got, ex) in [
            (vec![s(0, 5.0), s(1, 4.0), s(3, 1.0)], vec![]),
            (vec![s(0, 5.0), s(1, 4.1), s(2, 3.9995)], vec![]),
            (vec![s(0, 5.0), s(1, 4.0)], vec![]),
            (vec![s(0, 5.0), s(0, 5.0), s(2, 3.9995)], vec![]),
            (vec![s(0, 5.0), s(1, 4.0), s(2, 3.9995)], vec![1u32]),
        ] {
            assert!(check_list(0, &got, &want, truth, &ex).is_err(), "{got:?}");
        }
    }
}
