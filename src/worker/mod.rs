//! One delivery, from arrival to acknowledgement.
//!
//! ```text
//! delivery ─► parse ─► deadline? ─► admission (cost, user limits in Redis)
//!          ├─ over a `defer` limit ─► copy to a delay queue, `deferred` notice, ack
//!          └─ admitted ─► prepare (CPU pool) ─► infer (inference thread) ─► finish + PNG (CPU pool)
//!                       ─► publish reply, wait for confirm ─► settle (ack/…) ─► release the lease
//! ```
//!
//! Every request gets exactly one final reply, error or image, and is acknowledged only after the
//! broker confirmed that reply (or, when deferred, its copy in the delay queue). [`settle`] is the
//! one place that maps what happened to a broker action.

mod admission;
mod observed;
mod reply;
pub mod settle;

use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::amqp::publisher::{deferrals, ReplyPublisher};
use crate::amqp::topology::RequestQueue;
use crate::amqp::Topology;
use crate::configuration::{FaultSettings, RequestLimits};
use crate::cpu_pool::{CpuPool, CpuTaskError};
use crate::domain::reply::Degraded;
use crate::domain::{Deferral, ErrorCode, GenerationRequest, ImageInfo, RequestError, Timings};
use crate::imaging::encode_png;
use crate::inference::{InferenceError, InferenceHandle, JobOptions, ModelRegistry};
use crate::rate_limit::Limiter;
use crate::scheduling::{OverloadAction, Schedule, TierClass};
use crate::trace_context::{self, TraceContext};
use admission::Admission;
use observed::Observed;
pub use reply::INVALID_ROUTING_KEY;
use reply::{Rendered, ReplyTarget};
pub use settle::Outcome;

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
}

/// Handles deliveries. Cheap to clone: one per connection session, shared by all delivery tasks.
#[derive(Clone)]
pub struct Worker {
    services: Services,
    publisher: ReplyPublisher,
}

