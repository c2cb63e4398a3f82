//! Dynamic batching, end to end: results land on the right request whatever batch they ran in,
//! mixed styles share a batch, shape buckets stay within the quality bound, priorities hold under
//! a full queue, and late requests never reach the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::configuration::Settings;
use kiln::domain::{ErrorCode, GenerationRequest, ReplyStatus, WireStyle};
use kiln::inference::{InferenceEngine, InferenceError, JobOptions, ModelRegistry, Runtime};

use crate::helpers::{
    alone_with_metrics, decode_png, psnr, read, ready_messages, request, shared_metrics, spawn_app_with, test_settings,
    within, REPLY_TIMEOUT,
};

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// One inference thread (ONNX Runtime allows one environment per process) and a way to render a
/// request through it with a registry of given batching settings, without the broker.
struct Direct {
    engine: InferenceEngine,
}

impl Direct {
    fn start(settings: &Settings) -> Self {
        let registry = ModelRegistry::load(&settings.models, &settings.batching).unwrap();
        let runtime = Runtime::init(&settings.inference).unwrap();
        let options = kiln::inference::EngineOptions {
            queue_capacity: 8,
            warmup: false,
            class_weights: vec![1.0],
            batch_limits: Default::default(),
            default_batch_limits: settings.batching.limits("", false),
            steps: settings.batching.diffusion.options(false),
        };
        Self {
            engine: InferenceEngine::start(&registry, runtime, options).unwrap(),
        }
    }

    /// Render one request alone, its tensor padded per `batching`.
    async fn render(&self, settings: &Settings, body: &[u8]) -> image::RgbImage {
        let registry = ModelRegistry::load(&settings.models, &settings.batching).unwrap();
        let request = GenerationRequest::parse(body, 1 << 24).map_err(|(e, _)| e).unwrap();
        let prepared = registry.prepare(&request).unwrap();
        let inferred = self
            .engine
            .handle()
            .infer(
                &request.model,
                prepared.input,
                JobOptions {
                    class: 0,
                    deadline: None,
                    ..JobOptions::default()
                },
            )
            .await
            .unwrap();
        prepared.finish.apply(&inferred.output)
    }
}

#[tokio::test]
async fn by_default_tensors_are_padded_exactly_and_coarser_buckets_are_measured() {
    // Padding to a coarser bucket changes the picture everywhere (the model's instance norms take
    // their statistics over the padding too), so the default pads only to the model's own
    // multiple and batches requests of equal size. This measures what a coarser bucket costs, at
    // sizes just past a multiple of 32 (the most padding), for BENCHMARKS.md.
    let photo = read("samples/astronaut.jpg");
    let mut exact = test_settings();
    exact.models.enabled = vec!["multistyle26".into()];
    exact.models.warmup = false;
    exact.batching.shape_bucket = 4;
    let default = Settings::default().batching.shape_bucket;
    let _metrics = shared_metrics().await;
    let direct = Direct::start(&exact);
    for size in [225u32, 289, 353] {
        let mut req = request(&photo, Some(WireStyle::Index(7)));
        req.params.size = Some(size);
        let body = serde_json::to_vec(&req).unwrap();
        let want = direct.render(&exact, &body).await;
        let mut with_default = exact.clone();
        with_default.batching.shape_bucket = default;
        assert_eq!(
            direct.render(&with_default, &body).await,
            want,
            "the default bucket is exact"
        );
        for bucket in [8, 32] {
            let mut coarse = exact.clone();
            coarse.batching.shape_bucket = bucket;
            let db = psnr(&want, &direct.render(&coarse, &body).await);
            println!(
                "size {size} ({}x{}): bucket {bucket} vs exact: PSNR {db:.1} dB",
                want.width(),
                want.height()
            );
            assert!(
                db < 60.0,
                "bucket {bucket} changed nothing measurable: padding is not applied"
            );
        }
    }
}

