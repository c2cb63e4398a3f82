//! The published contract (schemas/) and the worker agree: the examples parse or are refused as
//! the schema says, and what the worker and `kiln submit` put on the wire validates.

use std::path::Path;

use kiln::configuration::ModelSettings;
use kiln::domain::{GenerationRequest, WireStyle};
use kiln::inference::ModelRegistry;
use serde_json::Value;

use crate::helpers::{read, repo, request, spawn_app, REPLY_TIMEOUT};

/// Panic unless `doc` validates against the published reply schema.
pub fn assert_valid_reply(doc: &kiln::domain::ReplyDocument) {
    let value = serde_json::to_value(doc).unwrap();
    let errors: Vec<String> = schema("reply.v1.schema.json")
        .iter_errors(&value)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{value}: {errors:?}");
}

/// Panic unless `doc` validates against the published request schema.
pub fn assert_valid_request(doc: &kiln::domain::RequestDocument) {
    let value = serde_json::to_value(doc).unwrap();
    let errors: Vec<String> = schema("request.v1.schema.json")
        .iter_errors(&value)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{}: {errors:?}", doc.request_id);
}

fn schema(file: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_slice(&read(&format!("schemas/{file}"))).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn examples(dir: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json") && p.file_name().unwrap().to_string_lossy().starts_with(prefix)
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_worker_accepts_every_valid_example_and_refuses_every_invalid_one() {
    let registry = ModelRegistry::load(
        &ModelSettings {
            dir: repo().join("models"),
            ..Default::default()
        },
        &Default::default(),
    )
    .unwrap();
    let check = |body: &[u8]| -> Result<(), String> {
        let request = GenerationRequest::parse(body, 1 << 20).map_err(|(e, _)| e.to_string())?;
        registry.prepare(&request).map(drop).map_err(|e| e.to_string())
    };
    let valid = examples(&repo().join("schemas/examples"), "request-");
    assert!(valid.len() >= 3);
    for (name, body) in &valid {
        check(body).unwrap_or_else(|e| panic!("{name} is valid but refused: {e}"));
    }
    let invalid = examples(&repo().join("schemas/examples/invalid"), "request-");
    assert!(invalid.len() >= 20);
    for (name, body) in &invalid {
        assert!(check(body).is_err(), "{name} is invalid but accepted");
    }
}

#[tokio::test]
async fn what_goes_on_the_wire_validates_against_the_published_schemas() {
    let request_schema = schema("request.v1.schema.json");
    let reply_schema = schema("reply.v1.schema.json");
    let app = spawn_app().await;
    let mut producer = app.producer().await;

    let good = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(4)));
    // Valid by the schema, refused by the worker: its deadline has passed.
    let mut bad = request(&read("tests/data/astronaut-256.png"), Some(WireStyle::Index(4)));
    bad.deadline = Some("2020-01-01T00:00:00Z".into());
    for req in [&good, &bad] {
        let sent = serde_json::to_value(req).unwrap();
        assert!(
            request_schema.is_valid(&sent),
            "{:?}",
            request_schema
                .iter_errors(&sent)
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        );
        let reply = producer.request(req, REPLY_TIMEOUT).await.unwrap();
        assert_eq!(reply.document.error.is_some(), std::ptr::eq(req, &bad));
        let doc = serde_json::to_value(&reply.document).unwrap();
        let errors: Vec<String> = reply_schema
            .iter_errors(&doc)
            .map(|e| format!("{e} at {}", e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{doc}: {errors:?}");
    }
    producer.close().await;
    app.stop().await;
}
