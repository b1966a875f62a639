//! CPU fallback around a device backend. A batch the device fails on is
//! re-executed on the CPU copy of the model (kept in host memory for this),
//! the device is marked unhealthy and probed again after a back-off that
//! doubles up to a ceiling. Item rows written while it was out of service are
//! replayed to it (and models or tables it failed to load are loaded again)
//! before it takes traffic again.
//!
//! A model whose kind has no forward pass on the device is served by the CPU
//! copy alone, for good: that says nothing about the device, which stays in
//! service for every other model.
//!
//! Before a model serves from the device, its forward pass there is checked
//! against the CPU copy's on a small synthetic batch (its own weights, a
//! random table of its width, recommends and scores): a device whose answers
//! disagree serves that model from the CPU, says why, and stays in service
//! for the others. Wrong answers are worse than slow ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cpu::CpuBackend;
use super::{
    Backend, BackendError, DeviceHealth, ModelDesc, ModelId, Output, Query, Reason, TableId,
};
use crate::metrics::Metrics;
use crate::model::{ItemDtype, ItemTable, ModelKind, Weights};

/// Where time comes from (injectable, so back-off is tested without sleeping).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(Instant::now)
}

pub struct Fallback {
    primary: Box<dyn Backend>,
    cpu: CpuBackend,
    device: String,
    healthy: bool,
    reason: Option<String>,
    retry_at: Instant,
    backoff: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    /// Rows written while the device was out of service, per table.
    pending_rows: BTreeMap<TableId, BTreeSet<u32>>,
    /// Tables and models not on the device: not needed there yet (a table
    /// goes up with the first model that runs there) or failed to load.
    /// Loaded before that model's next batch on the device.
    stale_tables: BTreeSet<TableId>,
    stale_models: BTreeSet<ModelId>,
    /// Models whose check batch the device failed to run: checked before
    /// their load in `resync`.
    unchecked: BTreeSet<ModelId>,
    models: HashMap<ModelId, (ModelDesc, TableId, Weights)>,
    /// Models whose kind the device has no forward pass for, and why: they
    /// run on the CPU copy alone.
    cpu_only: HashMap<ModelId, String>,
    table_dtypes: HashMap<TableId, ItemDtype>,
    clock: Clock,
    metrics: Option<Arc<Metrics>>,
}

impl Fallback {
    /// A batch holding filtered recommends on a device that does not
    /// filter: those run on the CPU scan, the others where they would run
    /// otherwise, and the answers come back in the batch's order.
    fn run_split(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, BackendError> {
        let (on_cpu, elsewhere): (Vec<usize>, Vec<usize>) =
            (0..queries.len()).partition(|&i| queries[i].is_filtered());
        if elsewhere.is_empty() {
            return self.cpu.run(id, items, queries);
        }
        let pick = |idx: &[usize]| idx.iter().map(|&i| queries[i].clone()).collect::<Vec<_>>();
        let cpu_out = self.cpu.run(id, items, &pick(&on_cpu))?;
        let rest = pick(&elsewhere);
        let rest_out = self.run(id, items, &rest)?;
        let mut out: Vec<Option<Output>> = (0..queries.len()).map(|_| None).collect();
        for (i, o) in on_cpu.into_iter().zip(cpu_out) {
            out[i] = Some(o);
        }
        for (i, o) in elsewhere.into_iter().zip(rest_out) {
            out[i] = Some(o);
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("one answer per query"))
            .collect())
    }

    pub fn new(primary: Box<dyn Backend>, metrics: Option<Arc<Metrics>>, clock: Clock) -> Self {
        let device = primary.device();
        let now = clock();
        if let Some(m) = &metrics {
            m.device_healthy.with_label_values(&[&device]).set(1);
        }
        Self {
            primary,
            cpu: CpuBackend::new(),
            device,
            healthy: true,
            reason: None,
            retry_at: now,
            backoff: Duration::from_secs(1),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            pending_rows: BTreeMap::new(),
            stale_tables: BTreeSet::new(),
            stale_models: BTreeSet::new(),
            unchecked: BTreeSet::new(),
            models: HashMap::new(),
            cpu_only: HashMap::new(),
            table_dtypes: HashMap::new(),
            clock,
            metrics,
        }
    }

