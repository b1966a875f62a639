//! The user store: a bounded history ring (newest last) and optional dense
//! features per user id.
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

    /// Sets features if `version` is newer than the stored one; true if applied.
    pub fn set_features_versioned(
        &mut self,
        user_id: u64,
        features: Vec<f32>,
        version: u64,
    ) -> bool {
        if self
            .get(user_id)
            .is_some_and(|u| u.features.is_some() && u.features_version >= version)
        {
            return false;
        }
        self.change(user_id, |u| {
            u.features = Some(features);
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
        assert!(s.set_features_versioned(3, vec![1.0], 5));
        assert!(!s.set_features_versioned(3, vec![2.0], 5));
        assert!(s.set_features_versioned(3, vec![3.0], 6));
        assert_eq!(s.get(3).unwrap().features, Some(vec![3.0]));
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
