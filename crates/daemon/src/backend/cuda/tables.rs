//! The device mirror of an item table (ids, embeddings in the table dtype,
//! live mask, integer attribute columns for filters) and the grow-only
//! device buffers batches are staged in.
//! Embeddings are stored row-padded to `padded_dim(d)` elements so every row
//! is 16-byte aligned for the fused kernel's vector loads.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

use super::error::{Ctx, GpuError};
use super::kernels::Kernels;
use super::plan::padded_dim;
use super::staging::Staged;
use crate::model::ItemTable;

/// How a resident item table stores its embeddings (`item_dtype` in
/// model.toml). Scores are always accumulated in f32; the dtype only sets what
/// is read from memory.
pub use crate::model::ItemDtype;

impl ItemDtype {
    pub const ALL: [ItemDtype; 3] = [ItemDtype::F32, ItemDtype::F16, ItemDtype::Bf16];

    pub fn bytes(self) -> usize {
        match self {
            ItemDtype::F32 => 4,
            ItemDtype::F16 | ItemDtype::Bf16 => 2,
        }
    }

    /// Suffix of the kernels instantiated for this dtype.
    pub fn name(self) -> &'static str {
        match self {
            ItemDtype::F32 => "f32",
            ItemDtype::F16 => "f16",
            ItemDtype::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Option<ItemDtype> {
        ItemDtype::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The value the device table holds for `v` (round to nearest even).
    pub fn quantize(self, v: f32) -> f32 {
        match self {
            ItemDtype::F32 => v,
            ItemDtype::F16 => f16::from_f32(v).to_f32(),
            ItemDtype::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }
}

/// Appends rows `src` ([rows, d] f32) in the device layout: converted to
/// `dtype`, each row padded with zeros to `ld` elements, little-endian bytes.
pub fn encode_rows(dtype: ItemDtype, src: &[f32], d: usize, ld: usize, out: &mut Vec<u8>) {
    for row in src.chunks_exact(d.max(1)) {
        for v in row.iter().copied().chain(std::iter::repeat_n(0.0, ld - d)) {
            match dtype {
                ItemDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                ItemDtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
                ItemDtype::Bf16 => {
                    out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
                }
            }
        }
    }
}

/// Inverse of `encode_rows`: device bytes back to [rows, d] f32.
pub fn decode_rows(dtype: ItemDtype, bytes: &[u8], d: usize, ld: usize) -> Vec<f32> {
    let es = dtype.bytes();
    let mut out = Vec::with_capacity(bytes.len() / es / ld.max(1) * d);
    for row in bytes.chunks_exact(ld * es) {
        for c in 0..d {
            let b = &row[c * es..(c + 1) * es];
            out.push(match dtype {
                ItemDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                ItemDtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                ItemDtype::Bf16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            });
        }
    }
    out
}

/// A device buffer reused across batches; grows by half again when short.
pub struct Buf<T> {
    slice: Option<CudaSlice<T>>,
}

impl<T> Default for Buf<T> {
    fn default() -> Self {
        Self { slice: None }
    }
}

impl<T: DeviceRepr> Buf<T> {
    /// At least `len` elements (never zero, so kernels always get a valid
    /// pointer); contents are unspecified.
    pub fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        len: usize,
    ) -> Result<&mut CudaSlice<T>, GpuError> {
        let need = len.max(1);
        if self.slice.as_ref().is_none_or(|s| s.len() < need) {
            self.slice = None; // free first: the old buffer may be most of memory
                               // SAFETY: every kernel reads only the prefix the batch wrote.
            let s =
                unsafe { stream.alloc::<T>(need + need / 2) }.ctx("allocating a batch buffer")?;
            self.slice = Some(s);
        }
        Ok(self.slice.as_mut().expect("allocated just above"))
    }

    /// Copies `data` to the front of the buffer.
    pub fn upload(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> Result<(), GpuError> {
        let s = self.reserve(stream, data.len())?;
        if !data.is_empty() {
            stream
                .memcpy_htod(data, &mut s.slice_mut(..data.len()))
                .ctx("copying a batch to the device")?;
        }
        Ok(())
    }

    pub fn get(&self) -> &CudaSlice<T> {
        self.slice
            .as_ref()
            .expect("buffer reserved before use: this is a bug")
    }

    pub fn get_mut(&mut self) -> &mut CudaSlice<T> {
        self.slice
            .as_mut()
            .expect("buffer reserved before use: this is a bug")
    }
}

/// Host rows converted per upload step: bounds the staging copy for tables
/// of tens of millions of rows.
const UPLOAD_BYTES: usize = 32 << 20;

/// A device table read back: (ids, live flags, embeddings [rows, d]).
pub type TableCopy = (Vec<u64>, Vec<u8>, Vec<f32>);

pub struct DeviceTable {
    pub dtype: ItemDtype,
    pub dim: usize,
    /// Row stride in elements.
    pub ld: usize,
    /// Rows mirrored from the host table.
    pub rows: usize,
    pub cap: usize,
    pub ids: CudaSlice<u64>,
    pub live: CudaSlice<u8>,
    /// [cap, ld] elements of `dtype`, as raw bytes.
    pub emb: CudaSlice<u8>,
    /// The catalogue's attribute columns, [n_attrs][cap] (one element when
    /// it has none, so the fused kernel always gets a valid pointer).
    pub attrs: CudaSlice<i64>,
    pub n_attrs: usize,
    scatter: ScatterBufs,
}

/// An update batch's rows, staged in page-locked memory like batch inputs.
#[derive(Default)]
struct ScatterBufs {
    rows: Staged<u32>,
    src: Staged<f32>,
    live: Staged<u8>,
    ids: Staged<u64>,
    /// [rows, n_attrs] attribute values of the batch's rows.
    attrs: Staged<i64>,
}

impl DeviceTable {
    /// Uploads `items` with room to grow.
    pub fn upload(
        stream: &Arc<CudaStream>,
        items: &ItemTable,
        dtype: ItemDtype,
    ) -> Result<Self, GpuError> {
        let (n, d) = (items.rows(), items.dim());
        let ld = padded_dim(d);
        let cap = n + (n / 16).max(1024);
        let row_bytes = ld * dtype.bytes();
        let mut emb = stream
            .alloc_zeros::<u8>(cap * row_bytes)
            .ctx("allocating the item table")?;
        let mut ids = stream
            .alloc_zeros::<u64>(cap)
            .ctx("allocating the item table")?;
        let mut live = stream
            .alloc_zeros::<u8>(cap)
            .ctx("allocating the item table")?;
        let step = (UPLOAD_BYTES / row_bytes).max(1);
        let mut staging = Vec::with_capacity(step * row_bytes);
        for start in (0..n).step_by(step) {
            let end = (start + step).min(n);
            staging.clear();
            encode_rows(
                dtype,
                &items.embeddings()[start * d..end * d],
                d,
                ld,
                &mut staging,
            );
            stream
                .memcpy_htod(
                    &staging,
                    &mut emb.slice_mut(start * row_bytes..end * row_bytes),
                )
                .ctx("uploading the item table")?;
        }
        if n > 0 {
            stream
                .memcpy_htod(items.ids(), &mut ids.slice_mut(..n))
                .ctx("uploading item ids")?;
            let mask: Vec<u8> = items.live_mask().iter().map(|&l| u8::from(l)).collect();
            stream
                .memcpy_htod(&mask, &mut live.slice_mut(..n))
                .ctx("uploading the live mask")?;
        }
        let n_attrs = items.attributes().names().len();
        let mut attrs = stream
            .alloc_zeros::<i64>((n_attrs * cap).max(1))
            .ctx("allocating the attribute columns")?;
        for a in (0..n_attrs).filter(|_| n > 0) {
            stream
                .memcpy_htod(
                    items.attributes().column(a),
                    &mut attrs.slice_mut(a * cap..a * cap + n),
                )
                .ctx("uploading the attribute columns")?;
        }
        stream.synchronize().ctx("uploading the item table")?;
        Ok(Self {
            dtype,
            dim: d,
            ld,
            rows: n,
            cap,
            ids,
            live,
            emb,
            attrs,
            n_attrs,
            scatter: ScatterBufs::default(),
        })
    }

    /// `rows` uniform random rows in [-1, 1) made on the device (ids are
    /// the row numbers, all live): a benchmark table with no host upload.
    pub fn synthetic(
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        rows: usize,
        dim: usize,
        dtype: ItemDtype,
        seed: u64,
    ) -> Result<Self, GpuError> {
        let ld = padded_dim(dim);
        let cap = rows.max(1);
        // SAFETY: all three are filled completely by the launches below.
        let (mut emb, mut ids, mut live) = unsafe {
            (
                stream
                    .alloc::<u8>(cap * ld * dtype.bytes())
                    .ctx("allocating a benchmark table")?,
                stream
                    .alloc::<u64>(cap)
                    .ctx("allocating a benchmark table")?,
                stream
                    .alloc::<u8>(cap)
                    .ctx("allocating a benchmark table")?,
            )
        };
        let blocks = |n: usize| LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ld32, d32, n64, scale, one, zero) =
            (ld as u32, dim as u32, cap as u64, 1.0f32, 1u32, 0u64);
        // SAFETY: argument lists match fill_uniform_*, iota_u64 and fill_u8 in
        // scatter.cu; each buffer holds `cap` rows.
        unsafe {
            stream
                .launch_builder(&kernels.fill_uniform[dtype.index()])
                .arg(&mut emb)
                .arg(&ld32)
                .arg(&d32)
                .arg(&n64)
                .arg(&seed)
                .arg(&scale)
                .launch(blocks(cap * ld))
                .ctx("fill_uniform launch")?;
            stream
                .launch_builder(&kernels.iota_u64)
                .arg(&mut ids)
                .arg(&n64)
                .arg(&zero)
                .launch(blocks(cap))
                .ctx("iota_u64 launch")?;
            stream
                .launch_builder(&kernels.fill_u8)
                .arg(&mut live)
                .arg(&n64)
                .arg(&one)
                .launch(blocks(cap))
                .ctx("fill_u8 launch")?;
        }
        let attrs = stream
            .alloc_zeros::<i64>(1)
            .ctx("allocating a benchmark table")?;
        stream.synchronize().ctx("building a benchmark table")?;
        Ok(Self {
            dtype,
            dim,
            ld,
            rows,
            cap,
            ids,
            live,
            emb,
            attrs,
            n_attrs: 0,
            scatter: ScatterBufs::default(),
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.ld * self.dtype.bytes()
    }

    /// Bytes of embeddings the fused kernel reads per pass.
    pub fn embedding_bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// Makes room for `rows`, keeping the contents (×1.5 headroom).
    fn grow(&mut self, stream: &Arc<CudaStream>, rows: usize) -> Result<(), GpuError> {
        if rows <= self.cap {
            return Ok(());
        }
        let cap = rows.max(self.cap + self.cap / 2);
        let rb = self.row_bytes();
        let mut emb = stream
            .alloc_zeros::<u8>(cap * rb)
            .ctx("growing the item table")?;
        let mut ids = stream
            .alloc_zeros::<u64>(cap)
            .ctx("growing the item table")?;
        let mut live = stream
            .alloc_zeros::<u8>(cap)
            .ctx("growing the item table")?;
        let mut attrs = stream
            .alloc_zeros::<i64>((self.n_attrs * cap).max(1))
            .ctx("growing the attribute columns")?;
        if self.rows > 0 {
            for a in 0..self.n_attrs {
                let (from, to) = (a * self.cap, a * cap);
                stream
                    .memcpy_dtod(
                        &self.attrs.slice(from..from + self.rows),
                        &mut attrs.slice_mut(to..to + self.rows),
                    )
                    .ctx("growing the attribute columns")?;
            }
            stream
                .memcpy_dtod(
                    &self.emb.slice(..self.rows * rb),
                    &mut emb.slice_mut(..self.rows * rb),
                )
                .ctx("growing the item table")?;
            stream
                .memcpy_dtod(
                    &self.ids.slice(..self.rows),
                    &mut ids.slice_mut(..self.rows),
                )
                .ctx("growing the item table")?;
            stream
                .memcpy_dtod(
                    &self.live.slice(..self.rows),
                    &mut live.slice_mut(..self.rows),
                )
                .ctx("growing the item table")?;
        }
        tracing::info!(from = self.cap, to = cap, "device item table grown");
        (self.emb, self.ids, self.live, self.attrs, self.cap) = (emb, ids, live, attrs, cap);
        Ok(())
    }

    /// Brings `rows` (and any rows appended since the last call) in step with
    /// the host table in one scatter launch per 64k rows.
    pub fn apply(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        items: &ItemTable,
        rows: &[u32],
    ) -> Result<(), GpuError> {
        if items.dim() != self.dim {
            return Err(GpuError::Invalid(format!(
                "item table dim changed from {} to {}",
                self.dim,
                items.dim()
            )));
        }
        let n_attrs = items.attributes().names().len();
        if n_attrs != self.n_attrs {
            return Err(GpuError::Invalid(format!(
                "the catalogue's attributes changed from {} to {n_attrs}",
                self.n_attrs
            )));
        }
        let n = items.rows();
        self.grow(stream, n)?;
        let mut all: Vec<u32> = rows.iter().copied().filter(|&r| (r as usize) < n).collect();
        all.extend(self.rows as u32..n as u32);
        all.sort_unstable();
        all.dedup();
        let d = self.dim;
        for part in all.chunks(65_536) {
            let mut src = Vec::with_capacity(part.len() * d);
            for &r in part {
                src.extend_from_slice(items.embedding(r));
            }
            let live: Vec<u8> = part.iter().map(|&r| u8::from(items.is_live(r))).collect();
            let ids: Vec<u64> = part.iter().map(|&r| items.id(r)).collect();
            let b = &mut self.scatter;
            b.rows.upload(stream, part)?;
            b.src.upload(stream, &src)?;
            b.live.upload(stream, &live)?;
            b.ids.upload(stream, &ids)?;
            let (ld, d32, m) = (self.ld as u32, d as u32, part.len() as u32);
            let total = part.len() * self.ld;
            let cfg = LaunchConfig {
                grid_dim: (total.div_ceil(256).min(65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = &kernels.scatter_rows[self.dtype.index()];
            // SAFETY: argument list matches scatter_rows_* in scatter.cu; every
            // row is < cap (grown above) and the buffers hold `m` entries.
            unsafe {
                stream
                    .launch_builder(f)
                    .arg(&mut self.emb)
                    .arg(&ld)
                    .arg(&d32)
                    .arg(b.rows.get())
                    .arg(b.src.get())
                    .arg(&m)
                    .arg(&mut self.live)
                    .arg(b.live.get())
                    .arg(&mut self.ids)
                    .arg(b.ids.get())
                    .launch(cfg)
            }
            .ctx("scatter_rows launch")?;
            if n_attrs > 0 {
                let vals: Vec<i64> = part
                    .iter()
                    .flat_map(|&r| (0..n_attrs).map(move |a| (a, r)))
                    .map(|(a, r)| items.attributes().value(a, r as usize))
                    .collect();
                b.attrs.upload(stream, &vals)?;
                let (cap, na) = (self.cap as u64, n_attrs as u32);
                let cfg = LaunchConfig {
                    grid_dim: (vals.len().div_ceil(256).min(65_535) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument list matches scatter_attrs in scatter.cu;
                // rows are < cap and `vals` holds m × n_attrs values.
                unsafe {
                    stream
                        .launch_builder(&kernels.scatter_attrs)
                        .arg(&mut self.attrs)
                        .arg(&cap)
                        .arg(&na)
                        .arg(b.rows.get())
                        .arg(b.attrs.get())
                        .arg(&m)
                        .launch(cfg)
                }
                .ctx("scatter_attrs launch")?;
            }
        }
        self.rows = n;
        Ok(())
    }

    /// The whole mirror back on the host: (ids, live, embeddings [rows, d]).
    pub fn download(&self, stream: &Arc<CudaStream>) -> Result<TableCopy, GpuError> {
        let n = self.rows;
        if n == 0 {
            return Ok((Vec::new(), Vec::new(), Vec::new()));
        }
        let ids = stream
            .clone_dtoh(&self.ids.slice(..n))
            .ctx("reading the table back")?;
        let live = stream
            .clone_dtoh(&self.live.slice(..n))
            .ctx("reading the table back")?;
        let bytes = stream
            .clone_dtoh(&self.emb.slice(..n * self.row_bytes()))
            .ctx("reading the table back")?;
        stream.synchronize().ctx("reading the table back")?;
        Ok((
            ids,
            live,
            decode_rows(self.dtype, &bytes, self.dim, self.ld),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_the_device_layout() {
        let d = 5;
        let src: Vec<f32> = (0..3 * d).map(|i| (i as f32 - 7.3) * 0.137).collect();
        for dtype in ItemDtype::ALL {
            let ld = padded_dim(d);
            assert_eq!(ld, 8);
            let mut bytes = Vec::new();
            encode_rows(dtype, &src, d, ld, &mut bytes);
            assert_eq!(bytes.len(), 3 * ld * dtype.bytes());
            // Padding is zero bytes.
            assert!(bytes[d * dtype.bytes()..ld * dtype.bytes()]
                .iter()
                .all(|&b| b == 0));
            let back = decode_rows(dtype, &bytes, d, ld);
            let want: Vec<f32> = src.iter().map(|&v| dtype.quantize(v)).collect();
            assert_eq!(back, want, "{dtype:?}");
            for (v, q) in src.iter().zip(&back) {
                let tol = match dtype {
                    ItemDtype::F32 => 0.0,
                    ItemDtype::F16 => 1e-3,
                    ItemDtype::Bf16 => 8e-3,
                };
                assert!((v - q).abs() <= tol * v.abs(), "{dtype:?}: {v} -> {q}");
            }
        }
        assert_eq!(ItemDtype::parse("bf16"), Some(ItemDtype::Bf16));
        assert_eq!(ItemDtype::parse("f64"), None);
    }
}
