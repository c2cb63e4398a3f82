//! The in-process limiter that takes over while Redis is unreachable (`redis_down = "fail_open"`).
//!
//! Same rules as `decide.lua` (GCRA with burst, daily quota, in-flight leases), but per worker: with
//! N workers a user can get up to N times their limits during an outage. Users keep the tier Redis
//! last reported for them; users never seen get the default tier.

use std::collections::HashMap;
use std::sync::Mutex;

use super::redis::ms_to_day_end;
use super::settings::RateLimitSettings;
use super::{Scope, Verdict};

#[derive(Debug, Default)]
struct UserState {
    tat: f64,
    day: i64,
    used: u64,
    /// Lease id → expiry (ms).
    leases: HashMap<String, i64>,
}

/// Per-worker limits, in memory.
#[derive(Debug, Default)]
pub struct LocalLimiter {
    users: Mutex<HashMap<String, UserState>>,
    tiers_seen: Mutex<HashMap<String, String>>,
}

/// Users tracked before idle ones are swept.
const SWEEP_ABOVE: usize = 100_000;

impl LocalLimiter {
    /// Remember the tier Redis reported for a user, for use during an outage.
    pub fn remember_tier(&self, user: &str, tier: &str) {
        let mut seen = self.tiers_seen.lock().expect("not poisoned");
        if seen.get(user).map(String::as_str) != Some(tier) {
            if seen.len() >= SWEEP_ABOVE {
                seen.clear();
            }
            seen.insert(user.to_owned(), tier.to_owned());
        }
    }

    /// Decide as `decide.lua` would, from memory.
    pub fn decide(&self, settings: &RateLimitSettings, user: &str, cost: u64, lease_id: &str, now_ms: i64) -> Verdict {
        let remembered = self.tiers_seen.lock().expect("not poisoned").get(user).cloned();
        let (tier_name, tier) = settings.tier_or_default(remembered.as_deref());
        let verdict = |admitted, scope, limit, remaining, reset_ms: i64, retry_after_ms: i64| Verdict {
            admitted,
            readmitted: false,
            scope,
            tier: tier_name.to_owned(),
            limit,
            remaining,
            reset_ms: reset_ms.max(0) as u64,
            retry_after_ms: retry_after_ms.max(0) as u64,
            unknown_tier_record: None,
            exceeds_tier: false,
        };
        if cost > u64::from(tier.burst) || cost > tier.daily_quota {
            let max = u64::from(tier.burst).min(tier.daily_quota);
            return Verdict {
                exceeds_tier: true,
                ..verdict(false, Scope::Rate, max, 0, 0, 0)
            };
        }
        let mut users = self.users.lock().expect("not poisoned");
        if users.len() >= SWEEP_ABOVE {
            users.retain(|_, u| u.tat > now_ms as f64 || !u.leases.is_empty());
        }
        let state = users.entry(user.to_owned()).or_default();
        let now = now_ms as f64;
        let interval = tier.interval_ms();
        let capacity = f64::from(tier.burst) * interval;
        let tat = state.tat.max(now);

        state.leases.retain(|_, expiry| *expiry > now_ms);
        if state.leases.contains_key(lease_id) {
            // A redelivery of a request still holding its lease: admitted again, charged nothing.
            let expiry = now_ms + settings.lease_ttl_ms as i64;
            state.leases.insert(lease_id.to_owned(), expiry);
            let remaining = ((capacity - (tat - now)) / interval + 1e-9).floor() as u64;
            return Verdict {
                readmitted: true,
                ..verdict(
                    true,
                    Scope::Rate,
                    u64::from(tier.burst),
                    remaining,
                    (tat - now).ceil() as i64,
                    0,
                )
            };
        }
        if state.leases.len() >= tier.max_in_flight as usize {
            let first = state.leases.values().min().copied().unwrap_or(now_ms) - now_ms;
            return verdict(
                false,
                Scope::InFlight,
                u64::from(tier.max_in_flight),
                0,
                first,
                first.min(1000),
            );
        }

        let day = now_ms.div_euclid(86_400_000);
        if state.day != day {
            state.day = day;
            state.used = 0;
        }
        if state.used + cost > tier.daily_quota {
            let left = ms_to_day_end(now_ms);
            return verdict(
                false,
                Scope::DailyQuota,
                tier.daily_quota,
                tier.daily_quota.saturating_sub(state.used),
                left,
                left,
            );
        }

        let new_tat = tat + cost as f64 * interval;
        if new_tat - now > capacity {
            let remaining = ((capacity - (tat - now)) / interval + 1e-9).floor() as u64;
            return verdict(
                false,
                Scope::Rate,
                u64::from(tier.burst),
                remaining,
                (tat - now).ceil() as i64,
                (new_tat - now - capacity).ceil() as i64,
            );
        }
        state.tat = new_tat;
        state.used += cost;
        state
            .leases
            .insert(lease_id.to_owned(), now_ms + settings.lease_ttl_ms as i64);
        let remaining = ((capacity - (new_tat - now)) / interval + 1e-9).floor() as u64;
        verdict(
            true,
            Scope::Rate,
            u64::from(tier.burst),
            remaining,
            (new_tat - now).ceil() as i64,
            0,
        )
    }

    /// Give a lease back.
    pub fn release(&self, user: &str, lease_id: &str) {
        if let Some(state) = self.users.lock().expect("not poisoned").get_mut(user) {
            state.leases.remove(lease_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforces_burst_rate_quota_and_in_flight_like_the_script() {
        let mut settings = RateLimitSettings::default();
        let free = settings.tiers.get_mut("free").unwrap();
        (free.rate_per_minute, free.burst, free.daily_quota, free.max_in_flight) = (60.0, 3, 5, 2);
        let l = LocalLimiter::default();
        let t0 = 1_000_000_000;
        assert!(l.decide(&settings, "u", 1, "a", t0).admitted);
        assert!(l.decide(&settings, "u", 1, "b", t0).admitted);
        let v = l.decide(&settings, "u", 1, "c", t0);
        assert!(!v.admitted && v.scope == Scope::InFlight, "{v:?}");
        l.release("u", "a");
        l.release("u", "b");
        assert!(l.decide(&settings, "u", 1, "c", t0).admitted);
        l.release("u", "c");
        let v = l.decide(&settings, "u", 1, "d", t0);
        assert!(
            !v.admitted && v.scope == Scope::Rate && v.retry_after_ms == 1000,
            "{v:?}"
        );
        // One unit per second comes back.
        assert!(l.decide(&settings, "u", 1, "d", t0 + 1000).admitted);
        l.release("u", "d");
        assert!(l.decide(&settings, "u", 1, "e", t0 + 2000).admitted);
        l.release("u", "e");
        let v = l.decide(&settings, "u", 1, "f", t0 + 10_000);
        assert!(!v.admitted && v.scope == Scope::DailyQuota, "{v:?}");
    }
}
