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

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use super::arbitrary_style::ArbitraryStyleRunner;
use super::batcher::{BatchKey, BatchLimits, Batchable, Batcher, Next};
use super::manifest::{Manifest, PipelineSpec};
use super::runtime::{ActiveProvider, Runtime};
use super::style_bank::{StyleBankInput, StyleBankRunner};
use super::{arbitrary_style::ArbitraryStyleInput, ModelInput, ModelRegistry};

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
#[derive(Debug, Clone, Copy)]
pub struct JobOptions {
    /// Priority class: an index into `scheduling`'s tier order (0 = the heaviest weight).
    pub class: usize,
    /// Rendering must start before this, or the request is answered `expired`.
    pub deadline: Option<Instant>,
}

struct Job {
    model: String,
    input: ModelInput,
    options: JobOptions,
    arrived: Instant,
    span: tracing::Span,
    reply: oneshot::Sender<Result<Inferred, InferenceError>>,
}

impl Batchable for Job {
    fn key(&self) -> BatchKey {
        BatchKey {
            model: self.model.clone(),
            shape: self.input.shape(),
        }
    }
    fn class(&self) -> usize {
        self.options.class
    }
    fn arrived(&self) -> Instant {
        self.arrived
    }
    fn deadline(&self) -> Option<Instant> {
        self.options.deadline
    }
}

/// Counters kept by the inference thread, readable from anywhere.
#[derive(Debug, Default)]
pub struct EngineStats {
    busy_nanos: AtomicU64,
    batches: AtomicU64,
    images: AtomicU64,
    expired: AtomicU64,
    waiting: AtomicU64,
}

/// A reading of [`EngineStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineSnapshot {
    /// Total time spent running models.
    pub busy: Duration,
    /// Model runs (batches).
    pub batches: u64,
    /// Requests rendered.
    pub images: u64,
    /// Requests answered `expired` by the batcher.
    pub expired: u64,
    /// Requests waiting in the batcher right now.
    pub waiting: u64,
}

impl EngineStats {
    /// The counters now.
    pub fn snapshot(&self) -> EngineSnapshot {
        EngineSnapshot {
            busy: Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed)),
            batches: self.batches.load(Ordering::Relaxed),
            images: self.images.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// Sends work to the inference thread. Cheap to clone; the thread stops when every clone is gone.
#[derive(Debug, Clone)]
pub struct InferenceHandle {
    jobs: mpsc::Sender<Job>,
    provider: ActiveProvider,
    stats: Arc<EngineStats>,
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

