//! The device side of each model kind, in a file per kind: how large its
//! batch buffers must be and its forward pass (the launches of `ops` strung
//! together). The backend looks a model's entry up once, when it is loaded.

mod ranker;
pub mod sasrec;
mod two_tower;

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::error::Ctx;
use super::error::GpuError;
use super::mlp::DeviceMlp;
use super::ops::{
    score_pairs_launch, topk_decode, topk_fetch, topk_launch, Dev, Packed, PairBufs, Scratch,
    TopkBufs,
};
use super::plan::BatchSizes;
use super::tables::DeviceTable;
use crate::backend::{ModelDesc, Output, Query};
use crate::model::{ItemTable, ModelKind, Weights};

/// A model's weights on the device, as its kind uploaded them.
pub enum DeviceWeights {
    /// A tower of linear layers (two_tower, ranker).
    Mlp(DeviceMlp),
    Sasrec(Box<sasrec::DeviceSasrec>),
}

impl DeviceWeights {
    /// The widest layer output of a tower (what each activation buffer
    /// holds per row); 0 for weights that are not one.
    pub fn max_width(&self) -> usize {
        match self {
            DeviceWeights::Mlp(m) => m.max_width(),
            DeviceWeights::Sasrec(_) => 0,
        }
    }

    /// The tower of a kind whose weights are one.
    pub fn mlp(&self) -> Result<&DeviceMlp, GpuError> {
        match self {
            DeviceWeights::Mlp(m) => Ok(m),
            _ => Err(GpuError::Invalid(
                "the model's weights on the device are not a tower: this is a bug".into(),
            )),
        }
    }
}

/// One batch of a model on the device. `items` is the host copy of the
/// model's table (ids for decoding top-k rows).
pub type Run = fn(
    &Dev<'_>,
    &ModelDesc,
    &DeviceWeights,
    &DeviceTable,
    &mut Scratch,
    &ItemTable,
    &[Query<'_>],
) -> Result<Vec<Output>, GpuError>;

/// A model kind as the CUDA backend runs it.
pub struct DeviceKind {
    pub kind: ModelKind,
    /// Puts the weights (as the kind loaded them) on the device, checking
    /// they fit `desc`; the error says why not.
    pub upload: fn(&Arc<CudaStream>, &ModelDesc, &Weights) -> Result<DeviceWeights, String>,
    /// Element counts of the batch buffers for the largest batch
    /// `desc.bounds` allows; `max_width` is the widest layer output of the
    /// model's tower ([`DeviceWeights::max_width`]).
    pub batch_sizes: fn(desc: &ModelDesc, max_width: usize) -> BatchSizes,
    pub run: Run,
}

/// The device side of every kind. A new kind adds its file and one entry.
const KINDS: &[&DeviceKind] = &[&two_tower::KIND, &ranker::KIND, &sasrec::KIND];

/// The upload of a kind whose weights are a tower of linear layers of the
/// widths `desc` says.
fn upload_mlp(
    stream: &Arc<CudaStream>,
    desc: &ModelDesc,
    weights: &Weights,
) -> Result<DeviceWeights, String> {
    let w = weights
        .get::<crate::model::TowerWeights>()
        .ok_or_else(|| format!("{} weights are not a tower: this is a bug", desc.kind))?;
    let mlp = DeviceMlp::upload(stream, w).map_err(|e| e.to_string())?;
    let (want_in, want_out) = desc.tower_dims();
    if (mlp.in_dim(), mlp.out_dim()) != (want_in, want_out) {
        return Err(format!(
            "tower maps {} -> {}, a {} model needs {want_in} -> {want_out}",
            mlp.in_dim(),
            mlp.out_dim(),
            desc.kind.as_str()
        ));
    }
    Ok(DeviceWeights::Mlp(mlp))
}

/// The device side of `kind`, when the CUDA backend runs that kind.
pub fn find(kind: ModelKind) -> Option<&'static DeviceKind> {
    KINDS.iter().copied().find(|k| k.kind == kind)
}

/// The answers of a retrieval model's batch from its query vectors `qv`
/// (`d` values per query, on the device): the fused top-k of the recommend
/// queries and the pair scores of the score queries, queued, then one wait.
pub(super) fn answer(
    dev: &Dev<'_>,
    table: &DeviceTable,
    topk_bufs: &mut TopkBufs,
    pair_bufs: &mut PairBufs,
    packed: &Packed,
    qv: &cudarc::driver::CudaSlice<f32>,
    d: usize,
    items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, GpuError> {
    let (t, pairs) = (&packed.topk, &packed.pairs);
    let topk = if t.qsel.is_empty() || t.kmax == 0 {
        None
    } else {
        let p = topk_launch(dev, table, topk_bufs, qv, d, t)?;
        topk_fetch(dev, topk_bufs, &p)?;
        Some(p)
    };
    score_pairs_launch(dev, table, pair_bufs, qv, pairs)?;
    dev.stream.synchronize().ctx("waiting for the batch")?;
    let lists = match &topk {
        Some(p) => topk_decode(topk_bufs, p, t, items.ids())?,
        None => vec![Vec::new(); t.qsel.len()],
    };
    Ok(super::plan::assemble(
        queries,
        lists,
        pair_bufs.scores.read()?,
    ))
}
