//! A producer written in another language, with a client nobody here wrote (Python, pika), gets
//! its image: the contract is usable from outside Rust.

use std::process::{Command, Output};

use crate::helpers::{decode_png, repo, spawn_app, spawn_app_with, venv_python};

/// Run examples/python/producer.py against `queue` with `args`.
async fn producer(queue: &str, args: &[&str]) -> Output {
    producer_with(queue, args, &[]).await
}

/// [`producer`], with these environment variables.
async fn producer_with(queue: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(venv_python());
    command
        .arg("examples/python/producer.py")
        .args(["--queue", queue])
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_pika_example_producer_gets_a_png() {
    let app = spawn_app().await;
    let out = std::env::temp_dir().join(format!("kiln-pika-{}.png", uuid::Uuid::new_v4()));
    let out_arg = out.display().to_string();
    let args = [
        "--style",
        "3:0.5,12:0.5",
        "--size",
        "96",
        "--timeout",
        "120",
        "-o",
        &out_arg,
        "samples/coffee.jpg",
    ];
    let output = producer(&app.topology.requests, &args).await;
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line on stdout");
    assert_eq!(summary["status"], "ok");
    assert_eq!(
        (summary["width"].as_u64(), summary["height"].as_u64()),
        (Some(96), Some(64))
    );
    assert_eq!(decode_png(&std::fs::read(&out).unwrap()).dimensions(), (96, 64));
    std::fs::remove_file(&out).unwrap();

    // An error reply is an exit code and a machine-readable code, for that producer too.
    let output = producer(
        &app.topology.requests,
        &["--style", "77", "-o", "/dev/null", "samples/coffee.jpg"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["code"], "unknown_style");
    app.stop().await;
}

/// The example's `signature_header`, run by Python on these inputs.
fn python_signature(
    key_id: &str,
    secret: &str,
    queue: &str,
    reply_to: &str,
    correlation_id: &str,
    body: &str,
    ts: i64,
) -> String {
    let script = "import sys; sys.path.insert(0, 'examples/python'); import producer; \
                  a = sys.argv[1:]; \
                  print(producer.signature_header(a[0], a[1].encode(), a[2], a[3], a[4], a[5].encode(), int(a[6])))";
    let output = Command::new(venv_python())
        .args([
            "-c",
            script,
            key_id,
            secret,
            queue,
            reply_to,
            correlation_id,
            body,
            &ts.to_string(),
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn the_python_example_signs_exactly_as_the_worker_verifies() {
    use kiln::auth::{Covered, SignatureHeader, Signer};
    use secrecy::SecretString;

    let secret = "a-secret-of-more-than-32-bytes-0123456789";
    let body = r#"{"version":1,"request_id":"r-1","user_id":"acme:ümlaut","model":"multistyle26"}"#;
    for (queue, reply_to, correlation_id) in [
        ("kiln.requests.pro", "amq.gen-JzTY20BRgKO", "c0ffee"),
        ("kiln.requests", "", ""),
    ] {
        let ts = 1_795_823_940_123;
        let from_python = python_signature("acme", secret, queue, reply_to, correlation_id, body, ts);
        let covered = Covered {
            queue,
            reply_to,
            correlation_id,
            body: body.as_bytes(),
        };
        let from_rust = Signer::new("acme", SecretString::from(secret))
            .sign(ts, &covered)
            .unwrap();
        assert_eq!(from_python, from_rust.value());
        SignatureHeader::parse(&from_python)
            .unwrap()
            .verify(&SecretString::from(secret), &covered)
            .unwrap();
    }
}

#[tokio::test]
async fn a_signed_pika_request_is_served_and_an_unsigned_one_refused() {
    let secret = "pika-test-secret-0123456789abcdef0123456789";
    let app = spawn_app_with(|s| {
        s.auth.policy = kiln::auth::Policy::Required;
        s.auth.keys.insert(
            "pika".into(),
            kiln::auth::KeySettings {
                secret: Some(secret.into()),
                user_prefixes: vec!["pika:".into()],
                ..Default::default()
            },
        );
    })
    .await;
    let args = [
        "--user",
        "pika:1",
        "--size",
        "96",
        "-o",
        "/dev/null",
        "samples/coffee.jpg",
    ];
    let signed = [&["--key-id", "pika"][..], &args].concat();
    let output = producer_with(&app.topology.requests, &signed, &[("KILN_KEY_SECRET", secret)]).await;
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["status"], "ok");

    let output = producer(&app.topology.requests, &args).await;
    assert_eq!(output.status.code(), Some(2));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["code"], "unauthenticated", "{summary}");
    app.stop().await;
}
