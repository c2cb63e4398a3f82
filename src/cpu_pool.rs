//! The pool for the CPU work around inference: decoding, resizing, tensor layout, PNG encoding.
//!
//! Its threads run at a lower OS priority (a positive nice value) than the inference thread and
//! ONNX Runtime's own threads. On a CPU worker they share cores, and ONNX Runtime's parallel
//! operators wait for their slowest thread: a preprocessing thread preempting one of them stalls
//! the whole operator. At lower priority, preparation fills the gaps instead, and the inference
//! thread, the scarce resource, keeps its cores. (On the 2-core development VM the measured effect
//! is within noise; BENCHMARKS.md has the numbers.)
//!
//! Jobs are taken by priority class with aging, not first come first served: a job of class `c`
//! is ordered as if it had been queued `c × CLASS_LAG` later. When the pool is behind (a free
//! flood on a busy machine), a paid request's decoding no longer queues behind every free one, yet
//! a lower class waits at most a bounded extra time (3 × 25 ms for free behind pro), so it is never
//! starved here either.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::oneshot;

/// How much later each class step counts a job as queued.
pub const CLASS_LAG: Duration = Duration::from_millis(25);

/// A job panicked, or the pool is gone.
#[derive(Debug, thiserror::Error)]
#[error("a CPU task failed: {0}")]
pub struct CpuTaskError(String);

/// A fixed-size thread pool at a given nice value, taking jobs by class with aging.
#[derive(Debug)]
pub struct CpuPool {
    pool: rayon::ThreadPool,
    queue: Arc<Mutex<BinaryHeap<Queued>>>,
    clock: Clock,
    sequence: AtomicU64,
}

/// Time since the pool started, by which queued jobs are ordered (tests set it by hand).
struct Clock(Box<dyn Fn() -> Duration + Send + Sync>);

impl Clock {
    fn real() -> Self {
        let epoch = Instant::now();
        Self(Box::new(move || epoch.elapsed()))
    }

    fn now(&self) -> Duration {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}

/// A job waiting for a thread: ordered by (effective queueing time, arrival).
struct Queued {
    due: Duration,
    sequence: u64,
    job: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("due", &self.due)
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    /// Reversed: the heap pops the earliest due, then the first queued.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.sequence).cmp(&(self.due, self.sequence))
    }
}

impl CpuPool {
    /// `threads` threads (0: one per CPU), each at `nice` (0 = normal priority, 19 = lowest).
    pub fn new(threads: usize, nice: i32) -> anyhow::Result<Self> {
        Self::with_clock(threads, nice, Clock::real())
    }

    fn with_clock(threads: usize, nice: i32, clock: Clock) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kiln-cpu-{i}"))
            .start_handler(move |_| lower_priority(nice))
            .build()
            .context("cannot start the CPU pool")?;
        Ok(Self {
            pool,
            queue: Arc::default(),
            clock,
            sequence: AtomicU64::new(0),
        })
    }

    /// Run `job` on the pool as class 0 (see [`CpuPool::run_as`]).
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, CpuTaskError> {
        self.run_as(0, job).await
    }

    /// Run `job` on the pool and wait for it without blocking the async executor. `class` is the
    /// request's priority class (0 first); see the module docs for the order.
    pub async fn run_as<T: Send + 'static>(
        &self,
        class: usize,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CpuTaskError> {
        self.submit(class, job)
            .await
            .map_err(|_| CpuTaskError("the CPU pool is gone".into()))?
    }

    /// Queue `job` as `class` now; the receiver gets its result.
    fn submit<T: Send + 'static>(
        &self,
        class: usize,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<Result<T, CpuTaskError>> {
        let (tx, rx) = oneshot::channel();
        let wrapped = move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_owned());
                CpuTaskError(message)
            });
            let _ = tx.send(result);
        };
        let lag = CLASS_LAG.saturating_mul(u32::try_from(class).unwrap_or(u32::MAX));
        lock(&self.queue).push(Queued {
            due: self.clock.now().saturating_add(lag),
            sequence: self.sequence.fetch_add(1, AtomicOrdering::Relaxed),
            job: Box::new(wrapped),
        });
        // One pool task per queued job; each runs whichever job is first when a thread is free.
        let queue = Arc::clone(&self.queue);
        self.pool.spawn(move || {
            let next = lock(&queue).pop();
            if let Some(queued) = next {
                (queued.job)();
            }
        });
        rx
    }
}

fn lock(queue: &Mutex<BinaryHeap<Queued>>) -> std::sync::MutexGuard<'_, BinaryHeap<Queued>> {
    queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lower the calling thread's priority (Linux: nice is per thread).
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on our own thread id has no memory-safety preconditions.
    unsafe {
        if libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) != 0 {
            tracing::warn!(nice, "could not lower the CPU pool's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the only thread held, queue two free jobs (class 3), let `gap` pass on the pool's
    /// clock, queue a pro job (class 1), release the thread: the order the jobs ran in. The clock
    /// is the test's and every step waits for the one before, so the order depends on `gap` alone.
    async fn order_with_the_pool_held(gap: Duration) -> Vec<&'static str> {
        let now = Arc::new(Mutex::new(Duration::from_secs(1)));
        let clock = Clock(Box::new({
            let now = Arc::clone(&now);
            move || *now.lock().unwrap()
        }));
        let pool = CpuPool::with_clock(1, 0, clock).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (started, running) = oneshot::channel::<()>();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let blocker = pool.submit(0, move || {
            started.send(()).unwrap();
            hold.recv().unwrap()
        });
        running.await.expect("the blocker runs");
        let submit = |class: usize, name: &'static str| {
            let order = Arc::clone(&order);
            pool.submit(class, move || order.lock().unwrap().push(name))
        };
        let jobs = [submit(3, "free-1"), submit(3, "free-2")];
        *now.lock().unwrap() += gap;
        let pro = submit(1, "pro");
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for job in jobs.into_iter().chain([pro]) {
            job.await.unwrap().unwrap();
        }
        let order = order.lock().unwrap().clone();
        order
    }

    #[tokio::test]
    async fn a_higher_class_goes_first_and_a_lower_one_ages_in() {
        // Queued 5 ms after two free jobs, pro (due +30 ms) passes them (due +75 ms).
        assert_eq!(
            order_with_the_pool_held(Duration::from_millis(5)).await,
            ["pro", "free-1", "free-2"]
        );
        // Queued 120 ms after them (due +145 ms), pro waits for the free jobs (due +75 ms).
        assert_eq!(
            order_with_the_pool_held(Duration::from_millis(120)).await,
            ["free-1", "free-2", "pro"]
        );
        // At exactly the classes' lag apart (50 ms) the tie goes to the first queued.
        assert_eq!(
            order_with_the_pool_held(Duration::from_millis(50)).await,
            ["free-1", "free-2", "pro"]
        );
    }

    #[tokio::test]
    async fn runs_jobs_and_reports_panics() {
        let pool = CpuPool::new(2, 10).unwrap();
        assert_eq!(pool.run(|| 6 * 7).await.unwrap(), 42);
        let err = pool.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(err.to_string().contains("boom"));
        #[cfg(target_os = "linux")]
        {
            // SAFETY: reading our own thread's priority.
            let nice = pool
                .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) })
                .await;
            assert_eq!(nice.unwrap(), 10);
        }
    }
}
