//! Execution: one executor thread per device owns the backend, the item tables
//! and the user state. Servers talk to it through a cheap `ExecutorHandle`;
//! replies come back on a oneshot carried in each command.

mod executor;
mod feature_state;
pub mod load;
pub mod online;
mod popular;
mod prepare;
pub mod query_cache;
pub mod registry;
mod residency;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use crate::backend::Output;
use crate::features::store as state;
pub use crate::features::store::{UserSummary, UserUpdate};
pub use crate::model::Op;
pub use executor::spawn;
pub use registry::{LoadState, ModelIndex, Registry, Resident, Route, ServedModel, Split};

use crate::batch::{self, Class, DropReason, Permit, QueueKey, Shed, Verdict};
use crate::error::ServeError;
use crate::features::popularity::Popularity;
use crate::features::snapshot::Snapshot;
use crate::metrics::Metrics;
use crate::model::spec::Degrade;
use crate::model::ModelEntry;

pub type Reply<T> = oneshot::Sender<Result<T, ServeError>>;

/// What the executor is started with.
pub struct Startup {
    /// The versions to load before serving, with their model's index.
    pub versions: Vec<(ModelIndex, ModelEntry)>,
    /// Splits restored from the last run, per model index.
    pub splits: BTreeMap<ModelIndex, Split>,
    /// Older versions, newest first, tried in turn for a model whose start-up
    /// versions all failed.
    pub fallbacks: Vec<(ModelIndex, ModelEntry)>,
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

pub struct InferRequest {
    /// The model version that serves the request, held until it is answered.
    pub resident: Arc<Resident>,
    pub op: Op,
    pub rows: usize,
    pub class: Class,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: Reply<Answer>,
}

#[cfg(test)]
impl InferRequest {
    /// An interactive one-row request for `op` on `resident`, queued now with
    /// a second to run, and the receiver of its answer.
    pub(crate) fn for_test(
        resident: Arc<Resident>,
        op: Op,
    ) -> (
        Self,
        tokio::sync::oneshot::Receiver<Result<Answer, crate::error::ServeError>>,
    ) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let now = Instant::now();
        let req = Self {
            resident,
            op,
            rows: 1,
            class: Class::Interactive,
            enqueued: now,
            deadline: now + std::time::Duration::from_secs(1),
            reply,
        };
        (req, rx)
    }
}

/// A scoring answer and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub output: Output,
    pub note: Note,
    /// The batch it ran in, while spans are exported.
    pub batch: Option<Arc<crate::trace::BatchTrace>>,
}

/// Whether an answer is the model's, or the popular items standing in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Note {
    /// The model scored it.
    #[default]
    Model,
    /// The request would have been shed; the popular items answered.
    Degraded,
    /// The user has no state; the popular items answered.
    ColdStart,
}

impl InferRequest {
    /// Whether a popular list can stand in for this request when it is
    /// shed: a recommend of a model that degrades (`default`: `degrade` for
    /// the models whose model.toml does not set it). Whether it does is
    /// `batch::shed`'s call.
    fn popular(&self, default: Degrade) -> bool {
        matches!(self.op, Op::Recommend { .. })
            && self.resident.spec.degrade.unwrap_or(default) == Degrade::Popular
    }

