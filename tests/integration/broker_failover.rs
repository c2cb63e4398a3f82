//! A real 3-node RabbitMQ cluster on loopback (`scripts/rabbitmq-cluster.sh`): the worker is on the
//! first node; that node stops under load; the worker moves to another node and every request is
//! answered, from the quorum queue that kept it.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::domain::{ReplyStatus, WireStyle};
use secrecy::SecretString;

use crate::helpers::{read, repo, request, spawn_app_with};

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
