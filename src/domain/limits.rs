//! What producers are told about rate limits.

use serde::{Deserialize, Serialize};

/// Which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Sustained rate with burst, in cost units.
    Rate,
    /// Cost units per UTC day.
    DailyQuota,
    /// Requests being worked on at once.
    InFlight,
}

/// A limit's state as a reply reports it (field `rate_limit`, and the `x-ratelimit-*` and
/// `retry-after` headers, in the spirit of HTTP's conventions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitInfo {
    /// Which limit.
    pub scope: Scope,
    /// The user's tier.
    pub tier: String,
    /// The limit's size (units; requests for `in_flight`).
    pub limit: u64,
    /// What is left of it.
    pub remaining: u64,
    /// Milliseconds until it is fully replenished.
    pub reset_ms: u64,
    /// Milliseconds until the request would be admitted (0 when it was).
    pub retry_after_ms: u64,
}

/// Why a request was deferred, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deferral {
    /// Milliseconds until the request comes back to the queue.
    pub retry_after_ms: u64,
    /// The limit that deferred it, or `limiter_unavailable` (Redis down under `fail_closed`).
    pub reason: String,
    /// How many times this request has been deferred, this time included.
    pub count: u32,
}
