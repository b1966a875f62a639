//! Kafka ingestion: the brokers (`None`: no ingestion), the consumer group,
//! the three update topics and the dead-letter topic, the event types kept,
//! any librdkafka property, and when an update batch is applied.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers; ingestion is off when absent.
    #[serde(rename = "kafka_brokers")]
    pub brokers: Option<String>,
    /// Consumer group id used for offset commits.
    #[serde(rename = "kafka_group")]
    pub group: String,
    #[serde(rename = "kafka_events_topic")]
    pub events_topic: String,
    #[serde(rename = "kafka_items_topic")]
    pub items_topic: String,
    #[serde(rename = "kafka_users_topic")]
    pub users_topic: String,
    /// Invalid messages are copied here when set.
    #[serde(rename = "kafka_dead_letter_topic")]
    pub dead_letter_topic: Option<String>,
    /// Event types that append to a user's history.
    #[serde(rename = "kafka_event_types")]
    pub event_types: Vec<String>,
    /// Any librdkafka property (SASL, TLS, ...), applied last; values of
    /// secret-looking keys are redacted in logs.
    #[serde(rename = "kafka_properties")]
    pub properties: BTreeMap<String, String>,
    /// An update batch is applied when it holds this many messages ...
    #[serde(rename = "ingest_batch_max")]
    pub batch_max: usize,
    /// ... or when its first message has waited this long.
    #[serde(rename = "ingest_batch_wait_us")]
    pub batch_wait_us: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: None,
            group: "rankd".into(),
            events_topic: "rankd.events".into(),
            items_topic: "rankd.items".into(),
            users_topic: "rankd.users".into(),
            dead_letter_topic: None,
            event_types: vec!["click".into(), "add_to_cart".into(), "purchase".into()],
            properties: BTreeMap::new(),
            batch_max: 1024,
            batch_wait_us: 500,
        }
    }
}

impl KafkaConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &[
        "kafka_brokers",
        "kafka_group",
        "kafka_events_topic",
        "kafka_items_topic",
        "kafka_users_topic",
        "kafka_dead_letter_topic",
        "kafka_event_types",
        "kafka_properties",
        "ingest_batch_max",
        "ingest_batch_wait_us",
    ];

    pub fn batch_wait(&self) -> Duration {
        Duration::from_micros(self.batch_wait_us)
    }

    /// Hides the values of secret-looking properties.
    pub(super) fn redact(&mut self) {
        for (k, v) in self.properties.iter_mut() {
            let k = k.to_ascii_lowercase();
            if ["password", "secret", "jaas", "key", "token", "credential"]
                .iter()
                .any(|s| k.contains(s))
            {
                *v = "<redacted>".into();
            }
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.batch_max > 0, "ingest_batch_max must be > 0, got 0");
        Ok(())
    }
}

/// The flags of [`KafkaConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Kafka ingestion")]
pub struct KafkaArgs {
    /// Kafka bootstrap servers HOST:PORT[,...]; turns ingestion on [default: off]
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
    /// A librdkafka property (SASL, TLS, ...), repeatable; wins over the file's [kafka_properties] table; values of secret-looking keys are redacted in logs
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub kafka_property: Vec<String>,
    /// Messages per applied update batch, at most [default: 1024]
    #[arg(long, env = "RANKD_INGEST_BATCH_MAX", value_name = "N")]
    pub ingest_batch_max: Option<usize>,
    /// Longest wait before a partial update batch is applied [default: 500]
    #[arg(long, env = "RANKD_INGEST_BATCH_WAIT_US", value_name = "US")]
    pub ingest_batch_wait_us: Option<u64>,
}

impl KafkaArgs {
    /// Fails only on a `--kafka-property` that is not KEY=VALUE.
    pub(super) fn apply(self, c: &mut KafkaConfig) -> anyhow::Result<()> {
        set(&mut c.brokers, self.kafka_brokers.map(Some));
        set(&mut c.group, self.kafka_group);
        set(&mut c.events_topic, self.kafka_events_topic);
        set(&mut c.items_topic, self.kafka_items_topic);
        set(&mut c.users_topic, self.kafka_users_topic);
        set(
            &mut c.dead_letter_topic,
            self.kafka_dead_letter_topic.map(Some),
        );
        for p in &self.kafka_property {
            let (key, value) = parse_property(p)?;
            c.properties.insert(key, value);
        }
        set(&mut c.batch_max, self.ingest_batch_max);
        set(&mut c.batch_wait_us, self.ingest_batch_wait_us);
        Ok(())
    }
}

/// `KEY=VALUE` (the value may hold `=`), the key trimmed and not empty.
fn parse_property(p: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = p
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| {
            // The value may be a secret: name only what was wrong.
            let key = p.split_once('=').map_or(p, |(k, _)| k);
            anyhow::anyhow!(
                "--kafka-property must be KEY=VALUE, got {:?}",
                if p.contains('=') { "=<value>" } else { key }
            )
        })?;
    Ok((key.trim().to_string(), value.to_string()))
}
