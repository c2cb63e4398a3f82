//! While a request renders: forward its step progress as `progress` notices (when it asked for
//! them, throttled), and stop it when its reply queue goes away (its producer gave up: the
//! inference thread drops it at the next step and it is dead-lettered unserved).

use std::future::Future;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use tokio::sync::mpsc;

use super::reply::{self, ReplyTarget};
use crate::amqp::{ReplyPublisher, ReplyQueues};
use crate::cancel::{StopFlag, StopReason};
use crate::inference::StepProgress;

/// What to watch and where to send notices.
pub(super) struct Watch<'a> {
    pub delivery: &'a Delivery,
    pub target: &'a ReplyTarget,
    pub publisher: &'a ReplyPublisher,
    pub reply_queues: &'a ReplyQueues,
    pub worker_id: &'a str,
    pub stop: StopFlag,
    /// Progress from the inference thread, when the request asked for notices.
    pub progress: Option<mpsc::UnboundedReceiver<StepProgress>>,
    /// At most one notice per this long.
    pub progress_interval: Duration,
    /// How often the reply queue is checked (`limits.reply_queue_check_ms`).
    pub reply_queue_check: Duration,
}

/// Drive `rendering` to its end while watching (see the module docs).
pub(super) async fn while_rendering<T>(rendering: impl Future<Output = T>, mut watch: Watch<'_>) -> T {
    tokio::pin!(rendering);
    let reply_to = watch
        .delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|q| q.as_str().to_owned())
        .filter(|q| !q.is_empty());
    let mut check = tokio::time::interval(watch.reply_queue_check.max(Duration::from_millis(100)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await; // the first tick is immediate; the queue was just checked on arrival
    let mut last_notice: Option<Instant> = None;
    loop {
        tokio::select! {
            done = &mut rendering => return done,
            Some(progress) = recv(&mut watch.progress) => {
                let due = last_notice.is_none_or(|at| at.elapsed() >= watch.progress_interval);
                // The last step's notice would only precede the final reply.
                if due && progress.done < progress.total {
                    last_notice = Some(Instant::now());
                    let notice = reply::progress_notice(
                        watch.delivery,
                        watch.target,
                        progress.done,
                        progress.total,
                        watch.worker_id.to_owned(),
                    );
                    // A lost notice is not worth failing the request for.
                    if let Err(e) = watch.publisher.publish(notice).await {
                        tracing::debug!(error = %e, "a progress notice was not published");
                    }
                }
            }
            _ = check.tick(), if reply_to.is_some() && watch.stop.reason().is_none() => {
                let queue = reply_to.as_deref().expect("checked in the guard");
                if watch.reply_queues.gone_within(queue, watch.reply_queue_check).await {
                    tracing::warn!(reply_to = queue, "the reply queue went away: stopping the request");
                    watch.stop.stop(StopReason::Abandoned);
                }
            }
        }
    }
}

/// The next progress, or never when there is no channel (or it closed).
async fn recv(progress: &mut Option<mpsc::UnboundedReceiver<StepProgress>>) -> Option<StepProgress> {
    match progress {
        Some(rx) => match rx.recv().await {
            Some(p) => Some(p),
            None => {
                *progress = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}
