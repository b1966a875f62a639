//! `model.toml`: the per-version description of a model in the repository.
//! The keys every kind shares are read here, a kind's own keys by the kind
//! (`Kind::options`); a key neither knows is refused with its line and
//! column, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::kind::KindOptions;
use super::{ModelError, ModelKind};
use crate::toml_doc::Doc;

/// How a device keeps the item table's embeddings. Scores are accumulated in
/// f32 whatever the storage; the CPU backend always answers with the f32
/// table's scores (see [`CpuScoring`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

/// How the CPU backend finds a two-tower model's top-k. Both give the same
/// answer, ids and f32 scores bit for bit; `exact-int8` reads an int8 copy of
/// the table first and re-scores in f32 only the rows that can reach the
/// top-k. The GPU backend ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CpuScoring {
    /// Every row scored in f32.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// An int8 scan with a per-row error bound, then an f32 re-score of every
    /// row whose bound reaches the k-th best.
    #[serde(rename = "exact-int8")]
    ExactInt8,
}

/// The keys of model.toml every kind shares (a kind adds its own).
pub const SHARED_KEYS: &[&str] = &[
    "kind",
    "dim",
    "user_feature_dim",
    "user_sparse_dim",
    "context_dim",
    "history_len",
    "items",
    "catalogue",
    "weights",
    "item_dtype",
    "cpu_scoring",
    "batching",
    "limits",
    "degrade",
    "cold_start",
    "demo",
];

/// Unknown keys are refused by `ModelSpec::read` against [`SHARED_KEYS`] and
/// the kind's own keys, not by serde: the kind's keys share the document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSpec {
    /// A kind `model::kind` registers: `two_tower`, `ranker`, `sasrec`.
    pub kind: ModelKind,
    /// Item embedding dimension `d`.
    pub dim: usize,
    /// Dense user feature dimension (0 when the kind reads none).
    #[serde(default)]
    pub user_feature_dim: usize,
    /// Categorical user features (ids) the model reads per user (0: none;
    /// only kinds that read them accept another width).
    #[serde(default)]
    pub user_sparse_dim: usize,
    /// Floats of per-request context the model reads (0: requests give
    /// none).
    #[serde(default)]
    pub context_dim: usize,
    /// How many of the user's most recent items the model reads (the mean's
    /// window, or the sequence length).
    pub history_len: usize,
    /// Item table (safetensors: `ids` u64 [N], `embeddings` f32 [N, d]),
    /// relative to the version directory. Set from `catalogue` when that is
    /// given instead.
    #[serde(default)]
    pub items: PathBuf,
    /// The shared catalogue `<repository>/catalogues/<name>/items.safetensors`
    /// (in place of `items`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalogue: Option<String>,
    /// Tower weights, relative to the version directory.
    #[serde(default = "default_weights")]
    pub weights: PathBuf,
    /// Storage of the item table on a GPU: f32, f16 or bf16.
    #[serde(default)]
    pub item_dtype: ItemDtype,
    /// The CPU backend's top-k scan: `"f32"` or `"exact-int8"`.
    #[serde(default)]
    pub cpu_scoring: CpuScoring,
    #[serde(default)]
    pub batching: BatchingSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// What an interactive recommend that would be shed (queue full, or its
    /// deadline cannot be met) gets: `"popular"` (the popular items, flagged
    /// `degraded`) or `"off"` (the 429 / 504). Unset: the daemon's `--degrade`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degrade: Option<Degrade>,
    /// What a recommend for a user with no history and no features gets:
    /// `"popular"` (the popular items, flagged `cold_start`) or `"model"`
    /// (the tower's answer for an empty input).
    #[serde(default)]
    pub cold_start: ColdStart,
    /// Present on the bundled demo models: missing weight files are generated
    /// from this seed instead of failing the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demo: Option<DemoSpec>,
    /// The kind's own keys, as the kind read them.
    #[serde(skip)]
    pub options: KindOptions,
}

/// The answer to a recommend that would be shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Degrade {
    /// 429 / 504, as the request asked for more than the daemon can give.
    #[default]
    Off,
    /// The model's popular items, flagged `degraded`.
    Popular,
}

