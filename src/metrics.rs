//! Prometheus metrics: one process-wide [`prometheus::Registry`], served on `/metrics` by
//! [`crate::http`].
//!
//! Every metric is a process-wide static, registered once in that registry, so any module records
//! with a one-line call (`metrics::observe_batch(model, size, seconds)`) and no handle is threaded
//! through constructors. The price: two workers in one process share their counts. kiln runs one
//! worker per process, and nextest runs each test in its own process, so tests can assert exact
//! values.
//!
//! Naming follows Prometheus: `kiln_` prefix, base units (seconds, bytes), `_total` on counters.
//! Labels come from small fixed sets only: `model` (a served model, else `unknown`), `tier` (a
//! configured tier, else `unknown`), `outcome`, `result`, `reason`, `stage`, `queue`, `provider`,
//! `version`, `gpu` (an index). Never a user id or a request id.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `kiln_build_info` | gauge (1) | version |
//! | `kiln_execution_provider_info` | gauge (1) | provider |
//! | `kiln_ready` | gauge (0/1) | |
//! | `kiln_requests_total` | counter | model, tier, outcome |
//! | `kiln_requests_in_flight` | gauge | |
//! | `kiln_request_queue_wait_seconds` | histogram | model, tier |
//! | `kiln_request_inference_seconds` | histogram | model, tier |
//! | `kiln_request_duration_seconds` | histogram | model, tier |
//! | `kiln_requests_expired_total` | counter | stage |
//! | `kiln_deferrals_total` | counter | reason |
//! | `kiln_dead_letters_total` | counter | reason |
//! | `kiln_inference_batch_size` | histogram | model |
//! | `kiln_inference_batch_duration_seconds` | histogram | model |
//! | `kiln_inference_images_total` | counter | model |
//! | `kiln_inference_busy_seconds_total` | counter | |
//! | `kiln_inference_busy_ratio` | gauge | |
//! | `kiln_model_load_seconds` | gauge | model |
//! | `kiln_model_info` | gauge (1) | model, variant |
//! | `kiln_rate_limit_decisions_total` | counter | tier, result |
//! | `kiln_rate_limit_fallback_active` | gauge (0/1) | |
//! | `kiln_redis_errors_total` | counter | reason |
//! | `kiln_broker_reconnects_total` | counter | |
//! | `kiln_queue_messages` | gauge | queue |
//! | `kiln_heartbeats_total` | counter | result |
//!
//! The GPU series (`kiln_gpu_*`) are declared in [`crate::gpu`] and registered here too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use prometheus::core::Collector;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::rate_limit::{AtLimit, Decision};

/// The label value for a model or tier that is not one of the known set.
pub const UNKNOWN: &str = "unknown";

/// Every metric name this module declares (histograms without their `_bucket`/`_sum`/`_count`).
pub const METRIC_NAMES: &[&str] = &[
    "kiln_build_info",
    "kiln_execution_provider_info",
    "kiln_ready",
    "kiln_requests_total",
    "kiln_requests_in_flight",
    "kiln_request_queue_wait_seconds",
    "kiln_request_inference_seconds",
    "kiln_request_duration_seconds",
    "kiln_requests_expired_total",
    "kiln_deferrals_total",
    "kiln_dead_letters_total",
    "kiln_inference_batch_size",
    "kiln_inference_batch_duration_seconds",
    "kiln_inference_images_total",
    "kiln_inference_busy_seconds_total",
    "kiln_inference_busy_ratio",
    "kiln_model_load_seconds",
    "kiln_model_info",
    "kiln_rate_limit_decisions_total",
    "kiln_rate_limit_fallback_active",
    "kiln_redis_errors_total",
    "kiln_broker_reconnects_total",
    "kiln_queue_messages",
    "kiln_heartbeats_total",
];

/// Seconds a request may wait in a queue: deferred requests wait minutes to an hour.
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Seconds of a model run (a 256 px image on a GPU: milliseconds; 1024 px on a CPU: seconds).
const RUN_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Images per model run.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

