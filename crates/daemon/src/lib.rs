//! rankd: a batch inference daemon for real-time recommendations.
//!
//! Requests arrive over HTTP and the Unix socket (`api`), are validated by
//! the transport-neutral service, admitted and batched by the scheduler
//! (`batch`), and run by the executor thread (`exec`) that owns the device
//! (`backend`), the item tables and the user state (`features`). Kafka
//! updates (`ingest`) reach that thread as batches between scoring batches;
//! snapshots keep the state across restarts. Model files and the model kinds
//! live in `model`.
//!
//! Dependencies point one way: model → features → backend → batch → exec →
//! api / ingest → daemon.

mod api;
mod backend;
mod batch;
pub mod config;
mod daemon;
mod error;
mod exec;
mod features;
mod ingest;
mod lifecycle;
mod metrics;
mod model;
mod shutdown;
mod toml_doc;
pub mod trace;

use std::future::Future;

pub use config::Config;
pub use daemon::{start, Daemon};
pub use rankd_client as client;

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tracing::info!(config = ?config.redacted(), "starting");
    let mut daemon = start(config).await?;
    daemon.loaded().await;
    if let Some(reason) = daemon.not_ready_reason() {
        tracing::warn!(%reason, "not every model is ready");
    }
    println!("{}", daemon.ready_line());
    shutdown.await;
    tracing::info!("shutting down");
    daemon.shutdown().await
}

/// Sets the process allocator up for batch inference; call it first thing,
/// before any thread starts. A forward pass allocates and frees buffers of
/// a batch's size (a few hundred KB to a few MB) for every layer of every
/// batch; glibc's defaults give each such buffer fresh pages from the kernel
/// (mmap, page faults, munmap), which measured as half of a sasrec batch's
/// time. Buffers under 32 MiB are kept in the heap instead, and up to 64 MiB
/// of free heap top is kept rather than returned to the kernel at once.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; called before
    // any other thread exists, as glibc asks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Writes the demo repository's missing files under `root` (deterministic,
/// from `seed`); returns the files written, relative to `root`.
pub fn generate_demo(root: &std::path::Path, seed: u64) -> anyhow::Result<Vec<std::path::PathBuf>> {
    Ok(model::demo::generate(root, seed)?)
}

/// [`generate_demo`] with a catalogue of `items` items (ids 1..=items) drawn
/// the same way, written as it is drawn; `DEMO_ITEMS` gives the bundled bytes.
pub fn generate_demo_items(
    root: &std::path::Path,
    seed: u64,
    items: usize,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    Ok(model::demo::generate_items(root, seed, items)?)
}

/// The seed of the bundled demo models.
pub const DEMO_SEED: u64 = model::demo::DEMO_SEED;

/// The bundled demo catalogue's size.
pub const DEMO_ITEMS: usize = model::demo::ITEMS;

/// Internals for rankd's own benchmarks and tools (the load generator, the
/// GPU check, the ingestion benchmark): not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::backend::cpu::{self, CpuBackend};
    #[cfg(feature = "cuda")]
    pub use crate::backend::cuda;
    pub use crate::backend::{
        Backend, BatchBounds, ModelDesc, ModelId, Output, Query, Scored, TableId, Task,
    };
    pub use crate::exec::load::load_table;
    pub use crate::features::catalogues::{Catalogues, Shape};
    pub use crate::features::store::State;
    pub use crate::features::updates::{Coalescer, Stream, Update, UpdateBatch, Validator};
    pub use crate::features::{SharedUserDims, UserDims};
    pub use crate::model::demo::{files as demo_files, Rng};
    pub use crate::model::items::ItemChange;
    pub use crate::model::kind::onnx::{self, EngineKind};
    pub use crate::model::kind::{ONNX, RANKER, SASREC, TWO_TOWER};
    pub use crate::model::{ItemTable, Layer, ModelKind, ModelSpec, TowerWeights, Weights};
}
