//! Model kinds: everything particular to one kind of model lives in the
//! kind's own folder, `<name>/`: in `mod.rs`, its `kind` name, its own
//! model.toml keys, its weights and how they are validated, an item table its
//! weights may carry, the requests it takes, batch rows per request, warm-up
//! batches; in `cpu.rs`, its forward pass on the CPU; in `cuda.rs`, when it
//! has one, its forward pass on the device. The forward passes are written on
//! the backends' shared parts (`backend::cpu`, `backend::cuda::kind`), and
//! the backends find a model's through its kind ([`Kind::cpu`],
//! [`Kind::device`]). A model's kind is resolved once, when its model.toml is
//! read. [`KINDS`] is the one list of kinds.

pub mod onnx;
mod ranker;
pub mod sasrec;
mod two_tower;

use std::any::Any;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::query::{Op, OpKind, Query};
use super::{ItemTable, ModelError, ModelSpec, TowerWeights, Weights};
use crate::backend::cpu::CpuBuild;
#[cfg(feature = "cuda")]
use crate::backend::cuda::kind::DeviceKind;
use crate::toml_doc::Doc;

pub use onnx::ONNX;
pub use ranker::RANKER;
pub use sasrec::SASREC;
pub use two_tower::TWO_TOWER;

/// Every kind a model.toml may name, and the only list of them: the backends
/// find a kind's forward passes through the kind. A new kind adds its folder,
/// its module line above and one entry here.
const KINDS: &[ModelKind] = &[TWO_TOWER, RANKER, SASREC, ONNX];

/// A kind's own model.toml keys, as the kind read them (the kind reads them
/// back with [`KindOptions::get`]).
#[derive(Clone, Default)]
pub struct KindOptions(Option<Arc<dyn Any + Send + Sync>>);

impl KindOptions {
    pub fn new<T: Any + Send + Sync>(options: T) -> Self {
        Self(Some(Arc::new(options)))
    }

    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_deref().and_then(|o| o.downcast_ref())
    }
}

impl fmt::Debug for KindOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "KindOptions(..)"
        } else {
            "KindOptions(none)"
        })
    }
}

/// What one kind of model is, and where its forward passes are.
pub trait Kind: Sync {
    /// The `kind` value in model.toml and `/v1/models`.
    fn name(&self) -> &'static str;

    /// Whether a request of route `op` may reach `model`, a model of this
    /// kind described by `spec`; a refusal is the message the client gets.
    fn accepts(&self, spec: &ModelSpec, model: &str, op: OpKind) -> Result<(), String>;

    /// Batch rows one request fills: what `max_batch_size` counts.
    fn rows(&self, spec: &ModelSpec, op: &Op) -> usize;

    /// Whether the model scores (user, candidate) pairs, as a pipeline's
    /// rank stage does.
    fn ranks(&self, _spec: &ModelSpec) -> bool {
        false
    }

    /// Whether the model reads per-user categorical features
    /// (`user_sparse_dim`) and per-request context (`context_dim`); the
    /// kinds that do not refuse either width but 0.
    fn reads_sparse_and_context(&self) -> bool {
        false
    }

    /// Widths of the tower's input and output layers, for items of `dim`
    /// and `user_feature_dim` dense user features.
    fn tower_dims(&self, dim: usize, user_feature_dim: usize) -> (usize, usize);

    /// The largest batch, in rows, the model must be warmed (and a device
    /// sized) for: a batch closes at `max_batch_size` rows, unless one
    /// request alone brings more.
    fn max_batch_rows(&self, spec: &ModelSpec) -> usize;

