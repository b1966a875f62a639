//! Model versions over time: the repository watcher that loads new versions
//! and unloads vanished ones, the operator's load / unload / traffic calls,
//! and the traffic splits kept in `--snapshot-dir` across restarts.
//!
//! Files are read here, off the executor thread (on tokio's blocking pool);
//! the executor makes the version resident and warms it between batches.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ServeError;
use crate::exec::load;
use crate::exec::{ExecutorHandle, LoadState, ModelIndex, Registry, Split};
use crate::metrics::Metrics;
use crate::model::repository::{version_folders, Eligibility, Signature};
use crate::model::ModelEntry;
use crate::shutdown::CancellationToken;

/// The file under `--snapshot-dir` that keeps the splits.
pub const TRAFFIC_FILE: &str = "traffic.json";

/// Longest an admin `load` call waits before answering 202.
pub const LOAD_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Serialize, Deserialize)]
struct TrafficFile {
    /// Model → version (as a string) → percent.
    models: BTreeMap<String, BTreeMap<String, u32>>,
}

/// Reads the saved splits (none when the file does not exist).
pub fn read_splits(dir: &Path) -> anyhow::Result<BTreeMap<String, Split>> {
    let path = dir.join(TRAFFIC_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    };
    let file: TrafficFile = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "the saved traffic splits are unreadable; every model serves its latest version");
            return Ok(BTreeMap::new());
        }
    };
    let mut splits = BTreeMap::new();
    for (model, split) in file.models {
        let checked = parse_split(&split).and_then(|s| {
            let sum: u64 = s.values().map(|p| u64::from(*p)).sum();
            if sum == 100 {
                Ok(s)
            } else {
                Err(ServeError::Invalid(format!(
                    "split percentages must sum to 100, got {sum}"
                )))
            }
        });
        match checked {
            Ok(s) => {
                splits.insert(model, s);
            }
            Err(e) => {
                tracing::error!(path = %path.display(), model, error = %e, "saved traffic split ignored; the model serves its latest version");
            }
        }
    }
    Ok(splits)
}

/// A split as sent (`{"1": 90, "2": 10}`) with its keys read as versions.
pub fn parse_split(split: &BTreeMap<String, u32>) -> Result<Split, ServeError> {
    split
        .iter()
        .map(|(k, p)| {
            k.parse::<u64>().map(|v| (v, *p)).map_err(|_| {
                ServeError::Invalid(format!("split keys must be version numbers, got '{k}'"))
            })
        })
        .collect()
}

pub struct Lifecycle {
    root: PathBuf,
    registry: Arc<Registry>,
    exec: ExecutorHandle,
    metrics: Arc<Metrics>,
    /// Where splits are saved; `None` keeps them in memory only.
    snapshot_dir: Option<PathBuf>,
    watch: Mutex<Watch>,
    /// Held while the splits file is written, so writes never interleave.
    saving: Mutex<()>,
}

struct Watch {
    eligibility: Eligibility,
    /// Failed versions and their files when they failed: tried again once
    /// the files change.
    failed: HashMap<(String, u64), Signature>,
}

