//! What a tokenizer folder says besides the vocabulary: the special tokens, the added tokens that
//! are cut out of the text before anything else, `model_max_length`, and the padding and truncation
//! sides, resolved the way `CLIPTokenizer.from_pretrained` (transformers 4.57.6) resolves them:
//!
//! - `tokenizer_config.json` gives the values (a token is a string or an `AddedToken` object);
//! - when it has no `added_tokens_decoder` (the legacy layout of SD 1.x/2.x folders),
//!   `special_tokens_map.json` overrides it (this is how SD 2.x gets its pad token `!`), and the added
//!   tokens of `added_tokens.json` and `tokenizer.json` (if present) join them;
//! - tokens left unset take CLIPTokenizer's defaults (`<|startoftext|>`; `<|endoftext|>` for eos,
//!   pad and unk), and every special token becomes an added token with its vocabulary id.
//!
//! Unlike transformers, a special token missing from the vocabulary is an error (it would get an id
//! the text encoder has no embedding for), and so is a missing or unusable `model_max_length`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::added_tokens::AddedToken;
use super::files::{invalid, read_json_optional};
use super::TokenizerError;

/// The special-token keys, in transformers' order (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];
const ADDITIONAL: &str = "additional_special_tokens";
/// The longest `model_max_length` taken as a real length (CLIP's is 77; transformers' "no limit"
/// placeholder is 1e30).
const MAX_LENGTH_LIMIT: u64 = 1 << 16;

/// The folder's settings, ready to tokenize with.
#[derive(Debug)]
pub(super) struct Config {
    pub(super) bos: u32,
    pub(super) eos: u32,
    pub(super) pad: u32,
    pub(super) unk: u32,
    /// Every special token (bos, eos, unk, pad, ..., the additional ones) by content, without repeats.
    pub(super) special: Vec<(String, u32)>,
    /// Cut out of the text first (unless `split_special_tokens`), longest first at each position.
    pub(super) added: Vec<AddedToken>,
    pub(super) split_special_tokens: bool,
    pub(super) max_length: usize,
    pub(super) pad_left: bool,
    pub(super) truncate_left: bool,
    /// Decoding removes the space before `.`, `,`, `!`, `?` and English contractions.
    pub(super) clean_up_tokenization_spaces: bool,
}

/// Reads the folder's JSON files (the vocabulary is already read) and resolves the tokens.
pub(super) fn load(dir: &Path, vocab: &HashMap<String, u32>) -> Result<Config, TokenizerError> {
    let config_path = dir.join("tokenizer_config.json");
    let mut values = read_json_optional::<Map<String, Value>>(&config_path)?.unwrap_or_default();
    let mut decoder: Vec<(u32, AddedToken)> = Vec::new();
    if let Some(saved) = values.get("added_tokens_decoder") {
        let saved = saved
            .as_object()
            .ok_or_else(|| invalid(&config_path, "added_tokens_decoder is not an object"))?;
        for (id, token) in saved {
            let id = id
                .parse()
                .map_err(|_| invalid(&config_path, format!("added token id {id:?}")))?;
            decoder.push((
                id,
                AddedToken::from_json(token, id).map_err(|e| invalid(&config_path, e))?,
            ));
        }
    } else {
        legacy_files(dir, &mut values, &mut decoder)?;
    }
    let token = |key: &str| -> Result<Option<AddedToken>, TokenizerError> {
        let default = match key {
            "bos_token" => Some("<|startoftext|>"),
            "eos_token" | "unk_token" | "pad_token" => Some("<|endoftext|>"),
            _ => None,
        };
        match values.get(key) {
            None => Ok(default.map(AddedToken::plain)),
            Some(Value::Null) => Ok(None),
            Some(value) => AddedToken::from_json(value, 0)
                .map(Some)
                .map_err(|e| invalid(&config_path, e)),
        }
    };
    let mut specials: Vec<(&str, AddedToken)> = Vec::new();
    for key in SPECIAL_KEYS {
        specials.extend(token(key)?.map(|t| (key, t)));
    }
    for value in values.get(ADDITIONAL).and_then(Value::as_array).into_iter().flatten() {
        specials.push((
            ADDITIONAL,
            AddedToken::from_json(value, 0).map_err(|e| invalid(&config_path, e))?,
        ));
    }

    // `_added_tokens_encoder`: content → id, a later entry winning; then each special token not in it
    // joins with its vocabulary id (an `added_tokens_decoder` entry of the same content keeps its flags).
    let mut ids: HashMap<String, u32> = decoder.iter().map(|(id, t)| (t.content.clone(), *id)).collect();
    let mut added: Vec<AddedToken> = decoder.into_iter().map(|(_, t)| t).collect();
    for (key, mut token) in specials.iter().cloned() {
        if ids.contains_key(&token.content) {
            continue;
        }
        token.id = *vocab
            .get(&token.content)
            .ok_or_else(|| invalid(dir, format!("{key} {:?} is not in vocab.json", token.content)))?;
        ids.insert(token.content.clone(), token.id);
        added.push(token);
    }
    // A content listed twice is cut out with the flags of the id it converts to.
    added.retain(|t| ids[&t.content] == t.id);
    let id_of = |key: &str| -> Result<u32, TokenizerError> {
        let (_, token) = specials.iter().find(|(k, _)| *k == key).ok_or_else(|| {
            invalid(
                &config_path,
                format!("{key} is null (here or in special_tokens_map.json); CLIP ids need it"),
            )
        })?;
        Ok(ids[&token.content])
    };
    let mut special: Vec<(String, u32)> = Vec::new();
    for (_, token) in &specials {
        if !special.iter().any(|(content, _)| *content == token.content) {
            special.push((token.content.clone(), ids[&token.content]));
        }
    }
    Ok(Config {
        special,
        bos: id_of("bos_token")?,
        eos: id_of("eos_token")?,
        pad: id_of("pad_token")?,
        unk: id_of("unk_token")?,
        added,
        split_special_tokens: flag(&values, "split_special_tokens", &config_path)?,
        max_length: max_length(&values, &config_path)?,
        pad_left: side(&values, "padding_side", &config_path)?,
        truncate_left: side(&values, "truncation_side", &config_path)?,
        clean_up_tokenization_spaces: flag(&values, "clean_up_tokenization_spaces", &config_path)?,
    })
}

