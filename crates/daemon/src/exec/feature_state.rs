//! The feature state as the executor serves it: user and item writes
//! applied in order with scoring batches, logged and acknowledged once
//! durable (`features::durable`), reads in order with the writes before
//! them, Kafka update batches, captures for snapshots, evictions beyond
//! `--max-users`, and the events that online evaluation and popularity
//! count.

use std::sync::Arc;
use std::time::Instant;

use super::online::OnlineEval;
use super::{ModelIndex, Op, Output, Registry, Reply, UserSummary, UserUpdate};
use crate::features::durable::Durable;
use crate::features::popularity::{self, Popularity};
use crate::features::snapshot::{Snapshot, SnapshotDelta};
use crate::features::store::{ItemSummary, ItemWrite, State};
use crate::features::UserDims;
use crate::metrics::Metrics;

pub(super) struct FeatureState {
    /// Item tables and users.
    pub state: State,
    /// The write-ahead log and the writes waiting for it.
    durable: Durable,
    online: OnlineEval,
    popularity: Arc<Popularity>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl FeatureState {
    pub fn new(
        state: State,
        online: OnlineEval,
        popularity: Arc<Popularity>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            state,
            durable: Durable::default(),
            online,
            popularity,
            registry,
            metrics,
        }
    }

    /// Restores the state a snapshot holds.
    pub fn restore(&mut self, s: &Snapshot) {
        self.state.restore(s);
        tracing::info!(
            users = s.users.len(),
            items = s.items.len(),
            "feature state restored from the snapshot"
        );
    }

    /// Replays the write-ahead log after the snapshot and starts writing it
    /// (`Durable::open`); whether any record was replayed.
    pub fn open_log(
        &mut self,
        dir: &std::path::Path,
        from: u64,
        sync: bool,
        dims: &UserDims,
    ) -> bool {
        self.durable.open(dir, from, sync, &mut self.state, dims)
    }

