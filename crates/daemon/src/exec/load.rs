//! Reading a model version from the repository: model.toml, the tower weights
//! and the item table, each validated (shapes, dtypes, finite values). This is
//! plain file work, done off the executor thread for versions that arrive
//! while the daemon serves; the executor only makes the result resident and
//! warms it.

use std::path::{Path, PathBuf};

use super::ModelIndex;
use crate::model::attributes::{Attributes, ATTRIBUTES_FILE};
use crate::model::{ItemTable, ModelEntry, ModelError, ModelSpec, Weights};

/// A version read and validated, ready to be made resident.
pub struct VersionFiles {
    /// The model's index in the registry.
    pub model: ModelIndex,
    pub name: String,
    pub version: u64,
    pub dir: PathBuf,
    pub spec: ModelSpec,
    /// The weights as the model's kind loaded them.
    pub weights: Weights,
    /// The catalogue: versions naming the same one share one resident table
    /// (see [`catalogue_name`]).
    pub catalogue: String,
    /// Where the table is read from: the items file, or for a table the
    /// weights carry, the weights file and the tensor (`…/model.pth#item_emb`).
    pub items_key: PathBuf,
    /// The table read from `items_key`; `None` when it was resident already.
    pub items: Option<ItemTable>,
}

/// The name of the catalogue a table file makes, given the repository's
/// root (both canonical): `<name>` for a file inside `catalogues/<name>/`,
/// otherwise its path relative to the root without the extension
/// (`demo/1/items`), or the absolute path without the extension for a file
/// outside the repository. A table the weights carry is named after the
/// weights file and the tensor (`sasrec/1/model/item_emb`).
pub fn catalogue_name(root: &Path, table: &Path, tensor: Option<&str>) -> String {
    let relative = table.strip_prefix(root).ok();
    if tensor.is_none() {
        if let Some(rel) = relative {
            let mut parts = rel.components();
            if let (Some(first), Some(name), Some(_)) = (parts.next(), parts.next(), parts.next()) {
                if first.as_os_str() == crate::model::CATALOGUES_DIR {
                    return name.as_os_str().to_string_lossy().into_owned();
                }
            }
        }
    }
    let path = relative.unwrap_or(table).with_extension("");
    let mut name: String = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/");
    if relative.is_none() {
        name = format!("/{}", name.trim_start_matches('/'));
    }
    if let Some(t) = tensor {
        name.push('/');
        name.push_str(t);
    }
    name
}

