//! The demo repository: a `two_tower` model `demo` and a `ranker` model
//! `demo-ranker` over one catalogue of 100,000 items in 50 clusters (or of
//! any number of items, drawn the same way, for `rankd models generate --items`).
//!
//! Every byte comes from a fixed seed through integer arithmetic and IEEE
//! add/multiply/sqrt only (no libm transcendental functions), so the files are
//! identical on every machine. The weights are built, not trained, to act like a
//! trained model: the two-tower query is (close to) the user's history mean, so a
//! user who engaged with cluster c gets cluster-c items back; the ranker's logit
//! rises with the dot product between the history mean and the candidate.

use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::Dtype;

use super::ModelError;

pub const DEMO_SEED: u64 = 20_261_127;
pub const ITEMS: usize = 100_000;
pub const CLUSTERS: usize = 50;
pub const DIM: usize = 64;
pub const USER_FEATURE_DIM: usize = 16;
pub const HISTORY_LEN: usize = 50;
const TWO_TOWER_HIDDEN: usize = 128;
const RANKER_HIDDEN: usize = 32;

/// Catalogue folder, relative to the repository root.
pub const CATALOGUE_DIR: &str = "catalogues/demo";

pub fn two_tower_toml(seed: u64) -> String {
    format!(
        r#"# The bundled demo retrieval model. Weight files are generated from `demo.seed`
# on first start (or by `rankd models generate`) when they are missing.
kind = "two_tower"
dim = {DIM}
user_feature_dim = {USER_FEATURE_DIM}
history_len = {HISTORY_LEN}
items = "../../{CATALOGUE_DIR}/items.safetensors"
weights = "weights.safetensors"

[batching]
max_batch_size = 64
max_queue_delay_us = 500
max_queue_size = 1024

[limits]
max_k = 1000
max_items = 1000
max_exclude = 10000

[demo]
seed = {seed}
"#
    )
}

pub fn ranker_toml(seed: u64) -> String {
    format!(
        r#"# The bundled demo ranking model, over the same catalogue as `demo`.
kind = "ranker"
dim = {DIM}
user_feature_dim = {USER_FEATURE_DIM}
history_len = {HISTORY_LEN}
items = "../../{CATALOGUE_DIR}/items.safetensors"
weights = "weights.safetensors"

[batching]
max_batch_size = 256
max_queue_delay_us = 500
max_queue_size = 1024

[limits]
max_k = 1000
max_items = 1000
max_exclude = 10000

[demo]
seed = {seed}
"#
    )
}

/// SplitMix64: small, fast and fully specified.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Approximately standard normal (Irwin–Hall sum of 12 uniforms).
    pub fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
    }
}

