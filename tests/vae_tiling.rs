//! Tiled VAE decode and encode against diffusers' `tiled_decode` / `_tiled_encode`, tiled against
//! untiled, and the automatic choice between them.
//!
//! Fixture: tests/fixtures/vae_tiling/io.safetensors (tools/make_vae_tiling_fixture.py) on the
//! model-parity VAE (tests/fixtures/models/vae: f = 2, sample_size 32), with diffusers' tiling set
//! to 16-px tiles (8 latents) and overlap 0.25, so a 48×40 image is 4×4 overlapping tiles with
//! partial last rows and columns; the "odd" cases (batch 2, 13×19 latents, 26×38 px) add partial
//! tiles that are not the last and 1-latent tiles.
//!
//! Tolerances against diffusers (relative L2): f32 1e-4 and f16 1e-2, as tests/models.rs for the
//! untiled VAE (each tile is an untiled pass on a smaller input; the blend adds two lerps).
//!
//! Tiled vs untiled is *not* close on this fixture, and is not meant to be: every tile
//! normalises (GroupNorm) and attends (mid-block attention) over itself only, and an 8-latent
//! tile of a random-weight VAE sees statistics quite unlike the whole 20×24 latent. diffusers
//! itself measures rel L2 0.44 / PSNR 25.6 dB (decode) and 0.41 / 26.3 dB (encode) here (printed by
//! the fixture tool). The reasoned bound is therefore relative to diffusers: our tiled-vs-untiled
//! PSNR must be within 0.1 dB of diffusers' (both our outputs sit within ~1e-6 of theirs, which
//! moves the PSNR by far less), plus a floor of 20 dB that a misplaced or unblended tile breaks.
//! And with a single tile covering the whole input, tiled must equal untiled exactly.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ldm_wgpu::models::vae::{AutoencoderKL, TileConfig, VaeConfig, VaeTiling};
use ldm_wgpu::weights::{open_component, ComponentKind, LoadOptions, SafetensorsFile};
use ldm_wgpu::{DType, Error, Gpu, GpuOptions, Tensor};

const F32_TOL: f64 = 1e-4;
const F16_TOL: f64 = 1e-2;
/// The fixture's tile: 16 px = 8 latents, diffusers' default overlap.
const TILE: TileConfig = TileConfig {
    tile_sample_size: 16,
    overlap_factor: 0.25,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(dtype: DType) -> AutoencoderKL {
    load_on(gpu(), dtype)
}

fn load_on(g: &Gpu, dtype: DType) -> AutoencoderKL {
    let comp = open_component(
        fixtures().join("models/vae"),
        ComponentKind::Vae,
        &LoadOptions::default(),
    )
    .unwrap();
    let cfg = VaeConfig::from_json(&comp.config).unwrap();
    AutoencoderKL::load(g, &comp.weights.root(), cfg, dtype, true).unwrap()
}

struct Io(SafetensorsFile);

impl Io {
    fn new() -> Self {
        Io(SafetensorsFile::open(fixtures().join("vae_tiling/io.safetensors")).unwrap())
    }
    /// An NCHW fixture tensor as NHWC values and shape.
    fn nhwc(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.0.tensor(name).unwrap();
        let v = t.to_f32_vec();
        let [b, c, h, w] = t.shape[..] else {
            panic!("{name}: {:?} is not NCHW", t.shape)
        };
        let mut out = vec![0.0; v.len()];
        for bi in 0..b {
            for ci in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        out[((bi * h + y) * w + x) * c + ci] = v[((bi * c + ci) * h + y) * w + x];
                    }
                }
            }
        }
        (out, vec![b, h, w, c])
    }
    fn upload(&self, name: &str, dtype: DType) -> Tensor {
        let (v, s) = self.nhwc(name);
        gpu().upload(&v, &s, dtype).unwrap()
    }
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// PSNR of `got` against `want`, with the reference's peak-to-peak range as the signal.
fn psnr(got: &[f32], want: &[f32]) -> f64 {
    let mse = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum::<f64>()
        / got.len() as f64;
    let (lo, hi) = want.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &w| {
        (lo.min(w as f64), hi.max(w as f64))
    });
    10.0 * ((hi - lo).powi(2) / mse).log10()
}

