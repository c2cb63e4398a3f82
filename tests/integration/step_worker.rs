//! Step-level batching through the real broker: progress notices come in order and are not final,
//! a request whose producer leaves mid-run stops between steps and is dead-lettered, and a
//! producer's cancel stops a running request with a final `cancelled` reply.

use std::time::{Duration, Instant};

use kiln::domain::{ReplyStatus, RequestDocument};

use crate::diffusion::{case, document};
use crate::helpers::{poll_until, ready_messages, spawn_app_with, REPLY_TIMEOUT};

/// A tiny text-to-image request of `steps` steps at `side` pixels.
fn long_request(steps: i64, side: i64) -> RequestDocument {
    let mut doc = document(&case("t2i-euler"));
    doc.request_id = format!("steps-{}", uuid::Uuid::new_v4().simple());
    doc.params.steps = Some(steps);
    doc.params.width = Some(side);
    doc.params.height = Some(side);
    doc
}

/// The value of a sample in this process's metrics (the worker runs in it), 0 when absent.
fn metric(line_start: &str) -> f64 {
    kiln::metrics::render()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Send a 50-step 512 px request (seconds of work on this CPU) with progress, and wait until it
/// runs: the request, its first notice, and the image-steps run before it.
async fn running(producer: &mut kiln::submit::Producer) -> (RequestDocument, kiln::submit::Reply, f64) {
    let mut doc = long_request(50, 512);
    doc.progress = true;
    producer.send(&doc).await.unwrap();
    let first = producer.next_reply(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(first.document.status, ReplyStatus::Progress, "it is running");
    let stepped = metric("kiln_denoising_steps_total{model=\"sd-tiny-random\"}");
    (doc, first, stepped)
}

#[tokio::test]
async fn progress_notices_come_in_order_before_the_final_reply_and_are_not_final() {
    let app = spawn_app_with(|s| s.limits.progress_interval_ms = 0).await;
    let mut producer = app.producer().await;
    let mut doc = long_request(12, 64);
    doc.progress = true;
    let mut notices = Vec::new();
    let reply = producer
        .request_with(&doc, REPLY_TIMEOUT, |n| notices.push(n.clone()))
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    let steps: Vec<u32> = notices
        .iter()
        .map(|n| {
            assert_eq!(n.status, ReplyStatus::Progress);
            assert!(!n.is_final());
            crate::contract::assert_valid_reply(n);
            let p = n.progress.as_ref().expect("a progress notice says where it is");
            assert_eq!(p.steps, 12);
            p.step
        })
        .collect();
    assert_eq!(steps, (1..12).collect::<Vec<_>>(), "every step but the last, in order");

    // Without asking: none.
    let mut quiet = long_request(12, 64);
    quiet.progress = false;
    let mut count = 0;
    let reply = producer
        .request_with(&quiet, REPLY_TIMEOUT, |_| count += 1)
        .await
        .unwrap();
    assert_eq!((reply.document.status, count), (ReplyStatus::Ok, 0));
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_request_whose_producer_leaves_mid_run_stops_between_steps_and_is_dead_lettered() {
    let app = spawn_app_with(|s| {
        s.limits.progress_interval_ms = 0;
        s.limits.reply_queue_check_ms = 500;
    })
    .await;
    let mut producer = app.producer().await;
    let (_, _, stepped_before) = running(&mut producer).await;
    let left = Instant::now();
    // The producer gives up: its exclusive reply queue goes with its connection.
    producer.close().await;
    poll_until("the request in the dead-letter queue", REPLY_TIMEOUT, async || {
        (ready_messages(&app.topology.dead_letter_queue).await == 1).then_some(())
    })
    .await;
    let noticed = left.elapsed();
    assert_eq!(metric("kiln_step_stops_total{reason=\"abandoned\"}"), 1.0);
    assert_eq!(metric("kiln_dead_letters_total{reason=\"reply_queue_gone\"}"), 1.0);
    let stepped = metric("kiln_denoising_steps_total{model=\"sd-tiny-random\"}") - stepped_before;
    assert!(
        stepped < 49.0,
        "it ran on to the end ({stepped} more steps, {noticed:?}) instead of stopping"
    );
    assert!(noticed < Duration::from_secs(10), "{noticed:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_cancel_from_the_producer_stops_a_running_request_with_a_final_cancelled_reply() {
    let app = spawn_app_with(|s| s.limits.progress_interval_ms = 0).await;
    let mut producer = app.producer().await;
    let (doc, first, stepped_before) = running(&mut producer).await;
    producer
        .cancel(&doc.request_id, Some("the user closed the tab"))
        .await
        .unwrap();
    let mut last_step = first.document.progress.as_ref().unwrap().step;
    let reply = producer
        .reply_to_with(&doc.request_id, REPLY_TIMEOUT, |n| {
            if let Some(p) = &n.progress {
                last_step = p.step;
            }
        })
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Error);
    let error = reply.document.error.as_ref().unwrap();
    assert_eq!(error.code, kiln::domain::ErrorCode::Cancelled, "{}", error.message);
    crate::contract::assert_valid_reply(&reply.document);
    assert!(last_step < 49, "it ran to step {last_step} of 50 after the cancel");
    let stepped = metric("kiln_denoising_steps_total{model=\"sd-tiny-random\"}") - stepped_before;
    assert!(stepped < 49.0, "{stepped} more steps after the cancel");
    assert_eq!(metric("kiln_step_stops_total{reason=\"cancelled\"}"), 1.0);

    // A cancel that arrives before its request: the request is answered `cancelled` unserved.
    let early = long_request(10, 64);
    producer.cancel(&early.request_id, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = producer.request(&early, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(
        reply.document.error.as_ref().map(|e| e.code),
        Some(kiln::domain::ErrorCode::Cancelled)
    );
    producer.close().await;
    app.stop().await;
}
