//! The diffusion workload's figures: each step count's latency with nothing else in flight (the
//! unloaded reference), the SLO it sets (`--slo-factor` × its unloaded p50), goodput (images
//! finished within their SLO per second of the sending window), and total latency (publish to
//! reply) by tier and by step count, each p99 against its unloaded value.

use std::collections::BTreeMap;

use serde::Serialize;

use super::book::{Entries, Outcome};
use super::report::{percentiles, Window};
use kiln::domain::ReplyStatus;

/// One step count alone.
#[derive(Debug, Clone, Serialize)]
pub struct Unloaded {
    /// Publish to reply, ms, one request at a time.
    pub samples_ms: Vec<f64>,
    /// p50 of the samples, ms.
    pub p50_ms: f64,
    /// p99 (with a few samples: their maximum), ms.
    pub p99_ms: f64,
}

/// The requests of one tier or one step count.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    /// Sent in the window.
    pub sent: usize,
    /// Answered with an image.
    pub ok: usize,
    /// Answered with an image within the request's SLO.
    pub within_slo: usize,
    /// `within_slo` per second of the sending window.
    pub goodput_per_sec: f64,
    /// Publish to reply of ok replies, ms: p50, p99.
    pub total_ms: [f64; 2],
    /// That p99 ÷ the unloaded p99 (of the step count; of the step mix for a tier).
    pub p99_over_unloaded: f64,
    /// Answered `rate_limited`.
    pub rejected: usize,
    /// Answered `expired` (never run, or stopped because it could not finish in time).
    pub expired: usize,
    /// Other errors.
    pub errors: usize,
    /// Requests that got a `deferred` notice.
    pub deferred: usize,
    /// Served degraded (fewer steps or a smaller side than asked).
    pub degraded: usize,
    /// No final reply by the end of the drain.
    pub unanswered: usize,
}

/// The diffusion part of a run's report.
#[derive(Debug, Clone, Serialize)]
pub struct DiffusionReport {
    /// `[batching.diffusion] mode`: `step` or `request`.
    pub mode: String,
    /// Most requests at once: the step-level cap for the size, and the whole-request batch size.
    pub batch: usize,
    /// Image side, px.
    pub size: u32,
    /// Step counts and their shares.
    pub steps_mix: Vec<(u32, f64)>,
    /// SLO = this × the unloaded p50 of the request's step count.
    pub slo_factor: f64,
    /// By step count: latency alone, measured in this run before the load.
    pub unloaded: BTreeMap<u32, Unloaded>,
    /// The step mix's unloaded latency, ms: p50, p99 (the mixture of the step counts' samples,
    /// weighted by share). Every tier's reference: alone, a request's tier changes nothing.
    pub unloaded_mix_ms: [f64; 2],
    /// By step count: its SLO, ms (from `--slo-base-ms` where given, else this run's unloaded p50).
    pub slo_ms: BTreeMap<u32, f64>,
    /// Images within their SLO per second of the sending window, every tier.
    pub goodput_per_sec: f64,
    /// Requests advanced per denoising network call during the window (2 rows each, guided): how
    /// full the batches were.
    pub requests_per_denoising_call: f64,
    /// Time of one denoising call ÷ the requests it advanced, ms, during the window.
    pub ms_per_image_step: f64,
    /// By tier.
    pub by_tier: BTreeMap<String, Group>,
    /// By step count.
    pub by_steps: BTreeMap<u32, Group>,
    /// By tier and step count, `tier/steps` (whether a tier's short requests wait for long ones).
    pub by_tier_steps: BTreeMap<String, Group>,
}

/// The unloaded phase's book → latency by step count. Every request must have come back with an
/// image: a failure there means the workload does not run at all.
pub fn unloaded(book: &Entries) -> anyhow::Result<BTreeMap<u32, Unloaded>> {
    let mut samples: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for (id, (sent, outcome)) in book {
        let Some((doc, at)) = &outcome.last else {
            anyhow::bail!("unloaded request {id} got no reply");
        };
        anyhow::ensure!(
            doc.status == ReplyStatus::Ok,
            "unloaded request {id} failed: {:?}",
            doc.error
        );
        let steps = sent.steps.unwrap_or(0);
        samples
            .entry(steps)
            .or_default()
            .push((*at - sent.at).as_secs_f64() * 1000.0);
    }
    Ok(samples
        .into_iter()
        .map(|(steps, mut ms)| {
            let [p50, _, p99] = percentiles(&mut ms);
            let unloaded = Unloaded {
                samples_ms: ms,
                p50_ms: p50,
                p99_ms: p99,
            };
            (steps, unloaded)
        })
        .collect())
}

