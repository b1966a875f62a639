//! The feature-update path without a broker (target: >= 200,000 updates/s on
//! 2 cores): decode + validate (`Validator::decode`), coalescing in batches of
//! 1,024 (`Coalescer`, with the per-message `consumed` bookkeeping the Kafka
//! thread does), and `State::apply` (plus `take_changed_rows`, which the
//! executor runs after every batch that wrote items) on a state holding the
//! demo item table (100,000 items x 64).
//!
//! The messages are a realistic mix, pre-encoded as the JSON the topics carry:
//! 70% click events (users uniform over 100,000, items over the catalogue),
//! 20% item upserts (64-float embeddings, existing ids) and 10% user feature
//! upserts (16 floats). Versions keep increasing from one iteration to the
//! next, so no upsert turns stale because the benchmark repeats itself. Each
//! iteration encodes a fresh chunk untimed and times only the stage named.
//! Throughput is in elements = updates (messages), so criterion prints
//! updates/s.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rankd::internals::ItemTable;
use rankd::internals::Rng;
use rankd::internals::State;
use rankd::internals::{Coalescer, Stream, Update, UpdateBatch, Validator};

const USERS: u64 = 100_000;
const ITEMS: u64 = 100_000;
const ITEM_DIM: usize = 64;
const USER_DIM: usize = 16;
const BATCH: usize = 1024;
/// Messages per timed iteration: 16 batches of 1,024.
const CHUNK: usize = 16 * BATCH;
const PARTITIONS: i32 = 3;

/// One pre-encoded message with the source position the Kafka thread sees.
struct Msg {
    stream: Stream,
    topic: &'static str,
    partition: i32,
    offset: i64,
    ts_ms: i64,
    payload: Vec<u8>,
}

/// Generates the message mix; versions and offsets only ever grow.
struct Mix {
    rng: Rng,
    version: u64,
    offsets: [[i64; PARTITIONS as usize]; 3],
}

fn floats(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}

impl Mix {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            version: 0,
            offsets: [[0; PARTITIONS as usize]; 3],
        }
    }

    fn message(&mut self) -> Msg {
        let ts_ms = 1_764_000_000_000i64;
        let roll = self.rng.below(100);
        let (stream, topic, key, payload) = if roll < 70 {
            let user = 1 + self.rng.below(USERS);
            let item = 1 + self.rng.below(ITEMS);
            let p = serde_json::json!({
                "user_id": user, "item_id": item, "type": "click", "ts_ms": ts_ms
            });
            (Stream::Events, "rankd.events", user, p)
        } else if roll < 90 {
            self.version += 1;
            let item = 1 + self.rng.below(ITEMS);
            let p = serde_json::json!({
                "item_id": item,
                "embedding": floats(&mut self.rng, ITEM_DIM),
                "version": self.version
            });
            (Stream::Items, "rankd.items", item, p)
        } else {
            self.version += 1;
            let user = 1 + self.rng.below(USERS);
            let p = serde_json::json!({
                "user_id": user,
                "features": floats(&mut self.rng, USER_DIM),
                "version": self.version
            });
            (Stream::Users, "rankd.users", user, p)
        };
        let partition = (key % PARTITIONS as u64) as i32;
        let slot = &mut self.offsets[stream as usize][partition as usize];
        let offset = *slot;
        *slot += 1;
        Msg {
            stream,
            topic,
            partition,
            offset,
            ts_ms,
            payload: serde_json::to_vec(&payload).expect("encoding a message"),
        }
    }

    fn chunk(&mut self) -> Vec<Msg> {
        (0..CHUNK).map(|_| self.message()).collect()
    }
}

fn validator() -> Validator {
    let catalogues = rankd::internals::Catalogues::new();
    catalogues.set(
        "items",
        Some(rankd::internals::Shape {
            dim: ITEM_DIM,
            attributes: Vec::new(),
        }),
    );
    let users = rankd::internals::SharedUserDims::default();
    users.set(rankd::internals::UserDims::of([(USER_DIM, 0)]));
    Validator {
        catalogues,
        users,
        event_types: rankd::Config::default().kafka.event_types,
    }
}

fn decode_all(v: &Validator, msgs: &[Msg]) -> Vec<Option<Update>> {
    msgs.iter()
        .map(|m| v.decode(m.stream, &m.payload).ok())
        .collect()
}

/// Coalesces in batches of `BATCH` messages, as the Kafka thread does.
fn coalesce(msgs: &[Msg], updates: Vec<Option<Update>>) -> Vec<UpdateBatch> {
    let mut c = Coalescer::new();
    let mut out = Vec::with_capacity(msgs.len() / BATCH + 1);
    for (m, u) in msgs.iter().zip(updates) {
        c.consumed(Some((m.topic, m.partition, m.offset)), Some(m.ts_ms));
        if let Some(u) = u {
            c.push(u);
        }
        if c.len() >= BATCH {
            out.push(c.take());
        }
    }
    if !c.is_empty() {
        out.push(c.take());
    }
    out
}

