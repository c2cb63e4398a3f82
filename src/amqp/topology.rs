//! The queues and exchanges kiln uses, declared idempotently by every worker at startup.
//!
//! ```text
//!  producer ──► "" ──► <prefix>.requests          (quorum, delivery limit) ──► worker
//!  producer ──► "" ──► <prefix>.requests.<tier>   (one per tier, same arguments) ──► worker
//!                            │ rejected / over the delivery limit
//!                            ▼
//!                      <prefix>.dlx (fanout) ──► <prefix>.dead-letter  (quorum)
//!  worker ──► <prefix>.results (topic, key = request_id) ──► producers' queues
//!  worker ──► "" ──► reply_to (RPC replies)
//!  worker ──► <prefix>.deferred.<ms> (quorum, message TTL) ──expired──► <prefix>.requeue (headers)
//!                 ──kiln-queue header──► the request queue the request came from
//!                 ──no such queue (alternate exchange <prefix>.requeue.fallback)──► <prefix>.requests
//!  producer ──► <prefix>.cancel (fanout) ──► one exclusive, server-named queue per worker connection
//! ```
//!
//! Deferred requests wait in one of the delay queues, each with a fixed TTL (1 s, 2 s, 4 s, … 4096 s),
//! so every queue expires its messages in order; a request waits in the shortest one that covers
//! its delay, and a longer wait (a daily quota) takes several trips. On expiry the broker
//! dead-letters the copy to a headers exchange that routes it back by its `kiln-queue` header, so a
//! paid request deferred from its tier's queue goes back to that queue, not behind the free backlog.
//!
//! Cancels go to every worker: each connection binds a queue of its own to the fanout exchange
//! `<prefix>.cancel` ([`crate::amqp::cancel`]); the queue lives and dies with the connection.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::settings::TopologySettings;

/// A queue the worker consumes requests from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestQueue {
    /// Queue name.
    pub name: String,
    /// The tier it carries; `None` for the shared `<prefix>.requests` (the default tier's).
    pub tier: Option<String>,
}

/// Header on a deferred copy naming the request queue it returns to.
pub const RETURN_QUEUE_HEADER: &str = "kiln-queue";

/// The names of everything kiln declares.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Durable quorum queue of requests (any tier).
    pub requests: String,
    /// The prefix every name starts with.
    pub prefix: String,
    /// Every request queue: `requests` first, then one per tier (when `scheduling.tier_queues`).
    pub request_queues: Vec<RequestQueue>,
    /// Headers exchange that expired delay-queue copies go back through.
    pub requeue_exchange: String,
    /// Fanout exchange behind it for copies whose queue is gone; bound to `requests`.
    pub requeue_fallback: String,
    /// Topic exchange for replies to requests without `reply_to`.
    pub results: String,
    /// Fanout exchange that dead letters go to.
    pub dead_letter_exchange: String,
    /// Durable queue holding dead letters.
    pub dead_letter_queue: String,
    /// Fanout exchange producers publish cancels to; every worker binds a queue of its own.
    pub cancel_exchange: String,
    /// Deliveries before the broker dead-letters a request.
    pub delivery_limit: u32,
    /// Delay queues, by their TTL in milliseconds (ascending).
    pub delay_queues: Vec<(u64, String)>,
}

/// The fanout exchange cancels go to, for a topology prefix: `<prefix>.cancel`.
pub fn cancel_exchange(prefix: &str) -> String {
    format!("{prefix}.cancel")
}

/// TTLs of the delay queues: 1 s doubling up to 4096 s (68 min).
const DELAY_BUCKETS_MS: [u64; 13] = [
    1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 1_024_000, 2_048_000, 4_096_000,
];

