//! The feature state the executor owns: item tables, the user store, the
//! source offsets already applied, and what changed since the catalogue was
//! loaded (for snapshots). Only the executor thread touches it.

use std::collections::{BTreeMap, HashSet};

use crate::error::ServeError;
use crate::features::snapshot::{
    Snapshot, SnapshotDelta, SnapshotItem, SnapshotOffset, SnapshotUser,
};
use crate::features::updates::{Position, Update, UpdateBatch};
use crate::features::{UserState, UserStore};
use crate::model::items::ItemChange;
use crate::model::ItemTable;
pub use rankd_client::types::ItemSummary;

/// A change to one user's state; a field given replaces that part.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UserUpdate {
    pub user_id: u64,
    pub history: Option<Vec<u64>>,
    pub features: Option<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UserSummary {
    pub user_id: u64,
    pub history: Vec<u64>,
    pub features: Option<Vec<f32>>,
}

/// What applying an update batch did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ApplyReport {
    pub events: usize,
    pub items: usize,
    pub users: usize,
    /// Updates ignored because a version at least as new was stored (or came
    /// earlier in the same batch).
    pub stale: usize,
}

/// An item write from HTTP or the socket; `version: None` means "newer than
/// whatever is stored".
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ItemWrite {
    pub item_id: u64,
    /// `None` deletes the item.
    pub embedding: Option<Vec<f32>>,
    pub version: Option<u64>,
}

pub struct State {
    pub tables: Vec<ItemTable>,
    /// Tables no model uses any more: emptied, skipped by writes, and reused
    /// by the next table added.
    retired: std::collections::BTreeSet<usize>,
    pub users: UserStore,
    /// Next offset per topic-partition that the state includes.
    pub applied: BTreeMap<Position, i64>,
    dirty_items: HashSet<u64>,
    /// Users and items changed since the last `capture`, tracked once the
    /// first capture was taken (never when snapshots are off).
    users_since: HashSet<u64>,
    items_since: HashSet<u64>,
    tracking: bool,
    /// Rows written since the backend last heard of them, per table.
    changed_rows: BTreeMap<usize, Vec<u32>>,
    /// Bumped on every change, so a snapshot is only written when needed.
    pub changes: u64,
    /// Most users held (0: unlimited).
    pub max_users: usize,
    /// Users evicted since the start.
    pub evicted: u64,
}

impl State {
    pub fn new(history_cap: usize) -> Self {
        Self {
            tables: Vec::new(),
            retired: std::collections::BTreeSet::new(),
            users: UserStore::new(history_cap),
            applied: BTreeMap::new(),
            dirty_items: HashSet::new(),
            users_since: HashSet::new(),
            items_since: HashSet::new(),
            tracking: false,
            changed_rows: BTreeMap::new(),
            changes: 0,
            max_users: 0,
            evicted: 0,
        }
    }

    /// Adds a table loaded from a file and brings it up to date with every
    /// item written since the start (over the API or Kafka, or restored from
    /// the snapshot), as the tables already served are. Returns its id.
    pub fn add_table(&mut self, mut table: ItemTable) -> usize {
        let mut written: Vec<u64> = self.dirty_items.iter().copied().collect();
        written.sort_unstable();
        for id in written {
            if let Some(it) = self.snapshot_item(id) {
                if it.embedding.len() == table.dim() {
                    table.restore(it.id, &it.embedding, it.version, !it.deleted);
                }
            }
        }
        match self.retired.pop_first() {
            Some(t) => {
                self.tables[t] = table;
                t
            }
            None => {
                self.tables.push(table);
                self.tables.len() - 1
            }
        }
    }

    /// Frees a table no model uses any more.
    pub fn retire_table(&mut self, t: usize) {
        let dim = self.tables[t].dim();
        self.tables[t] = ItemTable::new(dim, Vec::new(), Vec::new()).expect("an empty table");
        self.changed_rows.remove(&t);
        self.retired.insert(t);
    }

