//! The CUDA backend: item tables resident on the GPU, towers through cuBLAS,
//! and retrieval through a fused score + top-k kernel that streams the table
//! once per batch. Every CUDA library is loaded at run time (cudarc's
//! dynamic loading), so `CudaBackend::new` on a host without a GPU returns a
//! one-line reason instead of failing to start.
//!
//! # Agreement with the CPU backend
//!
//! Outputs follow the CPU backend's semantics exactly: top-k lists best
//! first with equal scores ordered by the smaller item id, deleted and
//! excluded rows skipped, NaN scores never returned, score lists in request
//! order, ranker scores through a sigmoid. Values agree within rounding:
//!
//! - the history mean is bit-identical for an f32 table (same order of adds);
//! - towers use f32 SGEMM (no TF32): relative differences ~1e-6;
//! - scores are f32 dot products accumulated in a different order than the
//!   CPU's GEMM: ~1e-5 relative for an **f32** table. With an **f16** table
//!   the stored embeddings themselves are rounded (~1e-3 relative to the f32
//!   values), with **bf16** ~1e-2; against a CPU reference run on the same
//!   rounded values the difference stays ~1e-5. Near-ties closer than that
//!   may therefore swap places between backends; exact ties never do.
//! - bf16 tables are scored on tensor cores (sm_80+) with the f32 query
//!   split into two bf16 terms: within ~1e-5 relative of the f32 product.
//!
//! # Start-up check
//!
//! Before it serves, the backend runs the fused top-k kernels on a small
//! synthetic table against f64 results on the host (`selftest`): a CUDA-core
//! kernel that disagrees keeps the device out of service (the daemon serves
//! on the CPU, with the reason in `/readyz`); a tensor-core kernel that
//! disagrees is switched off.

pub mod error;
pub mod kernels;
pub mod kind;
pub mod libs;
pub mod mlp;
pub mod ops;
pub mod plan;
pub mod selftest;
pub mod staging;
pub mod tables;
pub mod telemetry;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaStream};

use self::error::{GpuError, OpenError, SelfTestError};
use self::kernels::{CacheKey, Kernels};
use self::kind::{DeviceKind, DeviceWeights};

use self::ops::{Dev, Scratch};
use self::plan::DeviceLimits;
use self::tables::DeviceTable;
pub use self::tables::ItemDtype;
use super::{
    Backend, BackendError, DeviceHealth, ModelDesc, ModelId, Output, Query, Reason, TableId,
};
use crate::model::{ItemTable, ModelKind, Weights};

/// What rankd reads about the device once, at start.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub cc: (i32, i32),
    pub sms: usize,
    pub smem_optin: usize,
    pub smem_per_sm: usize,
    pub total_mem: usize,
    /// As cuDriverGetVersion reports it: 13000 is CUDA 13.0.
    pub driver_version: i32,
    pub nvrtc: (i32, i32),
}

impl DeviceInfo {
    fn query(ctx: &Arc<CudaContext>, nvrtc: (i32, i32)) -> Result<Self, OpenError> {
        let e = |what: &'static str| {
            move |err: cudarc::driver::DriverError| OpenError::Query {
                what,
                message: err.to_string(),
            }
        };
        let attr = |a: CUdevice_attribute| ctx.attribute(a).map(|v| v.max(0) as usize);
        let mut driver_version = 0;
        // SAFETY: the driver is loaded (a context exists); plain out-parameter.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(e("driver version"))?;
        Ok(Self {
            ordinal: ctx.ordinal(),
            name: ctx.name().map_err(e("name"))?,
            cc: ctx.compute_capability().map_err(e("compute capability"))?,
            sms: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(e("SM count"))?,
            smem_optin: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(e("shared memory"))?,
            smem_per_sm: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_err(e("shared memory"))?,
            total_mem: ctx.total_mem().map_err(e("memory size"))?,
            driver_version,
            nvrtc,
        })
    }

    pub fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            sms: self.sms,
            smem_optin: self.smem_optin,
            smem_per_sm: self.smem_per_sm,
        }
    }

    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }
}

struct GpuModel {
    desc: ModelDesc,
    table: TableId,
    weights: DeviceWeights,
    /// The kind's buffer sizes and forward pass, looked up once at load.
    kind: &'static dyn DeviceKind,
}

/// The device parts every launch needs, kept apart from the backend's
/// mutable state so both can be borrowed at once.
struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    info: DeviceInfo,
    /// bf16 tables are scored on tensor cores (sm_80+, start-up check passed).
    tc: bool,
}

