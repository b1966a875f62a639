//! The executor thread: it owns the backend, the item tables and the user
//! store, and it alone drives the scheduler. Its loop is: receive commands →
//! poll the scheduler → prepare the batch → run it → reply, with one warm-up
//! batch of a version being loaded between batches. Commands arrive on one
//! channel in arrival order, so an update applied before a request arrived is
//! seen by that request. The thread blocks on the channel, never on a tokio
//! worker.
//!
//! Which versions and tables are resident, and when they go, is
//! `residency`; the user and item state and its writes, `feature_state`; how a
//! batch's requests become queries, `prepare`; answers from the popular
//! items, `popular`; who is shed and how fast a model answers, `batch`.

use std::sync::Arc;
use std::time::Instant;

use flume::{Receiver, RecvTimeoutError, TryRecvError};
use tokio::sync::oneshot;

use super::feature_state::FeatureState;
use super::online::OnlineEval;
use super::query_cache::{self, QueryCache};
use super::residency::{Parts, Residency};
use super::{
    popular, prepare, Answer, Command, ExecutorHandle, InferRequest, ModelIndex, Note, Registry,
    Startup,
};
use crate::backend::Backend;
use crate::batch::rate::Meters;
use crate::batch::{Class, Poll, Run, Scheduler};
use crate::error::ServeError;
use crate::features::store::State;
use crate::metrics::Metrics;
use crate::model::spec::Degrade;

