//! A sasrec batch on the CPU (candle): each user's last L items, left-padded,
//! embedded as E[s]·√d + P[position]; the blocks over all L positions (padded
//! ones take part in attention as keys and values, as in the reference),
//! except the last block, which computes only the last position, the one
//! the query vector is read from; then retrieval from the query vectors.

use candle_core::{Device, Tensor};
use candle_nn::ops::{layer_norm_slow, softmax_last_dim};
use candle_nn::{Linear, Module};

use super::{err, retrieve, Forward};
use crate::backend::{BackendError, ModelDesc, Output, Query};
use crate::model::kind::sasrec::{Block, BlockWeights, Norm, SasrecWeights};
use crate::model::{ItemTable, Weights};

type Result<T> = std::result::Result<T, BackendError>;

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

struct AttentionBlock {
    attn_norm: LayerNorm,
    /// The Q projection, and K and V as one `[2d, d]` matrix.
    q: Linear,
    kv: Linear,
    out: Linear,
    ffn_norm: LayerNorm,
    conv1: Linear,
    conv2: Linear,
}

pub struct Sasrec {
    desc: ModelDesc,
    d: usize,
    /// The window L.
    len: usize,
    heads: usize,
    block: Block,
    eps: f32,
    padding: Vec<f32>,
    pos_emb: Vec<f32>,
    blocks: Vec<AttentionBlock>,
    last_norm: LayerNorm,
    /// `[L, L]`: 0 where position t may attend to s (s ≤ t), -∞ elsewhere.
    causal: Tensor,
}

pub(super) fn build(desc: ModelDesc, weights: &Weights) -> Result<Box<dyn Forward>> {
    let w = weights
        .get::<SasrecWeights>()
        .ok_or_else(|| err("sasrec weights are not a SASRec checkpoint: this is a bug"))?;
    Ok(Box::new(Sasrec::new(desc, w)?))
}

fn tensor(values: &[f32], shape: &[usize]) -> Result<Tensor> {
    Tensor::from_slice(values, shape, &Device::Cpu).map_err(err)
}

fn linear(weight: &[f32], bias: &[f32], out: usize, input: usize) -> Result<Linear> {
    Ok(Linear::new(
        tensor(weight, &[out, input])?,
        Some(tensor(bias, &[out])?),
    ))
}

fn norm(n: &Norm) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: tensor(&n.weight, &[n.weight.len()])?,
        bias: tensor(&n.bias, &[n.bias.len()])?,
    })
}

impl AttentionBlock {
    fn new(b: &BlockWeights, d: usize) -> Result<Self> {
        let (q_w, kv_w) = b.in_proj_weight.split_at(d * d);
        let (q_b, kv_b) = b.in_proj_bias.split_at(d);
        Ok(Self {
            attn_norm: norm(&b.attn_norm)?,
            q: linear(q_w, q_b, d, d)?,
            kv: linear(kv_w, kv_b, 2 * d, d)?,
            out: linear(&b.out_proj_weight, &b.out_proj_bias, d, d)?,
            ffn_norm: norm(&b.ffn_norm)?,
            conv1: linear(&b.conv1_weight, &b.conv1_bias, d, d)?,
            conv2: linear(&b.conv2_weight, &b.conv2_bias, d, d)?,
        })
    }
}