impl Gpu {
    fn dev(&self) -> Dev<'_> {
        Dev {
            stream: &self.stream,
            blas: &self.blas,
            k: &self.kernels,
            limits: self.info.limits(),
            tc: self.tc,
        }
    }
}

pub struct CudaBackend {
    device: String,
    ctx: Arc<CudaContext>,
    gpu: Gpu,
    item_dtype: ItemDtype,
    tables: HashMap<TableId, DeviceTable>,
    models: HashMap<ModelId, GpuModel>,
    scratch: Scratch,
    /// Set after an error that leaves the CUDA context unusable.
    broken: Option<String>,
}

/// The start-up check of the fused top-k kernels (see `selftest`).
#[derive(Debug)]
pub struct SelfTest {
    /// f32 and bf16 tables on CUDA cores.
    pub cuda_cores: Result<(), selftest::Failure>,
    /// bf16 on tensor cores; `None` before sm_80.
    pub tensor_cores: Option<Result<(), selftest::Failure>>,
}

impl SelfTest {
    fn run(
        stream: &Arc<CudaStream>,
        blas: &CudaBlas,
        kernels: &Kernels,
        info: &DeviceInfo,
        scratch: &mut Scratch,
    ) -> SelfTest {
        let dev = |tc| Dev {
            stream,
            blas,
            k: kernels,
            limits: info.limits(),
            tc,
        };
        let cuda_cores = [ItemDtype::F32, ItemDtype::Bf16]
            .into_iter()
            .try_for_each(|dtype| selftest::fused_topk(&dev(false), &mut scratch.topk, dtype));
        // A device fault may have left the context unusable: stop there.
        let faulted = matches!(cuda_cores, Err(selftest::Failure::Device(_)));
        let tensor_cores = (info.cc.0 >= 8 && !faulted)
            .then(|| selftest::fused_topk(&dev(true), &mut scratch.topk, ItemDtype::Bf16));
        SelfTest {
            cuda_cores,
            tensor_cores,
        }
    }

