//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) across the broker.
//!
//! A producer may put `traceparent` (and `tracestate`) in a request's AMQP headers. The worker
//! parses it, records the trace id and the producer's span id on the request's log span, makes a
//! span id of its own in the same trace, and puts `traceparent` = (same trace id, its own span id,
//! same flags) and the `tracestate` it received on every reply, so the producer's trace continues.
//! A request without a valid `traceparent` starts a new trace (flags `00`: kiln records nothing for
//! a tracing backend to sample), and its replies carry that.
//!
//! The context of the request being handled is in a task-local for the delivery's task
//! ([`scope`]); [`crate::amqp::ReplyPublisher`] stamps replies with [`current`], so nothing between
//! the two passes it along.

use std::fmt;
use std::future::Future;

use lapin::types::{AMQPValue, FieldTable, LongString};

/// The header naming the trace and the caller's span.
pub const TRACEPARENT: &str = "traceparent";
/// The header carrying vendor-specific trace data; passed on unchanged.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` passed on (the specification's limit for what must be propagated).
const MAX_TRACESTATE: usize = 512;

/// A parsed `traceparent`: version-00 fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace (16 bytes, not all zero).
    pub trace_id: [u8; 16],
    /// The span that sent this (8 bytes, not all zero).
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Why a `traceparent` value was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Not `version-trace_id-parent_id-flags` with the right lengths and lowercase hex.
    #[error("traceparent is not version-traceid-parentid-flags in lowercase hex")]
    Malformed,
    /// Version `ff`, which the specification forbids.
    #[error("traceparent version ff is invalid")]
    ForbiddenVersion,
    /// Version 00 with something after the flags.
    #[error("a version 00 traceparent has nothing after the flags")]
    TrailingData,
    /// A trace id of all zeros.
    #[error("traceparent trace-id is all zeros")]
    ZeroTraceId,
    /// A parent id of all zeros.
    #[error("traceparent parent-id is all zeros")]
    ZeroParentId,
}

impl TraceParent {
    /// Parse a `traceparent` header value. Versions above 00 are read as 00 (their first four
    /// fields), as the specification asks, when what follows is `-`-separated.
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        let bytes = value.as_bytes();
        if bytes.len() < 55 || !bytes.is_ascii() {
            return Err(TraceParentError::Malformed);
        }
        let version = hex_byte(&value[0..2]).ok_or(TraceParentError::Malformed)?;
        if version == 0xff {
            return Err(TraceParentError::ForbiddenVersion);
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceParentError::Malformed);
        }
        if bytes.len() > 55 {
            if version == 0 {
                return Err(TraceParentError::TrailingData);
            }
            if bytes[55] != b'-' {
                return Err(TraceParentError::Malformed);
            }
        }
        let mut trace_id = [0u8; 16];
        decode(&value[3..35], &mut trace_id)?;
        let mut parent_id = [0u8; 8];
        decode(&value[36..52], &mut parent_id)?;
        let flags = hex_byte(&value[53..55]).ok_or(TraceParentError::Malformed)?;
        if trace_id == [0; 16] {
            return Err(TraceParentError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace, with a random trace id and span id, not sampled.
    pub fn new_root() -> Self {
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self {
            trace_id,
            parent_id: random_span_id(),
            flags: 0,
        }
    }

    /// The same trace and flags, with a new random span id (this worker's span).
    pub fn child(&self) -> Self {
        Self {
            parent_id: random_span_id(),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.parent_id)
    }
}

impl fmt::Display for TraceParent {
    /// The version-00 header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let mut id = [0u8; 8];
        id.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
        if id != [0; 8] {
            return id;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Two lowercase hex digits (uppercase is invalid in `traceparent`).
fn hex_byte(s: &str) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let b = s.as_bytes();
    Some((digit(b[0])? << 4) | digit(b[1])?)
}

fn decode(s: &str, out: &mut [u8]) -> Result<(), TraceParentError> {
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = hex_byte(&s[2 * i..2 * i + 2]).ok_or(TraceParentError::Malformed)?;
    }
    Ok(())
}

/// The trace context of one request: what the producer sent, and this worker's span in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The producer's valid `traceparent`, if it sent one.
    pub incoming: Option<TraceParent>,
    /// This worker's span: the producer's trace (or a new one) with a new span id.
    pub own: TraceParent,
    /// The producer's `tracestate`, passed on unchanged (only with a valid `traceparent`).
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context for a request with these AMQP headers.
    pub fn from_headers(headers: Option<&FieldTable>) -> Self {
        let header = |name: &str| headers.and_then(|h| h.inner().get(name)).and_then(string_value);
        let incoming = match header(TRACEPARENT).map(|v| TraceParent::parse(&v)) {
            Some(Ok(parent)) => Some(parent),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "ignoring the request's traceparent header");
                None
            }
            None => None,
        };
        let tracestate = incoming
            .and(header(TRACESTATE))
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE);
        Self {
            own: incoming.map_or_else(TraceParent::new_root, |p| p.child()),
            incoming,
            tracestate,
        }
    }

    /// Add `traceparent` (this worker's span) and `tracestate` to a reply's headers.
    pub fn write_headers(&self, headers: &mut FieldTable) {
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(self.own.to_string())),
        );
        if let Some(state) = &self.tracestate {
            headers.insert(
                TRACESTATE.into(),
                AMQPValue::LongString(LongString::from(state.as_str())),
            );
        }
    }
}

