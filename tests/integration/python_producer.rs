//! A producer written in another language, with a client nobody here wrote (Python, pika), gets
//! its image: the contract is usable from outside Rust.

use std::process::{Command, Output};

use crate::helpers::{decode_png, repo, spawn_app, venv_python};

/// Run examples/python/producer.py against `queue` with `args`.
async fn producer(queue: &str, args: &[&str]) -> Output {
    let mut command = Command::new(venv_python());
    command
        .arg("examples/python/producer.py")
        .args(["--queue", queue])
        .args(args)
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
