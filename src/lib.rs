//! rankd: a batch inference daemon for real-time recommendations.
//!
//! Requests arrive over HTTP (and later the Unix socket), are validated by the
//! [`api::Service`], queued per model and batched by the executor thread that
//! owns the device, the item tables and the user state.

pub mod api;
pub mod batch;
pub mod client;
pub mod config;
pub mod error;
pub mod exec;
pub mod features;
pub mod loadgen;
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
    /// The socket path, when the socket is on.
    pub uds_path: Option<std::path::PathBuf>,
    pub registry: Arc<Registry>,
    loaded: Option<oneshot::Receiver<()>>,
    stop: Option<oneshot::Sender<()>>,
    uds_stop: Option<oneshot::Sender<()>>,
    uds_task: Option<tokio::task::JoinHandle<()>>,
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
    let uds_listener = if config.uds.is_empty() {
        None
    } else {
        Some(api::uds::bind(std::path::Path::new(&config.uds))?)
    };
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
        service: service.clone(),
        max_body_bytes: config.max_body_bytes,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let (uds_stop, uds_stopped) = oneshot::channel::<()>();
    let uds_path = uds_listener
        .as_ref()
        .map(|_| std::path::PathBuf::from(&config.uds));
    let uds_task = uds_listener.map(|l| {
        let uds_config = api::uds::UdsConfig {
            path: std::path::PathBuf::from(&config.uds),
            max_frame_bytes: config.max_frame_bytes,
            max_inflight: config.uds_max_inflight,
            write_timeout: Duration::from_millis(config.uds_write_timeout_ms),
        };
        tokio::spawn(api::uds::serve(l, service, uds_config, uds_stopped))
    });
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(Daemon {
        http_addr,
        uds_path,
        registry,
        loaded: Some(loaded),
        stop: Some(stop),
        uds_stop: Some(uds_stop),
        uds_task,
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

    /// `ready: 2 models on cpu; http://127.0.0.1:8080; unix:./rankd.sock`
    pub fn ready_line(&self) -> String {
        let n = self.registry.ready_count();
        let mut line = format!(
            "ready: {n} model{} on {}; http://{}",
            if n == 1 { "" } else { "s" },
            self.registry.device(),
            self.http_addr
        );
        if let Some(p) = &self.uds_path {
            line.push_str(&format!("; unix:{}", p.display()));
        }
        line
    }

    /// Stops accepting, finishes in-flight requests, and returns.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(stop) = self.uds_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.uds_task.take() {
            let _ = task.await;
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
