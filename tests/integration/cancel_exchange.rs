//! Cancels through the real broker: `Producer::cancel` publishes on `<prefix>.cancel`, every
//! worker's listener hears it and hands it to the worker's `Cancellations`; a bad message is
//! dropped without stopping the listener; a session that reconnects listens again; a request
//! cancelled before it arrives is answered `cancelled` and costs its user nothing. And the
//! published contract: the cancel examples parse or are refused as `cancel.v1.schema.json` says,
//! and what `Producer::cancel` puts on the wire validates.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kiln::cancel::StopReason;
use kiln::configuration::Settings;
use kiln::domain::{Cancel, ErrorCode, ReplyStatus};
use kiln::rate_limit::{now_ms, RedisLimiter};
use lapin::options::{BasicPublishOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;

use crate::helpers::{
    admin_channel, consume, exclusive_queue, free_port, passive, poll_until, read, repo, request, spawn_app_alone_with,
    spawn_app_with, venv_python, TcpProxy, TestApp, REPLY_TIMEOUT,
};

/// How long a cancel may take to reach a worker's `Cancellations`.
const HEARD_WITHIN: Duration = Duration::from_secs(10);

/// A worker that loads one small model and does not warm it: these tests never render.
fn light(settings: &mut Settings) {
    settings.models.enabled = vec!["multistyle26".into()];
    settings.models.warmup = false;
}

fn new_id() -> String {
    format!("cancel-test-{}", uuid::Uuid::new_v4())
}

/// Wait until `app` has heard a cancel for `request_id`.
async fn heard(app: &TestApp, request_id: &str) {
    poll_until(&format!("the cancel of {request_id}"), HEARD_WITHIN, async || {
        app.cancellations.is_cancelled(request_id).then_some(())
    })
    .await
}

/// `kiln_cancel_messages_total{held}` as `/metrics` shows it (the process's registry).
fn cancel_messages(held: &str) -> f64 {
    let series = format!("kiln_cancel_messages_total{{held=\"{held}\"}} ");
    kiln::metrics::render()
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0.0, |value| value.parse().expect("a number"))
}

