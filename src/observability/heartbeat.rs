//! The fleet heartbeat: every `heartbeat.interval_ms`, one JSON message per worker on the topic
//! exchange `<prefix>.heartbeat`, routing key `worker.<worker_id>` (schema:
//! `schemas/heartbeat.v1.schema.json`; channel `heartbeat` in `schemas/asyncapi.yaml`).
//!
//! It says who the worker is (id, version, models, execution provider), whether it serves
//! (`state`, `ready`), how loaded it is (in flight, busy fraction, the queue behind it) and what it
//! can do: `capacity_images_per_second` is measured, images rendered per second of model run over
//! the last minute (or the last minute that had work), `null` before the first image. GPU figures
//! come from [`crate::gpu`] when NVML is there. When shutdown begins, a last message with
//! `"state": "stopping"` goes out at once.
//!
//! The heartbeat has a connection of its own, so a slow or blocked request channel never delays
//! it; while the broker is unreachable it skips beats (counted in `kiln_heartbeats_total{result =
//! "failed"}`) and tries again on the next one. Messages are transient and expire after three
//! periods: a monitor that falls behind sees fresh beats, not a backlog.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::health::{BrokerState, Health};
use crate::gpu::GpuFigures;
use crate::metrics::{self, Usage};

/// The version of the heartbeat message (its `version` field).
pub const HEARTBEAT_VERSION: u32 = 1;
/// The AMQP `type` property of heartbeats.
pub const HEARTBEAT_TYPE: &str = "kiln.heartbeat.v1";
/// How far back the capacity measurement looks.
const CAPACITY_WINDOW: Duration = Duration::from_secs(60);

/// The exchange heartbeats go to, for a topology prefix.
pub fn exchange_name(prefix: &str) -> String {
    format!("{prefix}.heartbeat")
}

/// The routing key of a worker's heartbeats.
pub fn routing_key(worker_id: &str) -> String {
    format!("worker.{worker_id}")
}

/// One heartbeat (`schemas/heartbeat.v1.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeartbeatMessage {
    /// Message version, [`HEARTBEAT_VERSION`].
    pub version: u32,
    /// The worker (`worker.id`), as in replies.
    pub worker_id: String,
    /// `starting`, `serving`, `reconnecting` or `stopping`.
    pub state: &'static str,
    /// Whether `/readyz` passes.
    pub ready: bool,
    /// When this was sent (RFC 3339, UTC).
    pub timestamp: String,
    /// kiln's version.
    pub kiln_version: &'static str,
    /// Models served.
    pub models: Vec<String>,
    /// `cpu`, `cuda` or `cpu-fallback`.
    pub execution_provider: String,
    /// The heartbeat period, so a monitor knows when one is missing.
    pub interval_ms: u64,
    /// Images per second of model run over the last minute with work; `null` before any image.
    pub capacity_images_per_second: Option<f64>,
    /// Fraction of the last period the inference thread spent running models.
    pub busy_fraction: f64,
    /// Deliveries being handled now.
    pub in_flight: i64,
    /// Images rendered since the worker started.
    pub images_rendered: u64,
    /// The queues behind the worker.
    pub queue: QueueFigures,
    /// One entry per GPU NVML sees; empty without NVML.
    pub gpus: Vec<GpuFigures>,
}

/// Queue lag as this worker sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueFigures {
    /// Requests ready in the request queue (not yet delivered to any worker); `null` if unknown.
    pub requests_ready: Option<u32>,
    /// Consumers of the request queue (workers).
    pub consumers: Option<u32>,
    /// Messages in the dead-letter queue.
    pub dead_letters: Option<u32>,
    /// The longest queue wait of a request this worker received in the last period (seconds).
    pub max_wait_seconds: Option<f64>,
}

/// What the heartbeat needs to know about its worker.
#[derive(Debug, Clone)]
pub struct Beacon {
    /// Broker URL.
    pub url: SecretString,
    /// Topology prefix (the exchange is `<prefix>.heartbeat`).
    pub prefix: String,
    /// The request queues, whose depths are reported: (metric label, queue name); the label is
    /// `requests` for the shared queue and `requests.<tier>` for a tier's.
    pub request_queues: Vec<(String, String)>,
    /// The dead-letter queue, whose depth is reported.
    pub dead_letter_queue: String,
    /// This worker.
    pub worker_id: String,
    /// Models served.
    pub models: Vec<String>,
    /// Execution provider name.
    pub provider: String,
    /// Period.
    pub interval: Duration,
}

