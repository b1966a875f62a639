//! Model lifecycle: how often the repository is polled for new versions, and
//! the online evaluation that judges each version from the events that
//! follow its recommendations.

use std::time::Duration;

use super::setting::settings;

settings! {
    pub struct LifecycleConfig, flags LifecycleArgs under "Model lifecycle" {
        /// Poll the model repository for new versions this often; 0 turns
        /// polling off
        repository_poll_ms: u64 = 5000, flag "MS";
        /// Users whose recent recommendations are kept for online evaluation;
        /// 0 turns it off
        online_eval_users: usize = 100_000, flag "N";
        /// A click counts for a recommendation served at most this long before
        online_eval_window_ms: u64 = 30 * 60 * 1000, flag "MS";
    }
}

impl LifecycleConfig {
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
