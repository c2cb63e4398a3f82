//! Step-level batching for multi-step models (diffusion): the inference thread keeps a running set
//! of requests, each with its own state between steps ([`StepRow`]), and every tick:
//!
//! 1. drops the requests that were stopped (cancelled, abandoned) or that can no longer finish
//!    before their deadline at the measured step time, waiting or running, with a final answer;
//! 2. takes newcomers in, in the batcher's fair order by tier weight, while their batch key (model
//!    and size) has room under its cap; when the lead waiter's key is full and a row of a lower tier
//!    runs there, that row is paused (its state kept, counted against `max_paused_bytes`; each
//!    request is paused at most `max_pauses` times, so the lowest tier always finishes) and waits
//!    at the head of its tier to resume;
//! 3. starts the newcomers (text encoder, first latents: one batched call per model and size);
//! 4. runs ONE step of every key's running rows, each row at its own step (one network call; where
//!    the export takes one timestep per call, one call per group of rows at equal timesteps);
//! 5. decodes the rows that are done (one call per key) and answers them; their places are free
//!    for the next tick's newcomers.
//!
//! Results do not depend on when a request joined or whether it was paused: its state is plain
//! data, and the network sees each row the same way in any company (within ONNX Runtime's
//! batch-size rounding).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::load::Runners;
use super::serve::Job;
use super::{InferenceError, Inferred, StepProgress};
use crate::cancel::StopReason;
use crate::inference::batcher::{BatchKey, BatchLimits, Batchable, Batcher};
use crate::inference::pipeline::{ModelInput, StepRow};

/// The largest number of requests running together for images of up to `max_pixels` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepCap {
    /// Width × height, inclusive.
    pub max_pixels: u64,
    /// Requests (not network rows) in one step.
    pub max_requests: usize,
}

/// How the step-level scheduler runs (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct StepOptions {
    /// Step-level batching on; off: multi-step models batch whole requests like any model.
    pub enabled: bool,
    /// Caps by image size, smallest first; sizes above the last run one request at a time.
    pub caps: Vec<StepCap>,
    /// Times one request may be paused for a higher tier.
    pub max_pauses: u32,
    /// Memory that paused requests may hold, in bytes; past it nothing more is paused.
    pub max_paused_bytes: usize,
}

impl StepOptions {
    /// The cap for images of `pixels` pixels.
    pub fn cap(&self, pixels: u64) -> usize {
        self.caps
            .iter()
            .find(|c| pixels <= c.max_pixels)
            .map_or(1, |c| c.max_requests.max(1))
    }
}

/// A request in the step-level scheduler: waiting to start, or started (running or paused).
pub(super) enum Entry {
    /// Not started.
    New(Job),
    /// Started, then paused for a higher tier: waits to resume.
    Paused(Active),
}

impl Entry {
    fn job(&self) -> &Job {
        match self {
            Self::New(job) => job,
            Self::Paused(active) => &active.job,
        }
    }
}

impl Batchable for Entry {
    fn key(&self) -> BatchKey {
        self.job().step_key()
    }
    fn class(&self) -> usize {
        self.job().options.class
    }
    fn arrived(&self) -> Instant {
        self.job().arrived
    }
    fn deadline(&self) -> Option<Instant> {
        self.job().options.deadline
    }
}

/// Rows share a step when their model and size agree (scheduler, step count and guidance may
/// differ: each row is advanced by its own scheduler).
impl Job {
    fn step_key(&self) -> BatchKey {
        BatchKey {
            model: self.model.clone(),
            shape: self.input.shape(),
            group: 0,
        }
    }
}

/// A started request.
pub(super) struct Active {
    job: Job,
    row: Box<dyn StepRow>,
    key: BatchKey,
    /// When it started (its first phase ran).
    started: Instant,
    /// Times it was paused.
    pauses: u32,
    /// Most requests it shared a step with.
    most_company: usize,
}

/// Step time per key, smoothed: what a remaining step is expected to cost.
#[derive(Debug, Default)]
struct StepTimes(HashMap<BatchKey, f64>);

