//! Prometheus metrics: one process-wide [`prometheus::Registry`], served on `/metrics` by
//! [`crate::observability::http`].
//!
//! Every metric is a process-wide static, registered once in that registry, so any module records
//! with a one-line call (`metrics::observe_batch(model, size, seconds)`) and no handle is threaded
//! through constructors. The price: two workers in one process share their counts. kiln runs one
//! worker per process; tests that run in one process with others (`cargo test`) compare readings
//! before and after, of label values only they use.
//!
//! Naming follows Prometheus: `kiln_` prefix, base units (seconds, bytes), `_total` on counters.
//! Labels come from small fixed sets only: `model` (a served model, else `unknown`), `tier` (a
//! configured tier, else `unknown`), `outcome`, `result`, `reason`, `stage`, `queue`, `provider`,
//! `version`, `gpu` (an index), `held` (`true`, `false`), `node` (a broker node of `amqp.url`, as
//! `host:port`: never its credentials). Never a user id or a request id.
//!
//! Each metric is declared once, in the [`declare_metrics!`] table below: name, type, labels,
//! help. The table yields the collectors, their registration, [`METRIC_NAMES`] and the list in
//! [`METRIC_NAMES`]' documentation (name, type, labels, help of each metric).
//!
//! The GPU series (`kiln_gpu_*`) are declared the same way in [`crate::gpu`] and registered here
//! too ([`register`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use prometheus::core::Collector;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
    TextEncoder,
};

pub(crate) use declare::{FromSpec, Spec};

mod declare;

#[doc(inline)]
pub(crate) use crate::__kiln_declare_metrics as declare_metrics;

/// The label value for a model or tier that is not one of the known set.
pub const UNKNOWN: &str = "unknown";

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
/// Rows per denoising network call.
const ROW_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0];

