//! Byte-level BPE as CLIP does it: a word's UTF-8 bytes become printable characters
//! (`bytes_to_unicode`), `</w>` marks the last symbol, and the merges of `merges.txt` apply lowest
//! rank first, each one to every occurrence left to right before the next rank is considered
//! (transformers' `CLIPTokenizer.bpe`, whose result a heap-based BPE does not always reproduce).

use std::collections::HashMap;

/// The two strings `CLIPTokenizer` seeds its BPE cache with: when the pre-tokenizer yields one of
/// them (e.g. from `<|ENDOFTEXT|>`, which the added-token split does not catch), it stays one symbol,
/// without `</w>`. The rest of that cache only saves time, so it is not kept here.
const SEEDED: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];

/// How many lines of `merges.txt` CLIP reads after its `#version` header line:
/// `merges[1 : 49152 - 256 - 2 + 1]`; later lines are ignored.
pub(super) const MERGES_READ: usize = 49152 - 256 - 2;

/// The merge ranks and the byte alphabet; immutable once built.
#[derive(Debug)]
pub(super) struct Bpe {
    /// `"left right"` (a space cannot occur in a symbol) → rank, the line's position in merges.txt.
    ranks: HashMap<String, u32>,
    /// Byte value → its printable stand-in.
    byte_chars: [char; 256],
    /// The stand-ins (all below U+0144) back to their bytes.
    char_bytes: [Option<u8>; 0x144],
}

impl Bpe {
    /// Ranks from the text of merges.txt, as CLIP reads it: the file stripped, split on `\n`, the first
    /// line (the version header) skipped, at most [`MERGES_READ`] lines kept, each split on whitespace.
    /// A line that is not two symbols still takes its rank; a repeated pair keeps its later rank.
    pub(super) fn from_merges(text: &str) -> Self {
        let mut ranks = HashMap::new();
        let lines = text.trim().split('\n').skip(1).take(MERGES_READ);
        for (rank, line) in lines.enumerate() {
            let mut parts = line.split_whitespace();
            if let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) {
                ranks.insert(format!("{left} {right}"), rank as u32);
            }
        }
        let byte_chars = bytes_to_unicode();
        let mut char_bytes = [None; 0x144];
        for (byte, c) in (0..=255u8).zip(byte_chars) {
            char_bytes[c as usize] = Some(byte);
        }
        Self {
            ranks,
            byte_chars,
            char_bytes,
        }
    }

    /// The word's bytes as BPE symbols' characters (CLIP's `byte_encoder`).
    pub(super) fn byte_encode(&self, word: &str) -> String {
        word.bytes().map(|b| self.byte_chars[b as usize]).collect()
    }

    /// The bytes BPE symbols stand for (CLIP's `byte_decoder`); characters that stand for none are
    /// skipped.
    pub(super) fn byte_decode(&self, symbols: &str) -> Vec<u8> {
        symbols
            .chars()
            .filter_map(|c| *self.char_bytes.get(c as usize)?)
            .collect()
    }

    /// The BPE pieces of one byte-encoded word, in order.
    pub(super) fn merge(&self, encoded: &str) -> Vec<String> {
        if SEEDED.contains(&encoded) {
            return vec![encoded.to_owned()];
        }
        let mut word: Vec<String> = encoded.chars().map(String::from).collect();
        match word.last_mut() {
            Some(last) => last.push_str("</w>"),
            None => return Vec::new(),
        }
        let mut key = String::new();
        while word.len() > 1 {
            // The adjacent pair of lowest rank; equal ranks can only be the same pair.
            let mut best: Option<(u32, usize)> = None;
            for i in 0..word.len() - 1 {
                key.clear();
                key.push_str(&word[i]);
                key.push(' ');
                key.push_str(&word[i + 1]);
                if let Some(&rank) = self.ranks.get(&key) {
                    if best.is_none_or(|(r, _)| rank < r) {
                        best = Some((rank, i));
                    }
                }
            }
            let Some((_, at)) = best else { break };
            let (first, second) = (word[at].clone(), word[at + 1].clone());
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }
}

/// CLIP's (and GPT-2's) reversible map from bytes to printable characters: the printable Latin-1
/// bytes stand for themselves, the other 68 take U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are characters")
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_map_to_printable_characters_one_to_one() {
        let table = bytes_to_unicode();
        assert_eq!((table[b'a' as usize], table[b' ' as usize], table[0]), ('a', 'Ġ', 'Ā'));
        let distinct: std::collections::HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        let bpe = Bpe::from_merges("");
        assert_eq!(bpe.byte_decode(&bpe.byte_encode("é \0")), "é \0".as_bytes());
        assert!(table.iter().all(|c| !c.is_whitespace() && !c.is_control()));
    }

    #[test]
    fn merges_apply_lowest_rank_first_to_every_occurrence() {
        let bpe = Bpe::from_merges("#version: 0.2\na a\naa a</w>\nb c\n");
        assert_eq!(bpe.merge("aaa"), ["aaa</w>"]);
        // `a a` applies at 0 only (1 overlaps it; 2-3 is `a a</w>`), and `aa a` has no rank.
        assert_eq!(bpe.merge("aaaa"), ["aa", "a", "a</w>"]);
        assert_eq!(bpe.merge("x"), ["x</w>"]);
        assert_eq!(bpe.merge("<|endoftext|>"), ["<|endoftext|>"]);
    }
}
