//! diffusers `AutoencoderTiny` (TAESD / TAESDXL by madebyollin): a small conv-only autoencoder
//! with SD's latent space, for live previews and fast decoding. Ports `EncoderTiny`,
//! `DecoderTiny` and `AutoencoderTinyBlock` (diffusers/models/autoencoders/vae.py,
//! models/unets/unet_2d_blocks.py).
//!
//! Conventions, as diffusers applies them: the decoder takes the latents the U-Net works on
//! (AutoencoderTiny's `scaling_factor` is 1.0), soft-clamps them with `3·tanh(x/3)`, and returns
//! the image in [-1, 1] (`x·2 - 1` of its [0, 1] output); the encoder takes the image in [-1, 1]
//! and first maps it to [0, 1]. Weights come from a diffusers folder (`encoder.layers.N.…`,
//! `decoder.layers.N.…`) or the original `taesd_encoder.safetensors` / `taesd_decoder.safetensors`
//! (`N.…`, the decoder's indices one higher: its `Clamp` is module 0 there).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::config::{parse, require_str, size_or, sizes, Number, Size};
use crate::kernels::elementwise;
use crate::nn::{Conv2d, Conv2dConfig, VarBuilder};
use crate::weights::store::Entry;
use crate::weights::{SafetensorsFile, Transform, WeightStore};
use crate::{DType, Error, Gpu, Result, Tensor};

/// `AutoencoderTiny`'s config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct TaesdConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub latent_magnitude: f64,
    pub latent_shift: f64,
    pub scaling_factor: f64,
}

/// An `AutoencoderTiny` `config.json` as diffusers writes it (the keys we read).
#[derive(Debug, Deserialize)]
struct TaesdConfigFile {
    in_channels: Option<Size>,
    out_channels: Option<Size>,
    latent_channels: Option<Size>,
    encoder_block_out_channels: Option<Vec<Size>>,
    decoder_block_out_channels: Option<Vec<Size>>,
    num_encoder_blocks: Option<Vec<Size>>,
    num_decoder_blocks: Option<Vec<Size>>,
    act_fn: Option<String>,
    upsample_fn: Option<String>,
    upsampling_scaling_factor: Option<Size>,
    #[serde(default)]
    latent_magnitude: Number,
    #[serde(default)]
    latent_shift: Number,
    #[serde(default)]
    scaling_factor: Number,
}

impl TaesdConfig {
    /// TAESD for SD 1.x/2.x and TAESDXL share this architecture (diffusers' defaults).
    pub fn taesd() -> TaesdConfig {
        TaesdConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            scaling_factor: 1.0,
        }
    }

    /// From an `AutoencoderTiny` `config.json`; absent keys take TAESD's values.
    pub fn from_json(v: &Value) -> Result<Self> {
        let file: TaesdConfigFile = parse("AutoencoderTiny", v)?;
        for (key, value, want) in [
            ("act_fn", &file.act_fn, "relu"),
            ("upsample_fn", &file.upsample_fn, "nearest"),
        ] {
            require_str("AutoencoderTiny", key, value, want)?;
        }
        if size_or(file.upsampling_scaling_factor, 2) != 2 {
            return Err(Error::Unsupported(
                "AutoencoderTiny upsampling_scaling_factor other than 2".into(),
            ));
        }
        let d = TaesdConfig::taesd();
        let list = |v: Option<Vec<Size>>, default: Vec<usize>| v.map_or(default, |l| sizes(&l));
        const WHAT: &str = "AutoencoderTiny";
        let config = TaesdConfig {
            in_channels: size_or(file.in_channels, d.in_channels),
            out_channels: size_or(file.out_channels, d.out_channels),
            latent_channels: size_or(file.latent_channels, d.latent_channels),
            encoder_block_out_channels: list(
                file.encoder_block_out_channels,
                d.encoder_block_out_channels,
            ),
            decoder_block_out_channels: list(
                file.decoder_block_out_channels,
                d.decoder_block_out_channels,
            ),
            num_encoder_blocks: list(file.num_encoder_blocks, d.num_encoder_blocks),
            num_decoder_blocks: list(file.num_decoder_blocks, d.num_decoder_blocks),
            latent_magnitude: file.latent_magnitude.within(
                WHAT,
                "latent_magnitude",
                d.latent_magnitude,
                1e-3..=1e3,
            )?,
            latent_shift: file.latent_shift.within(
                WHAT,
                "latent_shift",
                d.latent_shift,
                -16.0..=16.0,
            )?,
            scaling_factor: file.scaling_factor.within(
                WHAT,
                "scaling_factor",
                d.scaling_factor,
                1e-4..=100.0,
            )?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::config("AutoencoderTiny", why));
        let levels = self.num_decoder_blocks.len();
        if levels == 0 || levels > 8 || self.decoder_block_out_channels.len() != levels {
            return bad(format!(
                "num_decoder_blocks {:?} and decoder_block_out_channels {:?} must have the same length, 1 to 8",
                self.num_decoder_blocks, self.decoder_block_out_channels
            ));
        }
        if self.num_encoder_blocks.len() != self.encoder_block_out_channels.len()
            || self.num_encoder_blocks.len() > 8
        {
            return bad(
                "num_encoder_blocks and encoder_block_out_channels differ in length".into(),
            );
        }
        let sizes = [self.in_channels, self.out_channels, self.latent_channels]
            .into_iter()
            .chain(self.encoder_block_out_channels.iter().copied())
            .chain(self.decoder_block_out_channels.iter().copied());
        if sizes.clone().any(|c| c == 0 || c > 4096) {
            return bad("channel counts must be 1..=4096".into());
        }
        if self
            .num_encoder_blocks
            .iter()
            .chain(&self.num_decoder_blocks)
            .any(|&n| n > 64)
        {
            return bad("more than 64 blocks per level".into());
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad(format!(
                "scaling_factor {} must be finite and positive",
                self.scaling_factor
            ));
        }
        Ok(())
    }

    /// Pixels per latent pixel along each side: 2^(levels - 1).
    pub fn factor(&self) -> usize {
        1 << (self.num_decoder_blocks.len() - 1)
    }
}