    fn live_tables(&self) -> impl Iterator<Item = &ItemTable> {
        self.tables
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.retired.contains(i))
            .map(|(_, t)| t)
    }

    pub fn knows_item(&self, id: u64) -> bool {
        self.tables.iter().any(|t| t.row_of(id).is_some())
    }

    fn write_item(&mut self, update: &Update) -> bool {
        let mut applied = false;
        for (ti, t) in self.tables.iter_mut().enumerate() {
            if self.retired.contains(&ti) {
                continue;
            }
            let change = match update {
                Update::ItemUpsert {
                    item_id,
                    embedding,
                    version,
                } if embedding.len() == t.dim() => t.upsert(*item_id, embedding, *version),
                Update::ItemDelete { item_id, version } => t.delete(*item_id, *version),
                _ => continue,
            };
            if let ItemChange::Applied { row } = change {
                self.changed_rows.entry(ti).or_default().push(row);
                applied = true;
            }
        }
        if applied {
            if let Update::ItemUpsert { item_id, .. } | Update::ItemDelete { item_id, .. } = update
            {
                self.dirty_items.insert(*item_id);
                self.touched_item(*item_id);
            }
        }
        applied
    }

    pub fn apply(&mut self, batch: &UpdateBatch) -> ApplyReport {
        let mut r = ApplyReport {
            stale: batch.superseded,
            ..Default::default()
        };
        for &(user, item) in &batch.events {
            self.users.append(user, item);
            self.touched_user(user);
            r.events += 1;
        }
        for u in &batch.items {
            if self.write_item(u) {
                r.items += 1;
            } else {
                r.stale += 1;
            }
        }
        for u in &batch.users {
            if let Update::UserFeatures {
                user_id,
                features,
                version,
            } = u
            {
                if self
                    .users
                    .set_features_versioned(*user_id, features.clone(), *version)
                {
                    self.touched_user(*user_id);
                    r.users += 1;
                } else {
                    r.stale += 1;
                }
            }
        }
        for (pos, &next) in &batch.positions {
            let e = self.applied.entry(pos.clone()).or_insert(next);
            *e = (*e).max(next);
        }
        self.changes += 1;
        r
    }

    pub fn write_item_request(&mut self, w: ItemWrite) -> Result<ItemSummary, ServeError> {
        let stored = self
            .tables
            .iter()
            .filter_map(|t| t.version_of(w.item_id))
            .max();
        let version = match w.version {
            Some(v) => v,
            None => stored.map_or(1, |v| v + 1),
        };
        let update = match w.embedding {
            Some(embedding) => {
                if !self.live_tables().any(|t| t.dim() == embedding.len()) {
                    let dims: Vec<String> =
                        self.live_tables().map(|t| t.dim().to_string()).collect();
                    return Err(ServeError::Invalid(format!(
                        "embedding must have {} values, got {}",
                        dims.join(" or "),
                        embedding.len()
                    )));
                }
                Update::ItemUpsert {
                    item_id: w.item_id,
                    embedding,
                    version,
                }
            }
            None => {
                if stored.is_none() {
                    return Err(ServeError::NotFound(format!(
                        "unknown item id {}",
                        w.item_id
                    )));
                }
                Update::ItemDelete {
                    item_id: w.item_id,
                    version,
                }
            }
        };
        let deleted = matches!(update, Update::ItemDelete { .. });
        let applied = self.write_item(&update);
        self.changes += 1;
        Ok(ItemSummary {
            item_id: w.item_id,
            version,
            deleted,
            applied,
        })
    }

    /// Validates and applies a user change; `feature_dims` are the served models'.
    pub fn upsert_user(
        &mut self,
        update: UserUpdate,
        feature_dims: &[usize],
    ) -> Result<UserSummary, ServeError> {
        if let Some(history) = &update.history {
            let cap = self.users.history_cap();
            if history.len() > cap {
                return Err(ServeError::Invalid(format!(
                    "history must have <= {cap} item ids (--history-max, at least every model's history_len), got {}",
                    history.len()
                )));
            }
            if let Some(unknown) = history.iter().find(|&&id| !self.knows_item(id)) {
                return Err(ServeError::Invalid(format!(
                    "unknown item id {unknown} in history"
                )));
            }
        }
        if let Some(features) = &update.features {
            if !feature_dims.contains(&features.len()) {
                let expected = feature_dims.first().copied().unwrap_or(0);
                return Err(ServeError::Invalid(format!(
                    "features must have {expected} values (user_feature_dim), got {}",
                    features.len()
                )));
            }
        }
        if update.history.is_some() || update.features.is_some() {
            self.changes += 1;
            self.touched_user(update.user_id);
        }
        if let Some(history) = &update.history {
            self.users.set_history(update.user_id, history);
        }
        if let Some(features) = update.features {
            self.users.set_features(update.user_id, features);
        }
        Ok(self.user_summary(update.user_id))
    }

    /// A user's stored history and features (empty for an unknown user).
    pub fn user_summary(&self, user_id: u64) -> UserSummary {
        match self.users.get(user_id) {
            Some(u) => UserSummary {
                user_id,
                history: u.history.iter().copied().collect(),
                features: u.features.clone(),
            },
            None => UserSummary {
                user_id,
                history: Vec::new(),
                features: None,
            },
        }
    }

    /// The whole feature state as a snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::new();
        s.offsets = self.snapshot_offsets();
        s.users = self
            .users
            .iter()
            .map(|(&id, u)| snapshot_user(id, u))
            .collect();
        s.users.sort_by_key(|u| u.id);
        let mut items: Vec<u64> = self.dirty_items.iter().copied().collect();
        items.sort_unstable();
        s.items = items
            .into_iter()
            .filter_map(|id| self.snapshot_item(id))
            .collect();
        s
    }

    /// What a snapshot needs that changed since the last capture (all of it
    /// when `full`), for a `SnapshotBase` to fold in. Users are shared, not
    /// copied (the store copies a shared user on its next change), so this
    /// costs the executor a pointer per changed user and a copy per changed
    /// item, where `snapshot` copies the whole state.
    pub fn capture(&mut self, full: bool) -> SnapshotDelta {
        self.tracking = true;
        let users_since = std::mem::take(&mut self.users_since);
        let items_since = std::mem::take(&mut self.items_since);
        let mut removed_users = Vec::new();
        let (users, items) = if full {
            let users = self.users.iter_shared().collect();
            let items = self
                .dirty_items
                .iter()
                .filter_map(|&id| self.snapshot_item(id))
                .collect();
            (users, items)
        } else {
            let mut users = Vec::with_capacity(users_since.len());
            for id in users_since {
                match self.users.shared(id) {
                    Some(u) => users.push((id, u)),
                    None => removed_users.push(id),
                }
            }
            let items = items_since
                .into_iter()
                .filter_map(|id| self.snapshot_item(id))
                .collect();
            (users, items)
        };
        SnapshotDelta {
            changes: self.changes,
            full,
            offsets: self.snapshot_offsets(),
            users,
            removed_users,
            items,
            wal_next: 0,
        }
    }

    /// Evicts the least recently updated users beyond `max_users`.
    pub fn evict(&mut self) {
        if self.max_users == 0 || self.users.len() <= self.max_users {
            return;
        }
        let gone = self.users.evict_over(self.max_users);
        self.evicted += gone.len() as u64;
        for id in gone {
            self.touched_user(id);
        }
        self.changes += 1;
    }

    fn touched_user(&mut self, id: u64) {
        if self.tracking {
            self.users_since.insert(id);
        }
    }

    fn touched_item(&mut self, id: u64) {
        if self.tracking {
            self.items_since.insert(id);
        }
    }

    fn snapshot_offsets(&self) -> Vec<SnapshotOffset> {
        self.applied
            .iter()
            .map(|((topic, partition), &next)| SnapshotOffset {
                topic: topic.clone(),
                partition: *partition,
                next_offset: next,
            })
            .collect()
    }

    fn snapshot_item(&self, id: u64) -> Option<SnapshotItem> {
        let t = self.tables.iter().find(|t| t.row_of(id).is_some())?;
        let row = t.row_of(id)?;
        Some(SnapshotItem {
            id,
            version: t.version_of(id).unwrap_or(0),
            deleted: !t.is_live(row),
            embedding: t.embedding(row).to_vec(),
        })
    }

    /// Rows written since the last call, per table, for the backend's mirror.
    pub fn take_changed_rows(&mut self) -> BTreeMap<usize, Vec<u32>> {
        let mut m = std::mem::take(&mut self.changed_rows);
        m.values_mut().for_each(|rows| {
            rows.sort_unstable();
            rows.dedup();
        });
        m
    }

    /// Loads a snapshot into the state (at start, before any capture).
    pub fn restore(&mut self, s: &Snapshot) {
        for u in &s.users {
            self.users.restore(
                u.id,
                UserState {
                    history: u.history.iter().copied().collect(),
                    features: u.features.clone(),
                    features_version: u.features_version,
                },
            );
        }
        for it in &s.items {
            for (_, t) in self
                .tables
                .iter_mut()
                .enumerate()
                .filter(|(i, t)| !self.retired.contains(i) && t.dim() == it.embedding.len())
            {
                t.restore(it.id, &it.embedding, it.version, !it.deleted);
            }
            self.dirty_items.insert(it.id);
        }
        for o in &s.offsets {
            self.applied
                .insert((o.topic.clone(), o.partition), o.next_offset);
        }
    }
}

