//! The CLIP tokenizer of Stable Diffusion pipelines: the input ids transformers' slow
//! `CLIPTokenizer` (4.57.6, the class diffusers loads from a model's `tokenizer/` folder) gives
//! **with ftfy installed**, for `tokenizer(text, padding="max_length", max_length=model_max_length,
//! truncation=True)`, read from the folder's `vocab.json`, `merges.txt`, `tokenizer_config.json` and
//! `special_tokens_map.json`.
//!
//! # The text's way
//!
//! 1. `added_tokens`: the added tokens (`<|startoftext|>`, `<|endoftext|>`, SD 2.x's pad `!`) are
//!    cut out of the raw text and become their ids; each piece in between goes on alone.
//! 2. `fix_text` (with `html`): `ftfy.fix_text` — HTML entities, C1 controls, Latin ligatures,
//!    character width, curly quotes, line breaks, terminal escapes, control characters, NFC.
//! 3. `pretokenize`: `whitespace_clean(..).lower()`, then the words of CLIP's pattern.
//! 4. `bpe`: each word's UTF-8 bytes as printable characters, merged by `merges.txt`'s ranks.
//! 5. Here: pieces to ids (added tokens, then the vocabulary, else unk), cut to `max_length - 2`,
//!    then `[bos, ids.., eos]` padded with the pad id to exactly `max_length`.
//!
//! `decode` turns ids back into the text they stand for, as `tokenizer.decode(ids,
//! skip_special_tokens=True)` does (what a reply shows of a truncated prompt).
//!
//! tests/data/diffusion/tokenizer_cases.json holds CLIPTokenizer's ids and decodings for the cases
//! the tests check (make_tokenizer_cases.py next to it says how they were made).
//!
//! # Crates
//!
//! Unicode data comes from `icu_normalizer` (NFC, and NFKC for ftfy's width fix) and
//! `icu_properties` (the general categories behind `\p{L}`, `\p{N}` and `\d`), which kiln already
//! compiles (url → idna) with the same features, so they cost no build time; Rust's `char` gives
//! White_Space and lower-casing. CLIP's pattern is simple enough to write out, so no regex engine.
//! `tokenizers` (the fast tokenizer) is a heavy build and is not the slow class diffusers loads.
//! `instant-clip-tokenizer` reads OpenAI's merges file (its own copy by default), not a folder's
//! `vocab.json` and special tokens; it only lower-cases the text (no ftfy, no `whitespace_clean`),
//! pads with 0, and brings `regex` and `ahash`.
//!
//! # Where this differs from CLIPTokenizer with ftfy
//!
//! - **Mojibake repair** (`ftfy.fix_encoding`, with its `restore_byte_a0`, `replace_lossy_sequences`
//!   and `decode_inconsistent_utf8`) is left out: a line that ftfy's badness heuristic takes for
//!   mis-decoded UTF-8 (`cafÃ©`) is re-decoded by ftfy (`café`) and tokenized as written here. Text
//!   that heuristic does not flag is unaffected; C1 controls are still fixed by `fix_c1_controls`.
//! - **Unicode version**: Rust's `char` and ICU use Unicode 17, CPython 3.11's `str.lower` and NFC
//!   Unicode 14 (the `regex` module's `\s`, `\p{L}`, `\p{N}` are Unicode 17 and agree code point for
//!   code point). 55 code points new since Unicode 14 lower-case here and not in Python 3.11, and 90
//!   new combining marks have a combining class here, which NFC can reorder.
//! - `fix_surrogates` has nothing to do: a `&str` holds no surrogate code points.
//! - The added-token cut is leftmost-longest; transformers' trie can differ only for added tokens
//!   that overlap each other, which CLIP folders do not have.
//! - CLIPTokenizer's BPE cache only saves time (except its two seeded entries, kept in `bpe`); a
//!   prompt's BPE takes microseconds, so there is none to lock between threads.
//!
//! The cost is linear in the text except BPE, quadratic in the length of one word: callers should
//! bound the prompt's length (kilobytes, not megabytes) before calling [`ClipTokenizer::encode`].

mod added_tokens;
mod bpe;
mod config;
mod decode;
mod files;
mod fix_text;
mod html;
mod pretokenize;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use added_tokens::Piece;
use bpe::Bpe;
use config::Config;

