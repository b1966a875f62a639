//! Transport-neutral request handling: model lookup, validation with messages
//! that name the limit and the value, dispatch to the executor, and the
//! per-request metrics. HTTP and the socket both call into this.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::Class;
use crate::error::ServeError;
use crate::exec::{
    ExecutorHandle, LoadState, ModelIndex, Note, Op, Output, ServedModel, UserUpdate,
};
use crate::features::store::{ItemSummary, ItemWrite, StoredItem};
use crate::ingest::{IngestReport, IngestStatus};
use crate::metrics::Metrics;
use crate::model::attributes::{check_filter, unknown_attribute};
use crate::model::{ModelSpec, OpKind};
use crate::shutdown::{CancellationToken, Stops};
use rankd_client::types::CataloguesResponse;
use rankd_client::types::*;

#[derive(Debug, Clone)]
pub struct ServiceLimits {
    /// Used when a request has no `timeout_ms`.
    pub default_timeout: Duration,
    /// Largest `timeout_ms` accepted.
    pub max_timeout: Duration,
}

pub struct Service {
    exec: ExecutorHandle,
    metrics: Arc<Metrics>,
    limits: ServiceLimits,
    ingest: std::sync::OnceLock<Arc<IngestStatus>>,
    /// Cancelled by a shutdown signal: `/readyz` answers 503 `draining`
    /// from then on.
    draining: CancellationToken,
    /// Cancelled at the end of the shutdown grace period: streaming calls
    /// still running end with a final error.
    cut: CancellationToken,
    /// Pipelines by name: read at start, then again on every repository
    /// poll (a request takes the map as it was when it arrived).
    pipelines: std::sync::RwLock<Arc<HashMap<String, super::pipeline::Pipeline>>>,
}

impl Service {
    /// `stops.draining` turns `/readyz` to 503 `draining`, `stops.cut` ends
    /// the streaming calls still running.
    pub fn new(
        exec: ExecutorHandle,
        metrics: Arc<Metrics>,
        limits: ServiceLimits,
        stops: &Stops,
    ) -> Self {
        Self {
            exec,
            metrics,
            limits,
            ingest: std::sync::OnceLock::new(),
            draining: stops.draining.clone(),
            cut: stops.cut.clone(),
            pipelines: Default::default(),
        }
    }

    /// Resolves when the streaming calls must end.
    pub fn cut(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.cut.clone().cancelled_owned()
    }

    /// The largest `timeout_ms`; a bulk line without one gets it.
    pub fn max_timeout(&self) -> Duration {
        self.limits.max_timeout
    }

    /// Reports Kafka ingestion in `/readyz` and `/v1/ingest` from now on.
    pub fn set_ingest(&self, status: Arc<IngestStatus>) {
        let _ = self.ingest.set(status);
    }

