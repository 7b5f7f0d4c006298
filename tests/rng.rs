//! Bit-exact parity of our noise with torch (fixtures from tools/make_rng_fixtures.py).
//! Tolerance: none. A single differing bit would change every image made from that seed.

use ldm_wgpu::rng::{PhiloxRng, RandnVariant, TorchCpuRng};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng_cases.json");
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}. HINT: run tools/make_rng_fixtures.py"));
    serde_json::from_str(&text).unwrap()
}

/// Compares one randn output with its fixture summary; returns a description of the first mismatch.
fn check(values: &[f32], expected: &Value) -> Result<(), String> {
    let n = expected["n"].as_u64().unwrap() as usize;
    if values.len() != n {
        return Err(format!("length {} != {n}", values.len()));
    }
    for (i, want) in expected["prefix_bits"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want = want.as_u64().unwrap() as u32;
        if values[i].to_bits() != want {
            return Err(format!(
                "element {i}: got {} ({:#010x}), torch {} ({want:#010x})",
                values[i],
                values[i].to_bits(),
                f32::from_bits(want)
            ));
        }
    }
    let sum: u64 = values.iter().map(|v| v.to_bits() as u64).sum();
    let want = expected["bits_sum"].as_u64().unwrap();
    if sum != want {
        return Err(format!(
            "bit-pattern checksum {sum} != torch {want} (beyond the prefix)"
        ));
    }
    Ok(())
}

fn calls(case: &Value) -> Vec<usize> {
    case["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn torch_cpu_randn_is_bit_exact() {
    let fx = fixture();
    let mut failures = Vec::new();
    let cases = fx["cases"].as_array().unwrap();
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let variant = RandnVariant::from_name(case["variant"].as_str().unwrap()).unwrap();
        let mut rng = TorchCpuRng::with_variant(seed, variant);
        for (k, n) in calls(case).into_iter().enumerate() {
            if let Err(e) = check(&rng.randn(n), &case["outputs"][k]) {
                failures.push(format!(
                    "seed {seed} {variant:?} calls {} #{k}: {e}",
                    case["calls"]
                ));
            }
        }
    }
    assert!(cases.len() >= 80, "fixture has only {} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn default_variant_is_avx2() {
    let mut a = TorchCpuRng::new(42);
    let mut b = TorchCpuRng::with_variant(42, RandnVariant::Avx2);
    assert_eq!(a.randn(100), b.randn(100));
}

#[test]
fn philox_matches_a1111() {
    let fx = fixture();
    // rng_philox.py's docstring: Generator(seed=0).randn((3, 4)), first row. Those numbers are
    // CUDA torch's (f32 math on the GPU), which the f64 numpy imitation matches to ~1e-6 only.
    let first = PhiloxRng::new(0).randn(12);
    let docstring = [-0.92466259f64, -0.42534415, -2.6438457, 0.14518388];
    for (&got, want) in first.iter().zip(docstring) {
        let got = got as f64;
        assert!(
            (got - want).abs() < 1e-6 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
    let mut failures = Vec::new();
    for case in fx["philox"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = PhiloxRng::new(seed);
        for (k, n) in calls(case).into_iter().enumerate() {
            if let Err(e) = check(&rng.randn(n), &case["outputs"][k]) {
                failures.push(format!(
                    "philox seed {seed} calls {} #{k}: {e}",
                    case["calls"]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
