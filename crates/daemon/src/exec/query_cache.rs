//! The per-user query cache. A retrieval model's query vector depends on the
//! user's state (history, dense and categorical features), the item rows that
//! history reads, and the version: nothing else. So a user who asks again
//! before any of these changed is answered from the vector kept from the
//! last batch, and the tower runs only for the other queries of a batch;
//! the scan always reads the live table.
//!
//! A kept vector is checked, not trusted: it records the user's change
//! counter ([`crate::features::users::UserStore::changed_at`]) and the
//! table's write count when it was computed; it is used only while the user
//! has not changed and no row of the user's history window was written
//! since ([`ItemTable::written_at`]). A version's vectors go with it.
//! Memory is bounded by `--query-cache-bytes`: the vectors used least
//! recently go first (a hit counts as a use).

use std::collections::{HashMap, VecDeque};

use crate::backend::{Backend, BackendError, ModelId, Output, Query};
use crate::model::ItemTable;

/// Bytes one kept vector costs besides its values: its map slot at the
/// map's load factor, the allocation's header, and eviction records.
const ENTRY_OVERHEAD: usize = 160;

/// Who a query is for and the state it was asked in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub user: u64,
    /// The user's change counter when the query was asked.
    pub changed_at: u64,
}

struct Entry {
    changed_at: u64,
    /// The table's write count when the vector was computed.
    writes: u64,
    /// Position in the eviction order.
    seq: u64,
    q: Box<[f32]>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.q.len() * 4 + ENTRY_OVERHEAD
    }
}

pub struct QueryCache {
    budget: usize,
    bytes: usize,
    models: HashMap<ModelId, HashMap<u64, Entry>>,
    /// Kept vectors, least recently used first: (model, user, seq). A
    /// record whose entry was replaced, used or dropped since is skipped.
    order: VecDeque<(ModelId, u64, u64)>,
    seq: u64,
}

/// What one batch found in the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub hits: u64,
    pub misses: u64,
}

impl QueryCache {
    /// A cache holding at most about `budget` bytes (0: off).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            models: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Vectors held.
    pub fn len(&self) -> usize {
        self.models.values().map(HashMap::len).sum()
    }

    /// Model `model`'s kept vector for `key`, if the user has not changed
    /// since and no row of `history` (the rows the tower reads) was written
    /// after it was computed. A hit makes it the most recently used.
    pub fn get(
        &mut self,
        model: ModelId,
        key: Key,
        items: &ItemTable,
        history: &[u32],
    ) -> Option<&[f32]> {
        self.compact();
        let e = self.models.get_mut(&model)?.get_mut(&key.user)?;
        if e.changed_at != key.changed_at || history.iter().any(|&r| items.written_at(r) > e.writes)
        {
            return None;
        }
        self.seq += 1;
        e.seq = self.seq;
        self.order.push_back((model, key.user, self.seq));
        Some(&*e.q)
    }

    /// Keeps `q` as model `model`'s vector for `key`, computed with the
    /// table at write count `writes`; the least recently used vectors go
    /// beyond the budget.
    pub fn put(&mut self, model: ModelId, key: Key, writes: u64, q: &[f32]) {
        if !self.enabled() {
            return;
        }
        self.seq += 1;
        let entry = Entry {
            changed_at: key.changed_at,
            writes,
            seq: self.seq,
            q: q.into(),
        };
        self.bytes += entry.bytes();
        if let Some(old) = self
            .models
            .entry(model)
            .or_default()
            .insert(key.user, entry)
        {
            self.bytes -= old.bytes();
        }
        self.order.push_back((model, key.user, self.seq));
        while self.bytes > self.budget {
            let Some((m, user, seq)) = self.order.pop_front() else {
                break;
            };
            self.remove_if(m, user, seq);
        }
        self.compact();
    }