impl Worker {
    /// A worker publishing replies through `publisher`.
    pub fn new(services: Services, publisher: ReplyPublisher) -> Self {
        Self { services, publisher }
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

    async fn handle_inner(&self, delivery: Delivery, queue: &RequestQueue, observed: &mut Observed) -> Outcome {
        let received = Instant::now();
        let received_at = OffsetDateTime::now_utc();
        let mut timings = Timings::default();
        let mut lease = None;

        let (target, rendered) = match GenerationRequest::parse(&delivery.data, self.services.limits.max_message_bytes)
        {
            Err((error, partial)) => (ReplyTarget::from(partial), Err(error)),
            Ok(mut request) => {
                let span = tracing::Span::current();
                span.record("request_id", request.request_id.as_str());
                span.record("user_id", request.user_id.as_str());
                span.record("model", request.model.as_str());
                let enqueued = request.created_at.or_else(|| amqp_timestamp(&delivery));
                let queue_wait = enqueued.map(|t| (received_at - t).max(time::Duration::ZERO));
                timings.queue_wait = queue_wait.map(|w| w.as_seconds_f64() * 1000.0);
                observed.parsed(&self.services.registry, &request.model, timings.queue_wait);
                let mut target = ReplyTarget {
                    request_id: Some(request.request_id.to_string()),
                    model: Some(request.model.clone()),
                    rate_limit: None,
                    batch_size: None,
                    degraded: None,
                };
                // The queue's tier until the limiter says whose request this really is.
                let schedule = &self.services.schedule;
                let mut class = schedule.class_of(queue.tier.as_deref());
                observed.queue_tier(&schedule.class(class).tier);
                let since = enqueued.unwrap_or(received_at);
                let overloaded = schedule.overloaded(queue_wait.and_then(|w| w.try_into().ok()));
                let admission = match past_deadline(&request, schedule.class(class), since, "admission") {
                    Some(expired) => Admission::Refuse {
                        error: expired,
                        rate_limit: None,
                    },
                    None if overloaded && schedule.class(class).overload == OverloadAction::Defer => Admission::Defer {
                        deferral: Deferral {
                            retry_after_ms: schedule.overload.defer_ms,
                            reason: "overloaded".to_owned(),
                            count: deferrals(&delivery) + 1,
                        },
                        rate_limit: None,
                    },
                    None => {
                        if overloaded && schedule.class(class).overload == OverloadAction::Degrade {
                            // Only a request that would come out larger than the cap is degraded.
                            let cap = schedule.overload.degrade_max_side;
                            let larger = self
                                .services
                                .registry
                                .output_size(&request)
                                .is_ok_and(|(w, h)| w.max(h) > cap);
                            request.size_cap = larger.then_some(cap);
                        }
                        let limiter = self.services.limiter.as_deref();
                        admission::admit(limiter, &self.services.registry, &request, deferrals(&delivery)).await
                    }
                };
                observed.limited(admission.rate_limit());
                match admission {
                    Admission::Go {
                        lease: held,
                        rate_limit,
                    } => {
                        lease = held;
                        if let Some(info) = &rate_limit {
                            class = schedule.class_of(Some(info.tier.as_str()));
                        }
                        span.record("tier", schedule.class(class).tier.as_str());
                        target.rate_limit = rate_limit;
                        if request.size_cap.is_some() {
                            target.degraded = Some(Degraded {
                                max_side: schedule.overload.degrade_max_side,
                                reason: "overloaded".into(),
                            });
                        }
                        match self.render(request, class, since, &mut timings).await {
                            Ok((rendered, batch_size)) => {
                                target.batch_size = batch_size;
                                (target, rendered)
                            }
                            Err(InferenceError::Unavailable) => {
                                // The inference thread is gone: this worker cannot serve anyone.
                                let outcome =
                                    settle::without_reply(&delivery, "the inference thread is not running").await;
                                self.release(lease).await;
                                return outcome;
                            }
                            Err(InferenceError::Expired(late)) => {
                                crate::metrics::record_expired("batcher");
                                (
                                    target,
                                    Err(RequestError::new(
                                        ErrorCode::Expired,
                                        format!("the deadline passed {late:.3} s before the device was free"),
                                    )),
                                )
                            }
                            Err(InferenceError::Failed(message)) => {
                                (target, Err(RequestError::new(ErrorCode::InferenceFailed, message)))
                            }
                        }
                    }
                    Admission::Refuse { error, rate_limit } => {
                        target.rate_limit = rate_limit;
                        (target, Err(error))
                    }
                    Admission::Defer { deferral, rate_limit } => {
                        target.rate_limit = rate_limit;
                        return self.defer(&delivery, queue, &request, target, deferral, timings).await;
                    }
                }
            }
        };
        timings.total = ms(received.elapsed());
        observed.timings(&timings);

        let reply = reply::final_reply(
            &delivery,
            target,
            rendered,
            timings,
            self.services.worker_id.to_string(),
        );
        if self.services.faults.abort_before_reply {
            tracing::error!("faults.abort_before_reply is set: aborting before the reply is published");
            std::process::abort();
        }
        let error = reply.document.error.as_ref().map(|e| e.code);
        let total_ms = reply.document.timings_ms.total;
        let published = self.publisher.publish(reply).await;
        let outcome = settle::after_reply(&delivery, published, error).await;
        self.release(lease).await;
        match &outcome {
            Outcome::Replied { error: None } => tracing::info!(total_ms, "replied"),
            Outcome::Replied { error: Some(code) } => tracing::info!(error_code = %code, "replied with an error"),
            other => tracing::warn!(outcome = ?other, "request not replied to"),
        }
        outcome
    }

    /// Put the request in the delay queue that covers its wait, tell the producer, ack the original.
    /// A wait that would pass the request's deadline is answered `rate_limited` now instead.
    async fn defer(
        &self,
        delivery: &Delivery,
        queue: &RequestQueue,
        request: &GenerationRequest,
        target: ReplyTarget,
        mut deferral: Deferral,
        timings: Timings,
    ) -> Outcome {
        let (delay_queue, wait_ms) = self.services.topology.delay_queue_for(deferral.retry_after_ms);
        deferral.retry_after_ms = wait_ms;
        let back_at = OffsetDateTime::now_utc() + std::time::Duration::from_millis(wait_ms);
        if request.deadline.is_some_and(|deadline| deadline < back_at) {
            crate::metrics::record_expired("deferral");
            let error = RequestError::new(
                ErrorCode::RateLimited,
                match deferral.reason.as_str() {
                    "overloaded" => {
                        format!("the worker is overloaded, and waiting {wait_ms} ms would pass the request's deadline")
                    }
                    reason => {
                        format!("over a {reason} limit, and waiting {wait_ms} ms would pass the request's deadline")
                    }
                },
            );
            let reply = reply::final_reply(
                delivery,
                target,
                Err(error),
                timings,
                self.services.worker_id.to_string(),
            );
            let published = self.publisher.publish(reply).await;
            return settle::after_reply(delivery, published, Some(ErrorCode::RateLimited)).await;
        }
        let copied = self
            .publisher
            .defer(delivery, delay_queue, deferral.count, &queue.name)
            .await;
        if matches!(copied, Ok(crate::amqp::PublishOutcome::Confirmed)) {
            crate::metrics::record_deferral(&deferral.reason);
            tracing::info!(reason = %deferral.reason, wait_ms, count = deferral.count, "deferred");
            let notice = reply::deferred_notice(delivery, target, deferral, self.services.worker_id.to_string());
            // Informational: if it cannot be delivered, the final reply will meet the same fate.
            if let Err(e) = self.publisher.publish(notice).await {
                tracing::warn!(error = %e, "could not publish the deferred notice");
            }
        }
        settle::after_deferral(delivery, copied, wait_ms).await
    }

    async fn release(&self, lease: Option<crate::rate_limit::Lease>) {
        if let (Some(limiter), Some(lease)) = (&self.services.limiter, lease) {
            limiter.release(lease).await;
        }
    }

    /// Preparation, inference (in the next batch that fits, by the tier's priority), finishing, PNG.
    /// Also returns the size of the batch the request ran in.
    async fn render(
        &self,
        request: GenerationRequest,
        class: usize,
        since: OffsetDateTime,
        timings: &mut Timings,
    ) -> Result<(Rendered, Option<usize>), InferenceError> {
        let started = Instant::now();
        let registry = Arc::clone(&self.services.registry);
        let model = request.model.clone();
        let prepared = match self
            .services
            .cpu
            .run_as(class, move || registry.prepare(&request).map(|p| (p, request)))
            .await
        {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(error)) => return Ok((Err(error), None)),
            Err(failure) => return Ok((Err(internal(&failure)), None)),
        };
        timings.preprocess = ms(started.elapsed());
        let (prepared, request) = prepared;
        let tier = self.services.schedule.class(class);
        // Preparation can take a while for big images; check the deadline again before the device.
        if let Some(expired) = past_deadline(&request, tier, since, "inference") {
            return Ok((Err(expired), None));
        }
        let options = JobOptions {
            class,
            deadline: effective_deadline(&request, tier, since).map(instant_of),
        };
        let inferred = self.services.inference.infer(&model, prepared.input, options).await?;
        timings.inference = ms(inferred.elapsed);
        timings.batch_wait = Some(ms(inferred.waited));
        let batch_size = inferred.batch_size;

        let started = Instant::now();
        let finish = prepared.finish;
        let encoded = self
            .services
            .cpu
            .run_as(class, move || {
                let image = finish.apply(&inferred.output);
                let png = encode_png(&image);
                let info = ImageInfo {
                    format: "png".into(),
                    width: image.width(),
                    height: image.height(),
                    bytes: png.len(),
                };
                (png, info)
            })
            .await;
        timings.encode = ms(started.elapsed());
        Ok((encoded.map_err(|failure| internal(&failure)), Some(batch_size)))
    }
}