struct Metrics {
    registry: Registry,
    build_info: IntGaugeVec,
    provider_info: IntGaugeVec,
    ready: IntGauge,
    requests: IntCounterVec,
    in_flight: IntGauge,
    queue_wait: HistogramVec,
    request_inference: HistogramVec,
    request_duration: HistogramVec,
    expired: IntCounterVec,
    deferrals: IntCounterVec,
    dead_letters: IntCounterVec,
    batch_size: HistogramVec,
    batch_duration: HistogramVec,
    images: IntCounterVec,
    busy: Counter,
    busy_ratio: Gauge,
    model_load: GaugeVec,
    model_info: IntGaugeVec,
    decisions: IntCounterVec,
    fallback_active: IntGauge,
    redis_errors: IntCounterVec,
    broker_reconnects: IntCounter,
    queue_messages: IntGaugeVec,
    heartbeats: IntCounterVec,
}

/// Register `collector` in `registry`; the names are constants, so a failure is a bug.
fn registered<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique and valid");
    collector
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(&r, IntCounterVec::new(Opts::new(name, help), labels).unwrap())
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            registered(&r, HistogramVec::new(opts, labels).unwrap())
        };
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(&r, IntGaugeVec::new(Opts::new(name, help), labels).unwrap())
        };
        let metrics = Self {
            build_info: int_gauge_vec(
                "kiln_build_info",
                "Always 1; the version of kiln running.",
                &["version"],
            ),
            provider_info: int_gauge_vec(
                "kiln_execution_provider_info",
                "Always 1; the execution provider the models run on (cuda, cpu, cpu_fallback).",
                &["provider"],
            ),
            ready: registered(
                &r,
                IntGauge::new(
                    "kiln_ready",
                    "1 when /readyz passes: consuming, models loaded, limiter usable.",
                )
                .unwrap(),
            ),
            requests: counter_vec(
                "kiln_requests_total",
                "Deliveries settled, by outcome: ok, an error code, deferred, dead_lettered, requeued, abandoned \
                 (a deferred request counts again when it comes back).",
                &["model", "tier", "outcome"],
            ),
            in_flight: registered(
                &r,
                IntGauge::new("kiln_requests_in_flight", "Deliveries being handled now.").unwrap(),
            ),
            queue_wait: histogram(
                "kiln_request_queue_wait_seconds",
                "Time from enqueueing (created_at or the AMQP timestamp) to the worker receiving the request.",
                &["model", "tier"],
                QUEUE_WAIT_BUCKETS,
            ),
            request_inference: histogram(
                "kiln_request_inference_seconds",
                "Time of the model run that rendered a request (successful requests).",
                &["model", "tier"],
                RUN_BUCKETS,
            ),
            request_duration: histogram(
                "kiln_request_duration_seconds",
                "Time from receiving a request to settling it with the broker (reply confirmed, acked).",
                &["model", "tier"],
                RUN_BUCKETS,
            ),
            expired: counter_vec(
                "kiln_requests_expired_total",
                "Requests whose deadline passed: on arrival (admission), after preparation (inference), or \
                 before a deferral could end (deferral; answered rate_limited).",
                &["stage"],
            ),
            deferrals: counter_vec(
                "kiln_deferrals_total",
                "Requests put in a delay queue, by the limit that deferred them.",
                &["reason"],
            ),
            dead_letters: counter_vec(
                "kiln_dead_letters_total",
                "Requests this worker dead-lettered (rejected without requeue), by reason.",
                &["reason"],
            ),
            batch_size: histogram(
                "kiln_inference_batch_size",
                "Images per model run.",
                &["model"],
                BATCH_BUCKETS,
            ),
            batch_duration: histogram(
                "kiln_inference_batch_duration_seconds",
                "Time of one model run (one batch).",
                &["model"],
                RUN_BUCKETS,
            ),
            images: counter_vec("kiln_inference_images_total", "Images the models rendered.", &["model"]),
            busy: registered(
                &r,
                Counter::new(
                    "kiln_inference_busy_seconds_total",
                    "Time the inference thread spent running models; rate() of it is the busy fraction.",
                )
                .unwrap(),
            ),
            busy_ratio: registered(
                &r,
                Gauge::new(
                    "kiln_inference_busy_ratio",
                    "Fraction of the last heartbeat period the inference thread spent running models \
                     (set by the heartbeat; stays 0 with heartbeat.enabled = false).",
                )
                .unwrap(),
            ),
            model_info: int_gauge_vec(
                "kiln_model_info",
                "Always 1; each served model and the variant of it loaded (default, or e.g. fp16).",
                &["model", "variant"],
            ),
            model_load: registered(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "kiln_model_load_seconds",
                        "Time to load (and warm up) each model at startup.",
                    ),
                    &["model"],
                )
                .unwrap(),
            ),
            decisions: counter_vec(
                "kiln_rate_limit_decisions_total",
                "Rate-limit decisions: admitted, rejected, deferred, too_costly, unavailable.",
                &["tier", "result"],
            ),
            fallback_active: registered(
                &r,
                IntGauge::new(
                    "kiln_rate_limit_fallback_active",
                    "1 while Redis is unreachable and the outage policy (fail_open or fail_closed) decides.",
                )
                .unwrap(),
            ),
            redis_errors: counter_vec(
                "kiln_redis_errors_total",
                "Failed Redis calls of the limiter: error, timeout (decisions), release (returning a lease).",
                &["reason"],
            ),
            broker_reconnects: registered(
                &r,
                IntCounter::new(
                    "kiln_broker_reconnects_total",
                    "Times the broker connection was lost and the worker reconnected.",
                )
                .unwrap(),
            ),
            queue_messages: int_gauge_vec(
                "kiln_queue_messages",
                "Messages ready in a queue (requests, dead_letter), as of the last heartbeat.",
                &["queue"],
            ),
            heartbeats: counter_vec(
                "kiln_heartbeats_total",
                "Heartbeats published (ok) or not (failed).",
                &["result"],
            ),
            registry: r,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
