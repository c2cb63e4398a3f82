//! A look at a few fields of a body before it is parsed for real: its `version` (a v2 document is
//! told "unsupported version", not "unknown field"), the ids an error reply carries, and whether the
//! prompts are text (`invalid_prompt`, not `malformed_request`).
//!
//! No document tree is built: every other value is skipped as it is read. A generic
//! `serde_json::Value` of `[0,0,0,…]` holds 16 bytes or more per byte of the body, so probing with
//! one let a 32 MiB request take over 500 MiB before it was refused; a probe's memory is the text
//! of the fields it keeps (found by fuzzing: `fuzz/`, RELIABILITY.md).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::error::{ErrorCode, RequestError};
use super::request::CONTRACT_VERSION;

/// What a probe keeps of a value: text and numbers as they are, anything else only its kind.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Peek {
    /// A string.
    Text(String),
    /// A number.
    Number(serde_json::Number),
    /// `null`, `true`, `false`, `an array` or `an object`: what it was, for messages.
    Other(&'static str),
}

impl Peek {
    /// The text, when it is a string.
    pub(super) fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            _ => None,
        }
    }
}

impl fmt::Display for Peek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(text) => write!(f, "{}", serde_json::Value::from(text.as_str())),
            Self::Number(n) => write!(f, "{n}"),
            Self::Other(kind) => f.write_str(kind),
        }
    }
}

impl<'de> Deserialize<'de> for Peek {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PeekVisitor;

