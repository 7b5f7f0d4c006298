//! CLIP text encoder: a port of transformers' `CLIPTextModel` (modeling_clip.py) as Stable
//! Diffusion uses it — SD 1.x (ViT-L/14 text, quick_gelu) and SD 2.x (OpenCLIP ViT-H text,
//! gelu, exported with 23 layers). Causal self-attention; `clip_skip` as diffusers applies it.

use serde::Deserialize;
use serde_json::Value;

use crate::kernels::attention::HeadsView;
use crate::kernels::elementwise;
use crate::kernels::matmul::Activation;
use crate::models::config::{parse, size_or, Number, Size};
use crate::nn::{self, AttentionShape, LayerNorm, Linear, VarBuilder};
use crate::weights::WeightView;
use crate::{DType, Error, Gpu, Result, Tensor};

#[derive(Clone, Debug)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f32,
    /// Width of `text_projection` (CLIPTextModelWithProjection).
    pub projection_dim: Option<usize>,
    /// Where the pooled output is taken: transformers' configs from before its PR #24773 say
    /// 2 and pool at the largest id of each row (SDXL's encoders do), later ones pool at the
    /// first occurrence of this id.
    pub eos_token_id: u32,
}

impl ClipConfig {
    /// From `text_encoder/config.json` (transformers CLIPTextConfig).
    pub fn from_json(v: &Value) -> Result<Self> {
        parse::<ClipConfigFile>("text_encoder", v)?.validate()
    }
}

/// `text_encoder/config.json` as transformers writes it (`CLIPTextConfig`; the keys we read).
#[derive(Debug, Deserialize)]
struct ClipConfigFile {
    vocab_size: Size,
    hidden_size: Size,
    intermediate_size: Size,
    num_hidden_layers: Size,
    num_attention_heads: Size,
    max_position_embeddings: Option<Size>,
    hidden_act: Option<String>,
    #[serde(default)]
    layer_norm_eps: Number,
    projection_dim: Option<Size>,
    eos_token_id: Option<Size>,
}

impl ClipConfigFile {
    fn validate(self) -> Result<ClipConfig> {
        let hidden_act = match self.hidden_act.as_deref().unwrap_or("quick_gelu") {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(Error::Unsupported(format!(
                    "text encoder hidden_act `{other}`"
                )))
            }
        };
        let (hidden, heads) = (self.hidden_size.0, self.num_attention_heads.0);
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(Error::Unsupported(format!(
                "text encoder hidden_size {hidden} not divisible by {heads} heads"
            )));
        }
        Ok(ClipConfig {
            vocab_size: self.vocab_size.0,
            hidden_size: hidden,
            intermediate_size: self.intermediate_size.0,
            num_hidden_layers: self.num_hidden_layers.0,
            num_attention_heads: heads,
            max_position_embeddings: size_or(self.max_position_embeddings, 77),
            hidden_act,
            layer_norm_eps: self.layer_norm_eps.within(
                "text_encoder",
                "layer_norm_eps",
                1e-5,
                1e-12..=1.0,
            )? as f32,
            projection_dim: self.projection_dim.map(|s| s.0),
            // CLIPTextConfig's default.
            eos_token_id: size_or(self.eos_token_id, 49407) as u32,
        })
    }
}

/// Upload the [vocab, hidden] token table in row slices that each fit one storage binding.
fn load_token_table(
    gpu: &Gpu,
    vb: &WeightView<'_>,
    vocab: usize,
    hidden: usize,
    dtype: DType,
) -> Result<Vec<(usize, Tensor)>> {
    let t = vb.get("weight", &[vocab, hidden])?;
    let row_bytes = (hidden * dtype.size()).max(1) as u64;
    // Whole 256-byte granules, since the pool rounds buffer sizes up to them.
    let limit = gpu.caps.max_storage_binding.min(gpu.caps.max_buffer) / 256 * 256;
    let rows_per_slice = ((limit / row_bytes) as usize).clamp(1, vocab.max(1));
    // Exact for every source dtype; `upload` rounds to f16 when that is the compute dtype.
    let all = t.to_f32_vec();
    let mut slices = Vec::new();
    for first in (0..vocab).step_by(rows_per_slice) {
        let rows = rows_per_slice.min(vocab - first);
        let data = &all[first * hidden..(first + rows) * hidden];
        slices.push((first, gpu.upload(data, &[rows, hidden], dtype)?));
    }
    Ok(slices)
}

