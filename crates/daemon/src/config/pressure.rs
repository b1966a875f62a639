//! Behaviour under pressure: the answer a shed recommend gets daemon-wide
//! (`degrade`, which a model's model.toml may override) and how fast item
//! popularity forgets (`popularity_half_life_s`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::set;
use crate::model::spec::Degrade;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PressureConfig {
    /// `popular`: an interactive recommend that would be shed (queue full,
    /// deadline out of reach) is answered with the popular items, flagged
    /// `degraded`; `off`: the 429 / 504.
    pub degrade: Degrade,
    /// Half-life of the decayed event counts behind popularity.
    pub popularity_half_life_s: u64,
}

impl Default for PressureConfig {
    fn default() -> Self {
        Self {
            degrade: Degrade::Off,
            popularity_half_life_s: 3600,
        }
    }
}

impl PressureConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &["degrade", "popularity_half_life_s"];

    pub fn popularity_half_life(&self) -> Duration {
        Duration::from_secs(self.popularity_half_life_s)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.popularity_half_life_s == 0 {
            anyhow::bail!("popularity_half_life_s must be >= 1, got 0");
        }
        Ok(())
    }
}

/// The flags of [`PressureConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Overload and cold start")]
pub struct PressureArgs {
    /// Answer for an interactive recommend that would be shed (queue full, or its deadline cannot be met), for models whose model.toml does not set `degrade`: popular = the popular items flagged "degraded"; off = the 429 or 504 [default: off]
    #[arg(long, env = "RANKD_DEGRADE", value_name = "MODE", value_enum)]
    pub degrade: Option<Degrade>,
    /// Half-life, in seconds, of the decayed event counts that rank popular items (degraded and cold-start answers), at least 1 [default: 3600]
    #[arg(long, env = "RANKD_POPULARITY_HALF_LIFE_S", value_name = "SECONDS")]
    pub popularity_half_life_s: Option<u64>,
}

impl PressureArgs {
    pub(super) fn apply(self, c: &mut PressureConfig) {
        set(&mut c.degrade, self.degrade);
        set(&mut c.popularity_half_life_s, self.popularity_half_life_s);
    }
}
