//! The HTTP transport: where it listens and the largest body it reads.

use super::setting::settings;

settings! {
    pub struct HttpConfig, flags HttpArgs under "HTTP" {
        /// HTTP listen address (port 0 picks a free port)
        listen as "http": String = "127.0.0.1:8080".into(), flag "ADDR";
        /// Largest request body, in bytes
        max_body_bytes: usize = 1 << 20, flag "BYTES";
    }
}

impl HttpConfig {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_body_bytes > 0, "max_body_bytes must be > 0, got 0");
        Ok(())
    }
}
