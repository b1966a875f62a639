//! Prometheus metrics, one registry per daemon (several daemons can live in one
//! test process). All names start with `rankd_`. The Kafka ingestion and GPU
//! series exist only in a rankd built with `kafka` or `cuda` (both default
//! features), the only builds that can set them.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by model, route and HTTP-equivalent status.
    pub requests: IntCounterVec,
    /// Whole request latency as the server saw it.
    pub request_seconds: HistogramVec,
    /// A pipeline's time per stage (`retrieve`, `rank`).
    pub pipeline_stage_seconds: HistogramVec,
    /// Time from admission to the start of the batch that carried it.
    pub queue_seconds: HistogramVec,
    /// Backend time per batch.
    pub exec_seconds: HistogramVec,
    /// Rows per executed batch.
    pub batch_rows: HistogramVec,
    /// Requests per executed batch.
    pub batch_requests: HistogramVec,
    /// Requests admitted and not yet taken into a batch.
    pub queue_depth: IntGaugeVec,
    /// 1 for the model's current state, 0 for the others.
    pub model_state: IntGaugeVec,
    /// Requests dropped before execution, by reason.
    pub dropped: IntCounterVec,
    /// User-state updates applied, by source.
    pub user_updates: IntCounterVec,
    /// Open socket connections.
    pub uds_connections: prometheus::IntGauge,
    /// Open connections by transport (`http`, `uds`).
    pub connections: IntGaugeVec,
    /// Connections refused at `--max-connections`, by transport.
    pub connections_refused: IntCounterVec,
    /// Connections closed for a late request head (or socket frame) or for
    /// idling, by transport and reason.
    pub connections_timed_out: IntCounterVec,
    /// Users held in memory, an estimate of their bytes, and those evicted
    /// by `--max-users`.
    pub users: prometheus::IntGauge,
    pub users_bytes: prometheus::IntGauge,
    pub users_evicted: prometheus::IntCounter,
    /// Socket connections closed for a protocol error, by reason.
    pub uds_errors: IntCounterVec,
    /// 1 while a Kafka broker is reachable.
    #[cfg(feature = "kafka")]
    pub kafka_connected: prometheus::IntGauge,
    /// Updates applied from Kafka, by topic.
    #[cfg(feature = "kafka")]
    pub ingest_applied: IntCounterVec,
    /// Invalid update messages skipped, by reason.
    #[cfg(feature = "kafka")]
    pub ingest_rejected: IntCounterVec,
    /// Valid messages rankd does not act on, by reason.
    #[cfg(feature = "kafka")]
    pub ingest_ignored: IntCounterVec,
    /// Updates ignored because a newer version was stored.
    #[cfg(feature = "kafka")]
    pub ingest_stale: prometheus::IntCounter,
    /// Messages per applied update batch.
    #[cfg(feature = "kafka")]
    pub ingest_batch_messages: prometheus::Histogram,
    /// Consumer lag per topic-partition (end offset − applied offset).
    #[cfg(feature = "kafka")]
    pub ingest_lag: IntGaugeVec,
    /// How old an update is once applied, by `stage`: `end_to_end` from
    /// the message's timestamp, `rankd` from the consumer's fetch (rankd's
    /// own share: batching, decoding, applying).
    #[cfg(feature = "kafka")]
    pub ingest_freshness: HistogramVec,
    /// GPU telemetry from NVML, by device.
    #[cfg(feature = "cuda")]
    pub gpu_utilization: prometheus::GaugeVec,
    #[cfg(feature = "cuda")]
    pub gpu_memory_used: IntGaugeVec,
    #[cfg(feature = "cuda")]
    pub gpu_memory_total: IntGaugeVec,
    #[cfg(feature = "cuda")]
    pub gpu_temperature: prometheus::GaugeVec,
    #[cfg(feature = "cuda")]
    pub gpu_power: prometheus::GaugeVec,
    /// Batches re-executed on the CPU after a device error, by reason.
    pub fallbacks: IntCounterVec,
    /// 1 while the device serves batches, 0 while the CPU stands in for it.
    pub device_healthy: IntGaugeVec,
    /// Versions that failed to load or warm up, by model.
    pub load_failures: IntCounterVec,
    /// Fraction of users (0–1) each version answers.
    pub traffic_share: prometheus::GaugeVec,
    /// Recommendations served and remembered for online evaluation.
    pub online_impressions: IntCounterVec,
    /// Remembered recommendations a later event of the same user clicked.
    pub online_hits: IntCounterVec,
    /// 1-based rank of the clicked item in the list that was hit.
    pub online_hit_rank: HistogramVec,
    /// 1 once Kafka ingestion is started (so alerts on `rankd_kafka_connected`
    /// spare the daemons that have no Kafka).
    pub ingest_enabled: prometheus::IntGauge,
    /// Snapshots that could not be written.
    pub snapshot_failures: prometheus::IntCounter,
    /// Recommends answered from popularity instead of being shed, by reason
    /// (queue_full, deadline).
    pub degraded: IntCounterVec,
    /// Recommends for users with no state answered from popularity.
    pub cold_start: IntCounterVec,
    /// Queries whose user's query vector was kept from an earlier batch
    /// (hits) or computed by the tower (misses), by model.
    pub query_cache_hits: IntCounterVec,
    pub query_cache_misses: IntCounterVec,
    /// Estimated bytes of the kept query vectors.
    pub query_cache_bytes: prometheus::IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        Self {
            requests: counter(
                "rankd_requests_total",
                "Requests by model, version, route, status code and priority class.",
                &["model", "version", "route", "status", "priority"],
            ),
            pipeline_stage_seconds: histogram(
                "rankd_pipeline_stage_seconds",
                "A pipeline recommend's time per stage: retrieve (the retrieval model's recommend) and rank (the ranker's score of the candidates).",
                &["pipeline", "stage"],
                LATENCY_BUCKETS,
            ),
            request_seconds: histogram(
                "rankd_request_duration_seconds",
                "Request latency inside the server, admission to answer.",
                &["model", "version", "route", "priority"],
                LATENCY_BUCKETS,
            ),
            queue_seconds: histogram(
                "rankd_queue_duration_seconds",
                "Time a request waited for its batch to start.",
                &["model", "priority"],
                LATENCY_BUCKETS,
            ),
            exec_seconds: histogram(
                "rankd_batch_execution_seconds",
                "Backend execution time per batch.",
                &["model", "version", "device"],
                LATENCY_BUCKETS,
            ),
            batch_rows: histogram(
                "rankd_batch_size",
                "Rows per executed batch.",
                &["model"],
                BATCH_BUCKETS,
            ),
            batch_requests: histogram(
                "rankd_batch_requests",
                "Requests per executed batch.",
                &["model"],
                BATCH_BUCKETS,
            ),
            queue_depth: gauge(
                "rankd_queue_depth",
                "Requests admitted and waiting for a batch.",
                &["model", "priority"],
            ),
            model_state: gauge(
                "rankd_model_state",
                "1 for the version's current load state (loading, ready, failed, unloaded).",
                &["model", "version", "state"],
            ),
            dropped: counter(
                "rankd_requests_dropped_total",
                "Requests dropped before execution, by reason (deadline, predicted, cancelled).",
                &["model", "reason", "priority"],
            ),
            user_updates: counter(
                "rankd_user_updates_total",
                "User-state updates applied, by source.",
                &["source"],
            ),
            users: {
                let g = prometheus::IntGauge::new("rankd_users", "Users held in memory.")
                    .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            users_bytes: {
                let g = prometheus::IntGauge::new(
                    "rankd_users_bytes",
                    "Estimated bytes of the users' states held in memory.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            users_evicted: {
                let c = prometheus::IntCounter::new(
                    "rankd_users_evicted_total",
                    "Least recently updated users evicted beyond --max-users.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            uds_connections: {
                let g = prometheus::IntGauge::new(
                    "rankd_uds_connections",
                    "Open Unix-socket connections.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            connections: gauge(
                "rankd_connections",
                "Open connections, by transport.",
                &["transport"],
            ),
            connections_refused: counter(
                "rankd_connections_refused_total",
                "Connections refused at --max-connections, by transport.",
                &["transport"],
            ),
            connections_timed_out: counter(
                "rankd_connections_timed_out_total",
                "Connections closed for a late request head or frame (header_timeout) or for idling (idle_timeout).",
                &["transport", "reason"],
            ),
            uds_errors: counter(
                "rankd_uds_protocol_errors_total",
                "Socket connections closed for a protocol error, by reason.",
                &["reason"],
            ),
            #[cfg(feature = "kafka")]
            kafka_connected: {
                let g = prometheus::IntGauge::new(
                    "rankd_kafka_connected",
                    "1 while a Kafka broker is reachable.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            #[cfg(feature = "kafka")]
            ingest_applied: counter(
                "rankd_ingest_updates_applied_total",
                "Updates applied from Kafka, by topic.",
                &["topic"],
            ),
            #[cfg(feature = "kafka")]
            ingest_rejected: counter(
                "rankd_ingest_rejected_total",
                "Invalid update messages skipped, by reason.",
                &["reason"],
            ),
            #[cfg(feature = "kafka")]
            ingest_ignored: counter(
                "rankd_ingest_ignored_total",
                "Valid update messages rankd does not act on, by reason.",
                &["reason"],
            ),
            #[cfg(feature = "kafka")]
            ingest_stale: {
                let c = prometheus::IntCounter::new(
                    "rankd_ingest_stale_total",
                    "Updates ignored because a newer version was stored.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            #[cfg(feature = "kafka")]
            ingest_batch_messages: {
                let h = prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "rankd_ingest_batch_messages",
                        "Messages per applied update batch.",
                    )
                    .buckets(BATCH_BUCKETS.to_vec()),
                )
                .expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            #[cfg(feature = "kafka")]
            ingest_lag: gauge(
                "rankd_ingest_lag",
                "Consumer lag per topic-partition: end offset minus applied offset.",
                &["topic", "partition"],
            ),
            #[cfg(feature = "kafka")]
            ingest_freshness: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "rankd_ingest_freshness_seconds",
                        "Age of an update once applied and visible to the next request: \
                         stage=\"end_to_end\" from the message's timestamp, \
                         stage=\"rankd\" from its fetch by rankd's consumer.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["stage"],
                )
                .expect("valid metric");
                // Both series exist (at zero) before the first update.
                for stage in ["end_to_end", "rankd"] {
                    h.with_label_values(&[stage]);
                }
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            #[cfg(feature = "cuda")]
            gpu_utilization: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "rankd_gpu_utilization_ratio",
                        "GPU busy fraction over the last sample period (NVML).",
                    ),
                    &["device"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            #[cfg(feature = "cuda")]
            gpu_memory_used: gauge(
                "rankd_gpu_memory_used_bytes",
                "GPU memory in use (NVML).",
                &["device"],
            ),
            #[cfg(feature = "cuda")]
            gpu_memory_total: gauge(
                "rankd_gpu_memory_total_bytes",
                "GPU memory in all (NVML).",
                &["device"],
            ),
            #[cfg(feature = "cuda")]
            gpu_temperature: {
                let g = prometheus::GaugeVec::new(
                    Opts::new("rankd_gpu_temperature_celsius", "GPU temperature (NVML)."),
                    &["device"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            #[cfg(feature = "cuda")]
            gpu_power: {
                let g = prometheus::GaugeVec::new(
                    Opts::new("rankd_gpu_power_watts", "GPU power draw (NVML)."),
                    &["device"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            fallbacks: counter(
                "rankd_fallback_total",
                "Batches re-executed on the CPU after a device error, by reason.",
                &["reason"],
            ),
            device_healthy: gauge(
                "rankd_device_healthy",
                "1 while the device serves batches, 0 while the CPU stands in for it.",
                &["device"],
            ),
            load_failures: counter(
                "rankd_model_load_failures_total",
                "Model versions that failed to load or warm up.",
                &["model"],
            ),
            traffic_share: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "rankd_traffic_share",
                        "Fraction of users (0-1) each model version answers.",
                    ),
                    &["model", "version"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            ingest_enabled: {
                let g = prometheus::IntGauge::new(
                    "rankd_ingest_enabled",
                    "1 once Kafka ingestion is started, 0 when the daemon has none.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            online_impressions: counter(
                "rankd_online_impressions_total",
                "Recommendations served and remembered for online evaluation.",
                &["model", "version"],
            ),
            online_hits: counter(
                "rankd_online_hits_total",
                "Remembered recommendations that a later event of the same user clicked.",
                &["model", "version"],
            ),
            online_hit_rank: histogram(
                "rankd_online_hit_rank",
                "1-based rank of the clicked item in the recommendation it hit.",
                &["model", "version"],
                &[1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0],
            ),
            snapshot_failures: {
                let c = prometheus::IntCounter::new(
                    "rankd_snapshot_failures_total",
                    "Snapshots of the feature state that could not be written.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            degraded: counter(
                "rankd_degraded_total",
                "Recommends answered with the popular items instead of being shed, by reason (queue_full, deadline); for a pipeline, rank_stage: answered in retrieval order without its ranking stage.",
                &["model", "reason"],
            ),
            cold_start: counter(
                "rankd_cold_start_total",
                "Recommends for users with no history and no features answered with the popular items.",
                &["model"],
            ),
            query_cache_hits: counter(
                "rankd_query_cache_hits_total",
                "Queries answered from the user's kept query vector, without the tower.",
                &["model"],
            ),
            query_cache_misses: counter(
                "rankd_query_cache_misses_total",
                "Queries of a model with a query cache whose query vector the tower computed.",
                &["model"],
            ),
            query_cache_bytes: {
                let g = prometheus::IntGauge::new(
                    "rankd_query_cache_bytes",
                    "Estimated bytes of the query vectors kept by the query cache.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            registry,
        }
    }

    /// Publishes a model's effective split; versions not in it show 0.
    pub fn set_traffic(
        &self,
        model: &str,
        versions: &[u64],
        split: &std::collections::BTreeMap<u64, u32>,
    ) {
        for v in versions {
            let share = split.get(v).copied().unwrap_or(0);
            self.traffic_share
                .with_label_values(&[model, &v.to_string()])
                .set(f64::from(share) / 100.0);
        }
    }

    pub fn set_model_state(&self, model: &str, version: u64, state: &str) {
        let v = version.to_string();
        for s in ["loading", "ready", "failed", "unloaded"] {
            self.model_state
                .with_label_values(&[model, &v, s])
                .set(i64::from(s == state));
        }
    }

    /// Requests of `class` (its `priority` label) waiting for `model`.
    pub fn set_queue_depth(&self, model: &str, class: &str, depth: usize) {
        self.queue_depth
            .with_label_values(&[model, class])
            .set(depth as i64);
    }

    /// A batch of `requests` requests, `rows` rows, of `model`'s `version`
    /// ran on `device` for `elapsed`.
    pub fn batch_ran(
        &self,
        model: &str,
        version: &str,
        device: &str,
        elapsed: std::time::Duration,
        rows: usize,
        requests: usize,
    ) {
        self.exec_seconds
            .with_label_values(&[model, version, device])
            .observe(elapsed.as_secs_f64());
        self.batch_rows
            .with_label_values(&[model])
            .observe(rows as f64);
        self.batch_requests
            .with_label_values(&[model])
            .observe(requests as f64);
    }

    /// What a batch of `model` found in the query cache, and the bytes the
    /// cache holds now.
    pub fn query_cache_used(&self, model: &str, hits: u64, misses: u64, bytes: usize) {
        self.query_cache_hits
            .with_label_values(&[model])
            .inc_by(hits);
        self.query_cache_misses
            .with_label_values(&[model])
            .inc_by(misses);
        self.query_cache_bytes.set(bytes as i64);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding metrics to memory");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
