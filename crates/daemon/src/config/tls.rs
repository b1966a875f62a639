//! TLS for the HTTP listener: a certificate chain and its private key, both
//! PEM files. Plain HTTP when neither is given.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// Certificate chain (PEM), leaf first.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
}

impl TlsConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["tls_cert", "tls_key"];

    /// The two files, when TLS is on.
    pub fn files(&self) -> Option<(&PathBuf, &PathBuf)> {
        self.tls_cert.as_ref().zip(self.tls_key.as_ref())
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "tls_cert and tls_key go together: give both or neither"
        );
        Ok(())
    }
}

/// The flags of [`TlsConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM; with --tls-key) [default: plain HTTP]
    #[arg(long, env = "RANKD_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM) [default: none]
    #[arg(long, env = "RANKD_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub(super) fn apply(self, c: &mut TlsConfig) {
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            c.tls_key = self.tls_key;
        }
    }
}
