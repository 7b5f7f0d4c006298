//! The kernel benchmark behind `ldm bench` and `cargo bench --bench kernels`: every kernel at
//! the Stable Diffusion 1.5 512×512 shapes (`kernels::sd15`) or the SDXL base 1024×1024 ones
//! (`kernels::sdxl`, `ldm bench --shapes sdxl`), each path the adapter offers side by
//! side (FMA and tensor-core tiles), the one the default policy picks marked, timed with GPU
//! timestamp queries (median of repetitions after a warm-up) and set against this device's peaks
//! measured in the same run (shaders/peak.wgsl).
//!
//! Each case is validated elsewhere (tests/kernels_*.rs); this only times them.

use serde::Serialize;

use crate::kernels::attention::{self, HeadsView};
use crate::kernels::coop::{self, CoopTile};
use crate::kernels::matmul::{self, Activation};
use crate::kernels::sd15::{ConvCase, NormCase};
use crate::kernels::{conv2d, norm, peak, sd15, sdxl};
use crate::runtime::KernelPolicy;
use crate::{DType, Error, Gpu, Result, Tensor};

pub mod pipeline;

/// Which model's shapes the kernel cases take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Shapes {
    /// Stable Diffusion 1.5 at 512×512 (`kernels::sd15`).
    #[default]
    Sd15,
    /// SDXL base 1.0 at 1024×1024 (`kernels::sdxl`).
    Sdxl,
}

impl std::str::FromStr for Shapes {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sd15" | "sd1.5" => Ok(Shapes::Sd15),
            "sdxl" => Ok(Shapes::Sdxl),
            other => Err(Error::InvalidInput(format!(
                "shapes `{other}` (sd15 or sdxl)"
            ))),
        }
    }
}

impl std::fmt::Display for Shapes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shapes::Sd15 => "sd15",
            Shapes::Sdxl => "sdxl",
        })
    }
}

/// One model's case tables.
struct Tables {
    matmul: &'static [(&'static str, usize, usize, usize)],
    conv: &'static [ConvCase],
    attention: &'static [(&'static str, usize, usize, usize, usize, usize)],
    norm: &'static [NormCase],
}

impl Shapes {
    fn tables(self) -> Tables {
        match self {
            Shapes::Sd15 => Tables {
                matmul: sd15::MATMUL,
                conv: sd15::CONV,
                attention: sd15::ATTENTION,
                norm: sd15::NORM,
            },
            Shapes::Sdxl => Tables {
                matmul: sdxl::MATMUL,
                conv: sdxl::CONV,
                attention: sdxl::ATTENTION,
                norm: sdxl::NORM,
            },
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct KernelBenchOptions {
    pub shapes: Shapes,
    pub dtype: DType,
    /// Timed repetitions per case (the median is reported).
    pub reps: usize,
    /// Run only cases whose name contains one of these (empty: all).
    pub filter: Vec<String>,
    /// Small peak runs and only the cheaper cases (for CPU drivers and rehearsals).
    pub quick: bool,
}

/// The device's measured peaks (the denominators of the % column).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Peaks {
    pub fma_gflops: f64,
    pub copy_gbs: f64,
    /// Cooperative-matrix (tensor-core) f16 throughput, where the adapter has it.
    pub tensor_core_gflops: Option<f64>,
}

/// One timed case.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    /// Kernel and path, e.g. `matmul[coop128]`.
    pub kernel: String,
    /// The SD 1.5 layer and its shape.
    pub shape: String,
    pub dtype: &'static str,
    /// Median GPU time of one run of the case.
    pub ms: f64,
    /// Compute-bound cases: achieved GFLOP/s; memory-bound ones: None.
    pub gflops: Option<f64>,
    /// Memory-bound cases: achieved GB/s (read + write); compute-bound ones: None.
    pub gbs: Option<f64>,
    /// Share of the matching measured peak (tensor-core peak for tensor-core paths).
    pub percent_of_peak: f64,
    /// The path the engine's default policy takes for this shape.
    pub default: bool,
}

impl KernelRow {
    /// The row as `cargo bench --bench kernels` has always printed it.
    pub fn text(&self) -> String {
        let rate = match (self.gflops, self.gbs) {
            (Some(g), _) => format!("{g:>9.1} GFLOP/s"),
            (None, Some(b)) => format!("{b:>9.1} GB/s   "),
            (None, None) => String::new(),
        };
        let kernel = format!("{}{}", self.kernel, if self.default { "*" } else { "" });
        format!(
            "{kernel:<10} {:<36} {:<4} {:>10.4} ms {rate} {:>6.1}% of peak",
            self.shape, self.dtype, self.ms, self.percent_of_peak
        )
    }
}

struct Bench<'a> {
    gpu: &'a Gpu,
    shapes: Shapes,
    dtype: DType,
    reps: usize,
    filter: Vec<String>,
    quick: bool,
    fma_peak: f64,
    copy_peak: f64,
    coop_peak: Option<f64>,
    on_row: &'a mut dyn FnMut(&KernelRow),
    rows: Vec<KernelRow>,
}