impl Lifecycle {
    pub fn new(
        root: PathBuf,
        eligibility: Eligibility,
        registry: Arc<Registry>,
        exec: ExecutorHandle,
        metrics: Arc<Metrics>,
        snapshot_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            root,
            registry,
            exec,
            metrics,
            snapshot_dir,
            watch: Mutex::new(Watch {
                eligibility,
                failed: HashMap::new(),
            }),
            saving: Mutex::new(()),
        }
    }

    fn model(&self, name: &str) -> Result<ModelIndex, ServeError> {
        self.registry
            .get(name)
            .map(|(i, _)| i)
            .ok_or_else(|| ServeError::NotFound(format!("model '{name}' not found")))
    }

    /// Polls the repository every `interval` until `stop` is cancelled. A
    /// load under way then runs to its end (a load is never left half
    /// done); the poll's later loads are not started.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let me2 = me.clone();
                let todo = tokio::task::spawn_blocking(move || me2.scan())
                    .await
                    .unwrap_or_default();
                for (model, version) in todo {
                    if stop.is_cancelled() {
                        return;
                    }
                    let me = me.clone();
                    // Loads run one at a time per poll, in version order.
                    if let Err(e) = me.load_version(model, version).await {
                        tracing::debug!(error = %e, "repository load ended");
                    }
                }
            }
        })
    }

    /// One poll: registers new and vanished versions; returns the versions
    /// to load now (the newly eligible versions newer than any known one,
    /// and failed versions whose files changed).
    fn scan(&self) -> Vec<(ModelIndex, u64)> {
        let mut todo = Vec::new();
        let mut watch = self.watch.lock().expect("watch lock poisoned");
        for (index, served) in self.registry.indexed() {
            let dir = self.root.join(&served.name);
            let on_disk = version_folders(&dir);
            let known = served.versions();
            // Vanished folders.
            for (v, e, _) in &known {
                if e.on_disk && !on_disk.iter().any(|(w, _)| w == v) {
                    tracing::info!(model = %served.name, version = v, "version folder removed from the repository");
                    if let Some(r) = served.vanished(*v) {
                        self.exec.retire(r);
                    }
                }
            }
            for r in served.take_orphans() {
                self.exec.retire(r);
            }
            let newest_known = known.iter().map(|(v, _, _)| *v).max();
            for (v, _) in watch.eligibility.poll(&served.name, &on_disk) {
                let newer = newest_known.is_none_or(|n| v > n);
                tracing::info!(model = %served.name, version = v, load = newer, "new version in the repository");
                served.add_version(v, None, LoadState::Unloaded);
                if newer {
                    todo.push((index, v));
                }
                watch.failed.remove(&(served.name.clone(), v));
            }
            // Failed versions whose files changed are tried again.
            for (v, e, _) in served.versions() {
                if !matches!(e.state, LoadState::Failed(_)) {
                    continue;
                }
                let Some((_, vdir)) = on_disk.iter().find(|(w, _)| *w == v) else {
                    continue;
                };
                let now = Signature::of(vdir);
                let key = (served.name.clone(), v);
                match watch.failed.get(&key) {
                    None => {
                        watch.failed.insert(key, now);
                    }
                    Some(before) if *before != now => {
                        watch.failed.remove(&key);
                        todo.push((index, v));
                    }
                    Some(_) => {}
                }
            }
        }
        todo
    }

    /// Reads, loads and warms `version` of model `index`, unless it is
    /// loading or ready already. Returns once it serves or failed.
    pub async fn load_version(&self, index: ModelIndex, version: u64) -> Result<(), ServeError> {
        let served = self.registry.by_index(index).clone();
        let dir = self.root.join(&served.name).join(version.to_string());
        if !dir.join("model.toml").is_file() {
            return Err(ServeError::NotFound(format!(
                "model {} has no version {version} in the repository",
                served.name
            )));
        }
        if !served.begin_load(version) {
            return Ok(());
        }
        self.metrics
            .set_model_state(&served.name, version, "loading");
        tracing::info!(model = %served.name, version, "loading model version");
        let name = served.name.clone();
        let registry = self.registry.clone();
        let read = tokio::task::spawn_blocking(move || {
            let entry = ModelEntry::read(&name, version, dir);
            load::read(index, &entry, |path, dim| {
                registry.catalogues().resident(path, dim)
            })
        })
        .await
        .map_err(|e| ServeError::Internal(format!("reading the model files panicked: {e}")))?;
        match read {
            Ok(files) => self.exec.install(files).await,
            Err(e) => Err(crate::exec::load_failed(
                &served,
                &self.metrics,
                version,
                &e,
            )),
        }
    }

    /// `POST /v1/admin/models/{model}/load`: loads `version` (default: the
    /// highest in the repository) and waits up to [`LOAD_WAIT`] for it.
    /// `Ok(true)` once it serves, `Ok(false)` when still loading.
    pub async fn admin_load(
        self: &Arc<Self>,
        model: &str,
        version: Option<u64>,
    ) -> Result<(u64, bool), ServeError> {
        let index = self.model(model)?;
        let version = match version {
            Some(v) => v,
            None => self
                .watch
                .lock()
                .expect("watch lock poisoned")
                .eligibility
                .highest(model)
                .ok_or_else(|| {
                    ServeError::NotFound(format!(
                        "model {model} has no eligible version in the repository"
                    ))
                })?,
        };
        // The load runs on its own: a caller that gives up (or the wait
        // below) never leaves it half done.
        let me = self.clone();
        let load = tokio::spawn(async move { me.load_version(index, version).await });
        if let Ok(Ok(Err(e @ ServeError::NotFound(_)))) =
            tokio::time::timeout(LOAD_WAIT, load).await
        {
            return Err(e);
        }
        // A load already in flight (the watcher's) is waited for too.
        let until = tokio::time::Instant::now() + LOAD_WAIT;
        while self
            .registry
            .by_index(index)
            .version(version)
            .map(|e| e.state)
            == Some(LoadState::Loading)
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let served = self.registry.by_index(index);
        match served.version(version).map(|e| e.state) {
            Some(LoadState::Ready) => Ok((version, true)),
            Some(LoadState::Loading) => Ok((version, false)),
            Some(LoadState::Failed(why)) => Err(ServeError::Invalid(format!(
                "version {version} of model {model} failed to load: {why}"
            ))),
            Some(LoadState::Unloaded) | None => Err(ServeError::NotFound(format!(
                "model {model} has no version {version} in the repository"
            ))),
        }
    }

    /// `POST /v1/admin/models/{model}/unload`.
    pub fn admin_unload(&self, model: &str, version: u64) -> Result<(), ServeError> {
        let index = self.model(model)?;
        let served = self.registry.by_index(index);
        if let Some(r) = served.unload(version)? {
            self.exec.retire(r);
        }
        tracing::info!(model, version, "model version unloaded by the admin API");
        self.publish_traffic(index);
        Ok(())
    }

    /// `POST /v1/admin/models/{model}/traffic`: sets or clears the split,
    /// saves every split, and returns the effective one.
    pub fn set_traffic(&self, model: &str, split: Option<Split>) -> Result<Split, ServeError> {
        let index = self.model(model)?;
        let served = self.registry.by_index(index);
        let clears = split.is_none();
        let effective = served.set_split(split)?;
        if clears {
            for r in served.take_idle() {
                self.exec.retire(r);
            }
        }
        tracing::info!(model, split = ?effective, explicit = served.split().is_some(), "traffic split set");
        self.publish_traffic(index);
        self.save_splits();
        Ok(effective)
    }

    fn publish_traffic(&self, index: ModelIndex) {
        let served = self.registry.by_index(index);
        let versions: Vec<u64> = served.versions().iter().map(|(v, _, _)| *v).collect();
        self.metrics
            .set_traffic(&served.name, &versions, &served.traffic());
    }

    fn save_splits(&self) {
        let _writing = self.saving.lock().expect("saving lock poisoned");
        let Some(dir) = &self.snapshot_dir else {
            tracing::warn!(
                "snapshots are off: the traffic split is kept in memory only and lost on restart"
            );
            return;
        };
        let file = TrafficFile {
            models: self
                .registry
                .models()
                .iter()
                .filter_map(|m| {
                    let split = m.split()?;
                    Some((
                        m.name.clone(),
                        split.into_iter().map(|(v, p)| (v.to_string(), p)).collect(),
                    ))
                })
                .collect(),
        };
        let path = dir.join(TRAFFIC_FILE);
        let tmp = dir.join(format!("{TRAFFIC_FILE}.tmp"));
        let result = std::fs::create_dir_all(dir)
            .and_then(|()| {
                let json = serde_json::to_vec_pretty(&file).expect("splits serialise");
                std::fs::write(&tmp, json)
            })
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::File::open(dir)?.sync_all());
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "saving the traffic split failed");
        }
    }
}
