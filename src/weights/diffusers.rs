//! Opening a model: a diffusers folder or a single-file LDM checkpoint, both ending as three
//! [`Component`]s (weights under diffusers names + a diffusers-style config.json).
//!
//! Folder layout read (as `StableDiffusionPipeline.save_pretrained` writes it):
//! ```text
//! unet/diffusion_pytorch_model[.fp16].safetensors   unet/config.json
//! vae/diffusion_pytorch_model[.fp16].safetensors    vae/config.json
//! text_encoder/model[.fp16].safetensors             text_encoder/config.json
//! text_encoder_2/model[.fp16].safetensors           text_encoder_2/config.json  (SDXL)
//! scheduler/scheduler_config.json                   (optional)
//! model_index.json                                   (optional: checked when present)
//! ```
//! Sharded weights (`*.safetensors.index.json`) are followed. Pickled `.bin` weights are
//! refused with a conversion hint.

use super::rename::{self, InferHints, ModelFamily, PredictionType};
use super::safetensors::{SafetensorsFile, PICKLE_HINT};
use super::store::{Entry, Transform, WeightStore};
use super::{Result, WeightError};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which weight file of a diffusers folder to read (`ldm generate --variant`).
///
/// diffusers reads the plain `<name>.safetensors` unless `from_pretrained(..., variant="fp16")`
/// asks for `<name>.fp16.safetensors`; a folder holding both therefore gives the plain file under
/// `Auto`, as diffusers does. `Auto` is more lenient where only the variant is there (as
/// stabilityai/sdxl-turbo's `fp16` downloads): diffusers refuses it without `variant="fp16"`,
/// we read it, since the two files hold the same model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// The plain file, else the `.fp16` variant.
    #[default]
    Auto,
    /// Only `<name>.safetensors`.
    Plain,
    /// Only `<name>.fp16.safetensors`.
    Fp16,
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Variant::Auto),
            "plain" | "none" => Ok(Variant::Plain),
            "fp16" => Ok(Variant::Fp16),
            other => Err(format!("variant `{other}` (auto, plain or fp16)")),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Auto => "auto",
            Variant::Plain => "plain",
            Variant::Fp16 => "fp16",
        })
    }
}

/// What the files cannot tell, and user overrides.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub variant: Variant,
    /// Overrides the scheduler config's `prediction_type` (needed for single files: SD 2.x
    /// defaults to v_prediction as diffusers does, which is wrong for 2.x-base).
    pub prediction_type: Option<PredictionType>,
    /// Training resolution in pixels, for inferred configs' `sample_size`.
    pub image_size: Option<usize>,
    /// Keys written over each config after reading or inferring it
    /// (e.g. `{"upcast_attention": false}`, `{"attention_head_dim": 2}`).
    pub unet_overrides: Map<String, Value>,
    pub vae_overrides: Map<String, Value>,
    pub text_encoder_overrides: Map<String, Value>,
    /// SDXL single files: written over text_encoder_2's inferred config.
    pub text_encoder_2_overrides: Map<String, Value>,
}

impl LoadOptions {
    fn hints(&self) -> InferHints {
        InferHints {
            image_size: self.image_size,
            text_embeds_dim: None,
        }
    }
}

/// One model's weights and its diffusers config.json.
#[derive(Debug)]
pub struct Component {
    pub weights: WeightStore,
    pub config: Value,
    /// True when the config was inferred from tensor shapes rather than read from a file.
    pub config_inferred: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComponentKind {
    Unet,
    Vae,
    TextEncoder,
    /// SDXL's second text encoder (CLIPTextModelWithProjection).
    TextEncoder2,
}

impl ComponentKind {
    pub fn subfolder(self) -> &'static str {
        match self {
            ComponentKind::Unet => "unet",
            ComponentKind::Vae => "vae",
            ComponentKind::TextEncoder => "text_encoder",
            ComponentKind::TextEncoder2 => "text_encoder_2",
        }
    }

