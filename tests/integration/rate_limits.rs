//! Per-user limits against the real Redis on 127.0.0.1:6379: exact counts over simulated time,
//! races between workers, leases of crashed workers, Redis outages, and the worker's reject and
//! defer paths through the real broker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln::domain::{ErrorCode, ReplyStatus, Scope};
use kiln::rate_limit::{
    AtLimit, Decision, Limiter, RateLimitSettings, RedisDown, RedisLimiter, TierSettings, UserKeys, Verdict,
};
use lapin::types::AMQPValue;
use redis::AsyncCommands;

use crate::helpers::{free_port, read, ready_messages, request, spawn_app_with, within, TcpProxy, REPLY_TIMEOUT};

/// 10:00 UTC on a fixed day, so simulated hours never cross midnight by accident.
const T0: i64 = 20_000 * 86_400_000 + 10 * 3_600_000;

fn tier(rate_per_minute: f64, burst: u32, daily_quota: u64, max_in_flight: u32, at_limit: AtLimit) -> TierSettings {
    TierSettings {
        rate_per_minute,
        burst,
        daily_quota,
        max_in_flight,
        at_limit,
    }
}

/// A tier `t` (1 unit per second, burst 5, 20 per day) and a tier `big`; keys under a fresh prefix.
fn settings() -> RateLimitSettings {
    RateLimitSettings {
        key_prefix: format!("kiln-test-{}", uuid::Uuid::new_v4().simple()),
        default_tier: "t".into(),
        tiers: BTreeMap::from([
            ("t".into(), tier(60.0, 5, 20, 100, AtLimit::Reject)),
            ("big".into(), tier(600.0, 50, 1000, 100, AtLimit::Reject)),
        ]),
        ..Default::default()
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379")
}

pub(crate) async fn forget(prefix: &str) {
    let mut c = redis().await;
    let keys: Vec<String> = c.keys(format!("{prefix}:*")).await.unwrap();
    if !keys.is_empty() {
        let () = c.del(keys).await.unwrap();
    }
}

struct Clock<'a> {
    limiter: &'a RedisLimiter,
    user: &'a str,
    n: u32,
}

impl Clock<'_> {
    async fn at(&mut self, now: i64, cost: u64) -> Verdict {
        self.n += 1;
        self.limiter
            .decide(self.user, cost, &format!("lease-{}", self.n), now)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn admits_exactly_the_burst_then_the_rate_then_stops_at_the_daily_quota() {
    let s = settings();
    let limiter = RedisLimiter::new(Arc::new(s.clone())).unwrap();
    let mut c = Clock {
        limiter: &limiter,
        user: "alice",
        n: 0,
    };

    for i in 0..5 {
        let v = c.at(T0, 1).await;
        assert!(v.admitted, "burst request {i}: {v:?}");
        assert_eq!(v.remaining, 4 - i);
    }
    let v = c.at(T0, 1).await;
    assert!(!v.admitted);
    assert_eq!(
        (v.scope, v.limit, v.remaining, v.retry_after_ms, v.reset_ms),
        (Scope::Rate, 5, 0, 1000, 5000)
    );
    assert!(
        !c.at(T0 + 999, 1).await.admitted,
        "one unit comes back only after a full second"
    );
    assert!(c.at(T0 + 1000, 1).await.admitted);
    assert!(!c.at(T0 + 1000, 1).await.admitted);

    // A minute later the bucket is full again: another burst of 5 (11 units so far).
    for _ in 0..5 {
        assert!(c.at(T0 + 60_000, 1).await.admitted);
    }
    assert!(!c.at(T0 + 60_000, 1).await.admitted);
    // Cost counts: 3 units take 3 seconds of the bucket.
    assert!(c.at(T0 + 65_000, 3).await.admitted);
    let v = c.at(T0 + 65_000, 3).await;
    assert!(!v.admitted && v.remaining == 2 && v.retry_after_ms == 1000, "{v:?}");

    // More than the burst can ever hold: refused as such, nothing charged.
    let v = c.at(T0 + 100_000, 6).await;
    assert!(!v.admitted && v.exceeds_tier && v.limit == 5, "{v:?}");

    // Daily quota: 14 spent; 5 + 1 more reach 20, then nothing until midnight UTC.
    assert!(c.at(T0 + 200_000, 5).await.admitted);
    assert!(c.at(T0 + 300_000, 1).await.admitted);
    let v = c.at(T0 + 400_000, 1).await;
    assert!(!v.admitted);
    assert_eq!((v.scope, v.limit, v.remaining), (Scope::DailyQuota, 20, 0));
    let to_midnight = (14 * 3_600_000 - 400_000) as u64;
    assert_eq!((v.retry_after_ms, v.reset_ms), (to_midnight, to_midnight));
    assert!(
        c.at(T0 + 14 * 3_600_000, 1).await.admitted,
        "a new UTC day, a new quota"
    );

    let state = limiter.show("alice", T0 + 14 * 3_600_000).await.unwrap();
    assert_eq!((state.tier.as_str(), state.quota_used, state.quota), ("t", 1, 20));
    forget(&s.key_prefix).await;
}

#[tokio::test]
async fn many_workers_racing_for_one_user_never_admit_more_than_the_burst() {
    let mut s = settings();
    s.tiers.insert("t".into(), tier(1.0, 10, 1000, 1000, AtLimit::Reject));
    let s = Arc::new(s);
    // Eight workers, each with its own connection, 32 concurrent decisions each, one instant.
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let limiter = RedisLimiter::new(Arc::clone(&s)).unwrap();
        for i in 0..32 {
            let limiter = limiter.clone();
            tasks.spawn(async move {
                limiter
                    .decide("bob", 1, &format!("w{w}-{i}"), T0)
                    .await
                    .unwrap()
                    .admitted
            });
        }
    }
    let admitted = tasks.join_all().await.into_iter().filter(|a| *a).count();
    assert_eq!(admitted, 10, "256 racing decisions, a burst of 10");
    forget(&s.key_prefix).await;
}

