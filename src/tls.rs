//! TLS to the broker (`amqps://`) and to Redis (`rediss://`): the files a connection trusts and
//! presents (`[amqp.tls]`, `[rate_limit.tls]`), checked and read at startup, and how a failed
//! handshake is told apart from a server that is merely unreachable.
//!
//! Both clients use rustls (with ring): lapin through `tcp-stream`, redis through `tokio-rustls`.
//! Settings hold paths only; the files are what Kubernetes mounts from a secret. A handshake that
//! fails on a certificate never succeeds by retrying, so the connections treat it as a startup
//! error ([`diagnose`]) instead of an outage to wait out.

use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The files of one TLS connection. Used only with a TLS URL (`amqps://`, `rediss://`); setting
/// any of them with a plain URL is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// PEM file of the CA certificate(s) that signed the server's certificate. Unset: the system's
    /// trust store (a public CA). For the broker the file is trusted in addition to the system's
    /// store; for Redis instead of it.
    pub ca_file: Option<PathBuf>,
    /// PEM file of this client's certificate (and any intermediates), for servers that require one
    /// (mutual TLS). Needs `key_file`. Unset: no client certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the unencrypted private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// What [`TlsFiles`] name, read: PEM bytes, parsed once to be sure they are usable.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// The CA certificate(s).
    pub ca: Option<Vec<u8>>,
    /// This client's certificate and key.
    pub identity: Option<ClientIdentity>,
}

/// A client certificate (chain) and its private key, PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// The private key.
    pub key: Vec<u8>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key, nor bytes nobody can read in a log.
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|_| "<pem>"))
            .field("identity", &self.identity.as_ref().map(|_| "<certificate and key>"))
            .finish()
    }
}

impl TlsFiles {
    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Refuse files that cannot be used: files with a plain URL among `urls` (`url_setting`'s
    /// servers; `scheme` is the TLS one), a certificate without its key or the reverse, and files
    /// that cannot be read or hold no PEM of the right kind. `section` names these settings in the
    /// messages (`amqp.tls`).
    pub fn check(&self, section: &str, url_setting: &str, urls: &[&str], scheme: &str) -> anyhow::Result<()> {
        if self.is_set() {
            let prefix = format!("{scheme}://");
            for url in urls {
                ensure!(
                    url.get(..prefix.len()).is_some_and(|s| s.eq_ignore_ascii_case(&prefix)),
                    "{section} names TLS files, but {url_setting} has a server without TLS ({}): \
                     use {prefix} URLs, or remove the {section} settings",
                    url.split_once("://").map_or("no scheme", |(s, _)| s)
                );
            }
        }
        self.load(section).map(|_| ())
    }

    /// Read and parse the files (see [`TlsFiles::check`] for what is refused).
    pub fn load(&self, section: &str) -> anyhow::Result<TlsMaterial> {
        let ca = match &self.ca_file {
            Some(path) => {
                let pem = read(section, "ca_file", path)?;
                certificates(section, "ca_file", path, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => bail!("{section}.cert_file is set without {section}.key_file"),
            (None, Some(_)) => bail!("{section}.key_file is set without {section}.cert_file"),
            (Some(cert_path), Some(key_path)) => {
                let cert = read(section, "cert_file", cert_path)?;
                certificates(section, "cert_file", cert_path, &cert)?;
                let key = read(section, "key_file", key_path)?;
                PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                    anyhow::anyhow!(
                        "{section}.key_file = {}: no usable private key ({e}); an unencrypted PEM key \
                         (PKCS#8, PKCS#1 or SEC1) is needed",
                        key_path.display()
                    )
                })?;
                Some(ClientIdentity { cert, key })
            }
        };
        Ok(TlsMaterial { ca, identity })
    }
}

fn read(section: &str, name: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{section}.{name} = {}: cannot read it", path.display()))
}

/// The certificates of a PEM file; at least one.
fn certificates(section: &str, name: &str, path: &Path, pem: &[u8]) -> anyhow::Result<usize> {
    let parsed: Result<Vec<CertificateDer>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = parsed.map_err(|e| anyhow::anyhow!("{section}.{name} = {}: bad PEM ({e})", path.display()))?;
    ensure!(
        !certs.is_empty(),
        "{section}.{name} = {}: no certificate in it (a PEM `BEGIN CERTIFICATE` block)",
        path.display()
    );
    Ok(certs.len())
}

/// Why a TLS connection failed, when retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The server's certificate could not be verified: signed by a CA that is not trusted,
    /// expired, revoked.
    ServerCertificate(String),
    /// The server's certificate is for other host names than the URL's.
    ServerName(String),
    /// The server refused this client's certificate, or wanted one and got none.
    ClientCertificate(String),
    /// What came back was not TLS: a TLS URL for a plain port.
    NotTls(String),
    /// Any other TLS failure (no common protocol version or cipher suite, ...).
    Other(String),
}

impl HandshakeFailure {
    /// A sentence for the log: what failed with `server` (as the log may show it), and which of
    /// the `section`'s settings to look at.
    pub fn explain(&self, server: &str, section: &str) -> String {
        match self {
            Self::ServerCertificate(why) => format!(
                "TLS: the certificate of {server} could not be verified ({why}); {section}.ca_file must \
                 hold the CA that signed it"
            ),
            Self::ServerName(why) => format!(
                "TLS: the certificate of {server} could not be verified ({why}); the URL's host must be \
                 one of the names in the certificate (subjectAltName)"
            ),
            Self::ClientCertificate(why) => format!(
                "TLS: {server} refused this client's certificate ({why}); check {section}.cert_file and \
                 {section}.key_file against the CA the server trusts"
            ),
            Self::NotTls(why) => format!(
                "TLS: {server} did not answer in TLS ({why}); is that port a TLS listener? A plain port \
                 needs a plain URL"
            ),
            Self::Other(why) => format!("TLS: the handshake with {server} failed ({why})"),
        }
    }
}

