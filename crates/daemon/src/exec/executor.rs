//! The executor thread: it owns the backend, the item tables and the user
//! store, and it alone drives the scheduler. Its loop is: receive commands →
//! poll the scheduler → prepare the batch → run it → reply. Commands arrive on
//! one channel in arrival order, so an update applied before a request
//! arrived is seen by that request. The thread blocks on the channel, never
//! on a tokio worker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flume::{Receiver, RecvTimeoutError, TryRecvError};
use tokio::sync::oneshot;

use super::{deadline_exceeded, Command, ExecutorHandle, InferRequest, LoadState, Op, Registry};
use crate::backend::{Backend, BatchBounds, ModelDesc, ModelId, Query, Task};
use crate::batch::{BatchPolicy, DropReason, Poll, QueueKey, Run, Scheduler};
use crate::error::ServeError;
use crate::features::snapshot::Snapshot;
use crate::features::store::State;
use crate::features::UserStore;
use crate::metrics::Metrics;
use crate::model::{ItemTable, ModelEntry, ModelSpec, TowerWeights};

struct Slot {
    name: String,
    spec: Option<ModelSpec>,
    /// Index into `tables` once loaded.
    table: Option<usize>,
}

struct Executor {
    backend: Box<dyn Backend>,
    device: String,
    slots: Vec<Slot>,
    scheduler: Scheduler<InferRequest>,
    state: State,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

/// Starts the executor thread for `backend`. It loads `entries` (which must be
/// in registry order) before taking requests; `loaded` fires when all are done.
/// User histories keep the newest `history_max` ids (at least every model's
/// `history_len`).
pub fn spawn(
    backend: Box<dyn Backend>,
    entries: Vec<ModelEntry>,
    snapshot: Option<Snapshot>,
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
    };
    let device = backend.device();
    registry.set_device(device.clone());
    std::thread::Builder::new()
        .name(format!("rankd-exec-{device}"))
        .spawn(move || {
            let mut scheduler = Scheduler::new();
            let slots = entries
                .iter()
                .enumerate()
                .map(|(model, e)| {
                    let b = e
                        .spec
                        .as_ref()
                        .map(|s| s.batching.clone())
                        .unwrap_or_default();
                    scheduler.add_queue(
                        QueueKey { model },
                        BatchPolicy {
                            max_rows: b.max_batch_size,
                            max_delay: Duration::from_micros(b.max_queue_delay_us),
                        },
                    );
                    Slot {
                        name: e.name.clone(),
                        spec: e.spec.as_ref().ok().cloned(),
                        table: None,
                    }
                })
                .collect();
            let history_cap = entries
                .iter()
                .filter_map(|e| e.spec.as_ref().ok().map(|s| s.history_len))
                .fold(history_max, usize::max);
            let mut exec = Executor {
                backend,
                device,
                slots,
                scheduler,
                state: State::new(history_cap),
                registry,
                metrics,
            };
            exec.load_all(&entries);
            exec.publish_health();
            if let Some(s) = snapshot {
                exec.state.restore(&s);
                exec.sync_backend_tables();
                exec.publish_item_counts();
                tracing::info!(
                    users = s.users.len(),
                    items = s.items.len(),
                    "feature state restored from the snapshot"
                );
            }
            let _ = loaded_tx.send(());
            exec.run(rx);
        })
        .expect("spawning the executor thread");
    (handle, loaded_rx)
}

impl Executor {
    fn load_all(&mut self, entries: &[ModelEntry]) {
        let mut table_paths: HashMap<PathBuf, usize> = HashMap::new();
        for (id, entry) in entries.iter().enumerate() {
            let started = Instant::now();
            let served = self.registry.by_id(id).clone();
            let result = entry
                .spec
                .clone()
                .and_then(|spec| self.load_one(id, entry, &spec, &mut table_paths));
            match result {
                Ok(()) => {
                    served.set_state(LoadState::Ready);
                    self.metrics
                        .set_model_state(&entry.name, entry.version, "ready");
                    tracing::info!(
                        model = %entry.name,
                        version = entry.version,
                        device = %self.device,
                        ms = started.elapsed().as_millis() as u64,
                        "model loaded and warmed"
                    );
                }
                Err(e) => {
                    served.set_state(LoadState::Failed(e.to_string()));
                    self.metrics
                        .set_model_state(&entry.name, entry.version, "failed");
                    tracing::error!(model = %entry.name, version = entry.version, error = %e, "model failed to load");
                }
            }
        }
    }