    #[cfg(test)]
    /// Back-off before the first probe, doubling per failed probe up to `max`.
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self.backoff = min;
        self
    }

    /// From now on model `id` runs on the CPU copy alone, because its
    /// device forward pass could not be checked or gave wrong answers.
    fn serve_from_cpu(&mut self, id: ModelId, desc: ModelDesc, reason: String) {
        tracing::error!(model = id.get(), device = %self.device, kind = %desc.kind, "serving this model from the CPU: {reason}");
        self.cpu_only.insert(id, reason);
        self.stale_models.remove(&id);
        self.unchecked.remove(&id);
        self.primary.unload(id);
        if let Some((_, table, _)) = self.models.remove(&id) {
            // A table no device model reads any more leaves the device
            // (and comes back with the next model that reads it).
            if !self.models.values().any(|m| m.1 == table) && !self.stale_tables.contains(&table) {
                self.primary.unload_table(table);
                self.pending_rows.remove(&table);
                self.stale_tables.insert(table);
            }
        }
    }

    /// Runs model `id` on the device and on the CPU over a synthetic batch
    /// and compares the answers (see the module's doc).
    fn check_on_device(
        &mut self,
        id: ModelId,
        desc: ModelDesc,
        table: TableId,
        weights: &Weights,
    ) -> Result<(), Check> {
        let (items, histories, features) = check::inputs(&desc);
        let filter = check::filter(&items);
        // A device that does not filter is never handed a filtered query.
        let filter = self.primary.filters().then_some(&filter);
        let queries = check::queries(&desc, &histories, &features, filter);
        let mut cpu = CpuBackend::new();
        // The device stores the check's table as it stores the model's.
        let dtype = self.table_dtypes.get(&table).copied().unwrap_or_default();
        let want = cpu
            .load_table(check::TABLE, &items, ItemDtype::F32)
            .and_then(|()| cpu.load(check::MODEL, desc, check::TABLE, weights))
            .and_then(|()| cpu.run(check::MODEL, &items, &queries))
            .map_err(|e| {
                Check::Unchecked(format!("the CPU could not run the check batch ({e})"))
            })?;
        let got = self
            .primary
            .load_table(check::TABLE, &items, dtype)
            .and_then(|()| self.primary.load(check::MODEL, desc, check::TABLE, weights))
            .and_then(|()| self.primary.run(check::MODEL, &items, &queries));
        self.primary.unload(check::MODEL);
        self.primary.unload_table(check::TABLE);
        let got = got.map_err(|e| {
            if e.reason == Reason::Hardware {
                Check::Failed(e)
            } else {
                Check::Unchecked(format!(
                    "{} could not run the check batch ({e})",
                    self.device
                ))
            }
        })?;
        check::agree(&got, &want, dtype).map_err(|why| {
            Check::Unchecked(format!(
                "its answers on {} disagree with the CPU's on a check batch ({why})",
                self.device
            ))
        })?;
        tracing::debug!(model = id.get(), device = %self.device, "the device's answers match the CPU's on the check batch");
        Ok(())
    }

    fn mark_unhealthy(&mut self, e: &BackendError) {
        let now = (self.clock)();
        if self.healthy {
            tracing::error!(device = %self.device, error = %e, "device failed; serving from the CPU copy until it recovers");
        } else {
            tracing::warn!(device = %self.device, error = %e, "device probe failed");
        }
        self.healthy = false;
        self.reason = Some(format!("{}: {}", e.reason, e.message));
        self.retry_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        if let Some(m) = &self.metrics {
            m.device_healthy.with_label_values(&[&self.device]).set(0);
        }
    }

    fn mark_healthy(&mut self) {
        if !self.healthy {
            tracing::info!(device = %self.device, "device recovered; it takes traffic again");
        }
        self.healthy = true;
        self.reason = None;
        self.backoff = self.min_backoff;
        if let Some(m) = &self.metrics {
            m.device_healthy.with_label_values(&[&self.device]).set(1);
        }
    }

    /// Brings the device's copy of `table` and model `id` in step: loads what
    /// it failed to load and replays rows written while it was out.
    fn resync(
        &mut self,
        id: ModelId,
        table: TableId,
        items: &ItemTable,
    ) -> Result<(), BackendError> {
        if self.stale_tables.contains(&table) {
            let dtype = self.table_dtypes.get(&table).copied().unwrap_or_default();
            self.primary.load_table(table, items, dtype)?;
            self.stale_tables.remove(&table);
            self.pending_rows.remove(&table);
        }
        if let Some(rows) = self.pending_rows.get(&table) {
            let rows: Vec<u32> = rows.iter().copied().collect();
            self.primary.items_changed(table, items, &rows)?;
            self.pending_rows.remove(&table);
        }
        if self.stale_models.contains(&id) {
            let (desc, t, weights) = self
                .models
                .get(&id)
                .cloned()
                .expect("a loaded model is remembered");
            if self.unchecked.contains(&id) {
                match self.check_on_device(id, desc, t, &weights) {
                    Ok(()) => {
                        self.unchecked.remove(&id);
                    }
                    Err(Check::Failed(e)) => return Err(e),
                    Err(Check::Unchecked(reason)) => {
                        self.serve_from_cpu(id, desc, reason);
                        return Ok(());
                    }
                }
            }
            self.primary.load(id, desc, t, &weights)?;
            self.stale_models.remove(&id);
        }
        Ok(())
    }
}

impl Backend for Fallback {
    fn device(&self) -> String {
        self.device.clone()
    }

    fn load_table(
        &mut self,
        table: TableId,
        items: &ItemTable,
        dtype: ItemDtype,
    ) -> Result<(), BackendError> {
        self.cpu.load_table(table, items, dtype)?;
        self.table_dtypes.insert(table, dtype);
        // Uploaded before the first batch of a model that runs on the
        // device: a table only CPU-served models read never goes there.
        self.stale_tables.insert(table);
        Ok(())
    }

    fn load(
        &mut self,
        id: ModelId,
        desc: ModelDesc,
        table: TableId,
        weights: &Weights,
    ) -> Result<(), BackendError> {
        self.cpu.load(id, desc, table, weights)?;
        if !self.primary.runs(desc.kind) {
            let reason = format!(
                "{} has no forward pass for {} models",
                self.device, desc.kind
            );
            tracing::info!(model = id.get(), device = %self.device, kind = %desc.kind, "serving this model from the CPU: {reason}");
            self.cpu_only.insert(id, reason);
            return Ok(());
        }
        // While the device is out, the check waits for its return (`resync`).
        let checked = self.healthy
            && match self.check_on_device(id, desc, table, weights) {
                Ok(()) => true,
                Err(Check::Unchecked(reason)) => {
                    self.models.insert(id, (desc, table, weights.clone()));
                    self.serve_from_cpu(id, desc, reason);
                    return Ok(());
                }
                // The device itself failed: the version is checked, then
                // loaded there, once it is back, as after any failed load.
                Err(Check::Failed(e)) => {
                    self.mark_unhealthy(&e);
                    false
                }
            };
        self.models.insert(id, (desc, table, weights.clone()));
        if !checked {
            self.unchecked.insert(id);
            self.stale_models.insert(id);
        } else if self.stale_tables.contains(&table) {
            // Loaded with its table, before its first batch (`resync`).
            self.stale_models.insert(id);
        } else if let Err(e) = self.primary.load(id, desc, table, weights) {
            self.mark_unhealthy(&e);
            self.stale_models.insert(id);
        }
        Ok(())
    }

