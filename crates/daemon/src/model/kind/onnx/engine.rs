//! A loaded graph: its bindings, the engine that runs it, and the checks
//! on what it returns. The engines take one batch of inputs laid out
//! batch-first and return the graph's first output.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tract_onnx::pb;
use tract_onnx::prelude::Framework;

use super::inputs::{bind, Binding, Input};
use super::{EngineKind, OnnxOptions, OutputKind, Role};
use crate::model::{ModelError, ModelSpec};

/// `--max-model-bytes`' default: 2 GiB.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 2 << 30;

/// The daemon's settings for onnx models.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--onnxruntime-lib`: ONNX Runtime's shared library.
    pub onnxruntime_lib: Option<PathBuf>,
    /// `--onnx-threads`: intra-op threads of one graph run.
    pub threads: usize,
    /// `--max-model-bytes`: the most a graph and its external data may weigh.
    pub max_model_bytes: u64,
    /// The CUDA device the daemon runs on (`--device cuda:N`), where ONNX
    /// Runtime's CUDA execution provider is tried first.
    pub cuda_device: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            onnxruntime_lib: None,
            threads: 1,
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
            cuda_device: None,
        }
    }
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the daemon's onnx settings, once, before any model loads (later
/// calls are ignored).
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

pub(super) fn settings() -> Settings {
    SETTINGS.get().cloned().unwrap_or_default()
}

/// One input's values, batch-first.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One run's inputs: `rows` batch rows, one entry per binding, in the
/// bindings' order, each `rows × width` values.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: usize,
    pub values: Vec<Values>,
}

/// The first output of a run: its values and shape.
pub(super) struct RunOutput {
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
}

/// What runs a graph.
pub(super) trait Runner: Send + Sync {
    /// Runs `batch`, its inputs in `bindings`' order, with `widths[i]` the
    /// dimensions after the batch one of input `i`.
    fn run(&self, batch: &Batch, widths: &[Vec<usize>]) -> Result<RunOutput, String>;
    /// The engine and where it runs, for `/v1/models` and logs
    /// (`tract`, `onnxruntime (CPUExecutionProvider)`).
    fn describe(&self) -> String;
}

/// A graph ready to run.
pub struct Graph {
    path: PathBuf,
    role: Role,
    output: OutputKind,
    dim: usize,
    history_len: usize,
    bindings: Vec<Binding>,
    /// The dimensions after the batch one of each binding.
    widths: Vec<Vec<usize>>,
    runner: Box<dyn Runner>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("path", &self.path)
            .field("engine", &self.runner.describe())
            .finish()
    }
}

/// Adds `path`'s size to `total` and checks the sum against
/// `--max-model-bytes` (the error names `graph`).
fn check_size(path: &Path, graph: &Path, total: &mut u64, limit: u64) -> Result<(), ModelError> {
    let len = std::fs::metadata(path)
        .map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .len();
    *total += len;
    if *total > limit {
        return Err(ModelError::Graph {
            path: graph.to_path_buf(),
            message: format!(
                "the graph and its external data weigh {} bytes, over --max-model-bytes ({limit})",
                *total
            ),
        });
    }
    Ok(())
}

/// The external-data files the graph's initializers name, beside it.
fn external_files(dir: &Path, graph: &pb::GraphProto) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = graph
        .initializer
        .iter()
        .flat_map(|t| t.external_data.iter())
        .filter(|e| e.key == "location")
        .map(|e| dir.join(&e.value))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// How many attributes the catalogue beside `items` has (0 without an
