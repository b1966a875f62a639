//! The CPU backend: forward passes run through candle; retrieval is the
//! fused scan in `fused`, which streams the item table once per batch and
//! keeps each query's top-k as it goes, so the B×N score matrix is never
//! materialised (or, for `cpu_scoring = "exact-int8"` models, `int8`: the
//! same answer from the table's int8 copy and an f32 re-score of the few rows
//! that can reach the top-k). This file holds the `Backend` impl and the
//! parts kinds share (the `Forward` trait, a tower of linear layers,
//! retrieval from query vectors); each kind's forward pass lives in its own
//! folder, `model/kind/<name>/cpu.rs`, and is found through the kind
//! ([`crate::model::kind::Kind::cpu`]).

pub mod fused;
pub mod int8;
pub mod ops;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module};

pub use fused::score_topk;
pub use int8::score_topk_int8;

use super::{Backend, BackendError, ModelDesc, ModelId, Output, Query, Reason, TableId, Task};
use crate::model::attributes::RowFilter;
use crate::model::{CpuScoring, ItemDtype, ItemTable, ModelKind, TowerWeights, Weights};

/// A model's forward pass on the CPU, built once at load from its weights.
pub trait Forward: Send {
    /// A retrieval model's query vectors (its tower alone), `dim` values per
    /// query; `None` for a model that scores its candidates itself (a
    /// ranker), which answers through [`Forward::score`]. A retrieval
    /// model's batch is this, then [`retrieve`].
    fn embed(
        &self,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Option<Result<Vec<f32>, BackendError>>;

    /// A batch of a model without query vectors.
    fn score(
        &self,
        _items: &ItemTable,
        _queries: &[Query<'_>],
    ) -> Result<Vec<Output>, BackendError> {
        Err(err(
            "a retrieval model answers through its query vectors: this is a bug",
        ))
    }

    /// Whether [`Forward::embed`] answers (a retrieval model).
    fn retrieves(&self) -> bool;
}

/// A resident model: what it was loaded as and its forward pass.
struct Loaded {
    desc: ModelDesc,
    forward: Box<dyn Forward>,
}

/// Builds a kind's forward pass from the weights its kind loaded: what
/// [`crate::model::kind::Kind::cpu`] answers.
pub type CpuBuild = fn(ModelDesc, &Weights) -> Result<Box<dyn Forward>, BackendError>;

#[derive(Default)]
pub struct CpuBackend {
    models: HashMap<ModelId, Loaded>,
}

pub(crate) fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::new("cpu", Reason::Other, e.to_string())
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> String {
        "cpu".into()
    }

    /// The CPU scores straight from the f32 host table: nothing to copy.
    fn load_table(
        &mut self,
        _table: TableId,
        _items: &ItemTable,
        _dtype: ItemDtype,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn items_changed(
        &mut self,
        _table: TableId,
        _items: &ItemTable,
        _rows: &[u32],
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn unload(&mut self, id: ModelId) {
        self.models.remove(&id);
    }

    fn unload_table(&mut self, _table: TableId) {}

    fn load(
        &mut self,
        id: ModelId,
        desc: ModelDesc,
        _table: TableId,
        weights: &Weights,
    ) -> Result<(), BackendError> {
        let forward = (desc.kind.cpu())(desc, weights)?;
        if desc.cpu_scoring == CpuScoring::ExactInt8 && forward.retrieves() {
            tracing::info!(
                model = id.get(),
                "top-k through the int8 copy of the item table (cpu_scoring = exact-int8)"
            );
        }
        self.models.insert(id, Loaded { desc, forward });
        Ok(())
    }

    fn filters(&self) -> bool {
        true
    }

    /// Every kind has a CPU forward pass.
    fn runs(&self, _kind: ModelKind) -> bool {
        true
    }

    fn run(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, BackendError> {
        let m = self.loaded(id)?;
        match m.forward.embed(items, queries) {
            Some(q) => Ok(retrieve(
                m.desc.cpu_scoring,
                m.desc.dim,
                items,
                queries,
                &q?,
            )),
            None => m.forward.score(items, queries),
        }
    }

    fn embeds(&self, id: ModelId) -> bool {
        self.models.get(&id).is_some_and(|m| m.forward.retrieves())
    }

    fn embed(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<f32>, BackendError> {
        self.loaded(id)?
            .forward
            .embed(items, queries)
            .unwrap_or_else(|| {
                Err(err(format!(
                    "model {id} has no query vectors: this is a bug"
                )))
            })
    }

    fn retrieve(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
        q: &[f32],
    ) -> Result<Vec<Output>, BackendError> {
        let m = self.loaded(id)?;
        if q.len() != queries.len() * m.desc.dim {
            return Err(err(format!(
                "{} query values for {} queries of dim {}: this is a bug",
                q.len(),
                queries.len(),
                m.desc.dim
            )));
        }
        Ok(retrieve(m.desc.cpu_scoring, m.desc.dim, items, queries, q))
    }
}

impl CpuBackend {
    fn loaded(&self, id: ModelId) -> Result<&Loaded, BackendError> {
        self.models
            .get(&id)
            .ok_or_else(|| err(format!("model {id} is not loaded: this is a bug")))
    }
}

/// Mean of the history rows' embeddings (zeros when there is no history).
pub fn history_mean(items: &ItemTable, history: &[u32], out: &mut [f32]) {
    out.fill(0.0);
    if history.is_empty() {
        return;
    }
    for &row in history {
        for (o, e) in out.iter_mut().zip(items.embedding(row)) {
            *o += e;
        }
    }
    let inv = 1.0 / history.len() as f32;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Linear layers with ReLU between them and none after the last.
pub(crate) struct Tower {
    layers: Vec<Linear>,
    /// Width of the input rows.
    pub(crate) in_dim: usize,
}

impl Tower {
    /// The tower of `weights`, which must be a `TowerWeights` of the widths
    /// `desc` says.
    pub(crate) fn new(desc: &ModelDesc, weights: &Weights) -> Result<Self, BackendError> {
        let weights = weights.get::<TowerWeights>().ok_or_else(|| {
            err(format!(
                "{} weights are not a tower: this is a bug",
                desc.kind
            ))
        })?;
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                let w = Tensor::from_slice(&l.weight, (l.out_dim, l.in_dim), &Device::Cpu)?;
                let b = Tensor::from_slice(&l.bias, l.out_dim, &Device::Cpu)?;
                Ok(Linear::new(w, Some(b)))
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(err)?;
        Ok(Self {
            layers,
            in_dim: desc.tower_dims().0,
        })
    }

    /// The tower over `rows` input rows of `in_dim` values.
    pub(crate) fn forward(&self, x: Vec<f32>, rows: usize) -> Result<Vec<f32>, BackendError> {
        let mut t = Tensor::from_vec(x, (rows, self.in_dim), &Device::Cpu).map_err(err)?;
        for (i, layer) in self.layers.iter().enumerate() {
            t = layer.forward(&t).map_err(err)?;
            if i + 1 < self.layers.len() {
                t = t.relu().map_err(err)?;
            }
        }
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(err)
    }
}

/// Answers each query of a retrieval model from its query vector (`q`,
/// `dim` values per query): one streamed top-k over the item table for the
/// recommend queries, dot products for the score queries.
pub(crate) fn retrieve(
    cpu_scoring: CpuScoring,
    dim: usize,
    items: &ItemTable,
    queries: &[Query<'_>],
    q: &[f32],
) -> Vec<Output> {
    let topk_idx: Vec<usize> = (0..queries.len())
        .filter(|&i| matches!(queries[i].task, Task::TopK { .. }))
        .collect();
    let mut topk_out = if topk_idx.is_empty() {
        Vec::new()
    } else {
        let qs: Vec<f32> = topk_idx
            .iter()
            .flat_map(|&i| q[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        type Specs<'a> = Vec<(usize, &'a [u32])>;
        let (specs, filters): (Specs<'_>, Vec<Option<&RowFilter>>) = topk_idx
            .iter()
            .map(|&i| match queries[i].task {
                Task::TopK { k, exclude, filter } => ((k, exclude), filter),
                Task::Score { .. } => unreachable!("filtered to top-k tasks"),
            })
            .unzip();
        let filters: &[Option<&RowFilter>] = if filters.iter().any(Option::is_some) {
            &filters
        } else {
            &[]
        };
        match cpu_scoring {
            CpuScoring::F32 => fused::score_topk_filtered(items, &qs, &specs, filters),
            CpuScoring::ExactInt8 => int8::score_topk_int8_filtered(items, &qs, &specs, filters),
        }
    }
    .into_iter();
    queries
        .iter()
        .enumerate()
        .map(|(i, query)| match query.task {
            Task::TopK { .. } => Output::TopK(topk_out.next().expect("one result per top-k query")),
            Task::Score { rows } => {
                let qi = &q[i * dim..(i + 1) * dim];
                Output::Scores(rows.iter().map(|&r| dot(qi, items.embedding(r))).collect())
            }
        })
        .collect()
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M0: ModelId = ModelId::new(0);
    const M1: ModelId = ModelId::new(1);
    const T0: TableId = TableId::new(0);
    use crate::backend::Scored;
    use crate::backend::Task;
    use crate::model::demo::Rng;
    use crate::model::kind::{RANKER, TWO_TOWER};
    use crate::model::Layer;

    fn tower(rng: &mut Rng, widths: &[usize]) -> TowerWeights {
        let layers = widths
            .windows(2)
            .map(|w| Layer {
                out_dim: w[1],
                in_dim: w[0],
                weight: (0..w[0] * w[1])
                    .map(|_| rng.uniform() as f32 - 0.5)
                    .collect(),
                bias: (0..w[1]).map(|_| rng.uniform() as f32 - 0.5).collect(),
            })
            .collect();
        TowerWeights { layers }
    }

    /// Each kind's warm-up batch runs through that kind's forward pass, and
    /// the outputs are shaped as its requests expect.
    #[test]
    fn each_kind_runs_its_own_forward_pass() {
        let (d, fd, n) = (8, 3, 50);
        let mut rng = Rng::new(3);
        let ids: Vec<u64> = (0..n as u64).map(|i| 100 + i).collect();
        let emb: Vec<f32> = (0..n * d).map(|_| rng.uniform() as f32 - 0.5).collect();
        let items = ItemTable::new(d, ids, emb).unwrap();
        let mut cpu = CpuBackend::new();
        for (id, kind) in [TWO_TOWER, RANKER].into_iter().enumerate() {
            let (i, o) = kind.tower_dims(d, fd);
            let desc = ModelDesc {
                kind,
                dim: d,
                user_feature_dim: fd,
                bounds: Default::default(),
                cpu_scoring: Default::default(),
            };
            cpu.load(
                ModelId::new(id),
                desc,
                T0,
                &Weights::new(tower(&mut rng, &[i, 16, o])),
            )
            .unwrap();
        }
        let rows = vec![0u32; 4];
        let out = cpu
            .run(
                M0,
                &items,
                &TWO_TOWER.warm_batch(&crate::model::kind::test_spec("two_tower"), 4, &rows),
            )
            .unwrap();
        assert_eq!(out.len(), 4);
        assert!(out
            .iter()
            .all(|o| matches!(o, Output::TopK(l) if l.len() == 10)));
        let out = cpu
            .run(
                M1,
                &items,
                &RANKER.warm_batch(&crate::model::kind::test_spec("ranker"), 4, &rows),
            )
            .unwrap();
        match &out[..] {
            [Output::Scores(s)] => {
                assert_eq!(s.len(), 4);
                assert!(s.iter().all(|&p| p > 0.0 && p < 1.0), "{s:?}");
            }
            other => panic!("{other:?}"),
        }
        // A ranker never answers a top-k task.
        let topk = [Query {
            history: &[],
            features: None,
            sparse: None,
            context: None,
            task: Task::TopK {
                k: 3,
                exclude: &[],
                filter: None,
            },
        }];
        let e = cpu.run(M1, &items, &topk).unwrap_err();
        assert_eq!(e.reason, Reason::Other);
        assert!(e.message.contains("cannot answer recommend"), "{e}");
    }

    /// A two-tower model loaded with `cpu_scoring = "exact-int8"` answers
    /// every batch exactly as the same model with `"f32"`: ids and score bits,
    /// recommend and score tasks, batch sizes on both sides of the f32 scan's
    /// kernel switch, histories, exclusions, deleted rows, and after upserts.
    #[test]
    fn exact_int8_models_answer_as_f32_models_do() {
        let (d, fd, n) = (16, 3, 5000);
        let mut rng = Rng::new(17);
        let ids: Vec<u64> = (0..n as u64).map(|i| 7 + 2 * i).collect();
        let emb: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let mut items = ItemTable::new(d, ids.clone(), emb).unwrap();
        for r in (0..n).step_by(9) {
            items.delete(ids[r], 1);
        }
        let mut cpu = CpuBackend::new();
        let (i, o) = TWO_TOWER.tower_dims(d, fd);
        let weights = Weights::new(tower(&mut rng, &[i, 32, o]));
        for (id, cpu_scoring) in [(M0, CpuScoring::F32), (M1, CpuScoring::ExactInt8)] {
            let desc = ModelDesc {
                kind: TWO_TOWER,
                dim: d,
                user_feature_dim: fd,
                bounds: Default::default(),
                cpu_scoring,
            };
            cpu.load(id, desc, T0, &weights).unwrap();
        }
        let histories: Vec<Vec<u32>> = (0..40)
            .map(|_| {
                (0..1 + rng.below(20))
                    .map(|_| rng.below(n as u64) as u32)
                    .collect()
            })
            .collect();
        let excludes: Vec<Vec<u32>> = histories
            .iter()
            .map(|h| {
                let mut e = h.clone();
                e.sort_unstable();
                e.dedup();
                e
            })
            .collect();
        let feats: Vec<Vec<f32>> = (0..40)
            .map(|_| (0..fd).map(|_| rng.normal() as f32).collect())
            .collect();
        let bits = |out: Vec<Output>| -> Vec<Vec<(u64, u32)>> {
            out.into_iter()
                .map(|o| match o {
                    Output::TopK(l) => l.iter().map(|s| (s.id, s.score.to_bits())).collect(),
                    Output::Scores(s) => s.iter().map(|x| (0, x.to_bits())).collect(),
                })
                .collect()
        };
        for round in 0..2 {
            for b in [1, 2, 5, 8, 9, 16, 40] {
                let queries: Vec<Query<'_>> = (0..b)
                    .map(|q| Query {
                        history: &histories[q],
                        features: Some(&feats[q]),
                        sparse: None,
                        context: None,
                        task: if q % 7 == 6 {
                            Task::Score {
                                rows: &histories[q],
                            }
                        } else {
                            Task::TopK {
                                k: [1, 10, 100, 1000][q % 4],
                                exclude: &excludes[q],
                                filter: None,
                            }
                        },
                    })
                    .collect();
                let want = bits(cpu.run(M0, &items, &queries).unwrap());
                let got = bits(cpu.run(M1, &items, &queries).unwrap());
                assert_eq!(got, want, "round {round}, batch {b}");
            }
            // Rewrite a quarter of the rows and append some: the int8 copy
            // follows them.
            for r in (0..n).step_by(4) {
                let e: Vec<f32> = (0..d).map(|_| rng.normal() as f32 * 3.0).collect();
                items.upsert(ids[r], &e, 5);
            }
            for id in 0..50u64 {
                let e: Vec<f32> = (0..d).map(|_| rng.normal() as f32 * 2.0).collect();
                items.upsert(1_000_000 + id, &e, 5);
            }
        }
    }

    /// The fused scan against a sort of every live, non-excluded row, on
    /// tables made for ties: small positive integer embeddings (every score
    /// exact in f32 and never -0, so the reference sees the same values), zero
    /// queries (every row ties), duplicated rows, shuffled ids, deleted rows,
    /// exclusions, k from 1 to past N, and N not a multiple of the block.
    #[test]
    fn score_topk_equals_a_full_sort_with_ties_exclusions_and_deleted_rows() {
        let mut rng = Rng::new(11);
        for (n, d) in [(1, 4), (37, 8), (1300, 16), (2 * 480 + 5, 8)] {
            let mut ids: Vec<u64> = (0..n as u64).map(|i| 10 + 3 * i).collect();
            // Ids not in row order, so ties are not already sorted by id.
            for i in (1..n).rev() {
                ids.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut emb: Vec<f32> = (0..n * d).map(|_| 1.0 + rng.below(3) as f32).collect();
            for r in (0..n).step_by(7).skip(1) {
                let (a, b) = emb.split_at_mut(r * d);
                b[..d].copy_from_slice(&a[..d]);
            }
            let mut items = ItemTable::new(d, ids.clone(), emb).unwrap();
            for r in (0..n).step_by(5) {
                items.delete(ids[r], 2);
            }
            let queries: Vec<Vec<f32>> = vec![
                vec![0.0; d],
                (0..d).map(|_| rng.below(3) as f32 - 1.0).collect(),
                (0..d).map(|_| rng.below(2) as f32).collect(),
                (0..d).map(|_| rng.below(9) as f32 - 4.0).collect(),
            ];
            for k in [1, 3, 10, 100, n + 5] {
                let excludes: Vec<Vec<u32>> = queries
                    .iter()
                    .map(|_| {
                        let mut e: Vec<u32> = (0..n as u32).filter(|_| rng.below(4) == 0).collect();
                        e.dedup();
                        e
                    })
                    .collect();
                let qs: Vec<f32> = queries.iter().flatten().copied().collect();
                let specs: Vec<(usize, &[u32])> =
                    excludes.iter().map(|e| (k, e.as_slice())).collect();
                let got = score_topk(&items, &qs, &specs);
                for (qi, q) in queries.iter().enumerate() {
                    let mut expected: Vec<Scored> = (0..n as u32)
                        .filter(|&r| items.is_live(r) && excludes[qi].binary_search(&r).is_err())
                        .map(|r| Scored {
                            id: items.id(r),
                            score: q
                                .iter()
                                .zip(items.embedding(r))
                                .fold(0.0f64, |acc, (&a, &b)| acc + a as f64 * b as f64)
                                as f32,
                        })
                        .collect();
                    expected.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
                    expected.truncate(k);
                    assert_eq!(got[qi], expected, "n {n}, d {d}, k {k}, query {qi}");
                }
            }
        }
    }
}