/// Turns running totals into the busy fraction of the last period and the capacity over a window.
#[derive(Debug)]
pub struct UsageWindow {
    samples: VecDeque<(Instant, Usage)>,
    window: Duration,
    last_capacity: Option<f64>,
}

impl UsageWindow {
    /// A window of `window`, starting from `now` and `usage`.
    pub fn new(now: Instant, usage: Usage, window: Duration) -> Self {
        Self {
            samples: VecDeque::from([(now, usage)]),
            window,
            last_capacity: None,
        }
    }

    /// Add a sample; returns (busy fraction since the previous sample, capacity in images per busy
    /// second over the window, or the last one measured when the window had no work).
    pub fn sample(&mut self, now: Instant, usage: Usage) -> (f64, Option<f64>) {
        let (previous_at, previous) = *self.samples.back().expect("never empty");
        let elapsed = now.saturating_duration_since(previous_at).as_secs_f64();
        let busy = if elapsed > 0.0 {
            ((usage.busy_seconds - previous.busy_seconds) / elapsed).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.samples.push_back((now, usage));
        while self.samples.len() > 2 && now.saturating_duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
        let (_, oldest) = self.samples.front().expect("never empty");
        let busy_seconds = usage.busy_seconds - oldest.busy_seconds;
        let images = usage.images.saturating_sub(oldest.images);
        if busy_seconds > 0.0 && images > 0 {
            self.last_capacity = Some(images as f64 / busy_seconds);
        }
        (busy, self.last_capacity)
    }
}

/// Publish heartbeats until shutdown begins (then one `stopping` heartbeat).
pub async fn run(settings: Beacon, health: Arc<Health>) {
    let mut stopping = health.stopping();
    let mut window = UsageWindow::new(Instant::now(), metrics::usage(), CAPACITY_WINDOW);
    let mut link: Option<(Connection, Channel)> = None;
    let mut ticks = tokio::time::interval(settings.interval.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = ticks.tick() => false,
            _ = wait_stopping(&mut stopping) => true,
        };
        let (busy, capacity) = window.sample(Instant::now(), metrics::usage());
        metrics::set_busy_ratio(busy);
        let sent = beat(&settings, &health, &mut link, busy, capacity).await;
        metrics::record_heartbeat(if sent.is_ok() { "ok" } else { "failed" });
        if let Err(e) = sent {
            tracing::debug!(error = %e, "heartbeat not sent; trying again on the next one");
            close(link.take(), "heartbeat failed").await;
        }
        if last {
            break;
        }
    }
    close(link, "worker stopping").await;
}

/// Close the heartbeat's connection, without waiting long for a broker that may be gone.
async fn close(link: Option<(Connection, Channel)>, why: &str) {
    if let Some((connection, _)) = link {
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, why.into())).await;
    }
}

