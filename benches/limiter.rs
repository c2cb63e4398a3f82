//! kiln's rate limiter against the ceiling of the same Redis (run with `scripts/bench-limiter.sh`).
//!
//! In one run, alternating: kiln's `Limiter::decide` (the worker's path: timeout, health check,
//! EVALSHA of `decide.lua` over one multiplexed connection) from C concurrent tasks, and
//! `redis-benchmark` with C connections running the same script with the same keys and arguments
//! (its ceiling), plus `PING` (the round-trip floor). Reports decisions/s and p50/p99 latency.
//!
//! With `--cluster <node URLs>` (what `scripts/bench-limiter.sh --cluster` passes after starting
//! `scripts/redis-cluster.sh`), also, in the same rounds: the limiter on that Redis Cluster vs on the
//! single Redis, both spreading decisions over 64 users (so the cluster's users are on all its
//! masters).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::rate_limit::{AtLimit, Decision, Limiter, RateLimitSettings, RedisMode, TierSettings, UserKeys};

struct Args {
    concurrency: usize,
    seconds: f64,
    rounds: usize,
    cluster: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        concurrency: 16,
        seconds: 5.0,
        rounds: 3,
        cluster: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).filter(|s| s != "--bench").collect();
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--concurrency", Some(v)) => a.concurrency = v.parse().unwrap(),
            ("--seconds", Some(v)) => a.seconds = v.parse().unwrap(),
            ("--rounds", Some(v)) => a.rounds = v.parse().unwrap(),
            ("--cluster", Some(v)) => a.cluster = Some(v.clone()),
            _ => panic!("usage: limiter [--concurrency C] [--seconds S] [--rounds R] [--cluster URLS]"),
        }
    }
    a
}

/// One tier so large that every decision is admitted: the full write path, every time.
fn settings() -> RateLimitSettings {
    RateLimitSettings {
        key_prefix: format!("kiln-bench-{}", uuid::Uuid::new_v4().simple()),
        default_tier: "bench".into(),
        lease_ttl_ms: 1_000,
        tiers: BTreeMap::from([(
            "bench".into(),
            TierSettings {
                rate_per_minute: 6_000_000.0,
                burst: 1_000_000,
                daily_quota: 1_000_000_000,
                max_in_flight: 100_000,
                at_limit: AtLimit::Reject,
            },
        )]),
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// `concurrency` tasks deciding as fast as they can for `seconds`, for one user or, with `users`
/// above 1, in turn for that many.
async fn kiln(limiter: Arc<Limiter>, concurrency: usize, seconds: f64, users: usize) -> Sample {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let limiter = Arc::clone(&limiter);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < until {
                let lease = format!("t{t}-{i}");
                let t0 = Instant::now();
                let user = if users > 1 {
                    format!("bench-user-{}", (i as usize * concurrency + t) % users)
                } else {
                    "bench-user".to_owned()
                };
                let decision = limiter.decide(&user, 1, &lease).await;
                latencies.push(t0.elapsed());
                assert!(matches!(decision, Decision::Admitted { .. }), "{decision:?}");
                assert!(limiter.redis_healthy(), "Redis must answer every decision");
                i += 1;
            }
            latencies
        });
    }
    let mut all: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Sample {
        per_second: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
    }
}

/// `redis-benchmark` with `concurrency` connections, `requests` requests of `command`.
fn redis_benchmark(concurrency: usize, requests: u64, command: &[String]) -> Sample {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", "6379", "--csv", "-r", "1000000000"])
        .args(["-c", &concurrency.to_string(), "-n", &requests.to_string()])
        .args(command)
        .output()
        .expect("redis-benchmark (Debian package redis-tools)");
    let text = String::from_utf8_lossy(&output.stdout);
    let row = text.lines().last().expect("a CSV row");
    let cols: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|c| c.trim_matches('"').parse().unwrap())
        .collect();
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    Sample {
        per_second: cols[0],
        p50_ms: cols[3],
        p99_ms: cols[5],
    }
}

fn mean(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    samples.iter().map(f).sum::<f64>() / samples.len() as f64
}