impl StepTimes {
    fn observe(&mut self, key: &BatchKey, seconds: f64) {
        let entry = self.0.entry(key.clone()).or_insert(seconds);
        *entry = 0.8 * *entry + 0.2 * seconds;
    }

    fn get(&self, key: &BatchKey) -> Option<f64> {
        self.0.get(key).copied()
    }
}

/// The step-level scheduler's state (see the module docs).
pub(super) struct Steps {
    options: StepOptions,
    waiting: Batcher<Entry>,
    running: Vec<Active>,
    paused_bytes: usize,
    times: StepTimes,
}

impl Steps {
    pub(super) fn new(options: StepOptions, weights: Vec<f64>) -> Self {
        let limits = BatchLimits {
            max_batch_size: 1,
            max_queue_delay: Duration::ZERO,
        };
        Self {
            options,
            waiting: Batcher::new(weights, HashMap::new(), limits),
            running: Vec::new(),
            paused_bytes: 0,
            times: StepTimes::default(),
        }
    }

    /// Whether there is anything to do.
    pub(super) fn busy(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// A new request.
    pub(super) fn push(&mut self, job: Job) {
        self.waiting.push(Entry::New(job));
    }

    /// One tick (see the module docs).
    pub(super) fn tick(&mut self, runners: &mut Runners) {
        self.drop_stopped_and_late(Instant::now());
        let newcomers = self.admit();
        self.begin(runners, newcomers);
        self.step(runners);
        self.finish(runners);
        self.publish_gauges();
    }

    /// Answer every request that was stopped, whose deadline passed, or whose remaining steps
    /// cannot finish before its deadline at the measured step time.
    fn drop_stopped_and_late(&mut self, now: Instant) {
        let mut answers = Vec::new();
        for active in std::mem::take(&mut self.running) {
            let left = active.row.total() - active.row.done();
            match verdict(&active.job, &active.key, left, &self.times, now) {
                Some(error) => answers.push((active.job, error)),
                None => self.running.push(active),
            }
        }
        let times = &self.times;
        let mut errors = Vec::new();
        let taken = self.waiting.take_where(|entry| {
            let left = match entry {
                Entry::New(job) => job.input.steps(),
                Entry::Paused(a) => a.row.total() - a.row.done(),
            };
            let error = verdict(entry.job(), &entry.key(), left, times, now);
            let found = error.is_some();
            errors.extend(error);
            found
        });
        for (entry, error) in taken.into_iter().zip(errors) {
            let job = match entry {
                Entry::New(job) => job,
                Entry::Paused(active) => {
                    self.paused_bytes -= active.row.bytes();
                    active.job
                }
            };
            answers.push((job, error));
        }
        for (job, error) in answers {
            match &error {
                InferenceError::Stopped(reason) => crate::metrics::record_step_stop(stop_label(*reason)),
                InferenceError::WontFinish { .. } => crate::metrics::record_expired("steps"),
                _ => crate::metrics::record_expired("batcher"),
            }
            let _ = job.reply.send(Err(error));
        }
    }

    /// Take newcomers (and paused requests) in while their keys have room, pausing a lower tier's
    /// row for a higher tier's waiter where allowed. Returns the new ones to start.
    fn admit(&mut self) -> Vec<Job> {
        let mut newcomers: Vec<Job> = Vec::new();
        loop {
            let newcomers_keys: Vec<BatchKey> = newcomers.iter().map(Job::step_key).collect();
            let mut counts: HashMap<BatchKey, usize> = HashMap::new();
            for key in self.running.iter().map(|a| &a.key).chain(newcomers_keys.iter()) {
                *counts.entry(key.clone()).or_default() += 1;
            }
            let options = &self.options;
            let room = |key: &BatchKey| counts.get(key).copied().unwrap_or(0) < cap(options, key);
            match self.waiting.take_next(room) {
                Some(Entry::New(job)) => newcomers.push(job),
                Some(Entry::Paused(active)) => {
                    self.paused_bytes -= active.row.bytes();
                    self.running.push(active);
                }
                None if self.preempt_for_lead() => {}
                None => break,
            }
        }
        newcomers
    }

    /// When the lead waiter's key is full: pause the lowest tier's row there (fewest pauses so far,
    /// then most steps left), if one is of a lower tier than the lead, may still be paused, and
    /// fits in the paused memory. Returns whether it paused one.
    fn preempt_for_lead(&mut self) -> bool {
        let Some(lead) = self.waiting.lead() else {
            return false;
        };
        let (key, class) = (lead.key(), lead.class());
        let victim = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, a)| a.key == key)
            .filter(|(_, a)| a.job.options.class > class && a.pauses < self.options.max_pauses)
            .filter(|(_, a)| self.paused_bytes + a.row.bytes() <= self.options.max_paused_bytes)
            .max_by_key(|(_, a)| {
                (
                    a.job.options.class,
                    std::cmp::Reverse(a.pauses),
                    a.row.total() - a.row.done(),
                )
            })
            .map(|(i, _)| i);
        let Some(index) = victim else {
            return false;
        };
        let mut active = self.running.swap_remove(index);
        active.pauses += 1;
        self.paused_bytes += active.row.bytes();
        crate::metrics::record_preemption(&active.key.model);
        tracing::debug!(
            parent: &active.job.span,
            done = active.row.done(),
            total = active.row.total(),
            "paused for a higher tier"
        );
        self.waiting.push_front(Entry::Paused(active));
        true
    }

    /// Start the newcomers: one call per model and size; a failed call is retried one by one.
    fn begin(&mut self, runners: &mut Runners, newcomers: Vec<Job>) {
        if newcomers.is_empty() {
            return;
        }
        let mut groups: HashMap<BatchKey, Vec<Job>> = HashMap::new();
        for job in newcomers {
            groups.entry(job.step_key()).or_default().push(job);
        }
        for (key, jobs) in groups {
            let started = Instant::now();
            let inputs: Vec<&ModelInput> = jobs.iter().map(|j| &j.input).collect();
            let result = match runners.get_mut(&key.model).and_then(|r| r.stepper()) {
                None => Err(format!("model {:?} cannot run step by step", key.model)),
                Some(stepper) => guarded(|| stepper.begin(&inputs)).and_then(|rows| {
                    if rows.len() == inputs.len() {
                        Ok(rows)
                    } else {
                        Err(format!("{} rows for {} requests", rows.len(), inputs.len()))
                    }
                }),
            };
            crate::metrics::observe_busy(started.elapsed().as_secs_f64());
            match result {
                Ok(rows) => {
                    for (job, row) in jobs.into_iter().zip(rows) {
                        self.running.push(Active {
                            key: key.clone(),
                            job,
                            row,
                            started,
                            pauses: 0,
                            most_company: 1,
                        });
                    }
                }
                Err(error) if jobs.len() == 1 => fail(jobs, &error),
                Err(error) => {
                    tracing::warn!(error = %error, "starting requests together failed; starting them one by one");
                    for job in jobs {
                        self.begin(runners, vec![job]);
                    }
                }
            }
        }
    }

    /// One step of every key's running rows.
    fn step(&mut self, runners: &mut Runners) {
        let mut keys: Vec<BatchKey> = self.running.iter().map(|a| a.key.clone()).collect();
        keys.sort_by(|a, b| (&a.model, a.shape).cmp(&(&b.model, b.shape)));
        keys.dedup();
        for key in keys {
            let Some(stepper) = runners.get_mut(&key.model).and_then(|r| r.stepper()) else {
                continue;
            };
            let mixed = stepper.mixed_steps();
            let mut mine: Vec<Active> = Vec::new();
            let mut others = Vec::new();
            for active in std::mem::take(&mut self.running) {
                if active.key == key {
                    mine.push(active);
                } else {
                    others.push(active);
                }
            }
            self.running = others;
            // One call for all of them, or one per timestep when the model takes one per call.
            let mut groups: Vec<Vec<Active>> = Vec::new();
            if mixed {
                groups.push(mine);
            } else {
                for active in mine {
                    let k = active.row.step_key();
                    match groups.iter_mut().find(|g| g[0].row.step_key() == k) {
                        Some(group) => group.push(active),
                        None => groups.push(vec![active]),
                    }
                }
            }
            let company = groups.iter().map(Vec::len).sum::<usize>();
            let started = Instant::now();
            for group in groups {
                let stepped = step_group(stepper, group);
                self.running.extend(stepped);
            }
            let seconds = started.elapsed().as_secs_f64();
            crate::metrics::observe_busy(seconds);
            crate::metrics::observe_step_tick(&key.model, company, seconds);
            self.times.observe(&key, seconds);
            for active in self.running.iter_mut().filter(|a| a.key == key) {
                active.most_company = active.most_company.max(company);
                if let Some(progress) = &active.job.options.progress {
                    let _ = progress.send(StepProgress {
                        done: active.row.done(),
                        total: active.row.total(),
                    });
                }
            }
        }
    }

    /// Decode and answer the rows that are done: one call per key, retried one by one on failure.
    fn finish(&mut self, runners: &mut Runners) {
        let (done, running): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|a| a.row.done() >= a.row.total());
        self.running = running;
        let mut groups: HashMap<BatchKey, Vec<Active>> = HashMap::new();
        for active in done {
            groups.entry(active.key.clone()).or_default().push(active);
        }
        for (key, group) in groups {
            finish_group(runners, &key, group);
        }
    }

    fn publish_gauges(&self) {
        let mut running: HashMap<&str, i64> = HashMap::new();
        let mut paused: HashMap<&str, i64> = HashMap::new();
        for active in &self.running {
            *running.entry(active.key.model.as_str()).or_default() += 1;
        }
        for entry in self.waiting.iter() {
            if let Entry::Paused(active) = entry {
                *paused.entry(active.key.model.as_str()).or_default() += 1;
            }
        }
        crate::metrics::set_step_rows(&running, &paused, self.paused_bytes);
    }
}

