//! The figures of a round, as `run` writes them to its JSON file and
//! `summarize` reads them back (figures written by older rounds included).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Consume {
    pub who: String,
    pub messages: u64,
    /// From the consumer's start to the last message: plain, after the
    /// consumer is created (before metadata and assignment); rankd, from the
    /// process being spawned (model loading included, so this favours the
    /// plain consumer).
    pub secs_from_start: f64,
    pub rate_from_start: f64,
    /// rankd only: from its ready line (printed once its consumer runs).
    pub secs_from_ready: f64,
    pub rate_from_ready: f64,
    /// Steady state: messages per second between 10% and 90% consumed
    /// (rankd: /v1/ingest polled every 10 ms).
    pub rate_10_90: f64,
    /// CPU use while consuming, cores by process.
    pub cpu: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Freshness {
    pub what: String,
    pub target_rate: f64,
    pub produced: u64,
    pub produce_secs: f64,
    pub achieved_rate: f64,
    pub delivery_failures: u64,
    /// Producer acknowledgement latency (p50, p99, max), ms.
    pub ack_ms: (f64, f64, f64),
    /// Observations in the histogram delta (one per applied message).
    pub observations: f64,
    pub mean_ms: f64,
    /// (upper bound in seconds, messages in the bucket) of the delta.
    pub buckets: Vec<(f64, f64)>,
    pub fraction_le_50ms: f64,
    pub p50_bucket_ms: (f64, f64),
    pub p99_bucket_ms: (f64, f64),
    pub p99_interpolated_ms: f64,
    /// CPU use during the run, cores by process.
    pub cpu: Vec<(String, f64)>,
}

/// End-to-end latency a plain consumer configured like rankd's
/// (fetch.wait.max.ms = 10) sees at the paced rate on the same broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    /// Async offset commits every this many ms (None: no commits).
    pub commit_ms: Option<u64>,
    pub commits: u64,
    /// What librdkafka's commit callback reported for those commits.
    pub commit_callbacks_ok: u64,
    pub commit_callbacks_err: u64,
    pub commit_first_error: Option<String>,
    pub rate: f64,
    pub produced: u64,
    pub achieved_rate: f64,
    pub received: u64,
    /// Producer acknowledgement latency (p50, p99, max), ms.
    pub ack_ms: (f64, f64, f64),
    /// Receive time - message timestamp (p50, p99, max), ms.
    pub e2e_ms: (f64, f64, f64),
    /// CPU use during the probe, cores by process.
    pub cpu: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRun {
    /// idle, ingest, or broker-only (the same production to topics rankd
    /// does not read).
    pub mode: String,
    pub pair: usize,
    pub rate: f64,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub throughput_rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Updates produced per second during the run (0 without ingestion).
    pub update_rate: f64,
    pub freshness: Option<Freshness>,
    /// CPU use during the run, cores by process.
    pub cpu: Vec<(String, f64)>,
    /// 1-minute load average before the run.
    pub loadavg_before: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub label: String,
    pub messages: u64,
    pub produce_secs: f64,
    pub produce_rate: f64,
    pub plain: Vec<Consume>,
    /// (Absent in figures written before it was added.)
    #[serde(default)]
    pub plain_like_rankd: Option<Consume>,
    pub rankd: Consume,
    pub rankd_startup_secs: f64,
    pub freshness: Freshness,
    /// The same messages from their fetch by rankd's consumer to applied:
    /// rankd's own share. (Absent in figures written before it was added.)
    #[serde(default)]
    pub freshness_rankd: Option<Freshness>,
    pub probes: Vec<Probe>,
    /// Closed-loop recommend throughput (32 callers) of a daemon without Kafka.
    pub saturation_no_kafka_rps: Option<f64>,
    /// The same against the measured rankd, consuming (idle) topics.
    pub saturation_rps: Option<f64>,
    pub bench: Vec<BenchRun>,
    pub commands: Vec<String>,
}
