//! A two-tower batch on the CPU: [history mean ‖ features] per query through
//! the tower: the query vectors, which the CPU backend's shared retrieval
//! (`backend::cpu::retrieve`) answers from.

use crate::backend::cpu::{history_mean, Forward, Tower};
use crate::backend::{BackendError, ModelDesc, Query};
use crate::model::{ItemTable, Weights};

struct TwoTower {
    desc: ModelDesc,
    tower: Tower,
}

pub(super) fn build(desc: ModelDesc, weights: &Weights) -> Result<Box<dyn Forward>, BackendError> {
    Ok(Box::new(TwoTower {
        tower: Tower::new(&desc, weights)?,
        desc,
    }))
}

impl TwoTower {
    /// x = [h ‖ f] per query, d + fd wide.
    fn user_inputs(&self, items: &ItemTable, queries: &[Query<'_>]) -> Vec<f32> {
        let (d, width) = (self.desc.dim, self.tower.in_dim);
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
}

impl Forward for TwoTower {
    fn embed(
        &self,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Option<Result<Vec<f32>, BackendError>> {
        let x = self.user_inputs(items, queries);
        Some(self.tower.forward(x, queries.len()))
    }

    fn retrieves(&self) -> bool {
        true
    }
}
