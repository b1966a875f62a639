//! The executor thread: it owns the backend, the item tables and the user
//! store, and it alone drives the scheduler. Its loop is: receive commands →
//! poll the scheduler → prepare the batch → run it → reply, with one warm-up
//! batch of a version being loaded between batches. Commands arrive on one
//! channel in arrival order, so an update applied before a request arrived is
//! seen by that request. The thread blocks on the channel, never on a tokio
//! worker.
//!
//! Each resident model version has its own backend id and queue. A version
//! the registry stops routing to is freed once the last request holding it
//! was answered, so requests finish on the version they started on and at
//! most the old and the new version of a model are resident at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flume::{Receiver, RecvTimeoutError, TryRecvError};
use tokio::sync::oneshot;

use super::online::OnlineEval;
use super::query_cache::{self, Key as CacheKey, QueryCache};
use super::residency::{Parts, Residency};
use super::{
    deadline_exceeded, Answer, Command, ExecutorHandle, InferRequest, Note, Op, Registry, Split,
};
use crate::backend::{Backend, Output, Query, Scored, Task};
use crate::batch::rate::Meters;
use crate::batch::{shed, Class, DropReason, Poll, Run, Scheduler};
use crate::error::ServeError;
use crate::features::durable::Durable;
use crate::features::popularity::{self, Popularity};
use crate::features::snapshot::Snapshot;
use crate::features::store::State;
use crate::features::UserStore;
use crate::metrics::Metrics;
use crate::model::query::RowFilter;
use crate::model::spec::{ColdStart, Degrade};
use crate::model::{ItemTable, ModelEntry, ModelSpec};

/// What the executor is started with.
pub struct Startup {
    /// The versions to load before serving, with their model's index.
    pub versions: Vec<(usize, ModelEntry)>,
    /// Splits restored from the last run, per model index.
    pub splits: BTreeMap<usize, Split>,
    /// Older versions, newest first, tried in turn for a model whose start-up
    /// versions all failed.
    pub fallbacks: Vec<(usize, ModelEntry)>,
    pub snapshot: Option<Snapshot>,
    /// Users remembered for online evaluation (0: off) and the window.
    pub online_users: usize,
    pub online_window: Duration,
    /// The write-ahead log's folder and whether it is synced; `None`: no log.
    pub wal: Option<(PathBuf, bool)>,
    /// Most users held (0: unlimited).
    pub max_users: usize,
    /// Event counts that degraded and cold-start answers come from.
    pub popularity: Arc<Popularity>,
    /// `degrade` for the models whose model.toml does not set it.
    pub degrade: Degrade,
    /// Bytes of query vectors kept for users who ask again (0: off).
    pub query_cache_bytes: usize,
}

struct Executor {
    backend: Box<dyn Backend>,
    device: String,
    residency: Residency,
    scheduler: Scheduler<InferRequest>,
    state: State,
    online: OnlineEval,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// The write-ahead log and the writes waiting for it.
    durable: Durable,
    popularity: Arc<Popularity>,
    degrade: Degrade,
    /// Each model's throughput and service rate (`batch::rate`).
    meters: Meters,
    /// Batches executed, numbering them in spans.
    batches: u64,
    /// Users' query vectors, kept until their state changes.
    query_cache: QueryCache,
}

