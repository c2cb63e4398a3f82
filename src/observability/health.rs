//! Whether this worker is alive and ready to serve, for `/healthz`, `/readyz` and the heartbeat.
//!
//! Ready means all three checks pass:
//!
//! | check | passes when |
//! | --- | --- |
//! | `broker` | connected, topology declared, consuming the request queue, not shutting down; its detail names the node (`host:port`) |
//! | `rate_limit` | limits off; or Redis answered the last decision; or it did not and the outage policy (`fail_open`/`fail_closed`) is deciding |
//! | `models` | every enabled model loaded (and warmed up, unless `models.warmup = false`) |
//!
//! The `rate_limit` check only fails while the limiter cannot decide at all, which the outage
//! policy rules out: a Redis outage is reported (its detail, `kiln_rate_limit_fallback_active`),
//! not a reason to take the worker out of service, since every worker shares the same Redis and
//! the policy exists to keep serving through it.
//!
//! The report (and so the heartbeat) also says which broker node the worker's connection is on
//! and how many times it moved to another node after losing one (`broker_node`,
//! `broker_failovers`; the metrics `kiln_broker_node{node}` and `kiln_broker_failovers_total`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

use crate::rate_limit::{Limiter, RedisDown, RedisMode};

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
    /// The broker node (`host:port`) the worker consumes on, or the one it lost while it
    /// reconnects; `None` before it first consumed.
    pub broker_node: Option<String>,
    /// Reconnects that landed on another node than the one lost, since the worker started.
    pub broker_failovers: u64,
}

/// The broker node the worker's sessions were on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    /// The last session's node (`host:port`).
    current: Option<String>,
    /// Sessions on another node than the one before.
    failovers: u64,
}

/// The worker's health, shared by the session loop (which updates it) and the HTTP server and
/// heartbeat (which read it).
pub struct Health {
    broker: Mutex<BrokerState>,
    node: Mutex<Node>,
    stopping: watch::Sender<bool>,
    models: String,
    limiter: Option<Arc<Limiter>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("broker", &self.broker_state())
            .field("node", &*self.node.lock().expect("not poisoned"))
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
            node: Mutex::new(Node::default()),
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

    /// A session consumes, its connection on broker node `node` (`host:port`, no credentials: see
    /// `amqp::connect::node_address`). A node other than the last session's is a failover, counted
    /// here and in `kiln_broker_failovers_total`; a reconnect to the same node is not. Returns
    /// whether it was one.
    pub fn set_consuming_on(&self, node: &str) -> bool {
        let failover = {
            let mut last = self.node.lock().expect("not poisoned");
            let previous = last.current.replace(node.to_owned());
            crate::metrics::set_broker_node(previous.as_deref(), node);
            let failover = previous.is_some_and(|p| p != node);
            if failover {
                last.failovers += 1;
                crate::metrics::record_broker_failover();
            }
            failover
        };
        self.set_broker(BrokerState::Consuming);
        failover
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
        let node = self.node.lock().expect("not poisoned").clone();
        let broker_node = match &node.current {
            Some(node) => format!("rabbit node {node}"),
            None => "the broker".to_owned(),
        };
        let broker = match &*self.broker.lock().expect("not poisoned") {
            BrokerState::Consuming => pass(&format!("connected to {broker_node} and consuming the request queue")),
            BrokerState::Connecting => fail("not connected to the broker yet"),
            BrokerState::Lost(reason) => fail(&format!(
                "lost the connection to {broker_node} ({reason}); reconnecting"
            )),
            BrokerState::Stopping => fail("shutting down: no new requests"),
        };
        let rate_limit = match &self.limiter {
            None => pass("rate limits are off (rate_limit.enabled = false)"),
            Some(limiter) if limiter.redis_healthy() => pass(match limiter.settings().redis_mode {
                RedisMode::Single => "no Redis failure at the last decision",
                RedisMode::Cluster => "no Redis Cluster failure at the last decision",
            }),
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
        Report {
            ready,
            failing,
            checks,
            broker_node: node.current,
            broker_failovers: node.failovers,
        }
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

    #[test]
    fn the_report_names_the_node_and_counts_a_move_to_another_but_not_a_return_to_the_same() {
        // Node names only this test uses: the metrics are the process's.
        let (kc1, kc2) = ("unit-test-health-kc1:5681", "unit-test-health-kc2:5682");
        let failovers_metric = || {
            let text = crate::metrics::render();
            let line = text
                .lines()
                .find(|l| l.starts_with("kiln_broker_failovers_total "))
                .expect("always exported")
                .to_owned();
            line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        };
        let node_metric = |node: &str| {
            crate::metrics::render()
                .lines()
                .find_map(|l| l.strip_prefix(&format!("kiln_broker_node{{node=\"{node}\"}} ")))
                .map(str::to_owned)
        };
        let health = Health::new("multistyle26 loaded".into(), None);
        let report = health.report();
        assert_eq!((report.broker_node, report.broker_failovers), (None, 0));

        // The first session is not a failover.
        assert!(!health.set_consuming_on(kc1));
        let report = health.report();
        assert!(report.ready);
        assert_eq!(
            report.checks["broker"].detail,
            format!("connected to rabbit node {kc1} and consuming the request queue")
        );
        assert_eq!((report.broker_node.as_deref(), report.broker_failovers), (Some(kc1), 0));
        assert_eq!(node_metric(kc1).as_deref(), Some("1"));

        // Lost, then back on the same node: a reconnect, not a failover.
        health.set_broker(BrokerState::Lost("connection reset".into()));
        let report = health.report();
        assert_eq!(
            report.checks["broker"].detail,
            format!("lost the connection to rabbit node {kc1} (connection reset); reconnecting")
        );
        assert_eq!(
            report.broker_node.as_deref(),
            Some(kc1),
            "the node lost, while reconnecting"
        );
        assert!(!health.set_consuming_on(kc1));
        assert_eq!(health.report().broker_failovers, 0);

        // Lost again, and on another node: a failover, in the report and the metrics.
        let before = failovers_metric();
        health.set_broker(BrokerState::Lost("node stopped".into()));
        assert!(health.set_consuming_on(kc2));
        let report = health.report();
        assert!(report.ready);
        assert!(report.checks["broker"].detail.contains(kc2), "{:?}", report.checks);
        assert_eq!((report.broker_node.as_deref(), report.broker_failovers), (Some(kc2), 1));
        assert!(failovers_metric() > before);
        assert_eq!(node_metric(kc1).as_deref(), Some("0"));
        assert_eq!(node_metric(kc2).as_deref(), Some("1"));

        // The JSON body of /readyz carries both.
        let body = serde_json::to_value(&report).unwrap();
        assert_eq!(body["broker_node"], kc2);
        assert_eq!(body["broker_failovers"], 1);
    }

    #[test]
    fn a_report_never_shows_credentials() {
        let url = "amqp://kiln:s3cret@rmq-1:5672/%2f";
        let health = Health::new("multistyle26 loaded".into(), None);
        health.set_consuming_on(&crate::amqp::connect::node_address(url));
        let body = serde_json::to_string(&health.report()).unwrap();
        assert!(
            body.contains("rmq-1:5672") && !body.contains("s3cret") && !body.contains("kiln@"),
            "{body}"
        );
    }
}
