//! The fuzz targets: which of kiln's functions each feeds its input to, what it checks of the
//! answer, and the allocation bound an input must stay under.
//!
//! A target returns the outcome's *signature* (the error code and its message with numbers and
//! quoted text blanked, or `ok`), which steers the fuzzer toward inputs that behave differently,
//! and the input's allocation bound; an invariant broken is an `Err`. Panics are caught by the
//! driver (`main.rs`). The bounds are stated in RELIABILITY.md ("Fuzzing"); change both together.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use kiln::diffusion::tokenizer::ClipTokenizer;
use kiln::domain::{Cancel, GenerationRequest, RequestError};
use kiln::imaging::{decode_rgb, probe_dimensions, DecodeLimits};
use kiln::inference::manifest::Manifest;
use kiln::inference::pipelines::diffusion::plan::MAX_PROMPT_BYTES;
use kiln::trace_context::TraceParent;
use kiln::worker::settings::RequestLimits;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// What the mutator knows about a target's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON document (requests, cancels).
    Json,
    /// UTF-8 text (prompts, header values).
    Text,
    /// PNG, JPEG or WebP files.
    Image,
}

/// One fuzz target.
pub struct Target {
    /// Its name on the command line and its folder under `fuzz/corpus/`.
    pub name: &'static str,
    /// What it exercises.
    pub about: &'static str,
    /// Where its seeds are, relative to the repository root: `(folder, file name prefix)`.
    pub seeds: &'static [(&'static str, &'static str)],
    /// The shape of its inputs.
    pub format: Format,
    /// The longest input the fuzzer makes.
    pub max_len: usize,
    /// Longer than this for one input is a finding (the machine is shared; generous on purpose).
    pub max_time: Duration,
    /// Feed one input.
    pub run: fn(&[u8]) -> Outcome,
}

/// `Ok((signature, allocation bound in bytes))`, or the invariant the input broke.
pub type Outcome = Result<(String, usize), String>;

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "request",
        about: "GenerationRequest::parse: a request body as the worker receives it (JSON, base64 images)",
        seeds: &[
            ("schemas/examples", "request-"),
            ("schemas/examples/invalid", "request-"),
            ("fuzz/corpus/request", ""),
        ],
        format: Format::Json,
        max_len: 64 * KIB,
        max_time: Duration::from_secs(1),
        run: request,
    },
    Target {
        name: "cancel",
        about: "Cancel::parse: a cancel message body",
        seeds: &[
            ("schemas/examples", "cancel"),
            ("schemas/examples/invalid", "cancel-"),
            ("fuzz/corpus/cancel", ""),
        ],
        format: Format::Json,
        max_len: 8 * KIB,
        max_time: Duration::from_secs(1),
        run: cancel,
    },
    Target {
        name: "prompt",
        about: "ClipTokenizer::encode and decode (sd-tiny-random's CLIP tokenizer) of a prompt up to MAX_PROMPT_BYTES",
        seeds: &[("fuzz/corpus/prompt", "")],
        format: Format::Text,
        max_len: MAX_PROMPT_BYTES,
        max_time: Duration::from_secs(1),
        run: prompt,
    },
    Target {
        name: "traceparent",
        about: "TraceParent::parse: the W3C traceparent header of a delivery",
        seeds: &[("fuzz/corpus/traceparent", "")],
        format: Format::Text,
        max_len: 256,
        max_time: Duration::from_secs(1),
        run: traceparent,
    },
    Target {
        name: "image_header",
        about: "probe_dimensions with the shipped models' limits: the header check admission runs on every image",
        seeds: &[
            ("fuzz/corpus/decode_png", ""),
            ("fuzz/corpus/decode_jpeg", ""),
            ("fuzz/corpus/decode_webp", ""),
        ],
        format: Format::Image,
        max_len: 256 * KIB,
        max_time: Duration::from_secs(1),
        run: image_header,
    },
    Target {
        name: "decode_png",
        about: "decode_rgb of PNG files (fuzzing limits: sides up to 1024, 2^18 pixels)",
        seeds: &[("fuzz/corpus/decode_png", "")],
        format: Format::Image,
        max_len: 256 * KIB,
        max_time: Duration::from_secs(1),
        run: decode,
    },
    Target {
        name: "decode_jpeg",
        about: "decode_rgb of JPEG files (fuzzing limits: sides up to 1024, 2^18 pixels)",
        seeds: &[("fuzz/corpus/decode_jpeg", "")],
        format: Format::Image,
        max_len: 256 * KIB,
        max_time: Duration::from_secs(1),
        run: decode,
    },
    Target {
        name: "decode_webp",
        about: "decode_rgb of WebP files (fuzzing limits: sides up to 1024, 2^18 pixels)",
        seeds: &[("fuzz/corpus/decode_webp", "")],
        format: Format::Image,
        max_len: 256 * KIB,
        max_time: Duration::from_secs(1),
        run: decode,
    },
];

