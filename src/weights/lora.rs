//! LoRA files as people download them: which format, which layers of which model they change, and
//! with which tensors. Reading only; applying a LoRA to loaded weights (on the GPU) is the
//! models' business.
//!
//! Formats, recognised from the keys:
//! - kohya / A1111 (`lora_unet_<module with underscores>.lora_down.weight`, `.lora_up.weight`,
//!   `.alpha`; text encoders `lora_te_…`, SDXL `lora_te1_…`/`lora_te2_…`), including LoCon conv
//!   layers (k×k `lora_down` on resnet convs) and Tucker-decomposed convs (`lora_mid`);
//! - diffusers / PEFT (`unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.…`,
//!   `text_encoder_2.…`, optional `.alpha`);
//! - diffusers' older attention-processor names (`…attn1.processor.to_q_lora.down.weight`,
//!   `…to_q.lora.down.weight`, `…lora_linear_layer.down.weight`).
//!
//! Underscored kohya names are matched against the target model's own module names (each
//! module's dotted name with `.` → `_`), as A1111 and diffusers do, so no rename table can drift;
//! U-Net modules also under their LDM/SGM names (`input_blocks_4_1_…`: kohya's SDXL LoRAs), from
//! the inverse of the single-file renaming (`rename::ldm_unet_names`).
//! Scale (diffusers' and A1111's): `weight × alpha / rank`, or `weight` when the file has no alpha.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::{HostTensor, Result, SafetensorsFile, WeightError};

/// The model a LoRA layer changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG).
    TextEncoder2,
}

impl LoraTarget {
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How the file spells its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
    DiffusersLegacy,
}

/// One low-rank update `ΔW = scale · up · [mid] · down` of one weight.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLayer {
    pub target: LoraTarget,
    /// The weight it changes, as the target model names it (`…attn1.to_q.weight`).
    pub key: String,
    /// Shape of that weight: [out, in] (linear) or [out, in, kh, kw] (conv).
    pub weight_shape: Vec<usize>,
    /// Names of the file's tensors: down [rank, in(, kh, kw)] (or [rank, in, 1, 1] with mid),
    /// up [out, rank(, 1, 1)], Tucker core mid [rank, rank, kh, kw].
    pub down: String,
    pub up: String,
    pub mid: Option<String>,
    pub rank: usize,
    pub alpha: Option<f32>,
}

impl LoraLayer {
    /// `alpha / rank`, or 1 without an alpha: multiply by the user's weight for the scale.
    pub fn alpha_scale(&self) -> f32 {
        self.alpha.map_or(1.0, |a| a / self.rank as f32)
    }
}

/// A parsed LoRA file: its layers, matched to the target models' weights.
#[derive(Clone, Debug)]
pub struct Lora {
    /// File stem (what `<lora:NAME:w>` refers to).
    pub name: String,
    pub format: LoraFormat,
    pub file: Arc<SafetensorsFile>,
    pub layers: Vec<LoraLayer>,
}

impl Lora {
    pub fn tensor(&self, name: &str) -> Result<HostTensor<'_>> {
        self.file.tensor(name)
    }

    /// A1111's short hash of the file (`Lora hashes:` in a PNG's parameters): the first 12 hex
    /// digits of the SHA-256 of the tensor data after the header ("addnet" hash), or of the
    /// `sshs_model_hash` kohya writes into the metadata, which A1111 prefers.
    pub fn short_hash(&self) -> String {
        let full = match self.file.metadata().get("sshs_model_hash") {
            Some(h) if !h.is_empty() => h.clone(),
            _ => crate::util::sha256_hex(self.file.data_bytes()),
        };
        full.chars().take(12).collect()
    }

    /// How many layers it changes per target model.
    pub fn layer_counts(&self) -> BTreeMap<LoraTarget, usize> {
        let mut counts = BTreeMap::new();
        for layer in &self.layers {
            *counts.entry(layer.target).or_insert(0) += 1;
        }
        counts
    }
}

/// The weights a LoRA may change: per target model, every weight key with its shape (the loaded
/// model's store: diffusers names).
#[derive(Default)]
pub struct LoraTargets {
    /// Canonical key → (the store's key, shape). Text encoders are stored with or without
    /// transformers' `text_model.` prefix depending on who saved them; LoRA files name it or not
    /// depending on their tool, so the canonical key drops it.
    models: HashMap<LoraTarget, HashMap<String, (String, Vec<usize>)>>,
}

fn canonical(key: &str) -> &str {
    key.strip_prefix("text_model.").unwrap_or(key)
}