fn check(what: &str, dtype: DType, got: &Tensor, want: &[f32]) {
    let got = gpu().download(got).unwrap();
    let e = rel_l2(&got, &as_f64(want));
    let tol = tol(dtype, F32_TOL, F16_TOL);
    eprintln!(
        "{what} {}: relative L2 {e:.2e} (tolerance {tol:.0e})",
        dtype.name()
    );
    assert!(
        e <= tol,
        "{what} {}: relative L2 error {e:.3e} > tolerance {tol:.1e}",
        dtype.name()
    );
}

#[test]
fn tiled_decode_matches_diffusers() {
    let io = Io::new();
    for dtype in dtypes() {
        let vae = load(dtype);
        for (input, want) in [
            ("latents", "decoded_tiled"),
            ("latents_odd", "decoded_odd_tiled"),
        ] {
            let z = io.upload(input, dtype);
            let out = vae.decode_tiled(gpu(), &z, TILE).unwrap(); // [B, H, W, 3]
            let (want, shape) = io.nhwc(want);
            assert_eq!(out.shape(), &shape[..]);
            check(&format!("tiled decode {input}"), dtype, &out, &want);
        }
    }
}

#[test]
fn tiled_encode_matches_diffusers() {
    let io = Io::new();
    for dtype in dtypes() {
        let vae = load(dtype);
        for (input, want) in [
            ("image", "moments_tiled"),
            ("image_odd", "moments_odd_tiled"),
        ] {
            let x = io.upload(input, dtype);
            let out = vae.encode_moments_tiled(gpu(), &x, TILE).unwrap(); // [B, h, w, 8]
            let (want, shape) = io.nhwc(want);
            assert_eq!(out.shape(), &shape[..]);
            check(&format!("tiled encode {input}"), dtype, &out, &want);
        }
    }
}

#[test]
fn tiled_is_close_to_untiled_as_in_diffusers() {
    let io = Io::new();
    let vae = load(DType::F32);
    let g = gpu();
    let cases = [
        ("decode", "latents", "decoded_tiled", "decoded"),
        ("encode", "image", "moments_tiled", "moments"),
    ];
    for (op, input, theirs_tiled, theirs_untiled) in cases {
        let x = io.upload(input, DType::F32);
        let (tiled, untiled) = if op == "decode" {
            (
                vae.decode_tiled(g, &x, TILE).unwrap(),
                vae.decode(g, &x).unwrap(),
            )
        } else {
            (
                vae.encode_moments_tiled(g, &x, TILE).unwrap(),
                vae.encode_moments(g, &x).unwrap(),
            )
        };
        let (tiled, untiled) = (g.download(&tiled).unwrap(), g.download(&untiled).unwrap());
        let ours = psnr(&tiled, &untiled);
        let theirs = psnr(&io.nhwc(theirs_tiled).0, &io.nhwc(theirs_untiled).0);
        let rel = rel_l2(&tiled, &as_f64(&untiled));
        eprintln!(
            "{op}: tiled vs untiled PSNR {ours:.2} dB, rel L2 {rel:.3} (diffusers: {theirs:.2} dB)"
        );
        assert!(
            (ours - theirs).abs() <= 0.1,
            "{op}: tiled vs untiled PSNR {ours:.2} dB, diffusers {theirs:.2} dB"
        );
        assert!(
            ours >= 20.0,
            "{op}: tiled vs untiled PSNR {ours:.2} dB < 20 dB"
        );
    }
}

#[test]
fn one_tile_equals_untiled() {
    // 6×6 latents with 8-latent tiles every 6: one tile, kept whole (12 px = row_limit).
    let g = gpu();
    let vae = load(DType::F32);
    let mut rng = Rng::new(21);
    let z = g
        .upload(&rng.normals(2 * 6 * 6 * 4, 1.0), &[2, 6, 6, 4], DType::F32)
        .unwrap();
    let tiled = g.download(&vae.decode_tiled(g, &z, TILE).unwrap()).unwrap();
    let untiled = g.download(&vae.decode(g, &z).unwrap()).unwrap();
    assert_close("one-tile decode vs untiled", &tiled, &as_f64(&untiled), 0.0);
    let x = g
        .upload(&rng.normals(12 * 12 * 3, 0.5), &[1, 12, 12, 3], DType::F32)
        .unwrap();
    let tiled = g
        .download(&vae.encode_moments_tiled(g, &x, TILE).unwrap())
        .unwrap();
    let untiled = g.download(&vae.encode_moments(g, &x).unwrap()).unwrap();
    assert_close("one-tile encode vs untiled", &tiled, &as_f64(&untiled), 0.0);
}