    /// A model the CPU copy alone serves has its tower apart from its scan
    /// as the CPU backend does; the device's own models do not.
    fn embeds(&self, id: ModelId) -> bool {
        self.cpu_only.contains_key(&id) && self.cpu.embeds(id)
    }

    fn embed(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<f32>, BackendError> {
        self.cpu.embed(id, items, queries)
    }

    fn retrieve(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
        q: &[f32],
    ) -> Result<Vec<Output>, BackendError> {
        self.cpu.retrieve(id, items, queries, q)
    }

    fn run(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, BackendError> {
        let filtered = queries.iter().any(Query::is_filtered);
        if self.cpu_only.contains_key(&id) {
            return self.cpu.run(id, items, queries);
        }
        if filtered && !self.primary.filters() {
            return self.run_split(id, items, queries);
        }
        let probing = !self.healthy && (self.clock)() >= self.retry_at;
        if self.healthy || probing {
            let table = self.models.get(&id).map(|m| m.1);
            let attempt = match table {
                Some(t) => match self.resync(id, t, items) {
                    // The check before its load moved it to the CPU.
                    Ok(()) if self.cpu_only.contains_key(&id) => {
                        return self.cpu.run(id, items, queries);
                    }
                    Ok(()) => self.primary.run(id, items, queries),
                    Err(e) => Err(e),
                },
                None => self.primary.run(id, items, queries),
            };
            match attempt {
                Ok(out) => {
                    self.mark_healthy();
                    return Ok(out);
                }
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.fallbacks.with_label_values(&[e.reason.as_str()]).inc();
                    }
                    self.mark_unhealthy(&e);
                }
            }
        }
        self.cpu.run(id, items, queries)
    }

    fn items_changed(
        &mut self,
        table: TableId,
        items: &ItemTable,
        rows: &[u32],
    ) -> Result<(), BackendError> {
        if self.stale_tables.contains(&table) {
            // Not on the device: it gets the whole table when it needs it.
            return Ok(());
        }
        if self.healthy {
            match self.primary.items_changed(table, items, rows) {
                Ok(()) => return Ok(()),
                Err(e) => self.mark_unhealthy(&e),
            }
        }
        self.pending_rows
            .entry(table)
            .or_default()
            .extend(rows.iter().copied());
        Ok(())
    }

    fn unload(&mut self, id: ModelId) {
        self.cpu.unload(id);
        self.unchecked.remove(&id);
        if self.cpu_only.remove(&id).is_none() {
            self.primary.unload(id);
        }
        self.models.remove(&id);
        self.stale_models.remove(&id);
    }

    fn unload_table(&mut self, table: TableId) {
        self.cpu.unload_table(table);
        self.primary.unload_table(table);
        self.table_dtypes.remove(&table);
        self.stale_tables.remove(&table);
        self.pending_rows.remove(&table);
    }

    fn warm_batch_sizes(&self, max_batch: usize) -> Vec<usize> {
        self.primary.warm_batch_sizes(max_batch)
    }

    /// Filtered batches the device cannot filter run on the CPU copy.
    fn filters(&self) -> bool {
        true
    }

    /// Every kind: those the device lacks run on the CPU copy.
    fn runs(&self, kind: ModelKind) -> bool {
        self.primary.runs(kind) || self.cpu.runs(kind)
    }

    fn cpu_reason(&self, id: ModelId) -> Option<String> {
        self.cpu_only.get(&id).cloned()
    }

    fn health(&self) -> DeviceHealth {
        DeviceHealth {
            healthy: self.healthy,
            reason: self.reason.clone(),
        }
    }
}

/// A backend that computes on the CPU and fails on command: for testing the
/// fallback path (and alerting on it) on hosts without a GPU.
/// Why a device's check batch did not pass.
enum Check {
    /// The version's device forward pass is wrong or cannot run: it serves
    /// from the CPU, for this reason.
    Unchecked(String),
    /// The device itself failed (a hardware fault): it is out of service.
    Failed(BackendError),
}

/// The synthetic batch a model's device forward pass is checked with.
mod check {
    use super::*;
    use crate::backend::{Scored, Task};
    use crate::model::attributes::RowFilter;
    use crate::model::demo::Rng;
    use crate::model::kind::RANKER;
    use rankd_client::types::FilterValues;

    /// Ids the check uses on the device, never the executor's (which count
    /// up from 0).
    pub const TABLE: TableId = TableId::MAX;
    pub const MODEL: ModelId = ModelId::MAX;
    const ROWS: usize = 512;
    const USERS: usize = 6;

