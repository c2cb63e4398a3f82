//! Typed settings: built-in defaults, then an optional TOML file, then `KILN_`-prefixed
//! environment variables with `__` for nesting (`KILN_AMQP__URL`, `KILN_INFERENCE__EXECUTION_PROVIDER`).
//!
//! Every field has a default that works on a developer machine with RabbitMQ on localhost, so
//! `kiln worker` runs with no file at all. Unknown fields are an error: a misspelt setting must not
//! silently keep its default. `config/kiln.example.toml` lists every setting.

use std::path::{Path, PathBuf};

use anyhow::Context;
use secrecy::SecretString;
use serde::Deserialize;

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
    pub scheduling: crate::scheduling::SchedulingSettings,
    /// Per-request limits that do not depend on the model.
    pub limits: RequestLimits,
    /// Per-user rate limits and quotas by tier (Redis).
    pub rate_limit: crate::rate_limit::RateLimitSettings,
    /// This worker's identity and shutdown behaviour.
    pub worker: WorkerSettings,
    /// Logs.
    pub telemetry: TelemetrySettings,
    /// The operators' HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
    pub http: crate::observability::HttpSettings,
    /// The fleet heartbeat on `<prefix>.heartbeat`.
    pub heartbeat: crate::observability::HeartbeatSettings,
    /// GPU telemetry from NVML.
    pub gpu: crate::observability::GpuSettings,
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
}

/// The broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://` or `amqps://`; it may carry credentials, so it is never logged.
    /// Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: SecretString,
    /// Unacknowledged deliveries this worker holds at once (`basic.qos`). Default 16: enough to keep
    /// the inference thread fed while replies are being confirmed.
    pub prefetch: u16,
    /// Names and arguments of the queues and exchanges.
    pub topology: TopologySettings,
    /// How startup and reconnection retry an unreachable broker.
    pub reconnect: BackoffSettings,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            prefetch: 16,
            topology: TopologySettings::default(),
            reconnect: BackoffSettings::default(),
        }
    }
}

/// Queue and exchange names (all derived from one prefix) and their arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologySettings {
    /// Prefix of every name: `<prefix>.requests`, `<prefix>.results`, `<prefix>.dlx`,
    /// `<prefix>.dead-letter`. Default `kiln`.
    pub prefix: String,
    /// Deliveries of one request (first one included) before the broker dead-letters it, so a
    /// request that keeps crashing workers cannot loop forever. Default 3.
    pub delivery_limit: u32,
}

impl Default for TopologySettings {
    fn default() -> Self {
        Self {
            prefix: "kiln".into(),
            delivery_limit: 3,
        }
    }
}

/// Exponential backoff.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffSettings {
    /// First wait. Default 250 ms.
    pub initial_ms: u64,
    /// Longest wait. Default 10 s.
    pub max_ms: u64,
    /// Give up after this many failed attempts; 0 retries forever (default: under Kubernetes the
    /// pod stays not-ready and says why in its logs).
    pub max_attempts: u32,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        Self {
            initial_ms: 250,
            max_ms: 10_000,
            max_attempts: 0,
        }
    }
}

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProviderKind {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// NVIDIA GPUs through ONNX Runtime's CUDA provider (needs the `onnxruntime-gpu` library).
    Cuda,
}

/// What to do when the requested execution provider cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Refuse to start (default): a GPU worker silently running on CPU is worse than a crash.
    #[default]
    None,
    /// Run on CPU, with an error in the log at startup.
    Cpu,
}

/// ONNX Runtime.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceSettings {
    /// `cpu` (default) or `cuda`.
    pub execution_provider: ExecutionProviderKind,
    /// `none` (default) or `cpu`: whether a failed CUDA start may fall back to CPU.
    pub fallback: Fallback,
    /// Path of `libonnxruntime.so.1.31.1`. Default: `runtime/onnxruntime-1.31.1-<cpu|cuda>/`
    /// under the current directory, where `scripts/fetch-onnxruntime.sh` puts it.
    pub runtime_library: Option<PathBuf>,
    /// Threads inside one operator; 0 lets ONNX Runtime choose (one per physical core). Default 0.
    /// On a CPU worker that shares its cores with decoding, PNG and the broker client, one fewer
    /// than the cores keeps the model's speed, and so paid latency, steady under a flood
    /// (BENCHMARKS.md, priority under overload).
    pub intra_threads: usize,
    /// Let ONNX Runtime's threads busy-wait between operators. Default false: decoding and PNG
    /// encoding share the cores with inference, and spinning threads starve them (BENCHMARKS.md).
    pub intra_op_spinning: bool,
    /// Jobs waiting for the inference thread before producers of work wait. Default 32.
    pub queue_capacity: usize,
    /// CUDA provider options (used when `execution_provider = "cuda"`).
    pub cuda: CudaSettings,
}