static IMAGES: AtomicU64 = AtomicU64::new(0);
static QUEUE_WAIT_MAX_MICROS: AtomicU64 = AtomicU64::new(0);

fn m() -> &'static Metrics {
    &METRICS
}

/// Register a collector of another module (the GPU gauges) in the registry `/metrics` serves.
pub fn register<C: Collector + Clone + 'static>(collector: C) -> C {
    registered(&m().registry, collector)
}

/// Everything, in the Prometheus text exposition format (version 0.0.4).
pub fn render() -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&m().registry.gather(), &mut out)
        .expect("encoding into a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Record a loaded model and which of its variants (`default`, or one its manifest lists).
pub fn set_model_info(model: &str, variant: &str) {
    m().model_info.with_label_values(&[model, variant]).set(1);
}

/// Record the execution provider (`cuda`, `cpu`, `cpu_fallback`).
pub fn set_execution_provider(provider: &str) {
    m().provider_info.with_label_values(&[provider]).set(1);
}

/// Whether `/readyz` passes.
pub fn set_ready(ready: bool) {
    m().ready.set(i64::from(ready));
}

/// One model run of `size` images taking `seconds`: the batch-size and run-time histograms, the
/// busy time and the images rendered. Called by the inference thread once per run.
pub fn observe_batch(model: &str, size: usize, seconds: f64) {
    let metrics = m();
    metrics.batch_size.with_label_values(&[model]).observe(size as f64);
    metrics.batch_duration.with_label_values(&[model]).observe(seconds);
    metrics.images.with_label_values(&[model]).inc_by(size as u64);
    metrics.busy.inc_by(seconds.max(0.0));
    IMAGES.fetch_add(size as u64, Ordering::Relaxed);
}

/// Busy seconds and images rendered since the process started (for the heartbeat's rates).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// `kiln_inference_busy_seconds_total`.
    pub busy_seconds: f64,
    /// Images rendered, every model.
    pub images: u64,
}

