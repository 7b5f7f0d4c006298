//! Mutation fuzzing of every parser that reads a file a stranger may hand us, on stable Rust.
//!
//! Each target starts from valid seed inputs, applies a few random mutations per case (bit flips,
//! interesting bytes and integers, inserted/deleted/duplicated ranges, truncation, numbers in text
//! swapped for absurd ones) and feeds the result to the parser. The property is the same for every
//! target: a clear error or a correct result — never a panic, never an abort (an allocation sized
//! by the file before validation kills the process, which fails the run), never a hang (each case
//! runs on a worker thread with a time limit).
//!
//! CI runs `LDM_FUZZ_CASES` cases per target (default 5000, a few seconds in a minute in all). A longer
//! run is a documented command:
//!
//! ```text
//! LDM_FUZZ_CASES=1000000 cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! `LDM_FUZZ_SEED` changes the sequence. A failure prints the target, the case number and the seed,
//! so the input can be replayed; every crash found becomes a named regression case below.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ldm_wgpu::image::Image;
use ldm_wgpu::tokenizer::ClipTokenizer;
use ldm_wgpu::weights::{SafetensorsFile, WeightStore};

/// One case may take this long before it counts as a hang (debug build, loaded CI machine).
const CASE_TIME_LIMIT: Duration = Duration::from_secs(20);

fn cases() -> u64 {
    std::env::var("LDM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

fn base_seed() -> u64 {
    std::env::var("LDM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001)
}

/// xorshift64*: small, seedable, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b']', b'-', b'9',
];
const INTERESTING_U64: &[u64] = &[
    0,
    1,
    7,
    8,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    u64::MAX / 2,
    u64::MAX - 8,
    u64::MAX,
];
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "3",
    "255",
    "65536",
    "4294967296",
    "1000000000000",
    "18446744073709551615",
    "99999999999999999999999",
    "1e308",
    "-1e308",
    "0.5",
    "null",
    "\"x\"",
];

/// Apply 1-4 random mutations to `data`.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = *rng.pick(INTERESTING_BYTES);
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                data.drain(at..at + n);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let copy = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, copy);
            }
            5 if len > 0 => data.truncate(rng.below(len)),
            6 if len >= 8 => {
                let at = rng.below(len - 7);
                data[at..at + 8].copy_from_slice(&rng.pick(INTERESTING_U64).to_le_bytes());
            }
            7 if len >= 4 => {
                let at = rng.below(len - 3);
                let v = *rng.pick(INTERESTING_U64) as u32;
                data[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => replace_number(rng, data),
        }
    }
}

/// Swap one run of ASCII digits for an interesting number (JSON-aware enough for headers and
/// configs: it turns shapes, offsets and sizes absurd).
fn replace_number(rng: &mut Rng, data: &mut Vec<u8>) {
    let starts: Vec<usize> = (0..data.len())
        .filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let start = *rng.pick(&starts);
    let end = (start..data.len())
        .find(|&i| !data[i].is_ascii_digit())
        .unwrap_or(data.len());
    let with = rng.pick(INTERESTING_NUMBERS).as_bytes().to_vec();
    data.splice(start..end, with);
}

