//! Making new inputs from old ones: AFL-style byte mutations (stacked, 1 to 8 per input), plus
//! mutations that know the formats: JSON documents edited as trees, prompts with tokenizer-relevant
//! text inserted, and PNG/JPEG/WebP files edited chunk by chunk and field by field (dimensions,
//! sampling factors, chunk lengths), with their checksums and RIFF size fixed afterwards so that most
//! mutants get past the container to the codec. Deterministic for a given [`Rng`] seed.

use serde_json::Value;

use crate::targets::Format;

/// SplitMix64: small, fast, and good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const INTERESTING_8: &[u8] = &[0, 1, 2, 3, 4, 8, 15, 16, 31, 32, 64, 0x7F, 0x80, 0xC0, 0xFE, 0xFF];
const INTERESTING_16: &[u16] = &[
    0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 255, 256, 1023, 1024, 1025, 4096, 8192, 8193, 16383, 16384, 0x7FFF,
    0x8000, 60000, 65500, 0xFFFF,
];
const INTERESTING_32: &[u32] = &[
    0,
    1,
    31,
    32,
    1024,
    16384,
    60000,
    65535,
    65536,
    0x00FF_FFFF,
    0x0100_0000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
];
/// Image dimensions worth trying: edges of the limits (1024, 2^18 px, 8192, 40 MP) and of formats.
const DIMENSIONS: &[u32] = &[
    0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 4096,
    6324, 8192, 8193, 16383, 16384, 65535,
];

/// A new input made from `parent`, sometimes with pieces of the other inputs in `pool`.
pub fn mutate(parent: &[u8], pool: &[Vec<u8>], format: Format, rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let mut data = parent.to_vec();
    let rounds = 1 << rng.below(4);
    for _ in 0..rounds {
        let structured = rng.one_in(2);
        match format {
            Format::Json if structured => json(&mut data, pool, rng),
            Format::Text if structured => text(&mut data, rng),
            Format::Image if structured => image(&mut data, pool, rng),
            _ => bytes(&mut data, pool, rng, dictionary(format)),
        }
    }
    if format == Format::Image && !rng.one_in(8) {
        fix_checksums(&mut data);
    }
    data.truncate(max_len);
    data
}

fn dictionary(format: Format) -> &'static [&'static [u8]] {
    match format {
        Format::Json => &[
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b",",
            b":",
            b"null",
            b"true",
            b"-0",
            b"1e999",
            b"-1",
            b"0.5",
            b"18446744073709551616",
            b"\\u0000",
            b"\\ud800",
            b"\\udc00",
            b"\\ud83d\\ude00",
            b"\\\"",
            b"\\/",
            b"\xef\xbb\xbf",
            b"\xff",
            b"\xc3",
            b"\"version\":1,",
            b"\"version\":2,",
            b"\"params\":{",
            b"\"data\":\"",
            b"\"style\":",
            b"\"prompt\":",
            b"\"request_id\":\"r\",",
            b"==",
            b"=",
            b"+/",
            b"-_",
            b" ",
            b"\n",
            b"\t",
        ],
        Format::Text => TEXT_TOKENS,
        Format::Image => &[
            b"IHDR",
            b"IDAT",
            b"IEND",
            b"PLTE",
            b"tRNS",
            b"iCCP",
            b"eXIf",
            b"acTL",
            b"fcTL",
            b"fdAT",
            b"\xff\xd8",
            b"\xff\xc0",
            b"\xff\xc2",
            b"\xff\xc4",
            b"\xff\xda",
            b"\xff\xdb",
            b"\xff\xdd",
            b"\xff\xd9",
            b"\xff\xd0",
            b"\xff\x00",
            b"RIFF",
            b"WEBP",
            b"VP8 ",
            b"VP8L",
            b"VP8X",
            b"ALPH",
            b"ANIM",
            b"ANMF",
            b"\x9d\x01\x2a",
            b"\x2f",
        ],
    }
}

