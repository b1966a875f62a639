//! The request API: one set of types (`types`), one transport-neutral service
//! that validates and dispatches (`service`), and the transports on top.

pub mod admin;
pub mod auth;
pub mod bulk;
pub mod conn;
pub mod http;
pub mod pipeline;
pub mod service;
pub mod tls;
pub mod uds;

pub use service::{Service, ServiceLimits};
