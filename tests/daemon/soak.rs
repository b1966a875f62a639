//! The soak test: a minute of open-loop interactive load at twice the
//! daemon's measured capacity over the socket, a bulk job streaming over
//! HTTP and Kafka updates flowing, all at once. The daemon must stay up
//! within a memory bound, answer every interactive request with a result, a
//! degraded result, `overloaded` or `deadline_exceeded`, keep the accepted
//! answers within the SLO, keep the bulk job moving, apply every update, and
//! be back to its unloaded latency within 5 s of the load ending.
#![cfg(feature = "kafka")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::common::frame::{connect, read_frame, request_frame, send};
use crate::common::kafka::Broker;
use crate::common::*;

const EVENTS: &str = "rankd.events";
/// Users with histories: the load's callers, the bulk job's lines and the
/// Kafka events' users.
const USERS: u64 = 2_000;
/// Every interactive request's deadline.
const TIMEOUT_MS: u64 = 100;
/// The p99 that accepted interactive answers must meet, seen by the caller:
/// the deadline plus the load generator's own scheduling on this machine.
const SLO: Duration = Duration::from_millis(250);
/// How far the daemon's RSS may grow over the run.
const RSS_GROWTH_BOUND: u64 = 256 << 20;
const LOAD: Duration = Duration::from_secs(60);
const CONNECTIONS: usize = 8;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb << 10
}

fn recommend(id: u64, user: u64, timeout_ms: u64) -> Vec<u8> {
    request_frame(&json!({
        "id": id, "op": "recommend", "model": "demo",
        "user_id": user, "k": 10, "timeout_ms": timeout_ms,
    }))
}

/// Reads one frame without a time limit (the caller bounds the wait).
async fn next_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Option<Value> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let mut payload = vec![0; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut payload).await.ok()?;
    Some(rmp_serde::from_slice(&payload).expect("a MessagePack answer"))
}

/// What the interactive callers got.
#[derive(Default)]
struct Tally {
    answered: u64,
    model: u64,
    degraded: u64,
    cold_start: u64,
    overloaded: u64,
    deadline: u64,
    unexpected: Vec<String>,
    /// Caller-side latency of every accepted answer, in microseconds.
    accepted_us: Vec<u64>,
}

