//! onnx models' graphs alone on the CPU backend, the way rankd runs them
//! (inputs built from the live item table and the users' state, one engine
//! run, no scoring), side by side: each graph on tract and on ONNX Runtime,
//! and beside them any native model folder given (e.g. the same SASRec as
//! `kind = "sasrec"`), at batch 1, 16 and 64 (users for a tower, (user,
//! candidate) rows for a ranker), in alternating rounds.
//!
//! `cargo bench --bench onnx -- [--pairs P] [--rounds R] VERSION_DIR...`
//! (ONNX Runtime from RANKD_ONNXRUNTIME_LIB) prints per model, engine and
//! batch the median over the pairs of the mean time per batch.
//! benches/onnx.sh makes the models and runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rankd::internals::{
    load_table, onnx, Backend, BatchBounds, CpuBackend, EngineKind, ItemTable, ModelDesc, ModelId,
    ModelSpec, Query, Rng, TableId, Task, ONNX,
};

/// The ids of the one model (and its table) each CPU backend here holds.
const MODEL: ModelId = ModelId::new(0);
const TABLE: TableId = TableId::new(0);

const BATCHES: [usize; 3] = [1, 16, 64];

struct Variant {
    label: String,
    cpu: CpuBackend,
    spec: ModelSpec,
    items: ItemTable,
}

fn load(dir: &Path, engine: Option<EngineKind>) -> Variant {
    let mut text = std::fs::read_to_string(dir.join("model.toml")).expect("model.toml");
    if engine == Some(EngineKind::Onnxruntime) {
        text = text.replace("engine = \"tract\"\n", "");
        text.push_str("engine = \"onnxruntime\"\n");
    }
    let spec = ModelSpec::parse(&text).expect("model.toml");
    let weights = spec
        .kind
        .load_weights(&spec, &dir.join(spec.kind.weights_file(&spec)))
        .expect("the weights");
    let items = match spec.kind.embedded_items(&spec, &weights) {
        Some(t) => t.expect("the item table"),
        None => load_table(&dir.join(&spec.items), spec.dim).expect("the item table"),
    };
    let mut cpu = CpuBackend::new();
    let desc = ModelDesc {
        kind: spec.kind,
        dim: spec.dim,
        user_feature_dim: spec.user_feature_dim,
        bounds: BatchBounds::of(&spec, spec.history_len),
        cpu_scoring: spec.cpu_scoring,
    };
    cpu.load(MODEL, desc, TABLE, &weights).expect("loading");
    let name = dir
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let label = match engine {
        Some(e) => format!("{name} on {}", e.as_str()),
        None => format!("{name} ({})", spec.kind),
    };
    Variant {
        label,
        cpu,
        spec,
        items,
    }
}

/// 256 users with full windows of random rows, dense features, categorical
/// features of 0 and context.
struct Users {
    histories: Vec<Vec<u32>>,
    features: Vec<Vec<f32>>,
    sparse: Vec<Vec<i64>>,
    context: Vec<Vec<f32>>,
    candidates: Vec<u32>,
}

fn users(spec: &ModelSpec, items: &ItemTable) -> Users {
    let mut rng = Rng::new(7);
    let n = items.rows() as u64;
    let vec = |rng: &mut Rng, len: usize| (0..len).map(|_| rng.normal() as f32).collect();
    Users {
        histories: (0..256)
            .map(|_| (0..spec.history_len).map(|_| rng.below(n) as u32).collect())
            .collect(),
        features: (0..256)
            .map(|_| vec(&mut rng, spec.user_feature_dim))
            .collect(),
        sparse: (0..256).map(|_| vec![0; spec.user_sparse_dim]).collect(),
        context: (0..256).map(|_| vec(&mut rng, spec.context_dim)).collect(),
        candidates: (0..1024).map(|_| rng.below(n) as u32).collect(),
    }
}

fn batch<'a>(spec: &ModelSpec, u: &'a Users, b: usize, round: usize) -> Vec<Query<'a>> {
    let query = |i: usize, task| Query {
        history: &u.histories[i % 256],
        features: Some(&u.features[i % 256][..]).filter(|f| !f.is_empty()),
        sparse: Some(&u.sparse[i % 256][..]).filter(|f| !f.is_empty()),
        context: Some(&u.context[i % 256][..]).filter(|f| !f.is_empty()),
        task,
    };
    if spec.ranks() {
        let at = (round * b) % (1024 - b);
        vec![query(
            round,
            Task::Score {
                rows: &u.candidates[at..at + b],
            },
        )]
    } else {
        (0..b)
            .map(|i| query(round * b + i, Task::Score { rows: &[] }))
            .collect()
    }
}

fn main() {
    // As the daemon runs.
    rankd::tune_allocator();
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let (mut pairs, mut rounds, mut dirs) = (5usize, 200usize, Vec::<PathBuf>::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pairs" => pairs = args.next().and_then(|v| v.parse().ok()).expect("--pairs N"),
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            _ => dirs.push(a.into()),
        }
    }
    if dirs.is_empty() {
        eprintln!("usage: cargo bench --bench onnx -- [--pairs P] [--rounds R] VERSION_DIR...");
        std::process::exit(2);
    }
    onnx::configure(onnx::Settings {
        onnxruntime_lib: std::env::var_os("RANKD_ONNXRUNTIME_LIB").map(Into::into),
        threads: std::env::var("RANKD_ONNX_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(1),
        ..Default::default()
    });
    let mut variants = Vec::new();
    for dir in &dirs {
        let spec = ModelSpec::read(&dir.join("model.toml")).expect("model.toml");
        if spec.kind == ONNX {
            variants.push(load(dir, Some(EngineKind::Tract)));
            variants.push(load(dir, Some(EngineKind::Onnxruntime)));
        } else {
            variants.push(load(dir, None));
        }
    }
    let inputs: Vec<Users> = variants.iter().map(|v| users(&v.spec, &v.items)).collect();
    // label → batch → per-pair means (ms).
    let mut times: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for pair in 0..pairs {
        for &b in &BATCHES {
            for (i, v) in variants.iter_mut().enumerate() {
                let u = &inputs[i];
                for r in 0..3 {
                    v.cpu
                        .run(MODEL, &v.items, &batch(&v.spec, u, b, r))
                        .unwrap();
                }
                let started = Instant::now();
                for r in 0..rounds {
                    let q = batch(&v.spec, u, b, r + pair);
                    std::hint::black_box(v.cpu.run(MODEL, &v.items, &q).unwrap());
                }
                let ms = started.elapsed().as_secs_f64() * 1e3 / rounds as f64;
                times.entry((i, b)).or_default().push(ms);
            }
        }
    }
    println!("| model | batch | ms per batch (median of {pairs} pairs × {rounds} rounds) |");
    println!("|---|---|---|");
    for ((i, b), mut t) in times {
        t.sort_by(f64::total_cmp);
        println!("| {} | {b} | {:.4} |", variants[i].label, t[t.len() / 2]);
    }
}