/// The answer to a recommend for a user rankd knows nothing about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColdStart {
    /// The popular items, flagged `cold_start`.
    #[default]
    Popular,
    /// The tower's own answer for an empty history.
    Model,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchingSpec {
    /// A batch closes when this many rows are waiting (a recommend request is
    /// one row, a ranker score request one row per candidate).
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// ... or when the oldest waiting request has waited this long.
    #[serde(default = "default_max_queue_delay_us")]
    pub max_queue_delay_us: u64,
    /// Interactive requests waiting beyond this are refused with 429.
    #[serde(default = "default_max_queue_size")]
    pub max_queue_size: usize,
    /// Bulk requests waiting beyond this are refused with 429; a line of the
    /// bulk route waits for room instead, up to its deadline.
    #[serde(default = "default_max_bulk_queue_size")]
    pub max_bulk_queue_size: usize,
    /// Under sustained interactive load, the least fraction (0 to 1) of the
    /// rows executed that goes to waiting bulk work.
    #[serde(default = "default_bulk_min_share")]
    pub bulk_min_share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Largest `k` a recommend request may ask for.
    #[serde(default = "default_max_k")]
    pub max_k: usize,
    /// Most candidates in one score request.
    #[serde(default = "default_max_items")]
    pub max_items: usize,
    /// Most ids in a recommend request's `exclude` list.
    #[serde(default = "default_max_exclude")]
    pub max_exclude: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DemoSpec {
    pub seed: u64,
}

fn default_weights() -> PathBuf {
    PathBuf::from("weights.safetensors")
}
fn default_max_batch_size() -> usize {
    64
}
fn default_max_queue_delay_us() -> u64 {
    500
}
fn default_max_queue_size() -> usize {
    1024
}
fn default_max_bulk_queue_size() -> usize {
    4096
}
fn default_bulk_min_share() -> f64 {
    0.05
}
fn default_max_k() -> usize {
    1000
}
fn default_max_items() -> usize {
    1000
}
fn default_max_exclude() -> usize {
    10_000
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch_size(),
            max_queue_delay_us: default_max_queue_delay_us(),
            max_queue_size: default_max_queue_size(),
            max_bulk_queue_size: default_max_bulk_queue_size(),
            bulk_min_share: default_bulk_min_share(),
        }
    }
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_k: default_max_k(),
            max_items: default_max_items(),
            max_exclude: default_max_exclude(),
        }
    }
}

/// Reads a model.toml at `path` with `parse`; errors name the file.
pub(super) fn read_with<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    parse(&text).map_err(|message| ModelError::Spec {
        path: path.to_path_buf(),
        message,
    })
}

