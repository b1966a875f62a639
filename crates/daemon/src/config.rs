//! Daemon configuration: built from an optional TOML file, then overridden by
//! flags and `RANKD_*` environment variables (clap reads both).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Model repository root.
    pub models: PathBuf,
    /// HTTP listen address.
    pub http: String,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Deadline for requests that carry no `timeout_ms`.
    pub default_timeout_ms: u64,
    /// Largest `timeout_ms` a request may ask for.
    pub max_timeout_ms: u64,
    /// Unix socket path; empty turns the socket off.
    pub uds: String,
    /// Largest socket frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Requests one socket connection may have in flight.
    pub uds_max_inflight: usize,
    /// A socket client that blocks our writes this long is disconnected.
    pub uds_write_timeout_ms: u64,
    /// Kafka bootstrap servers; ingestion is off when absent.
    pub kafka_brokers: Option<String>,
    /// Consumer group id used for offset commits.
    pub kafka_group: String,
    pub kafka_events_topic: String,
    pub kafka_items_topic: String,
    pub kafka_users_topic: String,
    /// Invalid messages are copied here when set.
    pub kafka_dead_letter_topic: Option<String>,
    /// Event types that append to a user's history.
    pub kafka_event_types: Vec<String>,
    /// Any librdkafka property (SASL, TLS, ...); values of secret-looking keys
    /// are redacted in logs.
    pub kafka_properties: BTreeMap<String, String>,
    /// An update batch is applied when it holds this many messages ...
    pub ingest_batch_max: usize,
    /// ... or when its first message has waited this long.
    pub ingest_batch_wait_us: u64,
    /// Where feature-state snapshots go; empty turns them off.
    pub snapshot_dir: String,
    /// How often the state is snapshotted (when it changed).
    pub snapshot_interval_ms: u64,
    /// Item ids kept per user history (the newest; at least every model's
    /// history_len). Recommend excludes all of them.
    pub history_max: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            models: PathBuf::from("./models"),
            http: "127.0.0.1:8080".into(),
            device: "auto".into(),
            max_body_bytes: 1 << 20,
            default_timeout_ms: 1000,
            max_timeout_ms: 60_000,
            uds: "./rankd.sock".into(),
            max_frame_bytes: 1 << 20,
            uds_max_inflight: 256,
            uds_write_timeout_ms: 5000,
            kafka_brokers: None,
            kafka_group: "rankd".into(),
            kafka_events_topic: "rankd.events".into(),
            kafka_items_topic: "rankd.items".into(),
            kafka_users_topic: "rankd.users".into(),
            kafka_dead_letter_topic: None,
            kafka_event_types: vec!["click".into(), "add_to_cart".into(), "purchase".into()],
            kafka_properties: BTreeMap::new(),
            ingest_batch_max: 1024,
            ingest_batch_wait_us: 2000,
            snapshot_dir: "./rankd-state".into(),
            snapshot_interval_ms: 5000,
            history_max: 1000,
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// A copy safe to log: values of secret-looking Kafka properties hidden.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        for (k, v) in c.kafka_properties.iter_mut() {
            let k = k.to_ascii_lowercase();
            if ["password", "secret", "jaas", "key", "token", "credential"]
                .iter()
                .any(|s| k.contains(s))
            {
                *v = "<redacted>".into();
            }
        }
        c
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_body_bytes > 0, "max_body_bytes must be > 0, got 0");
        anyhow::ensure!(
            self.default_timeout_ms > 0 && self.default_timeout_ms <= self.max_timeout_ms,
            "default_timeout_ms must be in 1..={}, got {}",
            self.max_timeout_ms,
            self.default_timeout_ms
        );
        anyhow::ensure!(
            self.max_frame_bytes > 0 && self.max_frame_bytes <= u32::MAX as usize,
            "max_frame_bytes must be in 1..={}, got {}",
            u32::MAX,
            self.max_frame_bytes
        );
        anyhow::ensure!(
            self.uds_max_inflight > 0,
            "uds_max_inflight must be > 0, got 0"
        );
        anyhow::ensure!(
            self.ingest_batch_max > 0,
            "ingest_batch_max must be > 0, got 0"
        );
        anyhow::ensure!(
            self.snapshot_interval_ms > 0,
            "snapshot_interval_ms must be > 0, got 0"
        );
        anyhow::ensure!(self.history_max > 0, "history_max must be > 0, got 0");
        Ok(())
    }
}

