//! CLIP's text to words, after ftfy: `whitespace_clean(text).lower()`, then the words its pattern
//!
//! ```text
//! <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
//! ```
//!
//! finds (Python's `regex` module, IGNORECASE), written out by hand. Checked code point by code
//! point against `regex` 2026.11.19: its `\s` is Unicode White_Space (Rust's `char::is_whitespace`),
//! its `\p{L}` and `\p{N}` are ICU's general categories (`icu_properties`, same Unicode 17 data), and
//! IGNORECASE changes two things that survive `.lower()`: `s` also matches `ſ` (U+017F), and U+0345
//! COMBINING GREEK YPOGEGRAMMENI (case-folds to ι) matches no alternative at all, so it is skipped
//! like a space.

use icu_properties::props::{GeneralCategory, GeneralCategoryGroup};
use icu_properties::{CodePointMapData, CodePointMapDataBorrowed};

/// The Unicode general category of every code point (ICU's compiled data).
const CATEGORIES: CodePointMapDataBorrowed<'static, GeneralCategory> = CodePointMapData::new();

/// The pattern's literal alternatives, in its order; each `s` also matches `ſ`.
const SPECIALS: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];
const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];

/// `whitespace_clean(text).lower()`: runs of `\s` become one space, the ends are stripped (Python's
/// `str.strip`, whose extra separators U+001C..U+001F ftfy has already removed), then Python's
/// `str.lower` (full mappings, final sigma; Rust's `to_lowercase` is the same function of the
/// Unicode data, see the module docs of `tokenizer` for the version).
pub(super) fn clean_and_lower(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for word in text.split(char::is_whitespace).filter(|w| !w.is_empty()) {
        if !cleaned.is_empty() {
            cleaned.push(' ');
        }
        cleaned.push_str(word);
    }
    cleaned.to_lowercase()
}

/// Python's `str.isspace`, which `str.strip` uses: White_Space and U+001C..U+001F.
pub(super) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Which alternative of the pattern a character belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// `\s`, or U+0345: between words, never in one.
    Skip,
    /// `[\p{L}]+`
    Letter,
    /// `[\p{N}]`, one character per word.
    Number,
    /// `[^\s\p{L}\p{N}]+`
    Other,
}

fn class(c: char) -> Class {
    if c.is_whitespace() || c == '\u{345}' {
        return Class::Skip;
    }
    let category = CATEGORIES.get(c);
    if GeneralCategoryGroup::Letter.contains(category) {
        Class::Letter
    } else if GeneralCategoryGroup::Number.contains(category) {
        Class::Number
    } else {
        Class::Other
    }
}

/// The length in bytes of `literal` at the start of `text`, matched as IGNORECASE does here.
fn literal_at(text: &str, literal: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    for want in literal.chars() {
        let (_, got) = chars.next()?;
        let same = got.to_ascii_lowercase() == want || (want == 's' && got == 'ſ');
        if !same {
            return None;
        }
    }
    Some(chars.next().map_or(text.len(), |(at, _)| at))
}

/// The words of cleaned, lowercased text, in order (`re.findall` of the pattern).
pub(super) fn words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut at = 0;
    while let Some(c) = text[at..].chars().next() {
        let rest = &text[at..];
        let literal = match c {
            '<' => SPECIALS.iter().find_map(|s| literal_at(rest, s)),
            '\'' => CONTRACTIONS.iter().find_map(|s| literal_at(rest, s)),
            _ => None,
        };
        let len = match (literal, class(c)) {
            (Some(len), _) => len,
            (None, Class::Skip) => {
                at += c.len_utf8();
                continue;
            }
            (None, Class::Number) => c.len_utf8(),
            (None, run) => rest.find(|next| class(next) != run).unwrap_or(rest.len()),
        };
        words.push(&rest[..len]);
        at += len;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_runs_become_one_space_and_text_is_lowercased() {
        assert_eq!(clean_and_lower("  A\t\n B\u{3000}C  "), "a b c");
        assert_eq!(clean_and_lower("İ ΟΔΟΣ"), "i\u{307} οδος");
        assert_eq!(clean_and_lower(" \n "), "");
    }

    #[test]
    fn words_follow_the_pattern() {
        assert_eq!(words("don't stop!'s"), ["don", "'t", "stop", "!'", "s"]);
        assert_eq!(
            words("1024x768 v1.5"),
            ["1", "0", "2", "4", "x", "7", "6", "8", "v", "1", ".", "5"]
        );
        assert_eq!(
            words("<<|endoftext|> <|endoftext|>"),
            ["<<|", "endoftext", "|>", "<|endoftext|>"]
        );
        assert_eq!(words("<|ſtartoftext|>it'ſ"), ["<|ſtartoftext|>", "it", "'ſ"]);
        assert_eq!(words("a\u{345}b 東京の夜景"), ["a", "b", "東京の夜景"]);
        assert_eq!(words("i\u{307}stanbul"), ["i", "\u{307}", "stanbul"]);
        assert!(words("").is_empty());
    }
}
