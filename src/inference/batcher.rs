//! Dynamic batching with priorities: which prepared requests run together, and in what order.
//!
//! The inference thread owns one [`Batcher`]. Prepared requests wait in it, one FIFO per priority
//! class (a tier). Each time the device is free the thread asks [`Batcher::next`]:
//!
//! 1. The *lead* request is the oldest of the class with the smallest virtual time (weighted fair
//!    queueing by stride: every image a class gets advances its virtual time by `1 / weight`, and a
//!    class that was idle starts at the current virtual time, so it cannot bank credit). Paid tiers
//!    with larger weights go first; a free tier with weight 1 still gets `1 / Σ weights` of the
//!    device whenever it has work waiting, so it is never starved.
//! 2. The batch is the lead's *batch key* (model and tensor shape bucket): it runs once it holds
//!    `max_batch_size` requests, or once the lead has waited `max_queue_delay`, whichever is first.
//!    Until then the thread waits for more requests, at most until that instant.
//! 3. The other places of the batch go to requests with the same key, again by virtual time across
//!    classes, so a batch mixes tiers (and styles) but never shapes or models.
//!
//! A request whose deadline passes while it waits is taken out by [`Batcher::take_expired`] and
//! answered `expired` without touching the device. The batcher is plain data and logic (no
//! channels, no clocks of its own): the tests drive it with made-up instants.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What a request must tell the batcher about itself.
pub trait Batchable {
    /// Requests with equal keys can share a batch (same model, same tensor shape).
    fn key(&self) -> BatchKey;
    /// Its priority class (an index into the weights).
    fn class(&self) -> usize;
    /// When it reached the batcher.
    fn arrived(&self) -> Instant;
    /// When rendering must have started by, if ever.
    fn deadline(&self) -> Option<Instant>;
}

/// Model, tensor shape and the kind's batch group: what must agree within a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Model name.
    pub model: String,
    /// Tensor width and height (after padding to the shape bucket).
    pub shape: (u32, u32),
    /// What else the model kind needs to agree (a diffusion model's scheduler and steps); 0 for
    /// kinds that need nothing else.
    pub group: u64,
}

/// How large a model's batches may be and how long the first request may wait for company.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most requests in one run.
    pub max_batch_size: usize,
    /// Longest the lead request waits for the batch to fill.
    pub max_queue_delay: Duration,
}

/// What the inference thread should do next.
#[derive(Debug)]
pub enum Next<J> {
    /// Run these together (non-empty, one key).
    Run(Vec<J>),
    /// Nothing is ready; wait for new requests until this instant, then ask again.
    WaitUntil(Instant),
    /// Nothing waits.
    Empty,
}

/// The waiting room in front of the device. See the module docs.
#[derive(Debug)]
pub struct Batcher<J> {
    queues: Vec<VecDeque<J>>,
    weights: Vec<f64>,
    /// Virtual time of each class: where its next image would be served.
    pass: Vec<f64>,
    /// Virtual time of the last image served.
    clock: f64,
    limits: HashMap<String, BatchLimits>,
    default_limits: BatchLimits,
    len: usize,
}

impl<J: Batchable> Batcher<J> {
    /// A batcher for classes with these weights (each > 0), per-model limits and a default.
    pub fn new(weights: Vec<f64>, limits: HashMap<String, BatchLimits>, default_limits: BatchLimits) -> Self {
        assert!(!weights.is_empty(), "at least one priority class");
        assert!(weights.iter().all(|w| *w > 0.0), "weights must be positive");
        Self {
            queues: weights.iter().map(|_| VecDeque::new()).collect(),
            pass: vec![0.0; weights.len()],
            weights,
            clock: 0.0,
            limits,
            default_limits,
            len: 0,
        }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The limits for a model.
    pub fn limits(&self, model: &str) -> BatchLimits {
        self.limits.get(model).copied().unwrap_or(self.default_limits)
    }

    /// Add a request. A class out of range counts as the last (lowest) one.
    pub fn push(&mut self, job: J) {
        let class = job.class().min(self.queues.len() - 1);
        if self.queues[class].is_empty() {
            // An idle class rejoins at the current virtual time: no credit for having been idle.
            self.pass[class] = self.pass[class].max(self.clock);
        }
        self.queues[class].push_back(job);
        self.len += 1;
    }

    /// Take out every request whose deadline is before `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<J> {
        let mut expired = Vec::new();
        for queue in &mut self.queues {
            let mut kept = VecDeque::with_capacity(queue.len());
            for job in queue.drain(..) {
                match job.deadline() {
                    Some(deadline) if deadline < now => expired.push(job),
                    _ => kept.push_back(job),
                }
            }
            *queue = kept;
        }
        self.len -= expired.len();
        expired
    }

