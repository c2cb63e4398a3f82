//! Per-user rate limits and quotas by tier, shared by every worker through Redis.
//!
//! - [`settings`]: tiers as data (rate with burst, daily quota, in-flight cap, reject or defer).
//! - [`redis`]: the fleet-wide limiter: `decide.lua`, one atomic round trip per decision.
//! - [`local`]: the in-process limiter used while Redis is unreachable (`fail_open`).
//!
//! [`Limiter`] puts them together: ask Redis (with a timeout); when it fails, apply the configured
//! policy, keep asking again every `redis_retry_ms`, and switch back as soon as Redis answers.

pub mod local;
pub mod redis;
pub mod settings;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use self::redis::{RedisLimiter, UserKeys, UserState};
pub use crate::domain::limits::{LimitInfo, Scope};
pub use local::LocalLimiter;
pub use settings::{AtLimit, RateLimitSettings, RedisDown, RedisMode, TierSettings};

/// One decision, from Redis or the local limiter.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The request may proceed.
    pub admitted: bool,
    /// It was already admitted and its lease is still held (a redelivery): nothing was charged.
    pub readmitted: bool,
    /// The limit reported (for a refusal, the one that refused).
    pub scope: Scope,
    /// The user's tier.
    pub tier: String,
    /// That limit's size.
    pub limit: u64,
    /// What is left of it.
    pub remaining: u64,
    /// Milliseconds until it is fully replenished.
    pub reset_ms: u64,
    /// Milliseconds until this request would be admitted (0 when admitted).
    pub retry_after_ms: u64,
    /// A tier record naming no configured tier (the default tier was used).
    pub unknown_tier_record: Option<String>,
    /// The cost is more than the tier's burst or daily quota: it can never be admitted (`limit` is
    /// the most it could cost).
    pub exceeds_tier: bool,
}

impl From<&Verdict> for LimitInfo {
    fn from(v: &Verdict) -> Self {
        Self {
            scope: v.scope,
            tier: v.tier.clone(),
            limit: v.limit,
            remaining: v.remaining,
            reset_ms: v.reset_ms,
            retry_after_ms: v.retry_after_ms,
        }
    }
}

/// An admission: give it back with [`Limiter::release`] when the request is done.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    user: String,
    id: String,
    local: bool,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Go ahead; release the lease afterwards.
    Admitted {
        /// Give it back when done.
        lease: Lease,
        /// The rate limit after this admission.
        info: LimitInfo,
    },
    /// Over a limit; the tier's policy says what to do.
    Limited {
        /// The limit.
        info: LimitInfo,
        /// `reject` or `defer`.
        policy: AtLimit,
    },
    /// The request costs more than the user's tier could ever admit.
    TooCostly {
        /// The tier.
        tier: String,
        /// The most a request may cost in it.
        max_units: u64,
    },
    /// Redis is down and the policy is `fail_closed`: defer for this long.
    Unavailable {
        /// Suggested delay.
        retry_after_ms: u64,
    },
}

impl Decision {
    /// The user's tier (`unknown` when Redis could not say) and the result, as metrics label
    /// them: `admitted`, `rejected`, `deferred`, `too_costly`, `unavailable`.
    pub fn label(&self) -> (&str, &'static str) {
        match self {
            Decision::Admitted { info, .. } => (info.tier.as_str(), "admitted"),
            Decision::Limited {
                info,
                policy: AtLimit::Reject,
            } => (info.tier.as_str(), "rejected"),
            Decision::Limited {
                info,
                policy: AtLimit::Defer,
            } => (info.tier.as_str(), "deferred"),
            Decision::TooCostly { tier, .. } => (tier.as_str(), "too_costly"),
            Decision::Unavailable { .. } => (crate::metrics::UNKNOWN, "unavailable"),
        }
    }
}

#[derive(Debug)]
struct Health {
    down_since: Option<Instant>,
    next_try: Instant,
}

