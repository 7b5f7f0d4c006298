//! `shaders/attention.wgsl` and, where the tensor-core path is on (f16, `coop::coop_plan`),
//! `shaders/attention_coop.wgsl` against the naive f64 reference
//! (`kernels::attention::reference`). Every f16 case below runs on whichever kernel the adapter
//! gets; the log line names it. CI's cooperative-matrix lavapipe run (`LDM_COOP_MATMUL=1`) puts
//! the f16 cases on the tensor-core kernel with 8×8 fragments.
//!
//! Tolerances (relative L2): f32 1e-5 — scores, softmax and P·V are all f32 on the GPU, the only
//! differences from the f64 reference are rounding and accumulation order (measured ~1e-7..1e-6);
//! f16 2e-3 — inputs are the same f16 values on both sides, the output is rounded to f16 (2^-11
//! relative); the FMA kernel stores nothing else in f16, the tensor-core kernel also rounds the
//! softmax numerators P to f16 for the P·V product (normalised by the sum of the rounded values,
//! so only their ratios are perturbed: measured at most 2.8e-4 on lavapipe's 8×8 path, against
//! ~2.1e-4 for the FMA kernel, whose error is the output rounding alone).

mod common;

use common::{dtypes, gpu, rel_l2, tol, upload, Rng};
use ldm_wgpu::kernels::attention::{
    self, config, coop_choice, coop_config, Config, CoopConfig, HeadsView,
};
use ldm_wgpu::kernels::coop::{self, CoopPlan};
use ldm_wgpu::kernels::fill::poisoned;
use ldm_wgpu::kernels::sd15::ATTENTION;
use ldm_wgpu::DType;

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    nq: usize,
    nk: usize,
    d: usize,
    causal: bool,
    scale: Option<f32>,
    /// q, k and v as slices of one [B, N, 3C + pad] tensor (self-attention only).
    fused: bool,
    /// Extra columns per row around the heads (views with offset > 0 and row_stride > C).
    pad: usize,
    /// Standard deviation of q and k (larger = peakier softmax).
    spread: f64,
}

impl Case {
    fn new(batch: usize, heads: usize, nq: usize, nk: usize, d: usize) -> Self {
        Case {
            batch,
            heads,
            nq,
            nk,
            d,
            causal: false,
            scale: None,
            fused: false,
            pad: 0,
            spread: 1.0,
        }
    }
}

/// Run one case in `dtype` (on the tensor-core kernel with tile shape `coop` if given, else on
/// the kernel `attention_into` picks); returns the relative L2 error against the reference.
fn run(case: Case, dtype: DType, seed: u64) -> f64 {
    run_on(case, dtype, seed, None)
}