    /// The next batch to run at `now`, or how long to wait for one. With `flush`, a batch runs
    /// without waiting for company (used when no more requests can arrive).
    pub fn next(&mut self, now: Instant, flush: bool) -> Next<J> {
        let Some(lead_class) = self.first_class(|_| true) else {
            return Next::Empty;
        };
        let lead = &self.queues[lead_class][0];
        let key = lead.key();
        let limits = self.limits(&key.model);
        let ready_at = lead.arrived() + limits.max_queue_delay;
        let same_key = self
            .queues
            .iter()
            .flatten()
            .filter(|j| j.key() == key)
            .take(limits.max_batch_size)
            .count();
        if !flush && same_key < limits.max_batch_size && now < ready_at {
            return Next::WaitUntil(ready_at);
        }
        let mut batch = Vec::with_capacity(same_key);
        while batch.len() < limits.max_batch_size {
            let Some(class) = self.first_class(|j| j.key() == key) else {
                break;
            };
            let queue = &mut self.queues[class];
            let index = queue
                .iter()
                .position(|j| j.key() == key)
                .expect("first_class found one");
            batch.push(queue.remove(index).expect("index is in range"));
            self.clock = self.pass[class];
            self.pass[class] += 1.0 / self.weights[class];
        }
        self.len -= batch.len();
        Next::Run(batch)
    }

    /// Put a request back at the head of its class (a paused request resuming before newer ones).
    pub fn push_front(&mut self, job: J) {
        let class = job.class().min(self.queues.len() - 1);
        if self.queues[class].is_empty() {
            self.pass[class] = self.pass[class].max(self.clock);
        }
        self.queues[class].push_front(job);
        self.len += 1;
    }

    /// The request [`Batcher::take_next`] would give if every key had room: the oldest of the class
    /// with the smallest virtual time.
    pub fn lead(&self) -> Option<&J> {
        self.first_class(|_| true).map(|class| &self.queues[class][0])
    }

    /// One request, for a step-level batch that can take any request whose key has `room`: the
    /// oldest such request of the class with the smallest virtual time (the same fair order as
    /// [`Batcher::next`], one request at a time, without waiting for company).
    pub fn take_next(&mut self, room: impl Fn(&BatchKey) -> bool) -> Option<J> {
        let matches = |j: &J| room(&j.key());
        let class = self.first_class(matches)?;
        let queue = &mut self.queues[class];
        let index = queue.iter().position(matches).expect("first_class found one");
        let job = queue.remove(index).expect("index is in range");
        self.clock = self.pass[class];
        self.pass[class] += 1.0 / self.weights[class];
        self.len -= 1;
        Some(job)
    }

    /// Take out every request that `matches` (stopped ones, ones that cannot finish in time).
    pub fn take_where(&mut self, mut matches: impl FnMut(&J) -> bool) -> Vec<J> {
        let mut taken = Vec::new();
        for queue in &mut self.queues {
            let mut kept = VecDeque::with_capacity(queue.len());
            for job in queue.drain(..) {
                if matches(&job) {
                    taken.push(job);
                } else {
                    kept.push_back(job);
                }
            }
            *queue = kept;
        }
        self.len -= taken.len();
        taken
    }

    /// Every waiting request, class by class.
    pub fn iter(&self) -> impl Iterator<Item = &J> {
        self.queues.iter().flatten()
    }

