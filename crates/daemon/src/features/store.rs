//! The feature state the executor owns: item tables, the user store, the
//! source offsets already applied, and what changed since the catalogue was
//! loaded (for snapshots). Only the executor thread touches it.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::backend::TableId;
use crate::error::ServeError;
use crate::features::catalogues::Unresolved;
use crate::features::snapshot::{
    Snapshot, SnapshotDelta, SnapshotItem, SnapshotOffset, SnapshotUser,
};
use crate::features::updates::{Position, Update, UpdateBatch};
use crate::features::{UserDims, UserState, UserStore};
use crate::model::items::ItemChange;
use crate::model::ItemTable;
pub use rankd_client::types::{CatalogueInfo, ItemSummary, StoredItem};

/// A change to one user's state; a field given replaces that part. Also a
/// write-ahead log record, encoded by position: a field added later goes
/// last, with a default, so older records still read.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UserUpdate {
    pub user_id: u64,
    pub history: Option<Vec<u64>>,
    pub features: Option<Vec<f32>>,
    #[serde(default)]
    pub sparse: Option<Vec<i64>>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UserSummary {
    pub user_id: u64,
    pub history: Vec<u64>,
    pub features: Option<Vec<f32>>,
    pub sparse: Option<Vec<i64>>,
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
    /// The catalogue written; `None`: the only one loaded. A log record
    /// always names it (records of releases before named catalogues do
    /// not: they reach every table of their dimension, as they did then).
    #[serde(default)]
    pub catalogue: Option<String>,
    /// Attribute values to set. With no `embedding`, a write that carries
    /// attributes changes only them; one that carries none deletes the item.
    #[serde(default)]
    pub attributes: Option<BTreeMap<String, i64>>,
}

/// Item tables by id: the id is the table's place here, and the id the
/// backend knows it by.
#[derive(Default)]
pub struct Tables(Vec<ItemTable>);

impl Tables {
    fn push(&mut self, table: ItemTable) -> TableId {
        self.0.push(table);
        TableId::new(self.0.len() - 1)
    }
}

impl std::ops::Index<TableId> for Tables {
    type Output = ItemTable;

    fn index(&self, t: TableId) -> &ItemTable {
        &self.0[t.get()]
    }
}

impl std::ops::IndexMut<TableId> for Tables {
    fn index_mut(&mut self, t: TableId) -> &mut ItemTable {
        &mut self.0[t.get()]
    }
}

