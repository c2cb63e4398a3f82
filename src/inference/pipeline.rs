//! The seam between kiln and a model kind: what a kind provides, and the plain data that passes
//! between the worker's threads and the inference thread.
//!
//! A kind (`pipelines/<kind>.rs`) implements [`Pipeline`] on its manifest section:
//!
//! - [`Pipeline::check`]: what can be checked without decoding (any thread, before admission), and
//!   the [`Work`] the request asks for (its price); [`Pipeline::output_size`]: the result's size;
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
use crate::domain::{GenerationInfo, GenerationRequest, RequestError, Work};

/// What a model kind provides. Implemented on the kind's manifest section (its spec).
pub trait Pipeline: Send + Sync {
    /// The checks that need no decoding (parameters this kind takes, headers of images), and the
    /// work the request asks for, which its cost follows from.
    fn check(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Work, RequestError>;

    /// The size of the image the request will get (with the worker's overload cap), without
    /// decoding anything.
    fn output_size(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<(u32, u32), RequestError>;

    /// For a multi-step kind, the denoising steps of the schedule the request asks for (its own or
    /// the model's default), without decoding anything: what admission's overload steps cap is
    /// weighed against. `None` for single-pass kinds, and for a request the kind would refuse.
    fn planned_steps(&self, _manifest: &Manifest, _request: &GenerationRequest) -> Option<u32> {
        None
    }

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

    /// A multi-step kind's step-level interface (see [`StepRunner`]); `None` for single-pass kinds.
    fn stepper(&mut self) -> Option<&mut dyn StepRunner> {
        None
    }
}

/// A multi-step kind run one step at a time, so requests join and leave a running batch between
/// steps (step-level batching, `inference.step_batching`). The engine keeps each request's
/// [`StepRow`] between calls: it can run, wait paused, or be dropped at any step boundary.
pub trait StepRunner {
    /// Everything before the first step for these requests (one input each, one shape), batched:
    /// one row each, in order.
    fn begin(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Box<dyn StepRow>>, String>;

    /// One step for every row, in one network call where the model allows it (each row at its own
    /// step). Every row given has steps left.
    fn step(&mut self, rows: &mut [&mut dyn StepRow]) -> Result<(), String>;

    /// The output of finished rows (one sample each, in order), batched.
    fn finish(&mut self, rows: &[&dyn StepRow]) -> Result<Vec<Vec<f32>>, String>;

    /// Whether rows at different steps can share one network call (the model takes a timestep per
    /// row). When not, [`StepRunner::step`] is only given rows with equal [`StepRow::step_key`].
    fn mixed_steps(&self) -> bool;
}

/// One request between steps, opaque to the engine but for what it needs to schedule it.
pub trait StepRow: Any + Send {
    /// Steps run so far.
    fn done(&self) -> u32;
    /// Steps it runs in all.
    fn total(&self) -> u32;
    /// Rows of the network it takes per step (guidance doubles them).
    fn network_rows(&self) -> usize;
    /// Rows with equal keys are at the same timestep (they can share a call with any model).
    fn step_key(&self) -> u64;
    /// Memory its state holds, in bytes (what pausing it keeps).
    fn bytes(&self) -> usize;
    /// As `Any`, for the runner to get its own type back.
    fn as_any(&self) -> &dyn Any;
    /// As `Any`, mutably.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A request made ready for its model: the tensors, and what turns the output into the result.
#[derive(Debug)]
pub struct Prepared {
    /// Goes to the inference thread.
    pub input: ModelInput,
    /// Stays with the request until the output comes back.
    pub finish: Finish,
    /// For the reply of a generative kind: what was done (task, seed, steps, truncation).
    pub generation: Option<GenerationInfo>,
}

/// A kind's input for one request, opaque to everything but the kind's runner. Requests batch
/// together only when their model, [`ModelInput::shape`] and [`ModelInput::group`] are equal.
pub struct ModelInput {
    shape: (u32, u32),
    group: u64,
    steps: u32,
    data: Box<dyn Any + Send>,
}

impl std::fmt::Debug for ModelInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelInput")
            .field("shape", &self.shape)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl ModelInput {
    /// `data` (a kind's own input type) with its tensor size (width, height).
    pub fn new<T: Any + Send>(shape: (u32, u32), data: T) -> Self {
        Self {
            shape,
            group: 0,
            steps: 1,
            data: Box::new(data),
        }
    }

    /// The same input, in batch group `group`: what besides the shape must agree for requests to
    /// share a model run (a diffusion kind's scheduler, step count and first step). 0 by default.
    pub fn with_group(mut self, group: u64) -> Self {
        self.group = group;
        self
    }

    /// The same input, for a multi-step kind that runs `steps` network steps (what the step-level
    /// scheduler's deadline estimate counts). 1 by default.
    pub fn with_steps(mut self, steps: u32) -> Self {
        self.steps = steps.max(1);
        self
    }

    /// Network steps it runs.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// The tensor size (width, height).
    pub fn shape(&self) -> (u32, u32) {
        self.shape
    }

    /// The batch group (see [`ModelInput::with_group`]).
    pub fn group(&self) -> u64 {
        self.group
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
