//! The producer side: send requests and wait for replies, RPC style (`kiln submit`, tests, benchmarks).
//!
//! A [`Producer`] owns an exclusive, server-named reply queue. Each request carries `reply_to` (that
//! queue) and `correlation_id` (the request id), and is published with publisher confirms and
//! `mandatory`, so a missing request queue is an error here rather than a silent drop.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use secrecy::{ExposeSecret, SecretString};

use crate::amqp::publisher::REPLY_HEADER;
use crate::domain::{ReplyDocument, RequestDocument, WireStyle};

/// A reply as a producer receives it.
#[derive(Debug)]
pub struct Reply {
    /// The `kiln-reply` document.
    pub document: ReplyDocument,
    /// The PNG on success; the document again on error.
    pub body: Vec<u8>,
    /// The reply's correlation id.
    pub correlation_id: Option<String>,
    /// All of the reply's headers (`kiln-reply`, `kiln-status`, `x-ratelimit-*`, `retry-after`).
    pub headers: FieldTable,
    /// When this producer received it.
    pub received_at: std::time::Instant,
}

/// Sends requests and receives their replies on a private queue.
pub struct Producer {
    connection: Connection,
    channel: Channel,
    replies: Consumer,
    reply_queue: String,
    requests_queue: String,
}

impl Producer {
    /// Connect, and declare a private reply queue. Requests go to `requests_queue`.
    pub async fn connect(url: &SecretString, requests_queue: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(
            url.expose_secret(),
            ConnectionProperties::default().with_connection_name("kiln producer".into()),
        )
        .await
        .with_context(|| {
            format!(
                "cannot connect to {}",
                crate::amqp::connect::redact(url.expose_secret())
            )
        })?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let (reply_queue, replies) = crate::amqp::private_reply_queue(&channel).await?;
        Ok(Self {
            connection,
            channel,
            replies,
            reply_queue,
            requests_queue: requests_queue.to_owned(),
        })
    }

    /// Publish a request (persistent, confirmed); its reply comes back to this producer.
    pub async fn send(&self, request: &RequestDocument) -> anyhow::Result<()> {
        self.send_raw(&serde_json::to_vec(request)?, &request.request_id).await
    }

    /// Publish any body as a request (for producers with their own encoder, and for tests of what
    /// workers do with bad input), with `correlation_id` to match its reply.
    pub async fn send_raw(&self, body: &[u8], correlation_id: &str) -> anyhow::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(self.reply_queue.as_str().into())
            .with_correlation_id(correlation_id.into())
            .with_timestamp(now);
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                self.requests_queue.as_str().into(),
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
            Confirmation::Ack(Some(_)) => bail!(
                "no queue named {:?}: is a worker running with this topology prefix?",
                self.requests_queue
            ),
            Confirmation::Nack(_) => bail!("the broker refused the request"),
        }
    }

    /// The next reply, whichever request it answers.
    pub async fn next_reply(&mut self, timeout: Duration) -> anyhow::Result<Reply> {
        let delivery = tokio::time::timeout(timeout, self.replies.next())
            .await
            .map_err(|_| anyhow::anyhow!("no reply within {timeout:?}"))?
            .context("the reply consumer ended")??;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let header = headers
            .inner()
            .get(REPLY_HEADER)
            .cloned()
            .context("a reply without the kiln-reply header")?;
        let AMQPValue::LongString(json) = header else {
            bail!("the kiln-reply header is not a string");
        };
        Ok(Reply {
            document: serde_json::from_slice(json.as_bytes())
                .context("the kiln-reply header is not a reply document")?,
            body: delivery.data,
            correlation_id: delivery.properties.correlation_id().as_ref().map(ToString::to_string),
            headers,
            received_at: std::time::Instant::now(),
        })
    }

    /// Send a request and wait for its reply (replies to other requests are skipped).
    pub async fn request(&mut self, request: &RequestDocument, timeout: Duration) -> anyhow::Result<Reply> {
        self.send(request).await?;
        self.reply_to(&request.request_id, timeout).await
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
    /// `deferred` notices (logged).
    pub async fn reply_to(&mut self, correlation_id: &str, timeout: Duration) -> anyhow::Result<Reply> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = self.next_reply(left).await?;
            if reply.correlation_id.as_deref() != Some(correlation_id) {
                continue;
            }
            if let Some(deferral) = reply.document.deferred.as_ref().filter(|_| !reply.document.is_final()) {
                tracing::info!(reason = %deferral.reason, retry_after_ms = deferral.retry_after_ms, "request deferred; waiting");
                continue;
            }
            return Ok(reply);
        }
    }

    /// Close the connection (the reply queue goes with it).
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Parse a style as the CLI takes it: `7`, or a blend `3:0.5,12:0.5`.
pub fn parse_style(spec: &str) -> anyhow::Result<WireStyle> {
    if let Ok(index) = spec.trim().parse::<i64>() {
        return Ok(WireStyle::Index(index));
    }
    let mut blend = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (index, weight) = part
            .split_once(':')
            .with_context(|| format!("bad style {spec:?}; use 7 or 3:0.5,12:0.5"))?;
        let index: u32 = index
            .trim()
            .parse()
            .with_context(|| format!("bad style index {index:?}"))?;
        let weight: f64 = weight
            .trim()
            .parse()
            .with_context(|| format!("bad style weight {weight:?}"))?;
        *blend.entry(index.to_string()).or_insert(0.0) += weight;
    }
    if blend.is_empty() {
        bail!("empty style {spec:?}");
    }
    Ok(WireStyle::Blend(blend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_from_the_command_line() {
        assert_eq!(parse_style("7").unwrap(), WireStyle::Index(7));
        let WireStyle::Blend(b) = parse_style("3:0.5, 12:0.25").unwrap() else {
            panic!()
        };
        assert_eq!(b.get("3"), Some(&0.5));
        assert_eq!(b.get("12"), Some(&0.25));
        assert!(parse_style("x").is_err());
        assert!(parse_style("3:x").is_err());
    }
}
