//! Reading a model version from the repository: model.toml, the tower weights
//! and the item table, each validated (shapes, dtypes, finite values). This is
//! plain file work, done off the executor thread for versions that arrive
//! while the daemon serves; the executor only makes the result resident and
//! warms it.

use std::path::{Path, PathBuf};

use crate::model::{ItemTable, ModelEntry, ModelError, ModelSpec, Weights};

/// A version read and validated, ready to be made resident.
pub struct VersionFiles {
    /// The model's index in the registry.
    pub model: usize,
    pub name: String,
    pub version: u64,
    pub dir: PathBuf,
    pub spec: ModelSpec,
    /// The weights as the model's kind loaded them.
    pub weights: Weights,
    /// The item table's canonical path: versions naming the same file share
    /// one resident table. A table the weights carry is keyed by the
    /// weights file's path and the tensor (`…/model.pth#item_emb`).
    pub items_key: PathBuf,
    /// The table read from `items_key`; `None` when it was resident already.
    pub items: Option<ItemTable>,
}

/// Reads `entry`. `resident(path, dim)` tells whether the table at that
/// canonical path is already resident with that dimension (then it is not
/// read again).
pub fn read(
    model: usize,
    entry: &ModelEntry,
    resident: impl Fn(&Path, usize) -> bool,
) -> Result<VersionFiles, ModelError> {
    let spec = entry.spec.clone()?;
    let weights_path = entry.resolve(&spec.weights);
    let weights = spec.kind.load_weights(&spec, &weights_path)?;
    let canonical = |path: &Path| {
        path.canonicalize().map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    let (items_key, items) = match spec.kind.embedded_items(&spec, &weights) {
        Some(table) => {
            let mut key = canonical(&weights_path)?.into_os_string();
            key.push("#");
            key.push(&spec.items);
            (PathBuf::from(key), Some(table?))
        }
        None => {
            let items_path = entry.resolve(&spec.items);
            let items_key = canonical(&items_path)?;
            let items = if resident(&items_key, spec.dim) {
                None
            } else {
                Some(ItemTable::load(&items_path, spec.dim)?)
            };
            (items_key, items)
        }
    };
    Ok(VersionFiles {
        model,
        name: entry.name.clone(),
        version: entry.version,
        dir: entry.dir.clone(),
        spec,
        weights,
        items_key,
        items,
    })
}
