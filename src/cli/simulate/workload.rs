//! The simulated users: tiers and step counts drawn from mixes, Poisson arrivals, a seeded generator.

use std::time::Duration;

use anyhow::{ensure, Context};
use serde::Serialize;

/// A priority class: index 0 is the heaviest weight, as in [`kiln::scheduling::Schedule`].
#[derive(Debug, Clone, Serialize)]
pub(super) struct Class {
    pub(super) tier: String,
    pub(super) weight: f64,
    /// Share of the arrivals.
    pub(super) share: f64,
    /// Its tier's default deadline, seconds from arrival.
    pub(super) deadline_secs: Option<f64>,
    #[serde(skip)]
    pub(super) deadline: Option<Duration>,
}

/// A request as it arrives.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    pub(super) class: usize,
    pub(super) steps: u32,
    /// Since the start of the run.
    pub(super) arrival: Duration,
    /// Since the start of the run.
    pub(super) deadline: Option<Duration>,
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub(super) struct SplitMix(pub(super) u64);

impl SplitMix {
    /// Uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Tiers and step counts, and how to draw them.
#[derive(Debug, Clone)]
pub(super) struct Mix {
    /// Heaviest weight first.
    pub(super) classes: Vec<Class>,
    /// (steps, share), fewest steps first, shares summing to 1.
    pub(super) steps: Vec<(u32, f64)>,
}

impl Mix {
    /// One request arriving at `arrival` (with its tier's deadline when `deadlines`).
    pub(super) fn draw(&self, rng: &mut SplitMix, arrival: Duration, deadlines: bool) -> Request {
        let class = pick(self.classes.iter().map(|c| c.share), rng.unit());
        let steps = self.steps[pick(self.steps.iter().map(|s| s.1), rng.unit())].0;
        Request {
            class,
            steps,
            arrival,
            deadline: self.classes[class].deadline.filter(|_| deadlines).map(|d| arrival + d),
        }
    }

    /// Poisson arrivals at `per_sec` during `window`.
    pub(super) fn arrivals(&self, per_sec: f64, window: Duration, seed: u64) -> Vec<Request> {
        let mut rng = SplitMix(seed);
        let mut out = Vec::new();
        let mut at = Duration::ZERO;
        loop {
            at += Duration::from_secs_f64(-(1.0 - rng.unit()).ln() / per_sec);
            if at >= window {
                return out;
            }
            out.push(self.draw(&mut rng, at, true));
        }
    }

    /// The class that is not paid: the lightest weight.
    pub(super) fn free_class(&self) -> usize {
        self.classes.len() - 1
    }
}

/// The index `u` falls in when [0, 1) is cut into `shares`.
fn pick(shares: impl Iterator<Item = f64>, u: f64) -> usize {
    let mut acc = 0.0;
    let mut last = 0;
    for (i, share) in shares.enumerate() {
        acc += share;
        last = i;
        if u < acc {
            return i;
        }
    }
    last
}

/// `name=share,...`, shares normalised to sum to 1.
pub(super) fn parse_shares(spec: &str, what: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (name, share) = part
            .split_once('=')
            .with_context(|| format!("{what}: {part:?} is not name=share"))?;
        let share: f64 = share
            .trim()
            .parse()
            .with_context(|| format!("{what}: bad share in {part:?}"))?;
        ensure!(share > 0.0 && share.is_finite(), "{what}: shares must be positive");
        out.push((name.trim().to_owned(), share));
    }
    let total: f64 = out.iter().map(|(_, s)| s).sum();
    Ok(out.into_iter().map(|(n, s)| (n, s / total)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix() -> Mix {
        let class = |tier: &str, share| Class {
            tier: tier.into(),
            weight: 1.0,
            share,
            deadline_secs: None,
            deadline: Some(Duration::from_secs(600)),
        };
        Mix {
            classes: vec![class("pro", 0.2), class("free", 0.8)],
            steps: vec![(4, 0.4), (20, 0.3), (50, 0.3)],
        }
    }

    #[test]
    fn arrivals_follow_the_rate_and_the_mixes_and_repeat_with_the_seed() {
        let m = mix();
        let a = m.arrivals(50.0, Duration::from_secs(400), 9);
        assert!((a.len() as f64 / 20_000.0 - 1.0).abs() < 0.03, "{} arrivals", a.len());
        assert!(a.windows(2).all(|w| w[0].arrival <= w[1].arrival));
        let share = |f: &dyn Fn(&Request) -> bool| a.iter().filter(|r| f(r)).count() as f64 / a.len() as f64;
        assert!((share(&|r| r.class == 0) - 0.2).abs() < 0.01);
        assert!((share(&|r| r.steps == 4) - 0.4).abs() < 0.01);
        assert!((share(&|r| r.steps == 50) - 0.3).abs() < 0.01);
        assert!(a
            .iter()
            .all(|r| r.deadline == Some(r.arrival + Duration::from_secs(600))));
        let b = m.arrivals(50.0, Duration::from_secs(400), 9);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.arrival == y.arrival && x.steps == y.steps));
        assert!(m.arrivals(50.0, Duration::from_secs(400), 10)[0].arrival != a[0].arrival);
    }

    #[test]
    fn shares_are_normalised_and_bad_ones_refused() {
        let s = parse_shares("free=3, pro=1", "--mix").unwrap();
        assert_eq!(s, [("free".to_owned(), 0.75), ("pro".to_owned(), 0.25)]);
        assert!(parse_shares("free", "--mix").is_err());
        assert!(parse_shares("free=-1", "--mix").is_err());
    }
}