impl LoraTargets {
    pub fn with(mut self, target: LoraTarget, weights: BTreeMap<String, Vec<usize>>) -> Self {
        let map = weights
            .into_iter()
            .map(|(k, shape)| (canonical(&k).to_string(), (k, shape)))
            .collect();
        self.models.insert(target, map);
        self
    }

    /// The store's key and shape for a weight key as a LoRA names it.
    fn find(&self, target: LoraTarget, key: &str) -> Option<&(String, Vec<usize>)> {
        self.models.get(&target)?.get(canonical(key))
    }

    /// Underscored module name (`down_blocks_0_attentions_0_…_to_q`, text encoders with and
    /// without `text_model_`; U-Net modules also under their LDM/SGM names,
    /// `input_blocks_4_1_…_to_q`, as kohya's SDXL LoRAs spell them) → canonical weight key, per
    /// target.
    fn underscored(&self, target: LoraTarget) -> HashMap<String, String> {
        let mut out = HashMap::new();
        let keys: Vec<&String> = self
            .models
            .get(&target)
            .into_iter()
            .flat_map(|m| m.keys())
            .collect();
        if target == LoraTarget::Unet {
            for (key, ldm) in super::rename::ldm_unet_names(keys.iter().copied()) {
                if let Some(module) = ldm.strip_suffix(".weight") {
                    out.insert(module.replace('.', "_"), key);
                }
            }
        }
        for key in keys {
            if let Some(module) = key.strip_suffix(".weight") {
                let under = module.replace('.', "_");
                if target != LoraTarget::Unet {
                    out.insert(format!("text_model_{under}"), key.clone());
                }
                out.insert(under, key.clone());
            }
        }
        out
    }
}

/// The parts of one layer as found in the file, before matching.
#[derive(Default, Debug)]
struct Parts {
    down: Option<String>,
    up: Option<String>,
    mid: Option<String>,
    alpha: Option<String>,
}

/// (target, module as the file names it, which part) for one key, or None if not a LoRA key.
fn classify(key: &str) -> Option<(LoraFormat, LoraTarget, String, &'static str)> {
    const KOHYA_PREFIXES: [(&str, LoraTarget); 4] = [
        ("lora_unet_", LoraTarget::Unet),
        ("lora_te1_", LoraTarget::TextEncoder),
        ("lora_te2_", LoraTarget::TextEncoder2),
        ("lora_te_", LoraTarget::TextEncoder),
    ];
    const KOHYA_PARTS: [(&str, &str); 4] = [
        (".lora_down.weight", "down"),
        (".lora_up.weight", "up"),
        (".lora_mid.weight", "mid"),
        (".alpha", "alpha"),
    ];
    for (prefix, target) in KOHYA_PREFIXES {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, part) in KOHYA_PARTS {
                if let Some(module) = rest.strip_suffix(suffix) {
                    return Some((LoraFormat::Kohya, target, module.to_string(), part));
                }
            }
            return None;
        }
    }
    const DIFFUSERS_PREFIXES: [(&str, LoraTarget); 3] = [
        ("unet.", LoraTarget::Unet),
        ("text_encoder_2.", LoraTarget::TextEncoder2),
        ("text_encoder.", LoraTarget::TextEncoder),
    ];
    // (suffix, part, format, module suffix to append): the processor names drop the layer's own
    // name into the suffix (`to_out_lora` is `to_out.0`).
    const DIFFUSERS_PARTS: [(&str, &str, LoraFormat, &str); 16] = [
        (".lora_A.weight", "down", LoraFormat::Peft, ""),
        (".lora_B.weight", "up", LoraFormat::Peft, ""),
        (".lora.down.weight", "down", LoraFormat::DiffusersLegacy, ""),
        (".lora.up.weight", "up", LoraFormat::DiffusersLegacy, ""),
        (
            ".lora_linear_layer.down.weight",
            "down",
            LoraFormat::DiffusersLegacy,
            "",
        ),
        (
            ".lora_linear_layer.up.weight",
            "up",
            LoraFormat::DiffusersLegacy,
            "",
        ),
        (
            ".processor.to_q_lora.down.weight",
            "down",
            LoraFormat::DiffusersLegacy,
            ".to_q",
        ),
        (
            ".processor.to_q_lora.up.weight",
            "up",
            LoraFormat::DiffusersLegacy,
            ".to_q",
        ),
        (
            ".processor.to_k_lora.down.weight",
            "down",
            LoraFormat::DiffusersLegacy,
            ".to_k",
        ),
        (
            ".processor.to_k_lora.up.weight",
            "up",
            LoraFormat::DiffusersLegacy,
            ".to_k",
        ),
        (
            ".processor.to_v_lora.down.weight",
            "down",
            LoraFormat::DiffusersLegacy,
            ".to_v",
        ),
        (
            ".processor.to_v_lora.up.weight",
            "up",
            LoraFormat::DiffusersLegacy,
            ".to_v",
        ),
        (
            ".processor.to_out_lora.down.weight",
            "down",
            LoraFormat::DiffusersLegacy,
            ".to_out.0",
        ),
        (
            ".processor.to_out_lora.up.weight",
            "up",
            LoraFormat::DiffusersLegacy,
            ".to_out.0",
        ),
        (".alpha", "alpha", LoraFormat::Peft, ""),
        (".lora.alpha", "alpha", LoraFormat::DiffusersLegacy, ""),
    ];
    for (prefix, target) in DIFFUSERS_PREFIXES {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, part, format, append) in DIFFUSERS_PARTS {
                if let Some(module) = rest.strip_suffix(suffix) {
                    return Some((format, target, format!("{module}{append}"), part));
                }
            }
            return None;
        }
    }
    None
}

