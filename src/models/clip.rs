//! CLIP text encoder: a port of transformers' `CLIPTextModel` (modeling_clip.py) as Stable
//! Diffusion uses it — SD 1.x (ViT-L/14 text, quick_gelu) and SD 2.x (OpenCLIP ViT-H text,
//! gelu, exported with 23 layers). Causal self-attention; `clip_skip` as diffusers applies it.

use serde_json::Value;

use crate::kernels::attention::HeadsView;
use crate::kernels::elementwise;
use crate::kernels::matmul::Activation;
use crate::models::config::Config;
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
        let c = Config::new("text_encoder", v);
        let act = c.str_or("hidden_act", "quick_gelu")?;
        let hidden_act = match act {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(Error::Unsupported(format!(
                    "text encoder hidden_act `{other}`"
                )))
            }
        };
        let cfg = ClipConfig {
            vocab_size: c.usize("vocab_size")?,
            hidden_size: c.usize("hidden_size")?,
            intermediate_size: c.usize("intermediate_size")?,
            num_hidden_layers: c.usize("num_hidden_layers")?,
            num_attention_heads: c.usize("num_attention_heads")?,
            max_position_embeddings: c.usize_or("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps: c.f64_in("layer_norm_eps", 1e-5, 1e-12..=1.0)? as f32,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::Unsupported(format!(
                "text encoder hidden_size {} not divisible by {} heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        Ok(cfg)
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
            position_embedding,
            layers,
            final_layer_norm,
            dtype,
            lora_sites: sites.into_inner(),
        })
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
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} outside the vocabulary ({})",
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
        for (first_id, table) in &self.token_embedding {
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
