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
use crate::amqp::Topology;
use crate::configuration::{FaultSettings, RequestLimits};
use crate::cpu_pool::{CpuPool, CpuTaskError};
use crate::domain::{Deferral, ErrorCode, GenerationRequest, ImageInfo, RequestError, Timings};
use crate::imaging::encode_png;
use crate::inference::{InferenceError, InferenceHandle, ModelRegistry};
use crate::rate_limit::Limiter;
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

    /// Handle one delivery completely: reply (or defer), then settle it with the broker.
    pub async fn handle(&self, delivery: Delivery) -> Outcome {
        // The producer's W3C trace (or a new one): on the span, and on every reply (the publisher
        // reads it from the task-local scope).
        let trace = TraceContext::from_headers(delivery.properties.headers().as_ref());
        let span = tracing::info_span!(
            "request",
            request_id = tracing::field::Empty,
            user_id = tracing::field::Empty,
            model = tracing::field::Empty,
            redelivered = delivery.redelivered,
            trace_id = %trace.own.trace_id_hex(),
            span_id = %trace.own.span_id_hex(),
            parent_span_id = tracing::field::Empty,
        );
        if let Some(parent) = &trace.incoming {
            span.record("parent_span_id", parent.span_id_hex());
        }
        let mut observed = Observed::start();
        let outcome = trace_context::scope(trace, self.handle_inner(delivery, &mut observed))
            .instrument(span)
            .await;
        observed.finish(&outcome);
        outcome
    }

    async fn handle_inner(&self, delivery: Delivery, observed: &mut Observed) -> Outcome {
        let received = Instant::now();
        let received_at = OffsetDateTime::now_utc();
        let mut timings = Timings::default();
        let mut lease = None;

        let (target, rendered) = match GenerationRequest::parse(&delivery.data, self.services.limits.max_message_bytes)
        {
            Err((error, partial)) => (ReplyTarget::from(partial), Err(error)),
            Ok(request) => {
                let span = tracing::Span::current();
                span.record("request_id", request.request_id.as_str());
                span.record("user_id", request.user_id.as_str());
                span.record("model", request.model.as_str());
                let enqueued = request.created_at.or_else(|| amqp_timestamp(&delivery));
                timings.queue_wait = enqueued.map(|t| ((received_at - t).as_seconds_f64() * 1000.0).max(0.0));
                observed.parsed(&self.services.registry, &request.model, timings.queue_wait);
                let mut target = ReplyTarget {
                    request_id: Some(request.request_id.to_string()),
                    model: Some(request.model.clone()),
                    rate_limit: None,
                };
                let admission = match past_deadline(&request, "admission") {
                    Some(expired) => Admission::Refuse {
                        error: expired,
                        rate_limit: None,
                    },
                    None => {
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
                        target.rate_limit = rate_limit;
                        match self.render(request, &mut timings).await {
                            Ok(rendered) => (target, rendered),
                            Err(InferenceError::Unavailable) => {
                                // The inference thread is gone: this worker cannot serve anyone.
                                let outcome =
                                    settle::without_reply(&delivery, "the inference thread is not running").await;
                                self.release(lease).await;
                                return outcome;
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
                        return self.defer(&delivery, &request, target, deferral, timings).await;
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
        request: &GenerationRequest,
        target: ReplyTarget,
        mut deferral: Deferral,
        timings: Timings,
    ) -> Outcome {
        let (queue, wait_ms) = self.services.topology.delay_queue_for(deferral.retry_after_ms);
        deferral.retry_after_ms = wait_ms;
        let back_at = OffsetDateTime::now_utc() + std::time::Duration::from_millis(wait_ms);
        if request.deadline.is_some_and(|deadline| deadline < back_at) {
            crate::metrics::record_expired("deferral");
            let error = RequestError::new(
                ErrorCode::RateLimited,
                format!(
                    "over a {} limit, and waiting {wait_ms} ms would pass the request's deadline",
                    deferral.reason
                ),
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
        let copied = self.publisher.defer(delivery, queue, deferral.count).await;
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

    /// Preparation, inference, finishing, PNG.
    async fn render(&self, request: GenerationRequest, timings: &mut Timings) -> Result<Rendered, InferenceError> {
        let started = Instant::now();
        let registry = Arc::clone(&self.services.registry);
        let model = request.model.clone();
        let prepared = match self
            .services
            .cpu
            .run(move || registry.prepare(&request).map(|p| (p, request)))
            .await
        {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(error)) => return Ok(Err(error)),
            Err(failure) => return Ok(Err(internal(&failure))),
        };
        timings.preprocess = ms(started.elapsed());
        let (prepared, request) = prepared;
        // Preparation can take a while for big images; check the deadline again before the device.
        if let Some(expired) = past_deadline(&request, "inference") {
            return Ok(Err(expired));
        }

        let inferred = self.services.inference.infer(&model, prepared.input).await?;
        timings.inference = ms(inferred.elapsed);

        let started = Instant::now();
        let finish = prepared.finish;
        let encoded = self
            .services
            .cpu
            .run(move || {
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
        Ok(encoded.map_err(|failure| internal(&failure)))
    }
}

/// The `expired` error if the deadline passed (counted at `stage`).
fn past_deadline(request: &GenerationRequest, stage: &'static str) -> Option<RequestError> {
    let deadline = request.deadline?;
    let now = OffsetDateTime::now_utc();
    (now > deadline).then(|| {
        crate::metrics::record_expired(stage);
        let late = (now - deadline).as_seconds_f64();
        RequestError::new(
            ErrorCode::Expired,
            format!("the deadline passed {late:.3} s before rendering could start"),
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
