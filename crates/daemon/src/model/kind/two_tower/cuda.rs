//! A two-tower batch on the device: embedding bag → tower → fused top-k for
//! the recommend queries and pair scores for the score queries, with one
//! wait for the whole batch. A request is one batch row.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::backend::cuda::error::GpuError;
use crate::backend::cuda::kind::{self, DeviceKind, DeviceWeights};
use crate::backend::cuda::mlp::ACT_NONE;
use crate::backend::cuda::ops::{embedding_bag, Dev, Scratch};
use crate::backend::cuda::plan::{self, bucket, BatchSizes};
use crate::backend::cuda::tables::DeviceTable;
use crate::backend::{ModelDesc, Output, Query};
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

    /// A two-tower model may be asked both recommend and score, and a
    /// request counts one batch row: the tower runs over `max_batch` users,
    /// and score requests bring up to `max_items` pairs each.
    fn batch_sizes(&self, desc: &ModelDesc, max_width: usize) -> BatchSizes {
        let z = desc.bounds;
        let b = z.max_batch;
        BatchSizes {
            act: bucket(b) * max_width,
            pairs: b * z.max_items,
            topk_out: b * z.max_k,
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
    items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, GpuError> {
    let mlp = weights.mlp()?;
    let (d, fd) = (desc.dim, desc.user_feature_dim);
    let pk = &mut s.packed;
    plan::pack_users_into(&mut pk.users, queries, fd);
    plan::pack_topk_into(&mut pk.topk, queries);
    plan::pack_pairs_into(&mut pk.pairs, queries);
    embedding_bag(dev, table, &mut s.users, &pk.users, fd)?;
    let which = mlp.forward(
        dev.stream,
        dev.blas,
        &dev.k.bias_act,
        s.users.xu.get(),
        bucket(queries.len()),
        &mut s.act,
        ACT_NONE,
    )?;
    let qv = s.act[which].get();
    kind::answer(
        dev,
        table,
        &mut s.topk,
        &mut s.pairs,
        &s.packed,
        qv,
        d,
        items,
        queries,
    )
}
