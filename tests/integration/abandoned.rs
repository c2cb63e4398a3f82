//! Requests whose producer gave up: its reply queue is gone, so nobody can receive an answer. The
//! worker sees it on arrival and dead-letters the request unserved: no device run, no charge, no
//! more trips through the delay queues.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln::domain::{ReplyStatus, WireStyle};
use kiln::rate_limit::{AtLimit, RateLimitSettings, TierSettings};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use redis::AsyncCommands;

use crate::helpers::{
    admin_channel, exclusive_queue, passive, poll_until, read, ready_messages, request, spawn_app_with, AMQP_URL,
    REPLY_TIMEOUT,
};

fn limits(prefix: String, at_limit: AtLimit) -> RateLimitSettings {
    RateLimitSettings {
        key_prefix: prefix,
        default_tier: "t".into(),
        tiers: BTreeMap::from([(
            "t".into(),
            TierSettings {
                rate_per_minute: 60.0,
                burst: 1,
                daily_quota: 1000,
                max_in_flight: 10,
                at_limit,
            },
        )]),
        ..Default::default()
    }
}

/// The user's keys in Redis: what the limiter charged.
async fn charged_keys(prefix: &str, user: &str) -> Vec<String> {
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis.keys(format!("{prefix}:{{u:{user}}}:*")).await.unwrap()
}

/// A server-named reply queue whose connection is closed again: it is gone.
async fn a_gone_reply_queue() -> String {
    let connection = lapin::Connection::connect(AMQP_URL, Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = exclusive_queue(&channel).await;
    // An exclusive queue goes with the connection that declared it.
    connection.close(200, "the producer gives up".into()).await.unwrap();
    drop(channel);
    poll_until("the reply queue to be deleted", REPLY_TIMEOUT, async || {
        let probe = admin_channel().await;
        probe
            .queue_declare(queue.as_str().into(), passive(), Default::default())
            .await
            .is_err()
            .then_some(())
    })
    .await;
    queue
}

#[tokio::test]
async fn a_request_whose_reply_queue_is_gone_is_dead_lettered_unserved_and_uncharged() {
    let app = spawn_app_with(|s| {
        s.rate_limit = limits(s.rate_limit.key_prefix.clone(), AtLimit::Reject);
        s.rate_limit.enabled = true;
    })
    .await;
    let gone = a_gone_reply_queue().await;
    let mut doc = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(2)));
    doc.user_id = format!("gone-{}", uuid::Uuid::new_v4().simple());
    admin_channel()
        .await
        .basic_publish(
            "".into(),
            app.topology.requests.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&doc).unwrap(),
            BasicProperties::default().with_reply_to(gone.as_str().into()),
        )
        .await
        .unwrap();
    poll_until("the request in the dead-letter queue", REPLY_TIMEOUT, async || {
        (ready_messages(&app.topology.dead_letter_queue).await == 1).then_some(())
    })
    .await;
    assert_eq!(ready_messages(&app.topology.requests).await, 0);
    assert!(
        charged_keys(&app.settings.rate_limit.key_prefix, &doc.user_id)
            .await
            .is_empty(),
        "the limiter was never asked: nothing charged"
    );
    // The same request with a live reply queue is served (the check does not refuse live queues).
    let mut producer = app.producer().await;
    let reply = producer.request(&doc, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    producer.close().await;
    crate::rate_limits::forget(&app.settings.rate_limit.key_prefix).await;
    app.stop().await;
}

#[tokio::test]
async fn a_deferred_request_whose_producer_left_stops_at_its_return() {
    let app = spawn_app_with(|s| {
        s.rate_limit = limits(s.rate_limit.key_prefix.clone(), AtLimit::Defer);
        s.rate_limit.enabled = true;
    })
    .await;
    let photo = read("tests/data/astronaut-256.png");
    let user = format!("leaver-{}", uuid::Uuid::new_v4().simple());
    let mut producer = app.producer().await;
    let mut first = request(&photo, Some(WireStyle::Index(2)));
    first.user_id = user.clone();
    let reply = producer.request(&first, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    // Over the burst: deferred for about a second; the producer leaves meanwhile.
    let mut second = request(&photo, Some(WireStyle::Index(3)));
    second.user_id = user.clone();
    producer.send(&second).await.unwrap();
    let notice = producer.next_reply(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(notice.document.status, ReplyStatus::Deferred);
    producer.close().await;
    // When it comes back from the delay queue, nobody waits: dead-lettered, not deferred again.
    poll_until("the request in the dead-letter queue", REPLY_TIMEOUT, async || {
        (ready_messages(&app.topology.dead_letter_queue).await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ready_messages(&app.topology.dead_letter_queue).await,
        1,
        "once, and no more"
    );
    // Only the first request was charged: the second was never rendered (served, it would have
    // been admitted on its return, a second later, and charged before its reply bounced).
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let quota = kiln::rate_limit::UserKeys::new(&app.settings.rate_limit.key_prefix, &user, now_ms).quota;
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let spent: Option<u64> = redis.get(&quota).await.unwrap();
    assert_eq!(spent, Some(1));
    crate::rate_limits::forget(&app.settings.rate_limit.key_prefix).await;
    app.stop().await;
}