    fn load_one(
        &mut self,
        id: ModelId,
        entry: &ModelEntry,
        spec: &ModelSpec,
        table_paths: &mut HashMap<PathBuf, usize>,
    ) -> Result<(), crate::model::ModelError> {
        use crate::model::ModelError;
        let weights = TowerWeights::load(&entry.resolve(&spec.weights), spec)?;
        let items_path = entry.resolve(&spec.items);
        let key = items_path.canonicalize().map_err(|e| ModelError::Io {
            path: items_path.clone(),
            message: e.to_string(),
        })?;
        let table = match table_paths.get(&key) {
            Some(&t) if self.state.tables[t].dim() == spec.dim => t,
            Some(&t) => {
                return Err(ModelError::Shape {
                    path: items_path,
                    tensor: "embeddings".into(),
                    expected: format!("[N, {}]", spec.dim),
                    actual: vec![self.state.tables[t].rows(), self.state.tables[t].dim()],
                })
            }
            None => {
                let t = ItemTable::load(&items_path, spec.dim)?;
                self.state.tables.push(t);
                let id = self.state.tables.len() - 1;
                table_paths.insert(key, id);
                self.backend
                    .load_table(id, &self.state.tables[id], spec.item_dtype)
                    .map_err(|e| ModelError::Device {
                        path: items_path.clone(),
                        message: e.to_string(),
                    })?;
                id
            }
        };
        let desc = ModelDesc {
            kind: spec.kind,
            dim: spec.dim,
            user_feature_dim: spec.user_feature_dim,
            bounds: BatchBounds::of(spec, self.state.users.history_cap()),
        };
        let backend_err = |e: crate::backend::BackendError| ModelError::Device {
            path: entry.dir.clone(),
            message: e.to_string(),
        };
        self.backend
            .load(id, desc, table, &weights)
            .map_err(backend_err)?;
        // Warm up at every batch shape the backend will run, so the first
        // real batches pay no first-use costs. The kind says how many rows
        // its largest batch holds and how a batch of each size is laid out.
        let sizes = self.backend.warm_batch_sizes(spec.max_batch_rows());
        let has_rows = self.state.tables[table].rows() > 0;
        let most = sizes.iter().copied().max().unwrap_or(0);
        let rows = vec![0u32; if has_rows { most } else { 0 }];
        for size in sizes {
            let queries: Vec<Query<'_>> = spec.kind.warm_batch(size, &rows);
            self.backend
                .run(id, &self.state.tables[table], &queries)
                .map_err(backend_err)?;
        }
        self.slots[id].table = Some(table);
        self.registry
            .by_id(id)
            .set_item_count(self.state.tables[table].live_count());
        Ok(())
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
            let cmd = match self.scheduler.poll(Instant::now()) {
                Poll::Run(run) => {
                    self.execute(run);
                    continue;
                }
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
        while let Some(run) = self.scheduler.drain(Instant::now()) {
            self.execute(run);
        }
        tracing::debug!(device = %self.device, "executor stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Infer(req, permit) => {
                if let Err(req) = self.scheduler.push(req, permit) {
                    let _ = req.reply.send(Err(ServeError::Internal(format!(
                        "no queue for model {}: this is a bug",
                        req.model
                    ))));
                }
            }
            Command::GetUser(user_id, reply) => {
                let _ = reply.send(Ok(self.state.user_summary(user_id)));
            }
            Command::UpsertUser(update, reply) => {
                let dims = self.feature_dims();
                let result = self.state.upsert_user(update, &dims);
                if result.is_ok() {
                    self.metrics.user_updates.with_label_values(&["api"]).inc();
                }
                let _ = reply.send(result);
            }
            Command::WriteItem(write, reply) => {
                let result = self.state.write_item_request(write);
                self.sync_backend_tables();
                self.publish_item_counts();
                let _ = reply.send(result);
            }
            Command::Apply(batch, reply) => {
                let report = self.state.apply(&batch);
                if report.items > 0 {
                    self.sync_backend_tables();
                    self.publish_item_counts();
                }
                let _ = reply.send(Ok(report));
            }
            Command::Capture { full, reply } => {
                let _ = reply.send(Ok(self.state.capture(full)));
            }
        }
    }

