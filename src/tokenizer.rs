//! CLIP byte-level BPE tokenizer, equal to transformers' `CLIPTokenizer`.
//!
//! Reference: transformers 5.x `models/clip/tokenization_clip.py`, where
//! `CLIPTokenizer` is the `tokenizers`-backed class (the pure-Python one,
//! with its BasicTokenizer/ftfy cleanup, is gone), and OpenAI CLIP's
//! `simple_tokenizer.py` for the vocabulary and BPE. What diffusers runs:
//!
//! 1. Added (special) tokens are cut out of the text first: BOS, EOS, and
//!    the pad token. SD 2.x pads with `!`, which is therefore a special
//!    token there: `"wow!!!"` gives `wow</w>`, 0, 0, 0 (SD 1.x: `wow</w>`,
//!    `!!!</w>`). Tokens flagged `normalized: false` match the raw text,
//!    the others the normalised text (see [`ClipTokenizer::from_files`]).
//! 2. Normaliser: NFC, `\s+` -> `" "`, per-char lower-casing, in that order,
//!    on each piece of text between the raw-matched added tokens (see
//!    `normalize`). NFC is [`nfc()`] (`tokenizer/nfc.rs`), with the
//!    reference's Unicode 9.0.0 data ([`NFC_UNICODE_VERSION`]).
//! 3. Pre-tokeniser: CLIP's regex
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (whitespace between matches dropped), then GPT-2's ByteLevel split,
//!    which only changes the two `<|...|>` literals (see [`pre_tokenize`]).
//! 4. Each piece as UTF-8 bytes, each byte as a printable char
//!    (`bytes_to_unicode`), BPE-merged by rank; the last symbol of a word
//!    carries `</w>`.
//! 5. BOS + ids + EOS; diffusers then pads/truncates to 77.
//!
//! transformers 4.x's pure-Python `CLIPTokenizer` cleaned text differently:
//! with ftfy installed, `ftfy.fix_text` (NFC plus mojibake and HTML-entity
//! repairs, curly quotes, ligatures and full-width forms made plain); without
//! it, BERT's `BasicTokenizer` (control chars dropped, CJK chars split
//! apart, then Python's NFC, of its own newer Unicode). Neither runs in
//! transformers 5, which is what diffusers uses and what we match
//! (tools/make_tokenizer_fixtures.py --slow-transformers lists the
//! differences).

mod nfc;
mod nfc_tables;

pub use nfc::nfc;
/// Unicode version of the NFC data: that of `tokenizers`' NFC, which
/// leaves code points assigned later unnormalised.
pub use nfc_tables::UNICODE_VERSION as NFC_UNICODE_VERSION;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Default BOS token text (CLIP vocabulary id 49406).
const DEFAULT_BOS: &str = "<|startoftext|>";
/// Default EOS token text (id 49407), also CLIPTokenizer's default unk/pad.
const DEFAULT_EOS: &str = "<|endoftext|>";
/// Context length of CLIP's text encoder, used when `tokenizer_config.json`
/// does not give one (transformers would then not truncate at all).
const DEFAULT_MAX_LENGTH: usize = 77;

/// Error while loading a tokenizer; names the offending file.
#[derive(Debug)]
pub enum TokenizerError {
    /// A file could not be read.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file was read but does not hold what a CLIP tokenizer needs.
    Format { path: PathBuf, message: String },
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::Io { path, source } => write!(
                f,
                "cannot read tokenizer file {}: {source} (HINT: a diffusers `tokenizer/` folder holds \
                 vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json)",
                path.display()
            ),
            TokenizerError::Format { path, message } => {
                write!(f, "bad tokenizer file {}: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for TokenizerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TokenizerError::Io { source, .. } => Some(source),
            TokenizerError::Format { .. } => None,
        }
    }
}

/// Into the crate's error type, so callers can use `?` with `crate::Result`.
impl From<TokenizerError> for crate::Error {
    fn from(e: TokenizerError) -> Self {
        match e {
            TokenizerError::Io { ref path, .. } => crate::Error::Io {
                path: path.display().to_string(),
                message: e.to_string(),
            },
            TokenizerError::Format { .. } => crate::Error::config("tokenizer", e.to_string()),
        }
    }
}

fn format_err(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| format_err(path, format!("invalid JSON: {e}")))
}

/// A prompt encoded to the text encoder's fixed context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `model_max_length` ids: BOS, tokens, EOS, padding.
    pub ids: Vec<u32>,
    /// True when tokens were dropped to fit (diffusers logs a warning then).
    pub truncated: bool,
    /// Index of the EOS token in `ids`, where CLIP's pooled output is read
    /// (transformers/OpenCLIP take the argmax of the ids, i.e. this EOS).
    pub eos_position: usize,
}

/// A special token cut out of the text before normalisation/BPE.
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    /// Matched against the normalised text (true) or the raw text (false).
    normalized: bool,
}

/// A piece of text after added-token extraction.
enum Segment<'a> {
    Text(&'a str),
    Token(u32),
}

/// CLIP byte-level BPE tokenizer (see module docs).
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    /// Merge ranks keyed by the (left, right) pair; lower merges first.
    bpe_ranks: HashMap<(String, String), u32>,
    /// `bytes_to_unicode`: byte value -> printable stand-in char.
    byte_encoder: [char; 256],
    added: Vec<AddedToken>,
    bos_id: u32,
    eos_id: u32,
    unk_id: u32,
    pad_id: u32,
    model_max_length: usize,
    /// Memo of piece -> ids, like the BPE model's cache.
    cache: Mutex<HashMap<String, Vec<u32>>>,
    /// Textual-inversion words: (the word's own token ids, the ids standing for its vectors),
    /// longest word first (see [`ClipTokenizer::set_embedding_tokens`]).
    embedding_tokens: Vec<(Vec<u32>, Vec<u32>)>,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.encoder.len())
            .field("merges", &self.bpe_ranks.len())
            .field("added", &self.added)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

/// GPT-2/CLIP `bytes_to_unicode`: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order, so every
/// byte string becomes a whitespace-free printable string.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u8;
        *slot = if printable(b) {
            char::from(b)
        } else {
            // U+0100..U+0143: always valid chars.
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
    }
    table
}