fn run_on(case: Case, dtype: DType, seed: u64, coop: Option<CoopConfig>) -> f64 {
    let g = gpu();
    let mut rng = Rng::new(seed);
    let Case {
        batch,
        heads,
        nq,
        nk,
        d,
        causal,
        scale,
        fused,
        pad,
        spread,
    } = case;
    let c = heads * d;
    // Views: (data, tokens, row_stride, offset).
    let (out, want) = if fused {
        assert_eq!(nq, nk);
        let stride = 3 * c + 2 * pad;
        let mut data = rng.normals(batch * nq * stride, spread);
        // v columns at unit scale.
        for row in data.chunks_mut(stride) {
            for x in &mut row[pad + 2 * c..pad + 3 * c] {
                *x = (*x as f64 / spread) as f32;
            }
        }
        let (t, data) = upload(&data, &[batch, nq, stride], dtype);
        let view = |offset| HeadsView {
            tensor: &t,
            tokens: nq,
            row_stride: stride,
            offset,
        };
        let out = poisoned(g, &[batch, nq, c], dtype).unwrap();
        let qkv = (view(pad), view(pad + c), view(pad + 2 * c));
        launch(qkv, (batch, heads, d, causal, scale), &out, coop);
        let want = attention::Sdpa {
            q: attention::HostHeads {
                data: &data,
                tokens: nq,
                row_stride: stride,
                offset: pad,
            },
            k: attention::HostHeads {
                data: &data,
                tokens: nk,
                row_stride: stride,
                offset: pad + c,
            },
            v: attention::HostHeads {
                data: &data,
                tokens: nk,
                row_stride: stride,
                offset: pad + 2 * c,
            },
            batch,
            heads,
            head_dim: d,
            causal,
            scale,
        }
        .reference();
        (out, want)
    } else {
        let stride = c + pad;
        let off = pad / 2;
        let (qt, qd) = upload(
            &rng.normals(batch * nq * stride, spread),
            &[batch, nq, stride],
            dtype,
        );
        let (kt, kd) = upload(
            &rng.normals(batch * nk * stride, spread),
            &[batch, nk, stride],
            dtype,
        );
        let (vt, vd) = upload(
            &rng.normals(batch * nk * stride, 1.0),
            &[batch, nk, stride],
            dtype,
        );
        let out = poisoned(g, &[batch, nq, c], dtype).unwrap();
        let view = |t, tokens| HeadsView {
            tensor: t,
            tokens,
            row_stride: stride,
            offset: off,
        };
        let qkv = (view(&qt, nq), view(&kt, nk), view(&vt, nk));
        launch(qkv, (batch, heads, d, causal, scale), &out, coop);
        let want = attention::Sdpa {
            q: attention::HostHeads {
                data: &qd,
                tokens: nq,
                row_stride: stride,
                offset: off,
            },
            k: attention::HostHeads {
                data: &kd,
                tokens: nk,
                row_stride: stride,
                offset: off,
            },
            v: attention::HostHeads {
                data: &vd,
                tokens: nk,
                row_stride: stride,
                offset: off,
            },
            batch,
            heads,
            head_dim: d,
            causal,
            scale,
        }
        .reference();
        (out, want)
    };
    let got = g.download(&out).unwrap();
    rel_l2(&got, &want)
}

type Qkv<'a> = (HeadsView<'a>, HeadsView<'a>, HeadsView<'a>);

fn launch(
    (q, k, v): Qkv,
    (batch, heads, d, causal, scale): (usize, usize, usize, bool, Option<f32>),
    out: &ldm_wgpu::Tensor,
    coop: Option<CoopConfig>,
) {
    let g = gpu();
    match coop {
        None => attention::Sdpa {
            q,
            k,
            v,
            batch,
            heads,
            head_dim: d,
            causal,
            scale,
        }
        .run_into(g, out),
        Some(cfg) => attention::Sdpa {
            q,
            k,
            v,
            batch,
            heads,
            head_dim: d,
            causal,
            scale,
        }
        .run_coop_into_with(g, out, cfg),
    }
    .unwrap();
}

/// Which kernel `attention_into` runs for this dtype and head dim, for the log.
fn kernel_name(dtype: DType, d: usize) -> String {
    match coop_choice(gpu(), dtype, d) {
        Some((plan, cfg)) => format!(
            "coop{0}x{0} {1}x{2}",
            plan.frag,
            cfg.block_rows(plan),
            cfg.block_keys(plan)
        ),
        None => "fma".into(),
    }
}

fn check(what: &str, case: Case, seed: u64) {
    for dtype in dtypes() {
        let t0 = std::time::Instant::now();
        let e = run(case, dtype, seed);
        eprintln!(
            "{what} {:?} {} [{}]: rel L2 {e:.2e} ({:.2?})",
            case,
            dtype.name(),
            kernel_name(dtype, case.d),
            t0.elapsed()
        );
        let limit = tol(dtype, 1e-5, 2e-3);
        assert!(
            e <= limit,
            "{what} {case:?} {}: relative L2 error {e:.3e} > tolerance {limit:.1e}",
            dtype.name()
        );
    }
}