fn apply_all(state: &mut State, batches: &[UpdateBatch]) -> usize {
    let mut applied = 0;
    for b in batches {
        let r = state.apply(b);
        applied += r.events + r.items + r.users;
        if r.items > 0 {
            black_box(state.take_changed_rows());
        }
    }
    applied
}

/// Decodes, coalesces and applies, batch by batch, like the Kafka thread and
/// the executor together.
fn pipeline(v: &Validator, state: &mut State, msgs: &[Msg]) -> usize {
    let mut c = Coalescer::new();
    let mut applied = 0;
    let mut flush = |c: &mut Coalescer, state: &mut State| {
        let mut b = c.take();
        // The Kafka thread moves the timestamps out before handing the batch over.
        black_box(std::mem::take(&mut b.timestamps_ms));
        let r = state.apply(&b);
        applied += r.events + r.items + r.users;
        if r.items > 0 {
            black_box(state.take_changed_rows());
        }
    };
    for m in msgs {
        c.consumed(Some((m.topic, m.partition, m.offset)), Some(m.ts_ms));
        if let Ok(u) = v.decode(m.stream, &m.payload) {
            c.push(u);
        }
        if c.len() >= BATCH {
            flush(&mut c, state);
        }
    }
    if !c.is_empty() {
        flush(&mut c, state);
    }
    applied
}

fn update_path(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    rankd::generate_demo(&root, rankd::DEMO_SEED).expect("writing the demo repository");
    let table = ItemTable::load(&root.join("catalogues/demo/items.safetensors"), ITEM_DIM)
        .expect("loading the demo item table");
    let mut state = State::new(50);
    state.add_table("items", table);
    let v = validator();
    let mut mix = Mix::new(7);

    // A steady state first: most of the 100,000 users have a history and
    // features before anything is timed.
    for _ in 0..8 {
        let msgs = mix.chunk();
        pipeline(&v, &mut state, &msgs);
    }
    // Sanity: every message of a chunk decodes (the mix holds no invalid ones).
    let probe = mix.chunk();
    assert!(decode_all(&v, &probe).iter().all(Option::is_some));

    let mut group = c.benchmark_group("ingest_update_path");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Elements(CHUNK as u64));

    group.bench_function("decode_validate", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let msgs = mix.chunk();
                let t = Instant::now();
                for m in &msgs {
                    let _ = black_box(v.decode(m.stream, black_box(&m.payload)));
                }
                timed += t.elapsed();
            }
            timed
        })
    });

    group.bench_function("coalesce_1024", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let msgs = mix.chunk();
                let updates = decode_all(&v, &msgs);
                let t = Instant::now();
                let batches = black_box(coalesce(&msgs, updates));
                timed += t.elapsed();
                drop(batches);
            }
            timed
        })
    });

    group.bench_function("apply", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let msgs = mix.chunk();
                let batches = coalesce(&msgs, decode_all(&v, &msgs));
                let t = Instant::now();
                black_box(apply_all(&mut state, &batches));
                timed += t.elapsed();
                drop(batches);
            }
            timed
        })
    });

    group.bench_function("decode_coalesce_apply", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let msgs = mix.chunk();
                let t = Instant::now();
                black_box(pipeline(&v, &mut state, &msgs));
                timed += t.elapsed();
            }
            timed
        })
    });
    group.finish();
}

/// Not part of the update path's throughput, but work the same executor
/// thread does between scoring batches while updates flow: the periodic
/// snapshot (`State::snapshot`, run on the executor every
/// --snapshot-interval-ms when the state changed) of a state like the one the
/// broker benchmark leaves behind (100,000 users with a few history entries,
/// a tenth with features, some thousands of rewritten items). Recommend
/// requests wait for it.
fn executor_stalls(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let table = ItemTable::load(&root.join("catalogues/demo/items.safetensors"), ITEM_DIM)
        .expect("loading the demo item table");
    let mut state = State::new(50);
    state.add_table("items", table);
    let v = validator();
    let mut mix = Mix::new(11);
    // About 300,000 messages: ~2 history entries per user, ~30,000 feature
    // sets, ~60,000 item upserts.
    for _ in 0..18 {
        let msgs = mix.chunk();
        pipeline(&v, &mut state, &msgs);
    }
    black_box(state.take_changed_rows());
    let mut group = c.benchmark_group("executor_stalls");
    group.sample_size(10);
    group.bench_function("state_snapshot_100k_users", |b| {
        // The snapshot thread drops it, not the executor.
        b.iter_with_large_drop(|| state.snapshot())
    });
    // What the executor does per snapshot instead: copy what changed since
    // the last capture. Each sample follows 2 chunks of messages (32,768,
    // more than 5 s of updates at 5,000/s).
    black_box(state.capture(true));
    group.bench_function("state_capture_after_32k_updates", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                for _ in 0..2 {
                    let msgs = mix.chunk();
                    pipeline(&v, &mut state, &msgs);
                }
                black_box(state.take_changed_rows());
                let started = Instant::now();
                let delta = black_box(state.capture(false));
                timed += started.elapsed();
                drop(delta);
            }
            timed
        })
    });
    group.finish();
}

criterion_group!(benches, update_path, executor_stalls);
criterion_main!(benches);
