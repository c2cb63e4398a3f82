//! Sending and collecting: every request sent, by id, and what came back for it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::users::Request;
use kiln::domain::ReplyDocument;
use kiln::submit::{Replies, Sender};

/// A request as sent.
#[derive(Debug)]
pub struct Sent {
    /// Its tier.
    pub tier: String,
    /// Its denoising steps (diffusion).
    pub steps: Option<u32>,
    /// When it was published (just before).
    pub at: Instant,
}

/// What came back for a request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `deferred` notices (replies that are not final).
    pub notices: usize,
    /// The final reply, and when it arrived.
    pub last: Option<(ReplyDocument, Instant)>,
}

/// What [`Book::take`] hands over: request id → sent and outcome.
pub type Entries = HashMap<String, (Sent, Outcome)>;

/// The bench's producer and its book of requests. A plain mutex, never held across an `.await`:
/// with tokio's fair mutex, a [`Book::wait_final`] future parked in the lock's queue inside a
/// `FuturesUnordered` that nobody polls (the sender was busy publishing) held the lock's next turn
/// forever, and the sender, queued behind it, deadlocked the bench (seen about 1 run in 8).
#[derive(Clone)]
pub struct Book {
    sender: Sender,
    entries: Arc<Mutex<Entries>>,
}

impl Book {
    /// An empty book that sends through `sender`.
    pub fn new(sender: Sender) -> Self {
        Self {
            sender,
            entries: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enter `request` under `tier`, then publish it to `queue`. The future owns what it needs, so
    /// it can be spawned.
    pub fn send(&self, queue: String, tier: String, request: Request) -> impl Future<Output = anyhow::Result<()>> {
        let book = self.clone();
        async move {
            let Request { document, steps } = request;
            let sent = Sent {
                tier,
                steps,
                at: Instant::now(),
            };
            book.lock()
                .insert(document.request_id.clone(), (sent, Outcome::default()));
            book.sender.send_to(&queue, &document).await
        }
    }

    /// Read every reply into the book, on a task of its own, until the replies end. Replies to
    /// requests not in the book (any more) and deliveries that are not replies are skipped.
    pub fn read(&self, mut replies: Replies) -> tokio::task::JoinHandle<()> {
        let book = self.clone();
        tokio::spawn(async move {
            while let Some(reply) = replies.recv().await {
                let Ok(reply) = reply else { continue };
                let Some(id) = reply.correlation_id else { continue };
                if let Some((_, outcome)) = book.lock().get_mut(&id) {
                    match reply.document.is_final() {
                        true => outcome.last = Some((reply.document, reply.received_at)),
                        false => outcome.notices += 1,
                    }
                }
            }
        })
    }

    /// Wait until request `id` has its final reply, at most `timeout`.
    pub async fn wait_final(&self, id: String, timeout: Duration) {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.lock().get(&id).is_some_and(|(_, o)| o.last.is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until every request has a final reply, at most `timeout`.
    pub async fn drain(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            let open = self.lock().values().filter(|(_, o)| o.last.is_none()).count();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Everything entered so far, leaving the book empty.
    pub fn take(&self) -> Entries {
        std::mem::take(&mut *self.lock())
    }
}