/// `path` made absolute with `.` and `..` resolved by name, symlinks kept.
fn lexical(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Reads a catalogue's items file and, when one lies beside it, its
/// attributes (`attributes.safetensors`).
pub fn load_table(items_path: &Path, dim: usize) -> Result<ItemTable, ModelError> {
    let mut table = ItemTable::load(items_path, dim)?;
    let attributes_path = items_path.with_file_name(ATTRIBUTES_FILE);
    if attributes_path.is_file() {
        let attributes = Attributes::load(&attributes_path, table.rows())?;
        table
            .set_attributes(attributes)
            .map_err(|message| ModelError::Values {
                path: attributes_path,
                tensor: "*".into(),
                message,
            })?;
    }
    Ok(table)
}

/// Reads `entry`. `resident(catalogue, dim)` tells whether that catalogue
/// is already resident with that dimension (then it is not read again).
pub fn read(
    model: ModelIndex,
    entry: &ModelEntry,
    resident: impl Fn(&str, usize) -> bool,
) -> Result<VersionFiles, ModelError> {
    let spec = entry.spec.clone()?;
    let weights_path = entry.resolve(&spec.kind.weights_file(&spec));
    let weights = spec.kind.load_weights(&spec, &weights_path)?;
    let canonical = |path: &Path| {
        path.canonicalize().map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    // The repository's root: the version folder is `<root>/<model>/<version>`.
    let parent = entry.dir.parent().and_then(Path::parent);
    let root = parent
        .map(|r| r.canonicalize().unwrap_or_else(|_| r.to_path_buf()))
        .unwrap_or_default();
    let lexical_root = parent.map(lexical).unwrap_or_default();
    let (catalogue, items_key, items) = match spec.kind.embedded_items(&spec, &weights) {
        Some(table) => {
            let weights_key = canonical(&weights_path)?;
            let tensor = spec.items.to_string_lossy();
            let catalogue = catalogue_name(&root, &weights_key, Some(&tensor));
            let mut key = weights_key.into_os_string();
            key.push("#");
            key.push(&spec.items);
            (catalogue, PathBuf::from(key), Some(table?))
        }
        None => {
            let items_path = entry.resolve(&spec.items);
            let items_key = canonical(&items_path)?;
            // Named from the path as written (`..` resolved, symlinks kept),
            // so `catalogues/videos` linked to another disk is still `videos`.
            let catalogue = catalogue_name(&lexical_root, &lexical(&items_path), None);
            if let Some(named) = &spec.catalogue {
                if *named != catalogue {
                    return Err(ModelError::Spec {
                        path: entry.dir.join("model.toml"),
                        message: format!(
                            "catalogue '{named}' resolves to {} (catalogue '{catalogue}')",
                            items_key.display()
                        ),
                    });
                }
            }
            let items = if resident(&catalogue, spec.dim) {
                None
            } else {
                Some(load_table(&items_path, spec.dim)?)
            };
            (catalogue, items_key, items)
        }
    };
    Ok(VersionFiles {
        model,
        name: entry.name.clone(),
        version: entry.version,
        dir: entry.dir.clone(),
        spec,
        weights,
        catalogue,
        items_key,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_names_follow_the_table_files_place() {
        let root = Path::new("/srv/models");
        let name = |p: &str, t: Option<&str>| catalogue_name(root, Path::new(p), t);
        assert_eq!(
            name("/srv/models/catalogues/videos/items.safetensors", None),
            "videos"
        );
        assert_eq!(
            name("/srv/models/catalogues/videos/v2.safetensors", None),
            "videos"
        );
        assert_eq!(
            name("/srv/models/demo/1/items.safetensors", None),
            "demo/1/items"
        );
        assert_eq!(
            name("/srv/models/demo/2/items.safetensors", None),
            "demo/2/items"
        );
        assert_eq!(
            name("/srv/models/catalogues.safetensors", None),
            "catalogues"
        );
        assert_eq!(
            name("/data/tables/items.safetensors", None),
            "/data/tables/items"
        );
        assert_eq!(
            name("/srv/models/sasrec/1/model.pth", Some("item_emb")),
            "sasrec/1/model/item_emb"
        );
    }

    /// A catalogue folder that is a symlink keeps its name: the name comes
    /// from the path as the repository spells it.
    #[cfg(unix)]
    #[test]
    fn a_symlinked_catalogue_keeps_its_name() {
        let data = tempfile::tempdir().unwrap();
        crate::model::demo::generate(data.path(), crate::model::demo::DEMO_SEED).unwrap();
        let repo = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(repo.path().join("catalogues")).unwrap();
        std::os::unix::fs::symlink(
            data.path().join("catalogues/demo"),
            repo.path().join("catalogues/videos"),
        )
        .unwrap();
        let dir = repo.path().join("m/1");
        std::fs::create_dir_all(&dir).unwrap();
        let weights = data.path().join("demo/1/weights.safetensors");
        std::fs::write(
            dir.join("model.toml"),
            format!(
                "kind = \"two_tower\"\ndim = 64\nuser_feature_dim = 16\nhistory_len = 50\n\
                 catalogue = \"videos\"\nweights = {:?}\n",
                weights.to_str().unwrap()
            ),
        )
        .unwrap();
        let entry = crate::model::ModelEntry::read("m", 1, dir);
        let f = read(ModelIndex::new(0), &entry, |_, _| false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.catalogue, "videos");
        assert_eq!(f.items.unwrap().rows(), 100_000);
    }
}