fn cap(options: &StepOptions, key: &BatchKey) -> usize {
    options.cap(u64::from(key.shape.0) * u64::from(key.shape.1))
}

/// Why a request must be answered now instead of stepping on: stopped, past its deadline, or
/// unable to run its `left` steps before it at the measured step time of its key.
fn verdict(job: &Job, key: &BatchKey, left: u32, times: &StepTimes, now: Instant) -> Option<InferenceError> {
    if let Some(reason) = job.options.stop.reason() {
        return Some(InferenceError::Stopped(reason));
    }
    let deadline = job.options.deadline?;
    if deadline < now {
        return Some(InferenceError::Expired((now - deadline).as_secs_f64()));
    }
    let step = times.get(key)?;
    let expected = step * f64::from(left);
    let short_by = (now + Duration::from_secs_f64(expected)).saturating_duration_since(deadline);
    (!short_by.is_zero()).then_some(InferenceError::WontFinish {
        steps_left: left,
        step_seconds: step,
        short_by: short_by.as_secs_f64(),
    })
}

/// One network call for a group of rows; a failed call is retried row by row, and a row that fails
/// alone is answered `inference_failed`. Returns the rows that stepped.
fn step_group(stepper: &mut dyn crate::inference::pipeline::StepRunner, mut group: Vec<Active>) -> Vec<Active> {
    let result = {
        let mut rows: Vec<&mut dyn StepRow> = group.iter_mut().map(|a| a.row.as_mut()).collect();
        guarded(|| stepper.step(&mut rows))
    };
    match result {
        Ok(()) => group,
        Err(error) if group.len() == 1 => {
            fail(group.into_iter().map(|a| a.job).collect(), &error);
            Vec::new()
        }
        Err(error) => {
            tracing::warn!(error = %error, rows = group.len(), "a step failed; stepping its rows one by one");
            group.into_iter().flat_map(|a| step_group(stepper, vec![a])).collect()
        }
    }
}

