//! One queue's waiting requests, in two lanes (interactive and bulk), and its
//! closing rule: a batch is ready for interactive work when `max_rows` rows
//! wait or the oldest interactive request has waited `max_delay`; bulk work
//! closes a batch by the same rule on its own lane. Taking a batch fills it
//! with interactive rows first and bulk rows after, except for the rows bulk
//! is owed under `bulk_min_share`, and drops the requests that expired, whose
//! caller left, or that cannot finish before their deadline.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::admission::Permit;
use super::scheduler::{Class, DropReason, Dropped, Request};

/// When a queue's batch closes, and bulk's guaranteed share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    /// A batch closes when this many rows wait ...
    pub max_rows: usize,
    /// ... or when the oldest request has waited this long.
    pub max_delay: Duration,
    /// Under sustained interactive load, bulk still gets at least this
    /// fraction of the rows executed (0 to 1), when bulk work waits.
    pub bulk_min_share: f64,
}

struct Entry<R> {
    request: R,
    /// Held while the request waits; dropped when it leaves the queue.
    _permit: Permit,
}

#[derive(Default)]
struct Lane<R> {
    entries: VecDeque<Entry<R>>,
    rows: usize,
}

impl<R: Request> Lane<R> {
    fn oldest(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.request.enqueued())
    }

    /// Moves requests from the front into `batch` while they fit in `room`
    /// rows (one oversized request is taken when the batch is still empty
    /// and `room` is not zero), dropping on the way those that cannot be
    /// served. Returns the rows taken.
    fn take(
        &mut self,
        room: usize,
        gate: &Gate,
        batch: &mut Vec<R>,
        dropped: &mut Vec<Dropped<R>>,
    ) -> usize {
        let mut taken = 0;
        while let Some(front) = self.entries.front() {
            let r = front.request.rows();
            let reason = gate.reason(&front.request);
            if reason.is_none() && taken + r > room && !(batch.is_empty() && room > 0) {
                break;
            }
            let entry = self.entries.pop_front().expect("front exists");
            self.rows -= r;
            match reason {
                Some(reason) => dropped.push(Dropped {
                    request: entry.request,
                    reason,
                }),
                None => {
                    taken += r;
                    batch.push(entry.request);
                }
            }
        }
        taken
    }
}

/// What a request must satisfy to join the batch being taken.
struct Gate {
    now: Instant,
    /// Expected execution time of the batch being formed.
    expected: Duration,
}

impl Gate {
    /// A caller whose deadline passed while queued has usually given up
    /// already (its own timer answered): that is a deadline drop, not a
    /// cancellation. One whose deadline falls before the batch is expected
    /// to end is dropped before it costs device time.
    fn reason<R: Request>(&self, r: &R) -> Option<DropReason> {
        if r.deadline() <= self.now {
            Some(DropReason::Deadline)
        } else if r.is_cancelled() {
            Some(DropReason::Cancelled)
        } else if r.deadline() < self.now + self.expected {
            Some(DropReason::Predicted)
        } else {
            None
        }
    }
}

pub(super) struct Queue<R> {
    interactive: Lane<R>,
    bulk: Lane<R>,
    policy: BatchPolicy,
    /// Bulk rows owed by `bulk_min_share` and not yet executed.
    bulk_credit: f64,
}

impl<R: Request> Queue<R> {
    pub(super) fn new(policy: BatchPolicy) -> Self {
        assert!(
            policy.max_rows > 0,
            "max_batch_size is checked at load: this is a bug"
        );
        Self {
            interactive: Lane {
                entries: VecDeque::new(),
                rows: 0,
            },
            bulk: Lane {
                entries: VecDeque::new(),
                rows: 0,
            },
            policy,
            bulk_credit: 0.0,
        }
    }

    fn lane_mut(&mut self, class: Class) -> &mut Lane<R> {
        match class {
            Class::Interactive => &mut self.interactive,
            Class::Bulk => &mut self.bulk,
        }
    }

    pub(super) fn push(&mut self, request: R, permit: Permit) {
        let lane = self.lane_mut(request.class());
        lane.rows += request.rows();
        lane.entries.push_back(Entry {
            request,
            _permit: permit,
        });
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.interactive.entries.len() + self.bulk.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.interactive.entries.is_empty() && self.bulk.entries.is_empty()
    }

