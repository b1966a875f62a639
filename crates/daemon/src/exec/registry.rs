//! What the servers know about each model: its spec, load state and the
//! admission to its queue. Shared read-mostly between the servers and the
//! executor, which alone moves a model from loading to ready or failed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::batch::Admission;
use std::sync::{Arc, RwLock};

use crate::backend::DeviceHealth;
use crate::model::ModelSpec;

#[derive(Debug, Clone, PartialEq)]
pub enum LoadState {
    Loading,
    Ready,
    Failed(String),
}

impl LoadState {
    pub fn as_str(&self) -> &'static str {
        match self {
            LoadState::Loading => "loading",
            LoadState::Ready => "ready",
            LoadState::Failed(_) => "failed",
        }
    }
}

#[derive(Debug)]
pub struct ServedModel {
    pub name: String,
    pub version: u64,
    /// `None` when model.toml itself could not be read.
    pub spec: Option<ModelSpec>,
    state: RwLock<LoadState>,
    /// Slots of the model's queue (`max_queue_size`); none without a spec.
    admission: Option<Admission>,
    items: AtomicUsize,
}

impl ServedModel {
    pub fn new(name: String, version: u64, spec: Option<ModelSpec>, state: LoadState) -> Self {
        let admission = spec
            .as_ref()
            .map(|s| Admission::new(s.batching.max_queue_size));
        Self {
            name,
            version,
            spec,
            state: RwLock::new(state),
            admission,
            items: AtomicUsize::new(0),
        }
    }

    pub fn state(&self) -> LoadState {
        self.state.read().expect("state lock poisoned").clone()
    }

    pub fn set_state(&self, state: LoadState) {
        *self.state.write().expect("state lock poisoned") = state;
    }

    pub fn admission(&self) -> Option<&Admission> {
        self.admission.as_ref()
    }

    /// Requests admitted and still waiting in the queue.
    pub fn queued(&self) -> usize {
        self.admission.as_ref().map_or(0, Admission::depth)
    }

    pub fn item_count(&self) -> usize {
        self.items.load(Ordering::Relaxed)
    }

    pub fn set_item_count(&self, n: usize) {
        self.items.store(n, Ordering::Relaxed);
    }
}

/// All models of the repository, in a fixed order: a model's index is its
/// `ModelId` in the executor.
#[derive(Debug)]
pub struct Registry {
    models: Vec<Arc<ServedModel>>,
    by_name: HashMap<String, usize>,
    device: RwLock<String>,
    /// Why the GPU is not used, when it is not.
    device_reason: RwLock<Option<String>>,
    health: RwLock<DeviceHealth>,
}

impl Registry {
    pub fn new(models: Vec<ServedModel>) -> Self {
        let by_name = models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        Self {
            models: models.into_iter().map(Arc::new).collect(),
            by_name,
            device: RwLock::new("cpu".into()),
            device_reason: RwLock::new(None),
            health: RwLock::new(DeviceHealth {
                healthy: true,
                reason: None,
            }),
        }
    }

    pub fn get(&self, name: &str) -> Option<(usize, &Arc<ServedModel>)> {
        self.by_name.get(name).map(|&i| (i, &self.models[i]))
    }

    pub fn by_id(&self, id: usize) -> &Arc<ServedModel> {
        &self.models[id]
    }

    pub fn models(&self) -> &[Arc<ServedModel>] {
        &self.models
    }

    pub fn device(&self) -> String {
        self.device.read().expect("device lock poisoned").clone()
    }

    pub fn set_device(&self, device: String) {
        *self.device.write().expect("device lock poisoned") = device;
    }

    pub fn device_reason(&self) -> Option<String> {
        self.device_reason
            .read()
            .expect("device lock poisoned")
            .clone()
    }

    pub fn set_device_reason(&self, reason: Option<String>) {
        *self.device_reason.write().expect("device lock poisoned") = reason;
    }

    pub fn health(&self) -> DeviceHealth {
        self.health.read().expect("health lock poisoned").clone()
    }

    pub fn set_health(&self, health: DeviceHealth) {
        *self.health.write().expect("health lock poisoned") = health;
    }

    /// `None` when every model is ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.models.is_empty() {
            return Some("no models in the repository".into());
        }
        let reasons: Vec<String> = self
            .models
            .iter()
            .filter_map(|m| match m.state() {
                LoadState::Ready => None,
                LoadState::Loading => Some(format!("{}: loading", m.name)),
                LoadState::Failed(why) => Some(format!("{}: failed: {why}", m.name)),
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    pub fn ready_count(&self) -> usize {
        self.models
            .iter()
            .filter(|m| m.state() == LoadState::Ready)
            .count()
    }
}
