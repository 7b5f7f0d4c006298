//! Prompt emphasis (A1111 "Original") against its f64 reference: random z and weights at awkward
//! sizes (rows not a multiple of anything, C = 1 and odd, more elements than one summing pass
//! covers), both dtypes, NaN-poisoned outputs; and all-ones weights leave z bit-identical.

mod common;

use common::*;
use ldm_wgpu::kernels::{emphasis, fill};

// f32: a product of three roundings and a ratio of two f32 sums over ≤ 200k terms (~1e-7 each,
// growing like √n for tree sums): 1e-5 relative L2. f16: the output rounding (~3e-4 rms) plus
// the f16 input: 1e-3.
const TOL: (f64, f64) = (1e-5, 1e-3);

#[test]
fn emphasis_matches_reference() {
    let mut rng = Rng::new(77);
    let shapes: &[&[usize]] = &[
        &[1, 1],
        &[77, 1],
        &[77, 37],
        &[2, 77, 64],
        &[3, 77, 768],
        &[154, 1027],
    ];
    for dtype in dtypes() {
        for &shape in shapes {
            let n: usize = shape.iter().product();
            let rows = n / shape[shape.len() - 1];
            let (z, zq) = upload(&rng.normals(n, 1.0), shape, dtype);
            // Weights as prompts have them: 1 for most rows, emphasis around 0.5-1.6 elsewhere.
            let weights: Vec<f32> = (0..rows)
                .map(|r| {
                    if r % 3 == 0 {
                        1.0
                    } else {
                        0.5 + 1.1 * rng.uniform() as f32
                    }
                })
                .collect();
            let out = fill::poisoned(gpu(), shape, dtype).unwrap();
            emphasis::emphasis_into(gpu(), &z, &weights, &out).unwrap();
            let got = gpu().download(&out).unwrap();
            let want = emphasis::reference(&zq, &weights, shape[shape.len() - 1]);
            assert_close(
                &format!("emphasis {shape:?} {}", dtype.name()),
                &got,
                &want,
                tol(dtype, TOL.0, TOL.1),
            );
        }
    }
}

#[test]
fn unit_weights_change_nothing() {
    let mut rng = Rng::new(5);
    for dtype in dtypes() {
        let shape = [2, 77, 40];
        let (z, zq) = upload(&rng.normals(2 * 77 * 40, 1.0), &shape, dtype);
        let out = emphasis::emphasis(gpu(), &z, &[1.0; 154]).unwrap();
        assert_eq!(gpu().download(&out).unwrap(), zq, "{}", dtype.name());
    }
}

#[test]
fn wrong_weight_count_is_an_error() {
    let (z, _) = upload(&[0.5; 77 * 8], &[77, 8], ldm_wgpu::DType::F32);
    let err = emphasis::emphasis(gpu(), &z, &[1.0; 76]).unwrap_err();
    assert!(err.to_string().contains("76 weights"), "{err}");
}
