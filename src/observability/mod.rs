//! The operators' side of a worker: what Grafana, Prometheus, Kubernetes and fleet tools see.
//!
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` on `http.bind`.
//! - [`health`]: the readiness checks (broker, rate limiter, models).
//! - [`heartbeat`]: a JSON message per worker every `heartbeat.interval_ms` on `<prefix>.heartbeat`.
//! - [`settings`]: `[http]`, `[heartbeat]`, `[gpu]`.
//!
//! The metrics themselves are in [`crate::metrics`] (and [`crate::gpu`] for NVML); the request
//! trace context in [`crate::trace_context`].
//!
//! [`Observability`] is made by `Application::build` (binding the HTTP socket, so a taken port is a
//! startup error) and started by `Application::run_until_stopped`: the HTTP server, the GPU poller
//! and the heartbeat then live until the worker has finished its in-flight requests.

pub mod health;
pub mod heartbeat;
pub mod http;
pub mod settings;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::amqp::connect::Broker;
use crate::amqp::Topology;
use crate::inference::ActiveProvider;
use crate::rate_limit::Limiter;
pub use health::{BrokerState, Health};
pub use settings::{GpuSettings, HeartbeatSettings, HttpSettings};

/// How long shutdown waits for the last heartbeat and for open HTTP requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// The worker's HTTP endpoint, health, heartbeat and GPU poller, built but not yet running.
#[derive(Debug)]
pub struct Observability {
    health: Arc<Health>,
    listener: Option<std::net::TcpListener>,
    http_addr: SocketAddr,
    beacon: Option<heartbeat::Beacon>,
    gpu_poll: Option<Duration>,
}

/// What a worker tells its operators about itself.
pub struct WorkerFacts<'a> {
    /// `worker.id`, resolved.
    pub worker_id: &'a str,
    /// Models loaded (and warmed, if `models.warmup`).
    pub models: Vec<String>,
    /// Where they run.
    pub provider: ActiveProvider,
    /// The limiter, when limits are on.
    pub limiter: Option<Arc<Limiter>>,
    /// Queue names.
    pub topology: &'a Topology,
    /// The broker, for the heartbeat's own connection.
    pub broker: &'a Broker,
    /// Whether the models were warmed up at startup (`models.warmup`).
    pub warmed: bool,
}

/// The sections of the settings that configure what operators see.
#[derive(Debug, Clone, Copy)]
pub struct ObservabilitySettings<'a> {
    /// `[http]`.
    pub http: &'a HttpSettings,
    /// `[heartbeat]`.
    pub heartbeat: &'a HeartbeatSettings,
    /// `[gpu]`.
    pub gpu: &'a GpuSettings,
}

impl Observability {
    /// Bind the HTTP socket and record the build and execution provider. No task starts yet.
    pub fn build(settings: ObservabilitySettings<'_>, facts: WorkerFacts<'_>) -> anyhow::Result<Self> {
        let listener = http::bind(&settings.http.bind)?;
        let http_addr = listener.local_addr()?;
        crate::metrics::set_execution_provider(facts.provider.name());
        let warmed = match facts.warmed {
            true => "loaded and warmed up",
            false => "loaded (models.warmup = false: the first request of each pays for initialisation)",
        };
        let models = format!("{}: {warmed}", facts.models.join(", "));
        let beacon = settings.heartbeat.enabled.then(|| heartbeat::Beacon {
            broker: facts.broker.clone(),
            prefix: facts.topology.prefix.clone(),
            request_queues: facts
                .topology
                .request_queues
                .iter()
                .map(|q| {
                    let label = q
                        .tier
                        .as_ref()
                        .map_or("requests".to_owned(), |t| format!("requests.{t}"));
                    (label, q.name.clone())
                })
                .collect(),
            dead_letter_queue: facts.topology.dead_letter_queue.clone(),
            worker_id: facts.worker_id.to_owned(),
            models: facts.models.clone(),
            provider: facts.provider.name().to_owned(),
            interval: Duration::from_millis(settings.heartbeat.interval_ms),
        });
        Ok(Self {
            health: Arc::new(Health::new(models, facts.limiter)),
            listener: Some(listener),
            http_addr,
            beacon,
            gpu_poll: settings
                .gpu
                .enabled
                .then(|| Duration::from_millis(settings.gpu.poll_interval_ms)),
        })
    }

    /// The address `/metrics`, `/healthz` and `/readyz` are served on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The readiness state the session loop updates.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// `shutdown`, which also marks the worker as stopping (not ready; `stopping` heartbeat) the
    /// moment it resolves.
    pub fn watch_shutdown(&self, shutdown: impl Future<Output = ()> + Send) -> impl Future<Output = ()> + Send {
        let health = Arc::clone(&self.health);
        async move {
            shutdown.await;
            health.set_stopping();
        }
    }

    /// Start the HTTP server, the GPU poller and the heartbeat (inside the tokio runtime). The HTTP
    /// socket is handed over, so this starts them once; later calls start nothing.
    pub fn start(&mut self) -> Running {
        let mut running = Running::default();
        if let Some(listener) = self.listener.take() {
            let (stop, stopped) = oneshot::channel::<()>();
            let health = Arc::clone(&self.health);
            running.http_stop = Some(stop);
            running.http = Some(tokio::spawn(async move {
                let shutdown = async {
                    let _ = stopped.await;
                };
                if let Err(e) = http::serve(listener, health, shutdown).await {
                    tracing::error!(error = %e, "the HTTP endpoint failed");
                }
            }));
            if let Some(interval) = self.gpu_poll {
                running.gpu = Some(tokio::spawn(crate::gpu::run(interval)));
            }
            if let Some(beacon) = self.beacon.clone() {
                running.heartbeat = Some(tokio::spawn(heartbeat::run(beacon, Arc::clone(&self.health))));
            }
        }
        running
    }
}

/// The running HTTP server, GPU poller and heartbeat. Dropping it aborts them;
/// [`Running::stop`] ends them in order.
#[derive(Debug, Default)]
pub struct Running {
    http: Option<JoinHandle<()>>,
    http_stop: Option<oneshot::Sender<()>>,
    gpu: Option<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
}

impl Running {
    /// After the worker finished its requests: wait for the `stopping` heartbeat (sent when
    /// shutdown began), stop polling, close the HTTP endpoint.
    pub async fn stop(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            let abort = heartbeat.abort_handle();
            if tokio::time::timeout(STOP_TIMEOUT, heartbeat).await.is_err() {
                abort.abort();
            }
        }
        if let Some(gpu) = self.gpu.take() {
            gpu.abort();
        }
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        if let Some(http) = self.http.take() {
            let abort = http.abort_handle();
            if tokio::time::timeout(STOP_TIMEOUT, http).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in [self.http.take(), self.gpu.take(), self.heartbeat.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}