/// The legacy files: `special_tokens_map.json` overrides the config's tokens (its
/// `additional_special_tokens` are appended, without repeats); `added_tokens.json` (content → id) and
/// `tokenizer.json`'s `added_tokens` become added tokens.
fn legacy_files(
    dir: &Path,
    values: &mut Map<String, Value>,
    decoder: &mut Vec<(u32, AddedToken)>,
) -> Result<(), TokenizerError> {
    let map_path = dir.join("special_tokens_map.json");
    for (key, value) in read_json_optional::<Map<String, Value>>(&map_path)?.unwrap_or_default() {
        if key == ADDITIONAL && value.is_array() {
            let mut list = values
                .remove(ADDITIONAL)
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default();
            for token in value.as_array().into_iter().flatten() {
                let content = |v: &Value| AddedToken::from_json(v, 0).ok().map(|t| t.content);
                if !list.iter().any(|t| content(t) == content(token)) {
                    list.push(token.clone());
                }
            }
            values.insert(key, Value::Array(list));
        } else {
            values.insert(key, value);
        }
    }
    let added_path = dir.join("added_tokens.json");
    for (content, id) in read_json_optional::<HashMap<String, u32>>(&added_path)?.unwrap_or_default() {
        decoder.push((
            id,
            AddedToken {
                id,
                ..AddedToken::plain(&content)
            },
        ));
    }
    let fast_path = dir.join("tokenizer.json");
    if let Some(fast) = read_json_optional::<Map<String, Value>>(&fast_path)? {
        for token in fast.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
            let id = token
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok());
            let id = id.ok_or_else(|| invalid(&fast_path, "an added token without an id"))?;
            decoder.push((
                id,
                AddedToken::from_json(token, id).map_err(|e| invalid(&fast_path, e))?,
            ));
        }
    }
    Ok(())
}

fn max_length(values: &Map<String, Value>, path: &Path) -> Result<usize, TokenizerError> {
    let value = values
        .get("model_max_length")
        .ok_or_else(|| invalid(path, "no model_max_length"))?;
    match value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    }) {
        Some(n @ 3..=MAX_LENGTH_LIMIT) => Ok(n as usize),
        _ => Err(invalid(
            path,
            format!("model_max_length {value} is not a length from 3 to {MAX_LENGTH_LIMIT}"),
        )),
    }
}

/// `true` for `"left"`; `"right"` (the default) is `false`.
fn side(values: &Map<String, Value>, key: &str, path: &Path) -> Result<bool, TokenizerError> {
    match values.get(key).map(|v| v.as_str()) {
        None | Some(Some("right")) => Ok(false),
        Some(Some("left")) => Ok(true),
        Some(_) => Err(invalid(path, format!("{key} is neither \"left\" nor \"right\""))),
    }
}

fn flag(values: &Map<String, Value>, key: &str, path: &Path) -> Result<bool, TokenizerError> {
    match values.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(value) => value
            .as_bool()
            .ok_or_else(|| invalid(path, format!("{key} is not a boolean"))),
    }
}
