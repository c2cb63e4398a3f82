//! What the metrics learn about one delivery while it is handled, recorded once it is settled.
//!
//! Labels stay in small fixed sets: the model only when this worker serves it; the tier as the
//! limiter reported it, else the request queue's (both configured tiers; the shared queue counts as
//! the default tier), and `unknown` for a request that never parsed.

use std::time::Instant;

use crate::domain::{LimitInfo, Timings};
use crate::inference::ModelRegistry;
use crate::metrics::{self, InFlight, RequestRecord, UNKNOWN};

use super::Outcome;

/// One delivery's labels and latencies; counts it in flight while it lives.
#[derive(Debug)]
pub(super) struct Observed {
    _in_flight: InFlight,
    received: Instant,
    model: Option<String>,
    tier: Option<String>,
    queue_wait_ms: Option<f64>,
    inference_ms: Option<f64>,
}

impl Observed {
    /// A delivery arrived.
    pub(super) fn start() -> Self {
        Self {
            _in_flight: metrics::in_flight(),
            received: Instant::now(),
            model: None,
            tier: None,
            queue_wait_ms: None,
            inference_ms: None,
        }
    }

    /// The request parsed: its model (if served here) and how long it waited in the queue.
    pub(super) fn parsed(&mut self, registry: &ModelRegistry, model: &str, queue_wait_ms: Option<f64>) {
        self.model = registry.get(model).is_ok().then(|| model.to_owned());
        self.queue_wait_ms = queue_wait_ms;
    }

    /// The request queue it came from is this (configured) tier's.
    pub(super) fn queue_tier(&mut self, tier: &str) {
        self.tier = Some(tier.to_owned());
    }

    /// The limiter's answer named the user's tier (it overrides the queue's).
    pub(super) fn limited(&mut self, info: Option<&LimitInfo>) {
        if let Some(info) = info {
            self.tier = Some(info.tier.clone());
        }
    }

    /// The timings of the final reply.
    pub(super) fn timings(&mut self, timings: &Timings) {
        self.inference_ms = Some(timings.inference);
    }

    /// The delivery is settled: count it and record its latencies.
    pub(super) fn finish(self, outcome: &Outcome) {
        let label = outcome_label(outcome);
        if let Outcome::DeadLettered { cause, .. } = outcome {
            metrics::record_dead_letter(cause);
        }
        let rendered = matches!(outcome, Outcome::Replied { error: None });
        metrics::record_request(&RequestRecord {
            model: self.model.as_deref().unwrap_or(UNKNOWN),
            tier: self.tier.as_deref().unwrap_or(UNKNOWN),
            outcome: label,
            queue_wait: self.queue_wait_ms.map(|ms| ms / 1000.0),
            inference: self.inference_ms.filter(|_| rendered).map(|ms| ms / 1000.0),
            duration: self.received.elapsed().as_secs_f64(),
        });
    }
}

/// `ok`, the error code, `deferred`, `duplicate`, `dead_lettered`, `requeued` or `abandoned`.
pub fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Replied { error: None } => "ok",
        Outcome::Replied { error: Some(code) } => code.as_str(),
        Outcome::Deferred { .. } => "deferred",
        Outcome::Duplicate => "duplicate",
        Outcome::DeadLettered { .. } => "dead_lettered",
        Outcome::Requeued { .. } => "requeued",
        Outcome::Abandoned { .. } => "abandoned",
    }
}
