//! rankd: a batch inference daemon for real-time recommendations.
//!
//! Requests arrive over HTTP and the Unix socket, are validated by the
//! [`api::Service`], queued per model and batched by the executor thread that
//! owns the device, the item tables and the user state. Feature updates from
//! Kafka (or the same APIs) reach that thread as batches between scoring
//! batches; snapshots keep the state across restarts.

pub mod api;
pub mod batch;
pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod exec;
pub mod features;
pub mod loadgen;
pub mod metrics;
pub mod model;

use std::future::Future;

pub use config::Config;
pub use daemon::{start, Daemon};

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tracing::info!(config = ?config.redacted(), "starting");
    let mut daemon = start(config).await?;
    daemon.loaded().await;
    if let Some(reason) = daemon.registry.not_ready_reason() {
        tracing::warn!(%reason, "not every model is ready");
    }
    println!("{}", daemon.ready_line());
    shutdown.await;
    tracing::info!("shutting down");
    daemon.shutdown().await
}