/// Fills what the targets load once (the tokenizer, its HTML entity table, the manifest's limits),
/// so that no input's allocation count includes it.
pub fn warm_up() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        production_limits();
        tokenizer().encode("&lt;&amp;&#x1F600; caf\u{e9} \u{fb01}");
    });
}

/// The target named `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The repository root (the fuzzer is one of kiln's examples).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A request parser's peak heap: the body's strings (the images' base64) twice (serde_json copies a
/// string with escapes through a scratch buffer), the decoded images (three quarters of that), and
/// 64 KiB for the small fields and serde's buffers: three times the body at most.
pub fn request_bound(len: usize) -> usize {
    3 * len + 64 * KIB
}

fn request(data: &[u8]) -> Outcome {
    let max = RequestLimits::default().max_message_bytes;
    let signature = match GenerationRequest::parse(data, max) {
        Ok(request) => {
            let image = request.image.as_ref().map_or(0, Vec::len);
            if image > data.len() {
                return Err(format!("an image of {image} bytes out of a body of {}", data.len()));
            }
            "ok".to_owned()
        }
        Err((error, _)) => signature(&error),
    };
    Ok((signature, request_bound(data.len())))
}

fn cancel(data: &[u8]) -> Outcome {
    let signature = match Cancel::parse(data) {
        Ok(cancel) => {
            let chars = cancel.reason.as_deref().map_or(0, |r| r.chars().count());
            if chars > Cancel::MAX_REASON_CHARS {
                return Err(format!("a reason of {chars} characters was accepted"));
            }
            "ok".to_owned()
        }
        Err(error) => signature(&error),
    };
    Ok((signature, request_bound(data.len())))
}

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        ClipTokenizer::from_dir(&root().join("models/sd-tiny-random/tokenizer")).expect("the test tokenizer loads")
    })
}

/// The tokenizer's peak heap for a prompt of `len` bytes: the text's fixed, cleaned and
/// byte-encoded copies, and a long word's BPE pieces (a small string per byte to begin with), at
/// most about 80 bytes per input byte; so 128, and 64 KiB: under 600 KiB for the longest prompt.
pub fn prompt_bound(len: usize) -> usize {
    128 * len + 64 * KIB
}

fn prompt(data: &[u8]) -> Outcome {
    // The plan refuses longer prompts before they reach the tokenizer; JSON strings are UTF-8.
    let text = String::from_utf8_lossy(&data[..data.len().min(MAX_PROMPT_BYTES)]);
    let end = (0..=text.len().min(MAX_PROMPT_BYTES))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let text = &text[..end];
    let tokenizer = tokenizer();
    let encoded = tokenizer.encode(text);
    let max = tokenizer.max_length();
    if encoded.ids.len() != max {
        return Err(format!("{} ids, not {max}", encoded.ids.len()));
    }
    if encoded.tokens_used > max - 2 || encoded.truncated != (encoded.tokens_dropped > 0) {
        return Err(format!("inconsistent counts: {encoded:?}"));
    }
    let decoded = tokenizer.decode(&encoded.ids);
    let signature = format!(
        "used {} truncated {} decoded {}",
        bucket(encoded.tokens_used),
        encoded.truncated,
        bucket(decoded.len())
    );
    Ok((signature, prompt_bound(text.len())))
}

fn traceparent(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(("not utf-8".to_owned(), 4 * KIB));
    };
    let signature = match TraceParent::parse(text) {
        Ok(parent) => {
            let child = parent.child();
            if child.trace_id_hex() != parent.trace_id_hex() {
                return Err("a child in another trace".to_owned());
            }
            "ok".to_owned()
        }
        Err(error) => error.to_string(),
    };
    Ok((signature, 4 * KIB))
}

