//! Behaviour under pressure: the answer a shed recommend gets daemon-wide
//! (`degrade`, which a model's model.toml may override) and how fast item
//! popularity forgets (`popularity_half_life_s`).

use std::time::Duration;

use super::setting::settings;
use crate::model::spec::Degrade;

settings! {
    pub struct PressureConfig, flags PressureArgs under "Overload and cold start" {
        /// Answer for an interactive recommend that would be shed (queue full,
        /// or its deadline cannot be met), for models whose model.toml does
        /// not set `degrade`: popular = the popular items flagged "degraded";
        /// off = the 429 or 504
        degrade: Degrade = Degrade::Off, flag "MODE";
        /// Half-life, in seconds, of the decayed event counts that rank
        /// popular items (degraded and cold-start answers), at least 1
        popularity_half_life_s: u64 = 3600, flag "SECONDS";
    }
}

impl PressureConfig {
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