fn snapshot_user(id: u64, u: &UserState) -> SnapshotUser {
    SnapshotUser {
        id,
        history: u.history.iter().copied().collect(),
        features: u.features.clone(),
        features_version: u.features_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo::Rng;

    /// Captures folded into a `SnapshotBase` at any points of a random
    /// stream of changes (Kafka batches, user and item writes) always add up
    /// to the full snapshot of the state at that point.
    #[test]
    fn captured_changes_add_up_to_the_full_snapshot() {
        let dim = 4;
        let ids: Vec<u64> = (1..=50).collect();
        let emb: Vec<f32> = (0..50 * dim).map(|i| i as f32 * 0.01).collect();
        let mut state = State::new(5);
        state.tables.push(ItemTable::new(dim, ids, emb).unwrap());
        let mut base = crate::features::snapshot::SnapshotBase::default();
        let mut rng = Rng::new(7);
        let mut offset = 0i64;
        let mut deltas = 0;
        // Users and items named by a change since the last capture.
        let mut touched_users = std::collections::HashSet::new();
        let mut touched_items = std::collections::HashSet::new();
        for step in 0..400 {
            match rng.below(4) {
                0 => {
                    let mut b = UpdateBatch::default();
                    for _ in 0..rng.below(6) {
                        b.events.push((rng.below(30), 1 + rng.below(60)));
                    }
                    for _ in 0..rng.below(3) {
                        let item_id = 1 + rng.below(70);
                        let version = rng.below(8);
                        b.items.push(if rng.below(4) == 0 {
                            Update::ItemDelete { item_id, version }
                        } else {
                            Update::ItemUpsert {
                                item_id,
                                embedding: vec![step as f32; dim],
                                version,
                            }
                        });
                    }
                    if rng.below(2) == 0 {
                        b.users.push(Update::UserFeatures {
                            user_id: rng.below(30),
                            features: vec![step as f32; 2],
                            version: rng.below(8),
                        });
                    }
                    offset += 1 + rng.below(5) as i64;
                    b.positions.insert(("events".into(), step % 2), offset);
                    touched_users.extend(b.events.iter().map(|&(u, _)| u));
                    for u in b.items.iter().chain(&b.users) {
                        match u {
                            Update::ItemUpsert { item_id, .. }
                            | Update::ItemDelete { item_id, .. } => {
                                touched_items.insert(*item_id);
                            }
                            Update::UserFeatures { user_id, .. } => {
                                touched_users.insert(*user_id);
                            }
                            Update::Event { .. } => {}
                        }
                    }
                    state.apply(&b);
                }
                1 => {
                    let update = UserUpdate {
                        user_id: rng.below(30),
                        history: (rng.below(2) == 0).then(|| vec![1 + rng.below(50); 3]),
                        features: (rng.below(2) == 0).then(|| vec![0.5; 2]),
                    };
                    touched_users.insert(update.user_id);
                    state.upsert_user(update, &[2]).unwrap();
                }
                2 => {
                    let w = ItemWrite {
                        item_id: 1 + rng.below(50),
                        embedding: Some(vec![-(step as f32); dim]),
                        version: None,
                    };
                    touched_items.insert(w.item_id);
                    state.write_item_request(w).unwrap();
                }
                _ => {
                    let delta = state.capture(!base.is_complete());
                    assert_eq!(delta.changes, state.changes);
                    if deltas > 0 {
                        assert!(!delta.full);
                        // Only what changed travels.
                        for (id, _) in &delta.users {
                            assert!(touched_users.contains(id), "user {id} did not change");
                        }
                        for it in &delta.items {
                            assert!(
                                touched_items.contains(&it.id),
                                "item {} did not change",
                                it.id
                            );
                        }
                    }
                    touched_users.clear();
                    touched_items.clear();
                    deltas += 1;
                    base.merge(delta);
                    let mut got = base.to_snapshot();
                    let mut want = state.snapshot();
                    got.created_ms = 0;
                    want.created_ms = 0;
                    assert_eq!(got, want, "after step {step}");
                }
            }
        }
        assert!(deltas > 50, "{deltas} captures");
        // Nothing changed since the last capture: an empty delta.
        state.capture(false);
        let idle = state.capture(false);
        assert!(idle.users.is_empty() && idle.items.is_empty());
    }
}
