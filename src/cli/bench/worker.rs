//! The bench's own worker, in this process: settings that cannot touch a live deployment, start,
//! stop, and cleaning up its queues and Redis keys.

use std::time::Duration;

use kiln::amqp::Topology;
use kiln::configuration::Settings;
use kiln::startup::Application;

/// `settings` with a topology prefix and a Redis key prefix of the bench's own, tier queues on, and
/// its own metrics port; every tier of `tiers` must be configured.
pub fn isolated<'a>(mut settings: Settings, mut tiers: impl Iterator<Item = &'a str>) -> anyhow::Result<Settings> {
    let prefix = format!("kiln-bench-{}", uuid::Uuid::new_v4().simple());
    settings.amqp.topology.prefix = prefix.clone();
    settings.rate_limit.key_prefix = prefix;
    settings.scheduling.tier_queues = true;
    // Its own metrics port: a bench must not collide with a worker already serving on this host.
    settings.http.bind = "127.0.0.1:0".into();
    if let Some(tier) = tiers.find(|tier| !settings.rate_limit.tiers.contains_key(*tier)) {
        anyhow::bail!("--mix names {tier:?}, not a tier");
    }
    Ok(settings)
}

/// A worker running on a task of this process.
pub struct Worker {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    grace: Duration,
}

impl Worker {
    /// Build the application (models loaded and warmed) and start consuming.
    pub async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let build = settings.clone();
        let app = tokio::task::spawn_blocking(move || Application::build(build)).await??;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            stop,
            task,
            grace: Duration::from_millis(settings.worker.shutdown_grace_ms) + Duration::from_secs(30),
        })
    }

    /// Stop it, and wait for it to finish (its shutdown grace, and 30 s more).
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(self.grace, self.task).await {
            Ok(stopped) => stopped?,
            Err(_) => {
                tracing::error!("the bench's worker did not stop within its grace period");
                Ok(())
            }
        }
    }
}

/// Remove the bench's queues and exchanges, and its Redis keys.
pub async fn clean_up(settings: &Settings, topology: &Topology) {
    let properties = lapin::ConnectionProperties::default();
    let connected = match kiln::amqp::connect::Broker::new(&settings.amqp) {
        Ok(broker) => kiln::amqp::connect::connect_any(&broker, &properties, None).await.ok(),
        Err(_) => None,
    };
    if let Some((connection, _)) = connected {
        if let Ok(channel) = connection.create_channel().await {
            topology.delete(&channel).await;
            let _ = channel.close(200, "bench cleanup".into()).await;
        }
        let _ = connection.close(200, "bench cleanup".into()).await;
    }
    let limiter = kiln::rate_limit::RedisLimiter::new(std::sync::Arc::new(settings.rate_limit.clone()));
    if let Ok(limiter) = limiter {
        let _ = limiter.delete_all().await;
    }
}