const TEXT_TOKENS: &[&[u8]] = &[
    b"<|startoftext|>",
    b"<|endoftext|>",
    b"</w>",
    b"&amp;",
    b"&lt;",
    b"&#x1F600;",
    b"&#128512;",
    b"&#99999999999;",
    b"&#x110000;",
    b"&#0;",
    b"&eacute",
    b"&",
    b"'s",
    b"'ll",
    b"'",
    b"\xe2\x80\x99",
    b"\xe2\x80\x9c",
    b"\xc2\x85",
    b"\xc2\x9f",
    b"\xc2\xa0",
    b"\x1b[31m",
    b"\r\n",
    b"\x00",
    b"\x7f",
    b"\xef\xac\x81",
    b"\xef\xbc\xa1",
    b"\xcc\x81",
    b"\xe1\x84\x80\xe1\x85\xa1",
    b"\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x92\xbb",
    b"\xe2\x80\xae",
    b"\xed\xa0\x80",
    b"\xc3\x83\xc2\xa9",
    b"\xff",
    b"123",
    b"\xd9\xa3",
    b"  ",
    b"ABC",
];

/// Generic byte-level mutations.
fn bytes(data: &mut Vec<u8>, pool: &[Vec<u8>], rng: &mut Rng, dictionary: &[&[u8]]) {
    let len = data.len();
    match rng.below(16) {
        0 if len > 0 => {
            let at = rng.below(len);
            data[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            data[at] = *rng.pick(INTERESTING_8);
        }
        2 if len > 0 => {
            let at = rng.below(len);
            data[at] = rng.next() as u8;
        }
        3 if len >= 2 => {
            let value = *rng.pick(INTERESTING_16);
            let at = rng.below(len - 1);
            let b = if rng.one_in(2) {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            data[at..at + 2].copy_from_slice(&b);
        }
        4 if len >= 4 => {
            let value = *rng.pick(INTERESTING_32);
            let at = rng.below(len - 3);
            let b = if rng.one_in(2) {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            data[at..at + 4].copy_from_slice(&b);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let delta = rng.below(35) as u8 + 1;
            data[at] = if rng.one_in(2) {
                data[at].wrapping_add(delta)
            } else {
                data[at].wrapping_sub(delta)
            };
        }
        6 if len >= 2 => {
            let at = rng.below(len - 1);
            let value = u16::from_be_bytes([data[at], data[at + 1]]);
            let delta = rng.below(35) as u16 + 1;
            let value = if rng.one_in(2) {
                value.wrapping_add(delta)
            } else {
                value.wrapping_sub(delta)
            };
            data[at..at + 2].copy_from_slice(&value.to_be_bytes());
        }
        7 if len > 0 => {
            let (at, n) = range(rng, len);
            data.drain(at..at + n);
        }
        8 => {
            let at = rng.below(len + 1);
            let n = rng.below(16) + 1;
            let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(at..at, fill);
        }
        9 if len > 0 => {
            let (from, n) = range(rng, len);
            let copy = data[from..from + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, copy);
        }
        10 | 11 if !pool.is_empty() => {
            let other = rng.pick(pool);
            if other.is_empty() {
                return;
            }
            let (from, n) = range(rng, other.len());
            let piece = &other[from..from + n];
            let at = rng.below(len + 1);
            if rng.one_in(2) && at + n <= len {
                data[at..at + n].copy_from_slice(piece);
            } else {
                data.splice(at..at, piece.iter().copied());
            }
        }
        12 => {
            let token = rng.pick(dictionary);
            let at = rng.below(len + 1);
            if rng.one_in(2) && at + token.len() <= len {
                data[at..at + token.len()].copy_from_slice(token);
            } else {
                data.splice(at..at, token.iter().copied());
            }
        }
        13 if len > 1 => data.truncate(rng.below(len)),
        14 if !pool.is_empty() => {
            let other = rng.pick(pool);
            let head = rng.below(len + 1);
            let tail = rng.below(other.len() + 1);
            data.truncate(head);
            data.extend_from_slice(&other[tail..]);
        }
        _ => {
            let at = rng.below(len + 1);
            let byte = if len > 0 && rng.one_in(2) {
                data[rng.below(len)]
            } else {
                rng.next() as u8
            };
            let n = 1 << rng.below(9);
            data.splice(at..at, std::iter::repeat_n(byte, n));
        }
    }
}

/// A random `(start, length)` inside `0..len` (`len` > 0): mostly short, sometimes long.
fn range(rng: &mut Rng, len: usize) -> (usize, usize) {
    let cap = if rng.one_in(4) { len } else { len.min(32) };
    let n = rng.below(cap) + 1;
    (rng.below(len - n + 1), n)
}

// --- JSON ------------------------------------------------------------------------------------------

const KEYS: &[&str] = &[
    "version",
    "request_id",
    "user_id",
    "model",
    "params",
    "image",
    "deadline",
    "created_at",
    "tier",
    "progress",
    "style",
    "style_image",
    "strength",
    "size",
    "task",
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "image_guidance_scale",
    "seed",
    "width",
    "height",
    "scheduler",
    "data",
    "reason",
    "",
    "0",
    "25",
    "03",
];

fn interesting_json(rng: &mut Rng) -> Value {
    let text = |s: &str| Value::String(s.to_owned());
    match rng.below(40) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 => 0.into(),
        3 => (-1).into(),
        4 => 1.into(),
        5 => 25.into(),
        6 => 26.into(),
        7 => 0.5.into(),
        8 => 1.5.into(),
        9 => (-0.0).into(),
        10 => 1e308.into(),
        11 => u32::MAX.into(),
        12 => (u64::from(u32::MAX) + 1).into(),
        13 => u64::MAX.into(),
        14 => i64::MIN.into(),
        15 => text(""),
        16 => text("a"),
        17 => text(&"x".repeat(rng.below(600))),
        18 => text("03"),
        19 => text("2026-11-27T23:59:00Z"),
        20 => text("2026-13-01T00:00:00Z"),
        21 => text("9999-12-31T23:59:60+23:59"),
        22 => text("2026-11-27 23:59:00Z"),
        23 => text(rng.pick::<&str>(&["text_to_image", "image_to_image", "edit", "inpaint"])),
        24 => text(rng.pick::<&str>(&["euler", "euler_ancestral", "ddim", "lcm", "pndm"])),
        25 => text("\u{0}\u{202e}é😀"),
        26 => text("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"),
        27 => text("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA=="),
        28 => text("/9j/2wBDAP//////////////////////////////////////////////////////////////////////////////////////wAALCAABAAEBAREA/8QAFAABAAAAAAAAAAAAAAAAAAAACf/EABQQAQAAAAAAAAAAAAAAAAAAAAD/2gAIAQEAAD8AKp//2Q=="),
        29 => Value::Array(vec![]),
        30 => Value::Object(serde_json::Map::new()),
        31 => serde_json::json!({"data": ""}),
        32 => serde_json::json!({"3": 0.5, "12": 0.5}),
        33 => serde_json::json!({"0": 0.0}),
        34 => serde_json::json!([1, 2]),
        35 => (rng.next() as i64).into(),
        36 => f64::from_bits(rng.next()).into(), // a non-finite one becomes null
        37 => text(&"a ".repeat(rng.below(300))),
        38 => serde_json::json!({"version": 1, "request_id": "r", "user_id": "u", "model": "m"}),
        _ => text(&"\u{1F600}".repeat(rng.below(100))),
    }
}

/// A random node of `value`, reached by descending from the root.
fn pick_node<'a>(value: &'a mut Value, rng: &mut Rng) -> &'a mut Value {
    let children = match value {
        Value::Array(items) => items.len(),
        Value::Object(map) => map.len(),
        _ => 0,
    };
    if children == 0 || rng.one_in(3) {
        return value;
    }
    let i = rng.below(children);
    match value {
        Value::Array(items) => pick_node(&mut items[i], rng),
        Value::Object(map) => pick_node(map.values_mut().nth(i).expect("in range"), rng),
        _ => unreachable!("has children"),
    }
}

