//! The tiny autoencoder (diffusers `AutoencoderTiny`) against diffusers on CPU: a small config from
//! a diffusers folder and the real TAESD architecture from the original two-file layout, decoder
//! and encoder, f32 and f16. Fixtures: tools/make_taesd_fixtures.py.

mod common;

use ldm_wgpu::models::taesd::AutoencoderTiny;
use ldm_wgpu::weights::SafetensorsFile;
use ldm_wgpu::DType;

fn fixtures(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/taesd")
        .join(name)
}

/// NCHW → NHWC on the host (layout only).
fn nhwc(x: &[f32], shape: &[usize]) -> Vec<f32> {
    let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let mut out = vec![0.0; x.len()];
    for n in 0..b {
        for ch in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    out[((n * h + y) * w + xx) * c + ch] = x[((n * c + ch) * h + y) * w + xx];
                }
            }
        }
    }
    out
}

fn check(name: &str) {
    let gpu = common::gpu();
    let io = SafetensorsFile::open(fixtures(name).join("io.safetensors")).unwrap();
    let tensor = |k: &str| {
        let t = io.tensor(k).unwrap();
        let s = t.shape.clone();
        (nhwc(&t.to_f32_vec(), &s), vec![s[0], s[2], s[3], s[1]])
    };
    for dtype in common::dtypes() {
        let model = AutoencoderTiny::open(gpu, &fixtures(name), dtype).unwrap();
        // ~30 convs deep on random weights: f32 summation order (~1e-6 measured), f16 storage of
        // every activation (~7e-4 measured).
        let tol = common::tol(dtype, 1e-5, 3e-3);
        for (input, output, decode) in [("latents", "decoded", true), ("image", "encoded", false)] {
            let (x, shape) = tensor(input);
            let (want, want_shape) = tensor(output);
            let x = gpu.upload(&x, &shape, dtype).unwrap();
            let y = if decode {
                model.decode(gpu, &x)
            } else {
                model.encode(gpu, &x)
            }
            .unwrap();
            assert_eq!(y.shape(), want_shape.as_slice(), "{name} {output}");
            let got = gpu.download(&y).unwrap();
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let err = common::rel_l2(&got, &want64);
            eprintln!("{name} {output} {}: rel-L2 {err:.2e}", dtype.name());
            common::assert_close(
                &format!("{name} {output} {}", dtype.name()),
                &got,
                &want64,
                tol,
            );
        }
    }
}

#[test]
fn tiny_config_from_a_diffusers_folder() {
    check("tiny");
}

#[test]
fn real_architecture_from_the_original_files() {
    check("real");
}

#[test]
fn a_folder_without_taesd_is_an_error() {
    let gpu = common::gpu();
    let err = AutoencoderTiny::open(gpu, &fixtures("does-not-exist"), DType::F32)
        .err()
        .unwrap();
    assert!(err.to_string().contains("AutoencoderTiny"), "{err}");
}

/// `--vae-decoder`: the pipeline decodes its final latents with the tiny autoencoder (the same
/// image as decoding them directly), and one made for another latent space is refused.
#[test]
fn pipeline_decodes_with_a_tiny_autoencoder() {
    use ldm_wgpu::image::Image;
    use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
    use ldm_wgpu::{Gpu, GpuOptions};
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    let mut sd = StableDiffusion::load(gpu, &default_model_dir(), &options).unwrap();
    let wrong = AutoencoderTiny::open(&sd.gpu, &fixtures("real"), DType::F32).unwrap();
    let err = sd.set_tiny_decoder(Some(wrong)).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    let tiny = AutoencoderTiny::open(&sd.gpu, &fixtures("tiny_f4"), DType::F32).unwrap();
    sd.set_tiny_decoder(Some(tiny)).unwrap();
    let req = GenerateRequest {
        prompt: "a blue circle".into(),
        width: 64,
        height: 64,
        steps: 3,
        seed: 3,
        ..Default::default()
    };
    let out = sd.generate(&req, &mut |_| true).unwrap();
    assert_eq!((out.images[0].width, out.images[0].height), (64, 64));
    let direct = AutoencoderTiny::open(&sd.gpu, &fixtures("tiny_f4"), DType::F32).unwrap();
    let z = sd
        .gpu
        .upload(&out.latents, &[1, 16, 16, 4], DType::F32)
        .unwrap();
    let img = direct.decode(&sd.gpu, &z).unwrap();
    let want = Image::from_model_output(&sd.gpu.download(&img).unwrap(), 64, 64).unwrap();
    assert_eq!(out.images[0], want);
}

/// The CLI's live preview through TAESD (`--preview-vae`, here in f16 as the CLI defaults to on
/// f16 adapters while the sampler keeps f32 latents) and its final decode (`--vae-decoder`).
#[test]
fn cli_previews_and_decodes_with_taesd() {
    let dir = std::env::temp_dir().join(format!("ldm-taesd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = fixtures("tiny_f4");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "generate",
            "-q",
            "-p",
            "a blue circle",
            "--seed",
            "1",
            "-W",
            "64",
            "-H",
            "64",
        ])
        .args(["--steps", "3", "-o"])
        .arg(dir.join("out.png"))
        .arg("--preview")
        .arg(dir.join("preview.png"))
        .arg("--preview-vae")
        .arg(&tiny)
        .arg("--vae-decoder")
        .arg(&tiny)
        .env("XDG_CACHE_HOME", &dir)
        .status()
        .expect("run ldm");
    assert!(status.success());
    for name in ["out.png", "preview.png"] {
        let img = ldm_wgpu::image::Image::load_png(&dir.join(name)).unwrap();
        assert_eq!((img.width, img.height), (64, 64), "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--vae DIR`: an AutoencoderKL folder replaces the model's VAE (the model's own VAE given this
/// way changes nothing), an AutoencoderTiny folder acts as `--vae-decoder`, and a path that is
/// not a folder is refused before anything loads.
#[test]
fn cli_vae_flag_takes_either_autoencoder() {
    let dir = std::env::temp_dir().join(format!("ldm-vae-flag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, extra: &[&std::ffi::OsStr]| {
        let out = dir.join(name);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
            .args(["generate", "-q", "-p", "a blue circle", "--seed", "2"])
            .args(["-W", "64", "-H", "64", "--steps", "2", "-o"])
            .arg(&out)
            .args(extra)
            .env("XDG_CACHE_HOME", &dir)
            .output()
            .expect("run ldm");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        ldm_wgpu::image::Image::load_png(&out).unwrap().rgb
    };
    let own_vae = ldm_wgpu::pipeline::default_model_dir().join("vae");
    let tiny = fixtures("tiny_f4");
    let plain = run("plain.png", &[]);
    let with_own = run("own.png", &["--vae".as_ref(), own_vae.as_os_str()]);
    assert!(
        plain == with_own,
        "the model's own VAE given with --vae changed the image"
    );
    let decoder = run("dec.png", &["--vae-decoder".as_ref(), tiny.as_os_str()]);
    let via_vae = run("tiny.png", &["--vae".as_ref(), tiny.as_os_str()]);
    assert!(decoder == via_vae, "--vae with TAESD is not --vae-decoder");
    assert!(decoder != plain);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["generate", "-p", "x", "--vae", "/no/such/vae"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a directory"));
    std::fs::remove_dir_all(&dir).ok();
}
