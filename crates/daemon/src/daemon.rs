//! Starting and stopping a whole daemon: repository scan, demo generation,
//! snapshot restore, executor, listeners, Kafka ingestion and periodic
//! snapshots, and the ordered shutdown that drains them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::api;
use crate::config::{Config, KafkaConfig};
use crate::exec::{self, ExecutorHandle, LoadState, Registry, ServedModel};
use crate::features::popularity::{Popularity, Refresher};
use crate::features::snapshot::{Snapshot, SnapshotBase};
use crate::features::updates::Validator;
use crate::ingest::{self, Ingest};
use crate::lifecycle::{self, Lifecycle};
use crate::metrics::Metrics;
use crate::model::repository::Eligibility;
use crate::model::spec::BatchingSpec;
use crate::model::{self, ModelEntry, Repository};
use crate::shutdown::{CancellationToken, Stops, Wake};

/// A started daemon: listening, loading or loaded.
pub struct Daemon {
    pub http_addr: SocketAddr,
    /// The HTTP listener speaks TLS.
    pub https: bool,
    /// The socket path, when the socket is on.
    pub uds_path: Option<PathBuf>,
    registry: Arc<Registry>,
    loaded: watch::Receiver<bool>,
    /// How every part learns it must stop (`shutdown` cancels them in turn).
    stops: Stops,
    uds_task: Option<tokio::task::JoinHandle<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Waits for the models, starts the repository polls and Kafka
    /// ingestion, and owns the ingestion until `stops.ingest`.
    background: tokio::task::JoinHandle<()>,
    snapshots: Option<Snapshotter>,
    popularity: Option<Refresher>,
    shutdown_delay: Duration,
    grace: Duration,
}