fn string_value(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Run `future` with `context` as the current request's trace context.
pub async fn scope<F: Future>(context: TraceContext, future: F) -> F::Output {
    CURRENT.scope(context, future).await
}

/// The trace context of the request this task handles, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specification_example_and_formats_it_back() {
        let p = TraceParent::parse(VALID).unwrap();
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(p.flags, 1);
        assert_eq!(p.to_string(), VALID);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_and_gets_a_new_span() {
        let p = TraceParent::parse(VALID).unwrap();
        let c = p.child();
        assert_eq!(c.trace_id, p.trace_id);
        assert_eq!(c.flags, p.flags);
        assert_ne!(c.parent_id, p.parent_id);
        assert_ne!(c.parent_id, [0; 8]);
        assert_eq!(TraceParent::parse(&c.to_string()).unwrap(), c);
    }

    #[test]
    fn versions_ff_and_trailing_data_on_00_are_invalid_higher_versions_are_read_as_00() {
        let ff = VALID.replacen("00", "ff", 1);
        assert_eq!(TraceParent::parse(&ff), Err(TraceParentError::ForbiddenVersion));
        assert_eq!(
            TraceParent::parse(&format!("{VALID}-extra")),
            Err(TraceParentError::TrailingData)
        );
        let v1 = VALID.replacen("00", "01", 1);
        assert_eq!(
            TraceParent::parse(&v1).unwrap().trace_id_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(TraceParent::parse(&format!("{v1}-future-field")).is_ok());
        assert_eq!(TraceParent::parse(&format!("{v1}x")), Err(TraceParentError::Malformed));
    }

    #[test]
    fn all_zero_ids_are_invalid() {
        assert_eq!(
            TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Err(TraceParentError::ZeroTraceId)
        );
        assert_eq!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Err(TraceParentError::ZeroParentId)
        );
    }

    #[test]
    fn malformed_values_are_invalid() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn headers_in_headers_out() {
        let mut incoming = FieldTable::default();
        incoming.insert(TRACEPARENT.into(), AMQPValue::LongString(VALID.into()));
        incoming.insert(TRACESTATE.into(), AMQPValue::LongString("congo=t61rcWkgMzE".into()));
        let context = TraceContext::from_headers(Some(&incoming));
        assert_eq!(context.incoming, Some(TraceParent::parse(VALID).unwrap()));
        let mut reply = FieldTable::default();
        context.write_headers(&mut reply);
        let out = string_value(reply.inner().get(TRACEPARENT).unwrap()).unwrap();
        let out = TraceParent::parse(&out).unwrap();
        assert_eq!(out.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(out.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(
            string_value(reply.inner().get(TRACESTATE).unwrap()).as_deref(),
            Some("congo=t61rcWkgMzE")
        );
    }

    #[test]
    fn an_invalid_or_missing_traceparent_starts_a_new_trace_and_drops_tracestate() {
        let mut incoming = FieldTable::default();
        incoming.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString("00-00000000000000000000000000000000-00f067aa0ba902b7-01".into()),
        );
        incoming.insert(TRACESTATE.into(), AMQPValue::LongString("congo=t61rcWkgMzE".into()));
        for headers in [Some(&incoming), None] {
            let context = TraceContext::from_headers(headers);
            assert_eq!(context.incoming, None);
            assert_eq!(context.tracestate, None);
            assert_ne!(context.own.trace_id, [0; 16]);
            assert_eq!(context.own.flags, 0);
        }
    }
}