#[test]
fn auto_picks_untiled_when_it_fits_and_tiles_under_a_budget() {
    let g = gpu();
    let io = Io::new();
    let mut vae = load(DType::F32);
    let z = io.upload("latents", DType::F32); // [1, 20, 24, 4]
    let default_tile = TileConfig::from_config(&vae.config);
    assert_eq!(
        default_tile,
        TileConfig {
            tile_sample_size: 32,
            overlap_factor: 0.25
        }
    );

    // No budget: the fixture fits any device's bindings, so Auto and Off run untiled; On tiles
    // (diffusers' enable_tiling: the input is larger than one 16-latent tile) but not 6×6.
    assert_eq!(
        vae.plan_decode(g, z.shape(), VaeTiling::Auto).unwrap(),
        None
    );
    assert_eq!(vae.plan_decode(g, z.shape(), VaeTiling::Off).unwrap(), None);
    assert_eq!(
        vae.plan_decode(g, z.shape(), VaeTiling::On).unwrap(),
        Some(default_tile)
    );
    assert_eq!(
        vae.plan_decode(g, &[1, 6, 6, 4], VaeTiling::On).unwrap(),
        None
    );
    let auto = g.download(&vae.decode_auto(g, &z).unwrap()).unwrap();
    let untiled = g.download(&vae.decode(g, &z).unwrap()).unwrap();
    assert_close(
        "decode_auto without a budget",
        &auto,
        &as_f64(&untiled),
        0.0,
    );

    // A budget just under the untiled decode: the default 32-px tiles fit.
    let untiled_bytes = vae.decoder_activation_bytes(g, 1, 20, 24).unwrap();
    vae.memory_budget = Some(untiled_bytes.peak - 1);
    assert_eq!(
        vae.plan_decode(g, z.shape(), VaeTiling::Auto).unwrap(),
        Some(default_tile)
    );

    // Under one 16-latent tile's decode: the tile halves to 16 px, the fixture's setting, so
    // decode_auto reproduces diffusers' tiled_decode.
    vae.memory_budget = Some(vae.decoder_activation_bytes(g, 1, 16, 16).unwrap().peak - 1);
    assert_eq!(
        vae.plan_decode(g, z.shape(), VaeTiling::Auto).unwrap(),
        Some(TILE)
    );
    let auto = vae.decode_auto(g, &z).unwrap();
    check(
        "decode_auto under a budget",
        DType::F32,
        &auto,
        &io.nhwc("decoded_tiled").0,
    );

    // The same for encode (moments under a budget below a 32-px tile's encode).
    let x = io.upload("image", DType::F32); // [1, 40, 48, 3]
    vae.memory_budget = None;
    assert_eq!(
        vae.plan_encode(g, x.shape(), VaeTiling::Auto).unwrap(),
        None
    );
    vae.memory_budget = Some(vae.encoder_activation_bytes(g, 1, 32, 32).unwrap().peak - 1);
    assert_eq!(
        vae.plan_encode(g, x.shape(), VaeTiling::Auto).unwrap(),
        Some(TILE)
    );
    let auto = vae.encode_moments_auto(g, &x).unwrap();
    check(
        "encode_moments_auto under a budget",
        DType::F32,
        &auto,
        &io.nhwc("moments_tiled").0,
    );

    // A budget no tile fits: LimitExceeded, from the automatic path and from an explicit tile.
    vae.memory_budget = Some(1024);
    for r in [
        vae.decode_auto(g, &z),
        vae.decode_tiled(g, &z, TILE),
        vae.encode_moments_auto(g, &x),
    ] {
        match r {
            Err(Error::LimitExceeded { limit, .. }) => assert_eq!(limit, 1024),
            Err(e) => panic!("wrong error under a 1 KiB budget: {e}"),
            Ok(_) => panic!("a 1 KiB budget was accepted"),
        }
    }
    // Off ignores the budget (the user asked for an untiled pass).
    assert_eq!(vae.plan_decode(g, z.shape(), VaeTiling::Off).unwrap(), None);
}

