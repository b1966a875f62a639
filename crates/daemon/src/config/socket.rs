//! The Unix-socket transport: its path (`None`: no socket), the largest frame
//! it reads, and how much one connection may ask of it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{off_if_empty, set};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SocketConfig {
    /// Unix socket path; `None` (`''` in flags, variables and the file)
    /// turns the socket off.
    #[serde(rename = "uds", with = "super::optional_path")]
    pub path: Option<PathBuf>,
    /// Largest socket frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Requests one socket connection may have in flight.
    #[serde(rename = "uds_max_inflight")]
    pub max_inflight: usize,
    /// A socket client that blocks our writes this long is disconnected.
    #[serde(rename = "uds_write_timeout_ms")]
    pub write_timeout_ms: u64,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            path: Some(PathBuf::from("./rankd.sock")),
            max_frame_bytes: 1 << 20,
            max_inflight: 256,
            write_timeout_ms: 5000,
        }
    }
}

impl SocketConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &[
        "uds",
        "max_frame_bytes",
        "uds_max_inflight",
        "uds_write_timeout_ms",
    ];

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_frame_bytes > 0 && self.max_frame_bytes <= u32::MAX as usize,
            "max_frame_bytes must be in 1..={}, got {}",
            u32::MAX,
            self.max_frame_bytes
        );
        anyhow::ensure!(self.max_inflight > 0, "uds_max_inflight must be > 0, got 0");
        Ok(())
    }
}

/// The flags of [`SocketConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Unix socket")]
pub struct SocketArgs {
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
}

impl SocketArgs {
    pub(super) fn apply(self, c: &mut SocketConfig) {
        set(&mut c.path, self.uds.map(off_if_empty));
        set(&mut c.max_frame_bytes, self.max_frame_bytes);
        set(&mut c.max_inflight, self.uds_max_inflight);
        set(&mut c.write_timeout_ms, self.uds_write_timeout_ms);
    }
}
