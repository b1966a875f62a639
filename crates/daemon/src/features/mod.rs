//! Per-user feature state read by the models: the recent-item history, the
//! dense feature vector and the categorical (sparse) features. Owned by the executor thread; changed only through
//! update commands, so scoring and updates are ordered without locks.

pub mod catalogues;
pub mod durable;
pub mod popularity;
pub mod snapshot;
pub mod store;
pub mod updates;
pub mod users;
pub mod wal;

pub use users::{SharedUserDims, UserDims, UserState, UserStore};