/// Why a tokenizer folder could not be loaded; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("could not read tokenizer file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// The file was read, but its content is not what CLIPTokenizer accepts.
    #[error("invalid tokenizer file {path}: {reason}")]
    Invalid {
        /// The file (the folder, for a special token missing from `vocab.json`).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A prompt's input ids for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `[bos, tokens.., eos, pad..]`, exactly [`ClipTokenizer::max_length`] long (on the padding
    /// side and truncation side the folder asks for; CLIP's are both right).
    pub ids: Vec<i64>,
    /// Whether the text had more than `max_length - 2` tokens.
    pub truncated: bool,
    /// How many of the text's tokens are in `ids` (at most `max_length - 2`).
    pub tokens_used: usize,
    /// How many of the text's tokens did not fit.
    pub tokens_dropped: usize,
}

/// A model's CLIP tokenizer: immutable once loaded, so one `Arc<ClipTokenizer>` serves every thread.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    tokens_by_id: HashMap<u32, Box<str>>,
    bpe: Bpe,
    config: Config,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Reads `vocab.json`, `merges.txt`, and the special tokens and `model_max_length` from
    /// `tokenizer_config.json` and `special_tokens_map.json` (and, where transformers would,
    /// `added_tokens.json` and `tokenizer.json`'s added tokens) in a model's `tokenizer/` folder.
    ///
    /// # Errors
    ///
    /// [`TokenizerError::Read`] when `vocab.json` or `merges.txt` is missing or a file cannot be
    /// read; [`TokenizerError::Invalid`] when a file is not valid JSON of the expected shape, a
    /// special token is null or not in the vocabulary, or `model_max_length` is missing or unusable.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let vocab = files::read_vocab(&dir.join("vocab.json"))?;
        let bpe = Bpe::from_merges(&files::read_text(&dir.join("merges.txt"))?);
        let config = config::load(dir, &vocab)?;
        let tokens_by_id = vocab.iter().map(|(token, &id)| (id, token.as_str().into())).collect();
        Ok(Self {
            vocab,
            tokens_by_id,
            bpe,
            config,
        })
    }

    /// The ids of `text` as Stable Diffusion pipelines make them: `tokenizer(text,
    /// padding="max_length", max_length=model_max_length, truncation=True)`.
    pub fn encode(&self, text: &str) -> Encoded {
        let mut tokens = Vec::new();
        let pieces = if self.config.split_special_tokens {
            vec![Piece::Text(text.to_owned())]
        } else {
            added_tokens::split(text, &self.config.added)
        };
        for piece in pieces {
            match piece {
                Piece::Added(id) => tokens.push(id),
                Piece::Text(text) => self.push_text_tokens(&text, &mut tokens),
            }
        }
        let max_length = self.config.max_length;
        let tokens_dropped = tokens.len().saturating_sub(max_length - 2);
        if self.config.truncate_left {
            tokens.drain(..tokens_dropped);
        } else {
            tokens.truncate(max_length - 2);
        }
        let mut ids = Vec::with_capacity(max_length);
        let padding = std::iter::repeat_n(self.config.pad, max_length - tokens.len() - 2);
        if self.config.pad_left {
            ids.extend(padding.clone());
        }
        ids.push(self.config.bos);
        ids.extend(&tokens);
        ids.push(self.config.eos);
        if !self.config.pad_left {
            ids.extend(padding);
        }
        Encoded {
            ids: ids.into_iter().map(i64::from).collect(),
            truncated: tokens_dropped > 0,
            tokens_used: tokens.len(),
            tokens_dropped,
        }
    }

    /// The length of every [`Encoded::ids`]: the folder's `model_max_length` (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.config.max_length
    }

    /// CLIPTokenizer's `_tokenize` of one piece between added tokens, then its ids.
    fn push_text_tokens(&self, text: &str, tokens: &mut Vec<u32>) {
        let cleaned = pretokenize::clean_and_lower(&fix_text::fix_text(text));
        for word in pretokenize::words(&cleaned) {
            for piece in self.bpe.merge(&self.bpe.byte_encode(word)) {
                tokens.push(self.token_id(&piece));
            }
        }
    }

    /// `convert_tokens_to_ids` of one BPE piece: an added token's id, else the vocabulary's, else unk.
    fn token_id(&self, token: &str) -> u32 {
        let added = self.config.added.iter().find(|t| t.content == token).map(|t| t.id);
        added
            .or_else(|| self.vocab.get(token).copied())
            .unwrap_or(self.config.unk)
    }
}
