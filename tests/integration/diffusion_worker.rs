//! Diffusion requests through the real broker (and Redis where limits matter): a prompt comes back
//! as diffusers' picture with the reply saying what was done; the same request twice gives the
//! same bytes; an edit chain from a Python producer; every bad request gets its code, is
//! acknowledged and costs nothing; a NaN is `inference_failed`, never a black PNG.

use std::collections::BTreeMap;

use kiln::domain::{ErrorCode, ReplyStatus, RequestDocument, Task, WireImage};
use kiln::rate_limit::{AtLimit, RateLimitSettings, TierSettings};
use serde_json::json;

use crate::diffusion::{case, difference, document, reference};
use crate::helpers::{
    decode_png, read, ready_messages, repo, request, spawn_app, spawn_app_with, venv_python, REPLY_TIMEOUT,
};

#[tokio::test]
async fn a_prompt_comes_back_as_diffusers_picture_and_the_reply_says_what_was_done() {
    let app = spawn_app().await;
    let mut producer = app.producer().await;
    let t2i = case("t2i-euler");
    let doc = document(&t2i);
    let reply = producer.request(&doc, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    crate::contract::assert_valid_reply(&reply.document);
    let (max, _) = difference(&decode_png(&reply.body), &reference(&t2i.reference));
    assert!(max <= 2, "{max} levels from diffusers through the worker");
    let g = reply
        .document
        .generation
        .as_ref()
        .expect("a diffusion reply says what it did");
    assert_eq!((g.task, g.scheduler.as_str(), g.seed), (Task::TextToImage, "euler", 42));
    assert_eq!((g.steps, g.steps_run, g.guidance_scale), (10, 10, 7.5));
    assert!(g.prompt_truncated.is_none());

    // The same request again: the same bytes.
    let mut again = doc.clone();
    again.request_id = format!("{}-again", doc.request_id);
    let second = producer.request(&again, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(second.body, reply.body);

    // Image to image: fewer steps run than asked, the reply says so.
    let i2i = case("i2i-euler");
    let reply = producer.request(&document(&i2i), REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    let g = reply.document.generation.unwrap();
    assert_eq!((g.task, g.steps, g.steps_run), (Task::ImageToImage, 10, 6));
    let (max, _) = difference(&decode_png(&reply.body), &reference(&i2i.reference));
    assert!(max <= 2, "{max}");
    producer.close().await;
    app.stop().await;
}

#[tokio::test]
async fn an_edit_chain_from_the_python_producer_edits_the_last_result_again() {
    let app = spawn_app().await;
    let out = std::env::temp_dir().join(format!("kiln-edit-{}.png", uuid::Uuid::new_v4()));
    // Async: the worker runs on this test's runtime.
    let output = tokio::process::Command::new(venv_python())
        .current_dir(repo())
        .arg("examples/python/producer.py")
        .args(["--queue", &app.topology.requests])
        .args(["--model", "pix2pix-tiny-random", "--steps", "4", "--seed", "7"])
        .args(["--then", "make it snow", "--then", "now at night"])
        .args(["--timeout", "120", "-o", &out.display().to_string()])
        .arg("tests/data/diffusion/chelsea-64x64.png")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    let steps = summary["steps"].as_array().expect("one entry per edit");
    assert_eq!(steps.len(), 2);
    let mut images = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        assert_eq!(step["generation"]["task"], "edit");
        assert_eq!(step["generation"]["seed"], 7);
        let path = step["out"].as_str().unwrap();
        images.push(decode_png(&std::fs::read(path).unwrap()));
        std::fs::remove_file(path).unwrap();
        assert_eq!(images[k].dimensions(), (64, 64));
    }
    // The second edit started from the first's result, not from the photo.
    assert!(difference(&images[0], &images[1]).1 > 1.0);
    app.stop().await;
}

fn tier(burst: u32) -> TierSettings {
    TierSettings {
        rate_per_minute: 1.0,
        burst,
        daily_quota: 10_000,
        max_in_flight: 100,
        at_limit: AtLimit::Reject,
    }
}

#[tokio::test]
async fn every_bad_diffusion_request_gets_its_code_is_acknowledged_and_costs_nothing() {
    let mut app = spawn_app_with(|s| {
        s.rate_limit.enabled = true;
        s.rate_limit = RateLimitSettings {
            key_prefix: s.rate_limit.key_prefix.clone(),
            default_tier: "t".into(),
            tiers: BTreeMap::from([("t".into(), tier(1000))]),
            ..Default::default()
        };
        // One unit per 64 px square and evaluation: costs are exact numbers of evaluations.
        s.rate_limit.cost.unit_pixels = 64 * 64;
        s.rate_limit.cost.evaluations_per_unit = 1;
        s.rate_limit.cost.max_units = 100_000;
    })
    .await;
    let user = format!("diffusion-{}", uuid::Uuid::new_v4().simple());
    let valid = {
        let mut doc = document(&case("t2i-euler"));
        doc.user_id = user.clone();
        serde_json::to_value(doc).unwrap()
    };
    let photo = serde_json::to_value(WireImage::from_bytes(&read("tests/data/diffusion/chelsea-64x64.png"))).unwrap();
    let with = |changes: &[(&str, serde_json::Value)]| {
        let mut v = valid.clone();
        // Each case is a request of its own (an id answered once cannot be reused for another body).
        v["request_id"] = json!(uuid::Uuid::new_v4().to_string());
        for (key, value) in changes {
            match key.strip_prefix("params.") {
                Some(param) if value.is_null() => drop(v["params"].as_object_mut().unwrap().remove(param)),
                Some(param) => v["params"][param] = value.clone(),
                None => v[*key] = value.clone(),
            }
        }
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "empty prompt",
            with(&[("params.prompt", json!("   "))]),
            ErrorCode::InvalidPrompt,
        ),
        (
            "prompt not text",
            with(&[("params.prompt", json!(7))]),
            ErrorCode::InvalidPrompt,
        ),
        (
            "no prompt",
            with(&[("params.prompt", json!(null))]),
            ErrorCode::InvalidPrompt,
        ),
        (
            "negative prompt not text",
            with(&[("params.negative_prompt", json!(["x"]))]),
            ErrorCode::InvalidPrompt,
        ),
        (
            "prompt of 5000 bytes",
            with(&[("params.prompt", json!("a".repeat(5000)))]),
            ErrorCode::InvalidPrompt,
        ),
        ("0 steps", with(&[("params.steps", json!(0))]), ErrorCode::InvalidParams),
        (
            "500 steps",
            with(&[("params.steps", json!(500))]),
            ErrorCode::InvalidParams,
        ),
        (
            "negative steps",
            with(&[("params.steps", json!(-2))]),
            ErrorCode::InvalidParams,
        ),
        (
            "guidance 50",
            with(&[("params.guidance_scale", json!(50.0))]),
            ErrorCode::InvalidParams,
        ),
        (
            "guidance -1",
            with(&[("params.guidance_scale", json!(-1.0))]),
            ErrorCode::InvalidParams,
        ),
        (
            "width 60 (not a multiple of 8)",
            with(&[("params.width", json!(60))]),
            ErrorCode::InvalidParams,
        ),
        (
            "width 72 (not a multiple of 16)",
            with(&[("params.width", json!(72))]),
            ErrorCode::InvalidParams,
        ),
        (
            "height 1024 (over the model's side)",
            with(&[("params.height", json!(1024))]),
            ErrorCode::InvalidParams,
        ),
        ("width 0", with(&[("params.width", json!(0))]), ErrorCode::InvalidParams),
        (
            "unknown scheduler",
            with(&[("params.scheduler", json!("pndm"))]),
            ErrorCode::UnknownScheduler,
        ),
        (
            "a scheduler the model does not allow",
            with(&[
                ("model", json!("lcm-tiny-random")),
                ("params.scheduler", json!("euler")),
            ]),
            ErrorCode::UnknownScheduler,
        ),
        (
            "unknown task",
            with(&[("params.task", json!("inpaint"))]),
            ErrorCode::UnsupportedTask,
        ),
        (
            "edit on a text-to-image model",
            with(&[("params.task", json!("edit"))]),
            ErrorCode::UnsupportedTask,
        ),
        (
            "text to image on an edit model",
            with(&[("model", json!("pix2pix-tiny-random"))]),
            ErrorCode::UnsupportedTask,
        ),
        (
            "image to image without an image",
            with(&[("params.task", json!("image_to_image"))]),
            ErrorCode::InvalidImage,
        ),
        (
            "edit without an image",
            with(&[("model", json!("pix2pix-tiny-random")), ("params.task", json!("edit"))]),
            ErrorCode::InvalidImage,
        ),
        (
            "text to image with an image",
            with(&[("image", photo.clone())]),
            ErrorCode::InvalidParams,
        ),
        (
            "seed 2^32",
            with(&[("params.seed", json!(4_294_967_296u64))]),
            ErrorCode::InvalidParams,
        ),
        ("seed -1", with(&[("params.seed", json!(-1))]), ErrorCode::InvalidParams),
        (
            "seed 1.5",
            with(&[("params.seed", json!(1.5))]),
            ErrorCode::InvalidParams,
        ),
        (
            "a style for a diffusion model",
            with(&[("params.style", json!(3))]),
            ErrorCode::InvalidParams,
        ),
        (
            "strength for text to image",
            with(&[("params.strength", json!(0.5))]),
            ErrorCode::InvalidParams,
        ),
        (
            "image guidance for text to image",
            with(&[("params.image_guidance_scale", json!(1.5))]),
            ErrorCode::InvalidParams,
        ),
        (
            "a strength that runs no step",
            with(&[
                ("params.task", json!("image_to_image")),
                ("image", photo.clone()),
                ("params.strength", json!(0.05)),
            ]),
            ErrorCode::InvalidParams,
        ),
    ];

    let mut producer = app.producer().await;
    for (name, body, code) in &cases {
        let correlation = uuid::Uuid::new_v4().to_string();
        producer.send_raw(body, &correlation).await.unwrap();
        let reply = producer.reply_to(&correlation, REPLY_TIMEOUT).await.unwrap();
        let doc = &reply.document;
        let error = doc
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: answered {:?}", doc.status));
        assert_eq!(error.code, *code, "{name}: {}", error.message);
        assert!(doc.image.is_none() && doc.generation.is_none(), "{name}");
        crate::contract::assert_valid_reply(doc);
    }
    // A prompt to a style model is refused too.
    let mut styled = request(&read("tests/data/astronaut-256.png"), None);
    styled.params.prompt = Some("a cat".into());
    styled.user_id = user.clone();
    let reply = producer.request(&styled, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.error.unwrap().code, ErrorCode::InvalidParams);

    // Nothing was charged: the first valid request finds the whole burst, and costs its
    // evaluations (64 px, 10 steps × 2 rows with guidance = 20 units), 10 without guidance.
    let ok: RequestDocument = serde_json::from_value(valid.clone()).unwrap();
    let reply = producer.request(&ok, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    assert_eq!(reply.document.rate_limit.as_ref().unwrap().remaining, 1000 - 20);
    let mut unguided = ok.clone();
    unguided.request_id.push_str("-unguided");
    unguided.params.guidance_scale = Some(1.0);
    let reply = producer.request(&unguided, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.rate_limit.as_ref().unwrap().remaining, 1000 - 20 - 10);

    producer.close().await;
    app.shutdown().await;
    assert_eq!(ready_messages(&app.topology.requests).await, 0);
    assert_eq!(ready_messages(&app.topology.dead_letter_queue).await, 0);
    crate::rate_limits::forget(&app.settings.rate_limit.key_prefix).await;
    app.stop().await;
}

#[tokio::test]
async fn a_model_that_answers_nan_gets_inference_failed_never_a_black_png() {
    // sd-tiny-random with a UNet that divides by zero (tests/data/diffusion/make_nan_unet.py).
    let dir = std::env::temp_dir().join(format!("kiln-nan-{}", uuid::Uuid::new_v4().simple()));
    let model = dir.join("nan-tiny");
    copy_dir(&repo().join("models/sd-tiny-random"), &model);
    std::fs::copy(
        repo().join("tests/data/diffusion/nan-unet/model.onnx"),
        model.join("unet/model.onnx"),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(model.join("manifest.toml")).unwrap();
    std::fs::write(
        model.join("manifest.toml"),
        manifest.replace("name = \"sd-tiny-random\"", "name = \"nan-tiny\""),
    )
    .unwrap();
    let app = spawn_app_with(|s| {
        s.models.dir = dir.clone();
        s.models.enabled = vec!["nan-tiny".into()];
        s.models.warmup = false;
    })
    .await;
    let mut producer = app.producer().await;
    let mut doc = document(&case("t2i-euler"));
    doc.model = "nan-tiny".into();
    let reply = producer.request(&doc, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Error);
    let error = reply.document.error.unwrap();
    assert_eq!(error.code, ErrorCode::InferenceFailed, "{}", error.message);
    assert!(error.message.contains("finite"), "{}", error.message);
    producer.close().await;
    app.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn kiln_submit_sends_a_prompt_and_writes_the_picture() {
    let app = spawn_app().await;
    let out = std::env::temp_dir().join(format!("kiln-submit-{}.png", uuid::Uuid::new_v4()));
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(repo())
        .env("KILN_AMQP__TOPOLOGY__PREFIX", &app.settings.amqp.topology.prefix)
        .args(["submit", "--prompt", "a photo of an astronaut riding a horse on mars"])
        .args([
            "--steps",
            "10",
            "--seed",
            "42",
            "--scheduler",
            "euler",
            "--guidance-scale",
            "7.5",
        ])
        .args(["--out", &out.display().to_string()])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let image = decode_png(&std::fs::read(&out).unwrap());
    let (max, _) = difference(&image, &reference(&case("t2i-euler").reference));
    assert!(max <= 2, "{max}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("seed 42"));
    std::fs::remove_file(&out).unwrap();
    app.stop().await;
}

#[tokio::test]
async fn requests_of_one_schedule_share_a_batch_and_each_gets_its_own_picture() {
    let app = spawn_app_with(|s| {
        // Whole-request batching (step-level batching is tested in `step_batching`).
        s.batching.diffusion.mode = kiln::inference::settings::StepMode::Request;
        s.batching.max_batch_size = 4;
        // Long enough that the requests published together are all waiting when the batch forms.
        s.batching.max_queue_delay_ms = 1500;
    })
    .await;
    let mut producer = app.producer().await;
    let names = ["t2i-euler", "t2i-negative", "t2i-euler-no-guidance"];
    let mut docs: Vec<RequestDocument> = names.iter().map(|n| document(&case(n))).collect();
    // Another step count: another schedule, so another batch.
    let mut other = document(&case("t2i-euler"));
    other.request_id = "other-steps".into();
    other.params.steps = Some(9);
    docs.push(other);
    for doc in &docs {
        producer.send(doc).await.unwrap();
    }
    let mut replies = std::collections::HashMap::new();
    for _ in 0..docs.len() {
        let reply = producer.next_reply(REPLY_TIMEOUT).await.unwrap();
        replies.insert(reply.document.request_id.clone().unwrap(), reply);
    }
    for name in names {
        let reply = &replies[&format!("case-{name}")];
        assert_eq!(
            reply.document.batch_size,
            Some(3),
            "{name}: the three ten-step requests ran together"
        );
        let (max, _) = difference(&decode_png(&reply.body), &reference(&case(name).reference));
        assert!(max <= 2, "{name}: {max} levels from its own reference");
    }
    assert_eq!(replies["other-steps"].document.batch_size, Some(1));
    producer.close().await;
    app.stop().await;
}
