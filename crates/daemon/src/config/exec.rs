//! The models and where they run: the repository the daemon serves, the
//! device the executor runs them on, and the per-user history it keeps.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecConfig {
    /// Model repository root.
    pub models: PathBuf,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Item ids kept per user history (the newest; at least every model's
    /// history_len). Recommend excludes all of them.
    pub history_max: usize,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            models: PathBuf::from("./models"),
            device: "auto".into(),
            history_max: 1000,
        }
    }
}

impl ExecConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["models", "device", "history_max"];

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.history_max > 0, "history_max must be > 0, got 0");
        Ok(())
    }
}

/// The flags of [`ExecConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Models and device")]
pub struct ExecArgs {
    /// Model repository: DIR/<name>/<version>/model.toml [default: ./models]
    #[arg(long, env = "RANKD_MODELS", value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// Device: auto (GPU 0 if usable, else CPU), cpu, or cuda:N [default: auto]
    #[arg(long, env = "RANKD_DEVICE", value_name = "DEVICE")]
    pub device: Option<String>,
    /// Item ids kept per user history (the newest; 8 bytes each; raised to the largest history_len of the models) [default: 1000]
    #[arg(long, env = "RANKD_HISTORY_MAX", value_name = "N")]
    pub history_max: Option<usize>,
}

impl ExecArgs {
    pub(super) fn apply(self, c: &mut ExecConfig) {
        set(&mut c.models, self.models);
        set(&mut c.device, self.device);
        set(&mut c.history_max, self.history_max);
    }
}