/// Starts the executor thread for `backend`. It loads the start-up versions
/// before taking requests; `loaded` fires when all are done. User histories
/// keep the newest `history_max` ids (at least every start-up version's
/// `history_len`).
pub fn spawn(
    backend: Box<dyn Backend>,
    startup: Startup,
    history_max: usize,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
) -> (ExecutorHandle, oneshot::Receiver<()>) {
    let (tx, rx) = flume::unbounded();
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let handle = ExecutorHandle {
        tx,
        registry: registry.clone(),
        metrics: metrics.clone(),
        #[cfg(feature = "kafka")]
        popularity: startup.popularity.clone(),
        degrade: startup.degrade,
    };
    let device = backend.device();
    registry.set_device(device.clone());
    std::thread::Builder::new()
        .name(format!("rankd-exec-{device}"))
        .spawn(move || {
            let history_cap = startup
                .versions
                .iter()
                .filter_map(|(_, e)| e.spec.as_ref().ok().map(|s| s.history_len))
                .fold(history_max, usize::max);
            let mut exec = Executor {
                backend,
                residency: Residency::new(registry.clone(), metrics.clone(), device.clone()),
                device,
                scheduler: Scheduler::new(),
                state: {
                    let mut s = State::new(history_cap);
                    s.max_users = startup.max_users;
                    s
                },
                online: OnlineEval::new(startup.online_users, startup.online_window),
                registry,
                metrics,
                durable: Durable::default(),
                popularity: startup.popularity.clone(),
                degrade: startup.degrade,
                meters: Meters::default(),
                batches: 0,
                query_cache: QueryCache::new(startup.query_cache_bytes),
            };
            let (residency, mut parts) = exec.residency();
            let (versions, fallbacks) = (startup.versions, startup.fallbacks);
            residency.load_at_start(&mut parts, versions, fallbacks, &startup.splits);
            exec.publish_health();
            let wal_from = startup.snapshot.as_ref().map_or(0, |s| s.wal_next);
            if let Some(s) = startup.snapshot {
                exec.state.restore(&s);
                exec.items_changed();
                tracing::info!(
                    users = s.users.len(),
                    items = s.items.len(),
                    "feature state restored from the snapshot"
                );
            }
            if let Some((dir, sync)) = startup.wal {
                let dims = exec.residency.user_dims();
                if exec
                    .durable
                    .open(&dir, wal_from, sync, &mut exec.state, &dims)
                {
                    exec.items_changed();
                }
            }
            exec.evict_users();
            let _ = loaded_tx.send(());
            exec.run(rx);
        })
        .expect("spawning the executor thread");
    (handle, loaded_rx)
}

impl Executor {
    /// The residency records, and the parts of the executor they change.
    fn residency(&mut self) -> (&mut Residency, Parts<'_>) {
        let parts = Parts {
            backend: &mut *self.backend,
            state: &mut self.state,
            scheduler: &mut self.scheduler,
            query_cache: &mut self.query_cache,
        };
        (&mut self.residency, parts)
    }

    fn warm_step(&mut self) -> bool {
        let (residency, mut parts) = self.residency();
        residency.warm_step(&mut parts)
    }

    fn collect_retired(&mut self) {
        let (residency, mut parts) = self.residency();
        residency.collect_retired(&mut parts);
    }

