//! Overload with steps as the knob, through the real broker: a `degrade` tier's diffusion request
//! that asks for more than `scheduling.overload.degrade_steps` runs that many, at the size it asked
//! for, and the reply says so (`degraded.steps`, `generation.steps_run`); one that asks for fewer is
//! not degraded, and a tier that is served gets every step.

use kiln::domain::reply::Degraded;
use kiln::domain::{ReplyStatus, RequestDocument, Task, WireParams};
use kiln::submit::{new_request, rfc3339, Producer};

use crate::helpers::{read, spawn_app_with, REPLY_TIMEOUT};

/// A text-to-image request for `sd-tiny-random`, created 5 s ago: past the 1 s overload threshold.
fn late(steps: i64, width: i64, height: i64) -> RequestDocument {
    let params = WireParams {
        prompt: Some("a lighthouse at dusk".into()),
        steps: Some(steps),
        seed: Some(7.into()),
        width: Some(width),
        height: Some(height),
        ..Default::default()
    };
    let mut request = new_request("degrade-steps", "sd-tiny-random", params, None);
    request.created_at = Some(rfc3339(time::OffsetDateTime::now_utc() - time::Duration::seconds(5)));
    request
}

fn overloaded(steps: Option<u32>, max_side: Option<u32>) -> Option<Degraded> {
    Some(Degraded {
        max_side,
        steps,
        reason: "overloaded".into(),
    })
}

#[tokio::test]
async fn an_overloaded_degrade_tier_runs_fewer_steps_at_the_size_it_asked_for() {
    let app = spawn_app_with(|s| {
        s.models.enabled = vec!["sd-tiny-random".into()];
        s.scheduling.overload.wait_threshold_ms = 1_000;
        s.scheduling.overload.degrade_max_side = 96;
    })
    .await;
    let cap = app.settings.scheduling.overload.degrade_steps;
    assert_eq!(cap, 20, "the default");
    let mut plus = Producer::connect(&app.settings.amqp.url, &app.topology.tier_queue("plus"))
        .await
        .unwrap();

    // 30 steps asked, 20 run; 96 × 64 is within degrade_max_side, so the size is as asked.
    let reply = plus.request(&late(30, 96, 64), REPLY_TIMEOUT).await.unwrap();
    let doc = &reply.document;
    assert_eq!(doc.status, ReplyStatus::Ok, "{:?}", doc.error);
    crate::contract::assert_valid_reply(doc);
    assert_eq!(doc.degraded, overloaded(Some(cap), None));
    let g = doc.generation.as_ref().unwrap();
    assert_eq!((g.steps, g.steps_run), (cap, cap));
    let image = doc.image.as_ref().unwrap();
    assert_eq!((image.width, image.height), (96, 64));
    let png = crate::helpers::decode_png(&reply.body);
    assert_eq!(png.dimensions(), (96, 64));
    let degraded_png = reply.body.clone();

    // The same picture as a request that asked for 20 steps (pro is served as asked under
    // overload): a cut request runs exactly the schedule of the smaller count.
    let mut pro = Producer::connect(&app.settings.amqp.url, &app.topology.tier_queue("pro"))
        .await
        .unwrap();
    let reply = pro.request(&late(20, 96, 64), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    assert!(reply.document.degraded.is_none());
    assert_eq!(reply.body, degraded_png, "30 steps cut to 20 is the 20-step picture");

    // At or under the cap: not degraded, every step run.
    let reply = plus.request(&late(cap.into(), 96, 64), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    assert!(reply.document.degraded.is_none(), "{:?}", reply.document.degraded);
    assert_eq!(reply.document.generation.as_ref().unwrap().steps_run, cap);
    let reply = plus.request(&late(12, 96, 64), REPLY_TIMEOUT).await.unwrap();
    assert!(reply.document.degraded.is_none());
    assert_eq!(reply.document.generation.as_ref().unwrap().steps_run, 12);

    // Both caps at once: larger than degrade_max_side and more steps than degrade_steps.
    let reply = plus.request(&late(30, 128, 128), REPLY_TIMEOUT).await.unwrap();
    let doc = &reply.document;
    assert_eq!(doc.status, ReplyStatus::Ok, "{:?}", doc.error);
    crate::contract::assert_valid_reply(doc);
    assert_eq!(doc.degraded, overloaded(Some(cap), Some(96)));
    assert_eq!(doc.generation.as_ref().unwrap().steps_run, cap);
    let image = doc.image.as_ref().unwrap();
    assert_eq!((image.width, image.height), (96, 96));

    // Image to image: the strength applies to the cut count (⌊20 × 0.6⌋ = 12 run).
    let mut i2i = late(30, 64, 64);
    i2i.image = Some(kiln::domain::WireImage::from_bytes(&read(
        "tests/data/diffusion/chelsea-64x64.png",
    )));
    i2i.params.task = Some("image_to_image".into());
    i2i.params.strength = Some(0.6);
    let reply = plus.request(&i2i, REPLY_TIMEOUT).await.unwrap();
    let doc = &reply.document;
    assert_eq!(doc.status, ReplyStatus::Ok, "{:?}", doc.error);
    assert_eq!(doc.degraded, overloaded(Some(cap), None));
    let g = doc.generation.as_ref().unwrap();
    assert_eq!((g.task, g.steps, g.steps_run), (Task::ImageToImage, cap, 12));

    // A tier that is served under overload gets every step it asked for.
    let reply = pro.request(&late(30, 96, 64), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    assert!(reply.document.degraded.is_none());
    assert_eq!(reply.document.generation.as_ref().unwrap().steps_run, 30);

    plus.close().await;
    pro.close().await;
    app.stop().await;
}