    /// The class with the smallest virtual time among those holding a request that `matches`
    /// (ties go to the heavier weight, then the lower index).
    fn first_class(&self, matches: impl Fn(&J) -> bool) -> Option<usize> {
        (0..self.queues.len())
            .filter(|&c| self.queues[c].iter().any(&matches))
            .min_by(|&a, &b| {
                self.pass[a]
                    .total_cmp(&self.pass[b])
                    .then(self.weights[b].total_cmp(&self.weights[a]))
                    .then(a.cmp(&b))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct J {
        id: u32,
        class: usize,
        shape: (u32, u32),
        model: &'static str,
        arrived: Instant,
        deadline: Option<Instant>,
    }

    impl Batchable for J {
        fn key(&self) -> BatchKey {
            BatchKey {
                model: self.model.into(),
                shape: self.shape,
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
            self.deadline
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn job(id: u32, class: usize, shape: (u32, u32), arrived: Instant) -> J {
        J {
            id,
            class,
            shape,
            model: "m",
            arrived,
            deadline: None,
        }
    }

    fn batcher(weights: &[f64], max_batch_size: usize, delay_ms: u64) -> Batcher<J> {
        let limits = BatchLimits {
            max_batch_size,
            max_queue_delay: Duration::from_millis(delay_ms),
        };
        Batcher::new(weights.to_vec(), HashMap::new(), limits)
    }

    fn ids(next: Next<J>) -> Vec<u32> {
        match next {
            Next::Run(batch) => batch.into_iter().map(|j| j.id).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn take_next_skips_full_keys_and_keeps_the_fair_order() {
        let t0 = Instant::now();
        let mut b = batcher(&[3.0, 1.0], 4, 0);
        b.push(job(1, 1, (64, 64), t0));
        b.push(job(2, 0, (32, 32), t0));
        b.push(job(3, 0, (64, 64), t0));
        assert_eq!(b.lead().map(|j| j.id), Some(2), "the heavier class leads");
        let no_32 = |k: &BatchKey| k.shape != (32, 32);
        assert_eq!(
            b.take_next(no_32).map(|j| j.id),
            Some(3),
            "a full key is skipped, not waited for"
        );
        assert_eq!(b.take_next(no_32).map(|j| j.id), Some(1));
        assert_eq!(b.take_next(no_32).map(|j| j.id), None);
        assert_eq!(b.take_next(|_| true).map(|j| j.id), Some(2));
        assert!(b.is_empty());
    }

    #[test]
    fn a_request_put_back_in_front_resumes_before_newer_ones() {
        let t0 = Instant::now();
        let mut b = batcher(&[1.0], 4, 0);
        b.push(job(1, 0, (64, 64), t0));
        b.push_front(job(9, 0, (64, 64), t0));
        assert_eq!(b.take_where(|j| j.id == 1).len(), 1);
        assert_eq!(b.len(), 1);
        assert_eq!(b.take_next(|_| true).map(|j| j.id), Some(9));
    }

    #[test]
    fn a_batch_waits_for_the_delay_then_runs_with_what_it_has() {
        let t0 = Instant::now();
        let mut b = batcher(&[1.0], 4, 10);
        b.push(job(1, 0, (64, 64), t0));
        b.push(job(2, 0, (64, 64), t0 + 3 * MS));
        match b.next(t0 + 5 * MS, false) {
            Next::WaitUntil(at) => assert_eq!(at, t0 + 10 * MS),
            other => panic!("expected a wait, got {other:?}"),
        }
        assert_eq!(ids(b.next(t0 + 10 * MS, false)), [1, 2]);
        assert!(matches!(b.next(t0 + 10 * MS, false), Next::Empty));
    }

    #[test]
    fn a_full_batch_runs_at_once_and_the_rest_waits() {
        let t0 = Instant::now();
        let mut b = batcher(&[1.0], 3, 1_000);
        for id in 1..=5 {
            b.push(job(id, 0, (64, 64), t0));
        }
        assert_eq!(ids(b.next(t0, false)), [1, 2, 3]);
        assert!(matches!(b.next(t0, false), Next::WaitUntil(_)));
        assert_eq!(ids(b.next(t0, true)), [4, 5], "flush runs a partial batch");
        assert!(b.is_empty());
    }

    #[test]
    fn shapes_and_models_never_share_a_batch() {
        let t0 = Instant::now();
        let mut b = batcher(&[1.0], 8, 0);
        b.push(job(1, 0, (64, 64), t0));
        b.push(job(2, 0, (128, 64), t0));
        b.push(job(3, 0, (64, 64), t0));
        let mut other_model = job(4, 0, (64, 64), t0);
        other_model.model = "n";
        b.push(other_model);
        assert_eq!(ids(b.next(t0, false)), [1, 3]);
        assert_eq!(ids(b.next(t0, false)), [2]);
        assert_eq!(ids(b.next(t0, false)), [4]);
    }

    #[test]
    fn per_model_limits_apply() {
        let t0 = Instant::now();
        let mut b = batcher(&[1.0], 8, 0);
        b.limits.insert(
            "n".into(),
            BatchLimits {
                max_batch_size: 1,
                max_queue_delay: Duration::ZERO,
            },
        );
        for id in 1..=3 {
            let mut j = job(id, 0, (64, 64), t0);
            j.model = "n";
            b.push(j);
        }
        assert_eq!(ids(b.next(t0, false)), [1]);
    }

    #[test]
    fn a_paid_request_overtakes_a_full_queue_of_free_ones() {
        let t0 = Instant::now();
        // Classes: 0 = pro (weight 4), 1 = free (weight 1).
        let mut b = batcher(&[4.0, 1.0], 2, 0);
        for id in 1..=20 {
            b.push(job(id, 1, (64, 64), t0));
        }
        assert_eq!(ids(b.next(t0, false)), [1, 2]);
        b.push(job(100, 0, (64, 64), t0 + MS));
        let batch = ids(b.next(t0 + MS, false));
        assert_eq!(batch[0], 100, "the pro request leads the very next batch: {batch:?}");
    }

    #[test]
    fn under_saturation_classes_share_the_device_by_weight_and_free_is_never_starved() {
        let t0 = Instant::now();
        let mut b = batcher(&[4.0, 1.0], 5, 0);
        let mut id = 0;
        let mut served = [0usize; 2];
        for _ in 0..100 {
            // Both classes keep a backlog of 10.
            for class in 0..2 {
                while b.queues[class].len() < 10 {
                    id += 1;
                    b.push(job(id, class, (64, 64), t0));
                }
            }
            if let Next::Run(batch) = b.next(t0, false) {
                for j in batch {
                    served[j.class] += 1;
                }
            }
        }
        let share = served[1] as f64 / (served[0] + served[1]) as f64;
        assert!(
            (share - 0.2).abs() < 0.01,
            "free got {share} of the device, want 1/5: {served:?}"
        );
    }

    #[test]
    fn an_idle_class_does_not_bank_credit() {
        let t0 = Instant::now();
        let mut b = batcher(&[1.0, 1.0], 1, 0);
        // Class 0 runs alone for a while.
        for id in 1..=10 {
            b.push(job(id, 0, (64, 64), t0));
            ids(b.next(t0, false));
        }
        // Class 1 arrives with a backlog; class 0 keeps one waiting. They now alternate instead of
        // class 1 taking ten in a row.
        for id in 11..=20 {
            b.push(job(id, 1, (64, 64), t0));
        }
        b.push(job(30, 0, (64, 64), t0));
        b.push(job(31, 0, (64, 64), t0));
        let order: Vec<u32> = (0..4).flat_map(|_| ids(b.next(t0, false))).collect();
        let class0 = order.iter().filter(|id| **id >= 30).count();
        assert_eq!(class0, 2, "alternating service: {order:?}");
    }

    #[test]
    fn mixed_classes_fill_one_batch_of_the_same_shape() {
        let t0 = Instant::now();
        let mut b = batcher(&[4.0, 1.0], 4, 0);
        b.push(job(1, 1, (64, 64), t0));
        b.push(job(2, 0, (64, 64), t0));
        b.push(job(3, 1, (64, 64), t0));
        b.push(job(4, 0, (128, 128), t0));
        let mut batch = ids(b.next(t0, false));
        batch.sort_unstable();
        assert_eq!(batch, [1, 2, 3]);
    }

    #[test]
    fn expired_requests_are_taken_out_before_they_reach_the_device() {
        let t0 = Instant::now();
        let mut b = batcher(&[1.0, 1.0], 4, 0);
        let mut late = job(1, 0, (64, 64), t0);
        late.deadline = Some(t0 + 5 * MS);
        let mut fine = job(2, 1, (64, 64), t0);
        fine.deadline = Some(t0 + 50 * MS);
        b.push(late);
        b.push(fine);
        b.push(job(3, 1, (64, 64), t0));
        let expired: Vec<u32> = b.take_expired(t0 + 10 * MS).into_iter().map(|j| j.id).collect();
        assert_eq!(expired, [1]);
        assert_eq!(b.len(), 2);
        assert_eq!(ids(b.next(t0 + 10 * MS, false)), [2, 3]);
    }
}
