//! Model kinds: everything particular to one kind of model (its `kind` name,
//! the requests it takes, batch rows per request, tower widths, warm-up
//! batches) lives in the kind's own file. A model's kind is resolved once,
//! when its model.toml is read; backends keep their own table of forward
//! passes per kind.

mod ranker;
mod two_tower;

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::query::{Op, OpKind, Query};

pub use ranker::RANKER;
pub use two_tower::TWO_TOWER;

/// Every kind a model.toml may name. A new kind adds its file and one entry.
const KINDS: &[ModelKind] = &[TWO_TOWER, RANKER];

/// What one kind of model is, apart from its forward pass (that lives with
/// each backend).
pub trait Kind: Sync {
    /// The `kind` value in model.toml and `/v1/models`.
    fn name(&self) -> &'static str;

    /// Whether a request of route `op` may reach `model`, a model of this
    /// kind; a refusal is the message the client gets.
    fn accepts(&self, model: &str, op: OpKind) -> Result<(), String>;

    /// Batch rows one request fills: what `max_batch_size` counts.
    fn rows(&self, op: &Op) -> usize;

    /// Widths of the tower's input and output layers, for items of `dim`
    /// and `user_feature_dim` dense user features.
    fn tower_dims(&self, dim: usize, user_feature_dim: usize) -> (usize, usize);

    /// The largest batch, in rows, the model must be warmed (and a device
    /// sized) for: a batch closes at `max_batch_size` rows, unless one
    /// request alone brings more.
    fn max_batch_rows(&self, max_batch_size: usize, max_items: usize) -> usize;

    /// The batch run once at load for warm-up size `size` (in rows), laid
    /// out as this kind's requests are. `rows` holds at least `size`
    /// item-table rows to use, or none when the table is empty.
    fn warm_batch<'a>(&self, size: usize, rows: &'a [u32]) -> Vec<Query<'a>>;
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

#[cfg(test)]
mod tests;
