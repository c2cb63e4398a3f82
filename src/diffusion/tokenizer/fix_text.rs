//! `ftfy.fix_text` (ftfy 6.3.1, default configuration) as CLIPTokenizer calls it, minus the mojibake
//! repair (`fix_encoding`; see the `tokenizer` module docs for what that leaves out).
//!
//! The text is fixed a line at a time (each segment ends after a `\n`, or after 1 000 000 characters).
//! HTML entities are unescaped only until a segment contains `<`: from then on (that segment and the
//! following ones) the text is taken for HTML and its entities are kept. Each segment goes through
//! the fixers below, in ftfy's order, again and again until a pass changes nothing:
//!
//! 1. `unescape_html` (see [`super::html`]);
//! 2. `fix_c1_controls`: U+0080..U+009F become their Windows-1252 characters;
//! 3. `fix_latin_ligatures`: `ﬁ` → `fi` and the other Latin ligatures and digraphs ftfy lists;
//! 4. `fix_character_width`: fullwidth and halfwidth forms (U+FF01..U+FFEF) become their NFKC form,
//!    U+3000 IDEOGRAPHIC SPACE a space;
//! 5. `uncurl_quotes`: U+02BC and U+2018..U+201B → `'`, U+201C..U+201F → `"`;
//! 6. `fix_line_breaks`: CRLF, CR, U+2028, U+2029 and U+0085 → `\n`;
//! 7. `fix_surrogates`: nothing to do, a Rust string cannot hold a surrogate code point;
//! 8. `remove_terminal_escapes`: `ESC [ (digits|;)* letter` (digits: any Unicode Nd);
//! 9. `remove_control_chars`: U+0000..U+0008, U+000B, U+000E..U+001F, U+007F, U+206A..U+206F, U+FEFF,
//!    U+FFF9..U+FFFC;
//! 10. NFC (`icu_normalizer`).

use icu_normalizer::{ComposingNormalizer, ComposingNormalizerBorrowed};
use icu_properties::props::GeneralCategory;
use icu_properties::CodePointMapData;

use super::html::{self, WINDOWS_1252_C1};

/// ftfy's `max_decode_length`: the longest segment fixed at once, in characters.
const MAX_SEGMENT_CHARS: usize = 1_000_000;

const NFC: ComposingNormalizerBorrowed<'static> = ComposingNormalizer::new_nfc();
const NFKC: ComposingNormalizerBorrowed<'static> = ComposingNormalizer::new_nfkc();

/// `ftfy.fix_text(text)` without `fix_encoding`.
pub(super) fn fix_text(text: &str) -> String {
    let mut fixed = String::with_capacity(text.len());
    let mut unescape_html = true;
    for segment in segments(text) {
        unescape_html &= !segment.contains('<');
        fixed.push_str(&fix_segment(segment, unescape_html));
    }
    fixed
}

/// The text cut after each `\n` and after every [`MAX_SEGMENT_CHARS`] characters of a longer line.
fn segments(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n').flat_map(|line| {
        let mut rest = line;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let cut = rest
                .char_indices()
                .nth(MAX_SEGMENT_CHARS)
                .map_or(rest.len(), |(at, _)| at);
            let (segment, tail) = rest.split_at(cut);
            rest = tail;
            Some(segment)
        })
    })
}

/// ftfy's `fix_and_explain` loop. It ends: every fixer but `unescape_html` is idempotent, and
/// unescaping shortens the text.
fn fix_segment(segment: &str, unescape_html: bool) -> String {
    let mut text = segment.to_owned();
    loop {
        let before = text.clone();
        if unescape_html {
            text = html::unescape(&text);
        }
        text = map_chars(&text, |c, out| match c {
            '\u{80}'..='\u{9F}' => out.push(WINDOWS_1252_C1[c as usize - 0x80]),
            _ => out.push(c),
        });
        text = map_chars(&text, |c, out| match ligature(c) {
            Some(letters) => out.push_str(letters),
            None => out.push(c),
        });
        text = map_chars(&text, |c, out| match c {
            '\u{3000}' => out.push(' '),
            '\u{FF01}'..='\u{FFEF}' => out.push_str(&NFKC.normalize(c.encode_utf8(&mut [0; 4]))),
            _ => out.push(c),
        });
        text = map_chars(&text, |c, out| match c {
            '\u{2BC}' | '\u{2018}'..='\u{201B}' => out.push('\''),
            '\u{201C}'..='\u{201F}' => out.push('"'),
            _ => out.push(c),
        });
        text = text
            .replace("\r\n", "\n")
            .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        text = remove_terminal_escapes(&text);
        text.retain(|c| {
            !matches!(c, '\0'..='\u{8}' | '\u{B}' | '\u{E}'..='\u{1F}' | '\u{7F}' | '\u{206A}'..='\u{206F}'
                | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}')
        });
        text = NFC.normalize(&text).into_owned();
        if text == before {
            return text;
        }
    }
}

fn map_chars(text: &str, mut f: impl FnMut(char, &mut String)) -> String {
    let mut out = String::with_capacity(text.len());
    text.chars().for_each(|c| f(c, &mut out));
    out
}

/// ftfy's `LIGATURES`: Latin ligatures and the digraphs encoded for legacy reasons (not `æ`, `œ`).
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// Removes `ESC [ (\d|;)* [a-zA-Z]`, where `\d` is Python's: any decimal digit (general category Nd).
fn remove_terminal_escapes(text: &str) -> String {
    if !text.contains("\u{1b}[") {
        return text.to_owned();
    }
    let digits = CodePointMapData::<GeneralCategory>::new();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\u{1b}[") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let params = after
            .find(|c: char| c != ';' && digits.get(c) != GeneralCategory::DecimalNumber)
            .unwrap_or(after.len());
        if after[params..].starts_with(|c: char| c.is_ascii_alphabetic()) {
            rest = &after[params + 1..];
        } else {
            out.push('\u{1b}');
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixers_apply_in_order() {
        assert_eq!(fix_text("ﬁsh “quoted” it’s ＡＢＣ　１"), "fish \"quoted\" it's ABC 1");
        assert_eq!(fix_text("\u{93}c1\u{94} \u{85}"), "\"c1\" …");
        assert_eq!(fix_text("a\r\nb\rc\u{2028}d"), "a\nb\nc\nd");
        // `\u{1b}[1#` is no escape (`#`), but ESC is a control character ftfy removes.
        assert_eq!(fix_text("\u{1b}[31mred\u{1b}[0m \u{1b}[٣m\u{1b}[1#x"), "red [1#x");
        assert_eq!(fix_text("a\0b\u{7}\u{feff}c\te"), "abc\te");
        assert_eq!(fix_text("cafe\u{301} ｶﾞ"), "café ガ");
    }

    #[test]
    fn html_is_unescaped_until_a_line_has_a_tag() {
        assert_eq!(fix_text("&amp;amp; &lt;b&gt;"), "& <b>");
        assert_eq!(fix_text("&amp;\n<b>&amp;</b>\n&amp;"), "&\n<b>&amp;</b>\n&amp;");
    }

    #[test]
    fn long_lines_are_cut_into_segments() {
        let line = "a".repeat(MAX_SEGMENT_CHARS + 5) + "\nb";
        let lens: Vec<usize> = segments(&line).map(str::len).collect();
        assert_eq!(lens, [MAX_SEGMENT_CHARS, 6, 1]);
    }
}
