//! Shedding: what becomes of a request the queues cannot serve in time.
//!
//! - At admission (`ModelAdmission::admit`): a request whose class's queue
//!   is full is refused (429, with a `Retry-After` from the model's recent
//!   throughput, `rate::retry_after`); an interactive request that the queue
//!   ahead of it surely keeps past its deadline, at the rate the model's
//!   queue last drained (`rate::Gauges::expected_wait`), is refused at once
//!   (504) rather than at its deadline. Until a backlog has been measured
//!   nothing is shed that way.
//! - As its batch is taken (`scheduler`): a request whose deadline falls
//!   before the batch is expected to finish is dropped
//!   (`DropReason::Predicted`).
//! - Either way, the popular items answer in its stead (a degraded answer)
//!   an interactive request that a popular list can answer, of a model that
//!   degrades (`degrades`). Bulk work, score requests and requests whose
//!   deadline has already passed are never degraded.

use std::time::Duration;

use super::admission::{Admission, Full, Permit};
use super::rate::Gauges;
use super::scheduler::{Class, DropReason};

/// A model's admission, shared by its versions: the slots of its
/// interactive and bulk queues, and the rates behind shedding and
/// `Retry-After`.
#[derive(Debug)]
pub struct ModelAdmission {
    interactive: Admission,
    bulk: Admission,
    rates: Gauges,
}

/// What admission makes of an arriving request.
#[derive(Debug)]
pub enum Verdict {
    /// Queued: the request holds this permit until it leaves its queue.
    Queued(Permit),
    /// The queue ahead surely keeps it past its deadline: `ahead` requests
    /// wait before it. It holds no slot.
    Late { ahead: usize },
    /// Its class's queue is full; a refused caller should retry after
    /// `retry_after`.
    Full { full: Full, retry_after: Duration },
}

/// Why a request was shed: the `reason` label of `rankd_degraded_total`
/// when the popular items answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Its class's queue was full.
    QueueFull,
    /// Its deadline could not be met (at admission or as its batch was
    /// taken).
    Deadline,
}

impl Shed {
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::Deadline => "deadline",
        }
    }
}

impl ModelAdmission {
    /// Room for `max_queue_size` interactive and `max_bulk_queue_size` bulk
    /// requests.
    pub fn new(max_queue_size: usize, max_bulk_queue_size: usize) -> Self {
        Self {
            interactive: Admission::new(max_queue_size),
            bulk: Admission::new(max_bulk_queue_size),
            rates: Gauges::default(),
        }
    }

    /// The queue slots of `class`.
    pub fn of(&self, class: Class) -> &Admission {
        match class {
            Class::Interactive => &self.interactive,
            Class::Bulk => &self.bulk,
        }
    }

    /// Requests admitted and still waiting, both classes.
    pub fn queued(&self) -> usize {
        self.interactive.depth() + self.bulk.depth()
    }

    /// The model's rates as last published (`rate::Meters`).
    pub fn rates(&self) -> &Gauges {
        &self.rates
    }

    /// Admits a request of `class` with `timeout` to wait and run in. A full
    /// queue refuses it whatever its class; an interactive request that the
    /// requests already waiting keep at least `timeout` is late.
    pub fn admit(&self, class: Class, timeout: Duration) -> Verdict {
        let admission = self.of(class);
        let hopeless = class == Class::Interactive
            && self
                .rates
                .expected_wait(admission.depth())
                .is_some_and(|wait| wait >= timeout);
        match admission.try_admit() {
            Ok(permit) if hopeless => {
                let ahead = admission.depth().saturating_sub(1);
                drop(permit);
                Verdict::Late { ahead }
            }
            Ok(permit) => Verdict::Queued(permit),
            Err(full) => Verdict::Full {
                retry_after: self.rates.retry_after(full.waiting),
                full,
            },
        }
    }
}

/// Whether the popular items answer a shed request of `class` in its stead;
/// `popular`: a popular list can answer the request (a recommend) and its
/// model degrades. Only interactive requests are.
pub fn degrades(class: Class, popular: bool) -> bool {
    class == Class::Interactive && popular
}

