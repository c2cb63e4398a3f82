//! `kiln bench`: a load generator with simulated users per tier, through the real broker and Redis.
//!
//! It starts a worker in this process (its own topology prefix and Redis key prefix, so it never
//! touches a live deployment's queues), gives each simulated user its tier in Redis, measures the
//! worker's capacity closed-loop, then sends requests open-loop (Poisson arrivals at `load` × that
//! capacity, split between tiers by `mix`), each to its tier's queue, and reads every reply. It
//! reports per tier: images/s, wait (broker + batcher, from the reply's timings) and total
//! (publish to reply, measured here) percentiles, rejections, deferrals, expiries; and the fraction
//! of the sending window the inference thread was busy, from the engine's own counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use serde::Serialize;
use std::sync::Mutex;

use crate::amqp::publisher::REPLY_HEADER;
use crate::amqp::Topology;
use crate::configuration::Settings;
use crate::domain::{ReplyDocument, ReplyStatus, RequestDocument, WireImage, WireParams, WireStyle, CONTRACT_VERSION};
use crate::rate_limit::RedisLimiter;
use crate::startup::Application;

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
    pub image: std::path::PathBuf,
    /// Output size (longer side).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Seconds to wait after sending for the last replies.
    #[arg(long, default_value_t = 120.0)]
    pub drain_secs: f64,
    /// Write the report as JSON here as well.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One tier's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierReport {
    /// Requests sent.
    pub sent: usize,
    /// Answered with an image.
    pub ok: usize,
    /// Answered `rate_limited`.
    pub rejected: usize,
    /// Answered `expired`.
    pub expired: usize,
    /// Other errors, by code.
    pub errors: BTreeMap<String, usize>,
    /// Requests that got at least one `deferred` notice.
    pub deferred: usize,
    /// Requests served degraded.
    pub degraded: usize,
    /// Neither a final reply nor a notice by the end of the drain.
    pub unanswered: usize,
    /// Ok replies received within the sending window.
    pub images_in_window: usize,
    /// Images per second delivered within the sending window.
    pub images_per_sec: f64,
    /// Wait before the device (broker + batcher), ms: p50, p95, p99 of ok replies.
    pub wait_ms: [f64; 3],
    /// Of that wait, the broker's part (created to received by the worker), ms: p50, p95, p99.
    pub queue_wait_ms: [f64; 3],
    /// Of that wait, the batcher's part (prepared to its batch starting), ms: p50, p95, p99.
    pub batch_wait_ms: [f64; 3],
    /// Decoding and laying out, ms: p50, p95, p99.
    pub preprocess_ms: [f64; 3],
    /// Publish to reply, ms: p50, p95, p99 of ok replies.
    pub total_ms: [f64; 3],
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Closed-loop images/s before the run (None with `--rate`).
    pub capacity_per_sec: Option<f64>,
    /// Requests/s offered.
    pub offered_per_sec: f64,
    /// Images/s delivered over the sending window, all tiers.
    pub images_per_sec: f64,
    /// Fraction of the sending window the inference thread spent running models.
    pub busy_fraction: f64,
    /// Mean requests per model run over the window.
    pub mean_batch_size: f64,
    /// Inference thread busy time per image over the window, ms: the device's service time, which
    /// grows when other work (broker, load generator) takes the same cores.
    pub busy_ms_per_image: f64,
    /// By tier.
    pub tiers: BTreeMap<String, TierReport>,
}

#[derive(Debug)]
struct Sent {
    tier: String,
    at: Instant,
}

#[derive(Debug, Default)]
struct Outcome {
    notices: usize,
    last: Option<(ReplyDocument, Instant)>,
}

/// Every request sent, by id, and what came back for it. A plain mutex, never held across an
/// `.await`: with tokio's fair mutex, a `wait_final` future parked in the lock's queue inside a
/// `FuturesUnordered` that nobody polls (the sender was busy publishing) held the lock's next turn
/// forever, and the sender, queued behind it, deadlocked the bench (seen about 1 run in 8).
type Book = Arc<Mutex<HashMap<String, (Sent, Outcome)>>>;

fn lock(book: &Book) -> std::sync::MutexGuard<'_, HashMap<String, (Sent, Outcome)>> {
    book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Run the benchmark and print the report.
