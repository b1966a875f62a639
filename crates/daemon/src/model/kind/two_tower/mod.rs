//! The two-tower retrieval model: its tower maps [history mean ‖ features]
//! to a query vector in the item space. Recommend takes the top k items by
//! dot product with it, score the dot products with the given items.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use super::{recommend_batch, Kind, ModelKind};
use crate::backend::cpu::CpuBuild;
#[cfg(feature = "cuda")]
use crate::backend::cuda::kind::DeviceKind;
use crate::model::query::{Op, OpKind, Query};
use crate::model::ModelSpec;

pub const TWO_TOWER: ModelKind = ModelKind::new(&TwoTower);

/// `k` of the warm-up recommend requests.
const WARM_K: usize = 10;

struct TwoTower;

impl Kind for TwoTower {
    fn name(&self) -> &'static str {
        "two_tower"
    }

    fn accepts(&self, _spec: &ModelSpec, _model: &str, _op: OpKind) -> Result<(), String> {
        Ok(())
    }

    /// The tower runs once per request, whatever it asks.
    fn rows(&self, _spec: &ModelSpec, _op: &Op) -> usize {
        1
    }

    fn tower_dims(&self, dim: usize, user_feature_dim: usize) -> (usize, usize) {
        (dim + user_feature_dim, dim)
    }

    fn max_batch_rows(&self, spec: &ModelSpec) -> usize {
        spec.batching.max_batch_size
    }

    /// `size` recommend requests, one row each.
    fn warm_batch<'a>(&self, _spec: &ModelSpec, size: usize, rows: &'a [u32]) -> Vec<Query<'a>> {
        recommend_batch(size, rows, WARM_K)
    }

    fn cpu(&self) -> CpuBuild {
        cpu::build
    }

    #[cfg(feature = "cuda")]
    fn device(&self) -> Option<&'static dyn DeviceKind> {
        Some(&cuda::Device)
    }
}
