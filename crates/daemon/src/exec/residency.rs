//! Residency: the model versions and item tables the executor holds on its
//! backend, from the moment a version read from the repository is made
//! resident until it is freed.
//!
//! - A version is made resident (its catalogue's table uploaded unless
//!   resident already, its weights loaded, its queue added), then warmed
//!   one batch per turn (one per batch size the backend asks for), then put
//!   in service: the registry routes requests to it from then on.
//! - A catalogue's table is shared by the resident versions that read it,
//!   and counted: it is freed with the last of them, and the registry's
//!   resident catalogues and user feature widths follow.
//! - A version the registry stops routing to is retired. Requests routed to
//!   it hold its `Resident` until they are answered, so it is freed (its
//!   backend state, queue, kept query vectors and table reference) once the
//!   last of them is: requests finish on the version they started on, and
//!   at most the old and the new version of a model are resident at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{self, VersionFiles};
use super::query_cache::QueryCache;
use super::{InferRequest, LoadState, ModelIndex, Registry, Reply, Resident, Split};
use crate::backend::{Backend, BatchBounds, ModelDesc, ModelId, Query, TableId};
use crate::batch::{BatchPolicy, QueueKey, Scheduler};
use crate::error::ServeError;
use crate::features::catalogues::Shape;
use crate::features::store::{CatalogueInfo, State};
use crate::features::UserDims;
use crate::metrics::Metrics;
use crate::model::{ModelEntry, ModelError, ModelSpec};

/// A resident model version.
pub(super) struct Slot {
    /// The model's index in the registry.
    pub model: ModelIndex,
    pub name: String,
    pub version: u64,
    /// `version` as a metric label.
    pub label: String,
    pub spec: Arc<ModelSpec>,
    /// Its catalogue's table in the feature state.
    pub table: TableId,
    catalogue: String,
    /// Where the table was read from.
    table_key: PathBuf,
}

/// A resident catalogue: its table, and how many resident versions read it.
struct Table {
    id: TableId,
    users: usize,
}

/// A version made resident and not yet warmed: one warm-up batch per turn.
struct Warming {
    resident: Arc<Resident>,
    sizes: Vec<usize>,
    next: usize,
    started: Instant,
    reply: Option<Reply<()>>,
}

/// What residency changes besides its own records: the device, the feature
/// state's tables, the queues and the kept query vectors.
pub(super) struct Parts<'a> {
    pub backend: &'a mut dyn Backend,
    pub state: &'a mut State,
    pub scheduler: &'a mut Scheduler<InferRequest>,
    pub query_cache: &'a mut QueryCache,
}

/// The executor's resident versions and tables.
pub(super) struct Residency {
    slots: HashMap<ModelId, Slot>,
    next_id: ModelId,
    /// Resident catalogues by name.
    tables: HashMap<String, Table>,
    warming: VecDeque<Warming>,
    retiring: Vec<Arc<Resident>>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// The executor's device, for the log.
    device: String,
}