fn normalize(v: &mut [f64]) {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The demo catalogue, drawn row by row so that a catalogue of millions of
/// items is never held whole: item ids (row order shuffled, ids 1..=N) first,
/// then each row's cluster and embedding, in row order. The draws for N =
/// [`ITEMS`] are the bundled catalogue's.
struct CatalogueRows {
    rng: Rng,
    centers: Vec<Vec<f64>>,
    noise_scale: f64,
    e: Vec<f64>,
}

impl CatalogueRows {
    /// The row order's item ids, and the rows to draw in that order.
    fn new(seed: u64, items: usize) -> (Vec<u64>, Self) {
        let mut rng = Rng::new(seed);
        let centers: Vec<Vec<f64>> = (0..CLUSTERS)
            .map(|_| {
                let mut c: Vec<f64> = (0..DIM).map(|_| rng.normal()).collect();
                normalize(&mut c);
                c
            })
            .collect();
        let mut ids: Vec<u64> = (1..=items as u64).collect();
        for i in (1..ids.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            ids.swap(i, j);
        }
        let rows = Self {
            rng,
            centers,
            noise_scale: 0.5 / (DIM as f64).sqrt(),
            e: vec![0f64; DIM],
        };
        (ids, rows)
    }

    /// Draws the next row: appends its embedding to `out`, returns its cluster.
    fn next_row(&mut self, out: &mut Vec<f32>) -> u32 {
        let c = self.rng.below(CLUSTERS as u64) as usize;
        for (x, center) in self.e.iter_mut().zip(&self.centers[c]) {
            *x = center + self.noise_scale * self.rng.normal();
        }
        normalize(&mut self.e);
        let popularity = 0.8 + 0.4 * self.rng.uniform();
        out.extend(self.e.iter().map(|x| (x * popularity) as f32));
        c as u32
    }
}

/// The items file's header (length and JSON) for `items` rows, as
/// `safetensors::serialize` writes it: `ids` (U64 [N]) then `embeddings`
/// (F32 [N, DIM]), the JSON padded with spaces to a multiple of 8 bytes.
fn items_header(items: usize) -> Vec<u8> {
    let ids_bytes = items * 8;
    let tensors = vec![
        (
            "ids".to_string(),
            TensorInfo {
                dtype: Dtype::U64,
                shape: vec![items],
                data_offsets: (0, ids_bytes),
            },
        ),
        (
            "embeddings".to_string(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: vec![items, DIM],
                data_offsets: (ids_bytes, ids_bytes + items * DIM * 4),
            },
        ),
    ];
    let metadata = Metadata::new(None, tensors).expect("offsets are built in order: this is a bug");
    let mut json = serde_json::to_string(&metadata)
        .expect("a header serializes")
        .into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out
}

/// Draws the catalogue of `items` items; writes its safetensors file to
/// `items_file` when given, row by row (memory: the ids and the clusters,
/// never the embeddings), and returns each item's cluster, indexed by id − 1.
fn write_catalogue(
    seed: u64,
    items: usize,
    mut items_file: Option<&mut dyn Write>,
) -> std::io::Result<Vec<u32>> {
    let (ids, mut rows) = CatalogueRows::new(seed, items);
    if let Some(w) = items_file.as_mut() {
        w.write_all(&items_header(items))?;
        for id in &ids {
            w.write_all(&id.to_le_bytes())?;
        }
    }
    let mut clusters = vec![0u32; items];
    let mut row = Vec::with_capacity(DIM);
    let mut bytes = Vec::with_capacity(DIM * 4);
    for &id in &ids {
        row.clear();
        clusters[(id - 1) as usize] = rows.next_row(&mut row);
        if let Some(w) = items_file.as_mut() {
            bytes.clear();
            bytes.extend(row.iter().flat_map(|x| x.to_le_bytes()));
            w.write_all(&bytes)?;
        }
    }
    Ok(clusters)
}

struct Linear {
    out_dim: usize,
    in_dim: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Linear {
    fn noise(out_dim: usize, in_dim: usize, scale: f64, rng: &mut Rng) -> Self {
        Self {
            out_dim,
            in_dim,
            weight: (0..out_dim * in_dim)
                .map(|_| (scale * rng.normal()) as f32)
                .collect(),
            bias: vec![0.0; out_dim],
        }
    }
    fn add(&mut self, out: usize, inp: usize, value: f32) {
        self.weight[out * self.in_dim + inp] += value;
    }
}

/// x = [h ‖ f] → 128 → ReLU → 64: hidden units carry +h and −h, the output
/// layer recombines them, so q ≈ h plus a little of the features and noise.
fn two_tower_layers(seed: u64) -> Vec<Linear> {
    let mut rng = Rng::new(seed ^ 0x7770_7477_0000_0001);
    let input = DIM + USER_FEATURE_DIM;
    let mut l0 = Linear::noise(TWO_TOWER_HIDDEN, input, 0.01, &mut rng);
    for j in 0..DIM {
        l0.add(j, j, 1.0);
        l0.add(DIM + j, j, -1.0);
    }
    for (f, j) in (DIM..input).zip(0..) {
        l0.add(j % DIM, f, 0.05);
    }
    let mut l1 = Linear::noise(DIM, TWO_TOWER_HIDDEN, 0.01, &mut rng);
    for j in 0..DIM {
        l1.add(j, j, 1.0);
        l1.add(j, DIM + j, -1.0);
    }
    vec![l0, l1]
}

/// x = [h ‖ f ‖ e ‖ h⊙e] → 32 → ReLU → 1: two hidden units read ±Σ(h⊙e) = ±h·e,
/// the logit is about 8·(h·e) − 3.
fn ranker_layers(seed: u64) -> Vec<Linear> {
    let mut rng = Rng::new(seed ^ 0x7261_6e6b_0000_0002);
    let input = 3 * DIM + USER_FEATURE_DIM;
    let prod = 2 * DIM + USER_FEATURE_DIM;
    let mut l0 = Linear::noise(RANKER_HIDDEN, input, 0.02, &mut rng);
    for j in 0..DIM {
        l0.add(0, prod + j, 1.0);
        l0.add(1, prod + j, -1.0);
    }
    let mut l1 = Linear::noise(1, RANKER_HIDDEN, 0.02, &mut rng);
    l1.add(0, 0, 8.0);
    l1.add(0, 1, -8.0);
    l1.bias[0] = -3.0;
    vec![l0, l1]
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// concurrent reader (or a second generator) never sees a partial file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] with the bytes streamed by `write` (through a buffer).
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), ModelError> {
    let dir = path.parent().expect("generated files live in a folder");
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().expect("a file name").to_string_lossy(),
        std::process::id()
    ));
    let f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    write(&mut w).map_err(|e| io_err(&tmp, e))?;
    let f = w.into_inner().map_err(|e| io_err(&tmp, e.error()))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn safetensors_bytes(tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = TensorView::new(*dtype, shape.clone(), data)
                .expect("shapes are built to match the data: this is a bug");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).expect("serializing in-memory tensors")
}

