//! A ranker batch on the CPU: one tower input row [h ‖ f ‖ e ‖ h⊙e] per
//! (user, candidate) pair, the tower over all pairs of the batch at once,
//! and a sigmoid per logit.

use crate::backend::cpu::{err, history_mean, Forward, Tower};
use crate::backend::{BackendError, ModelDesc, Output, Query, Task};
use crate::model::{ItemTable, Weights};

struct Ranker {
    desc: ModelDesc,
    tower: Tower,
}

pub(super) fn build(desc: ModelDesc, weights: &Weights) -> Result<Box<dyn Forward>, BackendError> {
    Ok(Box::new(Ranker {
        tower: Tower::new(&desc, weights)?,
        desc,
    }))
}

impl Forward for Ranker {
    fn embed(
        &self,
        _items: &ItemTable,
        _queries: &[Query<'_>],
    ) -> Option<Result<Vec<f32>, BackendError>> {
        None
    }

    fn retrieves(&self) -> bool {
        false
    }

    fn score(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Vec<Output>, BackendError> {
        run(self, items, queries)
    }
}

fn run(
    model: &Ranker,
    items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, BackendError> {
    let (d, fd) = (model.desc.dim, model.desc.user_feature_dim);
    // 3d + fd.
    let width = model.tower.in_dim;
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
        model.tower.forward(x, total)?
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
