//! The drills' producer: a steady stream of requests published with publisher confirms, and a
//! tally of every reply that comes back.
//!
//! Unlike [`kiln::submit::Producer`], whose reply queue is exclusive (it dies with the producer's
//! connection, and with it every reply still to come), this producer survives a broker restart
//! the way a production producer must: its reply queue is a durable quorum queue of its own, it
//! reconnects, and a publish whose confirm never came is published again, the same body under the
//! same request id, until the broker confirms it (kiln makes that copy harmless: docs/contract.md,
//! *Exactly once*). Replies are acknowledged after they are counted, so none is lost to the
//! producer's own reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kiln::amqp::REPLY_HEADER;
use kiln::domain::{ReplyDocument, ReplyStatus, RequestDocument};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

/// How long the producer waits before trying the broker again.
const RECONNECT: Duration = Duration::from_millis(250);

/// A publish not confirmed within this is given up and published again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// What to send: `count` requests, one every `interval`, round robin over `queues`.
pub struct Plan {
    /// The producer's broker.
    pub url: String,
    /// Its durable reply queue (declared by [`Load::start`]).
    pub reply_queue: String,
    /// The request queues it publishes to, in turn.
    pub queues: Vec<String>,
    /// Requests in all.
    pub count: usize,
    /// Time between two publishes (`Duration::ZERO`: as fast as confirms come).
    pub interval: Duration,
    /// Requests (by number) published back to back, without waiting for their turn.
    pub burst: Option<std::ops::Range<usize>>,
    /// The `n`-th request (a fresh request id each).
    pub request: Box<dyn Fn(usize) -> RequestDocument + Send + Sync>,
}

/// One final reply (`ok` or `error`).
#[derive(Debug, Clone)]
pub struct Final {
    /// Its status.
    pub status: ReplyStatus,
    /// Its `message_id` (`final:<request_id>` on every copy of a final reply).
    pub message_id: Option<String>,
    /// The worker that sent it.
    pub worker_id: String,
    /// The error code of an `error`.
    pub error: Option<String>,
}

/// Everything the producer saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Request ids whose publish the broker confirmed, in order, with their user id.
    pub published: Vec<(String, String)>,
    /// Publishes that failed (no confirm: connection lost, timeout) and were made again.
    pub republished: usize,
    /// Final replies by request id.
    pub finals: HashMap<String, Vec<Final>>,
    /// Notices (`deferred`, `progress`): not final, not counted as answers.
    pub notices: usize,
    /// Replies the broker gave this producer's consumer again after its own reconnect (the same
    /// message, not a second reply from kiln).
    pub consumer_redeliveries: usize,
    /// Replies that were not kiln replies.
    pub malformed: usize,
    /// Whether every request has been published.
    pub done_publishing: bool,
}

impl Tally {
    /// Published requests with at least one final reply.
    pub fn answered(&self) -> usize {
        self.published
            .iter()
            .filter(|(id, _)| self.finals.contains_key(id))
            .count()
    }
}

/// A running load: the publisher and the reply reader, on tasks of their own.
pub struct Load {
    tally: Arc<Mutex<Tally>>,
    paused: Arc<AtomicBool>,
    publisher: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<()>,
    reply_queue: String,
    url: String,
}

impl Load {
    /// Declare the reply queue and start publishing.
    pub async fn start(plan: Plan) -> Self {
        let channel = connect(&plan.url).await.expect("the producer's broker answers").1;
        declare_reply_queue(&channel, &plan.reply_queue)
            .await
            .expect("the reply queue is declared");
        let _ = channel.close(200, "declared".into()).await;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let paused = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_replies(
            plan.url.clone(),
            plan.reply_queue.clone(),
            Arc::clone(&tally),
        ));
        let (reply_queue, url) = (plan.reply_queue.clone(), plan.url.clone());
        let publisher = tokio::spawn(publish_all(plan, Arc::clone(&tally), Arc::clone(&paused)));
        Self {
            tally,
            paused,
            publisher,
            reader,
            reply_queue,
            url,
        }
    }

    /// Stop publishing (the schedule stops too: nothing is skipped) until [`Load::resume`].
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Publish again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Requests published so far (confirmed).
    pub fn published(&self) -> usize {
        self.tally.lock().unwrap().published.len()
    }

    /// Published requests with a final reply so far.
    pub fn answered(&self) -> usize {
        self.tally.lock().unwrap().answered()
    }

    /// Wait until `count` requests are published (panics after `timeout`).
    pub async fn wait_published(&self, count: usize, timeout: Duration) {
        crate::helpers::poll_until("requests published", timeout, async || {
            (self.published() >= count).then_some(())
        })
        .await;
    }

    /// Wait for the publisher to finish, then for a final reply to every request (up to
    /// `timeout` after the last publish), then `settle` more for late copies; returns the tally.
    pub async fn finish(self, timeout: Duration, settle: Duration) -> Tally {
        self.resume();
        self.publisher.await.expect("the publisher does not panic");
        let deadline = Instant::now() + timeout;
        loop {
            let (answered, published) = {
                let t = self.tally.lock().unwrap();
                (t.answered(), t.published.len())
            };
            if answered == published || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(settle).await;
        self.reader.abort();
        let _ = self.reader.await;
        // The reply queue is the producer's own: it goes with the drill.
        if let Ok((connection, channel)) = connect(&self.url).await {
            let _ = channel
                .queue_delete(self.reply_queue.as_str().into(), Default::default())
                .await;
            let _ = connection.close(200, "done".into()).await;
        }
        Arc::try_unwrap(self.tally)
            .expect("the tasks are done")
            .into_inner()
            .unwrap()
    }
}