/// Scans the repository, generates missing demo files, restores the newest
/// snapshot, binds the listeners and starts the executor. Models load in the
/// background (`/readyz` says when); Kafka ingestion starts once they have.
pub async fn start(config: Config) -> anyhow::Result<Daemon> {
    crate::model::kind::onnx::configure(config.exec.onnx_settings());
    ingest::ensure_available(&config.kafka)?;
    let repo = Repository::scan(&config.exec.models).with_context(|| {
        format!(
            "cannot read the model repository {} (set --models or RANKD_MODELS)",
            config.exec.models.display()
        )
    })?;
    // The latest version of each model is read first: its spec sizes the
    // model's queue and may ask for the demo files.
    let latest: Vec<ModelEntry> = repo
        .models
        .iter()
        .map(|m| {
            let (v, dir) = m.latest().expect("a model has a version").clone();
            ModelEntry::read(&m.name, v, dir)
        })
        .collect();
    if let Some(seed) = latest
        .iter()
        .find_map(|m| m.spec.as_ref().ok()?.demo.as_ref().map(|d| d.seed))
    {
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
    let snapshot = match &config.snapshot.dir {
        Some(dir) => Snapshot::load_newest(dir)
            .with_context(|| format!("reading snapshots in {}", dir.display()))?
            .map(|(path, s)| {
                tracing::info!(path = %path.display(), "loading the feature-state snapshot");
                s
            }),
        None => None,
    };
    let resume: BTreeMap<(String, i32), i64> = snapshot
        .iter()
        .flat_map(|s| &s.offsets)
        .map(|o| ((o.topic.clone(), o.partition), o.next_offset))
        .collect();

    let saved_splits = match &config.snapshot.dir {
        Some(dir) => lifecycle::read_splits(dir)?,
        None => BTreeMap::new(),
    };
    let metrics = Arc::new(Metrics::new());
    let popularity = Arc::new(Popularity::new(config.pressure.popularity_half_life()));
    if let Some(dir) = &config.snapshot.dir {
        // The counts are a cache of what the events said: an unreadable
        // file costs the popular answers their history, not the start.
        match popularity.load(dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!(items = n, "popularity counts restored"),
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "popularity counts not restored: starting from none"
            ),
        }
    }
    // Every version folder is listed; the latest of each model, and those a
    // saved split names, load before the daemon is ready.
    let mut startup = exec::Startup {
        versions: Vec::new(),
        splits: BTreeMap::new(),
        fallbacks: Vec::new(),
        snapshot: None,
        online_users: config.lifecycle.online_eval_users,
        online_window: config.lifecycle.online_window(),
        wal: config.snapshot.dir.clone().map(|d| {
            (
                d,
                config.durability.wal_sync == crate::config::WalSync::Always,
            )
        }),
        max_users: config.durability.max_users,
        popularity: popularity.clone(),
        degrade: config.pressure.degrade,
        query_cache_bytes: usize::try_from(config.exec.query_cache_bytes).unwrap_or(usize::MAX),
    };
    let mut served = Vec::new();
    for (index, (m, latest)) in repo.models.iter().zip(latest).enumerate() {
        // `served` is in the repository's order, as the registry will be.
        let index = exec::ModelIndex::new(index);
        let batching = latest
            .spec
            .as_ref()
            .map_or(BatchingSpec::default(), |s| s.batching.clone());
        let model = ServedModel::new(
            m.name.clone(),
            batching.max_queue_size,
            batching.max_bulk_queue_size,
        );
        let split = saved_splits.get(&m.name);
        if let Some(split) = split {
            startup.splits.insert(index, split.clone());
            model.preset_split(split.clone());
        }
        for (v, dir) in &m.versions {
            let load = *v == latest.version || split.is_some_and(|s| s.contains_key(v));
            let state = if load {
                LoadState::Loading
            } else {
                LoadState::Unloaded
            };
            model.add_version(*v, None, state.clone());
            metrics.set_model_state(&m.name, *v, state.as_str());
            if load {
                let entry = if *v == latest.version {
                    latest.clone()
                } else {
                    ModelEntry::read(&m.name, *v, dir.clone())
                };
                startup.versions.push((index, entry));
            } else if split.is_none() {
                startup
                    .fallbacks
                    .push((index, ModelEntry::read(&m.name, *v, dir.clone())));
            }
        }
        // Newest first within the model.
        let from = startup
            .fallbacks
            .iter()
            .position(|(i, _)| *i == index)
            .unwrap_or(startup.fallbacks.len());
        startup.fallbacks[from..].reverse();
        served.push(model);
    }
    let registry = Arc::new(Registry::new(served));
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http {}", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    let uds_listener = match &config.socket.path {
        Some(path) => Some((
            api::uds::bind(
                path,
                config.access.uds_mode_bits()?,
                config.access.uds_group.as_deref(),
            )?,
            path.clone(),
        )),
        None => None,
    };
    let stops = Stops::new();
    let selected = crate::backend::device::select(&config.exec.device, &metrics, stops.part())
        .map_err(anyhow::Error::msg)?;
    registry.set_device_reason(selected.reason);
    startup.snapshot = snapshot;
    let (exec, executor_loaded) = exec::spawn(
        selected.backend,
        startup,
        config.exec.history_max,
        registry.clone(),
        metrics.clone(),
    );
    let lifecycle = Arc::new(Lifecycle::new(
        repo.root.clone(),
        Eligibility::at_start(&repo),
        registry.clone(),
        exec.clone(),
        metrics.clone(),
        config.snapshot.dir.clone(),
    ));
    let tokens = api::http::Tokens {
        admin: config
            .access
            .admin_token_file
            .as_deref()
            .map(|p| api::auth::TokenFile::open(p, "admin"))
            .transpose()?
            .map(Arc::new),
        client: config
            .access
            .client_token_file
            .as_deref()
            .map(|p| api::auth::TokenFile::open(p, "client"))
            .transpose()?
            .map(Arc::new),
    };
    let service = Arc::new(api::Service::new(
        exec.clone(),
        metrics.clone(),
        api::ServiceLimits {
            default_timeout: config.requests.default_timeout(),
            max_timeout: config.requests.max_timeout(),
        },
        &stops,
    ));
    let mut pipelines = api::pipeline::Refresher::default();
    pipelines.refresh(&repo.root, &service).await;
    let app = api::http::router(api::http::HttpState {
        service: service.clone(),
        max_body_bytes: config.http.max_body_bytes,
        lifecycle: lifecycle.clone(),
        tokens,
        config: Arc::new(config.redacted()),
    });
    let tls = match config.tls.files() {
        Some((cert, key)) => Some(api::tls::acceptor(cert, key)?),
        None => None,
    };
    let https = tls.is_some();
    let limits = api::conn::Limits::from(&config.connections);
    let server = tokio::spawn(api::conn::serve(
        listener,
        tls,
        app,
        limits,
        metrics.clone(),
        stops.http.clone(),
    ));
    let uds_path = uds_listener.as_ref().map(|(_, path)| path.clone());
    let uds_task = uds_listener.map(|(l, path)| {
        let uds_config = api::uds::UdsConfig {
            path,
            max_frame_bytes: config.socket.max_frame_bytes,
            max_inflight: config.socket.max_inflight,
            write_timeout: config.socket.write_timeout(),
            limits,
        };
        tokio::spawn(api::uds::serve(
            l,
            service.clone(),
            uds_config,
            stops.socket.clone(),
        ))
    });

    // Once the models are in, their dimensions validate updates: start Kafka.
    let (loaded_tx, loaded) = watch::channel(false);
    let background = {
        let (registry, exec, metrics, service, kafka) = (
            registry.clone(),
            exec.clone(),
            metrics.clone(),
            service.clone(),
            config.kafka.clone(),
        );
        let (watcher, poll) = (lifecycle.clone(), config.lifecycle.poll_interval());
        let root = repo.root.clone();
        let (serving, repository, ingest) = (
            stops.serving.clone(),
            stops.repository.clone(),
            stops.ingest.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = executor_loaded => {}
                // Stopped while loading: nothing more to start.
                _ = serving.cancelled() => return,
            }
            if let Some(interval) = poll {
                watcher.spawn_watcher(interval, repository.clone());
                // Pipelines have no weights to load: each poll reads them
                // again and checks their stages as they are by then.
                let (service, root) = (service.clone(), root.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tick.tick().await;
                    loop {
                        tokio::select! {
                            _ = repository.cancelled() => return,
                            _ = tick.tick() => {}
                        }
                        pipelines.refresh(&root, &service).await;
                    }
                });
            }
            let mut running = None;
            if kafka.brokers.is_some() {
                let stop = ingest.clone();
                let started = tokio::task::spawn_blocking(move || {
                    start_ingest(kafka, &registry, resume, exec, metrics, stop)
                })
                .await
                .expect("starting ingestion does not panic");
                match started {
                    Ok(i) => {
                        service.set_ingest(i.status().clone());
                        running = Some(i);
                    }
                    Err(e) => tracing::error!(error = %e, "Kafka ingestion is off"),
                }
            }
            let _ = loaded_tx.send(true);
            if let Some(i) = running {
                ingest.cancelled().await;
                // Applies what it holds and commits before it ends.
                let _ = tokio::task::spawn_blocking(move || i.stop()).await;
            }
        })
    };
    let snapshots = config.snapshot.dir.clone().map(|dir| {
        Snapshotter::start(
            dir,
            config.snapshot.interval(),
            exec.clone(),
            metrics.clone(),
            stops.part(),
        )
    });
    let popularity = Refresher::start(
        popularity,
        config.snapshot.dir.clone(),
        config.snapshot.interval(),
        stops.part(),
    );
    Ok(Daemon {
        popularity: Some(popularity),
        http_addr,
        https,
        uds_path,
        registry,
        loaded,
        stops,
        uds_task,
        server,
        background,
        snapshots,
        shutdown_delay: config.durability.shutdown_delay(),
        grace: config.durability.grace(),
    })
}

