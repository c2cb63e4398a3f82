//! The worker's step function: one delivery in, one outcome out, no consumer loop and no sleeps.

use kiln::amqp::ReplyPublisher;
use kiln::domain::{ErrorCode, WireStyle};
use kiln::startup::Application;
use kiln::worker::{Outcome, Worker};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use crate::helpers::{
    admin_channel, cleanup, exclusive_queue, poll_until, read, request, shared_metrics, test_settings, AMQP_URL,
    REPLY_TIMEOUT,
};

async fn publish_and_take(channel: &Channel, queue: &str, body: Vec<u8>, reply_to: &str) -> lapin::message::Delivery {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            &body,
            BasicProperties::default().with_reply_to(reply_to.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    poll_until("the published request", REPLY_TIMEOUT, async || {
        channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
            .map(|message| message.delivery)
    })
    .await
}

#[tokio::test]
async fn each_delivery_has_the_outcome_the_ack_policy_gives_it() {
    let settings = test_settings();
    let mut settings = settings;
    settings.models.warmup = false;
    settings.worker.cpu_threads = 1;
    settings.worker.id = Some("step-worker".into());
    let _metrics = shared_metrics().await;
    let app = Application::build(settings.clone()).unwrap();
    let services = app.services();
    let topology = settings.topology();
    let queue = topology.request_queues[0].clone();
    let connection = lapin::Connection::connect(AMQP_URL, Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();
    let connection = std::sync::Arc::new(connection);
    let worker = Worker::new(
        services,
        ReplyPublisher::open(&connection, &topology.results).await.unwrap(),
        kiln::amqp::ReplyQueues::new(std::sync::Arc::clone(&connection)),
    );
    let admin = admin_channel().await;
    let replies = exclusive_queue(&admin).await;
    let replies = replies.as_str();
    let photo = read("tests/data/astronaut-256.png");

    let ok = serde_json::to_vec(&request(&photo, Some(WireStyle::Index(3)))).unwrap();
    let delivery = publish_and_take(&channel, &topology.requests, ok.clone(), replies).await;
    assert_eq!(worker.handle(delivery, &queue).await, Outcome::Replied { error: None });

    let bad = serde_json::to_vec(&request(&photo, Some(WireStyle::Index(30)))).unwrap();
    let delivery = publish_and_take(&channel, &topology.requests, bad, replies).await;
    assert_eq!(
        worker.handle(delivery, &queue).await,
        Outcome::Replied {
            error: Some(ErrorCode::UnknownStyle)
        }
    );

    let delivery = publish_and_take(&channel, &topology.requests, ok, "no-such-reply-queue").await;
    assert!(matches!(
        worker.handle(delivery, &queue).await,
        Outcome::DeadLettered { .. }
    ));

    // Two replies waiting, one dead letter, nothing left unsettled.
    let count = |q: &str| {
        let admin = admin.clone();
        let q = q.to_owned();
        async move {
            admin
                .queue_declare(
                    q.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap()
                .message_count()
        }
    };
    assert_eq!(count(replies).await, 2);
    // The quorum queue dead-letters asynchronously after the reject.
    poll_until(
        "the rejected request in the dead-letter queue",
        REPLY_TIMEOUT,
        async || (count(&topology.dead_letter_queue).await == 1).then_some(()),
    )
    .await;
    drop(worker);
    let _ = connection.close(200, "done".into()).await;
    drop(app);
    cleanup(&settings).await;
}
