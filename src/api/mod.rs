//! The request API: one set of types (`types`), one transport-neutral service
//! that validates and dispatches (`service`), and the transports on top.

pub mod frame;
pub mod http;
pub mod service;
pub mod types;
pub mod uds;
pub mod wire;

pub use service::{Service, ServiceLimits};