/// What the load phase is judged against.
pub struct Reference<'a> {
    /// `[batching.diffusion] mode`.
    pub mode: &'a str,
    /// Most requests at once.
    pub batch: usize,
    /// Image side.
    pub size: u32,
    /// Step counts and shares.
    pub steps_mix: &'a [(u32, f64)],
    /// SLO factor.
    pub slo_factor: f64,
    /// SLO bases given on the command line, by step count.
    pub slo_base_ms: &'a BTreeMap<u32, f64>,
    /// Measured alone, by step count.
    pub unloaded: BTreeMap<u32, Unloaded>,
}

/// Sum up the load phase's book (requests sent during `window`).
pub fn summarize(book: &Entries, reference: Reference<'_>, window: &Window) -> DiffusionReport {
    let seconds = window.sending.as_secs_f64();
    let engine = window.engine;
    let Reference {
        mode,
        batch,
        size,
        steps_mix,
        slo_factor,
        slo_base_ms,
        unloaded,
    } = reference;
    let slo_ms: BTreeMap<u32, f64> = steps_mix
        .iter()
        .map(|&(steps, _)| {
            let base = slo_base_ms
                .get(&steps)
                .copied()
                .or_else(|| unloaded.get(&steps).map(|u| u.p50_ms))
                .unwrap_or(f64::INFINITY);
            (steps, slo_factor * base)
        })
        .collect();
    let mixture: Vec<(f64, &[f64])> = steps_mix
        .iter()
        .filter_map(|(steps, share)| unloaded.get(steps).map(|u| (*share, u.samples_ms.as_slice())))
        .collect();
    let unloaded_mix_ms = [mixture_quantile(&mixture, 0.5), mixture_quantile(&mixture, 0.99)];

    let mut by_tier: BTreeMap<String, (Group, Vec<f64>)> = BTreeMap::new();
    let mut by_steps: BTreeMap<u32, (Group, Vec<f64>)> = BTreeMap::new();
    let mut by_tier_steps: BTreeMap<(String, u32), (Group, Vec<f64>)> = BTreeMap::new();
    for (sent, outcome) in book.values() {
        let steps = sent.steps.unwrap_or(0);
        let slo = slo_ms.get(&steps).copied().unwrap_or(f64::INFINITY);
        let counted = Counted::of(outcome, sent.at, slo);
        counted.add(by_tier.entry(sent.tier.clone()).or_default());
        counted.add(by_steps.entry(steps).or_default());
        counted.add(by_tier_steps.entry((sent.tier.clone(), steps)).or_default());
    }
    let finish = |(mut group, mut total): (Group, Vec<f64>), unloaded_p99: Option<f64>| {
        let [p50, _, p99] = percentiles(&mut total);
        group.total_ms = [p50, p99];
        group.goodput_per_sec = group.within_slo as f64 / seconds;
        group.p99_over_unloaded = unloaded_p99.map_or(f64::NAN, |u| p99 / u);
        group
    };
    let by_tier: BTreeMap<String, Group> = by_tier
        .into_iter()
        .map(|(tier, g)| (tier, finish(g, Some(unloaded_mix_ms[1]))))
        .collect();
    let by_steps: BTreeMap<u32, Group> = by_steps
        .into_iter()
        .map(|(steps, g)| (steps, finish(g, unloaded.get(&steps).map(|u| u.p99_ms))))
        .collect();
    let by_tier_steps: BTreeMap<String, Group> = by_tier_steps
        .into_iter()
        .map(|((tier, steps), g)| {
            let group = finish(g, unloaded.get(&steps).map(|u| u.p99_ms));
            (format!("{tier}/{steps}"), group)
        })
        .collect();
    DiffusionReport {
        mode: mode.to_owned(),
        batch,
        size,
        steps_mix: steps_mix.to_vec(),
        slo_factor,
        goodput_per_sec: by_tier.values().map(|g| g.within_slo).sum::<usize>() as f64 / seconds,
        requests_per_denoising_call: engine.image_steps / engine.denoising_calls,
        ms_per_image_step: engine.denoising_seconds * 1000.0 / engine.image_steps,
        unloaded,
        unloaded_mix_ms,
        slo_ms,
        by_tier,
        by_steps,
        by_tier_steps,
    }
}

