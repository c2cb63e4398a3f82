//! Step-level batching of diffusion requests on the inference thread itself (no broker): requests
//! join a running batch between steps, a paused request resumes bit for bit, a cancel stops a
//! request within one step, progress comes in order, a request that cannot meet its deadline is
//! answered before it spends steps, and none of it changes a picture by more than one level.

use std::time::{Duration, Instant};

use image::RgbImage;
use kiln::cancel::{StopFlag, StopReason};
use kiln::domain::RequestDocument;
use kiln::inference::{
    BatchLimits, EngineOptions, InferenceEngine, InferenceError, Inferred, JobOptions, ModelRegistry, Prepared,
    Runtime, StepCap, StepOptions, StepProgress,
};
use tokio::sync::mpsc;

use crate::diffusion::{case, difference, document, parse};
use crate::helpers::{shared_metrics, test_settings};

/// A tiny model's request: a case's, with its own seed and step count.
fn doc(model_case: &str, steps: i64, seed: u64) -> RequestDocument {
    let mut doc = document(&case(model_case));
    doc.request_id = format!("{model_case}-{steps}-{seed}");
    doc.params.steps = Some(steps);
    doc.params.seed = Some(seed.into());
    doc
}

/// One inference thread over the tiny diffusion models.
struct Engine {
    engine: InferenceEngine,
    registry: ModelRegistry,
}

impl Engine {
    /// Step-level (`step`) or whole-request batching, at most `cap` requests together, tiers with
    /// `weights` (class 0 first).
    fn start(step: bool, cap: usize, weights: &[f64]) -> Self {
        let mut settings = test_settings();
        settings.models.enabled = vec!["sd-tiny-random".into(), "lcm-tiny-random".into()];
        settings.models.warmup = false;
        let registry = ModelRegistry::load(&settings.models, &settings.batching).unwrap();
        let runtime = Runtime::init(&settings.inference).unwrap();
        let options = EngineOptions {
            queue_capacity: 16,
            warmup: false,
            class_weights: weights.to_vec(),
            batch_limits: Default::default(),
            default_batch_limits: BatchLimits {
                max_batch_size: cap,
                max_queue_delay: Duration::from_millis(50),
            },
            steps: StepOptions {
                enabled: step,
                caps: vec![StepCap {
                    max_pixels: u64::MAX,
                    max_requests: cap,
                }],
                max_pauses: 1,
                max_paused_bytes: 1 << 30,
            },
        };
        let engine = InferenceEngine::start(&registry, runtime, options).unwrap();
        Self { engine, registry }
    }

    fn prepare(&self, doc: &RequestDocument) -> (String, Prepared) {
        let request = parse(doc);
        (request.model.clone(), self.registry.prepare(&request).unwrap())
    }

    /// Send a request; its answer, and its progress when `watch`.
    fn send(
        &self,
        doc: &RequestDocument,
        class: usize,
        stop: StopFlag,
        deadline: Option<Instant>,
    ) -> (Sent, mpsc::UnboundedReceiver<StepProgress>) {
        let (model, prepared) = self.prepare(doc);
        let (tx, rx) = mpsc::unbounded_channel();
        let options = JobOptions {
            class,
            deadline,
            stop,
            progress: Some(tx),
        };
        let handle = self.engine.handle();
        let finish = prepared.finish;
        let answer = tokio::spawn(async move { handle.infer(&model, prepared.input, options).await });
        (Sent { answer, finish }, rx)
    }
}

struct Sent {
    answer: tokio::task::JoinHandle<Result<Inferred, InferenceError>>,
    finish: kiln::inference::Finish,
}

impl Sent {
    async fn result(self) -> (Result<Inferred, InferenceError>, kiln::inference::Finish) {
        (self.answer.await.unwrap(), self.finish)
    }

    async fn image(self) -> (RgbImage, Inferred) {
        let (result, finish) = self.result().await;
        let inferred = result.expect("the request renders");
        (finish.apply(&inferred.output), inferred)
    }
}

/// Wait until the request has run at least `steps` steps; every progress seen.
async fn until_step(progress: &mut mpsc::UnboundedReceiver<StepProgress>, steps: u32) -> Vec<StepProgress> {
    let mut seen = Vec::new();
    while seen.last().is_none_or(|p: &StepProgress| p.done < steps) {
        let p = tokio::time::timeout(Duration::from_secs(60), progress.recv())
            .await
            .expect("progress within 60 s")
            .expect("the request is still running");
        seen.push(p);
    }
    seen
}

