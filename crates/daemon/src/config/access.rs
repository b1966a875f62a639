//! Who may do what: bearer tokens for the admin API and for clients (read
//! from files, one accepted token per line, re-read when a file changes), and
//! the Unix socket's file permissions.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AccessConfig {
    /// Tokens of the admin API; without it the admin API does not exist.
    pub admin_token_file: Option<PathBuf>,
    /// Tokens that scoring, user and item routes require; without it they
    /// are open.
    pub client_token_file: Option<PathBuf>,
    /// The socket file's permission bits, in octal.
    pub uds_mode: String,
    /// The socket file's group (name or numeric gid); unchanged when unset.
    pub uds_group: Option<String>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            admin_token_file: None,
            client_token_file: None,
            uds_mode: "0660".into(),
            uds_group: None,
        }
    }
}

impl AccessConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &[
        "admin_token_file",
        "client_token_file",
        "uds_mode",
        "uds_group",
    ];

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

/// The flags of [`AccessConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Access")]
pub struct AccessArgs {
    /// File of admin API tokens, one per line (no file: no admin API, every /v1/admin/ route answers 404) [default: none]
    #[arg(long, env = "RANKD_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// File of client tokens, one per line: every HTTP /v1/ route outside the admin API then needs a client or admin token (no file: they are open; /healthz, /readyz and /metrics always are; the socket is guarded by --uds-mode) [default: none]
    #[arg(long, env = "RANKD_CLIENT_TOKEN_FILE", value_name = "PATH")]
    pub client_token_file: Option<PathBuf>,
    /// Permission bits of the socket file, octal; a client needs write permission to connect [default: 0660]
    #[arg(long, env = "RANKD_UDS_MODE", value_name = "OCTAL")]
    pub uds_mode: Option<String>,
    /// Group of the socket file, name or gid (rankd must be in it) [default: unchanged]
    #[arg(long, env = "RANKD_UDS_GROUP", value_name = "GROUP")]
    pub uds_group: Option<String>,
}

impl AccessArgs {
    pub(super) fn apply(self, c: &mut AccessConfig) {
        if self.admin_token_file.is_some() {
            c.admin_token_file = self.admin_token_file;
        }
        if self.client_token_file.is_some() {
            c.client_token_file = self.client_token_file;
        }
        set(&mut c.uds_mode, self.uds_mode);
        if self.uds_group.is_some() {
            c.uds_group = self.uds_group;
        }
    }
}
