//! `tiling.wgsl` against its f64 references: window crops and tile blends at awkward sizes (one
//! pixel, C = 1, 3, 4, windows touching every edge, tiles smaller than the blend extent, partial
//! neighbours), a tiled SD latent shape, both dtypes, NaN-poisoned outputs. The blend tests also
//! check that nothing outside the kept window is written, and a chain of tiles checks that later
//! tiles blend against their neighbours' *blended* values, as diffusers' in-place loop does.
//!
//! Tolerances: crop moves values (exact, 0 in both dtypes); blend is two lerps in f32 and one
//! store: f32 1e-6 (a few roundings of O(1) values), f16 1e-3 (one rounding to 11 bits, ≤ 2^-11
//! relative, plus the f32 lerp noise).

mod common;

use common::*;
use ldm_wgpu::kernels::{fill, tiling};
use ldm_wgpu::{DType, Error, Tensor};

const BLEND_TOL: (f64, f64) = (1e-6, 1e-3);

fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    fill::poisoned(gpu(), shape, dtype).unwrap()
}

fn dims(shape: &[usize]) -> [usize; 4] {
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Like `assert_close`, but `want` may hold NaN where the output must stay unwritten (poisoned).
fn check_poisoned(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut written_got = Vec::new();
    let mut written_want = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(
                g.is_nan(),
                "{what}: element {i} outside the kept window was written ({g})"
            );
        } else {
            written_got.push(g);
            written_want.push(w);
        }
    }
    assert_close(what, &written_got, &written_want, tol);
}

#[test]
fn crop_matches_reference() {
    let mut rng = Rng::new(11);
    // (input shape, y0, x0, h, w)
    let cases: &[([usize; 4], usize, usize, usize, usize)] = &[
        ([1, 1, 1, 1], 0, 0, 1, 1),
        ([1, 5, 7, 3], 0, 0, 5, 7),
        ([2, 13, 17, 3], 5, 7, 4, 9),
        ([2, 13, 17, 1], 12, 16, 1, 1),
        ([1, 20, 24, 4], 18, 18, 2, 6),
        ([3, 9, 11, 8], 2, 0, 7, 11),
        ([1, 40, 48, 3], 36, 24, 4, 16),
        // SD 1.5 at 1024² tiled with diffusers' defaults: 64-latent tiles every 48.
        ([1, 128, 128, 4], 48, 96, 64, 32),
    ];
    for dtype in dtypes() {
        for &(shape, y0, x0, h, w) in cases {
            let n: usize = shape.iter().product();
            let (x, xq) = upload(&rng.normals(n, 1.0), &shape, dtype);
            let out = poisoned(&[shape[0], h, w, shape[3]], dtype);
            tiling::crop_into(gpu(), &x, y0, x0, &out).unwrap();
            let want = tiling::reference_crop(&xq, shape, y0, x0, h, w);
            let got = gpu().download(&out).unwrap();
            assert_close(
                &format!("crop {shape:?} at ({y0}, {x0}) {h}×{w} {}", dtype.name()),
                &got,
                &want,
                0.0,
            );
        }
    }
}

#[test]
fn crop_refuses_windows_outside_the_input() {
    let x = gpu().empty(&[1, 8, 8, 4], DType::F32).unwrap();
    assert!(matches!(
        tiling::crop(gpu(), &x, 4, 0, 5, 8),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        tiling::crop(gpu(), &x, 0, 7, 1, 2),
        Err(Error::Shape { .. })
    ));
}

/// One blend case: tile, optional neighbours (as (rows, cols) of the tensors), extent, row_limit,
/// output size and origin.
struct BlendCase {
    batch: usize,
    c: usize,
    tile: (usize, usize),
    above_rows: Option<usize>,
    left_cols: Option<usize>,
    blend_extent: usize,
    row_limit: usize,
    out: (usize, usize),
    origin: [usize; 2],
}

