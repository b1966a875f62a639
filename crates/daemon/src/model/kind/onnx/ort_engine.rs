//! ONNX Runtime runs a graph when model.toml says `engine = "onnxruntime"`.
//! The library is loaded at run time from `--onnxruntime-lib` (the
//! `libonnxruntime.so.<version>` inside the PyPI `onnxruntime` wheel), once
//! per process; without it that model fails to load, saying how to get it,
//! and every other model serves. With `--device cuda:N` the CUDA execution
//! provider (`onnxruntime-gpu`) is tried first, then the CPU one.

use std::path::Path;

use super::engine::{Runner, Settings};
use super::inputs::Bound;
use crate::model::ModelError;

/// How to get the library, for the error of a model that needs it.
#[cfg(feature = "onnxruntime")]
pub(super) const HOW_TO_GET: &str =
    "engine = \"onnxruntime\" needs ONNX Runtime's shared library: \
     `pip install onnxruntime` (or onnxruntime-gpu) and pass its \
     onnxruntime/capi/libonnxruntime.so.<version> with --onnxruntime-lib PATH \
     (RANKD_ONNXRUNTIME_LIB)";

#[cfg(not(feature = "onnxruntime"))]
pub(super) fn runner(
    path: &Path,
    _bound: &Bound,
    _settings: &Settings,
) -> Result<Box<dyn Runner>, ModelError> {
    Err(ModelError::Graph {
        path: path.to_path_buf(),
        message: "this rankd was built without the `onnxruntime` feature: use engine = \"tract\", or build with it".into(),
    })
}

#[cfg(feature = "onnxruntime")]
pub(super) fn runner(
    path: &Path,
    bound: &Bound,
    settings: &Settings,
) -> Result<Box<dyn Runner>, ModelError> {
    imp::OrtRunner::new(path, bound, settings).map(|r| Box::new(r) as Box<dyn Runner>)
}

#[cfg(feature = "onnxruntime")]
mod imp {
    use std::borrow::Cow;
    use std::path::Path;
    use std::sync::{Mutex, OnceLock};

    use ort::session::{Session, SessionInputValue};
    use ort::value::Tensor;

    use super::super::engine::{Batch, RunOutput, Runner, Settings, Values};
    use super::super::inputs::Bound;
    use super::HOW_TO_GET;
    use crate::model::ModelError;

    /// The process's ONNX Runtime environment: made from the first
    /// `--onnxruntime-lib` a model needs, or why it could not be.
    static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

