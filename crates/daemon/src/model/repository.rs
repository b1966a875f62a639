//! The model repository: `<root>/<name>/<version>/model.toml`. A model may
//! hold several numeric versions. Folders without numeric version folders
//! (such as `catalogues/`, which holds shared item tables) are not models.
//!
//! A version present when the daemon starts is eligible at once. One that
//! appears later is eligible once it holds a `READY` file (an uploader writes
//! it last) or once none of its files changed for one whole poll interval
//! ([`Eligibility`]), so a half-copied upload is never loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{ModelError, ModelSpec};

/// One version of a model found in the repository, parsed or not.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub name: String,
    pub version: u64,
    pub dir: PathBuf,
    pub spec: Result<ModelSpec, ModelError>,
}

impl ModelEntry {
    pub fn resolve(&self, relative: &Path) -> PathBuf {
        self.dir.join(relative)
    }

    /// Reads the version folder `dir` of model `name`.
    pub fn read(name: &str, version: u64, dir: PathBuf) -> Self {
        let spec = ModelSpec::read(&dir.join("model.toml"));
        Self {
            name: name.to_string(),
            version,
            dir,
            spec,
        }
    }
}

/// A model's version folders, lowest version first.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub name: String,
    pub versions: Vec<(u64, PathBuf)>,
}

impl ModelDir {
    pub fn latest(&self) -> Option<&(u64, PathBuf)> {
        self.versions.last()
    }
}

#[derive(Debug, Clone)]
pub struct Repository {
    pub root: PathBuf,
    pub models: Vec<ModelDir>,
    /// Folders whose newest version is a `kind = "pipeline"` (served from
    /// their stages, not loaded).
    pub pipelines: Vec<ModelDir>,
}

/// Model names appear in URLs: keep them to a safe alphabet.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Repository {
    pub fn scan(root: &Path) -> Result<Self, ModelError> {
        let io = |e: std::io::Error| ModelError::Io {
            path: root.to_path_buf(),
            message: e.to_string(),
        };
        let mut models = Vec::new();
        let mut pipelines = Vec::new();
        let mut dirs: Vec<_> = std::fs::read_dir(root)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .collect();
        dirs.sort_by_key(|e| e.file_name());
        for dir in dirs {
            let name = dir.file_name().to_string_lossy().into_owned();
            if !valid_model_name(&name) {
                continue;
            }
            let versions = version_folders(&dir.path());
            if versions.is_empty() {
                tracing::debug!(folder = %dir.path().display(), "no <version>/model.toml inside: not a model");
                continue;
            }
            let newest = &versions.last().expect("not empty").1;
            let text = std::fs::read_to_string(newest.join("model.toml")).unwrap_or_default();
            if super::pipeline::is_pipeline(&text) {
                pipelines.push(ModelDir { name, versions });
            } else {
                models.push(ModelDir { name, versions });
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            models,
            pipelines,
        })
    }
}

/// The numeric version folders of `dir` that hold a model.toml, lowest first.
/// A folder that cannot be read has none.
pub fn version_folders(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut versions: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u64>().ok()?;
            e.path().join("model.toml").is_file().then(|| (v, e.path()))
        })
        .collect();
    versions.sort_by_key(|(v, _)| *v);
    versions
}

/// What a version folder's files look like now: name, size and modification
/// time of each file (one level of subfolders included). Equal signatures a
/// poll interval apart mean nothing was written in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl Signature {
    pub fn of(dir: &Path) -> Self {
        let mut files = Vec::new();
        collect(dir, dir, 2, &mut files);
        files.sort();
        Self(files)
    }
}

fn collect(
    root: &Path,
    dir: &Path,
    depth: usize,
    out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let Ok(meta) = e.metadata() else { continue };
        let path = e.path();
        if meta.is_dir() {
            if depth > 1 {
                collect(root, &path, depth - 1, out);
            }
        } else {
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            out.push((rel, meta.len(), meta.modified().ok()));
        }
    }
}

/// The marker an uploader writes last into a finished version folder.
pub const READY_MARKER: &str = "READY";

/// Decides when a version folder that appeared after the start may be loaded.
#[derive(Debug, Default)]
pub struct Eligibility {
    /// Versions already eligible, per model.
    eligible: HashMap<String, BTreeMap<u64, ()>>,
    /// Versions seen but not yet eligible, with their signature last poll.
    pending: HashMap<(String, u64), Signature>,
}

