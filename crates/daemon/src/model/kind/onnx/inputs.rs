//! The inputs rankd feeds a graph, bound by name. Every input the graph
//! declares must be one of these, with its dtype and shape; the names a
//! graph does not declare are not fed. The batch dimension (B users, or R
//! (user, candidate) rows for a ranker) is the first of every input.

use std::fmt;
use std::path::Path;

use tract_onnx::pb;

use super::Role;
use crate::model::{ModelError, ModelSpec};

/// An input rankd knows how to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// f32 [B, L, d]: the user's last L items' rows of the live item table,
    /// oldest first, left-padded with zeros.
    HistoryEmbeddings,
    /// i64 [B, L]: their ids (0 for padding).
    HistoryIds,
    /// f32 [B, L]: 1 for a real item, 0 for padding.
    HistoryMask,
    /// i64 [B]: how many of the L positions are real items.
    HistoryLength,
    /// f32 [B, F]: dense user features (zeros when unknown).
    UserFeatures,
    /// i64 [B, S]: categorical user features (zeros when unknown).
    UserSparse,
    /// f32 [B, C]: the request's context (zeros when absent).
    Context,
    /// f32 [R, d]: the candidate's row of the item table (rankers).
    CandidateEmbeddings,
    /// i64 [R]: the candidate's id (rankers).
    CandidateIds,
    /// i64 [R, A]: the candidate's attributes, in the catalogue's attribute
    /// order (by name) (rankers).
    CandidateAttributes,
}

impl Input {
    pub const ALL: [Input; 10] = [
        Input::HistoryEmbeddings,
        Input::HistoryIds,
        Input::HistoryMask,
        Input::HistoryLength,
        Input::UserFeatures,
        Input::UserSparse,
        Input::Context,
        Input::CandidateEmbeddings,
        Input::CandidateIds,
        Input::CandidateAttributes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Input::HistoryEmbeddings => "history_embeddings",
            Input::HistoryIds => "history_ids",
            Input::HistoryMask => "history_mask",
            Input::HistoryLength => "history_length",
            Input::UserFeatures => "user_features",
            Input::UserSparse => "user_sparse",
            Input::Context => "context",
            Input::CandidateEmbeddings => "candidate_embeddings",
            Input::CandidateIds => "candidate_ids",
            Input::CandidateAttributes => "candidate_attributes",
        }
    }

    /// Whether the input is i64 (else f32).
    pub fn is_int(self) -> bool {
        matches!(
            self,
            Input::HistoryIds
                | Input::HistoryLength
                | Input::UserSparse
                | Input::CandidateIds
                | Input::CandidateAttributes
        )
    }

    fn is_candidate(self) -> bool {
        matches!(
            self,
            Input::CandidateEmbeddings | Input::CandidateIds | Input::CandidateAttributes
        )
    }

    /// The dimensions after the batch one, and what sets each; `None` is
    /// the catalogue's attribute count, known from the table.
    fn widths(self, spec: &ModelSpec) -> Vec<(Option<usize>, &'static str)> {
        let (l, d) = (spec.history_len, spec.dim);
        match self {
            Input::HistoryEmbeddings => vec![(Some(l), "history_len"), (Some(d), "dim")],
            Input::HistoryIds | Input::HistoryMask => vec![(Some(l), "history_len")],
            Input::HistoryLength | Input::CandidateIds => vec![],
            Input::UserFeatures => vec![(Some(spec.user_feature_dim), "user_feature_dim")],
            Input::UserSparse => vec![(Some(spec.user_sparse_dim), "user_sparse_dim")],
            Input::Context => vec![(Some(spec.context_dim), "context_dim")],
            Input::CandidateEmbeddings => vec![(Some(d), "dim")],
            Input::CandidateAttributes => vec![(None, "the catalogue's attributes")],
        }
    }

    /// How rankd feeds it, for messages: `f32 [B, 6, 8] (history_len = 6, dim = 8)`.
    fn describe(self, spec: &ModelSpec, role: Role) -> String {
        let batch = if role == Role::Ranker { "R" } else { "B" };
        let widths = self.widths(spec);
        let dims: Vec<String> = std::iter::once(batch.to_string())
            .chain(
                widths
                    .iter()
                    .map(|(w, _)| w.map_or("A".to_string(), |w| w.to_string())),
            )
            .collect();
        let keys: Vec<String> = widths
            .iter()
            .map(|(w, key)| match w {
                Some(w) => format!("{key} = {w}"),
                None => format!("A = {key}"),
            })
            .collect();
        let dtype = if self.is_int() { "i64" } else { "f32" };
        if keys.is_empty() {
            format!("{dtype} [{}]", dims.join(", "))
        } else {
            format!("{dtype} [{}] ({})", dims.join(", "), keys.join(", "))
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One graph input and how rankd fills it.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub input: Input,
    /// Widths after the batch dimension as the graph declares them (`None`:
    /// symbolic); the attribute width is checked against the catalogue.
    pub declared: Vec<Option<usize>>,
}

/// A graph's inputs matched against what rankd feeds, and the batch size
/// the graph is fixed to, if any (`None`: a symbolic batch dimension).
#[derive(Debug, Clone)]
pub struct Bound {
    pub bindings: Vec<Binding>,
    pub fixed_batch: Option<usize>,
}

/// A declared dimension: its size, or its symbol's name.
#[derive(Debug, Clone, PartialEq)]
enum Dim {
    Value(i64),
    Param(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Value(v) => write!(f, "{v}"),
            Dim::Param(p) if p.is_empty() => f.write_str("?"),
            Dim::Param(p) => f.write_str(p),
        }
    }
}

