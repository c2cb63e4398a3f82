//! `kiln simulate`: a discrete-event simulation of one device serving a diffusion model with
//! step-level batching (`batching.diffusion.mode = "step"`) against whole-request batching
//! (`"request"`), on a step-time curve that was measured (this CPU) or published (an H200).
//!
//! It shows what no run on a 2-core VM can: how the two policies compare on a GPU, where one UNet
//! call for 16 requests costs far less than 16 calls. Both policies see the same arrivals (Poisson,
//! seeded; tiers and step counts drawn from mixes) at `--load` × the whole-request policy's capacity,
//! measured first by simulating a saturated queue (a closed loop that replaces every answered
//! request at once). Reported per policy: goodput (answers within `--slo-factor` × the latency of a
//! request of the same step count alone), throughput, latency percentiles by tier and by step count,
//! the device's busy fraction, the pauses; the targets, met or not; and with `--caps`, both
//! policies at each cap on the same arrivals.
//!
//! What is modelled, and where it is the real code:
//! - **Broker and admission**: one FIFO per tier; a tier's requests reach the worker while fewer
//!   than `amqp.prefetch` of them are unacked there (waiting or running), instantly (decoding,
//!   tokenizing, PNG and replies cost nothing). A request whose tier deadline
//!   (`scheduling.deadlines_ms`, from its arrival) has passed when it is delivered is expired.
//!   Not modelled: the overload policy (free deferred, plus degraded after 30 s in the broker: it
//!   touches only requests already far outside any SLO here), rate limits, cancellations, failures.
//! - **Whole-request mode** ([`policies`]): the real [`kiln::inference::batcher::Batcher`]
//!   (weighted fair queueing by stride across tiers, weights from `scheduling.weights`; batch key =
//!   model, size and step count; up to `max_batch_size`, waiting at most `max_queue_delay` for
//!   company), driven as `inference::engine::serve` drives it; a batch costs begin(B) + steps × t(B)
//!   + decode(B), and nothing joins it until it ends.
//! - **Step-level mode** ([`policies`]): `inference::engine::steps`'s tick re-enacted over the same
//!   `Batcher` (`take_next`, `lead`, `push_front`, `take_where`): drop the requests whose deadline
//!   passed or whose steps left cannot finish by it at the smoothed step time; admit in fair order
//!   while the key (model and size) has room under the cap; when the lead waiter's key is full, pause
//!   the lowest tier's row there (at most `max_pauses` per request, within `max_paused_mb` at an
//!   estimated row size); one begin call for the newcomers; one UNet call stepping every running row
//!   at its own step (`--scalar-timestep`: one call per group at equal step count and index, as for
//!   an export whose timestep is a scalar); one decode call for the rows that are done.
//! - **Costs** ([`device`]): one UNet call for B guided requests (2B network rows) costs t(B),
//!   linear between the curve's `B=ms` points; begin (text encoder) and decode (VAE) of B requests
//!   cost `ratio × t(B)`: they batch as well as the UNet does, which favours whole-request mode (it
//!   decodes 16 at once, step-level mode mostly one or two). The scheduler's per-row update and host
//!   work between calls cost nothing; the device's speed does not depend on load. One model, one
//!   size, one scheduler, text-to-image only.

mod device;
mod policies;
mod report;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context};

use device::{Curve, Device, PRESETS};
use kiln::configuration::Settings;
use kiln::scheduling::Schedule;
use policies::{Mode, Outcome, Policy, Run, Sim, Source};
use report::{Capacity, Group, ModeReport, Report, SweepRow, Target};
use workload::{parse_shares, Class, Mix, Request, SplitMix};

