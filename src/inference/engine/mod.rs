//! The inference thread: the only place sessions live and models run.
//!
//! Async tasks send a prepared [`ModelInput`] through a bounded channel together with a oneshot
//! for the answer (the shape of text-embeddings-inference's backend thread). The thread moves what
//! arrives into its [`Batcher`] and, whenever the device is free, runs the batch the batcher picks
//! (priority by tier, same model and shape, up to `max_batch_size`, waiting at most
//! `max_queue_delay` for company). Because the thread *pulls* a batch only when it is free, a busy
//! device gets full batches and an idle one gets requests with at most the configured delay.
//! Preparation of the next requests and PNG encoding of the last batch's results happen on other
//! threads meanwhile. Requests whose deadline passes while they wait are answered
//! [`InferenceError::Expired`] without a model run.
//!
//! Memory: the batcher holds every request handed to it; that number is bounded by the broker
//! prefetch of the worker's request queues (`amqp.prefetch` per queue).

mod load;
mod serve;
mod steps;

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use super::batcher::{BatchLimits, Batcher};
use super::manifest::Manifest;
use super::pipeline::ModelInput;
use super::runtime::{ActiveProvider, Runtime};
use super::ModelRegistry;
use crate::cancel::{StopFlag, StopReason};
use load::load_runners;
use serve::{serve, Job};
pub use steps::{StepCap, StepOptions};

/// Why a model run produced no output.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    /// The model failed on this input.
    #[error("the model run failed: {0}")]
    Failed(String),
    /// The request's deadline passed while it waited for the device; the device was not used.
    #[error("the deadline passed {0:.3} s before the device was free")]
    Expired(f64),
    /// The inference thread is gone (shutting down, or it died).
    #[error("the inference thread is not running")]
    Unavailable,
    /// The request was stopped (cancelled or abandoned) before it finished: at most one more step
    /// ran after the stop.
    #[error("stopped: {0:?}")]
    Stopped(StopReason),
    /// Its remaining steps cannot finish before its deadline at the measured step time: answered
    /// now rather than spending the steps.
    #[error("{steps_left} steps left at {step_seconds:.3} s each would finish {short_by:.3} s after the deadline")]
    WontFinish {
        /// Steps it still had to run.
        steps_left: u32,
        /// The measured time of one step of its batch key.
        step_seconds: f64,
        /// How late it would have finished.
        short_by: f64,
    },
}

/// A model's output for one request.
#[derive(Debug)]
pub struct Inferred {
    /// One output sample, in the model's layout.
    pub output: Vec<f32>,
    /// Time spent in the model run (of the whole batch).
    pub elapsed: Duration,
    /// Time between handing the request to the inference thread and its batch starting.
    pub waited: Duration,
    /// Requests in the batch this one ran in.
    pub batch_size: usize,
}

/// What the scheduler needs to know about a request besides its input.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// Priority class: an index into `scheduling`'s tier order (0 = the heaviest weight).
    pub class: usize,
    /// Rendering must start before this, or the request is answered `expired`. A multi-step
    /// request run step by step is also answered as soon as its remaining steps cannot finish
    /// before it ([`InferenceError::WontFinish`]).
    pub deadline: Option<Instant>,
    /// Set when the request is cancelled or abandoned: it stops before its next step.
    pub stop: StopFlag,
    /// For a multi-step request run step by step: where to send its progress after each step.
    pub progress: Option<mpsc::UnboundedSender<StepProgress>>,
}

/// A multi-step request's progress: `done` of `total` steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    /// Steps run.
    pub done: u32,
    /// Steps it runs in all.
    pub total: u32,
}

/// Sends work to the inference thread. Cheap to clone; the thread stops when every clone is gone.
#[derive(Debug, Clone)]
pub struct InferenceHandle {
    jobs: mpsc::Sender<Job>,
    provider: ActiveProvider,
}

impl InferenceHandle {
    /// Run `model` on `input` in the next batch that fits it, waiting (asynchronously) for a place
    /// in the queue and for the result.
    pub async fn infer(&self, model: &str, input: ModelInput, options: JobOptions) -> Result<Inferred, InferenceError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            model: model.to_owned(),
            input,
            options,
            arrived: Instant::now(),
            span: tracing::Span::current(),
            reply,
        };
        self.jobs.send(job).await.map_err(|_| InferenceError::Unavailable)?;
        answer.await.map_err(|_| InferenceError::Unavailable)?
    }

    /// The execution provider the models run on.
    pub fn provider(&self) -> ActiveProvider {
        self.provider
    }
}

/// How the inference thread batches and orders work.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Jobs that may wait in the channel to the thread before senders wait.
    pub queue_capacity: usize,
    /// Run each model once at startup (each batch size in `warmup_batch_sizes`).
    pub warmup: bool,
    /// Priority weight of each class (see [`JobOptions::class`]).
    pub class_weights: Vec<f64>,
    /// Batch limits per model.
    pub batch_limits: HashMap<String, BatchLimits>,
    /// Batch limits for models not in `batch_limits`.
    pub default_batch_limits: BatchLimits,
    /// Step-level batching of multi-step models.
    pub steps: StepOptions,
}

/// The running inference thread.
#[derive(Debug)]
pub struct InferenceEngine {
    handle: InferenceHandle,
    thread: JoinHandle<()>,
}

impl InferenceEngine {
    /// Start the thread: build a session for every model (and warm each one up at the batch sizes
    /// it will see), then serve batches. Returns once the models are loaded, or with the reason
    /// they could not be.
    pub fn start(registry: &ModelRegistry, runtime: Runtime, options: EngineOptions) -> anyhow::Result<Self> {
        let (jobs, queue) = mpsc::channel(options.queue_capacity.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let manifests: Vec<Manifest> = registry.iter().map(|m| Manifest::clone(m)).collect();
        let provider = runtime.provider();
        let thread = std::thread::Builder::new()
            .name("kiln-inference".into())
            .spawn(move || {
                let batcher = Batcher::new(
                    options.class_weights.clone(),
                    options.batch_limits.clone(),
                    options.default_batch_limits,
                );
                let runners = load_runners(&runtime, &manifests, options.warmup, |model| batcher.limits(model));
                let ok = runners.is_ok();
                match runners {
                    Ok(runners) => {
                        let _ = ready_tx.send(Ok(()));
                        let steps = options
                            .steps
                            .enabled
                            .then(|| steps::Steps::new(options.steps.clone(), options.class_weights.clone()));
                        serve(runners, batcher, steps, queue);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
                tracing::debug!(loaded = ok, "inference thread stopped");
            })
            .context("cannot spawn the inference thread")?;
        ready_rx
            .recv()
            .context("the inference thread died while loading models")??;
        Ok(Self {
            handle: InferenceHandle { jobs, provider },
            thread,
        })
    }

    /// A handle to send work.
    pub fn handle(&self) -> InferenceHandle {
        self.handle.clone()
    }

    /// Wait for the thread to finish. It finishes once every handle (this one included) is dropped,
    /// after the jobs already queued.
    pub fn join(self) {
        drop(self.handle);
        if self.thread.join().is_err() {
            tracing::error!("the inference thread panicked");
        }
    }
}
