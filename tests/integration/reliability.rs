//! Nothing is lost: crashed workers, poison messages, unroutable replies, an unreachable broker.
//! These run the real `kiln` binary as a child process so it can really be killed.

use std::time::{Duration, Instant};

use kiln::domain::{ReplyStatus, WireStyle};
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;

use crate::helpers::{
    admin_channel, cleanup, free_port, poll_until, read, ready_messages, request, test_settings, TcpProxy, TestApp,
    WorkerProcess, REPLY_TIMEOUT,
};

const START_TIMEOUT: Duration = Duration::from_secs(60);

async fn wait_for(what: &str, timeout: Duration, mut condition: impl AsyncFnMut() -> bool) {
    poll_until(what, timeout, async || condition().await.then_some(())).await
}

/// The first `x-death` entry's reason, and the message body, of the one message in `queue`.
async fn dead_letter(queue: &str) -> (String, Vec<u8>) {
    let message = admin_channel()
        .await
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead letter");
    let headers = message.delivery.properties.headers().clone().unwrap_or_default();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death header: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
        panic!("empty x-death");
    };
    let reason = match first.inner().get("reason") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("x-death reason is {other:?}"),
    };
    (reason, message.delivery.data)
}

#[tokio::test]
async fn a_worker_killed_mid_inference_loses_nothing() {
    let settings = test_settings();
    let requests = settings.topology().requests;
    let mut worker = WorkerProcess::spawn(&settings, &[]);
    worker.wait_for_log("worker ready", START_TIMEOUT).await;

    let app_settings = settings.clone();
    let mut producer = kiln::submit::Producer::connect(&settings.amqp.url, &requests)
        .await
        .unwrap();
    // A 2048 px render takes seconds on CPU: a wide window to kill the worker in.
    let mut req = request(&read("samples/astronaut.jpg"), Some(WireStyle::Index(5)));
    req.params.size = Some(2048);
    producer.send(&req).await.unwrap();
    wait_for("the worker to take the request", REPLY_TIMEOUT, async || {
        ready_messages(&requests).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.kill();

    assert!(
        producer.next_reply(Duration::from_millis(500)).await.is_err(),
        "no reply from a killed worker"
    );
    wait_for("the request to return to the queue", REPLY_TIMEOUT, async || {
        ready_messages(&requests).await == 1
    })
    .await;

    let app = TestApp::start(app_settings).await;
    let reply = producer
        .reply_to(&req.request_id, Duration::from_secs(180))
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    assert_eq!(reply.document.image.unwrap().width, 2048);
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_crash_between_inference_and_reply_leads_to_redelivery_not_loss() {
    let settings = test_settings();
    let topology = settings.topology();
    let mut crashing = WorkerProcess::spawn(&settings, &[("KILN_FAULTS__ABORT_BEFORE_REPLY", "true")]);
    crashing.wait_for_log("worker ready", START_TIMEOUT).await;

    let mut producer = kiln::submit::Producer::connect(&settings.amqp.url, &topology.requests)
        .await
        .unwrap();
    let req = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(2)));
    producer.send(&req).await.unwrap();
    let status = crashing.wait_exit(REPLY_TIMEOUT).await;
    assert!(!status.success(), "the faulty worker aborts");
    assert_eq!(
        crashing.count("aborting before the reply is published"),
        1,
        "{}",
        crashing.log()
    );
    assert!(crashing.count("\"replied\"") == 0, "it aborted before replying");

    // Had the worker acknowledged before its reply was confirmed, the request would be gone now.
    assert!(producer.next_reply(Duration::from_millis(500)).await.is_err());
    wait_for("the request to return to the queue", REPLY_TIMEOUT, async || {
        ready_messages(&topology.requests).await == 1
    })
    .await;

    let app = TestApp::start(settings).await;
    let reply = producer.reply_to(&req.request_id, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_message_that_keeps_crashing_workers_ends_in_the_dead_letter_queue() {
    let mut settings = test_settings();
    settings.amqp.topology.delivery_limit = 2;
    let topology = settings.topology();

    let req = request(&read("tests/data/astronaut-256.png"), None);
    // The producer stays connected (its reply queue with it): a request whose producer left would
    // be dead-lettered on arrival without ever reaching the crash.
    let mut producer = None;
    for attempt in 1..=2 {
        let mut crashing = WorkerProcess::spawn(&settings, &[("KILN_FAULTS__ABORT_BEFORE_REPLY", "true")]);
        crashing.wait_for_log("worker ready", START_TIMEOUT).await;
        if attempt == 1 {
            let connected = kiln::submit::Producer::connect(&settings.amqp.url, &topology.requests)
                .await
                .unwrap();
            connected.send(&req).await.unwrap();
            producer = Some(connected);
        }
        assert!(!crashing.wait_exit(REPLY_TIMEOUT).await.success());
        if attempt == 2 {
            assert_eq!(
                crashing.count("\"redelivered\":true"),
                1,
                "the second worker sees a redelivery:\n{}",
                crashing.log()
            );
        }
    }
    wait_for("the dead letter", REPLY_TIMEOUT, async || {
        ready_messages(&topology.dead_letter_queue).await == 1
    })
    .await;
    if let Some(producer) = producer {
        producer.close().await;
    }
    assert_eq!(ready_messages(&topology.requests).await, 0, "no third delivery");
    let (reason, body) = dead_letter(&topology.dead_letter_queue).await;
    assert_eq!(reason, "delivery_limit");
    assert_eq!(body, serde_json::to_vec(&req).unwrap(), "the request itself is kept");
    cleanup(&settings).await;
}

#[tokio::test]
async fn a_reply_nobody_can_receive_sends_the_request_to_the_dead_letter_queue() {
    let app = crate::helpers::spawn_app().await;
    let req = request(&read("tests/data/astronaut-256.png"), None);
    admin_channel()
        .await
        .basic_publish(
            "".into(),
            app.topology.requests.as_str().into(),
            Default::default(),
            &serde_json::to_vec(&req).unwrap(),
            lapin::BasicProperties::default().with_reply_to("no-such-queue-anywhere".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq = app.topology.dead_letter_queue.clone();
    wait_for("the dead letter", REPLY_TIMEOUT, async || {
        ready_messages(&dlq).await == 1
    })
    .await;
    let (reason, body) = dead_letter(&dlq).await;
    assert_eq!(reason, "rejected");
    assert_eq!(body, serde_json::to_vec(&req).unwrap());
    assert_eq!(ready_messages(&app.topology.requests).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn the_worker_retries_an_unreachable_broker_and_reconnects_after_losing_it() {
    let port = free_port();
    let settings = test_settings();
    let topology = settings.topology();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let worker = WorkerProcess::spawn(
        &settings,
        &[
            ("KILN_AMQP__URL", &url),
            ("KILN_AMQP__RECONNECT__INITIAL_MS", "100"),
            ("KILN_AMQP__RECONNECT__MAX_MS", "400"),
        ],
    );
    let started = Instant::now();
    wait_for("retries", START_TIMEOUT, async || {
        worker.count("broker unreachable, retrying") >= 3
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it backs off between attempts"
    );
    assert!(
        worker.log().contains("guest:***@127.0.0.1"),
        "the log names the broker without its password"
    );
    assert!(
        !worker.log().contains("guest:guest"),
        "the password never reaches the log"
    );

    // The broker "comes back": a proxy on that port to the real RabbitMQ.
    let proxy = TcpProxy::start(port, 5672).await;
    worker.wait_for_log("worker ready", START_TIMEOUT).await;
    let mut producer = kiln::submit::Producer::connect(&settings.amqp.url, &topology.requests)
        .await
        .unwrap();
    let photo = read("tests/data/astronaut-256.png");
    let reply = producer.request(&request(&photo, None), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);

    // The connection drops under the worker: it says so, reconnects, and serves again.
    proxy.sever();
    worker
        .wait_for_log("lost the broker connection; reconnecting", START_TIMEOUT)
        .await;
    wait_for("a second ready", START_TIMEOUT, async || {
        worker.count("worker ready") == 2
    })
    .await;
    let reply = producer.request(&request(&photo, None), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    producer.close().await;
    drop(worker);
    drop(proxy);
    cleanup(&settings).await;
}

#[tokio::test]
async fn on_sigterm_the_worker_finishes_what_it_holds_and_exits_cleanly() {
    let mut settings = test_settings();
    settings.amqp.prefetch = 4;
    let topology = settings.topology();
    let mut worker = WorkerProcess::spawn(&settings, &[]);
    worker.wait_for_log("worker ready", START_TIMEOUT).await;

    let mut producer = kiln::submit::Producer::connect(&settings.amqp.url, &topology.requests)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let mut req = request(&read("samples/astronaut.jpg"), Some(WireStyle::Index(9)));
        req.params.size = Some(512);
        producer.send(&req).await.unwrap();
        ids.push(req.request_id);
    }
    // All four delivered to the worker (none left in the queue), most not yet rendered: stop now.
    wait_for("the worker to hold all four", REPLY_TIMEOUT, async || {
        ready_messages(&topology.requests).await == 0
    })
    .await;
    worker.terminate();

    let mut replied = Vec::new();
    for _ in 0..4 {
        let reply = producer.next_reply(REPLY_TIMEOUT).await.unwrap();
        assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
        replied.push(reply.document.request_id.unwrap());
    }
    replied.sort();
    ids.sort();
    assert_eq!(replied, ids, "every held request answered, once");
    assert!(worker.wait_exit(REPLY_TIMEOUT).await.success(), "{}", worker.log());
    assert_eq!(worker.count("worker stopped"), 1);
    assert!(
        producer.next_reply(Duration::from_millis(500)).await.is_err(),
        "no duplicate replies"
    );
    assert_eq!(
        ready_messages(&topology.requests).await,
        0,
        "nothing returned to the queue"
    );
    producer.close().await;
    cleanup(&settings).await;
}

#[tokio::test]
async fn under_load_a_terminated_worker_drains_and_the_fleet_loses_and_repeats_nothing() {
    // Two worker processes share the queues (the shared one and a tier's) while a producer keeps
    // sending; one gets SIGTERM mid-stream, as in a Kubernetes scale-down. It must stop taking
    // requests, answer what it holds, exit 0 inside its grace period, and every request must get
    // exactly one final reply, from one worker or the other.
    let mut settings = test_settings();
    settings.amqp.prefetch = 4;
    let topology = settings.topology();
    let grace = Duration::from_secs(20);
    let grace_ms = grace.as_millis().to_string();
    let extra = [("KILN_WORKER__SHUTDOWN_GRACE_MS", grace_ms.as_str())];
    let mut leaving = WorkerProcess::spawn(&settings, &extra);
    let mut staying = WorkerProcess::spawn(&settings, &extra);
    leaving.wait_for_log("worker ready", START_TIMEOUT).await;
    staying.wait_for_log("worker ready", START_TIMEOUT).await;

    let photo = read("tests/data/astronaut-256.png");
    let mut shared = kiln::submit::Producer::connect(&settings.amqp.url, &topology.requests)
        .await
        .unwrap();
    let mut pro = kiln::submit::Producer::connect(&settings.amqp.url, &topology.tier_queue("pro"))
        .await
        .unwrap();
    let total = 60;
    let mut sent = std::collections::HashSet::new();
    let mut stopped_at = None;
    for i in 0..total {
        let req = request(&photo, Some(WireStyle::Index(i % 26)));
        match i % 2 {
            0 => shared.send(&req).await.unwrap(),
            _ => pro.send(&req).await.unwrap(),
        }
        sent.insert(req.request_id);
        // A burst first, so both workers have their hands full; then a steady stream.
        if i == total / 3 {
            leaving.terminate();
            stopped_at = Some(Instant::now());
        }
        if i >= total / 3 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    let mut answered: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut workers = std::collections::HashSet::new();
    while answered.values().sum::<usize>() < total as usize {
        let reply = tokio::select! {
            r = shared.next_reply(REPLY_TIMEOUT) => r,
            r = pro.next_reply(REPLY_TIMEOUT) => r,
        }
        .expect("every request is answered");
        assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
        workers.insert(reply.document.worker_id.clone());
        *answered.entry(reply.document.request_id.unwrap()).or_default() += 1;
    }
    assert!(answered.keys().all(|id| sent.contains(id)));
    assert_eq!(answered.len(), total as usize, "nothing lost");
    assert!(
        answered.values().all(|n| *n == 1),
        "nothing answered twice: {answered:?}"
    );
    assert_eq!(workers.len(), 2, "both workers served: {workers:?}");

    let status = leaving.wait_exit(grace).await;
    assert!(status.success(), "{}", leaving.log());
    assert!(
        stopped_at.unwrap().elapsed() < grace,
        "the terminated worker exited inside its grace period"
    );
    assert_eq!(leaving.count("worker stopped"), 1);
    let drain = leaving
        .log()
        .lines()
        .find(|l| l.contains("finishing those held"))
        .map(str::to_owned)
        .expect("the worker logged its drain");
    assert!(
        !drain.contains("\"in_flight\":0"),
        "it held requests when told to stop: {drain}"
    );
    assert_eq!(
        leaving.count("grace period over"),
        0,
        "drained inside the grace period:\n{}",
        leaving.log()
    );

    staying.terminate();
    assert!(staying.wait_exit(REPLY_TIMEOUT).await.success());
    for producer in [&mut shared, &mut pro] {
        assert!(
            producer.next_reply(Duration::from_millis(300)).await.is_err(),
            "no duplicate replies"
        );
    }
    for queue in &topology.request_queues {
        assert_eq!(ready_messages(&queue.name).await, 0, "{} is empty", queue.name);
    }
    shared.close().await;
    pro.close().await;
    cleanup(&settings).await;
}
