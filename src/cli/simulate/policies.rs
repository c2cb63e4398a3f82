//! The two policies as events on a simulated clock: whole-request batches through the real
//! [`Batcher`] (as `inference::engine::serve` runs them), and step-level ticks re-enacted from
//! `inference::engine::steps` over the same [`Batcher`]; in front of both, the broker's tier queues
//! and their prefetch.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::device::Device;
use super::workload::{Mix, Request, SplitMix};
use kiln::inference::batcher::{BatchKey, BatchLimits, Batchable, Batcher, Next};

/// Which policy serves the model (`batching.diffusion.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Mode {
    Step,
    Request,
}

/// The knobs of both policies, as the worker's settings give them.
#[derive(Debug, Clone)]
pub(super) struct Policy {
    pub(super) mode: Mode,
    /// By class, heaviest first.
    pub(super) weights: Vec<f64>,
    /// Whole-request batches.
    pub(super) limits: BatchLimits,
    /// Requests stepping together.
    pub(super) cap: usize,
    pub(super) max_pauses: u32,
    pub(super) max_paused_bytes: usize,
    /// What a paused request holds (embeddings, latents, a multistep scheduler's history).
    pub(super) row_bytes: usize,
    /// Unacked deliveries per tier queue.
    pub(super) prefetch: usize,
    /// Image side, pixels.
    pub(super) size: u32,
}

/// Where requests come from: a list, or a closed loop that replaces each answered one at once.
pub(super) struct Source {
    /// By arrival.
    pub(super) pending: VecDeque<Request>,
    pub(super) closed: Option<(Mix, SplitMix)>,
}

/// What happened to one request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Outcome {
    pub(super) req: Request,
    /// When it was answered: its image, or `expired`.
    pub(super) end: Duration,
    pub(super) finished: bool,
    pub(super) pauses: u32,
}

/// One device call (logged for the tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Call {
    pub(super) phase: Phase,
    pub(super) requests: usize,
    pub(super) start: Duration,
    pub(super) duration: Duration,
}

/// What a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Begin,
    Step,
    Decode,
}

/// What a run leaves.
pub(super) struct Run {
    pub(super) outcomes: Vec<Outcome>,
    /// Device time inside the window.
    pub(super) busy_in_window: Duration,
    /// UNet calls that started inside the window, and the requests they stepped.
    pub(super) unet_calls: usize,
    pub(super) unet_requests: usize,
    pub(super) pauses: usize,
    /// Every call, when logged.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) calls: Vec<Call>,
    /// All device time.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) busy: Duration,
}

/// A request inside the worker.
struct Job {
    req: Request,
    key: BatchKey,
    delivered: Instant,
    deadline: Option<Instant>,
    /// Steps run.
    done: u32,
    /// Begun: a started request that waits is a paused one.
    started: bool,
    pauses: u32,
}

impl Batchable for Job {
    fn key(&self) -> BatchKey {
        self.key.clone()
    }
    fn class(&self) -> usize {
        self.req.class
    }
    fn arrived(&self) -> Instant {
        self.delivered
    }
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// One simulated run.
pub(super) struct Sim<'a> {
    device: &'a Device,
    policy: &'a Policy,
    /// The simulated clock is `base + now`: the batcher works with instants.
    base: Instant,
    now: Duration,
    stop_at: Duration,
    window: (Duration, Duration),
    source: Source,
    /// One FIFO per tier.
    broker: Vec<VecDeque<Request>>,
    in_flight: Vec<usize>,
    /// When each tier last had a place freed (a delivery held back by the prefetch happens then).
    freed_at: Vec<Duration>,
    waiting: Batcher<Job>,
    running: Vec<Job>,
    paused_bytes: usize,
    /// Step phase seconds, smoothed as `steps::StepTimes` does.
    step_seconds: Option<f64>,
    run: Run,
    log_calls: bool,
}

impl<'a> Sim<'a> {
    /// A run of `policy` on `device` until `stop_at` (or until every request is answered), counting
    /// device time inside `window`.
    pub(super) fn new(
        device: &'a Device,
        policy: &'a Policy,
        source: Source,
        stop_at: Duration,
        window: (Duration, Duration),
    ) -> Self {
        let classes = policy.weights.len();
        let limits = match policy.mode {
            Mode::Request => policy.limits,
            // As `steps::Steps::new`: its waiting room is only asked for one request at a time.
            Mode::Step => BatchLimits {
                max_batch_size: 1,
                max_queue_delay: Duration::ZERO,
            },
        };
        Self {
            device,
            policy,
            base: Instant::now(),
            now: Duration::ZERO,
            stop_at,
            window,
            source,
            broker: vec![VecDeque::new(); classes],
            in_flight: vec![0; classes],
            freed_at: vec![Duration::ZERO; classes],
            waiting: Batcher::new(policy.weights.clone(), Default::default(), limits),
            running: Vec::new(),
            paused_bytes: 0,
            step_seconds: None,
            run: Run {
                outcomes: Vec::new(),
                busy_in_window: Duration::ZERO,
                unet_calls: 0,
                unet_requests: 0,
                pauses: 0,
                calls: Vec::new(),
                busy: Duration::ZERO,
            },
            log_calls: false,
        }
    }

