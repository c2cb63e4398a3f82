//! Exactly-once effects over at-least-once delivery: a worker that dies right after its reply is
//! confirmed (fault switches at exactly that point), a request published twice, and a request id
//! reused for another body. The outcome records and charges are in the real Redis; the crashing
//! worker is the real `kiln` binary.

use std::sync::Arc;
use std::time::Duration;

use kiln::domain::{ErrorCode, ReplyStatus, WireStyle};
use kiln::rate_limit::RedisLimiter;
use kiln::submit::Producer;

use crate::helpers::{read, ready_messages, request, test_settings, TestApp, WorkerProcess, REPLY_TIMEOUT};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Units the user was charged today, as `kiln limits show` reports them.
async fn charged(settings: &kiln::configuration::Settings, user: &str) -> u64 {
    let limiter = RedisLimiter::new(Arc::new(settings.rate_limit.clone())).unwrap();
    limiter.show(user, kiln::rate_limit::now_ms()).await.unwrap().quota_used
}

/// Limits on (the default tiers; every test user is `free`), under the test's own prefix.
fn limited_settings() -> kiln::configuration::Settings {
    let mut settings = test_settings();
    settings.rate_limit.enabled = true;
    settings
}

/// A worker process with `fault` set answers one request and aborts at that point; what a second
/// worker then does with the redelivery is returned: (the first reply, the second if any).
async fn crash_after_confirm(
    settings: &kiln::configuration::Settings,
    fault: &str,
    log: &str,
    before_second: Duration,
) -> (kiln::submit::Reply, Option<kiln::submit::Reply>, String) {
    let topology = settings.topology();
    let lease_ttl = settings.rate_limit.lease_ttl_ms.to_string();
    let mut crashing = WorkerProcess::spawn(
        settings,
        &[(fault, "true"), ("KILN_RATE_LIMIT__LEASE_TTL_MS", lease_ttl.as_str())],
    );
    crashing.wait_for_log("worker ready", START_TIMEOUT).await;
    let mut producer = Producer::connect(&settings.amqp.url, &topology.requests).await.unwrap();
    let req = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(2)));
    producer.send(&req).await.unwrap();
    let first = producer.reply_to(&req.request_id, REPLY_TIMEOUT).await.unwrap();
    let status = crashing.wait_exit(REPLY_TIMEOUT).await;
    assert!(!status.success(), "the faulty worker aborts");
    assert_eq!(crashing.count(log), 1, "{}", crashing.log());
    // Not acked: the broker gives the request back.
    crate::helpers::poll_until("the request back in its queue", REPLY_TIMEOUT, async || {
        (ready_messages(&topology.requests).await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(before_second).await;

    let app = TestApp::start(settings.clone()).await;
    crate::helpers::poll_until("the redelivery settled", REPLY_TIMEOUT, async || {
        (ready_messages(&topology.requests).await == 0).then_some(())
    })
    .await;
    let second = producer.next_reply(Duration::from_secs(3)).await.ok();
    producer.close().await;
    app.stop().await;
    (first, second, req.request_id)
}

#[tokio::test]
async fn a_crash_between_confirm_and_ack_gives_one_final_reply_and_one_charge() {
    let settings = limited_settings();
    let (first, second, request_id) = crash_after_confirm(
        &settings,
        "KILN_FAULTS__ABORT_BEFORE_ACK",
        "aborting after the confirm and the record, before the ack",
        Duration::ZERO,
    )
    .await;
    assert_eq!(first.document.status, ReplyStatus::Ok);
    assert_eq!(
        first.message_id.as_deref(),
        Some(format!("final:{request_id}").as_str())
    );
    assert!(second.is_none(), "answered twice: {second:?}");
    assert_eq!(charged(&settings, "test-user").await, 1);
    // The redelivery gave the first delivery's lease back: the user may render again.
    let limiter = RedisLimiter::new(Arc::new(settings.rate_limit.clone())).unwrap();
    assert_eq!(
        limiter
            .show("test-user", kiln::rate_limit::now_ms())
            .await
            .unwrap()
            .in_flight,
        0
    );
}

#[tokio::test]
async fn a_crash_between_confirm_and_record_answers_again_with_the_same_message_id_and_charges_once() {
    let mut settings = limited_settings();
    // The first delivery's lease expires before the redelivery: only the remembered charge keeps
    // the user from paying twice.
    settings.rate_limit.lease_ttl_ms = 1_000;
    let (first, second, request_id) = crash_after_confirm(
        &settings,
        "KILN_FAULTS__ABORT_BEFORE_RECORD",
        "aborting after the confirm, before the record",
        Duration::from_millis(1_500),
    )
    .await;
    let second = second.expect("with no record, the redelivery is answered again");
    assert_eq!(second.document.status, ReplyStatus::Ok);
    assert_eq!(
        first.message_id, second.message_id,
        "the two copies must look alike to the producer"
    );
    assert_eq!(
        second.message_id.as_deref(),
        Some(format!("final:{request_id}").as_str())
    );
    assert_eq!(charged(&settings, "test-user").await, 1, "charged twice");
}

#[tokio::test]
async fn a_request_published_again_is_acked_without_a_second_reply_and_its_id_cannot_be_reused() {
    let settings = limited_settings();
    let topology = settings.topology();
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_consuming().await;
    let mut producer = app.producer().await;
    let req = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(2)));
    let first = producer.request(&req, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(first.document.status, ReplyStatus::Ok);

    // The same request again (a producer that did not see its confirm and published it again).
    producer.send(&req).await.unwrap();
    crate::helpers::poll_until("the copy settled", REPLY_TIMEOUT, async || {
        (ready_messages(&topology.requests).await == 0).then_some(())
    })
    .await;
    assert!(
        producer.next_reply(Duration::from_secs(2)).await.is_err(),
        "answered twice"
    );
    assert_eq!(charged(&settings, "test-user").await, 1);

    // The same id for another request: refused, with a reply of its own.
    let mut other = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(5)));
    other.request_id = req.request_id.clone();
    let refused = producer.request(&other, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(refused.document.status, ReplyStatus::Error);
    let error = refused.document.error.unwrap();
    assert_eq!(error.code, ErrorCode::DuplicateRequestId);
    assert!(error.message.contains("already answered (ok)"), "{}", error.message);
    assert_ne!(refused.message_id, first.message_id);
    assert_eq!(charged(&settings, "test-user").await, 1);
    producer.close().await;
    app.stop().await;
}
