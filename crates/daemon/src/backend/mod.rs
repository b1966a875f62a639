//! The contract between the executor and a compute device. It speaks in plain
//! host types (item-table rows, f32 slices), not candle or CUDA ones, so the
//! queue, the batcher and the servers build and test without any device code.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod fallback;
pub mod topk;

use crate::model::{CpuScoring, ItemDtype, ItemTable, ModelKind, ModelSpec, Weights};
pub use crate::model::{Query, Task};

/// An id the executor gives a backend: a plain number, printed as one, of
/// its own type so that ids of different things cannot be swapped.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(usize);

        impl $name {
            /// The largest id, which the executor's count never reaches.
            pub const MAX: Self = Self(usize::MAX);

            pub const fn new(n: usize) -> Self {
                Self(n)
            }

            /// The number.
            pub const fn get(self) -> usize {
                self.0
            }

            /// The id after this one.
            pub const fn next(self) -> Self {
                Self(self.0 + 1)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type! {
    /// A resident model version in the backend, and the key of its queue:
    /// the executor counts them up from 0 as versions are made resident. Not
    /// a model's index in the registry (`exec::ModelIndex`), which names a
    /// model, not one of its versions.
    ModelId
}

id_type! {
    /// An item table in the executor and the backend (models may share
    /// one): its index in the feature state, kept while it is resident.
    TableId
}

/// What a backend needs to know about a model besides its weights.
#[derive(Debug, Clone, Copy)]
pub struct ModelDesc {
    pub kind: ModelKind,
    pub dim: usize,
    pub user_feature_dim: usize,
    /// The largest batch the executor will hand over; a device backend sizes
    /// its batch buffers for it at load.
    pub bounds: BatchBounds,
    /// `cpu_scoring` in model.toml: the CPU backend's top-k scan (a device
    /// backend ignores it).
    pub cpu_scoring: CpuScoring,
}

impl ModelDesc {
    /// Widths of the tower's input and output layers, as the kind says.
    pub fn tower_dims(&self) -> (usize, usize) {
        self.kind.tower_dims(self.dim, self.user_feature_dim)
    }
}

/// The largest batch a model can be given, from its model.toml: requests
/// beyond these limits are refused before they reach a batch. All zero means
/// "unknown": buffers are then sized by the first batches instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchBounds {
    pub max_batch: usize,
    pub history_len: usize,
    /// Most ids in a stored history (`--history-max`): recommend excludes
    /// all of them.
    pub history_max: usize,
    pub max_k: usize,
    /// Candidates per score request.
    pub max_items: usize,
    /// Exclusions per recommend request, besides the user's history.
    pub max_exclude: usize,
}

impl BatchBounds {
    /// The model's limits, with stored histories of up to `history_max` ids.
    pub fn of(spec: &ModelSpec, history_max: usize) -> Self {
        Self {
            max_batch: spec.batching.max_batch_size,
            history_len: spec.history_len,
            history_max: history_max.max(spec.history_len),
            max_k: spec.limits.max_k,
            max_items: spec.limits.max_items,
            max_exclude: spec.limits.max_exclude,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub id: u64,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    TopK(Vec<Scored>),
    Scores(Vec<f32>),
}

/// Why a batch or a load failed, as the metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A kernel or library call could not be launched.
    Launch,
    OutOfMemory,
    /// The device faulted: its context is unusable until restart.
    Hardware,
    /// The driver is missing, too old or not initialised.
    Driver,
    Other,
}

impl Reason {
    /// The metric label: `launch`, `out_of_memory`, `hardware`, `driver`,
    /// `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Launch => "launch",
            Reason::OutOfMemory => "out_of_memory",
            Reason::Hardware => "hardware",
            Reason::Driver => "driver",
            Reason::Other => "other",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed batch. `Clone`, so one failure can be sent to every waiter.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{device}: {message}")]
pub struct BackendError {
    pub device: String,
    pub reason: Reason,
    pub message: String,
}

impl BackendError {
    pub fn new(device: impl Into<String>, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            reason,
            message: message.into(),
        }
    }
}

/// How a backend's device is doing, for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    pub healthy: bool,
    /// Why the device is not used right now, when it is not.
    pub reason: Option<String>,
}

pub trait Backend: Send {
    /// `cpu`, `cuda:0`, ...
    fn device(&self) -> String;

    /// Makes an item table resident, stored as `dtype` where the device has a
    /// choice. Called once per table, before the models that use it are loaded.
    fn load_table(
        &mut self,
        table: TableId,
        items: &ItemTable,
        dtype: ItemDtype,
    ) -> Result<(), BackendError>;

    /// Makes a model resident. Called once per model, before any `run`.
    /// `weights` are as the model's kind loaded them.
    fn load(
        &mut self,
        id: ModelId,
        desc: ModelDesc,
        table: TableId,
        weights: &Weights,
    ) -> Result<(), BackendError>;

    /// Whether this backend has a forward pass for models of `kind`. A
    /// device without one serves such models from the CPU copy, and stays
    /// in service for every other model.
    fn runs(&self, _kind: ModelKind) -> bool {
        true
    }

    /// Whether `run` honours a top-k task's `filter`. A backend that does
    /// not is never handed a filtered recommend: the fallback answers such
    /// batches from the CPU scan.
    fn filters(&self) -> bool {
        false
    }

    /// Why model `id` runs on the CPU rather than on this backend's device,
    /// when it does.
    fn cpu_reason(&self, _id: ModelId) -> Option<String> {
        None
    }

    /// Computes one batch. `items` is the host copy of record of the model's
    /// item table; a device backend keeps its own mirror in step with it.
    fn run(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, BackendError>;

    /// Whether this backend offers model `id`'s query vectors alone
    /// ([`Backend::embed`]) and answers from given ones
    /// ([`Backend::retrieve`]): a retrieval model whose tower runs apart
    /// from its scan. The executor then keeps each user's query vector and
    /// runs the tower only for users whose state changed.
    fn embeds(&self, _id: ModelId) -> bool {
        false
    }

    /// The query vectors of a batch of model `id` (its tower alone), `dim`
    /// values per query in order. Only called where [`Backend::embeds`].
    fn embed(
        &mut self,
        id: ModelId,
        _items: &ItemTable,
        _queries: &[Query<'_>],
    ) -> Result<Vec<f32>, BackendError> {
        Err(BackendError::new(
            self.device(),
            Reason::Other,
            format!("model {id} has no tower apart from its scan here: this is a bug"),
        ))
    }

    /// Answers a batch of model `id` from its query vectors `q` (`dim` values
    /// per query, in order), as `run` would after the tower. Only called
    /// where [`Backend::embeds`].
    fn retrieve(
        &mut self,
        id: ModelId,
        _items: &ItemTable,
        _queries: &[Query<'_>],
        _q: &[f32],
    ) -> Result<Vec<Output>, BackendError> {
        Err(BackendError::new(
            self.device(),
            Reason::Other,
            format!("model {id} has no scan apart from its tower here: this is a bug"),
        ))
    }

    /// `rows` of a table changed on the host (upserts, deletes, new rows at
    /// the end): bring any device copy in step before the next `run`.
    fn items_changed(
        &mut self,
        table: TableId,
        items: &ItemTable,
        rows: &[u32],
    ) -> Result<(), BackendError>;

    /// Frees a model made resident by `load`; its id may be used again.
    fn unload(&mut self, id: ModelId);

    /// Frees a table made resident by `load_table` (no model uses it now).
    fn unload_table(&mut self, table: TableId);

    /// Batch sizes to run once at load so none pays first-use costs later:
    /// the shapes this backend rounds batches up to, up to `max_batch`.
    fn warm_batch_sizes(&self, max_batch: usize) -> Vec<usize> {
        vec![max_batch]
    }

    fn health(&self) -> DeviceHealth {
        DeviceHealth {
            healthy: true,
            reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_keep_their_metric_labels() {
        let labels = [
            (Reason::Launch, "launch"),
            (Reason::OutOfMemory, "out_of_memory"),
            (Reason::Hardware, "hardware"),
            (Reason::Driver, "driver"),
            (Reason::Other, "other"),
        ];
        for (reason, label) in labels {
            assert_eq!(reason.as_str(), label);
            assert_eq!(reason.to_string(), label);
        }
        let e = BackendError::new("cuda:0", Reason::OutOfMemory, "allocating 2 GiB");
        assert_eq!(e.clone().to_string(), "cuda:0: allocating 2 GiB");
        assert_eq!(e.reason, Reason::OutOfMemory);
    }

    /// Ids print as the plain numbers they were, in logs and error texts.
    #[test]
    fn ids_print_as_numbers() {
        assert_eq!(ModelId::new(7).to_string(), "7");
        assert_eq!(format!("table {}", TableId::new(12)), "table 12");
        assert_eq!(ModelId::new(3).next(), ModelId::new(4));
        assert_eq!(TableId::MAX.to_string(), usize::MAX.to_string());
    }
}