fn json(data: &mut Vec<u8>, pool: &[Vec<u8>], rng: &mut Rng) {
    let Ok(mut doc) = serde_json::from_slice::<Value>(data) else {
        return bytes(data, pool, rng, dictionary(Format::Json));
    };
    let node = pick_node(&mut doc, rng);
    match rng.below(8) {
        0 | 1 => *node = interesting_json(rng),
        2 => {
            // A node of another document of the pool (a base64 image, a params object).
            if let Some(mut other) = pool
                .get(rng.below(pool.len()))
                .and_then(|o| serde_json::from_slice(o).ok())
            {
                *node = pick_node(&mut other, rng).take();
            }
        }
        3 => match node {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(rng.below(map.len())).expect("in range").clone();
                map.remove(&key);
            }
            Value::Array(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                items.remove(i);
            }
            _ => *node = Value::Null,
        },
        4 => match node {
            Value::Object(map) => {
                map.insert((*rng.pick(KEYS)).to_owned(), interesting_json(rng));
            }
            Value::Array(items) => {
                let item = items.first().cloned().unwrap_or_else(|| interesting_json(rng));
                let n = 1 << rng.below(8);
                items.extend(std::iter::repeat_n(item, n));
            }
            _ => *node = interesting_json(rng),
        },
        5 => {
            let inner = node.take();
            *node = if rng.one_in(2) {
                Value::Array(vec![inner])
            } else {
                serde_json::json!({ (*rng.pick(KEYS)): inner })
            };
        }
        6 => {
            if let Value::String(s) = node {
                // Damage base64 or text a little: a character, the padding, or the length.
                match rng.below(4) {
                    0 => s.push('='),
                    1 => {
                        let cut = (0..=s.len() / 2).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                        s.truncate(cut);
                    }
                    2 => s.insert(0, *rng.pick(&['-', '_', ' ', '\n', '=', '\u{e9}'])),
                    _ => *s = s.repeat(2),
                }
            } else {
                *node = interesting_json(rng);
            }
        }
        _ => {
            if let Value::Object(map) = node {
                // Rename a key: unknown fields, near misses.
                if let Some(key) = map.keys().nth(rng.below(map.len().max(1))).cloned() {
                    let value = map.remove(&key).expect("present");
                    map.insert((*rng.pick(KEYS)).to_owned(), value);
                }
            }
        }
    }
    *data = if rng.one_in(4) {
        serde_json::to_vec_pretty(&doc)
    } else {
        serde_json::to_vec(&doc)
    }
    .expect("a Value serializes");
}

