//! Online evaluation: which model version's recommendations the user then
//! clicked. The executor remembers the newest lists it served to each user
//! (which model and version answered, the items in rank order, when) and,
//! when an event of that user names an item of such a list within the
//! window, reports a hit for that version at the item's rank.
//!
//! Memory is bounded: at most `max_users` users are remembered (the least
//! recently served forgotten first), [`LISTS_PER_USER`] lists each, and the
//! first [`MAX_RANK`] items of a list. A list counts one hit at most, and one
//! event hits one list at most (the newest that holds the item).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::ModelIndex;

/// Lists remembered per user, newest kept.
pub const LISTS_PER_USER: usize = 4;
/// Items remembered per list (clicks deeper than this are not counted).
pub const MAX_RANK: usize = 200;

struct Served {
    model: ModelIndex,
    version: u64,
    items: Box<[u64]>,
    at: Instant,
    hit: bool,
}

struct UserLists {
    /// When the user was last served, in the order of `order`.
    stamp: u64,
    lists: VecDeque<Served>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub model: ModelIndex,
    pub version: u64,
    /// 1-based.
    pub rank: usize,
}

pub struct OnlineEval {
    max_users: usize,
    window: Duration,
    users: HashMap<u64, UserLists>,
    /// (user, stamp) in serving order; an entry whose stamp is no longer the
    /// user's is stale and skipped.
    order: VecDeque<(u64, u64)>,
    next_stamp: u64,
}

impl OnlineEval {
    /// `max_users = 0` turns the evaluation off.
    pub fn new(max_users: usize, window: Duration) -> Self {
        Self {
            max_users,
            window,
            users: HashMap::new(),
            order: VecDeque::new(),
            next_stamp: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_users > 0
    }

    #[cfg(test)]
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Remembers a list served to `user` by (`model`, `version`).
    pub fn served(
        &mut self,
        user: u64,
        model: ModelIndex,
        version: u64,
        items: &[u64],
        now: Instant,
    ) {
        if !self.enabled() || items.is_empty() {
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let entry = self.users.entry(user).or_insert_with(|| UserLists {
            stamp,
            lists: VecDeque::with_capacity(1),
        });
        entry.stamp = stamp;
        if entry.lists.len() == LISTS_PER_USER {
            entry.lists.pop_front();
        }
        entry.lists.push_back(Served {
            model,
            version,
            items: items[..items.len().min(MAX_RANK)].into(),
            at: now,
            hit: false,
        });
        self.order.push_back((user, stamp));
        while self.users.len() > self.max_users {
            let Some((u, s)) = self.order.pop_front() else {
                break;
            };
            if self.users.get(&u).is_some_and(|e| e.stamp == s) {
                self.users.remove(&u);
            }
        }
        // Stale entries are skipped lazily; keep the queue from growing
        // beyond a small multiple of the users it describes.
        if self.order.len() > 2 * self.max_users.max(1024) {
            let users = &self.users;
            self.order
                .retain(|(u, s)| users.get(u).is_some_and(|e| e.stamp == *s));
        }
    }

    /// An event of `user` on `item`: the hit it makes, if any.
    pub fn clicked(&mut self, user: u64, item: u64, now: Instant) -> Option<Hit> {
        let entry = self.users.get_mut(&user)?;
        let window = self.window;
        for list in entry.lists.iter_mut().rev() {
            if list.hit || now.saturating_duration_since(list.at) > window {
                continue;
            }
            if let Some(pos) = list.items.iter().position(|&i| i == item) {
                list.hit = true;
                return Some(Hit {
                    model: list.model,
                    version: list.version,
                    rank: pos + 1,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: ModelIndex = ModelIndex::new(0);

    #[test]
    fn a_click_on_a_served_item_is_a_hit_for_the_version_that_served_it() {
        let t0 = Instant::now();
        let mut e = OnlineEval::new(10, Duration::from_secs(60));
        e.served(1, M, 2, &[10, 11, 12], t0);
        e.served(2, M, 1, &[10, 20], t0);
        assert_eq!(e.clicked(1, 99, t0), None, "not in the list");
        assert_eq!(
            e.clicked(1, 12, t0),
            Some(Hit {
                model: M,
                version: 2,
                rank: 3
            })
        );
        assert_eq!(e.clicked(1, 10, t0), None, "one hit per list");
        assert_eq!(e.clicked(2, 20, t0).map(|h| h.version), Some(1));
        assert_eq!(e.clicked(3, 10, t0), None, "never served");
    }

    #[test]
    fn clicks_after_the_window_do_not_count() {
        let t0 = Instant::now();
        let mut e = OnlineEval::new(10, Duration::from_secs(60));
        e.served(1, M, 1, &[5], t0);
        assert_eq!(e.clicked(1, 5, t0 + Duration::from_secs(61)), None);
        e.served(1, M, 1, &[5], t0 + Duration::from_secs(61));
        assert!(e.clicked(1, 5, t0 + Duration::from_secs(62)).is_some());
    }

    #[test]
    fn memory_is_bounded_by_users_and_lists() {
        let t0 = Instant::now();
        let mut e = OnlineEval::new(100, Duration::from_secs(60));
        for u in 0..1000u64 {
            e.served(u, M, 1, &[u], t0);
            e.served(u % 7, M, 1, &[u], t0);
        }
        assert_eq!(e.users(), 100);
        assert!(e.order.len() <= 2 * 1024 + 1);
        // The most recently served users are the ones kept.
        assert!(e.clicked(999, 999, t0).is_some());
        assert!(e.clicked(10, 10, t0).is_none());
        // A user keeps the newest LISTS_PER_USER lists.
        for i in 0..10u64 {
            e.served(5000, M, i, &[i], t0);
        }
        assert!(e.clicked(5000, 0, t0).is_none());
        assert_eq!(e.clicked(5000, 9, t0).map(|h| h.version), Some(9));
        assert_eq!(e.users.get(&5000).unwrap().lists.len(), LISTS_PER_USER);
    }

    #[test]
    fn off_remembers_nothing() {
        let t0 = Instant::now();
        let mut e = OnlineEval::new(0, Duration::from_secs(60));
        e.served(1, M, 1, &[5], t0);
        assert_eq!(e.clicked(1, 5, t0), None);
        assert_eq!(e.users(), 0);
    }
}