fn finish_group(runners: &mut Runners, key: &BatchKey, group: Vec<Active>) {
    let Some(stepper) = runners.get_mut(&key.model).and_then(|r| r.stepper()) else {
        return fail(group.into_iter().map(|a| a.job).collect(), "the model is gone");
    };
    let started = Instant::now();
    let result = {
        let rows: Vec<&dyn StepRow> = group.iter().map(|a| a.row.as_ref()).collect();
        guarded(|| stepper.finish(&rows))
    };
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(outputs) if outputs.len() == group.len() => {
            crate::metrics::observe_batch(&key.model, group.len(), seconds);
            let now = Instant::now();
            for (active, output) in group.into_iter().zip(outputs) {
                let inferred = Inferred {
                    output,
                    elapsed: now.saturating_duration_since(active.started),
                    waited: active.started.saturating_duration_since(active.job.arrived),
                    batch_size: active.most_company.max(1),
                };
                let _ = active.job.reply.send(Ok(inferred));
            }
        }
        Ok(outputs) => fail(
            group.into_iter().map(|a| a.job).collect(),
            &format!("{} outputs for the rows", outputs.len()),
        ),
        Err(error) if group.len() == 1 => {
            crate::metrics::observe_busy(seconds);
            fail(group.into_iter().map(|a| a.job).collect(), &error)
        }
        Err(error) => {
            crate::metrics::observe_busy(seconds);
            tracing::warn!(error = %error, rows = group.len(), "a decode failed; decoding its rows one by one");
            for active in group {
                finish_group(runners, key, vec![active]);
            }
        }
    }
}

