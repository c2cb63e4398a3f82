//! Rate-limit settings: tiers as data, the Redis connection, and what happens when Redis is away.

use std::collections::BTreeMap;

use anyhow::{bail, ensure};
use secrecy::SecretString;
use serde::Deserialize;

use crate::domain::Work;
use crate::tls::TlsFiles;

/// What a tier's users get when they hit a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AtLimit {
    /// An error reply `rate_limited` with limit, remaining, reset and retry-after.
    Reject,
    /// The request waits in a delay queue (no GPU) and comes back when the window allows; the
    /// producer is sent a `deferred` notice.
    Defer,
}

/// What the worker does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisDown {
    /// Keep serving under an in-process limiter, per worker (default): a Redis blip must not stop
    /// the fleet, and each worker still bounds every user.
    #[default]
    FailOpen,
    /// Serve nobody: every request is deferred (never dropped) until Redis answers again.
    FailClosed,
}

/// How kiln reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One Redis server (or a managed endpoint that looks like one): `redis_url` names it.
    #[default]
    Single,
    /// A Redis Cluster: `redis_url` names one or more of its nodes, comma-separated (seeds; the
    /// rest are discovered). Each decision runs on the master that owns the user's slot; MOVED and
    /// ASK redirections and a replica's promotion after a master fails are followed.
    Cluster,
}

/// One tier. Costs are in units: one unit is one image of `cost.unit_pixels` pixels.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSettings {
    /// Sustained rate, in units per minute.
    pub rate_per_minute: f64,
    /// Units that may be spent at once (the bucket's depth).
    pub burst: u32,
    /// Units per UTC day.
    pub daily_quota: u64,
    /// Requests of one user being worked on at once, across all workers.
    pub max_in_flight: u32,
    /// `reject` or `defer`.
    pub at_limit: AtLimit,
}

impl TierSettings {
    /// Milliseconds per unit at the sustained rate (the GCRA emission interval).
    pub fn interval_ms(&self) -> f64 {
        60_000.0 / self.rate_per_minute
    }
}

/// How a request's cost grows with the work asked for.
///
/// - single-pass models (style): `ceil(pixels / unit_pixels)`;
/// - diffusion models: `ceil(pixels × evaluations / (unit_pixels × evaluations_per_unit))`, where
///   `evaluations` = steps run × rows (×2 with guidance, ×3 for a guided edit);
///
/// at least 1 either way.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostSettings {
    /// Output pixels that cost one unit. Default 262 144 (512 × 512): a 1024 px square costs 4
    /// units, a 256 px one 1.
    pub unit_pixels: u64,
    /// Denoising network evaluations at `unit_pixels` that cost one unit. Default 20: a 512 px
    /// image in 30 guided steps (60 evaluations) costs 3 units, 4 unguided steps (LCM) 1, 50 guided
    /// steps 5. Set it from the measured device time of one evaluation against one style image.
    pub evaluations_per_unit: u32,
    /// Costs above this are refused as `invalid_params`. Default 64 (a 4096 px square).
    pub max_units: u32,
}

impl Default for CostSettings {
    fn default() -> Self {
        Self {
            unit_pixels: 512 * 512,
            evaluations_per_unit: 20,
            max_units: 64,
        }
    }
}

