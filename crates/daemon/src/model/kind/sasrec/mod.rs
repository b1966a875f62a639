//! SASRec, the self-attentive sequential recommender (Kang & McAuley, 2018),
//! as the reference PyTorch implementation (pmixer/SASRec.pytorch) trains it:
//! the user's last `history_len` items, in order, through causal
//! self-attention blocks; the last position is the query vector, and an
//! item's score is its embedding's dot product with it. A checkpoint saved
//! with `torch.save(model.state_dict())` is read as it is (`weights.rs`).
//!
//! Its own model.toml keys: `blocks`, `heads`, `block` (`"sasrec"`,
//! `"pre_ln"`, `"post_ln"`), `layer_norm_eps`; `items = "item_emb"` serves the
//! checkpoint's own item embeddings (rows 1..N, ids 1..N) as the catalogue.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod weights;

use std::path::Path;

use serde::Deserialize;

use super::{recommend_batch, Kind, KindOptions, ModelKind};
use crate::backend::cpu::CpuBuild;
#[cfg(feature = "cuda")]
use crate::backend::cuda::kind::DeviceKind;
use crate::model::query::{Op, OpKind, Query};
use crate::model::{ItemTable, ModelError, ModelSpec, Weights};
use crate::toml_doc::Doc;

pub use weights::{BlockWeights, Norm, SasrecWeights};

pub const SASREC: ModelKind = ModelKind::new(&Sasrec);

/// `items = "item_emb"`: the catalogue is the checkpoint's item embeddings.
pub const ITEM_EMB: &str = "item_emb";

/// `k` of the warm-up recommend requests.
const WARM_K: usize = 10;

/// How a block arranges its layer norms around attention and the
/// feed-forward layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Block {
    /// The reference's original block (its published checkpoints):
    /// q = LN_attn(x); x = q + MHA(q, x, x); x = LN_fwd(x); x = x + FFN(x).
    #[default]
    Sasrec,
    /// x = x + MHA(LN_attn(x)); x = x + FFN(LN_fwd(x)).
    PreLn,
    /// x = LN_attn(x + MHA(x)); x = LN_fwd(x + FFN(x)).
    PostLn,
}

/// The kind's own model.toml keys.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct SasrecOptions {
    /// Self-attention blocks.
    pub blocks: usize,
    /// Attention heads (`dim` must be a multiple).
    pub heads: usize,
    #[serde(default)]
    pub block: Block,
    /// Epsilon of every layer norm (the reference's is 1e-8).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-8
}

struct Sasrec;

impl Kind for Sasrec {
    fn name(&self) -> &'static str {
        "sasrec"
    }

    fn accepts(&self, _spec: &ModelSpec, _model: &str, _op: OpKind) -> Result<(), String> {
        Ok(())
    }

    /// The sequence runs once per request, whatever it asks.
    fn rows(&self, _spec: &ModelSpec, _op: &Op) -> usize {
        1
    }

    /// Not a tower of linear layers: its input and output are the item
    /// space.
    fn tower_dims(&self, dim: usize, _user_feature_dim: usize) -> (usize, usize) {
        (dim, dim)
    }

    fn max_batch_rows(&self, spec: &ModelSpec) -> usize {
        spec.batching.max_batch_size
    }

    /// `size` recommend requests over a history of one item.
    fn warm_batch<'a>(&self, _spec: &ModelSpec, size: usize, rows: &'a [u32]) -> Vec<Query<'a>> {
        recommend_batch(size, rows, WARM_K)
    }

    fn keys(&self) -> &'static [&'static str] {
        &["blocks", "heads", "block", "layer_norm_eps"]
    }

    fn options(&self, doc: &Doc<'_>) -> Result<KindOptions, String> {
        doc.part::<SasrecOptions>().map(KindOptions::new)
    }

    fn check(&self, spec: &ModelSpec) -> Result<(), String> {
        let o = options(spec);
        if o.blocks == 0 {
            return Err("blocks must be > 0, got 0".into());
        }
        if o.heads == 0 || !spec.dim.is_multiple_of(o.heads) {
            return Err(format!(
                "heads must divide dim ({}), got {}",
                spec.dim, o.heads
            ));
        }
        if !(o.layer_norm_eps.is_finite() && o.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps must be a positive number, got {}",
                o.layer_norm_eps
            ));
        }
        if spec.user_feature_dim != 0 {
            return Err(format!(
                "a sasrec model reads no dense user features: user_feature_dim must be 0, got {}",
                spec.user_feature_dim
            ));
        }
        Ok(())
    }

    fn load_weights(&self, spec: &ModelSpec, path: &Path) -> Result<Weights, ModelError> {
        let embedded = spec.items.as_os_str() == ITEM_EMB;
        SasrecWeights::load(path, spec.dim, spec.history_len, options(spec), embedded)
            .map(Weights::new)
    }

    fn embedded_items(
        &self,
        spec: &ModelSpec,
        weights: &Weights,
    ) -> Option<Result<ItemTable, ModelError>> {
        if spec.items.as_os_str() != ITEM_EMB {
            return None;
        }
        let w = weights
            .get::<SasrecWeights>()
            .expect("sasrec weights are loaded by the sasrec kind");
        Some(w.take_item_table())
    }

    fn cpu(&self) -> CpuBuild {
        cpu::build
    }

    #[cfg(feature = "cuda")]
    fn device(&self) -> Option<&'static dyn DeviceKind> {
        Some(&cuda::Device)
    }
}

/// The sasrec keys of a spec parsed as a sasrec model.
pub fn options(spec: &ModelSpec) -> SasrecOptions {
    *spec
        .options
        .get::<SasrecOptions>()
        .expect("a sasrec spec carries its options: this is a bug")
}

#[cfg(test)]
mod tests;
