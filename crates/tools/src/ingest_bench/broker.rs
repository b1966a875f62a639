//! Broker and producer helpers: creating the topics, reading a group's
//! committed offsets, and producing messages, in bulk or paced at a rate,
//! with every delivery counted and timed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::TopicPartitionList;

use super::mix::{Mix, Msg};
use super::{now_ms, probe_topic, NA, PROBES, TOPICS};

pub fn create_topics(brokers: &str, partitions: i32) -> Result<()> {
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

/// Counts deliveries, so failures are reported rather than hidden.
#[derive(Default)]
pub struct Deliveries {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Acknowledgement latency (ack time - message timestamp), ms.
    pub ack_ms: Mutex<Vec<i64>>,
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

pub fn producer(brokers: &str, linger_ms: &str) -> Result<ThreadedProducer<Deliveries>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms)
        .set("queue.buffering.max.messages", "500000")
        .create_with_context(Deliveries::default())?)
}

pub fn send(
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
pub struct Paced {
    pub produced: u64,
    pub failed: u64,
    pub secs: f64,
    pub per_topic: BTreeMap<String, u64>,
    /// Broker acknowledgement latency percentiles (p50, p99, max), ms.
    pub ack_ms: (f64, f64, f64),
}

/// Nearest-rank percentiles (p50, p99, max) of `v`.
pub fn percentiles(v: &mut [i64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (NA, NA, NA);
    }
    v.sort_unstable();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64;
    (at(0.50), at(0.99), v[v.len() - 1] as f64)
}

/// Produces the mix at `rate` messages/s (timestamps = send time) until `stop`
/// or `max` elapses, then flushes.
pub fn produce_paced(
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

/// Prints the offsets `group` committed on rankd's topics, per partition.
pub fn committed(brokers: &str, group: &str) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
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
