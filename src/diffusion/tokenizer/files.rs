//! Reading a tokenizer folder's files, with errors that name the file.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::TokenizerError;

/// A file's content is not what CLIPTokenizer accepts.
pub(super) fn invalid(path: &Path, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The whole file as UTF-8 text.
pub(super) fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|e| TokenizerError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, TokenizerError> {
    serde_json::from_str(text).map_err(|e| invalid(path, e.to_string()))
}

/// A JSON file that must exist.
pub(super) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, TokenizerError> {
    parse(path, &read_text(path)?)
}

/// A JSON file that may be absent (`None`); any other failure is an error.
pub(super) fn read_json_optional<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text).map(Some),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TokenizerError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// `vocab.json`: token → id (CLIP's run from 0 to 49407).
pub(super) fn read_vocab(path: &Path) -> Result<HashMap<String, u32>, TokenizerError> {
    let vocab: HashMap<String, u32> = read_json(path)?;
    if vocab.is_empty() {
        return Err(invalid(path, "the vocabulary is empty"));
    }
    Ok(vocab)
}