#[test]
fn awkward_sizes() {
    let cases = [
        ("Nq=1 Nk=1", Case::new(1, 1, 1, 1, 8)),
        ("Nq=1", Case::new(1, 2, 1, 77, 40)),
        ("Nk=1", Case::new(2, 2, 37, 1, 40)),
        ("cross 37x77", Case::new(2, 8, 37, 77, 40)),
        ("cross 37x77 d80", Case::new(1, 2, 37, 77, 80)),
        ("cross 37x77 d160", Case::new(1, 2, 37, 77, 160)),
        ("d1", Case::new(1, 3, 29, 70, 1)),
        ("d3", Case::new(2, 1, 33, 65, 3)),
        ("d8", Case::new(1, 8, 40, 129, 8)),
        ("d32", Case::new(1, 2, 100, 100, 32)),
        ("d64", Case::new(2, 2, 71, 131, 64)),
        ("d13 heads 5", Case::new(1, 5, 19, 45, 13)),
        ("d200", Case::new(1, 1, 21, 40, 200)),
        ("d256", Case::new(1, 1, 9, 17, 256)),
        ("Nk multiple of tile", Case::new(1, 1, 64, 128, 40)),
    ];
    for (i, (what, case)) in cases.into_iter().enumerate() {
        check(what, case, 100 + i as u64);
    }
}

#[test]
fn views_scale_and_causal() {
    let mut fused = Case::new(2, 2, 45, 45, 40);
    fused.fused = true;
    fused.pad = 3;
    check("fused qkv with offsets", fused, 1);

    let mut padded = Case::new(1, 2, 50, 77, 24);
    padded.pad = 6;
    check("strided views", padded, 2);

    let mut scaled = Case::new(1, 2, 33, 90, 64);
    scaled.scale = Some(1.0); // scores with std 8: a peaky softmax
    check("scale 1.0", scaled, 3);

    let mut peaky = Case::new(1, 1, 20, 300, 16);
    peaky.spread = 3.0;
    check("peaky default scale", peaky, 4);

    // CLIP text encoder: 77 tokens, causal, fused QKV (CLIP-L: 12 heads of 64; fewer here).
    let mut clip = Case::new(1, 2, 77, 77, 64);
    clip.causal = true;
    check("causal 77 d64", clip, 5);
    clip.fused = true;
    clip.batch = 2;
    check("causal 77 d64 fused", clip, 6);
    let mut causal_rect = Case::new(1, 1, 50, 90, 8);
    causal_rect.causal = true;
    check("causal Nq<Nk (top-left)", causal_rect, 7);
    let mut causal_big = Case::new(1, 1, 200, 200, 40);
    causal_big.causal = true;
    check("causal 200 d40", causal_big, 8);
}

/// Real SD 1.5 512×512 shapes. lavapipe on 2 cores is slow (and the f64 reference is too), so
/// the 64×64 self-attention runs with one head of one batch, 32×32 in full (batch 2, 8 heads).
#[test]
fn sd15_shapes() {
    let big = ATTENTION[0];
    assert_eq!((big.3, big.5), (4096, 40));
    let mut cases = vec![
        (
            "self 64x64 (1 head, batch 1)",
            Case::new(1, 1, 4096, 4096, 40),
        ),
        ("self 32x32", Case::new(2, 8, 1024, 1024, 80)),
    ];
    for &(name, batch, heads, nq, nk, d) in &ATTENTION[1..] {
        if name.starts_with("self 32") {
            continue;
        }
        // Cross-attention at 64×64 with 2 heads: same per-head work as the real call.
        let heads = if nq == 4096 { 2 } else { heads };
        cases.push((name, Case::new(batch, heads, nq, nk, d)));
    }
    for (i, (what, case)) in cases.into_iter().enumerate() {
        if case.nq * case.nk * case.heads * case.batch >= 1 << 24 {
            // One dtype for the two biggest keeps the file under two minutes on lavapipe: f32 for
            // 64×64 (the long softmax), f16 (the dtype the models run in) for 32×32.
            let dtype = if case.nq == 4096 {
                DType::F32
            } else {
                *dtypes().last().unwrap()
            };
            let t0 = std::time::Instant::now();
            let e = run(case, dtype, 200 + i as u64);
            eprintln!(
                "{what} {case:?} {} [{}]: rel L2 {e:.2e} ({:.2?})",
                dtype.name(),
                kernel_name(dtype, case.d),
                t0.elapsed()
            );
            assert!(
                e <= tol(dtype, 1e-5, 2e-3),
                "{what} {}: {e:.3e}",
                dtype.name()
            );
        } else {
            check(what, case, 200 + i as u64);
        }
    }
}