impl Sasrec {
    pub fn new(desc: ModelDesc, w: &SasrecWeights) -> Result<Self> {
        let (d, len) = (w.dim, w.history_len);
        let causal: Vec<f32> = (0..len * len)
            .map(|i| {
                if i % len <= i / len {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Ok(Self {
            desc,
            d,
            len,
            heads: w.options.heads,
            block: w.options.block,
            eps: w.options.layer_norm_eps as f32,
            padding: w.padding.clone(),
            pos_emb: w.pos_emb.clone(),
            blocks: w
                .blocks
                .iter()
                .map(|b| AttentionBlock::new(b, d))
                .collect::<Result<_>>()?,
            last_norm: norm(&w.last_norm)?,
            causal: tensor(&causal, &[len, len])?,
        })
    }

    /// The embedded, left-padded window of each query: `[B, L, d]`.
    fn inputs(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Tensor> {
        let (d, len) = (self.d, self.len);
        let scale = (d as f32).sqrt();
        let mut x = vec![0f32; queries.len() * len * d];
        for (q, seq) in queries.iter().zip(x.chunks_exact_mut(len * d)) {
            let history = &q.history[q.history.len().saturating_sub(len)..];
            let pad = len - history.len();
            for (t, out) in seq.chunks_exact_mut(d).enumerate() {
                let (e, p) = if t < pad {
                    (self.padding.as_slice(), 0)
                } else {
                    (items.embedding(history[t - pad]), t + 1)
                };
                let pos = &self.pos_emb[p * d..(p + 1) * d];
                for ((o, &e), &p) in out.iter_mut().zip(e).zip(pos) {
                    *o = e * scale + p;
                }
            }
        }
        Tensor::from_vec(x, (queries.len(), len, d), &Device::Cpu).map_err(err)
    }

    /// Layer norm in two passes (mean, then the variance of the centred
    /// values), as PyTorch computes it: a one-pass E[x²] − mean² loses
    /// the variance of rows with a large mean, at an epsilon of 1e-8.
    fn norm(&self, x: &Tensor, n: &LayerNorm) -> candle_core::Result<Tensor> {
        layer_norm_slow(x, &n.weight, &n.bias, self.eps)
    }

    /// Multi-head attention of `q_in` `[B, Lq, d]` over `kv_in` `[B, L, d]`,
    /// as `torch.nn.MultiheadAttention` computes it; `mask` `[Lq, L]` is
    /// added to the logits.
    fn attention(
        &self,
        blk: &AttentionBlock,
        q_in: &Tensor,
        kv_in: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, lq, d) = q_in.dims3()?;
        let l = kv_in.dim(1)?;
        let (h, dh) = (self.heads, d / self.heads);
        let heads =
            |t: Tensor, rows: usize| t.reshape((b, rows, h, dh))?.transpose(1, 2)?.contiguous();
        let q = heads(blk.q.forward(q_in)?, lq)?;
        let kv = blk.kv.forward(kv_in)?;
        let k = heads(kv.narrow(2, 0, d)?, l)?;
        let v = heads(kv.narrow(2, d, d)?, l)?;
        let mut logits = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?;
        if let Some(mask) = mask {
            logits = logits.broadcast_add(mask)?;
        }
        let attended = softmax_last_dim(&logits)?.matmul(&v)?;
        let merged = attended.transpose(1, 2)?.reshape((b, lq, d))?;
        blk.out.forward(&merged)
    }

    fn ffn(&self, blk: &AttentionBlock, x: &Tensor) -> candle_core::Result<Tensor> {
        blk.conv2.forward(&blk.conv1.forward(x)?.relu()?)
    }

    /// One block over `x` `[B, L, d]`; with `last_only`, only the last
    /// position's output `[B, 1, d]` (keys and values still cover all L).
    fn block(
        &self,
        blk: &AttentionBlock,
        x: &Tensor,
        last_only: bool,
    ) -> candle_core::Result<Tensor> {
        let len = x.dim(1)?;
        let rows = |t: &Tensor| {
            if last_only {
                t.narrow(1, len - 1, 1)?.contiguous()
            } else {
                Ok(t.clone())
            }
        };
        let mask = (!last_only).then_some(&self.causal);
        match self.block {
            Block::Sasrec => {
                let q = rows(&self.norm(x, &blk.attn_norm)?)?;
                let y = (&q + self.attention(blk, &q, x, mask)?)?;
                let y = self.norm(&y, &blk.ffn_norm)?;
                &y + self.ffn(blk, &y)?
            }
            Block::PreLn => {
                let n = self.norm(x, &blk.attn_norm)?;
                let y = (rows(x)? + self.attention(blk, &rows(&n)?, &n, mask)?)?;
                let f = self.ffn(blk, &self.norm(&y, &blk.ffn_norm)?)?;
                &y + f
            }
            Block::PostLn => {
                let q = rows(x)?;
                let y = self.norm(&(&q + self.attention(blk, &q, x, mask)?)?, &blk.attn_norm)?;
                self.norm(&(&y + self.ffn(blk, &y)?)?, &blk.ffn_norm)
            }
        }
    }

    /// The query vector of each query, `d` values each, in order.
    pub fn queries(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Vec<f32>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let mut x = self.inputs(items, queries)?;
        let last = self.blocks.len() - 1;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = self.block(blk, &x, i == last).map_err(err)?;
        }
        self.norm(&x, &self.last_norm)
            .and_then(|q| q.flatten_all())
            .and_then(|q| q.to_vec1::<f32>())
            .map_err(err)
    }
}

impl Forward for Sasrec {
    fn run(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Vec<Output>> {
        let q = self.queries(items, queries)?;
        Ok(retrieve(self.desc.cpu_scoring, self.d, items, queries, &q))
    }
}

#[cfg(test)]
mod tests;
