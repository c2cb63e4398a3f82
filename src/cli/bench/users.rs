//! The simulated users: `--users` per tier, their requests, and when they send them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::workload::Workload;
use kiln::domain::RequestDocument;
use kiln::rate_limit::{RateLimitSettings, RedisLimiter};
use kiln::submit::new_request;

/// The users of every tier in the mix, and the request they all send.
pub struct Users {
    /// Tier and its share of requests (the shares sum to 1), in name order.
    tiers: Vec<(String, f64)>,
    per_tier: usize,
    workload: Workload,
}

/// A request to send, and (diffusion) its step count, the class the report groups it in.
pub struct Request {
    /// What goes on the wire.
    pub document: RequestDocument,
    /// Denoising steps asked for.
    pub steps: Option<u32>,
}

impl Users {
    /// `per_tier` users in each tier of `mix`, all sending `workload`.
    pub fn new(mix: BTreeMap<String, f64>, per_tier: usize, workload: Workload) -> Self {
        Self {
            tiers: mix.into_iter().collect(),
            per_tier,
            workload,
        }
    }

    /// The tiers in the mix.
    pub fn tiers(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().map(|(tier, _)| tier.as_str())
    }

    /// The tier of the capacity measurement: the last in the mix.
    pub fn last_tier(&self) -> anyhow::Result<&str> {
        self.tiers().last().context("an empty --mix")
    }

    /// The tier a uniform draw in [0, 1) falls in, by share.
    pub fn tier_at(&self, pick: f64) -> &str {
        let mut acc = 0.0;
        let (tier, _) = self
            .tiers
            .iter()
            .find(|(_, share)| {
                acc += share;
                pick < acc
            })
            .unwrap_or(self.tiers.last().expect("tiers"));
        tier
    }

    /// Give every user its tier in Redis (when rate limiting is on).
    pub async fn register(&self, settings: &RateLimitSettings) -> anyhow::Result<()> {
        if !settings.enabled {
            return Ok(());
        }
        let redis = RedisLimiter::new(Arc::new(settings.clone()))?;
        for tier in self.tiers() {
            for user in 0..self.per_tier {
                redis.set_tier(&user_id(tier, user), tier).await?;
            }
        }
        Ok(())
    }

    /// The `n`-th request, sent by a user of `tier` (users take turns; styles cycle, step counts
    /// follow the mix), or with `steps` denoising steps.
    pub fn request(&self, tier: &str, n: usize, steps: Option<u32>) -> Request {
        let (params, image, steps) = self.workload.params(n, steps);
        let document = new_request(
            &user_id(tier, n % self.per_tier.max(1)),
            self.workload.model(),
            params,
            image,
        );
        Request { document, steps }
    }
}

fn user_id(tier: &str, user: usize) -> String {
    format!("bench-{tier}-{user}")
}

/// Poisson arrivals at a rate for a window, with a uniform draw for each arrival's tier; the same
/// arrivals on every run with the same seed.
pub struct Arrivals {
    rng: SplitMix,
    per_sec: f64,
    window: Duration,
    next_at: Duration,
}

impl Arrivals {
    /// Arrivals at `per_sec` (> 0) during `window`, drawn from `seed`.
    pub fn new(per_sec: f64, window: Duration, seed: u64) -> Self {
        Self {
            rng: SplitMix(seed),
            per_sec,
            window,
            next_at: Duration::ZERO,
        }
    }
}

impl Iterator for Arrivals {
    /// When, from the start, and the draw that picks its tier.
    type Item = (Duration, f64);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next_at >= self.window {
            return None;
        }
        let at = self.next_at;
        let pick = self.rng.unit();
        self.next_at += Duration::from_secs_f64(-self.rng.unit().max(1e-12).ln() / self.per_sec);
        Some((at, pick))
    }
}

/// `--mix`: `tier=share,...`, shares normalised to sum to 1.
pub fn parse_mix(spec: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut mix = BTreeMap::new();
    for part in spec.split(',') {
        let (tier, share) = part
            .split_once('=')
            .with_context(|| format!("--mix: {part:?} is not tier=share"))?;
        let share: f64 = share.parse().with_context(|| format!("--mix: bad share in {part:?}"))?;
        anyhow::ensure!(share > 0.0 && share.is_finite(), "--mix: shares must be positive");
        mix.insert(tier.trim().to_owned(), share);
    }
    let total: f64 = mix.values().sum();
    anyhow::ensure!(total > 0.0, "--mix is empty");
    Ok(mix.into_iter().map(|(k, v)| (k, v / total)).collect())
}

/// The arrivals' seed unless `--seed` says otherwise (the one every run used before it existed).
pub const DEFAULT_SEED: u64 = 0x6b69_6c6e;

/// A small deterministic generator (SplitMix64).
pub(super) struct SplitMix(u64);

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl SplitMix {
    /// The `n`-th draw (from 0) of the stream seeded with `seed`, without drawing the others.
    pub(super) fn at(seed: u64, n: u64) -> f64 {
        SplitMix(seed.wrapping_add(n.wrapping_mul(GAMMA))).unit()
    }

    /// The next draw, uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_are_normalised_and_bad_ones_refused() {
        let mix = parse_mix("free=3,pro=1").unwrap();
        assert_eq!(mix["free"], 0.75);
        assert_eq!(mix["pro"], 0.25);
        assert!(parse_mix("free").is_err());
        assert!(parse_mix("free=-1").is_err());
    }

    #[test]
    fn tiers_are_picked_by_share_and_arrivals_repeat() {
        let workload = Workload::Style {
            photo: vec![],
            size: 64,
        };
        let users = Users::new(parse_mix("free=3,pro=1").unwrap(), 2, workload);
        assert_eq!(users.tier_at(0.0), "free");
        assert_eq!(users.tier_at(0.74), "free");
        assert_eq!(users.tier_at(0.76), "pro");
        assert_eq!(users.tier_at(1.0), "pro");
        assert_eq!(users.request("pro", 3, None).document.user_id, "bench-pro-1");
        let window = Duration::from_secs(10);
        let arrivals: Vec<_> = Arrivals::new(50.0, window, DEFAULT_SEED).collect();
        assert!((400..600).contains(&arrivals.len()), "{} arrivals", arrivals.len());
        assert!(arrivals
            .iter()
            .all(|(at, pick)| *at < window && (0.0..1.0).contains(pick)));
        assert_eq!(arrivals, Arrivals::new(50.0, window, DEFAULT_SEED).collect::<Vec<_>>());
        assert_ne!(arrivals, Arrivals::new(50.0, window, 1).collect::<Vec<_>>());
        let mut stream = SplitMix(5);
        let draws: Vec<f64> = (0..4).map(|_| stream.unit()).collect();
        assert_eq!(draws, (0..4).map(|n| SplitMix::at(5, n)).collect::<Vec<_>>());
    }
}
