//! The inference thread: the only place sessions live and models run.
//!
//! Async tasks send a [`ModelInput`] through a bounded channel together with a oneshot for the
//! answer (the shape of text-embeddings-inference's backend thread). The channel's bound is the
//! backpressure between request preparation and the device: when the thread is busy and the queue
//! is full, preparers wait instead of piling decoded images up in memory.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use super::arbitrary_style::ArbitraryStyleRunner;
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
    /// The inference thread is gone (shutting down, or it died).
    #[error("the inference thread is not running")]
    Unavailable,
}

/// A model's output for one request.
#[derive(Debug)]
pub struct Inferred {
    /// One output sample, in the model's layout.
    pub output: Vec<f32>,
    /// Time spent in the model run.
    pub elapsed: Duration,
}

struct Job {
    model: String,
    input: ModelInput,
    span: tracing::Span,
    reply: oneshot::Sender<Result<Inferred, InferenceError>>,
}

/// Sends work to the inference thread. Cheap to clone; the thread stops when every clone is gone.
#[derive(Debug, Clone)]
pub struct InferenceHandle {
    jobs: mpsc::Sender<Job>,
    provider: ActiveProvider,
}

impl InferenceHandle {
    /// Run `model` on `input`, waiting (asynchronously) for a place in the queue and for the result.
    pub async fn infer(&self, model: &str, input: ModelInput) -> Result<Inferred, InferenceError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            model: model.to_owned(),
            input,
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

/// The running inference thread.
#[derive(Debug)]
pub struct InferenceEngine {
    handle: InferenceHandle,
    thread: JoinHandle<()>,
}

impl InferenceEngine {
    /// Start the thread: build a session for every model (and warm each one up), then serve jobs.
    /// Returns once the models are loaded, or with the reason they could not be.
    pub fn start(
        registry: &ModelRegistry,
        runtime: Runtime,
        queue_capacity: usize,
        warmup: bool,
    ) -> anyhow::Result<Self> {
        let (jobs, queue) = mpsc::channel(queue_capacity.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let manifests: Vec<Manifest> = registry.iter().map(|m| Manifest::clone(m)).collect();
        let provider = runtime.provider();
        let thread = std::thread::Builder::new()
            .name("kiln-inference".into())
            .spawn(move || {
                let runners = load_runners(&runtime, &manifests, warmup);
                let ok = runners.is_ok();
                match runners {
                    Ok(runners) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(runners, queue);
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

enum Runner {
    StyleBank(StyleBankRunner),
    ArbitraryStyle(ArbitraryStyleRunner),
}

impl Runner {
    fn run(&mut self, input: &ModelInput) -> Result<Vec<f32>, String> {
        match (self, input) {
            (Self::StyleBank(r), ModelInput::StyleBank(i)) => Ok(r.run(&[i])?.swap_remove(0)),
            (Self::ArbitraryStyle(r), ModelInput::ArbitraryStyle(i)) => r.run(i),
            _ => Err("the input was prepared for another kind of model".into()),
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

fn load_runners(runtime: &Runtime, manifests: &[Manifest], warmup: bool) -> anyhow::Result<HashMap<String, Runner>> {
    let mut runners = HashMap::new();
    for manifest in manifests {
        let started = Instant::now();
        let mut runner = match &manifest.pipeline {
            PipelineSpec::StyleBank(spec) => {
                let session = runtime.session(&manifest.dir.join(&spec.file))?;
                Runner::StyleBank(StyleBankRunner::new(session, spec.clone())?)
            }
            PipelineSpec::ArbitraryStyle(spec) => {
                let predict = runtime.session(&manifest.dir.join(&spec.predict_file))?;
                let transform = runtime.session(&manifest.dir.join(&spec.transform_file))?;
                Runner::ArbitraryStyle(ArbitraryStyleRunner::new(predict, transform, spec.clone())?)
            }
        };
        if warmup {
            runner
                .run(&Runner::warmup_input(manifest))
                .map_err(|e| anyhow::anyhow!("warm-up run of {} failed: {e}", manifest.name))?;
        }
        crate::metrics::set_model_load_seconds(&manifest.name, started.elapsed().as_secs_f64());
        tracing::info!(
            model = %manifest.name,
            provider = runtime.provider().name(),
            load_seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        runners.insert(manifest.name.clone(), runner);
    }
    Ok(runners)
}

fn serve(mut runners: HashMap<String, Runner>, mut queue: mpsc::Receiver<Job>) {
    while let Some(job) = queue.blocking_recv() {
        let _entered = job.span.enter();
        let started = Instant::now();
        let result = match runners.get_mut(&job.model) {
            None => Err(InferenceError::Failed(format!("model {:?} is not loaded", job.model))),
            // A panic inside one run must not take the thread, and every later request, with it.
            Some(runner) => match std::panic::catch_unwind(AssertUnwindSafe(|| runner.run(&job.input))) {
                Ok(Ok(output)) => Ok(Inferred {
                    output,
                    elapsed: started.elapsed(),
                }),
                Ok(Err(e)) => Err(InferenceError::Failed(e)),
                Err(_) => Err(InferenceError::Failed("the model run panicked".into())),
            },
        };
        if result.is_ok() {
            crate::metrics::observe_batch(&job.model, 1, started.elapsed().as_secs_f64());
        }
        // The requester may have gone (its connection closed); the broker will redeliver.
        let _ = job.reply.send(result);
    }
}