    /// A random table of the model's width with two attribute columns,
    /// histories from empty to the model's window (and past it), and
    /// features.
    pub fn inputs(desc: &ModelDesc) -> (ItemTable, Vec<Vec<u32>>, Vec<f32>) {
        let mut rng = Rng::new(0xc0ffee ^ desc.dim as u64);
        let d = desc.dim;
        let emb: Vec<f32> = (0..ROWS * d).map(|_| rng.uniform() as f32 - 0.5).collect();
        let mut items = ItemTable::new(d, (1..=ROWS as u64).collect(), emb)
            .expect("ids are distinct and the embeddings fill the rows");
        let attributes = crate::model::attributes::Attributes::new(vec![
            ("market".into(), (0..ROWS as i64).map(|r| r % 3).collect()),
            (
                "shelf".into(),
                (0..ROWS as i64).map(|r| r % 7 - 3).collect(),
            ),
        ])
        .expect("two columns of ROWS values");
        items.set_attributes(attributes).expect("one value per row");
        let window = desc.bounds.history_len.max(1);
        let lens = [0, 1, 3, window.min(20), window, window + 2];
        let histories = lens
            .iter()
            .map(|&n| (0..n).map(|_| rng.below(ROWS as u64) as u32).collect())
            .collect();
        let features = (0..USERS * desc.user_feature_dim)
            .map(|_| rng.uniform() as f32 - 0.5)
            .collect();
        (items, histories, features)
    }

    /// A filter that keeps about a tenth of the check table: market 1, shelf
    /// -3, 0 or 2.
    pub fn filter(items: &ItemTable) -> RowFilter {
        let filter: rankd_client::types::Filter = [
            ("market".to_string(), FilterValues::One(1)),
            ("shelf".to_string(), FilterValues::Any(vec![2, -3, 0])),
        ]
        .into_iter()
        .collect();
        RowFilter::resolve(&filter, items.attributes(), "check")
            .expect("the check table has both attributes")
    }

    /// One query per history: a ranker scores 8 candidates, a retrieval
    /// model alternates a top 10 (some with exclusions, some with `filter`)
    /// and a score.
    pub fn queries<'a>(
        desc: &ModelDesc,
        histories: &'a [Vec<u32>],
        features: &'a [f32],
        filter: Option<&'a RowFilter>,
    ) -> Vec<Query<'a>> {
        const CANDIDATES: &[u32] = &[0, 3, 17, 64, 128, 255, 300, 511];
        const EXCLUDE: &[u32] = &[2, 5, 7, 11];
        let fd = desc.user_feature_dim;
        histories
            .iter()
            .enumerate()
            .map(|(i, h)| Query {
                history: &h[h.len().saturating_sub(desc.bounds.history_len.max(1))..],
                features: (fd > 0).then(|| &features[i * fd..(i + 1) * fd]),
                sparse: None,
                context: None,
                task: if desc.kind == RANKER || i % 2 == 1 {
                    Task::Score { rows: CANDIDATES }
                } else {
                    Task::TopK {
                        k: 10,
                        exclude: if i % 4 == 2 { EXCLUDE } else { &[] },
                        filter: filter.filter(|_| i % 4 == 0),
                    }
                },
            })
            .collect()
    }

    /// Whether the device's answers are the CPU's: the same number of
    /// items and scores, each score within 1e-3 of the batch's largest for
    /// an f32 table (f32 sums in another order differ by far less; a wrong
    /// layout or kernel by far more; 1e-2 for f16, 4e-2 for bf16), and a
    /// top-k list whose ids differ only where scores tie within that.
    pub fn agree(got: &[Output], want: &[Output], dtype: ItemDtype) -> Result<(), String> {
        if got.len() != want.len() {
            return Err(format!("{} answers for {} queries", got.len(), want.len()));
        }
        let scale = want
            .iter()
            .flat_map(|o| match o {
                Output::TopK(l) => l.iter().map(|s| s.score).collect::<Vec<_>>(),
                Output::Scores(s) => s.clone(),
            })
            .fold(0f32, |m, s| m.max(s.abs()))
            .max(1e-6);
        // 16-bit tables round every embedding the model reads.
        let tol = scale
            * match dtype {
                ItemDtype::F32 => 1e-3,
                ItemDtype::F16 => 1e-2,
                ItemDtype::Bf16 => 4e-2,
            };
        for (q, (g, w)) in got.iter().zip(want).enumerate() {
            let (gs, ws): (Vec<f32>, Vec<f32>) = match (g, w) {
                (Output::TopK(g), Output::TopK(w)) => {
                    if g.len() != w.len() {
                        return Err(format!(
                            "query {q}: {} items on the device, {} on the CPU",
                            g.len(),
                            w.len()
                        ));
                    }
                    let ids = |l: &[Scored]| l.iter().map(|s| s.id).collect::<Vec<_>>();
                    for (r, (a, b)) in g.iter().zip(w).enumerate() {
                        if a.id != b.id && (a.score - b.score).abs() > tol {
                            return Err(format!(
                                "query {q}: top-k {:?} on the device, {:?} on the CPU (rank {r})",
                                ids(g),
                                ids(w)
                            ));
                        }
                    }
                    (
                        g.iter().map(|s| s.score).collect(),
                        w.iter().map(|s| s.score).collect(),
                    )
                }
                (Output::Scores(g), Output::Scores(w)) if g.len() == w.len() => {
                    (g.clone(), w.clone())
                }
                _ => return Err(format!("query {q}: {g:?} on the device, {w:?} on the CPU")),
            };
            for (i, (a, b)) in gs.iter().zip(&ws).enumerate() {
                if a.is_nan() || b.is_nan() || (a - b).abs() > tol {
                    return Err(format!(
                        "query {q}, item {i}: score {a} on the device, {b} on the CPU"
                    ));
                }
            }
        }
        Ok(())
    }
}

