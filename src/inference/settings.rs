//! The `[inference]`, `[models]` and `[batching]` settings: ONNX Runtime and its execution
//! provider, which models to serve, and how requests are batched (16 on a GPU, 1 on a CPU unless
//! set).

use std::path::PathBuf;

use serde::Deserialize;

use super::batcher::BatchLimits;

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
    /// Models to load, by name. Default: the style models `multistyle26` and `arbitrary-style`, and
    /// the bundled tiny diffusion models `sd-tiny-random`, `pix2pix-tiny-random` and
    /// `lcm-tiny-random` (random weights: for demos and tests; docs/diffusion.md serves real ones).
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
            enabled: [
                "multistyle26",
                "arbitrary-style",
                "sd-tiny-random",
                "pix2pix-tiny-random",
                "lcm-tiny-random",
            ]
            .map(String::from)
            .to_vec(),
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
    /// How multi-step (diffusion) models batch (`[batching.diffusion]`).
    pub diffusion: StepBatchingSettings,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self {
            max_batch_size: 0,
            max_queue_delay_ms: 2,
            shape_bucket: 0,
            models: Default::default(),
            diffusion: StepBatchingSettings::default(),
        }
    }
}

/// `step`: requests join and leave the running batch between denoising steps; `request`: whole
/// requests batch together like any model (same scheduler and step count), for comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepMode {
    /// Step-level (continuous) batching.
    Step,
    /// Whole-request batching.
    Request,
}

/// `[batching.diffusion]`: step-level batching of diffusion models.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StepBatchingSettings {
    /// `step` (default) or `request`.
    pub mode: StepMode,
    /// Most requests stepping together by image size, `[{ max_pixels = 262144, max_requests = 16 }]`,
    /// smallest first; larger images run one at a time. Empty (default): by execution provider, from
    /// measurement (BENCHMARKS.md): on CUDA 16 up to 512² (3.2× the image-steps/s of one request on
    /// an H200), 4 up to 768², 1 above (one 1024² request already fills the GPU: 1.02× at 2); on CPU
    /// 2 up to 256², 1 above (a CPU gains little: 42.3 vs 39.9 ms per image-step at 1 and 2). The
    /// trade-off (discrete-event simulation, BENCHMARKS.md): a full step of 16 takes 5× one
    /// request's, so at 16 few requests finish within 3× their unloaded time; 6 gets the most
    /// within that SLO but a third less throughput, and under 2× overload the paid tiers' p99 then
    /// grows from 11× to 75× unloaded. The default keeps throughput; set 6 for latency-bound traffic.
    pub caps: Vec<crate::inference::StepCap>,
    /// Times one request may be paused for a higher tier's request. Default 1: a free request is
    /// paused at most once, so it always finishes.
    pub max_pauses: u32,
    /// Memory paused requests may hold (latents, embeddings, scheduler state), in MiB. Default 512.
    pub max_paused_mb: usize,
}

impl Default for StepBatchingSettings {
    fn default() -> Self {
        Self {
            mode: StepMode::Step,
            caps: Vec::new(),
            max_pauses: 1,
            max_paused_mb: 512,
        }
    }
}

impl StepBatchingSettings {
    /// The step-level scheduler's options on a device with (`gpu`) or without a GPU.
    pub fn options(&self, gpu: bool) -> crate::inference::StepOptions {
        use crate::inference::StepCap;
        let caps = match (self.caps.is_empty(), gpu) {
            (false, _) => self.caps.clone(),
            (true, true) => vec![
                StepCap {
                    max_pixels: 512 * 512,
                    max_requests: 16,
                },
                StepCap {
                    max_pixels: 768 * 768,
                    max_requests: 4,
                },
            ],
            (true, false) => vec![StepCap {
                max_pixels: 256 * 256,
                max_requests: 2,
            }],
        };
        let mut caps = caps;
        caps.sort_by_key(|c| c.max_pixels);
        crate::inference::StepOptions {
            enabled: self.mode == StepMode::Step,
            caps,
            max_pauses: self.max_pauses,
            max_paused_bytes: self.max_paused_mb.saturating_mul(1 << 20),
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
    pub fn limits(&self, model: &str, gpu: bool) -> BatchLimits {
        let own = self.models.get(model).cloned().unwrap_or_default();
        let size = match own.max_batch_size.unwrap_or(self.max_batch_size) {
            0 if gpu => 16,
            0 => 1,
            n => n,
        };
        BatchLimits {
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
