//! Typed settings: built-in defaults, then an optional TOML file, then `KILN_`-prefixed
//! environment variables with `__` for nesting (`KILN_AMQP__URL`, `KILN_INFERENCE__EXECUTION_PROVIDER`).
//!
//! Every field has a default that works on a developer machine with RabbitMQ on localhost, so
//! `kiln worker` runs with no file at all. Unknown fields are an error: a misspelt setting must not
//! silently keep its default. `config/kiln.example.toml` lists every setting.
//!
//! Each section is declared by the module it configures (`amqp::settings`, `inference::settings`,
//! `rate_limit::settings`, `scheduling`, `observability::settings`, `worker::settings`, `cancel`,
//! `telemetry`); this file only composes them, loads them, and validates them
//! ([`Settings::validate`], called once by what consumes them). Modules take their own section,
//! never the whole `Settings`.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

pub use crate::amqp::settings::{AmqpSettings, BackoffSettings, TopologySettings};
use crate::amqp::Topology;
pub use crate::auth::{AuthSettings, KeySettings, Policy as AuthPolicy};
pub use crate::cancel::CancelSettings;
pub use crate::inference::settings::{
    ArenaExtendStrategy, BatchingSettings, ConvAlgorithmSearch, CudaSettings, ExecutionProviderKind, Fallback,
    InferenceSettings, ModelBatching, ModelSettings, ORT_VERSION,
};
pub use crate::observability::{GpuSettings, HeartbeatSettings, HttpSettings};
pub use crate::rate_limit::RateLimitSettings;
pub use crate::scheduling::SchedulingSettings;
pub use crate::telemetry::{LogFormat, TelemetrySettings};
pub use crate::worker::settings::{FaultSettings, RequestLimits, WorkerSettings};

/// All of kiln's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The broker connection and topology.
    pub amqp: AmqpSettings,
    /// ONNX Runtime and the execution provider.
    pub inference: InferenceSettings,
    /// Which models to serve.
    pub models: ModelSettings,
    /// How requests are grouped into batches on the device.
    pub batching: BatchingSettings,
    /// Priorities, default deadlines and overload behaviour by tier.
    pub scheduling: SchedulingSettings,
    /// Per-request limits that do not depend on the model.
    pub limits: RequestLimits,
    /// Per-user rate limits and quotas by tier (Redis).
    pub rate_limit: RateLimitSettings,
    /// Signed requests: the policy, and the producers' keys.
    pub auth: AuthSettings,
    /// This worker's identity and shutdown behaviour.
    pub worker: WorkerSettings,
    /// Cancels from producers (the `<prefix>.cancel` exchange).
    pub cancel: CancelSettings,
    /// Logs.
    pub telemetry: TelemetrySettings,
    /// The operators' HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
    pub http: HttpSettings,
    /// The fleet heartbeat on `<prefix>.heartbeat`.
    pub heartbeat: HeartbeatSettings,
    /// GPU telemetry from NVML.
    pub gpu: GpuSettings,
    /// Deliberate faults, for the tests that prove nothing is lost. Never enable in production.
    pub faults: FaultSettings,
}

