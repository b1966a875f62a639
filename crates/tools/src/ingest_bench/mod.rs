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
//!    (rankd commits after every batch; batches close after 0.5 ms by default);
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
//!
//! The modules, in the order a round uses them: `round` (the `run` steps),
//! `process` (the rankd processes), `broker` and `mix` (topics and
//! production), `consume` (the plain consumer and the probe), `scrape`
//! (rankd's figures over HTTP), `cpu` (CPU use), `figures` (the JSON) and
//! `report` (the table).

mod broker;
mod consume;
mod cpu;
mod figures;
mod mix;
mod process;
mod report;
mod round;
mod scrape;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rankd::internals::Rng;

use broker::{committed, create_topics, produce_paced};
use consume::probe;
use figures::Round;
use mix::Mix;
use report::table;
use round::RunArgs;

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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

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

pub fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::CreateTopics {
            brokers,
            partitions,
        } => create_topics(&brokers, partitions),
        Cmd::Run(a) => round::run(*a),
        Cmd::Committed { brokers, group } => committed(&brokers, &group),
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