    fn feature_dims(&self) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|s| s.table.is_some())
            .filter_map(|s| s.spec.as_ref().map(|s| s.user_feature_dim))
            .collect()
    }

    /// Hands the rows written on the host to the backend's device copy.
    fn sync_backend_tables(&mut self) {
        for (table, rows) in self.state.take_changed_rows() {
            if let Err(e) = self
                .backend
                .items_changed(table, &self.state.tables[table], &rows)
            {
                tracing::error!(table, error = %e, "device copy of the item table not updated");
            }
        }
    }

    /// Tells the registry how many live items each model's table holds.
    fn publish_item_counts(&self) {
        for (id, slot) in self.slots.iter().enumerate() {
            if let Some(t) = slot.table {
                self.registry
                    .by_id(id)
                    .set_item_count(self.state.tables[t].live_count());
            }
        }
    }

    fn publish_health(&self) {
        let health = self.backend.health();
        if health != self.registry.health() {
            self.registry.set_health(health);
        }
    }

    fn execute(&mut self, run: Run<InferRequest>) {
        let Run {
            key,
            batch,
            dropped,
        } = run;
        let id = key.model;
        let slot = &self.slots[id];
        let name = slot.name.clone();
        for d in dropped {
            self.metrics
                .dropped
                .with_label_values(&[&name, d.reason.as_str()])
                .inc();
            if d.reason == DropReason::Deadline {
                let req = d.request;
                let _ = req
                    .reply
                    .send(Err(deadline_exceeded(req.deadline - req.enqueued)));
            }
        }
        self.metrics
            .queue_depth
            .with_label_values(&[&name])
            .set(self.registry.by_id(id).queued() as i64);
        if batch.is_empty() {
            return;
        }
        let (Some(spec), Some(table)) = (slot.spec.as_ref(), slot.table) else {
            for req in batch {
                let _ = req.reply.send(Err(ServeError::NotReady(format!(
                    "model {name} is not loaded"
                ))));
            }
            return;
        };
        let items = &self.state.tables[table];
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        let mut prepared = Vec::with_capacity(batch.len());
        for req in batch {
            match prepare(&req.op, spec, items, &self.state.users) {
                Ok(p) => {
                    self.metrics
                        .queue_seconds
                        .with_label_values(&[&name])
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
            .map(|(p, req)| Query {
                history: &p.history,
                features: match &req.op {
                    Op::Recommend { user_id, .. } | Op::Score { user_id, .. } => self
                        .state
                        .users
                        .get(*user_id)
                        .and_then(|u| u.features.as_deref())
                        .filter(|f| f.len() == spec.user_feature_dim),
                },
                task: match &req.op {
                    Op::Recommend { k, .. } => Task::TopK {
                        k: *k,
                        exclude: &p.rows,
                    },
                    Op::Score { .. } => Task::Score { rows: &p.rows },
                },
            })
            .collect();
        let rows: usize = live.iter().map(|r| r.rows).sum();
        let started = Instant::now();
        let result = self.backend.run(id, items, &queries);
        self.metrics
            .exec_seconds
            .with_label_values(&[&name, &self.device])
            .observe(started.elapsed().as_secs_f64());
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
                for (req, out) in live.into_iter().zip(outputs) {
                    let _ = req.reply.send(Ok(out));
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
}

fn prepare(
    op: &Op,
    spec: &ModelSpec,
    items: &ItemTable,
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
    Ok(Prepared { history, rows })
}