/// Render each document alone, one after the other.
async fn alone(engine: &Engine, docs: &[&RequestDocument]) -> Vec<(RgbImage, Vec<f32>)> {
    let mut out = Vec::new();
    for doc in docs {
        let (sent, _) = engine.send(doc, 0, StopFlag::new(), None);
        let (image, inferred) = sent.image().await;
        out.push((image, inferred.output));
    }
    out
}

#[tokio::test]
async fn a_request_joins_a_running_batch_finishes_first_and_matches_running_alone() {
    let _metrics = shared_metrics().await;
    let engine = Engine::start(true, 4, &[1.0]);
    let long = doc("t2i-euler", 40, 1);
    let short = doc("t2i-euler", 4, 2);
    let (long_sent, mut long_progress) = engine.send(&long, 0, StopFlag::new(), None);
    until_step(&mut long_progress, 5).await;
    let (short_sent, mut short_progress) = engine.send(&short, 0, StopFlag::new(), None);
    let (short_image, short_inferred) = short_sent.image().await;
    // The short one finished while the long one was still running: it joined, not waited.
    let mut long_steps = Vec::new();
    while let Ok(p) = long_progress.try_recv() {
        long_steps.push(p.done);
    }
    let long_done_then = long_steps.last().copied().unwrap_or(5);
    assert!(
        long_done_then < 40,
        "the 4-step request waited for the 40-step one (it was at step {long_done_then})"
    );
    assert_eq!(
        short_inferred.batch_size, 2,
        "it stepped together with the running request"
    );
    let steps: Vec<u32> = std::iter::from_fn(|| short_progress.try_recv().ok())
        .map(|p| p.done)
        .collect();
    assert_eq!(steps, [1, 2, 3, 4], "progress comes after every step, in order");
    let (long_image, _) = long_sent.image().await;

    let reference = alone(&engine, &[&long, &short]).await;
    for (name, (joined, (alone, _))) in ["long", "short"]
        .iter()
        .zip([long_image, short_image].iter().zip(&reference))
    {
        let (max, _) = difference(joined, alone);
        assert!(
            max <= 1,
            "{name}: {max} levels between joining a batch and running alone"
        );
    }
}

#[tokio::test]
async fn results_do_not_depend_on_the_batching_mode() {
    let _metrics = shared_metrics().await;
    let docs = [
        doc("t2i-euler", 6, 3),
        doc("t2i-euler", 6, 4),
        doc("lcm-distilled", 4, 5),
    ];
    let mut images = Vec::new();
    for step in [true, false] {
        let engine = Engine::start(step, 4, &[1.0]);
        let sent: Vec<Sent> = docs
            .iter()
            .map(|d| engine.send(d, 0, StopFlag::new(), None).0)
            .collect();
        let mut out = Vec::new();
        for s in sent {
            out.push(s.image().await.0);
        }
        images.push(out);
    }
    for (k, (step, whole)) in images[0].iter().zip(&images[1]).enumerate() {
        let (max, _) = difference(step, whole);
        assert!(
            max <= 1,
            "request {k}: {max} levels between step-level and whole-request batching"
        );
    }
}

#[tokio::test]
async fn rows_at_different_steps_share_a_call_only_where_the_export_takes_a_timestep_per_row() {
    // lcm-tiny-random's UNet is left as optimum exports it (one timestep per call): rows at
    // different steps step in separate calls, and still come out as when run alone.
    let _metrics = shared_metrics().await;
    let engine = Engine::start(true, 4, &[1.0]);
    let first = doc("lcm-distilled", 8, 6);
    let second = doc("lcm-distilled", 8, 7);
    let (a, mut a_progress) = engine.send(&first, 0, StopFlag::new(), None);
    until_step(&mut a_progress, 2).await;
    let (b, _) = engine.send(&second, 0, StopFlag::new(), None);
    let ((a_image, _), (b_image, _)) = (a.image().await, b.image().await);
    let reference = alone(&engine, &[&first, &second]).await;
    for (joined, (alone, _)) in [a_image, b_image].iter().zip(&reference) {
        assert!(difference(joined, alone).0 <= 1);
    }
}

