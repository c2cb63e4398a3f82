//! The ack policy: every way a delivery can end, and what the broker is told, in one table.
//!
//! A request's own failures (bad input, limits, deadlines, a model run that failed) are answered
//! with an error reply like any image, so they end as "reply confirmed". [`Failure`] is the line
//! between those and this worker's own failures, which nobody is answered for.
//!
//! | how it ended ([`Ending`])                          | broker action ([`Action`])             |
//! |----------------------------------------------------|----------------------------------------|
//! | reply (image or error) confirmed                   | ack                                    |
//! | answered already (its outcome recorded)            | ack, nothing else                      |
//! | a signed message replayed (signature seen before)  | ack, nothing else                      |
//! | reply unroutable (no queue for it)                 | reject, no requeue → dead-letter queue |
//! | its `reply_to` queue is gone (checked on arrival)  | reject, no requeue → dead-letter queue |
//! | reply nacked by the broker                         | nack, requeue → retried later          |
//! | copy in a delay queue confirmed (deferral)         | ack (the copy comes back later)        |
//! | copy not taken by the broker                       | nack, requeue                          |
//! | the worker cannot serve (inference thread gone)    | nack, requeue → another worker         |
//! | channel or connection gone before settling         | nothing possible → broker redelivers   |

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

use crate::amqp::PublishOutcome;
use crate::cancel::StopReason;
use crate::cpu_pool::CpuTaskError;
use crate::domain::{ErrorCode, RequestError};
use crate::inference::InferenceError;

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
    /// Nobody could receive its reply: the request went to the dead-letter queue.
    DeadLettered {
        /// Why, for the log.
        reason: String,
        /// Why, for the metric: `unroutable` (the reply came back) or `reply_queue_gone` (seen on
        /// arrival, before any work).
        cause: &'static str,
    },
    /// A copy of a request that was answered already (its outcome recorded), or a replayed signed
    /// message: acked, not answered again.
    Duplicate,
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

/// Why a request got no image.
#[derive(Debug)]
pub(super) enum Failure {
    /// The request's own: answered with this error reply (then acked like any reply).
    Request(RequestError),
    /// This worker's: it cannot serve anyone now, so the request goes back unanswered.
    Worker(&'static str),
    /// Nobody waits for it: its reply queue went away while it was being rendered. It stopped at
    /// the next step and is dead-lettered like one found abandoned on arrival.
    Abandoned,
}

impl From<RequestError> for Failure {
    fn from(error: RequestError) -> Self {
        Self::Request(error)
    }
}

impl From<InferenceError> for Failure {
    fn from(error: InferenceError) -> Self {
        match error {
            InferenceError::Unavailable => Self::Worker("the inference thread is not running"),
            // Counted (stage `batcher`) by the inference thread, where it expired.
            InferenceError::Expired(late) => Self::Request(RequestError::new(
                ErrorCode::Expired,
                format!("the deadline passed {late:.3} s before the device was free"),
            )),
            InferenceError::Failed(message) => Self::Request(RequestError::new(ErrorCode::InferenceFailed, message)),
            InferenceError::Stopped(StopReason::Cancelled) => Self::Request(RequestError::new(
                ErrorCode::Cancelled,
                "cancelled by its producer before it finished",
            )),
            InferenceError::Stopped(StopReason::Abandoned) => Self::Abandoned,
            // Counted (stage `steps`) by the inference thread.
            error @ InferenceError::WontFinish { .. } => Self::Request(RequestError::new(
                ErrorCode::Expired,
                format!("the deadline cannot be met: {error}"),
            )),
        }
    }
}

impl From<CpuTaskError> for Failure {
    fn from(failure: CpuTaskError) -> Self {
        tracing::error!(error = %failure, "image processing failed");
        Self::Request(RequestError::new(
            ErrorCode::Internal,
            format!("the worker failed while processing the image: {failure}"),
        ))
    }
}

/// How a delivery's handling ended, before the broker is told.
#[derive(Debug)]
pub(super) enum Ending {
    /// Its reply was confirmed; the reply's error code, `None` for an image.
    ReplyConfirmed(Option<ErrorCode>),
    /// It was answered before (a recorded outcome, the same body).
    AlreadyAnswered,
    /// A signed message whose signature was accepted before, published again (not a broker
    /// redelivery): the delivery that was accepted answers it.
    Replayed,
    /// Its reply came back unroutable.
    ReplyUnroutable(String),
    /// Its `reply_to` queue was gone when it arrived: nobody can receive a reply.
    ReplyQueueGone(String),
    /// The broker refused to store its reply.
    ReplyNacked,
    /// Its copy waits in a delay queue for this long.
    CopyConfirmed(u64),
    /// The delay queue did not take its copy.
    CopyRefused(String),
    /// The worker cannot serve it ([`Failure::Worker`]).
    WorkerUnavailable(&'static str),
    /// Publishing failed because the channel or connection is gone.
    ChannelGone(String),
}

impl Ending {
    /// After publishing a reply whose error code is `error`.
    pub(super) fn after_reply(published: lapin::Result<PublishOutcome>, error: Option<ErrorCode>) -> Self {
        match published {
            Ok(PublishOutcome::Confirmed) => Self::ReplyConfirmed(error),
            Ok(PublishOutcome::Unroutable(why)) => Self::ReplyUnroutable(why),
            Ok(PublishOutcome::Nacked) => Self::ReplyNacked,
            Err(e) => Self::ChannelGone(format!("publishing the reply failed: {e}")),
        }
    }

