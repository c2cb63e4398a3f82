//! The stable, machine-readable error codes a reply can carry, and the error a bad request is.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a request was answered with an error. Producers branch on these; they never change meaning.
/// `docs/contract.md` and `schemas/reply.v1.schema.json` list the same set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not UTF-8 JSON of the request's shape.
    MalformedRequest,
    /// The `version` is not one this worker speaks.
    UnsupportedVersion,
    /// The body is larger than `limits.max_message_bytes`.
    MessageTooLarge,
    /// A field has an invalid value (ids, timestamps).
    InvalidRequest,
    /// The model is not in this worker's registry.
    UnknownModel,
    /// A style index the model does not have.
    UnknownStyle,
    /// A parameter out of range, or one the model does not take.
    InvalidParams,
    /// A task the contract does not know, or one the model does not do (`edit` on a text-to-image
    /// model).
    UnsupportedTask,
    /// A scheduler the contract does not know, or one the model's manifest does not allow.
    UnknownScheduler,
    /// A prompt that is missing, empty, or not text.
    InvalidPrompt,
    /// The image is not decodable base64 or not a supported image.
    InvalidImage,
    /// Encoded size, width, height or pixel count over the model's limits.
    ImageTooLarge,
    /// A side under the model's minimum.
    ImageTooSmall,
    /// The deadline passed before rendering started.
    Expired,
    /// Over one of the user's limits (the reply's `rate_limit` says which, and until when).
    RateLimited,
    /// The model run failed for this input.
    InferenceFailed,
    /// A fault in the worker itself.
    Internal,
    /// Its producer cancelled it (a message on the cancel exchange) before it finished.
    Cancelled,
    /// Its `request_id` was already answered for a request with another body (ids must be unique
    /// per request; the same request again is acked without a second reply).
    DuplicateRequestId,
    /// A signed request whose signature is missing (policy `required`), wrong, stale, replayed, or
    /// made with a key that may not speak for its user or queue (docs/contract.md, *Signed requests*).
    Unauthenticated,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::MessageTooLarge => "message_too_large",
            Self::InvalidRequest => "invalid_request",
            Self::UnknownModel => "unknown_model",
            Self::UnknownStyle => "unknown_style",
            Self::InvalidParams => "invalid_params",
            Self::UnsupportedTask => "unsupported_task",
            Self::UnknownScheduler => "unknown_scheduler",
            Self::InvalidPrompt => "invalid_prompt",
            Self::InvalidImage => "invalid_image",
            Self::ImageTooLarge => "image_too_large",
            Self::ImageTooSmall => "image_too_small",
            Self::Expired => "expired",
            Self::RateLimited => "rate_limited",
            Self::InferenceFailed => "inference_failed",
            Self::Internal => "internal",
            Self::Cancelled => "cancelled",
            Self::DuplicateRequestId => "duplicate_request_id",
            Self::Unauthenticated => "unauthenticated",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that cannot be served as asked. It becomes an error reply, and the request is acked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RequestError {
    /// What producers branch on.
    pub code: ErrorCode,
    /// What a human reads.
    pub message: String,
}

impl RequestError {
    /// An error with the given code and human message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde_names() {
        let all = [
            ErrorCode::MalformedRequest,
            ErrorCode::UnsupportedVersion,
            ErrorCode::MessageTooLarge,
            ErrorCode::InvalidRequest,
            ErrorCode::UnknownModel,
            ErrorCode::UnknownStyle,
            ErrorCode::InvalidParams,
            ErrorCode::UnsupportedTask,
            ErrorCode::UnknownScheduler,
            ErrorCode::InvalidPrompt,
            ErrorCode::InvalidImage,
            ErrorCode::DuplicateRequestId,
            ErrorCode::ImageTooLarge,
            ErrorCode::ImageTooSmall,
            ErrorCode::Expired,
            ErrorCode::RateLimited,
            ErrorCode::InferenceFailed,
            ErrorCode::Internal,
            ErrorCode::Cancelled,
            ErrorCode::Unauthenticated,
        ];
        for code in all {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