impl Default for InferenceSettings {
    fn default() -> Self {
        Self {
            execution_provider: ExecutionProviderKind::Cpu,
            fallback: Fallback::None,
            runtime_library: None,
            intra_threads: 0,
            intra_op_spinning: false,
            queue_capacity: 32,
            cuda: CudaSettings::default(),
        }
    }
}

impl InferenceSettings {
    /// The ONNX Runtime library to load: the configured path, or the default for the provider.
    pub fn runtime_library_path(&self) -> PathBuf {
        self.runtime_library.clone().unwrap_or_else(|| {
            let flavor = match self.execution_provider {
                ExecutionProviderKind::Cpu => "cpu",
                ExecutionProviderKind::Cuda => "cuda",
            };
            PathBuf::from(format!(
                "runtime/onnxruntime-{ORT_VERSION}-{flavor}/libonnxruntime.so.{ORT_VERSION}"
            ))
        })
    }
}

/// The ONNX Runtime release kiln is built and tested against (ort 2.0.0-rc.15 targets 1.31).
pub const ORT_VERSION: &str = "1.31.1";

/// How cuDNN picks convolution algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgorithmSearch {
    /// Benchmark every algorithm once per shape (slow first run, fastest after). Default.
    #[default]
    Exhaustive,
    /// cuDNN's heuristics, no benchmarking.
    Heuristic,
    /// cuDNN's default algorithm.
    Default,
}

/// How the CUDA memory arena grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArenaExtendStrategy {
    /// Double each time (default): few allocations.
    #[default]
    NextPowerOfTwo,
    /// Exactly what is asked: least memory.
    SameAsRequested,
}

/// The CUDA provider options that matter for this workload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CudaSettings {
    /// GPU ordinal. Default 0.
    pub device_id: i32,
    /// Cap on the provider's memory arena in bytes; 0 means no cap. Default 0.
    pub memory_limit_bytes: usize,
    /// Arena growth. Default `next_power_of_two`.
    pub arena_extend_strategy: ArenaExtendStrategy,
    /// Convolution algorithm search. Default `exhaustive`.
    pub conv_algorithm_search: ConvAlgorithmSearch,
    /// Let cuDNN use as much workspace as the fastest algorithm wants. Default true.
    pub conv_use_max_workspace: bool,
    /// Allow TF32 tensor-core math for fp32 convolutions (faster, ~10 mantissa bits). Default false.
    pub tf32: bool,
    /// Batches of style bank models go to the GPU from page-locked (pinned) host memory through an
    /// IoBinding, and their outputs come back into it: DMA copies instead of staged ones from
    /// pageable memory. Default false until measured on a GPU (BENCHMARKS.md, GPU).
    pub pinned_io: bool,
}

impl Default for CudaSettings {
    fn default() -> Self {
        Self {
            device_id: 0,
            memory_limit_bytes: 0,
            arena_extend_strategy: ArenaExtendStrategy::NextPowerOfTwo,
            conv_algorithm_search: ConvAlgorithmSearch::Exhaustive,
            conv_use_max_workspace: true,
            tf32: false,
            pinned_io: false,
        }
    }
}

/// The model registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Folder holding one sub-folder per model, each with a `manifest.toml`. Default `models`.
    pub dir: PathBuf,
    /// Models to load, by name. Default: `multistyle26`, `arbitrary-style`.
    pub enabled: Vec<String>,
    /// Run each model once at startup so the first request does not pay for lazy initialisation.
    /// Default true.
    pub warmup: bool,
    /// Serve a variant of a model instead of its default file, by model name: a variant its
    /// manifest lists under `[pipeline.variants]` (e.g. `multistyle26 = "fp16"`). Default none.
    pub variants: std::collections::BTreeMap<String, String>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models"),
            enabled: vec!["multistyle26".into(), "arbitrary-style".into()],
            warmup: true,
            variants: Default::default(),
        }
    }
}

