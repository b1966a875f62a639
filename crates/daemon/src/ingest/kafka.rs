//! The Kafka consumer (librdkafka; the `kafka` feature). One thread owns the
//! consumer: it decodes and validates
//! messages, coalesces them into update batches (by size or time), hands each
//! batch to the executor and waits until it is applied; applied offsets are
//! committed once a second (and at shutdown), never before they are applied.
//! Every rankd needs every update, so it assigns itself all partitions of the
//! three topics (the group id is used for commits, which tools read for lag)
//! and resumes from the offsets recorded in its snapshot,
//! or from the beginning when it has none: the state and the offsets it
//! includes always move together.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use super::IngestStatus;
use crate::config::KafkaConfig;
use crate::exec::ExecutorHandle;
use crate::features::updates::{Coalescer, Position, Rejection, Stream, Validator};
use crate::metrics::Metrics;
use crate::shutdown::CancellationToken;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// librdkafka callbacks: broker state and partition ends from the statistics,
/// errors.
struct Ctx {
    status: Arc<IngestStatus>,
    metrics: Arc<Metrics>,
    /// The broker state last logged: 0 not yet known, 1 up, 2 down.
    logged: AtomicU8,
}

impl Ctx {
    /// Sets the connection state; logs its transitions (once each, not per
    /// statistics tick).
    fn set_connected(&self, up: bool) {
        self.status.set_connected(up);
        self.metrics.kafka_connected.set(i64::from(up));
        let now = if up { 1 } else { 2 };
        let before = self.logged.swap(now, Ordering::Relaxed);
        match (before, up) {
            (1, true) | (2, false) => {}
            (_, true) => tracing::info!("connected to a Kafka broker"),
            // Not yet connected at start is not worth a warning by itself;
            // losing a broker is.
            (0, false) => tracing::info!("no Kafka broker reachable yet"),
            (_, false) => {
                tracing::warn!("lost every Kafka broker; updates wait until one is back")
            }
        }
    }
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let up = stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        self.set_connected(up);
        for (topic, t) in &stats.topics {
            for (&partition, p) in &t.partitions {
                if partition < 0 || p.hi_offset < 0 {
                    continue;
                }
                let pos = (topic.clone(), partition);
                self.status
                    .with_partition(&pos, |s| s.high_watermark = p.hi_offset);
                let lag = self.status.lag(&pos);
                self.metrics
                    .ingest_lag
                    .with_label_values(&[topic, &partition.to_string()])
                    .set(lag);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.set_connected(false);
        }
        tracing::debug!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for Ctx {}

/// Warns at most once a minute per reason.
struct RateLimitedLog(HashMap<&'static str, Instant>);

impl RateLimitedLog {
    fn warn(&mut self, reason: &'static str, topic: &str, offset: i64, detail: &str) {
        let now = Instant::now();
        let due = self
            .0
            .get(reason)
            .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60));
        if due {
            self.0.insert(reason, now);
            tracing::warn!(
                reason,
                topic,
                offset,
                detail,
                "skipping an invalid update message (logged once a minute per reason)"
            );
        }
    }
}

pub struct Ingest {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    status: Arc<IngestStatus>,
}

impl Ingest {
    /// Starts the consumer thread on `config.brokers`. `resume` maps
    /// topic-partitions to the next offset the restored state lacks; once
    /// `stop` is cancelled the thread applies what it holds, commits and
    /// ends.
    pub fn start(
        config: KafkaConfig,
        validator: Validator,
        resume: BTreeMap<Position, i64>,
        exec: ExecutorHandle,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let brokers = config
            .brokers
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no Kafka brokers configured"))?;
        let status = Arc::new(IngestStatus::default());
        for (pos, &next) in &resume {
            status.with_partition(pos, |s| s.applied_offset = next);
        }
        let ctx = Ctx {
            status: status.clone(),
            metrics: metrics.clone(),
            logged: AtomicU8::new(0),
        };
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &brokers)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "1000")
            // Freshness over fetch efficiency: an idle fetch returns within 10 ms.
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "false");
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        let consumer: BaseConsumer<Ctx> = cc
            .create_with_context(ctx)
            .map_err(|e| anyhow::anyhow!("creating the Kafka consumer: {e}"))?;
        let producer: Option<BaseProducer> = match &config.dead_letter_topic {
            Some(_) => {
                let mut pc = ClientConfig::new();
                pc.set("bootstrap.servers", &brokers);
                for (k, v) in &config.properties {
                    pc.set(k, v);
                }
                Some(
                    pc.create()
                        .map_err(|e| anyhow::anyhow!("creating the dead-letter producer: {e}"))?,
                )
            }
            None => None,
        };
        let worker = Worker {
            consumer,
            producer,
            config,
            validator,
            resume,
            exec,
            metrics,
            status: status.clone(),
            stop: stop.clone(),
            log: RateLimitedLog(HashMap::new()),
            uncommitted: BTreeMap::new(),
            last_commit: Instant::now(),
            fetched: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("rankd-ingest".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            stop,
            thread: Some(thread),
            status,
        })
    }

    pub fn status(&self) -> &Arc<IngestStatus> {
        &self.status
    }

    /// Applies what is pending, commits, and stops the consumer; blocking.
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    consumer: BaseConsumer<Ctx>,
    producer: Option<BaseProducer>,
    config: KafkaConfig,
    validator: Validator,
    resume: BTreeMap<Position, i64>,
    exec: ExecutorHandle,
    metrics: Arc<Metrics>,
    status: Arc<IngestStatus>,
    /// Checked once a round: a round waits on the broker for at most
    /// 100 ms, or what is left of the batch wait while a batch is open.
    stop: CancellationToken,
    log: RateLimitedLog,
    /// Applied positions not yet committed to the group.
    uncommitted: BTreeMap<Position, i64>,
    last_commit: Instant,
    /// When each message of the open batch was fetched.
    fetched: Vec<Instant>,
}

