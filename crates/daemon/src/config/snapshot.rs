//! Feature-state snapshots: the folder they go to (`None`: no snapshots) and
//! how often the state is written when it changed.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{off_if_empty, set};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotConfig {
    /// Where feature-state snapshots go; `None` (`''` in flags, variables
    /// and the file) turns them off.
    #[serde(rename = "snapshot_dir", with = "super::optional_path")]
    pub dir: Option<PathBuf>,
    /// How often the state is snapshotted (when it changed).
    #[serde(rename = "snapshot_interval_ms")]
    pub interval_ms: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            dir: Some(PathBuf::from("./rankd-state")),
            interval_ms: 5000,
        }
    }
}

impl SnapshotConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["snapshot_dir", "snapshot_interval_ms"];

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.interval_ms > 0,
            "snapshot_interval_ms must be > 0, got 0"
        );
        Ok(())
    }
}

/// The flags of [`SnapshotConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Snapshots")]
pub struct SnapshotArgs {
    /// Feature-state snapshot folder ('' turns snapshots off) [default: ./rankd-state]
    #[arg(long, env = "RANKD_SNAPSHOT_DIR", value_name = "DIR")]
    pub snapshot_dir: Option<String>,
    /// Snapshot period, when the state changed [default: 5000]
    #[arg(long, env = "RANKD_SNAPSHOT_INTERVAL_MS", value_name = "MS")]
    pub snapshot_interval_ms: Option<u64>,
}

impl SnapshotArgs {
    pub(super) fn apply(self, c: &mut SnapshotConfig) {
        set(&mut c.dir, self.snapshot_dir.map(off_if_empty));
        set(&mut c.interval_ms, self.snapshot_interval_ms);
    }
}