impl Health {
    /// Redis answered: fleet-wide again.
    fn up(&mut self) {
        if let Some(since) = self.down_since.take() {
            crate::metrics::set_rate_limit_fallback(false);
            tracing::info!(
                down_seconds = since.elapsed().as_secs_f64(),
                "Redis is back: limits are fleet-wide again"
            );
        }
    }
}

/// The limiter the worker uses.
pub struct Limiter {
    settings: Arc<RateLimitSettings>,
    redis: RedisLimiter,
    local: LocalLimiter,
    /// Shared with the probe that runs while Redis is down.
    health: Arc<Mutex<Health>>,
    probing: Arc<std::sync::atomic::AtomicBool>,
}

impl Limiter {
    /// A limiter over Redis (connected lazily; an absent Redis is not a startup error).
    pub fn new(settings: RateLimitSettings) -> anyhow::Result<Self> {
        settings.validate()?;
        let settings = Arc::new(settings);
        Ok(Self {
            redis: RedisLimiter::new(Arc::clone(&settings))?,
            local: LocalLimiter::default(),
            settings,
            health: Arc::new(Mutex::new(Health {
                down_since: None,
                next_try: Instant::now(),
            })),
            probing: Arc::default(),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &RateLimitSettings {
        &self.settings
    }

    /// Whether Redis answered the last time it was asked.
    pub fn redis_healthy(&self) -> bool {
        self.health.lock().expect("not poisoned").down_since.is_none()
    }

    /// Decide for `user` asking for `cost` units; `lease_id` (the request id) names the lease.
    pub async fn decide(&self, user: &str, cost: u64, lease_id: &str) -> Decision {
        let decision = self.decide_uncounted(user, cost, lease_id).await;
        let (tier, result) = decision.label();
        crate::metrics::record_rate_limit_decision(tier, result);
        decision
    }

    async fn decide_uncounted(&self, user: &str, cost: u64, lease_id: &str) -> Decision {
        let now_ms = now_ms();
        let verdict = match self.ask_redis(user, cost, lease_id, now_ms).await {
            Some(verdict) => {
                if let Some(record) = &verdict.unknown_tier_record {
                    tracing::warn!(tier_record = %record, "a user's tier record names no configured tier; default tier used");
                }
                self.local.remember_tier(user, &verdict.tier);
                verdict
            }
            None => match self.settings.redis_down {
                RedisDown::FailClosed => {
                    return Decision::Unavailable {
                        retry_after_ms: self.settings.redis_retry_ms.max(1000),
                    }
                }
                RedisDown::FailOpen => {
                    let verdict = self.local.decide(&self.settings, user, cost, lease_id, now_ms);
                    return self.to_decision(verdict, user, lease_id, true);
                }
            },
        };
        self.to_decision(verdict, user, lease_id, false)
    }

    fn to_decision(&self, verdict: Verdict, user: &str, lease_id: &str, local: bool) -> Decision {
        if verdict.admitted {
            return Decision::Admitted {
                lease: Lease {
                    user: user.to_owned(),
                    id: lease_id.to_owned(),
                    local,
                },
                info: LimitInfo::from(&verdict),
            };
        }
        if verdict.exceeds_tier {
            return Decision::TooCostly {
                tier: verdict.tier,
                max_units: verdict.limit,
            };
        }
        let (_, tier) = self.settings.tier_or_default(Some(&verdict.tier));
        Decision::Limited {
            info: LimitInfo::from(&verdict),
            policy: tier.at_limit,
        }
    }

    /// Give a lease back; best effort (an unreturned lease expires after `lease_ttl_ms`).
    pub async fn release(&self, lease: Lease) {
        if lease.local {
            self.local.release(&lease.user, &lease.id);
        } else if let Err(e) = self.redis.release(&lease.user, &lease.id).await {
            crate::metrics::record_redis_error("release");
            tracing::warn!(error = %e, "could not release an in-flight lease; it will expire");
        }
    }

    /// Ask Redis, unless it failed recently; `None` means "use the outage policy".
    async fn ask_redis(&self, user: &str, cost: u64, lease_id: &str, now_ms: i64) -> Option<Verdict> {
        {
            let health = self.health.lock().expect("not poisoned");
            if health.down_since.is_some() && Instant::now() < health.next_try {
                return None;
            }
        }
        let timeout = Duration::from_millis(self.settings.redis_timeout_ms);
        let result = tokio::time::timeout(timeout, self.redis.decide(user, cost, lease_id, now_ms)).await;
        let mut health = self.health.lock().expect("not poisoned");
        match result {
            Ok(Ok(verdict)) => {
                health.up();
                Some(verdict)
            }
            Ok(Err(e)) => {
                crate::metrics::record_redis_error("error");
                self.mark_down(&mut health, &e.to_string());
                None
            }
            Err(_) => {
                crate::metrics::record_redis_error("timeout");
                self.mark_down(&mut health, &format!("no answer within {timeout:?}"));
                None
            }
        }
    }

    fn mark_down(&self, health: &mut Health, error: &str) {
        if health.down_since.is_none() {
            health.down_since = Some(Instant::now());
            crate::metrics::set_rate_limit_fallback(true);
            self.probe_until_up();
            match self.settings.redis_down {
                RedisDown::FailOpen => tracing::error!(
                    error,
                    "Redis unreachable: fail_open, limits now enforced by each worker on its own"
                ),
                RedisDown::FailClosed => {
                    tracing::error!(
                        error,
                        "Redis unreachable: fail_closed, requests are deferred until it answers"
                    )
                }
            }
        }
        health.next_try = Instant::now() + Duration::from_millis(self.settings.redis_retry_ms);
    }

    /// While Redis is down, ask it every `redis_retry_ms` whether it is back, so the health (and
    /// `kiln_rate_limit_fallback_active`, `/readyz`, the heartbeat) follows Redis itself, not the
    /// last decision: a worker with no requests still reports Redis back. One probe at a time.
    fn probe_until_up(&self) {
        use std::sync::atomic::Ordering;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (redis, health, probing) = (
            self.redis.clone(),
            Arc::downgrade(&self.health),
            Arc::clone(&self.probing),
        );
        let retry = Duration::from_millis(self.settings.redis_retry_ms.max(10));
        let timeout = Duration::from_millis(self.settings.redis_timeout_ms);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(retry).await;
                // Gone with its limiter, or a decision found Redis back first: done.
                let Some(health) = health.upgrade() else { break };
                if health.lock().expect("not poisoned").down_since.is_none() {
                    break;
                }
                if let Ok(Ok(())) = tokio::time::timeout(timeout, redis.ping()).await {
                    health.lock().expect("not poisoned").up();
                    break;
                }
            }
            probing.store(false, Ordering::SeqCst);
        });
    }