        impl<'de> Visitor<'de> for PeekVisitor {
            type Value = Peek;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Peek, E> {
                Ok(Peek::Other(if v { "true" } else { "false" }))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Peek, E> {
                Ok(Peek::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Peek, E> {
                Ok(Peek::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Peek, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Peek::Other("a number"), Peek::Number))
            }
            fn visit_str<E>(self, v: &str) -> Result<Peek, E> {
                Ok(Peek::Text(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Peek, E> {
                Ok(Peek::Text(v))
            }
            fn visit_unit<E>(self) -> Result<Peek, E> {
                Ok(Peek::Other("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Peek, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Peek::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Peek, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Peek::Other("an object"))
            }
        }

        deserializer.deserialize_any(PeekVisitor)
    }
}

/// The fields of a request or cancel body looked at before it is parsed.
#[derive(Debug, Default)]
pub(super) struct Probe {
    /// `version`.
    pub version: Option<Peek>,
    /// `request_id`.
    pub request_id: Option<Peek>,
    /// `model`.
    pub model: Option<Peek>,
    /// `params.prompt`, when `params` is an object.
    pub prompt: Option<Peek>,
    /// `params.negative_prompt`, when `params` is an object.
    pub negative_prompt: Option<Peek>,
}

impl Probe {
    /// Probe `body`: `malformed_request` when it is not one JSON object. A key given twice counts
    /// once, its last value (the real parse refuses duplicates).
    pub(super) fn read(body: &[u8]) -> Result<Self, RequestError> {
        let malformed = |e: serde_json::Error| {
            RequestError::new(
                ErrorCode::MalformedRequest,
                format!("the body is not a JSON object: {e}"),
            )
        };
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let mut probe = Probe::default();
        deserializer
            .deserialize_map(BodyVisitor(&mut probe))
            .map_err(malformed)?;
        deserializer.end().map_err(malformed)?;
        Ok(probe)
    }

    /// A contract document's `version` comes before anything else: present, an integer, this one.
    pub(super) fn check_version(&self) -> Result<(), RequestError> {
        match &self.version {
            None => Err(RequestError::new(
                ErrorCode::MalformedRequest,
                "missing field `version`",
            )),
            Some(Peek::Number(n)) if n.as_u64() == Some(u64::from(CONTRACT_VERSION)) => Ok(()),
            Some(Peek::Number(n)) => Err(RequestError::new(
                ErrorCode::UnsupportedVersion,
                format!("version {n} is not supported; this worker speaks version {CONTRACT_VERSION}"),
            )),
            Some(other) => Err(RequestError::new(
                ErrorCode::MalformedRequest,
                format!("`version` must be an integer, got {other}"),
            )),
        }
    }

    /// A prompt that is not text is `invalid_prompt`, not a malformed document.
    pub(super) fn check_prompt_types(&self) -> Result<(), RequestError> {
        for (field, value) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
            match value {
                None | Some(Peek::Text(_)) => {}
                Some(other) => {
                    return Err(RequestError::new(
                        ErrorCode::InvalidPrompt,
                        format!("params.{field} must be text, got {other}"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The keys a probe looks at; any other is skipped.
enum Key {
    Version,
    RequestId,
    Model,
    Params,
    Prompt,
    NegativePrompt,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "version" => Key::Version,
                    "request_id" => Key::RequestId,
                    "model" => Key::Model,
                    "params" => Key::Params,
                    "prompt" => Key::Prompt,
                    "negative_prompt" => Key::NegativePrompt,
                    _ => Key::Other,
                })
            }
        }

        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The body: an object whose `version`, `request_id`, `model` and `params` are looked at.
struct BodyVisitor<'a>(&'a mut Probe);

impl<'de> Visitor<'de> for BodyVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Version => self.0.version = Some(map.next_value()?),
                Key::RequestId => self.0.request_id = Some(map.next_value()?),
                Key::Model => self.0.model = Some(map.next_value()?),
                Key::Params => map.next_value_seed(ParamsSeed(self.0))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// `params`: when it is an object, its `prompt` and `negative_prompt`; anything else is skipped.
struct ParamsSeed<'a>(&'a mut Probe);

impl<'de> DeserializeSeed<'de> for ParamsSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // A second `params` replaces the first, as with any other key.
        self.0.prompt = None;
        self.0.negative_prompt = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Prompt => self.0.prompt = Some(map.next_value()?),
                Key::NegativePrompt => self.0.negative_prompt = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_it_looks_at_and_skips_the_rest() {
        let probe = Probe::read(
            br#"{"x":[1,{"version":9}],"version":1,"request_id":"r-1","model":"m",
                 "params":{"prompt":"a cat","negative_prompt":[1,2],"style":{"prompt":3}}}"#,
        )
        .unwrap();
        assert_eq!(probe.version, Some(Peek::Number(1.into())));
        assert_eq!(probe.request_id.as_ref().and_then(Peek::as_text), Some("r-1"));
        assert_eq!(probe.model.as_ref().and_then(Peek::as_text), Some("m"));
        assert_eq!(probe.prompt, Some(Peek::Text("a cat".into())));
        assert_eq!(probe.negative_prompt, Some(Peek::Other("an array")));
        assert_eq!(probe.check_prompt_types().unwrap_err().code, ErrorCode::InvalidPrompt);
    }

    #[test]
    fn what_is_not_one_object_is_malformed() {
        for body in [
            &b"[1]"[..],
            b"\"version\"",
            b"{\"version\":1} {}",
            b"{\"version\":1",
            b"\xff",
        ] {
            assert_eq!(Probe::read(body).unwrap_err().code, ErrorCode::MalformedRequest);
        }
    }

    #[test]
    fn versions_are_told_apart() {
        let code = |body: &[u8]| Probe::read(body).unwrap().check_version().map_err(|e| e.code);
        assert_eq!(code(br#"{"version":1}"#), Ok(()));
        assert_eq!(code(br#"{"version":2}"#), Err(ErrorCode::UnsupportedVersion));
        assert_eq!(code(br#"{"version":1.5}"#), Err(ErrorCode::UnsupportedVersion));
        assert_eq!(code(br#"{"version":"1"}"#), Err(ErrorCode::MalformedRequest));
        assert_eq!(code(br#"{"version":null}"#), Err(ErrorCode::MalformedRequest));
        assert_eq!(code(br#"{"versions":1}"#), Err(ErrorCode::MalformedRequest));
    }
}
