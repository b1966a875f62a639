//! Choosing the backend at start: `--device auto|cpu|cuda:N`. A GPU backend
//! is always wrapped in the CPU fallback; when no GPU can be used, the reason
//! is logged once and reported in `/readyz` and `/v1/models`.

use std::sync::Arc;

use super::cpu::CpuBackend;
use super::fallback::{faulty, system_clock, Fallback};
use super::Backend;
use crate::metrics::Metrics;
use crate::shutdown::CancellationToken;

#[cfg(feature = "cuda")]
pub use super::cuda::error::OpenError;

/// Why no GPU can be opened in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("this rankd was built without the `cuda` feature")]
    NotBuilt,
}

/// A `--device` value rankd does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceSpecError {
    #[error("faulty-cpu:N needs N >= 1, got '{0}'")]
    FaultyEvery(String),
    #[error("unknown device '{0}'")]
    UnknownFaulty(String),
    #[error("unknown device '{0}'; expected auto, cpu or cuda:N")]
    Unknown(String),
}

pub struct Selected {
    pub backend: Box<dyn Backend>,
    /// Why the requested GPU is not used, when it is not.
    pub reason: Option<String>,
}

#[cfg(feature = "cuda")]
fn open_cuda(
    ordinal: usize,
    metrics: &Arc<Metrics>,
    stop: CancellationToken,
) -> Result<Box<dyn Backend>, OpenError> {
    let backend = super::cuda::CudaBackend::new(ordinal)?;
    super::cuda::telemetry::start(ordinal, metrics.clone(), stop);
    Ok(Box::new(backend))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    _ordinal: usize,
    _metrics: &Arc<Metrics>,
    _stop: CancellationToken,
) -> Result<Box<dyn Backend>, OpenError> {
    Err(OpenError::NotBuilt)
}

fn cpu(reason: String) -> Selected {
    tracing::warn!(%reason, "serving on the CPU");
    Selected {
        backend: Box::new(CpuBackend::new()),
        reason: Some(reason),
    }
}

/// `spec`: `auto` (GPU 0 if usable, else CPU), `cpu`, `cuda` / `cuda:N`
/// (that GPU, else CPU with a warning), or `faulty-cpu[:N]`: a CPU backend
/// behind the fallback that fails every Nth batch (default 3) and has no
/// forward pass for sasrec models (a kind the device lacks), to exercise and
/// alert on the fallback paths without a GPU. `stop` ends what a GPU backend
/// runs beside it (its NVML telemetry thread).
pub fn select(
    spec: &str,
    metrics: &Arc<Metrics>,
    stop: CancellationToken,
) -> Result<Selected, DeviceSpecError> {
    let wrap = |b: Box<dyn Backend>| -> Box<dyn Backend> {
        Box::new(Fallback::new(b, Some(metrics.clone()), system_clock()))
    };
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Selected {
            backend: Box::new(CpuBackend::new()),
            reason: Some("--device cpu".into()),
        });
    }
    if let Some(rest) = spec.strip_prefix("faulty-cpu") {
        let every = match rest.strip_prefix(':') {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| DeviceSpecError::FaultyEvery(n.to_string()))?,
            None if rest.is_empty() => 3,
            None => return Err(DeviceSpecError::UnknownFaulty(spec.to_string())),
        };
        let plan = Arc::new(faulty::Plan::default());
        plan.fail_every
            .store(every, std::sync::atomic::Ordering::Release);
        *plan.lacks.lock().expect("a new plan") = Some(crate::model::kind::SASREC);
        tracing::warn!(
            every,
            "fault injection: every Nth batch fails and is re-executed on the CPU"
        );
        return Ok(Selected {
            backend: wrap(Box::new(faulty::Faulty::new(plan))),
            reason: None,
        });
    }
    let ordinal = match spec {
        "auto" | "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(DeviceSpecError::Unknown(spec.to_string())),
        },
    };
    match open_cuda(ordinal, metrics, stop) {
        Ok(b) => {
            tracing::info!(device = %b.device(), "serving on the GPU, with the CPU as fallback");
            Ok(Selected {
                backend: wrap(b),
                reason: None,
            })
        }
        Err(why) => Ok(cpu(format!("cuda:{ordinal} not used: {why}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(spec: &str) -> DeviceSpecError {
        select(spec, &Arc::new(Metrics::new()), CancellationToken::new())
            .err()
            .expect("refused")
    }

    #[test]
    fn unknown_devices_are_refused_with_what_is_allowed() {
        assert_eq!(
            refused("tpu:0").to_string(),
            "unknown device 'tpu:0'; expected auto, cpu or cuda:N"
        );
        assert_eq!(
            refused("faulty-cpu:0"),
            DeviceSpecError::FaultyEvery("0".into())
        );
        assert_eq!(
            refused("faulty-cpu:x").to_string(),
            "faulty-cpu:N needs N >= 1, got 'x'"
        );
        assert_eq!(
            refused("faulty-cpux").to_string(),
            "unknown device 'faulty-cpux'"
        );
        let cpu = select(" cpu ", &Arc::new(Metrics::new()), CancellationToken::new()).unwrap();
        assert_eq!(cpu.backend.device(), "cpu");
        assert_eq!(cpu.reason.as_deref(), Some("--device cpu"));
    }
}
