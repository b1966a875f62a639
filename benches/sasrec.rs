//! The sasrec tower alone on the CPU backend, the way rankd runs it (the
//! last L items of each user, embedded, through the blocks; the last block
//! at the last position only), at batch sizes 1, 16 and 64, on a model
//! folder written by benches/sasrec_model.py: `model.toml`, `model.pth`
//! (saved by the reference PyTorch implementation's code) and
//! `histories.json` (users' item ids, oldest first).
//!
//! `cargo bench --bench sasrec -- DIR [ROUNDS]` prints one line per batch
//! size: `rankd batch B: MEAN ms per batch (min MIN)`. benches/sasrec.sh runs
//! it beside ONNX Runtime on the same model and the same users.

use std::path::Path;
use std::time::{Duration, Instant};

use rankd::internals::{
    Backend, BatchBounds, CpuBackend, ModelDesc, ModelId, ModelSpec, Query, TableId, Task,
};

/// The ids of the one model (and its table) each CPU backend here holds.
const MODEL: ModelId = ModelId::new(0);
const TABLE: TableId = TableId::new(0);

const BATCHES: [usize; 3] = [1, 16, 64];

fn main() {
    // As the daemon runs.
    rankd::tune_allocator();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: cargo bench --bench sasrec -- DIR [ROUNDS]");
        std::process::exit(2);
    };
    let dir = Path::new(dir);
    let rounds: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(200);
    let spec = ModelSpec::read(&dir.join("model.toml")).expect("reading model.toml");
    let weights = spec
        .kind
        .load_weights(&spec, &dir.join(&spec.weights))
        .expect("reading the checkpoint");
    let items = spec
        .kind
        .embedded_items(&spec, &weights)
        .expect("items = \"item_emb\"")
        .expect("the item table");
    let histories: Vec<Vec<u64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("histories.json")).unwrap())
            .unwrap();
    let rows: Vec<Vec<u32>> = histories
        .iter()
        .map(|h| {
            let tail = &h[h.len().saturating_sub(spec.history_len)..];
            tail.iter()
                .map(|&id| items.row_of(id).expect("an item of the table"))
                .collect()
        })
        .collect();
    let mut cpu = CpuBackend::new();
    let desc = ModelDesc {
        kind: spec.kind,
        dim: spec.dim,
        user_feature_dim: 0,
        bounds: BatchBounds::of(&spec, spec.history_len),
        cpu_scoring: spec.cpu_scoring,
    };
    cpu.load(MODEL, desc, TABLE, &weights).unwrap();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    eprintln!(
        "sasrec d={} L={} on {} items, {} users, threads {threads}",
        spec.dim,
        spec.history_len,
        items.rows(),
        rows.len()
    );
    for b in BATCHES {
        // A score task with no candidates: the tower runs, nothing is scored.
        let batches: Vec<Vec<Query<'_>>> = rows
            .chunks(b)
            .filter(|c| c.len() == b)
            .map(|c| {
                c.iter()
                    .map(|h| Query {
                        history: h,
                        features: None,
                        sparse: None,
                        context: None,
                        task: Task::Score { rows: &[] },
                    })
                    .collect()
            })
            .collect();
        for q in batches.iter().take(3) {
            cpu.run(MODEL, &items, q).unwrap();
        }
        let mut times = Vec::with_capacity(rounds);
        for r in 0..rounds {
            let q = &batches[r % batches.len()];
            let t = Instant::now();
            std::hint::black_box(cpu.run(MODEL, &items, q).unwrap());
            times.push(t.elapsed());
        }
        let mean = times.iter().sum::<Duration>() / rounds as u32;
        let min = times.iter().min().unwrap();
        println!(
            "rankd batch {b}: {:.4} ms per batch (min {:.4})",
            mean.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3
        );
    }
}
