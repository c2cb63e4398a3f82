//! Ids back to text, as `tokenizer.decode(ids, skip_special_tokens=True)` gives it: what a reply shows
//! of the part of a prompt that was used (lower case, cleaned, words separated by single spaces).

use super::pretokenize::is_py_space;
use super::ClipTokenizer;

impl ClipTokenizer {
    /// The text of `ids` without special tokens: the BPE pieces' bytes as UTF-8 (a character cut by
    /// truncation becomes U+FFFD), `</w>` as a space, the ends stripped; an added token that is not
    /// special stands apart, one space on each side. Ids the tokenizer does not know are skipped.
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut pieces = String::new();
        for &id in ids {
            let Ok(id) = u32::try_from(id) else { continue };
            if self.config.special.iter().any(|(_, special)| *special == id) {
                continue;
            }
            let added = self
                .config
                .added
                .iter()
                .find(|t| t.id == id)
                .map(|t| t.content.as_str());
            let Some(token) = added.or_else(|| self.tokens_by_id.get(&id).map(|t| &**t)) else {
                continue;
            };
            if self.config.special.iter().any(|(content, _)| content == token) {
                continue;
            }
            if self.config.added.iter().any(|t| t.content == token) {
                let text = self.pieces_to_text(&std::mem::take(&mut pieces));
                parts.extend((!text.is_empty()).then_some(text));
                parts.push(token.to_owned());
            } else {
                pieces.push_str(token);
            }
        }
        if !pieces.is_empty() {
            parts.push(self.pieces_to_text(&pieces));
        }
        let text = parts.join(" ");
        if self.config.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        }
    }

    /// CLIPTokenizer's `convert_tokens_to_string` of concatenated pieces.
    fn pieces_to_text(&self, pieces: &str) -> String {
        let text = String::from_utf8_lossy(&self.bpe.byte_decode(pieces)).replace("</w>", " ");
        text.trim_matches(is_py_space).to_owned()
    }
}

/// transformers' `clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
}
