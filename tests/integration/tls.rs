//! TLS to the broker and to Redis, on a real RabbitMQ with an AMQPS listener and a real Redis with
//! only a TLS port, both requiring client certificates from a throwaway CA
//! (`scripts/tls-services.sh`; fixed ports, so these run one at a time: `.config/nextest.toml`).
//! A worker serves a request end to end over `amqps://` and `rediss://`; a certificate signed by
//! another CA, a missing client certificate, and a URL whose scheme does not match the port are
//! startup errors that say what failed and where; an unreachable Redis is not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use futures_util::StreamExt;
use kiln::amqp::connect::Broker;
use kiln::configuration::Settings;
use kiln::domain::ReplyStatus;
use kiln::rate_limit::{AtLimit, RedisLimiter, TierSettings};
use kiln::startup::Application;
use kiln::submit::Producer;
use kiln::tls::TlsFiles;

use crate::helpers::{
    channel_on, decode_png, free_port, read, repo, request, spawn_app_with, test_settings, within, REPLY_TIMEOUT,
};

/// RabbitMQ and Redis with TLS listeners, stopped and removed when dropped.
struct TlsServices {
    dir: PathBuf,
    /// The broker's plain AMQP port (for the wrong-scheme cases).
    amqp_url: String,
    /// The broker's AMQPS port, by host name `localhost`.
    amqps_url: String,
    /// Redis's TLS port (it has no plain one).
    rediss_url: String,
    /// The CA that signed both servers' and the client's certificates.
    ca: PathBuf,
    /// A CA that signed nothing here.
    other_ca: PathBuf,
    /// The client certificate and key.
    cert: PathBuf,
    key: PathBuf,
}

