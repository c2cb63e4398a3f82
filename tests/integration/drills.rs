//! Fault drills (RELIABILITY.md, *Fault drills*): two `kiln worker` processes under a steady load
//! of requests published with confirms, one fault each; every drill counts the requests published,
//! answered, lost, answered twice (and whether the copies share their `message_id`), charged twice,
//! and each worker's peak RSS against the bound of ARCHITECTURE.md (*Memory per worker*).
//!
//! The size comes from `DRILL_REQUESTS` (the suite's short form: 60 requests, about 6 s of load);
//! `scripts/drills.sh --requests N` runs the long form. Each drill prints one `DRILL <name>:` line
//! (`--no-capture`). Drills that restart the broker or Redis use instances of their own
//! (`services`); the network cuts go through [`TcpProxy`]. Rate limits are on, every request has
//! a user of its own, so a second charge is visible in Redis as `quota_used` above the request's
//! cost.

mod load;
mod services;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::configuration::Settings;
use kiln::domain::{ReplyStatus, RequestDocument, WireImage, WireParams, WireStyle, CONTRACT_VERSION};
use kiln::rate_limit::{now_ms, RedisLimiter};

use self::load::{Load, Plan, Tally};
use self::services::{PrivateBroker, PrivateRedis};
use crate::helpers::{
    cleanup, free_port, http_get, metric_value, poll_until, read, test_settings, TcpProxy, WorkerProcess, AMQP_URL,
};

/// The shared Redis (the drills that do not restart it).
const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// Requests per drill when `DRILL_REQUESTS` is not set.
const SHORT_FORM: usize = 60;

/// Time between two publishes of the steady load.
const INTERVAL: Duration = Duration::from_millis(100);

/// How long a network cut lasts.
const CUT: Duration = Duration::from_secs(10);

/// How long a worker may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// After every request is answered, how long the producer keeps listening for late copies.
const SETTLE: Duration = Duration::from_secs(3);

