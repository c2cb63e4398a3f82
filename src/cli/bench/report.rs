//! The report: per tier figures from the book, the device's from the engine counters.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::book::{Entries, Outcome, Sent};
use super::counters::EngineCounters;
use super::goodput::DiffusionReport;
use kiln::domain::ReplyStatus;

/// One tier's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierReport {
    /// Requests sent.
    pub sent: usize,
    /// Answered with an image.
    pub ok: usize,
    /// Answered `rate_limited`.
    pub rejected: usize,
    /// Answered `expired`.
    pub expired: usize,
    /// Other errors, by code.
    pub errors: BTreeMap<String, usize>,
    /// Requests that got at least one `deferred` notice.
    pub deferred: usize,
    /// Requests served degraded.
    pub degraded: usize,
    /// Neither a final reply nor a notice by the end of the drain.
    pub unanswered: usize,
    /// Ok replies received within the sending window.
    pub images_in_window: usize,
    /// Images per second delivered within the sending window.
    pub images_per_sec: f64,
    /// Wait before the device (broker + batcher), ms: p50, p95, p99 of ok replies.
    pub wait_ms: [f64; 3],
    /// Of that wait, the broker's part (created to received by the worker), ms: p50, p95, p99.
    pub queue_wait_ms: [f64; 3],
    /// Of that wait, the batcher's part (prepared to its batch starting), ms: p50, p95, p99.
    pub batch_wait_ms: [f64; 3],
    /// Decoding and laying out, ms: p50, p95, p99.
    pub preprocess_ms: [f64; 3],
    /// Publish to reply, ms: p50, p95, p99 of ok replies.
    pub total_ms: [f64; 3],
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Closed-loop images/s before the run (None with `--rate`).
    pub capacity_per_sec: Option<f64>,
    /// Requests/s offered.
    pub offered_per_sec: f64,
    /// Images/s delivered over the sending window, all tiers.
    pub images_per_sec: f64,
    /// Fraction of the sending window the inference thread spent running models.
    pub busy_fraction: f64,
    /// Mean requests per model run over the window.
    pub mean_batch_size: f64,
    /// Inference thread busy time per image over the window, ms: the device's service time, which
    /// grows when other work (broker, load generator) takes the same cores.
    pub busy_ms_per_image: f64,
    /// By tier.
    pub tiers: BTreeMap<String, TierReport>,
    /// The diffusion workload's figures: unloaded reference, SLOs, goodput, latency by tier and by
    /// step count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diffusion: Option<DiffusionReport>,
}

/// The open-loop sending window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// When sending started.
    pub started: Instant,
    /// How long it lasted.
    pub sending: Duration,
    /// What the inference thread did meanwhile.
    pub engine: EngineCounters,
}

/// The ms samples of one tier's ok replies.
#[derive(Default)]
struct Samples {
    wait: Vec<f64>,
    total: Vec<f64>,
    queue: Vec<f64>,
    batch: Vec<f64>,
    preprocess: Vec<f64>,
}

/// Sum up the book of a run that offered `offered` requests/s during `window`.
pub fn summarize(book: &Entries, capacity: Option<f64>, offered: f64, window: &Window) -> BenchReport {
    let window_end = window.started + window.sending;
    let mut tally: BTreeMap<String, (TierReport, Samples)> = BTreeMap::new();
    for (sent, outcome) in book.values() {
        let (t, samples) = tally.entry(sent.tier.clone()).or_default();
        count(t, samples, sent, outcome, window_end);
    }
    let seconds = window.sending.as_secs_f64();
    let tiers: BTreeMap<String, TierReport> = tally
        .into_iter()
        .map(|(tier, (mut t, mut s))| {
            t.wait_ms = percentiles(&mut s.wait);
            t.total_ms = percentiles(&mut s.total);
            t.queue_wait_ms = percentiles(&mut s.queue);
            t.batch_wait_ms = percentiles(&mut s.batch);
            t.preprocess_ms = percentiles(&mut s.preprocess);
            t.images_per_sec = t.images_in_window as f64 / seconds;
            (tier, t)
        })
        .collect();
    let images_in_window: usize = tiers.values().map(|t| t.images_in_window).sum();
    let EngineCounters {
        busy_seconds,
        batches,
        images,
        ..
    } = window.engine;
    BenchReport {
        capacity_per_sec: capacity,
        offered_per_sec: offered,
        images_per_sec: images_in_window as f64 / seconds,
        busy_fraction: busy_seconds / seconds,
        mean_batch_size: if batches > 0.0 { images / batches } else { 0.0 },
        busy_ms_per_image: if images > 0.0 {
            busy_seconds * 1000.0 / images
        } else {
            0.0
        },
        tiers,
        diffusion: None,
    }
}