impl Topology {
    /// Names derived from the configured prefix, with a request queue per tier.
    pub fn with_tiers<'a>(settings: &TopologySettings, tiers: impl IntoIterator<Item = &'a str>) -> Self {
        let mut topology = Self::new(settings);
        for tier in tiers {
            topology.request_queues.push(RequestQueue {
                name: topology.tier_queue(tier),
                tier: Some(tier.to_owned()),
            });
        }
        topology
    }

    /// The request queue of a tier: `<prefix>.requests.<tier>`.
    pub fn tier_queue(&self, tier: &str) -> String {
        format!("{}.{tier}", self.requests)
    }

    /// Names derived from the configured prefix, with the shared request queue only.
    pub fn new(settings: &TopologySettings) -> Self {
        let p = &settings.prefix;
        let requests = format!("{p}.requests");
        Self {
            prefix: p.clone(),
            request_queues: vec![RequestQueue {
                name: requests.clone(),
                tier: None,
            }],
            requeue_exchange: format!("{p}.requeue"),
            requeue_fallback: format!("{p}.requeue.fallback"),
            requests,
            results: format!("{p}.results"),
            dead_letter_exchange: format!("{p}.dlx"),
            dead_letter_queue: format!("{p}.dead-letter"),
            cancel_exchange: cancel_exchange(p),
            delivery_limit: settings.delivery_limit,
            delay_queues: DELAY_BUCKETS_MS
                .iter()
                .map(|ms| (*ms, format!("{p}.deferred.{ms}")))
                .collect(),
        }
    }

    /// The topology prefix of a request queue's name (`<prefix>.requests` or
    /// `<prefix>.requests.<tier>`), or `None` for a name of another shape.
    pub fn prefix_of_request_queue(queue: &str) -> Option<&str> {
        if let Some(prefix) = queue.strip_suffix(".requests") {
            return Some(prefix).filter(|p| !p.is_empty());
        }
        let (prefix, tier) = queue.rsplit_once(".requests.")?;
        Some(prefix).filter(|p| !p.is_empty() && !tier.is_empty() && !tier.contains('.'))
    }

    /// Declare the cancel exchange `name` (durable fanout), as workers do. Idempotent: producers
    /// may call it before publishing, so a publish never meets a missing exchange (which would
    /// close their channel).
    pub async fn declare_cancel_exchange(channel: &Channel, name: &str) -> lapin::Result<()> {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// The delay queue for a wait of `delay_ms`: the shortest that covers it (or the longest), and
    /// its TTL.
    pub fn delay_queue_for(&self, delay_ms: u64) -> (&str, u64) {
        let (ms, name) = self
            .delay_queues
            .iter()
            .find(|(ms, _)| *ms >= delay_ms)
            .unwrap_or_else(|| self.delay_queues.last().expect("there are delay queues"));
        (name, *ms)
    }

    /// The request queue's arguments. Producers that declare the queue themselves must use the
    /// same ones, or the broker refuses the second declaration.
    pub fn request_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
        // A quorum queue counts deliveries itself; after the limit it dead-letters the message
        // (x-death reason "delivery_limit") instead of handing it to yet another worker to crash.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit.saturating_sub(1) as i32),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dead_letter_exchange.as_str())),
        );
        args
    }

    /// Declare everything. Safe to run from every worker, every start.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.results.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        // Quorum, like the request queues: a classic queue lives on one node, and with that node
        // down no worker could declare the topology on another.
        channel
            .queue_declare(self.dead_letter_queue.as_str().into(), durable_queue, quorum())
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Expired deferred copies come back through a headers exchange, by their kiln-queue header;
        // one naming no queue (a tier since removed) falls back to the shared queue, never dropped.
        channel
            .exchange_declare(
                self.requeue_fallback.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        let mut requeue_args = FieldTable::default();
        requeue_args.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(LongString::from(self.requeue_fallback.as_str())),
        );
        channel
            .exchange_declare(
                self.requeue_exchange.as_str().into(),
                ExchangeKind::Headers,
                durable_exchange,
                requeue_args,
            )
            .await?;
        for queue in &self.request_queues {
            channel
                .queue_declare(
                    queue.name.as_str().into(),
                    durable_queue,
                    self.request_queue_arguments(),
                )
                .await?;
            let mut match_args = FieldTable::default();
            match_args.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
            match_args.insert(
                RETURN_QUEUE_HEADER.into(),
                AMQPValue::LongString(LongString::from(queue.name.as_str())),
            );
            channel
                .queue_bind(
                    queue.name.as_str().into(),
                    self.requeue_exchange.as_str().into(),
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    match_args,
                )
                .await?;
        }
        channel
            .queue_bind(
                self.requests.as_str().into(),
                self.requeue_fallback.as_str().into(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for (ms, name) in &self.delay_queues {
            let mut args = quorum();
            // Expired copies are dead-lettered at least once (never dropped on a node's failure),
            // which quorum queues do only with publishers refused when full rather than messages
            // dropped.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString(LongString::from("at-least-once")),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(*ms as i64));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(self.requeue_exchange.as_str())),
            );
            channel.queue_declare(name.as_str().into(), durable_queue, args).await?;
        }
        Self::declare_cancel_exchange(channel, &self.cancel_exchange).await?;
        Ok(())
    }
}

