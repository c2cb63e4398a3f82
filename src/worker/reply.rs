//! Turning what happened to a request into the message its producer receives.

use lapin::message::Delivery;

use crate::amqp::{OutgoingReply, ReplyRoute};
use crate::domain::reply::Degraded;
use crate::domain::{
    Deferral, GenerationInfo, GenerationRequest, ImageInfo, LimitInfo, PartialRequest, ReplyDocument, ReplyStatus,
    RequestError, Timings,
};

/// Routing key on the results exchange for replies to requests whose id could not be read.
/// It cannot collide with a valid request id, which never contains `/`.
pub const INVALID_ROUTING_KEY: &str = "kiln/invalid";

/// What a reply needs to know about its request, whether or not it parsed.
#[derive(Debug, Clone, Default)]
pub(super) struct ReplyTarget {
    pub request_id: Option<String>,
    pub model: Option<String>,
    pub rate_limit: Option<LimitInfo>,
    pub batch_size: Option<usize>,
    pub degraded: Option<Degraded>,
    pub generation: Option<GenerationInfo>,
    /// The request's outcome record, written once its final reply is confirmed (exactly-once
    /// effects); `None`: not remembered (no Redis, or its id belongs to another request).
    pub record: Option<super::outcome::Record>,
}

impl ReplyTarget {
    /// The target of a parsed request.
    pub fn of(request: &GenerationRequest) -> Self {
        Self {
            request_id: Some(request.request_id.to_string()),
            model: Some(request.model.clone()),
            ..Self::default()
        }
    }
}

impl From<PartialRequest> for ReplyTarget {
    fn from(partial: PartialRequest) -> Self {
        Self {
            request_id: partial.request_id.map(|id| id.to_string()),
            model: partial.model,
            ..Self::default()
        }
    }
}

/// Where the reply goes: `reply_to`, else the results exchange under the request id.
fn route(delivery: &Delivery, target: &ReplyTarget) -> ReplyRoute {
    match delivery.properties.reply_to() {
        Some(queue) if !queue.as_str().is_empty() => ReplyRoute::ReplyTo(queue.to_string()),
        _ => ReplyRoute::Results(
            target
                .request_id
                .clone()
                .unwrap_or_else(|| INVALID_ROUTING_KEY.to_owned()),
        ),
    }
}

/// The request's `correlation_id`, else its id.
fn correlation_id(delivery: &Delivery, target: &ReplyTarget) -> String {
    delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(ToString::to_string)
        .or_else(|| target.request_id.clone())
        .unwrap_or_default()
}

/// The final reply: the PNG, or the error.
pub(super) fn final_reply(
    delivery: &Delivery,
    target: ReplyTarget,
    rendered: Result<(Vec<u8>, ImageInfo), RequestError>,
    timings: Timings,
    worker_id: String,
) -> OutgoingReply {
    let (route, correlation_id) = (route(delivery, &target), correlation_id(delivery, &target));
    let message_id = target.request_id.as_ref().map(|id| final_message_id(id));
    let (mut document, body) = match rendered {
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
        Err(error) => (
            ReplyDocument::error(target.request_id, target.model, &error, timings, worker_id),
            Vec::new(),
        ),
    };
    document.rate_limit = target.rate_limit;
    if document.status == ReplyStatus::Ok {
        document.batch_size = target.batch_size;
        document.degraded = target.degraded;
        document.generation = target.generation;
    }
    let body = if body.is_empty() { json(&document) } else { body };
    OutgoingReply {
        route,
        correlation_id,
        document,
        body,
        message_id,
    }
}

/// The `message_id` of every copy of request `request_id`'s final reply.
pub fn final_message_id(request_id: &str) -> String {
    format!("final:{request_id}")
}

/// A `deferred` notice: not final, the reply follows when the request comes back.
pub(super) fn deferred_notice(
    delivery: &Delivery,
    target: ReplyTarget,
    deferral: Deferral,
    worker_id: String,
) -> OutgoingReply {
    let (route, correlation_id) = (route(delivery, &target), correlation_id(delivery, &target));
    let document = ReplyDocument::deferred(
        target.request_id.unwrap_or_default(),
        target.model.unwrap_or_default(),
        deferral,
        target.rate_limit,
        worker_id,
    );
    OutgoingReply {
        route,
        correlation_id,
        body: json(&document),
        document,
        message_id: None,
    }
}

/// A `progress` notice: not final, `step` of the request's `steps` ran; routed and correlated like
/// the final reply that follows.
pub(super) fn progress_notice(
    delivery: &Delivery,
    target: &ReplyTarget,
    step: u32,
    steps: u32,
    worker_id: String,
) -> OutgoingReply {
    let (route, correlation_id) = (route(delivery, target), correlation_id(delivery, target));
    let document = ReplyDocument::progress(
        target.request_id.clone().unwrap_or_default(),
        target.model.clone().unwrap_or_default(),
        step,
        steps,
        worker_id,
    );
    OutgoingReply {
        route,
        correlation_id,
        body: json(&document),
        document,
        message_id: None,
    }
}

fn json(document: &ReplyDocument) -> Vec<u8> {
    serde_json::to_vec(document).expect("a reply document always serialises")
}