pub struct State {
    /// Item tables by id; a catalogue's table keeps its id while resident.
    pub tables: Tables,
    /// The catalogue name of each table by id ("" for a retired one).
    names: Vec<String>,
    by_name: HashMap<String, TableId>,
    /// Tables no model uses any more: emptied, skipped by writes, and reused
    /// by the next table added.
    retired: std::collections::BTreeSet<TableId>,
    pub users: UserStore,
    /// Next offset per topic-partition that the state includes.
    pub applied: BTreeMap<Position, i64>,
    /// Items written since their catalogue was loaded, per catalogue.
    written: HashMap<String, HashSet<u64>>,
    /// Written items of catalogues not resident now (unloaded, or restored
    /// from a snapshot before a model brings the catalogue back): kept for
    /// snapshots and put back when the catalogue loads again.
    parked: HashMap<String, HashMap<u64, SnapshotItem>>,
    /// Users and items changed since the last `capture`, tracked once the
    /// first capture was taken (never when snapshots are off).
    users_since: HashSet<u64>,
    items_since: HashSet<(String, u64)>,
    tracking: bool,
    /// Rows written since the backend last heard of them, per table.
    changed_rows: BTreeMap<TableId, Vec<u32>>,
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
            tables: Tables::default(),
            names: Vec::new(),
            by_name: HashMap::new(),
            retired: std::collections::BTreeSet::new(),
            users: UserStore::new(history_cap),
            applied: BTreeMap::new(),
            written: HashMap::new(),
            parked: HashMap::new(),
            users_since: HashSet::new(),
            items_since: HashSet::new(),
            tracking: false,
            changed_rows: BTreeMap::new(),
            changes: 0,
            max_users: 0,
            evicted: 0,
        }
    }

    /// Adds catalogue `name`'s table, loaded from its file, and puts back
    /// the items written to that catalogue before it was last unloaded (or
    /// restored from the snapshot for it). Returns the table's id.
    pub fn add_table(&mut self, name: &str, mut table: ItemTable) -> TableId {
        debug_assert!(
            !self.by_name.contains_key(name),
            "catalogue {name} added twice"
        );
        if let Some(parked) = self.parked.remove(name) {
            let mut items: Vec<SnapshotItem> = parked.into_values().collect();
            items.sort_unstable_by_key(|it| it.id);
            for it in items {
                if it.embedding.len() == table.dim() {
                    restore_into(&mut table, &it);
                } else {
                    tracing::warn!(
                        catalogue = name,
                        item = it.id,
                        dim = table.dim(),
                        "a written item of another dimension than the catalogue's file is dropped"
                    );
                    if let Some(w) = self.written.get_mut(name) {
                        w.remove(&it.id);
                    }
                }
            }
        }
        let t = match self.retired.pop_first() {
            Some(t) => {
                self.tables[t] = table;
                self.names[t.get()] = name.to_string();
                t
            }
            None => {
                self.names.push(name.to_string());
                self.tables.push(table)
            }
        };
        self.by_name.insert(name.to_string(), t);
        t
    }

    /// Frees a table no model uses any more; the items written to its
    /// catalogue are kept aside.
    pub fn retire_table(&mut self, t: TableId) {
        let name = std::mem::take(&mut self.names[t.get()]);
        if let Some(ids) = self.written.get(&name) {
            let parked: HashMap<u64, SnapshotItem> = ids
                .iter()
                .filter_map(|&id| Some((id, table_item(&self.tables[t], &name, id)?)))
                .collect();
            self.parked.insert(name.clone(), parked);
        }
        self.by_name.remove(&name);
        let dim = self.tables[t].dim();
        self.tables[t] = ItemTable::new(dim, Vec::new(), Vec::new()).expect("an empty table");
        self.changed_rows.remove(&t);
        self.retired.insert(t);
    }

    /// The table of catalogue `name`, when resident.
    pub fn table_of(&self, name: &str) -> Option<TableId> {
        self.by_name.get(name).copied()
    }

    /// The catalogue name of table `t`.
    pub fn name_of(&self, t: TableId) -> &str {
        &self.names[t.get()]
    }

    /// Resident catalogues: (name, table id), by name.
    pub fn catalogues(&self) -> Vec<(&str, TableId)> {
        let mut v: Vec<(&str, TableId)> =
            self.by_name.iter().map(|(n, &t)| (n.as_str(), t)).collect();
        v.sort_unstable();
        v
    }

    /// The table a write names (or the only one).
    fn resolve(&self, named: Option<&str>) -> Result<TableId, ServeError> {
        let loaded = self.catalogues();
        let dims = loaded.iter().map(|&(n, t)| (n, self.tables[t].dim()));
        match crate::features::catalogues::resolve(named, dims) {
            Ok((name, _)) => Ok(self.by_name[name]),
            Err(Unresolved::Unknown(m)) => Err(ServeError::NotFound(m)),
            Err(Unresolved::Ambiguous(m)) => Err(ServeError::Invalid(m)),
        }
    }

    pub fn knows_item(&self, id: u64) -> bool {
        self.by_name
            .values()
            .any(|&t| self.tables[t].row_of(id).is_some())
    }

    /// Applies an item update to table `t`; true when it changed the row.
    fn write_item(&mut self, t: TableId, update: &Update) -> bool {
        let table = &mut self.tables[t];
        let (change, attributes) = match update {
            Update::ItemUpsert {
                item_id,
                embedding,
                version,
                attributes,
                ..
            } if embedding.len() == table.dim() => (
                table.upsert(*item_id, embedding, *version),
                Some(attributes),
            ),
            Update::ItemAttributes {
                item_id,
                version,
                attributes,
                ..
            } => (table.bump_version(*item_id, *version), Some(attributes)),
            Update::ItemDelete {
                item_id, version, ..
            } => (table.delete(*item_id, *version), None),
            _ => return false,
        };
        let ItemChange::Applied { row } = change else {
            return false;
        };
        if let Some(values) = attributes.filter(|v| !v.is_empty()) {
            // Names were checked against the catalogue when the write came
            // in; one gone since (a reloaded file without it) is skipped.
            table.write_attributes(row, values);
        }
        self.changed_rows.entry(t).or_default().push(row);
        if let Update::ItemUpsert { item_id, .. }
        | Update::ItemAttributes { item_id, .. }
        | Update::ItemDelete { item_id, .. } = update
        {
            let name = &self.names[t.get()];
            self.written
                .entry(name.clone())
                .or_default()
                .insert(*item_id);
            if self.tracking {
                self.items_since.insert((name.clone(), *item_id));
            }
        }
        true
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
            let catalogue = match u {
                Update::ItemUpsert { catalogue, .. }
                | Update::ItemAttributes { catalogue, .. }
                | Update::ItemDelete { catalogue, .. } => catalogue,
                _ => continue,
            };
            let applied = match self.table_of(catalogue) {
                Some(t) => self.write_item(t, u),
                None => {
                    tracing::warn!(catalogue = %catalogue, "an item update for a catalogue unloaded since it was read is dropped");
                    false
                }
            };
            if applied {
                r.items += 1;
            } else {
                r.stale += 1;
            }
        }
        for u in &batch.users {
            if let Update::UserFeatures {
                user_id,
                features,
                sparse,
                version,
            } = u
            {
                if self.users.set_features_versioned(
                    *user_id,
                    features.clone(),
                    sparse.clone(),
                    *version,
                ) {
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

    /// Applies an item write made over HTTP or the socket, in the catalogue
    /// it names (or the only one loaded).
    pub fn write_item_request(&mut self, w: ItemWrite) -> Result<ItemSummary, ServeError> {
        let t = self.resolve(w.catalogue.as_deref())?;
        self.write_item_at(t, w)
    }

    /// Replays a logged item write: a record of a release before named
    /// catalogues reaches every table of its dimension, as it did then.
    pub fn replay_item(&mut self, w: ItemWrite) -> Result<ItemSummary, ServeError> {
        if w.catalogue.is_some() || self.by_name.len() <= 1 {
            return self.write_item_request(w);
        }
        let tables: Vec<TableId> = self
            .catalogues()
            .into_iter()
            .map(|(_, t)| t)
            .filter(|&t| {
                w.embedding
                    .as_ref()
                    .is_none_or(|e| e.len() == self.tables[t].dim())
            })
            .collect();
        let mut last = Err(ServeError::NotFound(format!(
            "no catalogue holds item {} or has its dimension",
            w.item_id
        )));
        for t in tables {
            let r = self.write_item_at(t, w.clone());
            if r.is_ok() || last.is_err() {
                last = r;
            }
        }
        last
    }

    fn write_item_at(&mut self, t: TableId, w: ItemWrite) -> Result<ItemSummary, ServeError> {
        let catalogue = self.names[t.get()].clone();
        let table = &self.tables[t];
        let stored = table.version_of(w.item_id);
        let version = match w.version {
            Some(v) => v,
            None => stored.map_or(1, |v| v + 1),
        };
        let attributes = w.attributes.unwrap_or_default();
        if let Err(m) = table.attributes().resolve_values(&attributes, &catalogue) {
            return Err(ServeError::Invalid(m));
        }
        let update = match (w.embedding, attributes.is_empty()) {
            (Some(embedding), _) => {
                if embedding.len() != table.dim() {
                    return Err(ServeError::Invalid(format!(
                        "embedding must have {} values (the dim of catalogue '{catalogue}'), got {}",
                        table.dim(),
                        embedding.len()
                    )));
                }
                Update::ItemUpsert {
                    catalogue: catalogue.clone(),
                    item_id: w.item_id,
                    embedding,
                    version,
                    attributes,
                }
            }
            (None, no_attributes) => {
                if stored.is_none() {
                    return Err(ServeError::NotFound(format!(
                        "unknown item id {} in catalogue '{catalogue}'{}",
                        w.item_id,
                        if no_attributes {
                            ""
                        } else {
                            " (a new item needs an `embedding`)"
                        }
                    )));
                }
                if no_attributes {
                    Update::ItemDelete {
                        catalogue: catalogue.clone(),
                        item_id: w.item_id,
                        version,
                    }
                } else {
                    Update::ItemAttributes {
                        catalogue: catalogue.clone(),
                        item_id: w.item_id,
                        version,
                        attributes,
                    }
                }
            }
        };
        let deleted = matches!(update, Update::ItemDelete { .. });
        let applied = self.write_item(t, &update);
        self.changes += 1;
        Ok(ItemSummary {
            item_id: w.item_id,
            version,
            deleted,
            applied,
            catalogue: Some(catalogue),
        })
    }

    /// An item of a catalogue, as stored.
    pub fn item(&self, catalogue: &str, item_id: u64) -> Result<StoredItem, ServeError> {
        let t = self.resolve(Some(catalogue))?;
        let it = table_item(&self.tables[t], catalogue, item_id).ok_or_else(|| {
            ServeError::NotFound(format!(
                "unknown item id {item_id} in catalogue '{catalogue}'"
            ))
        })?;
        Ok(StoredItem {
            attributes: it.attributes.unwrap_or_default(),
            catalogue: catalogue.to_string(),
            item_id,
            version: it.version,
            deleted: it.deleted,
            embedding: it.embedding,
        })
    }

    /// Validates and applies a user change against the widths the resident
    /// versions read.
    pub fn upsert_user(
        &mut self,
        update: UserUpdate,
        dims: &UserDims,
    ) -> Result<UserSummary, ServeError> {
        let feature_dims = &dims.features;
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
        if let Some(sparse) = &update.sparse {
            dims.check_sparse(sparse.len())
                .map_err(ServeError::Invalid)?;
        }
        if update.history.is_some() || update.features.is_some() || update.sparse.is_some() {
            self.changes += 1;
            self.touched_user(update.user_id);
        }
        if let Some(history) = &update.history {
            self.users.set_history(update.user_id, history);
        }
        if let Some(features) = update.features {
            self.users.set_features(update.user_id, features);
        }
        if let Some(sparse) = update.sparse {
            self.users.set_sparse(update.user_id, sparse);
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
                sparse: u.sparse.clone(),
            },
            None => UserSummary {
                user_id,
                history: Vec::new(),
                features: None,
                sparse: None,
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
        s.items = self.written_items();
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
            (users, self.written_items())
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
                .filter_map(|(catalogue, id)| self.snapshot_item(&catalogue, id))
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

    /// A written item of catalogue `catalogue`, resident or parked.
    fn snapshot_item(&self, catalogue: &str, id: u64) -> Option<SnapshotItem> {
        match self.by_name.get(catalogue) {
            Some(&t) => table_item(&self.tables[t], catalogue, id),
            None => self.parked.get(catalogue)?.get(&id).cloned(),
        }
    }

    /// Every item written since its catalogue was loaded, by catalogue and id.
    fn written_items(&self) -> Vec<SnapshotItem> {
        let mut items: Vec<SnapshotItem> = self
            .written
            .iter()
            .flat_map(|(c, ids)| ids.iter().filter_map(|&id| self.snapshot_item(c, id)))
            .collect();
        items.sort_unstable_by(|a, b| (&a.catalogue, a.id).cmp(&(&b.catalogue, b.id)));
        items
    }

    /// Rows written since the last call, per table, for the backend's mirror.
    pub fn take_changed_rows(&mut self) -> BTreeMap<TableId, Vec<u32>> {
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
                    sparse: u.sparse.clone(),
                    features_version: u.features_version,
                },
            );
        }
        for it in &s.items {
            match &it.catalogue {
                Some(name) => {
                    if let Some(&t) = self.by_name.get(name) {
                        if it.embedding.len() == self.tables[t].dim() {
                            restore_into(&mut self.tables[t], it);
                        }
                    } else {
                        self.parked
                            .entry(name.clone())
                            .or_default()
                            .insert(it.id, it.clone());
                    }
                    self.written.entry(name.clone()).or_default().insert(it.id);
                }
                // Written before catalogues had names, when a write reached
                // every table of its dimension: restored the same way.
                None => {
                    let tables: Vec<TableId> = self
                        .by_name
                        .values()
                        .copied()
                        .filter(|&t| self.tables[t].dim() == it.embedding.len())
                        .collect();
                    if tables.is_empty() {
                        tracing::warn!(
                            item = it.id,
                            dim = it.embedding.len(),
                            "a snapshot item of no resident catalogue's dimension is dropped"
                        );
                    }
                    for t in tables {
                        restore_into(&mut self.tables[t], it);
                        let name = self.names[t.get()].clone();
                        self.written.entry(name).or_default().insert(it.id);
                    }
                }
            }
        }
        for o in &s.offsets {
            self.applied
                .insert((o.topic.clone(), o.partition), o.next_offset);
        }
    }
}

/// Sets an item of `table` as a snapshot recorded it, attributes included
/// (those the table has).
fn restore_into(table: &mut ItemTable, it: &SnapshotItem) {
    table.restore(it.id, &it.embedding, it.version, !it.deleted);
    if let (Some(values), Some(row)) = (&it.attributes, table.row_of(it.id)) {
        table.write_attributes(row, values);
    }
}

/// Item `id` of `table` as a snapshot records it.
fn table_item(table: &ItemTable, catalogue: &str, id: u64) -> Option<SnapshotItem> {
    let row = table.row_of(id)?;
    Some(SnapshotItem {
        catalogue: Some(catalogue.to_string()),
        id,
        version: table.version_of(id).unwrap_or(0),
        deleted: !table.is_live(row),
        embedding: table.embedding(row).to_vec(),
        attributes: (!table.attributes().is_empty()).then(|| table.attributes().row(row as usize)),
    })
}

fn snapshot_user(id: u64, u: &UserState) -> SnapshotUser {
    SnapshotUser {
        id,
        history: u.history.iter().copied().collect(),
        features: u.features.clone(),
        features_version: u.features_version,
        sparse: u.sparse.clone(),
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
        state.add_table("c", ItemTable::new(dim, ids, emb).unwrap());
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
                            Update::ItemDelete {
                                catalogue: "c".into(),
                                item_id,
                                version,
                            }
                        } else {
                            Update::ItemUpsert {
                                catalogue: "c".into(),
                                item_id,
                                embedding: vec![step as f32; dim],
                                version,
                                attributes: Default::default(),
                            }
                        });
                    }
                    if rng.below(2) == 0 {
                        b.users.push(Update::UserFeatures {
                            user_id: rng.below(30),
                            features: (rng.below(3) > 0).then(|| vec![step as f32; 2]),
                            sparse: (rng.below(2) == 0).then(|| vec![step as i64; 3]),
                            version: rng.below(8),
                        });
                    }
                    offset += 1 + rng.below(5) as i64;
                    b.positions.insert(("events".into(), step % 2), offset);
                    touched_users.extend(b.events.iter().map(|&(u, _)| u));
                    for u in b.items.iter().chain(&b.users) {
                        match u {
                            Update::ItemUpsert { item_id, .. }
                            | Update::ItemAttributes { item_id, .. }
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
                        sparse: (rng.below(2) == 0).then(|| vec![rng.below(9) as i64; 3]),
                    };
                    touched_users.insert(update.user_id);
                    state.upsert_user(update, &UserDims::of([(2, 3)])).unwrap();
                }
                2 => {
                    let w = ItemWrite {
                        item_id: 1 + rng.below(50),
                        embedding: Some(vec![-(step as f32); dim]),
                        version: None,
                        catalogue: None,
                        attributes: None,
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

    /// Categorical features of a width a resident version reads are stored,
    /// shown and kept by a snapshot; any other width is refused naming
    /// both, and the refused write leaves the user as it was.
    #[test]
    fn sparse_features_are_checked_stored_and_restored() {
        let dims = UserDims::of([(2, 0), (0, 3)]);
        let mut state = two_catalogues();
        let write = |history: Option<Vec<u64>>, sparse: Option<Vec<i64>>| UserUpdate {
            user_id: 5,
            history,
            features: None,
            sparse,
        };
        let s = state
            .upsert_user(write(Some(vec![1]), Some(vec![4, 0, 9])), &dims)
            .unwrap();
        assert_eq!(s.sparse, Some(vec![4, 0, 9]));
        assert_eq!(s.history, [1]);
        let before = state.changes;
        match state.upsert_user(write(Some(vec![7]), Some(vec![1, 2])), &dims) {
            Err(ServeError::Invalid(m)) => {
                assert_eq!(m, "sparse must have 3 values (user_sparse_dim), got 2")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(state.changes, before);
        assert_eq!(state.user_summary(5).history, [1], "nothing of it stored");
        assert_eq!(state.user_summary(5).sparse, Some(vec![4, 0, 9]));
        match state.upsert_user(write(None, Some(vec![1, 2, 3])), &UserDims::of([(2, 0)])) {
            Err(ServeError::Invalid(m)) => assert_eq!(
                m,
                "no loaded model reads sparse features (user_sparse_dim = 0), got 3 values"
            ),
            other => panic!("{other:?}"),
        }
        // Features alone keep the sparse ones.
        state
            .upsert_user(
                UserUpdate {
                    user_id: 5,
                    features: Some(vec![1.0, 2.0]),
                    ..Default::default()
                },
                &dims,
            )
            .unwrap();
        let snap = state.snapshot();
        assert_eq!(snap.users[0].sparse, Some(vec![4, 0, 9]));
        let mut fresh = two_catalogues();
        fresh.restore(&snap);
        assert_eq!(fresh.user_summary(5), state.user_summary(5));
        assert_eq!(fresh.users.get(5), state.users.get(5));
    }

    fn write(catalogue: Option<&str>, item_id: u64, embedding: Option<Vec<f32>>) -> ItemWrite {
        ItemWrite {
            item_id,
            embedding,
            version: None,
            catalogue: catalogue.map(str::to_string),
            attributes: None,
        }
    }

    fn two_catalogues() -> State {
        let mut state = State::new(5);
        state.add_table(
            "a",
            ItemTable::new(2, vec![1, 7], vec![1.0, 0.0, 0.0, 1.0]).unwrap(),
        );
        state.add_table(
            "b",
            ItemTable::new(2, vec![7, 9], vec![5.0, 5.0, 6.0, 6.0]).unwrap(),
        );
        state
    }

    /// Two catalogues of one dimension: a write reaches the one it names
    /// alone, an unnamed write is refused naming both, and an unknown
    /// catalogue is a 404.
    #[test]
    fn a_write_reaches_its_catalogue_alone() {
        let mut state = two_catalogues();
        let s = state
            .write_item_request(write(Some("a"), 7, Some(vec![3.0, 3.0])))
            .unwrap();
        assert_eq!(s.catalogue.as_deref(), Some("a"));
        assert_eq!(state.item("a", 7).unwrap().embedding, [3.0, 3.0]);
        assert_eq!(state.item("b", 7).unwrap().embedding, [5.0, 5.0]);
        // A new id grows its own catalogue only.
        state
            .write_item_request(write(Some("b"), 40, Some(vec![1.0, 1.0])))
            .unwrap();
        assert!(matches!(state.item("a", 40), Err(ServeError::NotFound(_))));
        // Deleting in one leaves the other's row live.
        state.write_item_request(write(Some("b"), 7, None)).unwrap();
        assert!(state.item("b", 7).unwrap().deleted);
        assert!(!state.item("a", 7).unwrap().deleted);
        match state.write_item_request(write(None, 7, Some(vec![0.0, 0.0]))) {
            Err(ServeError::Invalid(m)) => assert!(m.contains("(a, b)"), "{m}"),
            other => panic!("{other:?}"),
        }
        match state.write_item_request(write(Some("c"), 7, Some(vec![0.0, 0.0]))) {
            Err(ServeError::NotFound(m)) => assert!(m.contains("unknown catalogue 'c'"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Kafka batches name their catalogue too.
        let mut b = UpdateBatch::default();
        b.items.push(Update::ItemUpsert {
            catalogue: "b".into(),
            item_id: 1,
            embedding: vec![8.0, 8.0],
            version: 1,
            attributes: Default::default(),
        });
        assert_eq!(state.apply(&b).items, 1);
        assert_eq!(state.item("a", 1).unwrap().embedding, [1.0, 0.0]);
        assert_eq!(state.item("b", 1).unwrap().embedding, [8.0, 8.0]);
        // The snapshot records each catalogue's items apart, and restores
        // them apart.
        let snap = state.snapshot();
        let keys: Vec<(Option<&str>, u64)> = snap
            .items
            .iter()
            .map(|i| (i.catalogue.as_deref(), i.id))
            .collect();
        assert_eq!(
            keys,
            [
                (Some("a"), 7),
                (Some("b"), 1),
                (Some("b"), 7),
                (Some("b"), 40)
            ]
        );
        let mut fresh = two_catalogues();
        fresh.restore(&snap);
        for (c, id) in [("a", 7), ("b", 1), ("b", 7), ("b", 40), ("a", 1)] {
            assert_eq!(
                fresh.item(c, id).unwrap(),
                state.item(c, id).unwrap(),
                "{c} {id}"
            );
        }
        assert!(fresh.item("a", 40).is_err());
    }

    /// A catalogue unloaded and loaded again gets back what was written to
    /// it; so does one a snapshot restored before the catalogue loaded.
    #[test]
    fn written_items_outlive_their_table() {
        let mut state = two_catalogues();
        state
            .write_item_request(write(Some("b"), 9, Some(vec![-1.0, -1.0])))
            .unwrap();
        let b = state.table_of("b").unwrap();
        state.retire_table(b);
        assert!(state.item("b", 9).is_err());
        let snap = state.snapshot();
        assert_eq!(snap.items.len(), 1, "a parked item stays in snapshots");
        state.add_table("b", ItemTable::new(2, vec![9], vec![6.0, 6.0]).unwrap());
        assert_eq!(state.item("b", 9).unwrap().embedding, [-1.0, -1.0]);

        let mut later = State::new(5);
        later.restore(&snap);
        assert_eq!(later.snapshot().items, snap.items);
        later.add_table("b", ItemTable::new(2, vec![9], vec![6.0, 6.0]).unwrap());
        assert_eq!(later.item("b", 9).unwrap().embedding, [-1.0, -1.0]);
    }

    /// Snapshot items and log records from before catalogues had names
    /// reach every table of their dimension, as writes did then.
    #[test]
    fn unnamed_items_of_an_older_release_restore_as_they_were_written() {
        let mut state = two_catalogues();
        state.add_table("wide", ItemTable::new(3, vec![7], vec![0.0; 3]).unwrap());
        let mut snap = Snapshot::new();
        snap.items.push(SnapshotItem {
            catalogue: None,
            id: 7,
            version: 4,
            deleted: false,
            embedding: vec![2.0, 2.0],
            attributes: None,
        });
        state.restore(&snap);
        assert_eq!(state.item("a", 7).unwrap().embedding, [2.0, 2.0]);
        assert_eq!(state.item("b", 7).unwrap().embedding, [2.0, 2.0]);
        assert_eq!(state.item("wide", 7).unwrap().embedding, [0.0; 3]);
        state
            .replay_item(write(None, 9, Some(vec![4.0, 4.0])))
            .unwrap();
        assert_eq!(state.item("a", 9).unwrap().embedding, [4.0, 4.0]);
        assert_eq!(state.item("b", 9).unwrap().embedding, [4.0, 4.0]);
        assert!(state.item("wide", 9).is_err());
    }
}
