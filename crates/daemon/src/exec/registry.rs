//! What the servers know about each model: its versions, their load state,
//! the traffic split between them and the admission to the model's queue.
//! Shared read-mostly between the servers, the repository watcher and the
//! executor, which alone makes a version resident or frees it.
//!
//! Routing: a request that names a version is served by it when it is ready.
//! Otherwise the user's bucket — a stable hash of (model name, user id) into
//! 100 buckets — picks the version: with an explicit split, the versions own
//! consecutive bucket ranges in version order; without one (`latest`), the
//! newest version that finished loading owns them all. The same user gets the
//! same version for as long as the split holds, on every replica and after a
//! restart.

use crate::features::catalogues::Catalogues;
use crate::features::SharedUserDims;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::backend::{DeviceHealth, ModelId};
use crate::batch::{Admission, Class, ModelAdmission};
use crate::error::ServeError;
use crate::model::ModelSpec;

#[derive(Debug, Clone, PartialEq)]
pub enum LoadState {
    Loading,
    Ready,
    Failed(String),
    /// On disk (or it was), not resident.
    Unloaded,
}

impl LoadState {
    pub fn as_str(&self) -> &'static str {
        match self {
            LoadState::Loading => "loading",
            LoadState::Ready => "ready",
            LoadState::Failed(_) => "failed",
            LoadState::Unloaded => "unloaded",
        }
    }
}

/// A model's place in the registry, fixed for the daemon's life: it names a
/// model, not a version (a resident version's id in the backend is a
/// `ModelId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelIndex(usize);

impl ModelIndex {
    /// The `n`th model given to [`Registry::new`].
    pub const fn new(n: usize) -> Self {
        Self(n)
    }
}

impl std::fmt::Display for ModelIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// A version resident in the executor. Requests routed to it hold a clone
/// until they are answered, so the executor frees the version only once the
/// registry and every request have let go of it.
#[derive(Debug)]
pub struct Resident {
    /// The version's id in the backend and its queue's key.
    pub id: ModelId,
    /// The model's index in the registry.
    pub model: ModelIndex,
    pub version: u64,
    pub spec: Arc<ModelSpec>,
    /// Why this version runs on the CPU while the executor's device is
    /// another (its kind has no forward pass there).
    pub cpu_reason: Option<String>,
    /// What runs an onnx model's graph (`tract`, `onnxruntime
    /// (CPUExecutionProvider)`).
    pub engine: Option<String>,
    /// The catalogue it reads.
    pub catalogue: String,
}

#[derive(Debug, Clone)]
pub struct VersionEntry {
    pub state: LoadState,
    /// The parsed model.toml, once read.
    pub spec: Option<Arc<ModelSpec>>,
    pub resident: Option<Arc<Resident>>,
    /// The folder is still in the repository.
    pub on_disk: bool,
}

/// A split: version → percent of users, summing to 100.
pub type Split = BTreeMap<u64, u32>;

#[derive(Debug, Default)]
struct Versions {
    versions: BTreeMap<u64, VersionEntry>,
    /// The explicit split, when set; else `latest` serves everyone.
    split: Option<Split>,
    latest: Option<u64>,
    /// Bucket → version, derived from the two above.
    buckets: Vec<u64>,
}

impl Versions {
    fn effective(&self) -> Split {
        match (&self.split, self.latest) {
            (Some(s), _) => s.clone(),
            (None, Some(v)) => BTreeMap::from([(v, 100)]),
            (None, None) => BTreeMap::new(),
        }
    }

    fn rebuild(&mut self) {
        self.buckets.clear();
        for (v, pct) in self.effective() {
            self.buckets.extend(std::iter::repeat_n(v, pct as usize));
        }
    }

    fn traffic_of(&self, version: u64) -> u32 {
        self.effective().get(&version).copied().unwrap_or(0)
    }
}

/// The bucket (0..100) of `user_id` for `model`: FNV-1a over the model name
/// and the id's little-endian bytes, finished with a 64-bit mix.
pub fn bucket(model: &str, user_id: u64) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in model.bytes().chain([0u8]).chain(user_id.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h % 100) as usize
}

/// Where one request goes.
#[derive(Debug)]
pub struct Route {
    pub resident: Arc<Resident>,
}

