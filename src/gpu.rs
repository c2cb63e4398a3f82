//! GPU telemetry from NVML (`libnvidia-ml.so`, loaded at run time by `nvml-wrapper`).
//!
//! A background task polls every GPU NVML sees (in a Kubernetes pod: the ones assigned to it;
//! `gpu` labels are NVML indices) every `gpu.poll_interval_ms` and sets the
//! `kiln_gpu_*` gauges; the NVML calls block, so each poll runs on tokio's blocking pool. The last
//! poll's figures are kept for the heartbeat ([`latest`]).
//!
//! Without NVML (no driver, no GPU, a CPU node) nothing fails: one log line says why, and the
//! `kiln_gpu_*` series are absent from `/metrics` (a labelled family with no children is not
//! exported). A query NVML answers with "not supported" (power on some boards, energy before
//! Volta) leaves that one series absent; any other failed query counts in
//! `kiln_gpu_poll_errors_total`.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec};
use serde::Serialize;

/// The throttle reasons exported as `kiln_gpu_throttle_active{reason}` (NVML's clock event
/// reasons; `gpu_idle` is normal on an idle GPU).
pub const THROTTLE_REASONS: &[(&str, ThrottleReasons)] = &[
    ("gpu_idle", ThrottleReasons::GPU_IDLE),
    (
        "applications_clocks_setting",
        ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
    ),
    ("sw_power_cap", ThrottleReasons::SW_POWER_CAP),
    ("hw_slowdown", ThrottleReasons::HW_SLOWDOWN),
    ("sync_boost", ThrottleReasons::SYNC_BOOST),
    ("sw_thermal_slowdown", ThrottleReasons::SW_THERMAL_SLOWDOWN),
    ("hw_thermal_slowdown", ThrottleReasons::HW_THERMAL_SLOWDOWN),
    ("hw_power_brake_slowdown", ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN),
    ("display_clock_setting", ThrottleReasons::DISPLAY_CLOCK_SETTING),
];

crate::metrics::declare_metrics! {
    /// The GPU gauges, registered in the registry `/metrics` serves.
    struct GpuMetrics;
    /// Every GPU metric name (none can be scraped without a GPU, so tests check dashboards against
    /// this list).
    names METRIC_NAMES;
    specs SPECS;

    info: IntGaugeVec = "kiln_gpu_info", "gauge (1)", ["gpu", "name", "uuid"],
        "Always 1; the GPU's model name and UUID.";
    utilization: GaugeVec = "kiln_gpu_utilization_ratio", "gauge", ["gpu"],
        "Fraction of NVML's last sample period in which a kernel ran on the GPU.";
    memory_used: GaugeVec = "kiln_gpu_memory_used_bytes", "gauge", ["gpu"],
        "GPU memory allocated.";
    memory_total: GaugeVec = "kiln_gpu_memory_total_bytes", "gauge", ["gpu"],
        "GPU memory installed.";
    power: GaugeVec = "kiln_gpu_power_watts", "gauge", ["gpu"],
        "Power draw.";
    energy: CounterVec = "kiln_gpu_energy_joules_total", "counter", ["gpu"],
        "Energy the GPU used since this worker started watching it.";
    temperature: GaugeVec = "kiln_gpu_temperature_celsius", "gauge", ["gpu"],
        "GPU die temperature.";
    sm_clock: GaugeVec = "kiln_gpu_sm_clock_hertz", "gauge", ["gpu"],
        "Streaming-multiprocessor clock.";
    throttle: IntGaugeVec = "kiln_gpu_throttle_active", "gauge (0/1)", ["gpu", "reason"],
        "1 while NVML reports this reason for holding the clocks down.";
    poll_errors: IntCounterVec = "kiln_gpu_poll_errors_total", "counter", ["gpu"],
        "NVML queries that failed (other than 'not supported').";
}

static METRICS: LazyLock<GpuMetrics> = LazyLock::new(|| GpuMetrics::register(crate::metrics::register));

/// One GPU, as of the last poll; fields NVML did not report are `None` (JSON `null`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuFigures {
    /// NVML's device index.
    pub index: u32,
    /// Model name.
    pub name: Option<String>,
    /// Kernel-busy fraction, 0 to 1.
    pub utilization: Option<f64>,
    /// Memory allocated, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Memory installed, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Power draw, watts.
    pub power_watts: Option<f64>,
    /// Die temperature, °C.
    pub temperature_celsius: Option<u32>,
    /// SM clock, Hz.
    pub sm_clock_hertz: Option<u64>,
    /// Active throttle reasons (names from [`THROTTLE_REASONS`]).
    pub throttle_reasons: Vec<&'static str>,
}

