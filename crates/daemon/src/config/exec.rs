//! The models and where they run: the repository the daemon serves, the
//! device the executor runs them on, and the per-user history it keeps.

use std::path::PathBuf;

use super::setting::settings;

settings! {
    pub struct ExecConfig, flags ExecArgs under "Models and device" {
        /// Model repository: DIR/<name>/<version>/model.toml
        models: PathBuf = PathBuf::from("./models"), flag "DIR";
        /// Device: auto (GPU 0 if usable, else CPU), cpu, or cuda:N
        device: String = "auto".into(), flag "DEVICE";
        // Recommend excludes every item id of the history kept.
        /// Item ids kept per user history (the newest; 8 bytes each; raised
        /// to the largest history_len of the models)
        history_max: usize = 1000, flag "N";
        /// ONNX Runtime's shared library for onnx models with engine =
        /// "onnxruntime": onnxruntime/capi/libonnxruntime.so.<version> of `pip
        /// install onnxruntime` (without it those models fail to load and the
        /// others serve)
        #[serde(skip_serializing_if = "Option::is_none")]
        onnxruntime_lib: Option<PathBuf> = None, unset "none", flag "PATH": PathBuf;
        /// Intra-op threads of one onnx graph run; 0 is the cores the executor
        /// scores with
        onnx_threads: usize = 0, flag "N";
        /// The most an onnx model's graph and its external data may weigh, in
        /// bytes; a larger one fails that version only
        max_model_bytes: u64 = crate::model::kind::onnx::DEFAULT_MAX_MODEL_BYTES, flag "BYTES";
        /// Bytes of query vectors kept per user between requests, so that a
        /// user who asks again before their state, the item rows their history
        /// reads, or the version changed skips the tower (retrieval models on
        /// the CPU; about d × 4 + 160 bytes per user and version); 0 turns it
        /// off
        query_cache_bytes: u64 = 64 << 20, flag "BYTES";
    }
}

impl ExecConfig {
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