    /// The Redis side, for administration.
    pub fn redis(&self) -> &RedisLimiter {
        &self.redis
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock (workers are expected to run NTP).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(tier: &str) -> LimitInfo {
        LimitInfo {
            scope: Scope::Rate,
            tier: tier.into(),
            limit: 10,
            remaining: 0,
            reset_ms: 1_000,
            retry_after_ms: 100,
        }
    }

    #[test]
    fn each_decision_has_its_metric_label() {
        let lease = Lease {
            user: "u".into(),
            id: "r".into(),
            local: false,
        };
        let labelled = |decision: Decision| {
            let (tier, result) = decision.label();
            (tier.to_owned(), result)
        };
        let admitted = Decision::Admitted {
            lease,
            info: info("pro"),
        };
        assert_eq!(labelled(admitted), ("pro".into(), "admitted"));
        let limited = |policy| Decision::Limited {
            info: info("free"),
            policy,
        };
        assert_eq!(labelled(limited(AtLimit::Reject)), ("free".into(), "rejected"));
        assert_eq!(labelled(limited(AtLimit::Defer)), ("free".into(), "deferred"));
        let too_costly = Decision::TooCostly {
            tier: "plus".into(),
            max_units: 4,
        };
        assert_eq!(labelled(too_costly), ("plus".into(), "too_costly"));
        let unavailable = Decision::Unavailable { retry_after_ms: 1_000 };
        assert_eq!(labelled(unavailable), ("unknown".into(), "unavailable"));
    }
}