/// The shipped style models' decode limits (multistyle26's manifest: 20 MiB, 8192 per side, 40
/// megapixels, at least 32 per side).
pub fn production_limits() -> DecodeLimits {
    static LIMITS: OnceLock<DecodeLimits> = OnceLock::new();
    *LIMITS.get_or_init(|| {
        Manifest::load(&root().join("models/multistyle26"))
            .expect("multistyle26's manifest loads")
            .limits
            .decode_limits()
    })
}

/// The header check's peak heap: twice what `decode::header_allowance` lets the PNG decoder reserve
/// (its chunk buffer and an inflated profile may hold up to double their reservation while they
/// grow; the JPEG decoder copies the input and its ICC segments) and 256 KiB for the decoders' own
/// state. Nothing in proportion to the pixels the header announces.
pub fn header_bound(len: usize) -> usize {
    2 * kiln::imaging::decode::header_allowance(len) as usize + 256 * KIB
}

fn image_header(data: &[u8]) -> Outcome {
    let limits = production_limits();
    let signature = match probe_dimensions(data, &limits, "image") {
        Ok((w, h)) => {
            check_within(w, h, &limits)?;
            "ok".to_owned()
        }
        Err(error) => signature(&error),
    };
    Ok((signature, header_bound(data.len())))
}

/// Limits for the decoder targets: small enough that a fuzz input decodes in milliseconds, with
/// `min_side` 1 so that every size of image reaches the decoders.
pub const FUZZ_LIMITS: DecodeLimits = DecodeLimits {
    max_bytes: 20 * MIB,
    max_side: 1024,
    max_pixels: 1 << 18,
    min_side: 1,
};

/// Heap bytes per pixel that decoding may hold at once (see RELIABILITY.md, "Fuzzing"): the widest
/// decoder output (16-bit RGBA, 8), its 8-bit RGBA conversion (4) and the RGB result (3), with one
/// to spare for a decoder's own planes.
pub const DECODE_BYTES_PER_PIXEL: usize = 16;

/// `decode_rgb`'s peak heap for an image of `pixels` (from its header) and `len` encoded bytes.
pub fn decode_bound(pixels: u64, len: usize) -> usize {
    DECODE_BYTES_PER_PIXEL * pixels as usize + header_bound(len) + MIB
}

fn decode(data: &[u8]) -> Outcome {
    let limits = FUZZ_LIMITS;
    // The pixel count the header announces (0 if refused); what the probe allocates is freed before
    // decoding starts, so the peak is the larger of the two.
    let pixels = probe_dimensions(data, &limits, "image").map_or(0, |(w, h)| u64::from(w) * u64::from(h));
    let (signature, bound) = match decode_rgb(data, &limits, "image") {
        Ok(image) => {
            let (w, h) = image.dimensions();
            check_within(w, h, &limits)?;
            if u64::from(w) * u64::from(h) != pixels {
                return Err(format!("decoded {w}x{h}, but the header announced {pixels} pixels"));
            }
            ("ok".to_owned(), decode_bound(pixels, data.len()))
        }
        Err(error) => (signature(&error), decode_bound(pixels, data.len())),
    };
    Ok((signature, bound))
}

fn check_within(w: u32, h: u32, limits: &DecodeLimits) -> Result<(), String> {
    let pixels = u64::from(w) * u64::from(h);
    if w.max(h) > limits.max_side || w.min(h) < limits.min_side || pixels > limits.max_pixels {
        return Err(format!("{w}x{h} passed the limits {limits:?}"));
    }
    Ok(())
}

/// An error's code and message, with what varies from input to input blanked: digits, and text in
/// quotes or backticks (field names and values the input chose).
pub fn signature(error: &RequestError) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(error.code.as_str());
    out.push(' ');
    let mut quote = None;
    for c in error.message.chars().take(120) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '`') => {
                quote = Some(c);
                out.push('…');
            }
            (None, c) if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            (None, c) => out.push(c),
        }
    }
    out
}

/// The power of two at or above `n`: counts that differ a little are the same behaviour.
pub fn bucket(n: usize) -> u32 {
    usize::BITS - n.leading_zeros()
}
