//! Every checkpoint key renaming in ldm-wgpu, and config inference from tensor shapes.
//!
//! Single-file CompVis/LDM checkpoints name tensors after the original `ldm` modules; diffusers
//! (and our model code) name them after the diffusers classes. This file ports
//! diffusers/loaders/single_file_utils.py (diffusers 0.42):
//! - `convert_ldm_unet_checkpoint`  -> [`unet_key`]        (`model.diffusion_model.*`)
//! - `convert_ldm_vae_checkpoint`   -> [`vae_key`]         (`first_stage_model.*`)
//! - `convert_ldm_clip_checkpoint`  -> [`clip_key`]        (`cond_stage_model.transformer.*`, SD 1.x)
//! - `convert_open_clip_checkpoint` -> [`open_clip_key`]   (`cond_stage_model.model.*`, SD 2.x;
//!   `conditioner.embedders.1.model.*`, SDXL's OpenCLIP bigG)
//! - SDXL (Stability's generative-models names): `conditioner.embedders.0.transformer.*` is a
//!   Hugging Face CLIPTextModel ([`clip_key`]), the U-Net's `label_emb.0.{0,2}` is diffusers'
//!   `add_embedding.linear_{1,2}`, everything else as SD 1.x/2.x.
//! - `create_unet_diffusers_config_from_ldm` / `create_vae_diffusers_config_from_ldm` ideas ->
//!   [`infer_unet_config`], [`infer_vae_config`], [`infer_text_encoder_config`], which read the
//!   shapes instead of the original YAML.
//!
//! Unlike diffusers, nothing is copied: a rename is a [`Transform`] over the mapped file (a
//! reshape, or a contiguous row range for OpenCLIP's fused q/k/v). Also unlike diffusers, block
//! counts and `layers_per_block` are read from the keys rather than assumed (4 blocks x 2), so
//! the tiny test fixtures go through the same code as real checkpoints.
//!
//! Also here: the two renamings diffusers folders need ([`text_encoder_folder_key`],
//! [`vae_folder_key`]), so that model code sees one set of names.

use super::store::Transform;
use super::{Result, WeightError};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
pub const LDM_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const LDM_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL base: CLIP ViT-L/14 (text_encoder) under Hugging Face names.
pub const SGM_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL base: OpenCLIP ViT-bigG/14 (text_encoder_2) under OpenCLIP names.
pub const SGM_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// The SDXL refiner's only text encoder (OpenCLIP bigG in slot 0).
pub const SGM_REFINER_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.0.model.";

/// Stable Diffusion generation, as far as the weights tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder (768), conv `proj_in`, 8 heads.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H/14 text encoder (1024, penultimate layer), linear `proj_in`,
    /// head_dim 64.
    Sd2,
    /// SDXL (diffusers folders and SGM single files): CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text
    /// encoders (penultimate layers concatenated, 2048), the text_time added conditioning,
    /// head_dim 64.
    Sdxl,
}

/// What the U-Net predicts. Weights do not tell (SD 2.x 768-v vs 2.x-base have identical
/// tensors), so it defaults per family and the user can say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

impl PredictionType {
    /// The name in diffusers' scheduler_config.json.
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

/// Which text encoder layout a single file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextKind {
    /// Hugging Face `CLIPTextModel` names under `cond_stage_model.transformer.`.
    Clip,
    /// OpenCLIP names under `cond_stage_model.model.`.
    OpenClip,
}

/// A presented (diffusers) tensor: which stored key, seen through which transform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renamed {
    pub source_key: String,
    pub transform: Transform,
}

