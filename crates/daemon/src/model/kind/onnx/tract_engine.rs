//! tract runs a graph through one optimised plan per power-of-two batch
//! size up to the model's largest batch, each built at load with every
//! input's shape fixed (a symbolic batch dimension runs several times
//! slower). A batch runs as the plans its size decomposes into (37 rows:
//! 32 + 4 + 1), so no row is padded.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::engine::{Batch, RunOutput, Runner, Values};
use super::inputs::Bound;
use crate::model::ModelError;

type Plan = Arc<TypedRunnableModel>;

pub(super) struct TractRunner {
    /// (batch size, plan), largest first.
    plans: Vec<(usize, Plan)>,
    /// For each of the graph's inputs, in its order, the binding feeding it.
    order: Vec<usize>,
}

impl TractRunner {
    pub fn new(
        path: &Path,
        proto: &pb::ModelProto,
        bound: &Bound,
        widths: &[Vec<usize>],
        max_rows: usize,
    ) -> Result<Self, ModelError> {
        let error = |message: String| ModelError::Graph {
            path: path.to_path_buf(),
            message,
        };
        let dir = path.parent().and_then(Path::to_str);
        let model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .parse(proto, dir)
            .map_err(|e| error(format!("tract cannot read the graph: {e:#}")))?;
        if !model.unresolved_inputs.is_empty() {
            return Err(error(format!(
                "tract cannot resolve the graph's inputs {:?}",
                model.unresolved_inputs
            )));
        }
        let model = model.model;
        let mut order = Vec::new();
        for outlet in model.input_outlets().map_err(|e| error(format!("{e:#}")))? {
            let name = &model.node(outlet.node).name;
            let at = bound
                .bindings
                .iter()
                .position(|b| b.input.name() == name)
                .ok_or_else(|| {
                    error(format!(
                        "tract sees an input `{name}` the graph does not declare"
                    ))
                })?;
            order.push(at);
        }
        let sizes: Vec<usize> = match bound.fixed_batch {
            Some(b) => vec![b],
            None => {
                let top = max_rows.next_power_of_two();
                std::iter::successors(Some(1usize), |s| (*s < top).then_some(s * 2)).collect()
            }
        };
        let mut plans = Vec::new();
        for &size in sizes.iter().rev() {
            let mut m = model.clone();
            for (i, &b) in order.iter().enumerate() {
                let binding = &bound.bindings[b];
                let dt = if binding.input.is_int() {
                    i64::datum_type()
                } else {
                    f32::datum_type()
                };
                let shape: Vec<usize> = std::iter::once(size)
                    .chain(widths[b].iter().copied())
                    .collect();
                m.set_input_fact(i, InferenceFact::dt_shape(dt, shape))
                    .map_err(|e| error(format!("{e:#}")))?;
            }
            let plan = m
                .into_optimized()
                .and_then(|m| m.into_runnable())
                .map_err(|e| {
                    error(format!(
                        "tract cannot plan the graph for a batch of {size}: {e:#}"
                    ))
                })?;
            plans.push((size, plan));
        }
        let runner = Self { plans, order };
        // Each plan runs once now, on zeros, so that the first batch of
        // each size while serving finds it ready.
        for (size, plan) in &runner.plans {
            let zeros = Batch {
                rows: *size,
                values: bound
                    .bindings
                    .iter()
                    .zip(widths)
                    .map(|(b, w)| {
                        let n = size * w.iter().product::<usize>();
                        if b.input.is_int() {
                            Values::I64(vec![0; n])
                        } else {
                            Values::F32(vec![0.0; n])
                        }
                    })
                    .collect(),
            };
            runner
                .run_chunk(plan, &zeros, widths, 0, *size)
                .map_err(|e| error(format!("a batch of {size} does not run: {e}")))?;
        }
        Ok(runner)
    }

    /// Runs rows `start..start + size` of `batch` through `plan`.
    fn run_chunk(
        &self,
        plan: &Plan,
        batch: &Batch,
        widths: &[Vec<usize>],
        start: usize,
        size: usize,
    ) -> Result<Tensor, String> {
        let mut inputs: TVec<TValue> = TVec::new();
        for &b in &self.order {
            let width: usize = widths[b].iter().product();
            let shape: Vec<usize> = std::iter::once(size)
                .chain(widths[b].iter().copied())
                .collect();
            let range = start * width..(start + size) * width;
            let t = match &batch.values[b] {
                Values::F32(v) => Tensor::from_shape(&shape, &v[range]),
                Values::I64(v) => Tensor::from_shape(&shape, &v[range]),
            }
            .map_err(|e| format!("{e:#}"))?;
            inputs.push(t.into());
        }
        let mut out = plan.run(inputs).map_err(|e| format!("tract: {e:#}"))?;
        if out.is_empty() {
            return Err("the graph has no output".into());
        }
        let first = out.remove(0).into_tensor();
        first
            .cast_to::<f32>()
            .map(|t| t.into_owned())
            .map_err(|e| format!("the first output is not numeric: {e:#}"))
    }
}

impl Runner for TractRunner {
    fn run(&self, batch: &Batch, widths: &[Vec<usize>]) -> Result<RunOutput, String> {
        let mut values = Vec::new();
        let mut shape: Option<Vec<usize>> = None;
        let mut start = 0;
        while start < batch.rows {
            let left = batch.rows - start;
            let (size, plan) = self
                .plans
                .iter()
                .find(|(s, _)| *s <= left)
                .or(self.plans.last())
                .expect("at least one plan");
            let size = (*size).min(left);
            let t = self.run_chunk(plan, batch, widths, start, size)?;
            let s = t.shape().to_vec();
            if s.first() != Some(&size) {
                return Err(format!(
                    "the first output has shape {s:?} for a batch of {size}: its first dimension must be the batch"
                ));
            }
            let view = t
                .to_plain_array_view::<f32>()
                .map_err(|e| format!("{e:#}"))?;
            values.extend(view.iter().copied());
            shape = Some(match shape {
                None => s,
                Some(mut total) => {
                    if total[1..] != s[1..] {
                        return Err(format!(
                            "the first output changes shape between runs: {total:?} then {s:?}"
                        ));
                    }
                    total[0] += s[0];
                    total
                }
            });
            start += size;
        }
        Ok(RunOutput {
            values,
            shape: shape.unwrap_or_default(),
        })
    }

    fn describe(&self) -> String {
        "tract".into()
    }
}
