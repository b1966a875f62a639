//! Dynamic batching policy. The queue is a plain struct driven by the executor
//! loop, so the policy is unit-tested with explicit instants and no threads.

pub mod queue;

pub use queue::{BatchQueue, Queued};