/// The running totals of [`observe_batch`].
pub fn usage() -> Usage {
    Usage {
        busy_seconds: m().busy.get(),
        images: IMAGES.load(Ordering::Relaxed),
    }
}

/// The busy fraction over the last heartbeat period.
pub fn set_busy_ratio(ratio: f64) {
    m().busy_ratio.set(ratio);
}

/// Time to load and warm one model.
pub fn set_model_load_seconds(model: &str, seconds: f64) {
    m().model_load.with_label_values(&[model]).set(seconds);
}

/// A delivery started being handled; the returned guard counts it in flight until dropped.
pub fn in_flight() -> InFlight {
    m().in_flight.inc();
    InFlight(())
}

/// Counts one delivery in `kiln_requests_in_flight` while it lives.
#[derive(Debug)]
pub struct InFlight(());

impl Drop for InFlight {
    fn drop(&mut self) {
        m().in_flight.dec();
    }
}

/// Requests in flight now.
pub fn requests_in_flight() -> i64 {
    m().in_flight.get()
}

/// One settled request: its outcome, and the latencies known for it (in seconds).
#[derive(Debug, Clone, Default)]
pub struct RequestRecord<'a> {
    /// A served model, or [`UNKNOWN`].
    pub model: &'a str,
    /// A configured tier, or [`UNKNOWN`].
    pub tier: &'a str,
    /// `ok`, an error code, `deferred`, `dead_lettered`, `requeued`, `abandoned`.
    pub outcome: &'a str,
    /// Enqueued to received, when the request said when it was enqueued.
    pub queue_wait: Option<f64>,
    /// The model run, when it rendered.
    pub inference: Option<f64>,
    /// Received to settled.
    pub duration: f64,
}

/// Record a settled request.
pub fn record_request(record: &RequestRecord<'_>) {
    let metrics = m();
    let (model, tier) = (record.model, record.tier);
    metrics.requests.with_label_values(&[model, tier, record.outcome]).inc();
    if let Some(wait) = record.queue_wait {
        metrics.queue_wait.with_label_values(&[model, tier]).observe(wait);
        QUEUE_WAIT_MAX_MICROS.fetch_max((wait * 1e6) as u64, Ordering::Relaxed);
    }
    if let Some(seconds) = record.inference {
        metrics
            .request_inference
            .with_label_values(&[model, tier])
            .observe(seconds);
    }
    metrics
        .request_duration
        .with_label_values(&[model, tier])
        .observe(record.duration);
}

/// The longest queue wait recorded since the last call (seconds), or `None` if none was.
pub fn take_max_queue_wait() -> Option<f64> {
    match QUEUE_WAIT_MAX_MICROS.swap(0, Ordering::Relaxed) {
        0 => None,
        micros => Some(micros as f64 / 1e6),
    }
}

/// A request's deadline passed at `stage` (`admission`, `inference`, `deferral`).
pub fn record_expired(stage: &'static str) {
    m().expired.with_label_values(&[stage]).inc();
}

/// A request went to a delay queue because of `reason` (`rate`, `daily_quota`, `in_flight`,
/// `limiter_unavailable`).
pub fn record_deferral(reason: &str) {
    m().deferrals.with_label_values(&[reason]).inc();
}

/// This worker dead-lettered a request (`unroutable`: its reply had nowhere to go).
pub fn record_dead_letter(reason: &'static str) {
    m().dead_letters.with_label_values(&[reason]).inc();
}

/// A rate-limit decision, by tier and result.
pub fn record_decision(decision: &Decision) {
    let (tier, result) = match decision {
        Decision::Admitted { info, .. } => (info.tier.as_str(), "admitted"),
        Decision::Limited {
            info,
            policy: AtLimit::Reject,
        } => (info.tier.as_str(), "rejected"),
        Decision::Limited {
            info,
            policy: AtLimit::Defer,
        } => (info.tier.as_str(), "deferred"),
        Decision::TooCostly { tier, .. } => (tier.as_str(), "too_costly"),
        Decision::Unavailable { .. } => (UNKNOWN, "unavailable"),
    };
    m().decisions.with_label_values(&[tier, result]).inc();
}