    pub(super) fn has_interactive(&self) -> bool {
        !self.interactive.entries.is_empty()
    }

    pub(super) fn has_bulk(&self) -> bool {
        !self.bulk.entries.is_empty()
    }

    pub(super) fn bulk_min_share(&self) -> f64 {
        self.policy.bulk_min_share
    }

    /// Rows waiting in both lanes.
    pub(super) fn rows(&self) -> usize {
        self.interactive.rows + self.bulk.rows
    }

    /// The oldest waiting request of `class`.
    pub(super) fn oldest(&self, class: Class) -> Option<Instant> {
        match class {
            Class::Interactive => self.interactive.oldest(),
            Class::Bulk => self.bulk.oldest(),
        }
    }

    /// When `class`'s oldest request's wait runs out.
    pub(super) fn closes_at(&self, class: Class) -> Option<Instant> {
        self.oldest(class).map(|t| t + self.policy.max_delay)
    }

    /// A batch can be taken for `class`: interactive work closes a batch
    /// with the bulk rows that fill it; bulk work closes one on its own.
    pub(super) fn is_ready(&self, class: Class, now: Instant) -> bool {
        let rows = match class {
            Class::Interactive => self.rows(),
            Class::Bulk => self.bulk.rows,
        };
        match self.closes_at(class) {
            None => false,
            Some(at) => rows >= self.policy.max_rows || at <= now,
        }
    }

    /// Takes a batch of at most `max_rows` rows (at least one request, so an
    /// oversized request still runs alone): first the bulk rows owed by the
    /// minimum share, then interactive rows, then bulk rows in the room left.
    /// `expected` is how long a batch of that many rows is expected to run.
    ///
    /// While interactive traffic is about (`interactive_lately`), bulk rows
    /// beyond those owed join no batch that holds interactive rows (they
    /// would make it longer), and a batch of bulk rows alone takes at most
    /// an eighth of `max_rows` (at least one), so an interactive request
    /// that arrives behind it waits little.
    pub(super) fn take(
        &mut self,
        now: Instant,
        expected: impl Fn(usize) -> Duration,
        interactive_lately: bool,
        batch: &mut Vec<R>,
        dropped: &mut Vec<Dropped<R>>,
    ) {
        let max = self.policy.max_rows;
        let bulk_cap = if interactive_lately {
            (max / 8).max(1)
        } else {
            max
        };
        // The batch holds up to `max` rows, or one oversized request alone.
        let first = self
            .interactive
            .entries
            .front()
            .or(self.bulk.entries.front())
            .map_or(1, |e| e.request.rows());
        let owed = if self.bulk.entries.is_empty() || self.interactive.entries.is_empty() {
            0
        } else {
            (self.bulk_credit.floor() as usize).min(max)
        };
        // The rows this batch will hold, for its expected time: with
        // interactive work kept short, its rows and the owed bulk rows only.
        let rows = if interactive_lately && !self.interactive.entries.is_empty() {
            self.interactive.rows + owed.min(self.bulk.rows)
        } else {
            self.rows()
        };
        let gate = Gate {
            now,
            expected: expected(rows.min(max).max(first).max(1)),
        };
        let mut bulk = self.bulk.take(owed, &gate, batch, dropped);
        let interactive = self
            .interactive
            .take(max.saturating_sub(bulk), &gate, batch, dropped);
        let room = if interactive > 0 && interactive_lately {
            0
        } else {
            max.saturating_sub(bulk + interactive)
                .min(bulk_cap.saturating_sub(bulk))
        };
        if room > 0 || batch.is_empty() {
            bulk += self.bulk.take(room, &gate, batch, dropped);
        }
        // Bulk is owed its share of what ran while it waited; nothing is owed
        // for the time it had no work queued.
        if self.bulk.entries.is_empty() {
            self.bulk_credit = 0.0;
        } else {
            let executed = (bulk + interactive) as f64;
            self.bulk_credit = (self.bulk_credit + self.policy.bulk_min_share * executed
                - bulk as f64)
                .clamp(0.0, max as f64);
        }
    }
}
