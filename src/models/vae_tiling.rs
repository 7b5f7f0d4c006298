//! The tiled VAE and its planner: diffusers' `AutoencoderKL.tiled_decode` / `_tiled_encode`
//! (overlapping tiles blended with linear ramps), the automatic choice between untiled and tiled
//! passes, and the activation-memory measurement (a dry run) that choice rests on.

use crate::kernels::tiling;
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::{Error, Gpu, Result, Tensor};

/// Which path `decode_with` / `encode_moments_with` take (`ldm generate --vae-tiling`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VaeTiling {
    /// Untiled unless an activation would exceed the device's binding limits or the activations
    /// the memory budget; then tiles of the config's size (halved until one fits).
    #[default]
    Auto,
    /// diffusers' `enable_tiling()`: tile whenever the input is larger than one tile.
    On,
    /// Never tile.
    Off,
}

impl std::str::FromStr for VaeTiling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(VaeTiling::Auto),
            "on" => Ok(VaeTiling::On),
            "off" => Ok(VaeTiling::Off),
            other => Err(Error::InvalidInput(format!(
                "--vae-tiling `{other}` (auto, on or off)"
            ))),
        }
    }
}

/// Tile settings of diffusers' tiled VAE (`AutoencoderKL.__init__`: `tile_sample_min_size`,
/// `tile_latent_min_size = tile_sample_min_size / 2^(len(block_out_channels) - 1)`,
/// `tile_overlap_factor`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileConfig {
    /// Tile side in pixels (diffusers `tile_sample_min_size`; default the config's `sample_size`).
    pub tile_sample_size: usize,
    /// Share of a tile overlapping its neighbour (diffusers `tile_overlap_factor`, 0.25).
    pub overlap_factor: f64,
}

impl TileConfig {
    /// diffusers' defaults for this VAE.
    pub fn from_config(config: &VaeConfig) -> Self {
        TileConfig {
            tile_sample_size: config.sample_size,
            overlap_factor: 0.25,
        }
    }
}

/// Smallest tile side, in latents, that the automatic choice tries (halving from the default).
const MIN_TILE_LATENT: usize = 4;

/// One tiled pass in diffusers' integer arithmetic. Decode: the input is latents, tiles of
/// `tile_latent_min_size` start every `overlap_size = int(tile_latent · (1 - overlap))` latents,
/// `blend_extent = int(tile_sample · overlap)` and `row_limit = tile_sample - blend_extent` are
/// in pixels. Encode: the roles of pixels and latents swap.
#[derive(Clone, Copy, Debug)]
struct TileGeometry {
    /// Tile side in the input.
    tile: usize,
    /// Step between tile origins in the input (diffusers `overlap_size`).
    stride: usize,
    /// Output size of a tile of input size n: n · up / down.
    up: usize,
    down: usize,
    blend_extent: usize,
    row_limit: usize,
}

/// One row (or column) of tiles: where it starts in the input, its sizes, where its kept part
/// lands in the output.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    len: usize,
    out_len: usize,
    offset: usize,
}

impl TileGeometry {
    fn check_settings(tile: &TileConfig, f: usize) -> Result<(usize, usize)> {
        let (ts, o) = (tile.tile_sample_size, tile.overlap_factor);
        if ts == 0 || !ts.is_multiple_of(f) || !(0.0..1.0).contains(&o) {
            return Err(Error::InvalidInput(format!(
                "VAE tiles of {ts} px with overlap {o}: the size must be a positive multiple of {f} \
                 and the overlap in [0, 1)"
            )));
        }
        Ok((ts, ts / f))
    }

    /// diffusers `tiled_decode`.
    fn decode(tile: &TileConfig, f: usize) -> Result<Self> {
        let (ts, tl) = Self::check_settings(tile, f)?;
        let o = tile.overlap_factor;
        let stride = (tl as f64 * (1.0 - o)) as usize;
        let blend_extent = (ts as f64 * o) as usize;
        let g = TileGeometry {
            tile: tl,
            stride,
            up: f,
            down: 1,
            blend_extent,
            row_limit: ts - blend_extent,
        };
        g.check_consistent(tile)
    }

    /// diffusers `_tiled_encode`.
    fn encode(tile: &TileConfig, f: usize) -> Result<Self> {
        let (ts, tl) = Self::check_settings(tile, f)?;
        let o = tile.overlap_factor;
        let stride = (ts as f64 * (1.0 - o)) as usize;
        let blend_extent = (tl as f64 * o) as usize;
        let g = TileGeometry {
            tile: ts,
            stride,
            up: 1,
            down: f,
            blend_extent,
            row_limit: tl - blend_extent,
        };
        g.check_consistent(tile)
    }

