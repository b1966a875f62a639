//! Kafka ingestion. The status it reports (`status`) is part of every rankd,
//! so `/v1/ingest` and `/readyz` answer alike in every build; the consumer
//! (`kafka`: librdkafka) only of a rankd built with the `kafka` feature. A
//! rankd built without it refuses to start when brokers are configured.

#[cfg(feature = "kafka")]
mod kafka;
mod status;

pub use rankd_client::types::IngestReport;
pub use status::IngestStatus;

use crate::config::KafkaConfig;

#[cfg(not(feature = "kafka"))]
pub use disabled::Ingest;
#[cfg(feature = "kafka")]
pub use kafka::Ingest;

/// Fails when the configuration asks for ingestion from a rankd that cannot.
pub fn ensure_available(config: &KafkaConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg!(feature = "kafka") || config.brokers.is_none(),
        "Kafka brokers are configured (--kafka-brokers, RANKD_KAFKA_BROKERS or kafka_brokers), \
         but this rankd was built without the `kafka` feature; rebuild it with the feature \
         (on by default) or leave the brokers unset"
    );
    Ok(())
}

/// Without the `kafka` feature there is no consumer: no `Ingest` value can
/// exist, and starting one fails.
#[cfg(not(feature = "kafka"))]
mod disabled {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::IngestStatus;
    use crate::config::KafkaConfig;
    use crate::exec::ExecutorHandle;
    use crate::features::updates::{Position, Validator};
    use crate::metrics::Metrics;

    pub enum Ingest {}

    impl Ingest {
        pub fn start(
            config: KafkaConfig,
            _validator: Validator,
            _resume: BTreeMap<Position, i64>,
            _exec: ExecutorHandle,
            _metrics: Arc<Metrics>,
            _stop: crate::shutdown::CancellationToken,
        ) -> anyhow::Result<Self> {
            super::ensure_available(&config)?;
            anyhow::bail!("Kafka ingestion: this rankd was built without the `kafka` feature")
        }

        pub fn status(&self) -> &Arc<IngestStatus> {
            match *self {}
        }

        pub fn stop(self) {
            match self {}
        }
    }
}