/// Dynamic batching: defaults for every model, and overrides by model name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSettings {
    /// Most requests in one model run; 0 (default) chooses by execution provider, as measured
    /// (BENCHMARKS.md): 16 on CUDA (H200, 256 px: 4.6× the images/s of batch 1), 1 on CPU (no
    /// throughput gain from batching there, and a batch holds back the next tier's request).
    pub max_batch_size: usize,
    /// Longest a request waits for others to share its batch when the device is idle. Under load
    /// the device is never idle and batches fill without waiting. Default 2 ms.
    pub max_queue_delay_ms: u64,
    /// Tensor sides are padded (reflect) up to a multiple of this many pixels, so requests of
    /// nearby sizes can share a batch; a multiple of the model's `limits.multiple_of`, or 0 for
    /// exactly that multiple. Default 0: for the style models coarser padding changes the whole
    /// picture (PSNR 20–25 dB at bucket 32, BENCHMARKS.md), so only equal sizes batch together.
    pub shape_bucket: u32,
    /// Per-model overrides, by model name (`[batching.models.multistyle26]`).
    pub models: std::collections::BTreeMap<String, ModelBatching>,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self {
            max_batch_size: 0,
            max_queue_delay_ms: 2,
            shape_bucket: 0,
            models: Default::default(),
        }
    }
}

/// One model's batching overrides; what is not given comes from `[batching]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelBatching {
    /// See [`BatchingSettings::max_batch_size`].
    pub max_batch_size: Option<usize>,
    /// See [`BatchingSettings::max_queue_delay_ms`].
    pub max_queue_delay_ms: Option<u64>,
    /// See [`BatchingSettings::shape_bucket`].
    pub shape_bucket: Option<u32>,
}

impl BatchingSettings {
    /// The batch limits for a model on a device with (`gpu`) or without a GPU.
    pub fn limits(&self, model: &str, gpu: bool) -> crate::inference::BatchLimits {
        let own = self.models.get(model).cloned().unwrap_or_default();
        let size = match own.max_batch_size.unwrap_or(self.max_batch_size) {
            0 if gpu => 16,
            0 => 1,
            n => n,
        };
        crate::inference::BatchLimits {
            max_batch_size: size,
            max_queue_delay: std::time::Duration::from_millis(
                own.max_queue_delay_ms.unwrap_or(self.max_queue_delay_ms),
            ),
        }
    }

    /// The shape bucket for a model.
    pub fn shape_bucket(&self, model: &str) -> u32 {
        self.models
            .get(model)
            .and_then(|m| m.shape_bucket)
            .unwrap_or(self.shape_bucket)
    }
}

/// Limits applied before a request is even parsed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLimits {
    /// Largest request body accepted, in bytes. Default 32 MiB.
    pub max_message_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 32 * 1024 * 1024,
        }
    }
}

/// This worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Name in replies and logs. Default: `$HOSTNAME` (the pod name on Kubernetes) and the process id.
    pub id: Option<String>,
    /// On SIGTERM, how long in-flight requests may take to finish before the worker exits anyway
    /// (unfinished ones are redelivered by the broker). Default 25 s, inside Kubernetes' default 30 s.
    pub shutdown_grace_ms: u64,
    /// Threads for decoding, resizing and PNG encoding; 0 means one per CPU. Default 0.
    pub cpu_threads: usize,
    /// Nice value of those threads (0 normal, 19 lowest), so they never take cores from inference.
    /// Default 10.
    pub cpu_nice: i32,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: None,
            shutdown_grace_ms: 25_000,
            cpu_threads: 0,
            cpu_nice: 10,
        }
    }
}

impl WorkerSettings {
    /// The configured id, or one made from the host name and process id.
    pub fn resolved_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "kiln".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, readable text when it is. Default.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Format. Default `auto`.
    pub format: LogFormat,
    /// `tracing` filter directives; `RUST_LOG` wins when set. Default `info,ort=warn` (ONNX Runtime
    /// is chatty at info).
    pub filter: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            filter: "info,ort=warn".into(),
        }
    }
}

/// Deliberate faults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSettings {
    /// Abort the process after inference, before the reply is published: the crash window that
    /// ack-after-confirm exists for. Default false.
    pub abort_before_reply: bool,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use secrecy::ExposeSecret;

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