/// CLIPEncoderLayer: pre-norm self-attention and MLP, each with a residual.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// q_proj, k_proj and v_proj fused into one [3C, C] linear.
    qkv: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTextModel {
    pub config: ClipConfig,
    /// The token table in row slices `(first id, rows)`, each within one storage binding
    /// (CLIP-L's table in f32 is 145 MiB, over the common 128 MiB limit).
    token_embedding: Vec<(usize, Tensor)>,
    /// Textual-inversion vectors as rows of ids `vocab_size..vocab_size + n` (see
    /// [`set_extra_tokens`](Self::set_extra_tokens)): `(n, [n, C])`.
    extra_tokens: Option<(usize, Tensor)>,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    pub dtype: DType,
    /// The linear weights a LoRA may change (q/k/v as row blocks of the fused projection).
    pub lora_sites: Vec<nn::WeightSite>,
}

impl ClipTextModel {
    /// `vb` is the text encoder's root view (keys `text_model.*`).
    pub fn load(gpu: &Gpu, vb: &WeightView<'_>, config: ClipConfig, dtype: DType) -> Result<Self> {
        let c = &config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let sites = std::cell::RefCell::new(Vec::new());
        let tm = VarBuilder::new(gpu, vb, dtype)
            .recording_sites(&sites)
            .pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = load_token_table(
            gpu,
            emb.pp("token_embedding").view(),
            c.vocab_size,
            h,
            dtype,
        )?;
        let position_embedding = emb
            .pp("position_embedding")
            .get("weight", &[c.max_position_embeddings, h])?;
        let eps = c.layer_norm_eps;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let lv = tm.pp("encoder.layers").pp(&l.to_string());
            let attn = lv.pp("self_attn");
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(lv.pp("layer_norm1"), h, eps)?,
                qkv: Linear::load_fused(
                    attn.clone(),
                    &["q_proj", "k_proj", "v_proj"],
                    h,
                    &[h, h, h],
                    true,
                )?,
                out_proj: Linear::load(attn.pp("out_proj"), h, h, true)?,
                layer_norm2: LayerNorm::load(lv.pp("layer_norm2"), h, eps)?,
                fc1: Linear::load(lv.pp("mlp.fc1"), h, i, true)?,
                fc2: Linear::load(lv.pp("mlp.fc2"), i, h, true)?,
            });
        }
        let final_layer_norm = LayerNorm::load(tm.pp("final_layer_norm"), h, eps)?;
        Ok(ClipTextModel {
            config,
            token_embedding,
            extra_tokens: None,
            position_embedding,
            layers,
            final_layer_norm,
            dtype,
            lora_sites: sites.into_inner(),
        })
    }

    /// Give the token table `count` more rows (ids `vocab_size..vocab_size + count`) holding
    /// `rows` ([count, hidden] row-major): textual-inversion vectors, as diffusers'
    /// `load_textual_inversion` resizes the embedding. Replaces any earlier set; `count` 0
    /// removes them.
    pub fn set_extra_tokens(&mut self, gpu: &Gpu, rows: &[f32], count: usize) -> Result<()> {
        let width = self.config.hidden_size;
        if rows.len() != count * width {
            return Err(Error::shape(
                "clip extra tokens",
                format!("{} values for {count} rows of {width}", rows.len()),
            ));
        }
        self.extra_tokens = match count {
            0 => None,
            _ => Some((count, gpu.upload(rows, &[count, width], self.dtype)?)),
        };
        Ok(())
    }

    /// Token ids this encoder can embed: the vocabulary plus any extra tokens.
    pub fn token_count(&self) -> usize {
        self.config.vocab_size + self.extra_tokens.as_ref().map_or(0, |(n, _)| *n)
    }

    /// Encode `ids` ([batch, tokens] row-major, tokens ≤ max_position_embeddings).
    ///
    /// `clip_skip` follows diffusers' `encode_prompt`: None (or 0) gives the last hidden state
    /// after the final layer norm; k ≥ 1 takes the hidden state k layers before the last and
    /// applies the final layer norm to it. Returns [batch, tokens, hidden].
    pub fn forward(
        &self,
        gpu: &Gpu,
        ids: &[u32],
        batch: usize,
        clip_skip: Option<usize>,
    ) -> Result<Tensor> {
        let skip = clip_skip.unwrap_or(0);
        // diffusers accepts up to the layer count: clip_skip = layers is the embeddings
        // themselves (through the final layer norm, as every skip is).
        if skip > self.config.num_hidden_layers {
            return Err(Error::InvalidInput(format!(
                "clip_skip {skip} exceeds the number of layers ({})",
                self.config.num_hidden_layers
            )));
        }
        let layers = self.config.num_hidden_layers - skip;
        let hidden = self.hidden_states(gpu, ids, batch, layers)?; // [B, N, C]
        self.final_layer_norm.forward(gpu, &hidden) // [B, N, C]
    }

    /// `hidden_states[layers]` of transformers' `output_hidden_states` (0: the embeddings, i:
    /// after encoder layer i), without the final layer norm: [batch, tokens, hidden].
    pub fn hidden_states(
        &self,
        gpu: &Gpu,
        ids: &[u32],
        batch: usize,
        layers: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        if batch == 0 || !ids.len().is_multiple_of(batch) {
            return Err(Error::shape(
                "clip",
                format!("{} ids for batch {batch}", ids.len()),
            ));
        }
        let tokens = ids.len() / batch;
        if tokens > c.max_position_embeddings {
            return Err(Error::shape(
                "clip",
                format!(
                    "{tokens} tokens exceed max_position_embeddings {}",
                    c.max_position_embeddings
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.token_count()) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} outside the vocabulary ({}) and the embeddings' tokens",
                c.vocab_size
            )));
        }
        if layers > c.num_hidden_layers {
            return Err(Error::InvalidInput(format!(
                "hidden state {layers} of a {}-layer text encoder",
                c.num_hidden_layers
            )));
        }
        // [B, N, C]
        let hidden = gpu.empty(&[batch, tokens, c.hidden_size], self.dtype)?;
        let extra = self
            .extra_tokens
            .as_ref()
            .map(|(_, rows)| (c.vocab_size, rows.clone()));
        for (first_id, table) in self.token_embedding.iter().chain(extra.as_ref()) {
            elementwise::embed_tokens_slice_into(
                gpu,
                ids,
                batch,
                table,
                *first_id,
                &self.position_embedding,
                &hidden,
            )?;
        }
        self.run_layers(gpu, hidden, 0, layers)
    }

    /// Encoder layers `from..to` applied to `hidden` ([B, N, C], `hidden_states[from]`):
    /// returns `hidden_states[to]`.
    fn run_layers(&self, gpu: &Gpu, mut hidden: Tensor, from: usize, to: usize) -> Result<Tensor> {
        let c = &self.config;
        let (batch, tokens) = (hidden.dim(0), hidden.dim(1));
        let (hsz, heads) = (c.hidden_size, c.num_attention_heads);
        for layer in &self.layers[from..to] {
            // Self-attention block. [B, N, C] -> [B, N, 3C] -> [B, N, C]; each LayerNorm is
            // applied by the next projection as it loads `hidden` (no normalised tensor).
            let qkv = layer.qkv.forward_normed(
                gpu,
                &layer.layer_norm1,
                &hidden,
                Activation::None,
                None,
            )?; // [B, N, 3C]
            let view = |offset| HeadsView {
                tensor: &qkv,
                tokens,
                row_stride: 3 * hsz,
                offset,
            };
            let shape = AttentionShape {
                batch,
                heads,
                head_dim: hsz / heads,
                causal: true,
            };
            let attn = nn::multi_head_attention(gpu, view(0), view(hsz), view(2 * hsz), shape)?; // [B, N, C]
            hidden = layer
                .out_proj
                .forward_fused(gpu, &attn, Activation::None, Some(&hidden))?;
            // MLP block. [B, N, C] -> [B, N, I] -> [B, N, C]
            let mid =
                layer
                    .fc1
                    .forward_normed(gpu, &layer.layer_norm2, &hidden, c.hidden_act, None)?; // [B, N, I]
            hidden = layer
                .fc2
                .forward_fused(gpu, &mid, Activation::None, Some(&hidden))?;
        }
        Ok(hidden)
    }

    /// The hidden state SDXL's `encode_prompt` takes from each encoder:
    /// `hidden_states[-(clip_skip + 2)]` (the penultimate layer's output for `None`), with no
    /// final layer norm — unlike SD 1.x's clip_skip path. [batch, tokens, hidden].
    pub fn penultimate(
        &self,
        gpu: &Gpu,
        ids: &[u32],
        batch: usize,
        clip_skip: Option<usize>,
    ) -> Result<Tensor> {
        let back = clip_skip.unwrap_or(0) + 1;
        let layers = self.config.num_hidden_layers;
        if back > layers {
            return Err(Error::InvalidInput(format!(
                "clip_skip {} reaches past the first of {layers} layers",
                back - 1
            )));
        }
        self.hidden_states(gpu, ids, batch, layers - back)
    }

    /// The row of each sequence transformers' CLIPTextTransformer pools at: the largest id
    /// when the config's eos_token_id is the legacy 2, else the first `eos_token_id`
    /// (position 0 when there is none, as `argmax` of all zeros gives).
    pub fn pooled_positions(&self, ids: &[u32], batch: usize) -> Vec<u32> {
        let tokens = ids.len() / batch.max(1);
        ids.chunks(tokens.max(1))
            .map(|row| {
                let at = if self.config.eos_token_id == 2 {
                    // torch's argmax returns the first of equal maxima.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max)
                } else {
                    row.iter().position(|&id| id == self.config.eos_token_id)
                };
                at.unwrap_or(0) as u32
            })
            .collect()
    }
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's second text encoder, OpenCLIP bigG):
/// a CLIPTextModel whose pooled output goes through `text_projection` (no bias).
pub struct ClipTextModelWithProjection {
    pub text_model: ClipTextModel,
    text_projection: Linear,
    pub projection_dim: usize,
}

