//! Connecting to the broker, retrying with exponential backoff while it is unreachable.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

use super::settings::BackoffSettings;

/// Connect, retrying with exponential backoff (and saying so in the log) until the broker answers
/// or `max_attempts` is spent. `name` shows in the broker's management UI.
pub async fn connect_with_retry(
    url: &SecretString,
    backoff: &BackoffSettings,
    name: &str,
) -> anyhow::Result<Connection> {
    let mut delay = Duration::from_millis(backoff.initial_ms.max(1));
    let max_delay = Duration::from_millis(backoff.max_ms.max(backoff.initial_ms));
    let mut attempt: u32 = 1;
    loop {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match Connection::connect(url.expose_secret(), properties).await {
            Ok(connection) => {
                if attempt > 1 {
                    tracing::info!(attempt, "connected to the broker");
                }
                return Ok(connection);
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

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
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
    }
}
