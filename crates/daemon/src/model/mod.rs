//! Models as rankd serves them: the repository on disk (`models/<name>/<version>/`),
//! the tower weights and item tables read from it, and the demo repository.
//! The model kinds (`kind`) and the request types they speak in (`query`).
//! Everything here is plain host data; backends turn it into device state.

pub mod attributes;
pub mod demo;
pub mod int8;
pub mod items;
pub mod kind;
pub mod pipeline;
pub mod query;
pub mod repository;
pub mod spec;
pub mod weights;

use std::path::PathBuf;

/// The repository folder that holds shared item tables:
/// `catalogues/<name>/items.safetensors` is the catalogue `<name>`.
pub const CATALOGUES_DIR: &str = "catalogues";

pub use items::ItemTable;
pub use kind::ModelKind;
pub use query::{Op, OpKind, Query, Task};
pub use repository::{ModelEntry, Repository};
pub use spec::{CpuScoring, ItemDtype, ModelSpec};
pub use weights::{Layer, TowerWeights, Weights};

/// Why a model could not be loaded. Messages name the file, the tensor and
/// both shapes, so the fix is obvious from the log or `/v1/models`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// The device failed while loading or warming the model (or its table).
    #[error("{path}: the device failed loading or warming the model: {message}")]
    Device { path: PathBuf, message: String },
    #[error("{path}: invalid model.toml: {message}")]
    Spec { path: PathBuf, message: String },
    /// A graph that cannot be read, bound or run (onnx models).
    #[error("{path}: {message}")]
    Graph { path: PathBuf, message: String },
    #[error("{path}: invalid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: String,
        actual: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has dtype {actual}, expected {expected}")]
    Dtype {
        path: PathBuf,
        tensor: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Values {
        path: PathBuf,
        tensor: String,
        message: String,
    },
}
