//! Exactly-once effects over at-least-once delivery: each request's final outcome is recorded in
//! Redis once its reply is confirmed, so a copy of a request that was already answered (a
//! redelivery after a worker died between the confirm and the ack, or the producer publishing it
//! again) is acked without rendering, charging or replying again.
//!
//! | arrives, and its record is…                 | then                                            |
//! |---------------------------------------------|-------------------------------------------------|
//! | absent                                      | served as usual; recorded after the confirm     |
//! | present, same body (SHA-256)                | acked, nothing else; its lease (if any) returned |
//! | present, another body                       | `duplicate_request_id` error reply, not recorded |
//! | unreadable (Redis down or slow)             | served as usual (at least once), counted         |
//!
//! The record is written after the reply's confirm and before the ack: written before, a crash
//! before the confirm would leave a request recorded as answered that never was (lost); written
//! after, the only window left is between the confirm and the record (one Redis round trip), where
//! a crash makes the broker redeliver and the request is answered again. That copy is the same
//! reply for the producer: a final reply's `message_id` is `final:<request_id>` on every copy
//! (producers drop one they have seen), and the user is charged once (the limiter remembers the
//! charge, `decide.lua`'s `charged` key). Records live under the user's hash tag, so they follow
//! the user's Redis Cluster slot, for `rate_limit.request_record_ttl_secs`. They need Redis: with
//! `rate_limit.enabled = false` there are none (delivery is at least once, with the same
//! `message_id` on every copy).

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::auth::signature::hex;
use crate::domain::ErrorCode;
use crate::rate_limit::Limiter;

/// What the record says about an arriving request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    /// Not answered yet (or unknown: Redis did not say).
    New,
    /// Answered already, with this body: ack it and do nothing else.
    Answered,
    /// Its id was answered already, for another body.
    Conflict {
        /// What that request got: `ok` or its error code.
        answered: String,
    },
}

/// The record of one request, made on arrival and written after its reply is confirmed.
#[derive(Debug, Clone)]
pub(super) struct Record {
    user: String,
    request_id: String,
    body_sha256: String,
}

impl Record {
    /// The record of `body`, request `request_id` of `user`.
    pub(super) fn new(user: &str, request_id: &str, body: &[u8]) -> Self {
        Self {
            user: user.to_owned(),
            request_id: request_id.to_owned(),
            body_sha256: hex(&Sha256::digest(body)),
        }
    }

    /// What the stored record says about this request.
    pub(super) async fn look_up(&self, limiter: &Limiter) -> Seen {
        let timeout = Duration::from_millis(limiter.settings().redis_timeout_ms);
        let stored = tokio::time::timeout(timeout, limiter.redis().outcome(&self.user, &self.request_id)).await;
        match stored {
            Ok(Ok(None)) => Seen::New,
            Ok(Ok(Some(stored))) => self.compare(&stored),
            Ok(Err(error)) => {
                crate::metrics::record_redis_error("outcome");
                tracing::warn!(%error, "could not read the request's outcome record: serving it (at least once)");
                Seen::New
            }
            Err(_) => {
                crate::metrics::record_redis_error("outcome");
                tracing::warn!("no outcome record within the Redis timeout: serving the request (at least once)");
                Seen::New
            }
        }
    }

    fn compare(&self, stored: &str) -> Seen {
        // "v1 <sha256 of the body> <ok | error code>"
        let mut fields = stored.split(' ');
        let (_version, sha, answered) = (fields.next(), fields.next(), fields.next().unwrap_or("ok"));
        if sha == Some(self.body_sha256.as_str()) {
            Seen::Answered
        } else {
            Seen::Conflict {
                answered: answered.to_owned(),
            }
        }
    }

    /// Store the outcome (`error`, `None` for an image). Best effort: a failure is logged and
    /// counted, and the request is acked anyway (its reply is confirmed).
    pub(super) async fn store(&self, limiter: &Limiter, error: Option<ErrorCode>) {
        let answered = error.map_or_else(|| "ok".to_owned(), |code| code.to_string());
        let value = format!("v1 {} {answered}", self.body_sha256);
        let timeout = Duration::from_millis(limiter.settings().redis_timeout_ms);
        let written = tokio::time::timeout(
            timeout,
            limiter.redis().record_outcome(&self.user, &self.request_id, &value),
        )
        .await;
        if !matches!(written, Ok(Ok(()))) {
            crate::metrics::record_redis_error("outcome");
            tracing::warn!("could not record the request's outcome: a redelivery would be answered again");
        }
    }

    /// Give back a lease the first delivery still held (it died before releasing it).
    pub(super) async fn release_lease(&self, limiter: &Limiter) {
        let _ = limiter.redis().release(&self.user, &self.request_id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_body_is_a_copy_another_body_a_conflict() {
        let record = Record::new("u1", "r1", b"{\"a\":1}");
        let stored = format!("v1 {} ok", record.body_sha256);
        assert_eq!(record.compare(&stored), Seen::Answered);
        let other = Record::new("u1", "r1", b"{\"a\":2}");
        assert_eq!(
            other.compare(&stored),
            Seen::Conflict {
                answered: "ok".to_owned()
            }
        );
        let errored = format!("v1 {} invalid_image", record.body_sha256);
        assert_eq!(
            other.compare(&errored),
            Seen::Conflict {
                answered: "invalid_image".to_owned()
            }
        );
        assert_eq!(record.body_sha256.len(), 64);
    }
}
