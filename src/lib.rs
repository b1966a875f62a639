//! rankd: a batch inference daemon for real-time recommendations.
//!
//! Requests arrive over HTTP (and later the Unix socket), are validated by the
//! [`api::Service`], queued per model and batched by the executor thread that
//! owns the device, the item tables and the user state.

pub mod api;
pub mod batch;
pub mod config;
pub mod error;
pub mod exec;
pub mod features;
pub mod metrics;
pub mod model;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;

pub use config::Config;
use exec::{LoadState, Registry, ServedModel};
use model::Repository;

/// A started daemon: listening, loading or loaded.
pub struct Daemon {
    pub http_addr: SocketAddr,
    pub registry: Arc<Registry>,
    loaded: Option<oneshot::Receiver<()>>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Scans the repository, generates missing demo files, binds the listeners and
/// starts the executor. Models load in the background; `/readyz` says when.
pub async fn start(config: Config) -> anyhow::Result<Daemon> {
    let repo = Repository::scan(&config.models).with_context(|| {
        format!(
            "cannot read the model repository {} (set --models or RANKD_MODELS)",
            config.models.display()
        )
    })?;
    let seeds: Vec<u64> = repo
        .models
        .iter()
        .filter_map(|m| m.spec.as_ref().ok()?.demo.as_ref().map(|d| d.seed))
        .collect();
    if let Some(&seed) = seeds.first() {
        let written = model::demo::generate(&repo.root, seed)?;
        if !written.is_empty() {
            tracing::info!(
                root = %repo.root.display(),
                seed,
                files = written.len(),
                "generated the demo model files from their seed"
            );
        }
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let served: Vec<ServedModel> = repo
        .models
        .iter()
        .map(|m| {
            let (spec, state) = match &m.spec {
                Ok(s) => (Some(s.clone()), LoadState::Loading),
                Err(e) => (None, LoadState::Failed(e.to_string())),
            };
            metrics.set_model_state(&m.name, m.version, state.as_str());
            ServedModel::new(m.name.clone(), m.version, spec, state)
        })
        .collect();
    let registry = Arc::new(Registry::new(served));
    let listener = tokio::net::TcpListener::bind(&config.http)
        .await
        .with_context(|| format!("cannot listen on http {}", config.http))?;
    let http_addr = listener.local_addr()?;
    let (exec, loaded) = exec::spawn(
        Box::new(exec::cpu::CpuBackend::new()),
        repo.models.clone(),
        registry.clone(),
        metrics.clone(),
    );
    let service = Arc::new(api::Service::new(
        exec,
        metrics,
        api::ServiceLimits {
            default_timeout: Duration::from_millis(config.default_timeout_ms),
            max_timeout: Duration::from_millis(config.max_timeout_ms),
        },
    ));
    let app = api::http::router(api::http::HttpState {
        service,
        max_body_bytes: config.max_body_bytes,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(Daemon {
        http_addr,
        registry,
        loaded: Some(loaded),
        stop: Some(stop),
        server,
    })
}

impl Daemon {
    /// Waits until every model has finished loading (or failed to).
    pub async fn loaded(&mut self) {
        if let Some(rx) = self.loaded.take() {
            let _ = rx.await;
        }
    }

    /// `ready: 2 models on cpu; http://127.0.0.1:8080`
    pub fn ready_line(&self) -> String {
        let n = self.registry.ready_count();
        format!(
            "ready: {n} model{} on {}; http://{}",
            if n == 1 { "" } else { "s" },
            self.registry.device(),
            self.http_addr
        )
    }

    /// Stops accepting, finishes in-flight requests, and returns.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.await??;
        Ok(())
    }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tracing::info!(?config, "starting");
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
