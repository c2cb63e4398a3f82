//! Connecting to the broker, retrying with exponential backoff while it is unreachable.
//!
//! [`Broker`] is `amqp.url` with, for `amqps://`, the `[amqp.tls]` files read at startup. A TLS
//! handshake that fails on a certificate is not an unreachable broker: [`connect_with_retry`] gives
//! up at once and says which certificate and which setting, since waiting cannot fix it.

use std::fmt;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use secrecy::{ExposeSecret, SecretString};

use super::settings::{AmqpSettings, BackoffSettings};
use crate::tls;

/// The broker nodes an `amqp.url` names: one URL, or several separated by commas (the nodes of a
/// RabbitMQ cluster), in the order they are tried.
pub fn broker_urls(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Where the broker is and how to reach it: `amqp.url` (one node or a cluster's) and, for
/// `amqps://` nodes, the CA and client certificate of `[amqp.tls]`, read once.
#[derive(Clone)]
pub struct Broker {
    url: SecretString,
    tls: OwnedTLSConfig,
}

impl Broker {
    /// The broker of these settings: checks them (see [`AmqpSettings::validate`]) and reads the
    /// TLS files.
    pub fn new(settings: &AmqpSettings) -> anyhow::Result<Self> {
        settings.validate()?;
        let material = settings.tls.load("amqp.tls")?;
        let cert_chain = match material.ca {
            Some(pem) => {
                Some(String::from_utf8(pem).map_err(|_| anyhow::anyhow!("amqp.tls.ca_file is not a PEM text file"))?)
            }
            None => None,
        };
        let identity = material.identity.map(|id| OwnedIdentity::PKCS8 {
            pem: id.cert,
            key: id.key,
        });
        Ok(Self {
            url: settings.url.clone(),
            tls: OwnedTLSConfig { identity, cert_chain },
        })
    }

    /// Its URL (it may carry credentials: see [`redact`]).
    pub fn url(&self) -> &SecretString {
        &self.url
    }

    /// The URLs of its nodes, with their secrets.
    fn nodes(&self) -> Vec<&str> {
        broker_urls(self.url.expose_secret())
    }
}

/// A URL alone: `amqp://`, or `amqps://` with the system's trust store and no client certificate
/// (producers and tests; the worker and the CLI use [`Broker::new`] and its TLS files).
impl From<&SecretString> for Broker {
    fn from(url: &SecretString) -> Self {
        Self {
            url: url.clone(),
            tls: OwnedTLSConfig::default(),
        }
    }
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Neither the password nor the client key.
        f.debug_struct("Broker")
            .field("url", &redact(self.url.expose_secret()))
            .field("ca", &self.tls.cert_chain.is_some())
            .field("client_certificate", &self.tls.identity.is_some())
            .finish()
    }
}

/// Why no node of the broker could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TLS handshake failed (a certificate, or a port without TLS), or what came back was not
    /// AMQP (a TLS port behind an `amqp://` URL): retrying cannot help. The message names the
    /// node, what failed, and the setting to check.
    #[error("{message}")]
    Handshake {
        /// What failed and what to check (lapin's error included).
        message: String,
        /// lapin's error.
        error: lapin::Error,
    },
    /// The node did not answer, refused, or closed the connection: it may later.
    #[error("broker {node}: {source}")]
    Unreachable {
        /// The node (no password).
        node: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
}

impl ConnectError {
    /// Whether waiting cannot help (a certificate, a scheme that does not match the port).
    pub fn is_permanent(&self) -> bool {
        matches!(self, ConnectError::Handshake { .. })
    }

    fn new(url: &str, error: lapin::Error) -> Self {
        let node = redact(url);
        match tls::diagnose(&error) {
            Some(failure) => ConnectError::Handshake {
                message: failure.explain(&format!("broker {node}"), "amqp.tls"),
                error,
            },
            // A plain URL for a TLS listener: the broker's answer is a TLS alert, not AMQP.
            None if is_garbled(&error) => ConnectError::Handshake {
                message: format!(
                    "broker {node} did not answer in AMQP ({error}); if that port is a TLS listener, \
                     the URL must be amqps://"
                ),
                error,
            },
            None => ConnectError::Unreachable { node, source: error },
        }
    }
}

/// Connect to the first node of `broker` (see [`broker_urls`]) that answers, starting with the
/// node after `after` (the one a lost connection was on, so a worker moves to another node), in one
/// round; the last node's error when none answered (a TLS failure rather than an unreachable
/// node, when there was one). The node's index comes back with the connection.
pub async fn connect_any(
    broker: &Broker,
    properties: &ConnectionProperties,
    after: Option<usize>,
) -> Result<(Connection, usize), ConnectError> {
    let urls = broker.nodes();
    let n = urls.len().max(1);
    let first = after.map_or(0, |i| (i + 1) % n);
    let mut last_error: Option<ConnectError> = None;
    for k in 0..urls.len() {
        let index = (first + k) % n;
        let attempt = async {
            DefaultConnectionBuilder::new()?
                .with_uri_str(urls[index].to_owned())
                .with_properties(properties.clone())
                .with_tls_config(broker.tls.clone())
                .connect()
                .await
        };
        match attempt.await {
            Ok(connection) => return Ok((connection, index)),
            Err(error) => {
                let error = ConnectError::new(urls[index], error);
                if urls.len() > 1 {
                    tracing::debug!(%error, "broker node unreachable, trying the next");
                }
                // Keep the most telling error: a certificate problem over a node that is down.
                if !last_error
                    .as_ref()
                    .is_some_and(|e| e.is_permanent() && !error.is_permanent())
                {
                    last_error = Some(error);
                }
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ConnectError::Unreachable {
        node: String::new(),
        source: lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed)),
    }))
}

