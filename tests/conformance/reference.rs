//! The f64 reference of the conformance suite: each kind's math (docs/models.md)
//! computed in f64 from the fixture tensors, read from the safetensors files
//! with the `safetensors` crate alone (never through rankd's loaders), over a
//! catalogue that the suite mutates as it mutates the daemon's.
//!
//! - `two_tower`: h = mean of the rows of the newest `history_len` history
//!   ids (zeros for none), x = [h ‖ f], q = Linear/ReLU layers (none after
//!   the last), score(i) = E[i]·q.
//! - `ranker`: x = [h ‖ f ‖ E[c] ‖ h⊙E[c]] → Linear/ReLU layers → one logit
//!   → sigmoid.
//! - `sasrec`: the window is the newest L ids, left-padded to L; x_t =
//!   E[s_t]·√d + P[p_t] (p_t = t for an item, 0 and row 0 of `item_emb` for
//!   padding); each block is causal multi-head attention as
//!   `torch.nn.MultiheadAttention` and a kernel-1 conv FFN, in the `sasrec`,
//!   `pre_ln` or `post_ln` arrangement; q = LN_last(x_L), score(i) = E[i]·q.
//! - `recommend`: every live item but the user's whole stored history and the
//!   request's `exclude`, best first, ties to the smaller id.
//!
//! A deleted item leaves the results (a recommend never returns it, a score
//! may not name it) but keeps its row: a history that holds it still reads
//! its embedding.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

/// A tensor of a safetensors file, as f64.
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    /// Row `i` of a 2-D (or [rows, cols, 1]) tensor.
    pub fn row(&self, i: usize) -> Vec<f64> {
        let cols: usize = self.shape[1..].iter().product();
        self.data[i * cols..(i + 1) * cols].to_vec()
    }

    pub fn rows(&self) -> usize {
        self.shape[0]
    }
}

/// Every tensor of a safetensors file: F32 ones as f64, U64 ones (item ids)
/// apart.
pub struct Tensors {
    pub floats: HashMap<String, Tensor>,
    pub ids: HashMap<String, Vec<u64>>,
    path: String,
}

impl Tensors {
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: not safetensors: {e}", path.display()));
        let mut floats = HashMap::new();
        let mut ids = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            match view.dtype() {
                Dtype::F32 => {
                    let values = data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                        .collect();
                    floats.insert(
                        name,
                        Tensor {
                            shape: view.shape().to_vec(),
                            data: values,
                        },
                    );
                }
                Dtype::U64 => {
                    let values = data
                        .chunks_exact(8)
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    ids.insert(name, values);
                }
                other => panic!("{}: tensor {name} is {other:?}", path.display()),
            }
        }
        Self {
            floats,
            ids,
            path: path.display().to_string(),
        }
    }

    pub fn get(&self, name: &str) -> &Tensor {
        self.floats
            .get(name)
            .unwrap_or_else(|| panic!("{}: no f32 tensor {name}", self.path))
    }

    fn take(&mut self, name: &str) -> Tensor {
        self.floats
            .remove(name)
            .unwrap_or_else(|| panic!("{}: no f32 tensor {name}", self.path))
    }
}

/// An item table: ids, rows (f64 of the stored f32) and liveness.
#[derive(Clone)]
pub struct Catalogue {
    ids: Vec<u64>,
    rows: Vec<Vec<f64>>,
    deleted: Vec<bool>,
    index: HashMap<u64, usize>,
}

impl Catalogue {
    pub fn new(ids: Vec<u64>, rows: Vec<Vec<f64>>) -> Self {
        assert_eq!(ids.len(), rows.len());
        let index = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        Self {
            deleted: vec![false; ids.len()],
            ids,
            rows,
            index,
        }
    }

    /// An item table file: `ids` U64 [N], `embeddings` F32 [N, d].
    pub fn read(path: &Path) -> Self {
        let t = Tensors::read(path);
        let ids = t.ids.get("ids").expect("an item table has `ids`").clone();
        let emb = t.get("embeddings");
        assert_eq!(emb.rows(), ids.len());
        let rows = (0..ids.len()).map(|i| emb.row(i)).collect();
        Self::new(ids, rows)
    }

    /// The item's row, deleted or not (None: the catalogue never held it).
    pub fn row(&self, id: u64) -> Option<&[f64]> {
        self.index.get(&id).map(|&i| self.rows[i].as_slice())
    }

    pub fn is_live(&self, id: u64) -> bool {
        self.index.get(&id).is_some_and(|&i| !self.deleted[i])
    }

