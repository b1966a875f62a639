//! Feature-state snapshots: the folder they go to (`None`: no snapshots) and
//! how often the state is written when it changed.

use std::path::PathBuf;
use std::time::Duration;

use super::off_if_empty;
use super::setting::settings;

settings! {
    pub struct SnapshotConfig, flags SnapshotArgs under "Snapshots" {
        /// Feature-state snapshot folder ('' turns snapshots off)
        #[serde(with = "super::optional_path")]
        dir as "snapshot_dir": Option<PathBuf> = Some(PathBuf::from("./rankd-state")),
            flag "DIR": String => off_if_empty;
        /// Snapshot period, when the state changed
        interval_ms as "snapshot_interval_ms": u64 = 5000, flag "MS";
    }
}

impl SnapshotConfig {
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
