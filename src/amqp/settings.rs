//! The `[amqp]` settings: the broker connection, the topology's names and arguments, reconnecting.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::tls::TlsFiles;

/// The broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://` or `amqps://`; it may carry credentials, so it is never logged. Several
    /// URLs separated by commas name the nodes of a RabbitMQ cluster: the worker connects to the
    /// first that answers and, when it loses that node, tries the next one first. Default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: SecretString,
    /// Unacknowledged deliveries this worker holds at once (`basic.qos`). Default 16: enough to keep
    /// the inference thread fed while replies are being confirmed.
    pub prefetch: u16,
    /// Names and arguments of the queues and exchanges.
    pub topology: TopologySettings,
    /// How startup and reconnection retry an unreachable broker.
    pub reconnect: BackoffSettings,
    /// CA and client certificate for `amqps://` URLs (`[amqp.tls]`); unset, the system's trust
    /// store and no client certificate.
    pub tls: TlsFiles,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            prefetch: 16,
            topology: TopologySettings::default(),
            reconnect: BackoffSettings::default(),
            tls: TlsFiles::default(),
        }
    }
}

impl AmqpSettings {
    /// Refuse TLS files with a plain `amqp://` node, and files that cannot be read or parsed.
    pub fn validate(&self) -> anyhow::Result<()> {
        let urls = super::connect::broker_urls(self.url.expose_secret());
        anyhow::ensure!(!urls.is_empty(), "amqp.url is empty");
        self.tls.check("amqp.tls", "amqp.url", &urls, "amqps")
    }
}

/// Queue and exchange names (all derived from one prefix) and their arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologySettings {
    /// Prefix of every name: `<prefix>.requests`, `<prefix>.results`, `<prefix>.dlx`,
    /// `<prefix>.dead-letter`. Default `kiln`.
    pub prefix: String,
    /// Deliveries of one request (first one included) before the broker dead-letters it, so a
    /// request that keeps crashing workers cannot loop forever. Default 3.
    pub delivery_limit: u32,
}

impl Default for TopologySettings {
    fn default() -> Self {
        Self {
            prefix: "kiln".into(),
            delivery_limit: 3,
        }
    }
}

/// Exponential backoff.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffSettings {
    /// First wait. Default 250 ms.
    pub initial_ms: u64,
    /// Longest wait. Default 10 s.
    pub max_ms: u64,
    /// Give up after this many failed attempts; 0 retries forever (default: under Kubernetes the
    /// pod stays not-ready and says why in its logs).
    pub max_attempts: u32,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        Self {
            initial_ms: 250,
            max_ms: 10_000,
            max_attempts: 0,
        }
    }
}
