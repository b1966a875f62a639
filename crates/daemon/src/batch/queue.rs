//! One queue's waiting requests and its closing rule: a batch is ready when
//! `max_rows` rows wait or the oldest request has waited `max_delay`; taking
//! it drops the requests that expired or whose caller left on the way.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::admission::Permit;
use super::scheduler::{DropReason, Dropped, Request};

/// When a queue's batch closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// A batch closes when this many rows wait ...
    pub max_rows: usize,
    /// ... or when the oldest request has waited this long.
    pub max_delay: Duration,
}

struct Entry<R> {
    request: R,
    /// Held while the request waits; dropped when it leaves the queue.
    _permit: Permit,
}

pub(super) struct Queue<R> {
    entries: VecDeque<Entry<R>>,
    rows: usize,
    policy: BatchPolicy,
}

impl<R: Request> Queue<R> {
    pub(super) fn new(policy: BatchPolicy) -> Self {
        assert!(
            policy.max_rows > 0,
            "max_batch_size is checked at load: this is a bug"
        );
        Self {
            entries: VecDeque::new(),
            rows: 0,
            policy,
        }
    }

    pub(super) fn push(&mut self, request: R, permit: Permit) {
        self.rows += request.rows();
        self.entries.push_back(Entry {
            request,
            _permit: permit,
        });
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(super) fn oldest(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.request.enqueued())
    }

    /// When the oldest request's wait runs out.
    pub(super) fn closes_at(&self) -> Option<Instant> {
        self.oldest().map(|t| t + self.policy.max_delay)
    }

    pub(super) fn is_ready(&self, now: Instant) -> bool {
        match self.closes_at() {
            None => false,
            Some(at) => self.rows >= self.policy.max_rows || at <= now,
        }
    }

    /// Takes requests from the front while they fit in `max_rows` (always at
    /// least one, so an oversized request still runs alone). A request whose
    /// deadline has passed, or whose caller has gone, is dropped instead and
    /// takes no room in the batch.
    pub(super) fn take(&mut self, now: Instant, batch: &mut Vec<R>, dropped: &mut Vec<Dropped<R>>) {
        let mut rows = 0;
        while let Some(front) = self.entries.front() {
            let r = front.request.rows();
            let reason = drop_reason(&front.request, now);
            if reason.is_none() && !batch.is_empty() && rows + r > self.policy.max_rows {
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
                    rows += r;
                    batch.push(entry.request);
                }
            }
        }
    }
}

/// A caller whose deadline passed while queued has usually given up already
/// (its own timer answered): that is a deadline drop, not a cancellation.
fn drop_reason<R: Request>(r: &R, now: Instant) -> Option<DropReason> {
    if r.deadline() <= now {
        Some(DropReason::Deadline)
    } else if r.is_cancelled() {
        Some(DropReason::Cancelled)
    } else {
        None
    }
}
