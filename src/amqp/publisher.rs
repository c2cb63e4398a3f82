//! Publishing replies with publisher confirms: a reply counts as sent only when the broker says so.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use lapin::message::Delivery;

use super::topology::RETURN_QUEUE_HEADER;
use crate::domain::{ReplyDocument, ReplyStatus};

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
    /// The AMQP `message_id`: `final:<request_id>` for a final reply (the same on every copy of
    /// it, so a producer can drop a second one); `None`: a fresh one.
    pub message_id: Option<String>,
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
/// The header that carries the document's `status` (`ok`, `error`, `deferred`, `progress`).
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

    /// Close the channel (after the last reply). A dropped channel closes itself in the background,
    /// and if the connection is closed meanwhile lapin logs that race as a connection error.
    pub async fn close(&self) {
        let _ = self.channel.close(200, "worker stopping".into()).await;
    }

    /// Publish a reply (persistent, mandatory) and wait for the broker's confirm.
    pub async fn publish(&self, reply: OutgoingReply) -> lapin::Result<PublishOutcome> {
        let doc = &reply.document;
        let mut headers = FieldTable::default();
        let json = serde_json::to_string(doc).expect("a reply document always serialises");
        headers.insert(REPLY_HEADER.into(), long_string(json));
        headers.insert(STATUS_HEADER.into(), long_string(doc.status.as_str()));
        if let Some(trace) = crate::trace_context::current() {
            trace.write_headers(&mut headers);
        }
        if let Some(limit) = &doc.rate_limit {
            // The HTTP conventions, in seconds (rounded up), for producers that know them.
            headers.insert("x-ratelimit-limit".into(), AMQPValue::LongLongInt(limit.limit as i64));
            headers.insert(
                "x-ratelimit-remaining".into(),
                AMQPValue::LongLongInt(limit.remaining as i64),
            );
            headers.insert(
                "x-ratelimit-reset".into(),
                AMQPValue::LongLongInt(limit.reset_ms.div_ceil(1000) as i64),
            );
            if limit.retry_after_ms > 0 {
                headers.insert(
                    "retry-after".into(),
                    AMQPValue::LongLongInt(limit.retry_after_ms.div_ceil(1000) as i64),
                );
            }
        }
        let content_type = match doc.status {
            ReplyStatus::Ok => "image/png",
            ReplyStatus::Error | ReplyStatus::Deferred | ReplyStatus::Progress => "application/json",
        };
        let properties = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_delivery_mode(2)
            .with_correlation_id(reply.correlation_id.as_str().into())
            .with_message_id(
                reply
                    .message_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
                    .into(),
            )
            .with_type(REPLY_TYPE.into())
            .with_timestamp(unix_seconds())
            .with_headers(headers);
        let (exchange, routing_key) = match &reply.route {
            ReplyRoute::ReplyTo(queue) => ("", queue.as_str()),
            ReplyRoute::Results(key) => (self.results_exchange.as_str(), key.as_str()),
        };
        self.confirmed_publish(exchange, routing_key, &reply.body, properties)
            .await
    }

    /// Put a copy of a request in a delay queue (body and properties unchanged, the deferral count
    /// in the `x-kiln-deferrals` header, the queue it returns to in `kiln-queue`, and `signature`,
    /// when given, as its new `kiln-signature`), confirmed. The original may be acked once this returns
    /// [`PublishOutcome::Confirmed`].
    pub async fn defer(
        &self,
        request: &Delivery,
        delay_queue: &str,
        count: u32,
        return_queue: &str,
        signature: Option<String>,
    ) -> lapin::Result<PublishOutcome> {
        let original = &request.properties;
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(DEFERRALS_HEADER.into(), AMQPValue::LongUInt(count));
        if let Some(signature) = signature {
            headers.insert(crate::auth::HEADER.into(), long_string(signature));
        }
        // Where the broker sends it back when its wait is over (see `amqp::topology`).
        headers.insert(RETURN_QUEUE_HEADER.into(), long_string(return_queue));
        // A fresh set of properties: not the producer's `expiration` (the copy would leave the
        // delay queue early) nor its `user_id` (the broker checks it against this connection).
        let mut properties = BasicProperties::default().with_headers(headers).with_delivery_mode(2);
        if let Some(v) = original.content_type() {
            properties = properties.with_content_type(v.clone());
        }
        if let Some(v) = original.content_encoding() {
            properties = properties.with_content_encoding(v.clone());
        }
        if let Some(v) = original.priority() {
            properties = properties.with_priority(*v);
        }
        if let Some(v) = original.correlation_id() {
            properties = properties.with_correlation_id(v.clone());
        }
        if let Some(v) = original.reply_to() {
            properties = properties.with_reply_to(v.clone());
        }
        if let Some(v) = original.message_id() {
            properties = properties.with_message_id(v.clone());
        }
        if let Some(v) = original.timestamp() {
            properties = properties.with_timestamp(*v);
        }
        if let Some(v) = original.kind() {
            properties = properties.with_type(v.clone());
        }
        if let Some(v) = original.app_id() {
            properties = properties.with_app_id(v.clone());
        }
        self.confirmed_publish("", delay_queue, &request.data, properties).await
    }

    async fn confirmed_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<PublishOutcome> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirmation = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                options,
                body,
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

/// How many times a request was deferred (a header on the request).
pub const DEFERRALS_HEADER: &str = "x-kiln-deferrals";

/// The deferral count a request carries (0 if never deferred).
pub fn deferrals(request: &Delivery) -> u32 {
    let headers = request.properties.headers().as_ref();
    match headers.and_then(|h| h.inner().get(DEFERRALS_HEADER)) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, i64::from(u32::MAX)) as u32,
        _ => 0,
    }
}

fn long_string(s: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.into()))
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
