//! Who goes first when demand outruns the device: priority weights, default deadlines and the
//! overload policy, by tier.
//!
//! Tiers are the ones of `rate_limit.tiers`. Each tier has its own request queue on the broker
//! (`<prefix>.requests.<tier>`, next to the shared `<prefix>.requests`), so a paid request never
//! waits behind a free backlog *in the broker*; inside the worker the inference thread's batcher
//! shares the device between the tiers that have work waiting, by weight (weighted fair queueing:
//! with weights free 1, pro 20, a saturated device gives pro 20/21 of its images and free 1/21, and
//! pro gets all it asks for when it asks for less, free the rest). See ARCHITECTURE.md for why queues per tier rather
//! than one priority queue.
//!
//! A request's tier is the one the limiter found for its user in Redis; without a limiter, or before
//! it decides, the tier of the queue it came from (`<prefix>.requests` counts as the default tier).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;
use serde::Deserialize;

/// What a tier's requests get when the worker is overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverloadAction {
    /// Served as usual.
    Serve,
    /// Put in a delay queue (`deferred` notice, reason `overloaded`) for `overload.defer_ms`,
    /// then served or deferred again: the device's time goes to the other tiers meanwhile.
    Defer,
    /// Served with less: the output's longer side is capped at `overload.degrade_max_side`, and a
    /// multi-step (diffusion) model's steps at `overload.degrade_steps` (the reply says so in
    /// `degraded`).
    Degrade,
}

/// When the worker counts as overloaded, and what happens then.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadSettings {
    /// A request that waited longer than this in the broker (from its `created_at`, or the AMQP
    /// timestamp) finds the worker overloaded. 0 turns the policy off. Default 30 000 ms.
    pub wait_threshold_ms: u64,
    /// What each tier gets then; tiers not named are served. Default: free deferred, plus degraded.
    pub actions: BTreeMap<String, OverloadAction>,
    /// How long a deferred request waits (rounded up to a delay queue's TTL). Default 16 000 ms.
    pub defer_ms: u64,
    /// Longest output side of a degraded request. Default 512.
    pub degrade_max_side: u32,
    /// Most denoising steps of a degraded request to a multi-step (diffusion) model: one that asks
    /// for more runs this many (image-to-image: its strength applies to these). Default 20.
    pub degrade_steps: u32,
}

impl Default for OverloadSettings {
    fn default() -> Self {
        Self {
            wait_threshold_ms: 30_000,
            actions: BTreeMap::from([
                ("free".into(), OverloadAction::Defer),
                ("plus".into(), OverloadAction::Degrade),
            ]),
            defer_ms: 16_000,
            degrade_max_side: 512,
            degrade_steps: 20,
        }
    }
}

/// Priorities, deadlines and overload behaviour by tier.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingSettings {
    /// Declare and consume one request queue per tier (`<prefix>.requests.<tier>`) besides
    /// `<prefix>.requests`. Default true.
    pub tier_queues: bool,
    /// Share of the device per tier when it is saturated, as weights (> 0). Tiers not named weigh 1.
    /// Default free 1, plus 10, pro 20, enterprise 40: the device is work-conserving, so free gets
    /// everything the paid tiers leave; the weights only decide while paid work waits too, and
    /// then free still gets at least 1/71 of the device (1/11 against plus alone). Smaller paid
    /// weights let a free flood slow paid bursts (BENCHMARKS.md).
    pub weights: BTreeMap<String, f64>,
    /// Default deadline per tier, in ms after the request's creation, for requests that carry none:
    /// past it the request is answered `expired` without using the device. Tiers not named have
    /// none. Default: free 600 000 (10 minutes).
    pub deadlines_ms: BTreeMap<String, u64>,
    /// Overload policy.
    pub overload: OverloadSettings,
}

impl Default for SchedulingSettings {
    fn default() -> Self {
        Self {
            tier_queues: true,
            weights: BTreeMap::from([
                ("free".into(), 1.0),
                ("plus".into(), 10.0),
                ("pro".into(), 20.0),
                ("enterprise".into(), 40.0),
            ]),
            deadlines_ms: BTreeMap::from([("free".into(), 600_000)]),
            overload: OverloadSettings::default(),
        }
    }
}

