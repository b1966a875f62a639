//! Inputs and references of gpu-check's section (a): random item tables
//! (with deleted rows, and an exact-ties variant), towers and batches, the
//! table as a 16-bit dtype stores it, an f64 tower, and the comparison of
//! top-k lists that tells near-ties ordered differently from real
//! disagreements.

use rankd::internals::cuda::ItemDtype;
use rankd::internals::Rng;
use rankd::internals::{cpu, CpuBackend};
use rankd::internals::{Backend, ModelDesc, ModelId, Query, Scored, TableId, Task};
use rankd::internals::{ItemTable, Layer, ModelKind, TowerWeights, Weights, RANKER, TWO_TOWER};

pub(super) const N: usize = 300_000;
/// Not a multiple of 8: device rows are padded, and the fused kernel's last
/// element chunk is partial.
pub(super) const D: usize = 100;
pub(super) const FD: usize = 12;
pub(super) const B: usize = 40;

pub(super) struct QuerySpec {
    pub(super) history: Vec<u32>,
    pub(super) features: Option<Vec<f32>>,
    pub(super) task: TaskSpec,
}

pub(super) enum TaskSpec {
    TopK { k: usize, exclude: Vec<u32> },
    Score { rows: Vec<u32> },
}

impl QuerySpec {
    fn query(&self) -> Query<'_> {
        Query {
            history: &self.history,
            features: self.features.as_deref(),
            sparse: None,
            context: None,
            task: match &self.task {
                TaskSpec::TopK { k, exclude } => Task::TopK {
                    k: *k,
                    exclude,
                    filter: None,
                },
                TaskSpec::Score { rows } => Task::Score { rows },
            },
        }
    }
}

pub(super) fn uniform(rng: &mut Rng) -> f32 {
    (rng.uniform() * 2.0 - 1.0) as f32
}

/// Ids are a bijection of the row number (an odd multiplier mod 2^64), so id
/// order differs from row order and tie-breaking by id is really tested.
pub(super) fn item_id(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// `ties`: values in {-1, -0.5, 0, 0.5, 1}, exact in every dtype, so scores
/// against small-integer queries are exact and ties are everywhere.
pub(super) fn random_table(rng: &mut Rng, n: usize, ties: bool) -> ItemTable {
    let ids = (0..n).map(item_id).collect();
    let emb = (0..n * D)
        .map(|_| {
            if ties {
                rng.below(5) as f32 * 0.5 - 1.0
            } else {
                uniform(rng) * 0.5
            }
        })
        .collect();
    let mut t = ItemTable::new(D, ids, emb).expect("unique ids");
    for _ in 0..n / 50 {
        let id = item_id(rng.below(n as u64) as usize);
        t.delete(id, 1);
    }
    t
}

pub(super) fn random_tower(rng: &mut Rng, dims: &[usize]) -> TowerWeights {
    let layers = dims
        .windows(2)
        .map(|w| {
            let scale = (3.0 / w[0] as f64).sqrt() as f32;
            Layer {
                in_dim: w[0],
                out_dim: w[1],
                weight: (0..w[0] * w[1]).map(|_| uniform(rng) * scale).collect(),
                bias: (0..w[1]).map(|_| uniform(rng) * 0.1).collect(),
            }
        })
        .collect();
    TowerWeights { layers }
}

pub(super) fn rows(rng: &mut Rng, n: usize, count: usize) -> Vec<u32> {
    (0..count).map(|_| rng.below(n as u64) as u32).collect()
}

pub(super) fn random_queries(rng: &mut Rng, n: usize, two_tower: bool) -> Vec<QuerySpec> {
    const KS: [usize; 6] = [1, 10, 100, 1000, 0, 37];
    (0..B)
        .map(|i| {
            let len = rng.below(51) as usize;
            let history = rows(rng, n, len);
            let features = (rng.below(4) != 0).then(|| (0..FD).map(|_| uniform(rng)).collect());
            let task = if two_tower && i % 5 != 4 {
                let len = rng.below(300) as usize;
                let mut exclude = rows(rng, n, len);
                exclude.sort_unstable();
                exclude.dedup();
                TaskSpec::TopK {
                    k: KS[i % KS.len()],
                    exclude,
                }
            } else {
                let len = 1 + rng.below(60) as usize;
                TaskSpec::Score {
                    rows: rows(rng, n, len),
                }
            };
            QuerySpec {
                history,
                features,
                task,
            }
        })
        .collect()
}

/// `items` as a table of `dtype` holds it, liveness included.
pub(super) fn quantized(items: &ItemTable, dtype: ItemDtype) -> ItemTable {
    let emb = items
        .embeddings()
        .iter()
        .map(|&v| dtype.quantize(v))
        .collect();
    let mut t = ItemTable::new(items.dim(), items.ids().to_vec(), emb).expect("same ids");
    for r in (0..items.rows() as u32).filter(|&r| !items.is_live(r)) {
        t.delete(items.id(r), 1);
    }
    t
}

/// The tower in f64: the reference both backends are judged against.
pub(super) fn mlp_f64(w: &TowerWeights, x: &[f32], rows: usize, sigmoid: bool) -> Vec<f64> {
    let mut cur: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    for (i, l) in w.layers.iter().enumerate() {
        let mut next = vec![0f64; rows * l.out_dim];
        for r in 0..rows {
            for o in 0..l.out_dim {
                let wrow = &l.weight[o * l.in_dim..(o + 1) * l.in_dim];
                let mut acc = f64::from(l.bias[o]);
                for (a, b) in cur[r * l.in_dim..(r + 1) * l.in_dim].iter().zip(wrow) {
                    acc += a * f64::from(*b);
                }
                let last = i + 1 == w.layers.len();
                next[r * l.out_dim + o] = match (last, sigmoid) {
                    (false, _) => acc.max(0.0),
                    (true, false) => acc,
                    (true, true) => 1.0 / (1.0 + (-acc).exp()),
                };
            }
        }
        cur = next;
    }
    cur
}

/// max |a - b| / max |b|.
pub(super) fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()))
        / scale
}