/// The arguments of a quorum queue (replicated across a cluster's nodes).
fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    args
}

impl Topology {
    /// Delete every queue and exchange [`Topology::declare`] declares, with whatever they hold
    /// (tests and benchmarks clean up with it). Best effort: what is already gone is skipped.
    pub async fn delete(&self, channel: &Channel) {
        let queues = self
            .request_queues
            .iter()
            .map(|q| &q.name)
            .chain(self.delay_queues.iter().map(|(_, name)| name))
            .chain([&self.dead_letter_queue]);
        for queue in queues {
            let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
        }
        for exchange in [
            &self.results,
            &self.dead_letter_exchange,
            &self.requeue_exchange,
            &self.requeue_fallback,
            &self.cancel_exchange,
        ] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_goes_to_the_shortest_queue_that_covers_it() {
        let t = Topology::new(&TopologySettings::default());
        assert_eq!(t.delay_queue_for(0), ("kiln.deferred.1000", 1_000));
        assert_eq!(t.delay_queue_for(1_500), ("kiln.deferred.2000", 2_000));
        assert_eq!(t.delay_queue_for(2_000), ("kiln.deferred.2000", 2_000));
        assert_eq!(t.delay_queue_for(86_400_000), ("kiln.deferred.4096000", 4_096_000));
    }

    #[test]
    fn the_prefix_comes_back_from_a_request_queue_name() {
        let t = Topology::with_tiers(&TopologySettings::default(), ["pro"]);
        assert_eq!(t.cancel_exchange, "kiln.cancel");
        for queue in &t.request_queues {
            assert_eq!(Topology::prefix_of_request_queue(&queue.name), Some("kiln"));
        }
        assert_eq!(
            Topology::prefix_of_request_queue("kiln-test-1.requests.free"),
            Some("kiln-test-1")
        );
        assert_eq!(Topology::prefix_of_request_queue("a.b.requests"), Some("a.b"));
        for other in ["requests", ".requests", "kiln.jobs", "kiln.requests.", "kiln.requestsx"] {
            assert_eq!(Topology::prefix_of_request_queue(other), None, "{other}");
        }
    }

    #[test]
    fn every_tier_has_its_queue_after_the_shared_one() {
        let t = Topology::with_tiers(&TopologySettings::default(), ["free", "pro"]);
        let names: Vec<_> = t
            .request_queues
            .iter()
            .map(|q| (q.name.as_str(), q.tier.as_deref()))
            .collect();
        assert_eq!(
            names,
            [
                ("kiln.requests", None),
                ("kiln.requests.free", Some("free")),
                ("kiln.requests.pro", Some("pro"))
            ]
        );
    }
}
