//! The scheduling policy alone, under overload, on a device the load cannot slow down.
//!
//! `kiln bench` measures the whole worker, but on a 2-core machine the broker, the load generator
//! and the image work take cores from inference, so an overload there also slows the device (its
//! time per image grows by a third, BENCHMARKS.md). A GPU does not slow down that way. This
//! discrete-event simulation drives the real [`Batcher`] (weights from the default
//! `scheduling.weights`, per-tier intake limited by the prefetch as the tier queues' channels are)
//! with Poisson arrivals and a device whose batch times are fixed: measured on this VM's CPU, or the
//! H200 reference figures of BENCHMARKS.md (*GPU*). It reports the wait before the device (broker +
//! batcher) per tier at 3x capacity against the same paid traffic alone.
//!
//! `cargo run --example batcher_simulation` prints the tables (BENCHMARKS.md, *The
//! scheduling policy alone*); its tests, which `cargo nextest run --tests` runs (`test = true` in
//! Cargo.toml), assert the bounds: `cargo nextest run --example batcher_simulation --success-output
//! immediate` prints the tables as they check them.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kiln::inference::batcher::{BatchKey, BatchLimits, Batchable, Batcher, Next};
use kiln::scheduling::SchedulingSettings;

const TIERS: [&str; 3] = ["pro", "plus", "free"];

/// A device: how long a batch of `n` takes.
#[derive(Clone, Copy)]
struct Device {
    name: &'static str,
    max_batch_size: usize,
    /// (batch size, seconds per batch) points, linearly interpolated.
    points: &'static [(f64, f64)],
}

impl Device {
    fn batch_seconds(&self, n: usize) -> f64 {
        let n = n as f64;
        let p = self.points;
        let i = p.iter().position(|(b, _)| *b >= n).unwrap_or(p.len() - 1).max(1);
        let ((b0, s0), (b1, s1)) = (p[i - 1], p[i]);
        s0 + (s1 - s0) * (n - b0) / (b1 - b0)
    }

    fn capacity(&self) -> f64 {
        self.max_batch_size as f64 / self.batch_seconds(self.max_batch_size)
    }
}

/// This VM's CPU at 256 px: 15.7 ms per image, no gain from batching (BENCHMARKS.md).
const CPU: Device = Device {
    name: "2-vCPU VM, 256 px, batch 1",
    max_batch_size: 1,
    points: &[(0.0, 0.0), (1.0, 0.0157), (2.0, 0.0314)],
};

/// H200 at 256 px, fp32 (BENCHMARKS.md, *GPU*): 428, 1310 and 1971 images/s at batch 1, 4, 16.
const H200: Device = Device {
    name: "H200, 256 px, batches up to 16",
    max_batch_size: 16,
    points: &[
        (0.0, 0.0),
        (1.0, 1.0 / 428.0),
        (4.0, 4.0 / 1310.0),
        (16.0, 16.0 / 1971.0),
    ],
};

struct Job {
    class: usize,
    arrived: Instant,
    sent: f64,
}

