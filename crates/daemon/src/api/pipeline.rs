//! Pipelines: a recommend on a `kind = "pipeline"` model runs its retrieval
//! model's recommend for `candidates` items (history exclusions, `exclude`
//! and `filter` apply there), then its ranker's score of those candidates,
//! and answers the top `k` by the ranker's score. Each stage is an ordinary
//! request of its model: batched with that model's other requests, routed
//! by its own traffic split, counted in its own metrics. `timeout_ms`
//! covers both stages; when the ranking stage cannot finish in time or is
//! shed, the answer is the retrieval order, flagged `degraded` with
//! `degraded_reason: "rank_stage"`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use rankd_client::types::*;
use serde::Serialize;

use super::service::Service;
use crate::error::ServeError;
use crate::exec::registry::LoadState;
use crate::model::pipeline::PipelineSpec;
use crate::model::Repository;

/// A pipeline as the daemon serves it.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub version: u64,
    pub spec: PipelineSpec,
    /// Why it cannot serve (a stage missing, failed or mismatched).
    pub error: Option<String>,
}

/// A recommend's answer: a model's, or a pipeline's.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Recommended {
    Model(RecommendResponse),
    Pipeline(PipelineResponse),
}

/// Checks each pipeline's stages against the loaded models: the retrieval
/// model answers recommend, the ranker is a ranker that takes `candidates`
/// items, and both read the same catalogue (`catalogue_of` maps a model's
/// name to its catalogue's). A pipeline that fails keeps the reason in
/// `error` and answers 503 with it.
pub fn check(
    pipelines: &mut [Pipeline],
    service: &Service,
    catalogue_of: &HashMap<String, String>,
) {
    for p in pipelines {
        if p.error.is_none() {
            p.error = check_one(p, service, catalogue_of).err();
        }
    }
}

fn check_one(
    p: &Pipeline,
    service: &Service,
    catalogue_of: &HashMap<String, String>,
) -> Result<(), String> {
    let registry = service.exec().registry();
    let stage = |name: &str, what: &str| {
        let (_, served) = registry
            .get(name)
            .ok_or_else(|| format!("its {what} model '{name}' is not in the repository"))?;
        if served.state() != LoadState::Ready {
            return Err(format!("its {what} model '{name}' did not load"));
        }
        served
            .spec()
            .ok_or_else(|| format!("its {what} model '{name}' did not load"))
    };
    let retrieve = stage(&p.spec.retrieve, "retrieve")?;
    let rank = stage(&p.spec.rank, "rank")?;
    retrieve
        .accepts(&p.spec.retrieve, crate::model::OpKind::Recommend)
        .map_err(|e| format!("retrieve = '{}': {e}", p.spec.retrieve))?;
    if !rank.ranks() {
        return Err(format!(
            "rank = '{}' is a {} model, not a ranker",
            p.spec.rank, rank.kind
        ));
    }
    if p.spec.candidates > retrieve.limits.max_k {
        return Err(format!(
            "candidates = {} is over the retrieval model's limits.max_k ({})",
            p.spec.candidates, retrieve.limits.max_k
        ));
    }
    if p.spec.candidates > rank.limits.max_items {
        return Err(format!(
            "candidates = {} is over the ranker's limits.max_items ({})",
            p.spec.candidates, rank.limits.max_items
        ));
    }
    let a = catalogue_of.get(&p.spec.retrieve);
    let b = catalogue_of.get(&p.spec.rank);
    if a != b {
        return Err(format!(
            "its stages read different catalogues: '{}' reads {}, '{}' reads {}",
            p.spec.retrieve,
            a.map_or("none", String::as_str),
            p.spec.rank,
            b.map_or("none", String::as_str),
        ));
    }
    Ok(())
}

/// Reads the repository's pipelines, checks their stages and serves the
/// result: at start, and again on every repository poll, so a new pipeline
/// folder, a new version of one, a removed one, or a stage that loaded or
/// failed since shows in the next answer.
#[derive(Debug, Default)]
pub struct Refresher {
    /// Versions that could not be read, logged once each.
    unreadable: HashSet<(String, u64)>,
}

