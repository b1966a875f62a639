//! Who may do what: bearer tokens for the admin API and for clients (read
//! from files, one accepted token per line, re-read when a file changes), and
//! the Unix socket's file permissions.

use std::path::PathBuf;

use super::setting::settings;

settings! {
    pub struct AccessConfig, flags AccessArgs under "Access" {
        /// File of admin API tokens, one per line (no file: no admin API, every
        /// /v1/admin/ route answers 404)
        admin_token_file: Option<PathBuf> = None, unset "none", flag "PATH": PathBuf;
        /// File of client tokens, one per line: every HTTP /v1/ route outside
        /// the admin API then needs a client or admin token (no file: they are
        /// open; /healthz, /readyz and /metrics always are; the socket is
        /// guarded by --uds-mode)
        client_token_file: Option<PathBuf> = None, unset "none", flag "PATH": PathBuf;
        /// Permission bits of the socket file, octal; a client needs write
        /// permission to connect
        uds_mode: String = "0660".into(), flag "OCTAL";
        /// Group of the socket file, name or gid (rankd must be in it)
        uds_group: Option<String> = None, unset "unchanged", flag "GROUP": String;
    }
}

impl AccessConfig {
    /// `uds_mode` as permission bits.
    pub fn uds_mode_bits(&self) -> anyhow::Result<u32> {
        let digits = self.uds_mode.trim_start_matches("0o");
        let mode = u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "uds_mode must be octal permission bits such as 0660 (at most 0777), got '{}'",
                    self.uds_mode
                )
            })?;
        Ok(mode)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        self.uds_mode_bits()?;
        if let Some(g) = &self.uds_group {
            anyhow::ensure!(!g.is_empty(), "uds_group must not be empty");
        }
        Ok(())
    }
}