/// Whether a request dropped for `reason` as its batch was taken is
/// answered from the popular items ([`degrades`]): only a predicted drop,
/// whose deadline is still ahead; a request past its deadline has had its
/// 504, and a cancelled one has no caller.
pub fn degrades_drop(reason: DropReason, class: Class, popular: bool) -> bool {
    reason == DropReason::Predicted && degrades(class, popular)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::rate::Meters;
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A model whose queue drained 1,000 requests a second, measured from
    /// batches at explicit instants.
    fn measured(a: &ModelAdmission) {
        let t0 = Instant::now();
        let mut m = Meters::default();
        for i in 0..=100 {
            let t = t0 + i * 10 * MS;
            m.answered(0, t, 10, 10, t, a.rates());
        }
    }

    #[test]
    fn nothing_is_shed_for_its_deadline_before_a_backlog_was_measured() {
        let a = ModelAdmission::new(4, 4);
        let permits: Vec<Permit> = (0..3)
            .map(|_| match a.admit(Class::Interactive, MS) {
                Verdict::Queued(p) => p,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(a.queued(), 3);
        drop(permits);
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn an_interactive_request_the_queue_ahead_keeps_past_its_deadline_is_late() {
        let a = ModelAdmission::new(1000, 1000);
        measured(&a);
        // 100 requests ahead at about 1,000 a second: about 100 ms.
        let held: Vec<Permit> = (0..100)
            .map(
                |_| match a.admit(Class::Interactive, Duration::from_secs(1)) {
                    Verdict::Queued(p) => p,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        match a.admit(Class::Interactive, 50 * MS) {
            Verdict::Late { ahead } => assert_eq!(ahead, 100),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            a.of(Class::Interactive).depth(),
            100,
            "a late request holds no slot"
        );
        assert!(matches!(
            a.admit(Class::Interactive, 200 * MS),
            Verdict::Queued(_)
        ));
        // Bulk work is never late: it has its own queue and no one waits on it.
        let bulk: Vec<Permit> = (0..200)
            .map(|_| match a.admit(Class::Bulk, MS) {
                Verdict::Queued(p) => p,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(a.queued(), 300);
        drop((held, bulk));
    }

    #[test]
    fn a_full_queue_refuses_whatever_the_deadline_with_the_time_to_retry() {
        let a = ModelAdmission::new(2, 1);
        let _held = [
            a.admit(Class::Interactive, MS),
            a.admit(Class::Interactive, MS),
            a.admit(Class::Bulk, MS),
        ];
        match a.admit(Class::Interactive, Duration::from_secs(10)) {
            Verdict::Full { full, retry_after } => {
                assert_eq!((full.waiting, full.limit), (2, 2));
                assert_eq!(retry_after, Duration::from_secs(1), "no throughput yet");
            }
            other => panic!("{other:?}"),
        }
        let b = ModelAdmission::new(2, 2);
        measured(&b);
        let _held = [
            b.admit(Class::Interactive, Duration::from_secs(10)),
            b.admit(Class::Interactive, Duration::from_secs(10)),
        ];
        // Full comes before late: a tight deadline still gets a 429.
        match b.admit(Class::Interactive, MS) {
            Verdict::Full { full, retry_after } => {
                assert_eq!(full.waiting, 2);
                assert_eq!(retry_after, Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_interactive_requests_a_popular_list_can_answer_are_degraded() {
        assert!(degrades(Class::Interactive, true));
        assert!(!degrades(Class::Bulk, true));
        assert!(!degrades(Class::Interactive, false));
        assert!(degrades_drop(
            DropReason::Predicted,
            Class::Interactive,
            true
        ));
        for reason in [DropReason::Deadline, DropReason::Cancelled] {
            assert!(
                !degrades_drop(reason, Class::Interactive, true),
                "{reason:?}"
            );
        }
        assert!(!degrades_drop(DropReason::Predicted, Class::Bulk, true));
        assert_eq!(Shed::QueueFull.as_str(), "queue_full");
        assert_eq!(Shed::Deadline.as_str(), "deadline");
    }
}
