//! Slow, idle and too many clients, on HTTP and the socket alike: how long a
//! request head (or socket frame) may take to arrive (`header_timeout_ms`),
//! how long a connection may sit with nothing in flight (`idle_timeout_ms`),
//! and how many connections each transport holds (`max_connections`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionsConfig {
    /// A request head (HTTP) or frame (socket) not whole this long after its
    /// first byte (for HTTP's first request: after the connection opened)
    /// closes the connection.
    pub header_timeout_ms: u64,
    /// A connection with nothing in flight and no bytes moving this long is
    /// closed.
    pub idle_timeout_ms: u64,
    /// Open connections per transport (HTTP, socket); beyond it new ones are
    /// refused.
    pub max_connections: usize,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
        }
    }
}

impl ConnectionsConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["header_timeout_ms", "idle_timeout_ms", "max_connections"];

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

/// The flags of [`ConnectionsConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Connections")]
pub struct ConnectionsArgs {
    /// Close a connection whose request head (HTTP) or frame (socket) is not whole this long after it began [default: 10000]
    #[arg(long, env = "RANKD_HEADER_TIMEOUT_MS", value_name = "MS")]
    pub header_timeout_ms: Option<u64>,
    /// Close a connection with no request in flight and no bytes moving for this long [default: 60000]
    #[arg(long, env = "RANKD_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Open connections held per transport (HTTP, socket); beyond it new ones are refused (HTTP 503 overloaded, socket an overloaded frame) [default: 4096]
    #[arg(long, env = "RANKD_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
}

impl ConnectionsArgs {
    pub(super) fn apply(self, c: &mut ConnectionsConfig) {
        set(&mut c.header_timeout_ms, self.header_timeout_ms);
        set(&mut c.idle_timeout_ms, self.idle_timeout_ms);
        set(&mut c.max_connections, self.max_connections);
    }
}
