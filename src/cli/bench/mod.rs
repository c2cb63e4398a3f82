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
//! - [`users`]: the simulated users, their requests, their arrivals.
//! - [`book`]: sending, and collecting the replies.
//! - [`counters`]: the inference thread's counters, from the metrics.
//! - [`report`]: the figures, printed and as JSON.
//! - [`worker`]: the worker under test.

mod book;
mod counters;
mod report;
mod users;
mod worker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;

use book::Book;
use counters::EngineCounters;
use kiln::amqp::Topology;
use kiln::configuration::Settings;
use kiln::submit::Producer;
use report::{BenchReport, Window};
use users::{Arrivals, Users};

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
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
    /// The photo every request carries.
    #[arg(long, default_value = "samples/astronaut.jpg")]
    pub image: PathBuf,
    /// Output size (longer side).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Seconds to wait after sending for the last replies.
    #[arg(long, default_value_t = 120.0)]
    pub drain_secs: f64,
    /// Write the report as JSON here as well.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Run the benchmark and print the report.
pub async fn run(args: BenchArgs, settings: Settings) -> anyhow::Result<BenchReport> {
    let mix = users::parse_mix(&args.mix)?;
    let photo = std::fs::read(&args.image).with_context(|| format!("cannot read {}", args.image.display()))?;
    let users = Users::new(mix, args.users, photo, args.size);
    let settings = worker::isolated(settings, users.tiers())?;
    let topology = settings.topology();
    users.register(&settings.rate_limit).await?;
    let worker = worker::Worker::start(&settings).await?;

    let producer = Producer::connect_as("kiln bench", &settings.amqp.url, &topology.requests).await?;
    topology.declare(producer.sender().channel()).await?;
    let (sender, replies, closer) = producer.split();
    let book = Book::new(sender);
    let reader = book.read(replies);
    let traffic = Traffic {
        users: &users,
        topology: &topology,
        book: &book,
    };

    let capacity = match args.rate {
        Some(_) => None,
        None => {
            let window = Duration::from_secs_f64(args.capacity_secs);
            let in_flight = usize::from(settings.amqp.prefetch) * 2;
            Some(traffic.capacity(window, in_flight).await?)
        }
    };
    let offered = args.rate.unwrap_or_else(|| args.load * capacity.unwrap_or(1.0));
    anyhow::ensure!(offered > 0.0, "nothing to offer: capacity or --rate is 0");
    tracing::info!(?capacity, offered, "sending");
    let window = traffic
        .open_loop(offered, Duration::from_secs_f64(args.duration_secs))
        .await;
    book.drain(Duration::from_secs_f64(args.drain_secs)).await;

    let report = report::summarize(book.take(), capacity, offered, &window);
    report::print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    worker.stop().await?;
    closer.close(reader).await;
    worker::clean_up(&settings, &topology).await;
    Ok(report)
}

/// What sends: the users' requests, to their tiers' queues, entered in the book.
struct Traffic<'a> {
    users: &'a Users,
    topology: &'a Topology,
    book: &'a Book,
}

impl Traffic<'_> {
    /// Publish the `n`-th request of a user of `tier`; returns its id.
    fn send(&self, tier: &str, n: usize) -> (String, impl std::future::Future<Output = anyhow::Result<()>>) {
        let request = self.users.request(tier, n);
        let id = request.request_id.clone();
        (
            id,
            self.book.send(self.topology.tier_queue(tier), tier.to_owned(), request),
        )
    }

    /// Closed loop: keep `in_flight` requests of the last tier in the worker for `window`; images/s.
    async fn capacity(&self, window: Duration, in_flight: usize) -> anyhow::Result<f64> {
        let tier = self.users.last_tier()?;
        let started = Instant::now();
        let before = EngineCounters::read();
        let mut n = 0;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        while started.elapsed() < window {
            while pending.len() < in_flight {
                let (id, send) = self.send(tier, n);
                n += 1;
                tokio::time::timeout(Duration::from_secs(60), send)
                    .await
                    .context("the broker did not confirm a request within 60 s")??;
                pending.push(self.book.wait_final(id, Duration::from_secs(120)));
            }
            pending.next().await;
        }
        let images = EngineCounters::read().since(before).images;
        while pending.next().await.is_some() {}
        self.book.take();
        Ok(images / started.elapsed().as_secs_f64())
    }

    /// Open loop: Poisson arrivals at `offered` per second for `window`, tier by share, each send
    /// on a task of its own.
    async fn open_loop(&self, offered: f64, window: Duration) -> Window {
        let started = Instant::now();
        let before = EngineCounters::read();
        for (n, (at, pick)) in Arrivals::new(offered, window).enumerate() {
            tokio::time::sleep_until((started + at).into()).await;
            let (_, send) = self.send(self.users.tier_at(pick), n);
            tokio::spawn(send);
        }
        Window {
            started,
            sending: started.elapsed(),
            engine: EngineCounters::read().since(before),
        }
    }
}
