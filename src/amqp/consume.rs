//! Consuming the request queues: one channel and `basic.consume` per queue with its own prefetch,
//! one task per delivery, and on shutdown cancel, drain what the broker already sent, and close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{select_all, BoxStream};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::task::JoinSet;

use super::topology::RequestQueue;

/// How a consuming session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown was asked for and in-flight work is done (or the grace period is over).
    Stopped,
    /// The broker connection broke; reconnect.
    Lost(String),
}

/// A delivery and the request queue it came from.
pub type Incoming = (Delivery, Arc<RequestQueue>);

/// The consumers of every request queue, merged into one stream of deliveries.
pub struct Consumers {
    channels: Vec<(Channel, String)>,
    deliveries: BoxStream<'static, lapin::Result<Incoming>>,
}

impl Consumers {
    /// One channel per request queue, each with `prefetch`: a backlog in one tier's queue cannot
    /// fill the worker's hands and keep another tier's requests out.
    pub async fn open(
        connection: &Connection,
        queues: &[RequestQueue],
        prefetch: u16,
        consumer_tag: &str,
    ) -> lapin::Result<Self> {
        let mut channels = Vec::new();
        let mut streams = Vec::new();
        for queue in queues {
            let channel = connection.create_channel().await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    queue.name.as_str().into(),
                    consumer_tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            channels.push((channel, consumer.tag().to_string()));
            let queue = Arc::new(queue.clone());
            streams.push(consumer.map(move |next| next.map(|delivery| (delivery, Arc::clone(&queue)))));
        }
        Ok(Self {
            channels,
            deliveries: select_all(streams).boxed(),
        })
    }

    /// Hand every delivery to `handle` in a task of its own until `shutdown` resolves or the
    /// connection breaks. On shutdown: cancel the consumers, serve what the broker had already
    /// sent (prefetched but not started: returning it would add to its delivery count on every
    /// deploy), wait for the tasks within `grace`, and close the channels. Tasks still running after
    /// `grace` are aborted; their requests stay unacknowledged and are redelivered.
    pub async fn serve<H, F>(
        mut self,
        handle: H,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
        grace: Duration,
    ) -> SessionEnd
    where
        H: Fn(Incoming) -> F,
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let mut tasks = JoinSet::new();
        let end = loop {
            tokio::select! {
                biased;
                () = &mut *shutdown => break SessionEnd::Stopped,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_task(done),
                next = self.deliveries.next() => match next {
                    Some(Ok(incoming)) => {
                        tasks.spawn(handle(incoming));
                    }
                    Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                    None => break SessionEnd::Lost("the broker cancelled the consumer".into()),
                },
            }
        };

        let drained = tokio::time::timeout(grace, async {
            if end == SessionEnd::Stopped {
                tracing::info!(
                    in_flight = tasks.len(),
                    "shutting down: no new requests; finishing those held"
                );
                // After the cancel, the consumer yields what the broker already sent and then ends.
                for (channel, tag) in &self.channels {
                    let _ = channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                while let Some(Ok(incoming)) = self.deliveries.next().await {
                    tasks.spawn(handle(incoming));
                }
            }
            while let Some(done) = tasks.join_next().await {
                log_task(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                unfinished = tasks.len(),
                "grace period over; unfinished requests stay unacknowledged and will be redelivered"
            );
            tasks.abort_all();
        }
        if end == SessionEnd::Stopped {
            // Close every channel before the caller closes the connection: a channel that is only
            // dropped closes itself in the background and races the connection's close.
            for (channel, _) in &self.channels {
                let _ = channel.close(200, "worker stopping".into()).await;
            }
        }
        end
    }
}

fn log_task<T>(done: Result<T, tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "a delivery task panicked; its request will be redelivered");
    }
}
