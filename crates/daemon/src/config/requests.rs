//! Request deadlines, the same on HTTP and the socket: the one a request
//! without `timeout_ms` gets, and the longest one it may ask for.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestConfig {
    /// Deadline for requests that carry no `timeout_ms`.
    pub default_timeout_ms: u64,
    /// Largest `timeout_ms` a request may ask for.
    pub max_timeout_ms: u64,
}

impl Default for RequestConfig {
    fn default() -> Self {
        Self {
            default_timeout_ms: 1000,
            max_timeout_ms: 60_000,
        }
    }
}

impl RequestConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["default_timeout_ms", "max_timeout_ms"];

    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.default_timeout_ms)
    }

    pub fn max_timeout(&self) -> Duration {
        Duration::from_millis(self.max_timeout_ms)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.default_timeout_ms > 0 && self.default_timeout_ms <= self.max_timeout_ms,
            "default_timeout_ms must be in 1..={}, got {}",
            self.max_timeout_ms,
            self.default_timeout_ms
        );
        Ok(())
    }
}

/// The flags of [`RequestConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Request deadlines")]
pub struct RequestArgs {
    /// Deadline for requests without timeout_ms, in milliseconds [default: 1000]
    #[arg(long, env = "RANKD_DEFAULT_TIMEOUT_MS", value_name = "MS")]
    pub default_timeout_ms: Option<u64>,
    /// Largest timeout_ms a request may ask for [default: 60000]
    #[arg(long, env = "RANKD_MAX_TIMEOUT_MS", value_name = "MS")]
    pub max_timeout_ms: Option<u64>,
}

impl RequestArgs {
    pub(super) fn apply(self, c: &mut RequestConfig) {
        set(&mut c.default_timeout_ms, self.default_timeout_ms);
        set(&mut c.max_timeout_ms, self.max_timeout_ms);
    }
}
