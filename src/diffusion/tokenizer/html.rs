//! ftfy's `unescape_html`: HTML entities matched by `&#?[0-9A-Za-z]{1,24};` become the characters they
//! stand for. Named ones come from ftfy's table (`html_entities.txt`: the HTML5 names that end in `;`,
//! plus upper-case forms of lower-case names such as `&EACUTE;`); numeric ones follow Python's
//! `html.unescape`, and are kept as written when that would leave a `;` (a partial parse, or `&#59;`).

use std::collections::HashMap;
use std::sync::OnceLock;

/// `name:HEX[,HEX]` items separated by spaces and new lines; `#` starts a comment line.
const TABLE: &str = include_str!("html_entities.txt");

/// Windows-1252's characters for bytes 0x80..=0x9F; the five bytes it leaves undefined keep their
/// Latin-1 (C1) code point, as ftfy's "sloppy" codec and Python's `html.unescape` both do.
pub(super) const WINDOWS_1252_C1: [char; 32] = [
    '\u{20AC}', '\u{81}', '\u{201A}', '\u{192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{2C6}', '\u{2030}',
    '\u{160}', '\u{2039}', '\u{152}', '\u{8D}', '\u{17D}', '\u{8F}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201C}',
    '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}', '\u{2DC}', '\u{2122}', '\u{161}', '\u{203A}', '\u{153}', '\u{9D}',
    '\u{17E}', '\u{178}',
];

fn named() -> &'static HashMap<&'static str, String> {
    static NAMED: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    NAMED.get_or_init(|| {
        let items = TABLE
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(str::split_whitespace);
        items
            .map(|item| {
                let (name, points) = item.split_once(':').expect("html_entities.txt: name:HEX");
                let text = points
                    .split(',')
                    .map(|hex| u32::from_str_radix(hex, 16).ok().and_then(char::from_u32))
                    .collect::<Option<String>>()
                    .expect("html_entities.txt: code points");
                (name, text)
            })
            .collect()
    })
}

/// Replaces every entity the pattern matches, left to right, once (ftfy's loop calls this again
/// until the text stops changing, so `&amp;amp;` ends as `&`).
pub(super) fn unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(len) = entity_len(rest) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[..len];
        let body = &entity[1..len - 1];
        match body.strip_prefix('#') {
            None => out.push_str(named().get(body).map_or(entity, String::as_str)),
            Some(number) => match numeric(number) {
                Some(c) if c != Some(';') => out.extend(c),
                _ => out.push_str(entity),
            },
        }
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

/// The length of `&#?[0-9A-Za-z]{1,24};` at the start of `text`, if it matches there.
fn entity_len(text: &str) -> Option<usize> {
    let hash = usize::from(text[1..].starts_with('#'));
    let digits = text[1 + hash..].bytes().take_while(u8::is_ascii_alphanumeric).count();
    let end = 1 + hash + digits;
    ((1..=24).contains(&digits) && text[end..].starts_with(';')).then_some(end + 1)
}

/// What `html.unescape("&#" + number + ";")` gives when it consumes the whole reference: `Some(None)`
/// for a reference it deletes, `None` when it would leave text behind (so ftfy keeps the original).
fn numeric(number: &str) -> Option<Option<char>> {
    let (digits, radix) = match number.strip_prefix(['x', 'X']) {
        Some(hex) => (hex, 16),
        None => (number, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Saturating: anything past U+10FFFF is replaced alike.
    let value = digits.chars().fold(0u64, |v, c| {
        v.saturating_mul(u64::from(radix))
            .saturating_add(u64::from(c.to_digit(radix).unwrap_or(0)))
    });
    Some(match value {
        0 => Some('\u{FFFD}'),
        0x0D => Some('\r'),
        0x80..=0x9F => Some(WINDOWS_1252_C1[(value - 0x80) as usize]),
        0xD800..=0xDFFF | 0x11_0000.. => Some('\u{FFFD}'),
        0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0xFDD0..=0xFDEF => None,
        v if v & 0xFFFE == 0xFFFE => None,
        v => char::from_u32(v as u32),
    })
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn entities_become_characters() {
        assert_eq!(
            unescape("rock &amp; roll &lt;3 &EACUTE;t&eacute; &nbsp;"),
            "rock & roll <3 Été \u{a0}"
        );
        assert_eq!(unescape("&#39;&#x27;&#X41;&#128;&#0;"), "''A€\u{FFFD}");
        assert_eq!(unescape("&amp;amp;"), "&amp;");
    }

    #[test]
    fn what_is_not_a_whole_entity_stays() {
        for text in [
            "&#59;",
            "&#12ab;",
            "&nosuchname;",
            "fish &chips",
            "&#;",
            "&#x;",
            "& amp;",
            "&",
        ] {
            assert_eq!(unescape(text), text);
        }
        assert_eq!(unescape("a&#1;b&#xFFFF;c&#99999999999999999999999;"), "abc\u{FFFD}");
        let long = format!("&{};", "a".repeat(25));
        assert_eq!(unescape(&long), long);
    }
}