fn tower_bytes(layers: &[Linear]) -> Vec<u8> {
    let mut tensors = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        tensors.push((
            format!("tower.{i}.weight"),
            Dtype::F32,
            vec![l.out_dim, l.in_dim],
            f32_bytes(&l.weight),
        ));
        tensors.push((
            format!("tower.{i}.bias"),
            Dtype::F32,
            vec![l.out_dim],
            f32_bytes(&l.bias),
        ));
    }
    safetensors_bytes(tensors)
}

/// Files the demo repository consists of, relative to its root.
pub fn files() -> [PathBuf; 7] {
    [
        PathBuf::from("demo/1/model.toml"),
        PathBuf::from("demo/1/weights.safetensors"),
        PathBuf::from("demo-ranker/1/model.toml"),
        PathBuf::from("demo-ranker/1/weights.safetensors"),
        Path::new(CATALOGUE_DIR).join("items.safetensors"),
        Path::new(CATALOGUE_DIR).join("clusters.csv"),
        Path::new(CATALOGUE_DIR).join("README.md"),
    ]
}

/// Writes whichever demo files are missing under `root` and returns the ones
/// written. Existing files (an edited model.toml, say) are left alone.
pub fn generate(root: &Path, seed: u64) -> Result<Vec<PathBuf>, ModelError> {
    generate_items(root, seed, ITEMS)
}