fn main() {
    let args = args();
    let settings = settings();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let limiter = Arc::new(rt.block_on(async { Limiter::new(settings.clone()) }).unwrap());

    // The exact EVALSHA the limiter sends, for redis-benchmark (lease ids randomised per call).
    let script = redis::Script::new(include_str!("../src/rate_limit/decide.lua"));
    let mut connection = redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_connection()
        .unwrap();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(include_str!("../src/rate_limit/decide.lua"))
        .query(&mut connection)
        .unwrap();
    assert_eq!(sha, script.get_hash());
    let now = kiln::rate_limit::now_ms();
    let keys = UserKeys::new(&settings.key_prefix, "rb-user", now);
    let tier = &settings.tiers["bench"];
    let mut evalsha: Vec<String> = vec![
        "EVALSHA".into(),
        sha,
        "5".into(),
        keys.tier,
        keys.gcra,
        keys.quota,
        keys.leases,
        UserKeys::charged(&settings.key_prefix, "rb-user", "lease:__rand_int__"),
    ];
    evalsha.extend([
        now.to_string(),
        "1".into(),
        "lease:__rand_int__".into(),
        settings.lease_ttl_ms.to_string(),
        kiln::rate_limit::redis::ms_to_day_end(now).to_string(),
        "bench".into(),
        (settings.request_record_ttl_secs * 1000).to_string(),
        "bench".into(),
        format!("{}", tier.interval_ms()),
        tier.burst.to_string(),
        tier.daily_quota.to_string(),
        tier.max_in_flight.to_string(),
    ]);

    // The same settings on the cluster (its own key prefix: this run's keys are removed after).
    let cluster = args.cluster.as_ref().map(|urls| {
        let settings = RateLimitSettings {
            redis_mode: RedisMode::Cluster,
            redis_url: urls.clone().into(),
            ..settings.clone()
        };
        Arc::new(rt.block_on(async { Limiter::new(settings) }).unwrap())
    });
    const USERS: usize = 64;

    rt.block_on(kiln(Arc::clone(&limiter), args.concurrency, 1.0, 1)); // warm-up
    if let Some(cluster) = &cluster {
        rt.block_on(kiln(Arc::clone(cluster), args.concurrency, 1.0, USERS));
    }
    let (mut ours, mut ceiling, mut ping) = (Vec::new(), Vec::new(), Vec::new());
    let (mut single_spread, mut cluster_spread) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        if let Some(cluster) = &cluster {
            let one = rt.block_on(kiln(Arc::clone(&limiter), args.concurrency, args.seconds, USERS));
            let many = rt.block_on(kiln(Arc::clone(cluster), args.concurrency, args.seconds, USERS));
            eprintln!("{USERS} users: single Redis {one:?} | Redis Cluster {many:?}");
            single_spread.push(one);
            cluster_spread.push(many);
        }
        let k = rt.block_on(kiln(Arc::clone(&limiter), args.concurrency, args.seconds, 1));
        let requests = (k.per_second * args.seconds) as u64;
        ours.push(k);
        ceiling.push(redis_benchmark(args.concurrency, requests, &evalsha));
        ping.push(redis_benchmark(args.concurrency, requests, &["PING".to_owned()]));
        eprintln!(
            "kiln {:?} | redis-benchmark script {:?} | PING {:?}",
            ours.last().unwrap(),
            ceiling.last().unwrap(),
            ping.last().unwrap()
        );
    }
    let _: () = redis::cmd("EVAL")
        .arg("for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end")
        .arg(0)
        .arg(format!("{}:*", settings.key_prefix))
        .query(&mut connection)
        .unwrap();
    if let Some(cluster) = &cluster {
        rt.block_on(cluster.redis().delete_all()).unwrap();
    }

    let row = |name: &str, s: &[Sample]| {
        println!(
            "| {name} | {:.0} | {:.3} | {:.3} |",
            mean(s, |x| x.per_second),
            mean(s, |x| x.p50_ms),
            mean(s, |x| x.p99_ms)
        );
    };
    println!(
        "concurrency {}; {} rounds of {} s; means over rounds\n",
        args.concurrency, args.rounds, args.seconds
    );
    println!("| path | decisions/s | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- |");
    row("kiln `Limiter::decide` (worker path)", &ours);
    row("redis-benchmark, same EVALSHA (ceiling)", &ceiling);
    row("redis-benchmark PING", &ping);
    let ratio = mean(&ours, |x| x.per_second) / mean(&ceiling, |x| x.per_second);
    println!(
        "\nkiln ÷ ceiling: **{ratio:.3}**; added latency p50 {:+.3} ms, p99 {:+.3} ms",
        mean(&ours, |x| x.p50_ms) - mean(&ceiling, |x| x.p50_ms),
        mean(&ours, |x| x.p99_ms) - mean(&ceiling, |x| x.p99_ms)
    );
    if cluster.is_some() {
        println!("\n{USERS} users in turn, same concurrency:\n");
        println!("| path | decisions/s | p50 ms | p99 ms |");
        println!("| --- | --- | --- | --- |");
        row("kiln `Limiter::decide`, single Redis", &single_spread);
        row(
            "kiln `Limiter::decide`, Redis Cluster (3 masters + 3 replicas)",
            &cluster_spread,
        );
        println!(
            "\ncluster ÷ single: **{:.3}** decisions/s; p99 {:+.3} ms",
            mean(&cluster_spread, |x| x.per_second) / mean(&single_spread, |x| x.per_second),
            mean(&cluster_spread, |x| x.p99_ms) - mean(&single_spread, |x| x.p99_ms)
        );
    }
}
