//! Building the application (models first, then the broker) and running it until shutdown.
//!
//! `Application::build` loads ONNX Runtime and every model before touching the broker, so a bad
//! model, library or GPU fails fast with a clear error (and so do unreadable `[amqp.tls]` files).
//! `run_until_stopped` checks a `rediss://` Redis's certificate (`RedisLimiter::check_tls`), then
//! connects (retrying while the broker is unreachable, not when its TLS handshake fails), declares
//! the topology, consumes, and on a lost connection reconnects; unacknowledged requests of the lost
//! connection are redelivered by the broker. With several nodes in `amqp.url` it tries the node
//! after the lost one first; a session on another node than the last is a failover, which
//! `/readyz`, the heartbeat and the metrics report (`observability::Health::set_consuming_on`).
//!
//! Each session also listens on the cancel exchange (`amqp::cancel`) on a queue of its own, which
//! lives with the connection: a reconnecting session binds a new one. The cancels heard go to the
//! one `Cancellations` of the process, so what a lost session heard is still remembered.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::message::Delivery;
use lapin::Connection;
use secrecy::ExposeSecret;

use crate::amqp::connect::{broker_urls, connect_with_retry, node_address, Broker};
use crate::amqp::publisher::ReplyPublisher;
use crate::amqp::topology::RequestQueue;
use crate::amqp::{CancelListener, Consumers, ReplyQueues, SessionEnd};
use crate::auth::Authenticator;
use crate::cancel::Cancellations;
use crate::configuration::Settings;
use crate::cpu_pool::CpuPool;
use crate::inference::{ActiveProvider, BatchLimits, EngineOptions, InferenceEngine, ModelRegistry, Runtime};
use crate::observability::{BrokerState, Observability, ObservabilitySettings, WorkerFacts};
use crate::rate_limit::Limiter;
use crate::scheduling::Schedule;
use crate::worker::{Services, Worker};

/// A worker process: models loaded, ready to connect.
pub struct Application {
    settings: Settings,
    broker: Broker,
    engine: InferenceEngine,
    services: Services,
    started: Instant,
    observability: Observability,
}

impl Application {
    /// Load the runtime and every enabled model (warming them up). Does not touch the broker.
    pub fn build(settings: Settings) -> anyhow::Result<Self> {
        let started = Instant::now();
        // Settings errors first: they are the cheapest to find and the most common.
        settings.validate()?;
        let broker = Broker::new(&settings.amqp)?;
        let tiers: Vec<&str> = settings.rate_limit.tiers.keys().map(String::as_str).collect();
        let schedule = Arc::new(
            Schedule::new(&settings.scheduling, &tiers, &settings.rate_limit.default_tier)
                .context("invalid scheduling settings")?,
        );
        let registry = Arc::new(ModelRegistry::load(&settings.models, &settings.batching)?);
        let runtime = Runtime::init(&settings.inference)?;
        let options = engine_options(&settings, &registry, &schedule, runtime.provider());
        let engine = InferenceEngine::start(&registry, runtime, options)?;
        let cpu = Arc::new(CpuPool::new(settings.worker.cpu_threads, settings.worker.cpu_nice)?);
        let limiter = match settings.rate_limit.enabled {
            true => Some(Arc::new(Limiter::new(settings.rate_limit.clone())?)),
            false => None,
        };
        // Signed requests' replay records share the limiter's Redis connection when there is one.
        let redis = limiter.as_ref().map(|l| l.redis().clone());
        let auth =
            Arc::new(Authenticator::new(&settings.auth, &settings.rate_limit, redis).context("invalid auth settings")?);
        let services = Services {
            registry,
            inference: engine.handle(),
            cpu,
            limiter,
            topology: Arc::new(settings.topology()),
            schedule,
            worker_id: settings.worker.resolved_id().into(),
            limits: settings.limits.clone(),
            faults: settings.faults.clone(),
            cancellations: Cancellations::new(settings.cancel.remember()),
            auth,
        };
        let observability = Observability::build(
            ObservabilitySettings {
                http: &settings.http,
                heartbeat: &settings.heartbeat,
                gpu: &settings.gpu,
            },
            WorkerFacts {
                worker_id: &services.worker_id,
                models: services.registry.iter().map(|m| m.name.clone()).collect(),
                provider: engine.handle().provider(),
                limiter: services.limiter.clone(),
                topology: &services.topology,
                broker: &broker,
                warmed: settings.models.warmup,
            },
        )?;
        Ok(Self {
            settings,
            broker,
            engine,
            services,
            started,
            observability,
        })
    }

    /// The execution provider the models run on.
    pub fn provider(&self) -> ActiveProvider {
        self.engine.handle().provider()
    }

    /// What a [`Worker`] needs (for tests that drive one delivery at a time).
    pub fn services(&self) -> Services {
        self.services.clone()
    }

    /// This worker's id, as it appears in replies.
    pub fn worker_id(&self) -> &str {
        &self.services.worker_id
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served (bound by [`Application::build`]).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.observability.http_addr()
    }