    /// The batch run once at load for warm-up size `size` (in rows), laid
    /// out as this kind's requests are. `rows` holds at least `size`
    /// item-table rows to use, or none when the table is empty.
    fn warm_batch<'a>(&self, spec: &ModelSpec, size: usize, rows: &'a [u32]) -> Vec<Query<'a>>;

    /// model.toml keys this kind reads besides the shared ones.
    fn keys(&self) -> &'static [&'static str] {
        &[]
    }

    /// Reads this kind's own keys from model.toml (errors point into it).
    fn options(&self, _doc: &Doc<'_>) -> Result<KindOptions, String> {
        Ok(KindOptions::default())
    }

    /// Checks a parsed spec as a whole, past the checks every kind shares.
    fn check(&self, _spec: &ModelSpec) -> Result<(), String> {
        Ok(())
    }

    /// The file, relative to the version folder, that holds the weights
    /// [`Kind::load_weights`] reads (`weights` in model.toml by default).
    fn weights_file(&self, spec: &ModelSpec) -> std::path::PathBuf {
        spec.weights.clone()
    }

    /// Reads and validates the version's weights from `path` (`weights` in
    /// model.toml): names, shapes, dtypes, finite values, each error naming
    /// the file and the tensor. By default, a tower of linear layers.
    fn load_weights(&self, spec: &ModelSpec, path: &Path) -> Result<Weights, ModelError> {
        TowerWeights::load(path, spec).map(Weights::new)
    }

    /// The item table the weights carry, when model.toml's `items` names
    /// it rather than a file (`None`: `items` is a file).
    fn embedded_items(
        &self,
        _spec: &ModelSpec,
        _weights: &Weights,
    ) -> Option<Result<ItemTable, ModelError>> {
        None
    }

    /// Builds the kind's forward pass on the CPU (its `cpu.rs`) from the
    /// weights [`Kind::load_weights`] read. Every kind has one: the CPU
    /// serves whatever a device does not.
    fn cpu(&self) -> CpuBuild;

    /// The kind's forward pass on the device (its `cuda.rs`); `None`: the
    /// CUDA backend does not run this kind, and its models are served from
    /// the CPU, saying so in `device_reason`.
    #[cfg(feature = "cuda")]
    fn device(&self) -> Option<&'static dyn DeviceKind> {
        None
    }
}

/// `size` recommend requests of `k` over a history of one item (none when the
/// table is empty): the warm-up batch of a retrieval kind, one row each.
pub(crate) fn recommend_batch(size: usize, rows: &[u32], k: usize) -> Vec<Query<'_>> {
    let history = &rows[..rows.len().min(1)];
    (0..size)
        .map(|_| Query {
            history,
            features: None,
            sparse: None,
            context: None,
            task: super::query::Task::TopK {
                k,
                exclude: &[],
                filter: None,
            },
        })
        .collect()
}

/// A model's kind: a cheap handle on its `Kind`, compared by name.
#[derive(Clone, Copy)]
pub struct ModelKind(&'static dyn Kind);

impl ModelKind {
    pub const fn new(kind: &'static dyn Kind) -> Self {
        Self(kind)
    }

    /// The kind model.toml names `name`.
    pub fn parse(name: &str) -> Result<Self, UnknownKind> {
        KINDS
            .iter()
            .copied()
            .find(|k| k.name() == name)
            .ok_or_else(|| UnknownKind(name.to_string()))
    }

    /// Every kind rankd serves.
    pub fn all() -> &'static [ModelKind] {
        KINDS
    }

    pub fn as_str(self) -> &'static str {
        self.0.name()
    }
}

impl std::ops::Deref for ModelKind {
    type Target = dyn Kind;

    fn deref(&self) -> &(dyn Kind + 'static) {
        self.0
    }
}

impl PartialEq for ModelKind {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for ModelKind {}

impl fmt::Debug for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for ModelKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ModelKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        ModelKind::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// A `kind` no model kind answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKind(pub String);

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = KINDS.iter().map(|k| k.as_str()).collect();
        write!(
            f,
            "unknown model kind `{}`, expected one of: {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownKind {}

/// A spec of `kind` with the default limits, for tests.
#[cfg(test)]
pub(crate) fn test_spec(kind: &str) -> ModelSpec {
    ModelSpec::parse(&format!(
        "kind = \"{kind}\"\ndim = 4\nhistory_len = 5\nitems = \"i.safetensors\"\n"
    ))
    .unwrap()
}

#[cfg(test)]
mod tests;
