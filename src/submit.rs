//! The producer client: send requests and read their replies (`kiln submit`, `kiln bench`, tests,
//! benchmarks).
//!
//! A [`Producer`] owns an exclusive, server-named reply queue. Each request carries `reply_to` (that
//! queue) and `correlation_id` (the request id), and is published with publisher confirms and
//! `mandatory`, so a missing request queue is an error here rather than a silent drop.
//!
//! One task can send and wait in turn ([`Producer::request`], [`Producer::request_many`]), or a
//! producer can be [split](Producer::split) into a [`Sender`] that any number of tasks clone and a
//! [`Replies`] stream that one reader task owns (`kiln bench`).
//!
//! [`Producer::cancel`] asks every worker to stop a request (`kiln cancel`): a cancel message on
//! the fanout exchange `<prefix>.cancel`, the prefix taken from the request queue's name.
//!
//! A producer given a key ([`Producer::sign_with`]) signs every request it publishes: a
//! `kiln-signature` header over the body, the queue, `reply_to` and `correlation_id`
//! ([`crate::auth::signature`]; docs/contract.md, *Signed requests*).

use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use secrecy::ExposeSecret;

use crate::amqp::connect::Broker;
use crate::amqp::publisher::REPLY_HEADER;
use crate::amqp::topology::{cancel_exchange, Topology};
use crate::auth::{Covered, Signer};
use crate::domain::cancel::CANCEL_TYPE;
use crate::domain::{Cancel, CancelDocument, ReplyDocument, RequestDocument, WireImage, WireParams, CONTRACT_VERSION};

/// A reply as a producer receives it.
#[derive(Debug)]
pub struct Reply {
    /// The `kiln-reply` document.
    pub document: ReplyDocument,
    /// The PNG on success; the document again on error.
    pub body: Vec<u8>,
    /// The reply's correlation id.
    pub correlation_id: Option<String>,
    /// The reply's `message_id`: `final:<request_id>` on every copy of a final reply (drop one
    /// already seen), a fresh one on notices.
    pub message_id: Option<String>,
    /// All of the reply's headers (`kiln-reply`, `kiln-status`, `x-ratelimit-*`, `retry-after`).
    pub headers: FieldTable,
    /// When this producer received it.
    pub received_at: std::time::Instant,
}

/// A new request document for `user_id`: a fresh request id, created now, no deadline, no tier.
/// `image` is the photo (style models, `image_to_image`, `edit`); `None` for `text_to_image`.
pub fn new_request(user_id: &str, model: &str, params: WireParams, image: Option<&[u8]>) -> RequestDocument {
    RequestDocument {
        version: CONTRACT_VERSION,
        request_id: uuid::Uuid::new_v4().to_string(),
        user_id: user_id.to_owned(),
        model: model.to_owned(),
        params,
        image: image.map(WireImage::from_bytes),
        deadline: None,
        created_at: Some(rfc3339(time::OffsetDateTime::now_utc())),
        tier: None,
        progress: false,
    }
}

/// A time as the contract writes it (RFC 3339).
pub fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formats any UTC time")
}

/// Sends requests and receives their replies on a private queue.
pub struct Producer {
    connection: Connection,
    sender: Sender,
    replies: Replies,
}

/// The publishing half of a [`Producer`]: cheap to clone, usable from many tasks at once.
#[derive(Clone)]
pub struct Sender {
    channel: Channel,
    reply_queue: String,
    requests_queue: String,
    /// `<prefix>.cancel`, when the request queue's name has a kiln prefix.
    cancel_exchange: Option<String>,
    /// Signs each request, when set.
    signer: Option<Signer>,
}

/// The receiving half of a [`Producer`]: every reply to its requests, in arrival order.
pub struct Replies {
    consumer: Consumer,
}

/// What closes a [split](Producer::split) producer once its reader is done.
pub struct Closer {
    connection: Connection,
    channel: Channel,
    consumer_tag: ShortString,
}

impl Producer {
    /// Connect, and declare a private reply queue. Requests go to `requests_queue`. `broker` is a
    /// [`Broker`] (`Broker::new(&settings.amqp)`, with its TLS files) or a URL alone.
    pub async fn connect(broker: impl Into<Broker>, requests_queue: &str) -> anyhow::Result<Self> {
        Self::connect_as("kiln producer", broker, requests_queue).await
    }