impl Settings {
    /// Load settings: defaults, then `file` (required if given), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(file, None)
    }

    /// As [`Settings::load`], with the environment given as a map (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        // KILN_CONFIG names the settings file (the CLI's --config); it is not a setting itself.
        let env = env.unwrap_or_else(|| std::env::vars().collect());
        let env = Some(env.into_iter().filter(|(k, _)| k != "KILN_CONFIG").collect());
        let env_source = config::Environment::with_prefix("KILN")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("models.enabled")
            .source(env);
        builder
            .add_source(env_source)
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| match file {
                Some(path) => format!("invalid settings (file {}, KILN_* environment)", path.display()),
                None => "invalid settings (KILN_* environment)".to_owned(),
            })
    }

    /// The checks across fields that types cannot make. Called once, by what consumes the settings
    /// (`Application::build`, `kiln limits`), so settings made in code are checked too.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.amqp.validate().context("invalid amqp settings")?;
        self.rate_limit.validate().context("invalid rate_limit settings")?;
        self.cancel.validate().context("invalid cancel settings")?;
        let topology = self.topology();
        let queues: Vec<&str> = topology.request_queues.iter().map(|q| q.name.as_str()).collect();
        self.auth.validate(&queues).context("invalid auth settings")
    }

    /// The broker's names for these settings: the shared request queue, and one per tier unless
    /// `scheduling.tier_queues` is off.
    pub fn topology(&self) -> Topology {
        let tiers = self.rate_limit.tiers.keys().map(String::as_str);
        match self.scheduling.tier_queues {
            true => Topology::with_tiers(&self.amqp.topology, tiers),
            false => Topology::new(&self.amqp.topology),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use secrecy::ExposeSecret;

    use std::path::PathBuf;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_need_no_file() {
        let s = Settings::load_from(None, Some(env(&[]))).unwrap();
        assert_eq!(s.amqp.topology.prefix, "kiln");
        assert_eq!(s.inference.execution_provider, ExecutionProviderKind::Cpu);
        assert_eq!(
            s.inference.runtime_library_path(),
            PathBuf::from("runtime/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1")
        );
    }

    #[test]
    fn environment_overrides_nested_fields() {
        let s = Settings::load_from(
            None,
            Some(env(&[
                ("KILN_AMQP__URL", "amqp://u:p@broker:5672/%2f"),
                ("KILN_AMQP__PREFETCH", "4"),
                ("KILN_INFERENCE__EXECUTION_PROVIDER", "cuda"),
                ("KILN_INFERENCE__CUDA__DEVICE_ID", "1"),
                ("KILN_MODELS__ENABLED", "multistyle26"),
                ("KILN_HTTP__BIND", "127.0.0.1:0"),
                ("KILN_HEARTBEAT__INTERVAL_MS", "250"),
            ])),
        )
        .unwrap();
        assert_eq!(s.amqp.url.expose_secret(), "amqp://u:p@broker:5672/%2f");
        assert_eq!(s.amqp.prefetch, 4);
        assert_eq!(s.inference.execution_provider, ExecutionProviderKind::Cuda);
        assert_eq!(s.inference.cuda.device_id, 1);
        assert_eq!(s.models.enabled, vec!["multistyle26".to_string()]);
        assert_eq!(s.http.bind, "127.0.0.1:0");
        assert_eq!(s.heartbeat.interval_ms, 250);
    }

    #[test]
    fn unknown_or_mistyped_settings_are_errors() {
        assert!(Settings::load_from(None, Some(env(&[("KILN_AMQP__PREFECH", "4")]))).is_err());
        assert!(Settings::load_from(None, Some(env(&[("KILN_INFERENCE__EXECUTION_PROVIDER", "tpu")]))).is_err());
    }

    #[test]
    fn cancels_are_remembered_for_a_while_and_never_for_no_time() {
        let s = Settings::load_from(None, Some(env(&[]))).unwrap();
        assert_eq!(s.cancel.remember(), std::time::Duration::from_secs(900));
        let s = Settings::load_from(None, Some(env(&[("KILN_CANCEL__REMEMBER_SECS", "0")]))).unwrap();
        assert!(s.validate().is_err());
    }

    #[test]
    fn kiln_config_names_the_file_and_is_not_a_setting() {
        let s = Settings::load_from(None, Some(env(&[("KILN_CONFIG", "/etc/kiln/kiln.toml")]))).unwrap();
        assert_eq!(s.amqp.prefetch, AmqpSettings::default().prefetch);
    }

    #[test]
    fn the_example_file_lists_valid_settings() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kiln.example.toml");
        Settings::load_from(Some(&path), Some(env(&[]))).unwrap();
    }
}
