//! An onnx model's batch on the CPU: the graph's inputs built from the
//! batch's queries and the live item table (`model::kind::onnx::Input`
//! says what each holds), one engine run, then, for a tower, retrieval from
//! its query vectors exactly as a two-tower model's; for a ranker, one
//! score per candidate.

use super::{Batch, Graph, Input, Role, Values};
use crate::backend::cpu::{err, Forward};
use crate::backend::{BackendError, ModelDesc, Output, Query, Task};
use crate::model::{ItemTable, Weights};

struct Onnx {
    graph: Weights,
    history_len: usize,
}

pub(super) fn build(_desc: ModelDesc, weights: &Weights) -> Result<Box<dyn Forward>, BackendError> {
    let graph = weights
        .get::<Graph>()
        .ok_or_else(|| err("onnx weights are not a graph: this is a bug"))?;
    Ok(Box::new(Onnx {
        history_len: graph.history_len(),
        graph: weights.clone(),
    }))
}

impl Onnx {
    fn graph(&self) -> &Graph {
        self.graph.get::<Graph>().expect("checked at build")
    }
}

/// One batch row: a query, and for a ranker the candidate's table row.
struct Row<'q, 'a> {
    query: &'q Query<'a>,
    candidate: Option<u32>,
}

/// `values` extended by `width` values from `src`, or zeros when there is
/// none (or it is not `width` long).
fn put<T: Copy + Default>(values: &mut Vec<T>, src: Option<&[T]>, width: usize) {
    match src {
        Some(s) if s.len() == width => values.extend_from_slice(s),
        _ => values.extend(std::iter::repeat_n(T::default(), width)),
    }
}

/// The graph's inputs for `rows`, in its bindings' order.
fn inputs(
    graph: &Graph,
    history_len: usize,
    items: &ItemTable,
    rows: &[Row<'_, '_>],
) -> Result<Batch, BackendError> {
    let d = items.dim();
    let l = history_len;
    let mut values = Vec::with_capacity(graph.bindings().len());
    for binding in graph.bindings() {
        let width = graph.width(binding.input).unwrap_or(1);
        let value = match binding.input {
            Input::HistoryEmbeddings => {
                let mut v = Vec::with_capacity(rows.len() * l * d);
                for r in rows {
                    let h = last(r.query.history, l);
                    v.extend(std::iter::repeat_n(0.0, (l - h.len()) * d));
                    for &row in h {
                        v.extend_from_slice(items.embedding(row));
                    }
                }
                Values::F32(v)
            }
            Input::HistoryIds => {
                let mut v = Vec::with_capacity(rows.len() * l);
                for r in rows {
                    let h = last(r.query.history, l);
                    v.extend(std::iter::repeat_n(0, l - h.len()));
                    v.extend(h.iter().map(|&row| items.id(row) as i64));
                }
                Values::I64(v)
            }
            Input::HistoryMask => {
                let mut v = Vec::with_capacity(rows.len() * l);
                for r in rows {
                    let n = last(r.query.history, l).len();
                    v.extend(std::iter::repeat_n(0.0, l - n));
                    v.extend(std::iter::repeat_n(1.0, n));
                }
                Values::F32(v)
            }
            Input::HistoryLength => Values::I64(
                rows.iter()
                    .map(|r| last(r.query.history, l).len() as i64)
                    .collect(),
            ),
            Input::UserFeatures => {
                let mut v = Vec::with_capacity(rows.len() * width);
                rows.iter()
                    .for_each(|r| put(&mut v, r.query.features, width));
                Values::F32(v)
            }
            Input::UserSparse => {
                let mut v = Vec::with_capacity(rows.len() * width);
                rows.iter().for_each(|r| put(&mut v, r.query.sparse, width));
                Values::I64(v)
            }
            Input::Context => {
                let mut v = Vec::with_capacity(rows.len() * width);
                rows.iter()
                    .for_each(|r| put(&mut v, r.query.context, width));
                Values::F32(v)
            }
            Input::CandidateEmbeddings => {
                let mut v = Vec::with_capacity(rows.len() * d);
                for r in rows {
                    v.extend_from_slice(items.embedding(candidate(r)?));
                }
                Values::F32(v)
            }
            Input::CandidateIds => Values::I64(
                rows.iter()
                    .map(|r| candidate(r).map(|c| items.id(c) as i64))
                    .collect::<Result<_, _>>()?,
            ),
            Input::CandidateAttributes => {
                let attributes = items.attributes();
                if attributes.names().len() != width {
                    return Err(err(format!(
                        "input candidate_attributes is {width} wide, the catalogue has {} attributes ({}): export the graph with one column per attribute, in name order",
                        attributes.names().len(),
                        attributes.names().join(", ")
                    )));
                }
                let mut v = Vec::with_capacity(rows.len() * width);
                for r in rows {
                    let c = candidate(r)? as usize;
                    v.extend((0..width).map(|a| attributes.value(a, c)));
                }
                Values::I64(v)
            }
        };
        values.push(value);
    }
    Ok(Batch {
        rows: rows.len(),
        values,
    })
}

/// The newest `l` rows of a history (oldest first).
fn last(history: &[u32], l: usize) -> &[u32] {
    &history[history.len().saturating_sub(l)..]
}

fn candidate(r: &Row<'_, '_>) -> Result<u32, BackendError> {
    r.candidate
        .ok_or_else(|| err("a ranker row without a candidate: this is a bug"))
}

impl Forward for Onnx {
    fn embed(
        &self,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Option<Result<Vec<f32>, BackendError>> {
        let graph = self.graph();
        if graph.role() != Role::Tower {
            return None;
        }
        let rows: Vec<Row<'_, '_>> = queries
            .iter()
            .map(|query| Row {
                query,
                candidate: None,
            })
            .collect();
        Some(
            inputs(graph, self.history_len, items, &rows)
                .and_then(|batch| graph.run(&batch).map_err(err)),
        )
    }

    fn retrieves(&self) -> bool {
        self.graph().role() == Role::Tower
    }

    fn score(&self, items: &ItemTable, queries: &[Query<'_>]) -> Result<Vec<Output>, BackendError> {
        let graph = self.graph();
        match graph.role() {
            Role::Tower => Err(err(
                "an onnx tower answers through its query vectors: this is a bug",
            )),
            Role::Ranker => {
                let mut rows = Vec::new();
                for query in queries {
                    match query.task {
                        Task::Score { rows: candidates } => {
                            rows.extend(candidates.iter().map(|&c| Row {
                                query,
                                candidate: Some(c),
                            }));
                        }
                        Task::TopK { .. } => {
                            return Err(err(
                                "an onnx ranker cannot answer recommend: this is a bug",
                            ))
                        }
                    }
                }
                let batch = inputs(graph, self.history_len, items, &rows)?;
                let scores = graph.run(&batch).map_err(err)?;
                let mut scores = scores.into_iter();
                Ok(queries
                    .iter()
                    .map(|q| match q.task {
                        Task::Score { rows } => {
                            Output::Scores(scores.by_ref().take(rows.len()).collect())
                        }
                        Task::TopK { .. } => unreachable!("refused above"),
                    })
                    .collect())
            }
        }
    }
}

#[cfg(test)]
mod tests;