/// One tier's place in the schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct TierClass {
    /// Tier name.
    pub tier: String,
    /// Share of the device (relative).
    pub weight: f64,
    /// Deadline for requests that carry none.
    pub default_deadline: Option<Duration>,
    /// What happens to its requests under overload.
    pub overload: OverloadAction,
}

/// The resolved schedule: tiers ordered by weight (heaviest first; the index is the class the
/// batcher sees), with the default tier for anything unknown.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    classes: Vec<TierClass>,
    default_class: usize,
    /// The overload settings.
    pub overload: OverloadSettings,
}

impl Schedule {
    /// Resolve settings against the tier names. A name that is not a tier is an error, except in a
    /// table left at its default (which names the default tiers, and may meet other tiers).
    pub fn new(settings: &SchedulingSettings, tiers: &[&str], default_tier: &str) -> anyhow::Result<Self> {
        let defaults = SchedulingSettings::default();
        let known = |what: &str, names: &mut dyn Iterator<Item = &String>| -> anyhow::Result<()> {
            let left_default = match what {
                "weights" => settings.weights == defaults.weights,
                "deadlines_ms" => settings.deadlines_ms == defaults.deadlines_ms,
                _ => settings.overload.actions == defaults.overload.actions,
            };
            for name in names.filter(|_| !left_default) {
                ensure!(
                    tiers.contains(&name.as_str()),
                    "scheduling.{what} names {name:?}, which is not a tier; tiers: {}",
                    tiers.join(", ")
                );
            }
            Ok(())
        };
        known("weights", &mut settings.weights.keys())?;
        known("deadlines_ms", &mut settings.deadlines_ms.keys())?;
        known("overload.actions", &mut settings.overload.actions.keys())?;
        for (tier, weight) in &settings.weights {
            ensure!(
                weight.is_finite() && *weight > 0.0 && *weight <= 1e6,
                "scheduling.weights.{tier} must be above 0 and at most 1e6"
            );
        }
        ensure!(
            settings.overload.degrade_max_side >= 1,
            "scheduling.overload.degrade_max_side must be at least 1"
        );
        ensure!(
            settings.overload.degrade_steps >= 1,
            "scheduling.overload.degrade_steps must be at least 1"
        );
        let mut classes: Vec<TierClass> = tiers
            .iter()
            .map(|tier| TierClass {
                tier: (*tier).to_owned(),
                weight: settings.weights.get(*tier).copied().unwrap_or(1.0),
                default_deadline: settings
                    .deadlines_ms
                    .get(*tier)
                    .filter(|ms| **ms > 0)
                    .map(|ms| Duration::from_millis(*ms)),
                overload: settings
                    .overload
                    .actions
                    .get(*tier)
                    .copied()
                    .unwrap_or(OverloadAction::Serve),
            })
            .collect();
        classes.sort_by(|a, b| b.weight.total_cmp(&a.weight).then_with(|| a.tier.cmp(&b.tier)));
        let default_class = classes
            .iter()
            .position(|c| c.tier == default_tier)
            .ok_or_else(|| anyhow::anyhow!("the default tier {default_tier:?} is not a tier"))?;
        Ok(Self {
            classes,
            default_class,
            overload: settings.overload.clone(),
        })
    }

    /// The class of a tier (the default tier's for unknown or absent names).
    pub fn class_of(&self, tier: Option<&str>) -> usize {
        tier.and_then(|t| self.classes.iter().position(|c| c.tier == t))
            .unwrap_or(self.default_class)
    }

    /// A class's tier.
    pub fn class(&self, class: usize) -> &TierClass {
        &self.classes[class.min(self.classes.len() - 1)]
    }

    /// Every class, heaviest first.
    pub fn classes(&self) -> &[TierClass] {
        &self.classes
    }