impl CostSettings {
    /// The cost of a request's work, in units.
    pub fn units(&self, work: &Work) -> u64 {
        let (numerator, denominator) = match work.denoising_evaluations {
            None => (u128::from(work.pixels), u128::from(self.unit_pixels)),
            Some(evaluations) => (
                u128::from(work.pixels) * u128::from(evaluations),
                u128::from(self.unit_pixels) * u128::from(self.evaluations_per_unit),
            ),
        };
        u64::try_from(numerator.div_ceil(denominator))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// Per-user limits by tier, enforced in Redis for the whole fleet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Enforce limits at all. Default true.
    pub enabled: bool,
    /// `single` (default) or `cluster`; see [`RedisMode`].
    pub redis_mode: RedisMode,
    /// Redis URL; may carry a password, never logged. Default `redis://127.0.0.1:6379/`. In
    /// `cluster` mode, the URLs of one or more nodes, comma-separated. `rediss://` for TLS.
    pub redis_url: SecretString,
    /// CA and client certificate for `rediss://` URLs (`[rate_limit.tls]`); unset, the system's
    /// trust store and no client certificate.
    pub tls: TlsFiles,
    /// Prefix of every key (`<prefix>:{u:<user>}:…`). Default `kiln`. No `{` or `}`.
    pub key_prefix: String,
    /// Tier of users without a tier record. Must name a tier. Default `free`.
    pub default_tier: String,
    /// `fail_open` (default) or `fail_closed`; see [`RedisDown`].
    pub redis_down: RedisDown,
    /// Longest wait for one decision before Redis counts as down. Default 250 ms.
    pub redis_timeout_ms: u64,
    /// After Redis failed, how long to use the fallback before asking Redis again. Default 1000 ms.
    pub redis_retry_ms: u64,
    /// Lifetime of an in-flight lease: a crashed worker's requests stop counting after this.
    /// Must exceed the longest request. Default 300 000 ms.
    pub lease_ttl_ms: u64,
    /// How long a request's charge and its final outcome are remembered (keys
    /// `<prefix>:{u:<user>}:charged:<id>` and `…:outcome:<id>`, about 150 bytes each): a redelivery
    /// within this is neither charged nor answered twice. Must exceed the longest time a request
    /// can spend in the broker (its deadline, the delay queues). Default 86 400 s (a day).
    pub request_record_ttl_secs: u64,
    /// Lifetime of tier records written by `kiln limits set-tier` (billing refreshes them).
    /// Default 35 days.
    pub tier_record_ttl_secs: u64,
    /// Cost per request.
    pub cost: CostSettings,
    /// The tiers by name. Given in a file or the environment, they replace the defaults whole.
    pub tiers: BTreeMap<String, TierSettings>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        let tier = |rate_per_minute, burst, daily_quota, max_in_flight, at_limit| TierSettings {
            rate_per_minute,
            burst,
            daily_quota,
            max_in_flight,
            at_limit,
        };
        Self {
            enabled: true,
            redis_mode: RedisMode::Single,
            redis_url: SecretString::from("redis://127.0.0.1:6379/"),
            tls: TlsFiles::default(),
            key_prefix: "kiln".into(),
            default_tier: "free".into(),
            redis_down: RedisDown::FailOpen,
            redis_timeout_ms: 250,
            redis_retry_ms: 1_000,
            lease_ttl_ms: 300_000,
            request_record_ttl_secs: 86_400,
            tier_record_ttl_secs: 35 * 24 * 3600,
            cost: CostSettings::default(),
            tiers: BTreeMap::from([
                ("free".into(), tier(6.0, 4, 50, 1, AtLimit::Defer)),
                ("plus".into(), tier(30.0, 16, 1_000, 4, AtLimit::Defer)),
                ("pro".into(), tier(120.0, 64, 10_000, 16, AtLimit::Reject)),
                ("enterprise".into(), tier(600.0, 256, 200_000, 64, AtLimit::Reject)),
            ]),
        }
    }
}