/// Offsets are committed at most this often (and at shutdown): a synchronous
/// commit per second costs the broker far less than one per 2 ms batch.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

impl Worker {
    fn stream_of(&self, topic: &str) -> Option<Stream> {
        if topic == self.config.events_topic {
            Some(Stream::Events)
        } else if topic == self.config.items_topic {
            Some(Stream::Items)
        } else if topic == self.config.users_topic {
            Some(Stream::Users)
        } else {
            None
        }
    }

    /// Assigns every partition of the topics that exist; returns the topics
    /// still missing.
    fn assign(&self, assigned: &mut Vec<String>) -> Vec<String> {
        let topics = [
            self.config.events_topic.clone(),
            self.config.items_topic.clone(),
            self.config.users_topic.clone(),
        ];
        let mut missing = Vec::new();
        let mut added = false;
        let mut tpl = self
            .consumer
            .assignment()
            .unwrap_or_else(|_| TopicPartitionList::new());
        let todo: Vec<&String> = topics.iter().filter(|t| !assigned.contains(t)).collect();
        for topic in todo {
            let md = match self
                .consumer
                .fetch_metadata(Some(topic), Duration::from_secs(2))
            {
                Ok(md) => md,
                Err(e) => {
                    tracing::debug!(topic, error = %e, "metadata not available yet");
                    missing.push(topic.clone());
                    continue;
                }
            };
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                missing.push(topic.clone());
                continue;
            }
            for p in partitions {
                let offset = match self.resume.get(&(topic.clone(), p)) {
                    Some(&next) => Offset::Offset(next),
                    None => Offset::Beginning,
                };
                if let Err(e) = tpl.add_partition_offset(topic, p, offset) {
                    tracing::warn!(topic, partition = p, error = %e, "cannot assign partition");
                }
            }
            tracing::info!(topic, "consuming every partition of the topic");
            assigned.push(topic.clone());
            added = true;
        }
        if added {
            if let Err(e) = self.consumer.assign(&tpl) {
                tracing::warn!(error = %e, "assigning partitions failed; retrying");
                assigned.clear();
                return topics.to_vec();
            }
        }
        missing
    }

    fn run(mut self) {
        let mut coalescer = Coalescer::new();
        let mut batch_started: Option<Instant> = None;
        let mut assigned: Vec<String> = Vec::new();
        let mut next_assign = Instant::now();
        loop {
            let stopping = self.stop.is_cancelled();
            if !stopping && assigned.len() < 3 && Instant::now() >= next_assign {
                let missing = self.assign(&mut assigned);
                if !missing.is_empty() {
                    next_assign = Instant::now() + Duration::from_millis(500);
                }
            }
            let flush_due = batch_started.is_some_and(|t| t.elapsed() >= self.config.batch_wait())
                || coalescer.len() >= self.config.batch_max;
            if flush_due || (stopping && !coalescer.is_empty()) {
                self.flush(&mut coalescer);
                batch_started = None;
            }
            if !stopping {
                self.commit(false);
            }
            if stopping {
                break;
            }
            let timeout = match batch_started {
                Some(t) => self.config.batch_wait().saturating_sub(t.elapsed()),
                None => Duration::from_millis(100),
            };
            if let Some(p) = &self.producer {
                p.poll(Duration::ZERO);
            }
            match self.consumer.poll(timeout) {
                Some(Ok(msg)) => {
                    let topic = msg.topic().to_string();
                    let Some(stream) = self.stream_of(&topic) else {
                        continue;
                    };
                    coalescer.consumed(
                        Some((&topic, msg.partition(), msg.offset())),
                        msg.timestamp().to_millis(),
                    );
                    let fetched = Instant::now();
                    self.fetched.push(fetched);
                    batch_started.get_or_insert(fetched);
                    let payload = msg.payload().unwrap_or_default();
                    match self.validator.decode(stream, payload) {
                        Ok(update) => coalescer.push(update),
                        Err(Rejection::Ignored(reason)) => {
                            self.metrics
                                .ingest_ignored
                                .with_label_values(&[reason])
                                .inc();
                        }
                        Err(Rejection::Invalid { reason, detail }) => {
                            self.metrics
                                .ingest_rejected
                                .with_label_values(&[reason])
                                .inc();
                            self.log.warn(reason, &topic, msg.offset(), &detail);
                            self.dead_letter(&topic, msg.key(), payload, reason, &detail);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "kafka poll error");
                }
                None => {}
            }
        }
        self.commit(true);
        if let Some(p) = &self.producer {
            let _ = p.flush(Duration::from_secs(2));
        }
    }

    fn dead_letter(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        reason: &str,
        detail: &str,
    ) {
        let (Some(producer), Some(dlq)) = (&self.producer, &self.config.dead_letter_topic) else {
            return;
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "rankd-reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "rankd-detail",
                value: Some(detail),
            })
            .insert(Header {
                key: "rankd-source-topic",
                value: Some(topic),
            });
        let mut record = BaseRecord::<[u8], [u8]>::to(dlq)
            .payload(payload)
            .headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Err((e, _)) = producer.send(record) {
            tracing::debug!(error = %e, "dead-letter send failed");
        }
    }

    fn flush(&mut self, coalescer: &mut Coalescer) {
        let mut batch = coalescer.take();
        let positions = batch.positions.clone();
        let timestamps = std::mem::take(&mut batch.timestamps_ms);
        let messages = batch.messages;
        let fetched = std::mem::take(&mut self.fetched);
        let span = crate::trace::update_span(messages);
        let report = match span.in_scope(|| self.exec.apply_blocking(batch)) {
            Ok(r) => r,
            Err(e) => {
                // The executor is gone (shutdown): nothing is committed, the
                // snapshot offsets stay where the state is. Ingestion alone
                // stops (its own token).
                tracing::warn!(error = %e, "update batch not applied");
                self.stop.cancel();
                return;
            }
        };
        // Applied by the executor, so visible to the next request it takes.
        let visible = Instant::now();
        let applied_at = now_ms();
        span.record("events", report.events);
        span.record("users", report.users);
        span.record("items", report.items);
        drop(span);
        let own = self.metrics.ingest_freshness.with_label_values(&["rankd"]);
        for f in fetched {
            own.observe((visible - f).as_secs_f64());
        }
        self.metrics.ingest_batch_messages.observe(messages as f64);
        for (topic, n) in [
            (&self.config.events_topic, report.events),
            (&self.config.items_topic, report.items),
            (&self.config.users_topic, report.users),
        ] {
            if n > 0 {
                self.metrics
                    .ingest_applied
                    .with_label_values(&[topic])
                    .inc_by(n as u64);
            }
        }
        if report.stale > 0 {
            self.metrics.ingest_stale.inc_by(report.stale as u64);
        }
        self.status.updates_applied.fetch_add(
            (report.events + report.items + report.users) as u64,
            Ordering::Relaxed,
        );
        let end_to_end = self
            .metrics
            .ingest_freshness
            .with_label_values(&["end_to_end"]);
        for ts in timestamps {
            end_to_end.observe((applied_at as i64 - ts).max(0) as f64 / 1000.0);
        }
        for ((topic, partition), next) in &positions {
            self.status
                .with_partition(&(topic.clone(), *partition), |s| {
                    s.applied_offset = s.applied_offset.max(*next);
                    s.last_apply_ms = applied_at;
                });
            let e = self
                .uncommitted
                .entry((topic.clone(), *partition))
                .or_insert(*next);
            *e = (*e).max(*next);
        }
    }

    /// Commits the applied positions (only ever those) when the interval has
    /// passed or `now` is set; on success `/v1/ingest` shows them committed.
    fn commit(&mut self, now: bool) {
        if self.uncommitted.is_empty() || (!now && self.last_commit.elapsed() < COMMIT_INTERVAL) {
            return;
        }
        self.last_commit = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.uncommitted {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                for (pos, next) in std::mem::take(&mut self.uncommitted) {
                    self.status
                        .with_partition(&pos, |s| s.committed_offset = next);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "offset commit failed; retried at the next interval")
            }
        }
    }
}