    /// Live ids in table order.
    pub fn live_ids(&self) -> Vec<u64> {
        self.ids
            .iter()
            .zip(&self.deleted)
            .filter(|(_, d)| !**d)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn dim(&self) -> usize {
        self.rows[0].len()
    }

    /// An embedding write of an existing item.
    pub fn write(&mut self, id: u64, row: &[f64]) {
        let i = self.index[&id];
        assert_eq!(row.len(), self.dim());
        self.rows[i] = row.to_vec();
    }

    pub fn delete(&mut self, id: u64) {
        let i = self.index[&id];
        self.deleted[i] = true;
    }
}

/// A Linear layer: y = W x + b, W stored [out, in].
#[derive(Clone)]
pub struct Linear {
    w: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl Linear {
    fn new(w: &Tensor, b: &Tensor) -> Self {
        let out = w.shape[0];
        let inp: usize = w.shape[1..].iter().product();
        assert_eq!(b.data.len(), out, "bias of a [{out}, {inp}] weight");
        Self {
            w: (0..out).map(|o| w.row(o)).collect(),
            b: b.data.clone(),
        }
    }

    /// Rows `from..to` of the weight and bias (a slice of a packed
    /// projection).
    fn slice(w: &Tensor, b: &Tensor, from: usize, to: usize) -> Self {
        Self {
            w: (from..to).map(|o| w.row(o)).collect(),
            b: b.data[from..to].to_vec(),
        }
    }

    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        self.w
            .iter()
            .zip(&self.b)
            .map(|(row, b)| {
                assert_eq!(row.len(), x.len(), "layer input width");
                b + row.iter().zip(x).map(|(w, x)| w * x).sum::<f64>()
            })
            .collect()
    }
}

/// Linear layers with ReLU between them (none after the last).
#[derive(Clone)]
pub struct Mlp(Vec<Linear>);

impl Mlp {
    /// `tower.<i>.weight|bias`, i = 0, 1, ... of a weights file.
    pub fn read(path: &Path) -> Self {
        let t = Tensors::read(path);
        let mut layers = Vec::new();
        while let (Some(w), Some(b)) = (
            t.floats.get(&format!("tower.{}.weight", layers.len())),
            t.floats.get(&format!("tower.{}.bias", layers.len())),
        ) {
            layers.push(Linear::new(w, b));
        }
        assert!(!layers.is_empty(), "{}: no tower layers", path.display());
        Self(layers)
    }

    pub fn apply(&self, mut x: Vec<f64>) -> Vec<f64> {
        for (i, l) in self.0.iter().enumerate() {
            x = l.apply(&x);
            if i + 1 < self.0.len() {
                x.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        x
    }
}

/// The block arrangement of a sasrec model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrangement {
    Sasrec,
    PreLn,
    PostLn,
}

impl Arrangement {
    pub fn of(block: &str) -> Self {
        match block {
            "sasrec" => Self::Sasrec,
            "pre_ln" => Self::PreLn,
            "post_ln" => Self::PostLn,
            other => panic!("unknown block arrangement {other}"),
        }
    }
}

#[derive(Clone)]
struct LayerNorm {
    w: Vec<f64>,
    b: Vec<f64>,
    eps: f64,
}

impl LayerNorm {
    fn new(t: &Tensors, name: &str, eps: f64) -> Self {
        Self {
            w: t.get(&format!("{name}.weight")).data.clone(),
            b: t.get(&format!("{name}.bias")).data.clone(),
            eps,
        }
    }

    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        x.iter()
            .zip(&self.w)
            .zip(&self.b)
            .map(|((v, w), b)| (v - mean) * inv * w + b)
            .collect()
    }

