//! Request deadlines, the same on HTTP and the socket: the one a request
//! without `timeout_ms` gets, and the longest one it may ask for.

use std::time::Duration;

use super::setting::settings;

settings! {
    pub struct RequestConfig, flags RequestArgs under "Request deadlines" {
        /// Deadline for requests without timeout_ms, in milliseconds
        default_timeout_ms: u64 = 1000, flag "MS";
        /// Largest timeout_ms a request may ask for
        max_timeout_ms: u64 = 60_000, flag "MS";
    }
}

impl RequestConfig {
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