#[test]
fn blend_tile_matches_reference() {
    let cases = [
        // the first tile: no neighbours, kept window only
        BlendCase {
            batch: 1,
            c: 3,
            tile: (16, 16),
            above_rows: None,
            left_cols: None,
            blend_extent: 4,
            row_limit: 12,
            out: (40, 48),
            origin: [0, 0],
        },
        // one pixel, one channel
        BlendCase {
            batch: 1,
            c: 1,
            tile: (1, 1),
            above_rows: Some(1),
            left_cols: Some(1),
            blend_extent: 4,
            row_limit: 12,
            out: (1, 1),
            origin: [0, 0],
        },
        // above only, full tiles
        BlendCase {
            batch: 2,
            c: 3,
            tile: (16, 16),
            above_rows: Some(16),
            left_cols: None,
            blend_extent: 4,
            row_limit: 12,
            out: (40, 48),
            origin: [12, 0],
        },
        // left only, C = 4 (latents)
        BlendCase {
            batch: 1,
            c: 4,
            tile: (8, 8),
            above_rows: None,
            left_cols: Some(8),
            blend_extent: 2,
            row_limit: 6,
            out: (20, 24),
            origin: [0, 6],
        },
        // both, last row and column partial (4 × 12 px)
        BlendCase {
            batch: 1,
            c: 3,
            tile: (4, 12),
            above_rows: Some(16),
            left_cols: Some(16),
            blend_extent: 4,
            row_limit: 12,
            out: (40, 48),
            origin: [36, 36],
        },
        // a 2-px tile under a 14-px partial neighbour: extent clamps to 2, reads rows 12..14
        BlendCase {
            batch: 2,
            c: 3,
            tile: (2, 14),
            above_rows: Some(14),
            left_cols: Some(16),
            blend_extent: 4,
            row_limit: 12,
            out: (26, 38),
            origin: [24, 24],
        },
        // blend extent larger than both tiles; no overlap at all (extent 0)
        BlendCase {
            batch: 1,
            c: 8,
            tile: (3, 5),
            above_rows: Some(2),
            left_cols: Some(3),
            blend_extent: 7,
            row_limit: 4,
            out: (9, 9),
            origin: [5, 5],
        },
        BlendCase {
            batch: 1,
            c: 3,
            tile: (6, 6),
            above_rows: Some(6),
            left_cols: Some(6),
            blend_extent: 0,
            row_limit: 6,
            out: (12, 12),
            origin: [6, 6],
        },
        // SD 1.5 decode tile with diffusers' defaults: 512 px, blend 128, keep 384
        BlendCase {
            batch: 1,
            c: 3,
            tile: (512, 512),
            above_rows: Some(512),
            left_cols: Some(512),
            blend_extent: 128,
            row_limit: 384,
            out: (1024, 1024),
            origin: [384, 384],
        },
    ];
    let mut rng = Rng::new(12);
    for dtype in dtypes() {
        for case in &cases {
            let (b, c) = (case.batch, case.c);
            let (th, tw) = case.tile;
            let tile_shape = [b, th, tw, c];
            let (tile, tile_q) = upload(&rng.normals(b * th * tw * c, 1.0), &tile_shape, dtype);
            let above = case.above_rows.map(|ah| {
                let s = [b, ah, tw, c];
                let (t, q) = upload(&rng.normals(b * ah * tw * c, 1.0), &s, dtype);
                (t, q, s)
            });
            let left = case.left_cols.map(|lw| {
                let s = [b, th, lw, c];
                let (t, q) = upload(&rng.normals(b * th * lw * c, 1.0), &s, dtype);
                (t, q, s)
            });
            let out_shape = [b, case.out.0, case.out.1, c];
            let out = poisoned(&out_shape, dtype);
            let blend = tiling::TileBlend {
                above: above.as_ref().map(|a| &a.0),
                left: left.as_ref().map(|l| &l.0),
                blend_extent: case.blend_extent,
                row_limit: case.row_limit,
                origin: case.origin,
            };
            tiling::blend_tile_into(gpu(), &tile, &blend, &out).unwrap();

            let mut want_out = vec![f64::NAN; out_shape.iter().product()];
            let want_tile = tiling::reference_blend_tile(
                (&tile_q, tile_shape),
                above.as_ref().map(|a| (&a.1[..], a.2)),
                left.as_ref().map(|l| (&l.1[..], l.2)),
                (case.blend_extent, case.row_limit),
                case.origin,
                (&mut want_out, out_shape),
            );
            let tol = tol(dtype, BLEND_TOL.0, BLEND_TOL.1);
            let what = format!(
                "blend tile {tile_shape:?} above {:?} left {:?} extent {} {}",
                case.above_rows,
                case.left_cols,
                case.blend_extent,
                dtype.name()
            );
            assert_close(
                &format!("{what}: tile"),
                &gpu().download(&tile).unwrap(),
                &want_tile,
                tol,
            );
            check_poisoned(
                &format!("{what}: out"),
                &gpu().download(&out).unwrap(),
                &want_out,
                tol,
            );
        }
    }
}

