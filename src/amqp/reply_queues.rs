//! Whether a request's `reply_to` queue still exists: a producer that gave up (its process ended,
//! its exclusive reply queue went with it) should not cost a device run, a charge and a trip
//! through the delay queues for an answer nobody can receive.
//!
//! AMQP 0-9-1 has one way to ask: a passive `queue.declare`, which the broker answers by closing
//! the channel when the queue does not exist (404). So the probes run on a channel of their own,
//! opened again after each 404, and answers are cached per queue name: a queue that exists for
//! [`EXISTS_TTL`], one that is gone for [`GONE_TTL`] (server-named reply queues never come back).
//! A request coming back from a delay queue asks afresh: its producer had time to leave.
//! Anything but a clear 404 counts as "exists": a request is never dropped on a doubt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Mutex;

/// How long "this queue exists" is believed.
pub const EXISTS_TTL: Duration = Duration::from_secs(5);
/// How long "this queue is gone" is believed.
pub const GONE_TTL: Duration = Duration::from_secs(60);
/// Most queue names remembered; the cache is emptied when it grows past this.
const CACHE_LIMIT: usize = 10_000;

/// RabbitMQ's direct reply-to: a pseudo-queue that passive declares cannot see.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Checks `reply_to` queues on one connection. Cheap to clone.
#[derive(Clone)]
pub struct ReplyQueues {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Arc<Connection>,
    probe: Mutex<Option<Channel>>,
    cache: std::sync::Mutex<HashMap<String, (bool, Instant)>>,
}

impl ReplyQueues {
    /// Probes on `connection` (a channel of their own, opened on first use).
    pub fn new(connection: Arc<Connection>) -> Self {
        Self {
            inner: Arc::new(Inner {
                connection,
                probe: Mutex::new(None),
                cache: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether `queue` is known to be gone (cached; one passive declare when not). `fresh`: do
    /// not trust a cached "exists" (a request back from a delay queue).
    pub async fn gone(&self, queue: &str, fresh: bool) -> bool {
        self.gone_within(queue, if fresh { Duration::ZERO } else { EXISTS_TTL })
            .await
    }

    /// [`ReplyQueues::gone`], trusting a cached "exists" only if it is younger than `max_age`.
    /// Concurrent asks for one queue share one probe: an answer that arrived while this one waited
    /// for the probe channel is taken as fresh.
    pub async fn gone_within(&self, queue: &str, max_age: Duration) -> bool {
        if queue.is_empty() || queue.starts_with(DIRECT_REPLY_TO) {
            return false;
        }
        let asked = Instant::now();
        let cached = |asked: Instant, max_age: Duration| {
            self.lock_cache().get(queue).and_then(|&(exists, at)| {
                let ttl = if exists { max_age.min(EXISTS_TTL) } else { GONE_TTL };
                (at >= asked || asked.duration_since(at) < ttl).then_some(!exists)
            })
        };
        if let Some(gone) = cached(asked, max_age) {
            return gone;
        }
        let mut probe = self.inner.probe.lock().await;
        // Another ask probed this queue while we waited: its answer is as fresh as ours would be.
        if let Some(gone) = cached(asked, max_age) {
            return gone;
        }
        let now = Instant::now();
        let exists = self.probe(&mut probe, queue).await;
        let mut cache = self.lock_cache();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(queue.to_owned(), (exists, now));
        !exists
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (bool, Instant)>> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A passive declare on the probe channel: `false` only for the broker's 404.
    async fn probe(&self, probe: &mut Option<Channel>, queue: &str) -> bool {
        let channel = match probe.as_ref().filter(|c| c.status().connected()) {
            Some(channel) => channel.clone(),
            None => match self.inner.connection.create_channel().await {
                Ok(channel) => probe.insert(channel).clone(),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open a channel to check reply queues");
                    return true;
                }
            },
        };
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
        {
            Ok(_) => true,
            Err(e) => {
                // The broker closed the channel either way; the next probe opens another.
                *probe = None;
                let not_found = is_not_found(&e);
                if !not_found {
                    tracing::debug!(error = %e, queue, "could not check a reply queue; assuming it exists");
                }
                !not_found
            }
        }
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}