/// Requests per drill.
fn drill_requests() -> usize {
    std::env::var("DRILL_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(SHORT_FORM)
}

/// A drill: its settings, where its workers and producer find the broker and Redis, its workers.
struct Drill {
    name: &'static str,
    settings: Settings,
    /// The broker the producer uses (the workers may go through a proxy).
    producer_url: String,
    /// Settings given to every worker as `KILN_*` variables besides [`WorkerProcess::spawn`]'s.
    env: Vec<(String, String)>,
    workers: Vec<Worker>,
    /// Set by [`Drill::stop`]; otherwise (a failed drill) the topology is deleted on drop.
    stopped: bool,
}

struct Worker {
    process: WorkerProcess,
    http: SocketAddr,
}

impl Drill {
    /// Limits on (default tiers: every user is `free`, burst 4, so one request per user is never
    /// limited), prefetch 4, fast reconnects, batches of up to 4 (so a killed worker dies holding
    /// a batch); the shared broker and Redis unless changed.
    fn new(name: &'static str) -> Self {
        let mut settings = test_settings();
        settings.rate_limit.enabled = true;
        settings.rate_limit.redis_url = REDIS_URL.to_owned().into();
        settings.amqp.prefetch = 4;
        let mut drill = Self {
            name,
            settings,
            producer_url: AMQP_URL.to_owned(),
            env: Vec::new(),
            workers: Vec::new(),
            stopped: false,
        };
        drill.set("KILN_AMQP__URL", AMQP_URL);
        drill.set("KILN_RATE_LIMIT__REDIS_URL", REDIS_URL);
        drill.set("KILN_AMQP__RECONNECT__INITIAL_MS", "100");
        drill.set("KILN_AMQP__RECONNECT__MAX_MS", "1000");
        drill.set("KILN_BATCHING__MAX_BATCH_SIZE", "4");
        drill.set("KILN_BATCHING__MAX_QUEUE_DELAY_MS", "20");
        drill
    }

    /// A setting for every worker started from now on.
    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Where the workers find Redis (and where the test reads the charges).
    fn use_redis(&mut self, worker_url: &str, direct_url: &str) {
        self.settings.rate_limit.redis_url = direct_url.to_owned().into();
        self.set("KILN_RATE_LIMIT__REDIS_URL", worker_url);
    }

    /// Start a worker; returns its index once it consumes.
    async fn spawn_worker(&mut self) -> usize {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut env = self.env.clone();
        env.push(("KILN_HTTP__BIND".into(), http.to_string()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let process = WorkerProcess::spawn(&self.settings, &env);
        process.wait_for_log("worker ready", START_TIMEOUT).await;
        self.workers.push(Worker { process, http });
        self.workers.len() - 1
    }

    /// Start `count` requests of 256 px, one every [`INTERVAL`], to the shared request queue.
    async fn steady_load(&self, count: usize, burst: Option<std::ops::Range<usize>>) -> Load {
        let photo = Arc::new(read("tests/data/astronaut-256.png"));
        Load::start(Plan {
            url: self.producer_url.clone(),
            reply_queue: reply_queue(&self.settings),
            queues: vec![self.settings.topology().requests],
            count,
            interval: INTERVAL,
            burst,
            request: Box::new(move |n| style_request(&photo, n)),
        })
        .await
    }

    /// A worker's `/metrics` value of `series` (summed over its labels when `series` has none).
    async fn metric(&self, worker: usize, series: &str) -> f64 {
        let (_, text) = http_get(self.workers[worker].http, "/metrics").await;
        if series.contains('{') {
            return metric_value(&text, series).unwrap_or(0.0);
        }
        text.lines()
            .filter(|l| l.starts_with(&format!("{series} ")) || l.starts_with(&format!("{series}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The drill's figures from what the producer saw, Redis and the workers' peaks; printed.
    async fn figures(&self, tally: &Tally, cost: u64, bound: u64, detail: &str) -> Figures {
        let limiter = RedisLimiter::new(Arc::new(self.settings.rate_limit.clone())).unwrap();
        let (mut charged_twice, mut uncharged) = (0, 0);
        for (_, user) in &tally.published {
            let used = limiter.show(user, now_ms()).await.expect("Redis answers").quota_used;
            if used > cost {
                charged_twice += 1;
            } else if used < cost {
                uncharged += 1;
            }
        }
        let published: std::collections::HashSet<&str> = tally.published.iter().map(|(id, _)| id.as_str()).collect();
        let doubles: Vec<_> = tally
            .finals
            .iter()
            .filter(|(id, finals)| published.contains(id.as_str()) && finals.len() > 1)
            .collect();
        let same_message_id = doubles
            .iter()
            .filter(|(id, finals)| {
                let expected = format!("final:{id}");
                finals
                    .iter()
                    .all(|f| f.message_id.as_deref() == Some(expected.as_str()))
            })
            .count();
        let errors: Vec<String> = tally
            .finals
            .values()
            .flatten()
            .filter(|f| f.status != ReplyStatus::Ok)
            .map(|f| f.error.clone().unwrap_or_default())
            .collect();
        let figures = Figures {
            published: tally.published.len(),
            answered: tally.answered(),
            lost: tally.published.len() - tally.answered(),
            doubled: doubles.len(),
            same_message_id,
            charged_twice,
            uncharged,
            errors,
            republished: tally.republished,
            unknown: tally
                .finals
                .keys()
                .filter(|id| !published.contains(id.as_str()))
                .count()
                + tally.malformed,
            peaks: self.workers.iter().map(|w| w.process.peak_rss_bytes()).collect(),
            served: self
                .workers
                .iter()
                .map(|w| {
                    let suffix = format!("-{}", w.process.pid());
                    tally
                        .finals
                        .values()
                        .flatten()
                        .filter(|f| f.worker_id.ends_with(&suffix))
                        .count()
                })
                .collect(),
            bound,
        };
        println!("{}", figures.line(self.name, detail));
        figures
    }

    /// Stop the workers still running (SIGTERM, then wait) and delete the topology.
    async fn stop(mut self) {
        for worker in &mut self.workers {
            worker.process.terminate();
        }
        for worker in &mut self.workers {
            let _ = worker.process.wait_exit(START_TIMEOUT).await;
        }
        if self.producer_url == AMQP_URL {
            cleanup(&self.settings).await;
        }
        self.stopped = true;
    }
}

impl Drop for Drill {
    fn drop(&mut self) {
        // A failed drill does not reach stop(): its workers die with their `WorkerProcess`; delete
        // its queues (and the producer's) on the shared broker from a thread of our own.
        if self.stopped || self.producer_url != AMQP_URL {
            return;
        }
        let settings = self.settings.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    cleanup(&settings).await;
                    let replies = reply_queue(&settings);
                    let _ = crate::helpers::admin_channel()
                        .await
                        .queue_delete(replies.as_str().into(), Default::default())
                        .await;
                });
        })
        .join();
    }
}

/// The producer's reply queue: `<prefix>.drill-replies`.
fn reply_queue(settings: &Settings) -> String {
    format!("{}.drill-replies", settings.amqp.topology.prefix)
}

/// A request of its own user (`drill-<n>`), 256 px, one of the 26 styles.
fn style_request(photo: &[u8], n: usize) -> RequestDocument {
    RequestDocument {
        version: CONTRACT_VERSION,
        request_id: uuid::Uuid::new_v4().to_string(),
        user_id: format!("drill-{n}"),
        model: "multistyle26".into(),
        params: WireParams {
            style: Some(WireStyle::Index((n % 26) as i64)),
            ..Default::default()
        },
        image: Some(WireImage::from_bytes(photo)),
        deadline: None,
        created_at: Some(kiln::submit::rfc3339(time::OffsetDateTime::now_utc())),
        tier: None,
        progress: false,
    }
}

/// What a drill measured.
struct Figures {
    published: usize,
    answered: usize,
    lost: usize,
    doubled: usize,
    /// Of the doubles, those whose copies all carry `message_id = final:<request_id>`.
    same_message_id: usize,
    charged_twice: usize,
    /// Users with no charge in Redis: admitted by a worker deciding alone (Redis unreachable).
    uncharged: usize,
    /// The error codes of the final replies that were not `ok`.
    errors: Vec<String>,
    republished: usize,
    /// Replies to requests this producer never had confirmed, or not kiln replies at all.
    unknown: usize,
    peaks: Vec<u64>,
    /// Final replies sent by each worker (in the order they started).
    served: Vec<usize>,
    bound: u64,
}

impl Figures {
    fn line(&self, drill: &str, detail: &str) -> String {
        let mb = |b: u64| b / (1 << 20);
        let peaks: Vec<String> = self.peaks.iter().map(|&p| mb(p).to_string()).collect();
        format!(
            "DRILL {drill}: published {} answered {} lost {} doubled {} (same message_id {}) charged_twice {} \
             peak_rss_mb {} bound_mb {} | served {} uncharged {} errors {} republished {} unknown {}{}{detail}",
            self.published,
            self.answered,
            self.lost,
            self.doubled,
            self.same_message_id,
            self.charged_twice,
            peaks.join("/"),
            mb(self.bound),
            self.served
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/"),
            self.uncharged,
            self.errors.len(),
            self.republished,
            self.unknown,
            if detail.is_empty() { "" } else { " " },
        )
    }

    /// Nothing lost, nothing charged twice, every answer an image, every worker under the bound;
    /// at most `doubles` answered twice, each copy with the same `message_id`.
    fn assert_within(&self, doubles: usize) {
        assert_eq!(self.lost, 0, "requests lost");
        assert_eq!(self.charged_twice, 0, "users charged twice");
        assert!(self.errors.is_empty(), "error replies: {:?}", self.errors);
        assert_eq!(self.unknown, 0, "replies to requests never published");
        assert!(
            self.doubled <= doubles,
            "{} answered twice (at most {doubles})",
            self.doubled
        );
        assert_eq!(
            self.same_message_id, self.doubled,
            "a second final reply must carry the first one's message_id"
        );
        for (worker, peak) in self.peaks.iter().enumerate() {
            assert!(
                *peak <= self.bound,
                "worker {worker}: peak RSS {peak} B over the bound {} B",
                self.bound
            );
        }
    }
}

/// What one request of the largest kind the drill sends needs, for [`rss_bound`].
#[derive(Debug, Clone, Copy)]
struct Footprint {
    /// The tensor's side (square).
    side: u64,
    /// The request message's size.
    body_bytes: u64,
    /// The input photo's pixels.
    input_pixels: u64,
}

/// The bound on one worker's RSS of ARCHITECTURE.md, *Memory per worker*:
/// `R0 + max_batch × M_run × P + prefetch × queues × (7/4 × body + 30 × P) + cpu_threads × 3 × (P_in + P)`.
fn rss_bound(settings: &Settings, max_batch: u64, request: Footprint) -> u64 {
    /// The worker once its models are loaded and warm (measured: 93 MB).
    const R0: u64 = 128 << 20;
    /// ONNX Runtime's memory for one sample of a multistyle26 run, per pixel (measured on CPU:
    /// 574 B at 512 px, 612 at 1024, 690 at 2048).
    const RUN_BYTES_PER_PIXEL: u64 = 700;
    let pixels = request.side * request.side;
    let queues = settings.topology().request_queues.len() as u64;
    let prefetch = u64::from(settings.amqp.prefetch);
    let cpu_threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    R0 + max_batch * RUN_BYTES_PER_PIXEL * pixels
        + prefetch * queues * (request.body_bytes * 7 / 4 + 30 * pixels)
        + cpu_threads * 3 * (request.input_pixels + pixels)
}

/// The bound for the 256 px drills (batches of 4).
fn small_bound(settings: &Settings) -> u64 {
    let photo = read("tests/data/astronaut-256.png");
    let body = serde_json::to_vec(&style_request(&photo, 0)).unwrap().len() as u64;
    rss_bound(
        settings,
        4,
        Footprint {
            side: 256,
            body_bytes: body,
            input_pixels: 256 * 256,
        },
    )
}

/// How long to wait for the last answers after the load: generous, for a shared 2-core machine.
fn answer_timeout(count: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(50) * count as u32
}

#[tokio::test]
async fn drill_kill9() {
    // A worker killed with SIGKILL while it holds a batch: the broker gives its unacknowledged
    // requests to the other worker. A copy can be answered twice only if the kill fell between a
    // reply's confirm and its outcome record (same message_id); never charged twice (the lease).
    let count = drill_requests();
    let mut drill = Drill::new("kill9");
    let victim = drill.spawn_worker().await;
    drill.spawn_worker().await;
    // A burst at a third of the load, so both workers have their hands full (4 each).
    let burst_at = count / 3;
    let load = drill.steady_load(count, Some(burst_at..burst_at + 8)).await;
    load.wait_published(burst_at + 8, answer_timeout(count)).await;
    let replied_before = drill.workers[victim].process.count("\"replied\"");
    let mut held = 0.0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        held = drill.metric(victim, "kiln_requests_in_flight").await;
        if held >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drill.workers[victim].process.kill();
    // Its replacement, as Kubernetes would start one.
    drill.spawn_worker().await;
    let tally = load.finish(answer_timeout(count), SETTLE).await;
    let prefetch = drill.settings.amqp.prefetch as usize;
    let bound = small_bound(&drill.settings);
    let detail = format!("held_at_kill {held} replied_before_kill {replied_before}");
    let figures = drill.figures(&tally, 1, bound, &detail).await;
    assert!(
        replied_before > 0,
        "the victim had served requests before it was killed"
    );
    figures.assert_within(prefetch);
    drill.stop().await;
}

#[tokio::test]
async fn drill_broker_restart() {
    // The broker (a node of the drill's own) stops and starts again under load: the workers and
    // the producer reconnect; the quorum request queues and the producer's reply queue keep their
    // messages. What both workers held unacknowledged comes back; only a reply confirmed just
    // before the stop whose outcome was not yet recorded can be answered again.
    let count = drill_requests();
    let broker = PrivateBroker::start();
    let mut drill = Drill::new("broker_restart");
    drill.producer_url = broker.url().to_owned();
    drill.settings.amqp.url = broker.url().to_owned().into();
    drill.set("KILN_AMQP__URL", broker.url());
    drill.spawn_worker().await;
    drill.spawn_worker().await;
    let load = drill.steady_load(count, None).await;
    load.wait_published(count / 3, answer_timeout(count)).await;
    let started = Instant::now();
    let dir = broker.dir();
    tokio::task::spawn_blocking(move || PrivateBroker::restart(&dir))
        .await
        .unwrap();
    let restart = started.elapsed();
    for worker in 0..2 {
        let process = &drill.workers[worker].process;
        poll_until("the worker consuming again", START_TIMEOUT, async || {
            (process.count("worker ready") >= 2).then_some(())
        })
        .await;
    }
    let back = started.elapsed();
    let tally = load.finish(answer_timeout(count), SETTLE).await;
    let bound = small_bound(&drill.settings);
    let detail = format!(
        "restart_s {:.1} workers_ready_after_s {:.1}",
        restart.as_secs_f64(),
        back.as_secs_f64()
    );
    let figures = drill.figures(&tally, 1, bound, &detail).await;
    figures.assert_within(2 * drill.settings.amqp.prefetch as usize);
    drill.stop().await;
    drop(broker);
}

#[tokio::test]
async fn drill_redis_restart() {
    // Redis (a server of the drill's own, every write fsynced) is killed with SIGKILL and started
    // again 3 s later: meanwhile the workers decide alone (fail_open), then go back to Redis. No
    // request is redelivered, so nothing may be answered or charged twice.
    let count = drill_requests();
    let mut redis = PrivateRedis::start().await;
    let mut drill = Drill::new("redis_restart");
    drill.use_redis(&redis.url(), &redis.url());
    drill.spawn_worker().await;
    drill.spawn_worker().await;
    let load = drill.steady_load(count, None).await;
    load.wait_published(count / 3, answer_timeout(count)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart().await;
    let restarted = Instant::now();
    let back = fallback_off(&drill, Duration::from_secs(10)).await;
    let tally = load.finish(answer_timeout(count), SETTLE).await;
    let bound = small_bound(&drill.settings);
    let detail = format!("down_s 3 limiter_back_after_s {:.1}", (back - restarted).as_secs_f64());
    let figures = drill.figures(&tally, 1, bound, &detail).await;
    figures.assert_within(0);
    drill.stop().await;
}

/// When every worker's `kiln_rate_limit_fallback_active` reads 0 (panics after `timeout`).
async fn fallback_off(drill: &Drill, timeout: Duration) -> Instant {
    poll_until("the fallback gauge back to 0", timeout, async || {
        for worker in 0..drill.workers.len() {
            if drill.metric(worker, "kiln_rate_limit_fallback_active").await != 0.0 {
                return None;
            }
        }
        Some(Instant::now())
    })
    .await
}

#[tokio::test]
async fn drill_broker_cut() {
    // The network between the workers and the broker is cut for 10 s (a proxy closes their
    // connections and holds new ones unanswered); the producer, on the broker directly, keeps
    // publishing. The workers reconnect after the cut and drain the backlog.
    let count = drill_requests();
    let proxy_port = free_port();
    let proxy = TcpProxy::start(proxy_port, 5672).await;
    let mut drill = Drill::new("broker_cut");
    drill.set(
        "KILN_AMQP__URL",
        &format!("amqp://guest:guest@127.0.0.1:{proxy_port}/%2f"),
    );
    drill.spawn_worker().await;
    drill.spawn_worker().await;
    let load = drill.steady_load(count, None).await;
    load.wait_published(count / 3, answer_timeout(count)).await;
    proxy.partition();
    tokio::time::sleep(CUT).await;
    let answered_in_cut = load.answered();
    proxy.heal();
    let healed = Instant::now();
    for worker in 0..2 {
        let process = &drill.workers[worker].process;
        poll_until("the worker consuming again", START_TIMEOUT, async || {
            (process.count("worker ready") >= 2).then_some(())
        })
        .await;
    }
    let back = healed.elapsed();
    let tally = load.finish(answer_timeout(count), SETTLE).await;
    let bound = small_bound(&drill.settings);
    let detail = format!(
        "cut_s {} answered_by_cut_end {answered_in_cut} workers_ready_after_s {:.1}",
        CUT.as_secs(),
        back.as_secs_f64()
    );
    let figures = drill.figures(&tally, 1, bound, &detail).await;
    figures.assert_within(2 * drill.settings.amqp.prefetch as usize);
    drill.stop().await;
    drop(proxy);
}

#[tokio::test]
async fn drill_redis_cut() {
    // The network between the workers and Redis is cut for 10 s: they decide alone (fail_open)
    // meanwhile. Before the cut ends the load pauses and the workers' hands empty, so no decision
    // follows the cut: the fallback gauge must still go back to 0 (the limiter's own probe).
    let count = drill_requests();
    let proxy_port = free_port();
    let proxy = TcpProxy::start(proxy_port, 6379).await;
    let mut drill = Drill::new("redis_cut");
    drill.use_redis(&format!("redis://127.0.0.1:{proxy_port}/"), REDIS_URL);
    drill.spawn_worker().await;
    drill.spawn_worker().await;
    let load = drill.steady_load(count, None).await;
    load.wait_published(count / 3, answer_timeout(count)).await;
    proxy.partition();
    let cut = Instant::now();
    tokio::time::sleep(CUT - Duration::from_secs(3)).await;
    load.pause();
    poll_until("the workers' hands empty", Duration::from_secs(30), async || {
        let mut held = 0.0;
        for worker in 0..2 {
            held += drill.metric(worker, "kiln_requests_in_flight").await;
        }
        (held == 0.0).then_some(())
    })
    .await;
    let mut fallback = Vec::new();
    for worker in 0..2 {
        fallback.push(drill.metric(worker, "kiln_rate_limit_fallback_active").await);
    }
    tokio::time::sleep(CUT.saturating_sub(cut.elapsed())).await;
    let mut decisions = Vec::new();
    for worker in 0..2 {
        decisions.push(drill.metric(worker, "kiln_rate_limit_decisions_total").await);
    }
    proxy.heal();
    let healed = Instant::now();
    let back = fallback_off(&drill, Duration::from_secs(10)).await - healed;
    for (worker, before) in decisions.iter().enumerate() {
        assert_eq!(
            drill.metric(worker, "kiln_rate_limit_decisions_total").await,
            *before,
            "no decision came between the end of the cut and the gauge's return"
        );
    }
    load.resume();
    let tally = load.finish(answer_timeout(count), SETTLE).await;
    let bound = small_bound(&drill.settings);
    let detail = format!(
        "cut_s {} fallback_during_cut {fallback:?} gauge_back_after_s {:.2}",
        CUT.as_secs(),
        back.as_secs_f64()
    );
    let figures = drill.figures(&tally, 1, bound, &detail).await;
    assert!(
        fallback.contains(&1.0),
        "a worker decided alone during the cut: {fallback:?}"
    );
    assert!(
        back < Duration::from_secs(5),
        "the gauge went back to 0 {back:?} after the cut"
    );
    figures.assert_within(0);
    drill.stop().await;
    drop(proxy);
}

#[tokio::test]
async fn drill_sigterm() {
    // A worker told to stop (SIGTERM, as in a rolling update) while it serves: it stops taking
    // requests, answers what it holds, exits 0; a new worker takes its place. Nothing may be lost,
    // answered or charged twice.
    let count = drill_requests();
    let mut drill = Drill::new("sigterm");
    let leaving = drill.spawn_worker().await;
    drill.spawn_worker().await;
    let load = drill.steady_load(count, None).await;
    load.wait_published(count / 3, answer_timeout(count)).await;
    drill.workers[leaving].process.terminate();
    let stopped = Instant::now();
    drill.spawn_worker().await;
    let status = drill.workers[leaving].process.wait_exit(START_TIMEOUT).await;
    let exited = stopped.elapsed();
    let tally = load.finish(answer_timeout(count), SETTLE).await;
    let bound = small_bound(&drill.settings);
    let detail = format!("exited_after_s {:.1}", exited.as_secs_f64());
    let figures = drill.figures(&tally, 1, bound, &detail).await;
    assert!(status.success(), "{}", drill.workers[leaving].process.log());
    assert_eq!(drill.workers[leaving].process.count("grace period over"), 0);
    figures.assert_within(0);
    drill.stop().await;
}

#[tokio::test]
async fn drill_memory() {
    // 2048 px requests (the models' largest side) all at once, spread over every request queue,
    // so each worker holds prefetch × queues of them: each worker's peak RSS must stay under the
    // bound of ARCHITECTURE.md. CPU batches are of one (the provider's default).
    let count = (drill_requests() / 15).max(8);
    let mut drill = Drill::new("memory");
    drill.set("KILN_BATCHING__MAX_BATCH_SIZE", "0");
    // A 2048 px image costs 16 units: more than a free user's burst (4). Every user is `pro`.
    drill.set("KILN_RATE_LIMIT__DEFAULT_TIER", "pro");
    drill.settings.rate_limit.default_tier = "pro".into();
    drill.spawn_worker().await;
    drill.spawn_worker().await;
    let photo = Arc::new(photo_2048());
    let body = serde_json::to_vec(&large_request(&photo, 0)).unwrap().len() as u64;
    let queues = drill
        .settings
        .topology()
        .request_queues
        .iter()
        .map(|q| q.name.clone())
        .collect();
    let load = Load::start(Plan {
        url: drill.producer_url.clone(),
        reply_queue: reply_queue(&drill.settings),
        queues,
        count,
        interval: Duration::ZERO,
        burst: None,
        request: Box::new(move |n| large_request(&photo, n)),
    })
    .await;
    let tally = load
        .finish(
            Duration::from_secs(120) + Duration::from_secs(10) * count as u32,
            SETTLE,
        )
        .await;
    let bound = rss_bound(
        &drill.settings,
        1,
        Footprint {
            side: 2048,
            body_bytes: body,
            input_pixels: 2048 * 2048,
        },
    );
    let figures = drill
        .figures(&tally, 16, bound, &format!("side 2048 body_kb {}", body / 1024))
        .await;
    figures.assert_within(0);
    drill.stop().await;
}

/// A 2048 × 2048 JPEG: the sample photo, enlarged.
fn photo_2048() -> Vec<u8> {
    let photo = image::load_from_memory(&read("samples/astronaut.jpg")).unwrap();
    let large = photo.resize_exact(2048, 2048, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    large
        .to_rgb8()
        .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    jpeg
}

/// [`style_request`] at 2048 px, with a deadline an hour away (a flood on two CPU workers takes
/// minutes; the free tier's default deadline is not what this drill is about).
fn large_request(photo: &[u8], n: usize) -> RequestDocument {
    let mut request = style_request(photo, n);
    request.params.size = Some(2048);
    let deadline = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    request.deadline = Some(kiln::submit::rfc3339(deadline));
    request
}