/// The request's own deadline, or its tier's default counted from `since` (its creation).
fn effective_deadline(request: &GenerationRequest, tier: &TierClass, since: OffsetDateTime) -> Option<OffsetDateTime> {
    request.deadline.or_else(|| tier.default_deadline.map(|d| since + d))
}

/// The monotonic instant of a wall-clock time (now, if it is already past).
fn instant_of(at: OffsetDateTime) -> Instant {
    let ahead = (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    Instant::now() + std::time::Duration::try_from(ahead).unwrap_or_default()
}

/// The `expired` error if the deadline (the request's, or its tier's default) passed, counted at
/// `stage`.
fn past_deadline(
    request: &GenerationRequest,
    tier: &TierClass,
    since: OffsetDateTime,
    stage: &'static str,
) -> Option<RequestError> {
    let deadline = effective_deadline(request, tier, since)?;
    let now = OffsetDateTime::now_utc();
    (now > deadline).then(|| {
        crate::metrics::record_expired(stage);
        let late = (now - deadline).as_seconds_f64();
        let whose = match request.deadline {
            Some(_) => "the deadline".to_owned(),
            None => format!("the {} tier's default deadline", tier.tier),
        };
        RequestError::new(
            ErrorCode::Expired,
            format!("{whose} passed {late:.3} s before rendering could start"),
        )
    })
}

fn amqp_timestamp(delivery: &Delivery) -> Option<OffsetDateTime> {
    let seconds = (*delivery.properties.timestamp())?;
    OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).ok()?).ok()
}

fn internal(failure: &CpuTaskError) -> RequestError {
    tracing::error!(error = %failure, "image processing failed");
    RequestError::new(
        ErrorCode::Internal,
        format!("the worker failed while processing the image: {failure}"),
    )
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