declare_metrics! {
    /// Every metric of this module, registered in [`REGISTRY`].
    struct Metrics;
    /// Every metric name this module declares (histograms without their `_bucket`/`_sum`/`_count`).
    names METRIC_NAMES;
    specs SPECS;

    build_info: IntGaugeVec = "kiln_build_info", "gauge (1)", ["version"],
        "Always 1; the version of kiln running.";
    provider_info: IntGaugeVec = "kiln_execution_provider_info", "gauge (1)", ["provider"],
        "Always 1; the execution provider the models run on (cuda, cpu, cpu_fallback).";
    ready: IntGauge = "kiln_ready", "gauge (0/1)", [],
        "1 when /readyz passes: consuming, models loaded, limiter usable.";
    requests: IntCounterVec = "kiln_requests_total", "counter", ["model", "tier", "outcome"],
        "Deliveries settled, by outcome: ok, an error code, deferred, dead_lettered, requeued, abandoned \
         (a deferred request counts again when it comes back).";
    in_flight: IntGauge = "kiln_requests_in_flight", "gauge", [],
        "Deliveries being handled now.";
    queue_wait: HistogramVec = "kiln_request_queue_wait_seconds", "histogram", ["model", "tier"],
        "Time from enqueueing (created_at or the AMQP timestamp) to the worker receiving the request.",
        buckets = QUEUE_WAIT_BUCKETS;
    request_inference: HistogramVec = "kiln_request_inference_seconds", "histogram", ["model", "tier"],
        "Time of the model run that rendered a request (successful requests).",
        buckets = RUN_BUCKETS;
    request_duration: HistogramVec = "kiln_request_duration_seconds", "histogram", ["model", "tier"],
        "Time from receiving a request to settling it with the broker (reply confirmed, acked).",
        buckets = RUN_BUCKETS;
    expired: IntCounterVec = "kiln_requests_expired_total", "counter", ["stage"],
        "Requests whose deadline passed: on arrival (admission), after preparation (inference), or \
         before a deferral could end (deferral; answered rate_limited).";
    deferrals: IntCounterVec = "kiln_deferrals_total", "counter", ["reason"],
        "Requests put in a delay queue, by the limit that deferred them.";
    dead_letters: IntCounterVec = "kiln_dead_letters_total", "counter", ["reason"],
        "Requests this worker dead-lettered (rejected without requeue), by reason: unroutable (the reply came \
         back), reply_queue_gone (the producer's reply queue was gone on arrival: never rendered or charged).";
    batch_size: HistogramVec = "kiln_inference_batch_size", "histogram", ["model"],
        "Images per model run.",
        buckets = BATCH_BUCKETS;
    batch_duration: HistogramVec = "kiln_inference_batch_duration_seconds", "histogram", ["model"],
        "Time of one model run (one batch).",
        buckets = RUN_BUCKETS;
    images: IntCounterVec = "kiln_inference_images_total", "counter", ["model"],
        "Images the models rendered.";
    denoising_steps: IntCounterVec = "kiln_denoising_steps_total", "counter", ["model"],
        "Diffusion models: image-steps run (one per request per denoising step); rate() is steps/s.";
    denoising_step: HistogramVec = "kiln_denoising_step_seconds", "histogram", ["model"],
        "Diffusion models: time of one denoising network call (one step of a whole batch).",
        buckets = RUN_BUCKETS;
    denoising_rows: HistogramVec = "kiln_denoising_rows", "histogram", ["model"],
        "Diffusion models: rows per denoising network call (2 per guided request, 3 per guided edit).",
        buckets = ROW_BUCKETS;
    step_ticks: HistogramVec = "kiln_step_tick_seconds", "histogram", ["model", "requests"],
        "Step-level batching: time of one step of a batch key's running requests, by how many requests \
         stepped together (step time by batch).",
        buckets = RUN_BUCKETS;
    step_rows: IntGaugeVec = "kiln_step_requests", "gauge", ["model", "state"],
        "Step-level batching: requests started and not finished, running or paused (for a higher tier).";
    paused_bytes: IntGauge = "kiln_step_paused_bytes", "gauge", [],
        "Step-level batching: memory held by paused requests' state (bounded by batching.diffusion.max_paused_mb).";
    preemptions: IntCounterVec = "kiln_step_preemptions_total", "counter", ["model"],
        "Step-level batching: requests paused at a step boundary for a higher tier's request.";
    step_stops: IntCounterVec = "kiln_step_stops_total", "counter", ["reason"],
        "Requests stopped before finishing on the inference thread: cancelled (by their producer) or \
         abandoned (their reply queue went away).";
    busy: Counter = "kiln_inference_busy_seconds_total", "counter", [],
        "Time the inference thread spent running models; rate() of it is the busy fraction.";
    busy_ratio: Gauge = "kiln_inference_busy_ratio", "gauge", [],
        "Fraction of the last heartbeat period the inference thread spent running models \
         (set by the heartbeat; stays 0 with heartbeat.enabled = false).";
    model_load: GaugeVec = "kiln_model_load_seconds", "gauge", ["model"],
        "Time to load (and warm up) each model at startup.";
    model_info: IntGaugeVec = "kiln_model_info", "gauge (1)", ["model", "variant"],
        "Always 1; each served model and the variant of it loaded (default, or e.g. fp16).";
    decisions: IntCounterVec = "kiln_rate_limit_decisions_total", "counter", ["tier", "result"],
        "Rate-limit decisions: admitted, rejected, deferred, too_costly, unavailable.";
    fallback_active: IntGauge = "kiln_rate_limit_fallback_active", "gauge (0/1)", [],
        "1 while Redis is unreachable and the outage policy (fail_open or fail_closed) decides.";
    redis_errors: IntCounterVec = "kiln_redis_errors_total", "counter", ["reason"],
        "Failed Redis calls of the limiter: error, timeout (decisions), release (returning a lease); replay \
         (signed requests' replay records).";
    broker_reconnects: IntCounter = "kiln_broker_reconnects_total", "counter", [],
        "Times the broker connection was lost and the worker reconnected.";
    broker_failovers: IntCounter = "kiln_broker_failovers_total", "counter", [],
        "Broker reconnects that landed on another node than the one lost (amqp.url naming a cluster's nodes).";
    broker_node: IntGaugeVec = "kiln_broker_node", "gauge (0/1)", ["node"],
        "1 for the broker node (host:port) the worker's connection is on; 0 for a node it was on before.";
    queue_messages: IntGaugeVec = "kiln_queue_messages", "gauge", ["queue"],
        "Messages ready in a queue (requests, dead_letter), as of the last heartbeat.";
    heartbeats: IntCounterVec = "kiln_heartbeats_total", "counter", ["result"],
        "Heartbeats published (ok) or not (failed).";
    cancel_messages: IntCounterVec = "kiln_cancel_messages_total", "counter", ["held"],
        "Valid cancels heard on the cancel exchange, by whether this worker held the request then \
         (true: it was asked to stop) or not (false: remembered, stopped if it arrives). Malformed \
         ones are logged, not counted.";
    unauthenticated: IntCounterVec = "kiln_unauthenticated_total", "counter", ["reason"],
        "Requests refused as unauthenticated (auth.policy optional or required), by reason: missing, stale, \
         replayed (acked without a reply), bad_signature, unknown_key, forbidden_user, forbidden_queue. Never \
         charged or rendered.";
}

