//! The device side of each model kind, in a file per kind: how large its
//! batch buffers must be and its forward pass (the launches of `ops` strung
//! together). The backend looks a model's entry up once, when it is loaded.

mod ranker;
mod two_tower;

use super::error::GpuError;
use super::mlp::DeviceMlp;
use super::ops::{Dev, Scratch};
use super::plan::BatchSizes;
use super::tables::DeviceTable;
use crate::backend::{ModelDesc, Output, Query};
use crate::model::{ItemTable, ModelKind};

/// One batch of a model on the device. `items` is the host copy of the
/// model's table (ids for decoding top-k rows).
pub type Run = fn(
    &Dev<'_>,
    &ModelDesc,
    &DeviceMlp,
    &DeviceTable,
    &mut Scratch,
    &ItemTable,
    &[Query<'_>],
) -> Result<Vec<Output>, GpuError>;

/// A model kind as the CUDA backend runs it.
pub struct DeviceKind {
    pub kind: ModelKind,
    /// Element counts of the batch buffers for the largest batch
    /// `desc.bounds` allows; `max_width` is the widest layer output of the
    /// model's tower.
    pub batch_sizes: fn(desc: &ModelDesc, max_width: usize) -> BatchSizes,
    pub run: Run,
}

/// The device side of every kind. A new kind adds its file and one entry.
const KINDS: &[&DeviceKind] = &[&two_tower::KIND, &ranker::KIND];

/// The device side of `kind`, when the CUDA backend runs that kind.
pub fn find(kind: ModelKind) -> Option<&'static DeviceKind> {
    KINDS.iter().copied().find(|k| k.kind == kind)
}