async fn connect(url: &str) -> lapin::Result<(Connection, Channel)> {
    let properties = ConnectionProperties::default().with_connection_name("kiln drill producer".into());
    let connection = Connection::connect(url, properties).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// The producer's reply queue: durable and replicated (a quorum queue), so it and the replies in
/// it outlive a broker restart.
async fn declare_reply_queue(channel: &Channel, name: &str) -> lapin::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .map(|_| ())
}

async fn publish_all(plan: Plan, tally: Arc<Mutex<Tally>>, paused: Arc<AtomicBool>) {
    let mut link: Option<(Connection, Channel)> = None;
    let mut next = tokio::time::Instant::now();
    for n in 0..plan.count {
        if plan.burst.as_ref().is_some_and(|burst| burst.contains(&n)) {
            next = tokio::time::Instant::now() + plan.interval;
        } else {
            tokio::time::sleep_until(next).await;
            while paused.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                next = tokio::time::Instant::now();
            }
            next += plan.interval;
        }
        let request = (plan.request)(n);
        let body = serde_json::to_vec(&request).unwrap();
        let queue = &plan.queues[n % plan.queues.len()];
        loop {
            if link.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
                link = match open_publisher(&plan.url).await {
                    Ok(l) => Some(l),
                    Err(_) => {
                        tokio::time::sleep(RECONNECT).await;
                        continue;
                    }
                };
            }
            let channel = &link.as_ref().unwrap().1;
            let sent = tokio::time::timeout(
                CONFIRM_TIMEOUT,
                publish(channel, queue, &plan.reply_queue, &request.request_id, &body),
            )
            .await;
            if let Ok(Ok(())) = sent {
                break;
            }
            tally.lock().unwrap().republished += 1;
            if let Some((connection, _)) = link.take() {
                let _ = connection.close(200, "publish failed".into()).await;
            }
            tokio::time::sleep(RECONNECT).await;
        }
        tally
            .lock()
            .unwrap()
            .published
            .push((request.request_id.clone(), request.user_id.clone()));
    }
    tally.lock().unwrap().done_publishing = true;
    if let Some((connection, _)) = link {
        let _ = connection.close(200, "done".into()).await;
    }
}

async fn open_publisher(url: &str) -> lapin::Result<(Connection, Channel)> {
    let (connection, channel) = connect(url).await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((connection, channel))
}

/// One request, persistent and `mandatory`, as `kiln::submit` sends it; `Ok` only on a positive
/// confirm with no return.
async fn publish(channel: &Channel, queue: &str, reply_to: &str, request_id: &str, body: &[u8]) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_reply_to(reply_to.into())
        .with_correlation_id(request_id.into())
        .with_timestamp(now.as_secs());
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirmation = channel
        .basic_publish("".into(), queue.into(), options, body, properties)
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => anyhow::bail!("not confirmed: {other:?}"),
    }
}

async fn read_replies(url: String, reply_queue: String, tally: Arc<Mutex<Tally>>) {
    loop {
        if let Ok((connection, channel)) = connect(&url).await {
            let consumer = async {
                declare_reply_queue(&channel, &reply_queue).await?;
                channel
                    .basic_consume(
                        reply_queue.as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            };
            if let Ok(mut consumer) = consumer.await {
                while let Some(Ok(delivery)) = consumer.next().await {
                    record(&tally, &delivery);
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
            }
            let _ = connection.close(200, "reconnecting".into()).await;
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

fn record(tally: &Mutex<Tally>, delivery: &lapin::message::Delivery) {
    let mut tally = tally.lock().unwrap();
    let document = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get(REPLY_HEADER) {
            Some(AMQPValue::LongString(json)) => serde_json::from_slice::<ReplyDocument>(json.as_bytes()).ok(),
            _ => None,
        });
    let Some(document) = document else {
        tally.malformed += 1;
        return;
    };
    if !document.is_final() {
        tally.notices += 1;
        return;
    }
    let request_id = document
        .request_id
        .clone()
        .or_else(|| delivery.properties.correlation_id().as_ref().map(ToString::to_string))
        .unwrap_or_default();
    let message_id = delivery.properties.message_id().as_ref().map(ToString::to_string);
    // The same message again, after this consumer's own reconnect: not kiln's second reply.
    let seen = tally
        .finals
        .get(&request_id)
        .is_some_and(|finals| finals.iter().any(|f| f.message_id == message_id));
    if delivery.redelivered && seen {
        tally.consumer_redeliveries += 1;
        return;
    }
    tally.finals.entry(request_id).or_default().push(Final {
        status: document.status,
        message_id,
        worker_id: document.worker_id.clone(),
        error: document.error.as_ref().map(|e| format!("{:?}", e.code)),
    });
}