#[test]
fn every_head_dim_has_a_config() {
    for d in 1..=attention::MAX_HEAD_DIM {
        for limit in [32 * 1024u64, 48 * 1024, 64 * 1024] {
            let c = config(d, limit)
                .unwrap_or_else(|| panic!("no config for d={d} within {limit} bytes"));
            assert!(c.workgroup_bytes(d) <= limit.min(48 * 1024));
        }
    }
    // The SD 1.5 head dims get no redundant score work where NVIDIA's 48 KiB allow it.
    assert_eq!(config(40, 48 * 1024).unwrap().d_split, 1);
    assert_eq!(config(64, 48 * 1024).unwrap().d_split, 1);
    for (d, limit) in [
        (40, 32 * 1024),
        (40, 48 * 1024),
        (64, 48 * 1024),
        (80, 48 * 1024),
        (160, 48 * 1024),
    ] {
        let c = config(d, limit).unwrap();
        eprintln!(
            "d={d} within {limit}: {c:?}, {} rows/workgroup, {} bytes",
            c.block_rows(),
            c.workgroup_bytes(d)
        );
    }
}

#[test]
fn rejects_bad_inputs() {
    let g = gpu();
    let x = g
        .upload(&vec![0.0; 2 * 10 * 16], &[2, 10, 16], DType::F32)
        .unwrap();
    let view = HeadsView {
        tensor: &x,
        tokens: 10,
        row_stride: 16,
        offset: 0,
    };
    let out = g.empty(&[2, 10, 16], DType::F32).unwrap();
    // Every case below changes one field of this valid call.
    let ok = attention::Sdpa {
        q: view,
        k: view,
        v: view,
        batch: 2,
        heads: 2,
        head_dim: 8,
        causal: false,
        scale: None,
    };
    // Aliasing the output with an input.
    let alias = HeadsView {
        tensor: &out,
        tokens: 10,
        row_stride: 16,
        offset: 0,
    };
    assert!(attention::Sdpa { q: alias, ..ok }
        .run_into(g, &out)
        .is_err());
    // Heads past the row.
    let off = HeadsView { offset: 9, ..view };
    assert!(attention::Sdpa { q: off, ..ok }.run(g).is_err());
    // Tensor too small for the batch.
    assert!(attention::Sdpa { batch: 3, ..ok }.run(g).is_err());
    // head_dim 0 and too large.
    assert!(attention::Sdpa { head_dim: 0, ..ok }.run(g).is_err());
    // k/v token mismatch.
    let short = HeadsView { tokens: 9, ..view };
    assert!(attention::Sdpa { v: short, ..ok }.run(g).is_err());
    // The tensor-core kernel takes f16 storage only.
    let tile = CoopConfig {
        row_frags: 1,
        key_frags: 1,
        subgroup_rows: false,
    };
    assert!(ok.run_coop_into_with(g, &out, tile).is_err());
    // Wrong output size.
    let small = g.empty(&[2, 10, 8], DType::F32).unwrap();
    assert!(ok.run_into(g, &small).is_err());
    if g.caps.shader_f16 {
        let h = g
            .upload(&vec![0.0; 2 * 10 * 16], &[2, 10, 16], DType::F16)
            .unwrap();
        let hv = HeadsView { tensor: &h, ..view };
        assert!(attention::Sdpa { k: hv, v: hv, ..ok }.run(g).is_err());
    }
    // The allocating form works on a fused view (q = k = v = one buffer, three read-only bindings).
    let y = attention::Sdpa {
        k: HeadsView { offset: 0, ..view },
        scale: Some(0.5),
        ..ok
    }
    .run(g)
    .unwrap();
    assert_eq!(y.shape(), &[2, 10, 16]);
    let got = g.download(&y).unwrap();
    assert!(got.iter().all(|v| *v == 0.0));
}