fn fail(jobs: Vec<Job>, error: &str) {
    for job in jobs {
        let _entered = job.span.enter();
        tracing::warn!(error = %error, "the model run failed");
        let _ = job.reply.send(Err(InferenceError::Failed(error.to_owned())));
    }
}

/// A panic inside a phase must not take the thread with it.
fn guarded<T>(phase: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(phase)) {
        Ok(result) => result,
        Err(_) => Err("the model run panicked".into()),
    }
}

fn stop_label(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Cancelled => "cancelled",
        StopReason::Abandoned => "abandoned",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_the_first_that_covers_the_size_and_one_above_all() {
        let options = StepOptions {
            enabled: true,
            caps: vec![
                StepCap {
                    max_pixels: 512 * 512,
                    max_requests: 16,
                },
                StepCap {
                    max_pixels: 768 * 768,
                    max_requests: 4,
                },
            ],
            max_pauses: 1,
            max_paused_bytes: 0,
        };
        assert_eq!(options.cap(256 * 256), 16);
        assert_eq!(options.cap(512 * 512), 16);
        assert_eq!(options.cap(512 * 768), 4);
        assert_eq!(options.cap(1024 * 1024), 1, "larger images run alone");
    }

    #[test]
    fn a_request_is_answered_early_only_once_its_steps_cannot_fit_before_its_deadline() {
        let key = BatchKey {
            model: "m".into(),
            shape: (64, 64),
            group: 0,
        };
        let (reply, _answer) = tokio::sync::oneshot::channel();
        let now = Instant::now();
        let job = Job {
            model: "m".into(),
            input: ModelInput::new((64, 64), ()),
            options: super::super::JobOptions {
                deadline: Some(now + Duration::from_secs(1)),
                ..Default::default()
            },
            arrived: now,
            span: tracing::Span::none(),
            reply,
        };
        let mut times = StepTimes::default();
        assert!(verdict(&job, &key, 50, &times, now).is_none(), "no step measured yet");
        times.observe(&key, 0.1);
        assert!(verdict(&job, &key, 9, &times, now).is_none(), "0.9 s fits");
        match verdict(&job, &key, 20, &times, now) {
            Some(InferenceError::WontFinish {
                steps_left, short_by, ..
            }) => {
                assert_eq!(steps_left, 20);
                assert!((short_by - 1.0).abs() < 1e-6, "{short_by}");
            }
            other => panic!("{other:?}"),
        }
        job.options.stop.stop(StopReason::Cancelled);
        assert!(matches!(
            verdict(&job, &key, 1, &times, now),
            Some(InferenceError::Stopped(StopReason::Cancelled))
        ));
        let later = now + Duration::from_secs(2);
        let fresh = Job {
            options: super::super::JobOptions {
                deadline: Some(now),
                ..Default::default()
            },
            reply: tokio::sync::oneshot::channel().0,
            ..job
        };
        assert!(matches!(
            verdict(&fresh, &key, 1, &times, later),
            Some(InferenceError::Expired(_))
        ));
    }
}
