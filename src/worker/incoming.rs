//! What a delivery says about its request, read once on arrival.

use lapin::message::Delivery;
use time::OffsetDateTime;

use crate::amqp::publisher::deferrals;
use crate::amqp::topology::RequestQueue;
use crate::auth::{self, Authenticator, Verified};
use crate::domain::{GenerationRequest, PartialRequest, RequestError};
use crate::scheduling::Schedule;

/// A parsed request and the facts about its delivery that the rest of the journey uses.
#[derive(Debug)]
pub(super) struct Incoming {
    /// The trusted request.
    pub request: GenerationRequest,
    /// When it was made: its `created_at`, else the AMQP timestamp, else its arrival here.
    pub since: OffsetDateTime,
    /// How long it waited in the broker, when the producer said when it was made.
    pub queue_wait: Option<time::Duration>,
    /// Its priority class: the request queue's tier until the limiter names the user's.
    pub class: usize,
    /// How many times it was deferred before.
    pub deferrals: u32,
    /// Its signature, when it was signed and the policy looks at signatures.
    pub signed: Option<Verified>,
}

impl Incoming {
    /// Check its signature (`auth`), then parse the body; an unauthenticated or unreadable one
    /// comes back with the error and what could be read.
    pub(super) fn read(
        delivery: &Delivery,
        queue: &RequestQueue,
        schedule: &Schedule,
        max_message_bytes: usize,
        auth: &Authenticator,
    ) -> Result<Self, (RequestError, PartialRequest)> {
        let received_at = OffsetDateTime::now_utc();
        // Who sent it, before the body is parsed: an unauthenticated body is not worth decoding.
        let unauthenticated = |error| {
            let partial = match delivery.data.len() <= max_message_bytes {
                true => PartialRequest::salvage(&delivery.data),
                false => PartialRequest::default(),
            };
            (error, partial)
        };
        let covered = auth::covered(delivery, &queue.name);
        let headers = delivery.properties.headers().as_ref();
        let now_ms = crate::rate_limit::now_ms();
        let signed = auth
            .verify(headers, &covered, delivery.redelivered, now_ms)
            .map_err(unauthenticated)?;
        let request = GenerationRequest::parse(&delivery.data, max_message_bytes)?;
        if let Some(signed) = &signed {
            auth.check_user(signed, request.user_id.as_str())
                .map_err(unauthenticated)?;
        }
        let enqueued = request.created_at.or_else(|| amqp_timestamp(delivery));
        Ok(Self {
            since: enqueued.unwrap_or(received_at),
            queue_wait: enqueued.map(|t| (received_at - t).max(time::Duration::ZERO)),
            class: schedule.class_of(queue.tier.as_deref()),
            deferrals: deferrals(delivery),
            request,
            signed,
        })
    }

    /// The broker wait in milliseconds, as replies and metrics report it.
    pub(super) fn queue_wait_ms(&self) -> Option<f64> {
        self.queue_wait.map(|w| w.as_seconds_f64() * 1000.0)
    }
}

fn amqp_timestamp(delivery: &Delivery) -> Option<OffsetDateTime> {
    let seconds = (*delivery.properties.timestamp())?;
    OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).ok()?).ok()
}
