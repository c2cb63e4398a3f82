//! Identifiers that arrive from producers, parsed once so the rest of the code can trust them.

use std::fmt;

use super::error::{ErrorCode, RequestError};

/// A producer's request id: 1–128 characters of `A-Z a-z 0-9 . _ : -`, safe as a routing key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// The longest id accepted.
    pub const MAX_LEN: usize = 128;

    /// Parse a request id, or say what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, RequestError> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.chars().all(allowed) {
            return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "request_id must be 1 to {} characters of A-Z a-z 0-9 . _ : - (got {} characters)",
                    Self::MAX_LEN,
                    s.chars().count()
                ),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The end user a request is for: 1–256 characters, none of them a control character.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// The longest id accepted, in characters.
    pub const MAX_CHARS: usize = 256;

    /// Parse a user id, or say what is wrong with it. (The JSON parser already guarantees UTF-8.)
    pub fn parse(s: &str) -> Result<Self, RequestError> {
        let chars = s.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                format!("user_id must be 1 to {} characters, got {chars}", Self::MAX_CHARS),
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                "user_id must not contain control characters",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert!(RequestId::parse("3f1c2a9e-6d7b-4d8e-9a51-2f0c7b1e5d44").is_ok());
        assert!(RequestId::parse("job:42.a_b").is_ok());
        assert!(RequestId::parse("").is_err());
        assert!(RequestId::parse("a b").is_err());
        assert!(RequestId::parse("a/b").is_err());
        assert!(RequestId::parse(&"x".repeat(129)).is_err());
        assert!(RequestId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn user_ids() {
        assert!(UserId::parse("user-42").is_ok());
        assert!(UserId::parse("Zoë ☕").is_ok());
        assert!(UserId::parse(&"é".repeat(256)).is_ok());
        assert!(UserId::parse(&"é".repeat(257)).is_err());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse("a\u{85}b").is_err());
    }
}