/// One request's contribution to its groups.
struct Counted {
    group: Group,
    total_ms: Option<f64>,
}

impl Counted {
    fn of(outcome: &Outcome, sent_at: std::time::Instant, slo_ms: f64) -> Self {
        let mut group = Group {
            sent: 1,
            deferred: usize::from(outcome.notices > 0),
            ..Group::default()
        };
        let mut total_ms = None;
        match &outcome.last {
            None => group.unanswered = usize::from(outcome.notices == 0),
            Some((doc, at)) => match (doc.status, doc.error.as_ref().map(|e| e.code.as_str())) {
                (ReplyStatus::Ok, _) => {
                    let ms = (*at - sent_at).as_secs_f64() * 1000.0;
                    group.ok = 1;
                    group.within_slo = usize::from(ms <= slo_ms);
                    group.degraded = usize::from(doc.degraded.is_some());
                    total_ms = Some(ms);
                }
                (_, Some("rate_limited")) => group.rejected = 1,
                (_, Some("expired")) => group.expired = 1,
                _ => group.errors = 1,
            },
        }
        Self { group, total_ms }
    }

    fn add(&self, (group, total): &mut (Group, Vec<f64>)) {
        let g = &self.group;
        group.sent += g.sent;
        group.ok += g.ok;
        group.within_slo += g.within_slo;
        group.rejected += g.rejected;
        group.expired += g.expired;
        group.errors += g.errors;
        group.deferred += g.deferred;
        group.degraded += g.degraded;
        group.unanswered += g.unanswered;
        total.extend(self.total_ms);
    }
}

