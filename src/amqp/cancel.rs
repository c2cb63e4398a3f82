//! Hearing cancels: every worker connection binds a queue of its own to the fanout exchange
//! `<prefix>.cancel`, so every worker hears every cancel, and hands each request id to
//! [`Cancellations::cancel`] (which stops the request if this worker holds it, and remembers it
//! otherwise).
//!
//! The queue is server-named, exclusive and auto-delete: it lives exactly as long as the
//! connection, so a worker that is gone leaves nothing behind, and a session that reconnects
//! declares a new one ([`CancelListener::start`] is called once per session, next to the
//! request consumers). Cancels published while a worker is disconnected are lost to it: cancelling
//! is best-effort.
//!
//! Deliveries are consumed **without acknowledgements** (`no_ack`). A cancel is advisory and
//! idempotent, and handling it is an in-memory update that cannot fail in a way a redelivery
//! would fix; the queue is exclusive, so nobody else could take a message this worker did not
//! acknowledge, and on a lost connection the queue and whatever it holds are deleted anyway.
//! Acknowledging would cost a round trip per cancel and protect nothing.
//!
//! A message that is not a valid cancel (not JSON, wrong shape, bad request id) is logged and
//! dropped; the listener goes on. If the listener's channel fails while the connection lives, the
//! listener opens a new channel and queue on the same connection (after a pause), so it keeps
//! listening for as long as the session lives.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::task::JoinHandle;

use super::topology::Topology;
use crate::cancel::Cancellations;
use crate::domain::{Cancel, RequestError};

/// The first pause before a failed listener opens again; doubled on each failure in a row.
const REOPEN_FIRST: Duration = Duration::from_millis(500);
/// The longest pause between attempts to open again.
const REOPEN_MAX: Duration = Duration::from_secs(10);

/// A queue bound to the cancel exchange, being consumed.
pub struct CancelListener {
    channel: Channel,
    consumer: Consumer,
    queue: String,
}

impl CancelListener {
    /// On a channel of its own: declare the cancel exchange (idempotent), a server-named
    /// exclusive auto-delete queue, bind it, and consume it without acknowledgements.
    pub async fn open(connection: &Connection, exchange: &str, consumer_tag: &str) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        Topology::declare_cancel_exchange(&channel, exchange).await?;
        let declared = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue = declared.name().to_string();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                consumer_tag.into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            channel,
            consumer,
            queue,
        })
    }

    /// The server-named queue this listener consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Hand every cancel to `cancellations` on a task of its own, until [`Listening::stop`] or
    /// the connection closes; a failed channel is opened again on `connection` meanwhile.
    pub fn start(
        self,
        connection: Arc<Connection>,
        exchange: String,
        consumer_tag: String,
        cancellations: Cancellations,
    ) -> Listening {
        let current = Arc::new(std::sync::Mutex::new(self.channel.clone()));
        let channel = Arc::clone(&current);
        let task = tokio::spawn(async move {
            let mut listener = self;
            loop {
                listener.serve(&cancellations).await;
                // The consumer ended: the connection is going (the session ends too), or only
                // this channel failed; then listen again on a new one.
                if connection.status().connected() {
                    tracing::warn!(
                        queue = listener.queue(),
                        "the cancel listener's channel closed; listening on a new one"
                    );
                }
                let Some(reopened) = reopen(&connection, &exchange, &consumer_tag).await else {
                    return;
                };
                *channel.lock().expect("not poisoned") = reopened.channel.clone();
                listener = reopened;
            }
        });
        Listening { channel: current, task }
    }

    /// Until the consumer ends.
    async fn serve(&mut self, cancellations: &Cancellations) {
        while let Some(next) = self.consumer.next().await {
            match next {
                Ok(delivery) => {
                    let _ = handle_message(&delivery.data, cancellations);
                }
                Err(error) => {
                    tracing::debug!(%error, queue = %self.queue, "the cancel consumer failed");
                    return;
                }
            }
        }
    }
}

/// Open a listener again after a failure, pausing between attempts, for as long as the
/// connection is up; `None` once it is not.
async fn reopen(connection: &Connection, exchange: &str, consumer_tag: &str) -> Option<CancelListener> {
    let mut pause = REOPEN_FIRST;
    loop {
        if !connection.status().connected() {
            return None;
        }
        tokio::time::sleep(pause).await;
        if !connection.status().connected() {
            return None;
        }
        match CancelListener::open(connection, exchange, consumer_tag).await {
            Ok(listener) => {
                tracing::info!(queue = listener.queue(), "listening for cancels again");
                return Some(listener);
            }
            Err(error) => {
                tracing::warn!(%error, exchange, "cannot listen for cancels; trying again");
                pause = (pause * 2).min(REOPEN_MAX);
            }
        }
    }
}

/// A running listener, for the session to stop when it ends. Dropping it stops the task too.
pub struct Listening {
    channel: Arc<std::sync::Mutex<Channel>>,
    task: JoinHandle<()>,
}

impl Listening {
    /// Stop listening and close the channel (before the connection closes: a channel only
    /// dropped closes itself in the background and races the connection's close).
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let channel = self.channel.lock().expect("not poisoned").clone();
        let _ = channel.close(200, "worker stopping".into()).await;
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Act on one message from the cancel queue: parse it, cancel the request, log and count it.
/// Returns whether this worker held the request, or why the message was dropped (logged here).
pub fn handle_message(body: &[u8], cancellations: &Cancellations) -> Result<bool, RequestError> {
    match Cancel::parse(body) {
        Ok(cancel) => {
            let held = cancellations.cancel(cancel.request_id.as_str());
            crate::metrics::record_cancel_message(held);
            tracing::info!(
                request_id = %cancel.request_id,
                held,
                reason = cancel.reason.as_deref(),
                "cancel heard"
            );
            Ok(held)
        }
        Err(error) => {
            tracing::warn!(
                error = %error.message,
                code = %error.code,
                bytes = body.len(),
                "not a valid cancel message; dropped"
            );
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cancel::StopReason;
    use crate::domain::ErrorCode;

    #[test]
    fn a_cancel_stops_a_held_request_and_a_bad_one_changes_nothing() {
        let cancellations = Cancellations::new(Duration::from_secs(60));
        let held = cancellations.track("r-1");
        assert_eq!(
            handle_message(
                br#"{"version": 1, "request_id": "r-1", "reason": "gone"}"#,
                &cancellations
            ),
            Ok(true)
        );
        assert_eq!(held.flag().reason(), Some(StopReason::Cancelled));
        assert_eq!(
            handle_message(br#"{"version": 1, "request_id": "r-2"}"#, &cancellations),
            Ok(false)
        );
        assert!(cancellations.is_cancelled("r-2"));

        let refused = |body: &[u8]| handle_message(body, &cancellations).unwrap_err().code;
        assert_eq!(refused(b"r-3"), ErrorCode::MalformedRequest);
        assert_eq!(refused(br#"{"version": 1, "id": "r-3"}"#), ErrorCode::MalformedRequest);
        assert_eq!(
            refused(br#"{"version": 1, "request_id": "r 3"}"#),
            ErrorCode::InvalidRequest
        );
        assert!(!cancellations.is_cancelled("r-3"));
    }
}
