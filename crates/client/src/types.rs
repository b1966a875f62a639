//! Request and response bodies, shared by every transport (JSON over HTTP,
//! MessagePack over the socket), so both speak exactly the same shapes.

use serde::{Deserialize, Serialize};

fn default_k() -> usize {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    pub user_id: u64,
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default)]
    pub exclude: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Served by this model version (when loaded) instead of the traffic split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `interactive` (the default) or `bulk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Only items whose attributes hold every clause may be returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    /// The request's context, `context_dim` floats of the serving version
    /// (absent: zeros). Read as f64 so that a value too large for f32 is
    /// reported as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<f64>>,
}

/// A recommend's filter: attribute name → the allowed value or values; an
/// item passes when every attribute named holds one of its values.
pub type Filter = std::collections::BTreeMap<String, FilterValues>;

/// One attribute's allowed values: `3` or `[3, 7]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FilterValues {
    One(i64),
    Any(Vec<i64>),
}

impl FilterValues {
    pub fn values(&self) -> &[i64] {
        match self {
            FilterValues::One(v) => std::slice::from_ref(v),
            FilterValues::Any(v) => v,
        }
    }
}

/// A scoring request's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// A caller waiting on the answer: served first.
    #[default]
    Interactive,
    /// Offline work: uses the capacity interactive callers leave.
    Bulk,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    pub user_id: u64,
    pub items: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Served by this model version (when loaded) instead of the traffic split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `interactive` (the default) or `bulk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// The request's context, as in `RecommendRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<f64>>,
}

/// `POST /v1/users/{user_id}`: a field given replaces that part of the state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<u64>>,
    /// Read as f64 so that a value too large for f32 is reported as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<f64>>,
    /// Categorical features (ids), `user_sparse_dim` of a loaded model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<Vec<i64>>,
}

/// `POST /v1/items/{item_id}`: `{"embedding": [...], "version": 7}` writes the
/// item (a new id grows the catalogue); `{"deleted": true, "version": 8}`
/// removes it from results. Without `version` the write is newer than whatever
/// is stored; with one, a version not newer than the stored one is ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Integer attributes to set (names the catalogue has); alone, they
    /// change an existing item's attributes and keep its embedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<std::collections::BTreeMap<String, i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoredItem {
    pub id: u64,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecommendResponse {
    pub model: String,
    pub version: u64,
    pub items: Vec<ScoredItem>,
    /// The request would have been shed: these are the popular items.
    #[serde(default)]
    pub degraded: bool,
    /// The user has no history and no features: these are the popular items.
    #[serde(default)]
    pub cold_start: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreResponse {
    pub model: String,
    pub version: u64,
    pub scores: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserResponse {
    pub user_id: u64,
    pub history: Vec<u64>,
    pub features: Option<Vec<f32>>,
    /// Categorical features; absent when none are stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<Vec<i64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchingInfo {
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub max_queue_size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsInfo {
    pub max_k: usize,
    pub max_items: usize,
    pub max_exclude: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: u64,
    /// `two_tower` or `ranker`; absent when model.toml could not be read.
    pub kind: Option<String>,
    /// `loading`, `ready` or `failed`.
    pub state: String,
    /// Why the model failed to load.
    pub error: Option<String>,
    pub device: String,
    /// Why the GPU is not used, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_reason: Option<String>,
    /// What runs an onnx model's graph: `tract`, or `onnxruntime
    /// (CPUExecutionProvider)` / `onnxruntime (CUDAExecutionProvider)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    pub dim: Option<usize>,
    pub user_feature_dim: Option<usize>,
    /// Categorical user features the model reads (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_sparse_dim: Option<usize>,
    /// Floats of request context the model reads (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_dim: Option<usize>,
    pub history_len: Option<usize>,
    /// Live items in the model's catalogue.
    pub items: usize,
    pub batching: Option<BatchingInfo>,
    pub limits: Option<LimitsInfo>,
    pub queue_depth: usize,
    /// Every version the repository holds or held, lowest first.
    #[serde(default)]
    pub versions: Vec<VersionInfo>,
    /// The effective split: version (as a string) → percent of users.
    #[serde(default)]
    pub traffic: std::collections::BTreeMap<String, u32>,
    /// A pipeline's stages (`kind` is `pipeline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineInfo>,
}

/// What a pipeline runs: its retrieval model, how many candidates, its ranker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineInfo {
    pub retrieve: String,
    pub candidates: usize,
    pub rank: String,
}

/// One version of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u64,
    /// `loading`, `ready`, `failed` or `unloaded`.
    pub state: String,
    /// Why the version failed to load.
    pub error: Option<String>,
    /// Percent of users this version answers.
    pub traffic: u32,
    /// How the version's recommendations did with the clicks that followed.
    pub online: OnlineStats,
}

/// Recommendations served (impressions) and the lists a later event of the
/// same user clicked (hits), within the online-evaluation window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OnlineStats {
    pub impressions: u64,
    pub hits: u64,
    pub hit_rate: f64,
}