/// The TLS failure inside `error`, if it is one: the rustls error anywhere in its chain (through
/// `io::Error`s and the `Arc`s lapin and redis keep errors in). `None` for everything else
/// (refused, timed out, reset), which may heal.
pub fn diagnose(error: &(dyn Error + 'static)) -> Option<HandshakeFailure> {
    find_rustls(error, 0).map(classify)
}

fn find_rustls<'a>(error: &'a (dyn Error + 'static), depth: usize) -> Option<&'a rustls::Error> {
    if depth > 16 {
        return None;
    }
    if let Some(e) = error.downcast_ref::<rustls::Error>() {
        return Some(e);
    }
    // An `io::Error`'s own `source` skips the error it wraps; look inside.
    let inner: Option<&(dyn Error + 'static)> = if let Some(io) = error.downcast_ref::<std::io::Error>() {
        io.get_ref().map(|e| e as &(dyn Error + 'static))
    } else if let Some(io) = error.downcast_ref::<Arc<std::io::Error>>() {
        Some(&**io as &(dyn Error + 'static))
    } else if let Some(e) = error.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
        Some(&**e as &(dyn Error + 'static))
    } else {
        None
    };
    inner
        .and_then(|e| find_rustls(e, depth + 1))
        .or_else(|| error.source().and_then(|e| find_rustls(e, depth + 1)))
}

fn classify(error: &rustls::Error) -> HandshakeFailure {
    use rustls::{AlertDescription as Alert, CertificateError, Error as E};
    match error {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            HandshakeFailure::ServerCertificate("signed by a CA that is not trusted: UnknownIssuer".into())
        }
        E::InvalidCertificate(
            e @ (CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }),
        ) => HandshakeFailure::ServerName(e.to_string()),
        E::InvalidCertificate(e) => HandshakeFailure::ServerCertificate(e.to_string()),
        E::AlertReceived(
            alert @ (Alert::BadCertificate
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::AccessDenied
            | Alert::CertificateRequired),
        ) => HandshakeFailure::ClientCertificate(format!("alert {alert:?}")),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            HandshakeFailure::NotTls(error.to_string())
        }
        other => HandshakeFailure::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_with_a_plain_url_are_refused() {
        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = files
            .check("amqp.tls", "amqp.url", &["amqps://a:5671", "amqp://b:5672"], "amqps")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("amqp.tls names TLS files, but amqp.url has a server without TLS (amqp)"),
            "{e}"
        );
        // No files: plain URLs are fine, and nothing is read.
        TlsFiles::default()
            .check("amqp.tls", "amqp.url", &["amqp://b:5672"], "amqps")
            .unwrap();
    }

    #[test]
    fn a_missing_or_empty_file_names_its_setting() {
        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = format!(
            "{:#}",
            files
                .check("rate_limit.tls", "rate_limit.redis_url", &["rediss://r"], "rediss")
                .unwrap_err()
        );
        assert!(
            e.starts_with("rate_limit.tls.ca_file = /nonexistent/ca.pem: cannot read it"),
            "{e}"
        );
        let empty = std::env::temp_dir().join(format!("kiln-tls-unit-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = TlsFiles {
            ca_file: Some(empty.clone()),
            ..Default::default()
        };
        let e = files.load("amqp.tls").unwrap_err().to_string();
        std::fs::remove_file(&empty).unwrap();
        assert!(
            e.contains("amqp.tls.ca_file") && e.contains("no certificate in it"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_needs_its_key() {
        let files = TlsFiles {
            cert_file: Some("/x/client.pem".into()),
            ..Default::default()
        };
        let e = files.load("amqp.tls").unwrap_err().to_string();
        assert_eq!(e, "amqp.tls.cert_file is set without amqp.tls.key_file");
        let files = TlsFiles {
            key_file: Some("/x/client.key".into()),
            ..Default::default()
        };
        let e = files.load("amqp.tls").unwrap_err().to_string();
        assert_eq!(e, "amqp.tls.key_file is set without amqp.tls.cert_file");
    }

    #[test]
    fn a_certificate_error_is_found_through_io_errors_and_arcs() {
        let verify = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, verify);
        let wrapped: Arc<dyn Error + Send + Sync> = Arc::new(io);
        let failure = diagnose(&wrapped).expect("a TLS failure");
        assert!(matches!(failure, HandshakeFailure::ServerCertificate(ref why) if why.contains("UnknownIssuer")));
        let text = failure.explain("broker amqps://localhost:5671", "amqp.tls");
        assert!(
            text.contains("the certificate of broker amqps://localhost:5671 could not be verified"),
            "{text}"
        );

        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let io = std::io::Error::other(alert);
        assert!(matches!(diagnose(&io), Some(HandshakeFailure::ClientCertificate(_))));

        let name = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        let failure = diagnose(&std::io::Error::other(name)).expect("a TLS failure");
        assert!(failure
            .explain("Redis rediss://r:6380/", "rate_limit.tls")
            .contains("the URL's host must be one of the names in the certificate"));

        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(diagnose(&refused), None);
    }
}