#[tokio::test]
async fn leases_of_a_crashed_worker_expire_and_a_redelivery_is_not_charged_twice() {
    let mut s = settings();
    s.tiers.insert("t".into(), tier(600.0, 50, 1000, 2, AtLimit::Reject));
    s.lease_ttl_ms = 5_000;
    let limiter = RedisLimiter::new(Arc::new(s.clone())).unwrap();
    assert!(limiter.decide("carol", 1, "r1", T0).await.unwrap().admitted);
    assert!(limiter.decide("carol", 1, "r2", T0).await.unwrap().admitted);
    // The worker holding r1 and r2 crashes: neither lease is released.
    let v = limiter.decide("carol", 1, "r3", T0 + 10).await.unwrap();
    assert!(!v.admitted);
    assert_eq!((v.scope, v.limit), (Scope::InFlight, 2));
    assert!(v.retry_after_ms <= 1000);

    // r1 is redelivered to another worker while its lease holds: admitted, not charged again.
    let v = limiter.decide("carol", 1, "r1", T0 + 20).await.unwrap();
    assert!(v.admitted && v.readmitted, "{v:?}");
    assert_eq!(
        (v.scope, v.limit),
        (Scope::Rate, 50),
        "it reports the rate, as any admission"
    );
    assert_eq!(limiter.show("carol", T0 + 20).await.unwrap().quota_used, 2);

    // Once the leases expire, the user is not locked out.
    assert!(limiter.decide("carol", 1, "r3", T0 + 5_021).await.unwrap().admitted);
    limiter.release("carol", "r3").await.unwrap();
    assert_eq!(limiter.show("carol", T0 + 5_022).await.unwrap().in_flight, 0);
    forget(&s.key_prefix).await;
}

/// Redis Cluster's key slot: CRC16/XMODEM of the hash tag, mod 16384.
fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(bytes) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[tokio::test]
async fn a_decision_touches_one_cluster_slot_and_every_key_expires() {
    assert_eq!(
        slot("123456789"),
        0x31C3,
        "CRC16/XMODEM check value (below 16384, so unchanged by the modulo)"
    );
    for user in ["alice", "user-42", "Zoë ☕", "a{b}c", "}{"] {
        let k = UserKeys::new("kiln", user, T0);
        let slots = [
            slot(&k.tier),
            slot(&k.gcra),
            slot(&k.quota),
            slot(&k.leases),
            slot(&UserKeys::charged("kiln", user, "r1")),
            slot(&UserKeys::outcome("kiln", user, "r1")),
        ];
        assert!(slots.iter().all(|s| *s == slots[0]), "{user}: {slots:?}");
    }

    let s = settings();
    let limiter = RedisLimiter::new(Arc::new(s.clone())).unwrap();
    limiter.set_tier("dave", "big").await.unwrap();
    let now = kiln::rate_limit::now_ms();
    assert!(limiter.decide("dave", 2, "r1", now).await.unwrap().admitted);
    let mut c = redis().await;
    let keys: Vec<String> = c.keys(format!("{}:*", s.key_prefix)).await.unwrap();
    // tier, gcra, quota, leases, and the charge remembered for r1.
    assert_eq!(keys.len(), 5, "{keys:?}");
    for key in &keys {
        let ttl: i64 = c.pttl(key).await.unwrap();
        assert!(ttl > 0, "{key} has no expiry");
    }
    forget(&s.key_prefix).await;
}