/// The whole renaming of one single-file checkpoint.
#[derive(Clone, Debug, Default)]
pub struct RenamePlan {
    /// diffusers key -> source, per model.
    pub unet: BTreeMap<String, Renamed>,
    pub vae: BTreeMap<String, Renamed>,
    pub text_encoder: BTreeMap<String, Renamed>,
    /// SDXL's second text encoder (`conditioner.embedders.1.model.*`); empty otherwise.
    pub text_encoder_2: BTreeMap<String, Renamed>,
    pub text_kind: Option<TextKind>,
    /// Stored keys dropped on purpose, with the reason (scheduler buffers, EMA copies, the
    /// OpenCLIP layer SD 2.x skips, ...).
    pub ignored: Vec<(String, &'static str)>,
    /// Stored keys that match no rule: worth a warning, they may mean an unsupported variant.
    pub unrecognized: Vec<String>,
}

impl RenamePlan {
    /// SDXL if there is a second text encoder; SD 2.x if the text encoder is OpenCLIP; else
    /// SD 1.x if it is CLIP; without a text encoder, by the U-Net's cross-attention width
    /// (1024 -> SD 2.x, as diffusers' `infer_diffusers_model_type`).
    pub fn family(&self, unet_shapes: &BTreeMap<String, Vec<usize>>) -> ModelFamily {
        if !self.text_encoder_2.is_empty() {
            return ModelFamily::Sdxl;
        }
        match self.text_kind {
            Some(TextKind::OpenClip) => ModelFamily::Sd2,
            Some(TextKind::Clip) => ModelFamily::Sd1,
            None => match cross_attention_dim(unet_shapes) {
                Some(1024) => ModelFamily::Sd2,
                _ => ModelFamily::Sd1,
            },
        }
    }
}

/// Refuses checkpoints we know we cannot run, with a reason.
pub fn check_supported<'a>(keys: impl IntoIterator<Item = &'a str> + Clone) -> Result<()> {
    let has = |p: &str| keys.clone().into_iter().any(|k| k.starts_with(p));
    if has(SGM_REFINER_OPEN_CLIP_PREFIX) {
        return Err(WeightError::Unsupported {
            what: "SDXL refiner checkpoint (`conditioner.embedders.0.model.*`: one OpenCLIP \
                   encoder, aesthetic-score time ids)"
                .into(),
            hint: "single-file SDXL base models and their fine-tunes are supported, the refiner \
                   is not"
                .into(),
        });
    }
    let sdxl = has(SGM_CLIP_PREFIX) && has(SGM_OPEN_CLIP_PREFIX);
    if has("conditioner.embedders.") && !sdxl {
        return Err(WeightError::Unsupported {
            what: "generative-models checkpoint (`conditioner.embedders.*`) without SDXL's two \
                   text encoders (`conditioner.embedders.0.transformer.*` and \
                   `conditioner.embedders.1.model.*`)"
                .into(),
            hint: "ldm-wgpu runs Stable Diffusion 1.x, 2.x and SDXL base checkpoints".into(),
        });
    }
    if has("model.diffusion_model.label_emb.") && !sdxl {
        return Err(WeightError::Unsupported {
            what: "class/size-conditioned U-Net (`label_emb`: SDXL, unCLIP or the x4 upscaler)"
                .into(),
            hint: "ldm-wgpu runs Stable Diffusion 1.x and 2.x text-to-image and inpainting models"
                .into(),
        });
    }
    if has("control_model.") {
        return Err(WeightError::Unsupported {
            what: "ControlNet checkpoint (`control_model.*`)".into(),
            hint: "ControlNet is not implemented".into(),
        });
    }
    Ok(())
}

/// Renames every key of a single-file checkpoint, given its stored shapes.
pub fn plan_single_file(stored: &BTreeMap<String, Vec<usize>>) -> Result<RenamePlan> {
    check_supported(stored.keys().map(|k| k.as_str()))?;
    if !stored.keys().any(|k| k.starts_with(LDM_UNET_PREFIX)) {
        return Err(WeightError::Config {
            what: "single-file checkpoint".into(),
            reason: format!(
                "no `{LDM_UNET_PREFIX}*` tensors, so this is not a CompVis/LDM Stable Diffusion \
                 checkpoint (a single diffusers model file is opened as a component instead)"
            ),
        });
    }
    let mut plan = RenamePlan::default();

    let unet_lpb = unet_layers_per_block(stored);
    let vae_levels = count_indices(stored.keys(), &format!("{LDM_VAE_PREFIX}decoder.up."));
    let open_clip_last = max_index(
        stored.keys(),
        &format!("{LDM_OPEN_CLIP_PREFIX}transformer.resblocks."),
    );

    for (key, shape) in stored {
        let put = |map: &mut BTreeMap<String, Renamed>, name: String, transform: Transform| {
            map.insert(
                name,
                Renamed {
                    source_key: key.clone(),
                    transform,
                },
            );
        };
        if let Some(rest) = key.strip_prefix(LDM_UNET_PREFIX) {
            match unet_key(rest, unet_lpb) {
                Some(name) => put(&mut plan.unet, name, Transform::None),
                None => plan.unrecognized.push(key.clone()),
            }
        } else if let Some(rest) = key.strip_prefix(LDM_VAE_PREFIX) {
            match vae_key(rest, vae_levels, shape) {
                Some((name, t)) => put(&mut plan.vae, name, t),
                None => plan.unrecognized.push(key.clone()),
            }
        } else if let Some(rest) = key.strip_prefix(SGM_CLIP_PREFIX) {
            plan.text_kind = Some(TextKind::Clip);
            match clip_key(rest) {
                ClipKey::Tensor(name) => put(&mut plan.text_encoder, name, Transform::None),
                ClipKey::Ignored(why) => plan.ignored.push((key.clone(), why)),
            }
        } else if let Some(rest) = key.strip_prefix(SGM_OPEN_CLIP_PREFIX) {
            match open_clip_key(rest, OpenClipUse::Sdxl, shape) {
                OpenClipKey::Tensors(list) => {
                    for (name, t) in list {
                        put(&mut plan.text_encoder_2, name, t);
                    }
                }
                OpenClipKey::Ignored(why) => plan.ignored.push((key.clone(), why)),
                OpenClipKey::Unknown => plan.unrecognized.push(key.clone()),
            }
        } else if let Some(rest) = key.strip_prefix(LDM_CLIP_PREFIX) {
            plan.text_kind = Some(TextKind::Clip);
            match clip_key(rest) {
                ClipKey::Tensor(name) => put(&mut plan.text_encoder, name, Transform::None),
                ClipKey::Ignored(why) => plan.ignored.push((key.clone(), why)),
            }
        } else if let Some(rest) = key.strip_prefix(LDM_OPEN_CLIP_PREFIX) {
            plan.text_kind = Some(TextKind::OpenClip);
            let last_layer = open_clip_last;
            match open_clip_key(rest, OpenClipUse::Sd2 { last_layer }, shape) {
                OpenClipKey::Tensors(list) => {
                    for (name, t) in list {
                        put(&mut plan.text_encoder, name, t);
                    }
                }
                OpenClipKey::Ignored(why) => plan.ignored.push((key.clone(), why)),
                OpenClipKey::Unknown => plan.unrecognized.push(key.clone()),
            }
        } else if key.starts_with("model_ema.") {
            // as diffusers without `extract_ema`: the `model.diffusion_model.*` weights are used
            plan.ignored.push((
                key.clone(),
                "EMA copy of the U-Net (the non-EMA weights are used)",
            ));
        } else if !key.contains('.') {
            plan.ignored.push((
                key.clone(),
                "LDM training buffer (betas, alphas_cumprod, ...)",
            ));
        } else {
            plan.unrecognized.push(key.clone());
        }
    }
    Ok(plan)
}