pub mod faulty {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Shared controls and a record of what reached the backend.
    #[derive(Debug, Default)]
    pub struct Plan {
        /// Fail the next N `run` calls.
        pub fail_runs: AtomicUsize,
        /// Fail every Nth `run` call (0: never).
        pub fail_every: AtomicUsize,
        /// Fail the next N `items_changed` calls.
        pub fail_updates: AtomicUsize,
        /// A kind this backend has no forward pass for.
        pub lacks: Mutex<Option<ModelKind>>,
        /// Answer wrongly (every score off by one) instead of failing.
        pub wrong: std::sync::atomic::AtomicBool,
        pub runs: AtomicUsize,
        pub runs_ok: AtomicUsize,
        /// Queries the successful runs were handed.
        pub queries_run: AtomicUsize,
        /// Rows received through `items_changed`, per call.
        pub rows_seen: Mutex<Vec<Vec<u32>>>,
        /// Tables uploaded through `load_table`, in order.
        pub tables_seen: Mutex<Vec<TableId>>,
    }

    pub struct Faulty {
        inner: CpuBackend,
        pub plan: Arc<Plan>,
    }

    impl Faulty {
        pub fn new(plan: Arc<Plan>) -> Self {
            Self {
                inner: CpuBackend::new(),
                plan,
            }
        }
    }

    fn take_one(n: &AtomicUsize) -> bool {
        n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
            .is_ok()
    }

