//! A sasrec batch on the CPU: each user's last L items, left-padded,
//! embedded as E[s]·√d + P[position]; the blocks over all L positions (padded
//! ones take part in attention as keys and values, as in the reference),
//! except the last block, which computes only the last position, the one
//! the query vector is read from; then retrieval from the query vectors.
//! Written on the CPU backend's operations (`backend::cpu::ops`): every projection is
//! one GEMM over all B·L rows of the batch, attention computes only the
//! positions the causal mask lets through.

use super::{Block, BlockWeights, Norm, SasrecWeights};
use crate::backend::cpu::ops::{self, Attend, Linear};
use crate::backend::cpu::{err, Forward};
use crate::backend::{BackendError, ModelDesc, Query};
use crate::model::{ItemTable, Weights};

type Result<T> = std::result::Result<T, BackendError>;

struct AttentionBlock {
    attn_norm: Norm,
    /// The Q projection, and K and V as one `[2d, d]` matrix.
    q: Linear,
    kv: Linear,
    out: Linear,
    ffn_norm: Norm,
    conv1: Linear,
    conv2: Linear,
}

pub struct Sasrec {
    #[cfg_attr(not(test), allow(dead_code))]
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
    last_norm: Norm,
}

pub(super) fn build(desc: ModelDesc, weights: &Weights) -> Result<Box<dyn Forward>> {
    let w = weights
        .get::<SasrecWeights>()
        .ok_or_else(|| err("sasrec weights are not a SASRec checkpoint: this is a bug"))?;
    Ok(Box::new(Sasrec::new(desc, w)))
}

impl AttentionBlock {
    fn new(b: &BlockWeights, d: usize) -> Self {
        let (q_w, kv_w) = b.in_proj_weight.split_at(d * d);
        let (q_b, kv_b) = b.in_proj_bias.split_at(d);
        Self {
            attn_norm: b.attn_norm.clone(),
            q: Linear::new(q_w, q_b, d, d),
            kv: Linear::new(kv_w, kv_b, 2 * d, d),
            out: Linear::new(&b.out_proj_weight, &b.out_proj_bias, d, d),
            ffn_norm: b.ffn_norm.clone(),
            conv1: Linear::new(&b.conv1_weight, &b.conv1_bias, d, d),
            conv2: Linear::new(&b.conv2_weight, &b.conv2_bias, d, d),
        }
    }
}

impl Sasrec {
    pub fn new(desc: ModelDesc, w: &SasrecWeights) -> Self {
        let d = w.dim;
        Self {
            desc,
            d,
            len: w.history_len,
            heads: w.options.heads,
            block: w.options.block,
            eps: w.options.layer_norm_eps as f32,
            padding: w.padding.clone(),
            pos_emb: w.pos_emb.clone(),
            blocks: w.blocks.iter().map(|b| AttentionBlock::new(b, d)).collect(),
            last_norm: w.last_norm.clone(),
        }
    }