/// A whole assembly, diffusers' loop with random tiles: 48×40 px from 16-px tiles every 12 px
/// (the last row 4 px, the last column 12 px), batch 2. Every output element is written once
/// (no NaN survives) and each tile blends against its neighbours' blended values.
#[test]
fn tile_chain_assembles_like_diffusers() {
    let (b, c, tile, stride, blend_extent, row_limit) = (2, 3, 16, 12, 4, 12);
    let (h, w) = (40, 48);
    let starts = |n: usize| {
        (0..n)
            .step_by(stride)
            .map(|s| (s, tile.min(n - s)))
            .collect::<Vec<_>>()
    };
    let mut rng = Rng::new(13);
    for dtype in dtypes() {
        let out_shape = [b, h, w, c];
        let out = poisoned(&out_shape, dtype);
        let mut want_out = vec![f64::NAN; b * h * w * c];
        // (GPU tile, CPU blended values, shape) of the previous row and of this row so far
        let mut above_row: Vec<(Tensor, Vec<f32>, [usize; 4])> = Vec::new();
        for &(y0, th) in &starts(h) {
            let mut row: Vec<(Tensor, Vec<f32>, [usize; 4])> = Vec::new();
            for (j, &(x0, tw)) in starts(w).iter().enumerate() {
                let s = [b, th, tw, c];
                let (t, q) = upload(&rng.normals(b * th * tw * c, 1.0), &s, dtype);
                let origin = [y0 / stride * row_limit, x0 / stride * row_limit];
                let blended = tiling::reference_blend_tile(
                    (&q, s),
                    above_row.get(j).map(|a| (&a.1[..], a.2)),
                    row.last().map(|l| (&l.1[..], l.2)),
                    (blend_extent, row_limit),
                    origin,
                    (&mut want_out, out_shape),
                );
                let blend = tiling::TileBlend {
                    above: above_row.get(j).map(|a| &a.0),
                    left: row.last().map(|l| &l.0),
                    blend_extent,
                    row_limit,
                    origin,
                };
                tiling::blend_tile_into(gpu(), &t, &blend, &out).unwrap();
                // The next tiles see the f64 reference's blended values rounded as stored.
                let stored: Vec<f32> = blended.iter().map(|&v| v as f32).collect();
                row.push((t, quantize(&stored, dtype), s));
            }
            above_row = row;
        }
        assert!(
            want_out.iter().all(|v| !v.is_nan()),
            "the reference leaves holes"
        );
        let got = gpu().download(&out).unwrap();
        let tol = tol(dtype, BLEND_TOL.0, 2.0 * BLEND_TOL.1);
        assert_close(
            &format!("tile chain {out_shape:?} {}", dtype.name()),
            &got,
            &want_out,
            tol,
        );
    }
}

#[test]
fn blend_refuses_aliasing_and_misfits() {
    let g = gpu();
    let tile = g.empty(&[1, 4, 4, 3], DType::F32).unwrap();
    let out = g.empty(&[1, 8, 8, 3], DType::F32).unwrap();
    let base = tiling::TileBlend {
        above: None,
        left: None,
        blend_extent: 2,
        row_limit: 4,
        origin: [0, 0],
    };
    // the output is the tile
    assert!(matches!(
        tiling::blend_tile_into(g, &tile, &base, &tile),
        Err(Error::Shape { .. })
    ));
    // the neighbour is the tile
    let aliased = tiling::TileBlend {
        above: Some(&tile),
        ..base
    };
    assert!(matches!(
        tiling::blend_tile_into(g, &tile, &aliased, &out),
        Err(Error::Shape { .. })
    ));
    // the kept window runs past the output
    let off = tiling::TileBlend {
        origin: [6, 0],
        ..base
    };
    assert!(matches!(
        tiling::blend_tile_into(g, &tile, &off, &out),
        Err(Error::Shape { .. })
    ));
    // a neighbour above of another width
    let wide = g.empty(&[1, 4, 5, 3], DType::F32).unwrap();
    let bad = tiling::TileBlend {
        above: Some(&wide),
        ..base
    };
    assert!(matches!(
        tiling::blend_tile_into(g, &tile, &bad, &out),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn reference_crop_is_the_slice() {
    // [1, 2, 3, 1]: rows [0 1 2], [3 4 5]; the window at (1, 1) of 1×2 is [4 5].
    let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
    assert_eq!(
        tiling::reference_crop(&x, dims(&[1, 2, 3, 1]), 1, 1, 1, 2),
        vec![4.0, 5.0]
    );
}