/// Whether lapin could not parse what the broker sent: at connection start, a TLS listener's alert.
fn is_garbled(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::InvalidProtocolVersion(_)
    )
}

/// Connect, retrying with exponential backoff (and saying so in the log) until a node of the broker
/// answers or `max_attempts` rounds are spent. Each round tries every node `broker` names (a
/// cluster's nodes, comma-separated), starting after `after` (the node a lost connection was on).
/// A failed TLS handshake ends it at once (see [`ConnectError::Handshake`]). `name` shows in the
/// broker's management UI. Returns the connection and the index of its node.
pub async fn connect_with_retry(
    broker: &Broker,
    backoff: &BackoffSettings,
    name: &str,
    after: Option<usize>,
) -> anyhow::Result<(Connection, usize)> {
    let mut delay = Duration::from_millis(backoff.initial_ms.max(1));
    let max_delay = Duration::from_millis(backoff.max_ms.max(backoff.initial_ms));
    let mut attempt: u32 = 1;
    let nodes = broker.nodes().len();
    loop {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match connect_any(broker, &properties, after).await {
            Ok((connection, index)) => {
                let node = redact(broker.nodes()[index]);
                if attempt > 1 || after.is_some() || nodes > 1 {
                    tracing::info!(attempt, %node, node_index = index, "connected to the broker");
                }
                return Ok((connection, index));
            }
            Err(error) if error.is_permanent() => return Err(error.into()),
            Err(error) if backoff.max_attempts == 0 || attempt < backoff.max_attempts => {
                tracing::warn!(
                    %error,
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    broker = %redact(broker.url.expose_secret()),
                    "broker unreachable, retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max_delay);
                attempt += 1;
            }
            Err(error) => {
                anyhow::bail!("broker unreachable after {attempt} attempts ({error})")
            }
        }
    }
}

/// A node's `host:port`, from one of the URLs [`broker_urls`] gives: no user, password or vhost,
/// so it can be a metric label or go in a heartbeat. The port is the scheme's default (5672,
/// `amqps` 5671) when the URL names none.
pub fn node_address(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    // A port follows the last ':' outside an IPv6 literal's brackets.
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    match has_port {
        true => host_port.to_owned(),
        false => {
            let port = if scheme.eq_ignore_ascii_case("amqps") {
                5671
            } else {
                5672
            };
            format!("{}:{port}", host_port.trim_end_matches(':'))
        }
    }
}

/// The URL without its password, for logs (each node's, when it names several).
pub fn redact(url: &str) -> String {
    if url.contains(',') {
        return broker_urls(url).into_iter().map(redact).collect::<Vec<_>>().join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
        assert_eq!(
            redact("amqp://u:a@n1:5672, amqp://u:b@n2:5672"),
            "amqp://u:***@n1:5672,amqp://u:***@n2:5672"
        );
    }

    #[test]
    fn a_node_is_its_host_and_port_without_credentials() {
        assert_eq!(node_address("amqp://guest:secret@127.0.0.1:5682/%2f"), "127.0.0.1:5682");
        assert_eq!(node_address("amqp://rmq-0/%2f"), "rmq-0:5672");
        assert_eq!(
            node_address("amqps://u:p@rmq-1.example?heartbeat=10"),
            "rmq-1.example:5671"
        );
        assert_eq!(node_address("amqp://u:p:w@[::1]:5690"), "[::1]:5690");
        assert_eq!(node_address("amqp://[::1]/vhost"), "[::1]:5672");
        let url = "amqp://u:a@n1:5672, amqp://u:b@n2:5673";
        let nodes: Vec<String> = broker_urls(url).into_iter().map(node_address).collect();
        assert_eq!(nodes, ["n1:5672", "n2:5673"]);
    }

    #[test]
    fn a_url_may_name_the_nodes_of_a_cluster() {
        assert_eq!(broker_urls("amqp://n1"), ["amqp://n1"]);
        assert_eq!(
            broker_urls("amqp://n1:5672, amqp://n2:5672,,amqp://n3:5672 "),
            ["amqp://n1:5672", "amqp://n2:5672", "amqp://n3:5672"]
        );
    }
}