impl Refresher {
    pub async fn refresh(&mut self, root: &Path, service: &Service) {
        let repo = match Repository::scan(root) {
            Ok(repo) => repo,
            Err(e) => {
                tracing::warn!(error = %e, "pipelines: the model repository cannot be read; the pipelines served stay");
                return;
            }
        };
        let mut pipelines: Vec<Pipeline> = repo
            .pipelines
            .iter()
            .map(|dir| self.read(&dir.name, &dir.versions))
            .collect();
        if !pipelines.is_empty() {
            let mut catalogue_of = HashMap::new();
            for c in service.exec().catalogues().await.unwrap_or_default() {
                for m in c.models {
                    let name = m.rsplit_once('@').map_or(m.as_str(), |(n, _)| n);
                    catalogue_of.insert(name.to_string(), c.name.clone());
                }
            }
            check(&mut pipelines, service, &catalogue_of);
        }
        let before = service.pipelines();
        for p in &pipelines {
            let was = before.get(&p.name);
            if was.is_some_and(|w| w.version == p.version && w.error == p.error) {
                continue;
            }
            match &p.error {
                None => tracing::info!(
                    pipeline = %p.name,
                    version = p.version,
                    retrieve = %p.spec.retrieve,
                    candidates = p.spec.candidates,
                    rank = %p.spec.rank,
                    "pipeline serving"
                ),
                Some(why) => {
                    tracing::error!(pipeline = %p.name, version = p.version, error = %why, "pipeline cannot serve")
                }
            }
        }
        for name in before.keys() {
            if !pipelines.iter().any(|p| &p.name == name) {
                tracing::info!(pipeline = %name, "pipeline removed from the repository");
            }
        }
        service.set_pipelines(pipelines);
    }

    /// The newest version of a pipeline folder whose model.toml reads (a
    /// newer one being copied or broken leaves the older one serving, with
    /// one warning); when none reads, the newest with its error.
    fn read(&mut self, name: &str, versions: &[(u64, std::path::PathBuf)]) -> Pipeline {
        let mut newest_error = None;
        for (version, path) in versions.iter().rev() {
            match PipelineSpec::read(&path.join("model.toml")) {
                Ok(spec) => {
                    return Pipeline {
                        name: name.to_string(),
                        version: *version,
                        spec,
                        error: None,
                    }
                }
                Err(e) => {
                    if self.unreadable.insert((name.to_string(), *version)) {
                        tracing::warn!(pipeline = %name, version, error = %e, "pipeline version cannot be read; an older version, if any, serves");
                    }
                    newest_error.get_or_insert((*version, e.to_string()));
                }
            }
        }
        let (version, error) = newest_error.unwrap_or((0, "it has no version folder".into()));
        Pipeline {
            name: name.to_string(),
            version,
            spec: PipelineSpec {
                retrieve: String::new(),
                candidates: 0,
                rank: String::new(),
                limits: Default::default(),
            },
            error: Some(error),
        }
    }
}

impl Service {
    /// A recommend on a model or on a pipeline.
    pub async fn recommend_any(
        &self,
        model: &str,
        req: RecommendRequest,
    ) -> Result<Recommended, ServeError> {
        match self.pipeline(model) {
            Some(p) => {
                if let Some(why) = &p.error {
                    return Err(ServeError::NotReady(format!(
                        "pipeline '{}' (version {}) cannot serve: {why}",
                        p.name, p.version
                    )));
                }
                self.recommend_pipeline(&p, req)
                    .await
                    .map(Recommended::Pipeline)
            }
            None => self.recommend(model, req).await.map(Recommended::Model),
        }
    }

    async fn recommend_pipeline(
        &self,
        p: &Pipeline,
        req: RecommendRequest,
    ) -> Result<PipelineResponse, ServeError> {
        let started = Instant::now();
        let class = super::service::class_of(req.priority);
        let result = self.pipeline_inner(p, req).await;
        let version = p.version.to_string();
        self.observe(
            &p.name,
            &version,
            "recommend",
            class.as_str(),
            started,
            &result,
        );
        result
    }

