//! One delivery, from arrival to acknowledgement: a journey of five steps, one file each.
//!
//! ```text
//! delivery ─► 1. incoming   parse once: the request, its wait in the broker, tier class, deferrals
//!          ─► 2. admission  deadline? overload (defer | degrade)? user limits in Redis (a lease)
//!                 ├─ refused ─► error reply
//!                 └─ deferred ─► defer: copy to a delay queue, `deferred` notice
//!          ─► 3. render     prepare (CPU pool) ─► infer (inference thread) ─► finish + PNG (CPU pool)
//!          ─► 4. reply      publish the image or the error, wait for the broker's confirm, record
//!                 the outcome (so a copy is not answered again)
//!          ─► 5. settle     ack / dead-letter / requeue, from the one table in [`settle`]
//!             (the lease's guard gives the lease back on every path)
//! ```
//!
//! Every request gets exactly one final reply, error or image, and is acknowledged only after the
//! broker confirmed that reply (or, when deferred, its copy in the delay queue).

mod admission;
mod deadline;
mod defer;
mod incoming;
mod lease;
mod observed;
mod outcome;
mod render;
mod reply;
pub mod settings;
pub mod settle;
mod watch;

use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use tracing::Instrument;

use crate::amqp::publisher::ReplyPublisher;
use crate::amqp::topology::RequestQueue;
use crate::amqp::{ReplyQueues, Topology};
use crate::auth::ReplayCheck;
use crate::cpu_pool::CpuPool;
use crate::domain::{Deferral, DeferralReason, ErrorCode, ImageInfo, RequestError, Timings};
use crate::inference::{InferenceHandle, ModelRegistry};
use crate::rate_limit::Limiter;
use crate::scheduling::Schedule;
use crate::trace_context::{self, TraceContext};
use admission::Admission;
use incoming::Incoming;
use lease::LeaseGuard;
use observed::Observed;
use outcome::{Record, Seen};
use render::{render, Watched};
use reply::ReplyTarget;
pub use reply::INVALID_ROUTING_KEY;
use settings::{FaultSettings, RequestLimits};
pub use settle::Outcome;
use settle::{Ending, Failure};
use watch::Watch;

/// What a worker needs besides its broker channel; shared by every connection session.
#[derive(Clone)]
pub struct Services {
    /// The models.
    pub registry: Arc<ModelRegistry>,
    /// The inference thread.
    pub inference: InferenceHandle,
    /// Threads for image work.
    pub cpu: Arc<CpuPool>,
    /// Per-user limits; `None` when `rate_limit.enabled = false`.
    pub limiter: Option<Arc<Limiter>>,
    /// Queue names (the delay queues).
    pub topology: Arc<Topology>,
    /// Name in replies and logs.
    pub worker_id: Arc<str>,
    /// Size limits on messages.
    pub limits: RequestLimits,
    /// Deliberate faults (tests only).
    pub faults: FaultSettings,
    /// Priorities, default deadlines and overload policy by tier.
    pub schedule: Arc<Schedule>,
    /// The cancels this worker heard (from the cancel exchange) and the requests it holds: one
    /// per process, shared by every session.
    pub cancellations: crate::cancel::Cancellations,
    /// Signed requests: keys, policy, replay records.
    pub auth: Arc<crate::auth::Authenticator>,
}

/// Handles deliveries. Cheap to clone: one per connection session, shared by all delivery tasks.
#[derive(Clone)]
pub struct Worker {
    services: Services,
    publisher: ReplyPublisher,
    reply_queues: ReplyQueues,
}

impl Worker {
    /// A worker publishing replies through `publisher`, checking `reply_to` queues with
    /// `reply_queues` (on the same connection).
    pub fn new(services: Services, publisher: ReplyPublisher, reply_queues: ReplyQueues) -> Self {
        Self {
            services,
            publisher,
            reply_queues,
        }
    }

    /// Handle one delivery from `queue` completely: reply (or defer), then settle it with the broker.
    pub async fn handle(&self, delivery: Delivery, queue: &RequestQueue) -> Outcome {
        // The producer's W3C trace (or a new one): on the span, and on every reply (the publisher
        // reads it from the task-local scope).
        let trace = TraceContext::from_headers(delivery.properties.headers().as_ref());
        let span = tracing::info_span!(
            "request",
            request_id = tracing::field::Empty,
            user_id = tracing::field::Empty,
            model = tracing::field::Empty,
            tier = tracing::field::Empty,
            redelivered = delivery.redelivered,
            trace_id = %trace.own.trace_id_hex(),
            span_id = %trace.own.span_id_hex(),
            parent_span_id = tracing::field::Empty,
        );
        if let Some(parent) = &trace.incoming {
            span.record("parent_span_id", parent.span_id_hex());
        }
        let mut observed = Observed::start();
        let outcome = trace_context::scope(trace, self.handle_inner(delivery, queue, &mut observed))
            .instrument(span)
            .await;
        observed.finish(&outcome);
        outcome
    }