    /// The embedded, left-padded window of each query: `[B·L, d]`.
    fn inputs(&self, items: &ItemTable, queries: &[Query<'_>]) -> Vec<f32> {
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
        x
    }

    fn normed(&self, x: &[f32], n: &Norm) -> Vec<f32> {
        ops::layer_normed(x, self.d, &n.weight, &n.bias, self.eps)
    }

    fn norm(&self, x: &mut [f32], n: &Norm) {
        ops::layer_norm(x, self.d, &n.weight, &n.bias, self.eps);
    }

    /// `base + MHA(q_in, kv_in, kv_in)`, as `torch.nn.MultiheadAttention`
    /// computes it: `q_in` is `[B·L, d]` (`Causal`) or the last positions
    /// `[B, d]` (`Last`), `kv_in` `[B·L, d]`; `base` is shaped as `q_in`.
    fn attention(
        &self,
        blk: &AttentionBlock,
        q_in: &[f32],
        kv_in: &[f32],
        attend: Attend,
        mut base: Vec<f32>,
    ) -> Vec<f32> {
        let q = blk.q.forward(q_in);
        let attended = match attend {
            Attend::Causal => {
                let kv = blk.kv.forward(kv_in);
                ops::attention(&q, &kv, self.len, self.d, self.heads, attend)
            }
            Attend::Last => ops::attention_last(&q, kv_in, &blk.kv, self.len, self.d, self.heads),
        };
        ops::add_rows(&mut base, &blk.out.bias);
        blk.out.accumulate(&attended, &mut base);
        base
    }

    /// `y + FFN(y)` when `residual`, else `FFN(y)` alone.
    fn ffn(&self, blk: &AttentionBlock, y: &[f32], residual: bool) -> Vec<f32> {
        let mut h = blk.conv1.forward(y);
        ops::relu(&mut h);
        let mut out = if residual {
            y.to_vec()
        } else {
            vec![0f32; y.len()]
        };
        ops::add_rows(&mut out, &blk.conv2.bias);
        blk.conv2.accumulate(&h, &mut out);
        out
    }

    /// One block over `x` `[B·L, d]`: `[B·L, d]`, or with `Last`, only the
    /// last positions' outputs `[B, d]` (keys and values still cover all L).
    fn block(&self, blk: &AttentionBlock, x: &[f32], attend: Attend) -> Vec<f32> {
        let rows = |t: &[f32]| match attend {
            Attend::Causal => t.to_vec(),
            Attend::Last => ops::last_rows(t, self.len, self.d),
        };
        match self.block {
            Block::Sasrec => {
                // q = LN(x); x = q + MHA(q, x, x); x = LN(x); x + FFN(x).
                let q = match attend {
                    Attend::Causal => self.normed(x, &blk.attn_norm),
                    Attend::Last => {
                        let mut q = ops::last_rows(x, self.len, self.d);
                        self.norm(&mut q, &blk.attn_norm);
                        q
                    }
                };
                let mut y = self.attention(blk, &q, x, attend, q.clone());
                self.norm(&mut y, &blk.ffn_norm);
                self.ffn(blk, &y, true)
            }
            Block::PreLn => {
                // x + MHA(LN(x)), then y + FFN(LN(y)).
                let n = self.normed(x, &blk.attn_norm);
                let y = self.attention(blk, &rows(&n), &n, attend, rows(x));
                let mut f = self.ffn(blk, &self.normed(&y, &blk.ffn_norm), false);
                ops::add(&mut f, &y);
                f
            }
            Block::PostLn => {
                // LN(x + MHA(x)), then LN(y + FFN(y)).
                let q = rows(x);
                let mut y = self.attention(blk, &q, x, attend, q.clone());
                self.norm(&mut y, &blk.attn_norm);
                let mut out = self.ffn(blk, &y, true);
                self.norm(&mut out, &blk.ffn_norm);
                out
            }
        }
    }

    /// The query vector of each query, `d` values each, in order.
    pub fn queries(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Vec<f32>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let mut x = self.inputs(items, queries);
        let last = self.blocks.len() - 1;
        for (i, blk) in self.blocks.iter().enumerate() {
            let attend = if i == last {
                Attend::Last
            } else {
                Attend::Causal
            };
            x = self.block(blk, &x, attend);
        }
        self.norm(&mut x, &self.last_norm);
        Ok(x)
    }
}

#[cfg(test)]
impl Sasrec {
    /// A whole batch, as the backend answers it: the query vectors, then
    /// retrieval.
    fn run(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Vec<crate::backend::Output>> {
        let q = self.queries(items, queries)?;
        Ok(crate::backend::cpu::retrieve(
            self.desc.cpu_scoring,
            self.d,
            items,
            queries,
            &q,
        ))
    }
}

impl Forward for Sasrec {
    fn embed(&self, items: &ItemTable, queries: &[Query<'_>]) -> Option<Result<Vec<f32>>> {
        Some(self.queries(items, queries))
    }

    fn retrieves(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