#[derive(Debug)]
pub struct ServedModel {
    pub name: String,
    inner: RwLock<Versions>,
    /// Slots of the model's interactive and bulk queues (`max_queue_size`
    /// and `max_bulk_queue_size` of its first readable version), shared by
    /// its versions, and the rates admission reads (`batch::shed`).
    admission: ModelAdmission,
    items: AtomicUsize,
}

impl ServedModel {
    pub fn new(name: String, max_queue_size: usize, max_bulk_queue_size: usize) -> Self {
        Self {
            name,
            inner: RwLock::new(Versions::default()),
            admission: ModelAdmission::new(max_queue_size, max_bulk_queue_size),
            items: AtomicUsize::new(0),
        }
    }

    /// Why the primary version (the one with the largest share) runs on
    /// the CPU, when it does.
    pub fn cpu_reason(&self) -> Option<String> {
        let primary = self.primary_version()?;
        self.read()
            .versions
            .get(&primary)?
            .resident
            .as_ref()?
            .cpu_reason
            .clone()
    }

    /// What runs the primary version's graph (onnx models).
    pub fn engine(&self) -> Option<String> {
        let primary = self.primary_version()?;
        self.read()
            .versions
            .get(&primary)?
            .resident
            .as_ref()?
            .engine
            .clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Versions> {
        self.inner.read().expect("versions lock poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Versions> {
        self.inner.write().expect("versions lock poisoned")
    }

    /// Adds a version found in the repository, in `state`. A version already
    /// known is only marked present again: its state changes only when it is
    /// neither loading nor resident.
    pub fn add_version(&self, version: u64, spec: Option<Arc<ModelSpec>>, state: LoadState) {
        let mut g = self.write();
        let e = g.versions.entry(version).or_insert(VersionEntry {
            state: state.clone(),
            spec: None,
            resident: None,
            on_disk: true,
        });
        e.on_disk = true;
        if e.resident.is_none() && e.state != LoadState::Loading {
            e.state = state;
        }
        if spec.is_some() {
            e.spec = spec;
        }
    }

    /// Marks `version` loading unless it is loading or resident already (then
    /// `false`: nothing to do). The check and the mark are one step, so two
    /// callers never load the same version twice.
    pub fn begin_load(&self, version: u64) -> bool {
        let mut g = self.write();
        let e = g.versions.entry(version).or_insert(VersionEntry {
            state: LoadState::Unloaded,
            spec: None,
            resident: None,
            on_disk: true,
        });
        if e.state == LoadState::Loading || e.resident.is_some() {
            return false;
        }
        e.state = LoadState::Loading;
        true
    }

    pub fn set_state(&self, version: u64, state: LoadState) {
        if let Some(e) = self.write().versions.get_mut(&version) {
            e.state = state;
        }
    }

    /// The version finished loading and warming: it may serve from now on.
    /// In `latest` mode a version newer than the serving one takes all traffic
    /// at once, and every other resident version without traffic is
    /// returned for the executor to retire (so at most the old and the new
    /// version were resident at once). With a split set, a new version stays
    /// resident without traffic and replaces an older version that had no
    /// traffic either. A version unloaded or removed while it loaded is not
    /// put in service: `Err` hands it back to be freed.
    pub fn version_ready(
        &self,
        resident: Arc<Resident>,
    ) -> Result<Vec<Arc<Resident>>, Arc<Resident>> {
        let mut g = self.write();
        let version = resident.version;
        match g.versions.get_mut(&version) {
            Some(e) if e.state == LoadState::Loading && e.resident.is_none() => {
                e.state = LoadState::Ready;
                e.spec = Some(resident.spec.clone());
                e.resident = Some(resident);
            }
            _ => return Err(resident),
        }
        let takes_over = g.split.is_none() && g.latest.is_none_or(|l| version > l);
        if takes_over {
            g.latest = Some(version);
            g.rebuild();
        }
        let newest = g
            .versions
            .iter()
            .rev()
            .find(|(_, e)| e.resident.is_some())
            .map(|(v, _)| *v);
        // Taking over retires every other version (none has traffic now); a
        // new canary candidate under a split retires older candidates.
        let candidate = g.split.is_some() && newest == Some(version);
        let drop: Vec<u64> = g
            .versions
            .iter()
            .filter(|(v, e)| **v != version && e.resident.is_some())
            .filter(|(v, _)| takes_over || (candidate && g.traffic_of(**v) == 0))
            .map(|(v, _)| *v)
            .collect();
        let mut retired = Vec::new();
        for v in drop {
            if let Some(e) = g.versions.get_mut(&v) {
                if let Some(r) = e.resident.take() {
                    retired.push(r);
                }
                e.state = LoadState::Unloaded;
            }
        }
        Ok(retired)
    }

    /// Takes a version out of service (it must carry no traffic) and returns
    /// its resident copy for the executor to free.
    pub fn unload(&self, version: u64) -> Result<Option<Arc<Resident>>, ServeError> {
        let mut g = self.write();
        let traffic = g.traffic_of(version);
        if traffic > 0 {
            return Err(ServeError::Conflict(format!(
                "version {version} of model {} serves {traffic}% of users; move its traffic first",
                self.name
            )));
        }
        let Some(e) = g.versions.get_mut(&version) else {
            return Err(ServeError::NotFound(format!(
                "model {} has no version {version}",
                self.name
            )));
        };
        let resident = e.resident.take();
        e.state = LoadState::Unloaded;
        if !e.on_disk {
            g.versions.remove(&version);
        }
        Ok(resident)
    }

    /// The version's folder left the repository. It is forgotten at once when
    /// no traffic points at it (its resident copy returned for freeing), else
    /// kept serving until traffic moves away.
    pub fn vanished(&self, version: u64) -> Option<Arc<Resident>> {
        let mut g = self.write();
        if g.traffic_of(version) > 0 {
            if let Some(e) = g.versions.get_mut(&version) {
                e.on_disk = false;
            }
            return None;
        }
        g.versions.remove(&version).and_then(|e| e.resident)
    }

    /// Versions whose folder is gone and that no longer carry traffic.
    pub fn take_orphans(&self) -> Vec<Arc<Resident>> {
        let mut g = self.write();
        let gone: Vec<u64> = g
            .versions
            .iter()
            .filter(|(v, e)| !e.on_disk && g.traffic_of(**v) == 0)
            .map(|(v, _)| *v)
            .collect();
        gone.into_iter()
            .filter_map(|v| g.versions.remove(&v).and_then(|e| e.resident))
            .collect()
    }

    /// Sets (`Some`) or clears (`None`, back to `latest`) the split. Every
    /// version named must be ready; versions at 0% are left out. Returns the
    /// split now in effect.
    pub fn set_split(&self, split: Option<Split>) -> Result<Split, ServeError> {
        let mut g = self.write();
        if let Some(s) = &split {
            validate_split(&self.name, s, &g.versions)?;
        }
        g.split = split.map(|s| s.into_iter().filter(|(_, p)| *p > 0).collect());
        if g.split.is_none() {
            // Back to the newest version that is ready.
            g.latest = g
                .versions
                .iter()
                .rev()
                .find(|(_, e)| e.state == LoadState::Ready && e.resident.is_some())
                .map(|(v, _)| *v);
        }
        g.rebuild();
        Ok(g.effective())
    }

    /// Sets a split saved by the last run before its versions are loaded:
    /// its users wait (503) rather than see another version meanwhile. The
    /// executor checks it once they are loaded.
    pub fn preset_split(&self, split: Split) {
        let mut g = self.write();
        g.split = Some(split);
        g.rebuild();
    }

    /// In `latest` mode: every resident version but the latest, taken out of
    /// service for the executor to free.
    pub fn take_idle(&self) -> Vec<Arc<Resident>> {
        let mut g = self.write();
        if g.split.is_some() {
            return Vec::new();
        }
        let latest = g.latest;
        g.versions
            .iter_mut()
            .filter(|(v, _)| Some(**v) != latest)
            .filter_map(|(_, e)| {
                let r = e.resident.take()?;
                e.state = LoadState::Unloaded;
                Some(r)
            })
            .collect()
    }

    /// The explicit split, if one is set.
    pub fn split(&self) -> Option<Split> {
        self.read().split.clone()
    }

    /// The effective split: the explicit one, or the latest version at 100.
    pub fn traffic(&self) -> Split {
        self.read().effective()
    }

    /// The version with the largest share (ties: the higher), else the
    /// highest version known.
    pub fn primary_version(&self) -> Option<u64> {
        let g = self.read();
        let eff = g.effective();
        eff.iter()
            .filter(|(_, p)| **p > 0)
            .max_by_key(|(v, p)| (**p, **v))
            .map(|(v, _)| *v)
            .or_else(|| g.versions.keys().next_back().copied())
    }

    pub fn versions(&self) -> Vec<(u64, VersionEntry, u32)> {
        let g = self.read();
        g.versions
            .iter()
            .map(|(v, e)| (*v, e.clone(), g.traffic_of(*v)))
            .collect()
    }

    pub fn version(&self, version: u64) -> Option<VersionEntry> {
        self.read().versions.get(&version).cloned()
    }

    /// The spec describing the model as a whole: its primary version's.
    pub fn spec(&self) -> Option<Arc<ModelSpec>> {
        let g = self.read();
        let primary = g
            .effective()
            .iter()
            .filter(|(_, p)| **p > 0)
            .max_by_key(|(v, p)| (**p, **v))
            .map(|(v, _)| *v);
        primary
            .and_then(|v| g.versions.get(&v)?.spec.clone())
            .or_else(|| g.versions.values().rev().find_map(|e| e.spec.clone()))
    }

    /// The model's state as a whole: ready when its traffic can be served.
    pub fn state(&self) -> LoadState {
        let g = self.read();
        let serving = g.effective().keys().all(|v| {
            g.versions
                .get(v)
                .is_some_and(|e| e.state == LoadState::Ready && e.resident.is_some())
        });
        if !g.buckets.is_empty() && serving {
            return LoadState::Ready;
        }
        if g.versions.values().any(|e| e.state == LoadState::Loading) {
            return LoadState::Loading;
        }
        match g.versions.values().rev().find_map(|e| match &e.state {
            LoadState::Failed(why) => Some(why.clone()),
            _ => None,
        }) {
            Some(why) => LoadState::Failed(why),
            None if g.versions.is_empty() => LoadState::Failed("no version folders".into()),
            None => LoadState::Loading,
        }
    }

    /// The resident version that serves `user_id`, or the one asked for.
    pub fn route(&self, user_id: u64, version: Option<u64>) -> Result<Route, ServeError> {
        let g = self.read();
        let v = match version {
            Some(v) => v,
            None => match g.buckets.get(bucket(&self.name, user_id)) {
                Some(v) => *v,
                None => return Err(self.not_ready(&g)),
            },
        };
        match g.versions.get(&v) {
            Some(VersionEntry {
                state: LoadState::Ready,
                resident: Some(r),
                ..
            }) => Ok(Route {
                resident: r.clone(),
            }),
            _ if version.is_some() => Err(ServeError::NotFound(format!(
                "version {v} of model {} is not loaded; loaded: {}",
                self.name,
                list(
                    g.versions
                        .iter()
                        .filter(|(_, e)| e.resident.is_some())
                        .map(|(v, _)| *v)
                )
            ))),
            _ => Err(ServeError::NotReady(format!(
                "version {v} of model {}, which serves this user, is not loaded yet",
                self.name
            ))),
        }
    }

    fn not_ready(&self, g: &Versions) -> ServeError {
        if g.versions.values().any(|e| e.state == LoadState::Loading) {
            ServeError::NotReady(format!("model {} is still loading", self.name))
        } else {
            let why = g.versions.values().rev().find_map(|e| match &e.state {
                LoadState::Failed(why) => Some(why.clone()),
                _ => None,
            });
            ServeError::NotReady(match why {
                Some(why) => format!("model {} failed to load: {why}", self.name),
                None => format!("model {} has no version loaded", self.name),
            })
        }
    }

    /// The model's admission: its queues' slots and the rates behind
    /// shedding and `Retry-After`.
    pub fn intake(&self) -> &ModelAdmission {
        &self.admission
    }

    pub fn admission(&self, class: Class) -> &Admission {
        self.admission.of(class)
    }

    /// Requests admitted and still waiting, both classes.
    pub fn queued(&self) -> usize {
        self.admission.queued()
    }

    pub fn item_count(&self) -> usize {
        self.items.load(Ordering::Relaxed)
    }

    pub fn set_item_count(&self, n: usize) {
        self.items.store(n, Ordering::Relaxed);
    }
}

fn list(versions: impl Iterator<Item = u64>) -> String {
    let v: Vec<String> = versions.map(|v| v.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn validate_split(
    model: &str,
    split: &Split,
    versions: &BTreeMap<u64, VersionEntry>,
) -> Result<(), ServeError> {
    if split.is_empty() {
        return Err(ServeError::Invalid(
            "split must name at least one version".into(),
        ));
    }
    let sum: u64 = split.values().map(|p| u64::from(*p)).sum();
    if sum != 100 {
        return Err(ServeError::Invalid(format!(
            "split percentages must sum to 100, got {sum}"
        )));
    }
    for v in split.keys() {
        match versions.get(v) {
            Some(e) if e.state == LoadState::Ready && e.resident.is_some() => {}
            Some(e) => {
                return Err(ServeError::Invalid(format!(
                    "version {v} of model {model} is {}, not ready",
                    e.state.as_str()
                )))
            }
            None => {
                return Err(ServeError::Invalid(format!(
                    "model {model} has no version {v}"
                )))
            }
        }
    }
    Ok(())
}

/// All models of the repository, in a fixed order (a model's index).
#[derive(Debug)]
pub struct Registry {
    models: Vec<Arc<ServedModel>>,
    by_name: HashMap<String, ModelIndex>,
    device: RwLock<String>,
    /// Why the GPU is not used, when it is not.
    device_reason: RwLock<Option<String>>,
    health: RwLock<DeviceHealth>,
    /// Catalogues resident in the executor: name → dimension.
    catalogues: Catalogues,
    /// The user feature widths the resident versions read.
    user_dims: SharedUserDims,
}

impl Registry {
    pub fn new(models: Vec<ServedModel>) -> Self {
        let by_name = models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), ModelIndex(i)))
            .collect();
        Self {
            models: models.into_iter().map(Arc::new).collect(),
            by_name,
            device: RwLock::new("cpu".into()),
            device_reason: RwLock::new(None),
            health: RwLock::new(DeviceHealth {
                healthy: true,
                reason: None,
            }),
            catalogues: Catalogues::new(),
            user_dims: SharedUserDims::default(),
        }
    }

    /// The resident catalogues (the executor keeps them current).
    pub fn catalogues(&self) -> &Catalogues {
        &self.catalogues
    }

    /// The user feature widths the resident versions read (the executor
    /// keeps them current).
    pub fn user_dims(&self) -> &SharedUserDims {
        &self.user_dims
    }

    pub fn get(&self, name: &str) -> Option<(ModelIndex, &Arc<ServedModel>)> {
        self.by_name.get(name).map(|&i| (i, self.by_index(i)))
    }

    pub fn by_index(&self, index: ModelIndex) -> &Arc<ServedModel> {
        &self.models[index.0]
    }

    /// Every model with its index, in order.
    pub fn indexed(&self) -> impl Iterator<Item = (ModelIndex, &Arc<ServedModel>)> {
        self.models
            .iter()
            .enumerate()
            .map(|(i, m)| (ModelIndex(i), m))
    }

    pub fn models(&self) -> &[Arc<ServedModel>] {
        &self.models
    }

    pub fn device(&self) -> String {
        self.device.read().expect("device lock poisoned").clone()
    }

    pub fn set_device(&self, device: String) {
        *self.device.write().expect("device lock poisoned") = device;
    }

    pub fn device_reason(&self) -> Option<String> {
        self.device_reason
            .read()
            .expect("device lock poisoned")
            .clone()
    }

    pub fn set_device_reason(&self, reason: Option<String>) {
        *self.device_reason.write().expect("device lock poisoned") = reason;
    }

    pub fn health(&self) -> DeviceHealth {
        self.health.read().expect("health lock poisoned").clone()
    }

    pub fn set_health(&self, health: DeviceHealth) {
        *self.health.write().expect("health lock poisoned") = health;
    }

    /// `None` when every model can serve its traffic, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.models.is_empty() {
            return Some("no models in the repository".into());
        }
        let reasons: Vec<String> = self
            .models
            .iter()
            .filter_map(|m| match m.state() {
                LoadState::Ready => None,
                LoadState::Loading | LoadState::Unloaded => Some(format!("{}: loading", m.name)),
                LoadState::Failed(why) => Some(format!("{}: failed: {why}", m.name)),
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    pub fn ready_count(&self) -> usize {
        self.models
            .iter()
            .filter(|m| m.state() == LoadState::Ready)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A model's rates, as admission reads them (`batch::rate::Gauges`).
    impl ServedModel {
        fn set_rate(&self, per_second: f64) {
            self.intake().rates().set_throughput(per_second);
        }

        fn set_service_rate(&self, per_second: f64) {
            self.intake().rates().set_service_rate(per_second);
        }

        fn expected_wait(&self, ahead: usize) -> Option<Duration> {
            self.intake().rates().expected_wait(ahead)
        }

        fn retry_after(&self, waiting: usize) -> Duration {
            self.intake().rates().retry_after(waiting)
        }
    }

    fn spec() -> Arc<ModelSpec> {
        Arc::new(
            toml::from_str(
                "kind = \"two_tower\"\ndim = 4\nuser_feature_dim = 0\nhistory_len = 5\nitems = \"i\"\n",
            )
            .unwrap(),
        )
    }

    fn resident(id: usize, version: u64) -> Arc<Resident> {
        Arc::new(Resident {
            id: ModelId::new(id),
            model: ModelIndex::new(0),
            version,
            spec: spec(),
            cpu_reason: None,
            engine: None,
            catalogue: "i".into(),
        })
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("demo", 42), bucket("demo", 42));
        let mut counts = [0usize; 100];
        for u in 0..100_000u64 {
            counts[bucket("demo", u)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        // The model name is part of the hash: splits of two models are independent.
        let same = (0..1000u64)
            .filter(|&u| bucket("a", u) == bucket("b", u))
            .count();
        assert!(same < 50, "{same}");
    }

    #[test]
    fn latest_takes_over_and_retires_the_old_version_and_a_split_pins_traffic() {
        let m = ServedModel::new("demo".into(), 16, 16);
        m.add_version(1, Some(spec()), LoadState::Loading);
        assert!(m.version_ready(resident(0, 1)).unwrap().is_empty());
        assert_eq!(m.traffic(), BTreeMap::from([(1, 100)]));
        assert_eq!(m.route(7, None).unwrap().resident.version, 1);
        m.add_version(2, Some(spec()), LoadState::Loading);
        let old = m.version_ready(resident(1, 2)).unwrap();
        assert_eq!(old.iter().map(|r| r.version).collect::<Vec<_>>(), vec![1]);
        assert_eq!(m.traffic(), BTreeMap::from([(2, 100)]));
        assert_eq!(m.version(1).unwrap().state, LoadState::Unloaded);
        // A split needs ready versions that sum to 100.
        let e = m
            .set_split(Some(BTreeMap::from([(1, 50), (2, 50)])))
            .unwrap_err();
        assert_eq!(e.status(), 422, "{e}");
        let e = m.set_split(Some(BTreeMap::from([(2, 90)]))).unwrap_err();
        assert!(e.to_string().contains("sum to 100, got 90"), "{e}");
        m.add_version(1, Some(spec()), LoadState::Loading);
        assert!(
            m.version_ready(resident(2, 1)).unwrap().is_empty(),
            "older: no traffic, nothing retired"
        );
        m.set_split(Some(BTreeMap::from([(1, 10), (2, 90)])))
            .unwrap();
        let on_1 = (0..10_000u64)
            .filter(|&u| m.route(u, None).unwrap().resident.version == 1)
            .count();
        assert!((850..=1150).contains(&on_1), "{on_1}");
        // While a split is set, a new version gets no traffic.
        m.add_version(3, Some(spec()), LoadState::Loading);
        assert!(m.version_ready(resident(3, 3)).unwrap().is_empty());
        assert_eq!(m.traffic().get(&3), None);
        assert_eq!(m.route(1, Some(3)).unwrap().resident.version, 3);
        // Unloading a version that carries traffic is refused.
        assert_eq!(m.unload(1).unwrap_err().status(), 409);
        assert_eq!(m.unload(3).unwrap().unwrap().version, 3);
        assert_eq!(m.route(1, Some(3)).unwrap_err().status(), 404);
        // A newer candidate replaces an older one that had no traffic.
        m.add_version(3, Some(spec()), LoadState::Loading);
        m.version_ready(resident(4, 3)).unwrap();
        m.add_version(4, Some(spec()), LoadState::Loading);
        let gone = m.version_ready(resident(5, 4)).unwrap();
        assert_eq!(gone.iter().map(|r| r.version).collect::<Vec<_>>(), vec![3]);
        // Back to latest: the newest ready version; the others without
        // traffic are handed back.
        m.set_split(None).unwrap();
        assert_eq!(m.traffic(), BTreeMap::from([(4, 100)]));
        assert_eq!(m.primary_version(), Some(4));
        let idle = m.take_idle();
        assert_eq!(
            idle.iter().map(|r| r.version).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn a_version_unloaded_or_removed_while_loading_is_not_put_in_service() {
        let m = ServedModel::new("demo".into(), 16, 16);
        m.add_version(1, Some(spec()), LoadState::Loading);
        m.version_ready(resident(0, 1)).unwrap();
        assert!(m.begin_load(2));
        assert!(!m.begin_load(2), "already loading");
        assert!(!m.begin_load(1), "already resident");
        assert!(m.vanished(2).is_none());
        assert!(
            m.version_ready(resident(1, 2)).is_err(),
            "removed while loading"
        );
        assert_eq!(m.traffic(), BTreeMap::from([(1, 100)]));
        assert!(m.begin_load(3));
        m.unload(3).unwrap();
        assert!(
            m.version_ready(resident(2, 3)).is_err(),
            "unloaded while loading"
        );
        // A poll seeing a loaded version again changes nothing.
        m.add_version(1, None, LoadState::Unloaded);
        assert_eq!(m.version(1).unwrap().state, LoadState::Ready);
        assert_eq!(m.route(5, None).unwrap().resident.version, 1);
    }

    #[test]
    fn versions_at_zero_percent_are_left_out_of_a_split() {
        let m = ServedModel::new("demo".into(), 16, 16);
        for (id, v) in [(0, 1), (1, 2)] {
            m.add_version(v, Some(spec()), LoadState::Loading);
            m.version_ready(resident(id, v)).unwrap();
        }
        m.add_version(1, Some(spec()), LoadState::Loading);
        m.version_ready(resident(2, 1)).unwrap();
        let eff = m
            .set_split(Some(BTreeMap::from([(1, 100), (2, 0)])))
            .unwrap();
        assert_eq!(eff, BTreeMap::from([(1, 100)]));
        m.unload(2).unwrap();
        assert_eq!(m.state(), LoadState::Ready);
    }

    #[test]
    fn a_vanished_version_is_kept_while_it_carries_traffic() {
        let m = ServedModel::new("demo".into(), 16, 16);
        m.add_version(1, Some(spec()), LoadState::Loading);
        m.version_ready(resident(0, 1)).unwrap();
        m.add_version(2, Some(spec()), LoadState::Loading);
        m.version_ready(resident(1, 2)).unwrap();
        m.set_split(Some(BTreeMap::from([(2, 100)]))).unwrap();
        assert!(m.vanished(2).is_none(), "serving: kept");
        assert!(m.take_orphans().is_empty());
        m.add_version(1, Some(spec()), LoadState::Loading);
        m.version_ready(resident(2, 1)).unwrap();
        m.set_split(Some(BTreeMap::from([(1, 100)]))).unwrap();
        let freed = m.take_orphans();
        assert_eq!(freed.iter().map(|r| r.version).collect::<Vec<_>>(), vec![2]);
        assert!(m.version(2).is_none());
    }

    #[test]
    fn the_expected_wait_is_the_queue_ahead_at_the_service_rate() {
        let m = ServedModel::new("m".into(), 10, 10);
        assert_eq!(m.expected_wait(100), None, "nothing measured yet");
        m.set_service_rate(1000.0);
        assert_eq!(m.expected_wait(0), None, "nothing ahead");
        assert_eq!(m.expected_wait(250), Some(Duration::from_millis(250)));
    }

    #[test]
    fn retry_after_is_the_time_recent_throughput_needs_for_the_queue() {
        let m = ServedModel::new("demo".into(), 16, 16);
        assert_eq!(m.retry_after(500), Duration::from_secs(1), "no rate yet");
        m.set_rate(100.0);
        assert_eq!(m.retry_after(50), Duration::from_secs(1), "at least 1 s");
        assert_eq!(m.retry_after(1024), Duration::from_secs(11));
        m.set_rate(1.0);
        assert_eq!(m.retry_after(1_000_000), Duration::from_secs(60));
    }
}
