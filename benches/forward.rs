//! The demo model's forward pass on the CPU backend at batch sizes 1–256,
//! the fused scan alone (per batch size, per instruction set, random and
//! zero queries), and in the same run the two roofs it is held to: a large
//! f32 matrix product (candle → gemm) and a streaming read (a sum over an
//! array the table's size and over one far past the caches). Throughput is
//! reported in elements/s where one element is one floating-point
//! operation, so `Gelem/s` reads as GFLOP/s: scoring counts 2·N·d per user
//! (the item-table product), the matmul 2·n³; the reads in bytes/s.
//! `-- --roofline` times the scan against both roofs; `-- --anchors DIR`
//! writes the table and tower queries for benches/anchors.sh (FAISS, numpy)
//! and times rankd's side of it; `-- --crossover [ROUNDS]` times the
//! scan's kernels at batch 1–16 on each instruction set (behind
//! `Isa::kernel`).

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use rankd::internals::cpu::fused::{score_topk_with, score_topk_with_kernel, Isa, Kernel};
use rankd::internals::cpu::int8::{score_topk_int8_with, Int8Kernel};
use rankd::internals::cpu::{score_topk, score_topk_int8};
use rankd::internals::CpuBackend;
use rankd::internals::Rng;
use rankd::internals::{Backend, BatchBounds, ModelDesc, ModelId, Query, TableId, Task};
use rankd::internals::{ItemTable, ModelSpec, TowerWeights, Weights};
use rayon::prelude::*;

/// The ids of the one model (and its table) each CPU backend here holds.
const MODEL: ModelId = ModelId::new(0);
const TABLE: TableId = TableId::new(0);

fn demo_forward(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    rankd::generate_demo(&root, rankd::DEMO_SEED).expect("writing the demo repository");
    let spec = ModelSpec::read(&root.join("demo/1/model.toml")).unwrap();
    let weights =
        Weights::new(TowerWeights::load(&root.join("demo/1/weights.safetensors"), &spec).unwrap());
    let items = ItemTable::load(&root.join("catalogues/demo/items.safetensors"), spec.dim).unwrap();
    let mut backend = CpuBackend::new();
    let desc = ModelDesc {
        kind: spec.kind,
        dim: spec.dim,
        user_feature_dim: spec.user_feature_dim,
        bounds: BatchBounds::of(&spec, spec.history_len),
        cpu_scoring: spec.cpu_scoring,
    };
    backend.load(MODEL, desc, TABLE, &weights).unwrap();
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
                sparse: None,
                context: None,
                task: Task::TopK {
                    k: 10,
                    exclude: &excludes[i],
                    filter: None,
                },
            })
            .collect();
        group.throughput(Throughput::Elements(
            (2 * items.rows() * spec.dim * batch) as u64,
        ));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &queries, |b, q| {
            b.iter(|| backend.run(MODEL, &items, q).unwrap())
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

/// The FMA units' peak on every thread: 16 independent chains of the widest
/// FMA the CPU has, so neither latency nor memory limits it. Returns FLOP/s
/// and the vector width in f32 lanes.
fn fma_peak() -> (f64, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        fn chains512(iters: usize) -> f32 {
            let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_set1_ps(1.0); 16];
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, x, y);
                }
            }
            acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
        }
        #[target_feature(enable = "avx2,fma")]
        fn chains256(iters: usize) -> f32 {
            let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_set1_ps(1.0); 16];
            let mut out = [0f32; 8];
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = _mm256_fmadd_ps(*a, x, y);
                }
            }
            let s = acc
                .iter()
                .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
            // SAFETY: `out` holds 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
            out.iter().sum()
        }
        let threads = rayon::current_num_threads();
        let iters = 2_000_000;
        let lanes = if is_x86_feature_detected!("avx512f") {
            16
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            8
        } else {
            return (f64::NAN, 1);
        };
        let run = |_| {
            // SAFETY: the feature was detected above.
            unsafe {
                if lanes == 16 {
                    chains512(iters)
                } else {
                    chains256(iters)
                }
            }
        };
        let t = best(5, || (0..threads).into_par_iter().map(run).sum::<f32>());
        ((threads * iters * 16 * lanes * 2) as f64 / t, lanes)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (f64::NAN, 1)
}

