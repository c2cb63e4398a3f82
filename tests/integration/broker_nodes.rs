//! `amqp.url` may name several broker nodes (a RabbitMQ cluster's), comma-separated: the worker and
//! the producer connect to the first that answers, and a worker that loses its node moves to the
//! next one and says so (`/readyz`, `/metrics`).

use kiln::domain::{ReplyStatus, WireStyle};
use secrecy::SecretString;

use crate::helpers::{
    free_port, http_get, metric_value, poll_until, read, readyz, request, spawn_app_alone_with, spawn_app_with,
    TcpProxy, AMQP_URL, REPLY_TIMEOUT,
};

#[tokio::test]
async fn the_worker_and_the_producer_connect_to_the_first_node_that_answers() {
    // Nothing listens on port 1: the first node is down, the second is the real broker.
    let nodes = format!("amqp://guest:guest@127.0.0.1:1/%2f, {AMQP_URL}");
    let app = spawn_app_with(|s| s.amqp.url = SecretString::from(nodes.clone())).await;
    let mut producer = kiln::submit::Producer::connect(&SecretString::from(nodes.clone()), &app.topology.requests)
        .await
        .expect("the producer skips the node that is down");
    let reply = producer
        .request(
            &request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(1))),
            REPLY_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    producer.close().await;
    app.stop().await;

    // With no node answering, the producer says so, naming the nodes without their passwords.
    let down = SecretString::from("amqp://guest:secret@127.0.0.1:1/%2f,amqp://guest:secret@127.0.0.1:2/%2f");
    let error = kiln::submit::Producer::connect(&down, "nowhere")
        .await
        .err()
        .expect("no node answers");
    let message = format!("{error:#}");
    assert!(
        message.contains("127.0.0.1:1") && message.contains("127.0.0.1:2"),
        "{message}"
    );
    assert!(!message.contains("secret"), "{message}");
}

#[tokio::test]
async fn a_worker_that_loses_its_node_moves_to_the_next_and_reports_the_node_and_the_failover() {
    // Two "nodes": two proxies to the one real broker, so the move is seen without a cluster
    // (tests/integration/broker_failover.rs does it with one).
    let (port1, port2) = (free_port(), free_port());
    let proxy1 = TcpProxy::start(port1, 5672).await;
    let _proxy2 = TcpProxy::start(port2, 5672).await;
    let nodes = format!("amqp://guest:guest@127.0.0.1:{port1}/%2f,amqp://guest:guest@127.0.0.1:{port2}/%2f");
    let (node1, node2) = (format!("127.0.0.1:{port1}"), format!("127.0.0.1:{port2}"));
    // Alone: the process-wide failover counter is this worker's.
    let app = spawn_app_alone_with(|s| {
        s.amqp.url = SecretString::from(nodes.clone());
        s.models.enabled = vec!["multistyle26".into()];
    })
    .await;
    let report = poll_until("ready on the first node", REPLY_TIMEOUT, async || {
        let (status, report) = readyz(app.http_addr).await;
        (status == 200).then_some(report)
    })
    .await;
    assert_eq!(report["broker_node"], node1.as_str());
    assert_eq!(report["broker_failovers"], 0);
    let metrics = http_get(app.http_addr, "/metrics").await.1;
    let failovers_before = metric_value(&metrics, "kiln_broker_failovers_total").expect("always exported");
    assert_eq!(
        metric_value(&metrics, &format!("kiln_broker_node{{node=\"{node1}\"}}")),
        Some(1.0)
    );

    // The first node goes away: the worker moves to the second.
    drop(proxy1);
    let report = poll_until("ready on the second node", REPLY_TIMEOUT, async || {
        let (status, report) = readyz(app.http_addr).await;
        (status == 200 && report["broker_node"] == node2.as_str()).then_some(report)
    })
    .await;
    assert_eq!(report["broker_failovers"], 1);
    assert_eq!(
        report["checks"]["broker"]["detail"],
        format!("connected to rabbit node {node2} and consuming the request queue")
    );
    let body = report.to_string();
    assert!(!body.contains("guest"), "no credentials: {body}");
    let metrics = http_get(app.http_addr, "/metrics").await.1;
    assert_eq!(
        metric_value(&metrics, "kiln_broker_failovers_total"),
        Some(failovers_before + 1.0)
    );
    assert_eq!(
        metric_value(&metrics, &format!("kiln_broker_node{{node=\"{node1}\"}}")),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&metrics, &format!("kiln_broker_node{{node=\"{node2}\"}}")),
        Some(1.0)
    );
    assert!(!metrics.contains("guest"), "no credentials in labels");

    // And it serves there.
    let mut producer = kiln::submit::Producer::connect(&SecretString::from(AMQP_URL), &app.topology.requests)
        .await
        .unwrap();
    let reply = producer
        .request(
            &request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(2))),
            REPLY_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    producer.close().await;
    app.stop().await;
}