    /// diffusers concatenates the kept windows without checking that they tile the output: the
    /// step between tiles in output units must equal `row_limit`, or the result has gaps or
    /// repeats (and the wrong size). Holds when `tile_latent · overlap` is an integer.
    fn check_consistent(self, tile: &TileConfig) -> Result<Self> {
        if self.stride == 0
            || !(self.stride * self.up).is_multiple_of(self.down)
            || self.stride * self.up / self.down != self.row_limit
        {
            return Err(Error::InvalidInput(format!(
                "VAE tiles of {} px with overlap {}: tile origins {} apart do not match the kept \
                 width {} (pick a tile size whose latent side times the overlap is an integer)",
                tile.tile_sample_size, tile.overlap_factor, self.stride, self.row_limit
            )));
        }
        Ok(self)
    }

    /// `for i in range(0, n, overlap_size)`, each tile clipped to the input as slicing does.
    fn spans(&self, n: usize) -> (Vec<Span>, usize) {
        let mut offset = 0;
        let spans = (0..n)
            .step_by(self.stride)
            .map(|start| {
                let len = self.tile.min(n - start);
                let out_len = len * self.up / self.down;
                let s = Span {
                    start,
                    len,
                    out_len,
                    offset,
                };
                offset += self.row_limit.min(out_len);
                s
            })
            .collect();
        (spans, offset)
    }
}

/// Activation memory of a VAE pass, measured by running it on a dry-run twin of the engine
/// ([`Gpu::dry_run`]): every tensor the real pass would allocate, as the pool would size it;
/// weights are not included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivationBytes {
    /// The largest single tensor: it has to fit one storage binding.
    pub largest: u64,
    /// The most bytes alive at once (the caller's input, tensors held for residuals, outputs).
    pub peak: u64,
}

/// `[B, H, W, C]` of a rank-4 shape.
fn dims4(op: &str, shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        [b, h, w, c] => Ok([b, h, w, c]),
        _ => Err(Error::shape(op, format!("{shape:?} must be [B, H, W, C]"))),
    }
}

impl AutoencoderKL {
    /// Run `pass` on an input of `shape` on a dry-run twin of `gpu` and report what it
    /// allocated. Nothing is computed: the kernels' wrappers take the same decisions (variant,
    /// scratch, fused or unfused attention) as on `gpu` and allocate the same tensors, so the
    /// measurement follows the code whatever a block does, with no model of it to keep in step.
    fn measure(
        &self,
        gpu: &Gpu,
        shape: [usize; 4],
        pass: &dyn Fn(&Gpu, &Tensor) -> Result<Tensor>,
    ) -> Result<ActivationBytes> {
        let probe = gpu.dry_run()?;
        let input = probe.empty(&shape, self.dtype)?; // the caller's input, held throughout
        drop(pass(&probe, &input)?);
        let stats = probe.pool_stats();
        Ok(ActivationBytes {
            largest: stats.largest_buffer,
            peak: stats.peak_live_bytes,
        })
    }

    /// Activations of [`decode`](Self::decode) on latents [batch, h, w, L], measured.
    pub fn decoder_activation_bytes(
        &self,
        gpu: &Gpu,
        batch: usize,
        h: usize,
        w: usize,
    ) -> Result<ActivationBytes> {
        let shape = [batch, h, w, self.config.latent_channels];
        self.measure(gpu, shape, &|g, z| self.decode(g, z))
    }

    /// Activations of [`encode_moments`](Self::encode_moments) on an image [batch, h, w, 3],
    /// measured.
    pub fn encoder_activation_bytes(
        &self,
        gpu: &Gpu,
        batch: usize,
        h: usize,
        w: usize,
    ) -> Result<ActivationBytes> {
        let shape = [batch, h, w, self.config.in_channels];
        self.measure(gpu, shape, &|g, x| self.encode_moments(g, x))
    }

    /// Activations of a whole tiled pass (every tile's forward, the blending, the assembled
    /// output), measured.
    fn tiled_bytes(
        &self,
        gpu: &Gpu,
        geo: &TileGeometry,
        shape: [usize; 4],
        decode: bool,
    ) -> Result<ActivationBytes> {
        if decode {
            let c = self.config.out_channels;
            self.measure(gpu, shape, &|g, z| {
                self.run_tiled(g, z, geo, c, &|t| self.decode(g, t))
            })
        } else {
            let c = 2 * self.config.latent_channels;
            self.measure(gpu, shape, &|g, x| {
                self.run_tiled(g, x, geo, c, &|t| self.encode_moments(g, t))
            })
        }
    }