// ---------------------------------------------------------------------------------------------
// U-Net
// ---------------------------------------------------------------------------------------------

/// LDM `ResBlock` sub-module -> diffusers `ResnetBlock2D` (update_unet_resnet_ldm_to_diffusers).
const UNET_RESNET_PARTS: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// Keys outside the down/mid/up blocks (DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], and
/// ["unet"]["addition_embed_type"]: SDXL's `label_emb` is the text_time added embedding; other
/// models with `label_emb` are refused by [`check_supported`]).
const UNET_TOP_PARTS: [(&str, &str); 7] = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
];

fn replace_prefix(rest: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
}

/// `layers_per_block` of an LDM U-Net: the first downsampler sits at
/// `input_blocks.{layers_per_block + 1}.0.op`.
fn unet_layers_per_block(stored: &BTreeMap<String, Vec<usize>>) -> usize {
    let first_op = stored
        .keys()
        .filter_map(|k| {
            k.strip_prefix(LDM_UNET_PREFIX)?
                .strip_prefix("input_blocks.")
        })
        .filter_map(|r| {
            let (i, rest) = split_index(r)?;
            rest.starts_with("0.op.").then_some(i)
        })
        .min();
    match first_op {
        Some(i) => i.saturating_sub(1).max(1),
        // a single level: every input block after conv_in is a layer
        None => max_index(stored.keys(), &format!("{LDM_UNET_PREFIX}input_blocks.")).unwrap_or(1),
    }
}

