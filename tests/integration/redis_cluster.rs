//! The limiter on a real Redis Cluster on loopback (`scripts/redis-cluster.sh`: 3 masters, 3
//! replicas): exact counts for users on every master, a slot moved to another master under load
//! (MOVED and ASK), and a master killed under load (its replica takes over; the outage policy
//! decides meanwhile).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::rate_limit::{
    AtLimit, Decision, Limiter, RateLimitSettings, RedisDown, RedisLimiter, RedisMode, Scope, TierSettings,
};

use crate::helpers::repo;

/// A Redis Cluster, stopped and removed when dropped.
pub(crate) struct RedisCluster {
    dir: std::path::PathBuf,
    /// The six nodes' URLs, comma-separated (what `rate_limit.redis_url` takes).
    pub urls: String,
}

/// One node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// Whether it is reachable (not flagged `fail`).
    pub up: bool,
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-redis-cluster-{}", uuid::Uuid::new_v4().simple()));
        let output = Command::new(repo().join("scripts/redis-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("the cluster script runs");
        assert!(
            output.status.success(),
            "the Redis Cluster did not start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let urls = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        Self { dir, urls }
    }

    /// A command on the node at `port`, directly (no redirection).
    pub async fn on(&self, port: u16, cmd: &redis::Cmd) -> redis::Value {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
        let mut c = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        cmd.query_async(&mut c).await.unwrap()
    }

    /// The nodes, as the node at `port` sees them.
    pub async fn nodes(&self, port: u16) -> Vec<Node> {
        let text: String = redis::from_redis_value(self.on(port, redis::cmd("CLUSTER").arg("NODES")).await).unwrap();
        text.lines()
            .map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                let port = f[1]
                    .split('@')
                    .next()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                Node {
                    id: f[0].to_owned(),
                    port,
                    master: f[2].contains("master"),
                    up: !f[2].contains("fail") && f[7] == "connected",
                }
            })
            .collect()
    }

    /// The slot of `key`.
    pub async fn slot(&self, key: &str) -> u16 {
        redis::from_redis_value(self.on(7101, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await).unwrap()
    }

    /// The port of the master that serves `slot`, as the node at `port` sees it.
    pub async fn owner(&self, port: u16, slot: u16) -> u16 {
        let shards: Vec<Vec<redis::Value>> =
            redis::from_redis_value(self.on(port, redis::cmd("CLUSTER").arg("SLOTS")).await).unwrap();
        for shard in shards {
            let from: u16 = redis::from_redis_value(shard[0].clone()).unwrap();
            let to: u16 = redis::from_redis_value(shard[1].clone()).unwrap();
            if (from..=to).contains(&slot) {
                let master: Vec<redis::Value> = redis::from_redis_value(shard[2].clone()).unwrap();
                return redis::from_redis_value(master[1].clone()).unwrap();
            }
        }
        panic!("no node serves slot {slot}");
    }

    /// Kill a node (SIGKILL: a crash, no handover).
    pub fn kill(&self, port: u16) {
        let status = Command::new(repo().join("scripts/redis-cluster.sh"))
            .arg("kill-node")
            .arg(&self.dir)
            .arg(port.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Move `slot`, keys and all, from the master at `from` to the master at `to`, the way
    /// `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE the keys, SETSLOT NODE.
    pub async fn move_slot(&self, slot: u16, from: u16, to: u16) {
        let nodes = self.nodes(from).await;
        let id = |port: u16| nodes.iter().find(|n| n.port == port).unwrap().id.clone();
        let setslot = |state: &str, node: String| {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SETSLOT").arg(slot).arg(state).arg(node);
            c
        };
        self.on(to, &setslot("IMPORTING", id(from))).await;
        self.on(from, &setslot("MIGRATING", id(to))).await;
        loop {
            let keys: Vec<String> = redis::from_redis_value(
                self.on(from, redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(100))
                    .await,
            )
            .unwrap();
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys);
            self.on(from, &migrate).await;
        }
        for node in nodes.iter().filter(|n| n.master) {
            self.on(node.port, &setslot("NODE", id(to))).await;
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/redis-cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// Cluster mode on `cluster`; tier `t`: burst `burst`, 1 unit a minute (so no refill within a
/// test), a large daily quota.
fn settings(cluster: &RedisCluster, burst: u32, redis_down: RedisDown) -> RateLimitSettings {
    RateLimitSettings {
        redis_mode: RedisMode::Cluster,
        redis_url: cluster.urls.clone().into(),
        key_prefix: format!("kiln-test-{}", uuid::Uuid::new_v4().simple()),
        default_tier: "t".into(),
        redis_down,
        redis_retry_ms: 100,
        tiers: BTreeMap::from([(
            "t".into(),
            TierSettings {
                rate_per_minute: 1.0,
                burst,
                daily_quota: 100_000,
                max_in_flight: 100_000,
                at_limit: AtLimit::Reject,
            },
        )]),
        ..Default::default()
    }
}

/// What [`spend_until_refused`] saw.
#[derive(Debug, Default)]
struct Spent {
    admitted: u32,
    unavailable: u32,
    first_admitted: Option<Instant>,
}

/// Ask for one unit until refused by the rate limit (an outage's `Unavailable` is asked again).
async fn spend_until_refused(limiter: &Limiter, user: &str) -> Spent {
    let mut spent = Spent::default();
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "{user}: never refused");
        match limiter.decide(user, 1, &uuid::Uuid::new_v4().to_string()).await {
            Decision::Admitted { .. } => {
                spent.admitted += 1;
                spent.first_admitted.get_or_insert_with(Instant::now);
            }
            Decision::Limited { info, .. } => {
                assert_eq!(info.scope, Scope::Rate);
                return spent;
            }
            Decision::Unavailable { .. } => {
                spent.unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{user}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn redis_cluster_limits_are_exact_for_users_on_every_master_and_the_cli_reads_them() {
    let cluster = RedisCluster::start();
    // Seeds: one node is enough, the rest are discovered.
    let mut s = settings(&cluster, 7, RedisDown::FailClosed);
    s.redis_url = "redis://127.0.0.1:7102/".to_owned().into();
    let limiter = Arc::new(RedisLimiter::new(Arc::new(s.clone())).unwrap());
    let now = kiln::rate_limit::now_ms();

    // 48 users, each with 7 units of burst, 12 concurrent asks each at one instant (as in the
    // single-node race test): exactly 7 admitted each.
    let users: Vec<String> = (0..48).map(|i| format!("cluster-user-{i}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for user in &users {
        for _ in 0..12 {
            let (limiter, user) = (Arc::clone(&limiter), user.clone());
            tasks.spawn(async move {
                let d = limiter.decide(&user, 1, &uuid::Uuid::new_v4().to_string(), now).await;
                (user, d)
            });
        }
    }
    let mut admitted: BTreeMap<String, u32> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (user, verdict) = r.unwrap();
        let verdict = verdict.unwrap_or_else(|e| panic!("{user}: {e}"));
        if verdict.admitted {
            *admitted.entry(user).or_default() += 1;
        } else {
            assert_eq!(verdict.scope, Scope::Rate);
        }
    }
    for user in &users {
        assert_eq!(admitted.get(user), Some(&7), "{user}");
    }

    // The users are spread over all three masters, and each one's keys are on the master that owns
    // its slot.
    let mut masters = BTreeSet::new();
    for user in &users {
        let key = kiln::rate_limit::UserKeys::new(&s.key_prefix, user, now).gcra;
        let owner = cluster.owner(7101, cluster.slot(&key).await).await;
        let exists: bool = redis::from_redis_value(cluster.on(owner, redis::cmd("EXISTS").arg(&key)).await).unwrap();
        assert!(exists, "{key} is not on its slot's master {owner}");
        masters.insert(owner);
    }
    assert_eq!(masters.len(), 3, "users on {masters:?}");

    // `kiln limits` in cluster mode, with the nodes as one comma-separated setting.
    let kiln = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_RATE_LIMIT__REDIS_MODE", "cluster")
            .env("KILN_RATE_LIMIT__REDIS_URL", &cluster.urls)
            .env("KILN_RATE_LIMIT__KEY_PREFIX", &s.key_prefix)
            .env("KILN_RATE_LIMIT__DEFAULT_TIER", "free")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let shown = kiln(&["limits", "show", "cluster-user-3"]);
    assert_eq!(shown["in_flight"], 7, "{shown}");
    let set = kiln(&["limits", "set-tier", "cluster-user-3", "pro"]);
    assert_eq!(set["tier"], "pro", "{set}");
    let reset = kiln(&["limits", "reset", "cluster-user-3"]);
    assert_eq!(reset["in_flight"], 0, "{reset}");
    assert_eq!(reset["tier_record"], "pro", "{reset}");
}

#[tokio::test]
async fn redis_cluster_a_slot_moved_to_another_master_under_load_keeps_counts_exact() {
    let cluster = RedisCluster::start();
    let s = settings(&cluster, 40, RedisDown::FailClosed);
    let limiter = Arc::new(RedisLimiter::new(Arc::new(s.clone())).unwrap());
    let now = kiln::rate_limit::now_ms();
    let user = "moving-user";
    let key = kiln::rate_limit::UserKeys::new(&s.key_prefix, user, now).gcra;
    let slot = cluster.slot(&key).await;
    let from = cluster.owner(7101, slot).await;

    // Spend 10 units, so the user's state exists on `from`.
    for i in 0..10 {
        assert!(
            limiter
                .decide(user, 1, &format!("first-{i}"), now)
                .await
                .unwrap()
                .admitted
        );
    }
    // While 4 tasks keep asking (at one instant, so the clock plays no part), the slot moves to
    // another master: the client, which knows the old map, is answered ASK during the move and
    // MOVED after it. An error is counted and asked again.
    // Each task asks every 10 ms, so the 30 units left last about 75 ms and the move comes in the
    // middle.
    let moved = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let after_move = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let spender = {
        let limiter = Arc::clone(&limiter);
        let (moved, after_move) = (Arc::clone(&moved), Arc::clone(&after_move));
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..4 {
                let limiter = Arc::clone(&limiter);
                let (moved, after_move) = (Arc::clone(&moved), Arc::clone(&after_move));
                tasks.spawn(async move {
                    let (mut admitted, mut errors) = (0, 0);
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let was_moved = moved.load(std::sync::atomic::Ordering::SeqCst);
                        match limiter.decide(user, 1, &uuid::Uuid::new_v4().to_string(), now).await {
                            Ok(v) if v.admitted => {
                                admitted += 1;
                                if was_moved {
                                    after_move.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            Ok(v) => {
                                assert_eq!(v.scope, Scope::Rate);
                                return (admitted, errors);
                            }
                            Err(_) => errors += 1,
                        }
                    }
                });
            }
            let mut total = (0, 0);
            while let Some(r) = tasks.join_next().await {
                let (a, e) = r.unwrap();
                total = (total.0 + a, total.1 + e);
            }
            total
        })
    };
    let masters: Vec<u16> = cluster
        .nodes(7101)
        .await
        .into_iter()
        .filter(|n| n.master)
        .map(|n| n.port)
        .collect();
    let to = *masters.iter().find(|&&p| p != from).unwrap();
    tokio::time::sleep(Duration::from_millis(25)).await;
    cluster.move_slot(slot, from, to).await;
    moved.store(true, std::sync::atomic::Ordering::SeqCst);
    let (admitted, errors) = spender.await.unwrap();
    let after_move = after_move.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        after_move > 0 && after_move < admitted,
        "{after_move} of {admitted} admitted after the move"
    );
    assert_eq!(cluster.owner(7101, slot).await, to);
    assert_eq!(10 + admitted, 40, "admitted after the first 10 ({errors} errors)");
    // The state is on the new master, and a fresh decision is refused there.
    let exists: bool = redis::from_redis_value(cluster.on(to, redis::cmd("EXISTS").arg(&key)).await).unwrap();
    assert!(exists);
    assert!(!limiter.decide(user, 1, "one-more", now).await.unwrap().admitted);
    println!(
        "slot {slot} moved {from} -> {to} under load: 40 of 40 admitted exactly ({after_move} through the new \
         master), {errors} errors asked again"
    );
}

#[tokio::test]
async fn redis_cluster_a_master_killed_under_load_fails_over_and_limits_hold() {
    let cluster = RedisCluster::start();
    // Two workers' limiters, one per outage policy, on the same cluster.
    let closed_settings = settings(&cluster, 30, RedisDown::FailClosed);
    let open_settings = RateLimitSettings {
        redis_down: RedisDown::FailOpen,
        ..closed_settings.clone()
    };
    let closed = Arc::new(Limiter::new(closed_settings.clone()).unwrap());
    let open = Arc::new(Limiter::new(open_settings).unwrap());
    let user = "doomed-master-user";
    let key = kiln::rate_limit::UserKeys::new(&closed_settings.key_prefix, user, kiln::rate_limit::now_ms()).gcra;
    let slot = cluster.slot(&key).await;
    let master = cluster.owner(7101, slot).await;

    // A second user whose slot is on the same master, for the fail_open limiter.
    let mut other = String::new();
    for i in 0.. {
        other = format!("neighbour-{i}");
        let k = kiln::rate_limit::UserKeys::new(&closed_settings.key_prefix, &other, kiln::rate_limit::now_ms()).gcra;
        if cluster.owner(7101, cluster.slot(&k).await).await == master {
            break;
        }
    }

    // 10 units spent and replicated (WAIT: the replica has them), then the master is killed.
    for _ in 0..10 {
        assert!(matches!(
            closed.decide(user, 1, &uuid::Uuid::new_v4().to_string()).await,
            Decision::Admitted { .. }
        ));
    }
    let acked: i64 = redis::from_redis_value(cluster.on(master, redis::cmd("WAIT").arg(1).arg(2000)).await).unwrap();
    assert_eq!(acked, 1, "the replica did not acknowledge the writes");
    let killed = Instant::now();
    cluster.kill(master);

    // fail_open, during the outage: this worker limits on its own (reported, not silent).
    let during = open.decide(&other, 1, "open-during").await;
    assert!(matches!(during, Decision::Admitted { .. }), "{during:?}");
    assert!(
        !open.redis_healthy(),
        "fail_open decided without noticing the dead master"
    );

    // fail_closed: no admission until the replica answers for the slot; then exactly the 20 left.
    let spent = spend_until_refused(&closed, user).await;
    assert_eq!(
        spent.admitted, 20,
        "fail_closed admitted {spent:?} after the kill (10 before, burst 30)"
    );
    assert!(spent.unavailable > 0, "the outage went unnoticed");
    let recovered = spent.first_admitted.unwrap() - killed;
    // Asked of a node that is alive.
    let alive = if master == 7101 { 7102 } else { 7101 };
    let promoted = cluster.owner(alive, slot).await;
    assert_ne!(promoted, master);
    let dead = cluster
        .nodes(promoted)
        .await
        .into_iter()
        .find(|n| n.port == master)
        .unwrap();
    assert!(!dead.up, "{dead:?}");

    // The fail_open limiter is back on Redis too, where `user` has no units left.
    let until = Instant::now() + Duration::from_secs(10);
    let mut answer = open.decide(user, 1, "open-after").await;
    while !open.redis_healthy() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(150)).await;
        answer = open.decide(user, 1, &uuid::Uuid::new_v4().to_string()).await;
    }
    assert!(open.redis_healthy());
    assert!(matches!(answer, Decision::Limited { .. }), "{answer:?}");
    println!(
        "master {master} killed; replica {promoted} serves the slot; first admission through it {:.2} s after the \
         kill; {} Unavailable answers meanwhile (fail_closed); 30 of 30 admitted in all",
        recovered.as_secs_f64(),
        spent.unavailable
    );
}

#[tokio::test]
async fn redis_cluster_a_worker_started_before_its_cluster_applies_the_policy_then_uses_the_cluster() {
    // Nothing listens on the cluster's ports yet.
    let urls = "redis://127.0.0.1:7101/,redis://127.0.0.1:7102/,redis://127.0.0.1:7103/";
    let s = RateLimitSettings {
        redis_mode: RedisMode::Cluster,
        redis_url: urls.to_owned().into(),
        redis_down: RedisDown::FailClosed,
        redis_retry_ms: 100,
        key_prefix: format!("kiln-test-{}", uuid::Uuid::new_v4().simple()),
        ..Default::default()
    };
    let limiter = Limiter::new(s).expect("a cluster that is not there yet is not a startup error");
    let before = limiter.decide("early-user", 1, "early-1").await;
    assert!(matches!(before, Decision::Unavailable { .. }), "{before:?}");
    assert!(!limiter.redis_healthy());

    let _cluster = RedisCluster::start();
    let until = Instant::now() + Duration::from_secs(20);
    let mut answer = before;
    while !matches!(answer, Decision::Admitted { .. }) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(150)).await;
        answer = limiter.decide("early-user", 1, &uuid::Uuid::new_v4().to_string()).await;
    }
    assert!(matches!(answer, Decision::Admitted { .. }), "{answer:?}");
    assert!(limiter.redis_healthy());
}
