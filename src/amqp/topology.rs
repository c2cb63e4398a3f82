//! The queues and exchanges kiln uses, declared idempotently by every worker at startup.
//!
//! ```text
//!  producer ──► "" ──► <prefix>.requests (quorum, delivery limit) ──► worker
//!                            │ rejected / over the delivery limit
//!                            ▼
//!                      <prefix>.dlx (fanout) ──► <prefix>.dead-letter
//!  worker ──► <prefix>.results (topic, key = request_id) ──► producers' queues
//!  worker ──► "" ──► reply_to (RPC replies)
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::configuration::TopologySettings;

/// The names of everything kiln declares.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Durable quorum queue of requests.
    pub requests: String,
    /// Topic exchange for replies to requests without `reply_to`.
    pub results: String,
    /// Fanout exchange that dead letters go to.
    pub dead_letter_exchange: String,
    /// Durable queue holding dead letters.
    pub dead_letter_queue: String,
    /// Deliveries before the broker dead-letters a request.
    pub delivery_limit: u32,
}

impl Topology {
    /// Names derived from the configured prefix.
    pub fn new(settings: &TopologySettings) -> Self {
        let p = &settings.prefix;
        Self {
            requests: format!("{p}.requests"),
            results: format!("{p}.results"),
            dead_letter_exchange: format!("{p}.dlx"),
            dead_letter_queue: format!("{p}.dead-letter"),
            delivery_limit: settings.delivery_limit,
        }
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
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                durable_queue,
                FieldTable::default(),
            )
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
        channel
            .queue_declare(
                self.requests.as_str().into(),
                durable_queue,
                self.request_queue_arguments(),
            )
            .await?;
        Ok(())
    }
}