impl Bench<'_> {
    fn random(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut s = 0x9E3779B97F4A7C15u64;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
            })
            .collect();
        self.gpu.upload(&data, shape, self.dtype)
    }

    /// Median GPU seconds of `op` (all its dispatches summed per repetition).
    fn time(&self, op: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..2 {
            op()?;
        }
        self.gpu.take_samples()?;
        let mut times = Vec::with_capacity(self.reps);
        for _ in 0..self.reps {
            op()?;
            let samples = self.gpu.take_samples()?;
            times.push(samples.iter().map(|s| s.1).sum::<f64>() * 1e-9);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    fn wanted(&self, name: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|f| name.contains(f.as_str()))
    }

    /// Record a case; a trailing `*` on `kernel` marks the default path.
    fn line(&mut self, kernel: &str, shape: &str, secs: f64, flops: f64, bytes: f64) {
        let (kernel, default) = match kernel.strip_suffix('*') {
            Some(k) => (k, true),
            None => (kernel, false),
        };
        let (gflops, gbs, pct) = if flops > 0.0 {
            let peak = match self.coop_peak {
                Some(p) if kernel.contains("[coop") => p,
                _ => self.fma_peak,
            };
            (Some(flops / secs * 1e-9), None, 100.0 * flops / secs / peak)
        } else {
            (
                None,
                Some(bytes / secs * 1e-9),
                100.0 * bytes / secs / self.copy_peak,
            )
        };
        let row = KernelRow {
            kernel: kernel.to_string(),
            shape: shape.to_string(),
            dtype: self.dtype.name(),
            ms: secs * 1e3,
            gflops,
            gbs,
            percent_of_peak: pct,
            default,
        };
        (self.on_row)(&row);
        self.rows.push(row);
    }
}

/// Measure the peaks (reported through `on_peaks` as soon as known), then time every case,
/// handing each row to `on_row` as it is measured. `gpu` must have been opened with profiling
/// on (timestamp queries); its kernel policy is restored afterwards.
pub fn run_kernels(
    gpu: &Gpu,
    options: &KernelBenchOptions,
    on_peaks: &mut dyn FnMut(&Peaks),
    on_row: &mut dyn FnMut(&KernelRow),
) -> Result<(Peaks, Vec<KernelRow>)> {
    if !gpu.caps.timestamps || !gpu.profiling() {
        return Err(Error::MissingFeature {
            feature: "TIMESTAMP_QUERY with profiling on (GpuOptions::profile)".into(),
            adapter: gpu.adapter.name.clone(),
        });
    }
    let dtype = options.dtype;
    let quick = options.quick;
    let mut b = Bench {
        gpu,
        shapes: options.shapes,
        dtype,
        reps: options.reps.max(1),
        filter: options.filter.clone(),
        quick,
        fma_peak: 1.0,
        copy_peak: 1.0,
        coop_peak: None,
        on_row,
        rows: Vec::new(),
    };
    let original = b.gpu.policy();
    let result = run_cases(&mut b, on_peaks);
    b.gpu.set_policy(original);
    result?;
    let peaks = Peaks {
        fma_gflops: b.fma_peak * 1e-9,
        copy_gbs: b.copy_peak * 1e-9,
        tensor_core_gflops: b.coop_peak.map(|p| p * 1e-9),
    };
    Ok((peaks, b.rows))
}

