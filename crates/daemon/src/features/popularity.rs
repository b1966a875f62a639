//! Live item popularity: a count per item of the events rankd ingests, with
//! exponential decay (a configurable half-life), and the list of the most
//! popular items that degraded and cold-start answers are drawn from.
//!
//! Events are counted by whoever delivers them (the Kafka consumer thread,
//! the executor for items added to a history over the API) under a short
//! lock; the list is rebuilt by the popularity thread (`refresh`), so the
//! executor only clones an `Arc` to answer. Counts survive restarts in
//! `popularity.json` beside the snapshots.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::shutdown::{CancellationToken, Wake};

/// Items kept in the published list: enough for the largest `k` after the
/// exclusions of a typical request; the catalogue fills the rest.
pub const LIST_LEN: usize = 4096;

/// A count that decayed below this is forgotten.
const FORGET_BELOW: f64 = 1e-3;

/// The file, in the snapshot folder, that carries the counts across restarts.
pub const FILE: &str = "popularity.json";

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Count {
    /// Decayed event count as of `at`.
    value: f64,
    /// Seconds since the Unix epoch.
    at: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    half_life_s: f64,
    items: Vec<(u64, f64, f64)>,
}

pub struct Popularity {
    half_life_s: f64,
    counts: Mutex<HashMap<u64, Count>>,
    /// Most popular first: (item id, decayed count at the last refresh).
    top: RwLock<Arc<Vec<(u64, f32)>>>,
    changed: AtomicBool,
}

/// Seconds since the Unix epoch, now.
pub fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Popularity {
    pub fn new(half_life: Duration) -> Self {
        Self {
            half_life_s: half_life.as_secs_f64().max(1e-3),
            counts: Mutex::new(HashMap::new()),
            top: RwLock::new(Arc::new(Vec::new())),
            changed: AtomicBool::new(false),
        }
    }

    fn decayed(&self, c: Count, now: f64) -> f64 {
        c.value * (-(now - c.at).max(0.0) / self.half_life_s).exp2()
    }

    /// Counts one event on each of `items` at `now` (seconds since the epoch).
    pub fn record(&self, items: impl IntoIterator<Item = u64>, now: f64) {
        let mut counts = self.counts.lock().expect("popularity lock poisoned");
        let mut any = false;
        for item in items {
            any = true;
            let value = match counts.get(&item) {
                Some(&c) => self.decayed(c, now) + 1.0,
                None => 1.0,
            };
            counts.insert(item, Count { value, at: now });
        }
        if any {
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Rebuilds the published list as of `now` when events arrived since the
    /// last rebuild (or when `force`), forgetting counts that decayed away.
    /// Returns whether it rebuilt.
    pub fn refresh(&self, now: f64, force: bool) -> bool {
        if !self.changed.swap(false, Ordering::AcqRel) && !force {
            return false;
        }
        let mut ranked: Vec<(u64, f64)> = {
            let mut counts = self.counts.lock().expect("popularity lock poisoned");
            counts.retain(|_, c| self.decayed(*c, now) >= FORGET_BELOW);
            counts
                .iter()
                .map(|(&id, &c)| (id, self.decayed(c, now)))
                .collect()
        };
        let order = |a: &(u64, f64), b: &(u64, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if ranked.len() > LIST_LEN {
            ranked.select_nth_unstable_by(LIST_LEN - 1, order);
            ranked.truncate(LIST_LEN);
        }
        ranked.sort_unstable_by(order);
        let list: Vec<(u64, f32)> = ranked.into_iter().map(|(id, v)| (id, v as f32)).collect();
        *self.top.write().expect("popularity lock poisoned") = Arc::new(list);
        true
    }

    /// The published list, most popular first.
    pub fn top(&self) -> Arc<Vec<(u64, f32)>> {
        self.top.read().expect("popularity lock poisoned").clone()
    }

    /// Items with a count.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().expect("popularity lock poisoned").len()
    }

    /// Writes the counts to `dir/popularity.json` (temporary file, fsync,
    /// rename).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let saved = Saved {
            half_life_s: self.half_life_s,
            items: self
                .counts
                .lock()
                .expect("popularity lock poisoned")
                .iter()
                .map(|(&id, c)| (id, c.value, c.at))
                .collect(),
        };
        let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(FILE))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads the counts saved in `dir`, if any, and publishes the list.
    /// Returns how many items were restored.
    pub fn load(&self, dir: &Path) -> anyhow::Result<usize> {
        let path = dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        let saved: Saved = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a popularity file: {e}", path.display()))?;
        let n = saved.items.len();
        {
            let mut counts = self.counts.lock().expect("popularity lock poisoned");
            for (id, value, at) in saved.items {
                if value.is_finite() && at.is_finite() && value > 0.0 {
                    counts.insert(id, Count { value, at });
                }
            }
        }
        self.refresh(now_s(), true);
        Ok(n)
    }
}