    /// [`Producer::connect`], with the connection named `name` on the broker.
    pub async fn connect_as(name: &str, broker: impl Into<Broker>, requests_queue: &str) -> anyhow::Result<Self> {
        let broker = broker.into();
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let (connection, _) = crate::amqp::connect::connect_any(&broker, &properties, None)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to {}",
                    crate::amqp::connect::redact(broker.url().expose_secret())
                )
            })?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let (reply_queue, consumer) = crate::amqp::private_reply_queue(&channel).await?;
        Ok(Self {
            connection,
            sender: Sender {
                channel,
                reply_queue,
                requests_queue: requests_queue.to_owned(),
                cancel_exchange: Topology::prefix_of_request_queue(requests_queue).map(cancel_exchange),
                signer: None,
            },
            replies: Replies { consumer },
        })
    }

    /// The publishing half.
    pub fn sender(&self) -> &Sender {
        &self.sender
    }

    /// Sign every request from now on with `signer` (a key the workers hold).
    pub fn sign_with(&mut self, signer: Signer) {
        self.sender.signer = Some(signer);
    }

    /// Publish a request (persistent, confirmed); its reply comes back to this producer.
    pub async fn send(&self, request: &RequestDocument) -> anyhow::Result<()> {
        self.sender.send(request).await
    }

    /// See [`Sender::send_raw`].
    pub async fn send_raw(&self, body: &[u8], correlation_id: &str) -> anyhow::Result<()> {
        self.sender.send_raw(body, correlation_id).await
    }

    /// Ask every worker to stop the request `request_id`; see [`Sender::cancel`].
    pub async fn cancel(&self, request_id: &str, reason: Option<&str>) -> anyhow::Result<bool> {
        self.sender.cancel(request_id, reason).await
    }

    /// The next reply, whichever request it answers.
    pub async fn next_reply(&mut self, timeout: Duration) -> anyhow::Result<Reply> {
        self.replies.next(timeout).await
    }

    /// Send a request and wait for its reply (replies to other requests are skipped).
    pub async fn request(&mut self, request: &RequestDocument, timeout: Duration) -> anyhow::Result<Reply> {
        self.send(request).await?;
        self.reply_to(&request.request_id, timeout).await
    }

    /// [`Producer::request`], handing each notice (`deferred`, `progress`) to `on_notice` on the way.
    pub async fn request_with(
        &mut self,
        request: &RequestDocument,
        timeout: Duration,
        on_notice: impl FnMut(&ReplyDocument),
    ) -> anyhow::Result<Reply> {
        self.send(request).await?;
        self.reply_to_with(&request.request_id, timeout, on_notice).await
    }

    /// Send several requests at once and wait for every final reply; replies come back in the order
    /// of `requests`, whatever order they arrived in.
    pub async fn request_many(
        &mut self,
        requests: &[RequestDocument],
        timeout: Duration,
    ) -> anyhow::Result<Vec<Reply>> {
        for request in requests {
            self.send(request).await?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut replies: std::collections::HashMap<String, Reply> = std::collections::HashMap::new();
        while replies.len() < requests.len() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = self.next_reply(left).await?;
            if !reply.document.is_final() {
                continue;
            }
            if let Some(id) = reply.correlation_id.clone() {
                replies.insert(id, reply);
            }
        }
        requests
            .iter()
            .map(|r| replies.remove(&r.request_id).context("a reply for every request"))
            .collect()
    }

    /// Wait for the final reply with this correlation id, skipping replies to other requests and
    /// notices that are not final (`deferred`, `progress`, or a status this client does not know;
    /// logged).
    pub async fn reply_to(&mut self, correlation_id: &str, timeout: Duration) -> anyhow::Result<Reply> {
        self.reply_to_with(correlation_id, timeout, log_notice).await
    }

    /// [`Producer::reply_to`], handing every notice for this request (not final) to `on_notice` on
    /// the way: `kiln submit --progress` prints the steps.
    pub async fn reply_to_with(
        &mut self,
        correlation_id: &str,
        timeout: Duration,
        mut on_notice: impl FnMut(&ReplyDocument),
    ) -> anyhow::Result<Reply> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = self.next_reply(left).await?;
            if reply.correlation_id.as_deref() != Some(correlation_id) {
                continue;
            }
            if !reply.document.is_final() {
                on_notice(&reply.document);
                continue;
            }
            return Ok(reply);
        }
    }

    /// The two halves, for senders and a reader on tasks of their own, and what closes them after.
    pub fn split(self) -> (Sender, Replies, Closer) {
        let closer = Closer {
            connection: self.connection,
            channel: self.sender.channel.clone(),
            consumer_tag: self.replies.consumer.tag(),
        };
        (self.sender, self.replies, closer)
    }

    /// Close the connection (the reply queue goes with it).
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// What [`Producer::reply_to`] does with a notice: a line in the log.
fn log_notice(notice: &ReplyDocument) {
    match (&notice.deferred, &notice.progress) {
        (Some(deferral), _) => {
            tracing::info!(reason = %deferral.reason, retry_after_ms = deferral.retry_after_ms, "request deferred; waiting")
        }
        (None, Some(progress)) => {
            tracing::debug!(
                step = progress.step,
                steps = progress.steps,
                "request in progress; waiting"
            )
        }
        (None, None) => tracing::info!(status = notice.status.as_str(), "a notice that is not final; waiting"),
    }
}

impl Sender {
    /// Publish a request to the producer's request queue (persistent, confirmed).
    pub async fn send(&self, request: &RequestDocument) -> anyhow::Result<()> {
        self.send_raw(&serde_json::to_vec(request)?, &request.request_id).await
    }

    /// Publish a request to another queue (a tier's), like [`Sender::send`].
    pub async fn send_to(&self, queue: &str, request: &RequestDocument) -> anyhow::Result<()> {
        self.publish(queue, &serde_json::to_vec(request)?, &request.request_id)
            .await
    }