#[tokio::test]
async fn a_cancel_stops_the_request_a_worker_holds_and_is_remembered_for_one_it_does_not() {
    // Alone: the metric's counts are this worker's.
    let app = spawn_app_alone_with(light).await;
    let producer = app.producer().await;
    let before = (cancel_messages("true"), cancel_messages("false"));

    let held_id = new_id();
    let held = app.cancellations.track(&held_id);
    assert_eq!(held.flag().reason(), None);
    let listening = producer.cancel(&held_id, Some("the user left")).await.unwrap();
    assert!(listening, "the worker's queue is bound to the cancel exchange");
    poll_until("the held request's stop flag", HEARD_WITHIN, async || {
        held.flag().reason()
    })
    .await;
    assert_eq!(held.flag().reason(), Some(StopReason::Cancelled));
    assert!(app.cancellations.is_cancelled(&held_id));

    // Not held: remembered, and a request with that id is stopped as soon as it is tracked.
    let later_id = new_id();
    assert!(producer.cancel(&later_id, None).await.unwrap());
    heard(&app, &later_id).await;
    assert_eq!(
        app.cancellations.track(&later_id).flag().reason(),
        Some(StopReason::Cancelled)
    );
    assert_eq!(app.cancellations.track(&new_id()).flag().reason(), None);

    assert_eq!(cancel_messages("true") - before.0, 1.0);
    assert_eq!(cancel_messages("false") - before.1, 1.0);

    // A request id no worker would accept never leaves the producer.
    assert!(producer.cancel("not a request id", None).await.is_err());
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn every_worker_hears_one_cancel() {
    let first = spawn_app_with(light).await;
    let prefix = first.settings.amqp.topology.prefix.clone();
    let mut second = spawn_app_with(|s| {
        light(s);
        s.amqp.topology.prefix = prefix;
        s.worker.id = Some("test-worker-2".into());
    })
    .await;
    // Its start returned as soon as the first one consumed: wait for both (each listens for
    // cancels before it consumes).
    let last = first.topology.request_queues.last().unwrap().name.clone();
    poll_until("both workers consuming", REPLY_TIMEOUT, async || {
        let queue = admin_channel()
            .await
            .queue_declare(last.as_str().into(), passive(), FieldTable::default())
            .await
            .ok()?;
        (queue.consumer_count() == 2).then_some(())
    })
    .await;
    let held_by_second = second.cancellations.track("shared-id");

    let producer = first.producer().await;
    assert!(producer.cancel("shared-id", None).await.unwrap());
    heard(&first, "shared-id").await;
    heard(&second, "shared-id").await;
    assert_eq!(held_by_second.flag().reason(), Some(StopReason::Cancelled));
    drop(held_by_second);

    producer.close().await;
    second.shutdown().await;
    first.stop().await;
}

#[tokio::test]
async fn a_malformed_cancel_is_dropped_and_the_listener_goes_on() {
    let app = spawn_app_with(light).await;
    let exchange = app.topology.cancel_exchange.clone();
    let channel = admin_channel().await;
    let publish = async |body: &[u8]| {
        channel
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    };
    // Not JSON, the wrong shape, an unknown field, a bad id, a version it does not speak, too
    // big: each logged and dropped; then a valid one, in the same queue behind them.
    let unknown_field = new_id();
    let wrong_version = new_id();
    let bad: Vec<Vec<u8>> = vec![
        b"\xff\xfe not json".to_vec(),
        br#"["a-request"]"#.to_vec(),
        format!(r#"{{"version": 1, "request_id": "{unknown_field}", "user_id": "u"}}"#).into_bytes(),
        br#"{"version": 1, "request_id": "a b"}"#.to_vec(),
        format!(r#"{{"version": 2, "request_id": "{wrong_version}"}}"#).into_bytes(),
        vec![b' '; 1 << 20],
    ];
    for body in &bad {
        publish(body).await;
    }
    let valid = new_id();
    publish(format!(r#"{{"version": 1, "request_id": "{valid}"}}"#).as_bytes()).await;
    heard(&app, &valid).await;
    assert!(!app.cancellations.is_cancelled(&unknown_field));
    assert!(!app.cancellations.is_cancelled(&wrong_version));

    // And it keeps listening.
    let producer = app.producer().await;
    let after = new_id();
    assert!(producer.cancel(&after, None).await.unwrap());
    heard(&app, &after).await;
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_session_that_reconnects_listens_again() {
    let port = free_port();
    let proxy = TcpProxy::start(port, 5672).await;
    let app = spawn_app_with(|s| {
        light(s);
        s.amqp.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f").into();
    })
    .await;
    let producer = app.producer().await;
    let before = new_id();
    assert!(producer.cancel(&before, None).await.unwrap());
    heard(&app, &before).await;

    // The connection drops under the worker; the old queue goes with it. Cancels sent while
    // it reconnects may be lost (best-effort); once it is back, one is heard again.
    proxy.sever();
    poll_until("a cancel heard after the reconnect", REPLY_TIMEOUT, async || {
        let id = new_id();
        producer.cancel(&id, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.cancellations.is_cancelled(&id).then_some(())
    })
    .await;
    // What the worker heard before the connection dropped is still remembered.
    assert!(app.cancellations.is_cancelled(&before));
    producer.close().await;
    app.stop().await;
}

fn schema() -> jsonschema::Validator {
    let schema: Value = serde_json::from_slice(&read("schemas/cancel.v1.schema.json")).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[tokio::test]
async fn what_the_producer_sends_is_a_valid_cancel() {
    let app = spawn_app_with(light).await;
    let channel = admin_channel().await;
    let queue = exclusive_queue(&channel).await;
    channel
        .queue_bind(
            queue.as_str().into(),
            app.topology.cancel_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut messages = consume(&channel, &queue).await;
    let producer = app.producer().await;
    producer.cancel("r-42", Some("the user left")).await.unwrap();
    let delivery = tokio::time::timeout(HEARD_WITHIN, messages.next())
        .await
        .expect("the cancel reaches every bound queue")
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"version": 1, "request_id": "r-42", "reason": "the user left"})
    );
    let errors: Vec<String> = schema().iter_errors(&body).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let properties = &delivery.properties;
    assert_eq!(
        properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(properties.kind().as_ref().map(|s| s.as_str()), Some("kiln.cancel.v1"));
    producer.close().await;
    app.stop().await;
}

#[test]
fn the_worker_acts_on_every_valid_cancel_example_and_drops_every_invalid_one() {
    let schema = schema();
    let mut seen = (0, 0);
    for (dir, valid) in [("schemas/examples", true), ("schemas/examples/invalid", false)] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("cancel") || !name.ends_with(".json") {
                continue;
            }
            let body = std::fs::read(&path).unwrap();
            let value: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(schema.is_valid(&value), valid, "{name}: the schema");
            assert_eq!(Cancel::parse(&body).is_ok(), valid, "{name}: the worker");
            if valid {
                seen.0 += 1;
            } else {
                seen.1 += 1;
            }
        }
    }
    assert!(seen.0 >= 2 && seen.1 >= 5, "{seen:?}");
}

#[tokio::test]
async fn kiln_cancel_sends_one_and_fails_when_no_worker_listens() {
    let app = spawn_app_with(light).await;
    let run = |prefix: String, id: String| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["cancel", &id, "--reason", "a test"])
            .current_dir(repo())
            .env("KILN_AMQP__TOPOLOGY__PREFIX", prefix)
            .output()
    };
    let id = new_id();
    let output = run(app.settings.amqp.topology.prefix.clone(), id.clone())
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    heard(&app, &id).await;

    let nobody = format!("kiln-test-{}", uuid::Uuid::new_v4().simple());
    let output = run(nobody.clone(), new_id()).await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no worker listens"), "{stderr}");
    // The command declared that prefix's cancel exchange.
    let _ = admin_channel()
        .await
        .exchange_delete(format!("{nobody}.cancel").as_str().into(), Default::default())
        .await;
    app.stop().await;
}

#[tokio::test]
async fn the_python_producer_cancels_too() {
    let app = spawn_app_with(light).await;
    let id = new_id();
    let output = tokio::process::Command::new(venv_python())
        .arg(repo().join("examples/python/producer.py"))
        .args(["--cancel", &id, "--reason", "a test", "--cancel-exchange"])
        .arg(&app.topology.cancel_exchange)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let line: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line, serde_json::json!({"status": "cancel_sent", "request_id": id}));
    heard(&app, &id).await;
    app.stop().await;
}

#[tokio::test]
async fn a_request_cancelled_before_it_arrives_is_answered_cancelled_and_not_charged() {
    let app = spawn_app_with(|s| {
        light(s);
        s.rate_limit.enabled = true;
    })
    .await;
    let mut producer = app.producer().await;
    let photo = read("tests/data/astronaut-256.png");
    let served = producer.request(&request(&photo, None), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(served.document.status, ReplyStatus::Ok);
    let limiter = RedisLimiter::new(Arc::new(app.settings.rate_limit.clone())).unwrap();
    // The lease is given back after the reply is confirmed: wait for it.
    let charged = crate::helpers::poll_until("the served request's lease released", REPLY_TIMEOUT, async || {
        let shown = limiter.show("test-user", now_ms()).await.unwrap();
        (shown.in_flight == 0).then_some(shown)
    })
    .await;
    assert_eq!((charged.quota_used, charged.in_flight), (1, 0));

    // Cancelled first, sent after: answered on arrival, before admission.
    let late = request(&photo, None);
    assert!(producer
        .cancel(&late.request_id, Some("changed my mind"))
        .await
        .unwrap());
    heard(&app, &late.request_id).await;
    let reply = producer.request(&late, REPLY_TIMEOUT).await.unwrap();
    crate::contract::assert_valid_reply(&reply.document);
    assert_eq!(reply.document.status, ReplyStatus::Error);
    assert_eq!(reply.document.error.as_ref().unwrap().code, ErrorCode::Cancelled);
    assert_eq!(reply.document.request_id.as_deref(), Some(late.request_id.as_str()));
    let after = limiter.show("test-user", now_ms()).await.unwrap();
    assert_eq!((after.quota_used, after.in_flight), (1, 0), "nothing charged for it");

    producer.close().await;
    crate::rate_limits::forget(&app.settings.rate_limit.key_prefix).await;
    app.stop().await;
}