    /// `Ok` when `bytes` fits the device's bindings and the memory budget.
    fn check_fit(&self, gpu: &Gpu, what: &str, bytes: ActivationBytes) -> Result<()> {
        let binding = gpu.caps.max_storage_binding.min(gpu.caps.max_buffer);
        if bytes.largest > binding {
            return Err(Error::LimitExceeded {
                what: format!("{what}: largest activation as one storage binding"),
                requested: bytes.largest,
                limit: binding,
                hint: "use a smaller image size or batch, or smaller VAE tiles".into(),
            });
        }
        if let Some(budget) = self.memory_budget {
            if bytes.peak > budget {
                return Err(Error::LimitExceeded {
                    what: format!("{what}: activation memory"),
                    requested: bytes.peak,
                    limit: budget,
                    hint: "raise the VAE memory budget, or use a smaller image size or batch"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// The tile the automatic paths use: the config's (diffusers' default), halved until one
    /// tile's activations fit; `LimitExceeded` when even the smallest does not.
    fn choose_tile(&self, gpu: &Gpu, shape: [usize; 4], decode: bool) -> Result<TileConfig> {
        let f = self.config.downscale();
        let mut tile = TileConfig::from_config(&self.config);
        let mut last_err = None;
        while tile.tile_sample_size >= MIN_TILE_LATENT * f {
            let geo = if decode {
                TileGeometry::decode(&tile, f)
            } else {
                TileGeometry::encode(&tile, f)
            };
            if let Ok(geo) = geo {
                let what = format!(
                    "VAE {} tile of {} px",
                    if decode { "decode" } else { "encode" },
                    tile.tile_sample_size
                );
                match self.check_fit(gpu, &what, self.tiled_bytes(gpu, &geo, shape, decode)?) {
                    Ok(()) => return Ok(tile),
                    Err(e) => last_err = Some(e),
                }
            }
            tile.tile_sample_size /= 2;
        }
        Err(last_err.unwrap_or_else(|| {
            Error::Unsupported(format!(
                "no valid VAE tile size below the config's {} px",
                self.config.sample_size
            ))
        }))
    }

    /// `None`: run untiled; `Some(tile)`: tiles of that size. `shape` is the input's [B, H, W, C]
    /// (latents for decode, the image for encode).
    fn plan(
        &self,
        gpu: &Gpu,
        shape: [usize; 4],
        mode: VaeTiling,
        decode: bool,
    ) -> Result<Option<TileConfig>> {
        let [b, h, w, _] = shape;
        if mode == VaeTiling::Off {
            return Ok(None);
        }
        let untiled = if decode {
            self.decoder_activation_bytes(gpu, b, h, w)?
        } else {
            self.encoder_activation_bytes(gpu, b, h, w)?
        };
        let fits = self.check_fit(gpu, "VAE", untiled).is_ok();
        let default_tile =
            self.config.sample_size / if decode { self.config.downscale() } else { 1 };
        let untiled_ok = match mode {
            VaeTiling::Off => return Ok(None),
            VaeTiling::Auto => fits,
            // diffusers `_decode` / `_encode` with `use_tiling`: tile only inputs larger than one tile.
            VaeTiling::On => fits && h <= default_tile && w <= default_tile,
        };
        if untiled_ok {
            return Ok(None);
        }
        self.choose_tile(gpu, shape, decode).map(Some)
    }

    /// The decode plan for latents of `z_shape` [B, h, w, L] under `mode`.
    pub fn plan_decode(
        &self,
        gpu: &Gpu,
        z_shape: &[usize],
        mode: VaeTiling,
    ) -> Result<Option<TileConfig>> {
        self.plan(gpu, dims4("vae decode", z_shape)?, mode, true)
    }

    /// The encode plan for an image of `shape` [B, H, W, 3] under `mode`.
    pub fn plan_encode(
        &self,
        gpu: &Gpu,
        shape: &[usize],
        mode: VaeTiling,
    ) -> Result<Option<TileConfig>> {
        self.plan(gpu, dims4("vae encode", shape)?, mode, false)
    }

    /// Cut `x` into overlapping tiles, run `forward` on each, blend and assemble (diffusers'
    /// loops, with the blending and the concatenation fused into one kernel per tile).
    fn run_tiled(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        geo: &TileGeometry,
        out_channels: usize,
        forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let [b, h, w, _] = dims4("vae tiled", x.shape())?;
        let (rows, out_h) = geo.spans(h);
        let (cols, out_w) = geo.spans(w);
        let out = gpu.empty(&[b, out_h, out_w, out_channels], self.dtype)?; // [B, H', W', C']
        let mut above_row: Vec<Tensor> = Vec::new();
        for r in &rows {
            let mut row: Vec<Tensor> = Vec::with_capacity(cols.len());
            for (j, c) in cols.iter().enumerate() {
                let input = tiling::crop(gpu, x, r.start, c.start, r.len, c.len)?; // [B, th, tw, C]
                let tile = forward(&input)?; // [B, th', tw', C']
                if tile.shape() != [b, r.out_len, c.out_len, out_channels] {
                    return Err(Error::shape(
                        "vae tiled",
                        format!(
                            "tile output {tile:?} is not [{b}, {}, {}, {out_channels}]",
                            r.out_len, c.out_len
                        ),
                    ));
                }
                let blend = tiling::TileBlend {
                    above: above_row.get(j),
                    left: row.last(),
                    blend_extent: geo.blend_extent,
                    row_limit: geo.row_limit,
                    origin: [r.offset, c.offset],
                };
                tiling::blend_tile_into(gpu, &tile, &blend, &out)?; // tile blended in place
                row.push(tile);
            }
            above_row = row;
        }
        Ok(out)
    }

    /// diffusers `AutoencoderKL.tiled_decode`: latents [B, h, w, L] (scaled as for
    /// [`decode`](Self::decode)) in overlapping tiles of `tile.tile_sample_size / f` latents,
    /// each decoded alone and blended with linear ramps into its neighbours -> [B, H, W, 3].
    /// Differs from an untiled decode near the seams (every tile normalises and attends over
    /// itself only), as diffusers' does.
    pub fn decode_tiled(&self, gpu: &Gpu, z: &Tensor, tile: TileConfig) -> Result<Tensor> {
        let shape = dims4("vae decode", z.shape())?;
        let geo = TileGeometry::decode(&tile, self.config.downscale())?;
        let what = format!("VAE decode tile of {} px", tile.tile_sample_size);
        self.check_fit(gpu, &what, self.tiled_bytes(gpu, &geo, shape, true)?)?;
        self.run_tiled(gpu, z, &geo, self.config.out_channels, &|t| {
            self.decode(gpu, t)
        })
    }

    /// diffusers `AutoencoderKL._tiled_encode`: the image [B, H, W, 3] in overlapping tiles of
    /// `tile.tile_sample_size` pixels -> moments [B, H/f, W/f, 2·latent], as
    /// [`encode_moments`](Self::encode_moments).
    pub fn encode_moments_tiled(
        &self,
        gpu: &Gpu,
        image: &Tensor,
        tile: TileConfig,
    ) -> Result<Tensor> {
        let shape = dims4("vae encode", image.shape())?;
        let f = self.config.downscale();
        if !shape[1].is_multiple_of(f) || !shape[2].is_multiple_of(f) {
            return Err(Error::InvalidInput(format!(
                "image size {}×{} is not a multiple of {f}",
                shape[2], shape[1]
            )));
        }
        let geo = TileGeometry::encode(&tile, f)?;
        let what = format!("VAE encode tile of {} px", tile.tile_sample_size);
        self.check_fit(gpu, &what, self.tiled_bytes(gpu, &geo, shape, false)?)?;
        self.run_tiled(gpu, image, &geo, 2 * self.config.latent_channels, &|t| {
            self.encode_moments(gpu, t)
        })
    }

    /// Decode untiled when the activations fit the device's bindings and the memory budget,
    /// tiled otherwise (see [`VaeTiling::Auto`]).
    pub fn decode_auto(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        self.decode_with(gpu, z, VaeTiling::Auto)
    }

    /// Encode untiled when the activations fit, tiled otherwise.
    pub fn encode_moments_auto(&self, gpu: &Gpu, image: &Tensor) -> Result<Tensor> {
        self.encode_moments_with(gpu, image, VaeTiling::Auto)
    }

    pub fn decode_with(&self, gpu: &Gpu, z: &Tensor, mode: VaeTiling) -> Result<Tensor> {
        match self.plan_decode(gpu, z.shape(), mode)? {
            None => self.decode(gpu, z),
            Some(tile) => self.decode_tiled(gpu, z, tile),
        }
    }

    pub fn encode_moments_with(
        &self,
        gpu: &Gpu,
        image: &Tensor,
        mode: VaeTiling,
    ) -> Result<Tensor> {
        match self.plan_encode(gpu, image.shape(), mode)? {
            None => self.encode_moments(gpu, image),
            Some(tile) => self.encode_moments_tiled(gpu, image, tile),
        }
    }
}
