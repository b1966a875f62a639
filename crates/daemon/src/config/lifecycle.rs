//! Model lifecycle: how often the repository is polled for new versions, and
//! the online evaluation that judges each version from the events that
//! follow its recommendations.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LifecycleConfig {
    /// Repository poll interval; 0 turns polling off.
    pub repository_poll_ms: u64,
    /// Users whose recent recommendations are remembered; 0 turns online
    /// evaluation off.
    pub online_eval_users: usize,
    /// An event counts as a hit when it names an item recommended this
    /// recently.
    pub online_eval_window_ms: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            repository_poll_ms: 5000,
            online_eval_users: 100_000,
            online_eval_window_ms: 30 * 60 * 1000,
        }
    }
}

impl LifecycleConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &[
        "repository_poll_ms",
        "online_eval_users",
        "online_eval_window_ms",
    ];

    pub fn poll_interval(&self) -> Option<Duration> {
        (self.repository_poll_ms > 0).then(|| Duration::from_millis(self.repository_poll_ms))
    }

    pub fn online_window(&self) -> Duration {
        Duration::from_millis(self.online_eval_window_ms)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.online_eval_window_ms > 0,
            "online_eval_window_ms must be > 0, got 0"
        );
        Ok(())
    }
}

/// The flags of [`LifecycleConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Model lifecycle")]
pub struct LifecycleArgs {
    /// Poll the model repository for new versions this often; 0 turns polling off [default: 5000]
    #[arg(long, env = "RANKD_REPOSITORY_POLL_MS", value_name = "MS")]
    pub repository_poll_ms: Option<u64>,
    /// Users whose recent recommendations are kept for online evaluation; 0 turns it off [default: 100000]
    #[arg(long, env = "RANKD_ONLINE_EVAL_USERS", value_name = "N")]
    pub online_eval_users: Option<usize>,
    /// A click counts for a recommendation served at most this long before [default: 1800000]
    #[arg(long, env = "RANKD_ONLINE_EVAL_WINDOW_MS", value_name = "MS")]
    pub online_eval_window_ms: Option<u64>,
}

impl LifecycleArgs {
    pub(super) fn apply(self, c: &mut LifecycleConfig) {
        set(&mut c.repository_poll_ms, self.repository_poll_ms);
        set(&mut c.online_eval_users, self.online_eval_users);
        set(&mut c.online_eval_window_ms, self.online_eval_window_ms);
    }
}