/// naga turns every split the picker can choose (any head dim, 32/48/64 KiB adapters) into
/// SPIR-V. lavapipe's 32 KiB cannot run the 48 KiB splits NVIDIA gets, so this at least proves they
/// compile (naga 30 has SPIR-V writer panics that only show once overrides are applied).
#[test]
fn every_split_compiles_to_spirv() {
    let src =
        ldm_wgpu::shaders::specialised_source(ldm_wgpu::shaders::ShaderId::Attention, DType::F32);
    let (module, info) = ldm_wgpu::shaders::validate(&src).unwrap();
    let mut seen = std::collections::HashSet::new();
    for d in 1..=attention::MAX_HEAD_DIM {
        for limit in [32 * 1024u64, 48 * 1024, 64 * 1024] {
            let cfg = config(d, limit).unwrap();
            // Shapes of the generated code depend on (OV, KEY_LANES, D_SPLIT, HEAD_DIM % 4).
            if !seen.insert((
                d.div_ceil(4).div_ceil(cfg.d_split as usize),
                cfg,
                d % 4,
                d == 160 || d == 40,
            )) {
                continue;
            }
            let mut constants = naga::back::PipelineConstants::default();
            for (name, value) in cfg.overrides(d) {
                constants.insert(name.to_string(), value);
            }
            let (m, i) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, "attention")),
                &constants,
            )
            .unwrap_or_else(|e| panic!("d={d} {cfg:?}: {e:?}"));
            naga::back::spv::write_vec(&m, &i, &naga::back::spv::Options::default(), None)
                .unwrap_or_else(|e| panic!("d={d} {cfg:?}: {e:?}"));
        }
    }
}

/// Every work split the shader supports gives the same answer (the picker only chooses among
/// them by speed and workgroup memory). Splits that need more than this adapter's workgroup
/// memory are skipped (lavapipe: 32 KiB).
#[test]
fn every_split_agrees() {
    let g = gpu();
    let limit = g.caps.max_workgroup_storage as u64;
    let mut ran = 0;
    for (d, splits) in [
        (
            40,
            &[
                (8, 1),
                (4, 1),
                (2, 1),
                (1, 1),
                (8, 2),
                (4, 2),
                (2, 4),
                (1, 8),
                (2, 32),
            ][..],
        ),
        (60, &[(4, 1)][..]), // o slice of 15 vec4 (the longest that fits 32 KiB)
        (13, &[(8, 1), (1, 16)][..]),
    ] {
        for &(key_lanes, d_split) in splits {
            let cfg = Config { key_lanes, d_split };
            if !cfg.valid_for(d) || cfg.workgroup_bytes(d) > limit {
                continue;
            }
            for causal in [false, true] {
                let (batch, heads, nq, nk) = (2, 2, 37, if causal { 37 } else { 77 });
                let mut rng = Rng::new(d as u64 * 100 + key_lanes as u64 * 10 + d_split as u64);
                let c = heads * d;
                let dtype = DType::F32;
                let (qt, qd) = upload(&rng.normals(batch * nq * c, 1.0), &[batch, nq, c], dtype);
                let (kt, kd) = upload(&rng.normals(batch * nk * c, 1.0), &[batch, nk, c], dtype);
                let (vt, vd) = upload(&rng.normals(batch * nk * c, 1.0), &[batch, nk, c], dtype);
                let out = poisoned(g, &[batch, nq, c], dtype).unwrap();
                let (q, k, v) = (
                    HeadsView::contiguous(&qt),
                    HeadsView::contiguous(&kt),
                    HeadsView::contiguous(&vt),
                );
                attention::Sdpa {
                    q,
                    k,
                    v,
                    batch,
                    heads,
                    head_dim: d,
                    causal,
                    scale: None,
                }
                .run_into_with(g, &out, cfg)
                .unwrap();
                let want = attention::Sdpa {
                    q: attention::HostHeads {
                        data: &qd,
                        tokens: nq,
                        row_stride: c,
                        offset: 0,
                    },
                    k: attention::HostHeads {
                        data: &kd,
                        tokens: nk,
                        row_stride: c,
                        offset: 0,
                    },
                    v: attention::HostHeads {
                        data: &vd,
                        tokens: nk,
                        row_stride: c,
                        offset: 0,
                    },
                    batch,
                    heads,
                    head_dim: d,
                    causal,
                    scale: None,
                }
                .reference();
                let e = rel_l2(&g.download(&out).unwrap(), &want);
                eprintln!("d={d} {cfg:?} causal={causal}: rel L2 {e:.2e}");
                assert!(e <= 1e-5, "d={d} {cfg:?} causal={causal}: {e:.3e}");
                ran += 1;
            }
        }
    }
    assert!(ran >= 10);
}

