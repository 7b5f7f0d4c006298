//! Prompt syntax of the AUTOMATIC1111 web UI, which most prompts people share are written in:
//! emphasis weights (`(word)`, `[word]`, `(word:1.5)`, `BREAK`) and extra-network tags
//! (`<lora:name:0.8>`).
//!
//! Ported from the behaviour of A1111's `modules/prompt_parser.py::parse_prompt_attention`,
//! `modules/extra_networks.py::parse_prompt` and `modules/sd_hijack_clip.py::tokenize_line`
//! (chunks of 75 tokens, `BREAK`, the 20-token comma backtrack). The weights are applied to the
//! text encoder's output by `kernels::emphasis` (A1111's "Original" emphasis: multiply each token's
//! row, then restore the chunk's mean).

use crate::kernels::{elementwise, emphasis};
use crate::models::clip::ClipTextModel;
use crate::tokenizer::ClipTokenizer;
use crate::{Gpu, Result, Tensor};

/// A piece of a parsed prompt: text with its weight, or a `BREAK` (start a new 75-token chunk).
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String, f64),
    Break,
}

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// One lexical token of the emphasis syntax (A1111's `re_attention` alternatives, in order).
#[derive(Debug, PartialEq)]
enum Lex<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` or a lone `\`: the text after the backslash, literally.
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:1.5)` (spaces allowed around the number): closes a round bracket with this weight;
    /// the number, then the whole matched text (kept as text when no bracket is open).
    WeightClose(&'a str, &'a str),
    Close,
    CloseSquare,
    /// A run of anything but `\()[]:`.
    Text(&'a str),
    /// A `:` that does not start a weight.
    Colon,
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: returns (number, bytes consumed).
fn weight_close(s: &str) -> Option<(&str, usize)> {
    let b = s.as_bytes();
    let mut i = 1; // past ':'
    let ws = |i: &mut usize| {
        // Python's \s in str patterns is Unicode whitespace; prompts use ASCII.
        while *i < b.len() && (b[*i] as char).is_ascii_whitespace() {
            *i += 1;
        }
    };
    ws(&mut i);
    let start = i;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let digits = i;
    while i < b.len() && (b[i] == b'.' || b[i].is_ascii_digit()) {
        i += 1;
    }
    if i == digits {
        return None;
    }
    let number = &s[start..i];
    ws(&mut i);
    (i < b.len() && b[i] == b')').then_some((number, i + 1))
}

fn lex(text: &str) -> Vec<Lex<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let (token, len) = match c {
            '\\' => match rest[1..].chars().next() {
                Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                    (Lex::Escaped(&rest[1..1 + n.len_utf8()]), 2)
                }
                _ => (Lex::Escaped(""), 1),
            },
            '(' => (Lex::Open, 1),
            '[' => (Lex::OpenSquare, 1),
            ':' => match weight_close(rest) {
                Some((number, len)) => (Lex::WeightClose(number, &rest[..len]), len),
                None => (Lex::Colon, 1),
            },
            ')' => (Lex::Close, 1),
            ']' => (Lex::CloseSquare, 1),
            _ => {
                let end = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                (Lex::Text(&rest[..end]), end)
            }
        };
        out.push(token);
        rest = &rest[len..];
    }
    out
}

