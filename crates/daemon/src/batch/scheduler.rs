//! The scheduler: every queue, and the rule for which batch runs next. It is
//! a plain struct with no threads, clocks or I/O; the executor feeds it
//! admitted requests and asks `poll(now)` what to do, so the whole policy is
//! tested here with explicit instants.
//!
//! - A queue's batch closes when it holds `max_rows` rows or its oldest
//!   request has waited `max_delay` (`queue::BatchPolicy`), and is taken only
//!   when the executor asks, so requests keep joining while the device works.
//! - Interactive work comes first: among queues ready for it, the one whose
//!   oldest interactive request has waited longest goes first, so under load
//!   every model is served in turn. A queue holding only bulk work runs when
//!   no interactive request waits anywhere; within a queue bulk rows fill the
//!   room interactive rows leave, and `bulk_min_share` keeps bulk from
//!   starving (`queue`).
//! - Requests that expired, whose caller left, or whose deadline falls before
//!   the batch is expected to finish (a running estimate of execution time
//!   per queue and batch size) are dropped as their batch is taken and handed
//!   back with the reason, so they are answered and counted in one place.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::admission::Permit;
use super::queue::{BatchPolicy, Queue};
use crate::backend::ModelId;

/// Which queue a request waits in. A struct, so that a version and a priority
/// class can join the model without changing how queues are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    /// The model version's id in the executor and its backend.
    pub model: ModelId,
}

/// A request's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Class {
    /// A caller waiting on the answer (the default).
    #[default]
    Interactive,
    /// Offline work that uses the capacity interactive callers leave.
    Bulk,
}

impl Class {
    /// The `priority` label of the request metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Bulk => "bulk",
        }
    }
}

/// What the scheduler needs to know about a queued request.
pub trait Request {
    fn key(&self) -> QueueKey;
    fn class(&self) -> Class;
    /// Rows it adds to a batch (a ranker request: one per candidate).
    fn rows(&self) -> usize;
    fn enqueued(&self) -> Instant;
    fn deadline(&self) -> Instant;
    /// The caller is no longer waiting for the answer.
    fn is_cancelled(&self) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The deadline passed before the request could run.
    Deadline,
    /// The caller left before its deadline.
    Cancelled,
    /// The deadline falls before the batch would be expected to finish.
    Predicted,
}

impl DropReason {
    /// The `reason` label of `rankd_requests_dropped_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Deadline => "deadline",
            DropReason::Cancelled => "cancelled",
            DropReason::Predicted => "predicted",
        }
    }
}

#[derive(Debug)]
pub struct Dropped<R> {
    pub request: R,
    pub reason: DropReason,
}

/// The batch to run now, and the requests dropped while taking it (the batch
/// may be empty when every request taken was dropped).
#[derive(Debug)]
pub struct Run<R> {
    pub key: QueueKey,
    pub batch: Vec<R>,
    pub dropped: Vec<Dropped<R>>,
}

#[derive(Debug)]
pub enum Poll<R> {
    Run(Run<R>),
    /// Nothing is ready: ask again at this instant (or when a request arrives).
    Sleep(Instant),
    /// Every queue is empty.
    Idle,
}

pub struct Scheduler<R> {
    queues: Vec<(QueueKey, Queue<R>, Estimates)>,
    index: HashMap<QueueKey, usize>,
    /// When the newest interactive request arrived, in any queue.
    last_interactive: Option<Instant>,
    /// Rows owed to queues that hold only bulk work while interactive work
    /// runs in others.
    starved_credit: f64,
}

/// Interactive traffic counts as present for this long after a request
/// arrives: meanwhile bulk work keeps its batches small (see
/// `Queue::take`), so an interactive request never waits long behind one.
const INTERACTIVE_LATELY: Duration = Duration::from_millis(100);

/// The most rows of credit a queue of bulk work alone can hold.
const STARVED_CREDIT_MAX: f64 = 1024.0;

/// Running estimates of a queue's batch execution time, one per power-of-two
/// bucket of rows.
#[derive(Debug, Default, Clone)]
struct Estimates {
    /// Seconds, by bucket (`bucket(rows)`); 0 where nothing was measured.
    mean: [f64; 24],
}

/// Weight of the newest measurement in the running mean.
const ALPHA: f64 = 0.2;

fn bucket(rows: usize) -> usize {
    (usize::BITS - rows.max(1).saturating_sub(1).leading_zeros()).min(23) as usize
}

impl Estimates {
    fn record(&mut self, rows: usize, elapsed: Duration) {
        let m = &mut self.mean[bucket(rows)];
        let x = elapsed.as_secs_f64();
        *m = if *m == 0.0 { x } else { *m + ALPHA * (x - *m) };
    }

    /// The expected time of a batch of `rows`: its bucket's mean, else the
    /// nearest smaller bucket measured (an underestimate, so nothing is
    /// dropped on a guess), else zero.
    fn expected(&self, rows: usize) -> Duration {
        self.mean[..=bucket(rows)]
            .iter()
            .rev()
            .find(|&&m| m > 0.0)
            .map_or(Duration::ZERO, |&m| Duration::from_secs_f64(m))
    }
}

impl<R: Request> Default for Scheduler<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Request> Scheduler<R> {
    pub fn new() -> Self {
        Self {
            queues: Vec::new(),
            index: HashMap::new(),
            last_interactive: None,
            starved_credit: 0.0,
        }
    }

