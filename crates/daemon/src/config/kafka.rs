//! Kafka ingestion: the brokers (`None`: no ingestion), the consumer group,
//! the three update topics and the dead-letter topic, the event types kept,
//! any librdkafka property, and when an update batch is applied.

use std::collections::BTreeMap;
use std::time::Duration;

use super::setting::settings;

settings! {
    pub struct KafkaConfig, flags KafkaArgs under "Kafka ingestion" {
        /// Kafka bootstrap servers HOST:PORT[,...]; turns ingestion on
        brokers as "kafka_brokers": Option<String> = None, unset "off", flag "HOSTS": String;
        /// Consumer group for offset commits
        group as "kafka_group": String = "rankd".into(), flag "GROUP";
        /// User events topic
        events_topic as "kafka_events_topic": String = "rankd.events".into(), flag "TOPIC";
        /// Item embedding upserts topic
        items_topic as "kafka_items_topic": String = "rankd.items".into(), flag "TOPIC";
        /// User feature upserts topic
        users_topic as "kafka_users_topic": String = "rankd.users".into(), flag "TOPIC";
        /// Topic that receives invalid messages
        dead_letter_topic as "kafka_dead_letter_topic": Option<String> = None,
            unset "none", flag "TOPIC": String;
        /// Event types that append to a user's history; events of other types
        /// are ignored and counted (file only)
        event_types as "kafka_event_types": Vec<String> =
            vec!["click".into(), "add_to_cart".into(), "purchase".into()];
        /// A librdkafka property (SASL, TLS, ...), repeatable; wins over the
        /// file's [kafka_properties] table; values of secret-looking keys are
        /// redacted in logs
        properties as "kafka_properties": BTreeMap<String, String> = BTreeMap::new(),
            repeat "kafka-property" "KEY=VALUE" => parse_property;
        /// Messages per applied update batch, at most
        batch_max as "ingest_batch_max": usize = 1024, flag "N";
        /// Longest wait before a partial update batch is applied
        batch_wait_us as "ingest_batch_wait_us": u64 = 500, flag "US";
    }
}

impl KafkaConfig {
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