/// [`generate`] with a catalogue of `items` items (ids 1..=items) drawn the
/// same way; `items` = [`ITEMS`] writes the bundled demo's bytes.
pub fn generate_items(root: &Path, seed: u64, items: usize) -> Result<Vec<PathBuf>, ModelError> {
    let missing: Vec<PathBuf> = files()
        .into_iter()
        .filter(|f| !root.join(f).exists())
        .collect();
    let wants = |name: &str| missing.iter().any(|m| m.to_string_lossy().ends_with(name));
    let mut written = Vec::new();
    let mut put = |rel: &Path, bytes: &[u8]| -> Result<(), ModelError> {
        if missing.iter().any(|m| m == rel) {
            write_atomic(&root.join(rel), bytes)?;
            written.push(rel.to_path_buf());
        }
        Ok(())
    };
    put(
        Path::new("demo/1/model.toml"),
        two_tower_toml(seed).as_bytes(),
    )?;
    put(
        Path::new("demo-ranker/1/model.toml"),
        ranker_toml(seed).as_bytes(),
    )?;
    put(
        Path::new("demo/1/weights.safetensors"),
        &tower_bytes(&two_tower_layers(seed)),
    )?;
    put(
        Path::new("demo-ranker/1/weights.safetensors"),
        &tower_bytes(&ranker_layers(seed)),
    )?;
    if wants("items.safetensors") || wants("clusters.csv") || wants("README.md") {
        let dir = Path::new(CATALOGUE_DIR);
        let items_rel = dir.join("items.safetensors");
        let clusters = if missing.contains(&items_rel) {
            let mut clusters = Vec::new();
            write_atomic_with(&root.join(&items_rel), |w| {
                clusters = write_catalogue(seed, items, Some(w))?;
                Ok(())
            })?;
            written.push(items_rel);
            clusters
        } else {
            write_catalogue(seed, items, None).map_err(|e| io_err(root, e))?
        };
        let csv_rel = dir.join("clusters.csv");
        if missing.contains(&csv_rel) {
            write_atomic_with(&root.join(&csv_rel), |w| {
                w.write_all(b"item_id,cluster\n")?;
                for (id, c) in (1u64..).zip(&clusters) {
                    writeln!(w, "{id},{c}")?;
                }
                Ok(())
            })?;
            written.push(csv_rel);
        }
        let readme = format!(
            "Demo catalogue generated by rankd from seed {seed}: {items} items, d = {DIM}, \
             {CLUSTERS} clusters.\nclusters.csv maps each item id to its cluster.\n"
        );
        let readme_rel = dir.join("README.md");
        if missing.contains(&readme_rel) {
            write_atomic(&root.join(&readme_rel), readme.as_bytes())?;
            written.push(readme_rel);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_fixed() {
        // Pinned outputs: a change here changes every demo file.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn committed_model_tomls_match_the_generator() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let tt = std::fs::read_to_string(root.join("demo/1/model.toml")).unwrap();
        let rk = std::fs::read_to_string(root.join("demo-ranker/1/model.toml")).unwrap();
        assert_eq!(tt, two_tower_toml(DEMO_SEED));
        assert_eq!(rk, ranker_toml(DEMO_SEED));
    }

    #[test]
    fn tower_files_are_reproducible() {
        assert_eq!(
            tower_bytes(&two_tower_layers(DEMO_SEED)),
            tower_bytes(&two_tower_layers(DEMO_SEED))
        );
        assert_ne!(
            tower_bytes(&ranker_layers(DEMO_SEED)),
            tower_bytes(&ranker_layers(DEMO_SEED + 1))
        );
    }

    #[test]
    fn the_streamed_items_file_is_what_safetensors_serialize_writes() {
        for items in [0, 1, 1000] {
            let mut streamed = Vec::new();
            let clusters = write_catalogue(DEMO_SEED, items, Some(&mut streamed)).unwrap();
            let (ids, mut rows) = CatalogueRows::new(DEMO_SEED, items);
            let mut emb = Vec::new();
            let mut by_id = vec![0u32; items];
            for &id in &ids {
                by_id[(id - 1) as usize] = rows.next_row(&mut emb);
            }
            let ids_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
            let whole = safetensors_bytes(vec![
                ("ids".into(), Dtype::U64, vec![items], ids_bytes),
                (
                    "embeddings".into(),
                    Dtype::F32,
                    vec![items, DIM],
                    f32_bytes(&emb),
                ),
            ]);
            assert!(streamed == whole, "{items} items: the bytes differ");
            assert_eq!(clusters, by_id);
        }
    }

    #[test]
    fn generate_items_writes_a_catalogue_of_that_size() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate_items(dir.path(), DEMO_SEED, 500).unwrap();
        assert_eq!(written.len(), files().len());
        let cat = dir.path().join(CATALOGUE_DIR);
        let table = crate::model::ItemTable::load(&cat.join("items.safetensors"), DIM).unwrap();
        assert_eq!(table.rows(), 500);
        let mut ids = table.ids().to_vec();
        ids.sort_unstable();
        assert_eq!(ids, (1..=500).collect::<Vec<u64>>());
        let csv = std::fs::read_to_string(cat.join("clusters.csv")).unwrap();
        assert_eq!(csv.lines().count(), 501);
        assert!(csv.starts_with("item_id,cluster\n1,"));
        let readme = std::fs::read_to_string(cat.join("README.md")).unwrap();
        assert!(readme.contains(": 500 items, d = 64"), "{readme}");
        // A missing clusters.csv alone is drawn again, the same.
        std::fs::remove_file(cat.join("clusters.csv")).unwrap();
        let written = generate_items(dir.path(), DEMO_SEED, 500).unwrap();
        assert_eq!(written, vec![Path::new(CATALOGUE_DIR).join("clusters.csv")]);
        assert_eq!(
            std::fs::read_to_string(cat.join("clusters.csv")).unwrap(),
            csv
        );
    }
}