/// What to simulate.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The UNet's time per call by requests in it: `h200-512` (published: 3.2× the image-steps/s at
    /// batch 16 over 1; t(1) = 20 ms assumed), `cpu-tiny-256` (measured: sd-tiny-random, 256 px, the
    /// 2-vCPU VM), or points `B=ms,...` (ms per call of B guided requests; other facts as h200-512).
    #[arg(long, default_value = "h200-512")]
    pub curve: String,
    /// Rescale the curve so that one request's UNet call takes this many ms.
    #[arg(long)]
    pub t1_ms: Option<f64>,
    /// Offered load as a multiple of the whole-request policy's simulated capacity.
    #[arg(long, default_value_t = 2.0)]
    pub load: f64,
    /// Offered load in requests per second instead of `--load`.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Step counts and their shares, `steps=share,...`.
    #[arg(long, default_value = "4=0.4,20=0.3,50=0.3")]
    pub steps_mix: String,
    /// Tiers and their shares, `tier=share,...` (weights and deadlines from `[scheduling]`).
    #[arg(long, default_value = "free=0.6,plus=0.2,pro=0.2")]
    pub mix: String,
    /// A request meets its SLO when its latency is at most this × its step count's unloaded latency.
    #[arg(long, default_value_t = 3.0)]
    pub slo_factor: f64,
    /// Simulated seconds of arrivals.
    #[arg(long, default_value_t = 2000.0)]
    pub duration_secs: f64,
    /// Simulated seconds left out of the figures at the start.
    #[arg(long, default_value_t = 100.0)]
    pub warmup_secs: f64,
    /// Seeds arrivals, tiers and step counts.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Step-level cap. Default: `batching.diffusion`'s for the size (16 at 512² on a GPU, 2 at 256²
    /// on a CPU).
    #[arg(long)]
    pub cap: Option<usize>,
    /// Whole-request `max_batch_size`. Default: `batching`'s for the device (16 on a GPU, 1 on a CPU).
    #[arg(long)]
    pub request_batch: Option<usize>,
    /// Also run both policies at each of these caps (step-level cap = whole-request batch), on the
    /// same arrivals: `1,2,4,8,16`.
    #[arg(long, value_delimiter = ',')]
    pub caps: Vec<usize>,
    /// Unacked deliveries per tier queue. Default: `amqp.prefetch`.
    #[arg(long)]
    pub prefetch: Option<usize>,
    /// Text encoder call ÷ UNet call at equal batch. Default: the curve's (h200-512 0.25,
    /// cpu-tiny-256 0.04).
    #[arg(long)]
    pub begin_ratio: Option<f64>,
    /// VAE decode call ÷ UNet call at equal batch. Default: the curve's (h200-512 1.2,
    /// cpu-tiny-256 1.04).
    #[arg(long)]
    pub decode_ratio: Option<f64>,
    /// The UNet takes one timestep per call: rows step together only at equal step count and index.
    #[arg(long)]
    pub scalar_timestep: bool,
    /// Write the report as JSON here too (`-`: JSON only, to stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Run the simulation and print the report.
pub fn run(args: SimulateArgs, settings: &Settings) -> anyhow::Result<()> {
    let report = Scenario::from_args(&args, settings)?.report(&args)?;
    match args.json.as_deref() {
        Some(path) if path.as_os_str() == "-" => println!("{}", serde_json::to_string_pretty(&report)?),
        Some(path) => {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            report::print(&report);
        }
        None => report::print(&report),
    }
    Ok(())
}

/// The model name the batch limits are looked up under: none is configured for it, so the
/// device's defaults apply (`batching.max_batch_size`, `max_queue_delay_ms`).
const MODEL: &str = "simulated-diffusion";

/// A device, a workload and both policies.
#[derive(Debug, Clone)]
struct Scenario {
    curve_name: String,
    device: Device,
    mix: Mix,
    step: Policy,
    request: Policy,
}

