//! The cancel message (contract v1): a producer asks every worker to stop one request.
//!
//! It travels on the fanout exchange `<prefix>.cancel` (schema `schemas/cancel.v1.schema.json`).
//! Parse, don't validate, as for requests: [`Cancel::parse`] turns the bytes into a cancel whose
//! request id is well-formed, or into the [`RequestError`] a request would get for the same fault.
//! Nobody is answered for a cancel; the worker logs the error and drops the message.

use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, RequestError};
use super::ids::RequestId;
use super::request::{check_version, CONTRACT_VERSION};

/// The AMQP `type` property of a cancel message.
pub const CANCEL_TYPE: &str = "kiln.cancel.v1";

/// The largest cancel body a worker reads. A valid one (a 128-character id, a 256-character
/// reason) is well under it.
pub const MAX_CANCEL_BYTES: usize = 4096;

/// The cancel document exactly as it travels (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelDocument {
    /// Contract version, [`CONTRACT_VERSION`].
    pub version: u32,
    /// The `request_id` of the request to stop.
    pub request_id: String,
    /// Why, in the producer's words: for the workers' logs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl CancelDocument {
    /// A cancel of `request_id`, with an optional reason for the logs.
    pub fn new(request_id: &str, reason: Option<&str>) -> Self {
        Self {
            version: CONTRACT_VERSION,
            request_id: request_id.to_owned(),
            reason: reason.map(str::to_owned),
        }
    }
}

/// A cancel the worker can act on.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancel {
    /// The request to stop.
    pub request_id: RequestId,
    /// The producer's reason, if it gave one.
    pub reason: Option<String>,
}

impl Cancel {
    /// The longest `reason` accepted, in characters.
    pub const MAX_REASON_CHARS: usize = 256;

    /// Parse a message body: the codes are a request's (`message_too_large`, `malformed_request`
    /// for anything that is not the document's shape, `unsupported_version`, `invalid_request` for
    /// a bad request id or a reason too long).
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_CANCEL_BYTES {
            return Err(RequestError::new(
                ErrorCode::MessageTooLarge,
                format!("the cancel is {} bytes; the limit is {MAX_CANCEL_BYTES}", body.len()),
            ));
        }
        check_version(body)?;
        let doc: CancelDocument =
            serde_json::from_slice(body).map_err(|e| RequestError::new(ErrorCode::MalformedRequest, e.to_string()))?;
        let request_id = RequestId::parse(&doc.request_id)?;
        if let Some(reason) = &doc.reason {
            let chars = reason.chars().count();
            if chars > Self::MAX_REASON_CHARS {
                return Err(RequestError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "reason must be at most {} characters, got {chars}",
                        Self::MAX_REASON_CHARS
                    ),
                ));
            }
        }
        Ok(Self {
            request_id,
            reason: doc.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(json: serde_json::Value) -> ErrorCode {
        Cancel::parse(&serde_json::to_vec(&json).unwrap()).unwrap_err().code
    }

    #[test]
    fn parses_a_cancel_with_and_without_a_reason() {
        let cancel = Cancel::parse(br#"{"version": 1, "request_id": "r-1"}"#).unwrap();
        assert_eq!(cancel.request_id.as_str(), "r-1");
        assert_eq!(cancel.reason, None);
        let cancel = Cancel::parse(br#"{"version": 1, "request_id": "r-2", "reason": "user left"}"#).unwrap();
        assert_eq!(cancel.request_id.as_str(), "r-2");
        assert_eq!(cancel.reason.as_deref(), Some("user left"));
    }

    #[test]
    fn what_the_producer_client_sends_parses() {
        let doc = CancelDocument::new("3f1c2a9e-6d7b-4d8e-9a51-2f0c7b1e5d44", Some("timeout"));
        let body = serde_json::to_vec(&doc).unwrap();
        assert_eq!(
            Cancel::parse(&body).unwrap(),
            Cancel {
                request_id: RequestId::parse("3f1c2a9e-6d7b-4d8e-9a51-2f0c7b1e5d44").unwrap(),
                reason: Some("timeout".into()),
            }
        );
        let without = serde_json::to_value(CancelDocument::new("r", None)).unwrap();
        assert_eq!(without, serde_json::json!({"version": 1, "request_id": "r"}));
    }

    #[test]
    fn refuses_what_is_not_a_cancel() {
        use serde_json::json;
        assert_eq!(
            Cancel::parse(b"not json").unwrap_err().code,
            ErrorCode::MalformedRequest
        );
        assert_eq!(code_of(json!(["r-1"])), ErrorCode::MalformedRequest);
        assert_eq!(code_of(json!({"request_id": "r-1"})), ErrorCode::MalformedRequest);
        assert_eq!(
            code_of(json!({"version": "1", "request_id": "r-1"})),
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            code_of(json!({"version": 2, "request_id": "r-1"})),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(code_of(json!({"version": 1})), ErrorCode::MalformedRequest);
        assert_eq!(
            code_of(json!({"version": 1, "request_id": 7})),
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            code_of(json!({"version": 1, "request_id": "r-1", "user_id": "u"})),
            ErrorCode::MalformedRequest,
            "unknown fields are refused, as in requests"
        );
        assert_eq!(
            code_of(json!({"version": 1, "request_id": "r-1", "reason": 3})),
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            code_of(json!({"version": 1, "request_id": "a b"})),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code_of(json!({"version": 1, "request_id": ""})),
            ErrorCode::InvalidRequest
        );
        let long = "x".repeat(Cancel::MAX_REASON_CHARS + 1);
        assert_eq!(
            code_of(json!({"version": 1, "request_id": "r-1", "reason": long})),
            ErrorCode::InvalidRequest
        );
        let huge = vec![b' '; MAX_CANCEL_BYTES + 1];
        assert_eq!(Cancel::parse(&huge).unwrap_err().code, ErrorCode::MessageTooLarge);
    }
}