    /// File name stem of the weights (`diffusion_pytorch_model` for diffusers models,
    /// `model` for transformers models).
    pub fn weights_stem(self) -> &'static str {
        match self {
            ComponentKind::TextEncoder | ComponentKind::TextEncoder2 => "model",
            _ => "diffusion_pytorch_model",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceLayout {
    DiffusersFolder,
    SingleFile,
}

/// Everything a Stable Diffusion pipeline needs from disk, under diffusers names.
#[derive(Debug)]
pub struct PipelineWeights {
    pub unet: Component,
    pub vae: Component,
    /// The (first) text encoder: None only for an SDXL folder without one (the refiner's
    /// layout: `text_encoder_2` alone).
    pub text_encoder: Option<Component>,
    /// SDXL's second text encoder (`text_encoder_2/`, CLIPTextModelWithProjection).
    pub text_encoder_2: Option<Component>,
    /// model_index.json's `force_zeros_for_empty_prompt` (SDXL: a missing negative prompt
    /// gives zero embeddings); false when absent, as for the SD 1.x/2.x pipelines.
    pub force_zeros_for_empty_prompt: bool,
    /// model_index.json's `requires_aesthetics_score` (false when absent).
    pub requires_aesthetics_score: bool,
    /// diffusers scheduler_config.json (read, or diffusers' single-file default).
    pub scheduler_config: Value,
    pub family: ModelFamily,
    pub layout: SourceLayout,
    /// Single file: stored keys dropped on purpose, with the reason.
    pub ignored_keys: Vec<(String, &'static str)>,
    /// Single file: stored keys no rule recognised (print them as a warning).
    pub unrecognized_keys: Vec<String>,
}

/// Opens a diffusers folder (a directory) or a single-file checkpoint (a file).
pub fn open_model(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<PipelineWeights> {
    let path = path.as_ref();
    if path.is_dir() {
        open_diffusers_folder(path, opts)
    } else if path.exists() {
        open_single_file(path, opts)
    } else {
        Err(WeightError::NotFound {
            path: path.to_path_buf(),
            hint: "give a diffusers folder (unet/, vae/, text_encoder/) or a single .safetensors checkpoint"
                .into(),
        })
    }
}

/// `model_index.json` (written by `DiffusionPipeline.save_pretrained`): the pipeline class and,
/// per component, `[library, class]` (`[null, null]` for a component left out, such as a removed
/// safety checker). Read to refuse folders we would otherwise misread: an SDXL folder has the
/// same `unet/`, `vae/` and `text_encoder/` plus a second text encoder we would silently ignore.
#[derive(Debug, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub pipeline: Option<String>,
    #[serde(rename = "_diffusers_version")]
    pub diffusers_version: Option<String>,
    /// Every other key: components (`[library, class]` pairs) and pipeline options
    /// (`requires_safety_checker`, `force_zeros_for_empty_prompt`, ...).
    #[serde(flatten)]
    pub entries: BTreeMap<String, Value>,
}

impl ModelIndex {
    pub fn load(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        let index: ModelIndex = serde_json::from_value(value).map_err(|e| WeightError::Config {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        index.validate()?;
        Ok(index)
    }

    /// The class of component `name` (`UNet2DConditionModel`), if the folder has one.
    pub fn component_class(&self, name: &str) -> Option<&str> {
        match self.entries.get(name)?.as_array()?.as_slice() {
            [_library, class] => class.as_str(),
            _ => None,
        }
    }

    /// `force_zeros_for_empty_prompt` (SDXL pipelines register it; false when absent).
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.entries
            .get("force_zeros_for_empty_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// `requires_aesthetics_score` (SDXL img2img pipelines register it; the refiner's U-Net
    /// takes an aesthetic score in place of the target size among its time ids).
    pub fn requires_aesthetics_score(&self) -> bool {
        self.entries
            .get("requires_aesthetics_score")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// Whether this is an SDXL pipeline (a second, projecting text encoder).
    pub fn is_sdxl(&self) -> bool {
        self.component_class("text_encoder_2").is_some()
    }

    /// The components we load must be the classes we implement, and nothing the pipeline needs
    /// may be one we lack (a prior, an image encoder for conditioning, a third text encoder).
    pub fn validate(&self) -> Result<()> {
        let unsupported = |what: String| {
            Err(WeightError::Unsupported {
                what,
                hint: "ldm-wgpu runs Stable Diffusion 1.x/2.x pipelines (StableDiffusionPipeline \
                       and its img2img/inpaint variants) and SDXL (the \
                       StableDiffusionXL pipelines: base, refiner, inpainting)"
                    .into(),
            })
        };
        let pipeline = self
            .pipeline
            .as_deref()
            .unwrap_or("StableDiffusionPipeline");
        for extra in ["prior", "image_encoder", "text_encoder_3"] {
            if self.component_class(extra).is_some() {
                return unsupported(format!(
                    "{pipeline}: its `{extra}` component (pipelines with priors, image \
                     conditioning or a third text encoder are not supported)"
                ));
            }
        }
        let sdxl = self.is_sdxl();
        if sdxl
            && !matches!(
                pipeline,
                "StableDiffusionXLPipeline"
                    | "StableDiffusionXLImg2ImgPipeline"
                    | "StableDiffusionXLInpaintPipeline"
            )
        {
            return unsupported(format!(
                "{pipeline} with a `text_encoder_2` (of the two-encoder pipelines only SDXL's)"
            ));
        }
        if sdxl && self.component_class("tokenizer_2").is_none() {
            return unsupported(format!(
                "{pipeline}: `text_encoder_2` without `tokenizer_2`"
            ));
        }
        for (name, want) in [
            ("unet", "UNet2DConditionModel"),
            ("vae", "AutoencoderKL"),
            ("text_encoder", "CLIPTextModel"),
            ("text_encoder_2", "CLIPTextModelWithProjection"),
        ] {
            match self.component_class(name) {
                Some(class) if class != want => {
                    return unsupported(format!("{pipeline}: `{name}` is a {class} (only {want})"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Opens `root/unet`, `root/vae`, `root/text_encoder` (and `root/scheduler` if present).
pub fn open_diffusers_folder(
    root: impl AsRef<Path>,
    opts: &LoadOptions,
) -> Result<PipelineWeights> {
    let root = root.as_ref();
    let index_path = root.join("model_index.json");
    let index = if index_path.is_file() {
        Some(ModelIndex::load(&index_path)?)
    } else {
        None
    };
    let unet = open_component(root.join("unet"), ComponentKind::Unet, opts)?;
    let vae = open_component(root.join("vae"), ComponentKind::Vae, opts)?;
    // SDXL by its index, or (a folder without model_index.json) by its second encoder.
    let sdxl = index
        .as_ref()
        .map_or_else(|| root.join("text_encoder_2").is_dir(), ModelIndex::is_sdxl);
    // An SDXL folder may have no first text encoder (the refiner: `[null, null]` in its index,
    // or no `text_encoder/` in a folder without one); every other folder needs it.
    let text_encoder_dir = root.join("text_encoder");
    let has_text_encoder = match &index {
        _ if !sdxl => true,
        Some(index) => index.component_class("text_encoder").is_some(),
        None => text_encoder_dir.is_dir(),
    };
    let text_encoder = if has_text_encoder {
        Some(open_component(
            text_encoder_dir,
            ComponentKind::TextEncoder,
            opts,
        )?)
    } else {
        None
    };
    let text_encoder_2 = if sdxl {
        let dir = root.join("text_encoder_2");
        Some(open_component(dir, ComponentKind::TextEncoder2, opts)?)
    } else {
        None
    };
    let family = match &text_encoder {
        Some(te) if !sdxl => folder_family(&unet.config, &te.config),
        _ => ModelFamily::Sdxl,
    };
    let sched_path = root.join("scheduler").join("scheduler_config.json");
    let mut scheduler_config = if sched_path.is_file() {
        read_json(&sched_path)?
    } else {
        rename::default_scheduler_config(default_prediction(family, &unet.config))
    };
    if let (Some(p), Some(obj)) = (opts.prediction_type, scheduler_config.as_object_mut()) {
        obj.insert("prediction_type".into(), Value::from(p.as_str()));
    }
    Ok(PipelineWeights {
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        force_zeros_for_empty_prompt: index
            .as_ref()
            .is_some_and(ModelIndex::force_zeros_for_empty_prompt),
        requires_aesthetics_score: index
            .as_ref()
            .is_some_and(ModelIndex::requires_aesthetics_score),
        scheduler_config,
        family,
        layout: SourceLayout::DiffusersFolder,
        ignored_keys: Vec::new(),
        unrecognized_keys: Vec::new(),
    })
}

/// Opens one diffusers model folder (`.../unet`, or a stand-alone VAE such as
/// `sd-vae-ft-mse/`). Without a config.json the config is inferred from the shapes.
pub fn open_component(
    dir: impl AsRef<Path>,
    kind: ComponentKind,
    opts: &LoadOptions,
) -> Result<Component> {
    let dir = dir.as_ref();
    let files = find_weight_files(dir, kind.weights_stem(), opts.variant)?;
    let files = files
        .iter()
        .map(|p| SafetensorsFile::open(p).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let name = format!("{} ({})", kind.subfolder(), dir.display());
    let weights = folder_store(name, files, kind)?;
    let config_path = dir.join("config.json");
    let (mut config, config_inferred) = if config_path.is_file() {
        (read_json(&config_path)?, false)
    } else {
        let shapes = weights.shapes();
        // without configs the family comes from the shapes alone
        let family = match kind {
            ComponentKind::Unet => match rename::cross_attention_dim(&shapes) {
                Some(1024) => ModelFamily::Sd2,
                _ => ModelFamily::Sd1,
            },
            ComponentKind::TextEncoder | ComponentKind::TextEncoder2 => {
                match shapes.get("text_model.embeddings.token_embedding.weight") {
                    Some(s) if s.get(1) == Some(&1024) => ModelFamily::Sd2,
                    _ => ModelFamily::Sd1,
                }
            }
            ComponentKind::Vae => ModelFamily::Sd1,
        };
        (infer(kind, &shapes, family, &opts.hints())?, true)
    };
    apply_overrides(&mut config, overrides(kind, opts));
    Ok(Component {
        weights,
        config,
        config_inferred,
    })
}

/// Opens a single-file CompVis/LDM or SDXL (generative-models) checkpoint: one memory map, three
/// renamed views (four for SDXL).
pub fn open_single_file(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<PipelineWeights> {
    let path = path.as_ref();
    if path
        .extension()
        .is_some_and(|e| e == "ckpt" || e == "pt" || e == "bin" || e == "pth")
    {
        return Err(WeightError::Unsupported {
            what: format!("{}: PyTorch pickle checkpoint", path.display()),
            hint: PICKLE_HINT.into(),
        });
    }
    let file = Arc::new(SafetensorsFile::open(path)?);
    let stored: BTreeMap<String, Vec<usize>> = file
        .names()
        .map(|k| {
            (
                k.to_string(),
                file.info(k).map(|i| i.shape.clone()).unwrap_or_default(),
            )
        })
        .collect();
    let plan = rename::plan_single_file(&stored)?;
    let store = |part: &str, map: &BTreeMap<String, rename::Renamed>| -> Result<WeightStore> {
        if map.is_empty() {
            return Err(WeightError::Config {
                what: format!("{}", path.display()),
                reason: format!("the checkpoint holds no {part} weights"),
            });
        }
        let entries = map
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    Entry {
                        file: 0,
                        source_key: r.source_key.clone(),
                        transform: r.transform.clone(),
                    },
                )
            })
            .collect();
        WeightStore::from_entries(
            format!("{part} ({})", path.display()),
            vec![file.clone()],
            entries,
        )
    };
    let unet_w = store("unet", &plan.unet)?;
    let vae_w = store("vae (`first_stage_model.*`)", &plan.vae)?;
    let text_w = store(
        "text_encoder (`cond_stage_model.*` / `conditioner.embedders.0.*`)",
        &plan.text_encoder,
    )?;
    let text_2_w = match plan.text_encoder_2.is_empty() {
        true => None,
        false => Some(store(
            "text_encoder_2 (`conditioner.embedders.1.model.*`)",
            &plan.text_encoder_2,
        )?),
    };
    let unet_shapes = unet_w.shapes();
    let family = plan.family(&unet_shapes);
    let text_2_shapes = text_2_w.as_ref().map(WeightStore::shapes);
    let hints = InferHints {
        text_embeds_dim: text_2_shapes
            .as_ref()
            .and_then(|s| s.get("text_projection.weight"))
            .and_then(|s| s.first().copied()),
        ..opts.hints()
    };
    let component =
        |kind: ComponentKind, weights: WeightStore, shapes: &BTreeMap<String, Vec<usize>>| {
            let mut config = infer(kind, shapes, family, &hints)?;
            apply_overrides(&mut config, overrides(kind, opts));
            Ok::<_, WeightError>(Component {
                weights,
                config,
                config_inferred: true,
            })
        };
    let unet = component(ComponentKind::Unet, unet_w, &unet_shapes)?;
    let vae_shapes = vae_w.shapes();
    let vae = component(ComponentKind::Vae, vae_w, &vae_shapes)?;
    let text_shapes = text_w.shapes();
    let text_encoder = component(ComponentKind::TextEncoder, text_w, &text_shapes)?;
    let text_encoder_2 = match (text_2_w, &text_2_shapes) {
        (Some(w), Some(shapes)) => Some(component(ComponentKind::TextEncoder2, w, shapes)?),
        _ => None,
    };
    let prediction = opts
        .prediction_type
        .unwrap_or_else(|| default_prediction(family, &unet.config));
    let sdxl = family == ModelFamily::Sdxl;
    Ok(PipelineWeights {
        unet,
        vae,
        text_encoder: Some(text_encoder),
        text_encoder_2,
        // StableDiffusionXLPipeline's default, which from_single_file keeps
        force_zeros_for_empty_prompt: sdxl,
        requires_aesthetics_score: false,
        scheduler_config: if sdxl {
            rename::sdxl_scheduler_config(prediction)
        } else {
            rename::default_scheduler_config(prediction)
        },
        family,
        layout: SourceLayout::SingleFile,
        ignored_keys: plan.ignored,
        unrecognized_keys: plan.unrecognized,
    })
}

fn infer(
    kind: ComponentKind,
    shapes: &BTreeMap<String, Vec<usize>>,
    family: ModelFamily,
    hints: &InferHints,
) -> Result<Value> {
    match kind {
        ComponentKind::Unet => rename::infer_unet_config(shapes, family, hints),
        ComponentKind::Vae => rename::infer_vae_config(shapes, family, hints),
        ComponentKind::TextEncoder => rename::infer_text_encoder_config(shapes, family),
        ComponentKind::TextEncoder2 => rename::infer_text_encoder_2_config(shapes),
    }
}

/// The user's config overrides for `kind`.
fn overrides(kind: ComponentKind, opts: &LoadOptions) -> Option<&Map<String, Value>> {
    match kind {
        ComponentKind::Unet => Some(&opts.unet_overrides),
        ComponentKind::Vae => Some(&opts.vae_overrides),
        ComponentKind::TextEncoder => Some(&opts.text_encoder_overrides),
        ComponentKind::TextEncoder2 => Some(&opts.text_encoder_2_overrides),
    }
}

fn apply_overrides(config: &mut Value, over: Option<&Map<String, Value>>) {
    if let (Some(obj), Some(over)) = (config.as_object_mut(), over) {
        for (k, v) in over {
            obj.insert(k.clone(), v.clone());
        }
    }
}

/// SD 2.x text encoders are OpenCLIP (exact gelu); SD 1.x's is OpenAI CLIP (quick_gelu).
fn folder_family(unet: &Value, text: &Value) -> ModelFamily {
    match text.get("hidden_act").and_then(Value::as_str) {
        Some("gelu") => ModelFamily::Sd2,
        Some(_) => ModelFamily::Sd1,
        None => match unet.get("cross_attention_dim").and_then(Value::as_u64) {
            Some(1024) => ModelFamily::Sd2,
            _ => ModelFamily::Sd1,
        },
    }
}

/// diffusers' `_legacy_load_scheduler`: "v2" checkpoints default to v_prediction, everything
/// else (SD 1.x, inpainting) to epsilon.
fn default_prediction(family: ModelFamily, unet_config: &Value) -> PredictionType {
    let in_channels = unet_config
        .get("in_channels")
        .and_then(Value::as_u64)
        .unwrap_or(4);
    if family == ModelFamily::Sd2 && in_channels == 4 {
        PredictionType::VPrediction
    } else {
        PredictionType::Epsilon
    }
}

/// A folder store with the folder renamings (see rename.rs): VAE attention names of old
/// diffusers versions, `text_model.` prefix for text encoders, buffers dropped.
fn folder_store(
    name: String,
    files: Vec<Arc<SafetensorsFile>>,
    kind: ComponentKind,
) -> Result<WeightStore> {
    if kind == ComponentKind::Unet {
        return WeightStore::from_files(name, files);
    }
    let mut entries = BTreeMap::new();
    for (i, file) in files.iter().enumerate() {
        for key in file.names() {
            let shape = file.info(key).map(|t| t.shape.as_slice()).unwrap_or(&[]);
            let (presented, transform) = match kind {
                ComponentKind::Vae => {
                    let k = rename::vae_folder_key(key);
                    let t = rename::vae_folder_transform(&k, shape);
                    (k, t)
                }
                _ => match rename::text_encoder_folder_key(key) {
                    Some(k) => (k, Transform::None),
                    None => continue,
                },
            };
            let entry = Entry {
                file: i,
                source_key: key.to_string(),
                transform,
            };
            if let Some(prev) = entries.insert(presented.clone(), entry) {
                return Err(WeightError::Malformed {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "`{key}` and `{}` both present `{presented}`",
                        prev.source_key
                    ),
                });
            }
        }
    }
    WeightStore::from_entries(name, files, entries)
}

/// The safetensors file(s) of one component, by variant preference; follows index files.
fn find_weight_files(dir: &Path, stem: &str, variant: Variant) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(WeightError::NotFound {
            path: dir.to_path_buf(),
            hint: "a diffusers folder has unet/, vae/ and text_encoder/ subfolders \
                   (StableDiffusionPipeline.save_pretrained)"
                .into(),
        });
    }
    let plain = [
        format!("{stem}.safetensors"),
        format!("{stem}.safetensors.index.json"),
    ];
    let fp16 = [
        format!("{stem}.fp16.safetensors"),
        format!("{stem}.safetensors.index.fp16.json"),
        format!("{stem}.fp16.safetensors.index.json"),
    ];
    let candidates: Vec<&String> = match variant {
        Variant::Auto => plain.iter().chain(fp16.iter()).collect(),
        Variant::Plain => plain.iter().collect(),
        Variant::Fp16 => fp16.iter().collect(),
    };
    for name in &candidates {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if name.ends_with(".json") {
            return shard_files(dir, &path);
        }
        return Ok(vec![path]);
    }
    // Nothing usable: say why as precisely as we can.
    let present: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| WeightError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let is_pickle = |n: &String| {
        [".bin", ".ckpt", ".pt", ".pth"]
            .iter()
            .any(|e| n.ends_with(e))
    };
    if let Some(p) = present.iter().find(|n| is_pickle(n)) {
        return Err(WeightError::Unsupported {
            what: format!("{}: only PyTorch pickle weights (`{p}`)", dir.display()),
            hint: PICKLE_HINT.into(),
        });
    }
    let other_variant = match variant {
        Variant::Plain => fp16.iter().find(|n| dir.join(n).is_file()),
        Variant::Fp16 => plain.iter().find(|n| dir.join(n).is_file()),
        Variant::Auto => None,
    };
    let hint = match other_variant {
        Some(n) => format!("`{n}` is there: choose Variant::Auto to use it"),
        None => format!(
            "the folder holds: {}",
            if present.is_empty() {
                "nothing".into()
            } else {
                present.join(", ")
            }
        ),
    };
    Err(WeightError::NotFound {
        path: dir.join(candidates[0]),
        hint,
    })
}

/// Shard files named by a `*.safetensors.index.json` (`{"weight_map": {tensor: file}}`).
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| WeightError::Malformed {
            path: index.to_path_buf(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(WeightError::Malformed {
            path: index.to_path_buf(),
            reason: "empty `weight_map`".into(),
        });
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    crate::models::config::parse_python_json(&text).map_err(|e| WeightError::Config {
        what: path.display().to_string(),
        reason: format!("invalid JSON: {e}"),
    })
}