/// Run `check` on a worker thread with a time limit; Err describes a panic or a hang.
fn run_bounded<F>(check: F) -> Result<(), String>
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let outcome = match catch_unwind(AssertUnwindSafe(check)) {
            Ok(r) => r,
            Err(payload) => Err(format!(
                "panic: {}",
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(CASE_TIME_LIMIT) {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {CASE_TIME_LIMIT:?} (hang)")),
    }
}

/// Mutate each seed `cases()` times in total and check every result; panics list the failures.
/// `check` returns whether the parser accepted the input (for the accepted/refused tally).
fn fuzz(target: &str, seeds: &[Vec<u8>], dir: &Path, check: fn(&Path) -> Result<bool, String>) {
    let n = cases();
    let seed = base_seed()
        ^ target
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(131) + b as u64);
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut failures = Vec::new();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for case in 0..n {
        let mut data = seeds[case as usize % seeds.len()].clone();
        mutate(&mut rng, &mut data);
        let path = dir.join(format!("{target}-case"));
        std::fs::write(&path, &data).unwrap();
        let tally = accepted.clone();
        let outcome = run_bounded(move || {
            let ok = check(&path)?;
            tally.fetch_add(ok as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        });
        if let Err(why) = outcome {
            let keep = dir.join(format!("{target}-failure-{case}"));
            std::fs::write(&keep, &data).unwrap();
            failures.push(format!(
                "case {case}: {why} (input kept at {})",
                keep.display()
            ));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    eprintln!(
        "fuzz {target}: {n} cases in {:.1} s, {} accepted, the rest refused with an error (seed {seed:#x})",
        started.elapsed().as_secs_f64(),
        accepted.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "fuzz {target} (seed {seed:#x}):\n{}",
        failures.join("\n")
    );
}

fn scratch(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ldm-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// safetensors: header length, JSON header, offsets, dtypes, shapes.

fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut header = header.as_bytes().to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend_from_slice(data);
    out
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let data: Vec<u8> = (0..64u8).collect();
    vec![
        safetensors_bytes(
            r#"{"__metadata__":{"format":"pt"},"a.weight":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"b.bias":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}}"#,
            &data[..28],
        ),
        safetensors_bytes(
            r#"{"c":{"dtype":"BF16","shape":[2,2,2],"data_offsets":[0,16]},"d":{"dtype":"I64","shape":[2],"data_offsets":[16,32]},"e":{"dtype":"F32","shape":[],"data_offsets":[32,36]}}"#,
            &data[..36],
        ),
    ]
}

/// Open, then read every tensor in both conversions; a tensor that opens must convert to exactly
/// its element count.
fn check_safetensors(path: &Path) -> Result<bool, String> {
    let Ok(file) = SafetensorsFile::open(path) else {
        return Ok(false);
    };
    let names: Vec<String> = file.names().map(str::to_string).collect();
    for name in &names {
        if let Ok(t) = file.tensor(name) {
            let numel = t.numel();
            if t.to_f32_vec().len() != numel || t.to_f16_vec().len() != numel {
                return Err(format!(
                    "{name}: conversion length differs from {numel} elements"
                ));
            }
        }
    }
    let store = WeightStore::from_files("fuzz", vec![std::sync::Arc::new(file)]);
    if let Ok(store) = store {
        for key in store.keys().map(str::to_string).collect::<Vec<_>>() {
            let _ = store.get_any(&key);
        }
    }
    Ok(true)
}

#[test]
fn fuzz_safetensors() {
    let dir = scratch("safetensors");
    fuzz("safetensors", &safetensors_seeds(), &dir, check_safetensors);
    std::fs::remove_dir_all(&dir).ok();
}

/// Hostile files that must be refused (not merely survive): each names what is wrong.
#[test]
fn safetensors_regressions_are_errors() {
    let dir = scratch("safetensors-regressions");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("header length u64::MAX", {
            let mut b = safetensors_seeds()[0].clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("header length past the end", {
            let mut b = safetensors_seeds()[0].clone();
            let len = b.len() as u64;
            b[..8].copy_from_slice(&len.to_le_bytes());
            b
        }),
        (
            "offsets beyond the file",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1600000]}}"#,
                &[0; 16],
            ),
        ),
        (
            "overlapping tensors",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
                &[0; 24],
            ),
        ),
        (
            "dtype that does not match the byte length",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        (
            "huge declared shape",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[1000000000000,1000000000000],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
        ),
        ("not UTF-8 in the header", {
            let mut b = safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            );
            b[10] = 0xff;
            b
        }),
        (
            "a pickle",
            b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01".to_vec(),
        ),
        ("shorter than the length field", vec![1, 2, 3]),
    ];
    for (what, bytes) in cases.drain(..) {
        let path = dir.join("case.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let outcome = run_bounded(move || match SafetensorsFile::open(&path) {
            Ok(_) => Err("accepted".into()),
            Err(e) => {
                let msg = e.to_string();
                if msg.is_empty() {
                    Err("empty error message".into())
                } else {
                    Ok(())
                }
            }
        });
        assert!(outcome.is_ok(), "{what}: {outcome:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------
// PNG: every colour type and depth we accept, then mutated; the mask reader on each result.

fn png_bytes(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth) -> Vec<u8> {
    let channels = match color {
        png::ColorType::Grayscale | png::ColorType::Indexed => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
    };
    let bits = match depth {
        png::BitDepth::One => 1,
        png::BitDepth::Two => 2,
        png::BitDepth::Four => 4,
        png::BitDepth::Eight => 8,
        png::BitDepth::Sixteen => 16,
    };
    let row_bytes = (width as usize * channels * bits).div_ceil(8);
    let data: Vec<u8> = (0..row_bytes * height as usize)
        .map(|i| (i * 37 % 251) as u8)
        .collect();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(depth);
        if color == png::ColorType::Indexed {
            enc.set_palette((0..256 * 3).map(|i| (i % 256) as u8).collect::<Vec<u8>>());
        }
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&data).unwrap();
    }
    out
}