#[tokio::test]
async fn the_tier_comes_from_redis_and_an_unknown_record_falls_back_to_the_default() {
    let s = settings();
    let limiter = RedisLimiter::new(Arc::new(s.clone())).unwrap();
    assert_eq!(limiter.decide("erin", 1, "a", T0).await.unwrap().tier, "t");
    limiter.set_tier("erin", "big").await.unwrap();
    let v = limiter.decide("erin", 1, "b", T0).await.unwrap();
    assert_eq!((v.tier.as_str(), v.limit), ("big", 50));
    assert!(
        limiter.set_tier("erin", "gold").await.is_err(),
        "only configured tiers can be set"
    );

    let mut c = redis().await;
    let () = c
        .set(UserKeys::new(&s.key_prefix, "erin", T0).tier, "gold")
        .await
        .unwrap();
    let v = limiter.decide("erin", 1, "c", T0).await.unwrap();
    assert_eq!(v.tier, "t");
    assert_eq!(v.unknown_tier_record.as_deref(), Some("gold"));

    // After SCRIPT FLUSH (a restarted Redis), EVALSHA fails with NOSCRIPT and the script is reloaded.
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    assert!(limiter.decide("erin", 1, "d", T0).await.unwrap().admitted);
    forget(&s.key_prefix).await;
}

