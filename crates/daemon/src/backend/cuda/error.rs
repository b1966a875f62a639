//! CUDA failures as the executor sees them: every driver or cuBLAS error
//! becomes a `BackendError` whose reason labels the metric and decides
//! whether the device can still be used (`hardware` errors poison the CUDA
//! context, so the backend reports itself unhealthy from then on).

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;

use super::kernels::KernelError;
use super::plan::{BatchError, PlanError};
use super::selftest::Failure;
use crate::backend::{BackendError, Reason};

#[derive(Debug)]
pub enum GpuError {
    Driver(&'static str, DriverError),
    Blas(&'static str, CublasError),
    /// A request the fused top-k cannot serve here (too large a k).
    Plan(PlanError),
    /// A batch naming a row or feature width the model does not have.
    Batch(BatchError),
    /// Anything else the device path refuses (a bug, a mismatched model).
    Invalid(String),
}

impl std::fmt::Display for GpuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuError::Driver(what, e) => write!(f, "{what}: {e}"),
            GpuError::Blas(what, e) => write!(f, "{what}: cuBLAS {:?}", e.0),
            GpuError::Plan(e) => write!(f, "{e}"),
            GpuError::Batch(e) => write!(f, "{e}"),
            GpuError::Invalid(m) => f.write_str(m),
        }
    }
}

impl From<PlanError> for GpuError {
    fn from(e: PlanError) -> Self {
        GpuError::Plan(e)
    }
}

impl From<BatchError> for GpuError {
    fn from(e: BatchError) -> Self {
        GpuError::Batch(e)
    }
}

impl std::error::Error for GpuError {}

impl GpuError {
    pub fn reason(&self) -> Reason {
        match self {
            GpuError::Driver(_, e) => driver_reason(e.0),
            GpuError::Blas(_, e) => blas_reason(e.0),
            GpuError::Plan(_) | GpuError::Batch(_) | GpuError::Invalid(_) => Reason::Other,
        }
    }

    pub fn into_backend(self, device: &str) -> BackendError {
        // Display asks the driver for the error string: fine, as a
        // DriverError only exists when the driver is loaded.
        BackendError::new(device, self.reason(), self.to_string())
    }
}

/// Why the device could not be opened: one line, naming what is missing or
/// which step failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no NVIDIA driver (libcuda.so not found)")]
    NoDriver,
    #[error("the NVIDIA driver is unusable: {message}")]
    DriverUnusable { message: String },
    #[error("no CUDA device {ordinal} ({count} found)")]
    NoDevice { ordinal: usize, count: usize },
    #[error(
        "cuBLAS not found (libcublas.so.13 and libcublasLt.so.13: put their folder on LD_LIBRARY_PATH)"
    )]
    NoCublas,
    /// NVRTC is missing or unusable.
    #[error(transparent)]
    Nvrtc(KernelError),
    #[error("{device}: {step}: {message}")]
    Setup {
        device: String,
        step: &'static str,
        message: String,
    },
    #[error("reading the device's {what}: {message}")]
    Query { what: &'static str, message: String },
    #[error("{device}: {error}")]
    Kernels { device: String, error: KernelError },
    #[error("{device}: {error}")]
    SelfTest {
        device: String,
        error: SelfTestError,
    },
    /// cudarc panicked (a library that loads but lacks a symbol, say).
    #[error("cuda:{ordinal}: CUDA initialisation failed: {why}")]
    Panicked { ordinal: usize, why: String },
}

/// A kernel that failed the start-up check (see `selftest`), by name.
#[derive(Debug)]
pub struct SelfTestError {
    pub kernel: &'static str,
    pub failure: Failure,
}

impl std::fmt::Display for SelfTestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = self.kernel;
        match &self.failure {
            Failure::Device(m) => {
                write!(
                    f,
                    "the start-up check of the {what} failed on the device: {m}"
                )
            }
            Failure::Wrong(m) => write!(f, "the {what} disagrees with the host at start: {m}"),
        }
    }
}

impl std::error::Error for SelfTestError {}