    /// Replaced and used vectors leave records behind: drops them before
    /// they outnumber the vectors.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.len() + 1024 {
            let models = &self.models;
            self.order.retain(|(m, user, seq)| {
                models
                    .get(m)
                    .and_then(|users| users.get(user))
                    .is_some_and(|e| e.seq == *seq)
            });
        }
    }

    fn remove_if(&mut self, model: ModelId, user: u64, seq: u64) {
        let Some(users) = self.models.get_mut(&model) else {
            return;
        };
        if users.get(&user).is_some_and(|e| e.seq == seq) {
            let e = users.remove(&user).expect("present");
            self.bytes -= e.bytes();
            if users.is_empty() {
                self.models.remove(&model);
            }
        }
    }

    /// Drops every vector of a version that is no longer resident.
    pub fn forget(&mut self, model: ModelId) {
        if let Some(users) = self.models.remove(&model) {
            self.bytes -= users.values().map(Entry::bytes).sum::<usize>();
            self.order.retain(|(m, _, _)| *m != model);
        }
    }
}

/// Answers a batch of retrieval model `id` (query vectors of `dim` values)
/// through the cache: kept vectors where they are still valid, the tower for
/// the other queries (whose vectors are then kept), and one scan for all.
/// `keys[i]` is `None` for a query that must not be cached (no user state,
/// or a request context the tower reads).
pub fn run(
    backend: &mut dyn Backend,
    cache: &mut QueryCache,
    id: ModelId,
    dim: usize,
    items: &ItemTable,
    queries: &[Query<'_>],
    keys: &[Option<Key>],
) -> Result<(Vec<Output>, Counts), BackendError> {
    debug_assert_eq!(keys.len(), queries.len());
    let mut q = vec![0f32; queries.len() * dim];
    let mut misses = Vec::new();
    let mut counts = Counts::default();
    for (i, (query, key)) in queries.iter().zip(keys).enumerate() {
        match key.and_then(|k| cache.get(id, k, items, query.history)) {
            Some(kept) => {
                q[i * dim..(i + 1) * dim].copy_from_slice(kept);
                counts.hits += 1;
            }
            None => misses.push(i),
        }
    }
    if !misses.is_empty() {
        let asked: Vec<Query<'_>> = misses.iter().map(|&i| queries[i].clone()).collect();
        let fresh = backend.embed(id, items, &asked)?;
        if fresh.len() != misses.len() * dim {
            return Err(BackendError::new(
                backend.device(),
                crate::backend::Reason::Other,
                format!(
                    "the tower gave {} values for {} queries of dim {dim}: this is a bug",
                    fresh.len(),
                    misses.len()
                ),
            ));
        }
        for (j, &i) in misses.iter().enumerate() {
            let v = &fresh[j * dim..(j + 1) * dim];
            q[i * dim..(i + 1) * dim].copy_from_slice(v);
            if let Some(k) = keys[i] {
                cache.put(id, k, items.writes(), v);
                counts.misses += 1;
            }
        }
    }
    Ok((backend.retrieve(id, items, queries, &q)?, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M0: ModelId = ModelId::new(0);
    const M1: ModelId = ModelId::new(1);

    fn table() -> ItemTable {
        ItemTable::new(2, vec![1, 2, 3], vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap()
    }

    fn key(user: u64, changed_at: u64) -> Key {
        Key { user, changed_at }
    }

    #[test]
    fn a_kept_vector_serves_until_the_user_or_a_history_row_changes() {
        let mut items = table();
        let mut c = QueryCache::new(1 << 20);
        c.put(M0, key(7, 1), items.writes(), &[0.5, 0.25]);
        assert_eq!(
            c.get(M0, key(7, 1), &items, &[0, 1]),
            Some(&[0.5, 0.25][..])
        );
        // Another version, another user, or the same user changed since.
        assert_eq!(c.get(M1, key(7, 1), &items, &[0, 1]), None);
        assert_eq!(c.get(M0, key(8, 1), &items, &[0, 1]), None);
        assert_eq!(c.get(M0, key(7, 2), &items, &[0, 1]), None);
        // A write to a row the history does not read changes nothing; one
        // to a row it reads does.
        items.upsert(3, &[2.0, 2.0], 1);
        assert!(c.get(M0, key(7, 1), &items, &[0, 1]).is_some());
        items.upsert(2, &[2.0, 2.0], 1);
        assert_eq!(c.get(M0, key(7, 1), &items, &[0, 1]), None);
        // Kept again after the write, it serves again.
        c.put(M0, key(7, 1), items.writes(), &[1.0, 1.0]);
        assert_eq!(c.get(M0, key(7, 1), &items, &[0, 1]), Some(&[1.0, 1.0][..]));
        // A history id that gains a row (a new item) is a write too.
        items.upsert(4, &[3.0, 3.0], 1);
        assert_eq!(c.get(M0, key(7, 1), &items, &[0, 1, 3]), None);
    }

    #[test]
    fn memory_stays_within_the_budget_oldest_first() {
        let items = table();
        let per = 2 * 4 + ENTRY_OVERHEAD;
        let mut c = QueryCache::new(3 * per);
        for user in 0..5 {
            c.put(M0, key(user, 1), 0, &[user as f32, 0.0]);
            assert!(c.bytes() <= 3 * per, "{} bytes", c.bytes());
        }
        assert_eq!(c.len(), 3);
        for user in 0..2 {
            assert_eq!(c.get(M0, key(user, 1), &items, &[]), None, "user {user}");
        }
        for user in 2..5 {
            assert!(
                c.get(M0, key(user, 1), &items, &[]).is_some(),
                "user {user}"
            );
        }
        // Replacing a user's vector does not grow the cache, and keeps the
        // records of replaced vectors bounded.
        for round in 0..5000 {
            c.put(M0, key(4, round + 2), 0, &[1.0, 2.0]);
        }
        assert_eq!((c.len(), c.bytes()), (3, 3 * per));
        assert!(c.order.len() <= 2 * c.len() + 1024 + 1, "{}", c.order.len());
        c.forget(M0);
        assert_eq!((c.len(), c.bytes(), c.order.len()), (0, 0, 0));
    }

    #[test]
    fn a_hit_keeps_a_vector_over_one_asked_for_less_recently() {
        let items = table();
        let per = 2 * 4 + ENTRY_OVERHEAD;
        let mut c = QueryCache::new(2 * per);
        c.put(M0, key(1, 1), 0, &[1.0, 0.0]);
        c.put(M0, key(2, 1), 0, &[2.0, 0.0]);
        // User 1 was kept first but asked for since: user 2 goes.
        assert!(c.get(M0, key(1, 1), &items, &[]).is_some());
        c.put(M0, key(3, 1), 0, &[3.0, 0.0]);
        assert_eq!(c.get(M0, key(2, 1), &items, &[]), None);
        assert_eq!(c.get(M0, key(1, 1), &items, &[]), Some(&[1.0, 0.0][..]));
        assert!(c.get(M0, key(3, 1), &items, &[]).is_some());
        // Hits alone keep the eviction records bounded.
        for _ in 0..5000 {
            assert!(c.get(M0, key(1, 1), &items, &[]).is_some());
        }
        assert!(c.order.len() <= 2 * c.len() + 1024 + 1, "{}", c.order.len());
        // A miss (the user changed) refreshes nothing.
        assert_eq!(c.get(M0, key(3, 2), &items, &[]), None);
        c.put(M0, key(4, 1), 0, &[4.0, 0.0]);
        assert_eq!(
            c.get(M0, key(3, 1), &items, &[]),
            None,
            "user 3 was the least recent"
        );
        assert!(c.get(M0, key(1, 1), &items, &[]).is_some());
    }

    #[test]
    fn a_cache_of_zero_bytes_keeps_nothing() {
        let items = table();
        let mut c = QueryCache::new(0);
        assert!(!c.enabled());
        c.put(M0, key(1, 1), 0, &[1.0, 2.0]);
        assert_eq!(c.get(M0, key(1, 1), &items, &[]), None);
        assert_eq!(c.bytes(), 0);
    }
}