pub async fn run(args: BenchArgs, mut settings: Settings) -> anyhow::Result<BenchReport> {
    let mix = parse_mix(&args.mix)?;
    let photo = std::fs::read(&args.image).with_context(|| format!("cannot read {}", args.image.display()))?;
    let prefix = format!("kiln-bench-{}", uuid::Uuid::new_v4().simple());
    settings.amqp.topology.prefix = prefix.clone();
    settings.rate_limit.key_prefix = prefix.clone();
    settings.scheduling.tier_queues = true;
    // Its own metrics port: a bench must not collide with a worker already serving on this host.
    settings.http.bind = "127.0.0.1:0".into();
    for tier in mix.keys() {
        anyhow::ensure!(
            settings.rate_limit.tiers.contains_key(tier),
            "--mix names {tier:?}, not a tier"
        );
    }
    let topology = Topology::for_settings(&settings);
    if settings.rate_limit.enabled {
        let redis = RedisLimiter::new(Arc::new(settings.rate_limit.clone()))?;
        for tier in mix.keys() {
            for user in 0..args.users {
                redis.set_tier(&format!("bench-{tier}-{user}"), tier).await?;
            }
        }
    }

    let build = settings.clone();
    let app = tokio::task::spawn_blocking(move || Application::build(build)).await??;
    let engine = app.services().inference;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(app.run_until_stopped(async {
        let _ = stop_rx.await;
    }));

    let connection = Connection::connect(
        settings.amqp.url.expose_secret(),
        ConnectionProperties::default().with_connection_name("kiln bench".into()),
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    topology.declare(&channel).await?;
    let (reply_queue, mut consumer) = crate::amqp::private_reply_queue(&channel).await?;
    let reader_tag = consumer.tag();
    let book: Book = Arc::default();
    let mut reader = tokio::spawn({
        let book = Arc::clone(&book);
        async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(document) = reply_document(&delivery.properties) else {
                    continue;
                };
                let Some(id) = delivery.properties.correlation_id().as_ref().map(ToString::to_string) else {
                    continue;
                };
                if let Some((_, outcome)) = lock(&book).get_mut(&id) {
                    match document.is_final() {
                        true => outcome.last = Some((document, Instant::now())),
                        false => outcome.notices += 1,
                    }
                }
            }
        }
    });

    let tiers: Vec<(String, f64)> = mix.into_iter().collect();
    let make = |tier: &str, n: usize| -> RequestDocument {
        RequestDocument {
            version: CONTRACT_VERSION,
            request_id: uuid::Uuid::new_v4().to_string(),
            user_id: format!("bench-{tier}-{}", n % args.users.max(1)),
            model: "multistyle26".into(),
            params: WireParams {
                style: Some(WireStyle::Index((n % 26) as i64)),
                size: Some(args.size),
                ..Default::default()
            },
            image: WireImage::from_bytes(&photo),
            deadline: None,
            created_at: Some(now_rfc3339()),
            tier: None,
        }
    };
    let send = |doc: RequestDocument, tier: String| {
        let (channel, book, queue, reply_queue) = (
            channel.clone(),
            Arc::clone(&book),
            topology.tier_queue(&tier),
            reply_queue.clone(),
        );
        async move {
            let body = serde_json::to_vec(&doc)?;
            lock(&book).insert(
                doc.request_id.clone(),
                (
                    Sent {
                        tier,
                        at: Instant::now(),
                    },
                    Outcome::default(),
                ),
            );
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_reply_to(reply_queue.as_str().into())
                .with_correlation_id(doc.request_id.as_str().into());
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?
                .await?;
            anyhow::Ok(())
        }
    };

    // Capacity: keep the worker's queues full for a while, count images.
    let capacity = match args.rate {
        Some(_) => None,
        None => {
            let window = Duration::from_secs_f64(args.capacity_secs);
            let in_flight = usize::from(settings.amqp.prefetch) * 2;
            let started = Instant::now();
            let before = engine.stats();
            let mut n = 0;
            let mut pending = futures_util::stream::FuturesUnordered::new();
            let (tier, _) = tiers.last().cloned().context("an empty --mix")?;
            while started.elapsed() < window {
                while pending.len() < in_flight {
                    let doc = make(&tier, n);
                    n += 1;
                    tokio::time::timeout(Duration::from_secs(60), send(doc.clone(), tier.clone()))
                        .await
                        .context("the broker did not confirm a request within 60 s")??;
                    pending.push(wait_final(Arc::clone(&book), doc.request_id, Duration::from_secs(120)));
                }
                pending.next().await;
            }
            let after = engine.stats();
            while pending.next().await.is_some() {}
            lock(&book).clear();
            Some((after.images - before.images) as f64 / started.elapsed().as_secs_f64())
        }
    };
    let offered = args.rate.unwrap_or_else(|| args.load * capacity.unwrap_or(1.0));
    anyhow::ensure!(offered > 0.0, "nothing to offer: capacity or --rate is 0");
    tracing::info!(?capacity, offered, "sending");

    // Open loop: Poisson arrivals at `offered`, tier by share.
    let window = Duration::from_secs_f64(args.duration_secs);
    let started = Instant::now();
    let before = engine.stats();
    let mut rng = SplitMix(0x6b69_6c6e);
    let mut next_at = Duration::ZERO;
    let mut n = 0usize;
    while next_at < window {
        tokio::time::sleep_until((started + next_at).into()).await;
        let pick = rng.unit();
        let mut acc = 0.0;
        let tier = tiers
            .iter()
            .find(|(_, share)| {
                acc += share;
                pick < acc
            })
            .unwrap_or(tiers.last().expect("tiers"))
            .0
            .clone();
        let doc = make(&tier, n);
        n += 1;
        tokio::spawn(send(doc, tier));
        next_at += Duration::from_secs_f64(-rng.unit().max(1e-12).ln() / offered);
    }
    let sending = started.elapsed();
    let after = engine.stats();

    // Drain: until every request has a final reply, or the drain time is over.
    let drained_by = Instant::now() + Duration::from_secs_f64(args.drain_secs);
    while Instant::now() < drained_by {
        let open = lock(&book).values().filter(|(_, o)| o.last.is_none()).count();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let book = std::mem::take(&mut *lock(&book));
    let report = summarize(book, capacity, offered, sending, started, before, after);
    print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    // The worker's inference thread ends only once every handle to it is gone, this one included.
    drop(engine);
    let _ = stop_tx.send(());
    let grace = Duration::from_millis(settings.worker.shutdown_grace_ms) + Duration::from_secs(30);
    match tokio::time::timeout(grace, worker).await {
        Ok(stopped) => stopped??,
        Err(_) => tracing::error!("the bench's worker did not stop within its grace period"),
    }
    // Cancel the reply consumer and let the reader see its stream end, then the channel, then the
    // connection: each closed under an open child races the child's own close (lapin logs it).
    let _ = channel.basic_cancel(reader_tag, BasicCancelOptions::default()).await;
    if tokio::time::timeout(Duration::from_secs(5), &mut reader).await.is_err() {
        reader.abort();
    }
    let _ = channel.close(200, "bench done".into()).await;
    let _ = connection.close(200, "bench done".into()).await;
    delete(&settings, &topology).await;
    Ok(report)
}

