//! What `kiln simulate` reports: figures per policy and group, the targets, a table and JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use super::policies::{Mode, Outcome};
use super::workload::Class;

/// Simulated capacities, requests/s.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Capacity {
    /// Whole-request policy, saturated queue: the reference of `--load`.
    pub(super) request_per_sec: f64,
    /// Whole-request batches that are always full (an upper bound of the above).
    pub(super) request_full_batches_per_sec: f64,
    /// Step-level policy, saturated queue.
    pub(super) step_per_sec: f64,
}

/// Latency of a group of answered requests.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Group {
    pub(super) name: String,
    pub(super) answered: usize,
    /// Share answered within the SLO.
    pub(super) within_slo: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    /// p99 ÷ the group's unloaded p99: its step count's unloaded latency, or for a mix of step counts
    /// (a tier, the paid tiers, all) the p99 of the mix's unloaded latencies (as `kiln bench`).
    pub(super) p99_over_unloaded: f64,
    /// p99 of each request's latency ÷ the unloaded latency of its own step count.
    pub(super) p99_stretch: f64,
}

impl Group {
    /// The figures of `outcomes`, given each one's latency ÷ unloaded and the group's unloaded p99.
    pub(super) fn of<'o>(
        name: &str,
        outcomes: impl Iterator<Item = &'o Outcome>,
        stretch: &dyn Fn(&Outcome) -> f64,
        slo: f64,
        unloaded_ms: f64,
    ) -> Self {
        let mut latency = Vec::new();
        let mut stretches = Vec::new();
        for o in outcomes {
            latency.push((o.end - o.req.arrival).as_secs_f64() * 1000.0);
            stretches.push(stretch(o));
        }
        let within = stretches.iter().filter(|s| **s <= slo).count();
        let p99_ms = percentile(&mut latency, 0.99);
        Self {
            name: name.to_owned(),
            answered: latency.len(),
            within_slo: if latency.is_empty() {
                0.0
            } else {
                within as f64 / latency.len() as f64
            },
            p50_ms: percentile(&mut latency, 0.50),
            p99_ms,
            p99_over_unloaded: p99_ms / unloaded_ms,
            p99_stretch: percentile(&mut stretches, 0.99),
        }
    }
}

/// Nearest rank; NaN for no values.
pub(super) fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1]
}

/// One policy's figures over the window.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ModeReport {
    pub(super) mode: Mode,
    /// Step-level cap, or whole-request `max_batch_size`.
    pub(super) cap: usize,
    pub(super) throughput_per_sec: f64,
    /// Answered within the SLO, per second.
    pub(super) goodput_per_sec: f64,
    /// Share of the window the device was running a call.
    pub(super) busy: f64,
    /// Mean requests stepped by one UNet call.
    pub(super) requests_per_unet_call: f64,
    pub(super) pauses: usize,
    /// Answered requests that had been paused.
    pub(super) paused_requests: usize,
    /// Answered `expired` (past the deadline, or unable to finish by it).
    pub(super) expired: usize,
    /// All, by tier, paid, by step count, paid by step count.
    pub(super) groups: Vec<Group>,
    /// The paid tiers' p99 ÷ unloaded when the same paid arrivals come without the free ones.
    pub(super) paid_alone_p99_over_unloaded: f64,
}

impl ModeReport {
    /// A group's figures (NaN-filled if absent).
    pub(super) fn group(&self, name: &str) -> Group {
        self.groups.iter().find(|g| g.name == name).cloned().unwrap_or(Group {
            name: name.to_owned(),
            answered: 0,
            within_slo: f64::NAN,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            p99_over_unloaded: f64::NAN,
            p99_stretch: f64::NAN,
        })
    }
}

/// Both policies at one cap (`--caps`), on the same arrivals.
#[derive(Debug, Clone, Serialize)]
pub(super) struct SweepRow {
    pub(super) cap: usize,
    pub(super) step: ModeReport,
    pub(super) request: ModeReport,
}

/// A target of the issue, and whether this run meets it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Target {
    pub(super) name: String,
    pub(super) value: f64,
    pub(super) bound: String,
    pub(super) met: bool,
}

impl Target {
    pub(super) fn at_least(name: &str, value: f64, bound: f64) -> Self {
        Self {
            name: name.to_owned(),
            value,
            bound: format!("≥ {bound}"),
            met: value >= bound,
        }
    }

    pub(super) fn at_most(name: &str, value: f64, bound: f64) -> Self {
        Self {
            name: name.to_owned(),
            value,
            bound: format!("≤ {bound}"),
            met: value <= bound,
        }
    }
}

/// Everything a run reports (`--json`).
#[derive(Debug, Clone, Serialize)]
pub(super) struct Report {
    pub(super) curve: String,
    /// The curve's points: (requests, ms per UNet call).
    pub(super) curve_points_ms: Vec<(f64, f64)>,
    /// t(B) at a few batch sizes, ms.
    pub(super) t_unet_ms: Vec<(usize, f64)>,
    pub(super) size: u32,
    pub(super) begin_ratio: f64,
    pub(super) decode_ratio: f64,
    pub(super) scalar_timestep: bool,
    pub(super) max_pauses: u32,
    pub(super) max_queue_delay_ms: f64,
    pub(super) prefetch: usize,
    pub(super) classes: Vec<Class>,
    pub(super) steps_mix: Vec<(u32, f64)>,
    pub(super) unloaded_ms: BTreeMap<u32, f64>,
    /// p99 of the step mix's unloaded latencies: a tier's reference.
    pub(super) unloaded_mix_p99_ms: f64,
    pub(super) slo_factor: f64,
    pub(super) capacity: Capacity,
    /// Offered ÷ whole-request capacity.
    pub(super) load: f64,
    pub(super) offered_per_sec: f64,
    pub(super) duration_secs: f64,
    pub(super) warmup_secs: f64,
    pub(super) seed: u64,
    pub(super) step: ModeReport,
    pub(super) request: ModeReport,
    /// Goodput step ÷ request.
    pub(super) goodput_ratio: f64,
    pub(super) targets: Vec<Target>,
    /// `--caps`: both policies at each cap, same arrivals.
    pub(super) sweep: Vec<SweepRow>,
}