    impl Backend for Faulty {
        fn device(&self) -> String {
            "faulty-cpu".into()
        }
        fn runs(&self, kind: ModelKind) -> bool {
            *self.plan.lacks.lock().expect("plan lock") != Some(kind)
        }
        fn load_table(
            &mut self,
            table: TableId,
            items: &ItemTable,
            dtype: ItemDtype,
        ) -> Result<(), BackendError> {
            self.plan.tables_seen.lock().expect("plan lock").push(table);
            self.inner.load_table(table, items, dtype)
        }
        fn load(
            &mut self,
            id: ModelId,
            desc: ModelDesc,
            table: TableId,
            weights: &Weights,
        ) -> Result<(), BackendError> {
            self.inner.load(id, desc, table, weights)
        }
        fn unload(&mut self, id: ModelId) {
            self.inner.unload(id);
        }
        fn unload_table(&mut self, table: TableId) {
            self.inner.unload_table(table);
        }
        fn run(
            &mut self,
            id: ModelId,
            items: &ItemTable,
            queries: &[Query<'_>],
        ) -> Result<Vec<Output>, BackendError> {
            // Every Nth batch the executor runs fails; the fallback's own
            // check batches are not counted (the explicit `fail_runs` still
            // reaches them).
            let every = if id == super::check::MODEL {
                0
            } else {
                self.plan.fail_every.load(Ordering::Acquire)
            };
            let n = self.plan.runs.fetch_add(1, Ordering::AcqRel) + 1;
            if take_one(&self.plan.fail_runs) || (every > 0 && n.is_multiple_of(every)) {
                return Err(BackendError::new(
                    "faulty-cpu",
                    Reason::Launch,
                    "injected launch failure",
                ));
            }
            let mut out = self.inner.run(id, items, queries)?;
            if self.plan.wrong.load(Ordering::Acquire) {
                for o in &mut out {
                    match o {
                        Output::TopK(l) => l.iter_mut().for_each(|s| s.score += 1.0),
                        Output::Scores(v) => v.iter_mut().for_each(|s| *s += 1.0),
                    }
                }
            }
            self.plan.runs_ok.fetch_add(1, Ordering::AcqRel);
            self.plan
                .queries_run
                .fetch_add(queries.len(), Ordering::AcqRel);
            Ok(out)
        }
        fn items_changed(
            &mut self,
            _table: TableId,
            _items: &ItemTable,
            rows: &[u32],
        ) -> Result<(), BackendError> {
            if take_one(&self.plan.fail_updates) {
                return Err(BackendError::new(
                    "faulty-cpu",
                    Reason::OutOfMemory,
                    "injected allocation failure",
                ));
            }
            self.plan
                .rows_seen
                .lock()
                .expect("rows lock")
                .push(rows.to_vec());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    use super::faulty::{Faulty, Plan};
    use super::*;

    const M0: ModelId = ModelId::new(0);
    const M1: ModelId = ModelId::new(1);
    const T0: TableId = TableId::new(0);
    const T1: TableId = TableId::new(1);
    use crate::backend::Task;
    use crate::model::demo::Rng;
    use crate::model::kind::{RANKER, TWO_TOWER};
    use crate::model::{Layer, TowerWeights};

    struct ManualClock(Mutex<Instant>);

    fn setup() -> (Fallback, Arc<Plan>, Arc<ManualClock>, ItemTable) {
        let mut rng = Rng::new(9);
        let d = 8;
        let n = 300;
        let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + i).collect();
        let emb: Vec<f32> = (0..n * d).map(|_| rng.uniform() as f32 - 0.5).collect();
        let items = ItemTable::new(d, ids, emb).unwrap();
        let layer = |o: usize, i: usize, rng: &mut Rng| Layer {
            out_dim: o,
            in_dim: i,
            weight: (0..o * i).map(|_| rng.uniform() as f32 - 0.5).collect(),
            bias: (0..o).map(|_| rng.uniform() as f32 - 0.5).collect(),
        };
        let weights = Weights::new(TowerWeights {
            layers: vec![layer(16, d, &mut rng), layer(d, 16, &mut rng)],
        });
        let plan = Arc::new(Plan::default());
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let c = clock.clone();
        let mut fb = Fallback::new(
            Box::new(Faulty::new(plan.clone())),
            None,
            Arc::new(move || *c.0.lock().unwrap()),
        )
        .with_backoff(Duration::from_secs(1), Duration::from_secs(8));
        let desc = ModelDesc {
            kind: TWO_TOWER,
            dim: d,
            user_feature_dim: 0,
            bounds: Default::default(),
            cpu_scoring: Default::default(),
        };
        fb.load_table(T0, &items, ItemDtype::F32).unwrap();
        fb.load(M0, desc, T0, &weights).unwrap();
        (fb, plan, clock, items)
    }

    fn batch(fb: &mut Fallback, items: &ItemTable) -> Vec<Output> {
        batch_of(fb, M0, items)
    }

    /// Five top-5 recommends of model `id`.
    fn batch_of(fb: &mut Fallback, id: ModelId, items: &ItemTable) -> Vec<Output> {
        let hist: Vec<Vec<u32>> = (0..5u32).map(|i| vec![i, i * 7, i * 13 + 1]).collect();
        let queries: Vec<Query<'_>> = hist
            .iter()
            .map(|h| Query {
                history: h,
                features: None,
                sparse: None,
                context: None,
                task: Task::TopK {
                    k: 5,
                    exclude: &[],
                    filter: None,
                },
            })
            .collect();
        fb.run(id, items, &queries).unwrap()
    }

    fn advance(clock: &ManualClock, by: Duration) {
        *clock.0.lock().unwrap() += by;
    }

    #[test]
    fn a_device_whose_answers_disagree_serves_that_model_from_the_cpu_and_says_why() {
        let (mut fb, plan, _clock, items) = setup();
        // Model 0 passed its check at load: the device serves it.
        assert_eq!(fb.cpu_reason(M0), None);
        let ran = plan.runs_ok.load(Ordering::Acquire);
        let reference = batch(&mut fb, &items);
        assert_eq!(plan.runs_ok.load(Ordering::Acquire), ran + 1);
        // The same model loaded again on a device that now answers wrongly.
        plan.wrong.store(true, Ordering::Release);
        let (desc, table, weights) = fb.models[&M0].clone();
        fb.load(M1, desc, table, &weights).unwrap();
        let why = fb.cpu_reason(M1).expect("served from the CPU");
        assert!(
            why.contains("disagree with the CPU's on a check batch") && why.contains("score"),
            "{why}"
        );
        // It answers right, from the CPU; the device stays in service.
        let runs = plan.runs.load(Ordering::Acquire);
        plan.wrong.store(false, Ordering::Release);
        assert_eq!(batch_of(&mut fb, M1, &items), reference);
        assert_eq!(
            plan.runs.load(Ordering::Acquire),
            runs,
            "not run on the device"
        );
        assert!(fb.health().healthy);
    }

    #[test]
    fn a_check_the_device_cannot_run_serves_that_model_from_the_cpu_alone() {
        let (mut fb, plan, _clock, items) = setup();
        let (desc, table, weights) = fb.models[&M0].clone();
        plan.fail_runs.store(1, Ordering::Release);
        fb.load(M1, desc, table, &weights).unwrap();
        let why = fb.cpu_reason(M1).expect("served from the CPU");
        assert!(why.contains("could not run the check batch"), "{why}");
        // One version's failure says nothing about the device.
        assert!(fb.health().healthy, "{:?}", fb.health());
        let runs = plan.runs.load(Ordering::Acquire);
        assert_eq!(batch_of(&mut fb, M1, &items), batch(&mut fb, &items));
        assert_eq!(
            plan.runs.load(Ordering::Acquire),
            runs + 1,
            "model 0 alone ran on the device"
        );
    }

    #[test]
    fn a_version_loaded_while_the_device_is_out_is_checked_when_it_is_back() {
        let (mut fb, plan, clock, items) = setup();
        let reference = batch(&mut fb, &items);
        plan.fail_runs.store(1, Ordering::Release);
        batch(&mut fb, &items);
        assert!(!fb.health().healthy);
        let (desc, table, weights) = fb.models[&M0].clone();
        let runs = plan.runs.load(Ordering::Acquire);
        fb.load(M1, desc, table, &weights).unwrap();
        assert_eq!(
            plan.runs.load(Ordering::Acquire),
            runs,
            "no check while it is out"
        );
        assert_eq!(fb.cpu_reason(M1), None);
        // Back after the back-off, and wrong: the check before the load there
        // catches it, and the batch is answered right, from the CPU.
        plan.wrong.store(true, Ordering::Release);
        advance(&clock, Duration::from_secs(2));
        let got = batch_of(&mut fb, M1, &items);
        plan.wrong.store(false, Ordering::Release);
        assert_eq!(got, reference);
        assert!(fb.cpu_reason(M1).is_some_and(|r| r.contains("disagree")));
    }

    #[test]
    fn the_check_compares_scores_to_the_batch_scale_and_ids_up_to_ties() {
        use crate::backend::Scored;
        let list = |v: &[(u64, f32)]| {
            Output::TopK(v.iter().map(|&(id, score)| Scored { id, score }).collect())
        };
        let want = [
            list(&[(1, 10.0), (2, 5.0)]),
            Output::Scores(vec![0.5, -3.0]),
        ];
        assert_eq!(check::agree(&want, &want, ItemDtype::F32), Ok(()));
        // Float noise, and two ids swapped on a tie, agree.
        let noisy = [
            list(&[(1, 10.001), (2, 5.0)]),
            Output::Scores(vec![0.5004, -3.0]),
        ];
        assert_eq!(check::agree(&noisy, &want, ItemDtype::F32), Ok(()));
        let swapped = [
            list(&[(2, 10.0), (1, 10.0)]),
            Output::Scores(vec![0.5, -3.0]),
        ];
        let tied = [
            list(&[(1, 10.0), (2, 10.0)]),
            Output::Scores(vec![0.5, -3.0]),
        ];
        assert_eq!(check::agree(&swapped, &tied, ItemDtype::F32), Ok(()));
        // A wrong score, a wrong id, a missing item or a NaN do not.
        let off = [
            list(&[(1, 10.0), (2, 5.1)]),
            Output::Scores(vec![0.5, -3.0]),
        ];
        assert!(check::agree(&off, &want, ItemDtype::F32)
            .unwrap_err()
            .contains("score 5.1"));
        let other = [
            list(&[(1, 10.0), (3, 4.0)]),
            Output::Scores(vec![0.5, -3.0]),
        ];
        assert!(check::agree(&other, &want, ItemDtype::F32)
            .unwrap_err()
            .contains("top-k"));
        let short = [list(&[(1, 10.0)]), Output::Scores(vec![0.5, -3.0])];
        assert!(check::agree(&short, &want, ItemDtype::F32).is_err());
        let nan = [
            list(&[(1, 10.0), (2, 5.0)]),
            Output::Scores(vec![f32::NAN, -3.0]),
        ];
        assert!(check::agree(&nan, &want, ItemDtype::F32).is_err());
    }

    #[test]
    fn a_failed_batch_is_re_executed_on_the_cpu_and_the_device_is_probed_later() {
        let (mut fb, plan, clock, items) = setup();
        let ran = plan.runs_ok.load(Ordering::Acquire);
        let reference = batch(&mut fb, &items);
        assert_eq!(plan.runs_ok.load(Ordering::Acquire), ran + 1);
        plan.fail_runs.store(1, Ordering::Release);
        // The failing batch still gets the same answers, from the CPU.
        assert_eq!(batch(&mut fb, &items), reference);
        let h = fb.health();
        assert!(
            !h.healthy && h.reason.as_deref().unwrap().contains("injected"),
            "{h:?}"
        );
        // Within the back-off the device is not tried.
        let runs = plan.runs.load(Ordering::Acquire);
        advance(&clock, Duration::from_millis(900));
        assert_eq!(batch(&mut fb, &items), reference);
        assert_eq!(plan.runs.load(Ordering::Acquire), runs);
        // After it, a probe runs on the device and succeeds.
        advance(&clock, Duration::from_millis(200));
        assert_eq!(batch(&mut fb, &items), reference);
        assert_eq!(plan.runs.load(Ordering::Acquire), runs + 1);
        assert!(fb.health().healthy);
    }

    /// On a device that does not filter, a batch's filtered recommends run
    /// on the CPU scan and the others on the device, each getting what the
    /// CPU backend gives the whole batch, in the batch's order.
    #[test]
    fn filtered_queries_of_a_batch_run_on_the_cpu_and_the_rest_on_the_device() {
        use crate::model::attributes::{Attributes, RowFilter};
        use rankd_client::types::{Filter, FilterValues};
        let (mut fb, plan, _clock, mut items) = setup();
        let column: Vec<i64> = (0..items.rows() as i64).map(|r| r % 4).collect();
        items
            .set_attributes(Attributes::new(vec![("a".into(), column)]).unwrap())
            .unwrap();
        let f: Filter = [("a".to_string(), FilterValues::One(0))].into();
        let rf = RowFilter::resolve(&f, items.attributes(), "c").unwrap();
        let hist: Vec<Vec<u32>> = (0..6u32).map(|i| vec![i, i * 7, i * 13 + 1]).collect();
        let queries: Vec<Query<'_>> = hist
            .iter()
            .enumerate()
            .map(|(i, h)| Query {
                history: h,
                features: None,
                sparse: None,
                context: None,
                task: Task::TopK {
                    k: 5,
                    exclude: &[],
                    filter: (i % 2 == 0).then_some(&rf),
                },
            })
            .collect();
        let mut cpu = CpuBackend::new();
        let desc = ModelDesc {
            kind: TWO_TOWER,
            dim: items.dim(),
            user_feature_dim: 0,
            bounds: Default::default(),
            cpu_scoring: Default::default(),
        };
        cpu.load_table(T0, &items, ItemDtype::F32).unwrap();
        let (_, _, weights) = fb.models[&M0].clone();
        cpu.load(M0, desc, T0, &weights).unwrap();
        let want = cpu.run(M0, &items, &queries).unwrap();
        let before = plan.queries_run.load(Ordering::Acquire);
        let got = fb.run(M0, &items, &queries).unwrap();
        assert_eq!(got, want);
        assert_eq!(
            plan.queries_run.load(Ordering::Acquire) - before,
            3,
            "the device ran the three unfiltered queries only"
        );
        for (i, out) in got.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            let Output::TopK(list) = out else {
                panic!("query {i}: {out:?}")
            };
            assert!(list
                .iter()
                .all(|s| rf.allows(items.attributes(), items.row_of(s.id).unwrap() as usize)));
        }
    }

