//! TLS for the HTTP listener: a certificate chain and its private key, both
//! PEM files. Plain HTTP when neither is given.

use std::path::PathBuf;

use super::setting::settings;

settings! {
    pub struct TlsConfig, flags TlsArgs under "TLS" {
        // The chain is leaf first; the key PKCS#8, PKCS#1 or SEC1.
        /// Serve HTTPS with this certificate chain (PEM; with --tls-key)
        tls_cert: Option<PathBuf> = None, unset "plain HTTP", flag "PEM": PathBuf;
        /// Private key of --tls-cert (PEM)
        tls_key: Option<PathBuf> = None, unset "none", flag "PEM": PathBuf;
    }
}

impl TlsConfig {
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