/// The best (least disturbed) of `reps` timings of `f`, in seconds.
fn best<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The two roofs the scan is held to, timed in the same run as the scan
/// (`--roofline` and `--anchors`): a streaming read over an array the item
/// table's size on every thread, and a 2048³ f32 matrix product through
/// candle → gemm.
struct Roofs {
    stream: Vec<f32>,
    per: usize,
    m: usize,
    a: Tensor,
    b: Tensor,
}

impl Roofs {
    fn new(table_len: usize, rng: &mut Rng) -> Self {
        let stream: Vec<f32> = (0..table_len).map(|i| (i % 7) as f32).collect();
        let per = stream.len().div_ceil(rayon::current_num_threads());
        let m = 2048;
        let mut square = || {
            Tensor::from_vec(
                (0..m * m).map(|_| rng.uniform() as f32).collect::<Vec<_>>(),
                (m, m),
                &Device::Cpu,
            )
            .unwrap()
        };
        let (a, b) = (square(), square());
        Self {
            stream,
            per,
            m,
            a,
            b,
        }
    }

    fn read(&self) -> f32 {
        self.stream
            .par_chunks(self.per)
            .map(|part| {
                let lanes = part.chunks_exact(16).fold([0f32; 16], |mut acc, c| {
                    acc.iter_mut().zip(c).for_each(|(a, x)| *a += x);
                    acc
                });
                lanes.iter().sum::<f32>()
            })
            .sum::<f32>()
    }

    fn matmul(&self) -> Tensor {
        self.a.matmul(&self.b).unwrap()
    }

    fn matmul_flops(&self) -> f64 {
        2.0 * (self.m as f64).powi(3)
    }
}