/// The registry `/metrics` serves: this module's metrics and those other modules [`register`].
static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let metrics =
        Metrics::register(|collector| REGISTRY.register(collector).expect("metric names are unique and valid"));
    metrics
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    // Both series from the start, at 0: `increase()` then sees a fleet's first cancel.
    for held in ["true", "false"] {
        metrics.cancel_messages.with_label_values(&[held]);
    }
    for reason in ["cancelled", "abandoned"] {
        metrics.step_stops.with_label_values(&[reason]);
    }
    for reason in crate::auth::Reason::ALL {
        metrics.unauthenticated.with_label_values(&[reason.as_str()]);
    }
    metrics
});
static IMAGES: AtomicU64 = AtomicU64::new(0);
static QUEUE_WAIT_MAX: MaxSince = MaxSince::new();

/// The largest of the values recorded since it was last taken, in microseconds (0: none).
struct MaxSince(AtomicU64);

impl MaxSince {
    const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    fn record(&self, seconds: f64) {
        self.0.fetch_max((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn take(&self) -> Option<f64> {
        match self.0.swap(0, Ordering::Relaxed) {
            0 => None,
            micros => Some(micros as f64 / 1e6),
        }
    }
}

fn m() -> &'static Metrics {
    &METRICS
}

/// Register a collector of another module (the GPU gauges) in the registry `/metrics` serves.
pub fn register(collector: Box<dyn Collector>) {
    LazyLock::force(&METRICS);
    REGISTRY.register(collector).expect("metric names are unique and valid");
}

/// Everything, in the Prometheus text exposition format (version 0.0.4).
pub fn render() -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&gathered(), &mut out)
        .expect("encoding into a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// Every family with a series, this module's and the other modules' (see [`register`]).
fn gathered() -> Vec<prometheus::proto::MetricFamily> {
    LazyLock::force(&METRICS);
    REGISTRY.gather()
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

/// Busy time of the inference thread outside [`observe_batch`] (step-level phases).
pub fn observe_busy(seconds: f64) {
    m().busy.inc_by(seconds.max(0.0));
}

/// One step of a batch key's running requests, `requests` of them, in `seconds`.
pub fn observe_step_tick(model: &str, requests: usize, seconds: f64) {
    m().step_ticks
        .with_label_values(&[model, &requests.to_string()])
        .observe(seconds);
}

/// Requests running and paused per model, and the paused state's bytes.
pub fn set_step_rows(
    running: &std::collections::HashMap<&str, i64>,
    paused: &std::collections::HashMap<&str, i64>,
    paused_bytes: usize,
) {
    let metrics = m();
    // Models seen before keep their series, set to 0 when nothing of theirs runs.
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().expect("metrics lock");
    for model in running.keys().chain(paused.keys()) {
        if !seen.iter().any(|m| m == model) {
            seen.push((*model).to_owned());
        }
    }
    for model in seen.iter() {
        let model = model.as_str();
        // At 0 from the model's first step on, so `increase()` sees its first preemption.
        metrics.preemptions.with_label_values(&[model]);
        metrics
            .step_rows
            .with_label_values(&[model, "running"])
            .set(running.get(model).copied().unwrap_or(0));
        metrics
            .step_rows
            .with_label_values(&[model, "paused"])
            .set(paused.get(model).copied().unwrap_or(0));
    }
    metrics.paused_bytes.set(paused_bytes as i64);
}

/// A request paused for a higher tier.
pub fn record_preemption(model: &str) {
    m().preemptions.with_label_values(&[model]).inc();
}

/// A request stopped on the inference thread (`cancelled`, `abandoned`).
pub fn record_step_stop(reason: &'static str) {
    m().step_stops.with_label_values(&[reason]).inc();
}

/// One denoising step of a diffusion batch: `images` requests advanced one step by one network
/// call of `rows` rows that took `seconds`.
pub fn observe_denoising_step(model: &str, images: usize, rows: usize, seconds: f64) {
    let metrics = m();
    metrics
        .denoising_steps
        .with_label_values(&[model])
        .inc_by(images as u64);
    metrics.denoising_step.with_label_values(&[model]).observe(seconds);
    metrics.denoising_rows.with_label_values(&[model]).observe(rows as f64);
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
    InFlight::on(m().in_flight.clone())
}

/// Counts one delivery in `kiln_requests_in_flight` while it lives.
#[derive(Debug)]
pub struct InFlight(IntGauge);

impl InFlight {
    /// Count one in `gauge` until dropped.
    fn on(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
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
        QUEUE_WAIT_MAX.record(wait);
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
    QUEUE_WAIT_MAX.take()
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

/// A rate-limit decision: the user's tier (or [`UNKNOWN`]) and its result (`admitted`,
/// `rejected`, `deferred`, `too_costly`, `unavailable`).
pub fn record_rate_limit_decision(tier: &str, result: &str) {
    m().decisions.with_label_values(&[tier, result]).inc();
}

/// Whether the limiter's outage policy is deciding (Redis unreachable).
pub fn set_rate_limit_fallback(active: bool) {
    m().fallback_active.set(i64::from(active));
}

/// A failed Redis call (`error`, `timeout`, `release`, `replay`).
pub fn record_redis_error(reason: &'static str) {
    m().redis_errors.with_label_values(&[reason]).inc();
}

/// The broker connection was lost; the worker reconnects.
pub fn record_broker_reconnect() {
    m().broker_reconnects.inc();
}

/// The worker's broker connection is on `node` (`host:port`), and was on `previous` before (a lost
/// connection's node, or `None` at startup): `previous` goes to 0, `node` to 1.
pub fn set_broker_node(previous: Option<&str>, node: &str) {
    let metrics = m();
    if let Some(previous) = previous.filter(|p| *p != node) {
        metrics.broker_node.with_label_values(&[previous]).set(0);
    }
    metrics.broker_node.with_label_values(&[node]).set(1);
}

/// A reconnect landed on another broker node than the one lost.
pub fn record_broker_failover() {
    m().broker_failovers.inc();
}

/// Messages ready in `queue` (`requests`, `requests.<tier>` per configured tier, `dead_letter`).
pub fn set_queue_messages(queue: &str, messages: u32) {
    m().queue_messages.with_label_values(&[queue]).set(i64::from(messages));
}

/// A heartbeat was published (`ok`) or not (`failed`).
pub fn record_heartbeat(result: &'static str) {
    m().heartbeats.with_label_values(&[result]).inc();
}

/// A valid cancel was heard; `held`: whether this worker held the request.
pub fn record_cancel_message(held: bool) {
    let held = if held { "true" } else { "false" };
    m().cancel_messages.with_label_values(&[held]).inc();
}

/// A request refused as unauthenticated, for `reason` (a [`crate::auth::Reason`]'s label).
pub fn record_unauthenticated(reason: &'static str) {
    m().unauthenticated.with_label_values(&[reason]).inc();
}

/// Check a [`declare_metrics!`] table against the collectors it made, in order: name, help, the
/// documented type, buckets only on histograms, Prometheus naming.
#[cfg(test)]
pub(crate) fn assert_declarations(specs: &[Spec], collectors: &[&dyn Collector]) {
    use prometheus::proto::MetricType;

    assert_eq!(specs.len(), collectors.len());
    for (spec, collector) in specs.iter().zip(collectors) {
        let family = collector.collect().pop().expect("one family per collector");
        assert_eq!(family.name(), spec.name);
        assert_eq!(family.help(), spec.help, "{}", spec.name);
        let kind = match family.get_field_type() {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            other => panic!("{}: {other:?} is not used here", spec.name),
        };
        assert!(spec.kind.starts_with(kind), "{}: {} is a {kind}", spec.name, spec.kind);
        assert_eq!(spec.buckets.is_some(), kind == "histogram", "{}", spec.name);
        assert_eq!(spec.name.ends_with("_total"), kind == "counter", "{}", spec.name);
        assert!(spec.name.starts_with("kiln_"), "{}", spec.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declarations_are_the_collectors() {
        assert_declarations(SPECS, &m().collectors());
        let names: Vec<&str> = SPECS.iter().map(|spec| spec.name).collect();
        assert_eq!(names, METRIC_NAMES);
    }

    #[test]
    fn a_spec_with_labels_for_a_scalar_is_refused() {
        let spec = Spec {
            name: "kiln_test_scalar",
            kind: "gauge",
            labels: &["model"],
            help: "A test.",
            buckets: None,
        };
        assert!(IntGauge::from_spec(&spec).is_err());
        assert!(IntGaugeVec::from_spec(&spec).is_ok());
    }

    #[test]
    fn a_batch_adds_busy_time_images_and_one_observation() {
        // A model label only this test uses: other tests in this process record batches too.
        let model = "unit-test-model-a-batch";
        let before = usage();
        observe_batch(model, 3, 0.5);
        let after = usage();
        assert!(after.images - before.images >= 3);
        assert!(after.busy_seconds - before.busy_seconds >= 0.5 - 1e-9);
        let text = render();
        assert!(
            text.contains(&format!("kiln_inference_batch_size_sum{{model=\"{model}\"}} 3\n")),
            "{text}"
        );
        assert!(text.contains(&format!("kiln_inference_batch_size_count{{model=\"{model}\"}} 1\n")));
        assert!(text.contains(&format!("kiln_inference_images_total{{model=\"{model}\"}} 3\n")));
        assert_eq!(m().batch_duration.with_label_values(&[model]).get_sample_sum(), 0.5);
    }

    #[test]
    fn the_in_flight_gauge_follows_its_guards() {
        let gauge = IntGauge::new("kiln_test_in_flight", "A test.").unwrap();
        let a = InFlight::on(gauge.clone());
        let b = InFlight::on(gauge.clone());
        assert_eq!(gauge.get(), 2);
        drop(a);
        assert_eq!(gauge.get(), 1);
        drop(b);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn the_max_queue_wait_is_taken_once() {
        let max = MaxSince::new();
        assert_eq!(max.take(), None);
        for wait in [0.25, 1.5, 0.75] {
            max.record(wait);
        }
        assert_eq!(max.take(), Some(1.5));
        assert_eq!(max.take(), None);
    }

    #[test]
    fn a_request_is_counted_under_its_labels() {
        let (model, tier) = ("unit-test-model-a-request", "unit-test-tier");
        record_request(&RequestRecord {
            model,
            tier,
            outcome: "ok",
            queue_wait: Some(0.25),
            inference: Some(0.125),
            duration: 0.5,
        });
        let metrics = m();
        assert_eq!(metrics.requests.with_label_values(&[model, tier, "ok"]).get(), 1);
        let labels = [model, tier];
        assert_eq!(metrics.queue_wait.with_label_values(&labels).get_sample_sum(), 0.25);
        assert_eq!(
            metrics.request_inference.with_label_values(&labels).get_sample_sum(),
            0.125
        );
        assert_eq!(
            metrics.request_duration.with_label_values(&labels).get_sample_count(),
            1
        );
    }

    #[test]
    fn cancels_are_counted_by_held_and_both_series_exist_from_the_start() {
        let text = render();
        assert!(text.contains("kiln_cancel_messages_total{held=\"true\"}"), "{text}");
        assert!(text.contains("kiln_cancel_messages_total{held=\"false\"}"), "{text}");
        let count = |held: &str| m().cancel_messages.with_label_values(&[held]).get();
        let before = (count("true"), count("false"));
        record_cancel_message(true);
        record_cancel_message(false);
        record_cancel_message(false);
        // Other tests in this process may hear cancels too: at least ours.
        assert!(count("true") > before.0);
        assert!(count("false") >= before.1 + 2);
    }

    #[test]
    fn the_broker_node_in_use_is_1_and_the_one_before_0() {
        // Node labels only this test uses: other tests in this process connect too.
        let (a, b) = ("unit-test-node-a:5681", "unit-test-node-b:5682");
        let node = |n: &str| m().broker_node.with_label_values(&[n]).get();
        set_broker_node(None, a);
        assert_eq!((node(a), node(b)), (1, 0));
        set_broker_node(Some(a), a);
        assert_eq!(node(a), 1, "the same node again stays 1");
        set_broker_node(Some(a), b);
        assert_eq!((node(a), node(b)), (0, 1));
        let text = render();
        assert!(
            text.contains(&format!("kiln_broker_node{{node=\"{b}\"}} 1\n")),
            "{text}"
        );
        assert!(text.contains("kiln_broker_failovers_total "), "always there: {text}");
    }

    #[test]
    fn a_rate_limit_decision_is_counted_under_its_tier_and_result() {
        let tier = "unit-test-tier-decisions";
        record_rate_limit_decision(tier, "admitted");
        record_rate_limit_decision(tier, "admitted");
        record_rate_limit_decision(tier, "deferred");
        let count = |result: &str| m().decisions.with_label_values(&[tier, result]).get();
        assert_eq!((count("admitted"), count("deferred"), count("rejected")), (2, 1, 0));
    }
}