/// Split on A1111's `\s*\bBREAK\b\s*` (the word BREAK with its surrounding whitespace).
fn split_break(text: &str) -> Vec<&str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + 5;
        let before_ok = !text[..at].chars().next_back().is_some_and(is_word);
        let after_ok = !text[end..].chars().next().is_some_and(is_word);
        if before_ok && after_ok {
            let trimmed_start = text[..at].trim_end().len().max(start);
            parts.push(&text[start..trimmed_start]);
            let after = &text[end..];
            start = end + (after.len() - after.trim_start().len());
            search = start;
        } else {
            search = at + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Parse A1111 emphasis syntax into pieces with weights: `(a)` ×1.1, `[a]` ÷1.1, `(a:w)` ×w,
/// nesting multiplies, unbalanced brackets close at the end, `\(` etc. are literal, `BREAK`
/// separates chunks; adjacent pieces of equal weight merge. `"a (b:1.5) c"` gives
/// `[("a ", 1.0), ("b", 1.5), (" c", 1.0)]`.
///
/// One deliberate difference: A1111 raises an exception on a weight such as `(a:1.2.3)` that
/// Python's `float` cannot read; here that weight is ignored and the bracket counts as `(a)`.
pub fn parse_attention(text: &str) -> Vec<Piece> {
    // Weights and texts as A1111 keeps them: a BREAK is ("BREAK", -1).
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for piece in &mut res[from..] {
            piece.1 *= m;
        }
    };
    for token in lex(text) {
        match token {
            Lex::Escaped(t) => res.push((t.to_string(), 1.0)),
            Lex::Open => round.push(res.len()),
            Lex::OpenSquare => square.push(res.len()),
            Lex::WeightClose(w, _) if !round.is_empty() => {
                let m = w.parse::<f64>().unwrap_or(ROUND);
                let from = round.pop().unwrap();
                multiply(&mut res, from, m);
            }
            Lex::Close if !round.is_empty() => {
                let from = round.pop().unwrap();
                multiply(&mut res, from, ROUND);
            }
            Lex::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap();
                multiply(&mut res, from, SQUARE);
            }
            other => {
                let text = match other {
                    Lex::Text(t) => t.to_string(),
                    Lex::WeightClose(_, raw) => raw.to_string(),
                    Lex::Close => ")".into(),
                    Lex::CloseSquare => "]".into(),
                    Lex::Colon => ":".into(),
                    _ => unreachable!("handled above"),
                };
                for (i, part) in split_break(&text).into_iter().enumerate() {
                    if i > 0 {
                        res.push(("BREAK".into(), -1.0));
                    }
                    res.push((part.to_string(), 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Merge runs of identical weights (as A1111 does, BREAK markers included).
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (text, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&text),
            _ => merged.push((text, w)),
        }
    }
    merged
        .into_iter()
        .map(|(t, w)| {
            if w == -1.0 && t == "BREAK" {
                Piece::Break
            } else {
                Piece::Text(t, w)
            }
        })
        .collect()
}

/// The largest emphasis weight accepted (either sign). A1111 takes any number; beyond this the
/// weighted rows dominate the chunk mean and f16 activations overflow, so a larger one is almost
/// certainly a typo (`(word:11)` for `(word:1.1)`) and is refused instead of giving a NaN image.
pub const MAX_EMPHASIS: f64 = 100.0;

/// Check the emphasis weights of `prompt`: each finite and within ±[`MAX_EMPHASIS`].
pub fn check_weights(prompt: &str) -> std::result::Result<(), String> {
    for piece in parse_attention(prompt) {
        if let Piece::Text(text, w) = piece {
            let out_of_range = !w.is_finite() || w.abs() > MAX_EMPHASIS;
            if out_of_range && !text.trim().is_empty() {
                return Err(format!(
                    "emphasis weight {w} on `{}` is outside [-{MAX_EMPHASIS}, {MAX_EMPHASIS}]",
                    text.trim()
                ));
            }
        }
    }
    Ok(())
}

/// An extra-network tag, `<kind:arg1:arg2...>`, removed from the prompt before encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkTag {
    /// `lora`, `lyco`, `hypernet`, ...
    pub kind: String,
    /// The arguments split on `:` (for `lora`: name, then weights).
    pub args: Vec<String>,
}

/// A LoRA requested from the prompt: `<lora:name>`, `<lora:name:w>`, `<lora:name:te:unet>` or
/// with named weights `<lora:name:te=0.5:unet=1>`; the U-Net weight defaults to the text-encoder
/// weight, which defaults to 1 (A1111's `extra_networks_lora`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub text_encoder_weight: f64,
    pub unet_weight: f64,
}

/// Remove every `<kind:args>` tag (A1111's `<(\w+):([^>]+)>`) from `prompt`; returns the prompt
/// without them and the tags in order.
pub fn extract_network_tags(prompt: &str) -> (String, Vec<NetworkTag>) {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let kind_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| {
                let args = &after[kind_len + 1..];
                let close = args.find('>')?;
                (close > 0).then_some((
                    &after[..kind_len],
                    &args[..close],
                    kind_len + 1 + close + 1,
                ))
            })
            .flatten();
        match tag {
            Some((kind, args, len)) => {
                tags.push(NetworkTag {
                    kind: kind.to_string(),
                    args: args.split(':').map(str::to_string).collect(),
                });
                rest = &after[len..];
            }
            None => {
                out.push('<');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    (out, tags)
}

impl NetworkTag {
    /// Read a `lora`/`lyco` tag's name and weights; `Err` names what is wrong.
    pub fn as_lora(&self) -> std::result::Result<Option<LoraTag>, String> {
        if self.kind != "lora" && self.kind != "lyco" {
            return Ok(None);
        }
        let name = self.args.first().map(|s| s.trim()).unwrap_or("");
        if name.is_empty() {
            return Err(format!("<{}:...> without a name", self.kind));
        }
        let number = |s: &str| -> std::result::Result<f64, String> {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|w| w.is_finite())
                .ok_or_else(|| format!("<{}:{name}:...>: `{s}` is not a finite number", self.kind))
        };
        let (mut positional, mut te, mut unet) = (Vec::new(), None, None);
        for arg in &self.args[1..] {
            match arg.split_once('=') {
                Some(("te", v)) => te = Some(number(v)?),
                Some(("unet", v)) => unet = Some(number(v)?),
                Some(("dyn", _)) => {} // dynamic rank: not supported, ignored as A1111 may
                Some((k, _)) => {
                    return Err(format!("<{}:{name}:...>: unknown setting `{k}`", self.kind))
                }
                None => positional.push(number(arg)?),
            }
        }
        let te = te.or(positional.first().copied()).unwrap_or(1.0);
        let unet = unet.or(positional.get(1).copied()).unwrap_or(te);
        Ok(Some(LoraTag {
            name: name.to_string(),
            text_encoder_weight: te,
            unet_weight: unet,
        }))
    }
}

/// A 77-token window for the text encoder with a weight per token (1 for BOS, EOS, padding).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl WeightedChunk {
    /// Whether any weight differs from 1 (if not, the emphasis kernel can be skipped: it would
    /// change nothing).
    pub fn is_weighted(&self) -> bool {
        self.weights.iter().any(|&w| w != 1.0)
    }
}

