//! `amqp.url` may name several broker nodes (a RabbitMQ cluster's), comma-separated: the worker and
//! the producer connect to the first that answers.

use kiln::domain::{ReplyStatus, WireStyle};
use secrecy::SecretString;

use crate::helpers::{read, request, spawn_app_with, AMQP_URL, REPLY_TIMEOUT};

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
