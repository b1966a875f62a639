//! The ranker: its tower scores each (user, candidate) pair from
//! [history mean ‖ features ‖ e ‖ history mean ⊙ e], through a sigmoid. It
//! answers score only, and each candidate is a batch row.

use super::{Kind, ModelKind};
use crate::model::query::{Op, OpKind, Query, Task};

pub const RANKER: ModelKind = ModelKind::new(&Ranker);

struct Ranker;

impl Kind for Ranker {
    fn name(&self) -> &'static str {
        "ranker"
    }

    fn accepts(&self, model: &str, op: OpKind) -> Result<(), String> {
        match op {
            OpKind::Score => Ok(()),
            OpKind::Recommend => Err(format!(
                "model {model} is a ranker: recommend needs a retrieval model, two_tower or sasrec (use score)"
            )),
        }
    }

    /// One row per candidate: the tower runs once per pair.
    fn rows(&self, op: &Op) -> usize {
        match op {
            Op::Score { items, .. } => items.len(),
            Op::Recommend { .. } => 1,
        }
    }

    fn tower_dims(&self, dim: usize, user_feature_dim: usize) -> (usize, usize) {
        (3 * dim + user_feature_dim, 1)
    }

    /// One request may bring up to `max_items` candidates.
    fn max_batch_rows(&self, max_batch_size: usize, max_items: usize) -> usize {
        max_batch_size.max(max_items)
    }

    /// One score request with `size` candidates.
    fn warm_batch<'a>(&self, size: usize, rows: &'a [u32]) -> Vec<Query<'a>> {
        vec![Query {
            history: &rows[..rows.len().min(1)],
            features: None,
            task: Task::Score {
                rows: &rows[..size.min(rows.len())],
            },
        }]
    }
}
