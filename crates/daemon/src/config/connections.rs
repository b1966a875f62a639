//! Slow, idle and too many clients, on HTTP and the socket alike: how long a
//! request head (or socket frame) may take to arrive (`header_timeout_ms`),
//! how long a connection may sit with nothing in flight (`idle_timeout_ms`),
//! and how many connections each transport holds (`max_connections`).

use std::time::Duration;

use super::setting::settings;

settings! {
    pub struct ConnectionsConfig, flags ConnectionsArgs under "Connections" {
        // For HTTP's first request the head's time runs from the connection's
        // opening.
        /// Close a connection whose request head (HTTP) or frame (socket) is
        /// not whole this long after it began
        header_timeout_ms: u64 = 10_000, flag "MS";
        /// Close a connection with no request in flight and no bytes moving
        /// for this long
        idle_timeout_ms: u64 = 60_000, flag "MS";
        /// Open connections held per transport (HTTP, socket); beyond it new
        /// ones are refused (HTTP 503 overloaded, socket an overloaded frame)
        max_connections: usize = 4096, flag "N";
    }
}

impl ConnectionsConfig {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.header_timeout_ms > 0,
            "header_timeout_ms must be > 0, got 0"
        );
        anyhow::ensure!(
            self.idle_timeout_ms > 0,
            "idle_timeout_ms must be > 0, got 0"
        );
        anyhow::ensure!(
            self.max_connections > 0,
            "max_connections must be > 0, got 0"
        );
        Ok(())
    }
}