// --- text ------------------------------------------------------------------------------------------

fn text(data: &mut Vec<u8>, rng: &mut Rng) {
    let token = *rng.pick(TEXT_TOKENS);
    let at = rng.below(data.len() + 1);
    match rng.below(4) {
        0 => {
            // One long word, or a token many times: BPE's cost grows with a word's length.
            let n = 1 << rng.below(10);
            let repeated = token.repeat(n);
            data.splice(at..at, repeated);
        }
        1 if !data.is_empty() => {
            let (from, n) = range(rng, data.len());
            data.splice(from..from + n, token.iter().copied());
        }
        2 => {
            let upper: Vec<u8> = data.iter().map(u8::to_ascii_uppercase).collect();
            *data = upper;
        }
        _ => {
            data.splice(at..at, token.iter().copied());
        }
    }
}

// --- images ----------------------------------------------------------------------------------------

fn image(data: &mut Vec<u8>, pool: &[Vec<u8>], rng: &mut Rng) {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(data, rng);
    } else if data.starts_with(b"\xff\xd8") {
        jpeg(data, rng);
    } else if data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        webp(data, rng);
    } else {
        bytes(data, pool, rng, dictionary(Format::Image));
    }
}

/// `(offset of the length field, data length)` of each PNG chunk whose header is complete.
fn png_chunks(data: &[u8]) -> Vec<(usize, usize)> {
    let mut chunks = Vec::new();
    let mut at = 8;
    while at + 8 <= data.len() {
        let len = u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        chunks.push((at, len));
        match at.checked_add(12 + len) {
            Some(next) if next <= data.len() => at = next,
            _ => break,
        }
    }
    chunks
}

fn png_chunk(kind: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out.extend_from_slice(&crc32(&out[4..]).to_be_bytes());
    out
}

