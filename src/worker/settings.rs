//! The `[worker]`, `[limits]` and `[faults]` settings.

use serde::Deserialize;

/// Limits on what a request sends and is sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLimits {
    /// Largest request body accepted, in bytes. Default 32 MiB.
    pub max_message_bytes: usize,
    /// At most one `progress` notice per request per this many milliseconds (requests that ask for
    /// them, on multi-step models). Default 500.
    pub progress_interval_ms: u64,
    /// While a request renders, its `reply_to` queue is checked this often (a passive declare,
    /// shared by the requests of one queue); gone: the request stops before its next step and is
    /// dead-lettered. An exclusive queue of another connection answers with a channel close
    /// (405, logged by the AMQP client), hence not much more often. Default 5000.
    pub reply_queue_check_ms: u64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 32 * 1024 * 1024,
            progress_interval_ms: 500,
            reply_queue_check_ms: 5000,
        }
    }
}

/// This worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Name in replies and logs. Default: `$HOSTNAME` (the pod name on Kubernetes) and the process id.
    pub id: Option<String>,
    /// On SIGTERM, how long in-flight requests may take to finish before the worker exits anyway
    /// (unfinished ones are redelivered by the broker). Default 25 s, inside Kubernetes' default 30 s.
    pub shutdown_grace_ms: u64,
    /// Threads for decoding, resizing and PNG encoding; 0 means one per CPU. Default 0.
    pub cpu_threads: usize,
    /// Nice value of those threads (0 normal, 19 lowest), so they never take cores from inference.
    /// Default 10.
    pub cpu_nice: i32,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: None,
            shutdown_grace_ms: 25_000,
            cpu_threads: 0,
            cpu_nice: 10,
        }
    }
}

impl WorkerSettings {
    /// The configured id, or one made from the host name and process id.
    pub fn resolved_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "kiln".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Deliberate faults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSettings {
    /// Abort the process after inference, before the reply is published: the crash window that
    /// ack-after-confirm exists for. Default false.
    pub abort_before_reply: bool,
    /// Abort after the reply's confirm, before its outcome is recorded: the one window left where
    /// a redelivery is answered a second time (same `message_id`, charged once). Default false.
    pub abort_before_record: bool,
    /// Abort after the confirm and the record, before the ack: the broker redelivers a request that
    /// was answered. Default false.
    pub abort_before_ack: bool,
}
