//! Everything between a parsed request and an RGB result.
//!
//! - [`manifest`]: what a model is (files, tensors, limits), read from `models/<name>/manifest.toml`.
//! - [`registry`]: the models this worker serves; turns a request into a [`Prepared`] input.
//! - [`pipeline`]: the seam a model kind implements (check, prepare, load a runner, run a batch);
//!   [`pipelines`]: the kinds, one file each.
//! - [`output_size`], [`finish`]: the result's size, and the output tensor back to an image.
//! - [`runtime`], [`tensor_io`]: ONNX Runtime, the execution provider (CPU or CUDA, never a silent
//!   fallback), how tensors are handed to it.
//! - [`engine`]: the dedicated inference thread that owns every session; [`batcher`]: which
//!   waiting requests run together, and which go first (tiers by weight).
//!
//! Preparation ([`ModelRegistry::prepare`]) and finishing ([`Finish::apply`]) are CPU work for
//! the CPU pool; only the model run happens on the inference thread.

pub mod batcher;
pub mod engine;
pub mod finish;
pub mod manifest;
pub mod output_size;
pub mod pipeline;
pub mod pipelines;
pub mod registry;
pub mod runtime;
pub mod settings;
pub mod tensor_io;

pub use batcher::{BatchKey, BatchLimits};
pub use engine::{
    EngineOptions, InferenceEngine, InferenceError, InferenceHandle, Inferred, JobOptions, StepCap, StepOptions,
    StepProgress,
};
pub use finish::Finish;
pub use manifest::Manifest;
pub use pipeline::{ModelInput, Pipeline, Prepared, Runner, StepRow, StepRunner};
pub use registry::ModelRegistry;
pub use runtime::{ActiveProvider, Runtime, StartupError};