impl Tally {
    fn add(&mut self, v: &Value, took: Duration) {
        self.answered += 1;
        if v["ok"] == json!(true) {
            self.accepted_us.push(took.as_micros() as u64);
            let r = &v["result"];
            if r["degraded"] == json!(true) {
                self.degraded += 1;
            } else if r["cold_start"] == json!(true) {
                self.cold_start += 1;
            } else if r["items"].as_array().map(Vec::len) == Some(10) {
                self.model += 1;
            } else {
                self.unexpected.push(v.to_string());
            }
            return;
        }
        match v["error"]["type"].as_str() {
            Some("overloaded") => self.overloaded += 1,
            Some("deadline_exceeded") => self.deadline += 1,
            _ => {
                if self.unexpected.len() < 20 {
                    self.unexpected.push(v.to_string());
                }
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Duration::from_micros(sorted[i])
}

/// The median of `n` requests sent one at a time over `s`.
async fn sequential_median(s: &mut UnixStream, n: u64, first_id: u64) -> Duration {
    let mut took = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        send(
            s,
            &recommend(first_id + i, 1 + i % USERS, 1000),
            "sequential",
        )
        .await;
        let v = read_frame(s, "sequential").await;
        assert_eq!(v["ok"], json!(true), "{v}");
        took.push(t.elapsed().as_micros() as u64);
    }
    took.sort_unstable();
    percentile(&took, 0.5)
}

/// Closed loop on `CONNECTIONS` connections with `depth` requests
/// outstanding on each for `for_`: answers per second.
async fn saturation(d: &Daemon, depth: u64, for_: Duration) -> f64 {
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS as u64 {
        let (answered, stop) = (answered.clone(), stop.clone());
        let mut s = connect(&d.uds).await;
        tasks.push(tokio::spawn(async move {
            let mut id = c << 40;
            for _ in 0..depth {
                id += 1;
                send(&mut s, &recommend(id, 1 + id % USERS, 5000), "saturation").await;
            }
            let mut outstanding = depth;
            while outstanding > 0 {
                let v = next_frame(&mut s).await.expect("an answer");
                assert_eq!(v["ok"], json!(true), "{v}");
                answered.fetch_add(1, Ordering::Relaxed);
                outstanding -= 1;
                if !stop.load(Ordering::Relaxed) {
                    id += 1;
                    send(&mut s, &recommend(id, 1 + id % USERS, 5000), "saturation").await;
                    outstanding += 1;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (t, before) = (Instant::now(), answered.load(Ordering::Relaxed));
    tokio::time::sleep(for_).await;
    let rate = (answered.load(Ordering::Relaxed) - before) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rate
}

async fn applied(c: &reqwest::Client, d: &Daemon) -> i64 {
    let r = get_json(c, &d.url("/v1/ingest")).await;
    r["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == EVENTS)
        .map(|p| p["applied_offset"].as_i64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_capacity_for_a_minute_with_bulk_and_kafka_beside_it() {
    let _alone = alone();
    let broker = Broker::start();
    broker.create_topics(&[EVENTS, "rankd.items", "rankd.users"], 3);
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(
        &demo_models(),
        &[
            "--kafka-brokers",
            &broker.bootstrap(),
            "--snapshot-dir",
            state.path().to_str().unwrap(),
            "--degrade",
            "popular",
            "--uds-max-inflight",
            "100000",
        ],
    );
    let c = Daemon::client();
    let users: Vec<(u64, Vec<u64>)> = (1..=USERS).map(|u| (u, spread_history(u, 20))).collect();
    seed_histories(&c, &d, &users).await;

    let mut probe = connect(&d.uds).await;
    sequential_median(&mut probe, 50, 1 << 50).await;
    let unloaded = sequential_median(&mut probe, 100, 2 << 50).await;
    let capacity = saturation(&d, 64, Duration::from_secs(3)).await;
    let rate = 2.0 * capacity;
    let rss_start = rss_bytes(d.pid());
    eprintln!("soak: unloaded median {unloaded:?}, capacity {capacity:.0}/s, offering {rate:.0}/s");

    let stop = Arc::new(AtomicBool::new(false));

    // Kafka: clicks for the population, about 300 a second.
    let producing = {
        let (p, stop) = (broker.producer(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(0x50a6);
            let mut sent = 0i64;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let user = 1 + rng.below(USERS);
                let item = 1 + rng.below(100_000);
                let event = json!({"user_id": user, "item_id": item, "type": "click", "ts_ms": 1764000000000u64});
                p.send(EVENTS, &user.to_string(), &event.to_string());
                sent += 1;
                let due = start + Duration::from_secs_f64(sent as f64 / 300.0);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            p.flush();
            sent
        })
    };

    // The bulk job: recommend lines for the population, streamed without end.
    let bulk_ok = Arc::new(AtomicU64::new(0));
    let bulk_failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let lines = (0u64..).map(|i| format!("{{\"user_id\": {}, \"k\": 10}}\n", 1 + i % USERS));
    let (bulk_stream, _, bulk_writer) = chunked_post(&d.addr(), "/v1/models/demo/bulk", lines);
    let bulk_cut = bulk_stream.try_clone().unwrap();
    let bulk_reader = {
        let (ok, failed, stop) = (bulk_ok.clone(), bulk_failed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut line = 0u64;
            read_ndjson_response(bulk_stream, |v| {
                line += 1;
                if v["line"] != json!(line) || v.get("error").is_some() {
                    failed.lock().unwrap().push(v.to_string());
                } else {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                !stop.load(Ordering::Relaxed)
            })
        })
    };

    // Interactive: open-loop arrivals at `rate`, spread over the connections.
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..CONNECTIONS {
        let (mut rd, mut wr) = connect(&d.uds).await.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        writers.push(tx);
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let (sent_at, tally) = (sent_at.clone(), tally.clone());
        readers.push(tokio::spawn(async move {
            while let Some(v) = next_frame(&mut rd).await {
                let id = v["id"].as_u64().expect("an id");
                let at = sent_at.lock().unwrap().remove(&id).expect("a request sent");
                tally.lock().unwrap().add(&v, at.elapsed());
            }
        }));
    }
    let mut rss_peak = rss_start;
    let mut rng = Rng::new(0x50a7);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut next_rss = start;
    let bulk_at_start = bulk_ok.load(Ordering::Relaxed);
    while start.elapsed() < LOAD {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            // One caller in twenty is new: a cold start.
            let user = if rng.below(20) == 0 {
                1_000_000 + sent
            } else {
                1 + rng.below(USERS)
            };
            sent_at.lock().unwrap().insert(sent, Instant::now());
            writers[sent as usize % CONNECTIONS]
                .send(recommend(sent, user, TIMEOUT_MS))
                .unwrap();
        }
        if Instant::now() >= next_rss {
            rss_peak = rss_peak.max(rss_bytes(d.pid()));
            next_rss += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let bulk_during = bulk_ok.load(Ordering::Relaxed) - bulk_at_start;
    let load_ended = Instant::now();
    stop.store(true, Ordering::Relaxed);
    drop(writers);
    // Every request sent is answered, within its deadline and a little.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tally.lock().unwrap().answered < sent {
        assert!(
            Instant::now() < deadline,
            "{} of {sent} requests unanswered 5 s after the load ended",
            sent - tally.lock().unwrap().answered
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = bulk_cut.shutdown(std::net::Shutdown::Both);

    // Back to the unloaded latency within 5 s (on a new connection: the
    // first one has been idle for longer than the idle timeout).
    let mut probe = connect(&d.uds).await;
    let mut id = 3 << 50;
    let recovered = loop {
        let median = sequential_median(&mut probe, 20, id).await;
        id += 20;
        if median <= (unloaded * 2).max(unloaded + Duration::from_millis(2)) {
            break load_ended.elapsed();
        }
        assert!(
            load_ended.elapsed() < Duration::from_secs(5),
            "median {median:?} against {unloaded:?} unloaded, 5 s after the load"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    rss_peak = rss_peak.max(rss_bytes(d.pid()));

    for r in readers {
        r.abort();
    }
    let _ = tokio::task::spawn_blocking(move || {
        let _ = bulk_reader.join();
        let _ = bulk_writer.join();
    })
    .await;
    let produced = tokio::task::spawn_blocking(move || producing.join().unwrap())
        .await
        .unwrap();

    let t = std::mem::take(&mut *tally.lock().unwrap());
    let mut accepted = t.accepted_us.clone();
    accepted.sort_unstable();
    let p99 = percentile(&accepted, 0.99);
    // Cold-start answers come from the popularity list, not a batch.
    let executed = t.model;
    eprintln!(
        "soak: {sent} sent over {LOAD:?}: {} model, {} cold start, {} degraded, {} overloaded, \
         {} deadline; accepted p50 {:?} p99 {p99:?}; bulk {bulk_during} lines; \
         RSS {} -> peak {} MiB; recovered in {recovered:?}",
        t.model,
        t.cold_start,
        t.degraded,
        t.overloaded,
        t.deadline,
        percentile(&accepted, 0.5),
        rss_start >> 20,
        rss_peak >> 20,
    );
    assert!(d.is_running(), "the daemon stayed up\n{}", d.log());
    assert!(
        t.unexpected.is_empty(),
        "every answer is a result, degraded, overloaded or deadline_exceeded: {:?}",
        t.unexpected
    );
    assert_eq!(t.answered, sent);
    assert!(
        t.degraded + t.overloaded + t.deadline > 0,
        "twice the capacity was shed somewhere"
    );
    assert!(
        t.model as f64 > 0.25 * capacity * LOAD.as_secs_f64(),
        "the model kept serving: {} answers in {LOAD:?} at a capacity of {capacity:.0}/s",
        t.model
    );
    assert!(p99 <= SLO, "accepted p99 {p99:?} over the SLO {SLO:?}");
    assert!(
        rss_peak <= rss_start + RSS_GROWTH_BOUND,
        "RSS grew from {} to {} MiB",
        rss_start >> 20,
        rss_peak >> 20
    );
    let failed = bulk_failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "bulk lines failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    // Bulk gets at least its minimum share (0.05) of the executed rows.
    let share = bulk_during as f64 / (bulk_during + executed) as f64;
    assert!(
        share >= 0.04,
        "bulk ran {bulk_during} of {} rows ({share:.3})",
        bulk_during + executed
    );
    // Every Kafka update sent during the load is applied.
    let deadline = Instant::now() + Duration::from_secs(15);
    while applied(&c, &d).await < produced {
        assert!(
            Instant::now() < deadline,
            "{} of {produced} events applied",
            applied(&c, &d).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.signal("TERM");
    let exit = d.wait_exit(Duration::from_secs(15));
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}\n{}", d.log());
}
