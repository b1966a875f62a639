//! The item table: ids (u64 [N]) and embeddings (f32 [N, d]) read from a
//! safetensors file, with the id → row index and the per-row liveness and
//! version that feature updates need. It is the host copy of record: the CPU
//! backend scores straight from it and a device backend mirrors it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use safetensors::{Dtype, SafeTensors};

use super::int8::Int8Table;
use super::weights::f32_values;
use super::ModelError;

#[derive(Debug, Clone)]
pub struct ItemTable {
    dim: usize,
    ids: Vec<u64>,
    index: HashMap<u64, u32>,
    embeddings: Vec<f32>,
    live: Vec<bool>,
    versions: Vec<u64>,
    live_count: usize,
    /// The int8 copy `cpu_scoring = "exact-int8"` scans: made on first use,
    /// then rewritten with every row written here, so it never lags the f32
    /// rows (liveness is read from `live`).
    int8: OnceLock<Int8Table>,
}

/// Outcome of applying one item update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemChange {
    /// The row was written (a new id appends a row).
    Applied { row: u32 },
    /// The stored version is the same or newer: nothing changed.
    Stale,
}

impl ItemTable {
    pub fn new(dim: usize, ids: Vec<u64>, embeddings: Vec<f32>) -> Result<Self, String> {
        if embeddings.len() != ids.len() * dim {
            return Err(format!(
                "{} embedding values for {} ids of dim {dim}",
                embeddings.len(),
                ids.len()
            ));
        }
        let mut index = HashMap::with_capacity(ids.len());
        for (row, &id) in ids.iter().enumerate() {
            if index.insert(id, row as u32).is_some() {
                return Err(format!("item id {id} appears more than once"));
            }
        }
        let n = ids.len();
        Ok(Self {
            dim,
            ids,
            index,
            embeddings,
            live: vec![true; n],
            versions: vec![0; n],
            live_count: n,
            int8: OnceLock::new(),
        })
    }

