//! The pool for the CPU work around inference: decoding, resizing, tensor layout, PNG encoding.
//!
//! Its threads run at a lower OS priority (a positive nice value) than the inference thread and
//! ONNX Runtime's own threads. On a CPU worker they share cores, and ONNX Runtime's parallel
//! operators wait for their slowest thread: a preprocessing thread preempting one of them stalls
//! the whole operator. At lower priority, preparation fills the gaps instead, and the inference
//! thread, the scarce resource, keeps its cores. (On the 2-core development VM the measured effect
//! is within noise; BENCHMARKS.md has the numbers.)

use std::panic::AssertUnwindSafe;

use anyhow::Context;
use tokio::sync::oneshot;

/// A job panicked, or the pool is gone.
#[derive(Debug, thiserror::Error)]
#[error("a CPU task failed: {0}")]
pub struct CpuTaskError(String);

/// A fixed-size thread pool at a given nice value.
#[derive(Debug)]
pub struct CpuPool {
    pool: rayon::ThreadPool,
}

impl CpuPool {
    /// `threads` threads (0: one per CPU), each at `nice` (0 = normal priority, 19 = lowest).
    pub fn new(threads: usize, nice: i32) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kiln-cpu-{i}"))
            .start_handler(move |_| lower_priority(nice))
            .build()
            .context("cannot start the CPU pool")?;
        Ok(Self { pool })
    }

    /// Run `job` on the pool and wait for it without blocking the async executor.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, CpuTaskError> {
        let (tx, rx) = oneshot::channel();
        self.pool.spawn(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_owned());
                CpuTaskError(message)
            });
            let _ = tx.send(result);
        });
        rx.await.map_err(|_| CpuTaskError("the CPU pool is gone".into()))?
    }
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
