//! The item table: ids (u64 [N]) and embeddings (f32 [N, d]) read from a
//! safetensors file, with the id → row index and the per-row liveness and
//! version that feature updates need. It is the host copy of record: the CPU
//! backend scores straight from it and a device backend mirrors it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError};

use super::attributes::Attributes;
use super::int8::Int8Table;
use super::ModelError;

#[derive(Debug, Clone)]
pub struct ItemTable {
    dim: usize,
    ids: Vec<u64>,
    index: HashMap<u64, u32>,
    embeddings: Vec<f32>,
    live: Vec<bool>,
    versions: Vec<u64>,
    /// When each row's embedding was last written (a count of writes to
    /// this table, 0 for rows as read from the file), and that count: what
    /// the executor's query cache checks a kept query vector against.
    written: Vec<u64>,
    writes: u64,
    live_count: usize,
    /// Integer attributes per row (none unless the catalogue has them).
    attributes: Attributes,
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
            written: vec![0; n],
            writes: 0,
            live_count: n,
            attributes: Attributes::default(),
            int8: OnceLock::new(),
        })
    }

    /// Reads an item table from a safetensors file straight into the
    /// table's own storage: the header first (bounded), then each tensor's
    /// bytes into its `Vec`, so loading never holds the file and the table
    /// both (peak: the table plus the id index `new` builds).
    pub fn load(path: &Path, dim: usize) -> Result<Self, ModelError> {
        let io = |e: std::io::Error| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let (data_start, header) = read_header(path, &mut file, file_len)?;
        let missing = |name: &str| ModelError::MissingTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
        };
        let ids_info = header.info("ids").ok_or_else(|| missing("ids"))?;
        let emb_info = header
            .info("embeddings")
            .ok_or_else(|| missing("embeddings"))?;
        if ids_info.dtype != Dtype::U64 {
            return Err(ModelError::Dtype {
                path: path.to_path_buf(),
                tensor: "ids".into(),
                expected: "U64".into(),
                actual: format!("{:?}", ids_info.dtype),
            });
        }
        if ids_info.shape.len() != 1 {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: "ids".into(),
                expected: "[N]".into(),
                actual: ids_info.shape.clone(),
            });
        }
        let n = ids_info.shape[0];
        if emb_info.shape != [n, dim] {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: "embeddings".into(),
                expected: format!("[{n}, {dim}]"),
                actual: emb_info.shape.clone(),
            });
        }
        if emb_info.dtype != Dtype::F32 {
            return Err(ModelError::Dtype {
                path: path.to_path_buf(),
                tensor: "embeddings".into(),
                expected: "F32".into(),
                actual: format!("{:?}", emb_info.dtype),
            });
        }
        // The header checked each tensor's byte length against its dtype and
        // shape, and that the tensors end where the file does.
        let mut ids = vec![0u64; n];
        read_le_values(
            &mut file,
            data_start + ids_info.data_offsets.0 as u64,
            &mut ids,
        )
        .map_err(io)?;
        let mut embeddings = vec![0f32; n * dim];
        read_le_values(
            &mut file,
            data_start + emb_info.data_offsets.0 as u64,
            &mut embeddings,
        )
        .map_err(io)?;
        if let Some(pos) = embeddings.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Values {
                path: path.to_path_buf(),
                tensor: "embeddings".into(),
                message: format!(
                    "element {pos} is {}, values must be finite",
                    embeddings[pos]
                ),
            });
        }
        Self::new(dim, ids, embeddings).map_err(|message| ModelError::Values {
            path: path.to_path_buf(),
            tensor: "ids".into(),
            message,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }

    /// Gives the table its attribute columns (one value per row).
    pub fn set_attributes(&mut self, attributes: Attributes) -> Result<(), String> {
        if let Some(rows) = attributes.rows() {
            if rows != self.rows() {
                return Err(format!("{rows} attribute values for {} items", self.rows()));
            }
        }
        self.attributes = attributes;
        Ok(())
    }

    /// Sets attribute values of row `row` by name; a name the table has no
    /// column for (a file reloaded without it) is skipped.
    pub fn write_attributes(&mut self, row: u32, values: &std::collections::BTreeMap<String, i64>) {
        for (name, &v) in values {
            if let Some(a) = self.attributes.index(name) {
                self.attributes.set(a, row as usize, v);
            }
        }
    }

    /// Records `version` for an existing item whose attributes alone change;
    /// `Stale` when the stored version is the same or newer.
    pub fn bump_version(&mut self, id: u64, version: u64) -> ItemChange {
        let Some(row) = self.index.get(&id).copied() else {
            return ItemChange::Stale;
        };
        if self.versions[row as usize] >= version {
            return ItemChange::Stale;
        }
        self.versions[row as usize] = version;
        ItemChange::Applied { row }
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

    /// Embedding writes this table has taken since it was read.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The value of [`Self::writes`] right after row `row`'s embedding was
    /// last written (0: as read from the file).
    pub fn written_at(&self, row: u32) -> u64 {
        self.written[row as usize]
    }

    /// Counts one embedding write to row `row`.
    fn count_write(&mut self, row: usize) {
        self.writes += 1;
        self.written[row] = self.writes;
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
                self.count_write(r);
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
                self.attributes.push_row();
                self.live.push(true);
                self.versions.push(version);
                self.written.push(0);
                self.count_write(row as usize);
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
        self.count_write(row);
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

/// The largest safetensors header `ItemTable::load` reads (the safetensors
/// crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// How much `read_le_values` asks the file for at a time.
const READ_CHUNK_BYTES: usize = 8 << 20;

/// The safetensors header as the safetensors crate reads it.
#[derive(serde::Deserialize)]
struct HeaderJson {
    #[serde(rename = "__metadata__")]
    metadata: Option<HashMap<String, String>>,
    #[serde(flatten)]
    tensors: HashMap<String, TensorInfo>,
}

/// Reads and checks a safetensors file's header as
/// `SafeTensors::deserialize` does (same checks, its messages), without the
/// rest of the file: returns where the data starts and the tensors.
pub(crate) fn read_header(
    path: &Path,
    file: &mut std::fs::File,
    file_len: u64,
) -> Result<(u64, Metadata), ModelError> {
    use std::io::Read;
    let format = |message: String| ModelError::Format {
        path: path.to_path_buf(),
        message,
    };
    if file_len < 8 {
        return Err(format(SafeTensorError::HeaderTooSmall.to_string()));
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(format(format!(
            "{}: {n} bytes, at most {MAX_HEADER_BYTES}",
            SafeTensorError::HeaderTooLarge
        )));
    }
    if n > file_len - 8 {
        return Err(format(format!(
            "{}: the header is {n} bytes, the file has {} after the length",
            SafeTensorError::InvalidHeaderLength,
            file_len - 8
        )));
    }
    let mut bytes = vec![0u8; n as usize];
    file.read_exact(&mut bytes).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| format(SafeTensorError::InvalidHeader(e).to_string()))?;
    let json: HeaderJson = serde_json::from_str(text)
        .map_err(|e| format(SafeTensorError::InvalidHeaderDeserialization(e).to_string()))?;
    let mut tensors: Vec<(String, TensorInfo)> = json.tensors.into_iter().collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let metadata = Metadata::new(json.metadata, tensors).map_err(|e| format(e.to_string()))?;
    let data_start = 8 + n;
    let end = data_start + metadata.data_len() as u64;
    if end != file_len {
        let why = if end < file_len {
            format!("the tensors end at byte {end}, the file has {file_len} bytes")
        } else {
            // Name the first tensor whose bytes are not all there.
            let cut = metadata
                .offset_keys()
                .into_iter()
                .find(|name| {
                    metadata
                        .info(name)
                        .is_some_and(|i| data_start + i.data_offsets.1 as u64 > file_len)
                })
                .unwrap_or_default();
            format!(
                "tensor `{cut}` ends past the end of the file ({file_len} bytes; \
                 the tensors need {end}): is the file truncated?"
            )
        };
        return Err(format(format!(
            "{}: {why}",
            SafeTensorError::MetadataIncompleteBuffer
        )));
    }
    Ok((data_start, metadata))
}

/// Element types `read_le_values` reads straight into their storage.
///
/// # Safety
///
/// Implementors have no padding and every bit pattern is a valid value, so
/// their storage may be written as bytes.
pub(super) unsafe trait LeValue: Copy {
    /// The value from its little-endian representation.
    fn le_to_native(self) -> Self;
}

// SAFETY: u64 is 8 bytes, no padding, every bit pattern valid.
unsafe impl LeValue for u64 {
    fn le_to_native(self) -> Self {
        u64::from_le(self)
    }
}

// SAFETY: i64 is 8 bytes, no padding, every bit pattern valid.
unsafe impl LeValue for i64 {
    fn le_to_native(self) -> Self {
        i64::from_le(self)
    }
}

// SAFETY: f32 is 4 bytes, no padding, every bit pattern a value (NaNs
// included; the caller checks finiteness).
unsafe impl LeValue for f32 {
    fn le_to_native(self) -> Self {
        f32::from_bits(u32::from_le(self.to_bits()))
    }
}

/// Fills `out` with the little-endian values at `offset` in `file`, read in
/// chunks straight into `out`'s bytes (a no-op conversion on little-endian
/// hosts).
pub(super) fn read_le_values<T: LeValue>(
    file: &mut std::fs::File,
    offset: u64,
    out: &mut [T],
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    for chunk in out.chunks_mut(READ_CHUNK_BYTES / std::mem::size_of::<T>()) {
        // SAFETY: `T: LeValue` has no padding and no invalid bit patterns, and
        // the byte slice covers exactly `chunk`'s storage, borrowed mutably.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                chunk.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(chunk),
            )
        };
        file.read_exact(bytes)?;
        if cfg!(target_endian = "big") {
            chunk.iter_mut().for_each(|v| *v = v.le_to_native());
        }
    }
    Ok(())
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
    fn embedding_writes_are_counted_per_row() {
        let mut t = ItemTable::new(2, vec![10, 20], vec![1.0, 0.0, 0.0, 1.0]).unwrap();
        assert_eq!((t.writes(), t.written_at(0), t.written_at(1)), (0, 0, 0));
        t.upsert(20, &[2.0, 2.0], 1);
        assert_eq!((t.writes(), t.written_at(0), t.written_at(1)), (1, 0, 1));
        // A stale write and a delete leave the embeddings, and the count, as
        // they were; a new row and a restore are writes.
        t.upsert(20, &[3.0, 3.0], 1);
        t.delete(10, 1);
        assert_eq!(t.writes(), 1);
        t.upsert(30, &[5.0, 5.0], 1);
        assert_eq!((t.writes(), t.written_at(2)), (2, 2));
        t.restore(10, &[4.0, 4.0], 2, true);
        assert_eq!((t.writes(), t.written_at(0)), (3, 3));
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let err = ItemTable::new(1, vec![1, 1], vec![0.0, 0.0]).unwrap_err();
        assert!(err.contains("item id 1 appears more than once"), "{err}");
    }

    /// Writes `tensors` with the safetensors crate to `dir/name`.
    fn write_safetensors(
        dir: &Path,
        name: &str,
        tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    ) -> std::path::PathBuf {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dtype, shape, data)| {
                let view =
                    safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
                (n.to_string(), view)
            })
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        path
    }

    fn le_bytes_u64(v: &[u64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A table file of three items, d = 2, with `emb` as its embeddings.
    fn three_items(dir: &Path, name: &str, emb: &[f32]) -> std::path::PathBuf {
        write_safetensors(
            dir,
            name,
            &[
                ("ids", Dtype::U64, vec![3], le_bytes_u64(&[30, 10, 20])),
                ("embeddings", Dtype::F32, vec![3, 2], le_bytes_f32(emb)),
            ],
        )
    }

    /// `load`'s error text, which must name the file.
    fn load_err(path: &Path, dim: usize) -> String {
        let err = ItemTable::load(path, dim).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        err
    }

    #[test]
    fn load_reads_what_the_safetensors_crate_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let emb = [0.5, -1.0, 2.25, 0.0, -0.125, 3.0e-5];
        let path = three_items(dir.path(), "items.safetensors", &emb);
        let t = ItemTable::load(&path, 2).unwrap();
        assert_eq!(t.ids(), &[30, 10, 20]);
        assert_eq!(t.embeddings(), &emb);
        assert_eq!(t.row_of(10), Some(1));
        assert_eq!(t.live_count(), 3);
        // Metadata and other tensors beside ours are fine, as before.
        let path = write_safetensors(
            dir.path(),
            "more.safetensors",
            &[
                ("ids", Dtype::U64, vec![1], le_bytes_u64(&[7])),
                (
                    "embeddings",
                    Dtype::F32,
                    vec![1, 2],
                    le_bytes_f32(&[1.0, 2.0]),
                ),
                ("extra", Dtype::U8, vec![3], vec![1, 2, 3]),
            ],
        );
        let t = ItemTable::load(&path, 2).unwrap();
        assert_eq!((t.ids(), t.embeddings()), (&[7u64][..], &[1.0f32, 2.0][..]));
    }

    #[test]
    fn load_matches_the_safetensors_crate_on_a_larger_table() {
        // 40,000 rows of d = 64: the embeddings span two read chunks.
        let (n, d) = (40_000, 64);
        assert!(n * d * 4 > READ_CHUNK_BYTES);
        let mut rng = crate::model::demo::Rng::new(7);
        let ids: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
        let emb: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "items.safetensors",
            &[
                ("embeddings", Dtype::F32, vec![n, d], le_bytes_f32(&emb)),
                ("ids", Dtype::U64, vec![n], le_bytes_u64(&ids)),
            ],
        );
        // What the loader read before: the whole file through SafeTensors.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let st_ids: Vec<u64> = st
            .tensor("ids")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let st_emb: Vec<f32> = st
            .tensor("embeddings")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let t = ItemTable::load(&path, d).unwrap();
        assert_eq!((t.ids(), t.embeddings()), (&st_ids[..], &st_emb[..]));
        assert_eq!((t.ids(), t.embeddings()), (&ids[..], &emb[..]));
    }

    #[test]
    fn load_refuses_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = three_items(dir.path(), "items.safetensors", &[0.0; 6]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 4);
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&path, 2);
        assert!(
            err.contains("incomplete metadata") && err.contains("tensor `embeddings`"),
            "{err}"
        );
        // Cut inside the ids (which come first in the file): they are named.
        bytes.truncate(bytes.len() - 6 * 4);
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&path, 2);
        assert!(err.contains("tensor `ids`"), "{err}");
        // Shorter than the length field.
        std::fs::write(&path, [1u8, 0, 0]).unwrap();
        assert!(load_err(&path, 2).contains("header too small"));
        // Bytes past the tensors' end.
        let path = three_items(dir.path(), "long.safetensors", &[0.0; 6]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0; 8]);
        std::fs::write(&path, &bytes).unwrap();
        assert!(load_err(&path, 2).contains("incomplete metadata"));
    }

    #[test]
    fn load_refuses_a_wrong_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_safetensors(
            dir.path(),
            "ids.safetensors",
            &[
                ("ids", Dtype::U32, vec![2], vec![0; 8]),
                (
                    "embeddings",
                    Dtype::F32,
                    vec![2, 2],
                    le_bytes_f32(&[0.0; 4]),
                ),
            ],
        );
        let err = load_err(&path, 2);
        assert!(
            err.contains("tensor `ids` has dtype U32, expected U64"),
            "{err}"
        );
        let path = write_safetensors(
            dir.path(),
            "emb.safetensors",
            &[
                ("ids", Dtype::U64, vec![2], le_bytes_u64(&[1, 2])),
                ("embeddings", Dtype::F64, vec![2, 2], vec![0; 32]),
            ],
        );
        let err = load_err(&path, 2);
        assert!(
            err.contains("tensor `embeddings` has dtype F64, expected F32"),
            "{err}"
        );
    }

    #[test]
    fn load_refuses_a_wrong_shape_or_a_missing_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = three_items(dir.path(), "items.safetensors", &[0.0; 6]);
        let err = load_err(&path, 3);
        assert!(
            err.contains("tensor `embeddings` has shape [3, 2], expected [3, 3]"),
            "{err}"
        );
        let path = write_safetensors(
            dir.path(),
            "ids.safetensors",
            &[
                ("ids", Dtype::U64, vec![2, 1], le_bytes_u64(&[1, 2])),
                (
                    "embeddings",
                    Dtype::F32,
                    vec![2, 1],
                    le_bytes_f32(&[0.0; 2]),
                ),
            ],
        );
        let err = load_err(&path, 1);
        assert!(
            err.contains("tensor `ids` has shape [2, 1], expected [N]"),
            "{err}"
        );
        let path = write_safetensors(
            dir.path(),
            "missing.safetensors",
            &[("ids", Dtype::U64, vec![1], le_bytes_u64(&[1]))],
        );
        let err = load_err(&path, 1);
        assert!(err.contains("tensor `embeddings` is missing"), "{err}");
    }

    #[test]
    fn load_refuses_non_finite_values_and_duplicate_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = three_items(
            dir.path(),
            "nan.safetensors",
            &[0.0, 1.0, 2.0, 3.0, f32::NAN, 5.0],
        );
        let err = load_err(&path, 2);
        assert!(
            err.contains("tensor `embeddings`: element 4 is NaN, values must be finite"),
            "{err}"
        );
        let path = three_items(
            dir.path(),
            "inf.safetensors",
            &[0.0, f32::NEG_INFINITY, 2.0, 3.0, 4.0, 5.0],
        );
        let err = load_err(&path, 2);
        assert!(err.contains("element 1 is -inf"), "{err}");
        let path = write_safetensors(
            dir.path(),
            "dup.safetensors",
            &[
                ("ids", Dtype::U64, vec![2], le_bytes_u64(&[4, 4])),
                (
                    "embeddings",
                    Dtype::F32,
                    vec![2, 1],
                    le_bytes_f32(&[0.0; 2]),
                ),
            ],
        );
        let err = load_err(&path, 1);
        assert!(
            err.contains("tensor `ids`: item id 4 appears more than once"),
            "{err}"
        );
    }

    #[test]
    fn load_refuses_a_header_past_the_end_or_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let path = three_items(dir.path(), "items.safetensors", &[0.0; 6]);
        let mut bytes = std::fs::read(&path).unwrap();
        let past = bytes.len() as u64; // more than follows the length field
        bytes[..8].copy_from_slice(&past.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&path, 2);
        assert!(err.contains("invalid header length"), "{err}");
        bytes[..8].copy_from_slice(&200_000_000u64.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&path, 2);
        assert!(
            err.contains("header too large: 200000000 bytes, at most 100000000"),
            "{err}"
        );
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(load_err(&path, 2).contains("header too large"));
        // A header that is not JSON.
        let mut bad = 4u64.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{{{{");
        std::fs::write(&path, &bad).unwrap();
        assert!(load_err(&path, 2).contains("invalid JSON in header"));
    }
}
