//! `kiln bench`: a load generator with simulated users per tier, through the real broker and Redis.
//!
//! It starts a worker in this process (its own topology prefix and Redis key prefix, so it never
//! touches a live deployment's queues), gives each simulated user its tier in Redis, measures the
//! worker's capacity closed-loop, then sends requests open-loop (Poisson arrivals at `load` × that
//! capacity, split between tiers by `mix`), each to its tier's queue, and reads every reply. It
//! reports per tier: images/s, wait (broker + batcher, from the reply's timings) and total
//! (publish to reply, measured here) percentiles, rejections, deferrals, expiries; and the fraction
//! of the sending window the inference thread was busy, from the worker's Prometheus counters.
//!
//! `--workload diffusion` sends text-to-image requests whose step counts follow `--steps-mix`, and
//! first measures each step count alone (the unloaded reference, in the same run). Each request's
//! SLO is `--slo-factor` × its step count's unloaded p50; the report adds goodput (images within
//! their SLO per second of the window) and latency by tier and by step count against the
//! reference. The worker serves only that model, with the same number of requests at once in both
//! `[batching.diffusion] mode`s (`--batch`), so that a run per mode compares scheduling alone
//! (`scripts/bench-step-batching.sh`).
//!
//! - [`users`]: the simulated users, their requests, their arrivals.
//! - [`workload`]: what they ask for: a style transfer, or a diffusion request from a step mix.
//! - [`traffic`]: sending: alone, closed loop, open loop.
//! - [`book`]: sending, and collecting the replies.
//! - [`counters`]: the inference thread's counters, from the metrics.
//! - [`report`]: the figures, printed and as JSON; [`goodput`]: the diffusion workload's.
//! - [`worker`]: the worker under test.