    /// Serve until `shutdown` resolves; then stop consuming, finish what is in flight (within the
    /// grace period), and return.
    pub async fn run_until_stopped(mut self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        // A Redis whose certificate cannot be verified (or that refuses ours) never heals: say so
        // now, rather than serve under the outage policy for good. An unreachable one may come later.
        if let Some(limiter) = &self.services.limiter {
            limiter.redis().check_tls().await?;
        }
        let observers = self.observability.start();
        let mut shutdown = std::pin::pin!(self.observability.watch_shutdown(shutdown));
        let amqp = &self.settings.amqp;
        let connection_name = format!("kiln worker {}", self.services.worker_id);
        // The node the last connection was on: after losing it, the next one is tried first.
        let mut node = None;
        loop {
            let connection = tokio::select! {
                c = connect_with_retry(&self.broker, &amqp.reconnect, &connection_name, node) => c?,
                () = &mut shutdown => return Ok(()),
            };
            let (connection, index) = connection;
            node = Some(index);
            let address = node_address(broker_urls(amqp.url.expose_secret())[index]);
            let connection = Arc::new(connection);
            match self.session(&connection, &address, &mut shutdown).await? {
                SessionEnd::Stopped => {
                    let _ = connection.close(200, "worker shutting down".into()).await;
                    break;
                }
                SessionEnd::Lost(reason) => {
                    tracing::warn!(%reason, broker_node = %address, "lost the broker connection; reconnecting");
                    crate::metrics::record_broker_reconnect();
                    self.observability.health().set_broker(BrokerState::Lost(reason));
                }
            }
        }
        // The inference thread ends once every handle to it is gone, ours included.
        let Self { engine, services, .. } = self;
        drop(services);
        engine.join();
        observers.stop().await;
        tracing::info!("worker stopped");
        Ok(())
    }

    /// One connection, on broker node `node` (`host:port`): declare the topology, open the reply
    /// publisher, the cancel listener and the consumers, and serve deliveries until shutdown or
    /// connection loss.
    async fn session(
        &self,
        connection: &Arc<Connection>,
        node: &str,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> anyhow::Result<SessionEnd> {
        let topology = &self.services.topology;
        // A refused declaration (say, a queue declared elsewhere with other arguments) is a
        // configuration error, not a transient one: fail instead of retrying forever.
        let setup = async {
            let channel = connection.create_channel().await?;
            topology.declare(&channel).await?;
            let publisher = ReplyPublisher::open(connection, &topology.results).await?;
            let tag = format!("kiln-{}", self.services.worker_id);
            // Listening before consuming: a cancel sent once the worker takes requests is heard.
            let cancels = CancelListener::open(connection, &topology.cancel_exchange, &format!("{tag}-cancel")).await?;
            let consumers =
                Consumers::open(connection, &topology.request_queues, self.settings.amqp.prefetch, &tag).await?;
            Ok::<_, lapin::Error>((publisher, cancels, consumers))
        };
        let (publisher, cancels, consumers) = setup.await.with_context(|| {
            format!(
                "cannot set up queues on the broker (topology prefix {:?})",
                self.settings.amqp.topology.prefix
            )
        })?;

        let cancels = cancels.start(
            Arc::clone(connection),
            topology.cancel_exchange.clone(),
            format!("kiln-{}-cancel", self.services.worker_id),
            self.services.cancellations.clone(),
        );
        let reply_queues = ReplyQueues::new(Arc::clone(connection));
        let worker = Worker::new(self.services.clone(), publisher.clone(), reply_queues);
        // A session on another node than the last one is a failover (counted by `Health`).
        let failover = self.observability.health().set_consuming_on(node);
        tracing::info!(
            worker_id = %self.services.worker_id,
            broker_node = node,
            failover,
            queues = ?topology.request_queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
            provider = self.provider().name(),
            models = ?self.services.registry.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            prefetch = self.settings.amqp.prefetch,
            startup_seconds = self.started.elapsed().as_secs_f64(),
            "worker ready"
        );
        let grace = Duration::from_millis(self.settings.worker.shutdown_grace_ms);
        let handle = |(delivery, queue): (Delivery, Arc<RequestQueue>)| {
            let worker = worker.clone();
            async move { worker.handle(delivery, &queue).await }
        };
        let end = consumers.serve(handle, shutdown, grace).await;
        if end == SessionEnd::Stopped {
            cancels.stop().await;
            publisher.close().await;
        }
        // On a lost connection the listener is dropped (its task ends); the next session listens
        // on a new queue.
        Ok(end)
    }
}

/// The inference thread's batching and priorities, from the settings.
fn engine_options(
    settings: &Settings,
    registry: &ModelRegistry,
    schedule: &Schedule,
    provider: ActiveProvider,
) -> EngineOptions {
    let gpu = matches!(provider, ActiveProvider::Cuda { .. });
    let batch_limits = registry
        .iter()
        .map(|manifest| {
            let limits = match manifest.pipeline.pipeline().batches() {
                true => settings.batching.limits(&manifest.name, gpu),
                // Its runs take one sample at a time: nothing to wait for.
                false => BatchLimits {
                    max_batch_size: 1,
                    max_queue_delay: Duration::ZERO,
                },
            };
            (manifest.name.clone(), limits)
        })
        .collect();
    EngineOptions {
        queue_capacity: settings.inference.queue_capacity,
        warmup: settings.models.warmup,
        class_weights: schedule.weights(),
        batch_limits,
        default_batch_limits: settings.batching.limits("", gpu),
        steps: settings.batching.diffusion.options(gpu),
    }
}