async fn wait_stopping(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn beat(
    settings: &Beacon,
    health: &Health,
    link: &mut Option<(Connection, Channel)>,
    busy: f64,
    capacity: Option<f64>,
) -> anyhow::Result<()> {
    let exchange = exchange_name(&settings.prefix);
    if link.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
        *link = Some(open(settings, &exchange).await?);
    }
    let (connection, channel) = link.as_ref().expect("just opened");
    // Before the worker has declared its queues (the first, `starting` heartbeat) a passive
    // declare would only fail, and the broker's channel error would be logged as one.
    let queue = match health.broker_state() {
        BrokerState::Connecting => QueueFigures::unknown(),
        _ => queue_figures(connection, settings).await,
    };
    let message = message(settings, health, busy, capacity, queue);
    let body = serde_json::to_vec(&message)?;
    let expiration = (settings.interval.as_millis() * 3).to_string();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_type(HEARTBEAT_TYPE.into())
        .with_app_id("kiln".into())
        .with_delivery_mode(1)
        .with_expiration(expiration.as_str().into())
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
    channel
        .basic_publish(
            ShortString::from(exchange.as_str()),
            ShortString::from(routing_key(&settings.worker_id).as_str()),
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await?
        .await?;
    Ok(())
}

async fn open(settings: &Beacon, exchange: &str) -> anyhow::Result<(Connection, Channel)> {
    let properties =
        ConnectionProperties::default().with_connection_name(format!("kiln heartbeat {}", settings.worker_id).into());
    let connection = Connection::connect(settings.url.expose_secret(), properties).await?;
    let channel = connection.create_channel().await?;
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(exchange.into(), ExchangeKind::Topic, options, FieldTable::default())
        .await?;
    Ok((connection, channel))
}

impl QueueFigures {
    /// No depths known yet; the longest queue wait since the last heartbeat (which this takes).
    fn unknown() -> Self {
        Self {
            requests_ready: None,
            consumers: None,
            dead_letters: None,
            max_wait_seconds: metrics::take_max_queue_wait(),
        }
    }
}

/// Depths from passive declares, on a channel of their own (a missing queue closes the channel).
async fn queue_figures(connection: &Connection, settings: &Beacon) -> QueueFigures {
    let mut figures = QueueFigures::unknown();
    let Ok(probe) = connection.create_channel().await else {
        return figures;
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    // Every request queue (shared and per tier): the depth is their sum, each one a series.
    for (label, name) in &settings.request_queues {
        if let Ok(q) = probe
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
        {
            figures.requests_ready = Some(figures.requests_ready.unwrap_or(0) + q.message_count());
            if label == "requests" {
                figures.consumers = Some(q.consumer_count());
            }
            metrics::set_queue_messages(label, q.message_count());
        }
    }
    if let Ok(q) = probe
        .queue_declare(
            settings.dead_letter_queue.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
    {
        figures.dead_letters = Some(q.message_count());
        metrics::set_queue_messages("dead_letter", q.message_count());
    }
    let _ = probe.close(200, "done".into()).await;
    figures
}

fn message(
    settings: &Beacon,
    health: &Health,
    busy: f64,
    capacity: Option<f64>,
    queue: QueueFigures,
) -> HeartbeatMessage {
    let report = health.report();
    let state = match health.broker_state() {
        BrokerState::Connecting => "starting",
        BrokerState::Consuming => "serving",
        BrokerState::Lost(_) => "reconnecting",
        BrokerState::Stopping => "stopping",
    };
    HeartbeatMessage {
        version: HEARTBEAT_VERSION,
        worker_id: settings.worker_id.clone(),
        state,
        ready: report.ready,
        timestamp: OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .expect("the current time formats"),
        kiln_version: env!("CARGO_PKG_VERSION"),
        models: settings.models.clone(),
        execution_provider: settings.provider.clone(),
        interval_ms: settings.interval.as_millis() as u64,
        capacity_images_per_second: capacity,
        busy_fraction: busy,
        in_flight: metrics::requests_in_flight(),
        images_rendered: metrics::usage().images,
        queue,
        gpus: crate::gpu::latest(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(busy_seconds: f64, images: u64) -> Usage {
        Usage { busy_seconds, images }
    }

    #[test]
    fn busy_fraction_is_per_period_and_capacity_per_busy_second() {
        let t0 = Instant::now();
        let mut w = UsageWindow::new(t0, usage(0.0, 0), Duration::from_secs(60));
        assert_eq!(w.sample(t0 + Duration::from_secs(5), usage(0.0, 0)), (0.0, None));
        let (busy, capacity) = w.sample(t0 + Duration::from_secs(10), usage(2.5, 10));
        assert!((busy - 0.5).abs() < 1e-9);
        assert_eq!(capacity, Some(4.0));
        // Idle for longer than the window: the last measured capacity stays.
        let (busy, capacity) = w.sample(t0 + Duration::from_secs(100), usage(2.5, 10));
        assert_eq!(busy, 0.0);
        assert_eq!(capacity, Some(4.0));
        // New work, measured over the window only (the old samples left it).
        let (_, capacity) = w.sample(t0 + Duration::from_secs(105), usage(3.5, 12));
        assert_eq!(capacity, Some(2.0));
    }

    #[test]
    fn names() {
        assert_eq!(exchange_name("kiln"), "kiln.heartbeat");
        assert_eq!(routing_key("kiln-0"), "worker.kiln-0");
    }
}