/// One special-token entry of the JSON configs: a plain string, or an
/// `AddedToken` object `{"content": ..., "normalized": ...}`. Returns
/// (content, normalized); transformers treats a plain string as a special
/// `AddedToken` with `normalized = false`.
fn token_entry(
    value: &serde_json::Value,
    path: &Path,
    key: &str,
) -> Result<(String, bool), TokenizerError> {
    match value {
        serde_json::Value::String(s) => Ok((s.clone(), false)),
        serde_json::Value::Object(map) => {
            let content = map.get("content").and_then(|c| c.as_str()).ok_or_else(|| {
                format_err(path, format!("{key} object has no string \"content\""))
            })?;
            let normalized = map
                .get("normalized")
                .and_then(|n| n.as_bool())
                .unwrap_or(false);
            Ok((content.to_string(), normalized))
        }
        other => Err(format_err(
            path,
            format!("{key} is neither a string nor an object: {other}"),
        )),
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `vocab.json`, `merges.txt`,
    /// `special_tokens_map.json` and `tokenizer_config.json` (the last two
    /// may be absent).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_files(
            &dir.join("vocab.json"),
            &dir.join("merges.txt"),
            Some(&dir.join("special_tokens_map.json")),
            Some(&dir.join("tokenizer_config.json")),
        )
    }

    /// Loads from explicit files, so that variants can share one vocabulary.
    /// The two JSON configs are optional (`None`, or a path that does not
    /// exist); without them BOS/EOS/pad take CLIPTokenizer's defaults.
    ///
    /// Special tokens, as transformers 5 resolves them (measured with
    /// several config layouts, see tools/make_tokenizer_fixtures.py):
    /// each of `bos_token`, `eos_token`, `unk_token`, `pad_token` comes from
    /// `special_tokens_map.json`, else `tokenizer_config.json`, else the
    /// default. A token text is matched on normalised text only if every
    /// entry naming it is an object with `"normalized": true`. So SD 1.x's
    /// EOS (also its pad, a plain string) matches the raw text only, while
    /// SD 2.x's EOS matches case-insensitively.
    pub fn from_files(
        vocab: &Path,
        merges: &Path,
        special_tokens_map: Option<&Path>,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let encoder = Self::load_vocab(vocab)?;
        let bpe_ranks = Self::load_merges(merges)?;

        let load =
            |path: Option<&Path>| -> Result<Option<(serde_json::Value, PathBuf)>, TokenizerError> {
                match path.filter(|p| p.exists()) {
                    Some(p) => Ok(Some((read_json(p)?, p.to_path_buf()))),
                    None => Ok(None),
                }
            };
        let map = load(special_tokens_map)?;
        let config = load(tokenizer_config)?;

        // (key, default) in the order transformers lists special tokens.
        let keys = [
            ("bos_token", DEFAULT_BOS),
            ("eos_token", DEFAULT_EOS),
            ("unk_token", DEFAULT_EOS),
            ("pad_token", DEFAULT_EOS),
        ];
        let mut resolved: Vec<(String, bool, PathBuf)> = Vec::with_capacity(keys.len());
        for (key, default) in keys {
            let found = [&map, &config]
                .into_iter()
                .flatten()
                .find_map(|(json, path)| json.get(key).filter(|v| !v.is_null()).map(|v| (v, path)));
            let (content, normalized, path) = match found {
                Some((value, path)) => {
                    let (content, normalized) = token_entry(value, path, key)?;
                    (content, normalized, path.clone())
                }
                None => (default.to_string(), false, vocab.to_path_buf()),
            };
            resolved.push((content, normalized, path));
        }

        let id_of = |content: &str, path: &Path| -> Result<u32, TokenizerError> {
            encoder.get(content).copied().ok_or_else(|| {
                format_err(
                    path,
                    format!(
                        "special token {content:?} is not in the vocabulary {}",
                        vocab.display()
                    ),
                )
            })
        };
        let mut added: Vec<AddedToken> = Vec::new();
        let mut ids = [0u32; 4];
        for (slot, (content, normalized, path)) in ids.iter_mut().zip(&resolved) {
            let id = id_of(content, path)?;
            *slot = id;
            match added.iter_mut().find(|t| &t.content == content) {
                Some(token) => token.normalized &= *normalized,
                None => added.push(AddedToken {
                    content: content.clone(),
                    id,
                    normalized: *normalized,
                }),
            }
        }
        let [bos_id, eos_id, unk_id, pad_id] = ids;
        // Empty contents would match everywhere; transformers never has them.
        added.retain(|t| !t.content.is_empty());

        let mut model_max_length = DEFAULT_MAX_LENGTH;
        if let Some((json, path)) = &config {
            if let Some(v) = json.get("model_max_length") {
                let n = v
                    .as_u64()
                    .filter(|&n| (2..=1 << 20).contains(&n))
                    .ok_or_else(|| {
                        format_err(
                            path,
                            format!("model_max_length {v} is not an integer in 2..=2^20"),
                        )
                    })?;
                model_max_length = n as usize;
            }
        }

        Ok(ClipTokenizer {
            encoder,
            bpe_ranks,
            byte_encoder: bytes_to_unicode(),
            added,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            model_max_length,
            embedding_tokens: Vec::new(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn load_vocab(path: &Path) -> Result<HashMap<String, u32>, TokenizerError> {
        let json = read_json(path)?;
        let obj = json
            .as_object()
            .ok_or_else(|| format_err(path, "expected a JSON object token -> id"))?;
        let mut encoder = HashMap::with_capacity(obj.len());
        for (token, id) in obj {
            let id = id
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format_err(path, format!("id of {token:?} is not a u32: {id}")))?;
            encoder.insert(token.clone(), id);
        }
        Ok(encoder)
    }

    /// Reads merge ranks: the first line is the `#version: 0.2` header;
    /// rank = line order. At most `49152 - 256 - 2` merges, the count CLIP
    /// uses (the HF files hold exactly that many).
    fn load_merges(path: &Path) -> Result<HashMap<(String, String), u32>, TokenizerError> {
        const MAX_MERGES: usize = 49152 - 256 - 2;
        let text = read_text(path)?;
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, header)) if header.starts_with("#version") => {}
            _ => return Err(format_err(path, "first line is not a `#version` header")),
        }
        let mut ranks = HashMap::new();
        for (lineno, line) in lines.filter(|(_, l)| !l.trim().is_empty()).take(MAX_MERGES) {
            let mut parts = line.split(' ');
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format_err(
                    path,
                    format!(
                        "line {}: expected two symbols separated by a space, got {line:?}",
                        lineno + 1
                    ),
                ));
            };
            let rank = ranks.len() as u32;
            // A repeated pair keeps its first (lowest) rank, as `tokenizers`
            // does when it builds the merge map.
            ranks.entry((a.to_string(), b.to_string())).or_insert(rank);
        }
        Ok(ranks)
    }

    /// Id of a vocabulary entry by its BPE spelling (e.g. `",</w>"`), if present.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    /// Id of the beginning-of-sequence token (49406 in CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-sequence token (49407 in CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used for padding: EOS (49407) for SD 1.x, `!` (0) for SD 2.x.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Pad with another id (single-file SD 2.x checkpoints carry no tokenizer files: they pad
    /// with `!` = 0). Unlike a real SD 2.x tokenizer folder this does not make `!` a special
    /// token, so prompts containing `!` may tokenize differently from diffusers there.
    pub fn set_pad_id(&mut self, id: u32) {
        self.pad_id = id;
    }

    /// Context length of the text encoder (77).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// BOS + tokens + EOS, no truncation or padding
    /// (`tokenizer(text).input_ids`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        ids.extend(self.tokenize(text));
        ids.push(self.eos_id);
        ids
    }

    /// Exactly `model_max_length` ids, as diffusers' pipelines call the
    /// tokenizer (`padding="max_length", truncation=True`): overlong
    /// prompts keep their first `model_max_length - 2` tokens and still end
    /// with EOS.
    pub fn encode_padded(&self, text: &str) -> Encoded {
        let max = self.model_max_length;
        let mut tokens = self.tokenize(text);
        let truncated = tokens.len() > max - 2;
        tokens.truncate(max - 2);
        let ids = self.wrap(&tokens);
        Encoded {
            ids,
            truncated,
            eos_position: tokens.len() + 1,
        }
    }

    /// Long prompts as chunks of `model_max_length - 2` tokens, each
    /// wrapped as BOS + chunk + EOS + padding, the way the AUTOMATIC1111
    /// web UI and stable-diffusion.cpp lift the 77-token limit (the text
    /// encoder runs per chunk and the hidden states are concatenated). An
    /// empty prompt gives one chunk.
    pub fn encode_chunked(&self, text: &str) -> Vec<Vec<u32>> {
        let tokens = self.tokenize(text);
        if tokens.is_empty() {
            return vec![self.wrap(&[])];
        }
        tokens
            .chunks(self.model_max_length - 2)
            .map(|c| self.wrap(c))
            .collect()
    }

    /// BOS + `tokens` (at most `model_max_length - 2`) + EOS + padding.
    fn wrap(&self, tokens: &[u32]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.model_max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(tokens);
        ids.push(self.eos_id);
        ids.resize(self.model_max_length, self.pad_id);
        ids
    }

    /// Token ids of `text` without BOS/EOS, with textual-inversion words replaced by their
    /// vectors' ids (see [`set_embedding_tokens`](Self::set_embedding_tokens)).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let ids = self.tokenize_text(text);
        if self.embedding_tokens.is_empty() {
            return ids;
        }
        // A1111's `find_embedding_at_position`: at each position the longest word that starts
        // there wins; matched tokens are replaced, the scan continues after them.
        let mut out = Vec::with_capacity(ids.len());
        let mut i = 0;
        while i < ids.len() {
            match self
                .embedding_tokens
                .iter()
                .find(|(word, _)| ids[i..].starts_with(word))
            {
                Some((word, vectors)) => {
                    out.extend_from_slice(vectors);
                    i += word.len();
                }
                None => {
                    out.push(ids[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// Make `word` (a textual-inversion embedding's name) stand for the token ids `vectors`
    /// (ids past the vocabulary, whose rows the text encoder gains). Replaces any earlier set.
    /// A word whose text tokenizes to nothing is ignored.
    pub fn set_embedding_tokens(&mut self, words: &[(String, Vec<u32>)]) {
        let mut list: Vec<(Vec<u32>, Vec<u32>)> = words
            .iter()
            .map(|(word, vectors)| (self.tokenize_text(word), vectors.clone()))
            .filter(|(ids, _)| !ids.is_empty())
            .collect();
        list.sort_by_key(|(ids, _)| std::cmp::Reverse(ids.len()));
        self.embedding_tokens = list;
    }

    /// The tokenizer's own ids for `text` (no embedding words).
    fn tokenize_text(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for raw in self.split_added(text, false) {
            let raw = match raw {
                Segment::Token(id) => {
                    ids.push(id);
                    continue;
                }
                Segment::Text(raw) => raw,
            };
            let normalized = normalize(raw);
            for segment in self.split_added(&normalized, true) {
                match segment {
                    Segment::Token(id) => ids.push(id),
                    Segment::Text(text) => {
                        for piece in pre_tokenize(text) {
                            ids.extend(self.bpe_ids(piece));
                        }
                    }
                }
            }
        }
        ids
    }

    /// Cuts the added tokens with the given `normalized` flag out of
    /// `text`, leftmost-longest first (the `tokenizers` AddedVocabulary
    /// uses an Aho-Corasick LeftmostLongest matcher).
    fn split_added<'a>(&self, text: &'a str, normalized: bool) -> Vec<Segment<'a>> {
        let tokens: Vec<&AddedToken> = self
            .added
            .iter()
            .filter(|t| t.normalized == normalized)
            .collect();
        let mut segments = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            let best = tokens
                .iter()
                .filter(|t| rest.starts_with(t.content.as_str()))
                .max_by_key(|t| t.content.len());
            match best {
                Some(token) => {
                    if start < i {
                        segments.push(Segment::Text(&text[start..i]));
                    }
                    segments.push(Segment::Token(token.id));
                    i += token.content.len();
                    start = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            segments.push(Segment::Text(&text[start..]));
        }
        segments
    }

    /// BPE ids of one pre-tokenised piece, memoised.
    fn bpe_ids(&self, piece: &str) -> Vec<u32> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(piece) {
                return ids.clone();
            }
        }
        let unicode: String = piece
            .bytes()
            .map(|b| self.byte_encoder[b as usize])
            .collect();
        let ids: Vec<u32> = self
            .bpe(&unicode)
            .iter()
            .map(|sym| self.encoder.get(sym).copied().unwrap_or(self.unk_id))
            .collect();
        if let Ok(mut cache) = self.cache.lock() {
            // Bound the memo; prompts rarely have more distinct words.
            if cache.len() > 100_000 {
                cache.clear();
            }
            cache.insert(piece.to_string(), ids.clone());
        }
        ids
    }

    /// Lowest-rank-first pair merging of one word (already mapped through
    /// `bytes_to_unicode`), as `SimpleTokenizer.bpe`: the last char carries
    /// `</w>`; all occurrences of the best pair merge at once, left to
    /// right, without overlap.
    fn bpe(&self, token: &str) -> Vec<String> {
        let chars: Vec<char> = token.chars().collect();
        let Some((last, init)) = chars.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<String> = init.iter().map(|c| c.to_string()).collect();
        word.push(format!("{last}</w>"));
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.bpe_ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&rank| (rank, w))
                })
                .min_by_key(|&(rank, _)| rank)
                .map(|(_, w)| (w[0].clone(), w[1].clone()));
            let Some((first, second)) = best else {
                break;
            };
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

