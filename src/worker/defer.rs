//! Deferral: a copy of the request waits in a delay queue and comes back to its queue later.

use lapin::message::Delivery;
use time::OffsetDateTime;

use super::incoming::Incoming;
use super::reply::{self, ReplyTarget};
use super::settle::{self, Ending, Outcome};
use super::Worker;
use crate::amqp::topology::RequestQueue;
use crate::amqp::PublishOutcome;
use crate::domain::{Deferral, DeferralReason, ErrorCode, RequestError, Timings};

impl Worker {
    /// Put the request in the delay queue that covers its wait, tell the producer, ack the original.
    /// A wait that would pass the request's deadline is answered `rate_limited` now instead. An
    /// accepted signed request's copy is signed anew for the moment it comes back
    /// ([`crate::auth::Authenticator::resign`]).
    pub(super) async fn defer(
        &self,
        delivery: &Delivery,
        queue: &RequestQueue,
        incoming: &Incoming,
        target: ReplyTarget,
        mut deferral: Deferral,
        timings: Timings,
    ) -> Outcome {
        let (delay_queue, wait_ms) = self.services.topology.delay_queue_for(deferral.retry_after_ms);
        deferral.retry_after_ms = wait_ms;
        let back_at = OffsetDateTime::now_utc() + std::time::Duration::from_millis(wait_ms);
        if incoming.request.deadline.is_some_and(|deadline| deadline < back_at) {
            crate::metrics::record_expired("deferral");
            let why = match deferral.reason {
                DeferralReason::Overloaded => "the worker is overloaded".to_owned(),
                reason => format!("over a {reason} limit"),
            };
            let error = RequestError::new(
                ErrorCode::RateLimited,
                format!("{why}, and waiting {wait_ms} ms would pass the request's deadline"),
            );
            return self.reply(delivery, target, Err(error), timings).await;
        }
        let signature = incoming.signed.as_ref().and_then(|signed| {
            let back_at_ms = crate::rate_limit::now_ms().saturating_add_unsigned(wait_ms);
            let covered = crate::auth::covered(delivery, &queue.name);
            self.services.auth.resign(signed, &covered, back_at_ms)
        });
        let copied = self
            .publisher
            .defer(delivery, delay_queue, deferral.count, &queue.name, signature)
            .await;
        if matches!(copied, Ok(PublishOutcome::Confirmed)) {
            crate::metrics::record_deferral(deferral.reason.as_str());
            tracing::info!(reason = %deferral.reason, wait_ms, count = deferral.count, "deferred");
            let notice = reply::deferred_notice(delivery, target, deferral, self.services.worker_id.to_string());
            // Informational: if it cannot be delivered, the final reply will meet the same fate.
            if let Err(e) = self.publisher.publish(notice).await {
                tracing::warn!(error = %e, "could not publish the deferred notice");
            }
        }
        settle::settle(delivery, Ending::after_deferral(copied, wait_ms)).await
    }
}
