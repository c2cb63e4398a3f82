//! Settings of the operators' side: `[http]`, `[heartbeat]`, `[gpu]`.

use serde::Deserialize;

/// The HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address and port to listen on (`KILN_HTTP__BIND`). Port 0 picks a free port (tests).
    /// Default `0.0.0.0:9464`, the port registered for exporters of this kind.
    pub bind: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:9464".into(),
        }
    }
}

/// The fleet heartbeat on `<prefix>.heartbeat`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSettings {
    /// Publish heartbeats. Default true.
    pub enabled: bool,
    /// Period in milliseconds. Default 5000.
    pub interval_ms: u64,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 5_000,
        }
    }
}

/// GPU telemetry from NVML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSettings {
    /// Poll NVML for the `kiln_gpu_*` metrics and the heartbeat's GPU figures. Without NVML this
    /// logs one line and does nothing. Default true.
    pub enabled: bool,
    /// Period in milliseconds. Default 5000.
    pub poll_interval_ms: u64,
}

impl Default for GpuSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval_ms: 5_000,
        }
    }
}