/// The normaliser (see module docs): NFC, then runs of `\s` become one
/// space, then each char is lower-cased on its own. Per-char matters:
/// `tokenizers` maps every `Σ` to `σ` where Python's `str.lower` and
/// Rust's `str::to_lowercase` would write a final `ς`. NFC comes first
/// because it can change what the later steps see: `A` + U+030A becomes
/// `Å` before lower-casing, U+212A KELVIN SIGN becomes `K`, U+037E GREEK
/// QUESTION MARK becomes `;`.
///
/// `text` is one piece between raw-matched added tokens, so a mark right
/// after `<|endoftext|>` does not compose across it (SD 1.x); where that
/// token is matched on normalised text (SD 2.x), `>` + U+0338 becomes `≯`
/// first and the token is no longer found.
fn normalize(text: &str) -> String {
    let text = nfc(text);
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.chars() {
        if is_space(c) {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// `\s` of the `tokenizers` regex engine: exactly Unicode White_Space
/// (checked over all code points by tools/make_tokenizer_fixtures.py
/// --rust-tables), which is what `char::is_whitespace` implements.
fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// `\p{L}` per the reference's Unicode tables (Rust's `is_alphabetic` is
/// the wider Alphabetic property, with marks and letter numbers).
fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    in_ranges(LETTER_RANGES, c)
}

/// `\p{N}` per the reference's Unicode tables.
fn is_number(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    in_ranges(NUMBER_RANGES, c)
}

fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let cp = c as u32;
    // Index of the first range starting after cp; the one before may hold it.
    let i = ranges.partition_point(|&(lo, _)| lo <= cp);
    i > 0 && cp <= ranges[i - 1].1
}

/// CLIP's pre-tokenisation regex by hand:
/// `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`,
/// keeping the matches and dropping the whitespace between them. Then the
/// ByteLevel pre-tokeniser's GPT-2 regex runs on each match; it leaves
/// every match whole except the two `<|...|>` literals (text that was not
/// cut out as an added token), which it splits into `<|`, the word, `|>`.
fn pre_tokenize(text: &str) -> Vec<&str> {
    const LITERALS: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];
    const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(lit) = LITERALS.iter().find(|lit| rest.starts_with(*lit)) {
            let n = lit.len();
            pieces.extend([&rest[..2], &rest[2..n - 2], &rest[n - 2..n]]);
            rest = &rest[n..];
            continue;
        }
        let len = if let Some(con) = CONTRACTIONS.iter().find(|con| rest.starts_with(*con)) {
            con.len()
        } else if is_letter(c) {
            prefix_len(rest, is_letter)
        } else if is_number(c) {
            c.len_utf8()
        } else if is_space(c) {
            rest = &rest[c.len_utf8()..];
            continue;
        } else {
            prefix_len(rest, |c| !is_space(c) && !is_letter(c) && !is_number(c))
        };
        let (piece, tail) = rest.split_at(len);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// Length in bytes of the longest prefix whose chars all satisfy `pred`.
fn prefix_len(s: &str, pred: impl Fn(char) -> bool) -> usize {
    s.char_indices()
        .find(|&(_, c)| !pred(c))
        .map_or(s.len(), |(i, _)| i)
}

// ---------------------------------------------------------------------------
// Generated by `tools/make_tokenizer_fixtures.py --rust-tables` (tokenizers
// 0.23.3, Oniguruma's Unicode tables); regenerate rather than edit.
/// `\p{L}` as the `tokenizers` regex engine sees it: 677 ranges.
#[rustfmt::skip]
const LETTER_RANGES: &[(u32, u32)] = &[
    (0x41, 0x5A), (0x61, 0x7A), (0xAA, 0xAA), (0xB5, 0xB5), (0xBA, 0xBA), (0xC0, 0xD6),
    (0xD8, 0xF6), (0xF8, 0x2C1), (0x2C6, 0x2D1), (0x2E0, 0x2E4), (0x2EC, 0x2EC), (0x2EE, 0x2EE),
    (0x370, 0x374), (0x376, 0x377), (0x37A, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A),
    (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x559, 0x559), (0x560, 0x588), (0x5D0, 0x5EA), (0x5EF, 0x5F2), (0x620, 0x64A), (0x66E, 0x66F),
    (0x671, 0x6D3), (0x6D5, 0x6D5), (0x6E5, 0x6E6), (0x6EE, 0x6EF), (0x6FA, 0x6FC), (0x6FF, 0x6FF),
    (0x710, 0x710), (0x712, 0x72F), (0x74D, 0x7A5), (0x7B1, 0x7B1), (0x7CA, 0x7EA), (0x7F4, 0x7F5),
    (0x7FA, 0x7FA), (0x800, 0x815), (0x81A, 0x81A), (0x824, 0x824), (0x828, 0x828), (0x840, 0x858),
    (0x860, 0x86A), (0x870, 0x887), (0x889, 0x88E), (0x8A0, 0x8C9), (0x904, 0x939), (0x93D, 0x93D),
    (0x950, 0x950), (0x958, 0x961), (0x971, 0x980), (0x985, 0x98C), (0x98F, 0x990), (0x993, 0x9A8),
    (0x9AA, 0x9B0), (0x9B2, 0x9B2), (0x9B6, 0x9B9), (0x9BD, 0x9BD), (0x9CE, 0x9CE), (0x9DC, 0x9DD),
    (0x9DF, 0x9E1), (0x9F0, 0x9F1), (0x9FC, 0x9FC), (0xA05, 0xA0A), (0xA0F, 0xA10), (0xA13, 0xA28),
    (0xA2A, 0xA30), (0xA32, 0xA33), (0xA35, 0xA36), (0xA38, 0xA39), (0xA59, 0xA5C), (0xA5E, 0xA5E),
    (0xA72, 0xA74), (0xA85, 0xA8D), (0xA8F, 0xA91), (0xA93, 0xAA8), (0xAAA, 0xAB0), (0xAB2, 0xAB3),
    (0xAB5, 0xAB9), (0xABD, 0xABD), (0xAD0, 0xAD0), (0xAE0, 0xAE1), (0xAF9, 0xAF9), (0xB05, 0xB0C),
    (0xB0F, 0xB10), (0xB13, 0xB28), (0xB2A, 0xB30), (0xB32, 0xB33), (0xB35, 0xB39), (0xB3D, 0xB3D),
    (0xB5C, 0xB5D), (0xB5F, 0xB61), (0xB71, 0xB71), (0xB83, 0xB83), (0xB85, 0xB8A), (0xB8E, 0xB90),
    (0xB92, 0xB95), (0xB99, 0xB9A), (0xB9C, 0xB9C), (0xB9E, 0xB9F), (0xBA3, 0xBA4), (0xBA8, 0xBAA),
    (0xBAE, 0xBB9), (0xBD0, 0xBD0), (0xC05, 0xC0C), (0xC0E, 0xC10), (0xC12, 0xC28), (0xC2A, 0xC39),
    (0xC3D, 0xC3D), (0xC58, 0xC5A), (0xC5D, 0xC5D), (0xC60, 0xC61), (0xC80, 0xC80), (0xC85, 0xC8C),
    (0xC8E, 0xC90), (0xC92, 0xCA8), (0xCAA, 0xCB3), (0xCB5, 0xCB9), (0xCBD, 0xCBD), (0xCDD, 0xCDE),
    (0xCE0, 0xCE1), (0xCF1, 0xCF2), (0xD04, 0xD0C), (0xD0E, 0xD10), (0xD12, 0xD3A), (0xD3D, 0xD3D),
    (0xD4E, 0xD4E), (0xD54, 0xD56), (0xD5F, 0xD61), (0xD7A, 0xD7F), (0xD85, 0xD96), (0xD9A, 0xDB1),
    (0xDB3, 0xDBB), (0xDBD, 0xDBD), (0xDC0, 0xDC6), (0xE01, 0xE30), (0xE32, 0xE33), (0xE40, 0xE46),
    (0xE81, 0xE82), (0xE84, 0xE84), (0xE86, 0xE8A), (0xE8C, 0xEA3), (0xEA5, 0xEA5), (0xEA7, 0xEB0),
    (0xEB2, 0xEB3), (0xEBD, 0xEBD), (0xEC0, 0xEC4), (0xEC6, 0xEC6), (0xEDC, 0xEDF), (0xF00, 0xF00),
    (0xF40, 0xF47), (0xF49, 0xF6C), (0xF88, 0xF8C), (0x1000, 0x102A), (0x103F, 0x103F), (0x1050, 0x1055),
    (0x105A, 0x105D), (0x1061, 0x1061), (0x1065, 0x1066), (0x106E, 0x1070), (0x1075, 0x1081), (0x108E, 0x108E),
    (0x10A0, 0x10C5), (0x10C7, 0x10C7), (0x10CD, 0x10CD), (0x10D0, 0x10FA), (0x10FC, 0x1248), (0x124A, 0x124D),
    (0x1250, 0x1256), (0x1258, 0x1258), (0x125A, 0x125D), (0x1260, 0x1288), (0x128A, 0x128D), (0x1290, 0x12B0),
    (0x12B2, 0x12B5), (0x12B8, 0x12BE), (0x12C0, 0x12C0), (0x12C2, 0x12C5), (0x12C8, 0x12D6), (0x12D8, 0x1310),
    (0x1312, 0x1315), (0x1318, 0x135A), (0x1380, 0x138F), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1401, 0x166C),
    (0x166F, 0x167F), (0x1681, 0x169A), (0x16A0, 0x16EA), (0x16F1, 0x16F8), (0x1700, 0x1711), (0x171F, 0x1731),
    (0x1740, 0x1751), (0x1760, 0x176C), (0x176E, 0x1770), (0x1780, 0x17B3), (0x17D7, 0x17D7), (0x17DC, 0x17DC),
    (0x1820, 0x1878), (0x1880, 0x1884), (0x1887, 0x18A8), (0x18AA, 0x18AA), (0x18B0, 0x18F5), (0x1900, 0x191E),
    (0x1950, 0x196D), (0x1970, 0x1974), (0x1980, 0x19AB), (0x19B0, 0x19C9), (0x1A00, 0x1A16), (0x1A20, 0x1A54),
    (0x1AA7, 0x1AA7), (0x1B05, 0x1B33), (0x1B45, 0x1B4C), (0x1B83, 0x1BA0), (0x1BAE, 0x1BAF), (0x1BBA, 0x1BE5),
    (0x1C00, 0x1C23), (0x1C4D, 0x1C4F), (0x1C5A, 0x1C7D), (0x1C80, 0x1C8A), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF),
    (0x1CE9, 0x1CEC), (0x1CEE, 0x1CF3), (0x1CF5, 0x1CF6), (0x1CFA, 0x1CFA), (0x1D00, 0x1DBF), (0x1E00, 0x1F15),
    (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B),
    (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4),
    (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC),
    (0x2071, 0x2071), (0x207F, 0x207F), (0x2090, 0x209C), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D),
    (0x212F, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2CE4),
    (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0x2D00, 0x2D25), (0x2D27, 0x2D27), (0x2D2D, 0x2D2D), (0x2D30, 0x2D67),
    (0x2D6F, 0x2D6F), (0x2D80, 0x2D96), (0x2DA0, 0x2DA6), (0x2DA8, 0x2DAE), (0x2DB0, 0x2DB6), (0x2DB8, 0x2DBE),
    (0x2DC0, 0x2DC6), (0x2DC8, 0x2DCE), (0x2DD0, 0x2DD6), (0x2DD8, 0x2DDE), (0x2E2F, 0x2E2F), (0x3005, 0x3006),
    (0x3031, 0x3035), (0x303B, 0x303C), (0x3041, 0x3096), (0x309D, 0x309F), (0x30A1, 0x30FA), (0x30FC, 0x30FF),
    (0x3105, 0x312F), (0x3131, 0x318E), (0x31A0, 0x31BF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0xA48C),
    (0xA4D0, 0xA4FD), (0xA500, 0xA60C), (0xA610, 0xA61F), (0xA62A, 0xA62B), (0xA640, 0xA66E), (0xA67F, 0xA69D),
    (0xA6A0, 0xA6E5), (0xA717, 0xA71F), (0xA722, 0xA788), (0xA78B, 0xA7CD), (0xA7D0, 0xA7D1), (0xA7D3, 0xA7D3),
    (0xA7D5, 0xA7DC), (0xA7F2, 0xA801), (0xA803, 0xA805), (0xA807, 0xA80A), (0xA80C, 0xA822), (0xA840, 0xA873),
    (0xA882, 0xA8B3), (0xA8F2, 0xA8F7), (0xA8FB, 0xA8FB), (0xA8FD, 0xA8FE), (0xA90A, 0xA925), (0xA930, 0xA946),
    (0xA960, 0xA97C), (0xA984, 0xA9B2), (0xA9CF, 0xA9CF), (0xA9E0, 0xA9E4), (0xA9E6, 0xA9EF), (0xA9FA, 0xA9FE),
    (0xAA00, 0xAA28), (0xAA40, 0xAA42), (0xAA44, 0xAA4B), (0xAA60, 0xAA76), (0xAA7A, 0xAA7A), (0xAA7E, 0xAAAF),
    (0xAAB1, 0xAAB1), (0xAAB5, 0xAAB6), (0xAAB9, 0xAABD), (0xAAC0, 0xAAC0), (0xAAC2, 0xAAC2), (0xAADB, 0xAADD),
    (0xAAE0, 0xAAEA), (0xAAF2, 0xAAF4), (0xAB01, 0xAB06), (0xAB09, 0xAB0E), (0xAB11, 0xAB16), (0xAB20, 0xAB26),
    (0xAB28, 0xAB2E), (0xAB30, 0xAB5A), (0xAB5C, 0xAB69), (0xAB70, 0xABE2), (0xAC00, 0xD7A3), (0xD7B0, 0xD7C6),
    (0xD7CB, 0xD7FB), (0xF900, 0xFA6D), (0xFA70, 0xFAD9), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFB1D, 0xFB1D),
    (0xFB1F, 0xFB28), (0xFB2A, 0xFB36), (0xFB38, 0xFB3C), (0xFB3E, 0xFB3E), (0xFB40, 0xFB41), (0xFB43, 0xFB44),
    (0xFB46, 0xFBB1), (0xFBD3, 0xFD3D), (0xFD50, 0xFD8F), (0xFD92, 0xFDC7), (0xFDF0, 0xFDFB), (0xFE70, 0xFE74),
    (0xFE76, 0xFEFC), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0xFF66, 0xFFBE), (0xFFC2, 0xFFC7), (0xFFCA, 0xFFCF),
    (0xFFD2, 0xFFD7), (0xFFDA, 0xFFDC), (0x10000, 0x1000B), (0x1000D, 0x10026), (0x10028, 0x1003A), (0x1003C, 0x1003D),
    (0x1003F, 0x1004D), (0x10050, 0x1005D), (0x10080, 0x100FA), (0x10280, 0x1029C), (0x102A0, 0x102D0), (0x10300, 0x1031F),
    (0x1032D, 0x10340), (0x10342, 0x10349), (0x10350, 0x10375), (0x10380, 0x1039D), (0x103A0, 0x103C3), (0x103C8, 0x103CF),
    (0x10400, 0x1049D), (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10500, 0x10527), (0x10530, 0x10563), (0x10570, 0x1057A),
    (0x1057C, 0x1058A), (0x1058C, 0x10592), (0x10594, 0x10595), (0x10597, 0x105A1), (0x105A3, 0x105B1), (0x105B3, 0x105B9),
    (0x105BB, 0x105BC), (0x105C0, 0x105F3), (0x10600, 0x10736), (0x10740, 0x10755), (0x10760, 0x10767), (0x10780, 0x10785),
    (0x10787, 0x107B0), (0x107B2, 0x107BA), (0x10800, 0x10805), (0x10808, 0x10808), (0x1080A, 0x10835), (0x10837, 0x10838),
    (0x1083C, 0x1083C), (0x1083F, 0x10855), (0x10860, 0x10876), (0x10880, 0x1089E), (0x108E0, 0x108F2), (0x108F4, 0x108F5),
    (0x10900, 0x10915), (0x10920, 0x10939), (0x10980, 0x109B7), (0x109BE, 0x109BF), (0x10A00, 0x10A00), (0x10A10, 0x10A13),
    (0x10A15, 0x10A17), (0x10A19, 0x10A35), (0x10A60, 0x10A7C), (0x10A80, 0x10A9C), (0x10AC0, 0x10AC7), (0x10AC9, 0x10AE4),
    (0x10B00, 0x10B35), (0x10B40, 0x10B55), (0x10B60, 0x10B72), (0x10B80, 0x10B91), (0x10C00, 0x10C48), (0x10C80, 0x10CB2),
    (0x10CC0, 0x10CF2), (0x10D00, 0x10D23), (0x10D4A, 0x10D65), (0x10D6F, 0x10D85), (0x10E80, 0x10EA9), (0x10EB0, 0x10EB1),
    (0x10EC2, 0x10EC4), (0x10F00, 0x10F1C), (0x10F27, 0x10F27), (0x10F30, 0x10F45), (0x10F70, 0x10F81), (0x10FB0, 0x10FC4),
    (0x10FE0, 0x10FF6), (0x11003, 0x11037), (0x11071, 0x11072), (0x11075, 0x11075), (0x11083, 0x110AF), (0x110D0, 0x110E8),
    (0x11103, 0x11126), (0x11144, 0x11144), (0x11147, 0x11147), (0x11150, 0x11172), (0x11176, 0x11176), (0x11183, 0x111B2),
    (0x111C1, 0x111C4), (0x111DA, 0x111DA), (0x111DC, 0x111DC), (0x11200, 0x11211), (0x11213, 0x1122B), (0x1123F, 0x11240),
    (0x11280, 0x11286), (0x11288, 0x11288), (0x1128A, 0x1128D), (0x1128F, 0x1129D), (0x1129F, 0x112A8), (0x112B0, 0x112DE),
    (0x11305, 0x1130C), (0x1130F, 0x11310), (0x11313, 0x11328), (0x1132A, 0x11330), (0x11332, 0x11333), (0x11335, 0x11339),
    (0x1133D, 0x1133D), (0x11350, 0x11350), (0x1135D, 0x11361), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E),
    (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11400, 0x11434), (0x11447, 0x1144A),
    (0x1145F, 0x11461), (0x11480, 0x114AF), (0x114C4, 0x114C5), (0x114C7, 0x114C7), (0x11580, 0x115AE), (0x115D8, 0x115DB),
    (0x11600, 0x1162F), (0x11644, 0x11644), (0x11680, 0x116AA), (0x116B8, 0x116B8), (0x11700, 0x1171A), (0x11740, 0x11746),
    (0x11800, 0x1182B), (0x118A0, 0x118DF), (0x118FF, 0x11906), (0x11909, 0x11909), (0x1190C, 0x11913), (0x11915, 0x11916),
    (0x11918, 0x1192F), (0x1193F, 0x1193F), (0x11941, 0x11941), (0x119A0, 0x119A7), (0x119AA, 0x119D0), (0x119E1, 0x119E1),
    (0x119E3, 0x119E3), (0x11A00, 0x11A00), (0x11A0B, 0x11A32), (0x11A3A, 0x11A3A), (0x11A50, 0x11A50), (0x11A5C, 0x11A89),
    (0x11A9D, 0x11A9D), (0x11AB0, 0x11AF8), (0x11BC0, 0x11BE0), (0x11C00, 0x11C08), (0x11C0A, 0x11C2E), (0x11C40, 0x11C40),
    (0x11C72, 0x11C8F), (0x11D00, 0x11D06), (0x11D08, 0x11D09), (0x11D0B, 0x11D30), (0x11D46, 0x11D46), (0x11D60, 0x11D65),
    (0x11D67, 0x11D68), (0x11D6A, 0x11D89), (0x11D98, 0x11D98), (0x11EE0, 0x11EF2), (0x11F02, 0x11F02), (0x11F04, 0x11F10),
    (0x11F12, 0x11F33), (0x11FB0, 0x11FB0), (0x12000, 0x12399), (0x12480, 0x12543), (0x12F90, 0x12FF0), (0x13000, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x14400, 0x14646), (0x16100, 0x1611D), (0x16800, 0x16A38), (0x16A40, 0x16A5E),
    (0x16A70, 0x16ABE), (0x16AD0, 0x16AED), (0x16B00, 0x16B2F), (0x16B40, 0x16B43), (0x16B63, 0x16B77), (0x16B7D, 0x16B8F),
    (0x16D40, 0x16D6C), (0x16E40, 0x16E7F), (0x16F00, 0x16F4A), (0x16F50, 0x16F50), (0x16F93, 0x16F9F), (0x16FE0, 0x16FE1),
    (0x16FE3, 0x16FE3), (0x17000, 0x187F7), (0x18800, 0x18CD5), (0x18CFF, 0x18D08), (0x1AFF0, 0x1AFF3), (0x1AFF5, 0x1AFFB),
    (0x1AFFD, 0x1AFFE), (0x1B000, 0x1B122), (0x1B132, 0x1B132), (0x1B150, 0x1B152), (0x1B155, 0x1B155), (0x1B164, 0x1B167),
    (0x1B170, 0x1B2FB), (0x1BC00, 0x1BC6A), (0x1BC70, 0x1BC7C), (0x1BC80, 0x1BC88), (0x1BC90, 0x1BC99), (0x1D400, 0x1D454),
    (0x1D456, 0x1D49C), (0x1D49E, 0x1D49F), (0x1D4A2, 0x1D4A2), (0x1D4A5, 0x1D4A6), (0x1D4A9, 0x1D4AC), (0x1D4AE, 0x1D4B9),
    (0x1D4BB, 0x1D4BB), (0x1D4BD, 0x1D4C3), (0x1D4C5, 0x1D505), (0x1D507, 0x1D50A), (0x1D50D, 0x1D514), (0x1D516, 0x1D51C),
    (0x1D51E, 0x1D539), (0x1D53B, 0x1D53E), (0x1D540, 0x1D544), (0x1D546, 0x1D546), (0x1D54A, 0x1D550), (0x1D552, 0x1D6A5),
    (0x1D6A8, 0x1D6C0), (0x1D6C2, 0x1D6DA), (0x1D6DC, 0x1D6FA), (0x1D6FC, 0x1D714), (0x1D716, 0x1D734), (0x1D736, 0x1D74E),
    (0x1D750, 0x1D76E), (0x1D770, 0x1D788), (0x1D78A, 0x1D7A8), (0x1D7AA, 0x1D7C2), (0x1D7C4, 0x1D7CB), (0x1DF00, 0x1DF1E),
    (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E100, 0x1E12C), (0x1E137, 0x1E13D), (0x1E14E, 0x1E14E), (0x1E290, 0x1E2AD),
    (0x1E2C0, 0x1E2EB), (0x1E4D0, 0x1E4EB), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x1E7E0, 0x1E7E6), (0x1E7E8, 0x1E7EB),
    (0x1E7ED, 0x1E7EE), (0x1E7F0, 0x1E7FE), (0x1E800, 0x1E8C4), (0x1E900, 0x1E943), (0x1E94B, 0x1E94B), (0x1EE00, 0x1EE03),
    (0x1EE05, 0x1EE1F), (0x1EE21, 0x1EE22), (0x1EE24, 0x1EE24), (0x1EE27, 0x1EE27), (0x1EE29, 0x1EE32), (0x1EE34, 0x1EE37),
    (0x1EE39, 0x1EE39), (0x1EE3B, 0x1EE3B), (0x1EE42, 0x1EE42), (0x1EE47, 0x1EE47), (0x1EE49, 0x1EE49), (0x1EE4B, 0x1EE4B),
    (0x1EE4D, 0x1EE4F), (0x1EE51, 0x1EE52), (0x1EE54, 0x1EE54), (0x1EE57, 0x1EE57), (0x1EE59, 0x1EE59), (0x1EE5B, 0x1EE5B),
    (0x1EE5D, 0x1EE5D), (0x1EE5F, 0x1EE5F), (0x1EE61, 0x1EE62), (0x1EE64, 0x1EE64), (0x1EE67, 0x1EE6A), (0x1EE6C, 0x1EE72),
    (0x1EE74, 0x1EE77), (0x1EE79, 0x1EE7C), (0x1EE7E, 0x1EE7E), (0x1EE80, 0x1EE89), (0x1EE8B, 0x1EE9B), (0x1EEA1, 0x1EEA3),
    (0x1EEA5, 0x1EEA9), (0x1EEAB, 0x1EEBB), (0x20000, 0x2A6DF), (0x2A700, 0x2B739), (0x2B740, 0x2B81D), (0x2B820, 0x2CEA1),
    (0x2CEB0, 0x2EBE0), (0x2EBF0, 0x2EE5D), (0x2F800, 0x2FA1D), (0x30000, 0x3134A), (0x31350, 0x323AF),
];
/// `\p{N}` as the `tokenizers` regex engine sees it: 144 ranges.
#[rustfmt::skip]
const NUMBER_RANGES: &[(u32, u32)] = &[
    (0x30, 0x39), (0xB2, 0xB3), (0xB9, 0xB9), (0xBC, 0xBE), (0x660, 0x669), (0x6F0, 0x6F9),
    (0x7C0, 0x7C9), (0x966, 0x96F), (0x9E6, 0x9EF), (0x9F4, 0x9F9), (0xA66, 0xA6F), (0xAE6, 0xAEF),
    (0xB66, 0xB6F), (0xB72, 0xB77), (0xBE6, 0xBF2), (0xC66, 0xC6F), (0xC78, 0xC7E), (0xCE6, 0xCEF),
    (0xD58, 0xD5E), (0xD66, 0xD78), (0xDE6, 0xDEF), (0xE50, 0xE59), (0xED0, 0xED9), (0xF20, 0xF33),
    (0x1040, 0x1049), (0x1090, 0x1099), (0x1369, 0x137C), (0x16EE, 0x16F0), (0x17E0, 0x17E9), (0x17F0, 0x17F9),
    (0x1810, 0x1819), (0x1946, 0x194F), (0x19D0, 0x19DA), (0x1A80, 0x1A89), (0x1A90, 0x1A99), (0x1B50, 0x1B59),
    (0x1BB0, 0x1BB9), (0x1C40, 0x1C49), (0x1C50, 0x1C59), (0x2070, 0x2070), (0x2074, 0x2079), (0x2080, 0x2089),
    (0x2150, 0x2182), (0x2185, 0x2189), (0x2460, 0x249B), (0x24EA, 0x24FF), (0x2776, 0x2793), (0x2CFD, 0x2CFD),
    (0x3007, 0x3007), (0x3021, 0x3029), (0x3038, 0x303A), (0x3192, 0x3195), (0x3220, 0x3229), (0x3248, 0x324F),
    (0x3251, 0x325F), (0x3280, 0x3289), (0x32B1, 0x32BF), (0xA620, 0xA629), (0xA6E6, 0xA6EF), (0xA830, 0xA835),
    (0xA8D0, 0xA8D9), (0xA900, 0xA909), (0xA9D0, 0xA9D9), (0xA9F0, 0xA9F9), (0xAA50, 0xAA59), (0xABF0, 0xABF9),
    (0xFF10, 0xFF19), (0x10107, 0x10133), (0x10140, 0x10178), (0x1018A, 0x1018B), (0x102E1, 0x102FB), (0x10320, 0x10323),
    (0x10341, 0x10341), (0x1034A, 0x1034A), (0x103D1, 0x103D5), (0x104A0, 0x104A9), (0x10858, 0x1085F), (0x10879, 0x1087F),
    (0x108A7, 0x108AF), (0x108FB, 0x108FF), (0x10916, 0x1091B), (0x109BC, 0x109BD), (0x109C0, 0x109CF), (0x109D2, 0x109FF),
    (0x10A40, 0x10A48), (0x10A7D, 0x10A7E), (0x10A9D, 0x10A9F), (0x10AEB, 0x10AEF), (0x10B58, 0x10B5F), (0x10B78, 0x10B7F),
    (0x10BA9, 0x10BAF), (0x10CFA, 0x10CFF), (0x10D30, 0x10D39), (0x10D40, 0x10D49), (0x10E60, 0x10E7E), (0x10F1D, 0x10F26),
    (0x10F51, 0x10F54), (0x10FC5, 0x10FCB), (0x11052, 0x1106F), (0x110F0, 0x110F9), (0x11136, 0x1113F), (0x111D0, 0x111D9),
    (0x111E1, 0x111F4), (0x112F0, 0x112F9), (0x11450, 0x11459), (0x114D0, 0x114D9), (0x11650, 0x11659), (0x116C0, 0x116C9),
    (0x116D0, 0x116E3), (0x11730, 0x1173B), (0x118E0, 0x118F2), (0x11950, 0x11959), (0x11BF0, 0x11BF9), (0x11C50, 0x11C6C),
    (0x11D50, 0x11D59), (0x11DA0, 0x11DA9), (0x11F50, 0x11F59), (0x11FC0, 0x11FD4), (0x12400, 0x1246E), (0x16130, 0x16139),
    (0x16A60, 0x16A69), (0x16AC0, 0x16AC9), (0x16B50, 0x16B59), (0x16B5B, 0x16B61), (0x16D70, 0x16D79), (0x16E80, 0x16E96),
    (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1D2E0, 0x1D2F3), (0x1D360, 0x1D378), (0x1D7CE, 0x1D7FF), (0x1E140, 0x1E149),
    (0x1E2F0, 0x1E2F9), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA), (0x1E8C7, 0x1E8CF), (0x1E950, 0x1E959), (0x1EC71, 0x1ECAB),
    (0x1ECAD, 0x1ECAF), (0x1ECB1, 0x1ECB4), (0x1ED01, 0x1ED2D), (0x1ED2F, 0x1ED3D), (0x1F100, 0x1F10C), (0x1FBF0, 0x1FBF9),
];