impl Eligibility {
    /// Every version present at start is eligible.
    pub fn at_start(repo: &Repository) -> Self {
        let mut e = Self::default();
        for m in &repo.models {
            let known = e.eligible.entry(m.name.clone()).or_default();
            for (v, _) in &m.versions {
                known.insert(*v, ());
            }
        }
        e
    }

    /// The highest eligible version of `model`.
    pub fn highest(&self, model: &str) -> Option<u64> {
        self.eligible.get(model)?.keys().next_back().copied()
    }

    /// One poll: the versions of `model` (folders in `versions`) that became
    /// eligible now. Versions that vanished are forgotten, so a folder copied
    /// again under the same number goes through the same checks.
    pub fn poll(&mut self, model: &str, versions: &[(u64, PathBuf)]) -> Vec<(u64, PathBuf)> {
        let known = self.eligible.entry(model.to_string()).or_default();
        known.retain(|v, _| versions.iter().any(|(w, _)| w == v));
        self.pending
            .retain(|(m, v), _| m != model || versions.iter().any(|(w, _)| w == v));
        let mut newly = Vec::new();
        for (v, dir) in versions {
            if known.contains_key(v) {
                continue;
            }
            let key = (model.to_string(), *v);
            let now = Signature::of(dir);
            let ready = dir.join(READY_MARKER).is_file()
                || self.pending.get(&key).is_some_and(|before| *before == now);
            if ready {
                self.pending.remove(&key);
                known.insert(*v, ());
                newly.push((*v, dir.clone()));
            } else {
                self.pending.insert(key, now);
            }
        }
        newly
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_url_safe() {
        assert!(valid_model_name("demo-ranker"));
        assert!(valid_model_name("m_1.2"));
        assert!(!valid_model_name(""));
        assert!(!valid_model_name(".hidden"));
        assert!(!valid_model_name("a b"));
        assert!(!valid_model_name("a/b"));
    }

    #[test]
    fn every_version_is_listed_and_bad_specs_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for v in ["1", "3", "2"] {
            let d = root.join("m").join(v);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("model.toml"),
                "kind = \"two_tower\"\ndim = 4\nuser_feature_dim = 0\nhistory_len = 5\nitems = \"i.safetensors\"\n",
            )
            .unwrap();
        }
        let bad = root.join("bad").join("1");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("model.toml"), "kind = \"two_tower\"\ndim = 0\n").unwrap();
        std::fs::create_dir_all(root.join("catalogues").join("x")).unwrap();
        let repo = Repository::scan(root).unwrap();
        let names: Vec<_> = repo
            .models
            .iter()
            .map(|m| {
                (
                    m.name.as_str(),
                    m.versions.iter().map(|v| v.0).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(names, vec![("bad", vec![1]), ("m", vec![1, 2, 3])]);
        let bad = &repo.models[0];
        let entry = ModelEntry::read(&bad.name, 1, bad.latest().unwrap().1.clone());
        let err = entry.spec.as_ref().unwrap_err().to_string();
        assert!(err.contains("model.toml"), "{err}");
    }

    #[test]
    fn a_later_version_is_eligible_with_ready_or_after_a_quiet_interval() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        let put = |v: &str, file: &str, body: &str| {
            let d = m.join(v);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(file), body).unwrap();
        };
        put("1", "model.toml", "x");
        let repo = Repository::scan(dir.path()).unwrap();
        let mut e = Eligibility::at_start(&repo);
        assert!(
            e.poll("m", &version_folders(&m)).is_empty(),
            "1 was eligible at start"
        );
        // Version 2 is being copied: seen, not eligible until quiet for a poll.
        put("2", "model.toml", "x");
        assert!(e.poll("m", &version_folders(&m)).is_empty());
        put("2", "weights.safetensors", "partial");
        assert!(
            e.poll("m", &version_folders(&m)).is_empty(),
            "a file changed"
        );
        let newly = e.poll("m", &version_folders(&m));
        assert_eq!(newly.iter().map(|v| v.0).collect::<Vec<_>>(), vec![2]);
        assert!(
            e.poll("m", &version_folders(&m)).is_empty(),
            "eligible once"
        );
        // Version 3 with READY is eligible on the first poll that sees it.
        put("3", "model.toml", "x");
        put("3", READY_MARKER, "");
        let newly = e.poll("m", &version_folders(&m));
        assert_eq!(newly.iter().map(|v| v.0).collect::<Vec<_>>(), vec![3]);
        // A folder that vanished and comes back is checked again.
        std::fs::remove_dir_all(m.join("3")).unwrap();
        assert!(e.poll("m", &version_folders(&m)).is_empty());
        put("3", "model.toml", "y");
        assert!(e.poll("m", &version_folders(&m)).is_empty());
    }
}
