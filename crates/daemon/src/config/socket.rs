//! The Unix-socket transport: its path (`None`: no socket), the largest frame
//! it reads, and how much one connection may ask of it.

use std::path::PathBuf;
use std::time::Duration;

use super::off_if_empty;
use super::setting::settings;

settings! {
    pub struct SocketConfig, flags SocketArgs under "Unix socket" {
        /// Unix socket path ('' turns it off)
        #[serde(with = "super::optional_path")]
        path as "uds": Option<PathBuf> = Some(PathBuf::from("./rankd.sock")),
            flag "PATH": String => off_if_empty;
        /// Largest socket frame, in bytes
        max_frame_bytes: usize = 1 << 20, flag "BYTES";
        /// Requests one socket connection may have in flight
        max_inflight as "uds_max_inflight": usize = 256, flag "N";
        /// Disconnect a socket client that blocks writes this long
        write_timeout_ms as "uds_write_timeout_ms": u64 = 5000, flag "MS";
    }
}

impl SocketConfig {
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
