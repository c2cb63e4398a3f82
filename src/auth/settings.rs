//! `[auth]`: whether requests must be signed, how fresh a signature must be, and the producers'
//! keys, each with the users and request queues it may speak for.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Whether a request must carry a `kiln-signature`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Signatures are not looked at (default): anyone the broker lets publish is trusted.
    #[default]
    Off,
    /// A signed request is checked and refused when its signature is wrong; an unsigned one is
    /// served (while producers move to signing).
    Optional,
    /// Every request must be signed by a configured key.
    Required,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// `off` (default), `optional` or `required`.
    pub policy: Policy,
    /// How old a signature may be when its request reaches a worker, in milliseconds: longer than
    /// requests wait in their queue (default 900000, 15 minutes; the free tier's default deadline
    /// is 10). Signatures are remembered this long plus `max_skew_ms` to refuse replays.
    pub max_age_ms: u64,
    /// How far a signature's time may be ahead of the worker's clock, in milliseconds (producers'
    /// clocks differ; default 300000, 5 minutes).
    pub max_skew_ms: u64,
    /// The producers' keys, by key id (`[auth.keys.<id>]`): lowercase letters, digits, `_` and `-`.
    pub keys: BTreeMap<String, KeySettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            policy: Policy::Off,
            max_age_ms: 900_000,
            max_skew_ms: 300_000,
            keys: BTreeMap::new(),
        }
    }
}

/// One producer's key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeySettings {
    /// The shared secret (its UTF-8 bytes are the HMAC key), at least 32 bytes: e.g. 32 random
    /// bytes in hex. Best from the environment, `KILN_AUTH__KEYS__<ID>__SECRET`. Never logged.
    pub secret: Option<SecretString>,
    /// A file holding the secret instead (a mounted Kubernetes secret); one trailing newline is
    /// ignored.
    pub secret_file: Option<PathBuf>,
    /// The user ids this key may sign for, as prefixes (`["acme:"]`: users `acme:…` only); empty:
    /// any user.
    pub user_prefixes: Vec<String>,
    /// The request queues this key may publish to, by name (`["kiln.requests.free"]`); empty: any.
    pub queues: Vec<String>,
}

/// The least a secret may have: 32 bytes, SHA-256's own size.
pub const MIN_SECRET_BYTES: usize = 32;

impl AuthSettings {
    /// The checks across fields; `queues` are the request queues of the topology.
    pub fn validate(&self, queues: &[&str]) -> anyhow::Result<()> {
        ensure!(
            self.policy == Policy::Off || !self.keys.is_empty(),
            "auth.policy = {:?} needs at least one key in [auth.keys.<id>]",
            self.policy
        );
        ensure!(self.max_age_ms >= 1_000, "auth.max_age_ms must be at least 1000");
        for (id, key) in &self.keys {
            let valid_id = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            ensure!(
                valid_id,
                "auth key id {id:?}: use 1 to 64 lowercase letters, digits, _ and -"
            );
            match (&key.secret, &key.secret_file) {
                (Some(_), Some(_)) => bail!("auth key {id}: set secret or secret_file, not both"),
                (None, None) => bail!(
                    "auth key {id}: no secret (secret, secret_file, or KILN_AUTH__KEYS__{}__SECRET)",
                    id.to_uppercase()
                ),
                (Some(secret), None) => check_secret(id, secret)?,
                (None, Some(_)) => {} // read, and checked, when the worker starts
            }
            for queue in &key.queues {
                ensure!(
                    queues.contains(&queue.as_str()),
                    "auth key {id}: queue {queue:?} is not a request queue; they are {}",
                    queues.join(", ")
                );
            }
        }
        Ok(())
    }
}

impl KeySettings {
    /// The secret, read from `secret_file` if that is where it is.
    pub fn load_secret(&self, id: &str) -> anyhow::Result<SecretString> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(secret), _) => secret.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("auth key {id}: cannot read secret_file {}", path.display()))?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                SecretString::from(text.strip_suffix('\r').unwrap_or(text))
            }
            (None, None) => bail!("auth key {id}: no secret"),
        };
        check_secret(id, &secret)?;
        Ok(secret)
    }
}

fn check_secret(id: &str, secret: &SecretString) -> anyhow::Result<()> {
    ensure!(
        secret.expose_secret().len() >= MIN_SECRET_BYTES,
        "auth key {id}: the secret must be at least {MIN_SECRET_BYTES} bytes"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &str) -> KeySettings {
        KeySettings {
            secret: Some(SecretString::from(secret)),
            ..Default::default()
        }
    }

    #[test]
    fn off_by_default_and_a_policy_needs_a_key() {
        let mut s = AuthSettings::default();
        assert_eq!(s.policy, Policy::Off);
        s.validate(&[]).unwrap();
        s.policy = Policy::Required;
        assert!(s.validate(&[]).is_err());
        s.keys.insert("acme".into(), key(&"x".repeat(32)));
        s.validate(&[]).unwrap();
    }

    #[test]
    fn short_secrets_bad_ids_and_unknown_queues_are_refused() {
        let mut s = AuthSettings::default();
        s.keys.insert("acme".into(), key("too short"));
        assert!(s.validate(&[]).is_err());
        let mut s = AuthSettings::default();
        s.keys.insert("Acme Corp".into(), key(&"x".repeat(32)));
        assert!(s.validate(&[]).is_err());
        let mut s = AuthSettings::default();
        let mut k = key(&"x".repeat(32));
        k.queues = vec!["kiln.requests.gold".into()];
        s.keys.insert("acme".into(), k);
        assert!(s.validate(&["kiln.requests", "kiln.requests.free"]).is_err());
        s.validate(&["kiln.requests", "kiln.requests.gold"]).unwrap();
    }

    #[test]
    fn keys_come_from_the_file_and_their_secrets_from_the_environment() {
        use crate::configuration::Settings;
        let path = std::env::temp_dir().join(format!("kiln-auth-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "[auth]\npolicy = \"required\"\n[auth.keys.acme]\nuser_prefixes = [\"acme:\"]\n\
             queues = [\"kiln.requests.pro\"]\n",
        )
        .unwrap();
        let env = [("KILN_AUTH__KEYS__ACME__SECRET".to_owned(), "e".repeat(64))];
        let s = Settings::load_from(Some(&path), Some(env.into_iter().collect())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.auth.policy, Policy::Required);
        let key = &s.auth.keys["acme"];
        assert_eq!(key.secret.as_ref().unwrap().expose_secret(), "e".repeat(64));
        assert_eq!(key.user_prefixes, ["acme:"]);
        s.validate().unwrap();
        assert!(format!("{s:?}").contains("acme") && !format!("{s:?}").contains(&"e".repeat(64)));
    }

    #[test]
    fn a_secret_file_loses_its_trailing_newline() {
        let path = std::env::temp_dir().join(format!("kiln-secret-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("{}\n", "s".repeat(40))).unwrap();
        let k = KeySettings {
            secret_file: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(k.load_secret("acme").unwrap().expose_secret(), "s".repeat(40));
        std::fs::remove_file(&path).unwrap();
        assert!(k.load_secret("acme").is_err(), "a missing file is a startup error");
    }
}