/// `-- --roofline`: the scan against both roofs, every case timed in turn
/// in each of many rounds and each reported by its best round, so a burst of
/// other work on a shared machine slows one sample, not one case.
fn roofline() {
    let items = demo_items();
    let (n, d) = (items.rows(), items.dim());
    let table_bytes = (n * d * 4) as f64;
    let threads = rayon::current_num_threads();
    let mut rng = Rng::new(4);
    let batches = [1usize, 4, 16, 32, 64, 256];
    let random: Vec<Vec<f32>> = batches
        .iter()
        .map(|&b| (0..b * d).map(|_| rng.uniform() as f32 - 0.5).collect())
        .collect();
    let specs: Vec<(usize, &[u32])> = (0..256).map(|_| (10, &[][..])).collect();
    let zero = vec![0f32; 256 * d];
    let roofs = Roofs::new(n * d, &mut rng);
    let m = roofs.m;
    let isas = Isa::available();
    let rounds = 40;
    let mut t_read = f64::INFINITY;
    let mut t_mm = f64::INFINITY;
    let mut t_batch = vec![f64::INFINITY; batches.len()];
    let mut t_zero = [f64::INFINITY; 2];
    let mut t_isa = vec![[f64::INFINITY; 2]; isas.len()];
    for _ in 0..rounds {
        t_read = t_read.min(best(5, || roofs.read()));
        t_mm = t_mm.min(best(1, || roofs.matmul()));
        for (i, &b) in batches.iter().enumerate() {
            let reps = if b <= 16 { 5 } else { 2 };
            t_batch[i] = t_batch[i].min(best(reps, || score_topk(&items, &random[i], &specs[..b])));
        }
        for (j, (b, i)) in [(1usize, 0usize), (64, 4)].into_iter().enumerate() {
            t_zero[j] = t_zero[j].min(best(3, || score_topk(&items, &zero[..b * d], &specs[..b])));
            for (x, &isa) in isas.iter().enumerate() {
                t_isa[x][j] = t_isa[x][j].min(best(2, || {
                    score_topk_with(isa, threads, &items, &random[i], &specs[..b])
                }));
            }
        }
    }
    let (peak, lanes) = fma_peak();
    let bw = table_bytes / t_read;
    let rate = roofs.matmul_flops() / t_mm;
    println!("roofline: N = {n}, d = {d}, k = 10, {threads} threads, best of {rounds} rounds");
    println!(
        "streaming read of {:.1} MB: {:.3} ms, {:.1} GB/s",
        table_bytes / 1e6,
        t_read * 1e3,
        bw / 1e9
    );
    println!(
        "matmul {m}^3 f32 (candle -> gemm): {:.1} ms, {:.1} GFLOP/s",
        t_mm * 1e3,
        rate / 1e9
    );
    println!(
        "FMA peak ({lanes} f32 lanes, 16 chains per thread): {:.1} GFLOP/s",
        peak / 1e9
    );
    println!("| batch | time | memory bound | compute bound | GB/s (share of read) | GFLOP/s (share of matmul) |");
    println!("|---|---|---|---|---|---|");
    for (i, &b) in batches.iter().enumerate() {
        let t = t_batch[i];
        let flops = 2.0 * (n * d * b) as f64;
        println!(
            "| {b} | {:.3} ms | {:.3} ms | {:.3} ms | {:.1} ({:.0}%) | {:.1} ({:.0}%; {:.0}% of peak) |",
            t * 1e3,
            table_bytes / bw * 1e3,
            flops / rate * 1e3,
            table_bytes / t / 1e9,
            100.0 * table_bytes / t / bw,
            flops / t / 1e9,
            100.0 * flops / t / rate,
            100.0 * flops / t / peak
        );
    }
    for (j, (b, i)) in [(1usize, 0usize), (64, 4)].into_iter().enumerate() {
        println!(
            "batch {b}: zero query {:.3} ms vs random {:.3} ms ({:+.1}%)",
            t_zero[j] * 1e3,
            t_batch[i] * 1e3,
            100.0 * (t_zero[j] / t_batch[i] - 1.0)
        );
        for (x, isa) in isas.iter().enumerate() {
            println!("batch {b}: {isa:?} {:.3} ms", t_isa[x][j] * 1e3);
        }
    }
}

/// Writes `data` as a little-endian .npy file (format 1.0) of `shape`;
/// `descr` is numpy's name of the element type (`<f4`, `<u4`, `<u8`).
fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    let dims = if dims.len() == 1 {
        format!("{},", dims[0])
    } else {
        dims.join(", ")
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n', to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn le_bytes<T: Copy, const W: usize>(v: &[T], to: impl Fn(T) -> [u8; W]) -> Vec<u8> {
    v.iter().flat_map(|&x| to(x)).collect()
}

/// The anchors run's users: 256, each with a history of 20 distinct items
/// from one cluster of the demo catalogue or from two (10 + 10).
const ANCHOR_USERS: usize = 256;
const ANCHOR_HISTORY: usize = 20;
const ANCHOR_K: usize = 10;
const ANCHOR_BATCHES: [usize; 5] = [1, 4, 16, 64, 256];