/// The head dims the tensor-core kernel pads differently (1 and 13: within one fragment; 40, 80,
/// 160: SD 1.5; 64: SD 2.x and CLIP; 256: the largest) with token counts that are multiples of
/// no tile (33 queries, 77 keys), strided views (stride C + 8, offset 4: 4-aligned where d is),
/// and causal self-attention on a fused QKV tensor with offsets (3: never aligned); on whichever
/// kernel runs, in every dtype.
#[test]
fn head_dims_with_awkward_tokens() {
    for (i, d) in [1usize, 13, 40, 64, 80, 160, 256].into_iter().enumerate() {
        let mut cross = Case::new(2, 2, 33, 77, d);
        cross.pad = 8;
        check(&format!("cross 33x77 strided d{d}"), cross, 300 + i as u64);
        let mut fused = Case::new(1, 2, 33, 33, d);
        fused.fused = true;
        fused.pad = 3;
        fused.causal = true;
        check(&format!("causal fused 33 d{d}"), fused, 320 + i as u64);
    }
}

/// Where the adapter offers cooperative matrices and the path is on (forced by
/// `LDM_COOP_MATMUL=1` in CI's lavapipe run), f16 attention really runs on the tensor-core
/// kernel, so that the f16 results above are its proof.
#[test]
fn tensor_core_path_runs_where_offered() {
    let g = gpu();
    let forced = std::env::var("LDM_COOP_MATMUL").is_ok_and(|v| v == "1");
    let plan = coop::coop_plan(g, DType::F16);
    if forced && g.caps.shader_f16 && g.caps.coop_f16_frag.is_some() {
        assert!(
            plan.is_some(),
            "LDM_COOP_MATMUL=1 and the adapter offers {:?}, but the path is off: {:?}",
            g.caps.coop_f16_frag,
            g.caps
        );
    }
    let Some(plan) = plan else {
        eprintln!(
            "tensor-core attention not in use on {} (FMA kernel tested)",
            g.adapter
        );
        return;
    };
    // Every head dim gets a tile shape within this adapter's workgroup memory (lavapipe: 32 KiB).
    for d in 1..=attention::MAX_HEAD_DIM {
        assert!(
            coop_choice(g, DType::F16, d).is_some(),
            "no tensor-core tile shape for head_dim {d} on {plan:?}"
        );
    }
    assert!(coop_choice(g, DType::F32, 40).is_none());
    let mut case = Case::new(1, 2, 33, 77, 40);
    case.pad = 2;
    let e = run(case, DType::F16, 400);
    assert!(e <= 2e-3, "{case:?}: {e:.3e}");
    let shader = plan.shader(ldm_wgpu::shaders::ShaderId::AttentionCoop);
    let entry = coop_choice(g, DType::F16, 40).unwrap().1.entry();
    let ran = g.compiled_pipelines();
    assert!(
        ran.iter().any(|&(s, e)| s == shader && e == entry),
        "{shader}/{entry} never compiled; pipelines: {ran:?}"
    );
    eprintln!("tensor-core attention ran: {shader} with {plan:?}");
}

