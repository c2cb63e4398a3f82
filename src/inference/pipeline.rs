//! The seam between kiln and a model kind: what a kind provides, and the plain data that passes
//! between the worker's threads and the inference thread.
//!
//! A kind (`pipelines/<kind>.rs`) implements [`Pipeline`] on its manifest section:
//!
//! - [`Pipeline::check`]: what can be checked without decoding (any thread, before admission);
//! - [`Pipeline::prepare`]: decode, resize and lay out one request (CPU pool) into a [`Prepared`]:
//!   a [`ModelInput`] for the inference thread and a [`Finish`] that stays with the request;
//! - [`Pipeline::load`]: build its [`Runner`] on the inference thread from the runtime's sessions;
//! - [`Pipeline::batches`] and [`Pipeline::warmup_input`]: what the engine needs to batch and warm
//!   it up.
//!
//! The registry, the engine and the worker only see these traits; [`PipelineSpec::pipeline`] is
//! the one place that maps a manifest's `kind` to its implementation.
//!
//! [`PipelineSpec::pipeline`]: super::manifest::PipelineSpec::pipeline

use std::any::Any;

use super::finish::Finish;
use super::manifest::Manifest;
use super::runtime::Runtime;
use crate::domain::{GenerationRequest, RequestError};

/// What a model kind provides. Implemented on the kind's manifest section (its spec).
pub trait Pipeline: Send + Sync {
    /// The checks that need no decoding (parameters this kind takes, headers of extra images).
    fn check(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<(), RequestError>;

    /// Decode, check, resize and lay out one request. CPU-bound: runs on the CPU pool.
    fn prepare(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Prepared, RequestError>;

    /// Build the runner: sessions from `runtime`, checked against the manifest's tensor names.
    /// Runs on the inference thread, which owns the result.
    fn load(&self, manifest: &Manifest, runtime: &Runtime) -> anyhow::Result<Box<dyn Runner>>;

    /// Whether one model run can take several requests (else `batching` does not apply: batches
    /// of one, no waiting for company).
    fn batches(&self) -> bool;

    /// A small valid input, to make ONNX Runtime finish its lazy initialisation at startup.
    fn warmup_input(&self, manifest: &Manifest) -> ModelInput;
}

/// A kind's sessions on the inference thread.
pub trait Runner {
    /// Run a batch of inputs of one shape (this kind's, from its [`Pipeline::prepare`]); one output
    /// sample per input, in order.
    fn run(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<f32>>, String>;
}

/// A request made ready for its model: the tensors, and what turns the output into the result.
#[derive(Debug)]
pub struct Prepared {
    /// Goes to the inference thread.
    pub input: ModelInput,
    /// Stays with the request until the output comes back.
    pub finish: Finish,
}

/// A kind's input for one request, opaque to everything but the kind's runner. Requests batch
/// together only when their model and [`ModelInput::shape`] are equal.
pub struct ModelInput {
    shape: (u32, u32),
    data: Box<dyn Any + Send>,
}

impl std::fmt::Debug for ModelInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelInput")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl ModelInput {
    /// `data` (a kind's own input type) with its tensor size (width, height).
    pub fn new<T: Any + Send>(shape: (u32, u32), data: T) -> Self {
        Self {
            shape,
            data: Box::new(data),
        }
    }

    /// The tensor size (width, height).
    pub fn shape(&self) -> (u32, u32) {
        self.shape
    }

    /// The data, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.data.downcast_ref()
    }
}

/// The batch as the runner's own input type; an input prepared for another kind is an error.
pub fn inputs_of<'a, T: Any>(inputs: &[&'a ModelInput]) -> Result<Vec<&'a T>, String> {
    inputs
        .iter()
        .map(|input| {
            input
                .get::<T>()
                .ok_or_else(|| "the input was prepared for another kind of model".to_owned())
        })
        .collect()
}