    /// Busy time, batches and images so far.
    pub fn stats(&self) -> EngineSnapshot {
        self.stats.snapshot()
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
        let stats = Arc::new(EngineStats::default());
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("kiln-inference".into())
            .spawn(move || {
                let batcher = Batcher::new(
                    options.class_weights.clone(),
                    options.batch_limits.clone(),
                    options.default_batch_limits,
                );
                let runners = load_runners(&runtime, &manifests, options.warmup.then_some(&batcher));
                let ok = runners.is_ok();
                match runners {
                    Ok(runners) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(runners, batcher, queue, &thread_stats);
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
            handle: InferenceHandle { jobs, provider, stats },
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

enum Runner {
    StyleBank(StyleBankRunner),
    ArbitraryStyle(ArbitraryStyleRunner),
}

impl Runner {
    /// Run a batch of inputs of one shape; one output per input, in order.
    fn run(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<f32>>, String> {
        match self {
            Self::StyleBank(r) => {
                let samples = inputs
                    .iter()
                    .map(|i| match i {
                        ModelInput::StyleBank(s) => Ok(s),
                        _ => Err("the input was prepared for another kind of model".to_owned()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                r.run(&samples)
            }
            // Its predictor and transform take one sample each: the batch runs one by one.
            Self::ArbitraryStyle(r) => inputs
                .iter()
                .map(|i| match i {
                    ModelInput::ArbitraryStyle(s) => r.run(s),
                    _ => Err("the input was prepared for another kind of model".to_owned()),
                })
                .collect(),
        }
    }

    /// A small input of the right kind, to make ONNX Runtime finish its lazy initialisation.
    fn warmup_input(manifest: &Manifest) -> ModelInput {
        match &manifest.pipeline {
            PipelineSpec::StyleBank(spec) => {
                let side = manifest
                    .limits
                    .min_side
                    .max(64)
                    .next_multiple_of(manifest.limits.multiple_of);
                let mut weights = vec![0.0; spec.styles];
                weights[0] = 1.0;
                ModelInput::StyleBank(StyleBankInput {
                    image: vec![0.5; 3 * side as usize * side as usize],
                    weights,
                    width: side,
                    height: side,
                })
            }
            PipelineSpec::ArbitraryStyle(spec) => ModelInput::ArbitraryStyle(ArbitraryStyleInput {
                content: vec![0.5; 3 * (spec.content_size as usize).pow(2)],
                style: vec![0.5; 3 * (spec.style_size as usize).pow(2)],
                own_style: None,
                strength: 1.0,
            }),
        }
    }
}

fn load_runners(
    runtime: &Runtime,
    manifests: &[Manifest],
    warmup: Option<&Batcher<Job>>,
) -> anyhow::Result<HashMap<String, Runner>> {
    let mut runners = HashMap::new();
    for manifest in manifests {
        let started = Instant::now();
        let mut runner = match &manifest.pipeline {
            PipelineSpec::StyleBank(spec) => {
                let session = runtime.session(&manifest.dir.join(&spec.file))?;
                Runner::StyleBank(StyleBankRunner::new(session, spec.clone(), runtime.tensor_io())?)
            }
            PipelineSpec::ArbitraryStyle(spec) => {
                let predict = runtime.session(&manifest.dir.join(&spec.predict_file))?;
                let transform = runtime.session(&manifest.dir.join(&spec.transform_file))?;
                Runner::ArbitraryStyle(ArbitraryStyleRunner::new(predict, transform, spec.clone())?)
            }
        };
        if let Some(batcher) = warmup {
            // Once alone and once at the largest batch: ONNX Runtime (and CUDA's algorithm search)
            // prepares per shape, and the first request of each should not pay for it.
            let max = batcher.limits(&manifest.name).max_batch_size;
            let sizes = if matches!(runner, Runner::StyleBank(_)) && max > 1 {
                vec![1, max]
            } else {
                vec![1]
            };
            for n in sizes {
                let inputs: Vec<ModelInput> = (0..n).map(|_| Runner::warmup_input(manifest)).collect();
                let refs: Vec<&ModelInput> = inputs.iter().collect();
                runner
                    .run(&refs)
                    .map_err(|e| anyhow::anyhow!("warm-up run of {} (batch {n}) failed: {e}", manifest.name))?;
            }
        }
        crate::metrics::set_model_load_seconds(&manifest.name, started.elapsed().as_secs_f64());
        crate::metrics::set_model_info(&manifest.name, manifest.variant.as_deref().unwrap_or("default"));
        tracing::info!(
            model = %manifest.name,
            variant = manifest.variant.as_deref().unwrap_or("default"),
            files = ?manifest.files_in_use(),
            provider = runtime.provider().name(),
            load_seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        runners.insert(manifest.name.clone(), runner);
    }
    Ok(runners)
}

/// The thread's loop: take in requests, expire the late, run the next batch, answer each request.
fn serve(
    mut runners: HashMap<String, Runner>,
    mut batcher: Batcher<Job>,
    mut queue: mpsc::Receiver<Job>,
    stats: &EngineStats,
) {
    // Waiting for a request *or* a batch's delay to pass needs a timer: a small runtime of its own.
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime with a timer");
    let mut open = true;
    loop {
        while let Ok(job) = queue.try_recv() {
            batcher.push(job);
        }
        let now = Instant::now();
        for job in batcher.take_expired(now) {
            let late = job.options.deadline.map_or(0.0, |d| (now - d).as_secs_f64());
            stats.expired.fetch_add(1, Ordering::Relaxed);
            let _ = job.reply.send(Err(InferenceError::Expired(late)));
        }
        stats.waiting.store(batcher.len() as u64, Ordering::Relaxed);
        match batcher.next(now, !open) {
            Next::Run(batch) => run_batch(&mut runners, batch, stats),
            Next::WaitUntil(at) => {
                let wait = at.saturating_duration_since(now);
                match timer.block_on(async { tokio::time::timeout(wait, queue.recv()).await }) {
                    Ok(Some(job)) => batcher.push(job),
                    Ok(None) => open = false,
                    Err(_) => {}
                }
            }
            Next::Empty if !open => break,
            Next::Empty => match queue.blocking_recv() {
                Some(job) => batcher.push(job),
                None => open = false,
            },
        }
    }
}

/// Run one batch and answer every request in it. A failed batch is retried one request at a time,
/// so one bad input fails alone.
fn run_batch(runners: &mut HashMap<String, Runner>, batch: Vec<Job>, stats: &EngineStats) {
    let started = Instant::now();
    let size = batch.len();
    let model = batch[0].model.clone();
    let span = tracing::debug_span!("batch", model = %model, size);
    let _entered = span.enter();
    let inputs: Vec<&ModelInput> = batch.iter().map(|j| &j.input).collect();
    let result = match runners.get_mut(&model) {
        None => Err(format!("model {model:?} is not loaded")),
        Some(runner) => run_guarded(runner, &inputs),
    };
    let elapsed = started.elapsed();
    stats.busy_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(outputs) => {
            stats.images.fetch_add(size as u64, Ordering::Relaxed);
            crate::metrics::observe_batch(&model, size, elapsed.as_secs_f64());
            for (job, output) in batch.into_iter().zip(outputs) {
                let inferred = Inferred {
                    output,
                    elapsed,
                    waited: started.saturating_duration_since(job.arrived),
                    batch_size: size,
                };
                // The requester may have gone (its connection closed); the broker will redeliver.
                let _ = job.reply.send(Ok(inferred));
            }
        }
        Err(error) if size == 1 => {
            let job = batch.into_iter().next().expect("one job");
            let _entered = job.span.enter();
            tracing::warn!(error = %error, "the model run failed");
            let _ = job.reply.send(Err(InferenceError::Failed(error)));
        }
        Err(error) => {
            tracing::warn!(error = %error, size, "a batch failed; running its requests one by one");
            for job in batch {
                run_batch(runners, vec![job], stats);
            }
        }
    }
}

/// A panic inside one run must not take the thread, and every later request, with it.
fn run_guarded(runner: &mut Runner, inputs: &[&ModelInput]) -> Result<Vec<Vec<f32>>, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| runner.run(inputs))) {
        Ok(Ok(outputs)) if outputs.len() == inputs.len() => Ok(outputs),
        Ok(Ok(outputs)) => Err(format!("{} outputs for {} inputs", outputs.len(), inputs.len())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the model run panicked".into()),
    }
}
