//! Durability and shutdown: how a stop drains (`shutdown_delay_ms`,
//! `grace_ms`), whether the write-ahead log of user and item writes is synced
//! before they are acknowledged (`wal_sync`), and the most users held in
//! memory (`max_users`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::set;

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DurabilityConfig {
    /// After SIGTERM/SIGINT, how long rankd keeps accepting while `/readyz`
    /// says draining.
    pub shutdown_delay_ms: u64,
    /// How long in-flight requests get to finish once accepting stopped.
    pub grace_ms: u64,
    pub wal_sync: WalSync,
    /// Users held in memory (0: unlimited); the least recently updated go.
    pub max_users: usize,
}

impl Default for DurabilityConfig {
    fn default() -> Self {
        Self {
            shutdown_delay_ms: 0,
            grace_ms: 10_000,
            wal_sync: WalSync::Always,
            max_users: 0,
        }
    }
}

impl DurabilityConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["shutdown_delay_ms", "grace_ms", "wal_sync", "max_users"];

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

/// The flags of [`DurabilityConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Shutdown and durability")]
pub struct DurabilityArgs {
    /// After SIGTERM/SIGINT, keep accepting this long while /readyz answers 503 draining [default: 0]
    #[arg(long, env = "RANKD_SHUTDOWN_DELAY_MS", value_name = "MS")]
    pub shutdown_delay_ms: Option<u64>,
    /// Time in-flight requests get to finish once accepting stopped; connections still open then are closed [default: 10000]
    #[arg(long, env = "RANKD_GRACE_MS", value_name = "MS")]
    pub grace_ms: Option<u64>,
    /// Write-ahead log of user and item writes (in --snapshot-dir): always = fsync before acknowledging (one covers every write waiting for it); off = no fsync (a machine crash may lose acknowledged writes) [default: always]
    #[arg(long, env = "RANKD_WAL_SYNC", value_name = "MODE", value_enum)]
    pub wal_sync: Option<WalSync>,
    /// Most users held in memory; beyond it the least recently updated are evicted (0: unlimited) [default: 0]
    #[arg(long, env = "RANKD_MAX_USERS", value_name = "N")]
    pub max_users: Option<usize>,
}

impl DurabilityArgs {
    pub(super) fn apply(self, c: &mut DurabilityConfig) {
        set(&mut c.shutdown_delay_ms, self.shutdown_delay_ms);
        set(&mut c.grace_ms, self.grace_ms);
        set(&mut c.wal_sync, self.wal_sync);
        set(&mut c.max_users, self.max_users);
    }
}
