//! What the end-to-end benchmarks share: the repository, settings for a worker of their own, and
//! a `kiln worker` process (its cold start, peak RSS, and the topology it leaves behind).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use kiln::configuration::Settings;

/// The repository (models, samples): where it was built, or `BENCH_REPO` (not `KILN_*`: those are
/// settings; for a binary copied to another machine, e.g. the GPU one).
pub fn repo() -> PathBuf {
    std::env::var_os("BENCH_REPO").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// Defaults, then the `KILN_*` environment (provider, runtime library, model variants, ...), which
/// the worker processes inherit too; a topology prefix of its own.
pub fn settings(threads: usize) -> Settings {
    let mut s = Settings::load(None).expect("settings from the KILN_* environment");
    s.amqp.topology.prefix = format!("kiln-bench-{}", uuid::Uuid::new_v4().simple());
    s.inference.intra_threads = threads;
    s.inference.runtime_library = Some(repo().join(s.inference.runtime_library_path()));
    s
}

/// The mean.
pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// A process's peak resident memory, MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A `kiln worker` process with its own topology prefix.
pub struct Worker {
    child: std::process::Child,
    /// Its settings (topology prefix, broker URL).
    pub settings: Settings,
    /// Process start to "worker ready" (models loaded and warmed, queues consumed), seconds.
    pub cold_start: f64,
}

impl Worker {
    /// Start one with `threads` inference threads, limits off, no heartbeat, and `env` on top.
    pub fn spawn(threads: usize, env: &[(&str, String)]) -> Self {
        let settings = settings(threads);
        // `BENCH_KILN`: the worker binary on a machine where this one was not built (the GPU kit).
        let binary =
            std::env::var_os("BENCH_KILN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kiln")), PathBuf::from);
        let started = Instant::now();
        let mut child = Command::new(&binary)
            .arg("worker")
            .current_dir(repo())
            .env("KILN_AMQP__TOPOLOGY__PREFIX", &settings.amqp.topology.prefix)
            .env("KILN_INFERENCE__INTRA_THREADS", threads.to_string())
            // Requests are published all at once: batches fill without waiting.
            .env("KILN_BATCHING__MAX_QUEUE_DELAY_MS", "0")
            // The limiter has its own benchmark (benches/limiter.rs); here one user sends everything.
            .env("KILN_RATE_LIMIT__ENABLED", "false")
            .env("KILN_HTTP__BIND", "127.0.0.1:0")
            .env("KILN_HEARTBEAT__ENABLED", "false")
            .env("KILN_TELEMETRY__FORMAT", "json")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln binary");
        let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = log.next().expect("the worker exited before it was ready").unwrap();
            if line.contains("worker ready") {
                break;
            }
        }
        let cold_start = started.elapsed().as_secs_f64();
        std::thread::spawn(move || for _ in log {});
        Self {
            child,
            settings,
            cold_start,
        }
    }

    /// SIGTERM it, wait, delete its topology; returns its peak RSS in MiB.
    pub fn stop(mut self, rt: &tokio::runtime::Runtime) -> f64 {
        let rss = peak_rss_mib(self.child.id());
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let topology = self.settings.topology();
        rt.block_on(async {
            if let Ok(c) = lapin::Connection::connect(
                secrecy::ExposeSecret::expose_secret(&self.settings.amqp.url),
                Default::default(),
            )
            .await
            {
                topology.delete(&c.create_channel().await.unwrap()).await;
            }
        });
        rss
    }
}
