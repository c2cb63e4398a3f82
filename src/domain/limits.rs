//! What producers are told about rate limits, and the work a request's cost follows from.

use serde::{Deserialize, Serialize};

/// What a request asks of the device; its cost in rate-limit units follows from it
/// (`rate_limit::CostSettings::units`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Output pixels.
    pub pixels: u64,
    /// For a diffusion request: denoising network evaluations per image, i.e. steps run × rows
    /// (1 row without guidance, 2 with classifier-free guidance, 3 for a guided edit). `None` for
    /// a single-pass model.
    pub denoising_evaluations: Option<u64>,
}

impl Work {
    /// A single-pass model's work: one evaluation of `pixels`.
    pub fn single_pass(pixels: u64) -> Self {
        Self {
            pixels,
            denoising_evaluations: None,
        }
    }
}

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
    /// What deferred it.
    pub reason: DeferralReason,
    /// How many times this request has been deferred, this time included.
    pub count: u32,
}

/// What deferred a request: one of the user's limits, the limiter's outage policy, or overload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeferralReason {
    /// The tier's rate (burst) limit.
    Rate,
    /// The tier's daily quota.
    DailyQuota,
    /// The tier's requests in flight.
    InFlight,
    /// Redis is unreachable and the limiter is configured to serve nobody meanwhile (`fail_closed`).
    LimiterUnavailable,
    /// The request waited in the broker past the overload threshold and its tier defers then.
    Overloaded,
}

impl DeferralReason {
    /// The limit behind `scope`.
    pub fn of_limit(scope: Scope) -> Self {
        match scope {
            Scope::Rate => Self::Rate,
            Scope::DailyQuota => Self::DailyQuota,
            Scope::InFlight => Self::InFlight,
        }
    }

    /// The name on the wire and in the `reason` label of `kiln_deferrals_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::DailyQuota => "daily_quota",
            Self::InFlight => "in_flight",
            Self::LimiterUnavailable => "limiter_unavailable",
            Self::Overloaded => "overloaded",
        }
    }
}

impl std::fmt::Display for DeferralReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for DeferralReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferral_reasons_are_named_on_the_wire_as_as_str_says() {
        for reason in [
            DeferralReason::Rate,
            DeferralReason::DailyQuota,
            DeferralReason::InFlight,
            DeferralReason::LimiterUnavailable,
            DeferralReason::Overloaded,
        ] {
            let wire = serde_json::to_value(reason).unwrap();
            assert_eq!(wire, serde_json::Value::from(reason.as_str()));
            assert_eq!(serde_json::from_value::<DeferralReason>(wire).unwrap(), reason);
        }
    }
}