    /// Adds a queue, or changes the policy of an empty one.
    pub fn add_queue(&mut self, key: QueueKey, policy: BatchPolicy) {
        match self.index.get(&key) {
            Some(&i) => {
                assert!(
                    self.queues[i].1.is_empty(),
                    "a queue's policy changes only while it is empty: this is a bug"
                );
                self.queues[i].1 = Queue::new(policy);
            }
            None => {
                self.index.insert(key, self.queues.len());
                self.queues
                    .push((key, Queue::new(policy), Estimates::default()));
            }
        }
    }

    /// Removes an empty queue (its model version was freed). A queue that
    /// still holds requests is kept and `false` returned.
    pub fn remove_queue(&mut self, key: QueueKey) -> bool {
        let Some(&i) = self.index.get(&key) else {
            return true;
        };
        if !self.queues[i].1.is_empty() {
            return false;
        }
        self.queues.swap_remove(i);
        self.index.remove(&key);
        if let Some((moved, _, _)) = self.queues.get(i) {
            self.index.insert(*moved, i);
        }
        true
    }

    /// Queues an admitted request. A request for a queue that does not exist
    /// is handed back.
    pub fn push(&mut self, request: R, permit: Permit) -> Result<(), R> {
        match self.index.get(&request.key()) {
            Some(&i) => {
                if request.class() == Class::Interactive {
                    self.last_interactive = Some(request.enqueued());
                }
                self.queues[i].1.push(request, permit);
                Ok(())
            }
            None => Err(request),
        }
    }

    /// Requests waiting in `key`'s queue.
    #[cfg(test)]
    pub fn waiting(&self, key: QueueKey) -> usize {
        self.index.get(&key).map_or(0, |&i| self.queues[i].1.len())
    }

    /// Records how long a batch of `rows` taken from `key` ran, for the
    /// deadline prediction.
    pub fn record(&mut self, key: QueueKey, rows: usize, elapsed: Duration) {
        if let Some(&i) = self.index.get(&key) {
            self.queues[i].2.record(rows, elapsed);
        }
    }

    /// The expected execution time of a batch of `rows` from `key`.
    #[cfg(test)]
    pub fn expected(&self, key: QueueKey, rows: usize) -> Duration {
        self.index
            .get(&key)
            .map_or(Duration::ZERO, |&i| self.queues[i].2.expected(rows))
    }

    /// What to do at `now`: run the queue ready for interactive work whose
    /// oldest interactive request has waited longest; when no interactive
    /// request waits anywhere, the same for bulk work; else sleep until the
    /// first batch closes. A queue of bulk work alone that is owed a row of
    /// its share goes before interactive work elsewhere.
    pub fn poll(&mut self, now: Instant) -> Poll<R> {
        let interactive = self.queues.iter().any(|(_, q, _)| q.has_interactive());
        let class = if interactive {
            Class::Interactive
        } else {
            Class::Bulk
        };
        // A queue holding only bulk work, while interactive work waits
        // elsewhere, is owed its share of what the others execute (the
        // share within one queue is kept by the queue itself).
        if interactive && self.starved_credit >= 1.0 {
            let starved = self
                .queues
                .iter()
                .enumerate()
                .filter(|(_, (_, q, _))| !q.has_interactive() && q.is_ready(Class::Bulk, now))
                .min_by_key(|(_, (_, q, _))| q.oldest(Class::Bulk))
                .map(|(i, _)| i);
            if let Some(i) = starved {
                return Poll::Run(self.take(i, now));
            }
        }
        let ready = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, (_, q, _))| q.is_ready(class, now))
            .min_by_key(|(_, (_, q, _))| q.oldest(class))
            .map(|(i, _)| i);
        match ready {
            Some(i) => Poll::Run(self.take(i, now)),
            None => match self
                .queues
                .iter()
                .filter_map(|(_, q, _)| q.closes_at(class))
                .min()
            {
                Some(at) => Poll::Sleep(at),
                None => Poll::Idle,
            },
        }
    }

    /// At stop: the next batch whether ready or not, oldest queue first, until
    /// every queue is empty (`None`).
    pub fn drain(&mut self, now: Instant) -> Option<Run<R>> {
        let i = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, (_, q, _))| !q.is_empty())
            .min_by_key(|(_, (_, q, _))| q.oldest(Class::Interactive).or(q.oldest(Class::Bulk)))
            .map(|(i, _)| i)?;
        Some(self.take(i, now))
    }

    fn take(&mut self, i: usize, now: Instant) -> Run<R> {
        let (key, queue, estimates) = &mut self.queues[i];
        let mut run = Run {
            key: *key,
            batch: Vec::new(),
            dropped: Vec::new(),
        };
        let interactive_lately = self
            .last_interactive
            .is_some_and(|t| now.saturating_duration_since(t) < INTERACTIVE_LATELY);
        let starving = !queue.has_interactive();
        queue.take(
            now,
            |rows| estimates.expected(rows),
            interactive_lately,
            &mut run.batch,
            &mut run.dropped,
        );
        // Credit for queues of bulk work alone: their share of the rows
        // other queues run while they wait, paid by the rows they run.
        let rows: usize = run.batch.iter().map(|r| r.rows()).sum();
        let share = self
            .queues
            .iter()
            .filter(|(_, q, _)| q.has_bulk() && !q.has_interactive())
            .map(|(_, q, _)| q.bulk_min_share())
            .fold(0.0, f64::max);
        self.starved_credit = if share == 0.0 {
            0.0
        } else if starving {
            (self.starved_credit - rows as f64).max(0.0)
        } else {
            (self.starved_credit + share * rows as f64).min(STARVED_CREDIT_MAX)
        };
        run
    }
}
