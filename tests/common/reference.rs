//! An independent f64 reference of the demo models' math, straight from the
//! files:
//!
//! - two-tower: h = mean of the embeddings of the newest `history_len`
//!   history items (zeros for none), x = [h ‖ f], q = MLP(x) with ReLU
//!   between layers (none after the last), score(e) = q·e; recommend is the
//!   top k over the catalogue minus every stored history item and the
//!   excluded ids, ties broken by the smaller id;
//! - ranker: x = [h ‖ f ‖ e ‖ h⊙e], score = sigmoid(MLP(x)).

use rankd::internals::{ItemTable, ModelSpec, TowerWeights};

use super::daemon::demo_models;

pub struct Model {
    pub weights: TowerWeights,
    pub history_len: usize,
}

pub struct Reference {
    pub items: ItemTable,
    pub two_tower: Model,
    pub ranker: Model,
}

impl Model {
    fn load(name: &str) -> Self {
        let dir = demo_models().join(name).join("1");
        let spec = ModelSpec::read(&dir.join("model.toml")).unwrap();
        Self {
            weights: TowerWeights::load(&dir.join("weights.safetensors"), &spec).unwrap(),
            history_len: spec.history_len,
        }
    }

    /// The MLP: every layer affine, ReLU between layers.
    pub fn tower(&self, mut x: Vec<f64>) -> Vec<f64> {
        let layers = &self.weights.layers;
        for (i, l) in layers.iter().enumerate() {
            assert_eq!(x.len(), l.in_dim, "layer {i} input width");
            let mut y: Vec<f64> = (0..l.out_dim)
                .map(|o| {
                    l.bias[o] as f64
                        + (0..l.in_dim)
                            .map(|j| l.weight[o * l.in_dim + j] as f64 * x[j])
                            .sum::<f64>()
                })
                .collect();
            if i + 1 < layers.len() {
                y.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            x = y;
        }
        x
    }
}

impl Reference {
    /// The demo repository's `demo` (two-tower) and `demo-ranker`.
    pub fn load() -> Self {
        Self {
            items: ItemTable::load(&demo_models().join("catalogues/demo/items.safetensors"), 64)
                .unwrap(),
            two_tower: Model::load("demo"),
            ranker: Model::load("demo-ranker"),
        }
    }

    pub fn emb(&self, id: u64) -> Vec<f64> {
        let row = self
            .items
            .row_of(id)
            .unwrap_or_else(|| panic!("item {id} is not in the catalogue"));
        self.items
            .embedding(row)
            .iter()
            .map(|&x| x as f64)
            .collect()
    }

    /// h: the mean embedding of the newest `history_len` items of `history`.
    pub fn pooled(&self, history: &[u64], history_len: usize) -> Vec<f64> {
        let newest = &history[history.len().saturating_sub(history_len)..];
        let mut h = vec![0.0; self.items.dim()];
        for &id in newest {
            for (a, b) in h.iter_mut().zip(self.emb(id)) {
                *a += b;
            }
        }
        if !newest.is_empty() {
            h.iter_mut().for_each(|a| *a /= newest.len() as f64);
        }
        h
    }

    /// The two-tower query vector q.
    pub fn query(&self, history: &[u64], features: &[f64]) -> Vec<f64> {
        let mut x = self.pooled(history, self.two_tower.history_len);
        x.extend_from_slice(features);
        self.two_tower.tower(x)
    }

    /// The two-tower score of `item`: q·e.
    pub fn dot(&self, q: &[f64], item: u64) -> f64 {
        self.emb(item).iter().zip(q).map(|(a, b)| a * b).sum()
    }

    /// Top-k over every item, excluding the whole stored history and
    /// `exclude`, ties by smaller id.
    pub fn recommend(
        &self,
        history: &[u64],
        features: &[f64],
        k: usize,
        exclude: &[u64],
    ) -> Vec<(u64, f64)> {
        let q = self.query(history, features);
        let mut all: Vec<(u64, f64)> = self
            .items
            .ids()
            .iter()
            .filter(|id| !history.contains(id) && !exclude.contains(id))
            .map(|&id| (id, self.dot(&q, id)))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    /// The ranker's score of `candidate`: sigmoid(MLP([h ‖ f ‖ e ‖ h⊙e])).
    pub fn rank(&self, history: &[u64], features: &[f64], candidate: u64) -> f64 {
        let h = self.pooled(history, self.ranker.history_len);
        let e = self.emb(candidate);
        let mut x = h.clone();
        x.extend_from_slice(features);
        x.extend_from_slice(&e);
        x.extend(h.iter().zip(&e).map(|(a, b)| a * b));
        let z = self.ranker.tower(x)[0];
        1.0 / (1.0 + (-z).exp())
    }
}