    /// Keep every call in [`Run::calls`].
    #[cfg(test)]
    pub(super) fn logging_calls(mut self) -> Self {
        self.log_calls = true;
        self
    }

    pub(super) fn run(mut self) -> Run {
        match self.policy.mode {
            Mode::Request => self.serve_requests(),
            Mode::Step => self.serve_steps(),
        }
        self.run
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn next_arrival(&self) -> Option<Duration> {
        self.source.pending.front().map(|r| r.arrival)
    }

    /// Arrivals up to now into the broker; from there into the worker while the tier's prefetch
    /// has room (admission answers `expired` what is past its deadline).
    fn deliver(&mut self) {
        while self.source.pending.front().is_some_and(|r| r.arrival <= self.now) {
            let req = self.source.pending.pop_front().expect("checked");
            self.broker[req.class].push_back(req);
        }
        for class in 0..self.broker.len() {
            while self.in_flight[class] < self.policy.prefetch {
                let Some(req) = self.broker[class].pop_front() else {
                    break;
                };
                let at = req.arrival.max(self.freed_at[class]);
                if req.deadline.is_some_and(|d| d < at) {
                    self.answer(req, at, false, 0);
                    continue;
                }
                self.in_flight[class] += 1;
                let group = match self.policy.mode {
                    // The diffusion kind's group: scheduler, steps, first step (one scheduler here).
                    Mode::Request => u64::from(req.steps),
                    Mode::Step => 0,
                };
                let key = BatchKey {
                    model: "diffusion".into(),
                    shape: (self.policy.size, self.policy.size),
                    group,
                };
                self.waiting.push(Job {
                    req,
                    key,
                    delivered: self.base + at,
                    deadline: req.deadline.map(|d| self.base + d),
                    done: 0,
                    started: false,
                    pauses: 0,
                });
            }
        }
    }

    /// Record an answer; a closed loop sends another request at once.
    fn answer(&mut self, req: Request, end: Duration, finished: bool, pauses: u32) {
        self.run.outcomes.push(Outcome {
            req,
            end,
            finished,
            pauses,
        });
        if let Some((mix, rng)) = self.source.closed.as_mut() {
            self.source.pending.push_back(mix.draw(rng, end, false));
        }
    }

    /// Answer a request in the worker: its tier's place is free again.
    fn release(&mut self, job: Job, finished: bool) {
        let class = job.req.class;
        self.in_flight[class] -= 1;
        self.freed_at[class] = self.now;
        self.answer(job.req, self.now, finished, job.pauses);
    }

    /// The device runs one call of `seconds`.
    fn call(&mut self, phase: Phase, requests: usize, seconds: f64) {
        let start = self.now;
        let duration = Duration::from_secs_f64(seconds);
        self.now += duration;
        let (w0, w1) = self.window;
        let run = &mut self.run;
        run.busy += duration;
        run.busy_in_window += self.now.min(w1).saturating_sub(start.max(w0));
        if phase == Phase::Step && start >= w0 && start < w1 {
            run.unet_calls += 1;
            run.unet_requests += requests;
        }
        if self.log_calls {
            run.calls.push(Call {
                phase,
                requests,
                start,
                duration,
            });
        }
    }

    /// `serve::serve` without step-level batching: the batcher's next batch, or wait for one (for a
    /// new request, or until the lead has waited `max_queue_delay`).
    fn serve_requests(&mut self) {
        while self.now < self.stop_at {
            self.deliver();
            let now = self.instant();
            for job in self.waiting.take_expired(now) {
                self.release(job, false);
            }
            match self.waiting.next(now, false) {
                Next::Run(batch) => self.run_batch(batch),
                Next::WaitUntil(at) => {
                    let at = at - self.base;
                    self.now = self.next_arrival().map_or(at, |a| a.min(at)).max(self.now);
                }
                // Nothing in the worker, so nothing held back in the broker either.
                Next::Empty => match self.next_arrival() {
                    Some(at) => self.now = at.max(self.now),
                    None => break,
                },
            }
        }
    }

    /// A whole batch: begin, every step, decode; nothing joins it meanwhile.
    fn run_batch(&mut self, batch: Vec<Job>) {
        let n = batch.len();
        self.call(Phase::Begin, n, self.device.begin(n));
        for _ in 0..batch[0].req.steps {
            self.call(Phase::Step, n, self.device.unet(n));
        }
        self.call(Phase::Decode, n, self.device.decode(n));
        for job in batch {
            self.release(job, true);
        }
    }

    /// `serve::serve` with step-level batching: one tick after another while there is work.
    fn serve_steps(&mut self) {
        while self.now < self.stop_at {
            self.deliver();
            if !self.running.is_empty() || !self.waiting.is_empty() {
                self.tick();
                continue;
            }
            match self.next_arrival() {
                Some(at) => self.now = at.max(self.now),
                None => break,
            }
        }
    }

    /// `steps::Steps::tick`: drop the late, admit, begin the newcomers, step, finish.
    fn tick(&mut self) {
        self.drop_late();
        let newcomers = self.admit();
        if !newcomers.is_empty() {
            self.call(Phase::Begin, newcomers.len(), self.device.begin(newcomers.len()));
            for mut job in newcomers {
                job.started = true;
                self.running.push(job);
            }
        }
        self.step();
        self.finish();
    }

    /// Answer the requests whose deadline passed, or whose steps left cannot finish by it at the
    /// smoothed step time (`steps::verdict`), running or waiting.
    fn drop_late(&mut self) {
        let (now, step) = (self.instant(), self.step_seconds);
        let late = |job: &Job| {
            let Some(deadline) = job.deadline else {
                return false;
            };
            let left = f64::from(job.req.steps - job.done);
            deadline < now || step.is_some_and(|s| now + Duration::from_secs_f64(s * left) > deadline)
        };
        let (mut gone, kept): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.running).into_iter().partition(&late);
        self.running = kept;
        gone.extend(self.waiting.take_where(&late));
        for job in gone {
            self.release(job, false);
        }
        // What the dropped paused requests held is free again.
        self.paused_bytes = self.waiting.iter().filter(|j| j.started).count() * self.policy.row_bytes;
    }

