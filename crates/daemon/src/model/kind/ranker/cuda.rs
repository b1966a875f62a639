//! A ranker batch on the device: embedding bag → [h ‖ f ‖ e ‖ h⊙e] per
//! (user, candidate) pair → tower → sigmoid. Each candidate is a batch row.

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use crate::backend::cuda::error::{Ctx, GpuError};
use crate::backend::cuda::kind::{self, DeviceKind, DeviceWeights};
use crate::backend::cuda::mlp::ACT_SIGMOID;
use crate::backend::cuda::ops::{embedding_bag, grid, Dev, Scratch};
use crate::backend::cuda::plan::{self, bucket, BatchSizes};
use crate::backend::cuda::tables::DeviceTable;
use crate::backend::{ModelDesc, Output, Query, Task};
use crate::model::{ItemTable, Weights};

pub(super) struct Device;

impl DeviceKind for Device {
    fn upload(
        &self,
        stream: &Arc<CudaStream>,
        desc: &ModelDesc,
        weights: &Weights,
    ) -> Result<DeviceWeights, String> {
        kind::upload_mlp(stream, desc, weights)
    }

    /// A ranker is only asked score, and each candidate counts a row, so its
    /// batch holds at most the kind's largest batch in rows of pairs
    /// (`max(max_batch, max_items)`: a batch is closed before it passes
    /// `max_batch` rows, unless one request alone is larger). No top-k.
    fn batch_sizes(&self, desc: &ModelDesc, max_width: usize) -> BatchSizes {
        let z = desc.bounds;
        let pairs = z.max_batch.max(z.max_items);
        let (in_dim, _) = desc.tower_dims();
        BatchSizes {
            act: bucket(pairs) * max_width,
            pairs,
            rank_x: bucket(pairs) * in_dim,
            ..plan::user_sizes(desc)
        }
    }

    fn run(
        &self,
        dev: &Dev<'_>,
        desc: &ModelDesc,
        weights: &DeviceWeights,
        table: &DeviceTable,
        s: &mut Scratch,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, GpuError> {
        run(dev, desc, weights, table, s, items, queries)
    }
}

fn run(
    dev: &Dev<'_>,
    desc: &ModelDesc,
    weights: &DeviceWeights,
    table: &DeviceTable,
    s: &mut Scratch,
    _items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, GpuError> {
    let mlp = weights.mlp()?;
    if queries.iter().any(|q| matches!(q.task, Task::TopK { .. })) {
        return Err(GpuError::Invalid(
            "a ranker model cannot answer recommend: this is a bug".into(),
        ));
    }
    let fd = desc.user_feature_dim;
    let pk = &mut s.packed;
    plan::pack_pairs_into(&mut pk.pairs, queries);
    let np = pk.pairs.pair_q.len();
    if np == 0 {
        return Ok(plan::assemble(queries, Vec::new(), &[]));
    }
    plan::pack_users_into(&mut pk.users, queries, fd);
    let (users, pairs) = (&pk.users, &pk.pairs);
    embedding_bag(dev, table, &mut s.users, users, fd)?;
    let b = &mut s.pairs;
    b.pair_q.upload(dev.stream, &pairs.pair_q)?;
    b.pair_row.upload(dev.stream, &pairs.pair_row)?;
    // Padding rows up to the bucket are never read back (see embedding_bag).
    let rows = bucket(np);
    // 3d + fd, checked against the kind's tower width at load.
    b.rank_x.reserve(dev.stream, rows * mlp.in_dim())?;
    let (ld, d32, fd32) = (table.ld as u32, desc.dim as u32, fd as u32);
    let cfg = LaunchConfig {
        grid_dim: grid(np),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches ranker_inputs_* in embedding_bag.cu; np pairs, rows <
    // table.rows, query indices < B rows of xu.
    unsafe {
        dev.stream
            .launch_builder(&dev.k.ranker_inputs[table.dtype.index()])
            .arg(&table.emb)
            .arg(&ld)
            .arg(&d32)
            .arg(s.users.xu.get())
            .arg(&fd32)
            .arg(b.pair_q.get())
            .arg(b.pair_row.get())
            .arg(b.rank_x.get_mut())
            .launch(cfg)
    }
    .ctx("ranker_inputs launch")?;
    let which = mlp.forward(
        dev.stream,
        dev.blas,
        &dev.k.bias_act,
        b.rank_x.get(),
        rows,
        &mut s.act,
        ACT_SIGMOID,
    )?;
    b.scores.fetch(dev.stream, s.act[which].get(), np)?;
    dev.stream.synchronize().ctx("waiting for the batch")?;
    Ok(plan::assemble(queries, Vec::new(), b.scores.read()?))
}