/// How many tokens before the end of a full chunk a comma may be for the text after it to move to
/// the next chunk (A1111's default "comma_padding_backtrack").
pub const COMMA_BACKTRACK: usize = 20;

/// How a prompt longer than one window is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// diffusers: keep the first 75 tokens (a `BREAK` then has nothing to start).
    Truncate,
    /// A1111: as many 75-token chunks as needed, `BREAK` and the comma backtrack included.
    Chunks,
}

/// A prompt as the text encoder takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedPrompt {
    pub chunks: Vec<WeightedChunk>,
    /// Tokens were dropped to fit one window ([`Chunking::Truncate`]).
    pub truncated: bool,
}

impl WeightedPrompt {
    pub fn is_weighted(&self) -> bool {
        self.chunks.iter().any(WeightedChunk::is_weighted)
    }
}

/// Tokenize a parsed prompt into weighted 77-token windows. With [`Chunking::Chunks`] this is
/// A1111's `tokenize_line`: each piece is tokenized on its own, chunks hold 75 tokens, a `BREAK`
/// starts a new chunk, and when a chunk fills up within `COMMA_BACKTRACK` tokens of a comma the
/// text after the comma moves to the next chunk. With [`Chunking::Truncate`] the pieces' tokens
/// are cut after 75, as diffusers cuts. Padding uses the tokenizer's pad id after the EOS (SD 2.x
/// pads with `!`, as A1111 does for it).
pub fn tokenize_weighted(
    tokenizer: &ClipTokenizer,
    pieces: &[Piece],
    chunking: Chunking,
) -> WeightedPrompt {
    let chunk_len = tokenizer.model_max_length() - 2;
    let mut windows: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
    let mut truncated = false;
    match chunking {
        Chunking::Truncate => {
            let (mut ids, mut weights) = (Vec::new(), Vec::new());
            for piece in pieces {
                if let Piece::Text(text, weight) = piece {
                    for token in tokenizer.tokenize(text) {
                        ids.push(token);
                        weights.push(*weight as f32);
                    }
                }
            }
            truncated = ids.len() > chunk_len;
            ids.truncate(chunk_len);
            weights.truncate(chunk_len);
            windows.push((ids, weights));
        }
        Chunking::Chunks => windows = a1111_chunks(tokenizer, pieces, chunk_len),
    }
    let chunks = windows
        .into_iter()
        .map(|(tokens, token_weights)| {
            let mut ids = Vec::with_capacity(chunk_len + 2);
            ids.push(tokenizer.bos_id());
            ids.extend_from_slice(&tokens);
            ids.push(tokenizer.eos_id());
            ids.resize(chunk_len + 2, tokenizer.pad_id());
            let mut weights = Vec::with_capacity(chunk_len + 2);
            weights.push(1.0);
            weights.extend_from_slice(&token_weights);
            weights.resize(chunk_len + 2, 1.0);
            WeightedChunk { ids, weights }
        })
        .collect();
    WeightedPrompt { chunks, truncated }
}