/// attributes file).
fn catalogue_attributes(items: &Path) -> Result<usize, ModelError> {
    let path = items.with_file_name(crate::model::attributes::ATTRIBUTES_FILE);
    if !path.is_file() {
        return Ok(0);
    }
    let io = |e: std::io::Error| ModelError::Io {
        path: path.clone(),
        message: e.to_string(),
    };
    let mut file = std::fs::File::open(&path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let (_, metadata) = crate::model::items::read_header(&path, &mut file, len)?;
    Ok(metadata.offset_keys().len())
}

impl Graph {
    /// Reads the graph at `path` (the version's `graph`), binds its inputs
    /// and readies `options.engine` to run batches of up to the model's
    /// largest batch.
    pub fn load(spec: &ModelSpec, options: &OnnxOptions, path: &Path) -> Result<Self, ModelError> {
        let settings = settings();
        let mut total = 0;
        check_size(path, path, &mut total, settings.max_model_bytes)?;
        let format = |message: String| ModelError::Graph {
            path: path.to_path_buf(),
            message,
        };
        let proto = tract_onnx::onnx()
            .proto_model_for_path(path)
            .map_err(|e| format(format!("not an ONNX model: {e}")))?;
        let Some(graph) = proto.graph.as_ref() else {
            return Err(format("not an ONNX model: it holds no graph".into()));
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in external_files(dir, graph) {
            check_size(&file, path, &mut total, settings.max_model_bytes)?;
        }
        let bound = bind(path, graph, spec, options.role)?;
        // The version folder: `path` is `<version>` joined with `graph`.
        let version_dir = path
            .to_str()
            .zip(options.graph.to_str())
            .and_then(|(p, g)| p.strip_suffix(g))
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.to_path_buf());
        let mut widths = Vec::new();
        for b in &bound.bindings {
            let mut w = Vec::new();
            for (i, declared) in b.declared.iter().enumerate() {
                w.push(match (b.input, declared) {
                    (Input::CandidateAttributes, Some(a)) => *a,
                    (Input::CandidateAttributes, None) => {
                        let items = version_dir.join(&spec.items);
                        match catalogue_attributes(&items)? {
                            0 => {
                                return Err(format(format!(
                                    "input `candidate_attributes` reads the catalogue's attributes, and {} has no {} beside it",
                                    items.display(),
                                    crate::model::attributes::ATTRIBUTES_FILE
                                )))
                            }
                            a => a,
                        }
                    }
                    (input, _) => input_width(spec, input, i),
                });
            }
            widths.push(w);
        }
        let max_rows = spec.max_batch_rows().max(1);
        let runner: Box<dyn Runner> = match options.engine {
            EngineKind::Tract => Box::new(super::tract_engine::TractRunner::new(
                path, &proto, &bound, &widths, max_rows,
            )?),
            EngineKind::Onnxruntime => super::ort_engine::runner(path, &bound, &settings)?,
        };
        Ok(Self {
            path: path.to_path_buf(),
            role: options.role,
            output: options.output.unwrap_or_default(),
            dim: spec.dim,
            history_len: spec.history_len,
            bindings: bound.bindings,
            widths,
            runner,
        })
    }

    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Whether the graph reads `input`.
    pub fn reads(&self, input: Input) -> bool {
        self.bindings.iter().any(|b| b.input == input)
    }

    /// The width of `input` the graph reads (its last dimension), if it
    /// reads it.
    pub fn width(&self, input: Input) -> Option<usize> {
        self.bindings
            .iter()
            .position(|b| b.input == input)
            .map(|i| self.widths[i].last().copied().unwrap_or(1))
    }

    /// The window L of the history inputs.
    pub fn history_len(&self) -> usize {
        self.history_len
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The engine and where it runs (`tract`, `onnxruntime
    /// (CPUExecutionProvider)`).
    pub fn engine(&self) -> String {
        self.runner.describe()
    }

    /// Runs one batch. A tower returns its query vectors, `rows × dim`; a
    /// ranker one score per row (a logit's sigmoid, or the probability).
    pub fn run(&self, batch: &Batch) -> Result<Vec<f32>, String> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        let out = self.runner.run(batch, &self.widths)?;
        let name = self.path.display();
        if let Some(at) = out.values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "{name}: the first output holds {} at element {at} of shape {:?}",
                out.values[at], out.shape
            ));
        }
        match self.role {
            Role::Tower => {
                if out.shape != [batch.rows, self.dim] {
                    return Err(format!(
                        "{name}: the first output has shape {:?} for a batch of {}, expected [{}, {}] (the query vectors, dim = {})",
                        out.shape, batch.rows, batch.rows, self.dim, self.dim
                    ));
                }
                Ok(out.values)
            }
            Role::Ranker => {
                if out.shape != [batch.rows] && out.shape != [batch.rows, 1] {
                    return Err(format!(
                        "{name}: the first output has shape {:?} for {} rows, expected [{}] or [{}, 1] (one score per row)",
                        out.shape, batch.rows, batch.rows, batch.rows
                    ));
                }
                Ok(match self.output {
                    OutputKind::Logit => out
                        .values
                        .into_iter()
                        .map(|z| 1.0 / (1.0 + (-z).exp()))
                        .collect(),
                    OutputKind::Probability => out.values,
                })
            }
        }
    }
}

/// The `i`-th dimension after the batch one of `input` for `spec`.
fn input_width(spec: &ModelSpec, input: Input, i: usize) -> usize {
    match (input, i) {
        (Input::HistoryEmbeddings, 0) | (Input::HistoryIds, 0) | (Input::HistoryMask, 0) => {
            spec.history_len
        }
        (Input::HistoryEmbeddings, _) | (Input::CandidateEmbeddings, _) => spec.dim,
        (Input::UserFeatures, _) => spec.user_feature_dim,
        (Input::UserSparse, _) => spec.user_sparse_dim,
        (Input::Context, _) => spec.context_dim,
        _ => 1,
    }
}