impl Scenario {
    fn from_args(args: &SimulateArgs, settings: &Settings) -> anyhow::Result<Self> {
        let preset = PRESETS.iter().find(|p| p.name == args.curve);
        let facts = preset.unwrap_or(&PRESETS[0]);
        let mut curve = Curve::parse(preset.map_or(args.curve.as_str(), |p| p.points))?;
        if let Some(t1) = args.t1_ms {
            ensure!(t1 > 0.0 && t1.is_finite(), "--t1-ms must be positive");
            curve = curve.scaled(t1 / 1000.0 / curve.seconds(1));
        }
        let device = Device {
            curve,
            begin_ratio: args.begin_ratio.unwrap_or(facts.begin_ratio),
            decode_ratio: args.decode_ratio.unwrap_or(facts.decode_ratio),
            scalar_timestep: args.scalar_timestep,
        };
        let tiers = parse_shares(&args.mix, "--mix")?;
        let names: Vec<&str> = tiers.iter().map(|(t, _)| t.as_str()).collect();
        let schedule = Schedule::new(&settings.scheduling, &names, names[0])?;
        let classes = schedule
            .classes()
            .iter()
            .map(|c| Class {
                tier: c.tier.clone(),
                weight: c.weight,
                share: tiers.iter().find(|(t, _)| *t == c.tier).map_or(0.0, |(_, s)| *s),
                deadline_secs: c.default_deadline.map(|d| d.as_secs_f64()),
                deadline: c.default_deadline,
            })
            .collect();
        let mut steps = parse_shares(&args.steps_mix, "--steps-mix")?
            .into_iter()
            .map(|(n, share)| {
                let n: u32 = n
                    .parse()
                    .with_context(|| format!("--steps-mix: bad step count {n:?}"))?;
                ensure!(n >= 1, "--steps-mix: step counts start at 1");
                Ok((n, share))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        steps.sort_by_key(|s| s.0);
        let size = facts.size;
        let options = settings.batching.diffusion.options(facts.gpu);
        let mut limits = settings.batching.limits(MODEL, facts.gpu);
        if let Some(b) = args.request_batch {
            limits.max_batch_size = b.max(1);
        }
        let latent = (size / 8) as usize;
        let step = Policy {
            mode: Mode::Step,
            weights: schedule.weights(),
            limits,
            cap: args
                .cap
                .unwrap_or_else(|| options.cap(u64::from(size) * u64::from(size)))
                .max(1),
            max_pauses: options.max_pauses,
            max_paused_bytes: options.max_paused_bytes,
            // `DiffusionRow::bytes`: guided embeddings, latents and a multistep history of two.
            row_bytes: 4 * (2 * 77 * facts.hidden + 3 * 4 * latent * latent),
            prefetch: args.prefetch.unwrap_or(usize::from(settings.amqp.prefetch)).max(1),
            size,
        };
        Ok(Self {
            curve_name: preset.map_or_else(|| "custom".to_owned(), |p| p.name.to_owned()),
            device,
            mix: Mix { classes, steps },
            request: Policy {
                mode: Mode::Request,
                ..step.clone()
            },
            step,
        })
    }

    fn policy(&self, mode: Mode) -> &Policy {
        match mode {
            Mode::Step => &self.step,
            Mode::Request => &self.request,
        }
    }

    /// The same scenario with step-level cap and whole-request batch `cap`.
    fn at_cap(&self, cap: usize) -> Self {
        let mut s = self.clone();
        s.step.cap = cap.max(1);
        s.request.limits.max_batch_size = cap.max(1);
        s
    }

    /// Requests answered per second by `mode` under saturation: a closed loop, each answered
    /// request replaced at once by a new draw from the mix (no deadlines), with enough requests that
    /// every tier's prefetch stays full and every step count can fill a batch. In the steady state the
    /// answered mix is the drawn one.
    fn capacity(&self, mode: Mode, seconds: f64, warmup: f64, seed: u64) -> f64 {
        let mut rng = SplitMix(seed ^ 0x5eed);
        let batch = self.request.limits.max_batch_size.max(self.step.cap);
        let population = self.request.prefetch * self.mix.classes.len() + 8 * batch * self.mix.steps.len();
        let pending = (0..population)
            .map(|_| self.mix.draw(&mut rng, Duration::ZERO, false))
            .collect();
        let source = Source {
            pending,
            closed: Some((self.mix.clone(), rng)),
        };
        let (w0, w1) = (Duration::from_secs_f64(warmup), Duration::from_secs_f64(seconds));
        let run = Sim::new(&self.device, self.policy(mode), source, w1, (w0, w1)).run();
        let answered = run
            .outcomes
            .iter()
            .filter(|o| o.finished && o.end >= w0 && o.end < w1)
            .count();
        answered as f64 / (w1 - w0).as_secs_f64()
    }

    /// The p99 (nearest rank) of the unloaded latency of a request drawn from the step mix, seconds.
    fn unloaded_mix_p99(&self) -> f64 {
        let mut acc = 0.0;
        for &(n, share) in &self.mix.steps {
            acc += share;
            if acc >= 0.99 {
                return self.device.unloaded(n);
            }
        }
        self.device.unloaded(self.mix.steps.last().map_or(1, |s| s.0))
    }

    /// What always-full whole-request batches would give: `B / (begin + mean steps × t(B) + decode)`.
    fn full_batch_capacity(&self) -> f64 {
        let b = self.request.limits.max_batch_size;
        let steps: f64 = self.mix.steps.iter().map(|(n, s)| f64::from(*n) * s).sum();
        b as f64 / (self.device.begin(b) + steps * self.device.unet(b) + self.device.decode(b))
    }

    fn open_loop(&self, mode: Mode, arrivals: &[Request], end: Duration, window: (Duration, Duration)) -> Run {
        let source = Source {
            pending: arrivals.iter().copied().collect(),
            closed: None,
        };
        Sim::new(&self.device, self.policy(mode), source, end, window).run()
    }

    /// Both policies on the same arrivals; the paid arrivals alone as the isolation reference.
    fn both(&self, arrivals: &[Request], end: Duration, window: (Duration, Duration), slo: f64) -> [ModeReport; 2] {
        let free = self.mix.free_class();
        let paid: Vec<Request> = arrivals.iter().copied().filter(|r| r.class != free).collect();
        [Mode::Step, Mode::Request].map(|mode| {
            let run = self.open_loop(mode, arrivals, end, window);
            let alone = self.open_loop(mode, &paid, end, window);
            self.mode_report(mode, &run, &alone, window, slo)
        })
    }

    fn report(&self, args: &SimulateArgs) -> anyhow::Result<Report> {
        ensure!(
            args.duration_secs > args.warmup_secs && args.warmup_secs >= 0.0,
            "--duration-secs must exceed --warmup-secs"
        );
        ensure!(args.slo_factor > 0.0, "--slo-factor must be positive");
        let capacity = Capacity {
            request_per_sec: self.capacity(Mode::Request, args.duration_secs, args.warmup_secs, args.seed),
            request_full_batches_per_sec: self.full_batch_capacity(),
            step_per_sec: self.capacity(Mode::Step, args.duration_secs, args.warmup_secs, args.seed),
        };
        let offered = args.rate.unwrap_or(args.load * capacity.request_per_sec);
        ensure!(
            offered > 0.0 && offered.is_finite(),
            "the offered load must be positive"
        );
        let end = Duration::from_secs_f64(args.duration_secs);
        let window = (Duration::from_secs_f64(args.warmup_secs), end);
        let arrivals = self.mix.arrivals(offered, end, args.seed);
        let [step, request] = self.both(&arrivals, end, window, args.slo_factor);
        let sweep = args
            .caps
            .iter()
            .map(|&cap| {
                let [step, request] = self.at_cap(cap).both(&arrivals, end, window, args.slo_factor);
                SweepRow { cap, step, request }
            })
            .collect();
        let goodput_ratio = step.goodput_per_sec / request.goodput_per_sec;
        let shortest = self.mix.steps[0].0;
        let targets = vec![
            Target::at_least("goodput step ÷ request", goodput_ratio, 1.3),
            Target::at_most("paid p99 ÷ unloaded (step)", step.group("paid").p99_over_unloaded, 2.0),
            Target::at_least("busy (step)", step.busy, 0.95),
            Target::at_most(
                &format!("paid {shortest}-step p99 ÷ unloaded (step)"),
                step.group(&format!("paid {shortest} steps")).p99_over_unloaded,
                2.0,
            ),
            Target::at_most(
                &format!("{shortest}-step p99 ÷ unloaded, every tier (step)"),
                step.group(&format!("{shortest} steps")).p99_over_unloaded,
                2.0,
            ),
        ];
        let most = self.step.cap.max(self.request.limits.max_batch_size);
        let mut sizes: Vec<usize> = [1, 2, 4, 8, 16, 32].into_iter().filter(|n| *n < most).collect();
        sizes.push(most);
        Ok(Report {
            curve: self.curve_name.clone(),
            curve_points_ms: self.device.curve.points.iter().map(|(b, s)| (*b, s * 1000.0)).collect(),
            t_unet_ms: sizes.into_iter().map(|n| (n, self.device.unet(n) * 1000.0)).collect(),
            size: self.step.size,
            begin_ratio: self.device.begin_ratio,
            decode_ratio: self.device.decode_ratio,
            scalar_timestep: self.device.scalar_timestep,
            max_pauses: self.step.max_pauses,
            max_queue_delay_ms: self.request.limits.max_queue_delay.as_secs_f64() * 1000.0,
            prefetch: self.step.prefetch,
            classes: self.mix.classes.clone(),
            steps_mix: self.mix.steps.clone(),
            unloaded_ms: self
                .mix
                .steps
                .iter()
                .map(|(n, _)| (*n, self.device.unloaded(*n) * 1000.0))
                .collect(),
            unloaded_mix_p99_ms: self.unloaded_mix_p99() * 1000.0,
            slo_factor: args.slo_factor,
            capacity,
            load: offered / capacity.request_per_sec,
            offered_per_sec: offered,
            duration_secs: args.duration_secs,
            warmup_secs: args.warmup_secs,
            seed: args.seed,
            step,
            request,
            goodput_ratio,
            targets,
            sweep,
        })
    }

    /// One policy's figures over the window: the requests answered inside it.
    fn mode_report(&self, mode: Mode, run: &Run, alone: &Run, window: (Duration, Duration), slo: f64) -> ModeReport {
        let (w0, w1) = window;
        let seconds = (w1 - w0).as_secs_f64();
        let in_window = |o: &&Outcome| o.end >= w0 && o.end < w1;
        let done: Vec<&Outcome> = run.outcomes.iter().filter(in_window).filter(|o| o.finished).collect();
        let stretch = |o: &Outcome| (o.end - o.req.arrival).as_secs_f64() / self.device.unloaded(o.req.steps);
        let free = self.mix.free_class();
        let mix_ms = self.unloaded_mix_p99() * 1000.0;
        let of = |name: &str, keep: &dyn Fn(&Outcome) -> bool, unloaded_ms: f64| {
            Group::of(
                name,
                done.iter().copied().filter(|o| keep(o)),
                &stretch,
                slo,
                unloaded_ms,
            )
        };
        let mut groups = vec![of("all", &|_| true, mix_ms)];
        for (class, c) in self.mix.classes.iter().enumerate() {
            groups.push(of(&c.tier, &|o| o.req.class == class, mix_ms));
        }
        groups.push(of("paid", &|o| o.req.class != free, mix_ms));
        for &(n, _) in &self.mix.steps {
            let ms = self.device.unloaded(n) * 1000.0;
            groups.push(of(&format!("{n} steps"), &|o| o.req.steps == n, ms));
            let paid_n = |o: &Outcome| o.req.steps == n && o.req.class != free;
            groups.push(of(&format!("paid {n} steps"), &paid_n, ms));
        }
        let paid_alone = Group::of(
            "paid alone",
            alone.outcomes.iter().filter(in_window).filter(|o| o.finished),
            &stretch,
            slo,
            mix_ms,
        );
        ModeReport {
            mode,
            cap: match mode {
                Mode::Step => self.step.cap,
                Mode::Request => self.request.limits.max_batch_size,
            },
            throughput_per_sec: done.len() as f64 / seconds,
            goodput_per_sec: done.iter().filter(|o| stretch(o) <= slo).count() as f64 / seconds,
            busy: run.busy_in_window.as_secs_f64() / seconds,
            requests_per_unet_call: run.unet_requests as f64 / run.unet_calls.max(1) as f64,
            pauses: run.pauses,
            paused_requests: done.iter().filter(|o| o.pauses > 0).count(),
            expired: run.outcomes.iter().filter(in_window).filter(|o| !o.finished).count(),
            groups,
            paid_alone_p99_over_unloaded: paid_alone.p99_over_unloaded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(curve: &str) -> SimulateArgs {
        SimulateArgs {
            curve: curve.into(),
            t1_ms: None,
            load: 2.0,
            rate: None,
            steps_mix: "4=0.4,20=0.3,50=0.3".into(),
            mix: "free=0.6,plus=0.2,pro=0.2".into(),
            slo_factor: 3.0,
            duration_secs: 300.0,
            warmup_secs: 30.0,
            seed: 5,
            cap: None,
            request_batch: None,
            caps: Vec::new(),
            prefetch: None,
            begin_ratio: None,
            decode_ratio: None,
            scalar_timestep: false,
            json: None,
        }
    }

    #[test]
    fn the_presets_take_the_workers_defaults_for_their_device() {
        let gpu = Scenario::from_args(&args("h200-512"), &Settings::default()).unwrap();
        assert_eq!((gpu.step.cap, gpu.request.limits.max_batch_size), (16, 16));
        assert_eq!(gpu.request.limits.max_queue_delay, Duration::from_millis(2));
        assert_eq!(gpu.step.weights, [20.0, 10.0, 1.0], "pro, plus, free");
        assert_eq!(gpu.mix.classes[2].deadline, Some(Duration::from_secs(600)));
        let cpu = Scenario::from_args(&args("cpu-tiny-256"), &Settings::default()).unwrap();
        assert_eq!((cpu.step.cap, cpu.request.limits.max_batch_size), (2, 1));
        let custom = Scenario::from_args(&args("1=10,8=40"), &Settings::default()).unwrap();
        assert!((custom.device.unet(8) - 0.040).abs() < 1e-12);
        assert!(Scenario::from_args(&args("h100"), &Settings::default()).is_err());
    }

    #[test]
    fn a_saturated_queue_with_room_reaches_the_capacity_of_full_batches() {
        let mut a = args("h200-512");
        a.prefetch = Some(64);
        let s = Scenario::from_args(&a, &Settings::default()).unwrap();
        let simulated = s.capacity(Mode::Request, 1000.0, 200.0, 3);
        let bound = s.full_batch_capacity();
        assert!(
            (simulated / bound - 1.0).abs() < 0.02,
            "saturated {simulated} req/s, full batches {bound}"
        );
    }

    #[test]
    fn results_scale_with_the_time_unit() {
        let mut a = args("h200-512");
        a.t1_ms = Some(15.0);
        a.cap = Some(4);
        let fast = Scenario::from_args(&a, &Settings::default())
            .unwrap()
            .report(&a)
            .unwrap();
        a.t1_ms = Some(30.0);
        a.duration_secs *= 2.0;
        a.warmup_secs *= 2.0;
        let slow = Scenario::from_args(&a, &Settings::default())
            .unwrap()
            .report(&a)
            .unwrap();
        let close = |x: f64, y: f64| (x / y - 1.0).abs() < 0.05;
        let (f, s) = (fast.capacity.request_per_sec, slow.capacity.request_per_sec);
        assert!(close(f, 2.0 * s), "capacity {f} vs {s}");
        assert!(
            close(fast.goodput_ratio, slow.goodput_ratio),
            "goodput ratio {} vs {}",
            fast.goodput_ratio,
            slow.goodput_ratio
        );
        assert!(close(fast.step.busy, slow.step.busy));
    }

    #[test]
    fn a_sweep_runs_both_policies_at_each_cap_on_the_same_arrivals() {
        let mut a = args("cpu-tiny-256");
        a.caps = vec![1, 2];
        let r = Scenario::from_args(&a, &Settings::default())
            .unwrap()
            .report(&a)
            .unwrap();
        assert_eq!(r.sweep.len(), 2);
        assert_eq!((r.sweep[1].step.cap, r.sweep[1].request.cap), (2, 2));
        // The default step cap on a CPU is 2: the same run as the main one.
        assert_eq!(r.sweep[1].step.goodput_per_sec, r.step.goodput_per_sec);
        // Whole-request batches of 1 are the CPU default: the same run as the main one.
        assert_eq!(r.sweep[0].request.goodput_per_sec, r.request.goodput_per_sec);
    }
}
