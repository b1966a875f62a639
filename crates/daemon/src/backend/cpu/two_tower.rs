//! A two-tower batch on the CPU: [history mean ‖ features] per query through
//! the tower, then one streamed top-k over the item table for the recommend
//! queries and dot products for the score queries.

use super::{forward, history_mean, score_topk, score_topk_int8, CpuModel};
use crate::backend::{BackendError, Output, Query, Task};
use crate::model::{CpuScoring, ItemTable};

/// x = [h ‖ f] per query, `width` = d + fd wide.
fn user_inputs(model: &CpuModel, items: &ItemTable, queries: &[Query<'_>]) -> Vec<f32> {
    let (d, width) = (model.desc.dim, model.in_dim);
    let mut x = vec![0f32; queries.len() * width];
    for (q, row) in queries.iter().zip(x.chunks_exact_mut(width)) {
        let (h, f) = row.split_at_mut(d);
        history_mean(items, q.history, h);
        if let Some(feat) = q.features {
            f.copy_from_slice(feat);
        }
    }
    x
}

pub(super) fn run(
    model: &CpuModel,
    items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, BackendError> {
    let d = model.desc.dim;
    let x = user_inputs(model, items, queries);
    let q = forward(&model.layers, x, queries.len(), model.in_dim)?;
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
        match model.desc.cpu_scoring {
            CpuScoring::F32 => score_topk(items, &qs, &specs),
            CpuScoring::ExactInt8 => score_topk_int8(items, &qs, &specs),
        }
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
