//! Signed requests: which producer published a request, checked before anything is charged or
//! rendered (docs/contract.md, *Signed requests*).
//!
//! - [`signature`]: the canonical string, the `kiln-signature` header, HMAC-SHA256 (producers sign
//!   with [`Signer`], the worker verifies).
//! - [`settings`]: `[auth]`: the policy (`off`, `optional`, `required`), freshness, the keys and
//!   what each may speak for.
//! - [`replay`]: the signatures already accepted, fleet-wide in Redis.
//!
//! [`Authenticator`] is the worker's side, in three steps of a delivery's journey:
//!
//! | step | when | refused as |
//! | --- | --- | --- |
//! | [`Authenticator::verify`] | on arrival, before the body is parsed | `missing` (policy `required`), `bad_signature`, `unknown_key`, `forbidden_queue`, `stale` |
//! | [`Authenticator::check_user`] | once the body parsed | `forbidden_user` |
//! | [`Authenticator::remember`] | before the limiter | `replayed` (acked, no reply), `stale` (a redelivery never accepted) |
//!
//! Each refusal is an `unauthenticated` error reply (a replay excepted: its first delivery answers
//! it), counted in `kiln_unauthenticated_total{reason}` and logged at WARN with the key id, never
//! the secret or the signature.
//!
//! **Replays and redeliveries.** The signature covers the body and the properties, so a second
//! message with an accepted signature is the same message. Published again (by whoever captured
//! it, or a producer retrying a publish without signing anew), it is a replay; delivered again by
//! the broker (`redelivered`: a worker died or gave it back), it is the same request, handled by
//! the exactly-once records like any redelivery, and its age is not held against it. A deferred
//! request's copy is signed anew by the worker, for the moment it comes back (see
//! [`Authenticator::resign`]).

pub mod replay;
pub mod settings;
pub mod signature;

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use secrecy::SecretString;

use crate::domain::{ErrorCode, RequestError};
use crate::rate_limit::{RateLimitSettings, RedisLimiter};
use replay::{Remembered, ReplayRecords};
pub use settings::{AuthSettings, KeySettings, Policy};
pub use signature::{Covered, SignatureError, SignatureHeader, Signer, HEADER};

/// Why a request was refused as unauthenticated: the `reason` of `kiln_unauthenticated_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Unsigned, under policy `required`.
    Missing,
    /// Signed too long ago (or too far ahead of the worker's clock).
    Stale,
    /// A signature already accepted, on a message the broker did not redeliver.
    Replayed,
    /// A malformed header, or a MAC that does not match the message.
    BadSignature,
    /// A key id the worker does not hold.
    UnknownKey,
    /// A user id outside the key's `user_prefixes`.
    ForbiddenUser,
    /// A request queue outside the key's `queues`.
    ForbiddenQueue,
}

impl Reason {
    /// Every reason, for the metric's series.
    pub const ALL: [Reason; 7] = [
        Reason::Missing,
        Reason::Stale,
        Reason::Replayed,
        Reason::BadSignature,
        Reason::UnknownKey,
        Reason::ForbiddenUser,
        Reason::ForbiddenQueue,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Stale => "stale",
            Reason::Replayed => "replayed",
            Reason::BadSignature => "bad_signature",
            Reason::UnknownKey => "unknown_key",
            Reason::ForbiddenUser => "forbidden_user",
            Reason::ForbiddenQueue => "forbidden_queue",
        }
    }
}

/// A request whose signature checked out.
#[derive(Debug, Clone)]
pub struct Verified {
    header: SignatureHeader,
    /// Its time is within `max_age_ms` and `max_skew_ms` of the worker's clock.
    fresh: bool,
    /// [`Authenticator::remember`] let it through: its deferred copy may be signed anew.
    accepted: bool,
}

impl Verified {
    /// The key that signed it.
    pub fn key_id(&self) -> &str {
        &self.header.key_id
    }
}

/// What the replay records make of a verified request.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayCheck {
    /// Go on: first seen, or the broker's redelivery of a message accepted before.
    Go,
    /// The same signed message again, not a redelivery: ack it without a reply.
    Replayed,
    /// Answer with this error: a redelivery whose stale signature was never accepted.
    Refused(RequestError),
    /// Nothing is known (Redis down, `fail_closed`): defer it this long.
    Unavailable {
        /// How long the copy waits.
        retry_after_ms: u64,
    },
}