/// How often the published list is rebuilt when events arrived.
const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// The thread that rebuilds the list and saves the counts: every
/// `save_every` when a folder is given, and once more when stopped.
pub struct Refresher {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Refresher {
    /// Starts the thread; it rebuilds and saves one last time once `stop` is
    /// cancelled. Called within the runtime, which wakes the thread then.
    pub fn start(
        popularity: Arc<Popularity>,
        dir: Option<std::path::PathBuf>,
        save_every: Duration,
        stop: CancellationToken,
    ) -> Self {
        let wake = Wake::new(stop.clone());
        let thread = std::thread::Builder::new()
            .name("rankd-popularity".into())
            .spawn(move || {
                let save = |p: &Popularity| {
                    if let Some(dir) = &dir {
                        if let Err(e) = p.save(dir) {
                            tracing::error!(dir = %dir.display(), error = %e, "popularity counts not saved");
                        }
                    }
                };
                let mut saved_at = std::time::Instant::now();
                let mut unsaved = false;
                loop {
                    let done = wake.sleep(REFRESH_EVERY);
                    unsaved |= popularity.refresh(now_s(), false);
                    if done {
                        if unsaved {
                            save(&popularity);
                        }
                        return;
                    }
                    if unsaved && saved_at.elapsed() >= save_every {
                        save(&popularity);
                        saved_at = std::time::Instant::now();
                        unsaved = false;
                    }
                }
            })
            .expect("spawning the popularity thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Rebuilds and saves one last time, then stops; blocking.
    pub fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_decay_by_half_each_half_life_and_rank_the_list() {
        let p = Popularity::new(Duration::from_secs(100));
        let t = 1_000_000.0;
        p.record([1, 1, 1, 1], t);
        p.record([2, 2], t + 100.0);
        p.record([3], t + 200.0);
        assert!(p.refresh(t + 200.0, false));
        let top = p.top();
        let ids: Vec<u64> = top.iter().map(|e| e.0).collect();
        // Item 1: 4 events two half-lives ago = 1; item 2: 2 events one
        // half-life ago = 1; item 3: 1 event now = 1. Equal: smaller id first.
        assert_eq!(ids, vec![1, 2, 3]);
        for (_, v) in top.iter() {
            assert!((v - 1.0).abs() < 1e-5, "{top:?}");
        }
        // One more half-life with a fresh event on 3: 3 leads.
        p.record([3], t + 300.0);
        p.refresh(t + 300.0, false);
        let top = p.top();
        assert_eq!(top[0].0, 3);
        assert!((top[0].1 - 1.5).abs() < 1e-5, "{top:?}");
        assert!((top[1].1 - 0.5).abs() < 1e-5, "{top:?}");
        assert!(!p.refresh(t + 300.0, false), "nothing new: no rebuild");
    }

    #[test]
    fn counts_that_decayed_away_are_forgotten() {
        let p = Popularity::new(Duration::from_secs(1));
        p.record([7], 0.0);
        p.record([8], 100.0);
        p.refresh(100.0, true);
        assert_eq!(p.len(), 1);
        assert_eq!(p.top().iter().map(|e| e.0).collect::<Vec<_>>(), vec![8]);
    }

    #[test]
    fn the_list_keeps_the_most_popular_when_more_items_have_counts() {
        let p = Popularity::new(Duration::from_secs(3600));
        let t = now_s();
        for id in 0..(LIST_LEN as u64 + 100) {
            // Item id i has (i % 7) + 1 events.
            p.record(std::iter::repeat_n(id, (id % 7) as usize + 1), t);
        }
        p.refresh(t, true);
        let top = p.top();
        assert_eq!(top.len(), LIST_LEN);
        assert!(top
            .windows(2)
            .all(|w| w[0].1 > w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0)));
        assert!((top[0].1 - 7.0).abs() < 1e-3);
    }

    #[test]
    fn counts_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = Popularity::new(Duration::from_secs(3600));
        let t = now_s();
        p.record([5, 5, 9], t);
        p.save(dir.path()).unwrap();
        let q = Popularity::new(Duration::from_secs(3600));
        assert_eq!(q.load(dir.path()).unwrap(), 2);
        let ids: Vec<u64> = q.top().iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![5, 9]);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(q.load(empty.path()).unwrap(), 0);
        std::fs::write(empty.path().join(FILE), b"{not json").unwrap();
        assert!(q.load(empty.path()).is_err());
    }
}
