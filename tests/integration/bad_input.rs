//! Bad input gets a clear error reply with a stable code, and the request is acknowledged: never
//! requeued, never lost.

use kiln::domain::{ErrorCode, ReplyDocument, ReplyStatus, WireImage, WireStyle};
use serde_json::json;

use crate::helpers::{read, ready_messages, request, spawn_app, spawn_app_with, REPLY_TIMEOUT};

/// A PNG that claims to be 100 000 × 100 000 pixels (30 GB of RGB) in a few dozen bytes.
fn png_bomb() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut png, b"IEND", &[]);
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn small_png(side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(side, side, image::Rgb([10, 20, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn every_kind_of_bad_request_gets_its_error_code_and_is_acknowledged() {
    let photo = read("tests/data/astronaut-256.png");
    let valid = serde_json::to_value(request(&photo, Some(WireStyle::Index(1)))).unwrap();
    let with = |path: &[&str], value: serde_json::Value| {
        let mut v = valid.clone();
        let mut at = &mut v;
        for key in &path[..path.len() - 1] {
            at = at.as_object_mut().unwrap().entry(key.to_string()).or_insert(json!({}));
        }
        at[path[path.len() - 1]] = value;
        serde_json::to_vec(&v).unwrap()
    };
    let without = |key: &str| {
        let mut v = valid.clone();
        v.as_object_mut().unwrap().remove(key);
        serde_json::to_vec(&v).unwrap()
    };
    let mut truncated = photo.clone();
    truncated.truncate(photo.len() / 3);
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "binary garbage",
            vec![0xff, 0xfe, 0x00, 0x13],
            ErrorCode::MalformedRequest,
        ),
        (
            "not JSON",
            b"stylize my cat please".to_vec(),
            ErrorCode::MalformedRequest,
        ),
        ("a JSON array", b"[1, 2]".to_vec(), ErrorCode::MalformedRequest),
        ("version 2", with(&["version"], json!(2)), ErrorCode::UnsupportedVersion),
        (
            "version as a string",
            with(&["version"], json!("1")),
            ErrorCode::MalformedRequest,
        ),
        ("missing user_id", without("user_id"), ErrorCode::MalformedRequest),
        ("missing image", without("image"), ErrorCode::InvalidImage),
        (
            "unknown field",
            with(&["colour"], json!("red")),
            ErrorCode::MalformedRequest,
        ),
        (
            "unknown param",
            with(&["params", "sampler"], json!("euler")),
            ErrorCode::MalformedRequest,
        ),
        (
            "a diffusion param for a style model",
            with(&["params", "steps"], json!(30)),
            ErrorCode::InvalidParams,
        ),
        (
            "request_id with a space",
            with(&["request_id"], json!("a b")),
            ErrorCode::InvalidRequest,
        ),
        (
            "user_id with a newline",
            with(&["user_id"], json!("eve\nadmin")),
            ErrorCode::InvalidRequest,
        ),
        (
            "deadline not RFC 3339",
            with(&["deadline"], json!("tomorrow")),
            ErrorCode::InvalidRequest,
        ),
        (
            "unknown model",
            with(&["model"], json!("stable-diffusion")),
            ErrorCode::UnknownModel,
        ),
        (
            "style 26",
            with(&["params", "style"], json!(26)),
            ErrorCode::UnknownStyle,
        ),
        (
            "blend with style 40",
            with(&["params", "style"], json!({"3": 1, "40": 1})),
            ErrorCode::UnknownStyle,
        ),
        (
            "all-zero blend",
            with(&["params", "style"], json!({"3": 0})),
            ErrorCode::InvalidParams,
        ),
        (
            "strength 2",
            with(&["params", "strength"], json!(2.0)),
            ErrorCode::InvalidParams,
        ),
        (
            "size over the limit",
            with(&["params", "size"], json!(99_999)),
            ErrorCode::InvalidParams,
        ),
        (
            "style_image for multistyle26",
            with(
                &["params", "style_image"],
                json!({"data": WireImage::from_bytes(&photo).data}),
            ),
            ErrorCode::InvalidParams,
        ),
        (
            "arbitrary-style without style_image",
            {
                let mut v = valid.clone();
                v["model"] = json!("arbitrary-style");
                v["params"] = json!({});
                serde_json::to_vec(&v).unwrap()
            },
            ErrorCode::InvalidParams,
        ),
        (
            "image not base64",
            with(&["image", "data"], json!("@@@@")),
            ErrorCode::InvalidImage,
        ),
        (
            "image not an image",
            with(&["image", "data"], json!(WireImage::from_bytes(b"hello world").data)),
            ErrorCode::InvalidImage,
        ),
        (
            "GIF",
            with(&["image", "data"], json!(WireImage::from_bytes(&gif).data)),
            ErrorCode::InvalidImage,
        ),
        (
            "truncated PNG",
            with(&["image", "data"], json!(WireImage::from_bytes(&truncated).data)),
            ErrorCode::InvalidImage,
        ),
        (
            "decompression bomb",
            with(&["image", "data"], json!(WireImage::from_bytes(&png_bomb()).data)),
            ErrorCode::ImageTooLarge,
        ),
        (
            "16x16 image",
            with(&["image", "data"], json!(WireImage::from_bytes(&small_png(16)).data)),
            ErrorCode::ImageTooSmall,
        ),
        (
            "deadline passed",
            with(&["deadline"], json!("2020-01-01T00:00:00Z")),
            ErrorCode::Expired,
        ),
    ];

    let mut app = spawn_app().await;
    let mut producer = app.producer().await;
    for (name, body, code) in &cases {
        let correlation = uuid::Uuid::new_v4().to_string();
        producer.send_raw(body, &correlation).await.unwrap();
        let reply = producer.reply_to(&correlation, REPLY_TIMEOUT).await.unwrap();
        let doc = &reply.document;
        assert_eq!(doc.status, ReplyStatus::Error, "{name}");
        let error = doc.error.as_ref().unwrap();
        assert_eq!(error.code, *code, "{name}: {}", error.message);
        assert!(!error.message.is_empty(), "{name}");
        assert!(doc.image.is_none(), "{name}");
        // The body of an error reply is the same document, for consumers that ignore headers.
        let body_doc: ReplyDocument = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(&body_doc, doc, "{name}");
    }
    // Ids survive a request that fails after parsing, so producers can correlate by id too.
    let correlation = uuid::Uuid::new_v4().to_string();
    producer
        .send_raw(&with(&["params", "style"], json!(99)), &correlation)
        .await
        .unwrap();
    let reply = producer.reply_to(&correlation, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(
        reply.document.request_id,
        valid["request_id"].as_str().map(str::to_owned)
    );
    assert_eq!(reply.document.model.as_deref(), Some("multistyle26"));

    producer.close().await;
    app.shutdown().await;
    // Stopping the worker would return any unacknowledged request to the queue: none is there.
    assert_eq!(ready_messages(&app.topology.requests).await, 0);
    assert_eq!(ready_messages(&app.topology.dead_letter_queue).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_unread() {
    let app = spawn_app_with(|s| s.limits.max_message_bytes = 10_000).await;
    let mut producer = app.producer().await;
    let req = request(&read("tests/data/astronaut-256.png"), None);
    let reply = producer.request(&req, REPLY_TIMEOUT).await.unwrap();
    let error = reply.document.error.unwrap();
    assert_eq!(error.code, ErrorCode::MessageTooLarge);
    assert!(error.message.contains("10000"), "{}", error.message);
    producer.close().await;
    app.stop().await;
}
