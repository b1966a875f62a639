//! The batching policy, whole: admission to bounded queues by permit
//! (`admission`), one queue per model version with an interactive and a bulk
//! lane and its closing rule (`queue`), the scheduler that decides which
//! batch runs next, when to wake up, and which requests are dropped
//! (`scheduler`), the throughput and service-rate estimates behind
//! `Retry-After` and the expected wait (`rate`), and what becomes of a
//! request that cannot be served in time: refused at admission, dropped, or
//! answered from the popular items (`shed`). No threads and no I/O: the
//! executor drives it, and it is tested with explicit instants.

mod admission;
mod queue;
pub mod rate;
mod scheduler;
pub mod shed;
#[cfg(test)]
mod tests;

pub use admission::{Admission, Permit};
pub use queue::BatchPolicy;
pub use scheduler::{Class, DropReason, Dropped, Poll, QueueKey, Request, Run, Scheduler};
pub use shed::{ModelAdmission, Shed, Verdict};
