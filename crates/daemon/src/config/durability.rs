//! Durability and shutdown: how a stop drains (`shutdown_delay_ms`,
//! `grace_ms`), whether the write-ahead log of user and item writes is synced
//! before they are acknowledged (`wal_sync`), and the most users held in
//! memory (`max_users`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::setting::settings;

/// When the write-ahead log is synced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WalSync {
    /// One fsync per executor turn, before the turn's writes are acknowledged.
    Always,
    /// Written to the OS each turn, never synced: survives a crash of rankd,
    /// not of the machine.
    Off,
}

settings! {
    pub struct DurabilityConfig, flags DurabilityArgs under "Shutdown and durability" {
        /// After SIGTERM/SIGINT, keep accepting this long while /readyz
        /// answers 503 draining
        shutdown_delay_ms: u64 = 0, flag "MS";
        /// Time in-flight requests get to finish once accepting stopped;
        /// connections still open then are closed
        grace_ms: u64 = 10_000, flag "MS";
        /// Write-ahead log of user and item writes (in --snapshot-dir): always
        /// = fsync before acknowledging (one covers every write waiting for
        /// it); off = no fsync (a machine crash may lose acknowledged writes)
        wal_sync: WalSync = WalSync::Always, flag "MODE";
        /// Most users held in memory; beyond it the least recently updated are
        /// evicted (0: unlimited)
        max_users: usize = 0, flag "N";
    }
}

impl DurabilityConfig {
    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_delay_ms)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        Ok(())
    }
}
