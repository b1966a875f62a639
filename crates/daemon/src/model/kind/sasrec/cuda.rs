//! A sasrec batch on the device, as the CPU computes it (`cpu.rs` beside it):
//! each user's window of the last L items gathered from the resident table
//! (`sasrec_inputs`), then per block cuBLAS SGEMMs for the projections and
//! the feed-forward layers (bias and ReLU by `bias_act`), `layer_norm`, and
//! `attention` (causal over every position; the last block at the last
//! position only), then the last layer norm gives the query vectors, which
//! the fused top-k and the pair scores read as a two-tower's do. One wait
//! per batch. Before a version serves from here, the fallback checks its
//! answers against the CPU's (`backend/fallback.rs`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::{Block, Norm, SasrecWeights};
use crate::backend::cuda::error::{Ctx, GpuError};
use crate::backend::cuda::kind::{self, DeviceKind, DeviceWeights};
use crate::backend::cuda::mlp::{launch_bias_act, linear_gemm, ACT_NONE, ACT_RELU};
use crate::backend::cuda::ops::{grid, Dev, Scratch, SeqBufs};
use crate::backend::cuda::plan::{self, BatchSizes};
use crate::backend::cuda::tables::{Buf, DeviceTable};
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
        upload(stream, desc, weights)
    }

    fn batch_sizes(&self, desc: &ModelDesc, max_width: usize) -> BatchSizes {
        batch_sizes(desc, max_width)
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

/// Row index of a padded window position (`RANKD_NONE` in the kernels).
const NONE: u32 = u32::MAX;

/// The longest window the attention kernel takes: its logits live in 48 KiB
/// of shared memory (less the kernel's own 128 bytes). A longer one is served
/// from the CPU (the fallback's check says why).
const MAX_WINDOW: usize = 12_000;

struct DevLinear {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    out: usize,
    input: usize,
}

struct DevNorm {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
}

struct DevBlock {
    attn_norm: DevNorm,
    q: DevLinear,
    kv: DevLinear,
    out: DevLinear,
    ffn_norm: DevNorm,
    conv1: DevLinear,
    conv2: DevLinear,
}

/// A sasrec checkpoint on the device.
struct DeviceSasrec {
    d: usize,
    len: usize,
    heads: usize,
    block: Block,
    eps: f32,
    padding: CudaSlice<f32>,
    pos: CudaSlice<f32>,
    blocks: Vec<DevBlock>,
    last_norm: DevNorm,
}

fn up(stream: &Arc<CudaStream>, v: &[f32]) -> Result<CudaSlice<f32>, GpuError> {
    stream.clone_htod(v).ctx("uploading sasrec weights")
}

fn linear(
    stream: &Arc<CudaStream>,
    w: &[f32],
    b: &[f32],
    out: usize,
    input: usize,
) -> Result<DevLinear, GpuError> {
    Ok(DevLinear {
        w: up(stream, w)?,
        b: up(stream, b)?,
        out,
        input,
    })
}

fn norm(stream: &Arc<CudaStream>, n: &Norm) -> Result<DevNorm, GpuError> {
    Ok(DevNorm {
        w: up(stream, &n.weight)?,
        b: up(stream, &n.bias)?,
    })
}

fn upload(
    stream: &Arc<CudaStream>,
    _desc: &ModelDesc,
    weights: &Weights,
) -> Result<DeviceWeights, String> {
    let w = weights
        .get::<SasrecWeights>()
        .ok_or("sasrec weights are not a SASRec checkpoint: this is a bug")?;
    let d = w.dim;
    if w.history_len > MAX_WINDOW {
        return Err(format!(
            "the device's attention kernel holds a window of at most {MAX_WINDOW} positions in shared memory, history_len is {}",
            w.history_len
        ));
    }
    let e = |e: GpuError| e.to_string();
    let blocks = w
        .blocks
        .iter()
        .map(|b| {
            let (q_w, kv_w) = b.in_proj_weight.split_at(d * d);
            let (q_b, kv_b) = b.in_proj_bias.split_at(d);
            Ok(DevBlock {
                attn_norm: norm(stream, &b.attn_norm)?,
                q: linear(stream, q_w, q_b, d, d)?,
                kv: linear(stream, kv_w, kv_b, 2 * d, d)?,
                out: linear(stream, &b.out_proj_weight, &b.out_proj_bias, d, d)?,
                ffn_norm: norm(stream, &b.ffn_norm)?,
                conv1: linear(stream, &b.conv1_weight, &b.conv1_bias, d, d)?,
                conv2: linear(stream, &b.conv2_weight, &b.conv2_bias, d, d)?,
            })
        })
        .collect::<Result<Vec<_>, GpuError>>()
        .map_err(e)?;
    Ok(DeviceWeights::new(DeviceSasrec {
        d,
        len: w.history_len,
        heads: w.options.heads,
        block: w.options.block,
        eps: w.options.layer_norm_eps as f32,
        padding: up(stream, &w.padding).map_err(e)?,
        pos: up(stream, &w.pos_emb).map_err(e)?,
        blocks,
        last_norm: norm(stream, &w.last_norm).map_err(e)?,
    }))
}

/// A request is one batch row; the window holds `history_len` positions.
fn batch_sizes(desc: &ModelDesc, _max_width: usize) -> BatchSizes {
    let z = desc.bounds;
    let b = z.max_batch;
    BatchSizes {
        seq: b * z.history_len.max(1) * 2 * desc.dim,
        seq_rows: b * z.history_len.max(1),
        pairs: b * z.max_items,
        topk_out: b * z.max_k,
        ..plan::user_sizes(desc)
    }
}

fn launch1(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid(rows),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl DeviceSasrec {
    /// y[rows, out] = x[rows, in]·Wᵀ + b, then `act`.
    fn linear(
        &self,
        dev: &Dev<'_>,
        l: &DevLinear,
        x: &CudaSlice<f32>,
        rows: usize,
        y: &mut Buf<f32>,
        act: u32,
    ) -> Result<(), GpuError> {
        let y = y.reserve(dev.stream, rows * l.out)?;
        linear_gemm(dev.blas, &l.w, x, y, rows, l.input, l.out)?;
        launch_bias_act(dev.stream, &dev.k.bias_act, y, rows, l.out, &l.b, act)
    }

    fn layer_norm(
        &self,
        dev: &Dev<'_>,
        n: &DevNorm,
        x: &CudaSlice<f32>,
        rows: usize,
        out: &mut Buf<f32>,
    ) -> Result<(), GpuError> {
        let out = out.reserve(dev.stream, rows * self.d)?;
        self.launch_layer_norm(dev, n, x, out, rows)
    }

    /// The same norm over `buf` in place.
    fn layer_norm_in_place(
        &self,
        dev: &Dev<'_>,
        n: &DevNorm,
        buf: &Buf<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        self.launch_layer_norm(dev, n, buf.get(), buf.get(), rows)
    }

    fn launch_layer_norm(
        &self,
        dev: &Dev<'_>,
        n: &DevNorm,
        x: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let (d, eps) = (self.d as u32, self.eps);
        // SAFETY: matches layer_norm in sequence.cu; x and out hold rows·d
        // floats and may be the same buffer (each block reads its row before
        // writing it).
        unsafe {
            dev.stream
                .launch_builder(&dev.k.layer_norm)
                .arg(x)
                .arg(out)
                .arg(&d)
                .arg(&n.w)
                .arg(&n.b)
                .arg(&eps)
                .launch(rows_cfg(rows))
        }
        .ctx("layer_norm launch")?;
        Ok(())
    }

    fn add(
        &self,
        dev: &Dev<'_>,
        y: &mut Buf<f32>,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), GpuError> {
        let n32 = n as u32;
        // SAFETY: matches add_f32; y and x hold n floats.
        unsafe {
            dev.stream
                .launch_builder(&dev.k.add)
                .arg(y.get_mut())
                .arg(x)
                .arg(&n32)
                .launch(launch1(n))
        }
        .ctx("add launch")?;
        Ok(())
    }

    fn copy(
        &self,
        dev: &Dev<'_>,
        x: &CudaSlice<f32>,
        y: &mut Buf<f32>,
        n: usize,
    ) -> Result<(), GpuError> {
        let y = y.reserve(dev.stream, n)?;
        let n32 = n as u32;
        // SAFETY: matches copy_f32; x and y hold n floats.
        unsafe {
            dev.stream
                .launch_builder(&dev.k.copy)
                .arg(x)
                .arg(y)
                .arg(&n32)
                .launch(launch1(n))
        }
        .ctx("copy launch")?;
        Ok(())
    }

    /// The last position of each of `windows` windows of `x`.
    fn last_rows(
        &self,
        dev: &Dev<'_>,
        x: &CudaSlice<f32>,
        windows: usize,
        out: &mut Buf<f32>,
    ) -> Result<(), GpuError> {
        let out = out.reserve(dev.stream, windows * self.d)?;
        let (len, d) = (self.len as u32, self.d as u32);
        // SAFETY: matches last_rows; x holds windows·len·d floats, out windows·d.
        unsafe {
            dev.stream
                .launch_builder(&dev.k.last_rows)
                .arg(x)
                .arg(out)
                .arg(&len)
                .arg(&d)
                .launch(rows_cfg(windows))
        }
        .ctx("last_rows launch")?;
        Ok(())
    }

    /// Attention of `rows` query rows (`last`: one per window) over `kv`.
    fn attention(
        &self,
        dev: &Dev<'_>,
        q: &CudaSlice<f32>,
        kv: &CudaSlice<f32>,
        rows: usize,
        last: bool,
        out: &mut Buf<f32>,
    ) -> Result<(), GpuError> {
        let out = out.reserve(dev.stream, rows * self.d)?;
        let (len, d, heads, last32) = (
            self.len as u32,
            self.d as u32,
            self.heads as u32,
            u32::from(last),
        );
        let cfg = LaunchConfig {
            grid_dim: (rows.max(1) as u32, self.heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (self.len * 4) as u32,
        };
        // SAFETY: matches attention in sequence.cu; q and out hold rows·d
        // floats, kv windows·len·2d, the shared memory len floats.
        unsafe {
            dev.stream
                .launch_builder(&dev.k.attention)
                .arg(q)
                .arg(kv)
                .arg(out)
                .arg(&len)
                .arg(&d)
                .arg(&heads)
                .arg(&last32)
                .launch(cfg)
        }
        .ctx("attention launch")?;
        Ok(())
    }

    /// One block over `s.x` (`windows`·L rows); its output, `windows`·L rows
    /// or, for the last block, `windows` rows, is left in `s.o`.
    fn block(
        &self,
        dev: &Dev<'_>,
        blk: &DevBlock,
        s: &mut SeqBufs,
        windows: usize,
        last: bool,
    ) -> Result<(), GpuError> {
        let d = self.d;
        let all = windows * self.len;
        let rows = if last { windows } else { all };
        match self.block {
            Block::Sasrec => {
                // n = LN(x) at the query rows; y = n + MHA(n, x, x).
                if last {
                    self.last_rows(dev, s.x.get(), windows, &mut s.last)?;
                    self.layer_norm(dev, &blk.attn_norm, s.last.get(), rows, &mut s.n)?;
                } else {
                    self.layer_norm(dev, &blk.attn_norm, s.x.get(), rows, &mut s.n)?;
                }
                self.linear(dev, &blk.q, s.n.get(), rows, &mut s.q, ACT_NONE)?;
                self.linear(dev, &blk.kv, s.x.get(), all, &mut s.kv, ACT_NONE)?;
                self.attention(dev, s.q.get(), s.kv.get(), rows, last, &mut s.att)?;
                self.linear(dev, &blk.out, s.att.get(), rows, &mut s.y, ACT_NONE)?;
                self.add(dev, &mut s.y, s.n.get(), rows * d)?;
                self.layer_norm_in_place(dev, &blk.ffn_norm, &s.y, rows)?;
                self.ffn(dev, blk, s, rows)
            }
            Block::PreLn => {
                // n = LN(x); y = x + MHA(n, n, n); y + FFN(LN(y)).
                self.layer_norm(dev, &blk.attn_norm, s.x.get(), all, &mut s.n)?;
                self.linear(dev, &blk.kv, s.n.get(), all, &mut s.kv, ACT_NONE)?;
                if last {
                    self.last_rows(dev, s.n.get(), windows, &mut s.last)?;
                    self.linear(dev, &blk.q, s.last.get(), rows, &mut s.q, ACT_NONE)?;
                    self.last_rows(dev, s.x.get(), windows, &mut s.last)?;
                } else {
                    self.linear(dev, &blk.q, s.n.get(), rows, &mut s.q, ACT_NONE)?;
                    self.copy(dev, s.x.get(), &mut s.last, rows * d)?;
                }
                self.attention(dev, s.q.get(), s.kv.get(), rows, last, &mut s.att)?;
                self.linear(dev, &blk.out, s.att.get(), rows, &mut s.y, ACT_NONE)?;
                self.add(dev, &mut s.y, s.last.get(), rows * d)?;
                // h = relu(W1 LN(y)); o = y + W2 h.
                self.layer_norm(dev, &blk.ffn_norm, s.y.get(), rows, &mut s.n)?;
                self.linear(dev, &blk.conv1, s.n.get(), rows, &mut s.h, ACT_RELU)?;
                self.linear(dev, &blk.conv2, s.h.get(), rows, &mut s.o, ACT_NONE)?;
                self.add(dev, &mut s.o, s.y.get(), rows * d)
            }
            Block::PostLn => {
                // y = LN(q + MHA(q, x, x)); o = LN(y + FFN(y)).
                if last {
                    self.last_rows(dev, s.x.get(), windows, &mut s.last)?;
                } else {
                    self.copy(dev, s.x.get(), &mut s.last, rows * d)?;
                }
                self.linear(dev, &blk.q, s.last.get(), rows, &mut s.q, ACT_NONE)?;
                self.linear(dev, &blk.kv, s.x.get(), all, &mut s.kv, ACT_NONE)?;
                self.attention(dev, s.q.get(), s.kv.get(), rows, last, &mut s.att)?;
                self.linear(dev, &blk.out, s.att.get(), rows, &mut s.y, ACT_NONE)?;
                self.add(dev, &mut s.y, s.last.get(), rows * d)?;
                self.layer_norm_in_place(dev, &blk.attn_norm, &s.y, rows)?;
                self.ffn(dev, blk, s, rows)?;
                self.layer_norm_in_place(dev, &blk.ffn_norm, &s.o, rows)
            }
        }
    }

    /// o = y + W2 relu(W1 y + b1) + b2.
    fn ffn(
        &self,
        dev: &Dev<'_>,
        blk: &DevBlock,
        s: &mut SeqBufs,
        rows: usize,
    ) -> Result<(), GpuError> {
        self.linear(dev, &blk.conv1, s.y.get(), rows, &mut s.h, ACT_RELU)?;
        self.linear(dev, &blk.conv2, s.h.get(), rows, &mut s.o, ACT_NONE)?;
        self.add(dev, &mut s.o, s.y.get(), rows * self.d)
    }

    /// The query vectors of `queries`, `[B, d]`, left in `s.o`.
    fn forward(
        &self,
        dev: &Dev<'_>,
        table: &DeviceTable,
        s: &mut SeqBufs,
        queries: &[Query<'_>],
    ) -> Result<(), GpuError> {
        let (d, len) = (self.d, self.len);
        let b = queries.len();
        s.packed.clear();
        for q in queries {
            let h = &q.history[q.history.len().saturating_sub(len)..];
            s.packed.extend(std::iter::repeat_n(NONE, len - h.len()));
            s.packed.extend_from_slice(h);
        }
        s.rows.upload(dev.stream, &s.packed)?;
        let x = s.x.reserve(dev.stream, b * len * d)?;
        let (ld, d32, len32, scale) = (table.ld as u32, d as u32, len as u32, (d as f32).sqrt());
        // SAFETY: matches sasrec_inputs_* in sequence.cu; every packed row is
        // < table.rows (checked by the caller) or NONE; x holds b·len·d.
        unsafe {
            dev.stream
                .launch_builder(&dev.k.sasrec_inputs[table.dtype.index()])
                .arg(&table.emb)
                .arg(&ld)
                .arg(&d32)
                .arg(s.rows.get())
                .arg(&len32)
                .arg(&self.padding)
                .arg(&self.pos)
                .arg(&scale)
                .arg(x)
                .launch(rows_cfg(b * len))
        }
        .ctx("sasrec_inputs launch")?;
        let last = self.blocks.len() - 1;
        for (i, blk) in self.blocks.iter().enumerate() {
            self.block(dev, blk, s, b, i == last)?;
            if i != last {
                std::mem::swap(&mut s.x, &mut s.o);
            }
        }
        self.layer_norm_in_place(dev, &self.last_norm, &s.o, b)
    }
}

fn run(
    dev: &Dev<'_>,
    _desc: &ModelDesc,
    weights: &DeviceWeights,
    table: &DeviceTable,
    s: &mut Scratch,
    items: &ItemTable,
    queries: &[Query<'_>],
) -> Result<Vec<Output>, GpuError> {
    let m = weights.get::<DeviceSasrec>("sasrec weights")?;
    let pk = &mut s.packed;
    plan::pack_topk_into(&mut pk.topk, queries);
    plan::pack_pairs_into(&mut pk.pairs, queries);
    m.forward(dev, table, &mut s.seq, queries)?;
    let qv = s.seq.o.get();
    kind::answer(
        dev,
        table,
        &mut s.topk,
        &mut s.pairs,
        &s.packed,
        qv,
        m.d,
        items,
        queries,
    )
}