    pub fn load(path: &Path, dim: usize) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let missing = |name: &str| ModelError::MissingTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
        };
        let ids_view = st.tensor("ids").map_err(|_| missing("ids"))?;
        let emb_view = st.tensor("embeddings").map_err(|_| missing("embeddings"))?;
        if ids_view.dtype() != Dtype::U64 {
            return Err(ModelError::Dtype {
                path: path.to_path_buf(),
                tensor: "ids".into(),
                expected: "U64".into(),
                actual: format!("{:?}", ids_view.dtype()),
            });
        }
        if ids_view.shape().len() != 1 {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: "ids".into(),
                expected: "[N]".into(),
                actual: ids_view.shape().to_vec(),
            });
        }
        let n = ids_view.shape()[0];
        if emb_view.shape() != [n, dim] {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: "embeddings".into(),
                expected: format!("[{n}, {dim}]"),
                actual: emb_view.shape().to_vec(),
            });
        }
        let ids: Vec<u64> = ids_view
            .data()
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("chunks of 8 bytes")))
            .collect();
        let embeddings = f32_values(path, "embeddings", &emb_view)?;
        Self::new(dim, ids, embeddings).map_err(|message| ModelError::Values {
            path: path.to_path_buf(),
            tensor: "ids".into(),
            message,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows ever allocated, live or deleted.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// Items that can be returned.
    pub fn live_count(&self) -> usize {
        self.live_count
    }

    pub fn row_of(&self, id: u64) -> Option<u32> {
        self.index.get(&id).copied()
    }

    /// Row of a live item.
    pub fn live_row_of(&self, id: u64) -> Option<u32> {
        self.row_of(id).filter(|&r| self.live[r as usize])
    }

    /// Stored version of an item (0 for items from the file).
    pub fn version_of(&self, id: u64) -> Option<u64> {
        self.row_of(id).map(|r| self.versions[r as usize])
    }

    pub fn id(&self, row: u32) -> u64 {
        self.ids[row as usize]
    }

    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    pub fn is_live(&self, row: u32) -> bool {
        self.live[row as usize]
    }

    pub fn live_mask(&self) -> &[bool] {
        &self.live
    }

    pub fn embedding(&self, row: u32) -> &[f32] {
        let start = row as usize * self.dim;
        &self.embeddings[start..start + self.dim]
    }

    /// All rows, row-major [rows, dim].
    pub fn embeddings(&self) -> &[f32] {
        &self.embeddings
    }

    /// The int8 copy of the rows, made on the first call.
    pub fn int8(&self) -> &Int8Table {
        self.int8
            .get_or_init(|| Int8Table::new(self.dim, &self.embeddings))
    }

    /// Rewrites row `row` of the int8 copy, if there is one, from the f32 row.
    fn sync_int8(&mut self, row: usize) {
        if let Some(q) = self.int8.get_mut() {
            q.set_row(row, &self.embeddings[row * self.dim..(row + 1) * self.dim]);
        }
    }

    /// Writes an item's embedding if `version` is newer than the stored one;
    /// a new id grows the table by one row.
    pub fn upsert(&mut self, id: u64, embedding: &[f32], version: u64) -> ItemChange {
        assert_eq!(
            embedding.len(),
            self.dim,
            "caller validates the length: this is a bug"
        );
        match self.index.get(&id).copied() {
            Some(row) => {
                let r = row as usize;
                if self.versions[r] >= version {
                    return ItemChange::Stale;
                }
                self.embeddings[r * self.dim..(r + 1) * self.dim].copy_from_slice(embedding);
                self.sync_int8(r);
                self.versions[r] = version;
                if !self.live[r] {
                    self.live[r] = true;
                    self.live_count += 1;
                }
                ItemChange::Applied { row }
            }
            None => {
                let row = self.ids.len() as u32;
                self.ids.push(id);
                self.index.insert(id, row);
                self.embeddings.extend_from_slice(embedding);
                self.sync_int8(row as usize);
                self.live.push(true);
                self.versions.push(version);
                self.live_count += 1;
                ItemChange::Applied { row }
            }
        }
    }

    /// Sets a row exactly as recorded in a snapshot, whatever is stored.
    pub fn restore(&mut self, id: u64, embedding: &[f32], version: u64, live: bool) {
        let row = match self.index.get(&id).copied() {
            Some(row) => row as usize,
            None => {
                self.upsert(id, embedding, version);
                self.index[&id] as usize
            }
        };
        self.embeddings[row * self.dim..(row + 1) * self.dim].copy_from_slice(embedding);
        self.sync_int8(row);
        self.versions[row] = version;
        if self.live[row] != live {
            self.live[row] = live;
            if live {
                self.live_count += 1;
            } else {
                self.live_count -= 1;
            }
        }
    }

    /// Removes an item from results if `version` is newer than the stored one.
    /// Its row (and embedding) stays, so histories that mention it still pool it.
    pub fn delete(&mut self, id: u64, version: u64) -> ItemChange {
        let Some(row) = self.index.get(&id).copied() else {
            return ItemChange::Stale;
        };
        let r = row as usize;
        if self.versions[r] >= version {
            return ItemChange::Stale;
        }
        self.versions[r] = version;
        if self.live[r] {
            self.live[r] = false;
            self.live_count -= 1;
        }
        ItemChange::Applied { row }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_respects_versions_and_grows() {
        let mut t = ItemTable::new(2, vec![10, 20], vec![1.0, 0.0, 0.0, 1.0]).unwrap();
        assert_eq!(t.upsert(10, &[2.0, 2.0], 3), ItemChange::Applied { row: 0 });
        assert_eq!(t.upsert(10, &[9.0, 9.0], 3), ItemChange::Stale);
        assert_eq!(t.embedding(0), &[2.0, 2.0]);
        assert_eq!(t.upsert(30, &[5.0, 5.0], 1), ItemChange::Applied { row: 2 });
        assert_eq!(t.row_of(30), Some(2));
        assert_eq!(t.live_count(), 3);
        assert_eq!(t.delete(20, 1), ItemChange::Applied { row: 1 });
        assert_eq!(t.live_row_of(20), None);
        assert_eq!(t.live_count(), 2);
        assert_eq!(t.delete(20, 1), ItemChange::Stale);
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let err = ItemTable::new(1, vec![1, 1], vec![0.0, 0.0]).unwrap_err();
        assert!(err.contains("item id 1 appears more than once"), "{err}");
    }
}