static LATEST: Mutex<Vec<GpuFigures>> = Mutex::new(Vec::new());

/// The figures of the last poll; empty without NVML or before the first poll.
pub fn latest() -> Vec<GpuFigures> {
    LATEST.lock().expect("not poisoned").clone()
}

/// Watch the GPUs every `interval`, forever; returns at once (after one log line saying why)
/// when NVML is not there or sees no GPU.
pub async fn run(interval: Duration) {
    let nvml = match tokio::task::spawn_blocking(init).await {
        Ok(Ok(nvml)) => Arc::new(nvml),
        Ok(Err(reason)) => {
            tracing::info!(reason = %reason, "no GPU telemetry: the kiln_gpu_* metrics are absent");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "no GPU telemetry: NVML initialisation panicked");
            return;
        }
    };
    let mut previous_energy: Vec<Option<u64>> = Vec::new();
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let nvml = Arc::clone(&nvml);
        let energy = std::mem::take(&mut previous_energy);
        match tokio::task::spawn_blocking(move || poll(&nvml, energy)).await {
            Ok((figures, energy)) => {
                previous_energy = energy;
                *LATEST.lock().expect("not poisoned") = figures;
            }
            Err(e) => tracing::warn!(error = %e, "a GPU poll panicked"),
        }
    }
}

/// Load NVML and check that it sees at least one GPU.
fn init() -> Result<Nvml, String> {
    let nvml = Nvml::init().map_err(|e| match e {
        NvmlError::LibloadingError(e) => format!("libnvidia-ml.so could not be loaded ({e}); no NVIDIA driver here"),
        other => format!("NVML did not start: {other}"),
    })?;
    match nvml.device_count() {
        Ok(0) => Err("NVML sees no GPU".into()),
        Ok(count) => {
            let driver = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".into());
            tracing::info!(gpus = count, driver = %driver, "GPU telemetry from NVML");
            Ok(nvml)
        }
        Err(e) => Err(format!("NVML cannot count GPUs: {e}")),
    }
}

/// Read every GPU and set the gauges; `previous_energy` (millijoules per GPU, from the last poll)
/// turns NVML's energy reading into counter increments.
fn poll(nvml: &Nvml, previous_energy: Vec<Option<u64>>) -> (Vec<GpuFigures>, Vec<Option<u64>>) {
    let metrics = &*METRICS;
    let count = nvml.device_count().unwrap_or(0);
    let mut figures = Vec::with_capacity(count as usize);
    let mut energy_now = Vec::with_capacity(count as usize);
    for index in 0..count {
        let gpu = index.to_string();
        let label = [gpu.as_str()];
        let device = match nvml.device_by_index(index) {
            Ok(device) => device,
            Err(e) => {
                note_error(metrics, &gpu, "device_by_index", &e);
                energy_now.push(None);
                continue;
            }
        };
        let reading = read(&device, metrics, &gpu);
        if let (Some(name), Some(uuid)) = (&reading.figures.name, &reading.uuid) {
            metrics.info.with_label_values(&[gpu.as_str(), name, uuid]).set(1);
        }
        let f = &reading.figures;
        set(&metrics.utilization, &label, f.utilization);
        set(&metrics.memory_used, &label, f.memory_used_bytes.map(|b| b as f64));
        set(&metrics.memory_total, &label, f.memory_total_bytes.map(|b| b as f64));
        set(&metrics.power, &label, f.power_watts);
        set(&metrics.temperature, &label, f.temperature_celsius.map(f64::from));
        set(&metrics.sm_clock, &label, f.sm_clock_hertz.map(|hz| hz as f64));
        if let Some(active) = reading.throttle {
            for (reason, bit) in THROTTLE_REASONS {
                metrics
                    .throttle
                    .with_label_values(&[gpu.as_str(), reason])
                    .set(i64::from(active.contains(*bit)));
            }
        }
        if let Some(now) = reading.energy_millijoules {
            let counter = metrics.energy.with_label_values(&label);
            match previous_energy.get(index as usize).copied().flatten() {
                // NVML counts from driver load; a smaller reading means the driver reloaded.
                Some(before) if now >= before => counter.inc_by((now - before) as f64 / 1000.0),
                _ => counter.inc_by(0.0),
            }
        }
        energy_now.push(reading.energy_millijoules);
        figures.push(reading.figures);
    }
    (figures, energy_now)
}