    /// Applies a user write; answered once the turn is committed.
    pub fn upsert_user(&mut self, update: UserUpdate, reply: Reply<UserSummary>, dims: &UserDims) {
        let logged = update.clone();
        let added = self.added_to_history(&update);
        let result = self.state.upsert_user(update, dims);
        if let (Ok(summary), false) = (&result, added.is_empty()) {
            self.popularity
                .record(added.iter().copied(), popularity::now_s());
            let now = Instant::now();
            for item in added {
                self.clicked(summary.user_id, item, now);
            }
        }
        match result {
            Ok(summary) => {
                self.metrics.user_updates.with_label_values(&["api"]).inc();
                self.durable.user(logged, reply, summary);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Applies an item write; answered once the turn is committed.
    pub fn write_item(&mut self, write: ItemWrite, reply: Reply<ItemSummary>) {
        let logged = write.clone();
        match self.state.write_item_request(write) {
            Ok(summary) => self.durable.item(logged, reply, summary),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Applies a batch of updates from the Kafka consumer.
    #[cfg(feature = "kafka")]
    pub fn apply(
        &mut self,
        batch: &crate::features::updates::UpdateBatch,
    ) -> crate::features::store::ApplyReport {
        if self.online.enabled() {
            let now = Instant::now();
            for &(user, item) in &batch.events {
                self.clicked(user, item, now);
            }
        }
        self.state.apply(batch)
    }

    /// Hands the turn's writes to the log; they are answered once durable.
    pub fn commit(&mut self) {
        self.durable.commit();
    }

    /// What changed since the last capture (all of it when `full`); the
    /// log's next segment starts where the captured state ends.
    pub fn capture(&mut self, full: bool) -> SnapshotDelta {
        self.durable.commit();
        let mut delta = self.state.capture(full);
        if let Some(next) = self.durable.rotate() {
            delta.wal_next = next;
        }
        delta
    }

    /// Holds at most `max_users` users and publishes the user gauges.
    pub fn evict_users(&mut self) {
        let before = self.state.evicted;
        self.state.evict();
        self.metrics
            .users_evicted
            .inc_by(self.state.evicted - before);
        self.metrics.users.set(self.state.users.len() as i64);
        self.metrics
            .users_bytes
            .set(self.state.users.bytes() as i64);
    }

    /// The answer to a recommend that asked for online evaluation
    /// (`online: true`) is remembered; whether it counts as an impression.
    pub fn answered(
        &mut self,
        op: &Op,
        output: &Output,
        model: ModelIndex,
        version: u64,
        now: Instant,
    ) -> bool {
        let (
            Op::Recommend {
                user_id,
                online: true,
                ..
            },
            Output::TopK(items),
        ) = (op, output)
        else {
            return false;
        };
        if !self.online.enabled() {
            return false;
        }
        let ids: Vec<u64> = items.iter().map(|s| s.id).collect();
        self.served(*user_id, model, version, &ids, now)
    }

    /// Remembers `items` answered for `user` by `model`'s `version` at
    /// `now`, for online evaluation; whether it counts as an impression.
    pub fn served(
        &mut self,
        user: u64,
        model: ModelIndex,
        version: u64,
        items: &[u64],
        now: Instant,
    ) -> bool {
        let counted = self.online.enabled() && !items.is_empty();
        if counted {
            self.online.served(user, model, version, items, now);
        }
        counted
    }

    /// The most popular items, most popular first, with their counts.
    pub fn popular(&self) -> Arc<Vec<(u64, f32)>> {
        self.popularity.top()
    }

    /// Counts `n` impressions of `model`'s `version`.
    pub fn impressions(&self, model: &str, version: &str, n: u64) {
        if n > 0 {
            self.metrics
                .online_impressions
                .with_label_values(&[model, version])
                .inc_by(n);
        }
    }

    /// The items a history write adds to the user's stored history.
    fn added_to_history(&self, update: &UserUpdate) -> Vec<u64> {
        let Some(new) = update.history.as_ref() else {
            return Vec::new();
        };
        let old: std::collections::HashSet<u64> = self
            .state
            .users
            .get(update.user_id)
            .map(|u| u.history.iter().copied().collect())
            .unwrap_or_default();
        new.iter().copied().filter(|i| !old.contains(i)).collect()
    }

    /// An event of `user` on `item`, for online evaluation.
    fn clicked(&mut self, user: u64, item: u64, now: Instant) {
        if let Some(hit) = self.online.clicked(user, item, now) {
            let name = &self.registry.by_index(hit.model).name;
            let version = hit.version.to_string();
            self.metrics
                .online_hits
                .with_label_values(&[name, &version])
                .inc();
            self.metrics
                .online_hit_rank
                .with_label_values(&[name, &version])
                .observe(hit.rank as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::backend::Scored;
    use crate::exec::ServedModel;
    use crate::model::ItemTable;

    fn features() -> (FeatureState, Arc<Popularity>, Arc<Metrics>) {
        let registry = Arc::new(Registry::new(vec![ServedModel::new("a".into(), 4, 4)]));
        let metrics = Arc::new(Metrics::new());
        let popularity = Arc::new(Popularity::new(Duration::from_secs(3600)));
        let mut state = State::new(10);
        let ids: Vec<u64> = (1..=5).collect();
        state.add_table("videos", ItemTable::new(2, ids, vec![0.5; 10]).unwrap());
        let online = OnlineEval::new(10, Duration::from_secs(60));
        let f = FeatureState::new(state, online, popularity.clone(), registry, metrics.clone());
        (f, popularity, metrics)
    }

    fn write(f: &mut FeatureState, user_id: u64, history: &[u64]) -> UserSummary {
        let (reply, mut rx) = oneshot::channel();
        let update = UserUpdate {
            user_id,
            history: Some(history.to_vec()),
            features: None,
            sparse: None,
        };
        f.upsert_user(update, reply, &UserDims::default());
        assert!(rx.try_recv().is_err(), "answered before the commit");
        f.commit();
        rx.try_recv().unwrap().unwrap()
    }

    /// The items a history write adds are events: each counts for the
    /// popular items and, on a list served to the user, as a hit of the
    /// version that served it; items already in the history do not count
    /// again.
    #[test]
    fn a_history_write_counts_the_items_it_adds_as_events() {
        let (mut f, popularity, metrics) = features();
        let served = Output::TopK(vec![
            Scored { id: 3, score: 1.0 },
            Scored { id: 4, score: 0.5 },
        ]);
        let asked = Op::Recommend {
            user_id: 7,
            k: 2,
            exclude: vec![],
            filter: None,
            online: true,
            context: None,
        };
        assert!(f.answered(&asked, &served, ModelIndex::new(0), 1, Instant::now()));
        f.impressions("a", "1", 1);
        assert_eq!(write(&mut f, 7, &[1]).history, [1]);
        assert_eq!(write(&mut f, 7, &[1, 4]).history, [1, 4]);
        popularity.refresh(popularity::now_s(), true);
        let mut counted: Vec<(u64, f32)> = popularity.top().to_vec();
        counted.sort_by_key(|&(id, _)| id);
        assert_eq!(counted.len(), 2, "{counted:?}");
        for (&(id, n), want) in counted.iter().zip([1, 4]) {
            assert_eq!(id, want);
            assert!((n - 1.0).abs() < 1e-3, "one event each: {counted:?}");
        }
        let text = metrics.render();
        for line in [
            "rankd_online_impressions_total{model=\"a\",version=\"1\"} 1",
            "rankd_online_hits_total{model=\"a\",version=\"1\"} 1",
            "rankd_online_hit_rank_sum{model=\"a\",version=\"1\"} 2",
            "rankd_user_updates_total{source=\"api\"} 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // A recommend that did not ask for online evaluation is not
        // remembered.
        let quiet = Op::Recommend {
            user_id: 8,
            k: 2,
            exclude: vec![],
            filter: None,
            online: false,
            context: None,
        };
        assert!(!f.answered(&quiet, &served, ModelIndex::new(0), 1, Instant::now()));
    }
}