fn summarize(
    book: HashMap<String, (Sent, Outcome)>,
    capacity: Option<f64>,
    offered: f64,
    sending: Duration,
    started: Instant,
    before: crate::inference::EngineSnapshot,
    after: crate::inference::EngineSnapshot,
) -> BenchReport {
    let mut tiers: BTreeMap<String, TierReport> = BTreeMap::new();
    let mut samples: HashMap<String, [Vec<f64>; 5]> = HashMap::new();
    let window_end = started + sending;
    let mut images_in_window = 0usize;
    for (sent, outcome) in book.into_values() {
        let t = tiers.entry(sent.tier.clone()).or_default();
        t.sent += 1;
        if outcome.notices > 0 {
            t.deferred += 1;
        }
        let Some((doc, at)) = outcome.last else {
            if outcome.notices == 0 {
                t.unanswered += 1;
            }
            continue;
        };
        match (doc.status, doc.error.as_ref().map(|e| e.code.as_str())) {
            (ReplyStatus::Ok, _) => {
                t.ok += 1;
                if doc.degraded.is_some() {
                    t.degraded += 1;
                }
                if at <= window_end {
                    images_in_window += 1;
                    t.images_in_window += 1;
                }
                let timings = &doc.timings_ms;
                let (queue, batch) = (timings.queue_wait.unwrap_or(0.0), timings.batch_wait.unwrap_or(0.0));
                let s = samples.entry(sent.tier.clone()).or_default();
                s[0].push(queue + batch);
                s[1].push((at - sent.at).as_secs_f64() * 1000.0);
                s[2].push(queue);
                s[3].push(batch);
                s[4].push(timings.preprocess);
            }
            (_, Some("rate_limited")) => t.rejected += 1,
            (_, Some("expired")) => t.expired += 1,
            (_, code) => *t.errors.entry(code.unwrap_or("unknown").to_owned()).or_default() += 1,
        }
    }
    let seconds = sending.as_secs_f64();
    for (tier, t) in &mut tiers {
        if let Some([wait, total, queue, batch, preprocess]) = samples.get_mut(tier) {
            t.wait_ms = percentiles(wait);
            t.total_ms = percentiles(total);
            t.queue_wait_ms = percentiles(queue);
            t.batch_wait_ms = percentiles(batch);
            t.preprocess_ms = percentiles(preprocess);
        }
        t.images_per_sec = t.images_in_window as f64 / seconds;
    }
    let batches = after.batches - before.batches;
    let images = after.images - before.images;
    BenchReport {
        capacity_per_sec: capacity,
        offered_per_sec: offered,
        images_per_sec: images_in_window as f64 / seconds,
        busy_fraction: (after.busy - before.busy).as_secs_f64() / seconds,
        mean_batch_size: match batches {
            0 => 0.0,
            b => images as f64 / b as f64,
        },
        busy_ms_per_image: match images {
            0 => 0.0,
            n => (after.busy - before.busy).as_secs_f64() * 1000.0 / n as f64,
        },
        tiers,
    }
}