impl TlsServices {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-tls-{}", uuid::Uuid::new_v4().simple()));
        let output = Command::new(repo().join("scripts/tls-services.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("the TLS services script runs");
        assert!(
            output.status.success(),
            "the TLS services did not start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8(output.stdout).unwrap();
        let vars: BTreeMap<&str, &str> = printed.lines().filter_map(|l| l.split_once('=')).collect();
        let var = |name: &str| {
            vars.get(name)
                .unwrap_or_else(|| panic!("{name} in {printed}"))
                .to_string()
        };
        Self {
            amqp_url: var("AMQP_URL"),
            amqps_url: var("AMQPS_URL"),
            rediss_url: var("REDISS_URL"),
            ca: var("CA_FILE").into(),
            other_ca: var("OTHER_CA_FILE").into(),
            cert: var("CERT_FILE").into(),
            key: var("KEY_FILE").into(),
            dir,
        }
    }

    /// The CA `ca` and the client certificate.
    fn files(&self, ca: &Path) -> TlsFiles {
        TlsFiles {
            ca_file: Some(ca.to_path_buf()),
            cert_file: Some(self.cert.clone()),
            key_file: Some(self.key.clone()),
        }
    }

    /// Worker settings on the AMQPS broker and the TLS Redis (limits on), trusting `ca`.
    fn customize(&self, s: &mut Settings, ca: &Path) {
        s.amqp.url = self.amqps_url.clone().into();
        s.amqp.tls = self.files(ca);
        s.rate_limit.enabled = true;
        s.rate_limit.redis_url = self.rediss_url.clone().into();
        s.rate_limit.tls = self.files(ca);
        s.rate_limit.default_tier = "t".into();
        s.rate_limit.tiers = BTreeMap::from([(
            "t".into(),
            TierSettings {
                rate_per_minute: 600.0,
                burst: 10,
                daily_quota: 100,
                max_in_flight: 10,
                at_limit: AtLimit::Reject,
            },
        )]);
        // Fail fast where a test expects the broker to stay unreachable.
        s.amqp.reconnect.max_attempts = 3;
    }
}

impl Drop for TlsServices {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/tls-services.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// Build a worker and run it until it fails; its error, with causes. Panics if it serves.
async fn startup_error(settings: Settings) -> String {
    let app = tokio::task::spawn_blocking(move || Application::build(settings))
        .await
        .unwrap()
        .expect("the worker builds (the settings are valid)");
    let run = app.run_until_stopped(std::future::pending());
    let result = within("the worker's startup error", REPLY_TIMEOUT, run).await;
    format!("{:#}", result.expect_err("the worker must not start"))
}

#[tokio::test]
async fn a_worker_serves_a_request_over_amqps_and_rediss_with_client_certificates() {
    let services = TlsServices::start();
    let app = spawn_app_with(|s| {
        services.customize(s, &services.ca);
        s.heartbeat.enabled = true;
        s.heartbeat.interval_ms = 200;
    })
    .await;

    // The heartbeat's own connection is TLS too: a beat arrives on the AMQPS broker.
    let channel = channel_on(&app.settings.amqp).await;
    let mut beats = crate::helpers::heartbeats(&channel, &app.settings.amqp.topology.prefix).await;

    let broker = Broker::new(&app.settings.amqp).unwrap();
    let mut producer = Producer::connect(broker, &app.topology.requests).await.unwrap();
    let photo = read("tests/data/astronaut-256.png");
    let req = request(&photo, None);
    let reply = producer.request(&req, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document);
    assert_eq!(decode_png(&reply.body).dimensions(), (256, 256));

    // The limiter decided in Redis over TLS (under `fail_open` a Redis it could not reach would
    // have left nothing there): one unit charged to the user today.
    let limiter = RedisLimiter::new(Arc::new(app.settings.rate_limit.clone())).unwrap();
    let state = limiter
        .show(&req.user_id, kiln::rate_limit::now_ms())
        .await
        .expect("Redis answers over TLS");
    assert_eq!(state.quota_used, 1, "{state:?}");

    let beat = within("a heartbeat over TLS", REPLY_TIMEOUT, beats.next()).await;
    assert!(beat.expect("the consumer is open").is_ok());

    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_a_startup_error_naming_the_server() {
    let services = TlsServices::start();

    // The broker's certificate, against a CA that did not sign it: no retrying, a clear error.
    let mut settings = test_settings();
    services.customize(&mut settings, &services.other_ca);
    settings.rate_limit.enabled = false;
    settings.amqp.reconnect.max_attempts = 0; // retrying forever would not end the test
    let error = startup_error(settings).await;
    assert!(
        error.contains("TLS: the certificate of broker amqps://guest:***@localhost:5692/%2f could not be verified"),
        "{error}"
    );
    assert!(
        error.contains("UnknownIssuer") && error.contains("amqp.tls.ca_file"),
        "{error}"
    );

    // Redis's certificate, the same (the broker is the plain one on 5672: Redis is checked first).
    let mut settings = test_settings();
    services.customize(&mut settings, &services.other_ca);
    settings.amqp.url = crate::helpers::AMQP_URL.into();
    settings.amqp.tls = TlsFiles::default();
    let error = startup_error(settings).await;
    assert!(
        error.contains("TLS: the certificate of Redis rediss://localhost:6392/ could not be verified"),
        "{error}"
    );
    assert!(error.contains("rate_limit.tls.ca_file"), "{error}");
}

#[tokio::test]
async fn a_missing_client_certificate_or_a_scheme_that_does_not_match_the_port_fails_clearly() {
    let services = TlsServices::start();

    // Both servers require a client certificate.
    let mut settings = test_settings();
    services.customize(&mut settings, &services.ca);
    settings.rate_limit.enabled = false;
    settings.amqp.tls.cert_file = None;
    settings.amqp.tls.key_file = None;
    let error = startup_error(settings).await;
    assert!(
        error.contains("TLS: broker amqps://guest:***@localhost:5692/%2f refused this client's certificate"),
        "{error}"
    );
    let mut settings = test_settings();
    services.customize(&mut settings, &services.ca);
    settings.amqp.url = crate::helpers::AMQP_URL.into();
    settings.amqp.tls = TlsFiles::default();
    settings.rate_limit.tls.cert_file = None;
    settings.rate_limit.tls.key_file = None;
    let error = startup_error(settings).await;
    assert!(
        error.contains("TLS: Redis rediss://localhost:6392/ refused this client's certificate"),
        "{error}"
    );

    // amqp:// to the AMQPS port, amqps:// to the plain port.
    let tls_port_as_plain = services.amqps_url.replace("amqps://", "amqp://");
    let plain_port_as_tls = services.amqp_url.replace("amqp://", "amqps://");
    for (url, files) in [
        (tls_port_as_plain, TlsFiles::default()),
        (plain_port_as_tls, services.files(&services.ca)),
    ] {
        let mut settings = test_settings();
        settings.amqp.url = url.clone().into();
        settings.amqp.tls = files;
        settings.amqp.reconnect.max_attempts = 0;
        let error = startup_error(settings).await;
        let node = kiln::amqp::connect::redact(&url);
        let expected = match url.starts_with("amqps://") {
            true => format!("TLS: broker {node} did not answer in TLS"),
            false => format!("broker {node} did not answer in AMQP"),
        };
        let advice = match url.starts_with("amqps://") {
            true => "is that port a TLS listener? A plain port needs a plain URL",
            false => "if that port is a TLS listener, the URL must be amqps://",
        };
        assert!(error.contains(&expected) && error.contains(advice), "{url}: {error}");
    }

    // A Redis that does not answer yet is not a startup error: the worker serves (fail_open).
    let app = spawn_app_with(|s| {
        services.customize(s, &services.ca);
        s.amqp.url = crate::helpers::AMQP_URL.into();
        s.amqp.tls = TlsFiles::default();
        s.rate_limit.redis_url = format!("rediss://localhost:{}/", free_port()).into();
    })
    .await;
    let mut producer = app.producer().await;
    let reply = producer
        .request(&request(&read("tests/data/astronaut-256.png"), None), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document);
    producer.close().await;
    app.stop().await;
}

#[test]
fn tls_files_with_a_plain_url_or_a_missing_ca_file_are_settings_errors() {
    let dir = std::env::temp_dir().join(format!("kiln-tls-settings-{}", uuid::Uuid::new_v4().simple()));
    let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let missing = dir.join("ca.pem");
    let missing = missing.to_str().unwrap();

    let settings = Settings::load_from(
        None,
        Some(env(&[
            ("KILN_AMQP__URL", "amqps://guest:guest@localhost:5692/%2f"),
            ("KILN_AMQP__TLS__CA_FILE", missing),
        ])),
    )
    .unwrap();
    let error = format!("{:#}", settings.validate().unwrap_err());
    assert!(
        error.contains(&format!("amqp.tls.ca_file = {missing}: cannot read it")),
        "{error}"
    );

    let settings = Settings::load_from(
        None,
        Some(env(&[
            ("KILN_RATE_LIMIT__REDIS_URL", "redis://127.0.0.1:6379/"),
            ("KILN_RATE_LIMIT__TLS__CA_FILE", missing),
        ])),
    )
    .unwrap();
    let error = format!("{:#}", settings.validate().unwrap_err());
    assert!(
        error.contains("rate_limit.tls names TLS files, but rate_limit.redis_url has a server without TLS (redis)"),
        "{error}"
    );
}