/// A1111's chunk filling (`tokenize_line`), without BOS/EOS/padding.
fn a1111_chunks(
    tokenizer: &ClipTokenizer,
    pieces: &[Piece],
    chunk_len: usize,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let comma = tokenizer.token_id(",</w>");
    let mut chunks: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
    let (mut ids, mut weights): (Vec<u32>, Vec<f32>) = (Vec::new(), Vec::new());
    let mut last_comma: Option<usize> = None;
    let close =
        |chunks: &mut Vec<(Vec<u32>, Vec<f32>)>, ids: &mut Vec<u32>, weights: &mut Vec<f32>| {
            chunks.push((std::mem::take(ids), std::mem::take(weights)));
        };
    for piece in pieces {
        let (text, weight) = match piece {
            Piece::Break => {
                close(&mut chunks, &mut ids, &mut weights);
                last_comma = None;
                continue;
            }
            Piece::Text(text, weight) => (text, *weight as f32),
        };
        for token in tokenizer.tokenize(text) {
            if Some(token) == comma {
                last_comma = Some(ids.len());
            } else if ids.len() == chunk_len {
                if let Some(at) = last_comma.filter(|&at| chunk_len - at <= COMMA_BACKTRACK) {
                    let moved_ids = ids.split_off(at + 1);
                    let moved_weights = weights.split_off(at + 1);
                    close(&mut chunks, &mut ids, &mut weights);
                    last_comma = None;
                    ids = moved_ids;
                    weights = moved_weights;
                }
            }
            if ids.len() == chunk_len {
                close(&mut chunks, &mut ids, &mut weights);
                last_comma = None;
            }
            ids.push(token);
            weights.push(weight);
        }
    }
    if !ids.is_empty() || chunks.is_empty() {
        close(&mut chunks, &mut ids, &mut weights);
    }
    chunks
}