/// Whether the limiter's outage policy is deciding (Redis unreachable).
pub fn set_rate_limit_fallback(active: bool) {
    m().fallback_active.set(i64::from(active));
}

/// A failed Redis call (`error`, `timeout`, `release`).
pub fn record_redis_error(reason: &'static str) {
    m().redis_errors.with_label_values(&[reason]).inc();
}

/// The broker connection was lost; the worker reconnects.
pub fn record_broker_reconnect() {
    m().broker_reconnects.inc();
}

/// Messages ready in `queue` (`requests`, `requests.<tier>` per configured tier, `dead_letter`).
pub fn set_queue_messages(queue: &str, messages: u32) {
    m().queue_messages.with_label_values(&[queue]).set(i64::from(messages));
}

/// A heartbeat was published (`ok`) or not (`failed`).
pub fn record_heartbeat(result: &'static str) {
    m().heartbeats.with_label_values(&[result]).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_gathered_is_declared() {
        observe_batch("unit-test-model", 1, 0.01);
        for family in m().registry.gather() {
            let name = family.name();
            assert!(
                METRIC_NAMES.contains(&name) || crate::gpu::METRIC_NAMES.contains(&name),
                "{name} is registered but in no list of names"
            );
        }
    }

    fn descs() -> Vec<String> {
        let metrics = m();
        let collectors: Vec<&dyn Collector> = vec![
            &metrics.build_info,
            &metrics.provider_info,
            &metrics.ready,
            &metrics.requests,
            &metrics.in_flight,
            &metrics.queue_wait,
            &metrics.request_inference,
            &metrics.request_duration,
            &metrics.expired,
            &metrics.deferrals,
            &metrics.dead_letters,
            &metrics.batch_size,
            &metrics.batch_duration,
            &metrics.images,
            &metrics.busy,
            &metrics.busy_ratio,
            &metrics.model_load,
            &metrics.model_info,
            &metrics.decisions,
            &metrics.fallback_active,
            &metrics.redis_errors,
            &metrics.broker_reconnects,
            &metrics.queue_messages,
            &metrics.heartbeats,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
    }

    #[test]
    fn the_declared_list_matches_the_collectors() {
        let mut declared: Vec<&str> = METRIC_NAMES.to_vec();
        let mut actual = descs();
        declared.sort_unstable();
        actual.sort_unstable();
        assert_eq!(actual, declared);
    }

    #[test]
    fn a_batch_adds_busy_time_images_and_one_observation() {
        let before = usage();
        observe_batch("unit-test-model", 3, 0.5);
        let after = usage();
        assert_eq!(after.images - before.images, 3);
        assert!((after.busy_seconds - before.busy_seconds - 0.5).abs() < 1e-9);
        let text = render();
        assert!(
            text.contains("kiln_inference_batch_size_sum{model=\"unit-test-model\"} 3"),
            "{text}"
        );
        assert!(text.contains("kiln_inference_images_total{model=\"unit-test-model\"} 3"));
    }

    #[test]
    fn the_in_flight_gauge_follows_its_guards() {
        let start = requests_in_flight();
        let a = in_flight();
        let b = in_flight();
        assert_eq!(requests_in_flight(), start + 2);
        drop(a);
        drop(b);
        assert_eq!(requests_in_flight(), start);
    }

    #[test]
    fn the_max_queue_wait_is_taken_once() {
        let _ = take_max_queue_wait();
        for wait in [0.25, 1.5, 0.75] {
            record_request(&RequestRecord {
                model: UNKNOWN,
                tier: UNKNOWN,
                outcome: "ok",
                queue_wait: Some(wait),
                inference: None,
                duration: 0.1,
            });
        }
        assert_eq!(take_max_queue_wait(), Some(1.5));
        assert_eq!(take_max_queue_wait(), None);
    }
}
