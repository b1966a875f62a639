//! The HTTP transport: where it listens and the largest body it reads.

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    /// HTTP listen address.
    #[serde(rename = "http")]
    pub listen: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1 << 20,
        }
    }
}

impl HttpConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["http", "max_body_bytes"];

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_body_bytes > 0, "max_body_bytes must be > 0, got 0");
        Ok(())
    }
}

/// The flags of [`HttpConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// HTTP listen address (port 0 picks a free port) [default: 127.0.0.1:8080]
    #[arg(long, env = "RANKD_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// Largest request body, in bytes [default: 1048576]
    #[arg(long, env = "RANKD_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
}

impl HttpArgs {
    pub(super) fn apply(self, c: &mut HttpConfig) {
        set(&mut c.listen, self.http);
        set(&mut c.max_body_bytes, self.max_body_bytes);
    }
}
