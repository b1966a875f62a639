//! `kind = "onnx"`: a graph a team exported (`torch.onnx.export`), fed from
//! rankd's live state. Its inputs are bound by name (`inputs.rs`): the
//! user's last items as rows of the live item table, dense and categorical
//! user features, the request's context, and for a ranker the candidates'
//! rows and attributes. A tower's first output is the query vector, answered
//! through the same fused top-k scan as `two_tower`; a ranker's first output
//! is one logit (or probability) per (user, candidate) pair.
//!
//! Two engines run a graph: tract (pure Rust, always built; one optimised
//! plan per power-of-two batch size, built at load) and ONNX Runtime (cargo
//! feature `onnxruntime`; the library is loaded at run time from
//! `--onnxruntime-lib`). Both are loaded off the executor thread, as other
//! weights are, and warmed like every model.
//!
//! Its forward pass runs on the CPU (`cpu.rs`); it has none on the device,
//! where its models are served from the CPU.
//!
//! Its own model.toml keys: `role` (`"tower"` or `"ranker"`), `graph` (the
//! .onnx file; external-data files beside it are read), `engine`
//! (`"tract"`, the default, or `"onnxruntime"`), `output` (rankers:
//! `"logit"`, the default, or `"probability"`).

mod cpu;
mod engine;
mod inputs;
mod ort_engine;
mod tract_engine;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ranker::score_batch;
use super::{recommend_batch, Kind, KindOptions, ModelKind};
use crate::backend::cpu::CpuBuild;
use crate::model::query::{Op, OpKind, Query};
use crate::model::{ModelError, ModelSpec, Weights};
use crate::toml_doc::Doc;

pub use engine::{configure, Batch, Graph, Settings, Values, DEFAULT_MAX_MODEL_BYTES};
pub use inputs::{Binding, Input};

pub const ONNX: ModelKind = ModelKind::new(&Onnx);

/// `k` of the warm-up recommend requests.
const WARM_K: usize = 10;

/// What the graph computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A user tower: its first output is the query vector [B, dim].
    Tower,
    /// A ranker: its first output is one value per (user, candidate) row.
    Ranker,
}

/// The runtime that executes the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// tract: pure Rust, always built.
    #[default]
    Tract,
    /// ONNX Runtime, loaded at run time from `--onnxruntime-lib`.
    Onnxruntime,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Tract => "tract",
            EngineKind::Onnxruntime => "onnxruntime",
        }
    }
}

/// What a ranker's output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// A logit: the score returned is its sigmoid.
    #[default]
    Logit,
    /// A probability, returned as it is.
    Probability,
}

/// The kind's own model.toml keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OnnxOptions {
    pub role: Role,
    /// The graph file, relative to the version folder.
    pub graph: PathBuf,
    #[serde(default)]
    pub engine: EngineKind,
    /// Rankers only.
    #[serde(default)]
    pub output: Option<OutputKind>,
}

struct Onnx;

impl Kind for Onnx {
    fn name(&self) -> &'static str {
        "onnx"
    }

    fn accepts(&self, spec: &ModelSpec, model: &str, op: OpKind) -> Result<(), String> {
        match (options(spec).role, op) {
            (Role::Ranker, OpKind::Recommend) => Err(format!(
                "model {model} is an onnx ranker: recommend needs a retrieval model (use score)"
            )),
            _ => Ok(()),
        }
    }

    /// A tower runs once per request; a ranker once per candidate.
    fn rows(&self, spec: &ModelSpec, op: &Op) -> usize {
        match (options(spec).role, op) {
            (Role::Ranker, Op::Score { items, .. }) => items.len(),
            _ => 1,
        }
    }

    fn ranks(&self, spec: &ModelSpec) -> bool {
        options(spec).role == Role::Ranker
    }

    fn reads_sparse_and_context(&self) -> bool {
        true
    }

    /// The graph's own layers are its business; the ends are the item
    /// space (a tower) or one value (a ranker).
    fn tower_dims(&self, dim: usize, _user_feature_dim: usize) -> (usize, usize) {
        (dim, dim)
    }

    fn max_batch_rows(&self, spec: &ModelSpec) -> usize {
        match options(spec).role {
            Role::Tower => spec.batching.max_batch_size,
            Role::Ranker => spec.batching.max_batch_size.max(spec.limits.max_items),
        }
    }

    fn warm_batch<'a>(&self, spec: &ModelSpec, size: usize, rows: &'a [u32]) -> Vec<Query<'a>> {
        match options(spec).role {
            Role::Tower => recommend_batch(size, rows, WARM_K),
            Role::Ranker => score_batch(size, rows),
        }
    }

    fn keys(&self) -> &'static [&'static str] {
        &["role", "graph", "engine", "output"]
    }

    fn options(&self, doc: &Doc<'_>) -> Result<KindOptions, String> {
        doc.part::<OnnxOptions>().map(KindOptions::new)
    }

    fn check(&self, spec: &ModelSpec) -> Result<(), String> {
        let o = options(spec);
        if o.role == Role::Tower && o.output.is_some() {
            return Err("output is a ranker's key: a tower's output is its query vector".into());
        }
        if o.graph.as_os_str().is_empty() {
            return Err("graph must name the .onnx file, got \"\"".into());
        }
        Ok(())
    }

    fn weights_file(&self, spec: &ModelSpec) -> PathBuf {
        options(spec).graph.clone()
    }

    fn load_weights(&self, spec: &ModelSpec, path: &Path) -> Result<Weights, ModelError> {
        Graph::load(spec, options(spec), path).map(Weights::new)
    }

    fn cpu(&self) -> CpuBuild {
        cpu::build
    }
}

/// The onnx keys of a spec parsed as an onnx model.
pub fn options(spec: &ModelSpec) -> &OnnxOptions {
    spec.options
        .get::<OnnxOptions>()
        .expect("an onnx spec carries its options: this is a bug")
}
