//! Whether this worker is alive and ready to serve, for `/healthz`, `/readyz` and the heartbeat.
//!
//! Ready means all three checks pass:
//!
//! | check | passes when |
//! | --- | --- |
//! | `broker` | connected, topology declared, consuming the request queue, not shutting down |
//! | `rate_limit` | limits off; or Redis answered the last decision; or it did not and the outage policy (`fail_open`/`fail_closed`) is deciding |
//! | `models` | every enabled model loaded (and warmed up, unless `models.warmup = false`) |
//!
//! The `rate_limit` check only fails while the limiter cannot decide at all, which the outage
//! policy rules out: a Redis outage is reported (its detail, `kiln_rate_limit_fallback_active`),
//! not a reason to take the worker out of service, since every worker shares the same Redis and
//! the policy exists to keep serving through it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

use crate::rate_limit::{Limiter, RedisDown};

/// Where the broker session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerState {
    /// Not connected yet (startup, or reconnecting after a loss).
    Connecting,
    /// Consuming the request queue.
    Consuming,
    /// The connection was lost; reconnecting.
    Lost(String),
    /// Shutting down: not taking new requests.
    Stopping,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Whether it passes.
    pub ok: bool,
    /// What it found, for a human.
    pub detail: String,
}

/// The readiness report (the JSON body of `/readyz`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// All checks pass.
    pub ready: bool,
    /// Names of the checks that fail.
    pub failing: Vec<&'static str>,
    /// Every check, by name.
    pub checks: BTreeMap<&'static str, Check>,
}

/// The worker's health, shared by the session loop (which updates it) and the HTTP server and
/// heartbeat (which read it).
pub struct Health {
    broker: Mutex<BrokerState>,
    stopping: watch::Sender<bool>,
    models: String,
    limiter: Option<Arc<Limiter>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("broker", &self.broker_state())
            .field("stopping", &self.is_stopping())
            .field("models", &self.models)
            .field("limiter", &self.limiter.is_some())
            .finish()
    }
}

impl Health {
    /// Models described by `models` (loaded by the time this is made); `limiter` if limits are on.
    pub fn new(models: String, limiter: Option<Arc<Limiter>>) -> Self {
        Self {
            broker: Mutex::new(BrokerState::Connecting),
            stopping: watch::Sender::new(false),
            models,
            limiter,
        }
    }

    /// Record where the broker session stands. Once stopping, it stays stopping.
    pub fn set_broker(&self, state: BrokerState) {
        let mut broker = self.broker.lock().expect("not poisoned");
        if *broker != BrokerState::Stopping {
            *broker = state;
        }
    }

    /// Where the broker session stands.
    pub fn broker_state(&self) -> BrokerState {
        self.broker.lock().expect("not poisoned").clone()
    }

    /// Shutdown has begun: not ready any more, and the heartbeat says `stopping`.
    pub fn set_stopping(&self) {
        self.set_broker(BrokerState::Stopping);
        self.stopping.send_replace(true);
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// A receiver that sees `true` once shutdown begins.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Evaluate every check (and update `kiln_ready`).
    pub fn report(&self) -> Report {
        let broker = match &*self.broker.lock().expect("not poisoned") {
            BrokerState::Consuming => pass("connected and consuming the request queue"),
            BrokerState::Connecting => fail("not connected to the broker yet"),
            BrokerState::Lost(reason) => fail(&format!("lost the broker connection ({reason}); reconnecting")),
            BrokerState::Stopping => fail("shutting down: no new requests"),
        };
        let rate_limit = match &self.limiter {
            None => pass("rate limits are off (rate_limit.enabled = false)"),
            Some(limiter) if limiter.redis_healthy() => pass("no Redis failure at the last decision"),
            Some(limiter) => pass(match limiter.settings().redis_down {
                RedisDown::FailOpen => "Redis unreachable: fail_open, each worker limits on its own",
                RedisDown::FailClosed => "Redis unreachable: fail_closed, requests are deferred until it answers",
            }),
        };
        let checks = BTreeMap::from([
            ("broker", broker),
            ("rate_limit", rate_limit),
            ("models", pass(&self.models)),
        ]);
        let failing: Vec<&'static str> = checks.iter().filter(|(_, c)| !c.ok).map(|(name, _)| *name).collect();
        let ready = failing.is_empty();
        crate::metrics::set_ready(ready);
        Report { ready, failing, checks }
    }
}

fn pass(detail: &str) -> Check {
    Check {
        ok: true,
        detail: detail.to_owned(),
    }
}

fn fail(detail: &str) -> Check {
    Check {
        ok: false,
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_consuming_and_never_again_once_stopping() {
        let health = Health::new("multistyle26 loaded".into(), None);
        let report = health.report();
        assert!(!report.ready);
        assert_eq!(report.failing, vec!["broker"]);
        health.set_broker(BrokerState::Consuming);
        assert!(health.report().ready);
        health.set_broker(BrokerState::Lost("connection reset".into()));
        let report = health.report();
        assert!(!report.ready);
        assert!(report.checks["broker"].detail.contains("connection reset"));
        health.set_broker(BrokerState::Consuming);
        let mut stopping = health.stopping();
        health.set_stopping();
        assert!(*stopping.borrow_and_update());
        health.set_broker(BrokerState::Consuming);
        assert_eq!(health.report().failing, vec!["broker"]);
        assert!(health.is_stopping());
    }
}
