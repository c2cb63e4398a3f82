//! The ack policy: what happens to a request at the broker, decided in one place.
//!
//! | what happened                                  | broker action                          |
//! |------------------------------------------------|----------------------------------------|
//! | reply (image or error) confirmed               | ack                                    |
//! | reply unroutable (no queue for it)             | reject, no requeue → dead-letter queue |
//! | reply nacked by the broker                     | nack, requeue → retried later          |
//! | copy in a delay queue confirmed (deferral)     | ack (the copy comes back later)        |
//! | copy not taken by the broker                   | nack, requeue                          |
//! | channel or connection gone                     | nothing possible → broker redelivers   |
//! | inference thread gone (no reply made)          | nack, requeue → another worker         |

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

use crate::amqp::PublishOutcome;
use crate::domain::ErrorCode;

/// What happened to one delivery, as the broker sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The reply was confirmed and the request acknowledged.
    Replied {
        /// The reply's error code; `None` for an image.
        error: Option<ErrorCode>,
    },
    /// A limit deferred the request: a copy waits in a delay queue, the original was acked.
    Deferred {
        /// How long the copy waits.
        retry_after_ms: u64,
    },
    /// The reply could not be routed: the request went to the dead-letter queue.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// The request went back to the queue for another try.
    Requeued {
        /// Why.
        reason: String,
    },
    /// The channel is gone, so nothing could be settled; the broker redelivers the request.
    Abandoned {
        /// Why.
        reason: String,
    },
}

/// Settle a request after publishing its reply.
pub(super) async fn after_reply(
    delivery: &Delivery,
    published: lapin::Result<PublishOutcome>,
    error: Option<ErrorCode>,
) -> Outcome {
    let (outcome, action) = match published {
        Ok(PublishOutcome::Confirmed) => (
            Outcome::Replied { error },
            delivery.ack(BasicAckOptions::default()).await,
        ),
        Ok(PublishOutcome::Unroutable(why)) => {
            let reason = format!("the reply could not be routed ({why})");
            (
                Outcome::DeadLettered { reason },
                delivery.reject(BasicRejectOptions { requeue: false }).await,
            )
        }
        Ok(PublishOutcome::Nacked) => {
            let reason = "the broker refused the reply".to_owned();
            (Outcome::Requeued { reason }, delivery.nack(requeue()).await)
        }
        Err(e) => {
            return Outcome::Abandoned {
                reason: format!("publishing the reply failed: {e}"),
            }
        }
    };
    checked(outcome, action)
}

/// Settle a request after putting a copy of it in a delay queue.
pub(super) async fn after_deferral(
    delivery: &Delivery,
    copied: lapin::Result<PublishOutcome>,
    retry_after_ms: u64,
) -> Outcome {
    match copied {
        Ok(PublishOutcome::Confirmed) => checked(
            Outcome::Deferred { retry_after_ms },
            delivery.ack(BasicAckOptions::default()).await,
        ),
        Ok(other) => {
            without_reply(
                delivery,
                &format!("the delay queue did not take the request ({other:?})"),
            )
            .await
        }
        Err(e) => Outcome::Abandoned {
            reason: format!("deferring the request failed: {e}"),
        },
    }
}

/// Give a request back to the queue, unanswered.
pub(super) async fn without_reply(delivery: &Delivery, why: &str) -> Outcome {
    checked(
        Outcome::Requeued { reason: why.to_owned() },
        delivery.nack(requeue()).await,
    )
}

fn checked(outcome: Outcome, action: lapin::Result<bool>) -> Outcome {
    match action {
        Ok(_) => outcome,
        Err(e) => Outcome::Abandoned {
            reason: format!("settling the request failed: {e}"),
        },
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        multiple: false,
    }
}