/// `-- --anchors DIR [ROUNDS]` (benches/anchors.sh): writes the demo item
/// table, 256 users' query vectors (their histories through the demo tower,
/// as the CPU backend computes them) and the histories to DIR as .npy files
/// for the FAISS and numpy anchors, with rankd's top-k of each user; then
/// times, in each of ROUNDS rounds (after one warm-up round), the two roofs
/// and rankd's scan (k = 10, the history excluded, on the serving path's
/// threads; and on one thread, for reference) at batch 1, 4, 16, 64 and 256,
/// and appends every sample to DIR/samples.tsv (`case batch seconds`).
fn anchors(dir: &Path, rounds: usize) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    rankd::generate_demo(&root, rankd::DEMO_SEED).expect("writing the demo repository");
    let spec = ModelSpec::read(&root.join("demo/1/model.toml")).unwrap();
    let tower = TowerWeights::load(&root.join("demo/1/weights.safetensors"), &spec).unwrap();
    let items = ItemTable::load(&root.join("catalogues/demo/items.safetensors"), spec.dim).unwrap();
    let (n, d) = (items.rows(), items.dim());

    // Each cluster's rows, from the catalogue's clusters.csv (item id, cluster).
    let csv = std::fs::read_to_string(root.join("catalogues/demo/clusters.csv")).unwrap();
    let mut clusters: Vec<Vec<u32>> = Vec::new();
    for line in csv.lines().skip(1) {
        let (id, c) = line.split_once(',').unwrap();
        let (id, c): (u64, usize) = (id.parse().unwrap(), c.parse().unwrap());
        if clusters.len() <= c {
            clusters.resize(c + 1, Vec::new());
        }
        clusters[c].push(items.row_of(id).unwrap());
    }
    let mut rng = Rng::new(14);
    let histories: Vec<Vec<u32>> = (0..ANCHOR_USERS)
        .map(|_| {
            let runs = 1 + rng.below(2) as usize;
            let mut h: Vec<u32> = Vec::with_capacity(ANCHOR_HISTORY);
            for run in 0..runs {
                let pool = &clusters[rng.below(clusters.len() as u64) as usize];
                let want = ANCHOR_HISTORY * (run + 1) / runs;
                while h.len() < want {
                    let row = pool[rng.below(pool.len() as u64) as usize];
                    if !h.contains(&row) {
                        h.push(row);
                    }
                }
            }
            h
        })
        .collect();
    let excludes: Vec<Vec<u32>> = histories
        .iter()
        .map(|h| {
            let mut e = h.clone();
            e.sort_unstable();
            e
        })
        .collect();

    // The query vectors: [history mean ‖ zero features] through the tower,
    // with candle's Linear and ReLU as the CPU backend runs them.
    let desc = ModelDesc {
        kind: spec.kind,
        dim: spec.dim,
        user_feature_dim: spec.user_feature_dim,
        bounds: BatchBounds::of(&spec, spec.history_len),
        cpu_scoring: spec.cpu_scoring,
    };
    let width = desc.tower_dims().0;
    let mut x = vec![0f32; ANCHOR_USERS * width];
    for (h, row) in histories.iter().zip(x.chunks_exact_mut(width)) {
        rankd::internals::cpu::history_mean(&items, h, &mut row[..d]);
    }
    let mut t = Tensor::from_vec(x, (ANCHOR_USERS, width), &Device::Cpu).unwrap();
    for (i, l) in tower.layers.iter().enumerate() {
        let w = Tensor::from_slice(&l.weight, (l.out_dim, l.in_dim), &Device::Cpu).unwrap();
        let b = Tensor::from_slice(&l.bias, l.out_dim, &Device::Cpu).unwrap();
        t = candle_nn::Module::forward(&candle_nn::Linear::new(w, Some(b)), &t).unwrap();
        if i + 1 < tower.layers.len() {
            t = t.relu().unwrap();
        }
    }
    let queries: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(queries.len(), ANCHOR_USERS * d);
    let specs: Vec<(usize, &[u32])> = excludes.iter().map(|e| (ANCHOR_K, &e[..])).collect();
    let ours = score_topk(&items, &queries, &specs);

    // The same users through the whole CPU backend (tower and scan) must get
    // the same answers: these are the queries rankd serves.
    let mut backend = CpuBackend::new();
    backend
        .load(MODEL, desc, TABLE, &Weights::new(tower))
        .unwrap();
    let batch: Vec<Query<'_>> = (0..ANCHOR_USERS)
        .map(|i| Query {
            history: &histories[i],
            features: None,
            sparse: None,
            context: None,
            task: Task::TopK {
                k: ANCHOR_K,
                exclude: &excludes[i],
                filter: None,
            },
        })
        .collect();
    let served = backend.run(MODEL, &items, &batch).unwrap();
    for (i, out) in served.iter().enumerate() {
        match out {
            rankd::internals::Output::TopK(top) => assert_eq!(top, &ours[i], "user {i}"),
            other => panic!("user {i}: {other:?}"),
        }
    }

    let flat_hist: Vec<u32> = histories.iter().flatten().copied().collect();
    let top_ids: Vec<u64> = ours.iter().flat_map(|t| t.iter().map(|s| s.id)).collect();
    let top_scores: Vec<f32> = ours
        .iter()
        .flat_map(|t| t.iter().map(|s| s.score))
        .collect();
    assert_eq!(top_ids.len(), ANCHOR_USERS * ANCHOR_K);
    write_npy(
        &dir.join("table.npy"),
        "<f4",
        &[n, d],
        &le_bytes(items.embeddings(), f32::to_le_bytes),
    );
    write_npy(
        &dir.join("ids.npy"),
        "<u8",
        &[n],
        &le_bytes(items.ids(), u64::to_le_bytes),
    );
    write_npy(
        &dir.join("queries.npy"),
        "<f4",
        &[ANCHOR_USERS, d],
        &le_bytes(&queries, f32::to_le_bytes),
    );
    write_npy(
        &dir.join("history.npy"),
        "<u4",
        &[ANCHOR_USERS, ANCHOR_HISTORY],
        &le_bytes(&flat_hist, u32::to_le_bytes),
    );
    write_npy(
        &dir.join("rankd_ids.npy"),
        "<u8",
        &[ANCHOR_USERS, ANCHOR_K],
        &le_bytes(&top_ids, u64::to_le_bytes),
    );
    write_npy(
        &dir.join("rankd_scores.npy"),
        "<f4",
        &[ANCHOR_USERS, ANCHOR_K],
        &le_bytes(&top_scores, f32::to_le_bytes),
    );

    let roofs = Roofs::new(n * d, &mut rng);
    let isa = Isa::detect();
    let mut samples = String::new();
    for round in 0..=rounds {
        let mut put = |case: &str, batch: usize, t: f64| {
            if round > 0 {
                samples.push_str(&format!("{case}\t{batch}\t{t:.9}\n"));
            }
        };
        put("read", 0, best(1, || roofs.read()));
        put("matmul", 0, best(1, || roofs.matmul()));
        for b in ANCHOR_BATCHES {
            for _ in 0..if b <= 16 { 5 } else { 3 } {
                put(
                    "rankd",
                    b,
                    best(1, || score_topk(&items, &queries[..b * d], &specs[..b])),
                );
            }
            for _ in 0..if b <= 16 { 3 } else { 1 } {
                put(
                    "rankd1",
                    b,
                    best(1, || {
                        score_topk_with(isa, 1, &items, &queries[..b * d], &specs[..b])
                    }),
                );
            }
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("samples.tsv"))
        .unwrap();
    f.write_all(samples.as_bytes()).unwrap();
    let mut meta = format!(
        "rows\t{n}\ndim\t{d}\nk\t{ANCHOR_K}\nhistory\t{ANCHOR_HISTORY}\nthreads\t{}\nisa\t{:?}\nmatmul_flops\t{}\n",
        rayon::current_num_threads(),
        isa,
        roofs.matmul_flops()
    );
    meta.push_str(&format!("table_bytes\t{}\n", n * d * 4));
    std::fs::write(dir.join("rankd.tsv"), meta).unwrap();
    println!(
        "rankd: {rounds} rounds timed into {}",
        dir.join("samples.tsv").display()
    );
}