    /// A kind the device has no forward pass for is served from the CPU for
    /// that model alone: the device stays healthy and serves the others.
    #[test]
    fn a_kind_without_a_device_forward_runs_on_the_cpu_and_the_device_stays_in_service() {
        let (mut fb, plan, _clock, items) = setup();
        *plan.lacks.lock().unwrap() = Some(RANKER);
        let mut rng = Rng::new(4);
        let d = items.dim();
        let weights = Weights::new(TowerWeights {
            layers: vec![Layer {
                out_dim: 1,
                in_dim: 3 * d,
                weight: (0..3 * d).map(|_| rng.uniform() as f32 - 0.5).collect(),
                bias: vec![0.1],
            }],
        });
        let desc = ModelDesc {
            kind: RANKER,
            dim: d,
            user_feature_dim: 0,
            bounds: Default::default(),
            cpu_scoring: Default::default(),
        };
        // Its own table (as a sasrec model's `item_emb` is): never uploaded,
        // and writes to it never reach the device.
        fb.load_table(T1, &items, ItemDtype::F32).unwrap();
        fb.load(M1, desc, T1, &weights).unwrap();
        fb.items_changed(T1, &items, &[2, 3]).unwrap();
        assert!(fb.health().healthy, "{:?}", fb.health());
        assert_eq!(fb.cpu_reason(M0), None);
        let why = fb.cpu_reason(M1).unwrap();
        assert!(
            why.contains("faulty-cpu has no forward pass for ranker models"),
            "{why}"
        );
        let runs = plan.runs.load(Ordering::Acquire);
        let candidates = [1u32, 2, 3];
        let scored = fb
            .run(
                M1,
                &items,
                &[Query {
                    history: &[4],
                    features: None,
                    sparse: None,
                    context: None,
                    task: Task::Score { rows: &candidates },
                }],
            )
            .unwrap();
        assert!(
            matches!(&scored[..], [Output::Scores(s)] if s.len() == 3),
            "{scored:?}"
        );
        assert_eq!(
            plan.runs.load(Ordering::Acquire),
            runs,
            "the device never ran the ranker"
        );
        batch(&mut fb, &items);
        assert_eq!(
            plan.runs.load(Ordering::Acquire),
            runs + 1,
            "the device serves the two-tower model"
        );
        assert!(fb.health().healthy);
        let uploaded: Vec<TableId> = plan
            .tables_seen
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|&t| t != check::TABLE)
            .collect();
        assert_eq!(
            uploaded,
            vec![T0],
            "only the device model's table, besides the check batch's"
        );
        assert!(plan.rows_seen.lock().unwrap().is_empty());
        fb.unload(M1);
        assert_eq!(fb.cpu_reason(M1), None);
    }