struct Key {
    secret: SecretString,
    user_prefixes: Vec<String>,
    queues: Vec<String>,
}

/// The worker's side of signed requests; one per process.
pub struct Authenticator {
    policy: Policy,
    max_age_ms: i64,
    max_skew_ms: i64,
    keys: BTreeMap<String, Key>,
    /// `None` with policy `off`.
    records: Option<ReplayRecords>,
    retry_ms: u64,
}

impl Authenticator {
    /// Policy `off`: every request passes, unlooked at.
    pub fn off() -> Self {
        Self {
            policy: Policy::Off,
            max_age_ms: 0,
            max_skew_ms: 0,
            keys: BTreeMap::new(),
            records: None,
            retry_ms: 1_000,
        }
    }

    /// Load the keys (secret files are read here) and, unless the policy is `off`, the replay
    /// records in the Redis of `rate_limit` (on `redis`, the limiter's connection, when given).
    pub fn new(
        settings: &AuthSettings,
        rate_limit: &RateLimitSettings,
        redis: Option<RedisLimiter>,
    ) -> anyhow::Result<Self> {
        if settings.policy == Policy::Off {
            return Ok(Self::off());
        }
        let mut keys = BTreeMap::new();
        for (id, key) in &settings.keys {
            keys.insert(
                id.clone(),
                Key {
                    secret: key.load_secret(id)?,
                    user_prefixes: key.user_prefixes.clone(),
                    queues: key.queues.clone(),
                },
            );
        }
        let redis = match redis {
            Some(redis) => redis,
            None => RedisLimiter::new(std::sync::Arc::new(rate_limit.clone()))?,
        };
        let ttl = Duration::from_millis(settings.max_age_ms.saturating_add(settings.max_skew_ms));
        Ok(Self {
            policy: settings.policy,
            max_age_ms: i64::try_from(settings.max_age_ms).unwrap_or(i64::MAX),
            max_skew_ms: i64::try_from(settings.max_skew_ms).unwrap_or(i64::MAX),
            keys,
            records: Some(ReplayRecords::new(redis, rate_limit, ttl)),
            retry_ms: rate_limit.redis_retry_ms.max(1_000),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Step 1, before the body is parsed: the header, the key, the MAC, the queue, the age. `Ok(None)`:
    /// an unsigned request the policy lets through (or policy `off`). A stale signature passes only
    /// on a redelivery, for [`Authenticator::remember`] to judge.
    pub fn verify(
        &self,
        headers: Option<&FieldTable>,
        covered: &Covered<'_>,
        redelivered: bool,
        now_ms: i64,
    ) -> Result<Option<Verified>, RequestError> {
        if self.policy == Policy::Off {
            return Ok(None);
        }
        let value = match headers.and_then(|h| h.inner().get(HEADER)) {
            None if self.policy == Policy::Optional => return Ok(None),
            None => {
                return Err(refuse(
                    Reason::Missing,
                    None,
                    format!("this worker serves signed requests only, and this one has no {HEADER} header"),
                ))
            }
            Some(AMQPValue::LongString(value)) => std::str::from_utf8(value.as_bytes()).ok(),
            Some(_) => None,
        };
        let header = value
            .ok_or_else(|| SignatureError::Malformed("not a UTF-8 string".into()))
            .and_then(SignatureHeader::parse)
            .map_err(|e| refuse(Reason::BadSignature, None, e.to_string()))?;
        let kid = Some(header.key_id.as_str());
        let Some(key) = self.keys.get(&header.key_id) else {
            let message = format!("unknown key id {:?}", header.key_id);
            return Err(refuse(Reason::UnknownKey, kid, message));
        };
        header
            .verify(&key.secret, covered)
            .map_err(|e| refuse(Reason::BadSignature, kid, format!("{e} (key {})", header.key_id)))?;
        if !key.queues.is_empty() && !key.queues.iter().any(|q| q == covered.queue) {
            let message = format!("key {} may not publish to {}", header.key_id, covered.queue);
            return Err(refuse(Reason::ForbiddenQueue, kid, message));
        }
        let age_ms = now_ms.saturating_sub(header.timestamp_ms);
        let fresh = (-self.max_skew_ms..=self.max_age_ms).contains(&age_ms);
        if !fresh && !redelivered {
            return Err(self.stale(&header, age_ms));
        }
        Ok(Some(Verified {
            header,
            fresh,
            accepted: false,
        }))
    }

    /// Step 2, once the body parsed: may the key speak for this user?
    pub fn check_user(&self, verified: &Verified, user_id: &str) -> Result<(), RequestError> {
        let key = &self.keys[&verified.header.key_id];
        if key.user_prefixes.is_empty() || key.user_prefixes.iter().any(|p| user_id.starts_with(p.as_str())) {
            return Ok(());
        }
        let message = format!(
            "key {} may not sign for user {user_id:?} (its users start with {})",
            verified.header.key_id,
            key.user_prefixes.join(" or ")
        );
        Err(refuse(Reason::ForbiddenUser, Some(verified.key_id()), message))
    }

    /// Step 3, before the limiter: remember the signature; a signature seen before is a replay
    /// unless the broker `redelivered` the message.
    pub async fn remember(&self, verified: &mut Verified, redelivered: bool) -> ReplayCheck {
        let Some(records) = &self.records else {
            return ReplayCheck::Go;
        };
        let remembered = records.remember(&signature::hex(&verified.header.mac)).await;
        let check = match judge(remembered, verified.fresh, redelivered) {
            Judgement::Go => ReplayCheck::Go,
            Judgement::Stale => {
                let age_ms = crate::rate_limit::now_ms().saturating_sub(verified.header.timestamp_ms);
                ReplayCheck::Refused(self.stale(&verified.header, age_ms))
            }
            Judgement::Replayed => {
                let message = "a signed message accepted before, published again: acked without a reply (its \
                               first delivery answers it)";
                count_and_log(Reason::Replayed, Some(verified.key_id()), message);
                ReplayCheck::Replayed
            }
            Judgement::Unknown => ReplayCheck::Unavailable {
                retry_after_ms: self.retry_ms,
            },
        };
        verified.accepted = check == ReplayCheck::Go;
        check
    }

    /// The signature for a deferred copy of an accepted request, made with its key for `at_ms`,
    /// the moment the copy comes back: a copy can wait longer than `max_age_ms` in the delay
    /// queues, and its new signature is a new record, so it is not its own replay. `None` when
    /// the request was not accepted (it keeps its signature).
    pub fn resign(&self, verified: &Verified, covered: &Covered<'_>, at_ms: i64) -> Option<String> {
        if !verified.accepted {
            return None;
        }
        let key = self.keys.get(&verified.header.key_id)?;
        let signer = Signer::new(verified.header.key_id.clone(), key.secret.clone());
        signer.sign(at_ms, covered).ok().map(|header| header.value())
    }

    fn stale(&self, header: &SignatureHeader, age_ms: i64) -> RequestError {
        let message = if age_ms < 0 {
            format!(
                "the signature's time is {:.1} s ahead of the worker's clock; at most {:.1} s is allowed",
                -age_ms as f64 / 1000.0,
                self.max_skew_ms as f64 / 1000.0
            )
        } else {
            format!(
                "the signature is {:.1} s old; at most {:.1} s is allowed",
                age_ms as f64 / 1000.0,
                self.max_age_ms as f64 / 1000.0
            )
        };
        refuse(Reason::Stale, Some(&header.key_id), message)
    }
}

/// What the replay rule makes of a verified request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judgement {
    Go,
    Stale,
    Replayed,
    /// Nothing is known: Redis is down under `fail_closed`.
    Unknown,
}

/// The replay rule, from what the records say, whether the signature is fresh, and whether the
/// broker redelivered the message.
fn judge(remembered: Remembered, fresh: bool, redelivered: bool) -> Judgement {
    match (remembered, fresh, redelivered) {
        (Remembered::Unavailable, ..) => Judgement::Unknown,
        // First seen and fresh; or the broker's redelivery of a message accepted before, however old.
        (Remembered::First, true, _) | (Remembered::Again, _, true) => Judgement::Go,
        // A stale redelivery of a message no worker accepted: its first delivery never got this far.
        (Remembered::First, false, _) => Judgement::Stale,
        (Remembered::Again, _, false) => Judgement::Replayed,
    }
}

/// What a delivery's signature covers: `queue` is the request queue it was consumed from.
pub fn covered<'a>(delivery: &'a Delivery, queue: &'a str) -> Covered<'a> {
    let properties = &delivery.properties;
    Covered {
        queue,
        reply_to: properties.reply_to().as_ref().map_or("", |s| s.as_str()),
        correlation_id: properties.correlation_id().as_ref().map_or("", |s| s.as_str()),
        body: &delivery.data,
    }
}

/// Count and log a refusal: the reason and the key id, never the secret or the signature.
fn count_and_log(reason: Reason, key_id: Option<&str>, message: &str) {
    crate::metrics::record_unauthenticated(reason.as_str());
    tracing::warn!(reason = reason.as_str(), key_id, "unauthenticated request: {message}");
}

/// [`count_and_log`], and the error reply's error.
fn refuse(reason: Reason, key_id: Option<&str>, message: String) -> RequestError {
    count_and_log(reason, key_id, &message);
    RequestError::new(ErrorCode::Unauthenticated, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_795_823_940_000;

    fn settings(policy: Policy) -> AuthSettings {
        let mut s = AuthSettings {
            policy,
            ..Default::default()
        };
        s.keys.insert(
            "acme".into(),
            KeySettings {
                secret: Some(SecretString::from(SECRET)),
                user_prefixes: vec!["acme:".into()],
                queues: vec!["kiln.requests.free".into(), "kiln.requests".into()],
                ..Default::default()
            },
        );
        s
    }

    fn auth(policy: Policy) -> Authenticator {
        Authenticator::new(&settings(policy), &RateLimitSettings::default(), None).unwrap()
    }

    fn covered(queue: &str) -> Covered<'_> {
        Covered {
            queue,
            reply_to: "amq.gen-1",
            correlation_id: "c-1",
            body: br#"{"user_id":"acme:42"}"#,
        }
    }

    fn headers(value: &str) -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(HEADER.into(), AMQPValue::LongString(value.into()));
        h
    }

    fn signed(kid: &str, secret: &str, ts: i64, covered: &Covered<'_>) -> FieldTable {
        let header = Signer::new(kid, SecretString::from(secret)).sign(ts, covered).unwrap();
        headers(&header.value())
    }

    fn code(result: Result<Option<Verified>, RequestError>) -> Option<ErrorCode> {
        result.err().map(|e| e.code)
    }

    #[tokio::test]
    async fn a_good_signature_passes_and_names_its_key() {
        let a = auth(Policy::Required);
        let c = covered("kiln.requests.free");
        let verified = a
            .verify(Some(&signed("acme", SECRET, NOW, &c)), &c, false, NOW + 1_000)
            .unwrap()
            .unwrap();
        assert_eq!(verified.key_id(), "acme");
        a.check_user(&verified, "acme:42").unwrap();
    }

    #[tokio::test]
    async fn each_refusal_is_unauthenticated() {
        let a = auth(Policy::Required);
        let c = covered("kiln.requests.free");
        let unauthenticated = Some(ErrorCode::Unauthenticated);
        // Unsigned, under `required`.
        assert_eq!(code(a.verify(None, &c, false, NOW)), unauthenticated);
        // Another key's secret, an unknown key id, a malformed header.
        let forged = signed("acme", "fedcba9876543210fedcba9876543210", NOW, &c);
        assert_eq!(code(a.verify(Some(&forged), &c, false, NOW)), unauthenticated);
        let unknown = signed("globex", SECRET, NOW, &c);
        assert_eq!(code(a.verify(Some(&unknown), &c, false, NOW)), unauthenticated);
        assert_eq!(
            code(a.verify(Some(&headers("v1;kid=acme")), &c, false, NOW)),
            unauthenticated
        );
        // Signed for another body.
        let tampered = Covered {
            body: br#"{"user_id":"acme:43"}"#,
            ..c
        };
        let header = signed("acme", SECRET, NOW, &c);
        assert_eq!(code(a.verify(Some(&header), &tampered, false, NOW)), unauthenticated);
        // A queue the key may not use (signed for it all the same).
        let pro = covered("kiln.requests.pro");
        assert_eq!(
            code(a.verify(Some(&signed("acme", SECRET, NOW, &pro)), &pro, false, NOW)),
            unauthenticated
        );
        // Too old, or too far ahead.
        let old = NOW - 900_001;
        assert_eq!(
            code(a.verify(Some(&signed("acme", SECRET, old, &c)), &c, false, NOW)),
            unauthenticated
        );
        let ahead = NOW + 300_001;
        assert_eq!(
            code(a.verify(Some(&signed("acme", SECRET, ahead, &c)), &c, false, NOW)),
            unauthenticated
        );
        // A user outside the key's namespace.
        let verified = a.verify(Some(&header), &c, false, NOW).unwrap().unwrap();
        assert_eq!(
            a.check_user(&verified, "globex:1").unwrap_err().code,
            ErrorCode::Unauthenticated
        );
    }

    #[tokio::test]
    async fn optional_lets_unsigned_through_but_not_wrongly_signed() {
        let a = auth(Policy::Optional);
        let c = covered("kiln.requests");
        assert!(a.verify(None, &c, false, NOW).unwrap().is_none());
        let forged = signed("acme", "fedcba9876543210fedcba9876543210", NOW, &c);
        assert_eq!(
            code(a.verify(Some(&forged), &c, false, NOW)),
            Some(ErrorCode::Unauthenticated)
        );
        let off = Authenticator::off();
        assert!(
            off.verify(Some(&forged), &c, false, NOW).unwrap().is_none(),
            "off looks at nothing"
        );
    }

    #[tokio::test]
    async fn a_stale_redelivery_is_left_to_the_replay_records() {
        let a = auth(Policy::Required);
        let c = covered("kiln.requests");
        let old = NOW - 3_600_000;
        let verified = a
            .verify(Some(&signed("acme", SECRET, old, &c)), &c, true, NOW)
            .unwrap()
            .unwrap();
        assert!(!verified.fresh);
    }

    #[tokio::test]
    async fn only_an_accepted_request_is_signed_anew_and_the_new_signature_verifies() {
        let a = auth(Policy::Required);
        let c = covered("kiln.requests");
        let mut verified = a
            .verify(Some(&signed("acme", SECRET, NOW, &c)), &c, false, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(a.resign(&verified, &c, NOW + 60_000), None);
        verified.accepted = true;
        let fresh = a.resign(&verified, &c, NOW + 3_600_000).unwrap();
        let again = a
            .verify(Some(&headers(&fresh)), &c, false, NOW + 3_600_500)
            .unwrap()
            .unwrap();
        assert_eq!(again.key_id(), "acme");
        assert_ne!(again.header.mac, verified.header.mac);
    }

    #[test]
    fn a_signature_seen_before_is_a_replay_unless_the_broker_redelivers_it() {
        use Remembered::{Again, First, Unavailable};
        // (what the records say, fresh, redelivered) → judgement
        let table = [
            ((First, true, false), Judgement::Go),
            ((First, true, true), Judgement::Go),
            ((Again, true, true), Judgement::Go),
            ((Again, false, true), Judgement::Go),
            ((Again, true, false), Judgement::Replayed),
            ((First, false, true), Judgement::Stale),
            ((Unavailable, true, false), Judgement::Unknown),
            ((Unavailable, true, true), Judgement::Unknown),
        ];
        for ((remembered, fresh, redelivered), expected) in table {
            assert_eq!(
                judge(remembered, fresh, redelivered),
                expected,
                "{remembered:?} {fresh} {redelivered}"
            );
        }
    }

    #[test]
    fn every_reason_has_its_label() {
        let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "missing",
                "stale",
                "replayed",
                "bad_signature",
                "unknown_key",
                "forbidden_user",
                "forbidden_queue"
            ]
        );
    }
}