/// The `q` quantile (nearest rank) of a mixture of empirical distributions, each `(weight,
/// samples)`: the smallest sample at which the weighted CDF reaches `q`. NaN when empty.
fn mixture_quantile(parts: &[(f64, &[f64])], q: f64) -> f64 {
    let total: f64 = parts.iter().filter(|(_, s)| !s.is_empty()).map(|(w, _)| w).sum();
    let mut points: Vec<(f64, f64)> = parts
        .iter()
        .filter(|(_, s)| !s.is_empty())
        .flat_map(|(w, s)| s.iter().map(move |&x| (x, w / total / s.len() as f64)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut cdf = 0.0;
    for (x, p) in &points {
        cdf += p;
        if cdf >= q - 1e-9 {
            return *x;
        }
    }
    points.last().map_or(f64::NAN, |(x, _)| *x)
}

/// Print the unloaded reference, then the load phase by tier and by step count (Markdown).
pub fn print(r: &DiffusionReport) {
    println!(
        "diffusion: mode {}, {} px, at most {} requests at once, SLO = {} x unloaded p50; goodput {:.3} img/s; \
         {:.2} requests per denoising call, {:.1} ms per image-step",
        r.mode, r.size, r.batch, r.slo_factor, r.goodput_per_sec, r.requests_per_denoising_call, r.ms_per_image_step
    );
    println!("| steps | share | unloaded p50 / p99 ms (n) | SLO ms |");
    println!("|---|---|---|---|");
    for (steps, share) in &r.steps_mix {
        let (p50, p99, n) = r
            .unloaded
            .get(steps)
            .map_or((f64::NAN, f64::NAN, 0), |u| (u.p50_ms, u.p99_ms, u.samples_ms.len()));
        let slo = r.slo_ms.get(steps).copied().unwrap_or(f64::NAN);
        println!("| {steps} | {share:.2} | {p50:.0} / {p99:.0} ({n}) | {slo:.0} |");
    }
    println!(
        "| mix | 1.00 | {:.0} / {:.0} | - |",
        r.unloaded_mix_ms[0], r.unloaded_mix_ms[1]
    );
    println!();
    println!(
        "| group | sent | ok | within SLO | goodput img/s | total p50 / p99 ms | p99 ÷ unloaded p99 | rejected | expired | other errors | deferred | degraded | unanswered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let rows = r
        .by_tier
        .iter()
        .map(|(tier, g)| (tier.clone(), g))
        .chain(r.by_steps.iter().map(|(steps, g)| (format!("{steps} steps"), g)))
        .chain(r.by_tier.keys().flat_map(|tier| {
            r.steps_mix.iter().filter_map(move |(steps, _)| {
                let key = format!("{tier}/{steps}");
                r.by_tier_steps.get(&key).map(|g| (format!("{tier}, {steps} steps"), g))
            })
        }));
    for (name, g) in rows {
        println!(
            "| {name} | {} | {} | {} | {:.3} | {:.0} / {:.0} | {:.2} | {} | {} | {} | {} | {} | {} |",
            g.sent,
            g.ok,
            g.within_slo,
            g.goodput_per_sec,
            g.total_ms[0],
            g.total_ms[1],
            g.p99_over_unloaded,
            g.rejected,
            g.expired,
            g.errors,
            g.deferred,
            g.degraded,
            g.unanswered
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::book::Sent;
    use super::*;
    use kiln::domain::{ImageInfo, ReplyDocument, Timings};

    #[test]
    fn the_mixture_quantile_weighs_each_part_by_its_share() {
        let short: Vec<f64> = (1..=10).map(f64::from).collect();
        let long: Vec<f64> = (101..=110).map(f64::from).collect();
        let parts = [(0.7, short.as_slice()), (0.3, long.as_slice())];
        assert_eq!(mixture_quantile(&parts, 0.5), 8.0);
        assert_eq!(mixture_quantile(&parts, 0.7), 10.0);
        assert_eq!(mixture_quantile(&parts, 0.99), 110.0);
        assert!(mixture_quantile(&[], 0.5).is_nan());
    }

    fn ok_after(ms: u64) -> Outcome {
        let image = ImageInfo {
            format: "png".into(),
            width: 256,
            height: 256,
            bytes: 1,
        };
        let ok = ReplyDocument::ok("r".into(), "m".into(), image, Timings::default(), "w".into());
        Outcome {
            notices: 0,
            last: Some((ok, Instant::now() + Duration::from_millis(ms))),
        }
    }

    #[test]
    fn goodput_counts_ok_images_within_the_slo_of_their_step_count() {
        let now = Instant::now();
        let sent = |tier: &str, steps| Sent {
            tier: tier.into(),
            steps: Some(steps),
            at: now,
        };
        let mut book = Entries::new();
        book.insert("a".into(), (sent("pro", 4), ok_after(250)));
        book.insert("b".into(), (sent("pro", 4), ok_after(400)));
        book.insert("c".into(), (sent("free", 50), ok_after(2_000)));
        book.insert("d".into(), (sent("free", 50), Outcome::default()));
        let unloaded = BTreeMap::from([(4, unloaded_of(&[100.0, 110.0])), (50, unloaded_of(&[900.0, 1000.0]))]);
        let mix = [(4, 0.5), (50, 0.5)];
        let reference = Reference {
            mode: "step",
            batch: 2,
            size: 256,
            steps_mix: &mix,
            slo_factor: 3.0,
            slo_base_ms: &BTreeMap::new(),
            unloaded,
        };
        let r = summarize(&book, reference, &window(2.0));
        assert_eq!(r.slo_ms, BTreeMap::from([(4, 300.0), (50, 2700.0)]));
        // a (250 ≤ 300) and c (2000 ≤ 2700) count; b is late, d unanswered.
        assert_eq!(r.goodput_per_sec, 1.0);
        assert_eq!((r.by_steps[&4].ok, r.by_steps[&4].within_slo), (2, 1));
        assert_eq!((r.by_tier["free"].sent, r.by_tier["free"].unanswered), (2, 1));
        assert_eq!(
            (r.by_tier_steps["pro/4"].sent, r.by_tier_steps["pro/4"].within_slo),
            (2, 1)
        );
        assert!((r.by_steps[&50].p99_over_unloaded - 2.0).abs() < 0.05);
        // With the SLO base given, the unloaded p50 is not used.
        let given = BTreeMap::from([(4, 200.0)]);
        let reference = Reference {
            mode: "step",
            batch: 2,
            size: 256,
            steps_mix: &mix,
            slo_factor: 3.0,
            slo_base_ms: &given,
            unloaded: BTreeMap::from([(4, unloaded_of(&[100.0])), (50, unloaded_of(&[900.0]))]),
        };
        assert_eq!(summarize(&book, reference, &window(2.0)).by_steps[&4].within_slo, 2);
    }

    fn window(seconds: f64) -> Window {
        Window {
            started: Instant::now(),
            sending: Duration::from_secs_f64(seconds),
            engine: Default::default(),
        }
    }

    fn unloaded_of(ms: &[f64]) -> Unloaded {
        let mut samples = ms.to_vec();
        let [p50, _, p99] = percentiles(&mut samples);
        Unloaded {
            samples_ms: samples,
            p50_ms: p50,
            p99_ms: p99,
        }
    }
}