    fn all(&self, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        xs.iter().map(|x| self.apply(x)).collect()
    }
}

#[derive(Clone)]
struct Block {
    ln_attn: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln_fwd: LayerNorm,
    conv1: Linear,
    conv2: Linear,
}

#[derive(Clone)]
pub struct Sasrec {
    dim: usize,
    heads: usize,
    window: usize,
    arrangement: Arrangement,
    /// Row 0 of `item_emb.weight`: the padding's embedding.
    padding: Vec<f64>,
    /// `pos_emb.weight`, [L + 1, d].
    positions: Vec<Vec<f64>>,
    blocks: Vec<Block>,
    last: LayerNorm,
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot product widths");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Sasrec {
    /// The model of a state_dict saved as safetensors, and its catalogue
    /// (`item_emb.weight` rows 1..N as items 1..N).
    pub fn read(
        path: &Path,
        blocks: usize,
        heads: usize,
        arrangement: Arrangement,
    ) -> (Self, Catalogue) {
        let mut t = Tensors::read(path);
        let eps = 1e-8;
        let items = t.take("item_emb.weight");
        let dim = items.shape[1];
        let n = items.rows() - 1;
        let catalogue = Catalogue::new(
            (1..=n as u64).collect(),
            (1..=n).map(|i| items.row(i)).collect(),
        );
        let pos = t.take("pos_emb.weight");
        let blocks = (0..blocks)
            .map(|i| {
                let w = t.get(&format!("attention_layers.{i}.in_proj_weight"));
                let b = t.get(&format!("attention_layers.{i}.in_proj_bias"));
                assert_eq!(w.shape, [3 * dim, dim]);
                Block {
                    ln_attn: LayerNorm::new(&t, &format!("attention_layernorms.{i}"), eps),
                    q: Linear::slice(w, b, 0, dim),
                    k: Linear::slice(w, b, dim, 2 * dim),
                    v: Linear::slice(w, b, 2 * dim, 3 * dim),
                    out: Linear::new(
                        t.get(&format!("attention_layers.{i}.out_proj.weight")),
                        t.get(&format!("attention_layers.{i}.out_proj.bias")),
                    ),
                    ln_fwd: LayerNorm::new(&t, &format!("forward_layernorms.{i}"), eps),
                    conv1: Linear::new(
                        t.get(&format!("forward_layers.{i}.conv1.weight")),
                        t.get(&format!("forward_layers.{i}.conv1.bias")),
                    ),
                    conv2: Linear::new(
                        t.get(&format!("forward_layers.{i}.conv2.weight")),
                        t.get(&format!("forward_layers.{i}.conv2.bias")),
                    ),
                }
            })
            .collect();
        let model = Self {
            dim,
            heads,
            window: pos.rows() - 1,
            arrangement,
            padding: items.row(0),
            positions: (0..pos.rows()).map(|i| pos.row(i)).collect(),
            blocks,
            last: LayerNorm::new(&t, "last_layernorm", eps),
        };
        (model, catalogue)
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Causal multi-head attention of queries `q` over keys and values `kv`
    /// (position t sees positions ≤ t), then the output projection.
    fn attention(&self, b: &Block, q: &[Vec<f64>], kv: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let qs: Vec<Vec<f64>> = q.iter().map(|x| b.q.apply(x)).collect();
        let ks: Vec<Vec<f64>> = kv.iter().map(|x| b.k.apply(x)).collect();
        let vs: Vec<Vec<f64>> = kv.iter().map(|x| b.v.apply(x)).collect();
        let dh = self.dim / self.heads;
        let scale = 1.0 / (dh as f64).sqrt();
        (0..q.len())
            .map(|t| {
                let mut z = vec![0.0; self.dim];
                for h in 0..self.heads {
                    let r = h * dh..(h + 1) * dh;
                    let logits: Vec<f64> = (0..=t)
                        .map(|s| dot(&qs[t][r.clone()], &ks[s][r.clone()]) * scale)
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for (s, w) in e.iter().enumerate() {
                        for j in r.clone() {
                            z[j] += w / sum * vs[s][j];
                        }
                    }
                }
                b.out.apply(&z)
            })
            .collect()
    }

    fn ffn(b: &Block, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
        x.iter()
            .map(|x| {
                let mut h = b.conv1.apply(x);
                h.iter_mut().for_each(|v| *v = v.max(0.0));
                b.conv2.apply(&h)
            })
            .collect()
    }

    /// The query vector of a window of item rows (oldest first, at most L).
    pub fn query(&self, rows: &[&[f64]]) -> Vec<f64> {
        let l = self.window;
        assert!(rows.len() <= l);
        let pad = l - rows.len();
        let scale = (self.dim as f64).sqrt();
        let mut x: Vec<Vec<f64>> = (0..l)
            .map(|t| {
                let (e, p) = if t < pad {
                    (self.padding.as_slice(), 0)
                } else {
                    (rows[t - pad], t + 1)
                };
                e.iter()
                    .zip(&self.positions[p])
                    .map(|(e, p)| e * scale + p)
                    .collect()
            })
            .collect();
        for b in &self.blocks {
            x = match self.arrangement {
                Arrangement::Sasrec => {
                    let q = b.ln_attn.all(&x);
                    let a = self.attention(b, &q, &x);
                    let x1: Vec<Vec<f64>> = q.iter().zip(&a).map(|(q, a)| add(q, a)).collect();
                    let x2 = b.ln_fwd.all(&x1);
                    let f = Self::ffn(b, &x2);
                    x2.iter().zip(&f).map(|(x, f)| add(x, f)).collect()
                }
                Arrangement::PreLn => {
                    let n = b.ln_attn.all(&x);
                    let a = self.attention(b, &n, &n);
                    let x1: Vec<Vec<f64>> = x.iter().zip(&a).map(|(x, a)| add(x, a)).collect();
                    let f = Self::ffn(b, &b.ln_fwd.all(&x1));
                    x1.iter().zip(&f).map(|(x, f)| add(x, f)).collect()
                }
                Arrangement::PostLn => {
                    let a = self.attention(b, &x, &x);
                    let x1: Vec<Vec<f64>> = x.iter().zip(&a).map(|(x, a)| add(x, a)).collect();
                    let x1 = b.ln_attn.all(&x1);
                    let f = Self::ffn(b, &x1);
                    let x2: Vec<Vec<f64>> = x1.iter().zip(&f).map(|(x, f)| add(x, f)).collect();
                    b.ln_fwd.all(&x2)
                }
            };
        }
        self.last.apply(&x[l - 1])
    }
}

/// What the reference computes a user's answers from.
#[derive(Clone, Debug, Default)]
pub struct User {
    /// Oldest first.
    pub history: Vec<u64>,
    /// Dense features (empty: none stored, zeros).
    pub features: Vec<f64>,
}

#[derive(Clone)]
pub enum Net {
    TwoTower(Mlp),
    Ranker(Mlp),
    Sasrec(Sasrec),
}

/// One model and its catalogue.
#[derive(Clone)]
pub struct Reference {
    pub net: Net,
    pub items: Catalogue,
    pub history_len: usize,
    pub feature_dim: usize,
}

impl Reference {
    /// Whether the model answers `recommend` (a ranker only scores).
    pub fn retrieves(&self) -> bool {
        !matches!(self.net, Net::Ranker(_))
    }