/// Interlaced (Adam7) files, which the png crate decodes but cannot write: made once with pypng
/// (tests/fixtures/png/, 7×5 RGB 8-bit and grey + alpha 16-bit).
fn interlaced_seeds() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/png");
    ["interlaced_rgb8.png", "interlaced_ga16.png"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

fn png_seeds() -> Vec<Vec<u8>> {
    use png::{BitDepth as D, ColorType as C};
    let mut seeds = interlaced_seeds();
    seeds.extend([
        png_bytes(7, 5, C::Rgb, D::Eight),
        png_bytes(4, 6, C::Rgba, D::Eight),
        png_bytes(5, 3, C::Grayscale, D::Eight),
        png_bytes(3, 3, C::GrayscaleAlpha, D::Eight),
        png_bytes(6, 2, C::Rgb, D::Sixteen),
        png_bytes(9, 4, C::Grayscale, D::One),
        png_bytes(5, 5, C::Indexed, D::Eight),
        png_bytes(3, 7, C::Indexed, D::Four),
    ]);
    seeds
}

/// An interlaced PNG decodes to the same pixels as the plain one.
#[test]
fn interlaced_png_decodes_like_the_plain_one() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/png");
    let plain = Image::load_png(&dir.join("plain_rgb8.png")).unwrap();
    let interlaced = Image::load_png(&dir.join("interlaced_rgb8.png")).unwrap();
    assert_eq!(plain, interlaced);
    let grey = Image::load_png(&dir.join("interlaced_ga16.png")).unwrap();
    assert_eq!((grey.width, grey.height, grey.rgb.len()), (7, 5, 105));
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Recompute every chunk's CRC after a mutation, as a deliberate attacker would, so that the
/// mutated header fields and data reach the decoder instead of stopping at the checksum.
fn fix_png_crcs(data: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= data.len() {
        let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= data.len()) else {
            return;
        };
        let crc = crc32(&data[at + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

fn check_png(path: &Path) -> Result<bool, String> {
    // Half the cases get their checksums repaired (the case number is not visible here, so use
    // a bit of the content).
    let mut data = std::fs::read(path).map_err(|e| e.to_string())?;
    if data.len() > 20 && data[data.len() / 2] & 1 == 0 {
        fix_png_crcs(&mut data);
        std::fs::write(path, &data).map_err(|e| e.to_string())?;
    }
    let Ok(image) = Image::load_png(path) else {
        return Ok(false);
    };
    if image.rgb.len() != image.width * image.height * 3 {
        return Err(format!(
            "{}×{} image with {} bytes",
            image.width,
            image.height,
            image.rgb.len()
        ));
    }
    if image.to_mask().len() != image.width * image.height {
        return Err("mask length differs from the pixel count".into());
    }
    Ok(true)
}

#[test]
fn fuzz_png() {
    let dir = scratch("png");
    // The seeds themselves decode, in every colour type, to the right size.
    for (i, seed) in png_seeds().iter().enumerate() {
        let path = dir.join(format!("seed-{i}.png"));
        std::fs::write(&path, seed).unwrap();
        let image = Image::load_png(&path).unwrap_or_else(|e| panic!("seed {i}: {e}"));
        assert_eq!(image.rgb.len(), image.width * image.height * 3, "seed {i}");
    }
    fuzz("png", &png_seeds(), &dir, check_png);
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------
// Tokenizer: arbitrary text through the public API (which takes &str: invalid UTF-8 cannot reach
// it, so bytes are decoded lossily as a caller would), long prompts, emphasis-like brackets.

fn tokenizer() -> ClipTokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-shapes/tokenizer");
    ClipTokenizer::from_dir(&dir).unwrap()
}

#[test]
fn fuzz_tokenizer() {
    let tok = std::sync::Arc::new(tokenizer());
    let seeds: Vec<Vec<u8>> = [
        "a photo of an astronaut riding a horse, (masterpiece:1.2), [[blurry]]",
        "((unbalanced (brackets: 1.5 [ and \\( escapes \\) <lora:x:0.8> <|endoftext|>",
        "Ünïcödé café naïve 東京 🚀🚀 e\u{301} \u{200b}zero width",
        "   \t\n  ",
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let n = cases();
    let mut rng = Rng::new(base_seed() ^ 0x70c);
    let started = Instant::now();
    for case in 0..n {
        let mut data = seeds[case as usize % seeds.len()].clone();
        mutate(&mut rng, &mut data);
        let text = String::from_utf8_lossy(&data).into_owned();
        let tok = tok.clone();
        let outcome = run_bounded(move || {
            let padded = tok.encode_padded(&text);
            if padded.ids.len() != tok.model_max_length() {
                return Err(format!(
                    "{} ids, not {}",
                    padded.ids.len(),
                    tok.model_max_length()
                ));
            }
            for chunk in tok.encode_chunked(&text) {
                if chunk.len() != tok.model_max_length() {
                    return Err("a chunk of the wrong length".into());
                }
            }
            Ok(())
        });
        assert!(
            outcome.is_ok(),
            "case {case}: {outcome:?} for {:?}",
            String::from_utf8_lossy(&data)
        );
    }
    eprintln!(
        "fuzz tokenizer: {n} cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A 100,000-character prompt tokenizes in bounded time (no quadratic blow-up) into chunks.
#[test]
fn tokenizer_long_prompt_is_bounded() {
    let tok = std::sync::Arc::new(tokenizer());
    let prompt: String = "a (red:1.3) cat, ".repeat(100_000 / 17 + 1);
    let started = Instant::now();
    let outcome = run_bounded(move || {
        let chunks = tok.encode_chunked(&prompt);
        if chunks.len() < 10 {
            return Err(format!("only {} chunks", chunks.len()));
        }
        Ok(())
    });
    assert!(outcome.is_ok(), "{outcome:?}");
    eprintln!(
        "100k-character prompt: {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Single-file architecture detection: the real SD 1.5 and 2.1 key → shape maps, with keys
// dropped, renamed and added and dimensions made absurd, through renaming and config inference.

type Shapes = std::collections::BTreeMap<String, Vec<usize>>;

fn real_shapes(name: &str) -> Shapes {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/weights/{name}-real.shapes.json"));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    doc["ldm_shapes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let dims = s.as_array().unwrap().iter();
            (
                k.clone(),
                dims.map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect()
}

fn mutate_shapes(rng: &mut Rng, shapes: &mut Shapes) {
    const DIMS: &[usize] = &[0, 1, 2, 3, 7, 8, 320, 1 << 20, 1 << 40, usize::MAX];
    for _ in 0..1 + rng.below(4) {
        let keys: Vec<String> = shapes.keys().cloned().collect();
        let key = rng.pick(&keys).clone();
        match rng.below(5) {
            0 => {
                shapes.remove(&key);
            }
            1 => {
                let dims = shapes.get_mut(&key).unwrap();
                if !dims.is_empty() {
                    let i = rng.below(dims.len());
                    dims[i] = *rng.pick(DIMS);
                }
            }
            2 => {
                let dims = shapes.get_mut(&key).unwrap();
                if rng.below(2) == 0 {
                    dims.pop();
                } else {
                    dims.push(*rng.pick(DIMS));
                }
            }
            3 => {
                // Renumber one index in the key: blocks appear, vanish or collide.
                let shape = shapes.remove(&key).unwrap();
                let digits: Vec<usize> = key
                    .char_indices()
                    .filter(|(_, c)| c.is_ascii_digit())
                    .map(|(i, _)| i)
                    .collect();
                let renamed = if digits.is_empty() {
                    format!("{key}.0")
                } else {
                    let at = *rng.pick(&digits);
                    let with = rng.pick(&["0", "1", "9", "99", "4294967296"]).to_string();
                    format!("{}{}{}", &key[..at], with, &key[at + 1..])
                };
                shapes.insert(renamed, shape);
            }
            _ => {
                let prefix = rng.pick(&[
                    "model.diffusion_model.input_blocks.",
                    "first_stage_model.decoder.up.",
                    "cond_stage_model.transformer.text_model.encoder.layers.",
                    "cond_stage_model.model.transformer.resblocks.",
                ]);
                let junk = format!("{prefix}{}.x.weight", rng.below(40));
                shapes.insert(junk, vec![*rng.pick(DIMS), *rng.pick(DIMS)]);
            }
        }
    }
}

fn check_single_file_detection(stored: &Shapes) {
    use ldm_wgpu::weights::rename::{self, InferHints};
    let Ok(plan) = rename::plan_single_file(stored) else {
        return;
    };
    let present = |m: &std::collections::BTreeMap<String, rename::Renamed>| -> Shapes {
        m.iter()
            .filter_map(|(k, r)| {
                let shape = r.transform.apply_shape(stored.get(&r.source_key)?)?;
                Some((k.clone(), shape))
            })
            .collect()
    };
    let (unet, vae, text) = (
        present(&plan.unet),
        present(&plan.vae),
        present(&plan.text_encoder),
    );
    let family = plan.family(&unet);
    let hints = InferHints::default();
    let _ = rename::infer_unet_config(&unet, family, &hints);
    let _ = rename::infer_vae_config(&vae, family, &hints);
    let _ = rename::infer_text_encoder_config(&text, family);
    let _ = rename::cross_attention_dim(&unet);
}

#[test]
fn fuzz_single_file_detection() {
    let seeds = [real_shapes("sd15"), real_shapes("sd21")];
    let n = cases() / 5; // each case walks a ~1,100-key map
    let mut rng = Rng::new(base_seed() ^ 0x51f);
    let started = Instant::now();
    for case in 0..n {
        let mut shapes = seeds[case as usize % 2].clone();
        mutate_shapes(&mut rng, &mut shapes);
        let kept = shapes.clone();
        let outcome = run_bounded(move || {
            check_single_file_detection(&shapes);
            Ok(())
        });
        if let Err(why) = outcome {
            let before = &seeds[case as usize % 2];
            let changed: Vec<_> = kept
                .iter()
                .filter(|(k, v)| before.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: {v:?}"))
                .chain(
                    before
                        .keys()
                        .filter(|k| !kept.contains_key(*k))
                        .map(|k| format!("{k}: removed")),
                )
                .collect();
            panic!("single-file case {case}: {why}\nchanged keys: {changed:#?}");
        }
    }
    eprintln!(
        "fuzz single-file detection: {n} cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Found by the long fuzz run: a declared dimension of usize::MAX overflowed the element count
/// in `Transform::apply_shape` (a panic in debug builds, a wrong answer in release).
#[test]
fn single_file_regression_overflowing_dimensions() {
    let mut shapes = real_shapes("sd15");
    shapes.insert(
        "first_stage_model.decoder.mid.attn_1.proj_out.weight".into(),
        vec![usize::MAX, 512, 1, 1],
    );
    check_single_file_detection(&shapes);
}

// ---------------------------------------------------------------------------------------------
// LoRA files: a kohya file and a PEFT file for the shipped model, mutated (header, names,
// shapes, alphas), matched against the model's weights.

fn lora_seeds() -> Vec<Vec<u8>> {
    let q = "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";
    let kohya = format!(
        r#"{{"lora_unet_{q}.lora_down.weight":{{"dtype":"F32","shape":[2,128],"data_offsets":[0,1024]}},"lora_unet_{q}.lora_up.weight":{{"dtype":"F32","shape":[128,2],"data_offsets":[1024,2048]}},"lora_unet_{q}.alpha":{{"dtype":"F32","shape":[],"data_offsets":[2048,2052]}}}}"#
    );
    let peft = r#"{"unet.down_blocks.1.resnets.0.conv1.lora_A.weight":{"dtype":"F16","shape":[1,64,3,3],"data_offsets":[0,1152]},"unet.down_blocks.1.resnets.0.conv1.lora_B.weight":{"dtype":"F16","shape":[128,1,1,1],"data_offsets":[1152,1408]}}"#;
    vec![
        safetensors_bytes(&kohya, &[0u8; 2052]),
        safetensors_bytes(peft, &[0u8; 1408]),
    ]
}

fn lora_targets() -> &'static ldm_wgpu::weights::lora::LoraTargets {
    use ldm_wgpu::weights::lora::{LoraTarget, LoraTargets};
    static TARGETS: std::sync::OnceLock<LoraTargets> = std::sync::OnceLock::new();
    TARGETS.get_or_init(|| {
        let dir = ldm_wgpu::pipeline::default_model_dir();
        let model = ldm_wgpu::weights::open_model(dir, &Default::default()).unwrap();
        LoraTargets::default()
            .with(LoraTarget::Unet, model.unet.weights.shapes())
            .with(
                LoraTarget::TextEncoder,
                model.text_encoder.as_ref().unwrap().weights.shapes(),
            )
    })
}

fn check_lora(path: &Path) -> Result<bool, String> {
    let Ok(lora) = ldm_wgpu::weights::lora::open_lora(path, lora_targets()) else {
        return Ok(false);
    };
    // Every accepted layer's tensors exist and convert.
    for layer in &lora.layers {
        for name in [Some(&layer.down), Some(&layer.up), layer.mid.as_ref()]
            .into_iter()
            .flatten()
        {
            let t = lora.tensor(name).map_err(|e| e.to_string())?;
            if t.to_f32_vec().len() != t.numel() {
                return Err(format!("{name}: conversion length"));
            }
        }
    }
    Ok(true)
}

#[test]
fn fuzz_lora() {
    let dir = scratch("lora");
    for (i, seed) in lora_seeds().iter().enumerate() {
        let path = dir.join(format!("seed-{i}.safetensors"));
        std::fs::write(&path, seed).unwrap();
        assert_eq!(check_lora(&path), Ok(true), "seed {i} must be a valid LoRA");
    }
    fuzz("lora", &lora_seeds(), &dir, check_lora);
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------
// Configs: the shipped model's config.json files and scheduler_config.json, and the TAESD
// fixture's, mutated as text (numbers made absurd, types broken), then read; a scheduler config
// that reads also builds every sampler and runs its whole loop on the CPU specification.

fn config_seeds() -> Vec<Vec<u8>> {
    let model = ldm_wgpu::pipeline::default_model_dir();
    let taesd =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/taesd/tiny/config.json");
    [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ]
    .iter()
    .map(|p| std::fs::read(model.join(p)).unwrap())
    .chain([std::fs::read(taesd).unwrap()])
    .collect()
}

fn check_config(path: &Path) -> Result<bool, String> {
    use ldm_wgpu::models::{
        clip::ClipConfig, taesd::TaesdConfig, unet::UNetConfig, vae::VaeConfig,
    };
    use ldm_wgpu::sched::{
        build_sampler, execute_on_cpu, Buf, CpuBuffers, SamplerKind, SchedulerConfig,
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(path).unwrap())
    else {
        return Ok(false);
    };
    let mut accepted = false;
    accepted |= UNetConfig::from_json(&value).is_ok();
    accepted |= VaeConfig::from_json(&value).is_ok();
    accepted |= ClipConfig::from_json(&value).is_ok();
    accepted |= TaesdConfig::from_json(&value).is_ok();
    if let Ok(config) = SchedulerConfig::from_value(&value) {
        accepted = true;
        for kind in SamplerKind::ALL {
            for steps in [1, 4, 25] {
                let Ok(mut sampler) = build_sampler(&config, Some(kind), steps) else {
                    continue;
                };
                let n = 8;
                let mut bufs = CpuBuffers::new(vec![0.5; n]);
                for call in 0..sampler.timesteps().len() {
                    let plan = sampler.step(call);
                    if plan.needs_noise {
                        bufs.set(Buf::Noise, vec![0.1; n]);
                    }
                    execute_on_cpu(&plan, &vec![0.25; n], None, &mut bufs)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    Ok(accepted)
}

#[test]
fn fuzz_configs() {
    let dir = scratch("configs");
    for (i, seed) in config_seeds().iter().enumerate() {
        let path = dir.join(format!("seed-{i}.json"));
        std::fs::write(&path, seed).unwrap();
        assert_eq!(check_config(&path), Ok(true), "seed {i} must be accepted");
    }
    fuzz("configs", &config_seeds(), &dir, check_config);
    std::fs::remove_dir_all(&dir).ok();
}