    /// `steps::Steps::admit` (one key: one model, one size): take waiters in fair order while the
    /// key has room; when it is full, pause a lower tier's row for the lead waiter.
    fn admit(&mut self) -> Vec<Job> {
        let mut newcomers = Vec::new();
        loop {
            let room = self.running.len() + newcomers.len() < self.policy.cap;
            match self.waiting.take_next(|_| room) {
                Some(job) if job.started => {
                    self.paused_bytes -= self.policy.row_bytes;
                    self.running.push(job);
                }
                Some(job) => newcomers.push(job),
                None if self.preempt_for_lead() => {}
                None => break,
            }
        }
        newcomers
    }

    /// `steps::Steps::preempt_for_lead`: pause the running row of the lowest tier below the lead's
    /// (fewest pauses so far, then most steps left) that may still be paused and fits in memory.
    fn preempt_for_lead(&mut self) -> bool {
        let Some(class) = self.waiting.lead().map(|lead| lead.req.class) else {
            return false;
        };
        let policy = self.policy;
        let fits = self.paused_bytes + policy.row_bytes <= policy.max_paused_bytes;
        let victim = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, a)| fits && a.req.class > class && a.pauses < policy.max_pauses)
            .max_by_key(|(_, a)| (a.req.class, std::cmp::Reverse(a.pauses), a.req.steps - a.done))
            .map(|(i, _)| i);
        let Some(index) = victim else {
            return false;
        };
        let mut job = self.running.swap_remove(index);
        job.pauses += 1;
        self.paused_bytes += policy.row_bytes;
        self.run.pauses += 1;
        self.waiting.push_front(job);
        true
    }

    /// One step of every running row: one UNet call, or (scalar timestep) one per group at equal
    /// step count and index.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let started = self.now;
        if self.device.scalar_timestep {
            let mut groups: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            for job in &self.running {
                *groups.entry((job.req.steps, job.done)).or_default() += 1;
            }
            for n in groups.into_values() {
                self.call(Phase::Step, n, self.device.unet(n));
            }
        } else {
            let n = self.running.len();
            self.call(Phase::Step, n, self.device.unet(n));
        }
        for job in &mut self.running {
            job.done += 1;
        }
        let seconds = (self.now - started).as_secs_f64();
        self.step_seconds = Some(self.step_seconds.map_or(seconds, |s| 0.8 * s + 0.2 * seconds));
    }

    /// Decode the rows that are done in one call, and answer them.
    fn finish(&mut self) {
        let (done, running): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|j| j.done >= j.req.steps);
        self.running = running;
        if done.is_empty() {
            return;
        }
        self.call(Phase::Decode, done.len(), self.device.decode(done.len()));
        for job in done {
            self.release(job, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::Curve;
    use super::super::workload::Class;
    use super::*;

    const MS: f64 = 0.001;

    fn device() -> Device {
        Device {
            curve: Curve::parse("1=20,16=100").unwrap(),
            begin_ratio: 0.25,
            decode_ratio: 1.2,
            scalar_timestep: false,
        }
    }

    /// Two tiers: pro (class 0, weight 20) and free (class 1, weight 1).
    fn policy(mode: Mode, cap: usize) -> Policy {
        Policy {
            mode,
            weights: vec![20.0, 1.0],
            limits: BatchLimits {
                max_batch_size: cap,
                max_queue_delay: Duration::from_millis(2),
            },
            cap,
            max_pauses: 1,
            max_paused_bytes: 512 << 20,
            row_bytes: 1 << 20,
            prefetch: 16,
            size: 512,
        }
    }

    fn req(class: usize, steps: u32, at_ms: f64) -> Request {
        Request {
            class,
            steps,
            arrival: Duration::from_secs_f64(at_ms * MS),
            deadline: None,
        }
    }

    fn run(device: &Device, policy: &Policy, arrivals: Vec<Request>) -> Run {
        let source = Source {
            pending: arrivals.into(),
            closed: None,
        };
        let end = Duration::from_secs(100_000);
        Sim::new(device, policy, source, end, (Duration::ZERO, end))
            .logging_calls()
            .run()
    }

    fn latency_ms(o: &Outcome) -> f64 {
        assert!(o.finished);
        (o.end - o.req.arrival).as_secs_f64() / MS
    }

    fn of_steps(run: &Run, steps: u32) -> &Outcome {
        run.outcomes.iter().find(|o| o.req.steps == steps).expect("answered")
    }

    #[test]
    fn one_request_alone_takes_its_unloaded_latency() {
        let d = device();
        let unloaded = d.unloaded(20) / MS;
        let step = run(&d, &policy(Mode::Step, 16), vec![req(1, 20, 10.0)]);
        assert!((latency_ms(of_steps(&step, 20)) - unloaded).abs() < 1e-3);
        // The whole-request batcher first waits `max_queue_delay` for company.
        let whole = run(&d, &policy(Mode::Request, 16), vec![req(1, 20, 10.0)]);
        assert!((latency_ms(of_steps(&whole, 20)) - unloaded - 2.0).abs() < 1e-3);
    }

    #[test]
    fn a_short_request_waits_for_a_long_batch_unless_it_joins_between_steps() {
        let d = device();
        // A 50-step request arrives at 0 ms (its batch starts at 2 ms); a 4-step one at 5 ms.
        let arrivals = vec![req(1, 50, 0.0), req(1, 4, 5.0)];
        let whole = run(&d, &policy(Mode::Request, 16), arrivals.clone());
        let batch_ends = 2.0 + d.unloaded(50) / MS;
        let short = of_steps(&whole, 4);
        assert!(
            short.end.as_secs_f64() / MS >= batch_ends + d.unloaded(4) / MS - 1e-6,
            "whole-request: the 4-step request starts after the 50-step batch ({} ms)",
            latency_ms(short)
        );
        let step = run(&d, &policy(Mode::Step, 16), arrivals);
        // It waits for the tick under way (begin + one step of one row), then runs 4 ticks of two
        // rows and is decoded alone.
        let bound = (d.begin(1) + d.unet(1) + d.begin(1) + 4.0 * d.unet(2) + d.decode(1)) / MS;
        let short = latency_ms(of_steps(&step, 4));
        assert!(short <= bound + 1e-6, "step-level: {short} ms, bound {bound} ms");
        assert!(short < 0.2 * latency_ms(of_steps(&whole, 4)));
    }

    #[test]
    fn a_paid_request_pauses_a_free_row_once_when_the_key_is_full() {
        let d = device();
        // Cap 1. Free 50-step at 0; pro 4-step at 100 ms; another pro 4-step at 300 ms.
        let r = run(
            &d,
            &policy(Mode::Step, 1),
            vec![req(1, 50, 0.0), req(0, 4, 100.0), req(0, 4, 300.0)],
        );
        let free = r.outcomes.iter().find(|o| o.req.class == 1).unwrap();
        let pro: Vec<&Outcome> = r.outcomes.iter().filter(|o| o.req.class == 0).collect();
        assert_eq!(r.pauses, 1, "the free row is paused once, not twice");
        assert_eq!(free.pauses, 1);
        assert!(free.finished);
        // The first pro request waits at most for the tick under way, then runs alone.
        let first = latency_ms(pro[0]);
        assert!(
            first <= (d.unloaded(4) + d.unet(1)) / MS + 1e-6,
            "first pro request: {first} ms"
        );
        // The second finds the free row resumed and already paused once: it waits for it.
        assert!(pro[1].end > free.end);
    }

    #[test]
    fn the_device_works_only_through_calls_and_never_idles_with_work_waiting() {
        let d = device();
        let class = |tier: &str, weight, share| Class {
            tier: String::from(tier),
            weight,
            share,
            deadline_secs: None,
            deadline: None,
        };
        let mix = Mix {
            classes: vec![class("pro", 20.0, 0.3), class("free", 1.0, 0.7)],
            steps: vec![(4, 0.4), (20, 0.3), (50, 0.3)],
        };
        let arrivals = mix.arrivals(15.0, Duration::from_secs(60), 7);
        for mode in [Mode::Step, Mode::Request] {
            let r = run(&d, &policy(mode, 16), arrivals.clone());
            assert_eq!(r.outcomes.len(), arrivals.len(), "{mode:?}: every request answered");
            assert!(r.outcomes.iter().all(|o| o.finished));
            let total: Duration = r.calls.iter().map(|c| c.duration).sum();
            assert_eq!(total, r.busy, "{mode:?}: busy time is the sum of the calls");
            let mut expected = 0.0;
            for c in &r.calls {
                let seconds = match c.phase {
                    Phase::Begin => d.begin(c.requests),
                    Phase::Step => d.unet(c.requests),
                    Phase::Decode => d.decode(c.requests),
                };
                expected += seconds;
                assert!((c.duration.as_secs_f64() - seconds).abs() < 1e-9, "{mode:?}: {c:?}");
                assert!((1..=16).contains(&c.requests), "{mode:?}: {c:?}");
            }
            assert!((total.as_secs_f64() - expected).abs() < 1e-6);
            // Every step of every request ran exactly once.
            let stepped: usize = r
                .calls
                .iter()
                .filter(|c| c.phase == Phase::Step)
                .map(|c| c.requests)
                .sum();
            assert_eq!(
                stepped,
                arrivals.iter().map(|a| a.steps as usize).sum::<usize>(),
                "{mode:?}"
            );
            // Calls never overlap, and the device idles only when every arrived request is answered
            // (whole-request mode may also wait its 2 ms for company).
            let slack = if mode == Mode::Request { 0.002 } else { 0.0 } + 1e-9;
            for (a, b) in r.calls.iter().zip(r.calls.iter().skip(1)) {
                let idle_from = a.start + a.duration;
                assert!(idle_from <= b.start, "{mode:?}: calls overlap");
                if (b.start - idle_from).as_secs_f64() > slack {
                    let waiting = r
                        .outcomes
                        .iter()
                        .any(|o| o.req.arrival <= idle_from && o.end > idle_from);
                    assert!(
                        !waiting,
                        "{mode:?}: idle from {idle_from:?} to {:?} with work waiting",
                        b.start
                    );
                }
            }
        }
    }

    #[test]
    fn a_request_that_cannot_finish_by_its_deadline_is_answered_without_the_device() {
        let d = device();
        let mut late = req(1, 50, 0.0);
        late.deadline = Some(Duration::from_millis(300));
        // Cap 1: the pro request runs first; then the free one, 50 steps of 20 ms, cannot finish by
        // 300 ms at the measured step time.
        let r = run(&d, &policy(Mode::Step, 1), vec![req(0, 4, 0.0), late]);
        let free = r.outcomes.iter().find(|o| o.req.class == 1).unwrap();
        assert!(!free.finished);
        let stepped: usize = r
            .calls
            .iter()
            .filter(|c| c.phase == Phase::Step)
            .map(|c| c.requests)
            .sum();
        assert_eq!(stepped, 4, "only the pro request's steps ran");
    }

    #[test]
    fn the_prefetch_holds_a_tiers_backlog_in_the_broker() {
        let d = device();
        let mut p = policy(Mode::Request, 16);
        p.prefetch = 4;
        // Ten free requests at once: batches of at most 4.
        let r = run(&d, &p, (0..10).map(|_| req(1, 4, 0.0)).collect());
        let sizes: Vec<usize> = r
            .calls
            .iter()
            .filter(|c| c.phase == Phase::Begin)
            .map(|c| c.requests)
            .collect();
        assert_eq!(sizes, [4, 4, 2]);
    }
}
