//! The broker's share of the figures, without rankd: a plain librdkafka
//! consumer reading the catch-up events, and the latency probe that times
//! paced messages end to end through the same broker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use rankd::internals::Rng;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::broker::{percentiles, produce_paced};
use super::cpu::CpuMeter;
use super::figures::{Consume, Probe};
use super::mix::Mix;
use super::{now_ms, NA, PROBES, TOPICS};

/// A plain consumer reading `want` messages from the beginning: librdkafka's
/// defaults on `topic` alone, or (`like_rankd`) rankd's consumer settings on
/// all three of its topics (9 partitions; only `topic` holds data).
pub fn plain_consume(
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
pub fn rate_between(a: Option<(Instant, u64)>, b: Option<(Instant, u64)>) -> f64 {
    match (a, b) {
        (Some((ta, na)), Some((tb, nb))) if tb > ta => (nb - na) as f64 / (tb - ta).as_secs_f64(),
        _ => NA,
    }
}

/// Counts the results the commit callback reports.
#[derive(Default)]
pub struct CommitResults {
    pub ok: AtomicU64,
    pub err: AtomicU64,
    pub first_error: Mutex<Option<String>>,
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
pub fn probe(
    brokers: &str,
    rate: f64,
    secs: f64,
    seed: u64,
    commit_ms: Option<u64>,
) -> Result<Probe> {
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