/// Count one request's outcome in its tier.
fn count(t: &mut TierReport, samples: &mut Samples, sent: &Sent, outcome: &Outcome, window_end: Instant) {
    t.sent += 1;
    if outcome.notices > 0 {
        t.deferred += 1;
    }
    let Some((doc, at)) = &outcome.last else {
        if outcome.notices == 0 {
            t.unanswered += 1;
        }
        return;
    };
    match (doc.status, doc.error.as_ref().map(|e| e.code.as_str())) {
        (ReplyStatus::Ok, _) => {
            t.ok += 1;
            if doc.degraded.is_some() {
                t.degraded += 1;
            }
            if *at <= window_end {
                t.images_in_window += 1;
            }
            let timings = &doc.timings_ms;
            let (queue, batch) = (timings.queue_wait.unwrap_or(0.0), timings.batch_wait.unwrap_or(0.0));
            samples.wait.push(queue + batch);
            samples.total.push((*at - sent.at).as_secs_f64() * 1000.0);
            samples.queue.push(queue);
            samples.batch.push(batch);
            samples.preprocess.push(timings.preprocess);
        }
        (_, Some("rate_limited")) => t.rejected += 1,
        (_, Some("expired")) => t.expired += 1,
        (_, code) => *t.errors.entry(code.unwrap_or("unknown").to_owned()).or_default() += 1,
    }
}

/// Print the report: a summary line and a Markdown table by tier.
pub fn print(r: &BenchReport) {
    println!(
        "capacity {} img/s, offered {:.1} req/s, delivered {:.1} img/s in the window, inference busy {:.1}%, mean batch {:.2}, busy {:.1} ms per image",
        r.capacity_per_sec.map_or("-".into(), |c| format!("{c:.1}")),
        r.offered_per_sec,
        r.images_per_sec,
        r.busy_fraction * 100.0,
        r.mean_batch_size,
        r.busy_ms_per_image
    );
    println!(
        "| tier | sent | ok | img/s | wait p50/p95/p99 ms | of which broker / batcher p99 ms | preprocess p99 ms | total p50/p95/p99 ms | rejected | deferred | degraded | expired | other errors | unanswered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (tier, t) in &r.tiers {
        let p = |v: [f64; 3]| format!("{:.0} / {:.0} / {:.0}", v[0], v[1], v[2]);
        println!(
            "| {tier} | {} | {} | {:.1} | {} | {:.0} / {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            t.sent,
            t.ok,
            t.images_per_sec,
            p(t.wait_ms),
            t.queue_wait_ms[2],
            t.batch_wait_ms[2],
            t.preprocess_ms[2],
            p(t.total_ms),
            t.rejected,
            t.deferred,
            t.degraded,
            t.expired,
            t.errors.values().sum::<usize>(),
            t.unanswered
        );
    }
}

/// p50, p95, p99 by nearest rank (zeros for no values).
pub(super) fn percentiles(values: &mut [f64]) -> [f64; 3] {
    if values.is_empty() {
        return [0.0; 3];
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
    [at(0.50), at(0.95), at(0.99)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&mut v), [50.0, 95.0, 99.0]);
        assert_eq!(percentiles(&mut []), [0.0; 3]);
    }
}