#[tokio::test]
async fn a_paused_free_request_resumes_bit_identical_and_finishes() {
    let _metrics = shared_metrics().await;
    // One request at a time, paid (class 0, weight 3) before free (class 1, weight 1).
    let engine = Engine::start(true, 1, &[3.0, 1.0]);
    let free = doc("t2i-euler", 20, 8);
    let paid = doc("t2i-euler", 5, 9);
    let (free_sent, mut free_progress) = engine.send(&free, 1, StopFlag::new(), None);
    let before = until_step(&mut free_progress, 3).await;
    let (paid_sent, _) = engine.send(&paid, 0, StopFlag::new(), None);
    let (_, paid_inferred) = paid_sent.image().await;
    // The paid request ran while the free one waited paused.
    let at_paid_finish: Vec<u32> = std::iter::from_fn(|| free_progress.try_recv().ok())
        .map(|p| p.done)
        .collect();
    assert!(
        at_paid_finish.last().copied().unwrap_or(before.last().unwrap().done) < 20,
        "the free request ran to its end before the paid one: {at_paid_finish:?}"
    );
    assert!(paid_inferred.elapsed < Duration::from_secs(30));
    let (result, _) = free_sent.result().await;
    let resumed = result.expect("the paused free request resumes and finishes").output;
    let straight = &alone(&engine, &[&free]).await[0].1;
    assert_eq!(
        &resumed, straight,
        "a paused and resumed request is bit-identical to one run straight through"
    );
}

#[tokio::test]
async fn a_cancelled_request_stops_within_one_step() {
    let _metrics = shared_metrics().await;
    let engine = Engine::start(true, 4, &[1.0]);
    let stop = StopFlag::new();
    let (sent, mut progress) = engine.send(&doc("t2i-euler", 50, 10), 0, stop.clone(), None);
    let seen = until_step(&mut progress, 3).await;
    stop.stop(StopReason::Cancelled);
    let at_cancel = seen.last().unwrap().done;
    let (result, _) = sent.result().await;
    assert!(
        matches!(result, Err(InferenceError::Stopped(StopReason::Cancelled))),
        "{result:?}"
    );
    let after: Vec<u32> = std::iter::from_fn(|| progress.try_recv().ok())
        .map(|p| p.done)
        .collect();
    let last = after.last().copied().unwrap_or(at_cancel);
    assert!(
        last <= at_cancel + 2,
        "it ran on from step {at_cancel} to {last} after the cancel"
    );
    // A cancel before it reaches the device: answered without a step.
    let stop = StopFlag::new();
    stop.stop(StopReason::Cancelled);
    let (sent, mut progress) = engine.send(&doc("t2i-euler", 10, 11), 0, stop, None);
    assert!(matches!(
        sent.result().await.0,
        Err(InferenceError::Stopped(StopReason::Cancelled))
    ));
    assert!(progress.try_recv().is_err(), "no step ran");
}

#[tokio::test]
async fn a_request_that_cannot_meet_its_deadline_is_answered_before_it_spends_its_steps() {
    let _metrics = shared_metrics().await;
    let engine = Engine::start(true, 4, &[1.0]);
    // Measure this machine's step time on a first request.
    let started = Instant::now();
    let (first, _) = engine.send(&doc("t2i-euler", 10, 12), 0, StopFlag::new(), None);
    first.image().await;
    let step = started.elapsed() / 10;
    // 50 steps (the model's most) with a deadline 5 steps away: hopeless, answered at once.
    let deadline = Instant::now() + step * 5;
    let started = Instant::now();
    let (late, mut progress) = engine.send(&doc("t2i-euler", 50, 13), 0, StopFlag::new(), Some(deadline));
    let (result, _) = late.result().await;
    match result {
        Err(InferenceError::WontFinish { steps_left, .. }) => assert_eq!(steps_left, 50),
        other => panic!("expected WontFinish, got {other:?}"),
    }
    assert!(progress.try_recv().is_err(), "no step was spent on it");
    assert!(
        started.elapsed() < step * 5,
        "answered at once, not after spending steps"
    );
    // One that can finish in time does.
    let deadline = Instant::now() + step * 100;
    let (fits, _) = engine.send(&doc("t2i-euler", 5, 14), 0, StopFlag::new(), Some(deadline));
    assert!(fits.result().await.0.is_ok());
}
