//! The CPU backend: towers run through candle; retrieval streams the item
//! table once per batch in cache-sized blocks (one GEMM per block through the
//! same `gemm` kernels candle uses) and keeps a per-query top-k as it goes, so
//! the B×N score matrix is never materialised.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module};
use rayon::prelude::*;

use super::topk::TopK;
use super::{Backend, BackendError, ModelDesc, ModelId, Output, Query, Scored, TableId, Task};
use crate::model::{ItemDtype, ItemTable, ModelKind, TowerWeights};

/// Rows of the item table scored per GEMM: 512 × 64 f32 is 128 KiB, and the
/// block of scores for 64 queries another 128 KiB, so both stay in L2.
const BLOCK_ROWS: usize = 512;

/// Scores tested per branch-free compare in the top-k scan.
const SCAN_LANES: usize = 16;

struct CpuModel {
    desc: ModelDesc,
    layers: Vec<Linear>,
}

#[derive(Default)]
pub struct CpuBackend {
    models: HashMap<ModelId, CpuModel>,
}

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::new("cpu", "other", e.to_string())
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> String {
        "cpu".into()
    }

    /// The CPU scores straight from the f32 host table: nothing to copy.
    fn load_table(
        &mut self,
        _table: TableId,
        _items: &ItemTable,
        _dtype: ItemDtype,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn items_changed(
        &mut self,
        _table: TableId,
        _items: &ItemTable,
        _rows: &[u32],
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn load(
        &mut self,
        id: ModelId,
        desc: ModelDesc,
        _table: TableId,
        weights: &TowerWeights,
    ) -> Result<(), BackendError> {
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                let w = Tensor::from_slice(&l.weight, (l.out_dim, l.in_dim), &Device::Cpu)?;
                let b = Tensor::from_slice(&l.bias, l.out_dim, &Device::Cpu)?;
                Ok(Linear::new(w, Some(b)))
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(err)?;
        self.models.insert(id, CpuModel { desc, layers });
        Ok(())
    }

    fn run(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, BackendError> {
        let model = self
            .models
            .get(&id)
            .ok_or_else(|| err(format!("model {id} is not loaded: this is a bug")))?;
        match model.desc.kind {
            ModelKind::TwoTower => run_two_tower(model, items, queries),
            ModelKind::Ranker => run_ranker(model, items, queries),
        }
    }
}

/// Mean of the history rows' embeddings (zeros when there is no history).
pub fn history_mean(items: &ItemTable, history: &[u32], out: &mut [f32]) {
    out.fill(0.0);
    if history.is_empty() {
        return;
    }
    for &row in history {
        for (o, e) in out.iter_mut().zip(items.embedding(row)) {
            *o += e;
        }
    }
    let inv = 1.0 / history.len() as f32;
    out.iter_mut().for_each(|o| *o *= inv);
}

fn forward(
    layers: &[Linear],
    x: Vec<f32>,
    rows: usize,
    width: usize,
) -> Result<Vec<f32>, BackendError> {
    let mut t = Tensor::from_vec(x, (rows, width), &Device::Cpu).map_err(err)?;
    for (i, layer) in layers.iter().enumerate() {
        t = layer.forward(&t).map_err(err)?;
        if i + 1 < layers.len() {
            t = t.relu().map_err(err)?;
        }
    }
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)
}

/// x = [h ‖ f] per query.
fn user_inputs(desc: &ModelDesc, items: &ItemTable, queries: &[Query<'_>]) -> Vec<f32> {
    let (d, fd) = (desc.dim, desc.user_feature_dim);
    let mut x = vec![0f32; queries.len() * (d + fd)];
    for (q, row) in queries.iter().zip(x.chunks_exact_mut(d + fd)) {
        let (h, f) = row.split_at_mut(d);
        history_mean(items, q.history, h);
        if let Some(feat) = q.features {
            f.copy_from_slice(feat);
        }
    }
    x
}

fn run_two_tower(
    model: &CpuModel,
    items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, BackendError> {
    let d = model.desc.dim;
    let x = user_inputs(&model.desc, items, queries);
    let q = forward(
        &model.layers,
        x,
        queries.len(),
        d + model.desc.user_feature_dim,
    )?;
    let topk_idx: Vec<usize> = (0..queries.len())
        .filter(|&i| matches!(queries[i].task, Task::TopK { .. }))
        .collect();
    let mut topk_out = if topk_idx.is_empty() {
        Vec::new()
    } else {
        let qs: Vec<f32> = topk_idx
            .iter()
            .flat_map(|&i| q[i * d..(i + 1) * d].iter().copied())
            .collect();
        let specs: Vec<(usize, &[u32])> = topk_idx
            .iter()
            .map(|&i| match queries[i].task {
                Task::TopK { k, exclude } => (k, exclude),
                Task::Score { .. } => unreachable!("filtered to top-k tasks"),
            })
            .collect();
        score_topk(items, &qs, &specs)
    }
    .into_iter();
    Ok(queries
        .iter()
        .enumerate()
        .map(|(i, query)| match query.task {
            Task::TopK { .. } => Output::TopK(topk_out.next().expect("one result per top-k query")),
            Task::Score { rows } => {
                let qi = &q[i * d..(i + 1) * d];
                Output::Scores(rows.iter().map(|&r| dot(qi, items.embedding(r))).collect())
            }
        })
        .collect())
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Scores every live row against each query and keeps each query's top-k.
/// `qs` is [B, d] row-major; `specs` gives each query's k and sorted exclusions.
pub fn score_topk(items: &ItemTable, qs: &[f32], specs: &[(usize, &[u32])]) -> Vec<Vec<Scored>> {
    let d = items.dim();
    let b = specs.len();
    let n = items.rows();
    let emb = items.embeddings();
    let live = items.live_mask();
    let ids = items.ids();
    let blocks = n.div_ceil(BLOCK_ROWS);
    let fresh = || {
        (
            specs.iter().map(|(k, _)| TopK::new(*k)).collect::<Vec<_>>(),
            vec![0f32; b * BLOCK_ROWS],
        )
    };
    let heaps = (0..blocks)
        .into_par_iter()
        .fold(fresh, |(mut heaps, mut scores), blk| {
            let start = blk * BLOCK_ROWS;
            let rows = BLOCK_ROWS.min(n - start);
            // scoresᵀ[rows, b] = emb[start.., d] · qs[b, d]ᵀ, stored column-major
            // so each query's scores for the block are contiguous.
            // SAFETY: every pointer/stride pair addresses memory inside the
            // slices above: lhs is the row-major block rows×d (row stride d),
            // rhs d×b reads qs transposed (column stride d), dst rows×b with
            // column stride `rows` fits the b·BLOCK_ROWS buffer.
            unsafe {
                gemm::gemm(
                    rows,
                    b,
                    d,
                    scores.as_mut_ptr(),
                    rows as isize,
                    1,
                    false,
                    emb[start * d..].as_ptr(),
                    1,
                    d as isize,
                    qs.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (qi, heap) in heaps.iter_mut().enumerate() {
                let exclude = specs[qi].1;
                let row_scores = &scores[qi * rows..(qi + 1) * rows];
                let mut threshold = heap.threshold();
                // Most scores lose against a full heap: test 16 at a time with a
                // branch-free (vectorisable) compare and look closer only on a hit.
                for (c, lanes) in row_scores.chunks(SCAN_LANES).enumerate() {
                    if !lanes.iter().fold(false, |hit, &s| hit | (s >= threshold)) {
                        continue;
                    }
                    for (j, &s) in lanes.iter().enumerate() {
                        if s < threshold {
                            continue;
                        }
                        let row = start + c * SCAN_LANES + j;
                        if !live[row] || exclude.binary_search(&(row as u32)).is_ok() {
                            continue;
                        }
                        heap.offer(Scored {
                            id: ids[row],
                            score: s,
                        });
                        threshold = heap.threshold();
                    }
                }
            }
            (heaps, scores)
        })
        .map(|(heaps, _)| heaps)
        .reduce(
            || specs.iter().map(|(k, _)| TopK::new(*k)).collect(),
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| x.merge(y));
                a
            },
        );
    heaps.into_iter().map(TopK::into_sorted).collect()
}

fn run_ranker(
    model: &CpuModel,
    items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, BackendError> {
    let (d, fd) = (model.desc.dim, model.desc.user_feature_dim);
    let width = 3 * d + fd;
    let total: usize = queries
        .iter()
        .map(|q| match q.task {
            Task::Score { rows } => rows.len(),
            Task::TopK { .. } => 0,
        })
        .sum();
    let mut x = vec![0f32; total * width];
    let mut h = vec![0f32; d];
    let mut at = 0;
    for q in queries {
        let Task::Score { rows } = q.task else {
            continue;
        };
        history_mean(items, q.history, &mut h);
        for &r in rows {
            let xr = &mut x[at * width..(at + 1) * width];
            let e = items.embedding(r);
            xr[..d].copy_from_slice(&h);
            if let Some(f) = q.features {
                xr[d..d + fd].copy_from_slice(f);
            }
            xr[d + fd..2 * d + fd].copy_from_slice(e);
            for ((o, a), b) in xr[2 * d + fd..].iter_mut().zip(&h).zip(e) {
                *o = a * b;
            }
            at += 1;
        }
    }
    let logits = if total == 0 {
        Vec::new()
    } else {
        forward(&model.layers, x, total, width)?
    };
    let mut logits = logits.into_iter();
    queries
        .iter()
        .map(|q| match q.task {
            Task::Score { rows } => Ok(Output::Scores(
                logits
                    .by_ref()
                    .take(rows.len())
                    .map(|z| 1.0 / (1.0 + (-z).exp()))
                    .collect(),
            )),
            Task::TopK { .. } => Err(err("a ranker model cannot answer recommend: this is a bug")),
        })
        .collect()
}