    /// Publish any body as a request (for producers with their own encoder, and for tests of what
    /// workers do with bad input), with `correlation_id` to match its reply.
    pub async fn send_raw(&self, body: &[u8], correlation_id: &str) -> anyhow::Result<()> {
        self.publish(&self.requests_queue, body, correlation_id).await
    }

    /// Ask every worker to stop the request `request_id` (any producer's): a cancel message on
    /// `<prefix>.cancel`, the prefix of this producer's request queue. Returns whether at least
    /// one worker was listening (the message reached a queue); `false` means no worker heard it.
    /// A worker holding the request stops it and answers it `cancelled`; the others remember the
    /// id for `cancel.remember_secs` and stop the request if it reaches them (docs/contract.md,
    /// "Cancelling a request"). An id that is not a valid request id is an error here.
    pub async fn cancel(&self, request_id: &str, reason: Option<&str>) -> anyhow::Result<bool> {
        let exchange = self.cancel_exchange.as_deref().with_context(|| {
            format!(
                "{:?} is not a kiln request queue name (<prefix>.requests[.<tier>]): use cancel_on",
                self.requests_queue
            )
        })?;
        self.cancel_on(exchange, request_id, reason).await
    }

    /// [`Sender::cancel`] on the cancel exchange `exchange`.
    pub async fn cancel_on(&self, exchange: &str, request_id: &str, reason: Option<&str>) -> anyhow::Result<bool> {
        let body = serde_json::to_vec(&CancelDocument::new(request_id, reason))?;
        // What a worker would drop is refused here, where someone can see why.
        Cancel::parse(&body).map_err(|e| anyhow::anyhow!("not a valid cancel: {}", e.message))?;
        // A publish to a missing exchange would close this channel: declare it (idempotent).
        Topology::declare_cancel_exchange(&self.channel, exchange).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        // Transient: the workers' queues are not durable either; a cancel only matters to
        // workers running now.
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(1)
            .with_type(CANCEL_TYPE.into())
            .with_timestamp(now);
        let confirmation = self
            .channel
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(true),
            // Returned: no queue is bound, so no worker is listening.
            Confirmation::Ack(Some(_)) => Ok(false),
            Confirmation::Nack(_) => bail!("the broker refused the cancel"),
        }
    }

    /// The channel it publishes on (to declare a topology on, say).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The private queue its replies come to (each request's `reply_to`).
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    async fn publish(&self, queue: &str, body: &[u8], correlation_id: &str) -> anyhow::Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(self.reply_queue.as_str().into())
            .with_correlation_id(correlation_id.into())
            .with_timestamp(now.as_secs());
        if let Some(signer) = &self.signer {
            let covered = Covered {
                queue,
                reply_to: &self.reply_queue,
                correlation_id,
                body,
            };
            let signature = signer.sign(i64::try_from(now.as_millis())?, &covered)?;
            let mut headers = FieldTable::default();
            headers.insert(
                crate::auth::HEADER.into(),
                AMQPValue::LongString(signature.value().into()),
            );
            properties = properties.with_headers(headers);
        }
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => {
                bail!("no queue named {queue:?}: is a worker running with this topology prefix?")
            }
            Confirmation::Nack(_) => bail!("the broker refused the request"),
        }
    }
}

impl Replies {
    /// The next reply, or `None` once the consumer has ended (the producer closed). An `Err` is a
    /// failed consumer or a delivery that is not a kiln reply.
    pub async fn recv(&mut self) -> Option<anyhow::Result<Reply>> {
        let delivery = match self.consumer.next().await? {
            Ok(delivery) => delivery,
            Err(e) => return Some(Err(e.into())),
        };
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let document = match headers.inner().get(REPLY_HEADER) {
            None => Err(anyhow::anyhow!("a reply without the kiln-reply header")),
            Some(AMQPValue::LongString(json)) => {
                serde_json::from_slice(json.as_bytes()).context("the kiln-reply header is not a reply document")
            }
            Some(_) => Err(anyhow::anyhow!("the kiln-reply header is not a string")),
        };
        Some(document.map(|document| Reply {
            document,
            body: delivery.data,
            correlation_id: delivery.properties.correlation_id().as_ref().map(ToString::to_string),
            message_id: delivery.properties.message_id().as_ref().map(ToString::to_string),
            headers,
            received_at: std::time::Instant::now(),
        }))
    }

    /// The next reply, whichever request it answers, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Reply> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no reply within {timeout:?}"))?
            .context("the reply consumer ended")?
    }
}

impl Closer {
    /// Cancel the reply consumer and give `reader` (the task reading [`Replies`]) 5 s to see the
    /// stream end, then close the channel, then the connection: each closed under an open child
    /// races the child's own close (lapin logs it).
    pub async fn close(self, mut reader: tokio::task::JoinHandle<()>) {
        let _ = self
            .channel
            .basic_cancel(self.consumer_tag, BasicCancelOptions::default())
            .await;
        if tokio::time::timeout(Duration::from_secs(5), &mut reader).await.is_err() {
            reader.abort();
        }
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}
