//! A signed request's signature: the string a producer signs, the `kiln-signature` header that
//! carries it, and HMAC-SHA256 over them. Plain functions of bytes, shared by the worker (verify)
//! and the producer client (`crate::submit`: sign); docs/contract.md, *Signed requests*, is the
//! specification producers in other languages follow.
//!
//! ```text
//! kiln-signature: v1;kid=<key id>;ts=<Unix ms>;sig=<64 hex digits of HMAC-SHA256(secret, canonical)>
//!
//! canonical = "kiln-sig-v1"          \n
//!             <key id>               \n
//!             <ts, decimal>          \n
//!             <queue published to>   \n
//!             <reply_to or "">       \n
//!             <correlation_id or ""> \n
//!             <SHA-256 of the body, 64 lowercase hex digits>
//! ```
//!
//! The body carries `request_id`, `user_id`, the model and its parameters; the properties are what a
//! forger would change to redirect the reply (`reply_to`, `correlation_id`) or to jump a tier (the
//! queue). A field holding a line feed is refused, so no two messages share a canonical string.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The AMQP header (a long string) that carries a request's signature.
pub const HEADER: &str = "kiln-signature";

/// The first line of the canonical string: names the scheme, so a MAC made for something else
/// with the same key never verifies here.
const SCHEME: &str = "kiln-sig-v1";

/// The header's version tag.
const VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

/// What a signature covers besides its key id and timestamp: where the request was published, where
/// its reply goes, and its body.
#[derive(Debug, Clone, Copy)]
pub struct Covered<'a> {
    /// The queue the request was published to (the routing key on the default exchange).
    pub queue: &'a str,
    /// The `reply_to` property, `""` when absent.
    pub reply_to: &'a str,
    /// The `correlation_id` property, `""` when absent.
    pub correlation_id: &'a str,
    /// The message body.
    pub body: &'a [u8],
}

/// Why a signature cannot be made or checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header does not follow `v1;kid=..;ts=..;sig=..`.
    #[error("malformed {HEADER} header: {0}")]
    Malformed(String),
    /// A covered field holds a line feed, so its canonical string would be ambiguous.
    #[error("{0} holds a line feed, which a signed request may not")]
    LineFeed(&'static str),
    /// The MAC is not the one the key makes for this message.
    #[error("the signature does not match the message")]
    Mismatch,
}

/// A parsed `kiln-signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    /// The producer's key id (`kid`).
    pub key_id: String,
    /// When it was signed, Unix milliseconds (`ts`).
    pub timestamp_ms: i64,
    /// HMAC-SHA256 of the canonical string (`sig`).
    pub mac: [u8; 32],
}

impl SignatureHeader {
    /// Parse `v1;kid=<id>;ts=<ms>;sig=<hex>` (parameters in any order, each exactly once).
    pub fn parse(value: &str) -> Result<Self, SignatureError> {
        let malformed = |why: &str| SignatureError::Malformed(why.to_owned());
        let mut parts = value.trim().split(';');
        if parts.next() != Some(VERSION) {
            return Err(malformed("it does not start with v1"));
        }
        let (mut key_id, mut timestamp_ms, mut mac) = (None, None, None);
        for part in parts {
            let (name, value) = part.split_once('=').ok_or_else(|| malformed("a parameter without ="))?;
            let repeated = match name {
                "kid" => key_id.replace(value.to_owned()).is_some(),
                "ts" => {
                    let ts = value
                        .parse::<i64>()
                        .ok()
                        .filter(|ts| *ts >= 0)
                        .ok_or_else(|| malformed("ts is not a Unix time in milliseconds"))?;
                    timestamp_ms.replace(ts).is_some()
                }
                "sig" => mac
                    .replace(decode_hex(value).ok_or_else(|| malformed("sig is not 64 hex digits"))?)
                    .is_some(),
                _ => return Err(malformed("an unknown parameter")),
            };
            if repeated {
                return Err(malformed("a parameter given twice"));
            }
        }
        let key_id = key_id.filter(|k| !k.is_empty()).ok_or_else(|| malformed("no kid"))?;
        Ok(Self {
            key_id,
            timestamp_ms: timestamp_ms.ok_or_else(|| malformed("no ts"))?,
            mac: mac.ok_or_else(|| malformed("no sig"))?,
        })
    }

    /// The header's value.
    pub fn value(&self) -> String {
        format!(
            "{VERSION};kid={};ts={};sig={}",
            self.key_id,
            self.timestamp_ms,
            hex(&self.mac)
        )
    }

    /// Whether `secret` makes this MAC for `covered`; compared in constant time.
    pub fn verify(&self, secret: &SecretString, covered: &Covered<'_>) -> Result<(), SignatureError> {
        let canonical = canonical(&self.key_id, self.timestamp_ms, covered)?;
        hmac(secret)
            .chain_update(canonical.as_bytes())
            .verify_slice(&self.mac)
            .map_err(|_| SignatureError::Mismatch)
    }
}

