//! The demo model's forward pass on the CPU backend at batch sizes 1–256,
//! the fused scan alone (per batch size, per instruction set, random and
//! zero queries), and in the same run the two roofs it is held to: a large
//! f32 matrix product (candle → gemm) and a streaming read (a sum over an
//! array the table's size and over one far past the caches). Throughput is
//! reported in elements/s where one element is one floating-point
//! operation, so `Gelem/s` reads as GFLOP/s: scoring counts 2·N·d per user
//! (the item-table product), the matmul 2·n³; the reads in bytes/s.

use std::path::Path;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankd::internals::cpu::fused::{score_topk_with, Isa};
use rankd::internals::cpu::score_topk;
use rankd::internals::CpuBackend;
use rankd::internals::Rng;
use rankd::internals::{Backend, BatchBounds, ModelDesc, Query, Task};
use rankd::internals::{ItemTable, ModelSpec, TowerWeights};
use rayon::prelude::*;

fn demo_forward(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    rankd::generate_demo(&root, rankd::DEMO_SEED).expect("writing the demo repository");
    let spec = ModelSpec::read(&root.join("demo/1/model.toml")).unwrap();
    let weights = TowerWeights::load(&root.join("demo/1/weights.safetensors"), &spec).unwrap();
    let items = ItemTable::load(&root.join("catalogues/demo/items.safetensors"), spec.dim).unwrap();
    let mut backend = CpuBackend::new();
    let desc = ModelDesc {
        kind: spec.kind,
        dim: spec.dim,
        user_feature_dim: spec.user_feature_dim,
        bounds: BatchBounds::of(&spec, spec.history_len),
    };
    backend.load(0, desc, 0, &weights).unwrap();
    let mut rng = Rng::new(1);
    let histories: Vec<Vec<u32>> = (0..256)
        .map(|_| {
            (0..20)
                .map(|_| rng.below(items.rows() as u64) as u32)
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
    let mut group = c.benchmark_group("demo_recommend_k10");
    group.sample_size(20);
    for batch in [1usize, 4, 16, 64, 256] {
        let queries: Vec<Query<'_>> = (0..batch)
            .map(|i| Query {
                history: &histories[i],
                features: None,
                task: Task::TopK {
                    k: 10,
                    exclude: &excludes[i],
                },
            })
            .collect();
        group.throughput(Throughput::Elements(
            (2 * items.rows() * spec.dim * batch) as u64,
        ));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &queries, |b, q| {
            b.iter(|| backend.run(0, &items, q).unwrap())
        });
    }
    group.finish();
}

/// The item-table scan alone (score + top-k, k = 10) for random query vectors
/// and for zero ones, where every item ties: the tie test must keep the zero
/// case as cheap as the random one.
fn ties(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    rankd::generate_demo(&root, rankd::DEMO_SEED).expect("writing the demo repository");
    let items = ItemTable::load(&root.join("catalogues/demo/items.safetensors"), 64).unwrap();
    let d = items.dim();
    let mut rng = Rng::new(3);
    let mut group = c.benchmark_group("demo_topk_query");
    group.sample_size(20);
    for batch in [1usize, 64] {
        let random: Vec<f32> = (0..batch * d).map(|_| rng.uniform() as f32 - 0.5).collect();
        let zero = vec![0f32; batch * d];
        let specs: Vec<(usize, &[u32])> = (0..batch).map(|_| (10, &[][..])).collect();
        group.throughput(Throughput::Elements((2 * items.rows() * d * batch) as u64));
        for (name, qs) in [("random", &random), ("zero", &zero)] {
            group.bench_function(BenchmarkId::new(name, batch), |b| {
                b.iter(|| score_topk(&items, qs, &specs))
            });
        }
    }
    group.finish();
}

fn demo_items() -> ItemTable {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    rankd::generate_demo(&root, rankd::DEMO_SEED).expect("writing the demo repository");
    ItemTable::load(&root.join("catalogues/demo/items.safetensors"), 64).unwrap()
}

/// The scan alone (k = 10, random queries) at the roofline's batch sizes,
/// then each instruction set this CPU has at batch 1 and 64.
fn fused_scan(c: &mut Criterion) {
    let items = demo_items();
    let d = items.dim();
    let threads = rayon::current_num_threads();
    let mut rng = Rng::new(4);
    let mut group = c.benchmark_group("fused_topk_k10");
    group.sample_size(20);
    for batch in [1usize, 4, 16, 32, 64, 256] {
        let qs: Vec<f32> = (0..batch * d).map(|_| rng.uniform() as f32 - 0.5).collect();
        let specs: Vec<(usize, &[u32])> = (0..batch).map(|_| (10, &[][..])).collect();
        group.throughput(Throughput::Elements((2 * items.rows() * d * batch) as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter(|| score_topk(&items, &qs, &specs))
        });
        if batch == 1 || batch == 64 {
            for isa in Isa::available() {
                let name = format!("{isa:?}");
                group.bench_function(BenchmarkId::new(name, batch), |b| {
                    b.iter(|| score_topk_with(isa, threads, &items, &qs, &specs))
                });
            }
        }
    }
    group.finish();
}

/// Streaming-read bandwidth on all cores: a sum over an array the item
/// table's size (where the table itself lives: it may fit in the last-level
/// cache) and over 512 MiB (main memory).
fn stream_read(c: &mut Criterion) {
    let table = demo_items().embeddings().len();
    let mut group = c.benchmark_group("stream_read");
    group.sample_size(20);
    for len in [table, 128 << 20] {
        let data: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
        let threads = rayon::current_num_threads();
        let per = len.div_ceil(threads);
        group.throughput(Throughput::Bytes((len * 4) as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{}MB", len * 4 / 1_000_000)),
            |b| {
                b.iter(|| {
                    data.par_chunks(per)
                        .map(|part| {
                            let lanes = part.chunks_exact(16).fold([0f32; 16], |mut acc, c| {
                                acc.iter_mut().zip(c).for_each(|(a, x)| *a += x);
                                acc
                            });
                            lanes.iter().sum::<f32>()
                        })
                        .sum::<f32>()
                })
            },
        );
    }
    group.finish();
}

fn matmul(c: &mut Criterion) {
    let n = 2048;
    let mut rng = Rng::new(2);
    let mut data = || -> Vec<f32> { (0..n * n).map(|_| rng.uniform() as f32).collect() };
    let a = Tensor::from_vec(data(), (n, n), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(data(), (n, n), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("matmul_f32");
    group.sample_size(10);
    group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
    group.bench_function(BenchmarkId::from_parameter(n), |bch| {
        bch.iter(|| a.matmul(&b).unwrap())
    });
    group.finish();
}

criterion_group!(benches, matmul, stream_read, fused_scan, demo_forward, ties);
criterion_main!(benches);
