//! A socket request as the daemon serves it: one variant per op, holding
//! exactly the fields that op reads, a field it requires as a plain value.
//! A frame decodes into the client crate's flat `WireRequest` (every field
//! optional, so that a refusal can name what is wrong); `TryFrom` turns it
//! into a `SocketOp`, or into the `Refusal` the client is answered with.

use std::collections::BTreeMap;

use rankd_client::types::{Filter, Priority};
use rankd_client::wire::{WireRequest, OPS};

use crate::error::ServeError;

/// An op's name, known before its fields are checked: the connection
/// routes on it (answered in place, in a task, or streamed as a bulk call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Recommend,
    Score,
    Bulk,
    UpsertUser,
    UpsertItem,
    GetItem,
    Models,
    Health,
    Ingest,
    Catalogues,
}

impl Op {
    pub(super) const ALL: [Op; 10] = [
        Op::Recommend,
        Op::Score,
        Op::Bulk,
        Op::UpsertUser,
        Op::UpsertItem,
        Op::GetItem,
        Op::Models,
        Op::Health,
        Op::Ingest,
        Op::Catalogues,
    ];

    pub(super) fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Recommend => "recommend",
            Op::Score => "score",
            Op::Bulk => "bulk",
            Op::UpsertUser => "upsert_user",
            Op::UpsertItem => "upsert_item",
            Op::GetItem => "get_item",
            Op::Models => "models",
            Op::Health => "health",
            Op::Ingest => "ingest",
            Op::Catalogues => "catalogues",
        }
    }

    /// The fields the op reads (beyond `id` and `op`), as its HTTP call's
    /// path and body hold them, in the order a refusal lists them. The unit
    /// tests check each list against its `SocketOp` variant.
    pub(super) fn takes(self) -> &'static [&'static str] {
        match self {
            Op::Recommend => &[
                "model",
                "user_id",
                "k",
                "exclude",
                "timeout_ms",
                "version",
                "priority",
                "filter",
                "context",
            ],
            Op::Score => &[
                "model",
                "user_id",
                "items",
                "timeout_ms",
                "version",
                "priority",
                "context",
            ],
            // Each entry carries its own `timeout_ms` and `version`.
            Op::Bulk => &["model", "requests"],
            Op::UpsertUser => &["user_id", "history", "features", "sparse"],
            Op::UpsertItem => &[
                "item_id",
                "catalogue",
                "embedding",
                "deleted",
                "version",
                "attributes",
            ],
            Op::GetItem => &["catalogue", "item_id"],
            Op::Models => &["model"],
            Op::Health | Op::Ingest | Op::Catalogues => &[],
        }
    }

    /// Calls that never wait on the executor: the connection answers them
    /// itself, without a task hand-off.
    pub(super) fn answered_in_place(self) -> bool {
        matches!(self, Op::Health | Op::Models | Op::Ingest)
    }
}

/// A request the daemon serves. (Serialized only by the unit tests, which
/// compare it with the `WireRequest` it came from.)
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize))]
#[cfg_attr(test, serde(tag = "op", rename_all = "snake_case"))]
pub(super) enum SocketOp {
    Recommend {
        model: String,
        user_id: u64,
        k: Option<usize>,
        exclude: Option<Vec<u64>>,
        timeout_ms: Option<u64>,
        version: Option<u64>,
        priority: Option<Priority>,
        filter: Option<Filter>,
        context: Option<Vec<f64>>,
    },
    Score {
        model: String,
        user_id: u64,
        items: Vec<u64>,
        timeout_ms: Option<u64>,
        version: Option<u64>,
        priority: Option<Priority>,
        context: Option<Vec<f64>>,
    },
    /// The entries are checked one by one as the call runs: one bad entry is
    /// an error for that entry alone.
    Bulk {
        model: String,
        requests: Vec<serde_json::Value>,
    },
    UpsertUser {
        user_id: u64,
        history: Option<Vec<u64>>,
        features: Option<Vec<f64>>,
        sparse: Option<Vec<i64>>,
    },
    /// `catalogue` may be left out while exactly one catalogue is loaded.
    UpsertItem {
        item_id: u64,
        catalogue: Option<String>,
        embedding: Option<Vec<f64>>,
        deleted: Option<bool>,
        version: Option<u64>,
        attributes: Option<BTreeMap<String, i64>>,
    },
    GetItem {
        item_id: u64,
        catalogue: String,
    },
    /// One model's details, or (without `model`) the list.
    Models {
        model: Option<String>,
    },
    Health,
    Ingest,
    Catalogues,
}

impl SocketOp {
    #[cfg(test)]
    fn op(&self) -> Op {
        match self {
            SocketOp::Recommend { .. } => Op::Recommend,
            SocketOp::Score { .. } => Op::Score,
            SocketOp::Bulk { .. } => Op::Bulk,
            SocketOp::UpsertUser { .. } => Op::UpsertUser,
            SocketOp::UpsertItem { .. } => Op::UpsertItem,
            SocketOp::GetItem { .. } => Op::GetItem,
            SocketOp::Models { .. } => Op::Models,
            SocketOp::Health => Op::Health,
            SocketOp::Ingest => Op::Ingest,
            SocketOp::Catalogues => Op::Catalogues,
        }
    }
}

