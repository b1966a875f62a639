//! What rankd's integration tests share: starting the real `rankd` binary
//! (and a Kafka-protocol broker), HTTP and raw-TCP clients, socket frames,
//! error checks, an f64 reference of the model math, the parity tolerance
//! against PyTorch fixtures and one seeded random generator.
#![allow(dead_code)]

pub mod daemon;
pub mod errors;
pub mod frame;
pub mod http;
pub mod kafka;
pub mod otlp;
pub mod parity;
pub mod reference;
pub mod rng;

pub use daemon::*;
pub use errors::*;
pub use http::*;
pub use rng::Rng;