#[tokio::test]
async fn a_mixed_batch_gives_each_request_its_own_result() {
    // Eight requests, four styles and two pictures, all of one shape: with max_batch_size 8 and a
    // generous delay they run as one batch; each result must equal the same request run alone.
    let mut settings = test_settings();
    settings.models.enabled = vec!["multistyle26".into()];
    settings.amqp.prefetch = 16;
    settings.batching.max_batch_size = 8;
    settings.batching.max_queue_delay_ms = 600;
    let app = spawn_app_with(|s| *s = settings.clone()).await;
    let astronaut = read("tests/data/astronaut-256.png");
    let chelsea = read("tests/data/chelsea-256x256.png");
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let photo = if i % 2 == 0 { &astronaut } else { &chelsea };
            request(photo, Some(WireStyle::Index([3, 7, 12, 19][i / 2])))
        })
        .collect();

    let mut producer = app.producer().await;
    let replies = producer.request_many(&requests, REPLY_TIMEOUT).await.unwrap();
    let mut sizes = Vec::new();
    for (req, reply) in requests.iter().zip(&replies) {
        let doc = &reply.document;
        assert_eq!(doc.status, ReplyStatus::Ok, "{:?}", doc.error);
        assert_eq!(doc.request_id.as_deref(), Some(req.request_id.as_str()));
        sizes.push(doc.batch_size.expect("ok replies say their batch size"));
    }
    assert!(sizes.iter().all(|n| *n >= 4), "the requests were batched: {sizes:?}");

    // The same requests one at a time (each alone in its batch) give the same pictures.
    for (req, reply) in requests.iter().zip(&replies) {
        let mut solo_request = req.clone();
        solo_request.request_id = format!("{}-solo", req.request_id);
        let solo = producer.request(&solo_request, REPLY_TIMEOUT).await.unwrap();
        assert_eq!(solo.document.batch_size, Some(1));
        let (got, want) = (decode_png(&reply.body), decode_png(&solo.body));
        let max = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            max <= 1,
            "{}: differs from its solo run by {max} levels",
            req.request_id
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_request_past_its_deadline_while_waiting_is_expired_without_the_device() {
    let mut settings = test_settings();
    settings.models.enabled = vec!["multistyle26".into()];
    settings.models.warmup = false;
    settings.batching.max_batch_size = 1;
    let registry = Arc::new(ModelRegistry::load(&settings.models, &settings.batching).unwrap());
    let runtime = Runtime::init(&settings.inference).unwrap();
    let options = kiln::inference::EngineOptions {
        queue_capacity: 8,
        warmup: false,
        class_weights: vec![1.0],
        batch_limits: Default::default(),
        default_batch_limits: settings.batching.limits("multistyle26", false),
        steps: settings.batching.diffusion.options(false),
    };
    // The device's counts are the process's metrics: no other engine may render meanwhile.
    let _metrics = alone_with_metrics().await;
    let before = (kiln::metrics::usage().images, batcher_expiries());
    let engine = InferenceEngine::start(&registry, runtime, options).unwrap();
    let handle = engine.handle();
    let photo = read("samples/astronaut.jpg");
    let mut big = request(&photo, Some(WireStyle::Index(1)));
    big.params.size = Some(1024);
    let small = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(1)));
    let prepare = |doc: &kiln::domain::RequestDocument| {
        let body = serde_json::to_vec(doc).unwrap();
        let request = GenerationRequest::parse(&body, 1 << 24).map_err(|(e, _)| e).unwrap();
        registry.prepare(&request).unwrap().input
    };

    // A 1024 px run takes the device; a request whose deadline passes before the batcher takes
    // it in (here: already passed when it is sent, so however fast the device is) expires in the
    // batcher, and the device never runs it.
    let busy = tokio::spawn({
        let (handle, input) = (handle.clone(), prepare(&big));
        async move {
            handle
                .infer(
                    "multistyle26",
                    input,
                    JobOptions {
                        class: 0,
                        deadline: None,
                        ..JobOptions::default()
                    },
                )
                .await
        }
    });
    let late = JobOptions {
        class: 0,
        deadline: Some(Instant::now() - Duration::from_millis(1)),
        ..JobOptions::default()
    };
    let result = handle.infer("multistyle26", prepare(&small), late).await;
    assert!(matches!(result, Err(InferenceError::Expired(_))), "{result:?}");
    busy.await.unwrap().unwrap();
    let after = (kiln::metrics::usage().images, batcher_expiries());
    let stats = (after.0 - before.0, after.1 - before.1);
    assert_eq!(
        (stats.0, stats.1),
        (1, 1),
        "images rendered, expired in the batcher: {stats:?}"
    );
    drop(handle);
    engine.join();
}