    #[test]
    fn failed_probes_double_the_back_off_up_to_the_ceiling() {
        let (mut fb, plan, clock, items) = setup();
        plan.fail_runs.store(100, Ordering::Release);
        batch(&mut fb, &items);
        let mut waits = Vec::new();
        for _ in 0..5 {
            let before = plan.runs.load(Ordering::Acquire);
            let mut waited = Duration::ZERO;
            while plan.runs.load(Ordering::Acquire) == before {
                advance(&clock, Duration::from_millis(250));
                waited += Duration::from_millis(250);
                batch(&mut fb, &items);
            }
            waits.push(waited.as_secs());
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 8]);
    }

    #[test]
    fn rows_written_while_unhealthy_are_replayed_before_the_device_serves() {
        let (mut fb, plan, clock, mut items) = setup();
        plan.fail_runs.store(1, Ordering::Release);
        batch(&mut fb, &items);
        assert!(!fb.health().healthy);
        // Updates while out of service: the device does not see them yet.
        let new_row = match items.upsert(5000, &[0.5; 8], 1) {
            crate::model::items::ItemChange::Applied { row } => row,
            other => panic!("{other:?}"),
        };
        fb.items_changed(T0, &items, &[3, new_row]).unwrap();
        fb.items_changed(T0, &items, &[3]).unwrap();
        assert!(plan.rows_seen.lock().unwrap().is_empty());
        advance(&clock, Duration::from_secs(2));
        let out = batch(&mut fb, &items);
        assert!(fb.health().healthy);
        assert_eq!(
            *plan.rows_seen.lock().unwrap(),
            vec![vec![3, new_row]],
            "replayed once, deduplicated"
        );
        // And the answers match a CPU-only computation of the updated table.
        let mut cpu = CpuBackend::new();
        let (desc, table, weights) = fb.models[&M0].clone();
        cpu.load(M0, desc, table, &weights).unwrap();
        let hist: Vec<Vec<u32>> = (0..5u32).map(|i| vec![i, i * 7, i * 13 + 1]).collect();
        let queries: Vec<Query<'_>> = hist
            .iter()
            .map(|h| Query {
                history: h,
                features: None,
                sparse: None,
                context: None,
                task: Task::TopK {
                    k: 5,
                    exclude: &[],
                    filter: None,
                },
            })
            .collect();
        assert_eq!(out, cpu.run(M0, &items, &queries).unwrap());
    }

    #[test]
    fn a_failed_update_upload_marks_the_device_unhealthy_and_keeps_the_rows() {
        let (mut fb, plan, clock, items) = setup();
        // The table goes to the device with the model's first batch there.
        batch(&mut fb, &items);
        plan.fail_updates.store(1, Ordering::Release);
        fb.items_changed(T0, &items, &[7, 8]).unwrap();
        assert!(!fb.health().healthy);
        advance(&clock, Duration::from_secs(1));
        batch(&mut fb, &items);
        assert!(fb.health().healthy);
        assert_eq!(*plan.rows_seen.lock().unwrap(), vec![vec![7, 8]]);
    }
}