/// Every tile shape the tensor-core kernel supports on this adapter gives the right answer
/// (the picker only chooses among them by workgroup memory): 1, 2 and 4 fragments of rows (1, 2
/// and 4 softmax lanes per row with 8-wide subgroups) × 1, 2 and 4 fragments of keys, on padded
/// head dims, a cross-attention tail tile, causal fused views.
#[test]
fn every_coop_shape_agrees() {
    let g = gpu();
    let Some(plan) = coop::coop_plan(g, DType::F16) else {
        eprintln!("tensor-core attention not in use on {}", g.adapter);
        return;
    };
    let limit = g.caps.max_workgroup_storage as u64;
    let mut ran = 0;
    let mut worst: f64 = 0.0;
    let shapes = CoopConfig::CANDIDATES
        .into_iter()
        .chain(CoopConfig::ROWS_CANDIDATES);
    for cfg in shapes {
        if !cfg.valid_for(plan) {
            continue;
        }
        for (i, (d, causal, fused)) in [(40, false, false), (13, true, true), (160, false, true)]
            .into_iter()
            .enumerate()
        {
            if cfg.workgroup_bytes(plan.frag, d) > limit {
                continue;
            }
            let mut case = if fused {
                Case::new(2, 2, 45, 45, d)
            } else {
                Case::new(2, 2, 37, 77, d)
            };
            case.causal = causal;
            case.fused = fused;
            // d 40 cross-attention: views 4-aligned (stride C + 8, offset 4), the vec4 staging;
            // the others: offset 3, element staging.
            case.pad = if fused { 3 } else { 8 };
            let seed = 500 + 10 * ran as u64 + i as u64;
            let e = run_on(case, DType::F16, seed, Some(cfg));
            eprintln!(
                "{cfg:?} ({}x{}) d={d} causal={causal} fused={fused}: rel L2 {e:.2e}",
                cfg.block_rows(plan),
                cfg.block_keys(plan)
            );
            assert!(e <= 2e-3, "{cfg:?} {case:?}: {e:.3e}");
            worst = worst.max(e);
            ran += 1;
        }
    }
    eprintln!("{ran} tile-shape cases on {plan:?}, worst rel L2 {worst:.2e}");
    assert!(ran >= 17);
}

/// The tensor-core tile picker covers every head dim on the adapters we target (NVIDIA: 16×16
/// fragments, 32-wide subgroups, 48 KiB; lavapipe: 8×8, 8-wide, 32 KiB; also a 64-wide, 16×16
/// one), within the memory it is given, and naga turns every shape it picks into SPIR-V for
/// both variants: the 16×16 shapes cannot run here, so this at least proves they compile once
/// their overrides are applied (naga 30 has SPIR-V writer panics that only show then).
#[test]
fn every_coop_shape_fits_and_compiles_to_spirv() {
    let plans = [
        (
            CoopPlan {
                frag: 16,
                subgroup: 32,
            },
            48 * 1024u64,
        ),
        (
            CoopPlan {
                frag: 16,
                subgroup: 32,
            },
            32 * 1024,
        ),
        (
            CoopPlan {
                frag: 16,
                subgroup: 64,
            },
            64 * 1024,
        ),
        (
            CoopPlan {
                frag: 8,
                subgroup: 8,
            },
            32 * 1024,
        ),
    ];
    let mut seen = std::collections::HashSet::new();
    for (plan, limit) in plans {
        let shader = plan.shader(ldm_wgpu::shaders::ShaderId::AttentionCoop);
        let src = ldm_wgpu::shaders::specialised_source(shader, DType::F16);
        let (module, info) = ldm_wgpu::shaders::validate(&src).unwrap();
        for d in 1..=attention::MAX_HEAD_DIM {
            let Some(cfg) = coop_config(plan, d, limit) else {
                // Only a 32 KiB adapter with 16×16 fragments runs out (head dims past 224).
                assert!(
                    plan.frag == 16 && limit < 48 * 1024 && d > 176,
                    "{plan:?} d={d}"
                );
                continue;
            };
            assert!(cfg.valid_for(plan));
            assert!(cfg.workgroup_bytes(plan.frag, d) <= limit.min(48 * 1024));
            // The generated code depends on the plan, the shape, the padded head dim and
            // whether padding columns exist.
            let dp = d.div_ceil(plan.frag) * plan.frag;
            if !seen.insert((plan.frag, plan.subgroup, cfg, dp, dp == d)) {
                continue;
            }
            for vec4 in [false, d.is_multiple_of(4)] {
                let mut constants = naga::back::PipelineConstants::default();
                for (name, value) in cfg.overrides(plan, d, vec4) {
                    constants.insert(name.to_string(), value);
                }
                let (m, i) = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((naga::ShaderStage::Compute, cfg.entry())),
                    &constants,
                )
                .unwrap_or_else(|e| panic!("{plan:?} d={d} {cfg:?} vec4={vec4}: {e:?}"));
                naga::back::spv::write_vec(&m, &i, &naga::back::spv::Options::default(), None)
                    .unwrap_or_else(|e| panic!("{plan:?} d={d} {cfg:?} vec4={vec4}: {e:?}"));
            }
        }
    }
    // SD's head dims on NVIDIA (16×16, 48 KiB): rows × keys per tile.
    let nvidia = CoopPlan {
        frag: 16,
        subgroup: 32,
    };
    for d in [40, 64, 80, 160] {
        let cfg = coop_config(nvidia, d, 48 * 1024).unwrap();
        eprintln!(
            "NVIDIA d={d}: {} rows x {} keys per tile, {} bytes",
            cfg.block_rows(nvidia),
            cfg.block_keys(nvidia),
            cfg.workgroup_bytes(16, d)
        );
    }
    // The subgroup-owned rows kernel wherever a shape fits (predicted, issue 21 item 5): head
    // dims 40 and 64 on 2 subgroups × 64 keys, 80 on one × 64, 160 on one × 32.
    let rows = |row_frags, key_frags| {
        Some(CoopConfig {
            row_frags,
            key_frags,
            subgroup_rows: true,
        })
    };
    assert_eq!(coop_config(nvidia, 40, 48 * 1024), rows(2, 4));
    assert_eq!(coop_config(nvidia, 64, 48 * 1024), rows(2, 4));
    assert_eq!(coop_config(nvidia, 80, 48 * 1024), rows(1, 4));
    assert_eq!(coop_config(nvidia, 160, 48 * 1024), rows(1, 2));
}

