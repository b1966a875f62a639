//! GPU telemetry: a thread samples NVML once a second into the `rankd_gpu_*`
//! gauges, labelled `cuda:N`, until the daemon stops it. NVML (libnvidia-ml)
//! is loaded at run time; on a host without it `start` returns `None` and
//! logs at debug level only.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::{Device, Nvml};

use crate::metrics::Metrics;
use crate::shutdown::{CancellationToken, Wake};

const PERIOD: Duration = Duration::from_secs(1);

/// How NVML should find the device CUDA calls `ordinal`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NvmlDevice {
    Index(u32),
    Uuid(String),
}

/// CUDA's ordinal is relative to `CUDA_VISIBLE_DEVICES`, NVML's index is not:
/// map through the variable (numbers or `GPU-…` UUIDs) when it is set.
fn nvml_device_for(ordinal: usize, visible: Option<&str>) -> NvmlDevice {
    let entry = visible
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|list| !list.is_empty())
        .and_then(|list| list.get(ordinal).map(|e| e.to_string()));
    match entry {
        Some(e) => match e.parse::<u32>() {
            Ok(i) => NvmlDevice::Index(i),
            Err(_) => NvmlDevice::Uuid(e),
        },
        None => NvmlDevice::Index(ordinal as u32),
    }
}

/// The device's UUID as NVML spells it, asked of the CUDA driver: exact
/// whatever the enumeration order, when the driver can be loaded.
fn cuda_uuid(ordinal: usize) -> Option<String> {
    use cudarc::driver::result;
    if !super::libs::driver_present() {
        return None;
    }
    result::init().ok()?;
    let dev = result::device::get(ordinal as i32).ok()?;
    let uuid = result::device::get_uuid(dev).ok()?;
    let b: Vec<u8> = uuid.bytes.iter().map(|&c| c as u8).collect();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    Some(format!(
        "GPU-{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    ))
}

fn open<'n>(
    nvml: &'n Nvml,
    which: &NvmlDevice,
) -> Result<Device<'n>, nvml_wrapper::error::NvmlError> {
    match which {
        NvmlDevice::Index(i) => nvml.device_by_index(*i),
        NvmlDevice::Uuid(u) => nvml.device_by_uuid(u.as_str()),
    }
}

fn sample(dev: &Device<'_>, metrics: &Metrics, label: &str) {
    if let Ok(u) = dev.utilization_rates() {
        metrics
            .gpu_utilization
            .with_label_values(&[label])
            .set(f64::from(u.gpu) / 100.0);
    }
    if let Ok(m) = dev.memory_info() {
        metrics
            .gpu_memory_used
            .with_label_values(&[label])
            .set(m.used as i64);
        metrics
            .gpu_memory_total
            .with_label_values(&[label])
            .set(m.total as i64);
    }
    if let Ok(t) = dev.temperature(TemperatureSensor::Gpu) {
        metrics
            .gpu_temperature
            .with_label_values(&[label])
            .set(f64::from(t));
    }
    if let Ok(mw) = dev.power_usage() {
        metrics
            .gpu_power
            .with_label_values(&[label])
            .set(f64::from(mw) / 1000.0);
    }
}

/// NVML by its development name, else by the runtime soname: driver-only
/// installs (most containers) ship `libnvidia-ml.so.1` alone.
fn init_nvml() -> Result<Nvml, nvml_wrapper::error::NvmlError> {
    Nvml::init().or_else(|_| {
        Nvml::builder()
            .lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1"))
            .init()
    })
}

/// Starts sampling device `ordinal` into `metrics` until `stop` is
/// cancelled, or returns `None` when NVML or the device is not there. Called
/// on the daemon's runtime, which wakes the thread when `stop` is.
pub fn start(
    ordinal: usize,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    let nvml = match init_nvml() {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available: no GPU telemetry");
            return None;
        }
    };
    let which = cuda_uuid(ordinal).map(NvmlDevice::Uuid).unwrap_or_else(|| {
        nvml_device_for(
            ordinal,
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        )
    });
    if let Err(e) = open(&nvml, &which) {
        tracing::debug!(device = ?which, error = %e, "NVML does not know this device: no GPU telemetry");
        return None;
    }
    let label = format!("cuda:{ordinal}");
    let wake = Wake::new(stop);
    std::thread::Builder::new()
        .name(format!("rankd-nvml-{ordinal}"))
        .spawn(move || {
            let Ok(dev) = open(&nvml, &which) else { return };
            loop {
                sample(&dev, &metrics, &label);
                if wake.sleep(PERIOD) {
                    break;
                }
            }
        })
        .map_err(|e| tracing::warn!(error = %e, "GPU telemetry thread not started"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_map_through_cuda_visible_devices() {
        assert_eq!(nvml_device_for(0, None), NvmlDevice::Index(0));
        assert_eq!(nvml_device_for(1, Some("")), NvmlDevice::Index(1));
        assert_eq!(nvml_device_for(1, Some("3, 5")), NvmlDevice::Index(5));
        assert_eq!(
            nvml_device_for(0, Some("GPU-8d1c0f2e-1111-2222-3333-444455556666")),
            NvmlDevice::Uuid("GPU-8d1c0f2e-1111-2222-3333-444455556666".into())
        );
        // Past the list: NVML has no such device either; use the ordinal and
        // let NVML say so.
        assert_eq!(nvml_device_for(2, Some("0")), NvmlDevice::Index(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn start_samples_when_nvml_is_there_and_returns_none_when_not() {
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let handle = start(0, metrics.clone(), stop.clone());
        if init_nvml().is_err() {
            assert!(handle.is_none());
            return;
        }
        let handle = handle.expect("NVML present: telemetry starts");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let total = metrics
            .gpu_memory_total
            .with_label_values(&["cuda:0"])
            .get();
        assert!(total > 0, "memory total sampled: {total}");
        // Stopped, it ends at once, not at the end of its period; the
        // metrics are still held here.
        let asked = std::time::Instant::now();
        stop.cancel();
        handle
            .join()
            .expect("the telemetry thread ends when stopped");
        assert!(asked.elapsed() < PERIOD / 2, "{:?}", asked.elapsed());
    }
}