async fn decide_until(limiter: &Limiter, user: &str, want: impl Fn(&Decision) -> bool) -> Decision {
    let started = std::time::Instant::now();
    loop {
        let d = limiter.decide(user, 1, &uuid::Uuid::new_v4().to_string()).await;
        if want(&d) {
            return d;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "last decision: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_redis_down_fail_open_limits_each_worker_locally_and_recovers() {
    let port = free_port();
    let mut s = settings();
    s.tiers.insert("t".into(), tier(1.0, 2, 1000, 100, AtLimit::Reject));
    s.redis_url = format!("redis://127.0.0.1:{port}/").into();
    (s.redis_down, s.redis_timeout_ms, s.redis_retry_ms) = (RedisDown::FailOpen, 200, 200);
    let limiter = Limiter::new(s.clone()).unwrap();

    // Nothing listens on the port: the local limiter answers, with the same rules.
    assert!(matches!(
        limiter.decide("frank", 1, "a").await,
        Decision::Admitted { .. }
    ));
    assert!(!limiter.redis_healthy());
    assert!(matches!(
        limiter.decide("frank", 1, "b").await,
        Decision::Admitted { .. }
    ));
    let d = limiter.decide("frank", 1, "c").await;
    assert!(
        matches!(d, Decision::Limited { ref info, .. } if info.scope == Scope::Rate),
        "{d:?}"
    );

    // Redis comes back: the limiter notices by itself, with no decision asked of it (its health,
    // and so the fallback gauge and /readyz, follow Redis), and decisions are fleet-wide again.
    let _proxy = TcpProxy::start(port, 6379).await;
    let back = std::time::Instant::now();
    while !limiter.redis_healthy() {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "Redis back, the limiter never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    decide_until(&limiter, "grace", |_| limiter.redis_healthy()).await;
    let mut c = redis().await;
    let tat: Option<String> = c.get(UserKeys::new(&s.key_prefix, "grace", 0).gcra).await.unwrap();
    assert!(tat.is_some(), "the decision was recorded in Redis");
    forget(&s.key_prefix).await;
}

#[tokio::test]
async fn with_redis_down_fail_closed_defers_everyone_until_it_returns() {
    let port = free_port();
    let mut s = settings();
    s.redis_url = format!("redis://127.0.0.1:{port}/").into();
    (s.redis_down, s.redis_timeout_ms, s.redis_retry_ms) = (RedisDown::FailClosed, 200, 200);
    let limiter = Limiter::new(s.clone()).unwrap();
    assert!(matches!(
        limiter.decide("hank", 1, "a").await,
        Decision::Unavailable { retry_after_ms: 1000 }
    ));
    let _proxy = TcpProxy::start(port, 6379).await;
    decide_until(&limiter, "hank", |d| matches!(d, Decision::Admitted { .. })).await;
    assert!(limiter.redis_healthy());
    forget(&s.key_prefix).await;
}

fn header_i64(headers: &lapin::types::FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

#[tokio::test]
async fn a_deferred_request_round_trips_through_the_broker_and_is_served() {
    let app = spawn_app_with(|s| {
        s.rate_limit = settings();
        s.rate_limit
            .tiers
            .insert("t".into(), tier(60.0, 1, 1000, 10, AtLimit::Defer));
    })
    .await;
    let mut producer = app.producer().await;
    let photo = read("tests/data/astronaut-256.png");
    let first = request(&photo, None);
    let second = request(&photo, None);
    producer.send(&first).await.unwrap();
    producer.send(&second).await.unwrap();

    let started = std::time::Instant::now();
    let (mut notice, mut finals) = (None, Vec::new());
    within("two final replies", REPLY_TIMEOUT * 2, async {
        while finals.len() < 2 {
            let reply = producer.next_reply(REPLY_TIMEOUT).await.unwrap();
            match reply.document.status {
                ReplyStatus::Deferred => notice = Some((reply.document.clone(), started.elapsed())),
                _ => finals.push((reply.document.clone(), started.elapsed())),
            }
        }
    })
    .await;
    let (notice, _) = notice.expect("the producer is told the request was deferred");
    crate::contract::assert_valid_reply(&notice);
    finals
        .iter()
        .for_each(|(doc, _)| crate::contract::assert_valid_reply(doc));
    assert_eq!(notice.request_id.as_deref(), Some(second.request_id.as_str()));
    let deferral = notice.deferred.unwrap();
    assert_eq!(
        (deferral.reason.as_str(), deferral.retry_after_ms, deferral.count),
        ("rate", 1000, 1)
    );
    assert!(finals.iter().all(|(d, _)| d.status == ReplyStatus::Ok));
    let (second_reply, at) = finals
        .iter()
        .find(|(d, _)| d.request_id.as_deref() == Some(&second.request_id))
        .unwrap();
    assert!(
        *at >= Duration::from_millis(1000),
        "served only after its delay, at {at:?}"
    );
    assert_eq!(second_reply.rate_limit.as_ref().unwrap().tier, "t");

    for (_, queue) in &app.topology.delay_queues {
        assert_eq!(ready_messages(queue).await, 0);
    }
    producer.close().await;
    forget(&app.settings.rate_limit.key_prefix).await;
    app.stop().await;
}

#[tokio::test]
async fn a_reject_tier_gets_rate_limited_with_limit_remaining_reset_and_retry_after() {
    let app = spawn_app_with(|s| {
        s.rate_limit = settings();
        s.rate_limit
            .tiers
            .insert("t".into(), tier(6.0, 1, 1000, 10, AtLimit::Reject));
    })
    .await;
    let mut producer = app.producer().await;
    let photo = read("tests/data/astronaut-256.png");
    let ok = producer.request(&request(&photo, None), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(ok.document.status, ReplyStatus::Ok);
    assert_eq!(header_i64(&ok.headers, "x-ratelimit-remaining"), Some(0));

    let limited = producer.request(&request(&photo, None), REPLY_TIMEOUT).await.unwrap();
    crate::contract::assert_valid_reply(&ok.document);
    crate::contract::assert_valid_reply(&limited.document);
    let error = limited.document.error.as_ref().unwrap();
    assert_eq!(error.code, ErrorCode::RateLimited, "{}", error.message);
    let info = limited.document.rate_limit.unwrap();
    assert_eq!((info.scope, info.limit, info.remaining), (Scope::Rate, 1, 0));
    assert!(info.retry_after_ms > 9_000 && info.retry_after_ms <= 10_000, "{info:?}");
    assert_eq!(header_i64(&limited.headers, "x-ratelimit-limit"), Some(1));
    assert_eq!(header_i64(&limited.headers, "retry-after"), Some(10));

    // A request that could never fit the tier's burst is refused as such, not deferred forever.
    let mut huge = request(&photo, None);
    huge.params.size = Some(2048);
    let refused = producer.request(&huge, REPLY_TIMEOUT).await.unwrap();
    let error = refused.document.error.unwrap();
    assert_eq!(error.code, ErrorCode::InvalidParams);
    assert!(
        error.message.contains("costs 16 units") && error.message.contains("could never run"),
        "{}",
        error.message
    );
    producer.close().await;
    forget(&app.settings.rate_limit.key_prefix).await;
    app.stop().await;
}

#[tokio::test]
async fn the_admin_command_shows_sets_and_resets_a_user() {
    let s = settings();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("limits")
            .args(args)
            .env("KILN_RATE_LIMIT__KEY_PREFIX", &s.key_prefix)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let shown = run(&["show", "ivy"]);
    assert_eq!(
        (shown["tier"].as_str(), shown["tier_record"].is_null()),
        (Some("free"), true)
    );
    let set = run(&["set-tier", "ivy", "pro"]);
    assert_eq!(set["tier"], "pro");

    let limiter = RedisLimiter::new(Arc::new(RateLimitSettings {
        key_prefix: s.key_prefix.clone(),
        ..Default::default()
    }))
    .unwrap();
    assert!(
        limiter
            .decide("ivy", 3, "r", kiln::rate_limit::now_ms())
            .await
            .unwrap()
            .admitted
    );
    let shown = run(&["show", "ivy"]);
    assert_eq!(
        (
            shown["quota_used"].as_u64(),
            shown["in_flight"].as_u64(),
            shown["rate_remaining"].as_u64()
        ),
        (Some(3), Some(1), Some(61))
    );
    let reset = run(&["reset", "ivy"]);
    assert_eq!(
        (
            reset["quota_used"].as_u64(),
            reset["in_flight"].as_u64(),
            reset["tier"].as_str()
        ),
        (Some(0), Some(0), Some("pro"))
    );
    forget(&s.key_prefix).await;
}

#[tokio::test]
async fn fail_closed_at_the_worker_defers_while_redis_is_down_and_serves_when_it_returns() {
    let port = free_port();
    let app = spawn_app_with(|s| {
        s.rate_limit = settings();
        s.rate_limit.redis_url = format!("redis://127.0.0.1:{port}/").into();
        (
            s.rate_limit.redis_down,
            s.rate_limit.redis_timeout_ms,
            s.rate_limit.redis_retry_ms,
        ) = (RedisDown::FailClosed, 200, 200);
    })
    .await;
    let mut producer = app.producer().await;
    let req = request(&read("tests/data/astronaut-256.png"), None);
    producer.send(&req).await.unwrap();
    let notice = producer.next_reply(REPLY_TIMEOUT).await.unwrap().document;
    assert_eq!(notice.status, ReplyStatus::Deferred);
    crate::contract::assert_valid_reply(&notice);
    assert_eq!(notice.deferred.unwrap().reason, "limiter_unavailable");

    let _proxy = TcpProxy::start(port, 6379).await;
    let reply = producer.reply_to(&req.request_id, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(
        reply.document.status,
        ReplyStatus::Ok,
        "served once Redis answered, not lost"
    );
    producer.close().await;
    forget(&app.settings.rate_limit.key_prefix).await;
    app.stop().await;
}

#[test]
fn an_unknown_tier_in_the_configuration_is_a_startup_error() {
    let mut s = crate::helpers::test_settings();
    s.rate_limit.default_tier = "gold".into();
    let error = kiln::startup::Application::build(s).err().expect("refused").to_string();
    assert!(error.contains("rate_limit"), "{error}");

    // From the environment: a tier given there must be complete (tiers are data, never half-merged).
    let env = std::collections::HashMap::from([("KILN_RATE_LIMIT__TIERS__GOLD__BURST".to_owned(), "5".to_owned())]);
    let error = kiln::configuration::Settings::load_from(None, Some(env)).unwrap_err();
    assert!(
        format!("{error:#}").contains("missing configuration field \"rate_limit.tiers.gold.rate_per_minute\""),
        "{error:#}"
    );
}
