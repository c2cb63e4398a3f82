//! The fleet heartbeat: every `heartbeat.interval_ms`, one JSON message per worker on the topic
//! exchange `<prefix>.heartbeat`, routing key `worker.<worker_id>` (schema:
//! `schemas/heartbeat.v1.schema.json`; channel `heartbeat` in `schemas/asyncapi.yaml`).
//!
//! It says who the worker is (id, version, models, execution provider), whether it serves
//! (`state`, `ready`) and on which broker node (`broker_node`, `host:port`, and `broker_failovers`,
//! the times it moved to another node after losing one), how loaded it is (in flight, busy fraction, the queue behind it) and what it
//! can do: `capacity_images_per_second` is measured, images rendered per second of model run over
//! the last minute (or the last minute that had work), `null` before the first image. GPU figures
//! come from [`crate::gpu`] when NVML is there. When shutdown begins, a last message with
//! `"state": "stopping"` goes out at once.
//!
//! The heartbeat has a connection of its own, so a slow or blocked request channel never delays
//! it; while the broker is unreachable it skips beats (counted in `kiln_heartbeats_total{result =
//! "failed"}`) and tries again on the next one. Messages are transient and expire after three
//! periods: a monitor that falls behind sees fresh beats, not a backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use time::OffsetDateTime;
use tokio::sync::watch;

mod message;

use super::health::{BrokerState, Health};
use crate::amqp::connect::Broker;
use crate::metrics;
use message::message;
use message::Load;
pub use message::{HeartbeatMessage, QueueFigures, UsageWindow};

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

/// What the heartbeat needs to know about its worker.
#[derive(Debug, Clone)]
pub struct Beacon {
    /// The broker (URL and TLS files).
    pub broker: Broker,
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
        let usage = metrics::usage();
        let (busy, capacity) = window.sample(Instant::now(), usage);
        metrics::set_busy_ratio(busy);
        let load = (busy, capacity, window.images_since_start(usage));
        let sent = beat(&settings, &health, &mut link, load).await;
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
    load: Load,
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
    let message = message(settings, health, load, queue);
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
    let (connection, _) = crate::amqp::connect::connect_any(&settings.broker, &properties, None).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(exchange_name("kiln"), "kiln.heartbeat");
        assert_eq!(routing_key("kiln-0"), "worker.kiln-0");
    }
}
