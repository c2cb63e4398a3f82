//! Added tokens (CLIP's `<|startoftext|>`, `<|endoftext|>`, SD 2.x's pad `!`): cut out of the raw
//! text before ftfy and the rest, each becoming its own id, as `PreTrainedTokenizer.tokenize` does
//! with its trie (leftmost match, the longest at that position), then its `lstrip`, `rstrip` and
//! `single_word` handling of the neighbouring text.

use serde_json::Value;

use super::pretokenize::is_py_space;

/// One added token and how it treats the text around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AddedToken {
    pub(super) content: String,
    pub(super) id: u32,
    /// Eats the whitespace on its left.
    pub(super) lstrip: bool,
    /// Eats the whitespace on its right.
    pub(super) rstrip: bool,
    /// Only stands alone between spaces; otherwise it is glued back onto its neighbour.
    pub(super) single_word: bool,
}

impl AddedToken {
    /// A token given as a plain string: no stripping.
    pub(super) fn plain(content: &str) -> Self {
        Self {
            content: content.to_owned(),
            id: 0,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }

    /// A token as transformers writes it: a string, or an object with `content` and flags.
    pub(super) fn from_json(value: &Value, id: u32) -> Result<Self, String> {
        let flag = |key: &str| value.get(key).and_then(Value::as_bool).unwrap_or(false);
        match value {
            Value::String(content) => Ok(Self {
                id,
                ..Self::plain(content)
            }),
            Value::Object(fields) => match fields.get("content").and_then(Value::as_str) {
                Some(content) => Ok(Self {
                    content: content.to_owned(),
                    id,
                    lstrip: flag("lstrip"),
                    rstrip: flag("rstrip"),
                    single_word: flag("single_word"),
                }),
                None => Err(format!("token without a string content: {value}")),
            },
            _ => Err(format!("a token is a string or an object, not {value}")),
        }
    }
}

/// A part of the raw text: plain text for the rest of the pipeline, or an added token's id.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    Text(String),
    Added(u32),
}

/// Cuts `text` at the added tokens, in order, dropping pieces that end up empty.
pub(super) fn split(text: &str, added: &[AddedToken]) -> Vec<Piece> {
    let find = |s: &str| added.iter().find(|t| t.content == s);
    // The trie's cut: at each position the longest token that starts there.
    let mut parts: Vec<String> = Vec::new();
    let (mut start, mut at) = (0, 0);
    while at < text.len() {
        let rest = &text[at..];
        let longest = added
            .iter()
            .filter(|t| !t.content.is_empty() && rest.starts_with(&t.content));
        match longest.map(|t| t.content.len()).max() {
            Some(len) => {
                if start < at {
                    parts.push(text[start..at].to_owned());
                }
                parts.push(text[at..at + len].to_owned());
                at += len;
                start = at;
            }
            None => at += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        parts.push(text[start..].to_owned());
    }
    // The neighbours' stripping and gluing. As in Python, each step reads the part as earlier steps
    // left it, while the checks read the neighbours as they were when this token's turn came.
    for i in 0..parts.len() {
        let Some(token) = find(&parts[i]).cloned() else {
            continue;
        };
        let left = i.checked_sub(1).map(|j| parts[j].clone()).filter(|p| !p.is_empty());
        let right = parts.get(i + 1).cloned().filter(|p| !p.is_empty());
        if let (true, Some(right)) = (token.rstrip, &right) {
            parts[i + 1] = right.trim_start_matches(is_py_space).to_owned();
        }
        if let (true, Some(left)) = (token.lstrip, &left) {
            parts[i - 1] = left.trim_end_matches(is_py_space).to_owned();
        }
        if token.single_word && left.as_ref().is_some_and(|l| !l.ends_with(' ')) {
            parts[i - 1].push_str(&token.content);
            parts[i].clear();
        } else if token.single_word && right.as_ref().is_some_and(|r| !r.starts_with(' ')) {
            parts[i + 1].insert_str(0, &token.content);
            parts[i].clear();
        }
    }
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match find(&p) {
            Some(token) => Piece::Added(token.id),
            None => Piece::Text(p),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(content: &str, id: u32) -> AddedToken {
        AddedToken {
            id,
            ..AddedToken::plain(content)
        }
    }

    #[test]
    fn added_tokens_are_cut_out_leftmost_longest() {
        let added = [token("<|endoftext|>", 7), token("!", 0), token("<|end", 9)];
        let text = |s: &str| Piece::Text(s.to_owned());
        assert_eq!(
            split("hi!! <|endoftext|>x", &added),
            [
                text("hi"),
                Piece::Added(0),
                Piece::Added(0),
                text(" "),
                Piece::Added(7),
                text("x")
            ]
        );
        assert_eq!(split("<|end", &added), [Piece::Added(9)]);
        assert_eq!(split("", &added), []);
    }

    #[test]
    fn flags_strip_or_glue_the_neighbours() {
        let stripping = AddedToken {
            lstrip: true,
            rstrip: true,
            ..token("[M]", 5)
        };
        let text = |s: &str| Piece::Text(s.to_owned());
        assert_eq!(
            split("a  [M] \u{1c}b", &[stripping]),
            [text("a"), Piece::Added(5), text("b")]
        );
        let word = AddedToken {
            single_word: true,
            ..token("[M]", 5)
        };
        let word = [word];
        assert_eq!(split("a[M] b", &word), [text("a[M]"), text(" b")]);
        assert_eq!(split("a [M]b", &word), [text("a "), text("[M]b")]);
        assert_eq!(split("a [M] b", &word), [text("a "), Piece::Added(5), text(" b")]);
    }
}
