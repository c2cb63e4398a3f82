//! The inference thread's loop: take in jobs, expire the late, run the batch the batcher picks,
//! answer each job through its oneshot.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::load::Runners;
use super::steps::Steps;
use super::{InferenceError, Inferred, JobOptions};
use crate::inference::batcher::{BatchKey, Batchable, Batcher, Next};
use crate::inference::pipeline::{ModelInput, Runner};

/// One request on its way through the inference thread.
pub(super) struct Job {
    pub(super) model: String,
    pub(super) input: ModelInput,
    pub(super) options: JobOptions,
    pub(super) arrived: Instant,
    pub(super) span: tracing::Span,
    pub(super) reply: oneshot::Sender<Result<Inferred, InferenceError>>,
}

impl Batchable for Job {
    fn key(&self) -> BatchKey {
        BatchKey {
            model: self.model.clone(),
            shape: self.input.shape(),
            group: self.input.group(),
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

/// The thread's loop: take in requests, expire the late, run the next batch (or, with step-level
/// batching, one tick of the multi-step models and then any whole-request batch that is ready),
/// answer each request.
pub(super) fn serve(mut runners: Runners, batcher: Batcher<Job>, steps: Option<Steps>, mut queue: mpsc::Receiver<Job>) {
    // Waiting for a request *or* a batch's delay to pass needs a timer: a small runtime of its own.
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime with a timer");
    let mut waiting = Waiting { batcher, steps };
    let stepwise: std::collections::HashSet<String> = runners
        .iter_mut()
        .filter_map(|(name, runner)| runner.stepper().map(|_| name.clone()))
        .collect();
    let mut open = true;
    loop {
        while let Ok(job) = queue.try_recv() {
            waiting.push(job, &stepwise);
        }
        let now = Instant::now();
        for job in waiting.batcher.take_expired(now) {
            let late = job.options.deadline.map_or(0.0, |d| (now - d).as_secs_f64());
            crate::metrics::record_expired("batcher");
            let _ = job.reply.send(Err(InferenceError::Expired(late)));
        }
        if let Some(steps) = waiting.steps.as_mut().filter(|s| s.busy()) {
            steps.tick(&mut runners);
            // Whole-request models take their turn between ticks, without waiting for company.
            if let Next::Run(batch) = waiting.batcher.next(Instant::now(), false) {
                run_batch(&mut runners, batch);
            }
            continue;
        }
        match waiting.batcher.next(now, !open) {
            Next::Run(batch) => run_batch(&mut runners, batch),
            Next::WaitUntil(at) => {
                let wait = at.saturating_duration_since(now);
                match timer.block_on(async { tokio::time::timeout(wait, queue.recv()).await }) {
                    Ok(Some(job)) => waiting.push(job, &stepwise),
                    Ok(None) => open = false,
                    Err(_) => {}
                }
            }
            Next::Empty if !open => break,
            Next::Empty => match queue.blocking_recv() {
                Some(job) => waiting.push(job, &stepwise),
                None => open = false,
            },
        }
    }
}

/// Where a job waits: the step-level scheduler for a multi-step model (when on), else the batcher.
struct Waiting {
    batcher: Batcher<Job>,
    steps: Option<Steps>,
}

impl Waiting {
    fn push(&mut self, job: Job, stepwise: &std::collections::HashSet<String>) {
        match self.steps.as_mut() {
            Some(steps) if stepwise.contains(&job.model) => steps.push(job),
            _ => self.batcher.push(job),
        }
    }
}

/// Run one batch and answer every request in it. A failed batch is retried one request at a time,
/// so one bad input fails alone.
fn run_batch(runners: &mut Runners, batch: Vec<Job>) {
    let started = Instant::now();
    let size = batch.len();
    let model = batch[0].model.clone();
    let span = tracing::debug_span!("batch", model = %model, size);
    let _entered = span.enter();
    let inputs: Vec<&ModelInput> = batch.iter().map(|j| &j.input).collect();
    let result = match runners.get_mut(&model) {
        None => Err(format!("model {model:?} is not loaded")),
        Some(runner) => run_guarded(runner.as_mut(), &inputs),
    };
    let elapsed = started.elapsed();
    match result {
        Ok(outputs) => {
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
                run_batch(runners, vec![job]);
            }
        }
    }
}

/// A panic inside one run must not take the thread, and every later request, with it.
fn run_guarded(runner: &mut dyn Runner, inputs: &[&ModelInput]) -> Result<Vec<Vec<f32>>, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| runner.run(inputs))) {
        Ok(Ok(outputs)) if outputs.len() == inputs.len() => Ok(outputs),
        Ok(Ok(outputs)) => Err(format!("{} outputs for {} inputs", outputs.len(), inputs.len())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the model run panicked".into()),
    }
}