fn run_cases(b: &mut Bench<'_>, on_peaks: &mut dyn FnMut(&Peaks)) -> Result<()> {
    let (dtype, quick) = (b.dtype, b.quick);
    let tables = b.shapes.tables();
    // Peaks, measured now on this device.
    let (wg, iters, copy_n) = if quick {
        (256u32, 256u32, 1usize << 20)
    } else {
        (16384, 4096, 64 << 20)
    };
    let scratch = b.gpu.empty(&[1024], dtype)?;
    let t = b.time(&mut || peak::fma_peak(b.gpu, &scratch, wg, iters))?;
    b.fma_peak = peak::fma_flops(wg, iters) / t;
    let src = b.random(&[copy_n])?;
    let dst = b.gpu.empty(&[copy_n], dtype)?;
    let t = b.time(&mut || peak::copy(b.gpu, &src, &dst))?;
    b.copy_peak = 2.0 * src.size_bytes() as f64 / t;
    drop((src, dst));
    // What the environment asked for; each path below is forced on top of it, then restored.
    let base = b.gpu.policy();
    let forced = |tensor_cores: Option<bool>, coop_tile: Option<CoopTile>| KernelPolicy {
        tensor_cores,
        coop_tile,
        ..base
    };
    b.gpu.set_policy(forced(Some(true), None));
    if let Some(plan) = coop::coop_plan(b.gpu, DType::F16) {
        let scratch = b.gpu.empty(&[256], DType::F32)?;
        let (wg, iters) = if quick { (64u32, 64u32) } else { (4096, 4096) };
        let t = b.time(&mut || peak::coop_peak(b.gpu, plan, &scratch, wg, iters))?;
        b.coop_peak = Some(peak::coop_flops(plan, wg, iters) / t);
    }
    b.gpu.set_policy(base);
    on_peaks(&Peaks {
        fma_gflops: b.fma_peak * 1e-9,
        copy_gbs: b.copy_peak * 1e-9,
        tensor_core_gflops: b.coop_peak.map(|p| p * 1e-9),
    });

    // Matmul / linear.
    let mut cases: Vec<(String, usize, usize, usize)> = tables
        .matmul
        .iter()
        .map(|&(n, m, nn, k)| (n.to_string(), m, nn, k))
        .collect();
    cases.push(("square 4096^3".into(), 4096, 4096, 4096));
    // Every path where the adapter has tensor cores: `matmul[fma]`, `matmul[coop]` (the 64
    // tile) and `matmul[coop128]` (the large tile, where the adapter holds it; over K splits
    // plus a reduce pass, `matmul[coop128/splitN]`, where its grid is small); the one the
    // engine picks by default marked `*`.
    b.gpu.set_policy(forced(Some(true), None));
    // The matmul's own condition on the plan (`CoopPlan::matmul_staging_fits`): elsewhere the
    // engine runs the FMA kernel, which must not be labelled `coop`.
    let matmul_plan = |gpu: &Gpu| coop::coop_plan(gpu, dtype).filter(|p| p.matmul_staging_fits());
    let coop = matmul_plan(b.gpu);
    b.gpu.set_policy(base);
    let default_coop = matmul_plan(b.gpu).is_some();
    for (name, m, n, k) in cases {
        if !b.wanted(&name) || (b.quick && m * n * k > 1 << 30) {
            continue;
        }
        let x = b.random(&[m, k])?;
        let w = b.random(&[n, k])?;
        // (label, coop tile or None for the FMA kernel)
        let mut paths = vec![("fma".to_string(), None)];
        let mut chosen = None;
        if let (Some(plan), true) = (coop, k % 4 == 0) {
            paths.push(("coop".into(), Some(CoopTile::T64)));
            if CoopTile::T128.fits(plan, &b.gpu.caps) {
                // The large tile splits K where its grid is small (`coop::split_k`).
                let forced = Some(CoopTile::T128);
                let label = match coop::gemm_tile_and_split(plan, &b.gpu.caps, [1, m, n, k], forced)
                {
                    (_, Some(chunk)) => format!("coop128/split{}", k.div_ceil(chunk)),
                    _ => "coop128".into(),
                };
                paths.push((label, forced));
            }
            if default_coop {
                let (tile, _) = coop::gemm_tile_and_split(plan, &b.gpu.caps, [1, m, n, k], None);
                chosen = Some(tile);
            }
        }
        for (path, tile) in paths {
            b.gpu.set_policy(forced(Some(tile.is_some()), tile));
            let t = b.time(&mut || {
                matmul::linear(b.gpu, &x, &w, None, None, Activation::None).map(|_| ())
            })?;
            let mark = if tile == chosen { "*" } else { "" };
            b.line(
                &format!("matmul[{path}]{mark}"),
                &format!("{name} {m}x{n}x{k}"),
                t,
                2.0 * (m * n * k) as f64,
                0.0,
            );
        }
        b.gpu.set_policy(base);
    }

    // Convolution: one line per kernel variant that applies (`conv2d[64]` and `conv2d[128]`
    // always, `conv2d[small]` for Cout <= 16), the one the shape heuristic picks marked `*`,
    // so one GPU run compares the tiles. Upsample2D rows run as the models do: the conv reads
    // the half-size input through the fused 2x nearest upsampling.
    let max_wg = b.gpu.caps.max_workgroup_storage;
    let coop_ok_for = |c: usize| coop.is_some() && c.is_multiple_of(4);
    for &(name, bt, h, w, cin, cout, k, stride) in tables.conv {
        // `conv2+shortcut` rows: conv2 (3×3, cout → cout) with the row's 1×1 cin → cout
        // shortcut as its K tail, as the resnets run them.
        let tail = name.contains("conv2+shortcut");
        let flops = if tail {
            2.0 * (bt * h * w * cout * (9 * cout + cin)) as f64
        } else {
            2.0 * (bt * (h / stride) * (w / stride) * cout * cin * k * k) as f64
        };
        // A tensor over the adapter's binding limit (the SDXL VAE decoder's 1024² rows in f32
        // on some adapters) is skipped: the engine decodes such sizes in tiles.
        let big = (bt * h * w * cin.max(cout) * dtype.size()) as u64;
        if !b.wanted(name) || (b.quick && flops > 4e9) || big > b.gpu.caps.max_storage_binding {
            continue;
        }
        let upsampled = name.contains("upsample");
        let x = if upsampled {
            b.random(&[bt, h / 2, w / 2, cin])?
        } else {
            b.random(&[bt, h, w, cin])?
        };
        let wt = b.random(&[cout, k, k, cin])?;
        let pad = k / 2;
        // The tail rows' conv2 input and weight (x and wt are then the shortcut's).
        let conv2 = if tail {
            Some((b.random(&[bt, h, w, cout])?, b.random(&[cout, 3, 3, cout])?))
        } else {
            None
        };
        let coop_ok = coop_ok_for(cin) && (!tail || coop_ok_for(cout));
        let m = bt * (h / stride) * (w / stride);
        // The default (`Conv::run_into`): tensor cores where the shape gets their large tile.
        let large = |plan| conv2d::coop_conv_tile(plan, &b.gpu.caps, m, cout, None);
        let chosen = match coop {
            Some(plan) if default_coop && coop_ok && cout > 16 && large(plan) == CoopTile::T128 => {
                (
                    conv2d::Variant::COOP,
                    Some(CoopTile::T128),
                    base.coop_conv_narrow,
                )
            }
            _ => (conv2d::choose_variant(m, cout, max_wg, None), None, false),
        };
        let mut tiles = vec![conv2d::Tile::T64, conv2d::Tile::T128];
        if cout <= 16 {
            tiles.push(conv2d::Tile::Small);
        }
        if coop_ok {
            tiles.push(conv2d::Tile::Coop);
        }
        // (tile, tensor-core tile, narrow): the tensor-core kernel in both its tiles where it can
        // run, the large one also as its 128 × 64 variant.
        let mut runs: Vec<(conv2d::Tile, Option<CoopTile>, bool)> = Vec::new();
        for tile in tiles {
            if tile != conv2d::Tile::Coop {
                runs.push((tile, None, false));
                continue;
            }
            for coop_tile in [CoopTile::T64, CoopTile::T128] {
                let plan = coop.expect("coop_ok");
                if conv2d::coop_conv_tile(plan, &b.gpu.caps, m, cout, Some(coop_tile)) == coop_tile
                {
                    runs.push((tile, Some(coop_tile), false));
                    if coop_tile == CoopTile::T128 {
                        runs.push((tile, Some(coop_tile), true));
                    }
                }
            }
        }
        for (tile, coop_tile, narrow) in runs {
            // The tile's largest K step that fits this adapter (what the heuristic would run).
            let variant = if tile == conv2d::Tile::Coop {
                conv2d::Variant::COOP
            } else {
                conv2d::choose_variant(m, cout, max_wg, Some(tile))
            };
            if variant.tile != tile {
                continue; // does not fit this adapter's workgroup memory
            }
            b.gpu.set_policy(KernelPolicy {
                coop_conv_narrow: narrow,
                ..forced(Some(tile == conv2d::Tile::Coop), coop_tile)
            });
            let plain = conv2d::Conv {
                input: conv2d::Input::Plain(&x),
                weight: &wt,
                bias: None,
                bias_rows: None,
                residual: None,
                norm: None,
                shortcut: None,
                stride: 1,
                pads: [0; 4],
                variant: Some(variant),
            };
            let conv = match &conv2 {
                Some((h2, w2)) => conv2d::Conv {
                    input: conv2d::Input::Plain(h2),
                    weight: w2,
                    shortcut: Some(conv2d::Shortcut {
                        input: conv2d::Input::Plain(&x),
                        weight: &wt,
                    }),
                    pads: [1; 4],
                    ..plain
                },
                None => conv2d::Conv {
                    input: if upsampled {
                        conv2d::Input::Upsampled2x(&x)
                    } else {
                        conv2d::Input::Plain(&x)
                    },
                    stride,
                    pads: [pad; 4],
                    ..plain
                },
            };
            let t = b.time(&mut || conv.run(b.gpu).map(|_| ()))?;
            b.gpu.set_policy(base);
            let mark = if (variant, coop_tile, narrow) == chosen {
                "*"
            } else {
                ""
            };
            let label = match (coop_tile, narrow) {
                (Some(CoopTile::T128), false) => "coop128",
                (Some(CoopTile::T128), true) => "coop128x64",
                _ => tile.name(),
            };
            b.line(
                &format!("conv2d[{label}]{mark}"),
                &if tail {
                    format!("{name} {bt}x{h}x{w}x{cout}->{cout} k3s1 + 1x1 {cin} tail")
                } else {
                    format!(
                        "{name} {bt}x{h}x{w}x{cin}->{cout} k{k}s{stride}{}",
                        if upsampled { " (fused up2x)" } else { "" }
                    )
                },
                t,
                flops,
                0.0,
            );
        }
    }

    // Attention.
    for &(name, batch, heads, nq, nk, d) in tables.attention {
        let flops = 4.0 * (batch * heads * nq * nk * d) as f64;
        if !b.wanted(name) || (b.quick && flops > 4e9) {
            continue;
        }
        let c = heads * d;
        let q = b.random(&[batch, nq, c])?;
        let kv = b.random(&[batch, nk, 2 * c])?;
        let view = |tensor, tokens, row_stride, offset| HeadsView {
            tensor,
            tokens,
            row_stride,
            offset,
        };
        let mut paths = vec![false];
        if coop.is_some() {
            paths.push(true);
        }
        for on in paths {
            b.gpu.set_policy(forced(Some(on), None));
            let t = b.time(&mut || {
                attention::Sdpa {
                    q: view(&q, nq, c, 0),
                    k: view(&kv, nk, 2 * c, 0),
                    v: view(&kv, nk, 2 * c, c),
                    batch,
                    heads,
                    head_dim: d,
                    causal: false,
                    scale: None,
                }
                .run(b.gpu)
                .map(|_| ())
            })?;
            b.gpu.set_policy(base);
            let mark = if on == default_coop { "*" } else { "" };
            let path = if on { "coop" } else { "fma" };
            b.line(
                &format!("attention[{path}]{mark}"),
                &format!("{name} b{batch} h{heads} {nq}x{nk} d{d}"),
                t,
                flops,
                0.0,
            );
        }
        // Every tensor-core tile shape that fits (rows × keys per workgroup; `rows`: the
        // subgroup-owned-rows entry point), for tuning `attention::coop_config`; the one it
        // picks is marked, and is the `[coop]` line above.
        if let Some(plan) = coop {
            b.gpu.set_policy(forced(Some(true), None));
            let picked = attention::coop_config(plan, d, b.gpu.caps.max_workgroup_storage as u64);
            let out = b.gpu.empty(&[batch, nq, c], dtype)?;
            let shapes = attention::CoopConfig::ROWS_CANDIDATES
                .into_iter()
                .chain(attention::CoopConfig::CANDIDATES);
            for cfg in shapes {
                let limit = (b.gpu.caps.max_workgroup_storage as u64).min(48 * 1024);
                if !cfg.valid_for(plan) || cfg.workgroup_bytes(plan.frag, d) > limit {
                    continue;
                }
                let t = b.time(&mut || {
                    attention::Sdpa {
                        q: view(&q, nq, c, 0),
                        k: view(&kv, nk, 2 * c, 0),
                        v: view(&kv, nk, 2 * c, c),
                        batch,
                        heads,
                        head_dim: d,
                        causal: false,
                        scale: None,
                    }
                    .run_coop_into_with(b.gpu, &out, cfg)
                })?;
                let mark = if Some(cfg) == picked { "*" } else { "" };
                b.line(
                    &format!(
                        "attention[coop{} {}x{}]{mark}",
                        if cfg.subgroup_rows { " rows" } else { "" },
                        cfg.block_rows(plan),
                        cfg.block_keys(plan)
                    ),
                    &format!("{name} b{batch} h{heads} {nq}x{nk} d{d}"),
                    t,
                    flops,
                    0.0,
                );
            }
            b.gpu.set_policy(base);
        }
    }

    // Group norm and layer norm (memory-bound: read + write).
    for case in tables.norm {
        let n: usize = case.shape.iter().product();
        if !b.wanted(case.name) || (b.quick && n > 1 << 22) {
            continue;
        }
        let c = *case.shape.last().expect("shape");
        let x = b.random(case.shape)?;
        let gamma = b.random(&[c])?;
        let beta = b.random(&[c])?;
        let t = if case.groups > 0 {
            b.time(&mut || {
                norm::group_norm(b.gpu, &x, case.groups, 1e-5, &gamma, &beta, case.silu).map(|_| ())
            })?
        } else {
            b.time(&mut || norm::layer_norm(b.gpu, &x, &gamma, &beta, 1e-5).map(|_| ()))?
        };
        let kernel = if case.groups > 0 {
            "groupnorm"
        } else {
            "layernorm"
        };
        b.line(
            kernel,
            &format!("{} {:?}", case.name, case.shape),
            t,
            0.0,
            2.0 * x.size_bytes() as f64,
        );
        if case.groups > 0 {
            // The statistics table alone, what a conv with the norm fused in waits for (the U-Net's
            // norms, one workgroup per (batch, group) up to GN_STATS_ONE_PASS_MAX values): GB/s
            // of one read of x.
            let op = norm::GroupNormOp {
                groups: case.groups,
                eps: 1e-5,
                gamma: &gamma,
                beta: &beta,
                silu: false,
            };
            let t = b.time(&mut || op.stats(b.gpu, &x, None).map(|_| ()))?;
            b.line(
                "groupnorm_stats",
                &format!("{} {:?}", case.name, case.shape),
                t,
                0.0,
                x.size_bytes() as f64,
            );
        }
    }
    Ok(())
}
