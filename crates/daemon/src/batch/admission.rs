//! Admission to a queue by permit: a request holds a `Permit` from the moment
//! it is admitted until it leaves its queue (taken into a batch, dropped, or
//! lost with a closed channel), and dropping the permit gives the slot back,
//! so the depth a queue reports can never drift from what it holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The slots of one queue. Cheap to clone: clones share the count.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Slots>,
}

#[derive(Debug)]
struct Slots {
    held: AtomicUsize,
    limit: usize,
}

/// One admitted request's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    slots: Arc<Slots>,
}

/// The queue was full: `waiting` requests held its `limit` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub waiting: usize,
    pub limit: usize,
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Slots {
                held: AtomicUsize::new(0),
                limit,
            }),
        }
    }

    /// A permit if fewer than `limit` requests hold one.
    pub fn try_admit(&self) -> Result<Permit, Full> {
        let limit = self.inner.limit;
        self.inner
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < limit).then_some(held + 1)
            })
            .map(|_| Permit {
                slots: self.inner.clone(),
            })
            .map_err(|waiting| Full { waiting, limit })
    }

    /// Requests admitted and not yet out of the queue.
    pub fn depth(&self) -> usize {
        self.inner.held.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.slots.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_bound_the_depth_and_give_their_slot_back_when_dropped() {
        let a = Admission::new(2);
        let p1 = a.try_admit().unwrap();
        let p2 = a.clone().try_admit().unwrap();
        assert_eq!(a.depth(), 2);
        assert_eq!(
            a.try_admit().unwrap_err(),
            Full {
                waiting: 2,
                limit: 2
            }
        );
        drop(p1);
        assert_eq!(a.depth(), 1);
        let p3 = a.try_admit().unwrap();
        drop((p2, p3));
        assert_eq!(a.depth(), 0);
    }

    #[test]
    fn depth_stays_exact_under_concurrent_admission_and_release() {
        let a = Admission::new(64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Ok(p) = a.try_admit() {
                            assert!(a.depth() <= 64);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert_eq!(a.depth(), 0);
    }
}