#[tokio::test]
async fn with_the_free_queue_full_a_pro_request_is_served_next() {
    // One worker, batches of 1: free requests pile up in kiln.requests.free (the worker holds at
    // most its prefetch of them), then one pro request arrives in kiln.requests.pro. It must be
    // served before everything that was still waiting in the broker.
    let mut settings = test_settings();
    settings.models.enabled = vec!["multistyle26".into()];
    settings.batching.max_batch_size = 1;
    settings.amqp.prefetch = 8;
    let app = spawn_app_with(|s| *s = settings.clone()).await;
    let photo = read("tests/data/astronaut-256.png");
    let free_queue = app.topology.tier_queue("free");
    let pro_queue = app.topology.tier_queue("pro");

    let mut free = kiln::submit::Producer::connect(&settings.amqp.url, &free_queue)
        .await
        .unwrap();
    let total = 200;
    let free_requests: Vec<_> = (0..total).map(|_| request(&photo, Some(WireStyle::Index(2)))).collect();
    let free_task = tokio::spawn(async move { free.request_many(&free_requests, REPLY_TIMEOUT * 4).await });
    // Wait until a real backlog waits in the broker, behind what the worker already holds.
    let started = Instant::now();
    let mut backlog = 0;
    while backlog < 100 {
        assert!(
            started.elapsed() < REPLY_TIMEOUT,
            "no free backlog built up ({backlog})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        backlog = ready_messages(&free_queue).await;
    }
    let mut pro = kiln::submit::Producer::connect(&settings.amqp.url, &pro_queue)
        .await
        .unwrap();
    let pro_request = request(&photo, Some(WireStyle::Index(5)));
    let sent = Instant::now();
    let reply = pro.request(&pro_request, REPLY_TIMEOUT).await.unwrap();
    let pro_latency = sent.elapsed();
    assert_eq!(reply.document.status, ReplyStatus::Ok);

    let free_replies = free_task.await.unwrap().unwrap();
    let finished_after_pro = free_replies
        .iter()
        .filter(|r| r.received_at > sent + pro_latency)
        .count();
    // What was still in the broker when the pro request was sent finished after it (less at most
    // one prefetch window the worker took in while the pro request was on its way); without
    // priority it would have waited for all of them.
    let allowance = usize::from(settings.amqp.prefetch);
    assert!(
        finished_after_pro + allowance >= backlog as usize,
        "the pro request waited behind the free backlog: {finished_after_pro} of {total} free replies came after \
         it, {backlog} were waiting in the broker ({pro_latency:?})"
    );
    assert!(free_replies.iter().all(|r| r.document.status == ReplyStatus::Ok));
    app.stop().await;
}

#[tokio::test]
async fn an_overloaded_worker_defers_the_free_tier_and_degrades_plus() {
    let mut settings = test_settings();
    settings.models.enabled = vec!["multistyle26".into()];
    settings.scheduling.overload.wait_threshold_ms = 1_000;
    settings.scheduling.overload.defer_ms = 1_000;
    settings.scheduling.overload.degrade_max_side = 128;
    let app = spawn_app_with(|s| *s = settings.clone()).await;
    let photo = read("tests/data/astronaut-256.png");
    // Requests created 5 s ago: they waited past the threshold.
    let old = |style| {
        let mut r = request(&photo, Some(WireStyle::Index(style)));
        r.created_at = Some(rfc3339(time::OffsetDateTime::now_utc() - time::Duration::seconds(5)));
        r
    };

    let mut plus = kiln::submit::Producer::connect(&settings.amqp.url, &app.topology.tier_queue("plus"))
        .await
        .unwrap();
    let reply = plus.request(&old(4), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    let degraded = reply
        .document
        .degraded
        .as_ref()
        .expect("the reply says it was degraded");
    assert_eq!(
        (degraded.max_side, degraded.steps, degraded.reason.as_str()),
        (Some(128), None, "overloaded"),
        "a style model has no steps to cut"
    );
    let info = reply.document.image.as_ref().unwrap();
    assert_eq!((info.width, info.height), (128, 128));

    // A plus request already smaller than the cap is served as asked, not marked degraded.
    let mut small = old(4);
    small.params.size = Some(96);
    let reply = plus.request(&small, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    assert!(reply.document.degraded.is_none());
    assert_eq!(reply.document.image.as_ref().unwrap().width, 96);

    // Free: deferred (a notice), and still late when it comes back, so deferred again, until its
    // deadline makes it final: every request is answered, never dropped.
    let mut free = kiln::submit::Producer::connect(&settings.amqp.url, &app.topology.tier_queue("free"))
        .await
        .unwrap();
    let mut req = old(4);
    req.deadline = Some(rfc3339(
        time::OffsetDateTime::now_utc() + time::Duration::milliseconds(2_500),
    ));
    free.send(&req).await.unwrap();
    let mut notices = Vec::new();
    let reply = within("the final reply to the deferred request", REPLY_TIMEOUT, async {
        loop {
            let reply = free.next_reply(REPLY_TIMEOUT).await.unwrap();
            if reply.document.is_final() {
                break reply;
            }
            notices.push(reply.document);
        }
    })
    .await;
    assert!(!notices.is_empty(), "a deferred notice came first");
    assert!(notices
        .iter()
        .all(|n| n.deferred.as_ref().unwrap().reason == "overloaded"));
    assert_eq!(reply.document.status, ReplyStatus::Error);
    let code = reply.document.error.as_ref().unwrap().code;
    assert!(
        matches!(code, ErrorCode::RateLimited | ErrorCode::Expired),
        "a deferral that would pass the deadline is final: {code:?}"
    );

    // The pro tier is served as usual, not degraded.
    let mut pro = kiln::submit::Producer::connect(&settings.amqp.url, &app.topology.tier_queue("pro"))
        .await
        .unwrap();
    let reply = pro.request(&old(4), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    assert!(reply.document.degraded.is_none());
    assert_eq!(reply.document.image.as_ref().unwrap().width, 256);
    app.stop().await;
}

/// `kiln_requests_expired_total{stage="batcher"}` as the process's metrics say now.
fn batcher_expiries() -> u64 {
    kiln::metrics::render()
        .lines()
        .find_map(|line| line.strip_prefix("kiln_requests_expired_total{stage=\"batcher\"} "))
        .map_or(0, |value| value.trim().parse::<f64>().unwrap() as u64)
}
