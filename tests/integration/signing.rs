//! Signed requests through the real broker and Redis: a signed request is served; a forged, a
//! tampered, an unsigned (policy `required`), a stale one and one for a user outside its key's
//! namespace are answered `unauthenticated`, never charged or rendered; the same signed message
//! published again is acked without a reply, while the broker's redelivery of it is served; a
//! deferred request's copy comes back signed anew.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln::auth::{Covered, KeySettings, Policy, Signer, HEADER};
use kiln::configuration::Settings;
use kiln::domain::{ErrorCode, ReplyStatus, RequestDocument};
use kiln::rate_limit::{AtLimit, RedisLimiter, TierSettings};
use kiln::submit::{Producer, Reply};
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use secrecy::SecretString;

use crate::helpers::{
    admin_channel, http_get, metric_value, poll_until, read, request, spawn_app_with, TestApp, REPLY_TIMEOUT,
};

const KEY_ID: &str = "test-producer";
const SECRET: &str = "kiln-test-secret-0123456789abcdef0123456789abcdef";

fn signer() -> Signer {
    Signer::new(KEY_ID, SecretString::from(SECRET))
}

/// Policy `policy`, one key for users `signed-…`; limits on (a `t` tier, burst 4) when `limits`.
fn with_auth(s: &mut Settings, policy: Policy, limits: bool) {
    s.auth.policy = policy;
    s.auth.keys = BTreeMap::from([(
        KEY_ID.to_owned(),
        KeySettings {
            secret: Some(SecretString::from(SECRET)),
            user_prefixes: vec!["signed-".into()],
            ..Default::default()
        },
    )]);
    if limits {
        s.rate_limit.enabled = true;
        s.rate_limit.default_tier = "t".into();
        s.rate_limit.tiers = BTreeMap::from([("t".into(), tier(600.0, 4, AtLimit::Reject))]);
    }
}

fn tier(rate_per_minute: f64, burst: u32, at_limit: AtLimit) -> TierSettings {
    TierSettings {
        rate_per_minute,
        burst,
        daily_quota: 1_000,
        max_in_flight: 10,
        at_limit,
    }
}

/// A request of a user of the key's namespace, for the default model on a 256 px photo (1 unit).
fn signed_user_request(user: &str) -> RequestDocument {
    let mut doc = request(&read("tests/data/astronaut-256.png"), None);
    doc.user_id = user.to_owned();
    doc
}

fn now_ms() -> i64 {
    kiln::rate_limit::now_ms()
}