mod book;
mod counters;
mod goodput;
mod report;
mod traffic;
mod users;
mod worker;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use book::Book;
use kiln::amqp::connect::Broker;
use kiln::configuration::Settings;
use kiln::inference::settings::{ExecutionProviderKind, StepMode};
use kiln::inference::StepCap;
use kiln::submit::Producer;
use report::BenchReport;
use traffic::Traffic;
use users::Users;
use workload::{Diffusion, Workload, WorkloadKind};

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What the users send: `style` (a photo to stylize) or `diffusion` (text-to-image, step
    /// counts from `--steps-mix`).
    #[arg(long, value_enum, default_value_t = WorkloadKind::Style)]
    pub workload: WorkloadKind,
    /// Offered load as a multiple of the capacity measured first (3 = three times what the worker
    /// can do).
    #[arg(long, default_value_t = 1.0)]
    pub load: f64,
    /// Offered load in requests per second instead of `--load` (skips the capacity measurement).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20.0)]
    pub duration_secs: f64,
    /// Seconds of the closed-loop capacity measurement.
    #[arg(long, default_value_t = 8.0)]
    pub capacity_secs: f64,
    /// Share of requests per tier, `tier=share,...` (shares are normalised).
    #[arg(long, default_value = "free=0.6,plus=0.2,pro=0.2")]
    pub mix: String,
    /// Simulated users per tier.
    #[arg(long, default_value_t = 500)]
    pub users: usize,
    /// Seed of the arrival times, their tiers and (diffusion) their step counts: runs with the
    /// same seed and rate send the same requests at the same moments.
    #[arg(long, default_value_t = users::DEFAULT_SEED)]
    pub seed: u64,
    /// The photo every request carries (style).
    #[arg(long, default_value = "samples/astronaut.jpg")]
    pub image: PathBuf,
    /// Output size: the longer side (style), width and height (diffusion).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Diffusion: the model.
    #[arg(long, default_value = "sd-tiny-random")]
    pub diffusion_model: String,
    /// Diffusion: share of requests per step count, `steps=share,...` (shares are normalised).
    #[arg(long, default_value = "4=0.4,20=0.3,50=0.3")]
    pub steps_mix: String,
    /// Diffusion: most requests at once, in both modes: the step-level cap for `--size` and the
    /// whole-request batch size. 0: the step-level default for the size on this provider.
    #[arg(long, default_value_t = 0)]
    pub batch: usize,
    /// Diffusion: requests of each step count timed alone before the load (the unloaded
    /// reference).
    #[arg(long, default_value_t = 5)]
    pub unloaded_requests: usize,
    /// Diffusion: a request's SLO is this × the unloaded p50 of its step count.
    #[arg(long, default_value_t = 3.0)]
    pub slo_factor: f64,
    /// Diffusion: the SLO's base by step count, `steps=ms,...`, instead of this run's unloaded
    /// p50 (to judge two runs by the same SLOs).
    #[arg(long, default_value = "")]
    pub slo_base_ms: String,
    /// Seconds to wait after sending for the last replies.
    #[arg(long, default_value_t = 120.0)]
    pub drain_secs: f64,
    /// Write the report as JSON here as well.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Run the benchmark and print the report.
pub async fn run(args: BenchArgs, mut settings: Settings) -> anyhow::Result<BenchReport> {
    let mix = users::parse_mix(&args.mix)?;
    let (workload, diffusion) = match args.workload {
        WorkloadKind::Style => {
            let photo = std::fs::read(&args.image).with_context(|| format!("cannot read {}", args.image.display()))?;
            let workload = Workload::Style { photo, size: args.size };
            (workload, None)
        }
        WorkloadKind::Diffusion => {
            let run = DiffusionRun::new(&args, &mut settings)?;
            let workload = Workload::Diffusion(Diffusion {
                model: args.diffusion_model.clone(),
                size: args.size,
                steps: run.steps_mix.clone(),
                seed: args.seed,
            });
            (workload, Some(run))
        }
    };
    let users = Users::new(mix, args.users, workload);
    let settings = worker::isolated(settings, users.tiers())?;
    let topology = settings.topology();
    users.register(&settings.rate_limit).await?;
    let worker = worker::Worker::start(&settings).await?;

    let producer = Producer::connect_as("kiln bench", Broker::new(&settings.amqp)?, &topology.requests).await?;
    topology.declare(producer.sender().channel()).await?;
    let (sender, replies, closer) = producer.split();
    let book = Book::new(sender);
    let reader = book.read(replies);
    let traffic = Traffic {
        users: &users,
        topology: &topology,
        book: &book,
    };

    let unloaded = match &diffusion {
        Some(run) => {
            let steps: Vec<u32> = run.steps_mix.iter().map(|&(steps, _)| steps).collect();
            tracing::info!(?steps, repeats = args.unloaded_requests, "unloaded reference");
            traffic.unloaded(&steps, args.unloaded_requests).await?;
            goodput::unloaded(&book.take())?
        }
        None => BTreeMap::new(),
    };
    let capacity = match args.rate {
        Some(_) => None,
        None => {
            let window = Duration::from_secs_f64(args.capacity_secs);
            // Enough for full batches; for diffusion few, as the closed loop's last requests
            // (seconds each) are waited for after the window.
            let in_flight = match &diffusion {
                None => usize::from(settings.amqp.prefetch) * 2,
                Some(run) => (run.batch * 4).max(4),
            };
            Some(traffic.capacity(window, in_flight).await?)
        }
    };
    let offered = args.rate.unwrap_or_else(|| args.load * capacity.unwrap_or(1.0));
    anyhow::ensure!(offered > 0.0, "nothing to offer: capacity or --rate is 0");
    tracing::info!(?capacity, offered, "sending");
    let window = traffic
        .open_loop(offered, Duration::from_secs_f64(args.duration_secs), args.seed)
        .await;
    book.drain(Duration::from_secs_f64(args.drain_secs)).await;

    let entries = book.take();
    let mut report = report::summarize(&entries, capacity, offered, &window);
    report.diffusion = diffusion.map(|run| {
        let reference = goodput::Reference {
            mode: run.mode,
            batch: run.batch,
            size: args.size,
            steps_mix: &run.steps_mix,
            slo_factor: args.slo_factor,
            slo_base_ms: &run.slo_base_ms,
            unloaded,
        };
        goodput::summarize(&entries, reference, &window)
    });
    report::print(&report);
    if let Some(diffusion) = &report.diffusion {
        println!();
        goodput::print(diffusion);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    worker.stop().await?;
    closer.close(reader).await;
    worker::clean_up(&settings, &topology).await;
    Ok(report)
}

/// A diffusion run's own settings.
struct DiffusionRun {
    steps_mix: Vec<(u32, f64)>,
    slo_base_ms: BTreeMap<u32, f64>,
    /// Most requests at once, in either mode.
    batch: usize,
    /// `step` or `request`.
    mode: &'static str,
}

impl DiffusionRun {
    /// Parse the diffusion options, and make `settings` serve only the model, with at most `batch`
    /// requests at once whichever the mode: the step-level cap for the size, and the model's
    /// whole-request batch size (so the two modes differ in scheduling only).
    fn new(args: &BenchArgs, settings: &mut Settings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            args.slo_factor > 0.0 && args.unloaded_requests > 0,
            "--slo-factor and --unloaded-requests must be positive"
        );
        let gpu = settings.inference.execution_provider == ExecutionProviderKind::Cuda;
        let pixels = u64::from(args.size) * u64::from(args.size);
        let batch = match args.batch {
            0 => settings.batching.diffusion.options(gpu).cap(pixels),
            n => n,
        };
        let model = args.diffusion_model.clone();
        settings.models.enabled = vec![model.clone()];
        settings.batching.diffusion.caps = vec![StepCap {
            max_pixels: pixels,
            max_requests: batch,
        }];
        settings.batching.models.entry(model).or_default().max_batch_size = Some(batch);
        Ok(Self {
            steps_mix: workload::parse_steps_mix(&args.steps_mix)?,
            slo_base_ms: workload::parse_slo_base(&args.slo_base_ms)?,
            batch,
            mode: match settings.batching.diffusion.mode {
                StepMode::Step => "step",
                StepMode::Request => "request",
            },
        })
    }
}