struct Reading {
    figures: GpuFigures,
    uuid: Option<String>,
    throttle: Option<ThrottleReasons>,
    energy_millijoules: Option<u64>,
}

fn read(device: &Device<'_>, metrics: &GpuMetrics, gpu: &str) -> Reading {
    let get = |what, result| supported(metrics, gpu, what, result);
    let memory = supported(metrics, gpu, "memory_info", device.memory_info());
    let throttle = supported(metrics, gpu, "throttle_reasons", device.current_throttle_reasons());
    let figures = GpuFigures {
        index: device.index().unwrap_or_default(),
        name: supported(metrics, gpu, "name", device.name()),
        utilization: supported(metrics, gpu, "utilization", device.utilization_rates())
            .map(|u| f64::from(u.gpu) / 100.0),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        power_watts: get("power", device.power_usage()).map(|mw| f64::from(mw) / 1000.0),
        temperature_celsius: get("temperature", device.temperature(TemperatureSensor::Gpu)),
        sm_clock_hertz: get("sm_clock", device.clock_info(Clock::SM)).map(|mhz| u64::from(mhz) * 1_000_000),
        throttle_reasons: throttle.map_or_else(Vec::new, |active| {
            THROTTLE_REASONS
                .iter()
                .filter(|(_, bit)| active.contains(*bit))
                .map(|(name, _)| *name)
                .collect()
        }),
    };
    Reading {
        uuid: supported(metrics, gpu, "uuid", device.uuid()),
        energy_millijoules: supported(metrics, gpu, "energy", device.total_energy_consumption()),
        throttle,
        figures,
    }
}

/// The value, or `None`: silently when the GPU does not support the query, counted as a poll
/// error otherwise.
fn supported<T>(metrics: &GpuMetrics, gpu: &str, what: &str, result: Result<T, NvmlError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(NvmlError::NotSupported) => None,
        Err(e) => {
            note_error(metrics, gpu, what, &e);
            None
        }
    }
}

fn note_error(metrics: &GpuMetrics, gpu: &str, what: &str, error: &NvmlError) {
    metrics.poll_errors.with_label_values(&[gpu]).inc();
    tracing::debug!(gpu, query = what, error = %error, "an NVML query failed");
}

fn set(gauge: &GaugeVec, labels: &[&str], value: Option<f64>) {
    if let Some(value) = value {
        gauge.with_label_values(labels).set(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_nvml_nothing_starts_and_no_gpu_series_are_exported() {
        // This machine has no NVIDIA driver: the absent path, the one every CPU node takes.
        if Nvml::init().is_ok() {
            eprintln!("NVML is present here; the absent path cannot be tested");
            return;
        }
        let finished = tokio::time::timeout(Duration::from_secs(30), run(Duration::from_millis(100))).await;
        assert!(finished.is_ok(), "without NVML the poller returns at once");
        assert!(latest().is_empty());
        LazyLock::force(&METRICS);
        let text = crate::metrics::render();
        assert!(!text.contains("kiln_gpu_"), "{text}");
    }

    #[test]
    fn the_declarations_are_the_collectors() {
        crate::metrics::assert_declarations(SPECS, &METRICS.collectors());
        let names: Vec<&str> = SPECS.iter().map(|spec| spec.name).collect();
        assert_eq!(names, METRIC_NAMES);
    }

    #[test]
    fn everything_gathered_is_declared() {
        // Every family /metrics exports is in one of the two lists (GPU series exist only where
        // NVML sees a GPU).
        LazyLock::force(&METRICS);
        crate::metrics::observe_batch("unit-test-model-gathered", 1, 0.01);
        let text = crate::metrics::render();
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert!(
            families.iter().any(|f| f.starts_with("kiln_inference_batch_size ")),
            "{text}"
        );
        for family in families {
            let name = family.split(' ').next().unwrap();
            assert!(
                crate::metrics::METRIC_NAMES.contains(&name) || METRIC_NAMES.contains(&name),
                "{name} is registered but in no list of names"
            );
        }
    }

    #[test]
    fn throttle_reasons_are_distinct_single_bits() {
        let mut seen = ThrottleReasons::empty();
        for (name, bit) in THROTTLE_REASONS {
            assert_eq!(bit.bits().count_ones(), 1, "{name}");
            assert!(!seen.intersects(*bit), "{name} repeats a bit");
            seen |= *bit;
        }
    }
}