impl Residency {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, device: String) -> Self {
        Self {
            slots: HashMap::new(),
            next_id: ModelId::new(0),
            tables: HashMap::new(),
            warming: VecDeque::new(),
            retiring: Vec::new(),
            registry,
            metrics,
            device,
        }
    }

    /// The resident version `id`.
    pub fn slot(&self, id: ModelId) -> Option<&Slot> {
        self.slots.get(&id)
    }

    /// Loads and warms the start-up versions one after the other (nothing is
    /// served yet), then sets the restored splits.
    pub fn load_at_start(
        &mut self,
        p: &mut Parts<'_>,
        versions: Vec<(ModelIndex, ModelEntry)>,
        fallbacks: Vec<(ModelIndex, ModelEntry)>,
        splits: &BTreeMap<ModelIndex, Split>,
    ) {
        for (model, entry) in versions {
            self.load_now(p, model, &entry);
        }
        for (model, entry) in fallbacks {
            let served = self.registry.by_index(model).clone();
            if served.state() == LoadState::Ready || !served.begin_load(entry.version) {
                continue;
            }
            tracing::warn!(model = %served.name, version = entry.version, "the newest version failed to load; trying an older one");
            self.load_now(p, model, &entry);
        }
        for (&model, split) in splits {
            let served = self.registry.by_index(model).clone();
            match served.set_split(Some(split.clone())) {
                Ok(effective) => {
                    tracing::info!(model = %served.name, split = ?effective, "traffic split restored");
                }
                Err(e) => {
                    tracing::error!(
                        model = %served.name,
                        error = %e,
                        "the saved traffic split cannot be restored; serving the latest version"
                    );
                    let _ = served.set_split(None);
                }
            }
            self.publish_traffic(model);
        }
    }

    /// Reads, loads and warms one version at once (nothing is served yet).
    fn load_now(&mut self, p: &mut Parts<'_>, model: ModelIndex, entry: &ModelEntry) {
        let files = load::read(model, entry, |name, dim| {
            self.registry.catalogues().resident(name, dim)
        });
        self.begin(p, (model, entry.version), files, None);
        while self.warm_step(p) {}
    }

    /// Makes a version read from the repository resident; its warm-up
    /// follows in `warm_step`, and `reply` is answered once it serves or
    /// failed.
    pub fn install(&mut self, p: &mut Parts<'_>, files: VersionFiles, reply: Reply<()>) {
        let at = (files.model, files.version);
        self.begin(p, at, Ok(files), Some(reply))
    }

    /// Starts making a read version resident; its warm-up follows in
    /// `warm_step`. A failure is reported at once.
    fn begin(
        &mut self,
        p: &mut Parts<'_>,
        (model, version): (ModelIndex, u64),
        files: Result<VersionFiles, ModelError>,
        reply: Option<Reply<()>>,
    ) {
        match files.and_then(|f| self.make_resident(p, f)) {
            Ok(mut w) => {
                w.reply = reply;
                self.warming.push_back(w);
            }
            Err(e) => self.failed(model, version, &e, reply),
        }
    }

    /// Uploads the version's table (unless resident) and weights, and queues
    /// its warm-up.
    fn make_resident(&mut self, p: &mut Parts<'_>, f: VersionFiles) -> Result<Warming, ModelError> {
        let started = Instant::now();
        let spec = f.spec;
        let table = match self.tables.get_mut(&f.catalogue) {
            Some(t) if p.state.tables[t.id].dim() == spec.dim => {
                t.users += 1;
                t.id
            }
            Some(t) => {
                let resident = &p.state.tables[t.id];
                return Err(ModelError::Shape {
                    path: f.items_key.clone(),
                    tensor: "embeddings".into(),
                    expected: format!("[N, {}]", spec.dim),
                    actual: vec![resident.rows(), resident.dim()],
                });
            }
            None => {
                let table = match f.items {
                    Some(t) => t,
                    // Resident when the file was read, freed since: read it now.
                    None => load::load_table(&f.items_key, spec.dim)?,
                };
                let t = p.state.add_table(&f.catalogue, table);
                if let Err(e) = p.backend.load_table(t, &p.state.tables[t], spec.item_dtype) {
                    p.state.retire_table(t);
                    return Err(ModelError::Device {
                        path: f.items_key.clone(),
                        message: e.to_string(),
                    });
                }
                self.tables
                    .insert(f.catalogue.clone(), Table { id: t, users: 1 });
                self.registry.catalogues().set(
                    &f.catalogue,
                    Some(Shape {
                        dim: spec.dim,
                        attributes: p.state.tables[t].attributes().names().to_vec(),
                    }),
                );
                t
            }
        };
        let id = self.next_id;
        self.next_id = id.next();
        if spec.history_len > p.state.users.history_cap() {
            tracing::info!(
                model = %f.name,
                version = f.version,
                from = p.state.users.history_cap(),
                to = spec.history_len,
                "stored histories grow to this version's window"
            );
            p.state.users.raise_history_cap(spec.history_len);
        }
        let desc = ModelDesc {
            kind: spec.kind,
            dim: spec.dim,
            user_feature_dim: spec.user_feature_dim,
            bounds: BatchBounds::of(&spec, p.state.users.history_cap()),
            cpu_scoring: spec.cpu_scoring,
        };
        if let Err(e) = p.backend.load(id, desc, table, &f.weights) {
            self.release_table(p, &f.catalogue);
            return Err(ModelError::Device {
                path: f.dir.clone(),
                message: e.to_string(),
            });
        }
        p.scheduler.add_queue(
            QueueKey { model: id },
            BatchPolicy {
                max_rows: spec.batching.max_batch_size,
                max_delay: Duration::from_micros(spec.batching.max_queue_delay_us),
                bulk_min_share: spec.batching.bulk_min_share,
            },
        );
        let sizes = p.backend.warm_batch_sizes(spec.max_batch_rows());
        let engine = f
            .weights
            .get::<crate::model::kind::onnx::Graph>()
            .map(|g| g.engine());
        let spec = Arc::new(spec);
        let resident = Arc::new(Resident {
            id,
            model: f.model,
            version: f.version,
            spec: spec.clone(),
            cpu_reason: p.backend.cpu_reason(id),
            engine,
            catalogue: f.catalogue.clone(),
        });
        self.slots.insert(
            id,
            Slot {
                model: f.model,
                name: f.name,
                version: f.version,
                label: f.version.to_string(),
                spec,
                table,
                catalogue: f.catalogue,
                table_key: f.items_key,
            },
        );
        self.registry.user_dims().set(self.user_dims());
        Ok(Warming {
            resident,
            sizes,
            next: 0,
            started,
            reply: None,
        })
    }

    /// Runs the next warm-up batch of the version being loaded; `false` when
    /// none is being loaded. The last one puts the version in service.
    pub fn warm_step(&mut self, p: &mut Parts<'_>) -> bool {
        let Some(w) = self.warming.front_mut() else {
            return false;
        };
        let id = w.resident.id;
        let result = match w.sizes.get(w.next).copied() {
            Some(size) => {
                w.next += 1;
                let slot = &self.slots[&id];
                let items = &p.state.tables[slot.table];
                let has_rows = items.rows() > 0;
                let rows = vec![0u32; if has_rows { size } else { 0 }];
                let queries: Vec<Query<'_>> = slot.spec.warm_batch(size, &rows);
                p.backend.run(id, items, &queries).map(|_| ())
            }
            None => {
                let w = self.warming.pop_front().expect("front exists");
                self.in_service(p, w);
                return true;
            }
        };
        if let Err(e) = result {
            let w = self.warming.pop_front().expect("front exists");
            let (model, version) = (w.resident.model, w.resident.version);
            let path = self.slots[&id].table_key.clone();
            self.free(p, id);
            self.failed(
                model,
                version,
                &ModelError::Device {
                    path,
                    message: e.to_string(),
                },
                w.reply,
            );
        }
        true
    }

    fn in_service(&mut self, p: &mut Parts<'_>, w: Warming) {
        let Warming {
            resident,
            started,
            reply,
            ..
        } = w;
        let (model, version) = (resident.model, resident.version);
        let served = self.registry.by_index(model).clone();
        served.set_item_count(p.state.tables[self.slots[&resident.id].table].live_count());
        let on_cpu = resident.cpu_reason.is_some();
        let retired = match served.version_ready(resident) {
            Ok(retired) => retired,
            Err(resident) => {
                tracing::info!(model = %served.name, version, "version unloaded or removed while it loaded: freed");
                self.metrics
                    .set_model_state(&served.name, version, "unloaded");
                self.retiring.push(resident);
                if let Some(r) = reply {
                    let _ = r.send(Err(ServeError::NotFound(format!(
                        "version {version} of model {} was unloaded or removed while it loaded",
                        served.name
                    ))));
                }
                return;
            }
        };
        self.metrics.set_model_state(&served.name, version, "ready");
        tracing::info!(
            model = %served.name,
            version,
            device = %if on_cpu { "cpu" } else { &self.device },
            ms = started.elapsed().as_millis() as u64,
            traffic = ?served.traffic(),
            "model loaded and warmed"
        );
        for old in retired {
            tracing::info!(model = %served.name, version = old.version, now = version, "version retired: the new one replaces it");
            self.metrics
                .set_model_state(&served.name, old.version, "unloaded");
            self.retiring.push(old);
        }
        self.publish_traffic(model);
        if let Some(r) = reply {
            let _ = r.send(Ok(()));
        }
    }

    fn failed(&self, model: ModelIndex, version: u64, e: &ModelError, reply: Option<Reply<()>>) {
        let served = self.registry.by_index(model);
        let err = super::load_failed(served, &self.metrics, version, e);
        if let Some(r) = reply {
            let _ = r.send(Err(err));
        }
    }

    /// Takes back a version the registry no longer routes to; it is freed
    /// once no request holds it (`collect_retired`).
    pub fn retire(&mut self, resident: Arc<Resident>) {
        self.metrics.set_model_state(
            &self.registry.by_index(resident.model).name,
            resident.version,
            "unloaded",
        );
        self.retiring.push(resident);
    }

    /// Frees retired versions that no request holds any more.
    pub fn collect_retired(&mut self, p: &mut Parts<'_>) {
        if self.retiring.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.retiring.len() {
            if Arc::strong_count(&self.retiring[i]) == 1 {
                let r = self.retiring.swap_remove(i);
                let slot = &self.slots[&r.id];
                tracing::info!(model = %slot.name, version = slot.version, "model version unloaded");
                self.free(p, r.id);
            } else {
                i += 1;
            }
        }
    }

    /// Frees a version's backend state, queue and (when no other version uses
    /// it) item table.
    fn free(&mut self, p: &mut Parts<'_>, id: ModelId) {
        p.backend.unload(id);
        p.query_cache.forget(id);
        self.metrics
            .query_cache_bytes
            .set(p.query_cache.bytes() as i64);
        let removed = p.scheduler.remove_queue(QueueKey { model: id });
        debug_assert!(removed, "a freed version's queue is empty");
        if let Some(slot) = self.slots.remove(&id) {
            let _ = self
                .metrics
                .traffic_share
                .remove_label_values(&[&slot.name, &slot.label]);
            self.release_table(p, &slot.catalogue);
            self.registry.user_dims().set(self.user_dims());
        }
    }

    /// One version less reads `catalogue`: with none left, its table is
    /// freed.
    fn release_table(&mut self, p: &mut Parts<'_>, catalogue: &str) {
        let Some(t) = self.tables.get_mut(catalogue) else {
            return;
        };
        t.users -= 1;
        if t.users == 0 {
            let t = t.id;
            self.tables.remove(catalogue);
            self.registry.catalogues().set(catalogue, None);
            p.backend.unload_table(t);
            p.state.retire_table(t);
        }
    }

    /// At stop: the versions still warming are not served.
    pub fn stop(&mut self) {
        for w in std::mem::take(&mut self.warming) {
            if let Some(r) = w.reply {
                let _ = r.send(Err(ServeError::NotReady("the executor has stopped".into())));
            }
        }
    }

    fn publish_traffic(&self, model: ModelIndex) {
        let served = self.registry.by_index(model);
        let versions: Vec<u64> = served.versions().iter().map(|(v, _, _)| *v).collect();
        self.metrics
            .set_traffic(&served.name, &versions, &served.traffic());
    }

    /// The user feature widths the resident versions read.
    pub fn user_dims(&self) -> UserDims {
        UserDims::of(
            self.slots
                .values()
                .map(|s| (s.spec.user_feature_dim, s.spec.user_sparse_dim)),
        )
    }

    /// The resident catalogues with the versions reading each.
    pub fn catalogues(&self, state: &State) -> Vec<CatalogueInfo> {
        state
            .catalogues()
            .into_iter()
            .map(|(name, t)| {
                let table = &state.tables[t];
                let mut models: Vec<String> = self
                    .slots
                    .values()
                    .filter(|s| s.table == t)
                    .map(|s| format!("{}@{}", s.name, s.version))
                    .collect();
                models.sort_unstable();
                CatalogueInfo {
                    name: name.to_string(),
                    dim: table.dim(),
                    live_rows: table.live_count(),
                    rows: table.rows(),
                    attributes: table.attributes().names().to_vec(),
                    models,
                }
            })
            .collect()
    }

    /// Item rows were written on the host: they reach the tables' device
    /// copies, and the registry's live item counts follow.
    pub fn items_changed(&self, backend: &mut dyn Backend, state: &mut State) {
        for (table, rows) in state.take_changed_rows() {
            if let Err(e) = backend.items_changed(table, &state.tables[table], &rows) {
                tracing::error!(table = table.get(), error = %e, "device copy of the item table not updated");
            }
        }
        self.publish_item_counts(state);
    }

    /// Tells the registry how many live items each model's table holds.
    fn publish_item_counts(&self, state: &State) {
        for slot in self.slots.values() {
            self.registry
                .by_index(slot.model)
                .set_item_count(state.tables[slot.table].live_count());
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::exec::ServedModel;
    use crate::model::kind::TWO_TOWER;
    use crate::model::{ItemTable, Layer, TowerWeights, Weights};

    type Loaded = oneshot::Receiver<Result<(), ServeError>>;

    const A: ModelIndex = ModelIndex::new(0);
    const B: ModelIndex = ModelIndex::new(1);

    /// The executor's parts residency works on, with a CPU backend and two
    /// models, `a` (index 0) and `b` (index 1).
    struct Fixture {
        residency: Residency,
        backend: CpuBackend,
        state: State,
        scheduler: Scheduler<InferRequest>,
        query_cache: QueryCache,
        registry: Arc<Registry>,
    }

    fn spec(dim: usize) -> ModelSpec {
        ModelSpec::parse(&format!(
            "kind = \"two_tower\"\ndim = {dim}\nhistory_len = 5\nitems = \"i.safetensors\"\n"
        ))
        .unwrap()
    }

    fn tower(dim: usize) -> Weights {
        let (i, o) = TWO_TOWER.tower_dims(dim, 0);
        let layer = |out_dim: usize, in_dim: usize| Layer {
            out_dim,
            in_dim,
            weight: vec![0.01; out_dim * in_dim],
            bias: vec![0.0; out_dim],
        };
        Weights::new(TowerWeights {
            layers: vec![layer(8, i), layer(o, 8)],
        })
    }

    fn table(dim: usize) -> ItemTable {
        let ids: Vec<u64> = (1..=10).collect();
        ItemTable::new(dim, ids, vec![0.5; 10 * dim]).unwrap()
    }

    impl Fixture {
        fn new() -> Self {
            let registry = Arc::new(Registry::new(vec![
                ServedModel::new("a".into(), 16, 16),
                ServedModel::new("b".into(), 16, 16),
            ]));
            let metrics = Arc::new(Metrics::new());
            Self {
                residency: Residency::new(registry.clone(), metrics, "cpu".into()),
                backend: CpuBackend::new(),
                state: State::new(5),
                scheduler: Scheduler::new(),
                query_cache: QueryCache::new(1 << 20),
                registry,
            }
        }

        fn parts(&mut self) -> (&mut Residency, Parts<'_>) {
            let parts = Parts {
                backend: &mut self.backend,
                state: &mut self.state,
                scheduler: &mut self.scheduler,
                query_cache: &mut self.query_cache,
            };
            (&mut self.residency, parts)
        }

        /// Hands over `version` of `model` reading `catalogue` of `dim`, read
        /// as the loader reads it (the table only when the catalogue is not
        /// resident at that width), with `weights`.
        fn install_with(
            &mut self,
            model: ModelIndex,
            version: u64,
            catalogue: &str,
            dim: usize,
            weights: Weights,
        ) -> Loaded {
            let served = self.registry.by_index(model).clone();
            assert!(served.begin_load(version));
            let resident = self.registry.catalogues().resident(catalogue, dim);
            let files = VersionFiles {
                model,
                name: served.name.clone(),
                version,
                dir: PathBuf::from(format!("/models/{}/{version}", served.name)),
                spec: spec(dim),
                weights,
                catalogue: catalogue.into(),
                items_key: PathBuf::from(format!("/models/catalogues/{catalogue}/items")),
                items: (!resident).then(|| table(dim)),
            };
            let (reply, rx) = oneshot::channel();
            let (r, mut p) = self.parts();
            r.install(&mut p, files, reply);
            rx
        }

        fn install(&mut self, model: ModelIndex, version: u64, catalogue: &str) -> Loaded {
            self.install_with(model, version, catalogue, 4, tower(4))
        }

        /// Warms every version waiting; the warm-up steps taken.
        fn warm(&mut self) -> usize {
            let (r, mut p) = self.parts();
            std::iter::from_fn(|| r.warm_step(&mut p).then_some(())).count()
        }

        fn collect(&mut self) {
            let (r, mut p) = self.parts();
            r.collect_retired(&mut p);
        }

        /// The version of `model` a request is routed to now, held as a
        /// request holds it.
        fn route(&self, model: ModelIndex) -> Arc<Resident> {
            self.registry
                .by_index(model)
                .route(7, None)
                .unwrap()
                .resident
        }

        /// How many resident versions read `catalogue`.
        fn readers(&self, catalogue: &str) -> usize {
            self.residency.tables.get(catalogue).map_or(0, |t| t.users)
        }

        fn catalogue_models(&self, catalogue: &str) -> Vec<String> {
            let all = self.residency.catalogues(&self.state);
            let c = all.into_iter().find(|c| c.name == catalogue).unwrap();
            c.models
        }
    }

    fn ready(rx: Loaded) {
        match rx.blocking_recv().unwrap() {
            Ok(()) => {}
            Err(e) => panic!("{e}"),
        }
    }

    fn failed(rx: Loaded) -> ServeError {
        rx.blocking_recv().unwrap().unwrap_err()
    }

    #[test]
    fn a_catalogue_is_shared_by_the_versions_reading_it_and_freed_with_the_last() {
        let mut f = Fixture::new();
        let a1 = f.install(A, 1, "videos");
        assert_eq!(f.registry.by_index(A).state(), LoadState::Loading);
        // One warm-up batch (the CPU warms its largest batch), then service.
        assert_eq!(f.warm(), 2);
        ready(a1);
        assert_eq!(f.registry.by_index(A).state(), LoadState::Ready);
        assert!(f.registry.catalogues().resident("videos", 4));
        assert_eq!(f.registry.by_index(A).item_count(), 10);
        let b1 = f.install(B, 1, "videos");
        f.warm();
        ready(b1);
        assert_eq!(f.readers("videos"), 2);
        assert_eq!(f.catalogue_models("videos"), ["a@1", "b@1"]);
        let (a1, b1) = (f.route(A), f.route(B));
        let table = f.residency.slot(a1.id).unwrap().table;
        assert_eq!(f.residency.slot(b1.id).unwrap().table, table, "one table");

        // a's version 2 takes over; a request still holds version 1, which
        // stays resident until it lets go.
        let a2 = f.install(A, 2, "videos");
        f.warm();
        ready(a2);
        assert_eq!(f.route(A).version, 2);
        f.collect();
        assert!(f.residency.slot(a1.id).is_some(), "held by a request");
        assert_eq!(f.readers("videos"), 3);
        let a1_id = a1.id;
        drop(a1);
        f.collect();
        assert!(f.residency.slot(a1_id).is_none(), "freed once let go");
        assert_eq!(f.readers("videos"), 2);
        assert_eq!(f.catalogue_models("videos"), ["a@2", "b@1"]);

        // b moves to another catalogue, then a: the first one goes with
        // its last reader.
        drop(b1);
        let b2 = f.install(B, 2, "music");
        f.warm();
        ready(b2);
        f.collect();
        assert_eq!((f.readers("videos"), f.readers("music")), (1, 1));
        let a3 = f.install(A, 3, "music");
        f.warm();
        ready(a3);
        f.collect();
        assert_eq!((f.readers("videos"), f.readers("music")), (0, 2));
        assert!(!f.registry.catalogues().resident("videos", 4));
        assert_eq!(f.state.table_of("videos"), None);
        assert_eq!(f.catalogue_models("music"), ["a@3", "b@2"]);
    }

    #[test]
    fn item_writes_reach_the_device_copy_and_the_models_item_counts() {
        let mut f = Fixture::new();
        let a1 = f.install(A, 1, "videos");
        f.warm();
        ready(a1);
        let write: crate::features::store::ItemWrite =
            serde_json::from_str(r#"{"item_id": 11, "embedding": [1, 0, 0, 0]}"#).unwrap();
        f.state.write_item_request(write).unwrap();
        assert_eq!(f.registry.by_index(A).item_count(), 10);
        f.residency.items_changed(&mut f.backend, &mut f.state);
        assert_eq!(f.registry.by_index(A).item_count(), 11);
        assert!(
            f.state.take_changed_rows().is_empty(),
            "handed to the device"
        );
    }

    #[test]
    fn a_version_of_another_width_for_a_resident_catalogue_is_refused() {
        let mut f = Fixture::new();
        let a1 = f.install(A, 1, "videos");
        f.warm();
        ready(a1);
        let b1 = f.install_with(B, 1, "videos", 8, tower(8));
        let e = failed(b1);
        assert_eq!(e.status(), 422, "{e}");
        assert!(e.to_string().contains("[N, 8]"), "{e}");
        assert!(matches!(
            f.registry.by_index(B).state(),
            LoadState::Failed(_)
        ));
        assert_eq!(f.warm(), 0, "nothing to warm");
        assert_eq!(f.readers("videos"), 1);
        assert_eq!(f.residency.slots.len(), 1);
    }

    #[test]
    fn a_version_the_device_refuses_gives_back_the_table_it_took() {
        let mut f = Fixture::new();
        let a1 = f.install_with(A, 1, "videos", 4, Weights::new(0u8));
        let e = failed(a1);
        assert!(e.to_string().contains("not a tower"), "{e}");
        assert_eq!(f.readers("videos"), 0);
        assert!(!f.registry.catalogues().resident("videos", 4));
        assert_eq!(f.state.table_of("videos"), None);
        assert!(f.residency.slots.is_empty());
        // The catalogue loads again for the next version.
        let a2 = f.install(A, 2, "videos");
        f.warm();
        ready(a2);
        assert_eq!(f.readers("videos"), 1);
    }

    #[test]
    fn a_version_unloaded_while_it_warms_is_freed_and_its_loader_told() {
        let mut f = Fixture::new();
        let a1 = f.install(A, 1, "videos");
        f.registry.by_index(A).unload(1).unwrap();
        f.warm();
        let e = failed(a1);
        assert_eq!(e.status(), 404, "{e}");
        assert!(e
            .to_string()
            .contains("unloaded or removed while it loaded"));
        f.collect();
        assert!(f.residency.slots.is_empty());
        assert_eq!(f.readers("videos"), 0);
        assert!(!f.registry.catalogues().resident("videos", 4));
    }

    #[test]
    fn warming_takes_one_batch_per_step_and_a_stop_answers_the_loaders_waiting() {
        let mut f = Fixture::new();
        let a1 = f.install(A, 1, "videos");
        let b1 = f.install(B, 1, "videos");
        {
            let (r, mut p) = f.parts();
            assert!(r.warm_step(&mut p), "a's warm-up batch");
            assert!(r.warm_step(&mut p), "a in service");
        }
        ready(a1);
        assert_eq!(f.registry.by_index(B).state(), LoadState::Loading);
        f.residency.stop();
        assert_eq!(failed(b1).status(), 503);
    }
}
