//! A real 3-node RabbitMQ cluster on loopback (`scripts/rabbitmq-cluster.sh`): the workers are on the
//! first node, which leads the request queue; that node stops under load; the workers move to
//! another node (and say so on `/readyz` and `/metrics`) and every request is answered, from the
//! quorum queue that kept it. Figures print with `--no-capture` (RELIABILITY.md).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::domain::{ReplyStatus, WireStyle};
use secrecy::SecretString;

use crate::helpers::{http_get, metric_value, read, readyz, repo, request, spawn_app_with, TestApp};

/// The cluster, stopped and removed when dropped.
struct Cluster {
    dir: std::path::PathBuf,
    urls: Vec<String>,
}

impl Cluster {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-cluster-{}", uuid::Uuid::new_v4().simple()));
        let output = Command::new(repo().join("scripts/rabbitmq-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("the cluster script runs");
        assert!(
            output.status.success(),
            "the cluster did not start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let urls = String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .split(',')
            .map(str::to_owned)
            .collect();
        Self { dir, urls }
    }

    /// The node (`kcN@localhost`) that leads quorum queue `queue`, as node `ask` sees it.
    fn leader(&self, ask: usize, queue: &str) -> Option<String> {
        let output = Command::new("rabbitmqctl")
            .env("HOME", "/var/lib/rabbitmq") // the Erlang cookie the script's nodes use
            .args([
                "-n",
                &format!("kc{ask}@localhost"),
                "-q",
                "list_queues",
                "--no-table-headers",
            ])
            .args(["name", "leader"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout).lines().find_map(|line| {
            let (name, leader) = line.split_once('\t')?;
            (name == queue).then(|| leader.trim().to_owned())
        })
    }

    fn stop_node(&self, n: usize) {
        let status = Command::new(repo().join("scripts/rabbitmq-cluster.sh"))
            .args(["stop-node"])
            .arg(&self.dir)
            .arg(n.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/rabbitmq-cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

#[tokio::test]
async fn when_its_node_stops_the_worker_moves_to_another_and_every_request_is_answered() {
    let cluster = Cluster::start();
    let all = cluster.urls.join(",");
    let app = spawn_app_with(|s| {
        s.amqp.url = SecretString::from(all.clone());
        s.models.enabled = vec!["multistyle26".into()];
        s.amqp.reconnect.initial_ms = 100;
    })
    .await;
    // The producer is on node 3; the worker took node 1, the first that answered.
    let mut producer =
        kiln::submit::Producer::connect(&SecretString::from(cluster.urls[2].clone()), &app.topology.requests)
            .await
            .unwrap();
    let photo = read("tests/data/astronaut-256.png");
    let requests: Vec<_> = (0..30)
        .map(|k| request(&photo, Some(WireStyle::Index(k % 26))))
        .collect();
    let started = Instant::now();
    let mut stopped_at = None;
    let mut answers: HashMap<String, Vec<ReplyStatus>> = HashMap::new();
    for (k, doc) in requests.iter().enumerate() {
        producer.send(doc).await.unwrap();
        if k == 10 {
            cluster.stop_node(1);
            stopped_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut first_after_failover = None;
    while requests.iter().any(|r| !answers.contains_key(&r.request_id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = producer
            .next_reply(left)
            .await
            .expect("every request answered within 120 s");
        if !reply.document.is_final() {
            continue;
        }
        if first_after_failover.is_none() && stopped_at.is_some_and(|at| reply.received_at > at) {
            first_after_failover = Some(reply.received_at - stopped_at.unwrap());
        }
        let id = reply.correlation_id.clone().unwrap();
        answers.entry(id).or_default().push(reply.document.status);
    }
    assert!(
        answers.values().flatten().all(|s| *s == ReplyStatus::Ok),
        "every answer is an image: {answers:?}"
    );
    let twice = answers.values().filter(|a| a.len() > 1).count();
    eprintln!(
        "failover: 30 requests answered in {:?}; first reply after the node stopped {:?}; answered twice \
         (in flight on the lost connection, redelivered): {twice}",
        started.elapsed(),
        first_after_failover
    );
    assert!(
        twice <= 16,
        "at most what was in flight (the prefetch) is answered again: {twice}"
    );
    producer.close().await;
    app.stop().await;
}

/// `host:port` of the cluster's node `n` (1 to 3), as kiln names it.
fn node(cluster: &Cluster, n: usize) -> String {
    kiln::amqp::connect::node_address(&cluster.urls[n - 1])
}

/// A worker's `/readyz` once it is ready (200), within `timeout`.
async fn ready_report(addr: SocketAddr, timeout: Duration) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (status, report) = readyz(addr).await;
        if status == 200 {
            return report;
        }
        assert!(started.elapsed() < timeout, "/readyz stayed {status}: {report}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One final reply as the producer saw it.
struct Answer {
    request_id: String,
    worker_id: String,
    status: ReplyStatus,
    received_at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_under_steady_load_move_off_the_leader_that_stops_and_every_request_is_answered() {
    const REQUESTS: usize = 60;
    const INTERVAL: Duration = Duration::from_millis(150);
    // The leader stops once this many requests are sent (a third of the way).
    const STOP_AFTER: usize = 20;

    let cluster = Arc::new(tokio::task::spawn_blocking(Cluster::start).await.unwrap());
    let all = cluster.urls.join(",");
    let (kc1, kc2, kc3) = (node(&cluster, 1), node(&cluster, 2), node(&cluster, 3));
    // Worker a declares the topology through kc1 (the first node of amqp.url that answers), so kc1
    // leads the quorum request queues (RabbitMQ places a new queue's leader on the declaring
    // client's node); worker b joins it on kc1.
    let settings = |id: &'static str, prefix: Option<String>| {
        let all = all.clone();
        move |s: &mut kiln::configuration::Settings| {
            s.amqp.url = SecretString::from(all);
            s.models.enabled = vec!["multistyle26".into()];
            s.amqp.reconnect.initial_ms = 100;
            s.worker.id = Some(id.into());
            if let Some(prefix) = prefix {
                s.rate_limit.key_prefix = prefix.clone();
                s.amqp.topology.prefix = prefix;
            }
        }
    };
    let a = spawn_app_with(settings("drill-a", None)).await;
    let b = spawn_app_with(settings("drill-b", Some(a.settings.amqp.topology.prefix.clone()))).await;
    let workers: [&TestApp; 2] = [&a, &b];
    for app in workers {
        let report = ready_report(app.http_addr, Duration::from_secs(60)).await;
        assert_eq!(
            report["broker_node"],
            kc1.as_str(),
            "both workers start on kc1: {report}"
        );
        assert_eq!(report["broker_failovers"], 0);
    }
    let requests_queue = a.topology.requests.clone();
    let leader = {
        let (cluster, queue) = (Arc::clone(&cluster), requests_queue.clone());
        tokio::task::spawn_blocking(move || cluster.leader(3, &queue))
            .await
            .unwrap()
    };
    assert_eq!(leader.as_deref(), Some("kc1@localhost"), "kc1 leads {requests_queue}");

    // Steady load from a producer on kc3: one request every INTERVAL, each sent on a task of its
    // own so a slow confirm (while the queue elects a new leader) does not hold the next one back.
    let producer = kiln::submit::Producer::connect(&SecretString::from(cluster.urls[2].clone()), &requests_queue)
        .await
        .unwrap();
    let (sender, mut replies, closer) = producer.split();
    let photo = read("tests/data/astronaut-256.png");
    let documents: Vec<_> = (0..REQUESTS)
        .map(|k| request(&photo, Some(WireStyle::Index((k % 26) as i64))))
        .collect();
    let ids: Vec<String> = documents.iter().map(|d| d.request_id.clone()).collect();
    let started = Instant::now();
    let load = {
        let cluster = Arc::clone(&cluster);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(INTERVAL);
            let mut sends = Vec::new();
            let mut stop = None;
            for (k, document) in documents.into_iter().enumerate() {
                ticks.tick().await;
                let sender = sender.clone();
                sends.push(tokio::spawn(async move {
                    let at = Instant::now();
                    sender.send(&document).await.expect("the request is confirmed");
                    at.elapsed()
                }));
                if k + 1 == STOP_AFTER {
                    let cluster = Arc::clone(&cluster);
                    stop = Some(tokio::task::spawn_blocking(move || {
                        let issued = Instant::now();
                        cluster.stop_node(1);
                        (issued, Instant::now())
                    }));
                }
            }
            let mut slowest_confirm = Duration::ZERO;
            for send in sends {
                slowest_confirm = slowest_confirm.max(send.await.unwrap());
            }
            (stop.unwrap().await.unwrap(), slowest_confirm)
        })
    };

    // Meanwhile, when each worker is ready again on another node than kc1.
    let watch = {
        let addrs = [a.http_addr, b.http_addr];
        let kc1 = kc1.clone();
        tokio::spawn(async move {
            let mut moved: [Option<(Instant, String)>; 2] = [None, None];
            let deadline = Instant::now() + Duration::from_secs(180);
            while moved.iter().any(Option::is_none) && Instant::now() < deadline {
                for (k, addr) in addrs.iter().enumerate() {
                    if moved[k].is_some() {
                        continue;
                    }
                    let (status, report) = readyz(*addr).await;
                    let node = report["broker_node"].as_str().unwrap_or_default();
                    if status == 200 && node != kc1 {
                        moved[k] = Some((Instant::now(), node.to_owned()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            moved
        })
    };

    let mut answers: Vec<Answer> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let answered = |answers: &[Answer]| {
        let ids_answered: std::collections::HashSet<&str> = answers.iter().map(|a| a.request_id.as_str()).collect();
        ids.iter().all(|id| ids_answered.contains(id.as_str()))
    };
    while !answered(&answers) {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = replies.next(left).await.expect("every request answered within 180 s");
        if !reply.document.is_final() {
            continue;
        }
        answers.push(Answer {
            request_id: reply.correlation_id.clone().unwrap(),
            worker_id: reply.document.worker_id.clone(),
            status: reply.document.status,
            received_at: reply.received_at,
        });
    }
    let total = answers.iter().map(|a| a.received_at).max().unwrap() - started;
    let ((stop_issued, node_down), slowest_confirm) = load.await.unwrap();
    let moved = watch.await.unwrap();

    // Every answer an image, every request answered; duplicates at most what the workers held.
    assert!(
        answers.iter().all(|a| a.status == ReplyStatus::Ok),
        "every answer is an image"
    );
    let mut per_request: HashMap<&str, usize> = HashMap::new();
    for answer in &answers {
        *per_request.entry(answer.request_id.as_str()).or_default() += 1;
    }
    assert!(
        per_request.keys().all(|id| ids.iter().any(|i| i == id)),
        "no stray replies"
    );
    let twice: usize = per_request.values().map(|n| n - 1).sum();
    let held = 2 * a.settings.amqp.prefetch as usize * a.topology.request_queues.len();
    assert!(
        twice <= held,
        "at most what the workers held unacked is answered again: {twice}"
    );
    let mut per_worker: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for answer in &answers {
        let counts = per_worker.entry(answer.worker_id.as_str()).or_default();
        if answer.received_at < stop_issued {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }

    // Both workers left kc1, for another node, and say so.
    let mut moved_after = Vec::new();
    for (k, app) in workers.iter().enumerate() {
        let (at, new_node) = moved[k].clone().unwrap_or_else(|| panic!("worker {k} never left kc1"));
        assert!(new_node == kc2 || new_node == kc3, "{new_node}");
        moved_after.push((app.settings.worker.resolved_id(), at - stop_issued, new_node.clone()));
        let (status, report) = readyz(app.http_addr).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["broker_node"], new_node.as_str());
        assert_eq!(report["broker_failovers"], 1, "{report}");
        let detail = report["checks"]["broker"]["detail"].as_str().unwrap();
        assert!(detail.contains(new_node.as_str()), "{detail}");
    }
    // The metrics are the process's, shared by the two workers: both failovers, and the node in
    // use (both moved to the node after kc1 in amqp.url) at 1, kc1 at 0.
    let metrics = http_get(a.http_addr, "/metrics").await.1;
    let failovers = metric_value(&metrics, "kiln_broker_failovers_total").unwrap();
    assert!(failovers >= 2.0, "kiln_broker_failovers_total {failovers}");
    let gauge = |node: &str| metric_value(&metrics, &format!("kiln_broker_node{{node=\"{node}\"}}"));
    assert_eq!(gauge(&kc1), Some(0.0), "{metrics}");
    for (_, _, new_node) in &moved_after {
        assert_eq!(gauge(new_node), Some(1.0), "{metrics}");
    }
    let reconnects = metric_value(&metrics, "kiln_broker_reconnects_total").unwrap();

    // The first reply a worker sent through its new node.
    let first_through_another_node = answers
        .iter()
        .filter_map(|answer| {
            let k = workers
                .iter()
                .position(|w| w.settings.worker.resolved_id() == answer.worker_id)?;
            let (at, _) = moved[k].as_ref()?;
            (answer.received_at >= *at).then(|| answer.received_at - stop_issued)
        })
        .min();
    let first_after_stop = answers
        .iter()
        .filter(|a| a.received_at >= stop_issued)
        .map(|a| a.received_at - stop_issued)
        .min();
    // The longest wait between two answers: the service gap the failover caused.
    let mut times: Vec<Instant> = answers.iter().map(|a| a.received_at).collect();
    times.sort();
    let longest_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let new_leader = {
        let (cluster, queue) = (Arc::clone(&cluster), requests_queue.clone());
        tokio::task::spawn_blocking(move || cluster.leader(2, &queue))
            .await
            .unwrap()
    };
    eprintln!(
        "two-worker failover: {REQUESTS} requests, one per {INTERVAL:?}, from a producer on kc3; kc1 \
         (leader of the request queue) stopped after {STOP_AFTER} (`rabbitmqctl stop` took {:?}); new \
         leader {new_leader:?}",
        node_down - stop_issued
    );
    for (id, after, new_node) in &moved_after {
        eprintln!("  {id}: ready on {new_node} {after:?} after the stop was issued");
    }
    eprintln!(
        "  first reply after the stop {first_after_stop:?}; first through another node \
         {first_through_another_node:?}; longest gap between two answers {longest_gap:?}; slowest request \
         confirm {slowest_confirm:?}"
    );
    eprintln!(
        "  all answered {total:?} after the first was sent; answers {}; answered twice {twice} (allowed \
         {held}); per worker (before the stop, after): {per_worker:?}; reconnects {reconnects}, failovers \
         {failovers}",
        answers.len()
    );
    assert!(
        first_through_another_node.is_some(),
        "a worker answered through its new node"
    );

    closer
        .close(tokio::spawn(async move { while replies.recv().await.is_some() {} }))
        .await;
    a.stop().await;
    b.stop().await;
}