/// `-- --int8`: `cpu_scoring = "exact-int8"` against the f32 scan on the
/// demo table, side by side in the same rounds (each case by its best
/// round), at batch 1–64 and k = 10 and 100, for random queries and for
/// history means (the mean of 20 random rows, as the tower's input is: the
/// table's own directions). Prints the speed-up and the rows re-scored in
/// f32 per query; every answer is checked equal to the f32 one first.
fn int8_scan() {
    let items = demo_items();
    let (n, d) = (items.rows(), items.dim());
    let threads = rayon::current_num_threads();
    let (isa, kernel) = (Isa::detect(), Int8Kernel::detect());
    let t0 = Instant::now();
    let bytes = items.int8().bytes();
    let made = t0.elapsed();
    let mut rng = Rng::new(12);
    let batches = [1usize, 2, 4, 8, 16, 64];
    let random: Vec<f32> = (0..64 * d).map(|_| rng.uniform() as f32 - 0.5).collect();
    let mut history = vec![0f32; 64 * d];
    for q in history.chunks_exact_mut(d) {
        for _ in 0..20 {
            let row = items.embedding(rng.below(n as u64) as u32);
            q.iter_mut().zip(row).for_each(|(a, b)| *a += b / 20.0);
        }
    }
    let kinds = [("random", &random), ("history", &history)];
    let ks = [10usize, 100];
    let rounds = 30;
    // [kind][k][batch] -> (f32, int8, rescored per query)
    let mut t = vec![vec![vec![(f64::INFINITY, f64::INFINITY, 0.0); batches.len()]; ks.len()]; 2];
    for (x, (_, qs)) in kinds.iter().enumerate() {
        for (y, &k) in ks.iter().enumerate() {
            let specs: Vec<(usize, &[u32])> = (0..64).map(|_| (k, &[][..])).collect();
            for (i, &b) in batches.iter().enumerate() {
                let got =
                    score_topk_int8_with(isa, kernel, threads, &items, &qs[..b * d], &specs[..b]);
                assert!(!got.fell_back);
                assert_eq!(got.lists, score_topk(&items, &qs[..b * d], &specs[..b]));
                t[x][y][i].2 = got.rescored as f64 / b as f64;
            }
        }
    }
    // Each int8 kernel this CPU has against the f32 scan of the same
    // vector width (what a CPU with only that instruction set runs), random
    // queries, k = 10.
    let kernels: Vec<(Int8Kernel, Isa)> = Int8Kernel::available()
        .into_iter()
        .filter_map(|k| {
            let f = match k {
                Int8Kernel::Vnni512 => Isa::Avx512,
                Int8Kernel::Avx2 => Isa::Avx2Fma,
                Int8Kernel::Portable => Isa::Portable,
            };
            Isa::available().contains(&f).then_some((k, f))
        })
        .collect();
    let specs: Vec<(usize, &[u32])> = (0..64).map(|_| (10, &[][..])).collect();
    let kernel_batches = [1usize, 2, 4, 8];
    let mut t_kernel =
        vec![vec![(f64::INFINITY, f64::INFINITY); kernel_batches.len()]; kernels.len()];
    for _ in 0..rounds {
        for (x, &(kern, f)) in kernels.iter().enumerate() {
            for (i, &b) in kernel_batches.iter().enumerate() {
                let (q, s) = (&random[..b * d], &specs[..b]);
                let c = &mut t_kernel[x][i];
                c.0 =
                    c.0.min(best(3, || score_topk_with(f, threads, &items, q, s)));
                c.1 = c.1.min(best(3, || {
                    score_topk_int8_with(f, kern, threads, &items, q, s)
                }));
            }
        }
        for (x, (_, qs)) in kinds.iter().enumerate() {
            for (y, &k) in ks.iter().enumerate() {
                let specs: Vec<(usize, &[u32])> = (0..64).map(|_| (k, &[][..])).collect();
                for (i, &b) in batches.iter().enumerate() {
                    let (q, s) = (&qs[..b * d], &specs[..b]);
                    let reps = if b <= 16 { 5 } else { 2 };
                    let c = &mut t[x][y][i];
                    c.0 = c.0.min(best(reps, || score_topk(&items, q, s)));
                    c.1 = c.1.min(best(reps, || score_topk_int8(&items, q, s)));
                }
            }
        }
    }
    println!(
        "exact-int8 vs f32: N = {n}, d = {d}, {threads} threads, f32 {isa:?}, int8 {kernel:?}, best of {rounds} rounds"
    );
    println!(
        "tables read: f32 {:.1} MB, int8 copy {:.1} MB (made in {:.1} ms)",
        (n * d * 4) as f64 / 1e6,
        bytes as f64 / 1e6,
        made.as_secs_f64() * 1e3
    );
    println!("| queries | k | batch | f32 | exact-int8 | speed-up | re-scored rows per query |");
    println!("|---|---|---|---|---|---|---|");
    for (x, (name, _)) in kinds.iter().enumerate() {
        for (y, k) in ks.iter().enumerate() {
            for (i, b) in batches.iter().enumerate() {
                let (f, q, r) = t[x][y][i];
                println!(
                    "| {name} | {k} | {b} | {:.3} ms | {:.3} ms | {:.2}x | {r:.1} |",
                    f * 1e3,
                    q * 1e3,
                    f / q
                );
            }
        }
    }
    println!("per instruction set, random queries, k = 10 (same rounds):");
    println!("| int8 kernel | f32 scan | batch | f32 | exact-int8 | speed-up |");
    println!("|---|---|---|---|---|---|");
    for (x, (kern, f)) in kernels.iter().enumerate() {
        for (i, b) in kernel_batches.iter().enumerate() {
            let (a, q) = t_kernel[x][i];
            println!(
                "| {kern:?} | {f:?} | {b} | {:.3} ms | {:.3} ms | {:.2}x |",
                a * 1e3,
                q * 1e3,
                a / q
            );
        }
    }
}