impl RateLimitSettings {
    /// Refuse settings that cannot work: an unknown default tier, impossible numbers, a bad prefix.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.tiers.is_empty(), "rate_limit.tiers is empty");
        let urls = self.redis_urls();
        ensure!(!urls.is_empty(), "rate_limit.redis_url is empty");
        ensure!(
            self.redis_mode == RedisMode::Cluster || urls.len() == 1,
            "rate_limit.redis_url names {} servers: set rate_limit.redis_mode = \"cluster\" for a Redis Cluster",
            urls.len()
        );
        self.tls
            .check("rate_limit.tls", "rate_limit.redis_url", &urls, "rediss")?;
        if !self.tiers.contains_key(&self.default_tier) {
            bail!(
                "rate_limit.default_tier = {:?} is not a tier; tiers: {}",
                self.default_tier,
                self.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        ensure!(
            !self.key_prefix.is_empty() && !self.key_prefix.contains(['{', '}']),
            "rate_limit.key_prefix must be non-empty and free of {{ and }}"
        );
        ensure!(
            self.cost.unit_pixels >= 1 && self.cost.max_units >= 1 && self.cost.evaluations_per_unit >= 1,
            "rate_limit.cost values must be at least 1"
        );
        ensure!(
            self.lease_ttl_ms >= 1_000,
            "rate_limit.lease_ttl_ms must be at least 1000"
        );
        ensure!(
            self.request_record_ttl_secs >= 60
                && self.request_record_ttl_secs.saturating_mul(1000) >= self.lease_ttl_ms,
            "rate_limit.request_record_ttl_secs must be at least 60 and at least the lease lifetime"
        );
        for (name, t) in &self.tiers {
            let valid_name =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            ensure!(valid_name, "tier name {name:?}: use letters, digits, _ and -");
            ensure!(
                t.rate_per_minute.is_finite() && t.rate_per_minute > 0.0 && t.rate_per_minute <= 6_000_000.0,
                "tier {name}: rate_per_minute must be above 0 and at most 6000000"
            );
            ensure!(
                (1..=1_000_000).contains(&t.burst),
                "tier {name}: burst must be 1 to 1000000"
            );
            ensure!(
                (1..=1_000_000_000).contains(&t.daily_quota),
                "tier {name}: daily_quota must be 1 to 1e9"
            );
            ensure!(
                (1..=100_000).contains(&t.max_in_flight),
                "tier {name}: max_in_flight must be 1 to 100000"
            );
        }
        Ok(())
    }

    /// The URLs `redis_url` names (one; in `cluster` mode, possibly several), with their secrets.
    pub fn redis_urls(&self) -> Vec<&str> {
        use secrecy::ExposeSecret;
        self.redis_url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The tier called `name`, or the default tier.
    pub fn tier_or_default(&self, name: Option<&str>) -> (&str, &TierSettings) {
        name.and_then(|n| self.tiers.get_key_value(n))
            .or_else(|| self.tiers.get_key_value(&self.default_tier))
            .map(|(k, v)| (k.as_str(), v))
            .expect("validate() checked that the default tier exists")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RateLimitSettings::default().validate().unwrap();
    }

    #[test]
    fn several_redis_urls_need_cluster_mode() {
        let mut s = RateLimitSettings {
            redis_url: "redis://10.0.0.1:6379/, redis://10.0.0.2:6379/".to_owned().into(),
            ..Default::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("redis_mode = \"cluster\""), "{e}");
        s.redis_mode = RedisMode::Cluster;
        s.validate().unwrap();
        assert_eq!(s.redis_urls(), ["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"]);
    }

    #[test]
    fn an_unknown_default_tier_is_refused() {
        let s = RateLimitSettings {
            default_tier: "gold".into(),
            ..Default::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("\"gold\" is not a tier"), "{e}");
    }

    #[test]
    fn absurd_numbers_are_refused() {
        for change in [
            |t: &mut TierSettings| t.rate_per_minute = -1.0,
            |t: &mut TierSettings| t.rate_per_minute = f64::NAN,
            |t: &mut TierSettings| t.burst = 0,
            |t: &mut TierSettings| t.daily_quota = 0,
            |t: &mut TierSettings| t.max_in_flight = 0,
        ] {
            let mut s = RateLimitSettings::default();
            change(s.tiers.get_mut("free").unwrap());
            assert!(s.validate().is_err());
        }
        let s = RateLimitSettings {
            key_prefix: "a{b".into(),
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }

    #[test]
    fn cost_grows_with_pixels() {
        let c = CostSettings::default();
        let single = |pixels| c.units(&Work::single_pass(pixels));
        assert_eq!(single(256 * 256), 1);
        assert_eq!(single(512 * 512), 1);
        assert_eq!(single(512 * 512 + 1), 2);
        assert_eq!(single(1024 * 1024), 4);
        assert_eq!(single(0), 1);
    }

    #[test]
    fn diffusion_cost_grows_with_pixels_steps_and_guidance() {
        let c = CostSettings::default();
        let denoise = |pixels: u64, steps: u64, rows: u64| {
            c.units(&Work {
                pixels,
                denoising_evaluations: Some(steps * rows),
            })
        };
        assert_eq!(denoise(512 * 512, 30, 2), 3);
        assert_eq!(denoise(512 * 512, 30, 1), 2);
        assert_eq!(denoise(512 * 512, 50, 2), 5);
        assert_eq!(denoise(512 * 512, 4, 1), 1);
        assert_eq!(denoise(1024 * 1024, 30, 2), 12);
        assert_eq!(denoise(1024 * 1024, 30, 3), 18);
        assert_eq!(denoise(64 * 64, 10, 2), 1);
        let huge = Work {
            pixels: u64::MAX,
            denoising_evaluations: Some(u64::MAX),
        };
        assert_eq!(c.units(&huge), u64::MAX);
    }
}