fn print(r: &BenchReport) {
    println!(
        "capacity {} img/s, offered {:.1} req/s, delivered {:.1} img/s in the window, inference busy {:.1}%, mean batch {:.2}, busy {:.1} ms per image",
        r.capacity_per_sec.map_or("-".into(), |c| format!("{c:.1}")),
        r.offered_per_sec,
        r.images_per_sec,
        r.busy_fraction * 100.0,
        r.mean_batch_size,
        r.busy_ms_per_image
    );
    println!(
        "| tier | sent | ok | img/s | wait p50/p95/p99 ms | of which broker / batcher p99 ms | preprocess p99 ms | total p50/p95/p99 ms | rejected | deferred | degraded | expired | other errors | unanswered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (tier, t) in &r.tiers {
        let p = |v: [f64; 3]| format!("{:.0} / {:.0} / {:.0}", v[0], v[1], v[2]);
        println!(
            "| {tier} | {} | {} | {:.1} | {} | {:.0} / {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            t.sent,
            t.ok,
            t.images_per_sec,
            p(t.wait_ms),
            t.queue_wait_ms[2],
            t.batch_wait_ms[2],
            t.preprocess_ms[2],
            p(t.total_ms),
            t.rejected,
            t.deferred,
            t.degraded,
            t.expired,
            t.errors.values().sum::<usize>(),
            t.unanswered
        );
    }
}

fn percentiles(values: &mut [f64]) -> [f64; 3] {
    if values.is_empty() {
        return [0.0; 3];
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
    [at(0.50), at(0.95), at(0.99)]
}

fn parse_mix(spec: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut mix = BTreeMap::new();
    for part in spec.split(',') {
        let (tier, share) = part
            .split_once('=')
            .with_context(|| format!("--mix: {part:?} is not tier=share"))?;
        let share: f64 = share.parse().with_context(|| format!("--mix: bad share in {part:?}"))?;
        anyhow::ensure!(share > 0.0 && share.is_finite(), "--mix: shares must be positive");
        mix.insert(tier.trim().to_owned(), share);
    }
    let total: f64 = mix.values().sum();
    anyhow::ensure!(total > 0.0, "--mix is empty");
    Ok(mix.into_iter().map(|(k, v)| (k, v / total)).collect())
}

async fn wait_final(book: Book, id: String, timeout: Duration) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if lock(&book).get(&id).is_some_and(|(_, o)| o.last.is_some()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reply_document(properties: &BasicProperties) -> Option<ReplyDocument> {
    match properties.headers().as_ref()?.inner().get(REPLY_HEADER)? {
        AMQPValue::LongString(json) => serde_json::from_slice(json.as_bytes()).ok(),
        _ => None,
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formats any UTC time")
}

/// Remove the bench's queues and exchanges, and its Redis keys.
async fn delete(settings: &Settings, topology: &Topology) {
    let Ok(connection) = Connection::connect(settings.amqp.url.expose_secret(), ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        topology.delete(&channel).await;
        let _ = channel.close(200, "bench cleanup".into()).await;
    }
    let _ = connection.close(200, "bench cleanup".into()).await;
    if let Ok(client) = redis::Client::open(settings.rate_limit.redis_url.expose_secret()) {
        if let Ok(mut redis) = client.get_multiplexed_async_connection().await {
            let pattern = format!("{}:*", settings.rate_limit.key_prefix);
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut redis)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
            }
        }
    }
}

/// A small deterministic generator (SplitMix64): the same arrivals on every run.
struct SplitMix(u64);

impl SplitMix {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_are_normalised_and_bad_ones_refused() {
        let mix = parse_mix("free=3,pro=1").unwrap();
        assert_eq!(mix["free"], 0.75);
        assert_eq!(mix["pro"], 0.25);
        assert!(parse_mix("free").is_err());
        assert!(parse_mix("free=-1").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&mut v), [50.0, 95.0, 99.0]);
        assert_eq!(percentiles(&mut []), [0.0; 3]);
    }
}