    /// The rows of the newest `history_len` history ids the catalogue holds
    /// (deleted ones included: they keep their rows).
    fn window(&self, user: &User) -> Vec<&[f64]> {
        let h = &user.history;
        h[h.len().saturating_sub(self.history_len)..]
            .iter()
            .filter_map(|&id| self.items.row(id))
            .collect()
    }

    fn pooled(&self, user: &User) -> Vec<f64> {
        let rows = self.window(user);
        let mut h = vec![0.0; self.items.dim()];
        for r in &rows {
            for (a, b) in h.iter_mut().zip(r.iter()) {
                *a += b;
            }
        }
        if !rows.is_empty() {
            h.iter_mut().for_each(|a| *a /= rows.len() as f64);
        }
        h
    }

    fn features(&self, user: &User) -> Vec<f64> {
        if user.features.is_empty() {
            vec![0.0; self.feature_dim]
        } else {
            assert_eq!(user.features.len(), self.feature_dim);
            user.features.clone()
        }
    }

    /// The user's query vector (two_tower, sasrec).
    pub fn query(&self, user: &User) -> Vec<f64> {
        match &self.net {
            Net::TwoTower(mlp) => {
                let mut x = self.pooled(user);
                x.extend(self.features(user));
                mlp.apply(x)
            }
            Net::Sasrec(s) => s.query(&self.window(user)),
            Net::Ranker(_) => panic!("a ranker has no query vector"),
        }
    }

    /// Scores of `items` (any held item, deleted or not), in order: dot
    /// products, or the ranker's probabilities.
    pub fn scores(&self, user: &User, items: &[u64]) -> Vec<f64> {
        let row = |id: u64| {
            self.items
                .row(id)
                .unwrap_or_else(|| panic!("item {id} is not in the catalogue"))
        };
        match &self.net {
            Net::Ranker(mlp) => {
                let h = self.pooled(user);
                let f = self.features(user);
                items
                    .iter()
                    .map(|&id| {
                        let e = row(id);
                        let mut x = h.clone();
                        x.extend_from_slice(&f);
                        x.extend_from_slice(e);
                        x.extend(h.iter().zip(e).map(|(a, b)| a * b));
                        let z = mlp.apply(x);
                        assert_eq!(z.len(), 1, "a ranker's tower ends in one logit");
                        1.0 / (1.0 + (-z[0]).exp())
                    })
                    .collect()
            }
            _ => {
                let q = self.query(user);
                items.iter().map(|&id| dot(row(id), &q)).collect()
            }
        }
    }

    /// Every live item a recommend may return (not in the stored history,
    /// not excluded) with its score, best first, ties to the smaller id.
    pub fn ranking(&self, user: &User, exclude: &[u64]) -> Vec<(u64, f64)> {
        let ids: Vec<u64> = self
            .items
            .live_ids()
            .into_iter()
            .filter(|id| !user.history.contains(id) && !exclude.contains(id))
            .collect();
        let scores = self.scores(user, &ids);
        let mut all: Vec<(u64, f64)> = ids.into_iter().zip(scores).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all
    }
}
