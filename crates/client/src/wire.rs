//! The socket's message shapes. A request is one MessagePack map carrying the
//! same fields as the HTTP JSON bodies plus `id` and `op`; a response carries
//! the same `result` (or `error`) as the HTTP answer, tagged with the `id`.

use serde::{Deserialize, Serialize};

use super::types::*;

/// A field the daemon does not know is refused (`invalid`, naming it), so a
/// client never gets an answer that silently ignored part of its request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRequest {
    pub id: u64,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<f64>>,
    /// `upsert_user`: categorical features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<Vec<i64>>,
    /// `recommend`, `score`: the request's context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<f64>>,
    /// `upsert_item`, `get_item`: the item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<u64>,
    /// `upsert_item`, `get_item`: the item's catalogue (`upsert_item` may
    /// leave it out while exactly one catalogue is loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalogue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    /// `upsert_item`: integer attributes to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<std::collections::BTreeMap<String, i64>>,
    /// `recommend`: attribute → allowed value(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `interactive` (the default) or `bulk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// `bulk`: the requests, each shaped like a line of the HTTP bulk body
    /// (`user_id`, and `items` to score or `k` to recommend). Each is
    /// checked on its own, so one bad entry is an error for that entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<serde_json::Value>>,
}

/// Just the id, to answer a request whose other fields do not decode.
#[derive(Debug, Deserialize)]
pub struct WireId {
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireResponse<R> {
    pub id: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<R>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Everything a request can answer with; serialized without a tag, exactly as
/// the HTTP JSON body of the same call.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WireResult {
    Recommend(RecommendResponse),
    Pipeline(PipelineResponse),
    Score(ScoreResponse),
    User(UserResponse),
    Models(ModelsResponse),
    Model(Box<ModelInfo>),
    Health(Readiness),
    Item(ItemSummary),
    StoredItem(StoredItem),
    Catalogues(CataloguesResponse),
    Ingest(IngestReport),
}

pub const OPS: &[&str] = &[
    "recommend",
    "score",
    "upsert_user",
    "upsert_item",
    "get_item",
    "catalogues",
    "models",
    "health",
    "ingest",
    "bulk",
];