    pub fn ingest(&self) -> IngestReport {
        match self.ingest.get() {
            Some(s) => s.report(),
            None => IngestReport {
                enabled: false,
                connected: false,
                updates_applied: 0,
                partitions: Vec::new(),
            },
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Replaces the pipelines served.
    pub fn set_pipelines(&self, pipelines: Vec<super::pipeline::Pipeline>) {
        let map = pipelines.into_iter().map(|p| (p.name.clone(), p)).collect();
        *self.pipelines.write().expect("pipelines lock poisoned") = Arc::new(map);
    }

    /// The pipelines served now, by name.
    pub fn pipelines(&self) -> Arc<HashMap<String, super::pipeline::Pipeline>> {
        self.pipelines
            .read()
            .expect("pipelines lock poisoned")
            .clone()
    }

    pub(super) fn pipeline(&self, name: &str) -> Option<super::pipeline::Pipeline> {
        self.pipelines().get(name).cloned()
    }

    /// The target of a bulk call: a model or a pipeline.
    pub fn bulk_target(&self, name: &str) -> Result<(), ServeError> {
        if self.pipeline(name).is_some() {
            return Ok(());
        }
        self.lookup(name).map(|_| ())
    }

    pub(super) fn exec(&self) -> &ExecutorHandle {
        &self.exec
    }

    fn lookup(&self, name: &str) -> Result<(ModelIndex, &Arc<ServedModel>), ServeError> {
        self.exec.registry().get(name).ok_or_else(|| {
            let known: Vec<&str> = self
                .exec
                .registry()
                .models()
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            ServeError::NotFound(format!(
                "model '{name}' not found; models: {}",
                known.join(", ")
            ))
        })
    }

    pub(super) fn timeout(&self, timeout_ms: Option<u64>) -> Result<Duration, ServeError> {
        match timeout_ms {
            None => Ok(self.limits.default_timeout),
            Some(0) => Err(ServeError::Invalid("timeout_ms must be >= 1, got 0".into())),
            Some(ms) if ms > self.limits.max_timeout.as_millis() as u64 => {
                Err(ServeError::Invalid(format!(
                    "timeout_ms must be <= {}, got {ms}",
                    self.limits.max_timeout.as_millis()
                )))
            }
            Some(ms) => Ok(Duration::from_millis(ms)),
        }
    }

    /// Counts the request and its latency under `route`, the version that
    /// answered (empty when none did), the status it ended in and its
    /// priority class (empty for a route that does not score).
    pub(super) fn observe<T>(
        &self,
        model: &str,
        version: &str,
        route: &str,
        priority: &str,
        started: Instant,
        result: &Result<T, ServeError>,
    ) {
        let status = match result {
            Ok(_) => 200,
            Err(e) => e.status(),
        };
        self.metrics
            .requests
            .with_label_values(&[model, version, route, &status.to_string(), priority])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[model, version, route, priority])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts a request refused before the service saw it (an unreadable
    /// body, a bad path segment, no such route). The model label is kept
    /// only for a served model, so arbitrary paths cannot grow the series.
    pub fn count_refused(&self, model: &str, route: &str, e: &ServeError) {
        self.count_status(model, route, e.status());
    }

    pub fn count_status(&self, model: &str, route: &str, status: u16) {
        let model = if self.exec.registry().get(model).is_some() {
            model
        } else {
            ""
        };
        self.metrics
            .requests
            .with_label_values(&[model, "", route, &status.to_string(), ""])
            .inc();
    }

    pub async fn recommend(
        &self,
        model: &str,
        req: RecommendRequest,
    ) -> Result<RecommendResponse, ServeError> {
        self.recommend_counted(model, req, true).await
    }

    /// A recommend whose answer counts as an impression for online
    /// evaluation when `online` (a pipeline's candidates do not).
    pub(super) async fn recommend_counted(
        &self,
        model: &str,
        req: RecommendRequest,
        online: bool,
    ) -> Result<RecommendResponse, ServeError> {
        let started = Instant::now();
        let class = class_of(req.priority);
        let result = self.recommend_inner(model, req, online).await;
        let label = if self.exec.registry().get(model).is_some() {
            model
        } else {
            ""
        };
        let version = result
            .as_ref()
            .map_or(String::new(), |r| r.version.to_string());
        self.observe(
            label,
            &version,
            "recommend",
            class.as_str(),
            started,
            &result,
        );
        result
    }

    async fn recommend_inner(
        &self,
        model: &str,
        req: RecommendRequest,
        online: bool,
    ) -> Result<RecommendResponse, ServeError> {
        let (_, served) = self.lookup(model)?;
        let route = served.route(req.user_id, req.version)?;
        let spec = route.resident.spec.clone();
        let version = route.resident.version;
        spec.accepts(model, OpKind::Recommend)
            .map_err(ServeError::Invalid)?;
        if req.k == 0 {
            return Err(ServeError::Invalid("k must be >= 1, got 0".into()));
        }
        if req.k > spec.limits.max_k {
            return Err(ServeError::Invalid(format!(
                "k must be <= {}, got {}",
                spec.limits.max_k, req.k
            )));
        }
        if req.exclude.len() > spec.limits.max_exclude {
            return Err(ServeError::Invalid(format!(
                "exclude must have <= {} ids, got {}",
                spec.limits.max_exclude,
                req.exclude.len()
            )));
        }
        if let Some(filter) = &req.filter {
            check_filter(filter).map_err(ServeError::Invalid)?;
            // Unknown attributes are refused here, before the request can
            // be shed; the executor resolves the filter again against the
            // table it runs on.
            let catalogue = &route.resident.catalogue;
            if let Ok((_, shape)) = self.exec.registry().catalogues().resolve(Some(catalogue)) {
                if let Some(name) = filter.keys().find(|n| !shape.attributes.contains(n)) {
                    return Err(ServeError::Invalid(unknown_attribute(
                        name,
                        catalogue,
                        &shape.attributes,
                    )));
                }
            }
        }
        let context = check_context(model, &spec, req.context.as_deref())?;
        let timeout = self.timeout(req.timeout_ms)?;
        let op = Op::Recommend {
            user_id: req.user_id,
            k: req.k,
            exclude: req.exclude,
            filter: req.filter,
            online,
            context,
        };
        let rows = spec.rows(&op);
        let class = class_of(req.priority);
        let answer = self.exec.infer(route, op, rows, timeout, class).await?;
        match answer.output {
            Output::TopK(items) => Ok(RecommendResponse {
                model: served.name.clone(),
                version,
                items: items
                    .into_iter()
                    .map(|s| ScoredItem {
                        id: s.id,
                        score: s.score,
                    })
                    .collect(),
                degraded: answer.note == Note::Degraded,
                cold_start: answer.note == Note::ColdStart,
            }),
            Output::Scores(_) => Err(ServeError::Internal(
                "recommend answered with scores: this is a bug".into(),
            )),
        }
    }

    /// Checks a context against the version of `model` that would serve
    /// `user_id` (nothing to check when none is serving: the request to it
    /// answers that).
    /// The context a pipeline stage gets: checked against the version that
    /// serves `user_id` when it reads one, none when it reads none. A stage
    /// that cannot be routed gets it as given (its own call answers).
    pub(super) fn stage_context(
        &self,
        model: &str,
        user_id: u64,
        context: Option<&[f64]>,
    ) -> Result<Option<Vec<f64>>, ServeError> {
        let Some(context) = context else {
            return Ok(None);
        };
        let Some(route) = self
            .exec
            .registry()
            .get(model)
            .and_then(|(_, served)| served.route(user_id, None).ok())
        else {
            return Ok(Some(context.to_vec()));
        };
        if route.resident.spec.context_dim == 0 {
            return Ok(None);
        }
        check_context(model, &route.resident.spec, Some(context))?;
        Ok(Some(context.to_vec()))
    }

    pub async fn score(&self, model: &str, req: ScoreRequest) -> Result<ScoreResponse, ServeError> {
        let started = Instant::now();
        let class = class_of(req.priority);
        let result = self.score_inner(model, req).await;
        let label = if self.exec.registry().get(model).is_some() {
            model
        } else {
            ""
        };
        let version = result
            .as_ref()
            .map_or(String::new(), |r| r.version.to_string());
        self.observe(label, &version, "score", class.as_str(), started, &result);
        result
    }

    async fn score_inner(
        &self,
        model: &str,
        req: ScoreRequest,
    ) -> Result<ScoreResponse, ServeError> {
        if self.pipeline(model).is_some() {
            return Err(ServeError::Invalid(format!(
                "'{model}' is a pipeline: it answers recommend only (score its ranker instead)"
            )));
        }
        let (_, served) = self.lookup(model)?;
        let route = served.route(req.user_id, req.version)?;
        let spec = route.resident.spec.clone();
        let version = route.resident.version;
        spec.accepts(model, OpKind::Score)
            .map_err(ServeError::Invalid)?;
        if req.items.is_empty() {
            return Err(ServeError::Invalid("items must not be empty".into()));
        }
        if req.items.len() > spec.limits.max_items {
            return Err(ServeError::Invalid(format!(
                "items must have <= {} ids, got {}",
                spec.limits.max_items,
                req.items.len()
            )));
        }
        let context = check_context(model, &spec, req.context.as_deref())?;
        let timeout = self.timeout(req.timeout_ms)?;
        let op = Op::Score {
            user_id: req.user_id,
            items: req.items,
            context,
        };
        let rows = spec.rows(&op);
        let class = class_of(req.priority);
        match self
            .exec
            .infer(route, op, rows, timeout, class)
            .await?
            .output
        {
            Output::Scores(scores) => Ok(ScoreResponse {
                model: served.name.clone(),
                version,
                scores,
            }),
            Output::TopK(_) => Err(ServeError::Internal(
                "score answered with a top-k: this is a bug".into(),
            )),
        }
    }

    pub async fn upsert_user(
        &self,
        user_id: u64,
        req: UserRequest,
    ) -> Result<UserResponse, ServeError> {
        let started = Instant::now();
        let result = self.upsert_user_inner(user_id, req).await;
        self.observe("", "", "upsert_user", "", started, &result);
        result
    }

    /// A user's stored history and features (empty for an unknown user).
    pub async fn get_user(&self, user_id: u64) -> Result<UserResponse, ServeError> {
        let started = Instant::now();
        let result = self
            .exec
            .get_user(user_id)
            .await
            .map(|summary| UserResponse {
                user_id: summary.user_id,
                history: summary.history,
                features: summary.features,
                sparse: summary.sparse,
            });
        self.observe("", "", "get_user", "", started, &result);
        result
    }

    async fn upsert_user_inner(
        &self,
        user_id: u64,
        req: UserRequest,
    ) -> Result<UserResponse, ServeError> {
        let features = req
            .features
            .as_deref()
            .map(|f| finite_f32(f, "features"))
            .transpose()?;
        let summary = self
            .exec
            .upsert_user(UserUpdate {
                user_id,
                history: req.history,
                features,
                sparse: req.sparse,
            })
            .await?;
        Ok(UserResponse {
            user_id: summary.user_id,
            history: summary.history,
            features: summary.features,
            sparse: summary.sparse,
        })
    }

    /// Writes an item of `catalogue` (`None`: the only one loaded).
    pub async fn write_item(
        &self,
        catalogue: Option<String>,
        item_id: u64,
        req: ItemRequest,
    ) -> Result<ItemSummary, ServeError> {
        let started = Instant::now();
        let result = self.write_item_inner(catalogue, item_id, req).await;
        self.observe("", "", "write_item", "", started, &result);
        result
    }

    /// An item of a catalogue as stored.
    pub async fn get_item(
        &self,
        catalogue: String,
        item_id: u64,
    ) -> Result<StoredItem, ServeError> {
        let started = Instant::now();
        let result = self.exec.get_item(catalogue, item_id).await;
        self.observe("", "", "get_item", "", started, &result);
        result
    }

    pub async fn catalogues(&self) -> Result<CataloguesResponse, ServeError> {
        let catalogues = self.exec.catalogues().await?;
        Ok(CataloguesResponse { catalogues })
    }

    async fn write_item_inner(
        &self,
        catalogue: Option<String>,
        item_id: u64,
        req: ItemRequest,
    ) -> Result<ItemSummary, ServeError> {
        if req.attributes.as_ref().is_some_and(|a| a.is_empty()) {
            return Err(ServeError::Invalid(
                "attributes must name at least one attribute, got an empty map".into(),
            ));
        }
        if req.deleted && req.attributes.is_some() {
            return Err(ServeError::Invalid(
                "give either `attributes` or `deleted: true`, not both".into(),
            ));
        }
        let embedding = match (req.deleted, &req.embedding) {
            (true, Some(_)) => {
                return Err(ServeError::Invalid(
                    "give either `embedding` or `deleted: true`, not both".into(),
                ))
            }
            (true, None) => None,
            (false, Some(e)) => Some(finite_f32(e, "embedding")?),
            (false, None) if req.attributes.is_some() => None,
            (false, None) => {
                return Err(ServeError::Invalid(
                    "an item write needs `embedding`, `attributes` or `deleted: true`".into(),
                ))
            }
        };
        self.exec
            .write_item(ItemWrite {
                item_id,
                embedding,
                version: req.version,
                catalogue,
                attributes: req.attributes,
            })
            .await
    }

    pub fn models(&self) -> ModelsResponse {
        let mut models: Vec<ModelInfo> = self
            .exec
            .registry()
            .models()
            .iter()
            .map(|m| self.info(m))
            .collect();
        let served = self.pipelines();
        let mut pipelines: Vec<&super::pipeline::Pipeline> = served.values().collect();
        pipelines.sort_by(|a, b| a.name.cmp(&b.name));
        models.extend(pipelines.into_iter().map(|p| self.pipeline_info(p)));
        ModelsResponse { models }
    }

    pub fn model(&self, name: &str) -> Result<ModelInfo, ServeError> {
        if let Some(p) = self.pipeline(name) {
            return Ok(self.pipeline_info(&p));
        }
        let (_, served) = self.lookup(name)?;
        Ok(self.info(served))
    }

    /// A pipeline as `/v1/models` shows it: its stages, `ready` or `failed`
    /// with the reason, the retrieval model's catalogue size and device.
    fn pipeline_info(&self, p: &super::pipeline::Pipeline) -> ModelInfo {
        let retrieve = self
            .exec
            .registry()
            .get(&p.spec.retrieve)
            .map(|(_, m)| self.info(m));
        ModelInfo {
            name: p.name.clone(),
            version: p.version,
            kind: Some(crate::model::pipeline::PIPELINE.to_string()),
            state: if p.error.is_some() { "failed" } else { "ready" }.to_string(),
            error: p.error.clone(),
            device: retrieve
                .as_ref()
                .map_or_else(|| self.exec.registry().device(), |r| r.device.clone()),
            device_reason: None,
            engine: None,
            dim: retrieve.as_ref().and_then(|r| r.dim),
            user_feature_dim: None,
            user_sparse_dim: None,
            context_dim: None,
            history_len: None,
            items: retrieve.as_ref().map_or(0, |r| r.items),
            batching: None,
            limits: Some(LimitsInfo {
                max_k: p.spec.limits.max_k.min(p.spec.candidates),
                max_items: 0,
                // `exclude` applies in the retrieval stage, under its limit.
                max_exclude: retrieve
                    .as_ref()
                    .and_then(|r| r.limits.as_ref())
                    .map_or(0, |l| l.max_exclude),
            }),
            queue_depth: 0,
            versions: Vec::new(),
            traffic: Default::default(),
            pipeline: Some(PipelineInfo {
                retrieve: p.spec.retrieve.clone(),
                candidates: p.spec.candidates,
                rank: p.spec.rank.clone(),
            }),
        }
    }

    fn info(&self, m: &ServedModel) -> ModelInfo {
        let state = m.state();
        let spec = m.spec();
        let spec = spec.as_deref();
        let versions = m
            .versions()
            .into_iter()
            .map(|(version, e, traffic)| {
                let v = version.to_string();
                let impressions = self
                    .metrics
                    .online_impressions
                    .with_label_values(&[&m.name, &v])
                    .get();
                let hits = self
                    .metrics
                    .online_hits
                    .with_label_values(&[&m.name, &v])
                    .get();
                VersionInfo {
                    version,
                    state: e.state.as_str().to_string(),
                    error: match e.state {
                        LoadState::Failed(why) => Some(why),
                        _ => None,
                    },
                    traffic,
                    online: OnlineStats {
                        impressions,
                        hits,
                        hit_rate: if impressions == 0 {
                            0.0
                        } else {
                            hits as f64 / impressions as f64
                        },
                    },
                }
            })
            .collect();
        let cpu_reason = m.cpu_reason();
        ModelInfo {
            name: m.name.clone(),
            version: m.primary_version().unwrap_or(0),
            kind: spec.map(|s| s.kind.as_str().to_string()),
            state: state.as_str().to_string(),
            error: match state {
                LoadState::Failed(why) => Some(why),
                _ => None,
            },
            device: match cpu_reason {
                Some(_) => "cpu".to_string(),
                None => self.exec.registry().device(),
            },
            device_reason: cpu_reason.or_else(|| self.device_reason()),
            engine: m.engine(),
            dim: spec.map(|s| s.dim),
            user_feature_dim: spec.map(|s| s.user_feature_dim),
            user_sparse_dim: spec.map(|s| s.user_sparse_dim).filter(|&n| n > 0),
            context_dim: spec.map(|s| s.context_dim).filter(|&n| n > 0),
            history_len: spec.map(|s| s.history_len),
            items: m.item_count(),
            batching: spec.map(|s| BatchingInfo {
                max_batch_size: s.batching.max_batch_size,
                max_queue_delay_us: s.batching.max_queue_delay_us,
                max_queue_size: s.batching.max_queue_size,
            }),
            limits: spec.map(|s| LimitsInfo {
                max_k: s.limits.max_k,
                max_items: s.limits.max_items,
                max_exclude: s.limits.max_exclude,
            }),
            queue_depth: m.queued(),
            versions,
            traffic: m
                .traffic()
                .into_iter()
                .map(|(v, p)| (v.to_string(), p))
                .collect(),
            pipeline: None,
        }
    }

    /// Why the GPU is not serving: not used at start, or failed and standing by.
    fn device_reason(&self) -> Option<String> {
        let registry = self.exec.registry();
        let health = registry.health();
        match (registry.device_reason(), health.healthy) {
            (Some(r), _) => Some(r),
            (None, false) => Some(format!(
                "unhealthy, serving from the CPU: {}",
                health.reason.unwrap_or_default()
            )),
            (None, true) => None,
        }
    }

    pub fn readiness(&self) -> Readiness {
        let registry = self.exec.registry();
        let reason = if self.draining.is_cancelled() {
            Some("draining".to_string())
        } else {
            registry.not_ready_reason()
        };
        Readiness {
            ready: reason.is_none(),
            device: registry.device(),
            device_reason: self.device_reason(),
            device_healthy: registry.health().healthy,
            kafka: self.ingest.get().map(|s| {
                if s.connected() {
                    "connected"
                } else {
                    "disconnected"
                }
                .to_string()
            }),
            reason,
            models: registry
                .models()
                .iter()
                .map(|m| (m.name.clone(), m.state().as_str().to_string()))
                .collect(),
        }
    }
}

fn finite_f32(values: &[f64], field: &str) -> Result<Vec<f32>, ServeError> {
    crate::features::updates::finite_f32(values, field).map_err(ServeError::Invalid)
}

/// A request's context: `context_dim` finite values of the serving
/// version's spec, or none (the model then reads zeros).
fn check_context(
    model: &str,
    spec: &ModelSpec,
    context: Option<&[f64]>,
) -> Result<Option<Vec<f32>>, ServeError> {
    let Some(context) = context else {
        return Ok(None);
    };
    if spec.context_dim == 0 {
        return Err(ServeError::Invalid(format!(
            "model {model} reads no context (context_dim = 0), got {} values",
            context.len()
        )));
    }
    if context.len() != spec.context_dim {
        return Err(ServeError::Invalid(format!(
            "context must have {} values (context_dim), got {}",
            spec.context_dim,
            context.len()
        )));
    }
    finite_f32(context, "context").map(Some)
}

pub(super) fn class_of(priority: Option<Priority>) -> Class {
    match priority.unwrap_or_default() {
        Priority::Interactive => Class::Interactive,
        Priority::Bulk => Class::Bulk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(context_dim: usize) -> ModelSpec {
        let mut spec =
            ModelSpec::parse("kind = \"two_tower\"\ndim = 4\nhistory_len = 5\ncatalogue = \"c\"\n")
                .unwrap();
        spec.context_dim = context_dim;
        spec
    }

    fn refused(r: Result<Option<Vec<f32>>, ServeError>) -> String {
        match r {
            Err(ServeError::Invalid(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A context is `context_dim` finite values; none is always fine, and a
    /// model that reads none refuses any.
    #[test]
    fn a_context_is_checked_against_the_serving_spec() {
        assert_eq!(check_context("m", &spec(2), None).unwrap(), None);
        assert_eq!(check_context("m", &spec(0), None).unwrap(), None);
        assert_eq!(
            check_context("m", &spec(2), Some(&[0.5, -2.0])).unwrap(),
            Some(vec![0.5, -2.0])
        );
        assert_eq!(
            refused(check_context("m", &spec(2), Some(&[1.0, 2.0, 3.0]))),
            "context must have 2 values (context_dim), got 3"
        );
        assert_eq!(
            refused(check_context("m", &spec(2), Some(&[]))),
            "context must have 2 values (context_dim), got 0"
        );
        assert_eq!(
            refused(check_context("shop", &spec(0), Some(&[1.0, 2.0, 3.0]))),
            "model shop reads no context (context_dim = 0), got 3 values"
        );
        let m = refused(check_context("m", &spec(2), Some(&[1.0, 1e39])));
        assert!(
            m.starts_with("context[1] must be a finite 32-bit float"),
            "{m}"
        );
        let m = refused(check_context("m", &spec(2), Some(&[f64::NAN, 1.0])));
        assert!(
            m.starts_with("context[0] must be a finite 32-bit float"),
            "{m}"
        );
    }
}