    /// The batcher's weights, by class.
    pub fn weights(&self) -> Vec<f64> {
        self.classes.iter().map(|c| c.weight).collect()
    }

    /// Whether a request that waited `queue_wait` in the broker finds the worker overloaded.
    pub fn overloaded(&self, queue_wait: Option<Duration>) -> bool {
        let threshold = self.overload.wait_threshold_ms;
        threshold > 0 && queue_wait.is_some_and(|w| w > Duration::from_millis(threshold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIERS: [&str; 4] = ["enterprise", "free", "plus", "pro"];

    #[test]
    fn classes_are_ordered_by_weight_and_unknown_tiers_get_the_default() {
        let s = Schedule::new(&SchedulingSettings::default(), &TIERS, "free").unwrap();
        let order: Vec<&str> = s.classes().iter().map(|c| c.tier.as_str()).collect();
        assert_eq!(order, ["enterprise", "pro", "plus", "free"]);
        assert_eq!(s.weights(), [40.0, 20.0, 10.0, 1.0]);
        assert_eq!(s.class_of(Some("pro")), 1);
        assert_eq!(s.class_of(Some("gold")), 3);
        assert_eq!(s.class_of(None), 3);
        assert_eq!(s.class(3).default_deadline, Some(Duration::from_secs(600)));
        assert_eq!(s.class(0).default_deadline, None);
        assert_eq!(s.class(3).overload, OverloadAction::Defer);
        assert_eq!(s.class(2).overload, OverloadAction::Degrade);
        assert_eq!(s.class(1).overload, OverloadAction::Serve);
    }

    #[test]
    fn settings_naming_unknown_tiers_or_bad_weights_are_refused() {
        let mut settings = SchedulingSettings::default();
        settings.weights.insert("gold".into(), 3.0);
        let e = Schedule::new(&settings, &TIERS, "free").unwrap_err().to_string();
        assert!(e.contains("\"gold\""), "{e}");
        let mut settings = SchedulingSettings::default();
        settings.weights.insert("free".into(), 0.0);
        assert!(Schedule::new(&settings, &TIERS, "free").is_err());
        let mut settings = SchedulingSettings::default();
        settings
            .overload
            .actions
            .insert("platinum".into(), OverloadAction::Defer);
        assert!(Schedule::new(&settings, &TIERS, "free").is_err());
    }

    #[test]
    fn degraded_requests_keep_at_least_one_pixel_and_one_step() {
        let s = Schedule::new(&SchedulingSettings::default(), &TIERS, "free").unwrap();
        assert_eq!((s.overload.degrade_max_side, s.overload.degrade_steps), (512, 20));
        let mut settings = SchedulingSettings::default();
        settings.overload.degrade_steps = 0;
        let e = Schedule::new(&settings, &TIERS, "free").unwrap_err().to_string();
        assert!(e.contains("degrade_steps"), "{e}");
        let mut settings = SchedulingSettings::default();
        settings.overload.degrade_max_side = 0;
        assert!(Schedule::new(&settings, &TIERS, "free").is_err());
    }

    #[test]
    fn defaults_meet_other_tiers_without_complaint() {
        let s = Schedule::new(&SchedulingSettings::default(), &["basic", "free"], "basic").unwrap();
        assert_eq!(s.class(s.class_of(Some("basic"))).weight, 1.0);
        assert_eq!(s.class(s.class_of(Some("free"))).overload, OverloadAction::Defer);
    }

    #[test]
    fn overload_is_a_wait_past_the_threshold() {
        let mut settings = SchedulingSettings::default();
        settings.overload.wait_threshold_ms = 1_000;
        let s = Schedule::new(&settings, &TIERS, "free").unwrap();
        assert!(!s.overloaded(None));
        assert!(!s.overloaded(Some(Duration::from_millis(1_000))));
        assert!(s.overloaded(Some(Duration::from_millis(1_001))));
        settings.overload.wait_threshold_ms = 0;
        let s = Schedule::new(&settings, &TIERS, "free").unwrap();
        assert!(!s.overloaded(Some(Duration::from_secs(3_600))));
    }
}