/// `POST /v1/admin/models/{model}/traffic`: `{"split": {"1": 90, "2": 10}}`,
/// or `{"split": null}` to serve the latest ready version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficRequest {
    pub split: Option<std::collections::BTreeMap<String, u32>>,
}

/// `POST /v1/admin/models/{model}/load` and `.../unload`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelsResponse {
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub device: String,
    /// Why the GPU is not used, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_reason: Option<String>,
    /// False while the CPU stands in for a failed device (still ready).
    pub device_healthy: bool,
    /// `connected` or `disconnected` when Kafka ingestion is on (stale
    /// features still serve, so a disconnected broker does not make rankd unready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<String>,
    /// Why not ready, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Each model's load state.
    pub models: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemSummary {
    pub item_id: u64,
    pub version: u64,
    pub deleted: bool,
    /// False when a newer version was already stored.
    pub applied: bool,
    /// The catalogue written (absent from daemons before named catalogues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalogue: Option<String>,
}

/// One item of a pipeline's answer: the ranker's score and the retrieval
/// model's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PipelineItem {
    pub id: u64,
    /// The ranker's probability; the retrieval score when the ranking stage
    /// did not run (`degraded`).
    pub score: f32,
    pub retrieval_score: f32,
}

/// The versions of a pipeline's stages that answered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageVersions {
    pub retrieve: u64,
    /// Absent when the ranking stage did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
}

/// A pipeline's recommend (`kind = "pipeline"`): retrieval, then ranking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineResponse {
    pub model: String,
    pub items: Vec<PipelineItem>,
    pub versions: StageVersions,
    /// The ranking stage could not run in time or was shed (or retrieval
    /// itself degraded): the items are in retrieval order.
    pub degraded: bool,
    /// `rank_stage` when the ranking stage was skipped, `retrieve_stage`
    /// when retrieval answered with the popular items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_reason: Option<String>,
    pub cold_start: bool,
}

/// An item as its catalogue stores it (`GET /v1/catalogues/{catalogue}/items/{item_id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredItem {
    pub catalogue: String,
    pub item_id: u64,
    pub version: u64,
    /// Deleted items keep their row (histories that name them still read
    /// it) but are never returned.
    pub deleted: bool,
    pub embedding: Vec<f32>,
    /// The catalogue's attributes for this item (empty when it has none).
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, i64>,
}

/// A resident catalogue (`GET /v1/catalogues`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogueInfo {
    pub name: String,
    pub dim: usize,
    /// Items that can be returned.
    pub live_rows: usize,
    /// Rows ever allocated, deleted ones included.
    pub rows: usize,
    /// Integer attribute names.
    pub attributes: Vec<String>,
    /// The resident versions reading it, as `model@version`.
    pub models: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CataloguesResponse {
    pub catalogues: Vec<CatalogueInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// Next offset the state includes.
    pub applied_offset: i64,
    /// Next offset committed to the group (-1 before the first commit).
    pub committed_offset: i64,
    /// The partition's end, from the client's statistics (-1 until known).
    pub high_watermark: i64,
    pub lag: i64,
    /// When a batch touching this partition was last applied (ms since the epoch).
    pub last_apply_ms: u64,
}

/// `GET /v1/ingest`: Kafka ingestion, per topic-partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestReport {
    pub enabled: bool,
    pub connected: bool,
    pub updates_applied: u64,
    pub partitions: Vec<PartitionStatus>,
}
