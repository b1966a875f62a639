//! Kafka ingestion benchmarks through a real broker (run by benches/ingest.sh,
//! which starts tansu and stops it). One `run` is one round:
//!
//! 2. catch-up throughput: N pre-encoded events on `rankd.events` read by a
//!    plain librdkafka `BaseConsumer` (defaults; before and after rankd), then
//!    applied by `rankd serve` (until `/v1/ingest` reports all N applied,
//!    polled every 10 ms), each timed from its start: the plain consumer from
//!    its creation, rankd from its process spawn (model loading included). A
//!    third plain read with rankd's consumer settings on its 9 partitions is
//!    reported beside them;
//! 3. freshness at a paced 5,000 updates/s (70% click events, 20% item
//!    upserts of 64 floats, 10% user feature upserts of 16 floats over the
//!    three topics; message timestamp = send time), from the bucket deltas of
//!    `rankd_ingest_freshness_seconds` in `/metrics`. As the broker's share, a
//!    plain consumer configured like rankd's (fetch.wait.max.ms 10, the same
//!    3 x 3 partition layout on `bench.probe.*`) times the same paced mix
//!    before rankd starts, without and with an async offset commit every 2 ms
//!    (rankd commits after every batch; batches close after 2 ms);
//! 4. recommend p99 under `rankd bench --transport uds --rate R` (R = half the
//!    closed-loop saturation measured in the round, and 1,800/s) with no
//!    updates, with 5,000 updates/s ingested, and, as a control, with the same
//!    5,000 messages/s produced to topics rankd does not read, in that order,
//!    `--bench-pairs` times per rate.
//!
//! CPU use (cores) of tansu, rankd (and its threads), this program and
//! `rankd bench`, and of everything else on the machine, is recorded for each
//! measurement from /proc, because the machine is shared.
//!
//! ```text
//! ingest_bench create-topics --brokers 127.0.0.1:9092
//! ingest_bench run --brokers 127.0.0.1:9092 --workdir DIR --out DIR/round1.json [--messages 200000 ...]
//! ingest_bench summarize DIR/round1.json DIR/round2.json
//! ingest_bench probe|produce|committed --brokers ...   (single steps, for experiments)
//! ```
//!
//! Every wait is bounded; every process started here is killed when its guard
//! drops, and its pid is appended to `--pids` so the script's trap can kill it
//! if this program dies first.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use rankd::internals::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

const EVENTS: &str = "rankd.events";
const ITEMS: &str = "rankd.items";
const USERS: &str = "rankd.users";
const TOPICS: [&str; 3] = [EVENTS, ITEMS, USERS];
/// Carry the same mix for the plain-consumer latency probe, laid out like
/// rankd's topics (3 x 3 partitions); rankd ignores them.
const PROBES: [&str; 3] = [
    "bench.probe.events",
    "bench.probe.items",
    "bench.probe.users",
];

/// The probe topic standing in for one of rankd's.
fn probe_topic(topic: &str) -> &'static str {
    match topic {
        EVENTS => PROBES[0],
        ITEMS => PROBES[1],
        _ => PROBES[2],
    }
}
const N_USERS: u64 = 100_000;
const N_ITEMS: u64 = 100_000;
/// The +Inf bucket's bound, kept finite so the figures stay valid JSON.
const INF_LE: f64 = 1e9;
/// A figure that could not be computed (JSON has no NaN).
const NA: f64 = -1.0;

#[derive(Parser)]
#[command(about = "rankd Kafka ingestion benchmarks (see benches/ingest.sh)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Creates rankd.events, rankd.items and rankd.users with the admin API
    CreateTopics {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
    },
    /// One round of targets 2-4 against a fresh broker; writes the figures as JSON
    Run(Box<RunArgs>),
    /// Prints the table of every round's figures with the targets
    Summarize { files: Vec<PathBuf> },
    /// Offsets a consumer group committed on rankd's topics, per partition
    Committed {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "rankd")]
        group: String,
    },
    /// Only paced production of the mix to rankd's topics (for experiments)
    Produce {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value_t = 5000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Versions start above this (keep it above earlier runs' on one rankd)
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
    /// Only the plain-consumer latency probe on bench.probe (broker share of freshness)
    Probe {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value_t = 5000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Commit offsets asynchronously this often (ms), as rankd does per batch
        #[arg(long)]
        commit_ms: Option<u64>,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long)]
    brokers: String,
    #[arg(long, default_value = "target/release/rankd")]
    rankd: PathBuf,
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Where rankd's socket, snapshots and logs go
    #[arg(long)]
    workdir: PathBuf,
    /// The round's figures (JSON)
    #[arg(long)]
    out: PathBuf,
    /// Pids of started processes are appended here
    #[arg(long)]
    pids: Option<PathBuf>,
    /// The broker's pid, for CPU accounting
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Events for the catch-up measurement (target 2)
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Paced update rate for targets 3 and 4
    #[arg(long, default_value_t = 5000.0)]
    update_rate: f64,
    /// Length of the paced freshness run (target 3)
    #[arg(long, default_value_t = 10.0)]
    fresh_secs: f64,
    /// Open-loop recommend rates of the p99 comparison (target 4): numbers,
    /// or `half` for half the measured closed-loop saturation
    #[arg(long, value_delimiter = ',', default_value = "half,1800")]
    bench_rates: Vec<String>,
    /// Duration of each `rankd bench` run
    #[arg(long, default_value = "10s")]
    bench_duration: String,
    /// Without/with-ingestion pairs of `rankd bench` runs
    #[arg(long, default_value_t = 2)]
    bench_pairs: usize,
    /// Extra `rankd serve` arguments, for experiments (repeat the flag:
    /// --rankd-arg=--snapshot-interval-ms --rankd-arg=600000)
    #[arg(long, allow_hyphen_values = true)]
    rankd_arg: Vec<String>,
    /// Closed-loop saturation probe before target 4 (0 skips it)
    #[arg(long, default_value_t = 5)]
    saturation_secs: u64,
}