    async fn pipeline_inner(
        &self,
        p: &Pipeline,
        req: RecommendRequest,
    ) -> Result<PipelineResponse, ServeError> {
        if req.k == 0 {
            return Err(ServeError::Invalid("k must be >= 1, got 0".into()));
        }
        let max_k = p.spec.limits.max_k.min(p.spec.candidates);
        if req.k > max_k {
            return Err(ServeError::Invalid(format!(
                "k must be <= {max_k} (pipeline '{}' ranks {} candidates), got {}",
                p.name, p.spec.candidates, req.k
            )));
        }
        if let Some(v) = req.version {
            return Err(ServeError::Invalid(format!(
                "version {v}: a pipeline takes no `version`; pipeline '{}' routes each stage by its own traffic split",
                p.name
            )));
        }
        let timeout = self.timeout(req.timeout_ms)?;
        let deadline = Instant::now() + timeout;
        let (k, user_id, priority) = (req.k, req.user_id, req.priority);
        // Each stage that reads a context gets it, checked against its own
        // context_dim before retrieval runs (a context the ranker refuses is
        // refused whether or not it gets to rank); a stage that reads none
        // gets none. A context no stage reads is refused.
        let rank_context = self.stage_context(&p.spec.rank, user_id, req.context.as_deref())?;
        let retrieve_context =
            self.stage_context(&p.spec.retrieve, user_id, req.context.as_deref())?;
        if let Some(given) = &req.context {
            if rank_context.is_none() && retrieve_context.is_none() {
                return Err(ServeError::Invalid(format!(
                    "pipeline '{}' reads no context: neither '{}' nor '{}' has a context_dim, got {} values",
                    p.name,
                    p.spec.retrieve,
                    p.spec.rank,
                    given.len()
                )));
            }
        }
        let stage = Instant::now();
        // The candidates are not impressions: the final list is credited to
        // both stages' versions below.
        let retrieved = self
            .recommend_counted(
                &p.spec.retrieve,
                RecommendRequest {
                    user_id,
                    k: p.spec.candidates,
                    exclude: req.exclude,
                    timeout_ms: Some(timeout.as_millis().max(1) as u64),
                    version: None,
                    priority,
                    filter: req.filter,
                    context: retrieve_context,
                },
                false,
            )
            .await?;
        self.metrics()
            .pipeline_stage_seconds
            .with_label_values(&[&p.name, "retrieve"])
            .observe(stage.elapsed().as_secs_f64());
        let in_retrieval_order = |reason: Option<&str>| PipelineResponse {
            model: p.name.clone(),
            items: retrieved
                .items
                .iter()
                .take(k)
                .map(|s| PipelineItem {
                    id: s.id,
                    score: s.score,
                    retrieval_score: s.score,
                })
                .collect(),
            versions: StageVersions {
                retrieve: retrieved.version,
                rank: None,
            },
            degraded: retrieved.degraded || reason.is_some(),
            degraded_reason: reason
                .or(retrieved.degraded.then_some("retrieve_stage"))
                .map(str::to_string),
            cold_start: retrieved.cold_start,
        };
        // Popular items stand in for the model: nothing to rank, and no
        // candidates at all when the filter passes none.
        if retrieved.degraded || retrieved.cold_start || retrieved.items.is_empty() {
            return Ok(in_retrieval_order(None));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.as_millis() == 0 {
            return Ok(self.rank_stage_skipped(p, user_id, in_retrieval_order(Some("rank_stage"))));
        }
        let stage = Instant::now();
        let ranked = self
            .score(
                &p.spec.rank,
                ScoreRequest {
                    user_id,
                    items: retrieved.items.iter().map(|s| s.id).collect(),
                    timeout_ms: Some(left.as_millis() as u64),
                    version: None,
                    priority,
                    context: rank_context,
                },
            )
            .await;
        self.metrics()
            .pipeline_stage_seconds
            .with_label_values(&[&p.name, "rank"])
            .observe(stage.elapsed().as_secs_f64());
        let ranked = match ranked {
            Ok(r) => r,
            // Shed, out of time, or the ranker not serving just now (a
            // version loading or failed): the retrieval order stands in.
            Err(
                ServeError::Overloaded { .. }
                | ServeError::DeadlineExceeded(_)
                | ServeError::NotReady(_),
            ) => {
                return Ok(self.rank_stage_skipped(
                    p,
                    user_id,
                    in_retrieval_order(Some("rank_stage")),
                ));
            }
            Err(e) => return Err(e),
        };
        let mut items: Vec<PipelineItem> = retrieved
            .items
            .iter()
            .zip(&ranked.scores)
            .map(|(s, &score)| PipelineItem {
                id: s.id,
                score,
                retrieval_score: s.score,
            })
            .collect();
        // Best first; equal scores by the smaller id, as every list.
        items.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        items.truncate(k);
        let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
        self.credit(user_id, &p.spec.retrieve, retrieved.version, &ids);
        self.credit(user_id, &p.spec.rank, ranked.version, &ids);
        Ok(PipelineResponse {
            model: p.name.clone(),
            items,
            versions: StageVersions {
                retrieve: retrieved.version,
                rank: Some(ranked.version),
            },
            degraded: false,
            degraded_reason: None,
            cold_start: false,
        })
    }

    fn rank_stage_skipped(
        &self,
        p: &Pipeline,
        user_id: u64,
        answer: PipelineResponse,
    ) -> PipelineResponse {
        self.metrics()
            .degraded
            .with_label_values(&[&p.name, "rank_stage"])
            .inc();
        let ids: Vec<u64> = answer.items.iter().map(|i| i.id).collect();
        self.credit(user_id, &p.spec.retrieve, answer.versions.retrieve, &ids);
        answer
    }

    /// Counts `items` as an impression of `model`'s `version` for online
    /// evaluation.
    fn credit(&self, user_id: u64, model: &str, version: u64, items: &[u64]) {
        if let Some((index, _)) = self.exec().registry().get(model) {
            self.exec().served(user_id, index, version, items.to_vec());
        }
    }
}
