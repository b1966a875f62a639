//! The device side every model kind shares. Each kind with a device forward
//! pass implements [`DeviceKind`] in its own folder
//! (`model/kind/<name>/cuda.rs`: how large its batch buffers must be, its
//! weights on the device, and its forward pass, the launches of `ops` strung
//! together), and the backend finds it through the kind
//! ([`crate::model::kind::Kind::device`]) once, when a model is loaded. Here:
//! that trait, the weights' holder, the upload of a tower of linear layers,
//! and the retrieval tail of a kind with query vectors ([`answer`]).

use std::any::Any;
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
use crate::model::{ItemTable, Weights};

/// A model's weights on the device, as its kind uploaded them: the kind's
/// own type, which the kind reads back in its forward pass
/// ([`DeviceWeights::get`]).
pub struct DeviceWeights {
    weights: Box<dyn Any + Send>,
    /// The widest layer output of a tower; 0 for weights that are not one.
    max_width: usize,
}

impl DeviceWeights {
    /// A kind's own weights on the device.
    pub fn new<T: Any + Send>(weights: T) -> Self {
        Self {
            weights: Box::new(weights),
            max_width: 0,
        }
    }

    /// A tower of linear layers (two_tower, ranker).
    pub fn tower(mlp: DeviceMlp) -> Self {
        Self {
            max_width: mlp.max_width(),
            weights: Box::new(mlp),
        }
    }

    /// The weights as the kind's own type `T`; `what` names them in the
    /// error when they are not (a bug).
    pub fn get<T: Any>(&self, what: &str) -> Result<&T, GpuError> {
        self.weights.downcast_ref().ok_or_else(|| {
            GpuError::Invalid(format!("{what} are not on the device: this is a bug"))
        })
    }

    /// The widest layer output of a tower (what each activation buffer
    /// holds per row); 0 for weights that are not one.
    pub fn max_width(&self) -> usize {
        self.max_width
    }

    /// The tower of a kind whose weights are one.
    pub fn mlp(&self) -> Result<&DeviceMlp, GpuError> {
        self.weights.downcast_ref().ok_or_else(|| {
            GpuError::Invalid(
                "the model's weights on the device are not a tower: this is a bug".into(),
            )
        })
    }
}

/// A model kind as the CUDA backend runs it: what a kind's
/// [`crate::model::kind::Kind::device`] answers.
pub trait DeviceKind: Sync {
    /// Puts the weights (as the kind loaded them) on the device, checking
    /// they fit `desc`; the error says why not.
    fn upload(
        &self,
        stream: &Arc<CudaStream>,
        desc: &ModelDesc,
        weights: &Weights,
    ) -> Result<DeviceWeights, String>;

    /// Element counts of the batch buffers for the largest batch
    /// `desc.bounds` allows; `max_width` is the widest layer output of the
    /// model's tower ([`DeviceWeights::max_width`]).
    fn batch_sizes(&self, desc: &ModelDesc, max_width: usize) -> BatchSizes;

    /// One batch of a model on the device. `items` is the host copy of the
    /// model's table (ids for decoding top-k rows).
    fn run(
        &self,
        dev: &Dev<'_>,
        desc: &ModelDesc,
        weights: &DeviceWeights,
        table: &DeviceTable,
        scratch: &mut Scratch,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, GpuError>;
}

/// The upload of a kind whose weights are a tower of linear layers of the
/// widths `desc` says.
pub fn upload_mlp(
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
    Ok(DeviceWeights::tower(mlp))
}

/// The answers of a retrieval model's batch from its query vectors `qv`
/// (`d` values per query, on the device): the fused top-k of the recommend
/// queries and the pair scores of the score queries, queued, then one wait.
pub fn answer(
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