criterion_group!(benches, matmul, stream_read, fused_scan, demo_forward, ties);

/// The scan's three kernels at every batch size up to 16, on each
/// instruction set this CPU has, on every thread; the kernels alternate
/// within each round, and each keeps its best time over all rounds. Prints a
/// table per ISA with the kernel `Isa::kernel` picks and the fastest.
fn crossover(rounds: usize) {
    let items = demo_items();
    let (n, d) = (items.rows(), items.dim());
    let threads = rayon::current_num_threads();
    let mut rng = Rng::new(9);
    let qs: Vec<f32> = (0..16 * d).map(|_| rng.uniform() as f32 - 0.5).collect();
    let specs: Vec<(usize, &[u32])> = (0..16).map(|_| (10, &[][..])).collect();
    let isas = Isa::available();
    let kernels = [Kernel::Dots, Kernel::FourRows, Kernel::Blocked];
    // t[isa][b - 1][kernel]
    let mut t = vec![vec![[f64::INFINITY; 3]; 16]; isas.len()];
    for _ in 0..rounds {
        for (x, &isa) in isas.iter().enumerate() {
            for b in 1..=16 {
                for (k, &kernel) in kernels.iter().enumerate() {
                    let run = || {
                        score_topk_with_kernel(
                            isa,
                            kernel,
                            threads,
                            &items,
                            &qs[..b * d],
                            &specs[..b],
                            &[],
                        )
                    };
                    t[x][b - 1][k] = t[x][b - 1][k].min(best(3, run));
                }
            }
        }
    }
    println!("kernels: N = {n}, d = {d}, k = 10, {threads} threads, best of {rounds} rounds of 3");
    for (x, isa) in isas.iter().enumerate() {
        println!("{isa:?}:");
        println!("| batch | dots | four rows | blocked | picked | fastest |");
        println!("|---|---|---|---|---|---|");
        for b in 1..=16 {
            let row = t[x][b - 1];
            let fastest = (0..3).min_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap();
            println!(
                "| {b} | {:.3} ms | {:.3} ms | {:.3} ms | {:?} | {:?} |",
                row[0] * 1e3,
                row[1] * 1e3,
                row[2] * 1e3,
                isa.kernel(b),
                kernels[fastest]
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--crossover") {
        let rounds = args.get(i + 1).and_then(|r| r.parse().ok()).unwrap_or(10);
        crossover(rounds);
        return;
    }
    if args.iter().any(|a| a == "--roofline") {
        roofline();
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--anchors") {
        let dir = args.get(i + 1).expect("--anchors DIR [ROUNDS]");
        let rounds = args.get(i + 2).and_then(|r| r.parse().ok()).unwrap_or(10);
        anchors(Path::new(dir), rounds);
        return;
    }
    if std::env::args().any(|a| a == "--int8") {
        int8_scan();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