/// A producer's key: its id and secret (the secret's UTF-8 bytes are the HMAC key).
#[derive(Clone)]
pub struct Signer {
    key_id: String,
    secret: SecretString,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Sign with the key `key_id` whose secret is `secret`.
    pub fn new(key_id: impl Into<String>, secret: SecretString) -> Self {
        Self {
            key_id: key_id.into(),
            secret,
        }
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The signature of `covered` made at `timestamp_ms`.
    pub fn sign(&self, timestamp_ms: i64, covered: &Covered<'_>) -> Result<SignatureHeader, SignatureError> {
        let canonical = canonical(&self.key_id, timestamp_ms, covered)?;
        let mac = hmac(&self.secret).chain_update(canonical.as_bytes()).finalize();
        Ok(SignatureHeader {
            key_id: self.key_id.clone(),
            timestamp_ms,
            mac: mac.into_bytes().into(),
        })
    }
}

/// The string a signature is the MAC of (see the module's documentation).
pub fn canonical(key_id: &str, timestamp_ms: i64, covered: &Covered<'_>) -> Result<String, SignatureError> {
    for (name, value) in [
        ("kid", key_id),
        ("the queue", covered.queue),
        ("reply_to", covered.reply_to),
        ("correlation_id", covered.correlation_id),
    ] {
        if value.contains('\n') {
            return Err(SignatureError::LineFeed(name));
        }
    }
    Ok(format!(
        "{SCHEME}\n{key_id}\n{timestamp_ms}\n{}\n{}\n{}\n{}",
        covered.queue,
        covered.reply_to,
        covered.correlation_id,
        hex(&Sha256::digest(covered.body))
    ))
}

fn hmac(secret: &SecretString) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.expose_secret().as_bytes()).expect("HMAC takes a key of any length")
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn covered(body: &[u8]) -> Covered<'_> {
        Covered {
            queue: "kiln.requests.pro",
            reply_to: "amq.gen-reply",
            correlation_id: "corr-1",
            body,
        }
    }

    fn signer() -> Signer {
        Signer::new("acme", SecretString::from(SECRET))
    }

    #[test]
    fn the_canonical_string_is_the_documented_lines() {
        let text = canonical("acme", 1_795_823_940_000, &covered(b"{}")).unwrap();
        assert_eq!(
            text,
            "kiln-sig-v1\nacme\n1795823940000\nkiln.requests.pro\namq.gen-reply\ncorr-1\n\
             44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        let absent = Covered {
            reply_to: "",
            correlation_id: "",
            ..covered(b"")
        };
        assert_eq!(
            canonical("acme", 0, &absent).unwrap(),
            "kiln-sig-v1\nacme\n0\nkiln.requests.pro\n\n\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_known_answer_python_computes_the_same() {
        // hmac.new(SECRET, canonical, hashlib.sha256).hexdigest(), as in examples/python/producer.py.
        let header = signer().sign(1_795_823_940_000, &covered(b"{}")).unwrap();
        assert_eq!(
            header.value(),
            "v1;kid=acme;ts=1795823940000;sig=8000e879a22bd50f536752e8a1f7f21f49f6f2c0a643c0f29cd76eb2e733fa23"
        );
        assert_eq!(SignatureHeader::parse(&header.value()).unwrap(), header);
    }

    #[test]
    fn a_signature_verifies_for_its_message_only() {
        let secret = SecretString::from(SECRET);
        let header = signer().sign(1_000, &covered(b"{\"a\":1}")).unwrap();
        assert_eq!(header.verify(&secret, &covered(b"{\"a\":1}")), Ok(()));
        // Another body, another reply queue, another tier's queue, another key: no.
        let mismatch = Err(SignatureError::Mismatch);
        assert_eq!(header.verify(&secret, &covered(b"{\"a\":2}")), mismatch);
        let redirected = Covered {
            reply_to: "amq.gen-thief",
            ..covered(b"{\"a\":1}")
        };
        assert_eq!(header.verify(&secret, &redirected), mismatch);
        let other_tier = Covered {
            queue: "kiln.requests.enterprise",
            ..covered(b"{\"a\":1}")
        };
        assert_eq!(header.verify(&secret, &other_tier), mismatch);
        let wrong_key = SecretString::from("fedcba9876543210fedcba9876543210");
        assert_eq!(header.verify(&wrong_key, &covered(b"{\"a\":1}")), mismatch);
        // Another time or key id in the header: no.
        let later = SignatureHeader {
            timestamp_ms: 1_001,
            ..header.clone()
        };
        assert_eq!(later.verify(&secret, &covered(b"{\"a\":1}")), mismatch);
        let renamed = SignatureHeader {
            key_id: "other".into(),
            ..header
        };
        assert_eq!(renamed.verify(&secret, &covered(b"{\"a\":1}")), mismatch);
    }

    #[test]
    fn a_line_feed_cannot_move_the_boundary_between_fields() {
        let sneaky = Covered {
            reply_to: "amq.gen-reply\ncorr-1",
            correlation_id: "",
            ..covered(b"")
        };
        assert_eq!(
            signer().sign(0, &sneaky).unwrap_err(),
            SignatureError::LineFeed("reply_to")
        );
    }

    #[test]
    fn headers_that_do_not_follow_the_format_are_malformed() {
        let sig = "ab".repeat(32);
        let ok = SignatureHeader::parse(&format!("v1;ts=5;sig={sig};kid=k")).unwrap();
        assert_eq!((ok.key_id.as_str(), ok.timestamp_ms), ("k", 5));
        for bad in [
            "".to_owned(),
            format!("v2;kid=k;ts=5;sig={sig}"),
            "v1;kid=k;ts=5".to_owned(),
            format!("v1;kid=;ts=5;sig={sig}"),
            format!("v1;kid=k;ts=-5;sig={sig}"),
            format!("v1;kid=k;ts=soon;sig={sig}"),
            format!("v1;kid=k;ts=5;sig={}", "ab".repeat(31)),
            format!("v1;kid=k;ts=5;sig={}", "zz".repeat(32)),
            format!("v1;kid=k;kid=j;ts=5;sig={sig}"),
            format!("v1;kid=k;ts=5;sig={sig};alg=md5"),
        ] {
            assert!(
                matches!(SignatureHeader::parse(&bad), Err(SignatureError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