/// The report as Markdown tables.
pub(super) fn print(r: &Report) {
    let t: Vec<String> = r.t_unet_ms.iter().map(|(n, ms)| format!("{n}: {ms:.1}")).collect();
    println!(
        "curve {} ({} px): UNet ms per call by requests {}; text encoder {} × and VAE decode {} × a UNet call of the same batch{}",
        r.curve,
        r.size,
        t.join(", "),
        r.begin_ratio,
        r.decode_ratio,
        if r.scalar_timestep { "; scalar timestep" } else { "" }
    );
    let tiers: Vec<String> = r
        .classes
        .iter()
        .map(|c| match c.deadline_secs {
            Some(d) => format!("{} {:.2} (weight {}, deadline {d} s)", c.tier, c.share, c.weight),
            None => format!("{} {:.2} (weight {})", c.tier, c.share, c.weight),
        })
        .collect();
    let steps: Vec<String> = r.steps_mix.iter().map(|(n, s)| format!("{n} steps {s:.2}")).collect();
    println!("mix: {}; {}", tiers.join(", "), steps.join(", "));
    println!(
        "step-level cap {} (max pauses {}); whole-request max_batch_size {}, max_queue_delay {} ms; prefetch {} per tier",
        r.step.cap, r.max_pauses, r.request.cap, r.max_queue_delay_ms, r.prefetch
    );
    let unloaded: Vec<String> = r
        .unloaded_ms
        .iter()
        .map(|(n, ms)| format!("{n} steps {ms:.1} ms"))
        .collect();
    println!(
        "unloaded: {} (the mix's p99: {:.1} ms, a tier's reference); SLO {} × unloaded",
        unloaded.join(", "),
        r.unloaded_mix_p99_ms,
        r.slo_factor
    );
    println!(
        "capacity (saturated closed loop): whole-request {:.3} req/s (always-full batches: {:.3}), step-level {:.3} req/s",
        r.capacity.request_per_sec, r.capacity.request_full_batches_per_sec, r.capacity.step_per_sec
    );
    println!(
        "offered {:.3} req/s = {:.2} × whole-request capacity; {} s simulated, figures from {} s; seed {}",
        r.offered_per_sec, r.load, r.duration_secs, r.warmup_secs, r.seed
    );
    println!();
    println!(
        "| mode | cap | throughput req/s | goodput req/s | busy | requests per UNet call | pauses (requests paused) | expired | paid p99 ÷ unloaded (paid alone) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for m in [&r.step, &r.request] {
        println!(
            "| {:?} | {} | {:.3} | {:.3} | {:.1}% | {:.2} | {} ({}) | {} | {:.2} ({:.2}) |",
            m.mode,
            m.cap,
            m.throughput_per_sec,
            m.goodput_per_sec,
            m.busy * 100.0,
            m.requests_per_unet_call,
            m.pauses,
            m.paused_requests,
            m.expired,
            m.group("paid").p99_over_unloaded,
            m.paid_alone_p99_over_unloaded
        );
    }
    println!();
    println!("**goodput step ÷ request: {:.2}**", r.goodput_ratio);
    println!();
    println!("| group | step: answered / in SLO / p50 ms / p99 ms / p99 ÷ unloaded | request: answered / in SLO / p50 ms / p99 ms / p99 ÷ unloaded |");
    println!("| --- | --- | --- |");
    let cell = |g: &Group| {
        format!(
            "{} / {:.0}% / {:.0} / {:.0} / {:.2}",
            g.answered,
            g.within_slo * 100.0,
            g.p50_ms,
            g.p99_ms,
            g.p99_over_unloaded
        )
    };
    for (s, q) in r.step.groups.iter().zip(&r.request.groups) {
        println!("| {} | {} | {} |", s.name, cell(s), cell(q));
    }
    println!();
    for t in &r.targets {
        let verdict = if t.met { "met" } else { "NOT met" };
        println!("- {}: {:.2} (target {}): {verdict}", t.name, t.value, t.bound);
    }
    if r.sweep.is_empty() {
        return;
    }
    println!();
    println!("Same arrivals, step-level cap = whole-request max_batch_size:");
    println!();
    println!(
        "| cap | step: goodput / throughput req/s / paid in SLO / paid p99 ÷ unloaded | request: goodput / throughput req/s / paid in SLO / paid p99 ÷ unloaded | goodput step ÷ request |"
    );
    println!("| --- | --- | --- | --- |");
    let cell = |m: &ModeReport| {
        let paid = m.group("paid");
        format!(
            "{:.3} / {:.3} / {:.0}% / {:.1}",
            m.goodput_per_sec,
            m.throughput_per_sec,
            paid.within_slo * 100.0,
            paid.p99_over_unloaded
        )
    };
    for row in &r.sweep {
        println!(
            "| {} | {} | {} | {:.2} |",
            row.cap,
            cell(&row.step),
            cell(&row.request),
            row.step.goodput_per_sec / row.request.goodput_per_sec
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert!(percentile(&mut [], 0.99).is_nan());
    }
}