/// Why a request is refused before it is served; every refusal is
/// `invalid`. The first that applies wins: an unknown op, then a field the
/// op does not take, then the op's required fields in the order it lists
/// them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Refusal {
    #[error("unknown op '{0}'; expected one of {ops}", ops = OPS.join(", "))]
    UnknownOp(String),
    /// A field another op reads: refused, as HTTP refuses a body field its
    /// route does not take, rather than silently ignored.
    #[error("op {} does not take `{field}`; it takes {}", op.name(), listed(op.takes()))]
    NotTaken { op: Op, field: &'static str },
    #[error("`{field}` is required for op {}", op.name())]
    Missing { op: Op, field: &'static str },
}

impl Refusal {
    /// Whether the request is refused for lacking `field`.
    pub(super) fn is_missing(&self, field: &str) -> bool {
        matches!(self, Refusal::Missing { field: f, .. } if *f == field)
    }
}

fn listed(fields: &[&str]) -> String {
    if fields.is_empty() {
        return "no other field".to_string();
    }
    fields
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<Refusal> for ServeError {
    fn from(r: Refusal) -> Self {
        ServeError::Invalid(r.to_string())
    }
}

/// The fields a request sets beyond `id` and `op`.
fn fields_set(req: &WireRequest) -> impl Iterator<Item = &'static str> {
    [
        ("model", req.model.is_some()),
        ("user_id", req.user_id.is_some()),
        ("k", req.k.is_some()),
        ("exclude", req.exclude.is_some()),
        ("items", req.items.is_some()),
        ("timeout_ms", req.timeout_ms.is_some()),
        ("history", req.history.is_some()),
        ("features", req.features.is_some()),
        ("sparse", req.sparse.is_some()),
        ("context", req.context.is_some()),
        ("item_id", req.item_id.is_some()),
        ("catalogue", req.catalogue.is_some()),
        ("embedding", req.embedding.is_some()),
        ("deleted", req.deleted.is_some()),
        ("attributes", req.attributes.is_some()),
        ("filter", req.filter.is_some()),
        ("version", req.version.is_some()),
        ("priority", req.priority.is_some()),
        ("requests", req.requests.is_some()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(f, _)| f)
}

impl TryFrom<WireRequest> for SocketOp {
    type Error = Refusal;

    fn try_from(req: WireRequest) -> Result<Self, Refusal> {
        let Some(op) = Op::parse(&req.op) else {
            return Err(Refusal::UnknownOp(req.op));
        };
        if let Some(field) = fields_set(&req).find(|f| !op.takes().contains(f)) {
            return Err(Refusal::NotTaken { op, field });
        }
        let need = |field| Refusal::Missing { op, field };
        // A struct expression evaluates its fields in the order written:
        // the first required field missing is the one named.
        Ok(match op {
            Op::Recommend => SocketOp::Recommend {
                model: req.model.ok_or_else(|| need("model"))?,
                user_id: req.user_id.ok_or_else(|| need("user_id"))?,
                k: req.k,
                exclude: req.exclude,
                timeout_ms: req.timeout_ms,
                version: req.version,
                priority: req.priority,
                filter: req.filter,
                context: req.context,
            },
            Op::Score => SocketOp::Score {
                model: req.model.ok_or_else(|| need("model"))?,
                user_id: req.user_id.ok_or_else(|| need("user_id"))?,
                items: req.items.ok_or_else(|| need("items"))?,
                timeout_ms: req.timeout_ms,
                version: req.version,
                priority: req.priority,
                context: req.context,
            },
            Op::Bulk => SocketOp::Bulk {
                model: req.model.ok_or_else(|| need("model"))?,
                requests: req.requests.ok_or_else(|| need("requests"))?,
            },
            Op::UpsertUser => SocketOp::UpsertUser {
                user_id: req.user_id.ok_or_else(|| need("user_id"))?,
                history: req.history,
                features: req.features,
                sparse: req.sparse,
            },
            Op::UpsertItem => SocketOp::UpsertItem {
                item_id: req.item_id.ok_or_else(|| need("item_id"))?,
                catalogue: req.catalogue,
                embedding: req.embedding,
                deleted: req.deleted,
                version: req.version,
                attributes: req.attributes,
            },
            Op::GetItem => SocketOp::GetItem {
                item_id: req.item_id.ok_or_else(|| need("item_id"))?,
                catalogue: req.catalogue.ok_or_else(|| need("catalogue"))?,
            },
            Op::Models => SocketOp::Models { model: req.model },
            Op::Health => SocketOp::Health,
            Op::Ingest => SocketOp::Ingest,
            Op::Catalogues => SocketOp::Catalogues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A request setting every field the protocol defines, each to a value
    /// no other field holds.
    fn every_field(op: &str) -> Value {
        json!({
            "id": 7,
            "op": op,
            "model": "m",
            "user_id": 11,
            "k": 12,
            "exclude": [13],
            "items": [14],
            "timeout_ms": 15,
            "history": [16],
            "features": [17.5],
            "sparse": [-18],
            "context": [19.5],
            "item_id": 20,
            "catalogue": "c",
            "embedding": [21.5],
            "deleted": true,
            "attributes": {"a": 22},
            "filter": {"f": [23, 24]},
            "version": 25,
            "priority": "bulk",
            "requests": [{"user_id": 26, "k": 27}],
        })
    }

    fn wire(v: Value) -> WireRequest {
        serde_json::from_value(v).unwrap()
    }

    /// `v` with only `id`, `op` and `fields`.
    fn only(mut v: Value, fields: &[&str]) -> Value {
        v.as_object_mut()
            .unwrap()
            .retain(|k, _| k == "id" || k == "op" || fields.contains(&k.as_str()));
        v
    }

    #[test]
    fn every_field_is_a_field_of_the_wire_request() {
        let all = every_field("health");
        let back = serde_json::to_value(wire(all.clone())).unwrap();
        assert_eq!(back, all, "every_field() sets each field once");
    }

    #[test]
    fn the_ops_are_the_protocols_ops() {
        let mut ours: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        let mut theirs = OPS.to_vec();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(ours, theirs);
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()), Some(op));
        }
        assert_eq!(Op::parse("explode"), None);
    }

    /// The fields `Op::takes` lists are exactly the fields of the op's
    /// variant, and each lands in the variant under its own name: the
    /// variant, serialized, is the request it came from.
    #[test]
    fn each_variant_holds_exactly_the_fields_its_op_takes() {
        for op in Op::ALL {
            let mut sent = only(every_field(op.name()), op.takes());
            let got = SocketOp::try_from(wire(sent.clone())).unwrap();
            assert_eq!(got.op(), op);
            sent.as_object_mut().unwrap().remove("id");
            assert_eq!(serde_json::to_value(&got).unwrap(), sent, "{}", op.name());
        }
    }

    /// A field the op takes is either required (its absence refused, naming
    /// it) or optional (absent, it is `None` in the variant).
    #[test]
    fn a_field_left_out_is_either_required_or_none() {
        for op in Op::ALL {
            for field in op.takes() {
                let rest: Vec<&str> = op.takes().iter().copied().filter(|f| f != field).collect();
                let sent = only(every_field(op.name()), &rest);
                match SocketOp::try_from(wire(sent)) {
                    Ok(got) => {
                        let got = serde_json::to_value(&got).unwrap();
                        assert_eq!(got[field], Value::Null, "{} {field}", op.name());
                    }
                    Err(e) => assert_eq!(e, Refusal::Missing { op, field }),
                }
            }
        }
    }

    #[test]
    fn a_field_of_another_op_is_refused() {
        let all = every_field("x");
        let fields: Vec<&str> = all
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "id" && *k != "op")
            .collect();
        for op in Op::ALL {
            for field in fields.iter().filter(|f| !op.takes().contains(f)) {
                let mut sent = only(every_field(op.name()), op.takes());
                sent[*field] = all[*field].clone();
                match SocketOp::try_from(wire(sent)) {
                    Err(Refusal::NotTaken { op: o, field: f }) => {
                        assert_eq!((o, f), (op, *field));
                    }
                    other => panic!("{} with {field}: {other:?}", op.name()),
                }
            }
        }
    }

    /// The messages clients read.
    #[test]
    fn refusals_read_as_before() {
        let refused = |v: Value| ServeError::from(SocketOp::try_from(wire(v)).unwrap_err());
        let e = refused(json!({"id": 1, "op": "recommend", "model": "m"}));
        assert_eq!(e.kind(), "invalid");
        assert_eq!(e.to_string(), "`user_id` is required for op recommend");
        let e = refused(json!({"id": 1, "op": "get_item"}));
        assert_eq!(e.to_string(), "`item_id` is required for op get_item");
        let e = refused(
            json!({"id": 1, "op": "score", "model": "m", "user_id": 1, "items": [1], "filter": {"a": 1}}),
        );
        assert_eq!(
            e.to_string(),
            "op score does not take `filter`; it takes `model`, `user_id`, `items`, \
             `timeout_ms`, `version`, `priority`, `context`"
        );
        let e = refused(json!({"id": 1, "op": "health", "model": "m"}));
        assert_eq!(
            e.to_string(),
            "op health does not take `model`; it takes no other field"
        );
        // An unknown op is refused before its fields are looked at.
        let e = refused(json!({"id": 1, "op": "explode", "model": "m"}));
        assert_eq!(
            e.to_string(),
            "unknown op 'explode'; expected one of recommend, score, upsert_user, \
             upsert_item, get_item, catalogues, models, health, ingest, bulk"
        );
        // A field not taken is refused before a required one is missed.
        let e = refused(json!({"id": 1, "op": "recommend", "items": [1]}));
        assert_eq!(
            e.to_string().split(';').next(),
            Some("op recommend does not take `items`")
        );
    }
}