/// The planner's numbers come from a dry run of the same code: they must equal what the real
/// pass allocates, tensor for tensor (peak live bytes above what was alive before, and the
/// largest buffer), for decode, encode and a tiled decode, in both dtypes.
#[test]
fn dry_run_measures_what_the_real_pass_allocates() {
    // An engine of its own: the shared one's pool also holds the tensors of tests running beside.
    let own = Gpu::new(&GpuOptions::from_env().unwrap()).unwrap();
    let g = &own;
    for dtype in [DType::F32, DType::F16] {
        let vae = load_on(g, dtype);
        let real = |input: &Tensor, pass: &dyn Fn(&Tensor) -> Tensor| {
            g.trim_pool();
            let before = g.begin_peak_window();
            let out = pass(input);
            g.wait().unwrap();
            drop(out);
            let stats = g.pool_stats();
            // The dry run counts its own input as alive throughout; so does this.
            (
                stats.peak_live_bytes - before + input_bytes(input),
                stats.largest_buffer,
            )
        };
        let z = g
            .upload(&vec![0.5; 20 * 24 * 4], &[1, 20, 24, 4], dtype)
            .unwrap();
        let x = g
            .upload(&vec![0.1; 40 * 48 * 3], &[1, 40, 48, 3], dtype)
            .unwrap();
        let dec = vae.decoder_activation_bytes(g, 1, 20, 24).unwrap();
        let (peak, largest) = real(&z, &|z| vae.decode(g, z).unwrap());
        assert_eq!((dec.peak, dec.largest), (peak, largest), "{dtype:?} decode");
        let enc = vae.encoder_activation_bytes(g, 1, 40, 48).unwrap();
        let (peak, largest) = real(&x, &|x| vae.encode_moments(g, x).unwrap());
        assert_eq!((enc.peak, enc.largest), (peak, largest), "{dtype:?} encode");
        // Plausibility of what was measured: the decoder's full-resolution activations
        // [1, 40, 48, 32] (2× block_out_channels[0]) are its largest tensors, and more than two
        // of them are alive at once (a resnet's input, its norm and conv outputs).
        let full = (40 * 48 * 32 * dtype.size()) as u64;
        assert!(
            dec.largest == full && dec.peak > 2 * full,
            "{dtype:?} {dec:?}"
        );
        // Linear in the batch (sizes here are multiples of the 256-byte granule).
        let dec2 = vae.decoder_activation_bytes(g, 2, 20, 24).unwrap();
        assert_eq!(dec2.peak, 2 * dec.peak, "{dtype:?}");
    }
    // The dry run leaves the real engine's pool as it was, and runs no kernel on it.
    let vae = load_on(g, DType::F32);
    g.wait().unwrap();
    let before = (g.pool_stats(), g.stats().dispatches);
    vae.decoder_activation_bytes(g, 1, 20, 24).unwrap();
    assert_eq!((g.pool_stats(), g.stats().dispatches), before);
}

fn input_bytes(t: &Tensor) -> u64 {
    t.size_bytes().div_ceil(256) * 256
}

#[test]
fn tile_settings_are_validated() {
    let g = gpu();
    let vae = load(DType::F32);
    let z = g.empty(&[1, 20, 24, 4], DType::F32).unwrap();
    // 15 px is not a multiple of f = 2; 20 px (10 latents) with overlap 0.25 steps 7 latents
    // = 14 px but keeps 15 px: diffusers would duplicate a column per tile.
    for ts in [15, 20] {
        let tile = TileConfig {
            tile_sample_size: ts,
            overlap_factor: 0.25,
        };
        assert!(
            matches!(vae.decode_tiled(g, &z, tile), Err(Error::InvalidInput(_))),
            "{ts} px"
        );
    }
    let tile = TileConfig {
        tile_sample_size: 16,
        overlap_factor: 1.0,
    };
    assert!(matches!(
        vae.decode_tiled(g, &z, tile),
        Err(Error::InvalidInput(_))
    ));
    assert_eq!("on".parse::<VaeTiling>().unwrap(), VaeTiling::On);
    assert!("sometimes".parse::<VaeTiling>().is_err());
}
