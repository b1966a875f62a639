//! The update mix: user events, item upserts and user feature upserts over
//! rankd's three topics, as the broker receives them.

use rankd::internals::Rng;

use super::{now_ms, EVENTS, ITEMS, N_ITEMS, N_USERS, USERS};

/// The update mix; item and user versions only ever grow within a run.
pub struct Mix {
    pub rng: Rng,
    pub version: u64,
}

pub struct Msg {
    pub topic: &'static str,
    pub key: String,
    pub payload: Vec<u8>,
}

impl Mix {
    pub fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.rng.uniform() * 2.0 - 1.0) as f32)
            .collect()
    }

    pub fn event(&mut self) -> Msg {
        let user = 1 + self.rng.below(N_USERS);
        let item = 1 + self.rng.below(N_ITEMS);
        Msg {
            topic: EVENTS,
            key: user.to_string(),
            payload: serde_json::to_vec(&serde_json::json!({
                "user_id": user, "item_id": item, "type": "click", "ts_ms": now_ms()
            }))
            .expect("json"),
        }
    }

    /// 70% events, 20% item upserts (64 floats), 10% user features (16 floats).
    pub fn mixed(&mut self) -> Msg {
        let roll = self.rng.below(100);
        if roll < 70 {
            return self.event();
        }
        self.version += 1;
        if roll < 90 {
            let item = 1 + self.rng.below(N_ITEMS);
            let embedding = self.floats(64);
            Msg {
                topic: ITEMS,
                key: item.to_string(),
                payload: serde_json::to_vec(&serde_json::json!({
                    "item_id": item, "embedding": embedding, "version": self.version
                }))
                .expect("json"),
            }
        } else {
            let user = 1 + self.rng.below(N_USERS);
            let features = self.floats(16);
            Msg {
                topic: USERS,
                key: user.to_string(),
                payload: serde_json::to_vec(&serde_json::json!({
                    "user_id": user, "features": features, "version": self.version
                }))
                .expect("json"),
            }
        }
    }
}