/// A zlib stream of stored (uncompressed) blocks: random "scanlines" reach the unfiltering code.
fn zlib_stored(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let mut blocks = raw.chunks(65535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    while let Some(block) = blocks.next() {
        out.push(u8::from(blocks.peek().is_none()));
        let n = block.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in raw {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next() as u8).collect()
}

/// Fewer than `max` random bytes.
fn some_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = rng.below(max);
    random_bytes(rng, n)
}

fn png(data: &mut Vec<u8>, rng: &mut Rng) {
    let chunks = png_chunks(data);
    let Some(&(ihdr, _)) = chunks.first() else {
        return;
    };
    match rng.below(8) {
        0 if data.len() >= ihdr + 16 => {
            let field = ihdr + 8 + 4 * rng.below(2);
            data[field..field + 4].copy_from_slice(&rng.pick(DIMENSIONS).to_be_bytes());
        }
        1 if data.len() >= ihdr + 21 => {
            // Bit depth, colour type, compression, filter, interlace: valid values mostly.
            let (field, values): (usize, &[u8]) = match rng.below(4) {
                0 => (8, &[1, 2, 4, 8, 16, 3, 0]),
                1 => (9, &[0, 2, 3, 4, 6, 1, 7]),
                2 => (12, &[0, 1, 2]),
                _ => (10 + rng.below(2), &[0, 1]),
            };
            data[ihdr + 8 + field] = *rng.pick(values);
        }
        2 | 3 => {
            let body = match rng.below(12) {
                0 => (b"tRNS", some_bytes(rng, 260)),
                1 => (b"PLTE", {
                    let n = 3 * rng.below(260);
                    random_bytes(rng, n)
                }),
                2 => (b"eXIf", exif(rng.below(10) as u16)),
                3 => (
                    b"iCCP",
                    [b"p\0\0".as_slice(), &zlib_stored(&random_bytes(rng, 200))].concat(),
                ),
                4 => (b"zTXt", [b"k\0\0".as_slice(), &zlib_stored(b"text")].concat()),
                5 => (
                    b"acTL",
                    [rng.pick(INTERESTING_32).to_be_bytes(), 0u32.to_be_bytes()].concat(),
                ),
                6 => {
                    let mut fctl = Vec::new();
                    fctl.extend_from_slice(&0u32.to_be_bytes());
                    for _ in 0..4 {
                        fctl.extend_from_slice(&rng.pick(DIMENSIONS).to_be_bytes());
                    }
                    fctl.extend_from_slice(&[0, 1, 0, 100, rng.below(3) as u8, rng.below(2) as u8]);
                    (b"fcTL", fctl)
                }
                7 => (
                    b"fdAT",
                    [0u32.to_be_bytes().as_slice(), &zlib_stored(&random_bytes(rng, 64))].concat(),
                ),
                8 => (b"IEND", Vec::new()),
                9 => (b"sBIT", some_bytes(rng, 5)),
                10 => (b"bKGD", some_bytes(rng, 7)),
                _ => (b"IDAT", zlib_stored(&some_bytes(rng, 4096))),
            };
            let &(at, len) = rng.pick(&chunks);
            let at = (at + 12 + len).min(data.len());
            data.splice(at..at, png_chunk(body.0, &body.1));
        }
        4 => {
            // New pixel data: the right length for the header's size, bytes chosen at random.
            let (w, h) = (be32(data, ihdr + 8) as usize, be32(data, ihdr + 12) as usize);
            let n = (h.min(1024) * (1 + w.min(1024) * 8)).min(1 << 20);
            let mut raw = random_bytes(rng, n);
            if rng.one_in(2) {
                raw.iter_mut().for_each(|b| *b %= 5);
            }
            let idat = png_chunk(b"IDAT", &zlib_stored(&raw));
            match chunks.iter().find(|c| data.get(c.0 + 4..c.0 + 8) == Some(b"IDAT")) {
                Some(&(at, len)) if at + 12 + len <= data.len() => drop(data.splice(at..at + 12 + len, idat)),
                _ => {}
            }
        }
        5 if chunks.len() > 1 => {
            // Drop, duplicate or move a chunk (never the signature).
            let &(at, len) = rng.pick(&chunks[1..]);
            let end = (at + 12 + len).min(data.len());
            let chunk: Vec<u8> = data.drain(at..end).collect();
            if !rng.one_in(3) {
                let &(to, to_len) = rng.pick(&png_chunks(data));
                let to = (to + 12 + to_len).min(data.len());
                data.splice(to..to, chunk.iter().copied());
                if rng.one_in(2) {
                    data.splice(to..to, chunk);
                }
            }
        }
        6 => {
            let &(at, _) = rng.pick(&chunks);
            let value = if rng.one_in(2) {
                *rng.pick(INTERESTING_32)
            } else {
                rng.below(4096) as u32
            };
            data[at..at + 4].copy_from_slice(&value.to_be_bytes());
        }
        _ => bytes(data, &[], rng, dictionary(Format::Image)),
    }
}

fn be32(data: &[u8], at: usize) -> u32 {
    data.get(at..at + 4)
        .map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
}

/// A little-endian TIFF block with one Orientation entry, as eXIf and WebP's EXIF carry it.
fn exif(orientation: u16) -> Vec<u8> {
    let mut out = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
    out.extend_from_slice(&orientation.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    out
}

/// `(offset of the marker, total length)` of each JPEG segment before the entropy-coded data.
fn jpeg_segments(data: &[u8]) -> Vec<(usize, usize)> {
    let mut segments = Vec::new();
    let mut at = 2;
    while at + 4 <= data.len() && data[at] == 0xFF {
        let marker = data[at + 1];
        if (0xD0..=0xD9).contains(&marker) || marker == 0x01 {
            segments.push((at, 2));
            at += 2;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
        segments.push((at, 2 + len));
        if marker == 0xDA {
            break;
        }
        at += 2 + len;
    }
    segments
}

fn jpeg(data: &mut Vec<u8>, rng: &mut Rng) {
    let segments = jpeg_segments(data);
    if segments.is_empty() {
        return bytes(data, &[], rng, dictionary(Format::Image));
    }
    let sof = segments
        .iter()
        .find(|&&(at, _)| matches!(data[at + 1], 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF))
        .copied();
    let sos = segments.iter().find(|&&(at, _)| data[at + 1] == 0xDA).copied();
    match rng.below(8) {
        0 if sof.is_some_and(|(at, _)| at + 9 <= data.len()) => {
            let (at, _) = sof.expect("checked");
            let field = at + 5 + 2 * rng.below(2);
            let value = *rng.pick(DIMENSIONS) as u16;
            data[field..field + 2].copy_from_slice(&value.to_be_bytes());
        }
        1 if sof.is_some_and(|(at, _)| at + 10 <= data.len()) => {
            let (at, _) = sof.expect("checked");
            match rng.below(4) {
                0 => data[at + 1] = *rng.pick(&[0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA]),
                1 => data[at + 4] = *rng.pick(&[8, 12, 16, 0, 255]),
                2 => data[at + 9] = *rng.pick(&[0, 1, 2, 3, 4, 5, 255]),
                _ => {
                    // A component's sampling factors or quantization table.
                    let components = usize::from(data[at + 9]);
                    let field = at + 10 + 3 * rng.below(components.max(1)) + 1 + rng.below(2);
                    if field < data.len() {
                        data[field] = *rng.pick(&[
                            0x11, 0x12, 0x21, 0x22, 0x41, 0x14, 0x44, 0x13, 0x00, 0x0F, 0xFF, 0, 1, 3, 4,
                        ]);
                    }
                }
            }
        }
        2 if sos.is_some_and(|(at, len)| at + len <= data.len() && len >= 8) => {
            // Scan header: components, spectral selection, successive approximation.
            let (at, len) = sos.expect("checked");
            let field = at + 4 + rng.below(len - 4);
            data[field] = if rng.one_in(2) {
                *rng.pick(INTERESTING_8)
            } else {
                rng.next() as u8
            };
        }
        3 => {
            let segment: Vec<u8> = match rng.below(4) {
                0 => [&[0xFF, 0xDD, 0, 4][..], &rng.pick(INTERESTING_16).to_be_bytes()].concat(),
                1 => {
                    let body = [b"Exif\0\0".as_slice(), &exif(rng.below(10) as u16)].concat();
                    [&[0xFF, 0xE1][..], &((body.len() + 2) as u16).to_be_bytes(), &body].concat()
                }
                2 => [
                    &[0xFF, 0xEE, 0, 14][..],
                    b"Adobe",
                    &[0, 100, 0, 0, 0, 0, rng.below(3) as u8],
                ]
                .concat(),
                _ => [&[0xFF, 0xDC, 0, 4][..], &rng.pick(INTERESTING_16).to_be_bytes()].concat(),
            };
            let &(at, _) = rng.pick(&segments);
            data.splice(at..at, segment);
        }
        4 if segments.len() > 1 => {
            let &(at, len) = rng.pick(&segments[..segments.len() - 1]);
            let end = (at + len).min(data.len());
            let segment: Vec<u8> = data.drain(at..end).collect();
            if !rng.one_in(3) {
                let &(to, _) = rng.pick(&jpeg_segments(data));
                data.splice(to..to, segment);
            }
        }
        5 => {
            let &(at, _) = rng.pick(&segments);
            if at + 4 <= data.len() {
                let value = if rng.one_in(2) {
                    *rng.pick(INTERESTING_16)
                } else {
                    rng.below(512) as u16
                };
                data[at + 2..at + 4].copy_from_slice(&value.to_be_bytes());
            }
        }
        6 if sos.is_some_and(|(at, len)| at + len < data.len()) => {
            // Markers inside the entropy-coded data: restarts, stuffing, an early end.
            let (at, len) = sos.expect("checked");
            let start = at + len;
            let pos = start + rng.below(data.len() - start);
            let marker: &[u8] = rng.pick::<&[u8]>(&[
                &[0xFF, 0xD0],
                &[0xFF, 0xD7],
                &[0xFF, 0x00],
                &[0xFF, 0xD9],
                &[0xFF, 0xFF],
            ]);
            data.splice(pos..pos, marker.iter().copied());
        }
        _ => bytes(data, &[], rng, dictionary(Format::Image)),
    }
}

/// `(offset of the fourcc, data length)` of each RIFF chunk whose header is complete.
fn webp_chunks(data: &[u8]) -> Vec<(usize, usize)> {
    let mut chunks = Vec::new();
    let mut at = 12;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        chunks.push((at, len));
        match at.checked_add(8 + len + (len & 1)) {
            Some(next) if next <= data.len() => at = next,
            _ => break,
        }
    }
    chunks
}

fn riff_chunk(kind: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = kind.to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    if body.len() % 2 == 1 {
        out.push(0);
    }
    out
}

fn webp(data: &mut Vec<u8>, rng: &mut Rng) {
    let chunks = webp_chunks(data);
    if chunks.is_empty() {
        return bytes(data, &[], rng, dictionary(Format::Image));
    }
    let find = |kind: &[u8]| chunks.iter().copied().find(|&(at, _)| &data[at..at + 4] == kind);
    match rng.below(8) {
        0 => {
            if let Some((at, _)) = find(b"VP8X").filter(|&(at, _)| at + 18 <= data.len()) {
                let field = at + 12 + 3 * rng.below(2);
                let value = rng.pick(DIMENSIONS).saturating_sub(1).min(0xFF_FFFF);
                data[field..field + 3].copy_from_slice(&value.to_le_bytes()[..3]);
            } else if let Some((at, _)) = find(b"VP8X").filter(|&(at, _)| at + 9 <= data.len()) {
                data[at + 8] = rng.next() as u8;
            }
        }
        1 => {
            if let Some((at, _)) = find(b"VP8L").filter(|&(at, _)| at + 13 <= data.len()) {
                let mut bits = u32::from_le_bytes(data[at + 9..at + 13].try_into().expect("4 bytes"));
                let (w, h) = (
                    (*rng.pick(DIMENSIONS)).clamp(1, 16384) - 1,
                    (*rng.pick(DIMENSIONS)).clamp(1, 16384) - 1,
                );
                bits = match rng.below(3) {
                    0 => (bits & !0x3FFF) | w,
                    1 => (bits & !(0x3FFF << 14)) | (h << 14),
                    _ => bits ^ (1 << (28 + rng.below(4))),
                };
                data[at + 9..at + 13].copy_from_slice(&bits.to_le_bytes());
            } else if let Some((at, _)) = find(b"VP8 ").filter(|&(at, _)| at + 18 <= data.len()) {
                let field = at + 14 + 2 * rng.below(2);
                let value = (*rng.pick(DIMENSIONS) as u16 & 0x3FFF) | ((rng.below(4) as u16) << 14);
                data[field..field + 2].copy_from_slice(&value.to_le_bytes());
            }
        }
        2 | 3 => {
            let body = match rng.below(6) {
                0 => (b"ALPH", [&[rng.below(4) as u8][..], &some_bytes(rng, 512)].concat()),
                1 => (b"ANIM", random_bytes(rng, 6)),
                2 => {
                    // A frame: geometry at random, the image of an existing VP8/VP8L chunk.
                    let mut anmf = random_bytes(rng, 16);
                    if let Some((at, len)) = find(b"VP8L").or_else(|| find(b"VP8 ")) {
                        let end = (at + 8 + len).min(data.len());
                        anmf.extend_from_slice(&data[at..end]);
                    }
                    (b"ANMF", anmf)
                }
                3 => (b"EXIF", exif(rng.below(10) as u16)),
                4 => (b"ICCP", some_bytes(rng, 200)),
                _ => (
                    b"VP8X",
                    [&[rng.next() as u8, 0, 0, 0][..], &random_bytes(rng, 6)].concat(),
                ),
            };
            let &(at, len) = rng.pick(&chunks);
            let at = (at + 8 + len + (len & 1)).min(data.len());
            data.splice(at..at, riff_chunk(body.0, &body.1));
        }
        4 if chunks.len() > 1 => {
            let &(at, len) = rng.pick(&chunks);
            let end = (at + 8 + len + (len & 1)).min(data.len());
            let chunk: Vec<u8> = data.drain(at..end).collect();
            if !rng.one_in(3) {
                let rest = webp_chunks(data);
                let to = rest.get(rng.below(rest.len() + 1)).map_or(data.len(), |c| c.0);
                data.splice(to..to, chunk);
            }
        }
        5 => {
            let &(at, _) = rng.pick(&chunks);
            let value = if rng.one_in(2) {
                *rng.pick(INTERESTING_32)
            } else {
                rng.below(4096) as u32
            };
            data[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        _ => bytes(data, &[], rng, dictionary(Format::Image)),
    }
}

/// What a container checks before its codec sees anything: PNG chunk CRCs, the RIFF size.
fn fix_checksums(data: &mut [u8]) {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        for (at, len) in png_chunks(data) {
            if at + 12 + len <= data.len() {
                let crc = crc32(&data[at + 4..at + 8 + len]);
                data[at + 8 + len..at + 12 + len].copy_from_slice(&crc.to_be_bytes());
            }
        }
    } else if data.len() >= 12 && &data[..4] == b"RIFF" {
        let size = (data.len() - 8) as u32;
        data[4..8].copy_from_slice(&size.to_le_bytes());
        // A chunk cut short by a deletion: make it end with the file.
        if let Some(&(at, len)) = webp_chunks(data).last() {
            if at + 8 + len > data.len() {
                let fits = (data.len() - at - 8) as u32;
                data[at + 4..at + 8].copy_from_slice(&fits.to_le_bytes());
            }
        }
    }
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *entry = c;
        }
        table
    });
    !bytes
        .iter()
        .fold(!0u32, |c, &b| table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_and_stored_zlib_match_the_reference_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // zlib.compress(b"abc", 0) in Python.
        assert_eq!(
            zlib_stored(b"abc"),
            [0x78, 0x01, 0x01, 0x03, 0x00, 0xFC, 0xFF, b'a', b'b', b'c', 0x02, 0x4D, 0x01, 0x27]
        );
    }

    #[test]
    fn mutation_is_deterministic_and_respects_the_length_cap() {
        let seed = std::fs::read(crate::targets::root().join("fuzz/corpus/decode_png/rgb.png")).unwrap();
        let run = |seed_value| {
            let mut rng = Rng::new(seed_value);
            (0..200)
                .map(|_| mutate(&seed, std::slice::from_ref(&seed), Format::Image, &mut rng, 4096))
                .collect::<Vec<_>>()
        };
        let first = run(7);
        assert_eq!(first, run(7));
        assert!(first.iter().all(|m| m.len() <= 4096));
        assert!(first.iter().any(|m| m != &seed));
    }
}
