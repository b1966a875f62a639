//! The ranker: its tower scores each (user, candidate) pair from
//! [history mean ‖ features ‖ e ‖ history mean ⊙ e], through a sigmoid. It
//! answers score only, and each candidate is a batch row.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use super::{Kind, ModelKind};
use crate::backend::cpu::CpuBuild;
#[cfg(feature = "cuda")]
use crate::backend::cuda::kind::DeviceKind;
use crate::model::query::{Op, OpKind, Query, Task};
use crate::model::ModelSpec;

pub const RANKER: ModelKind = ModelKind::new(&Ranker);

struct Ranker;

impl Kind for Ranker {
    fn name(&self) -> &'static str {
        "ranker"
    }

    fn accepts(&self, _spec: &ModelSpec, model: &str, op: OpKind) -> Result<(), String> {
        match op {
            OpKind::Score => Ok(()),
            OpKind::Recommend => Err(format!(
                "model {model} is a ranker: recommend needs a retrieval model, two_tower, sasrec or an onnx tower (use score)"
            )),
        }
    }

    /// One row per candidate: the tower runs once per pair.
    fn rows(&self, _spec: &ModelSpec, op: &Op) -> usize {
        match op {
            Op::Score { items, .. } => items.len(),
            Op::Recommend { .. } => 1,
        }
    }

    fn tower_dims(&self, dim: usize, user_feature_dim: usize) -> (usize, usize) {
        (3 * dim + user_feature_dim, 1)
    }

    /// One request may bring up to `max_items` candidates.
    fn max_batch_rows(&self, spec: &ModelSpec) -> usize {
        spec.batching.max_batch_size.max(spec.limits.max_items)
    }

    fn ranks(&self, _spec: &ModelSpec) -> bool {
        true
    }

    /// One score request with `size` candidates.
    fn warm_batch<'a>(&self, _spec: &ModelSpec, size: usize, rows: &'a [u32]) -> Vec<Query<'a>> {
        score_batch(size, rows)
    }

    fn cpu(&self) -> CpuBuild {
        cpu::build
    }

    #[cfg(feature = "cuda")]
    fn device(&self) -> Option<&'static dyn DeviceKind> {
        Some(&cuda::Device)
    }
}

/// One score request with `size` candidates over a history of one item
/// (none when the table is empty): the warm-up batch of a ranking kind.
pub(crate) fn score_batch(size: usize, rows: &[u32]) -> Vec<Query<'_>> {
    vec![Query {
        history: &rows[..rows.len().min(1)],
        features: None,
        sparse: None,
        context: None,
        task: Task::Score {
            rows: &rows[..size.min(rows.len())],
        },
    }]
}