/// A conv with "same" padding (kernel / 2), as every TAESD conv has.
fn conv(
    vb: VarBuilder<'_>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        cin,
        cout,
        kernel,
        stride,
        padding: kernel / 2,
    };
    Conv2d::load(vb, cfg)
}

/// diffusers `AutoencoderTinyBlock`: `relu(conv(relu(conv(relu(conv(x))))) + skip(x))`.
pub struct AutoencoderTinyBlock {
    conv: [Conv2d; 3],
    /// 1×1 conv without bias where the channel count changes, identity otherwise.
    skip: Option<Conv2d>,
}

impl AutoencoderTinyBlock {
    fn load(vb: VarBuilder<'_>, cin: usize, cout: usize) -> Result<Self> {
        let c = vb.pp("conv");
        Ok(AutoencoderTinyBlock {
            conv: [
                conv(c.pp("0"), cin, cout, 3, 1)?,
                conv(c.pp("2"), cout, cout, 3, 1)?,
                conv(c.pp("4"), cout, cout, 3, 1)?,
            ],
            skip: if cin != cout {
                Some(conv(vb.pp("skip"), cin, cout, 1, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let h = elementwise::relu(gpu, &self.conv[0].forward(gpu, x)?)?; // [B, H, W, C]
        let h = elementwise::relu(gpu, &self.conv[1].forward(gpu, &h)?)?;
        let skip = match &self.skip {
            Some(s) => s.forward(gpu, x)?,
            None => x.clone(),
        };
        let h = self.conv[2].forward_residual(gpu, &h, &skip)?; // conv + skip, fused
        elementwise::relu(gpu, &h)
    }
}

/// One entry of an `nn.Sequential` of the tiny autoencoder.
enum Layer {
    Conv(Conv2d),
    Relu,
    Block(Box<AutoencoderTinyBlock>),
    /// `nn.Upsample(scale_factor=2, mode="nearest")` followed by its 3×3 conv: one fused kernel.
    UpsampleConv(Conv2d),
}

fn run(layers: &[Layer], gpu: &Gpu, mut x: Tensor) -> Result<Tensor> {
    for layer in layers {
        x = match layer {
            Layer::Conv(c) => c.forward(gpu, &x)?,
            Layer::Relu => elementwise::relu(gpu, &x)?,
            Layer::Block(b) => b.forward(gpu, &x)?,
            Layer::UpsampleConv(c) => c.forward_upsampled(gpu, &x)?,
        };
    }
    Ok(x)
}

/// diffusers `DecoderTiny`.
pub struct DecoderTiny {
    layers: Vec<Layer>,
}

impl DecoderTiny {
    fn load(vb: VarBuilder<'_>, c: &TaesdConfig) -> Result<Self> {
        let mut layers = Vec::new();
        let chans = &c.decoder_block_out_channels;
        // Sequential indices: each conv, ReLU, block and Upsample takes one.
        let mut index = 0usize;
        let mut next = || {
            index += 1;
            (index - 1).to_string()
        };
        layers.push(Layer::Conv(conv(
            vb.pp(&next()),
            c.latent_channels,
            chans[0],
            3,
            1,
        )?));
        next(); // ReLU
        layers.push(Layer::Relu);
        let last = chans.len() - 1;
        for (i, (&n, &ch)) in c.num_decoder_blocks.iter().zip(chans).enumerate() {
            for _ in 0..n {
                let block = AutoencoderTinyBlock::load(vb.pp(&next()), ch, ch)?;
                layers.push(Layer::Block(Box::new(block)));
            }
            if i < last {
                next(); // Upsample
                        // The conv keeps the level's width (diffusers: `conv_out_channel = num_channels`).
                layers.push(Layer::UpsampleConv(conv(vb.pp(&next()), ch, ch, 3, 1)?));
            } else {
                layers.push(Layer::Conv(conv(vb.pp(&next()), ch, c.out_channels, 3, 1)?));
            }
        }
        Ok(DecoderTiny { layers })
    }

    /// Latents [B, h, w, C] (as the U-Net sees them) → image [B, H, W, 3] in [-1, 1].
    pub fn forward(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        let x = elementwise::tanh_clamp(gpu, latents, 3.0)?; // torch.tanh(x / 3) * 3
        let x = run(&self.layers, gpu, x)?; // [B, H, W, 3] in [0, 1]
        elementwise::affine(gpu, &x, 2.0, -1.0) // x.mul(2).sub(1)
    }
}

/// diffusers `EncoderTiny`.
pub struct EncoderTiny {
    layers: Vec<Layer>,
}

impl EncoderTiny {
    fn load(vb: VarBuilder<'_>, c: &TaesdConfig) -> Result<Self> {
        let mut layers = Vec::new();
        let chans = &c.encoder_block_out_channels;
        let mut index = 0usize;
        let mut next = || {
            index += 1;
            (index - 1).to_string()
        };
        for (i, (&n, &ch)) in c.num_encoder_blocks.iter().zip(chans).enumerate() {
            let first = if i == 0 {
                conv(vb.pp(&next()), c.in_channels, ch, 3, 1)?
            } else {
                conv(vb.pp(&next()), ch, ch, 3, 2)? // stride 2, no bias
            };
            layers.push(Layer::Conv(first));
            for _ in 0..n {
                let block = AutoencoderTinyBlock::load(vb.pp(&next()), ch, ch)?;
                layers.push(Layer::Block(Box::new(block)));
            }
        }
        let last = *chans.last().expect("validated");
        layers.push(Layer::Conv(conv(
            vb.pp(&next()),
            last,
            c.latent_channels,
            3,
            1,
        )?));
        Ok(EncoderTiny { layers })
    }

    /// Image [B, H, W, 3] in [-1, 1] → latents [B, H/f, W/f, C] as the U-Net sees them.
    pub fn forward(&self, gpu: &Gpu, image: &Tensor) -> Result<Tensor> {
        let x = elementwise::affine(gpu, image, 0.5, 0.5)?; // x.add(1).div(2)
        run(&self.layers, gpu, x)
    }
}

/// diffusers `AutoencoderTiny`: either half may be absent (the original TAESD ships them as two
/// files, and a preview needs only the decoder).
pub struct AutoencoderTiny {
    pub config: TaesdConfig,
    /// The storage dtype of its weights; inputs of another dtype are cast to it.
    pub dtype: DType,
    pub encoder: Option<EncoderTiny>,
    pub decoder: Option<DecoderTiny>,
}

impl AutoencoderTiny {
    /// From a store with diffusers keys (`encoder.layers.…`, `decoder.layers.…`).
    pub fn load(gpu: &Gpu, store: &WeightStore, config: TaesdConfig, dtype: DType) -> Result<Self> {
        gpu.require_dtype(dtype)?;
        let has = |prefix: &str| store.keys().any(|k| k.starts_with(prefix));
        let encoder = if has("encoder.") {
            let vb = VarBuilder::new(gpu, &store.pp("encoder.layers"), dtype);
            Some(EncoderTiny::load(vb, &config)?)
        } else {
            None
        };
        let decoder = if has("decoder.") {
            let vb = VarBuilder::new(gpu, &store.pp("decoder.layers"), dtype);
            Some(DecoderTiny::load(vb, &config)?)
        } else {
            None
        };
        if encoder.is_none() && decoder.is_none() {
            return Err(Error::config(
                store.name(),
                "no `encoder.layers.*` or `decoder.layers.*` tensors: not an AutoencoderTiny",
            ));
        }
        Ok(AutoencoderTiny {
            config,
            dtype,
            encoder,
            decoder,
        })
    }

    /// Open a diffusers `AutoencoderTiny` folder (config.json + diffusion_pytorch_model.safetensors)
    /// or a folder / file path holding the original `taesd_decoder.safetensors` and/or
    /// `taesd_encoder.safetensors` (TAESDXL: `taesdxl_…`).
    pub fn open(gpu: &Gpu, path: &Path, dtype: DType) -> Result<Self> {
        let io = |p: &Path, e: String| Error::io(p, e);
        if !path.exists() {
            return Err(io(
                path,
                "not found: expected an AutoencoderTiny folder or a TAESD file".into(),
            ));
        }
        let folder_weights = path.join("diffusion_pytorch_model.safetensors");
        if path.is_dir() && folder_weights.is_file() {
            let config_path = path.join("config.json");
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| io(&config_path, e.to_string()))?;
            let json: Value = super::config::parse_python_json(&text)
                .map_err(|e| io(&config_path, e.to_string()))?;
            let file = Arc::new(SafetensorsFile::open(&folder_weights)?);
            let store = WeightStore::from_files("AutoencoderTiny", vec![file])?;
            return Self::load(gpu, &store, TaesdConfig::from_json(&json)?, dtype);
        }
        // Original files: the decoder's Sequential starts with Clamp (index 0), ours without.
        let candidates: Vec<std::path::PathBuf> = if path.is_dir() {
            ["taesd", "taesdxl", "taesd3", "taef1"]
                .iter()
                .flat_map(|stem| {
                    ["encoder", "decoder"]
                        .map(|half| path.join(format!("{stem}_{half}.safetensors")))
                })
                .filter(|p| p.is_file())
                .collect()
        } else {
            vec![path.to_path_buf()]
        };
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        for p in &candidates {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let (prefix, shift) = if name.contains("decoder") {
                ("decoder.layers", 1)
            } else if name.contains("encoder") {
                ("encoder.layers", 0)
            } else {
                return Err(io(
                    p,
                    "not a TAESD file (its name says neither encoder nor decoder)".into(),
                ));
            };
            let file = Arc::new(SafetensorsFile::open(p)?);
            for key in file.names() {
                let (index, rest) = key
                    .split_once('.')
                    .and_then(|(i, r)| Some((i.parse::<usize>().ok()?, r)))
                    .ok_or_else(|| io(p, format!("unexpected tensor `{key}` for a TAESD file")))?;
                let index = index.checked_sub(shift).ok_or_else(|| {
                    io(
                        p,
                        format!("unexpected tensor `{key}` (module 0 is the clamp)"),
                    )
                })?;
                entries.insert(
                    format!("{prefix}.{index}.{rest}"),
                    Entry {
                        file: files.len(),
                        source_key: key.to_string(),
                        transform: Transform::None,
                    },
                );
            }
            files.push(file);
        }
        if files.is_empty() {
            return Err(Error::io(
                path,
                "no AutoencoderTiny here: expected a diffusers folder (config.json + \
                 diffusion_pytorch_model.safetensors) or taesd_decoder.safetensors / taesd_encoder.safetensors",
            ));
        }
        let store = WeightStore::from_entries("TAESD", files, entries)?;
        Self::load(gpu, &store, TaesdConfig::taesd(), dtype)
    }

    /// `x` in this model's dtype (a cast where it differs: the sampler keeps latents in f32).
    fn in_dtype(&self, gpu: &Gpu, x: Tensor) -> Result<Tensor> {
        if x.dtype() == self.dtype {
            Ok(x)
        } else {
            elementwise::cast(gpu, &x, self.dtype)
        }
    }

    /// Latents as the U-Net sees them → image in [-1, 1].
    pub fn decode(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        let decoder = self
            .decoder
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("this tiny autoencoder has no decoder".into()))?;
        let s = self.config.scaling_factor;
        let x = if s == 1.0 {
            latents.clone()
        } else {
            elementwise::scale(gpu, latents, (1.0 / s) as f32)?
        };
        decoder.forward(gpu, &self.in_dtype(gpu, x)?)
    }

    /// Image in [-1, 1] → latents as the U-Net sees them.
    pub fn encode(&self, gpu: &Gpu, image: &Tensor) -> Result<Tensor> {
        let encoder = self
            .encoder
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("this tiny autoencoder has no encoder".into()))?;
        let z = encoder.forward(gpu, &self.in_dtype(gpu, image.clone())?)?;
        let s = self.config.scaling_factor;
        if s == 1.0 {
            Ok(z)
        } else {
            elementwise::scale(gpu, &z, s as f32)
        }
    }
}