/// One LDM U-Net key (without `model.diffusion_model.`) -> diffusers key.
/// Port of `convert_ldm_unet_checkpoint`: input block i (>= 1) is level (i-1)/(lpb+1), layer
/// (i-1)%(lpb+1), the last layer of a level being its downsampler; output block i is level
/// i/(lpb+1), layer i%(lpb+1), with the upsampler beside the last resnet (slot 1 or 2).
pub fn unet_key(ldm: &str, lpb: usize) -> Option<String> {
    if let Some(name) = replace_prefix(ldm, &UNET_TOP_PARTS) {
        return Some(name);
    }
    let resnet = |prefix: String, rest: &str| {
        replace_prefix(rest, &UNET_RESNET_PARTS).map(|r| format!("{prefix}.{r}"))
    };
    if let Some(r) = ldm.strip_prefix("input_blocks.") {
        let (i, r) = split_index(r)?;
        let (slot, rest) = split_index(r)?;
        if i == 0 {
            return None;
        }
        let (level, layer) = ((i - 1) / (lpb + 1), (i - 1) % (lpb + 1));
        return match slot {
            0 if layer == lpb => rest
                .strip_prefix("op.")
                .map(|r| format!("down_blocks.{level}.downsamplers.0.conv.{r}")),
            0 => resnet(format!("down_blocks.{level}.resnets.{layer}"), rest),
            1 if layer < lpb => Some(format!("down_blocks.{level}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    if let Some(r) = ldm.strip_prefix("middle_block.") {
        let (slot, rest) = split_index(r)?;
        return match slot {
            0 => resnet("mid_block.resnets.0".into(), rest),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            2 => resnet("mid_block.resnets.1".into(), rest),
            _ => None,
        };
    }
    if let Some(r) = ldm.strip_prefix("output_blocks.") {
        let (i, r) = split_index(r)?;
        let (slot, rest) = split_index(r)?;
        let (level, layer) = (i / (lpb + 1), i % (lpb + 1));
        if slot > 0 {
            if let Some(conv) = rest.strip_prefix("conv.") {
                return Some(format!("up_blocks.{level}.upsamplers.0.conv.{conv}"));
            }
        }
        return match slot {
            0 => resnet(format!("up_blocks.{level}.resnets.{layer}"), rest),
            1 => Some(format!("up_blocks.{level}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    None
}

/// The LDM/SGM name of every diffusers U-Net key in `keys` (the inverse of [`unet_key`]), for
/// LoRA files that name U-Net modules the way the original code does (kohya's SDXL LoRAs:
/// `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`). Layers per block and which up
/// levels have attentions (the upsampler's slot) are read from the keys, so any depth works.
pub fn ldm_unet_names<'a>(
    keys: impl IntoIterator<Item = &'a String> + Clone,
) -> BTreeMap<String, String> {
    let lpb = count_indices(keys.clone(), "down_blocks.0.resnets.").max(1);
    let attn_up: BTreeSet<usize> = keys
        .clone()
        .into_iter()
        .filter(|k| k.contains(".attentions."))
        .filter_map(|k| split_index(k.strip_prefix("up_blocks.")?).map(|(i, _)| i))
        .collect();
    keys.into_iter()
        .filter_map(|k| Some((k.clone(), unet_key_to_ldm(k, lpb, &attn_up)?)))
        .collect()
}

/// One diffusers U-Net key -> its LDM name (see [`ldm_unet_names`]); checked against
/// [`unet_key`] by a round trip in tests/sdxl.rs.
fn unet_key_to_ldm(key: &str, lpb: usize, attn_up: &BTreeSet<usize>) -> Option<String> {
    fn swap(&(a, b): &(&'static str, &'static str)) -> (&'static str, &'static str) {
        (b, a)
    }
    let top: Vec<(&str, &str)> = UNET_TOP_PARTS.iter().map(swap).collect();
    if let Some(name) = replace_prefix(key, &top) {
        return Some(name);
    }
    let resnet_parts: Vec<(&str, &str)> = UNET_RESNET_PARTS.iter().map(swap).collect();
    let resnet = |block: String, rest: &str| {
        replace_prefix(rest, &resnet_parts).map(|r| format!("{block}.{r}"))
    };
    // "<kind>.<j>.<rest>" after a block prefix
    let member = |r: &str| -> Option<(String, usize, String)> {
        let (kind, r) = r.split_once('.')?;
        let (j, rest) = split_index(r)?;
        Some((kind.to_string(), j, rest.to_string()))
    };
    if let Some(r) = key.strip_prefix("down_blocks.") {
        let (level, r) = split_index(r)?;
        let (kind, j, rest) = member(r)?;
        let base = 1 + level * (lpb + 1);
        return match kind.as_str() {
            "resnets" => resnet(format!("input_blocks.{}.0", base + j), &rest),
            "attentions" => Some(format!("input_blocks.{}.1.{rest}", base + j)),
            "downsamplers" => rest
                .strip_prefix("conv.")
                .map(|t| format!("input_blocks.{}.0.op.{t}", base + lpb)),
            _ => None,
        };
    }
    if let Some(r) = key.strip_prefix("mid_block.") {
        let (kind, j, rest) = member(r)?;
        return match kind.as_str() {
            "resnets" if j < 2 => resnet(format!("middle_block.{}", 2 * j), &rest),
            "attentions" => Some(format!("middle_block.1.{rest}")),
            _ => None,
        };
    }
    let r = key.strip_prefix("up_blocks.")?;
    let (level, r) = split_index(r)?;
    let (kind, j, rest) = member(r)?;
    let base = level * (lpb + 1);
    match kind.as_str() {
        "resnets" => resnet(format!("output_blocks.{}.0", base + j), &rest),
        "attentions" => Some(format!("output_blocks.{}.1.{rest}", base + j)),
        "upsamplers" => {
            let slot = if attn_up.contains(&level) { 2 } else { 1 };
            Some(format!("output_blocks.{}.{slot}.{rest}", base + lpb))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// VAE
// ---------------------------------------------------------------------------------------------

/// LDM VAE attention parts -> diffusers `Attention` (update_vae_attentions_ldm_to_diffusers).
const VAE_ATTN_PARTS: [(&str, &str); 5] = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
];

/// One LDM VAE key (without `first_stage_model.`) -> diffusers key and transform.
/// `levels` is the number of decoder levels: LDM numbers decoder levels from the bottom
/// (`up.{levels-1}` runs first), diffusers from the top.
pub fn vae_key(ldm: &str, levels: usize, shape: &[usize]) -> Option<(String, Transform)> {
    let plain = |s: String| Some((s, Transform::None));
    for same in [
        "quant_conv.",
        "post_quant_conv.",
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
    ] {
        if ldm.starts_with(same) {
            return plain(ldm.to_string());
        }
    }
    let (part, r) = ldm.split_once('.')?;
    if part != "encoder" && part != "decoder" {
        return None;
    }
    let resnet = |r: &str| {
        // nin_shortcut is the 1x1 conv on the skip path when channels change
        match r.strip_prefix("nin_shortcut.") {
            Some(t) => format!("conv_shortcut.{t}"),
            None => r.to_string(),
        }
    };
    if let Some(t) = r.strip_prefix("norm_out.") {
        return plain(format!("{part}.conv_norm_out.{t}"));
    }
    if let Some(m) = r.strip_prefix("mid.") {
        if let Some(b) = m.strip_prefix("block_") {
            let (i, t) = split_index(b)?;
            if !(1..=2).contains(&i) {
                return None;
            }
            return plain(format!("{part}.mid_block.resnets.{}.{}", i - 1, resnet(t)));
        }
        if let Some(a) = m.strip_prefix("attn_1.") {
            let name = replace_prefix(a, &VAE_ATTN_PARTS)?;
            let full = format!("{part}.mid_block.attentions.0.{name}");
            // conv_attn_to_linear: q/k/v/proj_out are 1x1 convs in LDM, linears in diffusers
            let is_weight = a.ends_with("weight") && !a.starts_with("norm.");
            return if is_weight && shape.len() > 2 && shape[2..].iter().all(|&d| d == 1) {
                Some((full, Transform::Reshape(shape[..2].to_vec())))
            } else {
                plain(full)
            };
        }
        return None;
    }
    if part == "encoder" {
        let d = r.strip_prefix("down.")?;
        let (i, t) = split_index(d)?;
        if let Some(b) = t.strip_prefix("block.") {
            let (j, t) = split_index(b)?;
            return plain(format!("encoder.down_blocks.{i}.resnets.{j}.{}", resnet(t)));
        }
        let t = t.strip_prefix("downsample.conv.")?;
        return plain(format!("encoder.down_blocks.{i}.downsamplers.0.conv.{t}"));
    }
    let u = r.strip_prefix("up.")?;
    let (b, t) = split_index(u)?;
    if b >= levels {
        return None;
    }
    let level = levels - 1 - b;
    if let Some(bl) = t.strip_prefix("block.") {
        let (j, t) = split_index(bl)?;
        return plain(format!(
            "decoder.up_blocks.{level}.resnets.{j}.{}",
            resnet(t)
        ));
    }
    let t = t.strip_prefix("upsample.conv.")?;
    plain(format!("decoder.up_blocks.{level}.upsamplers.0.conv.{t}"))
}

/// Old diffusers folders (before 0.14, e.g. SD 1.5's `vae/`) name the mid-block attention
/// `query/key/value/proj_attn`; diffusers renames them on load
/// (`_convert_deprecated_attention_blocks`), and so do we.
pub fn vae_folder_key(key: &str) -> String {
    const OLD: [(&str, &str); 4] = [
        ("query.", "to_q."),
        ("key.", "to_k."),
        ("value.", "to_v."),
        ("proj_attn.", "to_out.0."),
    ];
    for part in ["encoder", "decoder"] {
        let prefix = format!("{part}.mid_block.attentions.0.");
        if let Some(rest) = key.strip_prefix(&prefix) {
            if let Some(new) = replace_prefix(rest, &OLD) {
                return format!("{prefix}{new}");
            }
        }
    }
    key.to_string()
}

/// Whether a VAE folder tensor needs the 1x1-conv -> linear reshape (very old conversions kept
/// [C, C, 1, 1] under the diffusers names).
pub fn vae_folder_transform(key: &str, shape: &[usize]) -> Transform {
    let attn_linear = key.contains("mid_block.attentions.0.to_") && key.ends_with(".weight");
    if attn_linear && shape.len() > 2 && shape[2..].iter().all(|&d| d == 1) {
        Transform::Reshape(shape[..2].to_vec())
    } else {
        Transform::None
    }
}

// ---------------------------------------------------------------------------------------------
// Text encoders
// ---------------------------------------------------------------------------------------------

pub enum ClipKey {
    Tensor(String),
    Ignored(&'static str),
}

/// SD 1.x: `cond_stage_model.transformer.` holds a Hugging Face CLIPTextModel, either with
/// `text_model.` (transformers >= 4.x) or without it (older saves); present it with.
/// Port of `convert_ldm_clip_checkpoint`.
pub fn clip_key(rest: &str) -> ClipKey {
    if rest.ends_with("position_ids") {
        return ClipKey::Ignored("position_ids buffer (0..77, recomputed)");
    }
    ClipKey::Tensor(if rest.starts_with("text_model.") {
        rest.to_string()
    } else {
        format!("text_model.{rest}")
    })
}

/// A diffusers folder's text encoder key, presented with the `text_model.` prefix
/// (transformers >= 5 saves without it). None for buffers that are not weights.
pub fn text_encoder_folder_key(key: &str) -> Option<String> {
    // CLIPTextModelWithProjection's projection sits beside `text_model`, not inside it.
    if key.starts_with("text_projection.") {
        return Some(key.to_string());
    }
    match clip_key(key) {
        ClipKey::Tensor(k) => Some(k),
        ClipKey::Ignored(_) => None,
    }
}

pub enum OpenClipKey {
    Tensors(Vec<(String, Transform)>),
    Ignored(&'static str),
    Unknown,
}

/// OpenCLIP resblock parts -> Hugging Face CLIPEncoderLayer parts
/// (DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]).
const OPEN_CLIP_LAYER_PARTS: [(&str, &str); 5] = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
];

/// Which diffusers model an OpenCLIP text tower becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenClipUse {
    /// SD 2.x's CLIPTextModel: the last resblock (`last_layer`) and the projection dropped.
    Sd2 { last_layer: Option<usize> },
    /// SDXL's CLIPTextModelWithProjection (`text_encoder_2`): every layer, and the projection.
    Sdxl,
}

/// One OpenCLIP key (without `cond_stage_model.model.` / `conditioner.embedders.1.model.`) ->
/// diffusers key(s). Port of `convert_open_clip_checkpoint`:
/// - the fused `attn.in_proj_{weight,bias}` [3C(, C)] becomes q/k/v rows 0..C, C..2C, 2C..3C;
/// - SD 2.x conditions on the penultimate layer (`FrozenOpenCLIPEmbedder(layer="penultimate")`),
///   so the last resblock (`last_layer`, 23 of 0..=23 in SD 2.x; diffusers hard-codes
///   resblocks.23 in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) is dropped, and so are
///   `text_projection` and `logit_scale`, which CLIPTextModel has no use for;
/// - SDXL keeps every layer (its pipeline picks the hidden state it needs) and the projection
///   [C, P], applied as `x @ P`, becomes `text_projection.weight` [P, C] (diffusers:
///   `checkpoint[text_projection].T`).
pub fn open_clip_key(rest: &str, usage: OpenClipUse, shape: &[usize]) -> OpenClipKey {
    let one = |s: &str| OpenClipKey::Tensors(vec![(s.to_string(), Transform::None)]);
    let last_layer = match usage {
        OpenClipUse::Sd2 { last_layer } => last_layer,
        OpenClipUse::Sdxl => None,
    };
    if rest == "text_projection" && usage == OpenClipUse::Sdxl {
        return OpenClipKey::Tensors(vec![(
            "text_projection.weight".into(),
            Transform::Transpose,
        )]);
    }
    match rest {
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight"),
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight"),
        "ln_final.weight" => return one("text_model.final_layer_norm.weight"),
        "ln_final.bias" => return one("text_model.final_layer_norm.bias"),
        "text_projection" => {
            return OpenClipKey::Ignored("OpenCLIP text projection (unused by CLIPTextModel)")
        }
        "logit_scale" => return OpenClipKey::Ignored("CLIP logit scale (training only)"),
        "attn_mask" => return OpenClipKey::Ignored("causal mask buffer (recomputed)"),
        _ => {}
    }
    if rest.starts_with("visual.") {
        return OpenClipKey::Ignored("OpenCLIP image tower (not used by Stable Diffusion)");
    }
    let Some(r) = rest.strip_prefix("transformer.resblocks.") else {
        return OpenClipKey::Unknown;
    };
    let Some((layer, part)) = split_index(r) else {
        return OpenClipKey::Unknown;
    };
    if Some(layer) == last_layer {
        return OpenClipKey::Ignored(
            "last OpenCLIP layer (SD 2.x uses the penultimate layer's output)",
        );
    }
    let prefix = format!("text_model.encoder.layers.{layer}.self_attn");
    let fused = match part {
        "attn.in_proj_weight" => Some("weight"),
        "attn.in_proj_bias" => Some("bias"),
        _ => None,
    };
    if let Some(kind) = fused {
        let Some(&rows) = shape.first() else {
            return OpenClipKey::Unknown;
        };
        if rows % 3 != 0 {
            return OpenClipKey::Unknown;
        }
        let c = rows / 3;
        let list = ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    format!("{prefix}.{p}_proj.{kind}"),
                    Transform::Rows {
                        start: i * c,
                        count: c,
                    },
                )
            })
            .collect();
        return OpenClipKey::Tensors(list);
    }
    match replace_prefix(part, &OPEN_CLIP_LAYER_PARTS) {
        Some(p) => OpenClipKey::Tensors(vec![(
            format!("text_model.encoder.layers.{layer}.{p}"),
            Transform::None,
        )]),
        None => OpenClipKey::Unknown,
    }
}

// ---------------------------------------------------------------------------------------------
// Config inference (diffusers key names and shapes in, diffusers config.json out)
// ---------------------------------------------------------------------------------------------

/// What the weights cannot tell, for config inference. None = the family's default.
#[derive(Clone, Debug, Default)]
pub struct InferHints {
    /// Training resolution in pixels (SD 1.x: 512; SD 2.x: 768, as diffusers' "v2" default,
    /// but 512 for 2.x-base and inpainting).
    pub image_size: Option<usize>,
    /// SDXL: the width of text_encoder_2's pooled, projected output (its `text_projection`
    /// rows), which shares the added embedding's input with the time ids.
    pub text_embeds_dim: Option<usize>,
}

/// SDXL base's number of micro-conditioning ids (original size, crop, target size: 2 each).
pub const SDXL_TIME_IDS: usize = 6;

fn shape<'a>(shapes: &'a BTreeMap<String, Vec<usize>>, key: &str) -> Result<&'a [usize]> {
    shapes
        .get(key)
        .map(|s| s.as_slice())
        .ok_or_else(|| WeightError::Config {
            what: "inferred config".into(),
            reason: format!("tensor `{key}` is needed to infer the config but is missing"),
        })
}

fn dim(shapes: &BTreeMap<String, Vec<usize>>, key: &str, axis: usize) -> Result<usize> {
    let s = shape(shapes, key)?;
    s.get(axis).copied().ok_or_else(|| WeightError::Config {
        what: "inferred config".into(),
        reason: format!(
            "tensor `{key}` has shape {s:?}, expected at least {} dims",
            axis + 1
        ),
    })
}

/// The U-Net's cross-attention width (768: SD 1.x, 1024: SD 2.x), from any `attn2.to_k`.
pub fn cross_attention_dim(unet: &BTreeMap<String, Vec<usize>>) -> Option<usize> {
    unet.iter()
        .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
        .and_then(|(_, s)| s.get(1).copied())
}

fn default_image_size(family: ModelFamily, in_channels: usize) -> usize {
    match family {
        ModelFamily::Sd2 if in_channels == 4 => 768,
        ModelFamily::Sdxl => 1024,
        _ => 512,
    }
}

/// `UNet2DConditionModel` config.json from diffusers-named U-Net shapes.
/// Follows `create_unet_diffusers_config_from_ldm`, reading shapes where it reads the YAML:
/// block_out_channels from each level's first resnet, block types from the presence of
/// attentions, `use_linear_projection` from `proj_in` being 2-D, `cross_attention_dim` from
/// `attn2.to_k`. Head counts are not in the weights: SD 1.x uses 8 heads
/// (`attention_head_dim: 8`, a misnomer kept by diffusers), SD 2.x head_dim 64
/// (`attention_head_dim: [C/64 per level]`).
pub fn infer_unet_config(
    unet: &BTreeMap<String, Vec<usize>>,
    family: ModelFamily,
    hints: &InferHints,
) -> Result<Value> {
    let in_channels = dim(unet, "conv_in.weight", 1)?;
    let out_channels = dim(unet, "conv_out.weight", 0)?;
    let levels = count_indices(unet.keys(), "down_blocks.");
    if levels == 0 {
        return Err(WeightError::Config {
            what: "unet".into(),
            reason: "no `down_blocks.*` tensors".into(),
        });
    }
    let block_out_channels = (0..levels)
        .map(|i| dim(unet, &format!("down_blocks.{i}.resnets.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let layers_per_block = count_indices(unet.keys(), "down_blocks.0.resnets.");
    let has = |p: String| unet.keys().any(|k| k.starts_with(&p));
    let down_block_types: Vec<&str> = (0..levels)
        .map(|i| {
            if has(format!("down_blocks.{i}.attentions.")) {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up_block_types: Vec<&str> = (0..levels)
        .map(|i| {
            if has(format!("up_blocks.{i}.attentions.")) {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let cross = cross_attention_dim(unet).ok_or_else(|| WeightError::Config {
        what: "unet".into(),
        reason: "no `attn2.to_k.weight`: cannot tell the cross-attention width".into(),
    })?;
    let proj_in = unet
        .iter()
        .find(|(k, _)| k.ends_with(".proj_in.weight"))
        .map(|(_, s)| s.len())
        .unwrap_or(4);
    let use_linear_projection = proj_in == 2;
    let attention_head_dim = match family {
        ModelFamily::Sd1 => json!(8),
        ModelFamily::Sd2 | ModelFamily::Sdxl => json!(block_out_channels
            .iter()
            .map(|c| (c / 64).max(1))
            .collect::<Vec<_>>()),
    };
    // Transformer depth per level, as the keys show it (SDXL base: 1 for its attention-free
    // first level, 2, 10); diffusers' mid block takes the last level's.
    let depths: Vec<usize> = (0..levels)
        .map(|i| {
            let prefix = format!("down_blocks.{i}.attentions.0.transformer_blocks.");
            count_indices(unet.keys(), &prefix).max(1)
        })
        .collect();
    let first_attn = (0..levels).find(|i| has(format!("down_blocks.{i}.attentions.0.")));
    let transformer_layers_per_block = match family {
        ModelFamily::Sdxl => json!(depths),
        _ => json!(first_attn.map_or(1, |i| depths[i])),
    };
    let image_size = hints
        .image_size
        .unwrap_or_else(|| default_image_size(family, in_channels));
    let mut config = json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": attention_head_dim,
        "block_out_channels": block_out_channels,
        "center_input_sample": false,
        "class_embed_type": null,
        "cross_attention_dim": cross,
        "down_block_types": down_block_types,
        "downsample_padding": 1,
        "dual_cross_attention": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": in_channels,
        "layers_per_block": layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "out_channels": out_channels,
        // SD 2.1 (768-v, what diffusers' single-file loader maps "v2" to) upcasts attention
        "upcast_attention": family == ModelFamily::Sd2 && in_channels == 4,
        "sample_size": image_size / 8,
        "transformer_layers_per_block": transformer_layers_per_block,
        "up_block_types": up_block_types,
        "use_linear_projection": use_linear_projection,
    });
    if family == ModelFamily::Sdxl {
        let (add, obj) = (
            sdxl_added_conditioning(unet, hints)?,
            config.as_object_mut(),
        );
        obj.expect("a JSON object").extend(add);
    }
    Ok(config)
}

/// SDXL's `text_time` added conditioning: `add_embedding.linear_1` reads the pooled text
/// embedding and [`SDXL_TIME_IDS`] sinusoidal embeddings of `addition_time_embed_dim` each
/// (SDXL base: 1280 + 6 x 256 = 2816).
fn sdxl_added_conditioning(
    unet: &BTreeMap<String, Vec<usize>>,
    hints: &InferHints,
) -> Result<Map<String, Value>> {
    let input = dim(unet, "add_embedding.linear_1.weight", 1)?;
    let pooled = hints.text_embeds_dim.ok_or_else(|| WeightError::Config {
        what: "unet".into(),
        reason: "SDXL U-Net config without the second text encoder's projection width".into(),
    })?;
    let ids = input.saturating_sub(pooled);
    if ids == 0 || !ids.is_multiple_of(SDXL_TIME_IDS) {
        return Err(WeightError::Config {
            what: "unet".into(),
            reason: format!(
                "`add_embedding.linear_1` reads {input} values: not {pooled} (the pooled text \
                 embedding) plus {SDXL_TIME_IDS} time ids of equal width"
            ),
        });
    }
    let mut add = Map::new();
    add.insert("addition_embed_type".into(), json!("text_time"));
    add.insert("addition_time_embed_dim".into(), json!(ids / SDXL_TIME_IDS));
    add.insert("projection_class_embeddings_input_dim".into(), json!(input));
    Ok(add)
}

/// `AutoencoderKL` config.json from diffusers-named VAE shapes
/// (`create_vae_diffusers_config_from_ldm`: ch * ch_mult -> block_out_channels, z_channels ->
/// latent_channels, scaling factor 0.18215 as LDM_VAE_DEFAULT_SCALING_FACTOR).
pub fn infer_vae_config(
    vae: &BTreeMap<String, Vec<usize>>,
    family: ModelFamily,
    hints: &InferHints,
) -> Result<Value> {
    let levels = count_indices(vae.keys(), "encoder.down_blocks.");
    if levels == 0 {
        return Err(WeightError::Config {
            what: "vae".into(),
            reason: "no `encoder.down_blocks.*` tensors".into(),
        });
    }
    let block_out_channels = (0..levels)
        .map(|i| {
            dim(
                vae,
                &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let in_channels = dim(vae, "encoder.conv_in.weight", 1)?;
    let image_size = hints
        .image_size
        .unwrap_or_else(|| default_image_size(family, 4));
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": block_out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "in_channels": in_channels,
        "latent_channels": dim(vae, "decoder.conv_in.weight", 1)?,
        "layers_per_block": count_indices(vae.keys(), "encoder.down_blocks.0.resnets."),
        "norm_num_groups": 32,
        "out_channels": dim(vae, "decoder.conv_out.weight", 0)?,
        "sample_size": image_size,
        // SDXL's VAE: stabilityai/stable-diffusion-xl-base-1.0/vae/config.json (force_upcast,
        // absent here, defaults to true as in AutoencoderKL: that VAE overflows in f16).
        "scaling_factor": if family == ModelFamily::Sdxl { 0.13025 } else { 0.18215 },
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "use_quant_conv": vae.contains_key("quant_conv.weight"),
        "use_post_quant_conv": vae.contains_key("post_quant_conv.weight"),
    }))
}

/// `CLIPTextModel` config.json from diffusers-named text encoder shapes. Heads are not in the
/// weights: both SD text encoders use head_dim 64 (12 x 64 = 768, 16 x 64 = 1024).
/// SD 1.x's CLIP uses quick_gelu, SD 2.x's OpenCLIP exact gelu.
pub fn infer_text_encoder_config(
    text: &BTreeMap<String, Vec<usize>>,
    family: ModelFamily,
) -> Result<Value> {
    let hidden = dim(text, "text_model.embeddings.token_embedding.weight", 1)?;
    let (act, projection_dim) = match family {
        ModelFamily::Sd1 | ModelFamily::Sdxl => ("quick_gelu", 768),
        ModelFamily::Sd2 => ("gelu", 512),
    };
    Ok(json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": dim(text, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": dim(text, "text_model.embeddings.position_embedding.weight", 0)?,
        "num_attention_heads": (hidden / 64).max(1),
        "num_hidden_layers": count_indices(text.keys(), "text_model.encoder.layers."),
        "projection_dim": projection_dim,
        "vocab_size": dim(text, "text_model.embeddings.token_embedding.weight", 0)?,
    }))
}

/// SDXL's `CLIPTextModelWithProjection` config.json (text_encoder_2: OpenCLIP ViT-bigG/14, exact
/// gelu, head_dim 64, `projection_dim` from `text_projection.weight` [P, C]); `eos_token_id` 2
/// as stabilityai/stable-diffusion-xl-base-1.0/text_encoder_2/config.json has it (transformers
/// then pools at the largest token id, which is the EOS in CLIP's vocabulary).
pub fn infer_text_encoder_2_config(text: &BTreeMap<String, Vec<usize>>) -> Result<Value> {
    let mut config = infer_text_encoder_config(text, ModelFamily::Sd2)?;
    let obj = config.as_object_mut().expect("a JSON object");
    obj.insert(
        "architectures".into(),
        json!(["CLIPTextModelWithProjection"]),
    );
    obj.insert(
        "projection_dim".into(),
        json!(dim(text, "text_projection.weight", 0)?),
    );
    Ok(config)
}

/// stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json, which diffusers'
/// `StableDiffusionXLPipeline.from_single_file` uses for SDXL base checkpoints.
pub fn sdxl_scheduler_config(prediction_type: PredictionType) -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type.as_str(),
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "use_karras_sigmas": false,
    })
}

/// diffusers' SCHEDULER_DEFAULT_CONFIG (single_file_utils.py) with the given prediction type.
pub fn default_scheduler_config(prediction_type: PredictionType) -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type.as_str(),
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    })
}

// ---------------------------------------------------------------------------------------------
// Key parsing helpers
// ---------------------------------------------------------------------------------------------

/// "12.rest" -> (12, "rest").
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// Distinct N over keys "{prefix}N...".
fn indices<'a>(keys: impl IntoIterator<Item = &'a String>, prefix: &str) -> BTreeSet<usize> {
    keys.into_iter()
        .filter_map(|k| {
            let r = k.strip_prefix(prefix)?;
            let n = r.split('.').next()?;
            n.parse().ok()
        })
        .collect()
}

fn count_indices<'a>(keys: impl IntoIterator<Item = &'a String>, prefix: &str) -> usize {
    indices(keys, prefix).len()
}

fn max_index<'a>(keys: impl IntoIterator<Item = &'a String>, prefix: &str) -> Option<usize> {
    indices(keys, prefix).into_iter().next_back()
}
