//! The model repository: `<root>/<name>/<version>/model.toml`. The highest
//! numeric version of each model is served. Folders without numeric version
//! folders (such as `catalogues/`, which holds shared item tables) are not models.

use std::path::{Path, PathBuf};

use super::{ModelError, ModelSpec};

/// One model found in the repository, parsed or not.
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
}

#[derive(Debug, Clone)]
pub struct Repository {
    pub root: PathBuf,
    pub models: Vec<ModelEntry>,
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
            let versions: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.path())
                .map_err(io)?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u64>().ok()?;
                    e.path().join("model.toml").is_file().then(|| (v, e.path()))
                })
                .collect();
            let Some((version, vdir)) = versions.into_iter().max_by_key(|(v, _)| *v) else {
                tracing::debug!(folder = %dir.path().display(), "no <version>/model.toml inside: not a model");
                continue;
            };
            let spec = ModelSpec::read(&vdir.join("model.toml"));
            models.push(ModelEntry {
                name,
                version,
                dir: vdir,
                spec,
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            models,
        })
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
    fn highest_version_is_served_and_bad_specs_are_reported() {
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
            .map(|m| (m.name.as_str(), m.version))
            .collect();
        assert_eq!(names, vec![("bad", 1), ("m", 3)]);
        let err = repo.models[0].spec.as_ref().unwrap_err().to_string();
        assert!(err.contains("model.toml"), "{err}");
    }
}