fn start_ingest(
    kafka: KafkaConfig,
    registry: &Registry,
    resume: BTreeMap<(String, i32), i64>,
    exec: ExecutorHandle,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<Ingest> {
    registry
        .models()
        .iter()
        .filter(|m| m.state() == LoadState::Ready)
        .find_map(|m| m.spec())
        .context("no model loaded: nothing to validate updates against")?;
    let validator = Validator {
        catalogues: registry.catalogues().clone(),
        users: registry.user_dims().clone(),
        event_types: kafka.event_types.clone(),
    };
    tracing::info!(
        brokers = %kafka.brokers.as_deref().unwrap_or_default(),
        group = %kafka.group,
        "starting Kafka ingestion"
    );
    metrics.ingest_enabled.set(1);
    Ingest::start(kafka, validator, resume, exec, metrics, stop)
}

/// Writes a snapshot every `interval` when the state changed, and a final one
/// when stopped. The thread keeps its own copy of the state, brought up to
/// date by a capture of what changed (the whole state only the first time),
/// so the executor pauses for the changes alone and the copy is serialised
/// and written here.
struct Snapshotter {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl Snapshotter {
    fn start(
        dir: PathBuf,
        interval: Duration,
        exec: ExecutorHandle,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Self {
        let wake = Wake::new(stop.clone());
        let thread = std::thread::Builder::new()
            .name("rankd-snapshot".into())
            .spawn(move || {
                let mut written = 0u64;
                let mut base = SnapshotBase::default();
                loop {
                    let last = wake.sleep(interval);
                    match exec.capture_blocking(!base.is_complete()) {
                        Ok(delta) => {
                            let changes = delta.changes;
                            base.merge(delta);
                            if changes == written {
                                // Nothing changed since the snapshot on disk:
                                // the segments the captures rotated past since
                                // hold no record, so an idle daemon does not
                                // pile up one empty segment per interval.
                                crate::features::wal::remove_before(&dir, base.wal_next());
                            } else {
                                match base.write(&dir) {
                                    Ok(path) => {
                                        written = changes;
                                        crate::features::wal::remove_before(&dir, base.wal_next());
                                        tracing::debug!(path = %path.display(), users = base.users(), "snapshot written");
                                    }
                                    Err(e) => {
                                        metrics.snapshot_failures.inc();
                                        tracing::error!(dir = %dir.display(), error = %e, "snapshot failed")
                                    }
                                }
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "no snapshot: executor stopped"),
                    }
                    if last {
                        break;
                    }
                }
            })
            .expect("spawning the snapshot thread");
        Self { stop, thread }
    }

    /// Writes the final snapshot and stops; blocking.
    fn finish(self) {
        self.stop.cancel();
        let _ = self.thread.join();
    }
}

impl Daemon {
    /// Waits until every model has finished loading (or failed to) and
    /// ingestion, if configured, has started.
    pub async fn loaded(&mut self) {
        let _ = self.loaded.wait_for(|done| *done).await;
    }

    /// `None` when every model is ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.registry.not_ready_reason()
    }

    /// `ready: 2 models on cpu; http://127.0.0.1:8080; unix:./rankd.sock`
    pub fn ready_line(&self) -> String {
        let n = self.registry.ready_count();
        let mut line = format!(
            "ready: {n} model{} on {}; {}://{}",
            if n == 1 { "" } else { "s" },
            self.registry.device(),
            if self.https { "https" } else { "http" },
            self.http_addr
        );
        if let Some(p) = &self.uds_path {
            line.push_str(&format!("; unix:{}", p.display()));
        }
        line
    }

    /// Drains and stops: `/readyz` answers 503 `draining` at once; accepting
    /// goes on for the shutdown delay, then stops on both transports (and
    /// the repository polls stop); the requests in flight get the grace
    /// period to finish (streaming calls are cut just before its end,
    /// connections still open at its end are closed); pending updates are
    /// applied and committed, the popularity counts saved, a final snapshot
    /// written and the socket file removed. Each step cancels its part of
    /// the daemon's stop tree (`crate::shutdown`).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stops.draining.cancel();
        if !self.shutdown_delay.is_zero() {
            tracing::info!(
                delay_ms = self.shutdown_delay.as_millis() as u64,
                "draining: /readyz answers 503, still accepting"
            );
            tokio::time::sleep(self.shutdown_delay).await;
        }
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + self.grace;
        // Streaming calls still running just before the deadline end with
        // a final error, which then has time to reach their callers.
        let cut_at = deadline - (self.grace / 10).min(Duration::from_millis(200));
        self.stops.serving.cancel();

        // The drain, bounded once by the grace deadline: both transports'
        // connections finish what they read, then close.
        let grace_ms = self.grace.as_millis() as u64;
        let (server, cut_token) = (&mut self.server, &self.stops.cut);
        let mut uds_task = self.uds_task.take();
        let drain = async {
            let uds = async {
                if let Some(task) = uds_task.as_mut() {
                    let _ = task.await;
                }
            };
            let (served, ()) = tokio::join!(server, uds);
            served.unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        let cut = async {
            tokio::time::sleep_until(cut_at).await;
            cut_token.cancel();
            std::future::pending::<()>().await;
        };
        let drained = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                served = drain => served,
                () = cut => unreachable!("the cut never ends"),
            }
        })
        .await;
        // Whatever is still running is cut: nothing outlives the grace period.
        self.stops.cut.cancel();
        let served = match drained {
            Ok(served) => served,
            Err(_) => {
                if uds_task.as_ref().is_some_and(|t| !t.is_finished()) {
                    tracing::warn!(
                        grace_ms,
                        "socket connections still open at the end of the grace period: closed"
                    );
                }
                if !self.server.is_finished() {
                    tracing::warn!(
                        grace_ms,
                        "HTTP connections still open at the end of the grace period: closed"
                    );
                }
                Ok(())
            }
        };
        self.server.abort();
        if let Some(task) = uds_task {
            task.abort();
        }
        if let Some(p) = &self.uds_path {
            let _ = std::fs::remove_file(p);
        }
        served?;
        tracing::info!(
            drained_ms = started.elapsed().as_millis() as u64,
            "connections drained"
        );
        // Ingestion applies and commits what it holds, then the counts and
        // the final snapshot include it.
        self.stops.ingest.cancel();
        let _ = (&mut self.background).await;
        let snapshots = self.snapshots.take();
        let popularity = self.popularity.take();
        tokio::task::spawn_blocking(move || {
            if let Some(p) = popularity {
                p.finish();
            }
            if let Some(s) = snapshots {
                s.finish();
            }
        })
        .await?;
        self.stops.all();
        Ok(())
    }
}
