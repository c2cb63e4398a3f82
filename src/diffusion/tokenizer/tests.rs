//! The tokenizer against transformers' CLIPTokenizer with ftfy
//! (tests/data/diffusion/tokenizer_cases.json, from make_tokenizer_cases.py next to it).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ClipTokenizer, TokenizerError};

#[derive(Deserialize)]
struct Fixture {
    tokenizer_dir: String,
    max_length: usize,
    sd2_pad: Sd2Files,
    cases: Vec<Case>,
    sd2_pad_cases: Vec<Case>,
    known_differences: Vec<Case>,
}

#[derive(Deserialize)]
struct Sd2Files {
    special_tokens_map: serde_json::Value,
    tokenizer_config: serde_json::Value,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    /// CLIPTokenizer's ids (with ftfy); for a known difference, kiln's.
    ids: Vec<i64>,
    truncated: bool,
    tokens_used: usize,
    tokens_dropped: usize,
    /// `tokenizer.decode(ids, skip_special_tokens=True)`.
    decoded: String,
    /// For a known difference: CLIPTokenizer's ids.
    python_ids: Option<Vec<i64>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> Fixture {
    let path = root().join("tests/data/diffusion/tokenizer_cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("tokenizer_cases.json")).expect("fixture")
}

/// Every case whose encoding is not what the fixture says, described.
fn mismatches<'a>(tokenizer: &ClipTokenizer, cases: impl IntoIterator<Item = &'a Case>) -> Vec<String> {
    let mut wrong = Vec::new();
    for case in cases {
        let got = tokenizer.encode(&case.text);
        let decoded = tokenizer.decode(&got.ids);
        let want = (
            &case.ids,
            case.truncated,
            case.tokens_used,
            case.tokens_dropped,
            &case.decoded,
        );
        if want != (&got.ids, got.truncated, got.tokens_used, got.tokens_dropped, &decoded) {
            wrong.push(format!(
                "{} {:?}:\n  want {want:?}\n  got  {:?}",
                case.name,
                case.text,
                (&got.ids, got.truncated, got.tokens_used, got.tokens_dropped, &decoded)
            ));
        }
    }
    wrong
}

#[test]
fn ids_match_clip_tokenizer_with_ftfy() {
    let fixture = fixture();
    let tokenizer = ClipTokenizer::from_dir(&root().join(&fixture.tokenizer_dir)).unwrap();
    assert_eq!(tokenizer.max_length(), fixture.max_length);
    assert!(fixture.cases.len() >= 150);
    let wrong = mismatches(&tokenizer, &fixture.cases);
    assert!(
        wrong.is_empty(),
        "{} of {} cases differ:\n{}",
        wrong.len(),
        fixture.cases.len(),
        wrong.join("\n")
    );
}

#[test]
fn known_differences_stay_as_documented() {
    let fixture = fixture();
    let tokenizer = ClipTokenizer::from_dir(&root().join(&fixture.tokenizer_dir)).unwrap();
    assert!(!fixture.known_differences.is_empty());
    for case in &fixture.known_differences {
        let python = case.python_ids.as_ref().expect("python_ids");
        assert_ne!(python, &case.ids, "{} is no difference", case.name);
    }
    let wrong = mismatches(&tokenizer, &fixture.known_differences);
    assert!(wrong.is_empty(), "known differences changed:\n{}", wrong.join("\n"));
}

/// A scratch folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-tokenizer-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_vocabulary(from: &Path, to: &Path) {
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

#[test]
fn sd2_pad_token_comes_from_special_tokens_map_and_splits_the_text() {
    let fixture = fixture();
    let dir = TempDir::new("sd2");
    copy_vocabulary(&root().join(&fixture.tokenizer_dir), &dir.0);
    let write = |file: &str, value: &serde_json::Value| std::fs::write(dir.0.join(file), value.to_string()).unwrap();
    write("special_tokens_map.json", &fixture.sd2_pad.special_tokens_map);
    write("tokenizer_config.json", &fixture.sd2_pad.tokenizer_config);
    let tokenizer = ClipTokenizer::from_dir(&dir.0).unwrap();
    let wrong = mismatches(&tokenizer, &fixture.sd2_pad_cases);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn errors_name_the_file() {
    let dir = TempDir::new("errors");
    let error = |dir: &Path| ClipTokenizer::from_dir(dir).unwrap_err();
    assert!(matches!(error(&dir.0), TokenizerError::Read { path, .. } if path.ends_with("vocab.json")));

    copy_vocabulary(&root().join("models/sd-tiny-random/tokenizer"), &dir.0);
    let err = error(&dir.0);
    assert!(err.to_string().contains("tokenizer_config.json") && err.to_string().contains("model_max_length"));

    std::fs::write(
        dir.0.join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": "<pad>"}"#,
    )
    .unwrap();
    assert!(error(&dir.0)
        .to_string()
        .contains(r#"pad_token "<pad>" is not in vocab.json"#));

    std::fs::write(dir.0.join("special_tokens_map.json"), "{not json").unwrap();
    assert!(matches!(error(&dir.0), TokenizerError::Invalid { path, .. } if path.ends_with("special_tokens_map.json")));
}

#[test]
fn one_tokenizer_serves_many_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<ClipTokenizer>();
}
