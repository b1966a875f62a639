//! Execution: one executor thread per device owns the backend, the item tables
//! and the user state. Servers talk to it through a cheap `ExecutorHandle`;
//! replies come back on a oneshot carried in each command.

mod executor;
pub mod load;
pub mod online;
pub mod registry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use crate::backend::Output;
use crate::features::store as state;
pub use crate::features::store::{UserSummary, UserUpdate};
pub use crate::model::Op;
pub use executor::{spawn, Startup};
pub use registry::{LoadState, Registry, Resident, Route, ServedModel, Split};

use crate::batch::{self, Permit, QueueKey};
use crate::error::ServeError;
use crate::metrics::Metrics;

pub type Reply<T> = oneshot::Sender<Result<T, ServeError>>;

pub struct InferRequest {
    /// The model version that serves the request, held until it is answered.
    pub resident: Arc<Resident>,
    pub op: Op,
    pub rows: usize,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: Reply<Output>,
}

impl batch::Request for InferRequest {
    fn key(&self) -> QueueKey {
        QueueKey {
            model: self.resident.id,
        }
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn is_cancelled(&self) -> bool {
        self.reply.is_closed()
    }
}

pub enum Command {
    /// A scoring request with the permit it was admitted with.
    Infer(InferRequest, Permit),
    UpsertUser(UserUpdate, Reply<UserSummary>),
    /// A user's stored state; changes nothing.
    GetUser(u64, Reply<UserSummary>),
    WriteItem(state::ItemWrite, Reply<state::ItemSummary>),
    /// Applies a batch of feature updates between scoring batches.
    Apply(
        crate::features::updates::UpdateBatch,
        Reply<state::ApplyReport>,
    ),
    /// Makes a version read from the repository resident and warms it (in
    /// slices between batches); answers once it serves or failed.
    Install(Box<load::VersionFiles>, Reply<()>),
    /// Frees a version the registry no longer routes to, once the requests
    /// that hold it are answered.
    Retire(Arc<Resident>),
    /// A copy of what changed in the feature state since the last capture
    /// (of all of it when `full`), with its change counter.
    Capture {
        full: bool,
        reply: Reply<crate::features::snapshot::SnapshotDelta>,
    },
}

/// Cheap, cloneable access to the executor.
#[derive(Clone)]
pub struct ExecutorHandle {
    tx: flume::Sender<Command>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

/// How long a client is told to wait when a queue is full.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl ExecutorHandle {
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Admits, queues and awaits one scoring request for the version `route`
    /// picked.
    pub async fn infer(
        &self,
        route: Route,
        op: Op,
        rows: usize,
        timeout: Duration,
    ) -> Result<Output, ServeError> {
        let enqueued = Instant::now();
        let deadline = enqueued + timeout;
        let served = self.registry.by_index(route.resident.model);
        let admission = served.admission();
        let permit = admission
            .try_admit()
            .map_err(|full| ServeError::Overloaded {
                message: format!(
                    "queue of model {} is full: {} requests waiting, max_queue_size is {}",
                    served.name, full.waiting, full.limit
                ),
                retry_after_ms: RETRY_AFTER.as_millis() as u64,
            })?;
        self.metrics
            .queue_depth
            .with_label_values(&[&served.name])
            .set(admission.depth() as i64);
        let (reply, rx) = oneshot::channel();
        let req = InferRequest {
            resident: route.resident,
            op,
            rows,
            enqueued,
            deadline,
            reply,
        };
        // A request that cannot be sent drops its permit with it.
        if self.tx.send(Command::Infer(req, permit)).is_err() {
            return Err(ServeError::NotReady("the executor has stopped".into()));
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ServeError::Internal(
                "the executor dropped the request".into(),
            )),
            Err(_) => Err(deadline_exceeded(timeout)),
        }
    }

    fn command<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<oneshot::Receiver<Result<T, ServeError>>, ServeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| ServeError::NotReady("the executor has stopped".into()))?;
        Ok(rx)
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ServeError> {
        self.command(make)?
            .await
            .map_err(|_| ServeError::Internal("the executor dropped the command".into()))?
    }

    /// Makes a version resident and warms it; returns once it serves (or
    /// failed, with the reason).
    pub async fn install(&self, files: load::VersionFiles) -> Result<(), ServeError> {
        self.ask(|r| Command::Install(Box::new(files), r)).await
    }

    /// Hands a version the registry stopped routing to back to the executor.
    pub fn retire(&self, resident: Arc<Resident>) {
        let _ = self.tx.send(Command::Retire(resident));
    }

    /// A user's stored state (empty for an unknown user), in order with
    /// the writes before it.
    pub async fn get_user(&self, user_id: u64) -> Result<UserSummary, ServeError> {
        self.ask(|r| Command::GetUser(user_id, r)).await
    }

    /// Applies a user-state change in order with scoring batches.
    pub async fn upsert_user(&self, update: UserUpdate) -> Result<UserSummary, ServeError> {
        self.ask(|r| Command::UpsertUser(update, r)).await
    }

    pub async fn write_item(
        &self,
        write: state::ItemWrite,
    ) -> Result<state::ItemSummary, ServeError> {
        self.ask(|r| Command::WriteItem(write, r)).await
    }

    /// Applies an update batch; blocks the calling (non-async) thread.
    pub fn apply_blocking(
        &self,
        batch: crate::features::updates::UpdateBatch,
    ) -> Result<state::ApplyReport, ServeError> {
        self.command(|r| Command::Apply(batch, r))?
            .blocking_recv()
            .map_err(|_| ServeError::Internal("the executor dropped the command".into()))?
    }

    /// What changed in the feature state since the last capture (all of it
    /// when `full`); blocking.
    pub fn capture_blocking(
        &self,
        full: bool,
    ) -> Result<crate::features::snapshot::SnapshotDelta, ServeError> {
        self.command(|reply| Command::Capture { full, reply })?
            .blocking_recv()
            .map_err(|_| ServeError::Internal("the executor dropped the command".into()))?
    }
}

/// Records that `version` of `served` failed to load or warm up (state,
/// metrics, log) and returns the error its loader is answered with.
pub(crate) fn load_failed(
    served: &ServedModel,
    metrics: &Metrics,
    version: u64,
    e: &crate::model::ModelError,
) -> ServeError {
    served.set_state(version, LoadState::Failed(e.to_string()));
    metrics.set_model_state(&served.name, version, "failed");
    metrics
        .load_failures
        .with_label_values(&[&served.name])
        .inc();
    tracing::error!(model = %served.name, version, error = %e, "model version failed to load");
    ServeError::Invalid(format!(
        "version {version} of model {} failed to load: {e}",
        served.name
    ))
}

pub(crate) fn deadline_exceeded(timeout: Duration) -> ServeError {
    ServeError::DeadlineExceeded(format!(
        "no answer within timeout_ms = {}",
        timeout.as_millis()
    ))
}
