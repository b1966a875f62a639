//! A two-tower batch on the CPU: [history mean ‖ features] per query through
//! the tower, then retrieval from the query vectors (`super::retrieve`).

use super::{history_mean, retrieve, Forward, Tower};
use crate::backend::{BackendError, ModelDesc, Output, Query};
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
    fn run(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Vec<Output>, BackendError> {
        let x = self.user_inputs(items, queries);
        let q = self.tower.forward(x, queries.len())?;
        Ok(retrieve(
            self.desc.cpu_scoring,
            self.desc.dim,
            items,
            queries,
            &q,
        ))
    }
}