/// `rankd serve` flags. Each is optional so that an unset flag leaves the
/// config file's value (or the default) in place.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Model repository: DIR/<name>/<version>/model.toml [default: ./models]
    #[arg(long, env = "RANKD_MODELS", value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// HTTP listen address (port 0 picks a free port) [default: 127.0.0.1:8080]
    #[arg(long, env = "RANKD_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// Device: auto (GPU 0 if usable, else CPU), cpu, or cuda:N [default: auto]
    #[arg(long, env = "RANKD_DEVICE", value_name = "DEVICE")]
    pub device: Option<String>,
    /// TOML config file with any of the keys below; flags and RANKD_* variables win
    #[arg(long, env = "RANKD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Largest request body, in bytes [default: 1048576]
    #[arg(long, env = "RANKD_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Deadline for requests without timeout_ms, in milliseconds [default: 1000]
    #[arg(long, env = "RANKD_DEFAULT_TIMEOUT_MS", value_name = "MS")]
    pub default_timeout_ms: Option<u64>,
    /// Largest timeout_ms a request may ask for [default: 60000]
    #[arg(long, env = "RANKD_MAX_TIMEOUT_MS", value_name = "MS")]
    pub max_timeout_ms: Option<u64>,
    /// Unix socket path ('' turns it off) [default: ./rankd.sock]
    #[arg(long, env = "RANKD_UDS", value_name = "PATH")]
    pub uds: Option<String>,
    /// Largest socket frame, in bytes [default: 1048576]
    #[arg(long, env = "RANKD_MAX_FRAME_BYTES", value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Requests one socket connection may have in flight [default: 256]
    #[arg(long, env = "RANKD_UDS_MAX_INFLIGHT", value_name = "N")]
    pub uds_max_inflight: Option<usize>,
    /// Disconnect a socket client that blocks writes this long [default: 5000]
    #[arg(long, env = "RANKD_UDS_WRITE_TIMEOUT_MS", value_name = "MS")]
    pub uds_write_timeout_ms: Option<u64>,
    /// Kafka bootstrap servers HOST:PORT[,...]; turns ingestion on
    #[arg(long, env = "RANKD_KAFKA_BROKERS", value_name = "HOSTS")]
    pub kafka_brokers: Option<String>,
    /// Consumer group for offset commits [default: rankd]
    #[arg(long, env = "RANKD_KAFKA_GROUP", value_name = "GROUP")]
    pub kafka_group: Option<String>,
    /// User events topic [default: rankd.events]
    #[arg(long, env = "RANKD_KAFKA_EVENTS_TOPIC", value_name = "TOPIC")]
    pub kafka_events_topic: Option<String>,
    /// Item embedding upserts topic [default: rankd.items]
    #[arg(long, env = "RANKD_KAFKA_ITEMS_TOPIC", value_name = "TOPIC")]
    pub kafka_items_topic: Option<String>,
    /// User feature upserts topic [default: rankd.users]
    #[arg(long, env = "RANKD_KAFKA_USERS_TOPIC", value_name = "TOPIC")]
    pub kafka_users_topic: Option<String>,
    /// Topic that receives invalid messages [default: none]
    #[arg(long, env = "RANKD_KAFKA_DEAD_LETTER_TOPIC", value_name = "TOPIC")]
    pub kafka_dead_letter_topic: Option<String>,
    /// A librdkafka property (repeatable); overrides [kafka_properties]
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub kafka_property: Vec<String>,
    /// Messages per applied update batch, at most [default: 1024]
    #[arg(long, env = "RANKD_INGEST_BATCH_MAX", value_name = "N")]
    pub ingest_batch_max: Option<usize>,
    /// Longest wait before a partial update batch is applied [default: 2000]
    #[arg(long, env = "RANKD_INGEST_BATCH_WAIT_US", value_name = "US")]
    pub ingest_batch_wait_us: Option<u64>,
    /// Feature-state snapshot folder ('' turns snapshots off) [default: ./rankd-state]
    #[arg(long, env = "RANKD_SNAPSHOT_DIR", value_name = "DIR")]
    pub snapshot_dir: Option<String>,
    /// Snapshot period, when the state changed [default: 5000]
    #[arg(long, env = "RANKD_SNAPSHOT_INTERVAL_MS", value_name = "MS")]
    pub snapshot_interval_ms: Option<u64>,
    /// Item ids kept per user history (the newest) [default: 1000]
    #[arg(long, env = "RANKD_HISTORY_MAX", value_name = "N")]
    pub history_max: Option<usize>,
}

