//! Connecting to the broker, retrying with exponential backoff while it is unreachable.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

use super::settings::BackoffSettings;

/// The broker nodes an `amqp.url` names: one URL, or several separated by commas (the nodes of a
/// RabbitMQ cluster), in the order they are tried.
pub fn broker_urls(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Connect to the first node of `url` (see [`broker_urls`]) that answers, starting with the node
/// after `after` (the one a lost connection was on, so a worker moves to another node), in one
/// round; `None` when none answered. The node's index comes back with the connection.
pub async fn connect_any(
    url: &SecretString,
    properties: &ConnectionProperties,
    after: Option<usize>,
) -> Result<(Connection, usize), lapin::Error> {
    let urls = broker_urls(url.expose_secret());
    let n = urls.len().max(1);
    let first = after.map_or(0, |i| (i + 1) % n);
    let mut last_error = None;
    for k in 0..urls.len() {
        let index = (first + k) % n;
        match Connection::connect(urls[index], properties.clone()).await {
            Ok(connection) => return Ok((connection, index)),
            Err(error) => {
                if urls.len() > 1 {
                    tracing::debug!(%error, node = %redact(urls[index]), "broker node unreachable, trying the next");
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))
    }))
}

/// Connect, retrying with exponential backoff (and saying so in the log) until a node of the broker
/// answers or `max_attempts` rounds are spent. Each round tries every node `url` names (a cluster's
/// nodes, comma-separated), starting after `after` (the node a lost connection was on). `name`
/// shows in the broker's management UI. Returns the connection and the index of its node.
pub async fn connect_with_retry(
    url: &SecretString,
    backoff: &BackoffSettings,
    name: &str,
    after: Option<usize>,
) -> anyhow::Result<(Connection, usize)> {
    let mut delay = Duration::from_millis(backoff.initial_ms.max(1));
    let max_delay = Duration::from_millis(backoff.max_ms.max(backoff.initial_ms));
    let mut attempt: u32 = 1;
    let nodes = broker_urls(url.expose_secret()).len();
    loop {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match connect_any(url, &properties, after).await {
            Ok((connection, index)) => {
                let node = redact(broker_urls(url.expose_secret())[index]);
                if attempt > 1 || after.is_some() || nodes > 1 {
                    tracing::info!(attempt, %node, node_index = index, "connected to the broker");
                }
                return Ok((connection, index));
            }
            Err(error) if backoff.max_attempts == 0 || attempt < backoff.max_attempts => {
                tracing::warn!(
                    %error,
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    broker = %redact(url.expose_secret()),
                    "broker unreachable, retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max_delay);
                attempt += 1;
            }
            Err(error) => {
                anyhow::bail!(
                    "broker {} unreachable after {attempt} attempts: {error}",
                    redact(url.expose_secret())
                )
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
