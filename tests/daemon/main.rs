//! rankd end to end: every suite that starts the real `rankd` binary and
//! talks to it over HTTP, raw TCP, the Unix socket and a Kafka-protocol
//! broker, in one test binary.
//!
//! Tests run in parallel; each daemon holds a shared turn, and the tests
//! that bound latencies take the daemon's machine alone (`common::alone`).

#[path = "../common/mod.rs"]
mod common;

mod catalogues;
mod cpu_scoring;
mod device;
mod durable;
mod edges;
mod http_api;
mod http_bad_input;
mod http_cases;
mod kafka;
mod lifecycle;
mod logs;
mod monitoring;
mod onnx;
mod onnx_inputs;
mod parity;
mod pipelines;
mod pressure;
mod query_cache;
mod sasrec;
mod soak;
mod tls;
mod tracing;
#[cfg(not(feature = "otlp"))]
mod tracing_off;
mod uds;
mod uds_hostile;