#[derive(Default)]
pub(super) struct Agreement {
    pub(super) positions: usize,
    pub(super) id_mismatch: usize,
    pub(super) len_mismatch: usize,
    /// Positions whose ids differ and whose scores differ by more than the
    /// tie tolerance: real disagreements, not near-ties ordered differently.
    pub(super) beyond_tie: usize,
    pub(super) max_err: f64,
}

pub(super) fn compare_topk(gpu: &[Vec<Scored>], cpu: &[Vec<Scored>], tie_tol: f64) -> Agreement {
    let mut a = Agreement::default();
    a.len_mismatch += gpu.len().abs_diff(cpu.len());
    for (g, c) in gpu.iter().zip(cpu) {
        if g.len() != c.len() {
            a.len_mismatch += 1;
            continue;
        }
        let scale = c
            .iter()
            .fold(0f64, |m, s| m.max(f64::from(s.score).abs()))
            .max(1e-30);
        for (x, y) in g.iter().zip(c) {
            a.positions += 1;
            let err = f64::from((x.score - y.score).abs()) / scale;
            if x.id != y.id {
                a.id_mismatch += 1;
                if err > tie_tol {
                    a.beyond_tie += 1;
                }
            } else {
                a.max_err = a.max_err.max(err);
            }
        }
    }
    a
}

/// Random inputs shared by every dtype.
pub(super) struct Inputs {
    pub(super) items: ItemTable,
    pub(super) ties: ItemTable,
    pub(super) two_tower: TowerWeights,
    pub(super) ranker: TowerWeights,
    pub(super) tt_queries: Vec<QuerySpec>,
    pub(super) rk_queries: Vec<QuerySpec>,
    /// [B, D] small integers, against `ties`.
    pub(super) tie_q: Vec<f32>,
    pub(super) tie_specs: Vec<(usize, Vec<u32>)>,
}

pub(super) fn inputs(seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let items = random_table(&mut rng, N, false);
    let ties = random_table(&mut rng, N / 3, true);
    let tie_q = (0..B * D).map(|_| rng.below(5) as f32 - 2.0).collect();
    let tie_specs = (0..B)
        .map(|i| {
            let len = rng.below(200) as usize;
            let mut ex = rows(&mut rng, N / 3, len);
            ex.sort_unstable();
            ex.dedup();
            ([1, 7, 100, 1000][i % 4], ex)
        })
        .collect();
    Inputs {
        two_tower: random_tower(&mut rng, &[D + FD, 96, D]),
        ranker: random_tower(&mut rng, &[3 * D + FD, 48, 1]),
        tt_queries: random_queries(&mut rng, N, true),
        rk_queries: random_queries(&mut rng, N, false),
        items,
        ties,
        tie_q,
        tie_specs,
    }
}

pub(super) fn desc(kind: ModelKind) -> ModelDesc {
    ModelDesc {
        kind,
        dim: D,
        user_feature_dim: FD,
        bounds: Default::default(),
        cpu_scoring: Default::default(),
    }
}

/// The models of [`cpu_backend`], and the table they read.
pub(super) const CPU_TWO_TOWER: ModelId = ModelId::new(0);
pub(super) const CPU_RANKER: ModelId = ModelId::new(1);
const CPU_TABLE: TableId = TableId::new(0);

pub(super) fn cpu_backend(inp: &Inputs) -> anyhow::Result<CpuBackend> {
    let mut cpu = CpuBackend::new();
    let (tt, rk) = (&inp.two_tower, &inp.ranker);
    cpu.load(
        CPU_TWO_TOWER,
        desc(TWO_TOWER),
        CPU_TABLE,
        &Weights::new(tt.clone()),
    )?;
    cpu.load(
        CPU_RANKER,
        desc(RANKER),
        CPU_TABLE,
        &Weights::new(rk.clone()),
    )?;
    Ok(cpu)
}

pub(super) fn queries(specs: &[QuerySpec]) -> Vec<Query<'_>> {
    specs.iter().map(QuerySpec::query).collect()
}

pub(super) fn tie_reference(inp: &Inputs) -> Vec<Vec<Scored>> {
    let specs: Vec<(usize, &[u32])> = inp
        .tie_specs
        .iter()
        .map(|(k, e)| (*k, e.as_slice()))
        .collect();
    cpu::score_topk(&inp.ties, &inp.tie_q, &specs)
}
