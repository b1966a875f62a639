//! The user store: a bounded history ring (newest last), optional dense
//! features and optional categorical (sparse) features per user id.
//!
//! Each user's state sits behind an `Arc`, so a snapshot capture shares it
//! instead of copying it; the next change to a shared user copies that user
//! alone (copy on write).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserState {
    pub history: VecDeque<u64>,
    pub features: Option<Vec<f32>>,
    /// Categorical features (ids), read by models with `user_sparse_dim`.
    pub sparse: Option<Vec<i64>>,
    /// Version of the last features update from a versioned source.
    pub features_version: u64,
}

/// The feature widths of the resident versions: what a user write is
/// checked against (a length some resident version reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserDims {
    /// Each resident version's `user_feature_dim`, sorted, once each.
    pub features: Vec<usize>,
    /// Each resident version's `user_sparse_dim`, sorted, once each.
    pub sparse: Vec<usize>,
}

impl UserDims {
    /// From each resident version's (`user_feature_dim`, `user_sparse_dim`).
    pub fn of(versions: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let (mut features, mut sparse): (Vec<usize>, Vec<usize>) = versions.into_iter().unzip();
        for v in [&mut features, &mut sparse] {
            v.sort_unstable();
            v.dedup();
        }
        Self { features, sparse }
    }

    /// Categorical features of `len` ids are what a resident version reads;
    /// otherwise the message names the widths read and the length given.
    pub fn check_sparse(&self, len: usize) -> Result<(), String> {
        if self.sparse.contains(&len) {
            return Ok(());
        }
        let read: Vec<String> = self
            .sparse
            .iter()
            .filter(|&&d| d > 0)
            .map(usize::to_string)
            .collect();
        Err(if read.is_empty() {
            format!("no loaded model reads sparse features (user_sparse_dim = 0), got {len} values")
        } else {
            format!(
                "sparse must have {} values (user_sparse_dim), got {len}",
                read.join(" or ")
            )
        })
    }
}

/// The resident versions' `UserDims`, shared between threads: the executor
/// keeps it current as versions come and go, the Kafka consumer checks
/// user messages against it before they are batched.
#[derive(Debug, Clone, Default)]
pub struct SharedUserDims(Arc<std::sync::RwLock<UserDims>>);

impl SharedUserDims {
    pub fn set(&self, dims: UserDims) {
        *self.0.write().expect("user dims lock poisoned") = dims;
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, UserDims> {
        self.0.read().expect("user dims lock poisoned")
    }
}

#[derive(Debug)]
pub struct UserStore {
    users: HashMap<u64, Arc<UserState>>,
    history_cap: usize,
    /// When each user was last changed (a counter), and the users by it:
    /// the least recently updated come first for eviction.
    ticks: HashMap<u64, u64>,
    by_tick: std::collections::BTreeMap<u64, u64>,
    tick: u64,
    /// Estimated bytes held by the users' states.
    bytes: usize,
}

/// Estimated memory of one user: the map entries and the state's allocations.
pub fn user_bytes(u: &UserState) -> usize {
    const FIXED: usize = 160;
    FIXED
        + u.history.capacity() * 8
        + u.features.as_ref().map_or(0, |f| f.capacity() * 4)
        + u.sparse.as_ref().map_or(0, |s| s.capacity() * 8)
}

impl UserStore {
    /// `history_cap` is the longest `history_len` among the served models.
    pub fn new(history_cap: usize) -> Self {
        Self {
            users: HashMap::new(),
            history_cap: history_cap.max(1),
            ticks: HashMap::new(),
            by_tick: std::collections::BTreeMap::new(),
            tick: 0,
            bytes: 0,
        }
    }

    pub fn get(&self, user_id: u64) -> Option<&UserState> {
        self.users.get(&user_id).map(|u| &**u)
    }

    /// A number that changes whenever the user's state does (`None`: no
    /// state): what the executor's query cache keys a user's tower output by.
    pub fn changed_at(&self, user_id: u64) -> Option<u64> {
        self.ticks.get(&user_id).copied()
    }

    /// The user's state, shared: it stays as it is now while the store
    /// moves on.
    pub fn shared(&self, user_id: u64) -> Option<Arc<UserState>> {
        self.users.get(&user_id).cloned()
    }

    /// Runs `f` on the user's state (created if new), keeping the recency
    /// order and the bytes estimate.
    fn change<R>(&mut self, user_id: u64, f: impl FnOnce(&mut UserState) -> R) -> R {
        self.touch(user_id);
        let slot = self.users.entry(user_id).or_default();
        let before = user_bytes(slot);
        let u = Arc::make_mut(slot);
        let r = f(u);
        self.bytes = (self.bytes + user_bytes(u)).saturating_sub(before);
        r
    }

    fn touch(&mut self, user_id: u64) {
        self.tick += 1;
        if let Some(old) = self.ticks.insert(user_id, self.tick) {
            self.by_tick.remove(&old);
        } else {
            self.bytes += user_bytes(&UserState::default());
        }
        self.by_tick.insert(self.tick, user_id);
    }

    /// Removes the least recently updated users beyond `max`; returns them.
    pub fn evict_over(&mut self, max: usize) -> Vec<u64> {
        let mut gone = Vec::new();
        while self.users.len() > max {
            let Some((_, id)) = self.by_tick.pop_first() else {
                break;
            };
            self.ticks.remove(&id);
            if let Some(u) = self.users.remove(&id) {
                self.bytes = self.bytes.saturating_sub(user_bytes(&u));
            }
            gone.push(id);
        }
        gone
    }