impl ModelSpec {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        read_with(path, Self::parse)
    }

    /// Parses model.toml's text: the shared keys, then the kind's own.
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc = Doc::parse(text)?;
        // An unknown or missing kind is reported by the shared keys' parse.
        if let Some(kind) = doc.string("kind").and_then(|k| ModelKind::parse(k).ok()) {
            doc.refuse_unknown(SHARED_KEYS.iter().chain(kind.keys()).copied())?;
        }
        let mut spec: ModelSpec = doc.part()?;
        spec.resolve_catalogue()?;
        spec.options = spec.kind.options(&doc)?;
        spec.check()?;
        spec.kind.check(&spec)?;
        Ok(spec)
    }

    /// `catalogue = "<name>"` stands for the items file of that catalogue;
    /// exactly one of `items` and `catalogue` is given.
    fn resolve_catalogue(&mut self) -> Result<(), String> {
        match (&self.catalogue, self.items.as_os_str().is_empty()) {
            (Some(_), false) => Err("give `items` or `catalogue`, not both".into()),
            (None, true) => Err("`items` or `catalogue` is required".into()),
            (None, false) => Ok(()),
            (Some(name), true) => {
                if !super::repository::valid_model_name(name) {
                    return Err(format!(
                        "catalogue must be a folder name of letters, digits, '-', '_' and '.' (at most 128), got {name:?}"
                    ));
                }
                self.items = Path::new("..")
                    .join("..")
                    .join(super::CATALOGUES_DIR)
                    .join(name)
                    .join("items.safetensors");
                Ok(())
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("dim", self.dim),
            ("history_len", self.history_len),
            ("batching.max_batch_size", self.batching.max_batch_size),
            ("batching.max_queue_size", self.batching.max_queue_size),
            (
                "batching.max_bulk_queue_size",
                self.batching.max_bulk_queue_size,
            ),
            ("limits.max_k", self.limits.max_k),
            ("limits.max_items", self.limits.max_items),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("{key} must be > 0, got 0"));
            }
        }
        if !self.kind.reads_sparse_and_context() {
            for (key, value) in [
                ("user_sparse_dim", self.user_sparse_dim),
                ("context_dim", self.context_dim),
            ] {
                if value != 0 {
                    return Err(format!(
                        "a {} model reads no {}: {key} must be 0, got {value}",
                        self.kind,
                        if key == "context_dim" {
                            "request context"
                        } else {
                            "categorical user features"
                        }
                    ));
                }
            }
        }
        let share = self.batching.bulk_min_share;
        if !(0.0..=1.0).contains(&share) {
            return Err(format!(
                "batching.bulk_min_share must be between 0 and 1, got {share}"
            ));
        }
        Ok(())
    }

    /// Width of the tower's input layer.
    pub fn input_dim(&self) -> usize {
        self.kind.tower_dims(self.dim, self.user_feature_dim).0
    }

    /// Width of the tower's output layer.
    pub fn output_dim(&self) -> usize {
        self.kind.tower_dims(self.dim, self.user_feature_dim).1
    }

    /// The largest batch, in rows, the model must be warmed for.
    pub fn max_batch_rows(&self) -> usize {
        self.kind.max_batch_rows(self)
    }

    /// Whether a request of route `op` may reach `model`, this model.
    pub fn accepts(&self, model: &str, op: super::OpKind) -> Result<(), String> {
        self.kind.accepts(self, model, op)
    }

    /// Batch rows one request of this model fills.
    pub fn rows(&self, op: &super::query::Op) -> usize {
        self.kind.rows(self, op)
    }

    /// Whether this model scores (user, candidate) pairs.
    pub fn ranks(&self) -> bool {
        self.kind.ranks(self)
    }

    /// This model's warm-up batch of `size` rows.
    pub fn warm_batch<'a>(&self, size: usize, rows: &'a [u32]) -> Vec<super::Query<'a>> {
        self.kind.warm_batch(self, size, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(extra: &str) -> Result<ModelSpec, ModelError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.toml");
        std::fs::write(
            &path,
            format!("{extra}kind = \"two_tower\"\ndim = 4\nuser_feature_dim = 0\nhistory_len = 5\nitems = \"i.safetensors\"\n"),
        )
        .unwrap();
        ModelSpec::read(&path)
    }

    /// `SHARED_KEYS`, which decides what is refused as unknown, names every
    /// field of the spec and nothing else.
    #[test]
    fn the_shared_keys_are_the_spec_fields() {
        let spec = ModelSpec::parse(
            "kind = \"two_tower\"\ndim = 4\nhistory_len = 5\ncatalogue = \"videos\"\ndegrade = \"popular\"\n[demo]\nseed = 1\n",
        )
        .unwrap();
        let table = toml::Table::try_from(&spec).unwrap();
        let mut fields: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut shared = SHARED_KEYS.to_vec();
        fields.sort_unstable();
        shared.sort_unstable();
        assert_eq!(fields, shared);
    }

    /// `catalogue` names the repository's shared table in place of `items`.
    #[test]
    fn a_catalogue_stands_for_its_items_file() {
        let base = "kind = \"two_tower\"\ndim = 4\nhistory_len = 5\n";
        let spec = ModelSpec::parse(&format!("{base}catalogue = \"videos\"\n")).unwrap();
        assert_eq!(spec.catalogue.as_deref(), Some("videos"));
        assert_eq!(
            spec.items,
            Path::new("../../catalogues/videos/items.safetensors")
        );
        let both = ModelSpec::parse(&format!(
            "{base}catalogue = \"v\"\nitems = \"i.safetensors\"\n"
        ));
        assert_eq!(both.unwrap_err(), "give `items` or `catalogue`, not both");
        let neither = ModelSpec::parse(base);
        assert_eq!(neither.unwrap_err(), "`items` or `catalogue` is required");
        let escape = ModelSpec::parse(&format!("{base}catalogue = \"../x\"\n")).unwrap_err();
        assert!(escape.contains("got \"../x\""), "{escape}");
    }

    #[test]
    fn cpu_scoring_is_f32_unless_exact_int8_is_asked_for() {
        assert_eq!(read("").unwrap().cpu_scoring, CpuScoring::F32);
        let f32 = read("cpu_scoring = \"f32\"\n").unwrap();
        assert_eq!(f32.cpu_scoring, CpuScoring::F32);
        let int8 = read("cpu_scoring = \"exact-int8\"\n").unwrap();
        assert_eq!(int8.cpu_scoring, CpuScoring::ExactInt8);
        let err = read("cpu_scoring = \"int8\"\n").unwrap_err().to_string();
        assert!(
            err.contains("cpu_scoring") && err.contains("int8") && err.contains("exact-int8"),
            "{err}"
        );
    }
}
