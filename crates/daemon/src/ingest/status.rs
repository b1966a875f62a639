//! What `/v1/ingest` and `/readyz` report about Kafka ingestion: connected or
//! not, and per partition the offsets applied and committed, the end offset
//! and the lag. Built in every rankd (without the `kafka` feature nothing
//! ever reports, and the service answers "not enabled").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rankd_client::types::{IngestReport, PartitionStatus};

use crate::features::updates::Position;

/// What `/v1/ingest` and `/readyz` report; shared with the consumer thread.
#[derive(Debug, Default)]
pub struct IngestStatus {
    connected: AtomicBool,
    partitions: Mutex<BTreeMap<Position, PartitionStatus>>,
    pub updates_applied: AtomicU64,
}

impl IngestStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> IngestReport {
        let partitions = self
            .partitions
            .lock()
            .expect("ingest status lock")
            .values()
            .cloned()
            .collect();
        IngestReport {
            enabled: true,
            connected: self.connected(),
            updates_applied: self.updates_applied.load(Ordering::Relaxed),
            partitions,
        }
    }
}

/// The consumer's side.
#[cfg(feature = "kafka")]
impl IngestStatus {
    pub(super) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// The partition's lag (0 until its end offset is known).
    pub(super) fn lag(&self, pos: &Position) -> i64 {
        self.partitions
            .lock()
            .expect("ingest status lock")
            .get(pos)
            .map_or(0, |s| s.lag)
    }

    pub(super) fn with_partition(&self, pos: &Position, f: impl FnOnce(&mut PartitionStatus)) {
        let mut map = self.partitions.lock().expect("ingest status lock");
        let p = map.entry(pos.clone()).or_insert_with(|| PartitionStatus {
            topic: pos.0.clone(),
            partition: pos.1,
            applied_offset: 0,
            committed_offset: -1,
            high_watermark: -1,
            lag: 0,
            last_apply_ms: 0,
        });
        f(p);
        if p.high_watermark >= 0 {
            p.lag = (p.high_watermark - p.applied_offset).max(0);
        }
    }
}