impl ServeArgs {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.models {
            c.models = v;
        }
        if let Some(v) = self.http {
            c.http = v;
        }
        if let Some(v) = self.device {
            c.device = v;
        }
        if let Some(v) = self.max_body_bytes {
            c.max_body_bytes = v;
        }
        if let Some(v) = self.default_timeout_ms {
            c.default_timeout_ms = v;
        }
        if let Some(v) = self.max_timeout_ms {
            c.max_timeout_ms = v;
        }
        if let Some(v) = self.uds {
            c.uds = v;
        }
        if let Some(v) = self.max_frame_bytes {
            c.max_frame_bytes = v;
        }
        if let Some(v) = self.uds_max_inflight {
            c.uds_max_inflight = v;
        }
        if let Some(v) = self.uds_write_timeout_ms {
            c.uds_write_timeout_ms = v;
        }
        if self.kafka_brokers.is_some() {
            c.kafka_brokers = self.kafka_brokers;
        }
        if let Some(v) = self.kafka_group {
            c.kafka_group = v;
        }
        if let Some(v) = self.kafka_events_topic {
            c.kafka_events_topic = v;
        }
        if let Some(v) = self.kafka_items_topic {
            c.kafka_items_topic = v;
        }
        if let Some(v) = self.kafka_users_topic {
            c.kafka_users_topic = v;
        }
        if self.kafka_dead_letter_topic.is_some() {
            c.kafka_dead_letter_topic = self.kafka_dead_letter_topic;
        }
        for p in &self.kafka_property {
            let (key, value) = p
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| {
                    // The value may be a secret: name only what was wrong.
                    let key = p.split_once('=').map_or(p.as_str(), |(k, _)| k);
                    anyhow::anyhow!(
                        "--kafka-property must be KEY=VALUE, got {:?}",
                        if p.contains('=') { "=<value>" } else { key }
                    )
                })?;
            c.kafka_properties
                .insert(key.trim().to_string(), value.to_string());
        }
        if let Some(v) = self.ingest_batch_max {
            c.ingest_batch_max = v;
        }
        if let Some(v) = self.ingest_batch_wait_us {
            c.ingest_batch_wait_us = v;
        }
        if let Some(v) = self.snapshot_dir {
            c.snapshot_dir = v;
        }
        if let Some(v) = self.snapshot_interval_ms {
            c.snapshot_interval_ms = v;
        }
        if let Some(v) = self.history_max {
            c.history_max = v;
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rankd.toml");
        std::fs::write(&path, "http = \"0.0.0.0:9000\"\ndefault_timeout_ms = 20\n").unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            default_timeout_ms: Some(30),
            ..Default::default()
        };
        let c = args.into_config().unwrap();
        assert_eq!(c.http, "0.0.0.0:9000");
        assert_eq!(c.default_timeout_ms, 30);
        assert_eq!(c.models, PathBuf::from("./models"));

        std::fs::write(
            &path,
            "[kafka_properties]\n\"sasl.password\" = \"hunter2\"\n\"client.id\" = \"a\"\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        let shown = format!("{:?}", c.redacted());
        assert!(
            !shown.contains("hunter2") && shown.contains("client.id"),
            "{shown}"
        );

        let args = ServeArgs {
            config: Some(path.clone()),
            kafka_property: vec![
                "client.id=b".into(),
                "fetch.wait.max.ms=50".into(),
                "sasl.password=a=b".into(),
            ],
            ..Default::default()
        };
        let c = args.into_config().unwrap();
        let props = &c.kafka_properties;
        assert_eq!(props["client.id"], "b");
        assert_eq!(props["fetch.wait.max.ms"], "50");
        assert_eq!(props["sasl.password"], "a=b");
        assert!(!format!("{:?}", c.redacted()).contains("a=b"));
        for bad in ["fetch.wait.max.ms", "=50"] {
            let args = ServeArgs {
                kafka_property: vec![bad.into()],
                ..Default::default()
            };
            let err = args.into_config().unwrap_err().to_string();
            assert!(err.contains("--kafka-property must be KEY=VALUE"), "{err}");
        }

        std::fs::write(&path, "htp = \"x\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