    fn run(mut self, rx: Receiver<Command>) {
        loop {
            // Everything that arrived joins its queue (or is applied) first,
            // so a batch is built as late, and as full, as it can be.
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.finish(),
                }
            }
            // Users beyond --max-users go before the turn's writes are
            // answered, so a caller that saw its write acknowledged also sees
            // the user count and evictions it caused.
            self.evict_users();
            // The turn's writes are logged (one sync) before any is answered.
            self.durable.commit();
            self.collect_retired();
            let registry = &self.registry;
            self.meters.idle(|model| registry.by_index(model).queued());
            let cmd = match self.scheduler.poll(Instant::now()) {
                Poll::Run(run) => {
                    self.execute(run);
                    // A version being loaded warms one batch per turn, so a
                    // request waits for at most one warm-up batch.
                    self.warm_step();
                    continue;
                }
                _ if self.warm_step() => continue,
                Poll::Sleep(until) => match rx.recv_deadline(until) {
                    Ok(cmd) => cmd,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return self.finish(),
                },
                Poll::Idle => match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => return self.finish(),
                },
            };
            self.handle(cmd);
        }
    }

    /// Every handle is gone: answer what is still queued, then stop.
    fn finish(mut self) {
        self.durable.commit();
        while let Some(run) = self.scheduler.drain(Instant::now()) {
            self.execute(run);
        }
        self.residency.stop();
        tracing::debug!(device = %self.device, "executor stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Infer(req, permit) => {
                if self.is_cold_start(&req) {
                    drop(permit);
                    let name = &self.registry.by_index(req.resident.model).name;
                    self.metrics.cold_start.with_label_values(&[name]).inc();
                    return self.answer_popular(req, Note::ColdStart);
                }
                if let Err(req) = self.scheduler.push(req, permit) {
                    let _ = req.reply.send(Err(ServeError::Internal(format!(
                        "no queue for version {} of model {}: this is a bug",
                        req.resident.version, req.resident.model
                    ))));
                }
            }
            Command::Degraded(req, reason) => {
                let name = &self.registry.by_index(req.resident.model).name;
                self.metrics
                    .degraded
                    .with_label_values(&[name, reason.as_str()])
                    .inc();
                self.answer_popular(req, Note::Degraded);
            }
            Command::Install(files, reply) => {
                let (residency, mut parts) = self.residency();
                residency.install(&mut parts, *files, reply);
            }
            Command::Retire(resident) => self.residency.retire(resident),
            Command::GetUser(user_id, reply) => {
                let _ = reply.send(Ok(self.state.user_summary(user_id)));
            }
            Command::UpsertUser(update, reply) => {
                let logged = update.clone();
                let dims = self.residency.user_dims();
                let added = self.added_to_history(&update);
                let result = self.state.upsert_user(update, &dims);
                if let (Ok(summary), false) = (&result, added.is_empty()) {
                    self.popularity
                        .record(added.iter().copied(), popularity::now_s());
                    let now = Instant::now();
                    for item in added {
                        self.clicked(summary.user_id, item, now);
                    }
                }
                match result {
                    Ok(summary) => {
                        self.metrics.user_updates.with_label_values(&["api"]).inc();
                        self.durable.user(logged, reply, summary);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::WriteItem(write, reply) => {
                let logged = write.clone();
                let result = self.state.write_item_request(write);
                self.items_changed();
                match result {
                    Ok(summary) => self.durable.item(logged, reply, summary),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::GetItem(catalogue, item_id, reply) => {
                let _ = reply.send(self.state.item(&catalogue, item_id));
            }
            Command::Served {
                user,
                model,
                version,
                items,
            } => {
                if self.online.enabled() && !items.is_empty() {
                    self.online
                        .served(user, model, version, &items, Instant::now());
                    let name = &self.registry.by_index(model).name;
                    self.metrics
                        .online_impressions
                        .with_label_values(&[name, &version.to_string()])
                        .inc();
                }
            }
            Command::Catalogues(reply) => {
                let _ = reply.send(Ok(self.residency.catalogues(&self.state)));
            }
            #[cfg(feature = "kafka")]
            Command::Apply(batch, reply) => {
                if self.online.enabled() {
                    let now = Instant::now();
                    for &(user, item) in &batch.events {
                        self.clicked(user, item, now);
                    }
                }
                let report = self.state.apply(&batch);
                if report.items > 0 {
                    self.items_changed();
                }
                let _ = reply.send(Ok(report));
            }
            Command::Capture { full, reply } => {
                // The new segment starts where the captured state ends.
                self.durable.commit();
                let mut delta = self.state.capture(full);
                if let Some(next) = self.durable.rotate() {
                    delta.wal_next = next;
                }
                let _ = reply.send(Ok(delta));
            }
        }
    }

    /// Holds at most `max_users` users and publishes the user gauges.
    fn evict_users(&mut self) {
        let before = self.state.evicted;
        self.state.evict();
        self.metrics
            .users_evicted
            .inc_by(self.state.evicted - before);
        self.metrics.users.set(self.state.users.len() as i64);
        self.metrics
            .users_bytes
            .set(self.state.users.bytes() as i64);
    }

    /// The items a history write adds to the user's stored history.
    fn added_to_history(&self, update: &super::UserUpdate) -> Vec<u64> {
        let Some(new) = update.history.as_ref() else {
            return Vec::new();
        };
        let old: std::collections::HashSet<u64> = self
            .state
            .users
            .get(update.user_id)
            .map(|u| u.history.iter().copied().collect())
            .unwrap_or_default();
        new.iter().copied().filter(|i| !old.contains(i)).collect()
    }

    /// An event of `user` on `item`, for online evaluation.
    fn clicked(&mut self, user: u64, item: u64, now: Instant) {
        if let Some(hit) = self.online.clicked(user, item, now) {
            let name = &self.registry.by_index(hit.model).name;
            let version = hit.version.to_string();
            self.metrics
                .online_hits
                .with_label_values(&[name, &version])
                .inc();
            self.metrics
                .online_hit_rank
                .with_label_values(&[name, &version])
                .observe(hit.rank as f64);
        }
    }

    /// Item rows were written on the host (`Residency::items_changed`).
    fn items_changed(&mut self) {
        let state = &mut self.state;
        self.residency.items_changed(&mut *self.backend, state);
    }

    fn publish_health(&self) {
        let health = self.backend.health();
        if health != self.registry.health() {
            self.registry.set_health(health);
        }
    }

    /// A recommend for a user with no history and no features, of a model
    /// that answers those from popularity.
    fn is_cold_start(&self, req: &InferRequest) -> bool {
        let Op::Recommend { user_id, .. } = &req.op else {
            return false;
        };
        // Features count only where the model reads them (set for another
        // model, they say nothing to this one); so do categorical features
        // and the request's context.
        let spec = &req.resident.spec;
        let (fd, sd) = (spec.user_feature_dim, spec.user_sparse_dim);
        spec.cold_start == ColdStart::Popular
            && req.op.context().is_none()
            && self.state.users.get(*user_id).is_none_or(|u| {
                u.history.is_empty()
                    && u.features.as_ref().is_none_or(|f| fd == 0 || f.len() != fd)
                    && u.sparse.as_ref().is_none_or(|s| sd == 0 || s.len() != sd)
            })
    }

    /// Answers a recommend with the most popular live items of its table,
    /// then the catalogue in table order, leaving out the user's history
    /// and `exclude`.
    fn answer_popular(&self, req: InferRequest, note: Note) {
        let Op::Recommend {
            user_id,
            k,
            exclude,
            filter,
            ..
        } = &req.op
        else {
            let _ = req.reply.send(Err(ServeError::Internal(
                "only a recommend has a popular answer: this is a bug".into(),
            )));
            return;
        };
        let Some(slot) = self.residency.slot(req.resident.id) else {
            let _ = req.reply.send(Err(ServeError::Internal(format!(
                "version {} of model {} is not resident: this is a bug",
                req.resident.version, req.resident.model
            ))));
            return;
        };
        let items = &self.state.tables[slot.table];
        let attributes = items.attributes();
        let filter = match filter
            .as_ref()
            .map(|f| RowFilter::resolve(f, attributes, self.state.name_of(slot.table)))
            .transpose()
        {
            Ok(f) => f,
            Err(m) => {
                let _ = req.reply.send(Err(ServeError::Invalid(m)));
                return;
            }
        };
        let allowed = |row: u32| {
            filter
                .as_ref()
                .is_none_or(|f| f.allows(attributes, row as usize))
        };
        let mut skip: std::collections::HashSet<u64> = exclude.iter().copied().collect();
        if let Some(u) = self.state.users.get(*user_id) {
            skip.extend(u.history.iter().copied());
        }
        let mut answer: Vec<Scored> = Vec::with_capacity(*k);
        for &(id, score) in self.popularity.top().iter() {
            if answer.len() == *k {
                break;
            }
            if items.live_row_of(id).is_some_and(allowed) && skip.insert(id) {
                answer.push(Scored { id, score });
            }
        }
        for row in 0..items.rows() as u32 {
            if answer.len() == *k {
                break;
            }
            let id = items.id(row);
            if items.is_live(row) && allowed(row) && skip.insert(id) {
                answer.push(Scored { id, score: 0.0 });
            }
        }
        let _ = req.reply.send(Ok(Answer {
            output: Output::TopK(answer),
            note,
            batch: None,
        }));
    }

    fn execute(&mut self, run: Run<InferRequest>) {
        let Run {
            key,
            batch,
            dropped,
        } = run;
        let id = key.model;
        let taken = Instant::now();
        let Some(slot) = self.residency.slot(id) else {
            for req in batch {
                let _ = req.reply.send(Err(ServeError::Internal(format!(
                    "version {} of model {} is not resident: this is a bug",
                    req.resident.version, req.resident.model
                ))));
            }
            return;
        };
        let name = slot.name.clone();
        let label = slot.label.clone();
        let (model, version) = (slot.model, slot.version);
        for d in dropped {
            let req = d.request;
            self.metrics
                .dropped
                .with_label_values(&[&name, d.reason.as_str(), req.class.as_str()])
                .inc();
            match d.reason {
                // Its deadline cannot be met: the popular items, where the
                // model degrades, else the 504 now rather than at the deadline.
                reason if shed::degrades_drop(reason, req.class, req.popular(self.degrade)) => {
                    self.metrics
                        .degraded
                        .with_label_values(&[&name, shed::Shed::Deadline.as_str()])
                        .inc();
                    self.answer_popular(req, Note::Degraded);
                }
                DropReason::Predicted | DropReason::Deadline => {
                    let _ = req
                        .reply
                        .send(Err(deadline_exceeded(req.deadline - req.enqueued)));
                }
                DropReason::Cancelled => {}
            }
        }
        let served_model = self.registry.by_index(model);
        for class in [Class::Interactive, Class::Bulk] {
            self.metrics
                .queue_depth
                .with_label_values(&[&name, class.as_str()])
                .set(served_model.admission(class).depth() as i64);
        }
        if batch.is_empty() {
            return;
        }
        let spec = slot.spec.clone();
        let spec = spec.as_ref();
        let table = slot.table;
        let items = &self.state.tables[table];
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        let mut prepared = Vec::with_capacity(batch.len());
        let catalogue = self.state.name_of(table);
        for req in batch {
            match prepare(&req.op, spec, items, catalogue, &self.state.users) {
                Ok(p) => {
                    self.metrics
                        .queue_seconds
                        .with_label_values(&[&name, req.class.as_str()])
                        .observe((now - req.enqueued).as_secs_f64());
                    prepared.push(p);
                    live.push(req);
                }
                Err(e) => {
                    let _ = req.reply.send(Err(e));
                }
            }
        }
        if live.is_empty() {
            return;
        }
        let queries: Vec<Query<'_>> = prepared
            .iter()
            .zip(&live)
            .map(|(p, req)| {
                let user = self.state.users.get(req.op.user_id());
                Query {
                    history: &p.history,
                    features: user
                        .and_then(|u| u.features.as_deref())
                        .filter(|f| f.len() == spec.user_feature_dim),
                    sparse: user
                        .and_then(|u| u.sparse.as_deref())
                        .filter(|s| s.len() == spec.user_sparse_dim),
                    context: req.op.context(),
                    task: match &req.op {
                        Op::Recommend { k, .. } => Task::TopK {
                            k: *k,
                            exclude: &p.rows,
                            filter: p.filter.as_ref(),
                        },
                        Op::Score { .. } => Task::Score { rows: &p.rows },
                    },
                }
            })
            .collect();
        let rows: usize = live.iter().map(|r| r.rows).sum();
        let started = Instant::now();
        let result = if self.query_cache.enabled() && self.backend.embeds(id) {
            // A query the tower reads a request context for is computed
            // every time; so is one for a user without state.
            let keys: Vec<Option<CacheKey>> = live
                .iter()
                .map(|req| {
                    let user = req.op.user_id();
                    if req.op.context().is_some_and(|c| !c.is_empty()) {
                        return None;
                    }
                    self.state
                        .users
                        .changed_at(user)
                        .map(|changed_at| CacheKey { user, changed_at })
                })
                .collect();
            query_cache::run(
                &mut *self.backend,
                &mut self.query_cache,
                id,
                spec.dim,
                items,
                &queries,
                &keys,
            )
            .map(|(out, counts)| {
                self.metrics
                    .query_cache_hits
                    .with_label_values(&[&name])
                    .inc_by(counts.hits);
                self.metrics
                    .query_cache_misses
                    .with_label_values(&[&name])
                    .inc_by(counts.misses);
                self.metrics
                    .query_cache_bytes
                    .set(self.query_cache.bytes() as i64);
                out
            })
        } else {
            self.backend.run(id, items, &queries)
        };
        let elapsed = started.elapsed();
        self.batches += 1;
        self.scheduler.record(key, rows, elapsed);
        self.metrics
            .exec_seconds
            .with_label_values(&[&name, &label, &self.device])
            .observe(elapsed.as_secs_f64());
        drop(queries);
        self.metrics
            .batch_rows
            .with_label_values(&[&name])
            .observe(rows as f64);
        self.metrics
            .batch_requests
            .with_label_values(&[&name])
            .observe(live.len() as f64);
        self.publish_health();
        match result {
            Ok(outputs) => {
                debug_assert_eq!(outputs.len(), live.len());
                let n_live = live.len() as u64;
                let now = Instant::now();
                let trace = crate::trace::enabled().then(|| {
                    Arc::new(crate::trace::BatchTrace {
                        id: self.batches,
                        requests: live.len(),
                        rows,
                        device: self.device.clone(),
                        taken,
                        started,
                        finished: started + elapsed,
                    })
                });
                let mut served = 0u64;
                for (req, out) in live.into_iter().zip(outputs) {
                    if let (
                        Op::Recommend {
                            user_id,
                            online: true,
                            ..
                        },
                        Output::TopK(items),
                    ) = (&req.op, &out)
                    {
                        if self.online.enabled() && !items.is_empty() {
                            let ids: Vec<u64> = items.iter().map(|s| s.id).collect();
                            self.online.served(*user_id, model, version, &ids, now);
                            served += 1;
                        }
                    }
                    let _ = req.reply.send(Ok(Answer {
                        output: out,
                        note: Note::Model,
                        batch: trace.clone(),
                    }));
                }
                let m = self.registry.by_index(model);
                let (queued, rates) = (m.queued(), m.intake().rates());
                (self.meters).answered(model, started, n_live, queued, Instant::now(), rates);
                if served > 0 {
                    self.metrics
                        .online_impressions
                        .with_label_values(&[&name, &label])
                        .inc_by(served);
                }
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "batch failed");
                for req in live {
                    let _ = req.reply.send(Err(ServeError::Backend(e.clone())));
                }
            }
        }
    }
}

/// Per-request inputs resolved against the item table and the user store.
struct Prepared {
    /// History rows used for pooling (the newest `history_len`).
    history: Vec<u32>,
    /// Sorted excluded rows (recommend) or candidate rows (score).
    rows: Vec<u32>,
    /// A recommend's filter, resolved against the catalogue's attributes.
    filter: Option<RowFilter>,
}

fn prepare(
    op: &Op,
    spec: &ModelSpec,
    items: &ItemTable,
    catalogue: &str,
    users: &UserStore,
) -> Result<Prepared, ServeError> {
    let user_id = match op {
        Op::Recommend { user_id, .. } | Op::Score { user_id, .. } => *user_id,
    };
    let full_history = users.get(user_id).map(|u| &u.history);
    let history: Vec<u32> = full_history
        .map(|h| {
            h.iter()
                .skip(h.len().saturating_sub(spec.history_len))
                .filter_map(|&id| items.row_of(id))
                .collect()
        })
        .unwrap_or_default();
    let rows = match op {
        Op::Recommend { exclude, .. } => {
            let mut rows: Vec<u32> = full_history
                .into_iter()
                .flatten()
                .chain(exclude)
                .filter_map(|&id| items.row_of(id))
                .collect();
            rows.sort_unstable();
            rows.dedup();
            rows
        }
        Op::Score { items: ids, .. } => ids
            .iter()
            .map(|&id| {
                items
                    .live_row_of(id)
                    .ok_or_else(|| ServeError::Invalid(format!("unknown item id {id} in items")))
            })
            .collect::<Result<_, _>>()?,
    };
    let filter = match op {
        Op::Recommend {
            filter: Some(f), ..
        } => Some(
            RowFilter::resolve(f, items.attributes(), catalogue).map_err(ServeError::Invalid)?,
        ),
        _ => None,
    };
    Ok(Prepared {
        history,
        rows,
        filter,
    })
}
