//! What one heartbeat says: the message (`schemas/heartbeat.v1.schema.json`), and the busy
//! fraction and measured capacity it reports.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Beacon, HEARTBEAT_VERSION};
use crate::gpu::GpuFigures;
use crate::metrics::{self, Usage};
use crate::observability::health::{BrokerState, Health};

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
    /// The broker node (`host:port`, never credentials) the worker's request connection is on, or
    /// the one it lost while it reconnects; `null` before it first consumed. The heartbeat's own
    /// connection may be on another node.
    pub broker_node: Option<String>,
    /// Reconnects that landed on another broker node than the one lost, since the worker started.
    pub broker_failovers: u64,
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

/// The busy fraction of the last period, the capacity over the window, and the images this
/// worker rendered since its heartbeat started.
pub(super) type Load = (f64, Option<f64>, u64);

/// Turns running totals into the busy fraction of the last period and the capacity over a window.
#[derive(Debug)]
pub struct UsageWindow {
    samples: VecDeque<(Instant, Usage)>,
    window: Duration,
    last_capacity: Option<f64>,
    start: Usage,
}

impl UsageWindow {
    /// A window of `window`, starting from `now` and `usage`.
    pub fn new(now: Instant, usage: Usage, window: Duration) -> Self {
        Self {
            samples: VecDeque::from([(now, usage)]),
            window,
            last_capacity: None,
            start: usage,
        }
    }

    /// Images rendered between the window's start and `usage` (the process's totals also count
    /// any other worker in the same process).
    pub fn images_since_start(&self, usage: Usage) -> u64 {
        usage.images.saturating_sub(self.start.images)
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

impl QueueFigures {
    /// No depths known yet; the longest queue wait since the last heartbeat (which this takes).
    pub(super) fn unknown() -> Self {
        Self {
            requests_ready: None,
            consumers: None,
            dead_letters: None,
            max_wait_seconds: metrics::take_max_queue_wait(),
        }
    }
}

/// The heartbeat of now.
pub(super) fn message(settings: &Beacon, health: &Health, load: Load, queue: QueueFigures) -> HeartbeatMessage {
    let (busy, capacity, images_rendered) = load;
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
        broker_node: report.broker_node,
        broker_failovers: report.broker_failovers,
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
        images_rendered,
        queue,
        gpus: crate::gpu::latest(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::connect::Broker;

    fn beacon() -> Beacon {
        Beacon {
            broker: Broker::from(&secrecy::SecretString::from(
                "amqp://guest:secret@127.0.0.1:5681/%2f,amqp://guest:secret@127.0.0.1:5682/%2f",
            )),
            prefix: "kiln".into(),
            request_queues: vec![("requests".into(), "kiln.requests".into())],
            dead_letter_queue: "kiln.dead-letter".into(),
            worker_id: "kiln-0".into(),
            models: vec!["multistyle26".into()],
            provider: "cpu".into(),
            interval: Duration::from_secs(5),
        }
    }

    fn queue() -> QueueFigures {
        QueueFigures {
            requests_ready: Some(0),
            consumers: Some(1),
            dead_letters: Some(0),
            max_wait_seconds: None,
        }
    }

    #[test]
    fn a_heartbeat_says_which_broker_node_the_worker_is_on_and_how_often_it_moved() {
        let health = Health::new("multistyle26 loaded".into(), None);
        let load = (0.0, None, 0);
        let starting = message(&beacon(), &health, load, queue());
        assert_eq!(
            (
                starting.state,
                starting.broker_node.as_deref(),
                starting.broker_failovers
            ),
            ("starting", None, 0)
        );

        health.set_consuming_on("unit-test-heartbeat-kc1:5681");
        health.set_broker(BrokerState::Lost("node stopped".into()));
        let reconnecting = message(&beacon(), &health, load, queue());
        assert_eq!(reconnecting.state, "reconnecting");
        assert_eq!(
            reconnecting.broker_node.as_deref(),
            Some("unit-test-heartbeat-kc1:5681")
        );
        // Back on the same node: not a failover.
        health.set_consuming_on("unit-test-heartbeat-kc1:5681");
        assert_eq!(message(&beacon(), &health, load, queue()).broker_failovers, 0);
        health.set_broker(BrokerState::Lost("node stopped".into()));
        health.set_consuming_on("unit-test-heartbeat-kc2:5682");
        let moved = message(&beacon(), &health, load, queue());
        assert_eq!(moved.state, "serving");
        assert_eq!(moved.broker_node.as_deref(), Some("unit-test-heartbeat-kc2:5682"));
        assert_eq!(moved.broker_failovers, 1);

        // On the wire, valid against the published schema, and no credentials.
        let json = serde_json::to_value(&moved).unwrap();
        assert_eq!(json["broker_node"], "unit-test-heartbeat-kc2:5682");
        assert_eq!(json["broker_failovers"], 1);
        assert!(!json.to_string().contains("secret"));
        let schema: serde_json::Value = serde_json::from_str(include_str!("../../../schemas/heartbeat.v1.schema.json"))
            .expect("the schema is JSON");
        let validator = jsonschema::validator_for(&schema).expect("a valid schema");
        for beat in [starting, reconnecting, moved] {
            let beat = serde_json::to_value(&beat).unwrap();
            let errors: Vec<String> = validator.iter_errors(&beat).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{beat}: {errors:?}");
        }
    }

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
        assert_eq!(w.images_since_start(usage(3.5, 12)), 12);
    }
}
