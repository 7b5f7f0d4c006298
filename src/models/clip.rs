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
        let skip = clip_skip.unwrap_or(0);
        // diffusers accepts up to the layer count: clip_skip = layers is the embeddings
        // themselves (through the final layer norm, as every skip is).
        if skip > c.num_hidden_layers {
            return Err(Error::InvalidInput(format!(
                "clip_skip {skip} exceeds the number of layers ({})",
                c.num_hidden_layers
            )));
        }
        let (hsz, heads) = (c.hidden_size, c.num_attention_heads);
        // [B, N, C]
        let mut hidden = gpu.empty(&[batch, tokens, hsz], self.dtype)?;
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
        for layer in &self.layers[..c.num_hidden_layers - skip] {
            // Self-attention block. [B, N, C] -> [B, N, 3C] -> [B, N, C]
            let normed = layer.layer_norm1.forward(gpu, &hidden)?; // [B, N, C]
            let qkv = layer.qkv.forward(gpu, &normed)?; // [B, N, 3C]
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
            let normed = layer.layer_norm2.forward(gpu, &hidden)?; // [B, N, C]
            let mid = layer.fc1.forward_fused(gpu, &normed, c.hidden_act, None)?; // [B, N, I]
            hidden = layer
                .fc2
                .forward_fused(gpu, &mid, Activation::None, Some(&hidden))?;
        }
        // [B, N, C]
        self.final_layer_norm.forward(gpu, &hidden)
    }
}