    /// One delivery's journey: read it, admit it, render it, reply, settle.
    async fn handle_inner(&self, delivery: Delivery, queue: &RequestQueue, observed: &mut Observed) -> Outcome {
        let received = Instant::now();
        let mut timings = Timings::default();
        let services = &self.services;

        // 1. What the delivery says, read once (a signed request's signature first).
        let max_bytes = services.limits.max_message_bytes;
        let mut incoming = match Incoming::read(&delivery, queue, &services.schedule, max_bytes, &services.auth) {
            Ok(incoming) => incoming,
            Err((error, partial)) => {
                timings.total = ms(received.elapsed());
                return self
                    .reply(&delivery, ReplyTarget::from(partial), Err(error), timings)
                    .await;
            }
        };
        let request = &incoming.request;
        let span = tracing::Span::current();
        span.record("request_id", request.request_id.as_str());
        span.record("user_id", request.user_id.as_str());
        span.record("model", request.model.as_str());
        timings.queue_wait = incoming.queue_wait_ms();
        observed.parsed(&services.registry, &request.model, timings.queue_wait);
        observed.queue_tier(&services.schedule.class(incoming.class).tier);
        let mut target = ReplyTarget::of(request);

        // Signed: a signature accepted before is a replay, acked unanswered (its first delivery
        // answers it), unless the broker redelivered the message: then it is the same request.
        if let Some(signed) = incoming.signed.as_mut() {
            match services.auth.remember(signed, delivery.redelivered).await {
                ReplayCheck::Go => {}
                ReplayCheck::Replayed => return settle::settle(&delivery, Ending::Replayed).await,
                ReplayCheck::Refused(error) => {
                    timings.total = ms(received.elapsed());
                    return self.reply(&delivery, target, Err(error), timings).await;
                }
                ReplayCheck::Unavailable { retry_after_ms } => {
                    let count = incoming.deferrals + 1;
                    let reason = DeferralReason::LimiterUnavailable;
                    let deferral = Deferral {
                        retry_after_ms,
                        reason,
                        count,
                    };
                    return self.defer(&delivery, queue, &incoming, target, deferral, timings).await;
                }
            }
        }
        let request = &incoming.request;

        // Answered already (a redelivery after a crash between confirm and ack, or published
        // again)? Then nothing more is done for it; the same id for another body is refused.
        let record = services
            .limiter
            .as_ref()
            .map(|_| Record::new(request.user_id.as_str(), request.request_id.as_str(), &delivery.data));
        if let (Some(limiter), Some(record)) = (&services.limiter, &record) {
            match record.look_up(limiter).await {
                Seen::New => {}
                Seen::Answered => {
                    tracing::info!("answered already: acknowledged without a second reply");
                    record.release_lease(limiter).await;
                    return settle::settle(&delivery, Ending::AlreadyAnswered).await;
                }
                Seen::Conflict { answered } => {
                    let error = RequestError::new(
                        ErrorCode::DuplicateRequestId,
                        format!(
                            "request id {} was already answered ({answered}) for a request with another body; \
                             use a new id for each request",
                            request.request_id
                        ),
                    );
                    timings.total = ms(received.elapsed());
                    return self.reply(&delivery, target, Err(error), timings).await;
                }
            }
        }
        // Recorded after its final reply is confirmed.
        target.record = record;

        // Nobody to answer: the producer gave up and its reply queue went with it. Dead-letter
        // the request before it costs a device run, a charge or a trip through the delay queues.
        if let Some(queue) = delivery.properties.reply_to().as_ref().map(|q| q.as_str()) {
            if self.reply_queues.gone(queue, incoming.deferrals > 0).await {
                tracing::warn!(
                    reply_to = queue,
                    "the reply queue is gone: dead-lettering the request unserved"
                );
                return settle::settle(&delivery, Ending::ReplyQueueGone(queue.to_owned())).await;
            }
        }

        // Followed from here to the reply, so a cancel (now or later) reaches it.
        let tracked = services.cancellations.track(request.request_id.as_str());
        if tracked.flag().reason().is_some() {
            let error = RequestError::new(ErrorCode::Cancelled, "cancelled by its producer before it was served");
            timings.total = ms(received.elapsed());
            return self.reply(&delivery, target, Err(error), timings).await;
        }

        // 2. Admission: deadline, overload policy, the user's limits.
        let admission = admission::admit(services, &mut incoming).await;
        observed.limited(admission.rate_limit());
        let (lease, rendered) = match admission {
            Admission::Refuse { error, rate_limit } => {
                target.rate_limit = rate_limit;
                (LeaseGuard::none(), Err(Failure::Request(error)))
            }
            Admission::Defer { deferral, rate_limit } => {
                target.rate_limit = rate_limit;
                return self.defer(&delivery, queue, &incoming, target, deferral, timings).await;
            }
            Admission::Go {
                lease,
                rate_limit,
                degraded,
            } => {
                span.record("tier", services.schedule.class(incoming.class).tier.as_str());
                target.rate_limit = rate_limit;
                target.degraded = degraded;
                // 3. Render, watched: progress notices, a reply queue that goes away.
                let Incoming {
                    request, class, since, ..
                } = incoming;
                let (progress, notices) = match request.progress {
                    true => {
                        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                        (Some(tx), Some(rx))
                    }
                    false => (None, None),
                };
                let watched = Watched {
                    stop: tracked.flag().clone(),
                    progress,
                };
                let watch = Watch {
                    delivery: &delivery,
                    target: &target,
                    publisher: &self.publisher,
                    reply_queues: &self.reply_queues,
                    worker_id: &services.worker_id,
                    stop: tracked.flag().clone(),
                    progress: notices,
                    progress_interval: std::time::Duration::from_millis(services.limits.progress_interval_ms),
                    reply_queue_check: std::time::Duration::from_millis(services.limits.reply_queue_check_ms),
                };
                let rendering = render(services, request, class, since, &mut timings, watched);
                (lease, watch::while_rendering(rendering, watch).await)
            }
        };

        // 4. Reply (or give the request back when this worker cannot serve), then 5. settle.
        let rendered = match rendered {
            Ok(rendered) => {
                target.batch_size = Some(rendered.batch_size);
                target.generation = rendered.generation;
                Ok((rendered.png, rendered.info))
            }
            Err(Failure::Request(error)) => Err(error),
            Err(Failure::Worker(why)) => {
                let outcome = settle::settle(&delivery, Ending::WorkerUnavailable(why)).await;
                lease.release().await;
                return outcome;
            }
            Err(Failure::Abandoned) => {
                let queue = delivery.properties.reply_to().as_ref().map(|q| q.to_string());
                let outcome = settle::settle(&delivery, Ending::ReplyQueueGone(queue.unwrap_or_default())).await;
                lease.release().await;
                return outcome;
            }
        };
        timings.total = ms(received.elapsed());
        observed.timings(&timings);
        let outcome = self.reply(&delivery, target, rendered, timings).await;
        lease.release().await;
        outcome
    }