/// Open a LoRA file and match every layer in it to a weight of the target models. Errors: a file
/// with no LoRA keys, keys of a kind we do not apply (LoHa, LoKr, DoRA), modules the models do not
/// have (the first few are listed), tensors whose shapes do not fit the weight they change.
pub fn open_lora(path: &Path, targets: &LoraTargets) -> Result<Lora> {
    let file = Arc::new(SafetensorsFile::open(path)?);
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let fail = |reason: String| WeightError::Config {
        what: format!("LoRA {}", path.display()),
        reason,
    };

    let mut modules: BTreeMap<(LoraTarget, String), Parts> = BTreeMap::new();
    let mut formats = Vec::new();
    let mut foreign = Vec::new();
    for key in file.names() {
        match classify(key) {
            Some((format, target, module, part)) => {
                if !formats.contains(&format) && part != "alpha" {
                    formats.push(format);
                }
                let parts = modules.entry((target, module)).or_default();
                let slot = match part {
                    "down" => &mut parts.down,
                    "up" => &mut parts.up,
                    "mid" => &mut parts.mid,
                    _ => &mut parts.alpha,
                };
                *slot = Some(key.to_string());
            }
            None => foreign.push(key.to_string()),
        }
    }
    let unsupported: Vec<&String> = foreign
        .iter()
        .filter(|k| {
            ["hada_", "lokr_", "dora_scale"]
                .iter()
                .any(|p| k.contains(p))
                || [".diff", ".diff_b"].iter().any(|s| k.ends_with(s))
        })
        .collect();
    if !unsupported.is_empty() {
        return Err(WeightError::Unsupported {
            what: format!(
                "LoRA {}: LyCORIS LoHa/LoKr/DoRA or full-difference tensors ({} keys, e.g. `{}`)",
                path.display(),
                unsupported.len(),
                unsupported[0]
            ),
            hint:
                "only LoRA and LoCon (lora_down/lora_up/lora_mid, lora_A/lora_B) files are applied"
                    .into(),
        });
    }
    let format = match formats.as_slice() {
        [] => {
            let sample: Vec<&str> = foreign.iter().take(3).map(|s| s.as_str()).collect();
            return Err(fail(format!(
                "no LoRA tensors in it (keys look like {sample:?}): not a LoRA file, or a format we do not read"
            )));
        }
        [one] => *one,
        _ => LoraFormat::DiffusersLegacy, // PEFT and legacy names mixed: diffusers wrote both
    };

    let mut lookup: HashMap<LoraTarget, HashMap<String, String>> = HashMap::new();
    let mut layers = Vec::new();
    let mut unmatched = Vec::new();
    for ((target, module), parts) in &modules {
        let (Some(down), Some(up)) = (&parts.down, &parts.up) else {
            return Err(fail(format!(
                "{} `{module}` has {} but not both down and up matrices",
                target.name(),
                if parts.down.is_some() {
                    "a down matrix"
                } else if parts.up.is_some() {
                    "an up matrix"
                } else {
                    "only an alpha"
                }
            )));
        };
        let key = match format {
            LoraFormat::Kohya => lookup
                .entry(*target)
                .or_insert_with(|| targets.underscored(*target))
                .get(module)
                .cloned(),
            _ => Some(format!("{module}.weight")),
        };
        let Some((key, shape)) = key.and_then(|k| targets.find(*target, &k).cloned()) else {
            unmatched.push(format!("{}:{module}", target.name()));
            continue;
        };
        let alpha = match &parts.alpha {
            Some(a) => {
                let t = file.tensor(a)?;
                match t.to_f32_vec().as_slice() {
                    [v] if v.is_finite() => Some(*v),
                    other => {
                        return Err(fail(format!(
                            "`{a}` should be one finite number, found {other:?}"
                        )))
                    }
                }
            }
            None => None,
        };
        let names = LayerTensors {
            down,
            up,
            mid: parts.mid.as_deref(),
        };
        let layer = check_shapes(&file, *target, key, shape, &names, alpha).map_err(fail)?;
        layers.push(layer);
    }
    if !unmatched.is_empty() {
        let first: Vec<&str> = unmatched.iter().take(5).map(|s| s.as_str()).collect();
        return Err(fail(format!(
            "{} of its {} layers name modules this model does not have (first: {}); \
             is it made for another model family (SD 1.x / 2.x / XL)?",
            unmatched.len(),
            modules.len(),
            first.join(", ")
        )));
    }
    Ok(Lora {
        name,
        format,
        file,
        layers,
    })
}