/// Publish `body` to `queue` with this producer's `reply_to`, `correlation_id` and, when given,
/// the `kiln-signature` header `signature`: exactly the message a producer would send.
async fn publish(producer: &Producer, queue: &str, body: &[u8], correlation_id: &str, signature: Option<String>) {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_reply_to(producer.sender().reply_queue().into())
        .with_correlation_id(correlation_id.into());
    if let Some(signature) = signature {
        let mut headers = FieldTable::default();
        headers.insert(HEADER.into(), AMQPValue::LongString(signature.into()));
        properties = properties.with_headers(headers);
    }
    producer
        .sender()
        .channel()
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The header `signer` makes for `body` sent by `producer` to `queue` at `at_ms`.
fn signature(
    signer: &Signer,
    producer: &Producer,
    queue: &str,
    body: &[u8],
    correlation_id: &str,
    at_ms: i64,
) -> String {
    let covered = Covered {
        queue,
        reply_to: producer.sender().reply_queue(),
        correlation_id,
        body,
    };
    signer.sign(at_ms, &covered).unwrap().value()
}

/// `kiln_unauthenticated_total{reason}` on the worker's `/metrics`.
async fn refused(app: &TestApp, reason: &str) -> f64 {
    let (_, text) = http_get(app.http_addr, "/metrics").await;
    metric_value(&text, &format!("kiln_unauthenticated_total{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

/// Units charged to `user` today.
async fn charged(app: &TestApp, user: &str) -> u64 {
    let redis = RedisLimiter::new(Arc::new(app.settings.rate_limit.clone())).unwrap();
    redis.show(user, now_ms()).await.unwrap().quota_used
}

/// Assert `reply` is a final `unauthenticated` error, without a rate limit (nothing was asked).
fn assert_unauthenticated(reply: &Reply, mentions: &str) {
    crate::contract::assert_valid_reply(&reply.document);
    assert_eq!(reply.document.status, ReplyStatus::Error);
    let error = reply.document.error.as_ref().unwrap();
    assert_eq!(error.code, ErrorCode::Unauthenticated, "{}", error.message);
    assert!(error.message.contains(mentions), "{}", error.message);
    assert!(
        reply.document.rate_limit.is_none(),
        "never charged: {:?}",
        reply.document.rate_limit
    );
}

#[tokio::test]
async fn a_signed_request_is_served_and_forged_tampered_unsigned_stale_or_foreign_ones_are_refused_uncharged() {
    let app = spawn_app_with(|s| with_auth(s, Policy::Required, true)).await;
    let queue = app.topology.requests.clone();
    let user = format!("signed-{}", uuid::Uuid::new_v4().simple());
    let mut producer = app.producer().await;
    let before = |reason| refused(&app, reason);
    let (bad_before, missing_before, stale_before, foreign_before) = (
        before("bad_signature").await,
        before("missing").await,
        before("stale").await,
        before("forbidden_user").await,
    );

    // Signed with the key: rendered and charged.
    producer.sign_with(signer());
    let ok = producer
        .request(&signed_user_request(&user), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(ok.document.status, ReplyStatus::Ok, "{:?}", ok.document.error);
    assert_eq!(charged(&app, &user).await, 1);

    // Signed with a secret the worker does not hold for that key id.
    let doc = signed_user_request(&user);
    let body = serde_json::to_vec(&doc).unwrap();
    let forger = Signer::new(KEY_ID, SecretString::from("not-the-secret-but-just-as-long-0123456789"));
    let forged = signature(&forger, &producer, &queue, &body, &doc.request_id, now_ms());
    publish(&producer, &queue, &body, &doc.request_id, Some(forged)).await;
    let reply = producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap();
    assert_unauthenticated(&reply, "does not match");
    assert_eq!(reply.document.request_id.as_deref(), Some(doc.request_id.as_str()));

    // Signed for one body, sent with another (another user, who would be charged).
    let doc = signed_user_request(&user);
    let body = serde_json::to_vec(&doc).unwrap();
    let good = signature(&signer(), &producer, &queue, &body, &doc.request_id, now_ms());
    let mut other = doc.clone();
    other.user_id = format!("signed-victim-{}", uuid::Uuid::new_v4().simple());
    publish(
        &producer,
        &queue,
        &serde_json::to_vec(&other).unwrap(),
        &doc.request_id,
        Some(good),
    )
    .await;
    assert_unauthenticated(
        &producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap(),
        "does not match",
    );
    assert_eq!(charged(&app, &other.user_id).await, 0);

    // Unsigned, under `required`.
    let doc = signed_user_request(&user);
    publish(
        &producer,
        &queue,
        &serde_json::to_vec(&doc).unwrap(),
        &doc.request_id,
        None,
    )
    .await;
    assert_unauthenticated(
        &producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap(),
        HEADER,
    );

    // Signed an hour ago.
    let doc = signed_user_request(&user);
    let body = serde_json::to_vec(&doc).unwrap();
    let old = signature(
        &signer(),
        &producer,
        &queue,
        &body,
        &doc.request_id,
        now_ms() - 3_600_000,
    );
    publish(&producer, &queue, &body, &doc.request_id, Some(old)).await;
    assert_unauthenticated(&producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap(), "old");

    // Well signed, for a user outside the key's namespace.
    let foreign = format!("acme-{}", uuid::Uuid::new_v4().simple());
    let reply = producer
        .request(&signed_user_request(&foreign), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_unauthenticated(&reply, "may not sign for user");

    // Only the first request was charged; each refusal was counted under its reason.
    assert_eq!(charged(&app, &user).await, 1);
    assert_eq!(charged(&app, &foreign).await, 0);
    assert_eq!(refused(&app, "bad_signature").await - bad_before, 2.0);
    assert_eq!(refused(&app, "missing").await - missing_before, 1.0);
    assert_eq!(refused(&app, "stale").await - stale_before, 1.0);
    assert_eq!(refused(&app, "forbidden_user").await - foreign_before, 1.0);
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn the_same_signed_message_again_is_acked_unanswered_and_not_charged_again() {
    let app = spawn_app_with(|s| with_auth(s, Policy::Required, true)).await;
    let queue = app.topology.requests.clone();
    let user = format!("signed-{}", uuid::Uuid::new_v4().simple());
    let mut producer = app.producer().await;
    let replayed_before = refused(&app, "replayed").await;

    let doc = signed_user_request(&user);
    let body = serde_json::to_vec(&doc).unwrap();
    let header = signature(&signer(), &producer, &queue, &body, &doc.request_id, now_ms());
    publish(&producer, &queue, &body, &doc.request_id, Some(header.clone())).await;
    let ok = producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(ok.document.status, ReplyStatus::Ok, "{:?}", ok.document.error);

    // Byte for byte the same message, published again (not a broker redelivery).
    publish(&producer, &queue, &body, &doc.request_id, Some(header)).await;
    poll_until("the replay counted", REPLY_TIMEOUT, async || {
        (refused(&app, "replayed").await > replayed_before).then_some(())
    })
    .await;
    assert_eq!(refused(&app, "replayed").await - replayed_before, 1.0);
    assert!(
        producer.next_reply(Duration::from_millis(1_000)).await.is_err(),
        "a replay gets no reply: the first delivery answered it"
    );
    assert_eq!(charged(&app, &user).await, 1);
    assert_eq!(crate::helpers::ready_messages(&queue).await, 0, "acked");
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn the_brokers_redelivery_of_an_accepted_message_is_not_a_replay() {
    let mut app = spawn_app_with(|s| with_auth(s, Policy::Required, false)).await;
    let settings = app.settings.clone();
    let queue = app.topology.requests.clone();
    let user = format!("signed-{}", uuid::Uuid::new_v4().simple());
    let mut producer = app.producer().await;

    let doc = signed_user_request(&user);
    let body = serde_json::to_vec(&doc).unwrap();
    let header = signature(&signer(), &producer, &queue, &body, &doc.request_id, now_ms());
    publish(&producer, &queue, &body, &doc.request_id, Some(header.clone())).await;
    let ok = producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(ok.document.status, ReplyStatus::Ok, "{:?}", ok.document.error);
    app.shutdown().await;

    // The same message in the queue once more, delivered to a consumer that died without acking
    // it (here: nacked with requeue), so the broker redelivers it, flagged `redelivered`.
    publish(&producer, &queue, &body, &doc.request_id, Some(header)).await;
    let channel = admin_channel().await;
    let taken = poll_until("the message in the queue", REPLY_TIMEOUT, async || {
        channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
    })
    .await;
    assert!(!taken.delivery.redelivered);
    taken
        .delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();

    let app = TestApp::start(settings).await;
    let replayed_before = refused(&app, "replayed").await;
    let again = producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(again.document.status, ReplyStatus::Ok, "{:?}", again.document.error);
    assert_eq!(refused(&app, "replayed").await, replayed_before);
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_deferred_signed_request_comes_back_signed_anew() {
    // A signature may be 1.5 s old, and a deferral waits 2 s: the copy must be signed anew.
    let app = spawn_app_with(|s| {
        with_auth(s, Policy::Required, true);
        s.auth.max_age_ms = 1_500;
        s.rate_limit.tiers.insert("t".into(), tier(30.0, 1, AtLimit::Defer));
    })
    .await;
    let user = format!("signed-{}", uuid::Uuid::new_v4().simple());
    let mut producer = app.producer().await;
    producer.sign_with(signer());
    let stale_before = refused(&app, "stale").await;
    let (first, second) = (signed_user_request(&user), signed_user_request(&user));
    // The first takes the burst; the second is deferred 2 s (the rate's interval).
    producer.send(&first).await.unwrap();
    producer.send(&second).await.unwrap();
    let mut deferred = false;
    let reply = producer
        .reply_to_with(&second.request_id, REPLY_TIMEOUT, |notice| {
            deferred |= notice.status == ReplyStatus::Deferred
        })
        .await
        .unwrap();
    assert!(deferred, "the second request waited in a delay queue");
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    assert_eq!(refused(&app, "stale").await, stale_before);
    assert_eq!(
        charged(&app, &user).await,
        2,
        "each admitted once; the deferral cost nothing"
    );
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn optional_serves_unsigned_requests_and_refuses_wrongly_signed_ones() {
    let app = spawn_app_with(|s| with_auth(s, Policy::Optional, false)).await;
    let queue = app.topology.requests.clone();
    let user = format!("signed-{}", uuid::Uuid::new_v4().simple());
    let mut producer = app.producer().await;
    let ok = producer
        .request(&signed_user_request(&user), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        ok.document.status,
        ReplyStatus::Ok,
        "unsigned is fine: {:?}",
        ok.document.error
    );

    let doc = signed_user_request(&user);
    let body = serde_json::to_vec(&doc).unwrap();
    let unknown = Signer::new("nobody", SecretString::from(SECRET));
    let header = signature(&unknown, &producer, &queue, &body, &doc.request_id, now_ms());
    publish(&producer, &queue, &body, &doc.request_id, Some(header)).await;
    assert_unauthenticated(
        &producer.reply_to(&doc.request_id, REPLY_TIMEOUT).await.unwrap(),
        "unknown key",
    );
    producer.close().await;
    app.stop().await;
}