    /// After putting a copy in a delay queue whose messages wait `wait_ms`.
    pub(super) fn after_deferral(copied: lapin::Result<PublishOutcome>, wait_ms: u64) -> Self {
        match copied {
            Ok(PublishOutcome::Confirmed) => Self::CopyConfirmed(wait_ms),
            Ok(other) => Self::CopyRefused(format!("the delay queue did not take the request ({other:?})")),
            Err(e) => Self::ChannelGone(format!("deferring the request failed: {e}")),
        }
    }
}

/// What the broker is told about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Done with it.
    Ack,
    /// Dead-letter it (reject without requeue).
    DeadLetter,
    /// Give it back to the queue.
    Requeue,
    /// Nothing can be said (the channel is gone); the broker redelivers it.
    Nothing,
}

/// The table: every ending, its broker action and the outcome reported.
fn decide(ending: Ending) -> (Action, Outcome) {
    match ending {
        Ending::ReplyConfirmed(error) => (Action::Ack, Outcome::Replied { error }),
        Ending::AlreadyAnswered | Ending::Replayed => (Action::Ack, Outcome::Duplicate),
        Ending::ReplyUnroutable(why) => (
            Action::DeadLetter,
            Outcome::DeadLettered {
                reason: format!("the reply could not be routed ({why})"),
                cause: "unroutable",
            },
        ),
        Ending::ReplyQueueGone(queue) => (
            Action::DeadLetter,
            Outcome::DeadLettered {
                reason: format!("its reply queue {queue:?} is gone: its producer gave up"),
                cause: "reply_queue_gone",
            },
        ),
        Ending::ReplyNacked => (
            Action::Requeue,
            Outcome::Requeued {
                reason: "the broker refused the reply".to_owned(),
            },
        ),
        Ending::CopyConfirmed(retry_after_ms) => (Action::Ack, Outcome::Deferred { retry_after_ms }),
        Ending::CopyRefused(reason) => (Action::Requeue, Outcome::Requeued { reason }),
        Ending::WorkerUnavailable(why) => (Action::Requeue, Outcome::Requeued { reason: why.to_owned() }),
        Ending::ChannelGone(reason) => (Action::Nothing, Outcome::Abandoned { reason }),
    }
}

/// Tell the broker how `delivery` ended.
pub(super) async fn settle(delivery: &Delivery, ending: Ending) -> Outcome {
    let (action, outcome) = decide(ending);
    let done = match action {
        Action::Ack => delivery.ack(BasicAckOptions::default()).await,
        Action::DeadLetter => delivery.reject(BasicRejectOptions { requeue: false }).await,
        Action::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
        Action::Nothing => return outcome,
    };
    match done {
        Ok(_) => outcome,
        Err(e) => Outcome::Abandoned {
            reason: format!("settling the request failed: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_confirmed_replies_and_copies_are_acked() {
        let action = |ending| decide(ending).0;
        assert_eq!(action(Ending::ReplyConfirmed(None)), Action::Ack);
        assert_eq!(
            action(Ending::ReplyConfirmed(Some(ErrorCode::InvalidImage))),
            Action::Ack
        );
        assert_eq!(action(Ending::CopyConfirmed(1000)), Action::Ack);
        assert_eq!(action(Ending::AlreadyAnswered), Action::Ack);
        assert_eq!(action(Ending::Replayed), Action::Ack);
        assert_eq!(action(Ending::ReplyUnroutable("NO_ROUTE".into())), Action::DeadLetter);
        assert_eq!(action(Ending::ReplyQueueGone("amq.gen-x".into())), Action::DeadLetter);
        assert_eq!(action(Ending::ReplyNacked), Action::Requeue);
        assert_eq!(action(Ending::CopyRefused("nacked".into())), Action::Requeue);
        assert_eq!(action(Ending::WorkerUnavailable("gone")), Action::Requeue);
        assert_eq!(action(Ending::ChannelGone("closed".into())), Action::Nothing);
    }

    #[test]
    fn inference_errors_are_the_request_s_unless_the_thread_is_gone() {
        assert!(matches!(Failure::from(InferenceError::Unavailable), Failure::Worker(_)));
        let code = |e| match Failure::from(e) {
            Failure::Request(error) => error.code,
            Failure::Worker(why) => panic!("a worker failure: {why}"),
            Failure::Abandoned => panic!("abandoned"),
        };
        assert_eq!(code(InferenceError::Expired(0.5)), ErrorCode::Expired);
        assert_eq!(code(InferenceError::Failed("boom".into())), ErrorCode::InferenceFailed);
        assert_eq!(
            code(InferenceError::Stopped(StopReason::Cancelled)),
            ErrorCode::Cancelled
        );
        let late = InferenceError::WontFinish {
            steps_left: 10,
            step_seconds: 0.5,
            short_by: 2.0,
        };
        assert_eq!(code(late), ErrorCode::Expired);
        assert!(matches!(
            Failure::from(InferenceError::Stopped(StopReason::Abandoned)),
            Failure::Abandoned
        ));
    }
}