// ---------------------------------------------------------------- figures

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Consume {
    who: String,
    messages: u64,
    /// From the consumer's start to the last message: plain, after the
    /// consumer is created (before metadata and assignment); rankd, from the
    /// process being spawned (model loading included, so this favours the
    /// plain consumer).
    secs_from_start: f64,
    rate_from_start: f64,
    /// rankd only: from its ready line (printed once its consumer runs).
    secs_from_ready: f64,
    rate_from_ready: f64,
    /// Steady state: messages per second between 10% and 90% consumed
    /// (rankd: /v1/ingest polled every 10 ms).
    rate_10_90: f64,
    /// CPU use while consuming, cores by process.
    cpu: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Freshness {
    what: String,
    target_rate: f64,
    produced: u64,
    produce_secs: f64,
    achieved_rate: f64,
    delivery_failures: u64,
    /// Producer acknowledgement latency (p50, p99, max), ms.
    ack_ms: (f64, f64, f64),
    /// Observations in the histogram delta (one per applied message).
    observations: f64,
    mean_ms: f64,
    /// (upper bound in seconds, messages in the bucket) of the delta.
    buckets: Vec<(f64, f64)>,
    fraction_le_50ms: f64,
    p50_bucket_ms: (f64, f64),
    p99_bucket_ms: (f64, f64),
    p99_interpolated_ms: f64,
    /// CPU use during the run, cores by process.
    cpu: Vec<(String, f64)>,
}

/// End-to-end latency a plain consumer configured like rankd's
/// (fetch.wait.max.ms = 10) sees at the paced rate on the same broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Probe {
    /// Async offset commits every this many ms (None: no commits).
    commit_ms: Option<u64>,
    commits: u64,
    /// What librdkafka's commit callback reported for those commits.
    commit_callbacks_ok: u64,
    commit_callbacks_err: u64,
    commit_first_error: Option<String>,
    rate: f64,
    produced: u64,
    achieved_rate: f64,
    received: u64,
    /// Producer acknowledgement latency (p50, p99, max), ms.
    ack_ms: (f64, f64, f64),
    /// Receive time - message timestamp (p50, p99, max), ms.
    e2e_ms: (f64, f64, f64),
    /// CPU use during the probe, cores by process.
    cpu: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchRun {
    /// idle, ingest, or broker-only (the same production to topics rankd
    /// does not read).
    mode: String,
    pair: usize,
    rate: f64,
    requests: u64,
    ok: u64,
    errors: u64,
    throughput_rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    /// Updates produced per second during the run (0 without ingestion).
    update_rate: f64,
    freshness: Option<Freshness>,
    /// CPU use during the run, cores by process.
    cpu: Vec<(String, f64)>,
    /// 1-minute load average before the run.
    loadavg_before: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Round {
    label: String,
    messages: u64,
    produce_secs: f64,
    produce_rate: f64,
    plain: Vec<Consume>,
    /// (Absent in figures written before it was added.)
    #[serde(default)]
    plain_like_rankd: Option<Consume>,
    rankd: Consume,
    rankd_startup_secs: f64,
    freshness: Freshness,
    probes: Vec<Probe>,
    /// Closed-loop recommend throughput (32 callers) of a daemon without Kafka.
    saturation_no_kafka_rps: Option<f64>,
    /// The same against the measured rankd, consuming (idle) topics.
    saturation_rps: Option<f64>,
    bench: Vec<BenchRun>,
    commands: Vec<String>,
}

// ---------------------------------------------------------------- helpers

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Kills and reaps the child when dropped.
struct Guard {
    child: Child,
    name: &'static str,
}

impl Guard {
    fn spawn(cmd: &mut Command, name: &'static str, pids: Option<&Path>) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        if let Some(p) = pids {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            writeln!(f, "{}", child.id())?;
        }
        Ok(Self { child, name })
    }

    /// Waits up to `within` for the child to exit by itself.
    fn wait(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} did not finish within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Blocking HTTP GETs through reqwest on a small runtime.
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Result<Self> {
        Ok(Self {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    fn get(&self, url: &str) -> Result<String> {
        self.rt.block_on(async {
            let r = self.client.get(url).send().await?;
            ensure!(r.status().is_success(), "{url}: {}", r.status());
            Ok(r.text().await?)
        })
    }

    /// Next offsets applied, summed per topic.
    fn applied(&self, base: &str) -> Result<BTreeMap<String, i64>> {
        let v: serde_json::Value = serde_json::from_str(&self.get(&format!("{base}/v1/ingest"))?)?;
        let mut m = BTreeMap::new();
        for p in v["partitions"].as_array().into_iter().flatten() {
            let topic = p["topic"].as_str().unwrap_or_default().to_string();
            *m.entry(topic).or_insert(0) += p["applied_offset"].as_i64().unwrap_or(0);
        }
        Ok(m)
    }

    /// The freshness histogram: cumulative (le, count), plus sum and count.
    fn freshness(&self, base: &str) -> Result<Hist> {
        let text = self.get(&format!("{base}/metrics"))?;
        let mut h = Hist::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("rankd_ingest_freshness_seconds") else {
                continue;
            };
            let value = |s: &str| s.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let Some(b) = rest.strip_prefix("_bucket{le=\"") {
                let (le, tail) = b.split_once('"').context("bucket line")?;
                let le = if le == "+Inf" { INF_LE } else { le.parse()? };
                h.cumulative
                    .push((le, value(tail).context("bucket value")?));
            } else if rest.starts_with("_sum") {
                h.sum = value(rest).context("sum")?;
            } else if rest.starts_with("_count") {
                h.count = value(rest).context("count")?;
            }
        }
        ensure!(
            !h.cumulative.is_empty(),
            "no rankd_ingest_freshness_seconds in /metrics"
        );
        Ok(h)
    }
}

#[derive(Debug, Default, Clone)]
struct Hist {
    cumulative: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

/// Percentiles of the messages observed between two scrapes.
fn freshness_between(
    what: &str,
    before: &Hist,
    after: &Hist,
    target_rate: f64,
    p: &Paced,
) -> Freshness {
    let cum: Vec<(f64, f64)> = after
        .cumulative
        .iter()
        .map(|&(le, c)| {
            let b = before
                .cumulative
                .iter()
                .find(|x| x.0 == le)
                .map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect();
    let total = after.count - before.count;
    let mut buckets = Vec::new();
    let mut prev = 0.0;
    for &(le, c) in &cum {
        buckets.push((le, c - prev));
        prev = c;
    }
    let at = |q: f64| -> ((f64, f64), f64) {
        let want = q * total;
        let mut lo = (0.0, 0.0);
        for &(le, c) in &cum {
            if c >= want {
                let interp = if le < INF_LE && c > lo.1 {
                    lo.0 + (le - lo.0) * (want - lo.1) / (c - lo.1)
                } else {
                    le
                };
                return ((lo.0 * 1e3, le * 1e3), interp * 1e3);
            }
            lo = (le, c);
        }
        ((NA, NA), NA)
    };
    let le50 = cum
        .iter()
        .find(|x| (x.0 - 0.05).abs() < 1e-12)
        .map_or(NA, |x| x.1);
    Freshness {
        what: what.to_string(),
        target_rate,
        produced: p.produced,
        produce_secs: p.secs,
        achieved_rate: p.produced as f64 / p.secs.max(1e-9),
        delivery_failures: p.failed,
        ack_ms: p.ack_ms,
        observations: total,
        mean_ms: if total > 0.0 {
            (after.sum - before.sum) / total * 1e3
        } else {
            NA
        },
        buckets,
        fraction_le_50ms: if total > 0.0 && le50 >= 0.0 {
            le50 / total
        } else {
            NA
        },
        p50_bucket_ms: at(0.50).0,
        p99_bucket_ms: at(0.99).0,
        p99_interpolated_ms: at(0.99).1,
        cpu: Vec::new(),
    }
}

// ---------------------------------------------------------------- CPU

/// utime + stime (clock ticks) of a process or thread from its stat file, and its name.
fn stat_ticks(path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 2..].split(' ').collect();
    // Fields after the name: state is 0, utime 11, stime 12, cutime 13, cstime 14.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((comm, ticks))
}

/// Children's (reaped) utime + stime of this process.
fn children_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(close) = text.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = text[close + 2..].split(' ').collect();
    f.get(13).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(14).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// (busy, all) jiffies of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (all - idle, all)
}

/// Per-label ticks: each process's total, and rankd's threads by name.
fn labelled_ticks(pids: &[(String, u32)]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (label, pid) in pids {
        if let Some((_, t)) = stat_ticks(Path::new(&format!("/proc/{pid}/stat"))) {
            m.insert(label.clone(), t);
        }
        if label == "rankd" {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for e in dir.flatten() {
                if let Some((comm, t)) = stat_ticks(&e.path().join("stat")) {
                    // Group numbered librdkafka and tokio threads.
                    let name = if comm.starts_with("rdk:") {
                        "rdk:*".to_string()
                    } else if comm.starts_with("tokio") {
                        "tokio".to_string()
                    } else {
                        comm
                    };
                    *m.entry(format!("rankd/{name}")).or_insert(0) += t;
                }
            }
        }
    }
    m.insert("bench children".into(), children_ticks());
    m
}

/// Cores used between `start` and `stop`, by label, plus the machine's.
struct CpuMeter {
    pids: Vec<(String, u32)>,
    at: Instant,
    machine: (u64, u64),
    ticks: BTreeMap<String, u64>,
}

fn clock_ticks_per_sec() -> f64 {
    100.0
}

impl CpuMeter {
    fn start(pids: &[(String, u32)]) -> Self {
        Self {
            pids: pids.to_vec(),
            at: Instant::now(),
            machine: machine_ticks(),
            ticks: labelled_ticks(pids),
        }
    }

    fn stop(self) -> Vec<(String, f64)> {
        let secs = self.at.elapsed().as_secs_f64();
        let (busy, all) = machine_ticks();
        let after = labelled_ticks(&self.pids);
        let cores = |t: u64| t as f64 / clock_ticks_per_sec() / secs;
        let machine_cores = if all > self.machine.1 {
            (busy - self.machine.0) as f64 / (all - self.machine.1) as f64 * num_cpus()
        } else {
            NA
        };
        let mut out = vec![("machine".to_string(), machine_cores)];
        let mut ours = 0.0;
        for (label, &t) in &after {
            let d = cores(t.saturating_sub(self.ticks.get(label).copied().unwrap_or(0)));
            if !label.contains('/') {
                ours += d;
            }
            out.push((label.clone(), d));
        }
        out.push(("others".into(), (machine_cores - ours).max(0.0)));
        out
    }
}

fn num_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

// ---------------------------------------------------------------- messages

/// The update mix; item and user versions only ever grow within a run.
struct Mix {
    rng: Rng,
    version: u64,
}

struct Msg {
    topic: &'static str,
    key: String,
    payload: Vec<u8>,
}

impl Mix {
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.rng.uniform() * 2.0 - 1.0) as f32)
            .collect()
    }

    fn event(&mut self) -> Msg {
        let user = 1 + self.rng.below(N_USERS);
        let item = 1 + self.rng.below(N_ITEMS);
        Msg {
            topic: EVENTS,
            key: user.to_string(),
            payload: serde_json::to_vec(&serde_json::json!({
                "user_id": user, "item_id": item, "type": "click", "ts_ms": now_ms()
            }))
            .expect("json"),
        }
    }

    /// 70% events, 20% item upserts (64 floats), 10% user features (16 floats).
    fn mixed(&mut self) -> Msg {
        let roll = self.rng.below(100);
        if roll < 70 {
            return self.event();
        }
        self.version += 1;
        if roll < 90 {
            let item = 1 + self.rng.below(N_ITEMS);
            let embedding = self.floats(64);
            Msg {
                topic: ITEMS,
                key: item.to_string(),
                payload: serde_json::to_vec(&serde_json::json!({
                    "item_id": item, "embedding": embedding, "version": self.version
                }))
                .expect("json"),
            }
        } else {
            let user = 1 + self.rng.below(N_USERS);
            let features = self.floats(16);
            Msg {
                topic: USERS,
                key: user.to_string(),
                payload: serde_json::to_vec(&serde_json::json!({
                    "user_id": user, "features": features, "version": self.version
                }))
                .expect("json"),
            }
        }
    }
}

/// Counts deliveries, so failures are reported rather than hidden.
#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Acknowledgement latency (ack time - message timestamp), ms.
    ack_ms: Mutex<Vec<i64>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(m) => {
                if let Some(ts) = m.timestamp().to_millis() {
                    self.ack_ms.lock().expect("ack lock").push(now_ms() - ts);
                }
                self.ok.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn producer(brokers: &str, linger_ms: &str) -> Result<ThreadedProducer<Deliveries>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms)
        .set("queue.buffering.max.messages", "500000")
        .create_with_context(Deliveries::default())?)
}

