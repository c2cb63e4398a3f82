//! Replay records: every accepted signature is remembered, fleet-wide in Redis, for as long as a
//! signature can be fresh, so the same signed message published again is recognised.
//!
//! One key per signature, `<rate_limit.key_prefix>:{sig:<MAC hex>}`, written with `SET NX PX`: one
//! round trip, atomic, so of two workers given the same message at once exactly one sees it first.
//! Its own hash tag spreads the keys over a Redis Cluster's slots. Redis is the limiter's, on the
//! limiter's connection settings (`rate_limit.redis_*`).
//!
//! While Redis does not answer, `rate_limit.redis_down` applies: `fail_open` remembers in this
//! process only (a replay to another worker is not caught until Redis is back); `fail_closed`
//! remembers nothing and the request waits in a delay queue until Redis answers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::rate_limit::{RateLimitSettings, RedisDown, RedisLimiter};

/// What the records say about a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remembered {
    /// Never seen before: it is remembered from now on.
    First,
    /// Seen before.
    Again,
    /// Redis does not answer and the policy is `fail_closed`: nothing is known.
    Unavailable,
}

/// The records, in Redis with an in-process fallback.
pub struct ReplayRecords {
    redis: RedisLimiter,
    key_prefix: String,
    ttl: Duration,
    timeout: Duration,
    retry: Duration,
    redis_down: RedisDown,
    /// When Redis may be asked again after it failed (`None`: it answered last time).
    down_until: Mutex<Option<Instant>>,
    local: Mutex<LocalRecords>,
}

impl ReplayRecords {
    /// Records that live `ttl` in the Redis of `rate_limit` (through `redis`, its connection).
    pub fn new(redis: RedisLimiter, rate_limit: &RateLimitSettings, ttl: Duration) -> Self {
        Self {
            redis,
            key_prefix: rate_limit.key_prefix.clone(),
            ttl,
            timeout: Duration::from_millis(rate_limit.redis_timeout_ms),
            retry: Duration::from_millis(rate_limit.redis_retry_ms),
            redis_down: rate_limit.redis_down,
            down_until: Mutex::new(None),
            local: Mutex::new(LocalRecords::default()),
        }
    }

    /// The Redis key of the signature whose MAC is `mac_hex`.
    pub fn key(&self, mac_hex: &str) -> String {
        format!("{}:{{sig:{mac_hex}}}", self.key_prefix)
    }

    /// Remember the signature `mac_hex`, and say whether it was known.
    pub async fn remember(&self, mac_hex: &str) -> Remembered {
        let skip = self
            .down_until
            .lock()
            .expect("not poisoned")
            .is_some_and(|until| Instant::now() < until);
        if !skip {
            let ttl_ms = self.ttl.as_millis().try_into().unwrap_or(u64::MAX);
            let asked = tokio::time::timeout(self.timeout, self.redis.set_once(&self.key(mac_hex), ttl_ms)).await;
            let failure = match asked {
                Ok(Ok(first)) => {
                    if self.down_until.lock().expect("not poisoned").take().is_some() {
                        tracing::info!("Redis is back: replay records are fleet-wide again");
                    }
                    return if first { Remembered::First } else { Remembered::Again };
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            crate::metrics::record_redis_error("replay");
            let mut down = self.down_until.lock().expect("not poisoned");
            if down.is_none() {
                tracing::error!(
                    error = %failure,
                    policy = ?self.redis_down,
                    "Redis unreachable: signed requests' replay records fall back to the outage policy"
                );
            }
            *down = Some(Instant::now() + self.retry);
        }
        match self.redis_down {
            RedisDown::FailClosed => Remembered::Unavailable,
            RedisDown::FailOpen => self
                .local
                .lock()
                .expect("not poisoned")
                .remember(mac_hex, self.ttl, Instant::now()),
        }
    }
}

/// This process's records, for a Redis outage under `fail_open`.
#[derive(Debug, Default)]
struct LocalRecords {
    until: HashMap<String, Instant>,
}

impl LocalRecords {
    /// Bounds the memory an outage can take; past it, the oldest half is forgotten.
    const MAX: usize = 1 << 20;

    fn remember(&mut self, mac_hex: &str, ttl: Duration, now: Instant) -> Remembered {
        if self.until.len() >= Self::MAX {
            self.until.retain(|_, until| *until > now);
            if self.until.len() >= Self::MAX {
                let mut ends: Vec<Instant> = self.until.values().copied().collect();
                let (_, median, _) = ends.select_nth_unstable(Self::MAX / 2);
                let median = *median;
                self.until.retain(|_, until| *until > median);
            }
        }
        match self.until.get(mac_hex) {
            Some(until) if *until > now => Remembered::Again,
            _ => {
                self.until.insert(mac_hex.to_owned(), now + ttl);
                Remembered::First
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_records_remember_for_their_lifetime() {
        let mut local = LocalRecords::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        assert_eq!(local.remember("aa", ttl, t0), Remembered::First);
        assert_eq!(
            local.remember("aa", ttl, t0 + Duration::from_secs(59)),
            Remembered::Again
        );
        assert_eq!(local.remember("bb", ttl, t0), Remembered::First);
        assert_eq!(
            local.remember("aa", ttl, t0 + Duration::from_secs(61)),
            Remembered::First,
            "a stale signature is refused before it gets here, so its record may go"
        );
    }

    #[tokio::test]
    async fn keys_have_a_hash_tag_of_their_own() {
        let settings = RateLimitSettings {
            key_prefix: "kiln".into(),
            ..Default::default()
        };
        let redis = RedisLimiter::new(std::sync::Arc::new(settings.clone())).unwrap();
        let records = ReplayRecords::new(redis, &settings, Duration::from_secs(1));
        assert_eq!(records.key("ab12"), "kiln:{sig:ab12}");
    }
}
