//! The models and where they run: the repository the daemon serves, the
//! device the executor runs them on, and the per-user history it keeps.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::set;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecConfig {
    /// Model repository root.
    pub models: PathBuf,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Item ids kept per user history (the newest; at least every model's
    /// history_len). Recommend excludes all of them.
    pub history_max: usize,
    /// ONNX Runtime's shared library, for onnx models with
    /// `engine = "onnxruntime"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnxruntime_lib: Option<PathBuf>,
    /// Intra-op threads of one onnx graph run (0: the cores the executor
    /// scores with).
    pub onnx_threads: usize,
    /// The most an onnx graph and its external data may weigh, in bytes.
    pub max_model_bytes: u64,
    /// Bytes of users' query vectors kept between their requests (0: off).
    pub query_cache_bytes: u64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            models: PathBuf::from("./models"),
            device: "auto".into(),
            history_max: 1000,
            onnxruntime_lib: None,
            onnx_threads: 0,
            max_model_bytes: crate::model::kind::onnx::DEFAULT_MAX_MODEL_BYTES,
            query_cache_bytes: 64 << 20,
        }
    }
}

impl ExecConfig {
    /// This section's keys in the config file.
    pub(super) const KEYS: &[&str] = &[
        "models",
        "device",
        "history_max",
        "onnxruntime_lib",
        "onnx_threads",
        "max_model_bytes",
        "query_cache_bytes",
    ];

    /// What onnx models load with.
    pub fn onnx_settings(&self) -> crate::model::kind::onnx::Settings {
        crate::model::kind::onnx::Settings {
            onnxruntime_lib: self.onnxruntime_lib.clone(),
            threads: if self.onnx_threads == 0 {
                rayon::current_num_threads()
            } else {
                self.onnx_threads
            },
            max_model_bytes: self.max_model_bytes,
            cuda_device: self
                .device
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok()),
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.history_max > 0, "history_max must be > 0, got 0");
        anyhow::ensure!(
            self.max_model_bytes > 0,
            "max_model_bytes must be > 0, got 0"
        );
        Ok(())
    }
}

/// The flags of [`ExecConfig`].
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Models and device")]
pub struct ExecArgs {
    /// Model repository: DIR/<name>/<version>/model.toml [default: ./models]
    #[arg(long, env = "RANKD_MODELS", value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// Device: auto (GPU 0 if usable, else CPU), cpu, or cuda:N [default: auto]
    #[arg(long, env = "RANKD_DEVICE", value_name = "DEVICE")]
    pub device: Option<String>,
    /// Item ids kept per user history (the newest; 8 bytes each; raised to the largest history_len of the models) [default: 1000]
    #[arg(long, env = "RANKD_HISTORY_MAX", value_name = "N")]
    pub history_max: Option<usize>,
    /// ONNX Runtime's shared library for onnx models with engine = "onnxruntime": onnxruntime/capi/libonnxruntime.so.<version> of `pip install onnxruntime` (without it those models fail to load and the others serve) [default: none]
    #[arg(long, env = "RANKD_ONNXRUNTIME_LIB", value_name = "PATH")]
    pub onnxruntime_lib: Option<PathBuf>,
    /// Intra-op threads of one onnx graph run; 0 is the cores the executor scores with [default: 0]
    #[arg(long, env = "RANKD_ONNX_THREADS", value_name = "N")]
    pub onnx_threads: Option<usize>,
    /// The most an onnx model's graph and its external data may weigh, in bytes; a larger one fails that version only [default: 2147483648]
    #[arg(long, env = "RANKD_MAX_MODEL_BYTES", value_name = "BYTES")]
    pub max_model_bytes: Option<u64>,
    /// Bytes of query vectors kept per user between requests, so that a user who asks again before their state, the item rows their history reads, or the version changed skips the tower (retrieval models on the CPU; about d × 4 + 160 bytes per user and version); 0 turns it off [default: 67108864]
    #[arg(long, env = "RANKD_QUERY_CACHE_BYTES", value_name = "BYTES")]
    pub query_cache_bytes: Option<u64>,
}

impl ExecArgs {
    pub(super) fn apply(self, c: &mut ExecConfig) {
        set(&mut c.models, self.models);
        set(&mut c.device, self.device);
        set(&mut c.history_max, self.history_max);
        if self.onnxruntime_lib.is_some() {
            c.onnxruntime_lib = self.onnxruntime_lib;
        }
        set(&mut c.onnx_threads, self.onnx_threads);
        set(&mut c.max_model_bytes, self.max_model_bytes);
        set(&mut c.query_cache_bytes, self.query_cache_bytes);
    }
}