/// The text encoder's output for a weighted prompt, [1, chunks·77, C]: each chunk encoded on its
/// own (positions restart) and concatenated along the sequence; chunks with weights get A1111's
/// emphasis (rows weighted, chunk mean restored) on the GPU. An unweighted prompt goes through
/// the encoder as one batch, exactly as without emphasis.
pub fn encode_weighted(
    gpu: &Gpu,
    encoder: &ClipTextModel,
    prompt: &WeightedPrompt,
    clip_skip: Option<usize>,
) -> Result<Tensor> {
    let n = prompt.chunks.len();
    let width = encoder.config.hidden_size;
    let window = prompt.chunks.first().map_or(0, |c| c.ids.len());
    if !prompt.is_weighted() {
        let ids: Vec<u32> = prompt
            .chunks
            .iter()
            .flat_map(|c| c.ids.iter().copied())
            .collect();
        return encoder
            .forward(gpu, &ids, n, clip_skip)?
            .reshape(&[1, n * window, width]);
    }
    let mut out: Option<Tensor> = None;
    for chunk in &prompt.chunks {
        let mut z = encoder.forward(gpu, &chunk.ids, 1, clip_skip)?; // [1, 77, C]
        if chunk.is_weighted() {
            z = emphasis::emphasis(gpu, &z, &chunk.weights)?;
        }
        out = Some(match out {
            None => z,
            Some(prev) => elementwise::concat_batch(gpu, &prev, &z)?, // [k+1, 77, C]
        });
    }
    out.expect("at least one chunk")
        .reshape(&[1, n * window, width])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, w: f64) -> Piece {
        Piece::Text(s.into(), w)
    }

    fn close(a: &[Piece], b: &[Piece]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| match (x, y) {
                (Piece::Text(s, w), Piece::Text(s2, w2)) => s == s2 && (w - w2).abs() < 1e-12,
                (Piece::Break, Piece::Break) => true,
                _ => false,
            })
    }

    /// The examples in A1111's own docstring of `parse_prompt_attention`.
    #[test]
    fn a1111_docstring_examples() {
        let cases: Vec<(&str, Vec<Piece>)> = vec![
            ("normal text", vec![t("normal text", 1.0)]),
            (
                "an (important) word",
                vec![t("an ", 1.0), t("important", 1.1), t(" word", 1.0)],
            ),
            ("(unbalanced", vec![t("unbalanced", 1.1)]),
            ("\\(literal\\]", vec![t("(literal]", 1.0)]),
            ("(unnecessary)(parens)", vec![t("unnecessaryparens", 1.1)]),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                vec![
                    t("a ", 1.0),
                    t("house", 1.5730000000000004),
                    t(" ", 1.1),
                    t("on", 1.0),
                    t(" a ", 1.1),
                    t("hill", 0.55),
                    t(", sun, ", 1.1),
                    t("sky", 1.4641000000000006),
                    t(".", 1.1),
                ],
            ),
        ];
        for (prompt, want) in cases {
            let got = parse_attention(prompt);
            assert!(close(&got, &want), "{prompt:?}: got {got:?}");
        }
    }

    #[test]
    fn weights_breaks_and_oddities() {
        let got = parse_attention("a cat BREAK (a dog : 0.5 ) [x]");
        let want = vec![
            t("a cat", 1.0),
            Piece::Break,
            t("", 1.0),
            t("a dog ", 0.5),
            t(" ", 1.0),
            t("x", 1.0 / 1.1),
        ];
        // The empty text after BREAK stays a piece of its own, as in A1111.
        assert!(close(&got, &want), "{got:?}");
        // A weight with no open bracket is text.
        assert_eq!(parse_attention("a :1.5) b"), vec![t("a :1.5) b", 1.0)]);
        assert_eq!(parse_attention(""), vec![t("", 1.0)]);
        // BREAK inside a word is text.
        assert_eq!(parse_attention("BREAKFAST"), vec![t("BREAKFAST", 1.0)]);
        // A colon without a weight is text; a stray close bracket is text.
        assert_eq!(parse_attention("a:b)"), vec![t("a:b)", 1.0)]);
        // Negative weights are allowed.
        assert_eq!(parse_attention("(x:-1)"), vec![t("x", -1.0)]);
        // An unreadable number counts as a plain bracket instead of an error.
        assert!(close(&parse_attention("(x:1.2.3)"), &[t("x", 1.1)]));
    }

    #[test]
    fn absurd_weights_are_refused() {
        assert!(check_weights("a (cat:1.3) [dog] (x:-2)").is_ok());
        let e = check_weights("a (cat:99999999999999999999) dog").unwrap_err();
        assert!(e.contains("`cat`"), "{e}");
        assert!(check_weights("((((((((((((((((((((((((((((((((((((((((((((((((((x)))))))))))))))))))))))))))))))))))))))))))))))))").is_err());
        assert!(check_weights("(x:100)").is_ok());
    }

    #[test]
    fn network_tags_are_removed_and_read() {
        let (text, tags) = extract_network_tags(
            "a cat <lora:style_v2:0.8>, <lora:detail:te=0.5:unet=1.5> <3 <x:>",
        );
        assert_eq!(text, "a cat ,  <3 <x:>");
        let loras: Vec<LoraTag> = tags.iter().map(|t| t.as_lora().unwrap().unwrap()).collect();
        assert_eq!(
            loras,
            vec![
                LoraTag {
                    name: "style_v2".into(),
                    text_encoder_weight: 0.8,
                    unet_weight: 0.8
                },
                LoraTag {
                    name: "detail".into(),
                    text_encoder_weight: 0.5,
                    unet_weight: 1.5
                },
            ]
        );
        let (_, tags) = extract_network_tags("<lora:a> <lora:b:1:-0.5> <hypernet:h:1>");
        assert_eq!(tags[0].as_lora().unwrap().unwrap().unet_weight, 1.0);
        assert_eq!(tags[1].as_lora().unwrap().unwrap().unet_weight, -0.5);
        assert_eq!(tags[2].as_lora().unwrap(), None);
        let (_, bad) = extract_network_tags("<lora:a:nan> <lora::1>");
        assert!(bad[0].as_lora().is_err());
        assert!(bad[1].as_lora().is_err());
    }
}