    fn environment(settings: &Settings) -> Result<&'static ort::environment::Environment, String> {
        ENVIRONMENT
            .get_or_init(|| {
                let Some(lib) = &settings.onnxruntime_lib else {
                    return Err(format!("no --onnxruntime-lib given: {HOW_TO_GET}"));
                };
                if !lib.is_file() {
                    return Err(format!(
                        "--onnxruntime-lib {} is not a file: {HOW_TO_GET}",
                        lib.display()
                    ));
                }
                // The loader's own failure is a panic in some library states.
                let built = std::panic::catch_unwind(|| {
                    ort::init_from(lib)
                        .map_err(|e| e.to_string())
                        .and_then(|b| b.with_name("rankd").build().map_err(|e| e.to_string()))
                })
                .unwrap_or_else(|_| Err("the library could not be loaded".into()));
                built.map_err(|e| {
                    format!(
                        "ONNX Runtime from {} did not load: {e}. {HOW_TO_GET}",
                        lib.display()
                    )
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    pub struct OrtRunner {
        session: Mutex<Session>,
        /// The graph's input names, in the bindings' order.
        names: Vec<String>,
        /// Whether the graph takes one row at a time.
        one_row: bool,
        provider: String,
    }

    impl OrtRunner {
        pub fn new(path: &Path, bound: &Bound, settings: &Settings) -> Result<Self, ModelError> {
            let error = |message: String| ModelError::Graph {
                path: path.to_path_buf(),
                message,
            };
            let env = environment(settings).map_err(error)?;
            let threads = settings.threads.max(1);
            let build = |cuda: Option<usize>| -> Result<Session, String> {
                let mut b = Session::builder(env)
                    .map_err(|e| e.to_string())?
                    .with_intra_threads(threads)
                    .map_err(|e| e.to_string())?
                    .with_inter_threads(1)
                    .map_err(|e| e.to_string())?
                    // Idle pool threads sleep rather than spin: the
                    // socket and HTTP threads share these cores.
                    .with_intra_op_spinning(false)
                    .map_err(|e| e.to_string())?;
                if let Some(device) = cuda {
                    b = b
                        .with_execution_providers([ort::ep::CUDA::default()
                            .with_device_id(device as i32)
                            .build()
                            .error_on_failure()])
                        .map_err(|e| e.to_string())?;
                }
                b.commit_from_file(path).map_err(|e| e.to_string())
            };
            let (session, provider) = match settings.cuda_device {
                Some(device) => match build(Some(device)) {
                    Ok(s) => (s, "CUDAExecutionProvider"),
                    Err(e) => {
                        tracing::warn!(graph = %path.display(), error = %e,
                            "ONNX Runtime's CUDA execution provider did not load; the graph runs on the CPU one");
                        (build(None).map_err(error)?, "CPUExecutionProvider")
                    }
                },
                None => (build(None).map_err(error)?, "CPUExecutionProvider"),
            };
            Ok(Self {
                session: Mutex::new(session),
                names: bound
                    .bindings
                    .iter()
                    .map(|b| b.input.name().to_string())
                    .collect(),
                one_row: bound.fixed_batch == Some(1),
                provider: provider.to_string(),
            })
        }

        fn run_rows(
            &self,
            batch: &Batch,
            widths: &[Vec<usize>],
            start: usize,
            size: usize,
        ) -> Result<RunOutput, String> {
            let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
            for (i, name) in self.names.iter().enumerate() {
                let width: usize = widths[i].iter().product();
                let shape: Vec<i64> = std::iter::once(size as i64)
                    .chain(widths[i].iter().map(|&w| w as i64))
                    .collect();
                let range = start * width..(start + size) * width;
                let value: SessionInputValue<'_> = match &batch.values[i] {
                    Values::F32(v) => Tensor::from_array((shape, v[range].to_vec()))
                        .map_err(|e| e.to_string())?
                        .into(),
                    Values::I64(v) => Tensor::from_array((shape, v[range].to_vec()))
                        .map_err(|e| e.to_string())?
                        .into(),
                };
                inputs.push((Cow::Borrowed(name.as_str()), value));
            }
            let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
            let outputs = session
                .run(inputs)
                .map_err(|e| format!("onnxruntime: {e}"))?;
            if outputs.len() == 0 {
                return Err("the graph has no output".into());
            }
            let (shape, values) = outputs[0]
                .try_extract_tensor::<f32>()
                .map_err(|e| format!("the first output is not f32: {e}"))?;
            Ok(RunOutput {
                values: values.to_vec(),
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
            })
        }
    }

    impl Runner for OrtRunner {
        fn run(&self, batch: &Batch, widths: &[Vec<usize>]) -> Result<RunOutput, String> {
            if !self.one_row {
                return self.run_rows(batch, widths, 0, batch.rows);
            }
            let mut values = Vec::new();
            let mut shape: Vec<usize> = Vec::new();
            for r in 0..batch.rows {
                let out = self.run_rows(batch, widths, r, 1)?;
                if r == 0 {
                    shape = out.shape;
                } else if let Some(first) = shape.first_mut() {
                    *first += out.shape.first().copied().unwrap_or(0);
                }
                values.extend(out.values);
            }
            Ok(RunOutput { values, shape })
        }

        fn describe(&self) -> String {
            format!("onnxruntime ({})", self.provider)
        }
    }
}