impl ClipTextModelWithProjection {
    /// `vb` is the encoder's root view (keys `text_model.*`, `text_projection.weight`).
    pub fn load(gpu: &Gpu, vb: &WeightView<'_>, config: ClipConfig, dtype: DType) -> Result<Self> {
        let Some(projection_dim) = config.projection_dim else {
            return Err(Error::config(
                "text_encoder_2",
                "a CLIPTextModelWithProjection config needs `projection_dim`",
            ));
        };
        let hidden = config.hidden_size;
        let text_projection = Linear::load(
            VarBuilder::new(gpu, vb, dtype).pp("text_projection"),
            hidden,
            projection_dim,
            false,
        )?;
        Ok(ClipTextModelWithProjection {
            text_model: ClipTextModel::load(gpu, vb, config, dtype)?,
            text_projection,
            projection_dim,
        })
    }

    /// What SDXL's `encode_prompt` takes from this encoder in one pass: the hidden state
    /// [`ClipTextModel::penultimate`] gives [batch, tokens, hidden], and `text_embeds`, the
    /// projected pooled output [batch, projection_dim] (final layer norm, the row
    /// [`ClipTextModel::pooled_positions`] names, `text_projection`).
    pub fn forward_sdxl(
        &self,
        gpu: &Gpu,
        ids: &[u32],
        batch: usize,
        clip_skip: Option<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let tm = &self.text_model;
        let layers = tm.config.num_hidden_layers;
        let back = clip_skip.unwrap_or(0) + 1;
        if back > layers {
            return Err(Error::InvalidInput(format!(
                "clip_skip {} reaches past the first of {layers} layers",
                back - 1
            )));
        }
        let taken = tm.hidden_states(gpu, ids, batch, layers - back)?; // [B, N, C]
        let last = tm.run_layers(gpu, taken.clone(), layers - back, layers)?; // [B, N, C]
        let normed = tm.final_layer_norm.forward(gpu, &last)?; // [B, N, C]
        let pooled = elementwise::gather_rows(gpu, &normed, &tm.pooled_positions(ids, batch))?; // [B, C]
        let text_embeds = self.text_projection.forward(gpu, &pooled)?; // [B, P]
        Ok((taken, text_embeds))
    }
}