    /// Estimated bytes held by every user's state.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Most item ids kept per history.
    pub fn history_cap(&self) -> usize {
        self.history_cap
    }

    /// Keeps at least `cap` ids per history from now on (a version with a
    /// longer window was loaded); histories grow as new events arrive.
    pub fn raise_history_cap(&mut self, cap: usize) {
        self.history_cap = self.history_cap.max(cap);
    }

    /// Replaces the history (oldest first); only the newest `history_cap` are kept.
    pub fn set_history(&mut self, user_id: u64, history: &[u64]) {
        let keep = &history[history.len().saturating_sub(self.history_cap)..];
        self.change(user_id, |u| {
            u.history.clear();
            u.history.extend(keep.iter().copied());
        });
    }

    /// Appends one engaged item, dropping the oldest beyond `history_cap`.
    pub fn append(&mut self, user_id: u64, item: u64) {
        let cap = self.history_cap;
        self.change(user_id, |u| {
            if u.history.len() == cap {
                u.history.pop_front();
            }
            u.history.push_back(item);
        });
    }

    pub fn set_features(&mut self, user_id: u64, features: Vec<f32>) {
        self.change(user_id, |u| u.features = Some(features));
    }

    pub fn set_sparse(&mut self, user_id: u64, sparse: Vec<i64>) {
        self.change(user_id, |u| u.sparse = Some(sparse));
    }

    /// Sets the features given (dense, categorical or both) if `version` is
    /// newer than the stored one; true if applied. One version covers both
    /// kinds, as one message of the users topic carries both.
    pub fn set_features_versioned(
        &mut self,
        user_id: u64,
        features: Option<Vec<f32>>,
        sparse: Option<Vec<i64>>,
        version: u64,
    ) -> bool {
        if self.get(user_id).is_some_and(|u| {
            (u.features.is_some() || u.sparse.is_some()) && u.features_version >= version
        }) {
            return false;
        }
        self.change(user_id, |u| {
            if features.is_some() {
                u.features = features;
            }
            if sparse.is_some() {
                u.sparse = sparse;
            }
            u.features_version = version;
        });
        true
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &UserState)> {
        self.users.iter().map(|(id, u)| (id, &**u))
    }

    /// Every user, shared (see `shared`).
    pub fn iter_shared(&self) -> impl Iterator<Item = (u64, Arc<UserState>)> + '_ {
        self.users.iter().map(|(&id, u)| (id, u.clone()))
    }

    /// Replaces a user's whole state (restoring a snapshot); a history longer
    /// than `history_cap` keeps its newest ids.
    pub fn restore(&mut self, user_id: u64, mut state: UserState) {
        let extra = state.history.len().saturating_sub(self.history_cap);
        state.history.drain(..extra);
        self.touch(user_id);
        self.bytes += user_bytes(&state) - user_bytes(&UserState::default());
        if let Some(old) = self.users.insert(user_id, Arc::new(state)) {
            self.bytes = self.bytes.saturating_sub(user_bytes(&old));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest() {
        let mut s = UserStore::new(3);
        s.set_history(1, &[1, 2, 3, 4, 5]);
        assert_eq!(s.get(1).unwrap().history, VecDeque::from(vec![3, 4, 5]));
        s.append(1, 6);
        s.append(1, 6);
        assert_eq!(s.get(1).unwrap().history, VecDeque::from(vec![5, 6, 6]));
        s.set_features(2, vec![0.5]);
        assert!(s.get(2).unwrap().history.is_empty());
        assert_eq!(s.len(), 2);
        assert!(s.set_features_versioned(3, Some(vec![1.0]), None, 5));
        assert!(!s.set_features_versioned(3, Some(vec![2.0]), None, 5));
        assert!(s.set_features_versioned(3, Some(vec![3.0]), None, 6));
        assert_eq!(s.get(3).unwrap().features, Some(vec![3.0]));
    }

    /// A versioned update sets the kinds of features it carries and keeps
    /// the other; one version covers both kinds.
    #[test]
    fn versioned_updates_set_the_features_they_carry() {
        let mut s = UserStore::new(3);
        assert!(s.set_features_versioned(1, None, Some(vec![4, 0, 2]), 2));
        assert!(!s.set_features_versioned(1, Some(vec![1.0]), None, 2));
        assert!(s.set_features_versioned(1, Some(vec![1.0]), None, 3));
        let u = s.get(1).unwrap();
        assert_eq!(
            (u.features.clone(), u.sparse.clone(), u.features_version),
            (Some(vec![1.0]), Some(vec![4, 0, 2]), 3)
        );
        s.set_sparse(1, vec![1, 1, 1]);
        assert_eq!(s.get(1).unwrap().sparse, Some(vec![1, 1, 1]));
        assert_eq!(s.get(1).unwrap().features, Some(vec![1.0]));
    }

    /// A snapshot written under a larger cap restores to the newest ids.
    #[test]
    fn restore_cuts_histories_to_the_cap() {
        let mut s = UserStore::new(3);
        s.restore(
            7,
            UserState {
                history: (1..=10).collect(),
                features: Some(vec![1.0]),
                sparse: None,
                features_version: 4,
            },
        );
        let u = s.get(7).unwrap();
        assert_eq!(u.history, VecDeque::from(vec![8, 9, 10]));
        assert_eq!(
            (u.features.clone(), u.features_version),
            (Some(vec![1.0]), 4)
        );
        s.restore(8, UserState::default());
        assert!(s.get(8).unwrap().history.is_empty());
    }
}