    /// Publish the final reply, wait for the broker's confirm, record the outcome (`target.record`:
    /// the request's, when it is to be remembered), settle the delivery accordingly.
    async fn reply(
        &self,
        delivery: &Delivery,
        mut target: ReplyTarget,
        rendered: Result<(Vec<u8>, ImageInfo), RequestError>,
        timings: Timings,
    ) -> Outcome {
        let record = target.record.take();
        let duplicate_id = matches!(&rendered, Err(e) if e.code == ErrorCode::DuplicateRequestId);
        let mut reply = reply::final_reply(delivery, target, rendered, timings, self.services.worker_id.to_string());
        if duplicate_id {
            // Not a copy of the reply its id already got.
            reply.message_id = None;
        }
        if self.services.faults.abort_before_reply {
            tracing::error!("faults.abort_before_reply is set: aborting before the reply is published");
            std::process::abort();
        }
        let error = reply.document.error.as_ref().map(|e| e.code);
        let total_ms = reply.document.timings_ms.total;
        let published = self.publisher.publish(reply).await;
        if matches!(published, Ok(crate::amqp::PublishOutcome::Confirmed)) {
            let faults = &self.services.faults;
            if faults.abort_before_record {
                tracing::error!("faults.abort_before_record is set: aborting after the confirm, before the record");
                std::process::abort();
            }
            if let (Some(limiter), Some(record)) = (&self.services.limiter, &record) {
                record.store(limiter, error).await;
            }
            if faults.abort_before_ack {
                tracing::error!(
                    "faults.abort_before_ack is set: aborting after the confirm and the record, before the ack"
                );
                std::process::abort();
            }
        }
        let outcome = settle::settle(delivery, Ending::after_reply(published, error)).await;
        match &outcome {
            Outcome::Replied { error: None } => tracing::info!(total_ms, "replied"),
            Outcome::Replied { error: Some(code) } => tracing::info!(error_code = %code, "replied with an error"),
            other => tracing::warn!(outcome = ?other, "request not replied to"),
        }
        outcome
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