fn send(
    p: &ThreadedProducer<Deliveries>,
    m: &Msg,
    topic: Option<&str>,
    ts_ms: Option<i64>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut r = BaseRecord::to(topic.unwrap_or(m.topic))
            .key(m.key.as_str())
            .payload(m.payload.as_slice());
        if let Some(ts) = ts_ms {
            r = r.timestamp(ts);
        }
        match p.send(r) {
            Ok(()) => return Ok(()),
            Err((e, _)) => {
                ensure!(
                    matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ),
                    "produce failed: {e}"
                );
                ensure!(Instant::now() < deadline, "producer queue full for 30 s");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// What a paced producer did.
#[derive(Debug, Default, Clone)]
struct Paced {
    produced: u64,
    failed: u64,
    secs: f64,
    per_topic: BTreeMap<String, u64>,
    /// Broker acknowledgement latency percentiles (p50, p99, max), ms.
    ack_ms: (f64, f64, f64),
}

/// Nearest-rank percentiles (p50, p99, max) of `v`.
fn percentiles(v: &mut [i64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (NA, NA, NA);
    }
    v.sort_unstable();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64;
    (at(0.50), at(0.99), v[v.len() - 1] as f64)
}

/// Produces the mix at `rate` messages/s (timestamps = send time) until `stop`
/// or `max` elapses, then flushes.
fn produce_paced(
    brokers: &str,
    mix: &mut Mix,
    to_probe: bool,
    rate: f64,
    max: Duration,
    stop: &AtomicBool,
) -> Result<Paced> {
    let p = producer(brokers, "1")?;
    let mut out = Paced::default();
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= max || stop.load(Ordering::Relaxed) {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate) as u64;
        while out.produced < due {
            let m = mix.mixed();
            let to = to_probe.then(|| probe_topic(m.topic));
            send(&p, &m, to, Some(now_ms()))?;
            *out.per_topic.entry(m.topic.to_string()).or_insert(0) += 1;
            out.produced += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    out.secs = start.elapsed().as_secs_f64();
    p.flush(Duration::from_secs(30))
        .context("flushing the paced producer")?;
    out.failed = p.context().failed.load(Ordering::Relaxed);
    out.ack_ms = percentiles(&mut p.context().ack_ms.lock().expect("ack lock"));
    Ok(out)
}

// ---------------------------------------------------------------- steps

fn create_topics(brokers: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = TOPICS
        .iter()
        .chain(&PROBES)
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = futures::executor::block_on(admin.create_topics(
        &topics,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// A plain librdkafka consumer (default settings) reading `want` messages of
/// `topic` from the beginning.
/// A plain consumer reading `want` messages from the beginning: librdkafka's
/// defaults on `topic` alone, or (`like_rankd`) rankd's consumer settings on
/// all three of its topics (9 partitions; only `topic` holds data).
fn plain_consume(
    brokers: &str,
    topic: &str,
    want: u64,
    group: &str,
    like_rankd: bool,
    pids: &[(String, u32)],
) -> Result<Consume> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    if like_rankd {
        cc.set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "1000")
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "false");
    }
    let consumer: BaseConsumer = cc.create()?;
    let meter = CpuMeter::start(pids);
    let start = Instant::now();
    let topics: Vec<&str> = if like_rankd {
        TOPICS.to_vec()
    } else {
        vec![topic]
    };
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(t, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let deadline = start + Duration::from_secs(300);
    let (mut n, mut bytes) = (0u64, 0usize);
    let (mut t10, mut t90) = (None, None);
    while n < want {
        ensure!(
            Instant::now() < deadline,
            "plain consumer: {n} of {want} in 300 s"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                bytes += m.payload().map_or(0, <[u8]>::len);
                n += 1;
                if n == want / 10 {
                    t10 = Some((Instant::now(), n));
                }
                if n == want * 9 / 10 {
                    t90 = Some((Instant::now(), n));
                }
            }
            Some(Err(e)) => eprintln!("plain consumer: {e}"),
            None => {}
        }
    }
    let end = Instant::now();
    std::hint::black_box(bytes);
    Ok(Consume {
        who: if like_rankd {
            "plain BaseConsumer, rankd's settings and 9 partitions".into()
        } else {
            "plain BaseConsumer (librdkafka defaults)".into()
        },
        messages: n,
        secs_from_start: (end - start).as_secs_f64(),
        rate_from_start: n as f64 / (end - start).as_secs_f64(),
        secs_from_ready: NA,
        rate_from_ready: NA,
        rate_10_90: rate_between(t10, t90),
        cpu: meter.stop(),
    })
}

/// Messages per second between two (time, count) marks.
fn rate_between(a: Option<(Instant, u64)>, b: Option<(Instant, u64)>) -> f64 {
    match (a, b) {
        (Some((ta, na)), Some((tb, nb))) if tb > ta => (nb - na) as f64 / (tb - ta).as_secs_f64(),
        _ => NA,
    }
}

/// Counts the results the commit callback reports.
#[derive(Default)]
struct CommitResults {
    ok: AtomicU64,
    err: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for CommitResults {}

impl rdkafka::consumer::ConsumerContext for CommitResults {
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _: &TopicPartitionList) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.err.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Paced production of the mix to `PROBE` while a plain consumer (assigned
/// at the end offsets) times each message's arrival. With `commit_ms`, the
/// consumer also commits its offsets asynchronously that often whenever it
/// received something, as rankd does after each update batch.
fn probe(brokers: &str, rate: f64, secs: f64, seed: u64, commit_ms: Option<u64>) -> Result<Probe> {
    let consumer: BaseConsumer<CommitResults> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-probe-{seed}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "10")
        .set("enable.partition.eof", "false")
        .create_with_context(CommitResults::default())?;
    let mut tpl = TopicPartitionList::new();
    for t in PROBES {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(t, p.id(), Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
    // Let the end offsets resolve before anything is produced.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            bail!("something was produced to the probe topics before the probe");
        }
    }
    let brokers = brokers.to_string();
    let producer_thread = std::thread::spawn(move || {
        let mut mix = Mix {
            rng: Rng::new(seed),
            version: 0,
        };
        produce_paced(
            &brokers,
            &mut mix,
            true,
            rate,
            Duration::from_secs_f64(secs),
            &AtomicBool::new(false),
        )
    });
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 60.0);
    let mut lat = Vec::new();
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut dirty = false;
    let mut last_commit = Instant::now();
    let mut commits = 0u64;
    let mut step = |lat: &mut Vec<i64>| -> Result<()> {
        let timeout = if commit_ms.is_some() { 1 } else { 20 };
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(timeout)) {
            if let Some(ts) = m.timestamp().to_millis() {
                lat.push(now_ms() - ts);
            }
            next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            dirty = true;
        }
        if let Some(every) = commit_ms {
            if dirty && last_commit.elapsed() >= Duration::from_millis(every) {
                let mut tpl = TopicPartitionList::new();
                for ((t, p), &o) in &next {
                    tpl.add_partition_offset(t, *p, Offset::Offset(o))?;
                }
                consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async)?;
                commits += 1;
                dirty = false;
                last_commit = Instant::now();
            }
        }
        Ok(())
    };
    while !producer_thread.is_finished() {
        ensure!(Instant::now() < deadline, "probe: producer still running");
        step(&mut lat)?;
    }
    let p = producer_thread
        .join()
        .map_err(|_| anyhow::anyhow!("probe producer panicked"))??;
    // What is still on its way, for at most 10 s.
    let grace = Instant::now() + Duration::from_secs(10);
    while (lat.len() as u64) < p.produced && Instant::now() < grace {
        step(&mut lat)?;
    }
    let ctx = consumer.context();
    let commit_first_error = ctx.first_error.lock().expect("lock").clone();
    let (commit_callbacks_ok, commit_callbacks_err) = (
        ctx.ok.load(Ordering::Relaxed),
        ctx.err.load(Ordering::Relaxed),
    );
    Ok(Probe {
        commit_ms,
        commits,
        commit_callbacks_ok,
        commit_callbacks_err,
        commit_first_error,
        rate,
        produced: p.produced,
        achieved_rate: p.produced as f64 / p.secs.max(1e-9),
        received: lat.len() as u64,
        ack_ms: p.ack_ms,
        e2e_ms: percentiles(&mut lat),
        cpu: Vec::new(),
    })
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(NA)
}

/// The processes whose CPU use is reported.
fn pids_of(a: &RunArgs, rankd: Option<&Rankd>) -> Vec<(String, u32)> {
    let mut v = vec![("ingest_bench".to_string(), std::process::id())];
    if let Some(r) = rankd {
        v.push(("rankd".to_string(), r.pid));
    }
    if let Some(b) = a.broker_pid {
        v.push(("tansu".to_string(), b));
    }
    v
}

struct Rankd {
    pid: u32,
    /// Kills the daemon when the handle drops.
    _guard: Guard,
    http: String,
    uds: PathBuf,
    started_at: Instant,
    ready_at: Instant,
    startup_secs: f64,
}

fn start_rankd(a: &RunArgs, log: &Path, commands: &mut Vec<String>) -> Result<Rankd> {
    let uds = a.workdir.join("rankd.sock");
    let state = a.workdir.join("state");
    let args: Vec<String> = vec![
        "serve".into(),
        "--models".into(),
        a.models.display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--uds".into(),
        uds.display().to_string(),
        "--snapshot-dir".into(),
        state.display().to_string(),
        "--kafka-brokers".into(),
        a.brokers.clone(),
        "--device".into(),
        "cpu".into(),
    ];
    let mut args = args;
    args.extend(a.rankd_arg.iter().cloned());
    commands.push(format!("{} {}", a.rankd.display(), args.join(" ")));
    let started = Instant::now();
    let mut guard = Guard::spawn(
        Command::new(&a.rankd)
            .args(&args)
            .env("RANKD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?),
        "rankd serve",
        a.pids.as_deref(),
    )?;
    let stdout = guard.child.stdout.take().context("piped stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep reading so the daemon never writes into a closed pipe.
        let mut sink = String::new();
        while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .context("no ready line from rankd within 120 s")?;
    let ready_at = Instant::now();
    ensure!(
        line.starts_with("ready: "),
        "rankd did not start: {line:?}\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let http = line
        .trim()
        .split("; ")
        .find(|p| p.starts_with("http://"))
        .with_context(|| format!("no http address in {line:?}"))?
        .to_string();
    Ok(Rankd {
        pid: guard.child.id(),
        _guard: guard,
        http,
        uds,
        started_at: started,
        ready_at,
        startup_secs: (ready_at - started).as_secs_f64(),
    })
}

/// Polls /v1/ingest until each topic's applied offsets sum to `want`.
fn wait_applied(
    http: &Http,
    base: &str,
    want: &BTreeMap<String, i64>,
    within: Duration,
) -> Result<(Instant, Option<(Instant, i64)>)> {
    let deadline = Instant::now() + within;
    let mut first = None;
    loop {
        let got = http.applied(base)?;
        let total: i64 = got.values().sum();
        if first.is_none() && total > 0 {
            first = Some((Instant::now(), total));
        }
        if want
            .iter()
            .all(|(t, &n)| got.get(t).copied().unwrap_or(0) >= n)
        {
            return Ok((Instant::now(), first));
        }
        ensure!(
            Instant::now() < deadline,
            "applied {got:?}, want {want:?}, after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn bench_json(path: &Path) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(v[0].clone())
}

/// `rankd bench` against the daemon (`target` = its socket and URL, or `--start`).
fn run_bench(
    a: &RunArgs,
    target: &[String],
    load: &[&str],
    tag: &str,
    commands: &mut Vec<String>,
) -> Result<serde_json::Value> {
    let json = a.workdir.join(format!("bench-{tag}.json"));
    let mut args: Vec<String> = vec!["bench".into(), "--transport".into(), "uds".into()];
    args.extend(target.iter().cloned());
    args.extend(load.iter().map(|s| s.to_string()));
    args.extend([
        "--json".into(),
        json.display().to_string(),
        "--quiet".into(),
    ]);
    commands.push(format!("{} {}", a.rankd.display(), args.join(" ")));
    let mut g = Guard::spawn(
        Command::new(&a.rankd)
            .args(&args)
            .env("RANKD_LOG", "warn")
            .stdout(std::fs::File::create(
                a.workdir.join(format!("bench-{tag}.txt")),
            )?)
            .stderr(Stdio::inherit()),
        "rankd bench",
        a.pids.as_deref(),
    )?;
    let status = g.wait(Duration::from_secs(180))?;
    ensure!(status.success(), "rankd bench {tag} failed: {status}");
    bench_json(&json)
}

fn daemon_target(r: &Rankd) -> Vec<String> {
    vec![
        "--uds".into(),
        r.uds.display().to_string(),
        "--http".into(),
        r.http.clone(),
    ]
}

fn run(a: RunArgs) -> Result<()> {
    std::fs::create_dir_all(&a.workdir)?;
    let http = Http::new()?;
    let mut commands = Vec::new();
    let label = a
        .out
        .file_stem()
        .map_or("round".into(), |s| s.to_string_lossy().into_owned());

    // Reference: recommend saturation of a daemon without Kafka (broker idle).
    let saturation_no_kafka_rps = if a.saturation_secs > 0 {
        let dur = format!("{}s", a.saturation_secs);
        let target = vec!["--start".to_string(), a.models.display().to_string()];
        let v = run_bench(
            &a,
            &target,
            &["--concurrency", "32", "--duration", &dur],
            "saturation-no-kafka",
            &mut commands,
        )?;
        let rps = v["throughput_rps"].as_f64();
        eprintln!("[{label}] saturation without Kafka (32 callers): {rps:?} req/s");
        rps
    } else {
        None
    };

    // Target 2: the same N events read by a plain consumer and by rankd.
    eprintln!("[{label}] producing {} events to {EVENTS}", a.messages);
    let mut mix = Mix {
        rng: Rng::new(0x5EED ^ a.messages),
        version: 0,
    };
    let msgs: Vec<Msg> = (0..a.messages).map(|_| mix.event()).collect();
    let p = producer(&a.brokers, "5")?;
    let t = Instant::now();
    for m in &msgs {
        send(&p, m, None, None)?;
    }
    p.flush(Duration::from_secs(120))
        .context("flushing the bulk producer")?;
    let produce_secs = t.elapsed().as_secs_f64();
    let (ok, failed) = (
        p.context().ok.load(Ordering::Relaxed),
        p.context().failed.load(Ordering::Relaxed),
    );
    ensure!(
        ok == a.messages && failed == 0,
        "delivered {ok}, failed {failed}"
    );
    drop(p);
    drop(msgs);
    eprintln!(
        "[{label}] produced in {produce_secs:.2} s ({:.0}/s)",
        a.messages as f64 / produce_secs
    );

    let mut plain = vec![plain_consume(
        &a.brokers,
        EVENTS,
        a.messages,
        &format!("bench-plain-{label}-1"),
        false,
        &pids_of(&a, None),
    )?];
    eprintln!("[{label}] plain consumer: {:?}", plain[0]);

    // Target 3's reference, before rankd runs: what a plain consumer
    // configured like rankd's (fetch.wait.max.ms 10, the same 3 x 3
    // partitions) sees at the same rate from this broker, without and with
    // rankd's commit cadence (an async commit per 2 ms batch).
    let mut probes = Vec::new();
    for (i, commit_ms) in [None, Some(2)].into_iter().enumerate() {
        let cpu = CpuMeter::start(&pids_of(&a, None));
        let mut pr = probe(
            &a.brokers,
            a.update_rate,
            a.fresh_secs,
            0x9B0B + i as u64,
            commit_ms,
        )?;
        pr.cpu = cpu.stop();
        eprintln!("[{label}] plain-consumer latency probe: {pr:?}");
        probes.push(pr);
    }

    let r = start_rankd(&a, &a.workdir.join("rankd.log"), &mut commands)?;
    let meter = CpuMeter::start(&pids_of(&a, Some(&r)));
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut m10, mut m90) = (None, None);
    let done = loop {
        let applied = http
            .applied(&r.http)?
            .get(EVENTS)
            .copied()
            .unwrap_or(0)
            .max(0) as u64;
        let now = Instant::now();
        if m10.is_none() && applied >= a.messages / 10 {
            m10 = Some((now, applied));
        }
        if m90.is_none() && applied >= a.messages * 9 / 10 {
            m90 = Some((now, applied));
        }
        if applied >= a.messages {
            break now;
        }
        ensure!(
            now < deadline,
            "rankd applied {applied} of {} in 300 s",
            a.messages
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let rankd_consume = Consume {
        who: "rankd serve".into(),
        messages: a.messages,
        secs_from_start: (done - r.started_at).as_secs_f64(),
        rate_from_start: a.messages as f64 / (done - r.started_at).as_secs_f64(),
        secs_from_ready: (done - r.ready_at).as_secs_f64(),
        rate_from_ready: a.messages as f64 / (done - r.ready_at).as_secs_f64(),
        rate_10_90: rate_between(m10, m90),
        cpu: meter.stop(),
    };
    eprintln!(
        "[{label}] rankd: {rankd_consume:?} (start-up to ready {:.2} s)",
        r.startup_secs
    );

    plain.push(plain_consume(
        &a.brokers,
        EVENTS,
        a.messages,
        &format!("bench-plain-{label}-2"),
        false,
        &pids_of(&a, Some(&r)),
    )?);
    eprintln!("[{label}] plain consumer again: {:?}", plain[1]);
    // Not in the ratio: the same read with rankd's consumer settings and its
    // 9 partitions, to tell the consumer's shape from rankd's own work.
    let plain_like_rankd = plain_consume(
        &a.brokers,
        EVENTS,
        a.messages,
        &format!("bench-plain-{label}-3"),
        true,
        &pids_of(&a, Some(&r)),
    )?;
    eprintln!("[{label}] plain consumer like rankd: {plain_like_rankd:?}");

    // Target 3: freshness at the paced rate, no request load.
    let mut expected: BTreeMap<String, i64> = [(EVENTS.to_string(), a.messages as i64)].into();
    let before = http.freshness(&r.http)?;
    let cpu = CpuMeter::start(&pids_of(&a, Some(&r)));
    let paced = produce_paced(
        &a.brokers,
        &mut mix,
        false,
        a.update_rate,
        Duration::from_secs_f64(a.fresh_secs),
        &AtomicBool::new(false),
    )?;
    let t3_cpu = cpu.stop();
    for (t, n) in &paced.per_topic {
        *expected.entry(t.clone()).or_insert(0) += *n as i64;
    }
    wait_applied(&http, &r.http, &expected, Duration::from_secs(120))?;
    let after = http.freshness(&r.http)?;
    let mut freshness =
        freshness_between("paced, no requests", &before, &after, a.update_rate, &paced);
    freshness.cpu = t3_cpu;
    eprintln!("[{label}] freshness: {freshness:?}");

    // Target 4: recommend p99 without and with ingestion.
    let target = daemon_target(&r);
    let saturation_rps = if a.saturation_secs > 0 {
        let dur = format!("{}s", a.saturation_secs);
        let v = run_bench(
            &a,
            &target,
            &["--concurrency", "32", "--duration", &dur],
            "saturation",
            &mut commands,
        )?;
        let rps = v["throughput_rps"].as_f64();
        eprintln!("[{label}] closed-loop saturation (32 callers, rankd consuming idle topics): {rps:?} req/s");
        rps
    } else {
        None
    };
    let mut rates = Vec::new();
    for spec in &a.bench_rates {
        if spec == "half" {
            if let Some(sat) = saturation_rps {
                rates.push(((sat / 2.0) / 50.0).round() * 50.0);
            }
        } else {
            rates.push(
                spec.parse::<f64>()
                    .context("--bench-rates: half or a number")?,
            );
        }
    }
    let mut bench = Vec::new();
    let mut versions = mix.version + 1_000_000_000;
    for &rate in &rates {
        let rate_s = format!("{rate}");
        let load = [
            "--rate",
            rate_s.as_str(),
            "--duration",
            a.bench_duration.as_str(),
        ];
        for pair in 0..a.bench_pairs {
            // idle: no updates; ingest: the mix at the update rate to rankd's
            // topics; broker-only (control): the same production to the probe
            // topics, which rankd does not read, so the broker and producer
            // load is there without rankd's ingestion work.
            for mode in ["idle", "ingest", "broker-only"] {
                std::thread::sleep(Duration::from_secs(1));
                let tag = format!("{mode}-{rate}-{pair}");
                let loadavg_before = loadavg();
                let (v, update_rate, fresh, cpu) = if mode == "idle" {
                    let meter = CpuMeter::start(&pids_of(&a, Some(&r)));
                    let v = run_bench(&a, &target, &load, &tag, &mut commands)?;
                    (v, 0.0, None, meter.stop())
                } else {
                    let to_probe = mode == "broker-only";
                    let stop = Arc::new(AtomicBool::new(false));
                    let before = http.freshness(&r.http)?;
                    let (brokers, update_rate) = (a.brokers.clone(), a.update_rate);
                    let mut mix2 = Mix {
                        rng: Rng::new(versions),
                        version: versions,
                    };
                    versions += 1_000_000_000;
                    let flag = stop.clone();
                    let producer_thread = std::thread::spawn(move || {
                        produce_paced(
                            &brokers,
                            &mut mix2,
                            to_probe,
                            update_rate,
                            Duration::from_secs(300),
                            &flag,
                        )
                    });
                    // Let the producer reach its pace before the bench's warm-up.
                    std::thread::sleep(Duration::from_secs(1));
                    let meter = CpuMeter::start(&pids_of(&a, Some(&r)));
                    let v = run_bench(&a, &target, &load, &tag, &mut commands);
                    let cpu = meter.stop();
                    stop.store(true, Ordering::Relaxed);
                    let paced = producer_thread
                        .join()
                        .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
                    let v = v?;
                    let f = if to_probe {
                        None
                    } else {
                        for (t, n) in &paced.per_topic {
                            *expected.entry(t.clone()).or_insert(0) += *n as i64;
                        }
                        wait_applied(&http, &r.http, &expected, Duration::from_secs(120))?;
                        let after = http.freshness(&r.http)?;
                        Some(freshness_between(
                            "paced, during rankd bench",
                            &before,
                            &after,
                            a.update_rate,
                            &paced,
                        ))
                    };
                    (v, paced.produced as f64 / paced.secs, f, cpu)
                };
                let f = |k: &str| v["latency_us"][k].as_f64().unwrap_or(NA);
                let errors: u64 = v["errors"]
                    .as_object()
                    .map_or(0, |m| m.values().filter_map(|x| x.as_u64()).sum());
                let run = BenchRun {
                    mode: mode.to_string(),
                    pair,
                    rate,
                    requests: v["requests"].as_u64().unwrap_or(0),
                    ok: v["ok"].as_u64().unwrap_or(0),
                    errors,
                    throughput_rps: v["throughput_rps"].as_f64().unwrap_or(NA),
                    p50_us: f("p50"),
                    p99_us: f("p99"),
                    p999_us: f("p999"),
                    max_us: f("max"),
                    update_rate,
                    freshness: fresh,
                    cpu,
                    loadavg_before,
                };
                eprintln!(
                    "[{label}] bench {tag}: p50 {:.0} us, p99 {:.0} us, {:.0} req/s, {} errors",
                    run.p50_us, run.p99_us, run.throughput_rps, run.errors
                );
                bench.push(run);
            }
        }
    }
    let startup_secs = r.startup_secs;
    drop(r);

    let round = Round {
        label,
        messages: a.messages,
        produce_secs,
        produce_rate: a.messages as f64 / produce_secs,
        plain,
        plain_like_rankd: Some(plain_like_rankd),
        rankd: rankd_consume,
        rankd_startup_secs: startup_secs,
        freshness,
        probes,
        saturation_no_kafka_rps,
        saturation_rps,
        bench,
        commands,
    };
    std::fs::write(&a.out, serde_json::to_vec_pretty(&round)?)?;
    println!("{}", table(std::slice::from_ref(&round)));
    Ok(())
}

// ---------------------------------------------------------------- table

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// "in bucket (100, 250] ms, interpolated 180.0 ms"
fn p99_text(f: &Freshness) -> String {
    let (lo, hi) = f.p99_bucket_ms;
    if hi >= INF_LE * 1e3 {
        format!("in bucket ({lo:.0} ms, +Inf)")
    } else {
        format!(
            "in bucket ({lo:.0}, {hi:.0}] ms, interpolated {:.1} ms",
            f.p99_interpolated_ms
        )
    }
}

/// "machine 1.9 (others 0.1); tansu 0.6; rankd 0.8 (ingest 0.2, ...); ..."
fn cpu_text(cpu: &[(String, f64)]) -> String {
    let get = |k: &str| cpu.iter().find(|x| x.0 == k).map(|x| x.1);
    let mut parts = Vec::new();
    if let Some(m) = get("machine") {
        parts.push(format!(
            "machine {m:.2} of {} (others {:.2})",
            num_cpus(),
            get("others").unwrap_or(NA)
        ));
    }
    for k in ["tansu", "rankd", "ingest_bench", "bench children"] {
        if let Some(v) = get(k) {
            let mut t = format!("{k} {v:.2}");
            if k == "rankd" {
                let threads: Vec<String> = cpu
                    .iter()
                    .filter_map(|(l, v)| {
                        let n = l.strip_prefix("rankd/")?;
                        (*v >= 0.005).then(|| format!("{n} {v:.2}"))
                    })
                    .collect();
                t.push_str(&format!(" ({})", threads.join(", ")));
            }
            parts.push(t);
        }
    }
    parts.join("; ")
}

fn table(rounds: &[Round]) -> String {
    let mut s = String::new();
    let mut row = |what: String, figure: String, target: &str, result: &str| {
        s.push_str(&format!("| {what} | {figure} | {target} | {result} |\n"));
    };
    row("figure".into(), "measured".into(), "target", "result");
    row("---".into(), "---".into(), "---", "---");
    for r in rounds {
        let l = &r.label;
        row(
            format!("{l}: produce {} events (linger 5 ms)", r.messages),
            format!("{:.2} s, {:.0} msg/s", r.produce_secs, r.produce_rate),
            "-",
            "info",
        );
        for (i, p) in r.plain.iter().enumerate() {
            row(
                format!(
                    "{l}: plain consumer read #{} ({})",
                    i + 1,
                    if i == 0 {
                        "before rankd"
                    } else {
                        "after rankd, rankd idle"
                    }
                ),
                format!(
                    "{:.0} msg/s from start ({:.2} s); steady (10-90%) {:.0} msg/s; CPU {}",
                    p.rate_from_start,
                    p.secs_from_start,
                    p.rate_10_90,
                    cpu_text(&p.cpu)
                ),
                "-",
                "info",
            );
        }
        if let Some(p3) = &r.plain_like_rankd {
            row(
                format!("{l}: plain consumer with rankd's settings on its 9 partitions (after rankd, rankd idle)"),
                format!(
                    "{:.0} msg/s from start ({:.2} s); steady (10-90%) {:.0} msg/s; CPU {}",
                    p3.rate_from_start,
                    p3.secs_from_start,
                    p3.rate_10_90,
                    cpu_text(&p3.cpu)
                ),
                "-",
                "info",
            );
        }
        let mean = |f: fn(&Consume) -> f64| {
            r.plain.iter().map(f).sum::<f64>() / r.plain.len().max(1) as f64
        };
        let plain_start = mean(|p| p.rate_from_start);
        row(
            format!("{l}: rankd consume + apply (startup to ready {:.2} s)", r.rankd_startup_secs),
            format!(
                "{:.0} msg/s from process spawn ({:.2} s); {:.0} msg/s from ready line; steady (10-90%) {:.0} msg/s; CPU {}",
                r.rankd.rate_from_start,
                r.rankd.secs_from_start,
                r.rankd.rate_from_ready,
                r.rankd.rate_10_90,
                cpu_text(&r.rankd.cpu)
            ),
            "-",
            "info",
        );
        // rankd counts from its ready line (printed once its consumer thread
        // runs: start-up subtracted); from its spawn is shown beside it.
        let ratio = r.rankd.rate_from_ready / plain_start;
        row(
            format!("{l}: T2 rankd / plain consumer"),
            format!(
                "{:.1}% ({:.0} / {:.0} msg/s: rankd from its ready line, plain from consumer creation, plain = mean of both reads); from rankd's process spawn {:.1}%",
                ratio * 100.0,
                r.rankd.rate_from_ready,
                plain_start,
                r.rankd.rate_from_start / plain_start * 100.0
            ),
            ">= 90%",
            verdict(ratio >= 0.9),
        );
        let f = &r.freshness;
        row(
            format!("{l}: T3 freshness p99 at {:.0}/s", f.target_rate),
            format!(
                "p99 {}; {:.2}% <= 50 ms; mean {:.1} ms; {} msgs at {:.0}/s",
                p99_text(f),
                f.fraction_le_50ms * 100.0,
                f.mean_ms,
                f.observations,
                f.achieved_rate
            ),
            "p99 <= 50 ms",
            verdict(f.fraction_le_50ms >= 0.99),
        );
        row(
            format!("{l}: T3 producer ack latency (same run)"),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                f.ack_ms.0, f.ack_ms.1, f.ack_ms.2
            ),
            "-",
            "info",
        );
        row(
            format!("{l}: T3 CPU (cores)"),
            cpu_text(&f.cpu),
            "-",
            "info",
        );
        for pr in &r.probes {
            let commits = match pr.commit_ms {
                None => "no commits".to_string(),
                Some(ms) => format!(
                    "async commit every {ms} ms when dirty: {} commits",
                    pr.commits
                ),
            };
            row(
                format!(
                    "{l}: T3 reference: plain consumer (fetch.wait.max.ms 10, {commits}), {:.0}/s, same broker",
                    pr.achieved_rate
                ),
                format!(
                    "receive - timestamp p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} of {} received); ack p50 {:.0} ms, p99 {:.0} ms; CPU {}",
                    pr.e2e_ms.0, pr.e2e_ms.1, pr.e2e_ms.2, pr.received, pr.produced, pr.ack_ms.0, pr.ack_ms.1, cpu_text(&pr.cpu)
                ),
                "-",
                "info",
            );
        }
        if let Some(sat) = r.saturation_no_kafka_rps {
            row(
                format!("{l}: recommend saturation, closed loop 32 callers, daemon without Kafka"),
                format!("{sat:.0} req/s"),
                "-",
                "info",
            );
        }
        if let Some(sat) = r.saturation_rps {
            row(
                format!("{l}: recommend saturation, closed loop 32 callers, the measured rankd (Kafka on, topics idle)"),
                format!("{sat:.0} req/s (half: {:.0})", sat / 2.0),
                "-",
                "info",
            );
        }
        let mut idle = None;
        for b in r.bench.iter() {
            let pair = b.pair;
            let base = idle.unwrap_or(NA);
            let worse = b.p99_us / base - 1.0;
            let figures = |b: &BenchRun| {
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, {:.0} req/s, {} errors",
                    b.p50_us / 1e3,
                    b.p99_us / 1e3,
                    b.p999_us / 1e3,
                    b.throughput_rps,
                    b.errors
                )
            };
            match b.mode.as_str() {
                "idle" => {
                    idle = Some(b.p99_us);
                    row(
                        format!("{l}: recommend at {:.0}/s, no updates (pair {pair})", b.rate),
                        figures(b),
                        "-",
                        "info",
                    );
                }
                "ingest" => row(
                    format!(
                        "{l}: T4 recommend at {:.0}/s with {:.0} updates/s ingested (pair {pair})",
                        b.rate, b.update_rate
                    ),
                    format!("{}; p99 {:+.1}% vs no updates", figures(b), worse * 100.0),
                    "p99 <= +25%",
                    verdict(base > 0.0 && worse <= 0.25),
                ),
                _ => row(
                    format!(
                        "{l}: control: recommend at {:.0}/s with {:.0} msgs/s produced to topics rankd does not read (pair {pair})",
                        b.rate, b.update_rate
                    ),
                    format!("{}; p99 {:+.1}% vs no updates", figures(b), worse * 100.0),
                    "-",
                    "info",
                ),
            }
            if let Some(f) = &b.freshness {
                row(
                    format!("{l}:   freshness during that run"),
                    format!(
                        "p99 {}; {:.2}% <= 50 ms; mean {:.1} ms; producer ack p99 {:.0} ms",
                        p99_text(f),
                        f.fraction_le_50ms * 100.0,
                        f.mean_ms,
                        f.ack_ms.1
                    ),
                    "-",
                    "info",
                );
            }
            row(
                format!(
                    "{l}:   CPU during that run (cores; load average before {:.2})",
                    b.loadavg_before
                ),
                cpu_text(&b.cpu),
                "-",
                "info",
            );
        }
    }
    s
}

pub fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::CreateTopics {
            brokers,
            partitions,
        } => create_topics(&brokers, partitions),
        Cmd::Run(a) => run(*a),
        Cmd::Committed { brokers, group } => {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for t in TOPICS {
                let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
                for p in md.topics()[0].partitions() {
                    tpl.add_partition(t, p.id());
                }
            }
            let c = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
            for e in c.elements() {
                println!(
                    "{} {} {:?} {:?}",
                    e.topic(),
                    e.partition(),
                    e.offset(),
                    e.error()
                );
            }
            Ok(())
        }
        Cmd::Produce {
            brokers,
            rate,
            secs,
            version,
        } => {
            let mut mix = Mix {
                rng: Rng::new(version ^ 0xABC),
                version,
            };
            let p = produce_paced(
                &brokers,
                &mut mix,
                false,
                rate,
                Duration::from_secs_f64(secs),
                &AtomicBool::new(false),
            )?;
            println!("{p:?}");
            Ok(())
        }
        Cmd::Probe {
            brokers,
            rate,
            secs,
            commit_ms,
        } => {
            println!(
                "{:?}",
                probe(&brokers, rate, secs, now_ms() as u64, commit_ms)?
            );
            Ok(())
        }
        Cmd::Summarize { files } => {
            let rounds = files
                .iter()
                .map(|f| {
                    Ok(serde_json::from_slice::<Round>(
                        &std::fs::read(f).with_context(|| f.display().to_string())?,
                    )?)
                })
                .collect::<Result<Vec<_>>>()?;
            println!("{}", table(&rounds));
            Ok(())
        }
    }
}
