//! CLIP tokenizer parity with transformers' `CLIPTokenizer`.
//! Fixtures: tools/make_tokenizer.py (vocabulary folders) and
//! tools/make_tokenizer_fixtures.py (tests/fixtures/tokenizer_cases.json).

use std::path::{Path, PathBuf};

use ldm_wgpu::tokenizer::{ClipTokenizer, TokenizerError};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// SD 1.x layout: a whole diffusers `tokenizer/` folder, pad = EOS.
fn sd1() -> ClipTokenizer {
    ClipTokenizer::from_dir(&root().join("weights/tiny-shapes/tokenizer")).unwrap()
}

/// SD 2.x layout: SD 1.x vocabulary + SD 2.x JSON configs (pad = "!").
fn sd2() -> ClipTokenizer {
    let vocab_dir = root().join("weights/tiny-shapes/tokenizer");
    let json_dir = root().join("tests/fixtures/tokenizer_sd2");
    ClipTokenizer::from_files(
        &vocab_dir.join("vocab.json"),
        &vocab_dir.join("merges.txt"),
        Some(&json_dir.join("special_tokens_map.json")),
        Some(&json_dir.join("tokenizer_config.json")),
    )
    .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The reference ids of one pad style; the fixture leaves `sd2_ids` out where
/// it equals `sd1_ids` (see tools/make_tokenizer_fixtures.py).
fn want_ids(case: &serde_json::Value, name: &str) -> Vec<u32> {
    match case.get(format!("{name}_ids")) {
        Some(v) => ids(v),
        None => ids(&case["sd1_ids"]),
    }
}

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/tokenizer_cases.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

#[test]
fn special_ids() {
    let (t1, t2) = (sd1(), sd2());
    assert_eq!(
        (t1.bos_id(), t1.eos_id(), t1.pad_id(), t1.model_max_length()),
        (49406, 49407, 49407, 77)
    );
    assert_eq!(
        (t2.bos_id(), t2.eos_id(), t2.pad_id(), t2.model_max_length()),
        (49406, 49407, 0, 77)
    );
}

#[test]
fn fixture_cases_bit_exact() {
    let (t1, t2) = (sd1(), sd2());
    let cases = cases();
    // The issue asks for at least 200 varied prompts.
    assert!(cases.len() >= 220, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        for (name, tok) in [("sd1", &t1), ("sd2", &t2)] {
            let want = want_ids(case, name);
            let got = tok.encode(prompt);
            if got != want {
                failures.push(format!(
                    "{name} {prompt:?}\n  got  {got:?}\n  want {want:?}"
                ));
            }
            let want_padded = ids(&case[format!("{name}_padded")]);
            let enc = tok.encode_padded(prompt);
            if enc.ids != want_padded {
                failures.push(format!(
                    "{name} padded {prompt:?}\n  got  {:?}\n  want {want_padded:?}",
                    enc.ids
                ));
            }
            assert_eq!(
                enc.truncated,
                want.len() > 77,
                "{name} truncated flag for {prompt:?}"
            );
            assert_eq!(enc.ids[enc.eos_position], tok.eos_id(), "{name} {prompt:?}");
            assert_eq!(
                enc.eos_position,
                want.len().min(77) - 1,
                "{name} {prompt:?}"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn chunked_shape_and_wrapping() {
    for tok in [sd1(), sd2()] {
        let (bos, eos, pad) = (tok.bos_id(), tok.eos_id(), tok.pad_id());

        let empty = tok.encode_chunked("");
        assert_eq!(empty.len(), 1);
        assert_eq!(&empty[0][..2], &[bos, eos]);
        assert!(empty[0][2..].iter().all(|&id| id == pad));

        // "cat" is one token: 75 fit one chunk exactly, 76 need two.
        let words = |n: usize| vec!["cat"; n].join(" ");
        assert_eq!(tok.encode(&words(1)).len(), 3);
        assert_eq!(tok.encode_chunked(&words(75)).len(), 1);
        let chunks = tok.encode_chunked(&words(76));
        assert_eq!(chunks.len(), 2);
        let cat = tok.encode("cat")[1];
        assert_eq!(chunks[0][0], bos);
        assert!(chunks[0][1..76].iter().all(|&id| id == cat));
        assert_eq!(chunks[0][76], eos);
        assert_eq!(&chunks[1][..3], &[bos, cat, eos]);
        assert!(chunks[1][3..].iter().all(|&id| id == pad));

        // Chunks hold the unpadded tokens in order, 75 at a time.
        let long = vec!["a red fox, 1234 don't"; 40].join(" ");
        let tokens = tok.encode(&long);
        let inner = &tokens[1..tokens.len() - 1];
        let chunks = tok.encode_chunked(&long);
        assert_eq!(chunks.len(), inner.len().div_ceil(75));
        let mut joined = Vec::new();
        for chunk in &chunks {
            assert_eq!(chunk.len(), 77);
            assert_eq!(chunk[0], bos);
            let body_len = chunk[1..].iter().position(|&id| id == eos).unwrap();
            // SD 1.x pads with EOS, so the first EOS after BOS ends the body.
            assert!(body_len <= 75);
            joined.extend_from_slice(&chunk[1..1 + body_len]);
            assert!(chunk[2 + body_len..].iter().all(|&id| id == pad));
        }
        assert_eq!(joined, inner);
    }
}

#[test]
fn missing_vocab_is_a_clear_error() {
    let dir = root().join("tests/fixtures/tokenizer_sd2"); // JSON only, no vocab.json
    let err = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("vocab.json"), "{msg}");
    // Also through the crate's error type.
    let crate_err: ldm_wgpu::Error = err.into();
    assert!(crate_err.to_string().contains("vocab.json"), "{crate_err}");
}

#[test]
fn malformed_files_are_clear_errors() {
    let tmp = std::env::temp_dir().join(format!("ldm_tokenizer_test_{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let vocab_dir = root().join("weights/tiny-shapes/tokenizer");
    let write = |name: &str, text: &str| {
        let p = tmp.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let merges_ok = vocab_dir.join("merges.txt");

    let bad_json = write("vocab_bad.json", "{not json");
    let err = ClipTokenizer::from_files(&bad_json, &merges_ok, None, None).unwrap_err();
    assert!(err.to_string().contains("vocab_bad.json"), "{err}");

    let no_specials = write("vocab_small.json", r#"{"a</w>": 0}"#);
    let err = ClipTokenizer::from_files(&no_specials, &merges_ok, None, None).unwrap_err();
    assert!(err.to_string().contains("<|startoftext|>"), "{err}");

    let no_header = write("merges_bad.txt", "a b\n");
    let err = ClipTokenizer::from_files(&vocab_dir.join("vocab.json"), &no_header, None, None)
        .unwrap_err();
    assert!(err.to_string().contains("merges_bad.txt"), "{err}");

    let bad_pad = write("special_tokens_map.json", r#"{"pad_token": "not-a-token"}"#);
    let err = ClipTokenizer::from_files(
        &vocab_dir.join("vocab.json"),
        &merges_ok,
        Some(&bad_pad),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not-a-token"), "{err}");

    // pad_token as an AddedToken object, and configs left out entirely.
    let obj_pad = write(
        "special_tokens_map.json",
        r#"{"pad_token": {"content": "!", "normalized": false}}"#,
    );
    let tok = ClipTokenizer::from_files(
        &vocab_dir.join("vocab.json"),
        &merges_ok,
        Some(&obj_pad),
        None,
    )
    .unwrap();
    assert_eq!(tok.pad_id(), 0);
    let tok = ClipTokenizer::from_files(
        &vocab_dir.join("vocab.json"),
        &merges_ok,
        None,
        Some(Path::new("/nonexistent")),
    )
    .unwrap();
    assert_eq!((tok.pad_id(), tok.model_max_length()), (49407, 77));
    std::fs::remove_dir_all(&tmp).ok();
}

/// Extra parity sweep over a larger case file with the same layout as
/// tokenizer_cases.json (`sd1_ids`/`sd2_ids` per prompt), e.g. random
/// strings made with transformers: `LDM_TOKENIZER_CASES=/tmp/cases.json
/// cargo test --test tokenizer -- --ignored`. Prompts whose NFC form
/// differs are skipped (NFC is not implemented, see src/tokenizer.rs).
#[test]
#[ignore = "needs LDM_TOKENIZER_CASES=<file>"]
fn extra_cases_from_env() {
    let path = std::env::var("LDM_TOKENIZER_CASES").expect("set LDM_TOKENIZER_CASES");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (t1, t2) = (sd1(), sd2());
    let mut failures = Vec::new();
    let cases = doc["cases"].as_array().unwrap();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        for (name, tok) in [("sd1", &t1), ("sd2", &t2)] {
            let want = want_ids(case, name);
            let got = tok.encode(prompt);
            if got != want {
                failures.push(format!(
                    "{name} {prompt:?}\n  got  {got:?}\n  want {want:?}"
                ));
            }
        }
    }
    let shown: Vec<_> = failures.iter().take(20).cloned().collect();
    assert!(
        failures.is_empty(),
        "{} of {} mismatch:\n{}",
        failures.len(),
        2 * cases.len(),
        shown.join("\n")
    );
}
