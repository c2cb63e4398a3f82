//! One delivery, from arrival to acknowledgement.
//!
//! ```text
//! delivery ─► parse ─► deadline? ─► prepare (CPU pool) ─► infer (inference thread)
//!          ─► finish + PNG (CPU pool) ─► publish reply, wait for confirm ─► settle (ack/…)
//! ```
//!
//! Every request gets exactly one reply, error or image, and is acknowledged only after the broker
//! confirmed that reply. [`settle`] is the one place that maps what happened to a broker action.

use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::amqp::publisher::{OutgoingReply, PublishOutcome, ReplyPublisher, ReplyRoute};
use crate::configuration::{FaultSettings, RequestLimits};
use crate::cpu_pool::{CpuPool, CpuTaskError};
use crate::domain::{ErrorCode, GenerationRequest, ImageInfo, PartialRequest, ReplyDocument, RequestError, Timings};
use crate::imaging::encode_png;
use crate::inference::{InferenceError, InferenceHandle, ModelRegistry};

/// Routing key on the results exchange for replies to requests whose id could not be read.
/// It cannot collide with a valid request id, which never contains `/`.
pub const INVALID_ROUTING_KEY: &str = "kiln/invalid";

/// What happened to one delivery, as the broker sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The reply was confirmed and the request acknowledged.
    Replied {
        /// The reply's error code; `None` for an image.
        error: Option<ErrorCode>,
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

/// Handles deliveries. Cheap to clone: one per connection session, shared by all delivery tasks.
#[derive(Clone)]
pub struct Worker {
    registry: Arc<ModelRegistry>,
    inference: InferenceHandle,
    cpu: Arc<CpuPool>,
    publisher: ReplyPublisher,
    worker_id: Arc<str>,
    limits: RequestLimits,
    faults: FaultSettings,
}

/// The result of rendering one request, before it becomes a reply.
type Rendered = Result<(Vec<u8>, ImageInfo), RequestError>;

/// What the reply needs from the request, whether or not it parsed.
struct ReplyTarget {
    request_id: Option<String>,
    model: Option<String>,
}

impl Worker {
    /// A worker publishing replies through `publisher`.
    pub fn new(
        registry: Arc<ModelRegistry>,
        inference: InferenceHandle,
        cpu: Arc<CpuPool>,
        publisher: ReplyPublisher,
        worker_id: Arc<str>,
        limits: RequestLimits,
        faults: FaultSettings,
    ) -> Self {
        Self {
            registry,
            inference,
            cpu,
            publisher,
            worker_id,
            limits,
            faults,
        }
    }

    /// Handle one delivery completely: reply, then settle it with the broker.
    pub async fn handle(&self, delivery: Delivery) -> Outcome {
        let span = tracing::info_span!(
            "request",
            request_id = tracing::field::Empty,
            user_id = tracing::field::Empty,
            model = tracing::field::Empty,
            redelivered = delivery.redelivered,
        );
        self.handle_inner(delivery).instrument(span).await
    }

    async fn handle_inner(&self, delivery: Delivery) -> Outcome {
        let received = Instant::now();
        let received_at = OffsetDateTime::now_utc();
        let mut timings = Timings::default();

        let (target, rendered) = match GenerationRequest::parse(&delivery.data, self.limits.max_message_bytes) {
            Err((error, partial)) => (ReplyTarget::from(partial), Err(error)),
            Ok(request) => {
                let span = tracing::Span::current();
                span.record("request_id", request.request_id.as_str());
                span.record("user_id", request.user_id.as_str());
                span.record("model", request.model.as_str());
                let enqueued = request.created_at.or_else(|| amqp_timestamp(&delivery));
                timings.queue_wait = enqueued.map(|t| ((received_at - t).as_seconds_f64() * 1000.0).max(0.0));
                let target = ReplyTarget {
                    request_id: Some(request.request_id.to_string()),
                    model: Some(request.model.clone()),
                };
                match self.render(request, &mut timings).await {
                    Ok(rendered) => (target, rendered),
                    // The inference thread is gone: this worker cannot serve anyone. Let another.
                    Err(InferenceError::Unavailable) => {
                        return settle_without_reply(&delivery, "the inference thread is not running").await
                    }
                    Err(InferenceError::Failed(message)) => {
                        (target, Err(RequestError::new(ErrorCode::InferenceFailed, message)))
                    }
                }
            }
        };
        timings.total = ms(received.elapsed());

        let reply = self.reply(&delivery, target, rendered, timings);
        if self.faults.abort_before_reply {
            tracing::error!("faults.abort_before_reply is set: aborting before the reply is published");
            std::process::abort();
        }
        let error = reply.document.error.as_ref().map(|e| e.code);
        let total_ms = reply.document.timings_ms.total;
        let published = self.publisher.publish(reply).await;
        let outcome = settle(&delivery, published, error).await;
        match &outcome {
            Outcome::Replied { error: None } => tracing::info!(total_ms, "replied"),
            Outcome::Replied { error: Some(code) } => tracing::info!(error_code = %code, "replied with an error"),
            other => tracing::warn!(outcome = ?other, "request not replied to"),
        }
        outcome
    }

    /// Parse-independent work: deadline, preparation, inference, finishing, PNG.
    async fn render(&self, request: GenerationRequest, timings: &mut Timings) -> Result<Rendered, InferenceError> {
        if let Some(expired) = past_deadline(&request) {
            return Ok(Err(expired));
        }
        let started = Instant::now();
        let registry = Arc::clone(&self.registry);
        let model = request.model.clone();
        let prepared = match self
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
        // Preparation can take a while for big images; check the deadline again before the GPU.
        if let Some(expired) = past_deadline(&request) {
            return Ok(Err(expired));
        }

        let inferred = self.inference.infer(&model, prepared.input).await?;
        timings.inference = ms(inferred.elapsed);

        let started = Instant::now();
        let finish = prepared.finish;
        let encoded = self
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

    fn reply(&self, delivery: &Delivery, target: ReplyTarget, rendered: Rendered, timings: Timings) -> OutgoingReply {
        let props = &delivery.properties;
        let route = match props.reply_to() {
            Some(queue) if !queue.as_str().is_empty() => ReplyRoute::ReplyTo(queue.to_string()),
            _ => ReplyRoute::Results(
                target
                    .request_id
                    .clone()
                    .unwrap_or_else(|| INVALID_ROUTING_KEY.to_owned()),
            ),
        };
        let correlation_id = props
            .correlation_id()
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| target.request_id.clone())
            .unwrap_or_default();
        let worker_id = self.worker_id.to_string();
        let (document, body) = match rendered {
            Ok((png, info)) => {
                let doc = ReplyDocument::ok(
                    target.request_id.unwrap_or_default(),
                    target.model.unwrap_or_default(),
                    info,
                    timings,
                    worker_id,
                );
                (doc, png)
            }
            Err(error) => {
                let doc = ReplyDocument::error(target.request_id, target.model, &error, timings, worker_id);
                let body = serde_json::to_vec(&doc).expect("a reply document always serialises");
                (doc, body)
            }
        };
        OutgoingReply {
            route,
            correlation_id,
            document,
            body,
        }
    }
}

impl From<PartialRequest> for ReplyTarget {
    fn from(partial: PartialRequest) -> Self {
        Self {
            request_id: partial.request_id.map(|id| id.to_string()),
            model: partial.model,
        }
    }
}

/// The ack policy, in one place.
///
/// | what happened                          | broker action                         |
/// |----------------------------------------|---------------------------------------|
/// | reply (image or error) confirmed       | ack                                   |
/// | reply unroutable (no queue for it)     | reject, no requeue → dead-letter queue |
/// | reply nacked by the broker             | nack, requeue → retried later         |
/// | channel or connection gone             | nothing possible → broker redelivers  |
/// | inference thread gone (no reply made)  | nack, requeue → another worker        |
async fn settle(delivery: &Delivery, published: lapin::Result<PublishOutcome>, error: Option<ErrorCode>) -> Outcome {
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
    match action {
        Ok(_) => outcome,
        Err(e) => Outcome::Abandoned {
            reason: format!("settling the request failed: {e}"),
        },
    }
}

async fn settle_without_reply(delivery: &Delivery, why: &str) -> Outcome {
    match delivery.nack(requeue()).await {
        Ok(_) => Outcome::Requeued { reason: why.to_owned() },
        Err(e) => Outcome::Abandoned {
            reason: format!("{why}; requeueing failed: {e}"),
        },
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        multiple: false,
    }
}

fn past_deadline(request: &GenerationRequest) -> Option<RequestError> {
    let deadline = request.deadline?;
    let now = OffsetDateTime::now_utc();
    (now > deadline).then(|| {
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