impl Batchable for Job {
    fn key(&self) -> BatchKey {
        BatchKey {
            model: "multistyle26".into(),
            shape: (256, 256),
            group: 0,
        }
    }
    fn class(&self) -> usize {
        self.class
    }
    fn arrived(&self) -> Instant {
        self.arrived
    }
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// xorshift64*: reproducible arrivals without a dependency.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// p99 wait (ms) per tier of Poisson traffic at `rates` (requests/s per tier) for `seconds`.
fn simulate(device: Device, rates: [f64; 3], seconds: f64, prefetch: usize, seed: u64) -> [Option<f64>; 3] {
    let defaults = SchedulingSettings::default();
    let weights: Vec<f64> = TIERS.iter().map(|t| defaults.weights[*t]).collect();
    let limits = BatchLimits {
        max_batch_size: device.max_batch_size,
        max_queue_delay: Duration::from_millis(2),
    };
    let mut batcher = Batcher::new(weights, HashMap::new(), limits);
    let t0 = Instant::now();
    let at = |t: f64| t0 + Duration::from_secs_f64(t);

    // All arrivals, in time order.
    let mut rng = Rng(seed);
    let mut arrivals: Vec<(f64, usize)> = Vec::new();
    for (class, rate) in rates.iter().enumerate().filter(|(_, r)| **r > 0.0) {
        let mut t = 0.0;
        loop {
            t += -(1.0 - rng.unit()).ln() / rate;
            if t >= seconds {
                break;
            }
            arrivals.push((t, class));
        }
    }
    arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut broker: [VecDeque<f64>; 3] = Default::default();
    let mut held = [0usize; 3]; // in the worker: in the batcher or on the device (prefetch)
    let mut running: Vec<usize> = Vec::new();
    let mut free_at = 0.0;
    let mut waits: [Vec<f64>; 3] = Default::default();
    let mut next = 0;
    let mut now = 0.0;
    loop {
        while next < arrivals.len() && arrivals[next].0 <= now {
            broker[arrivals[next].1].push_back(arrivals[next].0);
            next += 1;
        }
        if now >= free_at {
            for class in running.drain(..) {
                held[class] -= 1;
            }
        }
        for class in 0..3 {
            while held[class] < prefetch {
                let Some(sent) = broker[class].pop_front() else { break };
                held[class] += 1;
                batcher.push(Job {
                    class,
                    arrived: at(now),
                    sent,
                });
            }
        }
        let mut wake_at = None;
        if running.is_empty() {
            match batcher.next(at(now), next == arrivals.len()) {
                Next::Run(batch) => {
                    for job in &batch {
                        waits[job.class].push((now - job.sent) * 1000.0);
                        running.push(job.class);
                    }
                    free_at = now + device.batch_seconds(batch.len());
                }
                Next::WaitUntil(until) => wake_at = Some((until - t0).as_secs_f64()),
                Next::Empty if next == arrivals.len() && broker.iter().all(VecDeque::is_empty) => break,
                Next::Empty => {}
            }
        }
        let mut candidates = vec![];
        if next < arrivals.len() {
            candidates.push(arrivals[next].0);
        }
        if !running.is_empty() {
            candidates.push(free_at);
        }
        candidates.extend(wake_at);
        let Some(t) = candidates.into_iter().min_by(f64::total_cmp) else {
            break;
        };
        now = t.max(now);
    }
    waits.map(|mut w| {
        (!w.is_empty()).then(|| {
            w.sort_by(f64::total_cmp);
            w[((w.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)]
        })
    })
}

/// Paid p99 wait at 3x capacity (free 0.8, plus 0.1, pro 0.1) ÷ the same paid traffic alone,
/// averaged over seeds. Returns (pro, plus) ratios. `loaded` is the device during the overload
/// (the same one, or a slower one: what shared cores do to a CPU), `device` the one alone.
fn overload_ratios(device: Device, loaded_device: Device, seconds: f64) -> (f64, f64) {
    let capacity = device.capacity();
    let (mut pro, mut plus) = (0.0, 0.0);
    let seeds = [1u64, 2, 3, 4, 5];
    println!(
        "\n{} (capacity {capacity:.0} images/s); during the overload: {}; {seconds} s per run:",
        device.name, loaded_device.name
    );
    println!("| seed | pro p99 at 3x / alone ms | plus p99 at 3x / alone ms | free p99 at 3x ms |");
    println!("| --- | --- | --- | --- |");
    for seed in seeds {
        let paid = 0.1 * 3.0 * capacity;
        let loaded = simulate(loaded_device, [paid, paid, 0.8 * 3.0 * capacity], seconds, 16, seed);
        let alone = simulate(device, [paid, paid, 0.0], seconds, 16, seed);
        let (lp, ap) = (loaded[0].unwrap(), alone[0].unwrap());
        let (ll, al) = (loaded[1].unwrap(), alone[1].unwrap());
        println!(
            "| {seed} | {lp:.1} / {ap:.1} | {ll:.1} / {al:.1} | {:.0} |",
            loaded[2].unwrap()
        );
        pro += lp / ap;
        plus += ll / al;
    }
    let n = seeds.len() as f64;
    println!("mean ratio 3x ÷ alone: pro {:.2}, plus {:.2}", pro / n, plus / n);
    (pro / n, plus / n)
}

/// This VM's CPU as `kiln bench` found it during overload runs: 18.1 and 21.2 ms per image instead
/// of 15.7 (the broker, the load generator and the image work share its 2 cores).
const CPU_SHARED: Device = Device {
    name: "the same CPU slowed to 18.1 ms per image",
    max_batch_size: 1,
    points: &[(0.0, 0.0), (1.0, 0.0181), (2.0, 0.0362)],
};
const CPU_SHARED_MORE: Device = Device {
    name: "the same CPU slowed to 21.2 ms per image",
    max_batch_size: 1,
    points: &[(0.0, 0.0), (1.0, 0.0212), (2.0, 0.0424)],
};

/// Seconds of traffic per run: a CPU model serves few images a second and needs longer runs.
fn run_seconds(device: Device) -> f64 {
    if device.max_batch_size == 1 {
        120.0
    } else {
        20.0
    }
}

fn main() {
    for device in [CPU, H200] {
        overload_ratios(device, device, run_seconds(device));
    }
    for slowed in [CPU_SHARED, CPU_SHARED_MORE] {
        overload_ratios(CPU, slowed, run_seconds(CPU));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_hits_the_measured_points() {
        assert!((H200.batch_seconds(16) - 16.0 / 1971.0).abs() < 1e-12);
        assert!((H200.batch_seconds(1) - 1.0 / 428.0).abs() < 1e-12);
        assert!(H200.batch_seconds(8) > H200.batch_seconds(4) && H200.batch_seconds(8) < H200.batch_seconds(16));
        assert!((CPU.capacity() - 1.0 / 0.0157).abs() < 1e-9);
    }

    #[test]
    fn with_a_device_that_does_not_slow_down_paid_p99_wait_at_3x_stays_within_2x_of_paid_alone() {
        for device in [CPU, H200] {
            let (pro, plus) = overload_ratios(device, device, run_seconds(device));
            assert!(pro <= 2.0, "{}: pro {pro:.2}", device.name);
            assert!(plus <= 2.0, "{}: plus {plus:.2}", device.name);
        }
    }

    #[test]
    fn a_device_slowed_as_measured_under_overload_costs_plus_most() {
        // Not a bound the worker must meet: the explanation in BENCHMARKS.md, checked. The same policy
        // with the device slowed as `kiln bench` measured it under overload takes plus from ~1.2x its
        // unloaded p99 wait to several times that, as measured on this machine.
        let (_, plus_steady) = overload_ratios(CPU, CPU, 120.0);
        let (_, plus) = overload_ratios(CPU, CPU_SHARED, 120.0);
        let (_, plus_more) = overload_ratios(CPU, CPU_SHARED_MORE, 120.0);
        assert!(
            plus > 1.5 * plus_steady,
            "slowing the device should cost plus: {plus:.2} vs {plus_steady:.2}"
        );
        assert!(
            plus_more > plus,
            "a slower device costs plus more: {plus_more:.2} vs {plus:.2}"
        );
    }
}