struct Executor {
    backend: Box<dyn Backend>,
    device: String,
    residency: Residency,
    scheduler: Scheduler<InferRequest>,
    features: FeatureState,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    degrade: Degrade,
    /// Each model's throughput and service rate.
    meters: Meters<ModelIndex>,
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
            let mut state = State::new(history_cap);
            state.max_users = startup.max_users;
            let online = OnlineEval::new(startup.online_users, startup.online_window);
            let (popularity, r, m) = (startup.popularity, registry.clone(), metrics.clone());
            let mut exec = Executor {
                backend,
                residency: Residency::new(r.clone(), m.clone(), device.clone()),
                device,
                scheduler: Scheduler::new(),
                features: FeatureState::new(state, online, popularity, r, m),
                registry,
                metrics,
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
                exec.features.restore(&s);
                exec.items_changed();
            }
            if let Some((dir, sync)) = startup.wal {
                let dims = exec.residency.user_dims();
                if exec.features.open_log(&dir, wal_from, sync, &dims) {
                    exec.items_changed();
                }
            }
            exec.features.evict_users();
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
            state: &mut self.features.state,
            scheduler: &mut self.scheduler,
            query_cache: &mut self.query_cache,
        };
        (&mut self.residency, parts)
    }

    fn warm_step(&mut self) -> bool {
        let (residency, mut parts) = self.residency();
        residency.warm_step(&mut parts)
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
            self.features.evict_users();
            // The turn's writes are logged (one sync) before any is answered.
            self.features.commit();
            let (residency, mut parts) = self.residency();
            residency.collect_retired(&mut parts);
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
        self.features.commit();
        while let Some(run) = self.scheduler.drain(Instant::now()) {
            self.execute(run);
        }
        self.residency.stop();
        tracing::debug!(device = %self.device, "executor stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Infer(req, permit) => {
                if popular::is_cold_start(&req, &self.features.state.users) {
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
                let labels = [name.as_str(), reason.as_str()];
                self.metrics.degraded.with_label_values(&labels).inc();
                self.answer_popular(req, Note::Degraded);
            }
            Command::Install(files, reply) => {
                let (residency, mut parts) = self.residency();
                residency.install(&mut parts, *files, reply);
            }
            Command::Retire(resident) => self.residency.retire(resident),
            Command::GetUser(user_id, reply) => {
                let _ = reply.send(Ok(self.features.state.user_summary(user_id)));
            }
            Command::UpsertUser(update, reply) => {
                let dims = self.residency.user_dims();
                self.features.upsert_user(update, reply, &dims);
            }
            Command::WriteItem(write, reply) => {
                self.features.write_item(write, reply);
                self.items_changed();
            }
            Command::GetItem(catalogue, item_id, reply) => {
                let _ = reply.send(self.features.state.item(&catalogue, item_id));
            }
            Command::Served {
                user,
                model,
                version,
                items,
            } => {
                if self
                    .features
                    .served(user, model, version, &items, Instant::now())
                {
                    let name = &self.registry.by_index(model).name;
                    self.features.impressions(name, &version.to_string(), 1);
                }
            }
            Command::Catalogues(reply) => {
                let _ = reply.send(Ok(self.residency.catalogues(&self.features.state)));
            }
            #[cfg(feature = "kafka")]
            Command::Apply(batch, reply) => {
                let report = self.features.apply(&batch);
                if report.items > 0 {
                    self.items_changed();
                }
                let _ = reply.send(Ok(report));
            }
            Command::Capture { full, reply } => {
                let _ = reply.send(Ok(self.features.capture(full)));
            }
        }
    }

    /// Item rows were written on the host (`Residency::items_changed`).
    fn items_changed(&mut self) {
        self.residency
            .items_changed(&mut *self.backend, &mut self.features.state);
    }

    fn publish_health(&self) {
        let health = self.backend.health();
        if health != self.registry.health() {
            self.registry.set_health(health);
        }
    }

    /// Runs a batch the scheduler handed over: answers the requests dropped
    /// as it was taken, prepares the others, runs them and replies.
    fn execute(&mut self, run: Run<InferRequest>) {
        let Run {
            key,
            batch,
            dropped,
        } = run;
        let id = key.model;
        let taken = Instant::now();
        let Some(slot) = self.residency.slot(id) else {
            return batch.into_iter().for_each(InferRequest::not_resident);
        };
        let (name, label, spec) = (slot.name.clone(), slot.label.clone(), slot.spec.clone());
        let (model, version, table) = (slot.model, slot.version, slot.table);
        let degraded = |req| self.answer_popular(req, Note::Degraded);
        popular::answer_dropped(dropped, &name, self.degrade, &self.metrics, degraded);
        let served = self.registry.by_index(model);
        for class in [Class::Interactive, Class::Bulk] {
            let depth = served.admission(class).depth();
            self.metrics.set_queue_depth(&name, class.as_str(), depth);
        }
        if batch.is_empty() {
            return;
        }
        let state = &self.features.state;
        let (items, users) = (&state.tables[table], &state.users);
        let now = Instant::now();
        let (live, prepared) = prepare::batch(batch, &spec, items, state.name_of(table), users);
        for req in &live {
            let waited = self
                .metrics
                .queue_seconds
                .with_label_values(&[&name, req.class.as_str()]);
            waited.observe((now - req.enqueued).as_secs_f64());
        }
        if live.is_empty() {
            return;
        }
        let queries = prepare::queries(&live, &prepared, &spec, users);
        let rows: usize = live.iter().map(|r| r.rows).sum();
        let started = Instant::now();
        // Through the query cache where the backend computes the query
        // vectors apart from the scan.
        let result = if self.query_cache.enabled() && self.backend.embeds(id) {
            let keys = prepare::cache_keys(&live, users);
            let (backend, cache) = (&mut *self.backend, &mut self.query_cache);
            let dim = spec.dim;
            let result = query_cache::run(backend, cache, id, dim, items, &queries, &keys);
            result.map(|(out, n)| {
                let bytes = self.query_cache.bytes();
                self.metrics
                    .query_cache_used(&name, n.hits, n.misses, bytes);
                out
            })
        } else {
            self.backend.run(id, items, &queries)
        };
        let elapsed = started.elapsed();
        self.batches += 1;
        self.scheduler.record(key, rows, elapsed);
        drop(queries);
        let (device, requests) = (&self.device, live.len());
        self.metrics
            .batch_ran(&name, &label, device, elapsed, rows, requests);
        self.publish_health();
        let outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "batch failed");
                for req in live {
                    let _ = req.reply.send(Err(ServeError::Backend(e.clone())));
                }
                return;
            }
        };
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
        let mut impressions = 0u64;
        for (req, output) in live.into_iter().zip(outputs) {
            let counted = self
                .features
                .answered(&req.op, &output, model, version, now);
            impressions += u64::from(counted);
            let batch = trace.clone();
            let _ = req.reply.send(Ok(Answer {
                output,
                note: Note::Model,
                batch,
            }));
        }
        let served = self.registry.by_index(model);
        let (queued, rates) = (served.queued(), served.intake().rates());
        self.meters
            .answered(model, started, n_live, queued, Instant::now(), rates);
        self.features.impressions(&name, &label, impressions);
    }

    fn answer_popular(&self, req: InferRequest, note: Note) {
        let table = self.residency.slot(req.resident.id).map(|s| s.table);
        let top = self.features.popular();
        popular::answer(req, note, &self.features.state, table, &top);
    }
}