/// The tensor-core kernel gives the same bits with and without naga's runtime checks (it is
/// compiled without them by default): a result that depended on clamped indices would differ.
#[test]
fn coop_same_bits_with_and_without_bounds_checks() {
    if coop::coop_plan(gpu(), DType::F16).is_none() {
        eprintln!("tensor-core attention not in use on {}", gpu().adapter);
        return;
    }
    let open = |checks| {
        ldm_wgpu::Gpu::new(&ldm_wgpu::GpuOptions {
            policy: ldm_wgpu::runtime::KernelPolicy {
                shader_checks: checks,
                ..ldm_wgpu::runtime::KernelPolicy::from_env().unwrap()
            },
            ..ldm_wgpu::GpuOptions::from_env().unwrap()
        })
        .unwrap()
    };
    let engines = [open(true), open(false)];
    let mut rng = Rng::new(77);
    for &(nq, nk, heads, d, causal) in &[
        (37usize, 77usize, 2usize, 40usize, false),
        (33, 33, 3, 13, true),
        (21, 45, 1, 160, false),
    ] {
        let inputs = [
            rng.normals(2 * nq * heads * d, 1.0),
            rng.normals(2 * nk * heads * d, 1.0),
            rng.normals(2 * nk * heads * d, 1.0),
        ];
        let bits: Vec<Vec<u8>> = engines
            .iter()
            .map(|g| {
                let t: Vec<_> = inputs
                    .iter()
                    .zip([nq, nk, nk])
                    .map(|(x, n)| g.upload(x, &[2, n, heads * d], DType::F16).unwrap())
                    .collect();
                let view = HeadsView::contiguous;
                let y = attention::Sdpa {
                    q: view(&t[0]),
                    k: view(&t[1]),
                    v: view(&t[2]),
                    batch: 2,
                    heads,
                    head_dim: d,
                    causal,
                    scale: None,
                }
                .run(g)
                .unwrap();
                let shader = ldm_wgpu::shaders::ShaderId::AttentionCoop
                    .coop_variant(g.caps.coop_f16_frag.unwrap() as usize)
                    .unwrap();
                assert!(g.compiled_pipelines().iter().any(|&(s, _)| s == shader));
                g.download_bytes(&y).unwrap()
            })
            .collect();
        assert_eq!(bits[0], bits[1], "d={d} causal={causal}: bits differ");
    }
}