    /// What serving makes of it: an error when a CUDA-core kernel is wrong or
    /// the device faulted; otherwise whether the tensor-core kernel serves.
    fn verdict(&self) -> Result<bool, SelfTestError> {
        let failed = |kernel: &'static str, failure: &selftest::Failure| SelfTestError {
            kernel,
            failure: failure.clone(),
        };
        if let Err(e) = &self.cuda_cores {
            return Err(failed("fused top-k kernel (CUDA cores)", e));
        }
        match &self.tensor_cores {
            None => {
                tracing::info!(
                    "no bf16 tensor cores before sm_80: bf16 tables are scored on CUDA cores"
                );
                Ok(false)
            }
            Some(Ok(())) => Ok(true),
            // Wrong answers: the CUDA-core kernel, checked above, serves.
            Some(Err(selftest::Failure::Wrong(m))) => {
                tracing::warn!(error = %m, "the tensor-core top-k kernel disagrees with the host at start; bf16 tables are scored on CUDA cores");
                Ok(false)
            }
            // A fault may leave the context unusable: do not serve from it.
            Some(Err(e)) => Err(failed("tensor-core top-k kernel", e)),
        }
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`: checks that the driver, cuBLAS and NVRTC
    /// can be loaded, creates the context, stream and cuBLAS handle, and
    /// compiles (or loads cached) kernels. Never panics for a missing
    /// library or device; the error is one line saying which.
    pub fn new(ordinal: usize) -> Result<CudaBackend, OpenError> {
        Self::open_catching(ordinal, true).map(|(b, _)| b)
    }

    /// Opens the device for `rankd gpu-check`: the start-up check of the
    /// kernels is reported, not enforced, and the tensor-core kernel is on
    /// wherever the device has bf16 tensor cores, so the detailed checks can
    /// show what is wrong.
    pub fn new_for_check(ordinal: usize) -> Result<(CudaBackend, SelfTest), OpenError> {
        Self::open_catching(ordinal, false)
    }

    fn open_catching(ordinal: usize, strict: bool) -> Result<(CudaBackend, SelfTest), OpenError> {
        std::panic::catch_unwind(move || Self::open(ordinal, strict)).unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(OpenError::Panicked { ordinal, why })
        })
    }

    fn open(ordinal: usize, strict: bool) -> Result<(CudaBackend, SelfTest), OpenError> {
        if !libs::driver_present() {
            return Err(OpenError::NoDriver);
        }
        let count = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => {
                return Err(OpenError::DriverUnusable {
                    message: e.to_string(),
                })
            }
        };
        if ordinal >= count {
            return Err(OpenError::NoDevice { ordinal, count });
        }
        if !libs::cublas_present() {
            return Err(OpenError::NoCublas);
        }
        let nvrtc = kernels::nvrtc_version().map_err(OpenError::Nvrtc)?;
        let device = format!("cuda:{ordinal}");
        let setup = |step: &'static str| {
            let device = device.clone();
            move |e: cudarc::driver::DriverError| OpenError::Setup {
                device,
                step,
                message: e.to_string(),
            }
        };
        let ctx = CudaContext::new(ordinal).map_err(setup("creating a context"))?;
        // One stream does all the work, so cudarc's per-buffer events that
        // order work across streams are pure overhead.
        // SAFETY: set before any allocation; nothing here uses a second stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(setup("creating a stream"))?;
        let info = DeviceInfo::query(&ctx, nvrtc)?;
        let key = CacheKey {
            device_name: &info.name,
            cc: info.cc,
            driver_version: info.driver_version,
            nvrtc,
        };
        let started = std::time::Instant::now();
        let kernels =
            Kernels::load(&ctx, &key, info.smem_optin).map_err(|error| OpenError::Kernels {
                device: device.clone(),
                error,
            })?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| OpenError::Setup {
            device: device.clone(),
            step: "creating the cuBLAS handle",
            message: e.to_string(),
        })?;
        let mut scratch = Scratch::default();
        let checked = std::time::Instant::now();
        let test = SelfTest::run(&stream, &blas, &kernels, &info, &mut scratch);
        let tc = if strict {
            test.verdict().map_err(|error| OpenError::SelfTest {
                device: device.clone(),
                error,
            })?
        } else {
            info.cc.0 >= 8
        };
        tracing::info!(
            device = %device,
            name = %info.name,
            arch = %info.arch(),
            sms = info.sms,
            memory_gib = info.total_mem as f64 / (1u64 << 30) as f64,
            driver = info.driver_version,
            nvrtc = ?nvrtc,
            kernels_ms = started.elapsed().as_millis() as u64,
            self_test_ms = checked.elapsed().as_millis() as u64,
            tensor_cores = tc,
            libraries = ?libs::loaded(&["libcuda.so", "libcublas", "libnvrtc"]),
            "CUDA backend ready"
        );
        let backend = CudaBackend {
            device,
            ctx,
            gpu: Gpu {
                stream,
                blas,
                kernels,
                info,
                tc,
            },
            item_dtype: ItemDtype::F32,
            tables: HashMap::new(),
            models: HashMap::new(),
            scratch,
            broken: None,
        };
        Ok((backend, test))
    }

    /// Dtype of item tables loaded from now on (f32 by default). See the
    /// module docs for what each costs in agreement with the CPU.
    pub fn set_item_dtype(&mut self, dtype: ItemDtype) {
        self.item_dtype = dtype;
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.gpu.info
    }

    /// The device parts, the batch buffers and the resident tables, for
    /// driving kernels directly (`gpu-check`).
    pub fn parts(&mut self) -> (Dev<'_>, &mut Scratch, &HashMap<TableId, DeviceTable>) {
        (self.gpu.dev(), &mut self.scratch, &self.tables)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.gpu.stream
    }

    pub fn table(&self, id: TableId) -> Option<&DeviceTable> {
        self.tables.get(&id)
    }

    /// Binds the context to the calling thread (the executor may not be the
    /// thread that created the backend) and refuses work on a dead context.
    fn guard(&mut self) -> Result<(), BackendError> {
        if let Some(why) = &self.broken {
            return Err(BackendError::new(
                self.device.clone(),
                Reason::Hardware,
                format!("the device is unusable after an earlier error: {why}"),
            ));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.fail(GpuError::Driver("binding the CUDA context", e)))
    }

    fn fail(&mut self, e: GpuError) -> BackendError {
        let err = e.into_backend(&self.device);
        if err.reason == Reason::Hardware && self.broken.is_none() {
            tracing::error!(device = %self.device, error = %err.message, "CUDA context lost; the device is unusable until restart");
            self.broken = Some(err.message.clone());
        }
        err
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> String {
        self.device.clone()
    }

    fn load_table(
        &mut self,
        table: TableId,
        items: &ItemTable,
        dtype: ItemDtype,
    ) -> Result<(), BackendError> {
        self.guard()?;
        self.item_dtype = dtype;
        let t = DeviceTable::upload(&self.gpu.stream, items, dtype).map_err(|e| self.fail(e))?;
        tracing::info!(
            device = %self.device,
            table = table.get(),
            rows = t.rows,
            dtype = t.dtype.name(),
            mib = (t.cap * t.row_bytes()) >> 20,
            "item table resident on the device"
        );
        self.tables.insert(table, t);
        Ok(())
    }

    fn load(
        &mut self,
        id: ModelId,
        desc: ModelDesc,
        table: TableId,
        weights: &Weights,
    ) -> Result<(), BackendError> {
        self.guard()?;
        let device = self.device.clone();
        let invalid = |m: String| BackendError::new(device.clone(), Reason::Other, m);
        let kind = desc
            .kind
            .device()
            .ok_or_else(|| invalid(format!("no CUDA forward pass for {} models", desc.kind)))?;
        let t = self
            .tables
            .get(&table)
            .ok_or_else(|| invalid(format!("table {table} is not loaded: this is a bug")))?;
        if t.dim != desc.dim {
            return Err(invalid(format!(
                "model dim {} but its item table has dim {}",
                desc.dim, t.dim
            )));
        }
        let uploaded = kind
            .upload(&self.gpu.stream, &desc, weights)
            .map_err(invalid)?;
        let dev = self.gpu.dev();
        let t = &self.tables[&table];
        let sizes = kind.batch_sizes(&desc, uploaded.max_width());
        let sized = ops::reserve_for(&dev, t, &desc, &sizes, &mut self.scratch);
        sized.map_err(|e| self.fail(e))?;
        self.models.insert(
            id,
            GpuModel {
                desc,
                table,
                weights: uploaded,
                kind,
            },
        );
        Ok(())
    }

    fn unload(&mut self, id: ModelId) {
        self.models.remove(&id);
    }

    fn unload_table(&mut self, table: TableId) {
        self.tables.remove(&table);
    }

    fn warm_batch_sizes(&self, max_batch: usize) -> Vec<usize> {
        plan::warm_sizes(max_batch)
    }

    /// Filters are tested inside the fused scan, against the catalogue's
    /// attribute columns mirrored on the device.
    fn filters(&self) -> bool {
        true
    }

    /// The kinds with a device forward pass (`Kind::device`).
    fn runs(&self, kind: ModelKind) -> bool {
        kind.device().is_some()
    }

    fn run(
        &mut self,
        id: ModelId,
        items: &ItemTable,
        queries: &[Query<'_>],
    ) -> Result<Vec<Output>, BackendError> {
        self.guard()?;
        let result = (|| {
            let model = self.models.get(&id).ok_or_else(|| {
                GpuError::Invalid(format!("model {id} is not loaded: this is a bug"))
            })?;
            let table = self.tables.get(&model.table).ok_or_else(|| {
                GpuError::Invalid("the model's table is not loaded: this is a bug".into())
            })?;
            plan::check_rows(
                queries,
                table.rows,
                table.n_attrs,
                model.desc.user_feature_dim,
            )?;
            let dev = self.gpu.dev();
            model.kind.run(
                &dev,
                &model.desc,
                &model.weights,
                table,
                &mut self.scratch,
                items,
                queries,
            )
        })();
        result.map_err(|e| self.fail(e))
    }

    fn items_changed(
        &mut self,
        table: TableId,
        items: &ItemTable,
        rows: &[u32],
    ) -> Result<(), BackendError> {
        self.guard()?;
        let Some(t) = self.tables.get_mut(&table) else {
            return Err(BackendError::new(
                self.device.clone(),
                Reason::Other,
                format!("table {table} is not loaded: this is a bug"),
            ));
        };
        let result = t.apply(&self.gpu.stream, &self.gpu.kernels, items, rows);
        result.map_err(|e| self.fail(e))
    }

    fn health(&self) -> DeviceHealth {
        DeviceHealth {
            healthy: self.broken.is_none(),
            reason: self.broken.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI hosts have no GPU: opening one must fail with a reason, not panic.
    /// On a GPU host the same path is taken with an ordinal past the last
    /// device.
    #[test]
    fn new_without_a_device_says_why() {
        if !libs::driver_present() {
            let err = CudaBackend::new(0).err().expect("no driver on this host");
            assert!(matches!(err, OpenError::NoDriver), "{err:?}");
            assert_eq!(err.to_string(), "no NVIDIA driver (libcuda.so not found)");
            return;
        }
        let n = CudaContext::device_count().unwrap_or(0).max(0) as usize;
        let err = CudaBackend::new(n)
            .err()
            .expect("ordinal past the last device")
            .to_string();
        assert!(err.starts_with(&format!("no CUDA device {n} ")), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