/// ONNX element type names, for messages.
fn elem_name(t: i32) -> String {
    match t {
        1 => "f32".into(),
        2 => "u8".into(),
        3 => "i8".into(),
        5 => "i16".into(),
        6 => "i32".into(),
        7 => "i64".into(),
        9 => "bool".into(),
        10 => "f16".into(),
        11 => "f64".into(),
        16 => "bf16".into(),
        other => format!("type {other}"),
    }
}

const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// Matches the graph's declared inputs (initializers excluded) against
/// what rankd feeds a model of `spec` in `role`.
pub fn bind(
    path: &Path,
    graph: &pb::GraphProto,
    spec: &ModelSpec,
    role: Role,
) -> Result<Bound, ModelError> {
    let error = |message: String| ModelError::Graph {
        path: path.to_path_buf(),
        message,
    };
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let allowed: Vec<Input> = Input::ALL
        .into_iter()
        .filter(|i| role == Role::Ranker || !i.is_candidate())
        .collect();
    let allowed_names = || {
        allowed
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut bindings = Vec::new();
    let mut fixed_batch: Option<(usize, String)> = None;
    let mut symbolic = false;
    for value in graph
        .input
        .iter()
        .filter(|v| !initializers.contains(v.name.as_str()))
    {
        let name = value.name.as_str();
        let (elem, dims) = match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => (
                t.elem_type,
                t.shape.as_ref().map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                                Dim::Value(*v)
                            }
                            Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                                Dim::Param(p.clone())
                            }
                            None => Dim::Param(String::new()),
                        })
                        .collect::<Vec<_>>()
                }),
            ),
            _ => {
                return Err(error(format!(
                    "input `{name}` is not a tensor; rankd feeds tensors: {}",
                    allowed_names()
                )))
            }
        };
        let Some(dims) = dims else {
            return Err(error(format!(
                "input `{name}` declares no shape; rankd needs its rank to bind it"
            )));
        };
        let declared = format!(
            "{} [{}]",
            elem_name(elem),
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let Some(input) = Input::ALL.into_iter().find(|i| i.name() == name) else {
            return Err(error(format!(
                "input `{name}` ({declared}) is not one rankd can feed; a {} reads any of: {}",
                if role == Role::Ranker {
                    "ranker"
                } else {
                    "tower"
                },
                allowed_names()
            )));
        };
        if !allowed.contains(&input) {
            return Err(error(format!(
                "input `{name}` ({declared}) is a ranker's: a tower has no candidates; a tower reads any of: {}",
                allowed_names()
            )));
        }
        let want = input.describe(spec, role);
        let mismatch = || {
            error(format!(
                "input `{name}` is {declared}; rankd feeds `{name}` as {want}"
            ))
        };
        let want_elem = if input.is_int() { INT64 } else { FLOAT };
        let widths = input.widths(spec);
        if elem != want_elem || dims.len() != widths.len() + 1 {
            return Err(mismatch());
        }
        match &dims[0] {
            Dim::Value(v) => {
                let v = usize::try_from(*v).map_err(|_| mismatch())?;
                match &fixed_batch {
                    Some((b, other)) if *b != v => {
                        return Err(error(format!(
                            "input `{name}` has batch dimension {v}, `{other}` {b}: the inputs must share one batch dimension"
                        )))
                    }
                    _ => fixed_batch = Some((v, name.to_string())),
                }
            }
            Dim::Param(_) => symbolic = true,
        }
        let mut declared_widths = Vec::new();
        for (d, (w, _)) in dims[1..].iter().zip(&widths) {
            match (d, w) {
                (Dim::Value(v), Some(w)) if *v != *w as i64 => return Err(mismatch()),
                (Dim::Value(v), _) => {
                    declared_widths.push(Some(usize::try_from(*v).map_err(|_| mismatch())?))
                }
                (Dim::Param(_), _) => declared_widths.push(None),
            }
        }
        bindings.push(Binding {
            input,
            declared: declared_widths,
        });
    }
    if bindings.is_empty() {
        return Err(error(format!(
            "the graph declares no inputs rankd can feed; it reads any of: {}",
            allowed_names()
        )));
    }
    let fixed_batch = match fixed_batch {
        None => None,
        Some((1, _)) if !symbolic => Some(1),
        Some((1, name)) => {
            return Err(error(format!(
                "input `{name}` has a batch dimension of 1 and other inputs a symbolic one: export the graph with one dynamic batch dimension for every input (dynamic_axes or dynamic_shapes)"
            )))
        }
        Some((b, name)) => {
            return Err(error(format!(
                "input `{name}` has a fixed batch dimension of {b}: export the graph with a dynamic batch dimension (dynamic_axes or dynamic_shapes), or with a batch of 1"
            )))
        }
    };
    if role == Role::Ranker && !bindings.iter().any(|b| b.input.is_candidate()) {
        return Err(error(
            "a ranker's graph must read its candidates: candidate_embeddings, candidate_ids or candidate_attributes".into(),
        ));
    }
    Ok(Bound {
        bindings,
        fixed_batch,
    })
}
