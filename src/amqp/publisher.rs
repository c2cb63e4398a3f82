//! Publishing replies with publisher confirms: a reply counts as sent only when the broker says so.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::domain::ReplyDocument;

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyRoute {
    /// RPC style: the request's `reply_to` queue, through the default exchange.
    ReplyTo(String),
    /// The results exchange, with this routing key (the request id).
    Results(String),
}

/// A reply ready to publish.
#[derive(Debug)]
pub struct OutgoingReply {
    /// Where it goes.
    pub route: ReplyRoute,
    /// Copied from the request (or its id), so RPC callers can match it.
    pub correlation_id: String,
    /// The reply document, for the `kiln-reply` header.
    pub document: ReplyDocument,
    /// The PNG (success) or the document again (error).
    pub body: Vec<u8>,
}

/// What the broker did with a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Stored and routed.
    Confirmed,
    /// Returned as unroutable: no queue is bound for it (or `reply_to` names no queue).
    Unroutable(String),
    /// The broker could not take it (nack).
    Nacked,
}

/// Publishes replies on a dedicated channel in confirm mode.
#[derive(Debug, Clone)]
pub struct ReplyPublisher {
    channel: Channel,
    results_exchange: String,
}

/// The header that carries the reply document.
pub const REPLY_HEADER: &str = "kiln-reply";
/// The header that carries `ok` or `error`.
pub const STATUS_HEADER: &str = "kiln-status";
/// The reply's AMQP `type` property.
pub const REPLY_TYPE: &str = "kiln.reply.v1";

impl ReplyPublisher {
    /// Open a channel in confirm mode on `connection`.
    pub async fn open(connection: &Connection, results_exchange: &str) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self {
            channel,
            results_exchange: results_exchange.to_owned(),
        })
    }

    /// Publish a reply (persistent, mandatory) and wait for the broker's confirm.
    pub async fn publish(&self, reply: OutgoingReply) -> lapin::Result<PublishOutcome> {
        let document = serde_json::to_string(&reply.document).expect("a reply document always serialises");
        let mut headers = FieldTable::default();
        headers.insert(REPLY_HEADER.into(), AMQPValue::LongString(LongString::from(document)));
        headers.insert(
            STATUS_HEADER.into(),
            AMQPValue::LongString(LongString::from(reply.document.status.as_str())),
        );
        let content_type = match reply.document.status {
            crate::domain::ReplyStatus::Ok => "image/png",
            crate::domain::ReplyStatus::Error => "application/json",
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let properties = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_delivery_mode(2)
            .with_correlation_id(reply.correlation_id.as_str().into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_type(REPLY_TYPE.into())
            .with_timestamp(now)
            .with_headers(headers);
        let (exchange, routing_key) = match &reply.route {
            ReplyRoute::ReplyTo(queue) => ("", queue.as_str()),
            ReplyRoute::Results(key) => (self.results_exchange.as_str(), key.as_str()),
        };
        let confirmation = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &reply.body,
                properties,
            )
            .await?
            .await?;
        Ok(match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => PublishOutcome::Confirmed,
            Confirmation::Ack(Some(returned)) => PublishOutcome::Unroutable(returned.reply_text.to_string()),
            Confirmation::Nack(_) => PublishOutcome::Nacked,
        })
    }
}