/// Short label of a driver error for metrics and health.
pub fn driver_reason(r: CUresult) -> Reason {
    use CUresult::*;
    match r {
        CUDA_ERROR_OUT_OF_MEMORY => Reason::OutOfMemory,
        // Sticky errors: the context is unusable until the process restarts.
        CUDA_ERROR_ECC_UNCORRECTABLE
        | CUDA_ERROR_HARDWARE_STACK_ERROR
        | CUDA_ERROR_ILLEGAL_ADDRESS
        | CUDA_ERROR_ILLEGAL_INSTRUCTION
        | CUDA_ERROR_MISALIGNED_ADDRESS
        | CUDA_ERROR_INVALID_ADDRESS_SPACE
        | CUDA_ERROR_INVALID_PC
        | CUDA_ERROR_LAUNCH_FAILED
        | CUDA_ERROR_NVLINK_UNCORRECTABLE
        | CUDA_ERROR_ASSERT
        | CUDA_ERROR_CONTEXT_IS_DESTROYED => Reason::Hardware,
        CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
        | CUDA_ERROR_LAUNCH_TIMEOUT
        | CUDA_ERROR_INVALID_VALUE
        | CUDA_ERROR_INVALID_HANDLE
        | CUDA_ERROR_NOT_FOUND
        | CUDA_ERROR_INVALID_PTX
        | CUDA_ERROR_INVALID_IMAGE
        | CUDA_ERROR_NO_BINARY_FOR_GPU
        | CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE => Reason::Launch,
        CUDA_ERROR_NOT_INITIALIZED
        | CUDA_ERROR_DEINITIALIZED
        | CUDA_ERROR_NO_DEVICE
        | CUDA_ERROR_INVALID_DEVICE
        | CUDA_ERROR_INVALID_CONTEXT
        | CUDA_ERROR_SYSTEM_NOT_READY
        | CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
        | CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | CUDA_ERROR_JIT_COMPILER_NOT_FOUND
        | CUDA_ERROR_STUB_LIBRARY => Reason::Driver,
        _ => Reason::Other,
    }
}

pub fn blas_reason(s: cublasStatus_t) -> Reason {
    use cublasStatus_t::*;
    match s {
        CUBLAS_STATUS_ALLOC_FAILED => Reason::OutOfMemory,
        CUBLAS_STATUS_EXECUTION_FAILED | CUBLAS_STATUS_ARCH_MISMATCH => Reason::Launch,
        CUBLAS_STATUS_NOT_INITIALIZED => Reason::Driver,
        _ => Reason::Other,
    }
}

/// `.ctx("what")` on driver and cuBLAS results names the failed step.
pub trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, GpuError>;
}

impl<T> Ctx<T> for Result<T, DriverError> {
    fn ctx(self, what: &'static str) -> Result<T, GpuError> {
        self.map_err(|e| GpuError::Driver(what, e))
    }
}

impl<T> Ctx<T> for Result<T, CublasError> {
    fn ctx(self, what: &'static str) -> Result<T, GpuError> {
        self.map_err(|e| GpuError::Blas(what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_group_driver_errors_the_way_health_needs() {
        let label = |r: Reason| r.as_str();
        assert_eq!(
            label(driver_reason(CUresult::CUDA_ERROR_OUT_OF_MEMORY)),
            "out_of_memory"
        );
        assert_eq!(
            driver_reason(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            Reason::Hardware
        );
        assert_eq!(
            label(driver_reason(CUresult::CUDA_ERROR_ECC_UNCORRECTABLE)),
            "hardware"
        );
        assert_eq!(
            label(driver_reason(CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES)),
            "launch"
        );
        assert_eq!(
            label(driver_reason(CUresult::CUDA_ERROR_NO_DEVICE)),
            "driver"
        );
        assert_eq!(label(driver_reason(CUresult::CUDA_ERROR_UNKNOWN)), "other");
        assert_eq!(
            blas_reason(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED),
            Reason::OutOfMemory
        );
        let e = GpuError::from(PlanError::KTooLarge { k: 5000 }).into_backend("cuda:0");
        assert_eq!(e.message, "k must be <= 4096 on the GPU, got 5000");
        assert_eq!((e.device.as_str(), e.reason), ("cuda:0", Reason::Other));
    }
}