    /// Answers a request whose version is not resident (a bug).
    fn not_resident(self) {
        let _ = self.reply.send(Err(ServeError::Internal(format!(
            "version {} of model {} is not resident: this is a bug",
            self.resident.version, self.resident.model
        ))));
    }
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
    fn class(&self) -> Class {
        self.class
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
    /// A recommend that could not be queued, answered from the popular
    /// items; the reason labels `rankd_degraded_total`.
    Degraded(InferRequest, Shed),
    UpsertUser(UserUpdate, Reply<UserSummary>),
    /// A user's stored state; changes nothing.
    GetUser(u64, Reply<UserSummary>),
    WriteItem(state::ItemWrite, Reply<state::ItemSummary>),
    /// An item of a catalogue as stored; changes nothing.
    GetItem(String, u64, Reply<state::StoredItem>),
    /// The resident catalogues.
    Catalogues(Reply<Vec<state::CatalogueInfo>>),
    /// A list answered for `user` counts as an impression of the model's
    /// version (a pipeline's answer, credited to each stage).
    Served {
        user: u64,
        model: ModelIndex,
        version: u64,
        items: Vec<u64>,
    },
    /// Applies a batch of feature updates between scoring batches (from
    /// the Kafka consumer).
    #[cfg(feature = "kafka")]
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
    /// Where the consumer's click events are counted.
    #[cfg(feature = "kafka")]
    popularity: Arc<Popularity>,
    /// `degrade` for the models whose model.toml does not set it.
    degrade: Degrade,
}

impl ExecutorHandle {
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Admits, queues and awaits one scoring request of `class` for the
    /// version `route` picked. A full queue is a 429 with a `Retry-After`
    /// from the queue's depth and recent throughput, a request the queue
    /// ahead surely keeps past its deadline a 504 at once, or, for an
    /// interactive recommend of a model that degrades, either is answered
    /// from the popular items (`batch::shed`).
    pub async fn infer(
        &self,
        route: Route,
        op: Op,
        rows: usize,
        timeout: Duration,
        class: Class,
    ) -> Result<Answer, ServeError> {
        let enqueued = Instant::now();
        let deadline = enqueued + timeout;
        crate::trace::record_version(route.resident.version);
        let served = self.registry.by_index(route.resident.model);
        let (reply, rx) = oneshot::channel();
        let req = InferRequest {
            resident: route.resident,
            op,
            rows,
            class,
            enqueued,
            deadline,
            reply,
        };
        let degrades = batch::shed::degrades(class, req.popular(self.degrade));
        let command = match served.intake().admit(class, timeout) {
            Verdict::Queued(permit) => {
                let depth = served.admission(class).depth();
                self.metrics
                    .set_queue_depth(&served.name, class.as_str(), depth);
                Command::Infer(req, permit)
            }
            // Shed now, not when its deadline comes.
            Verdict::Late { ahead } => {
                self.metrics
                    .dropped
                    .with_label_values(&[
                        &served.name,
                        DropReason::Predicted.as_str(),
                        class.as_str(),
                    ])
                    .inc();
                if !degrades {
                    return Err(ServeError::DeadlineExceeded(format!(
                        "no answer possible within timeout_ms = {}: {ahead} requests wait ahead",
                        timeout.as_millis(),
                    )));
                }
                Command::Degraded(req, Shed::Deadline)
            }
            Verdict::Full { .. } if degrades => Command::Degraded(req, Shed::QueueFull),
            Verdict::Full { full, retry_after } => {
                let queue = match class {
                    Class::Interactive => "max_queue_size",
                    Class::Bulk => "max_bulk_queue_size",
                };
                return Err(ServeError::Overloaded {
                    message: format!(
                        "{} queue of model {} is full: {} requests waiting, {queue} is {}",
                        class.as_str(),
                        served.name,
                        full.waiting,
                        full.limit
                    ),
                    retry_after_ms: retry_after.as_millis() as u64,
                });
            }
        };
        // A request that cannot be sent drops its permit with it.
        if self.tx.send(command).is_err() {
            return Err(ServeError::NotReady("the executor has stopped".into()));
        }
        let result = match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ServeError::Internal(
                "the executor dropped the request".into(),
            )),
            Err(_) => Err(deadline_exceeded(timeout)),
        };
        if crate::trace::enabled() {
            let batch = result.as_ref().ok().and_then(|a| a.batch.as_deref());
            crate::trace::batch_spans(class.as_str(), enqueued, batch);
        }
        result
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

    /// An item of a catalogue, in order with the writes before it.
    pub async fn get_item(
        &self,
        catalogue: String,
        item_id: u64,
    ) -> Result<state::StoredItem, ServeError> {
        self.ask(|r| Command::GetItem(catalogue, item_id, r)).await
    }

    /// Counts `items` as an impression of `model`'s `version` for `user`.
    pub fn served(&self, user: u64, model: ModelIndex, version: u64, items: Vec<u64>) {
        let _ = self.tx.send(Command::Served {
            user,
            model,
            version,
            items,
        });
    }

    pub async fn catalogues(&self) -> Result<Vec<state::CatalogueInfo>, ServeError> {
        self.ask(Command::Catalogues).await
    }

    /// Applies an update batch; blocks the calling (non-async) thread.
    #[cfg(feature = "kafka")]
    pub fn apply_blocking(
        &self,
        batch: crate::features::updates::UpdateBatch,
    ) -> Result<state::ApplyReport, ServeError> {
        // Counted here, on the caller's thread, not on the executor's.
        if !batch.events.is_empty() {
            let now = crate::features::popularity::now_s();
            self.popularity
                .record(batch.events.iter().map(|&(_, item)| item), now);
        }
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