/// The file's tensor names for one layer.
#[derive(Clone, Copy)]
struct LayerTensors<'a> {
    down: &'a str,
    up: &'a str,
    mid: Option<&'a str>,
}

/// Check that down/up(/mid) fit the weight they change; the layer with its rank.
fn check_shapes(
    file: &SafetensorsFile,
    target: LoraTarget,
    key: String,
    weight_shape: Vec<usize>,
    names: &LayerTensors<'_>,
    alpha: Option<f32>,
) -> std::result::Result<LoraLayer, String> {
    let LayerTensors { down, up, mid } = *names;
    let shape_of = |name: &str| -> std::result::Result<Vec<usize>, String> {
        file.info(name)
            .map(|i| i.shape.clone())
            .ok_or_else(|| format!("`{name}` is missing"))
    };
    let (d, u) = (shape_of(down)?, shape_of(up)?);
    let m = mid.map(shape_of).transpose()?;
    let bad = |why: &str| {
        Err(format!(
            "`{down}` {d:?} / `{up}` {u:?}{} do not fit {} `{key}` {weight_shape:?}: {why}",
            m.as_ref()
                .map(|m| format!(" / mid {m:?}"))
                .unwrap_or_default(),
            target.name()
        ))
    };
    let rank = *d.first().unwrap_or(&0);
    if rank == 0 || u.len() < 2 || u[1] != rank || u[0] != weight_shape[0] {
        return bad("up must be [out, rank] and down [rank, in]");
    }
    if u.len() > 2 && u[2..].iter().any(|&x| x != 1) {
        return bad("up must be a 1×1 kernel");
    }
    match (weight_shape.len(), &m) {
        (2, None) => {
            if d.len() != 2 || d[1] != weight_shape[1] {
                return bad("down must be [rank, in]");
            }
        }
        (4, None) => {
            // LoCon: the down kernel has the weight's spatial size; a 2-D down on a 1×1 conv too.
            let spatial = &weight_shape[2..];
            let ok = (d.len() == 4 && d[1] == weight_shape[1] && d[2..] == *spatial)
                || (d.len() == 2 && d[1] == weight_shape[1] && spatial == [1, 1]);
            if !ok {
                return bad("down must be [rank, in, kh, kw]");
            }
        }
        (4, Some(m)) => {
            let ok = d.len() == 4
                && d[1] == weight_shape[1]
                && d[2..] == [1, 1]
                && m.len() == 4
                && m[0] == rank
                && m[1] == rank
                && m[2..] == weight_shape[2..];
            if !ok {
                return bad("Tucker: down [rank, in, 1, 1], mid [rank, rank, kh, kw]");
            }
        }
        _ => return bad("only linear and conv weights take a LoRA"),
    }
    Ok(LoraLayer {
        target,
        key,
        weight_shape,
        down: down.to_string(),
        up: up.to_string(),
        mid: mid.map(str::to_string),
        rank,
        alpha,
    })
}

/// Where to find `<lora:NAME:w>`: `DIR/NAME.safetensors` (a `.pt`/`.ckpt` beside it is refused,
/// since reading a pickle can run code).
pub fn find_lora(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(WeightError::Config {
            what: format!("<lora:{name}>"),
            reason: "a LoRA name is a file name in the LoRA folder, not a path".into(),
        });
    }
    let path = dir.join(format!("{name}.safetensors"));
    if path.is_file() {
        return Ok(path);
    }
    for ext in ["pt", "ckpt", "bin"] {
        if dir.join(format!("{name}.{ext}")).is_file() {
            return Err(WeightError::Unsupported {
                what: format!("{}/{name}.{ext}: a pickle", dir.display()),
                hint: super::safetensors::PICKLE_HINT.into(),
            });
        }
    }
    Err(WeightError::NotFound {
        path,
        hint: "put NAME.safetensors in the LoRA folder (--lora-dir), or pass --lora FILE".into(),
    })
}
