//! `ldm inspect PATH`: what a model file or folder is, from its safetensors headers and JSON
//! configs alone (nothing is loaded onto a GPU, no tensor data is read).
//!
//! The model is opened as `ldm generate` opens it ([`open_model`]: the same folder rules, the same
//! single-file renaming and config inference), so what `inspect` reports is what `generate`
//! would run: the family, whether the U-Net is a 9-channel inpainting one, the prediction type
//! and scheduler the sampler defaults come from, and per component its files, dtypes and
//! parameter count (the element count of every tensor the engine reads, from the headers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::weights::{open_model, Component, LoadOptions, ModelFamily, SourceLayout};
use crate::Result;

/// What kind of model a checkpoint is, as far as its files tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Sd1,
    Sd2,
    SdxlBase,
    /// stabilityai/stable-diffusion-xl-refiner-1.0's layout: `text_encoder_2` alone and
    /// aesthetic-score conditioning.
    SdxlRefiner,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Sd1 => "SD 1.x",
            ModelKind::Sd2 => "SD 2.x",
            ModelKind::SdxlBase => "SDXL base",
            ModelKind::SdxlRefiner => "SDXL refiner",
        })
    }
}

/// One model of the pipeline (U-Net, VAE, a text encoder).
#[derive(Clone, Debug, Serialize)]
pub struct ComponentReport {
    /// diffusers' subfolder name: `unet`, `vae`, `text_encoder`, `text_encoder_2`.
    pub name: String,
    pub files: Vec<PathBuf>,
    /// Tensors the engine reads.
    pub tensors: usize,
    /// Their total element count.
    pub parameters: u64,
    /// Stored dtype (safetensors' name: F16, F32, BF16, ...) → number of tensors.
    pub dtypes: BTreeMap<String, usize>,
    /// The config was inferred from tensor shapes (single files), not read.
    pub config_inferred: bool,
}

/// Everything `ldm inspect` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ModelReport {
    pub path: PathBuf,
    /// `folder` (diffusers) or `single_file`.
    pub layout: &'static str,
    pub kind: ModelKind,
    /// The U-Net takes 9 input channels (latents, mask, masked-image latents).
    pub inpainting: bool,
    /// A Turbo model (stabilityai/sd-turbo, sdxl-turbo), recognised by its scheduler config:
    /// Euler or Euler ancestral with trailing spacing (a heuristic: nothing else in the files
    /// tells).
    pub turbo: bool,
    /// model_index.json's `_class_name` (folders that have one).
    pub pipeline: Option<String>,
    pub prediction_type: String,
    pub scheduler: Option<String>,
    pub timestep_spacing: Option<String>,
    pub components: Vec<ComponentReport>,
    /// Tokenizer subfolders found (single files hold none: `ldm` uses the shipped CLIP one).
    pub tokenizers: Vec<String>,
    /// Single file: stored tensors no rule recognised (the engine ignores them).
    pub unrecognized_tensors: usize,
}

impl ModelReport {
    pub fn total_parameters(&self) -> u64 {
        self.components.iter().map(|c| c.parameters).sum()
    }

    /// The model's name as a sentence fragment: "SDXL base", "SD 1.x inpainting", "SDXL Turbo".
    pub fn description(&self) -> String {
        let mut s = self.kind.to_string();
        if self.turbo {
            s = s.replace(" base", "") + " Turbo";
        }
        if self.inpainting {
            s += " inpainting (9-channel U-Net)";
        }
        s
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let layout = match self.layout {
            "folder" => "diffusers folder",
            _ => "single-file checkpoint",
        };
        let mut out = format!("{}: {layout}\n", self.path.display());
        out += &format!("model:           {}\n", self.description());
        if let Some(p) = &self.pipeline {
            out += &format!("pipeline:        {p}\n");
        }
        out += &format!("prediction type: {}\n", self.prediction_type);
        out += &format!(
            "scheduler:       {} (timestep_spacing {})\n",
            self.scheduler.as_deref().unwrap_or("none given"),
            self.timestep_spacing.as_deref().unwrap_or("default")
        );
        out += &format!(
            "tokenizers:      {}\n",
            if self.tokenizers.is_empty() {
                "none (the shipped CLIP tokenizer is used)".to_string()
            } else {
                self.tokenizers.join(", ")
            }
        );
        out += &format!(
            "{:<15} {:>15} {:>8}  {:<12} files\n",
            "component", "parameters", "tensors", "dtypes"
        );
        for c in &self.components {
            let dtypes: Vec<String> = c.dtypes.keys().map(|d| d.to_lowercase()).collect();
            let files: Vec<String> = c
                .files
                .iter()
                .map(|f| relative(f, &self.path).display().to_string())
                .collect();
            out += &format!(
                "{:<15} {:>15} {:>8}  {:<12} {}{}\n",
                c.name,
                grouped(c.parameters),
                c.tensors,
                dtypes.join(","),
                files.join(", "),
                if c.config_inferred {
                    " (config inferred)"
                } else {
                    ""
                }
            );
        }
        out += &format!("{:<15} {:>15}\n", "total", grouped(self.total_parameters()));
        if self.unrecognized_tensors > 0 {
            out += &format!(
                "{} stored tensors not recognised (ignored by the engine)\n",
                self.unrecognized_tensors
            );
        }
        out
    }
}

/// `1234567` → `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A folder's files relative to it; a single file by its name.
fn relative<'a>(file: &'a Path, root: &Path) -> &'a Path {
    match file.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel,
        _ => file.file_name().map_or(file, Path::new),
    }
}

fn component_report(name: &str, c: &Component) -> ComponentReport {
    let store = &c.weights;
    let mut parameters = 0u64;
    let mut dtypes = BTreeMap::new();
    let mut tensors = 0;
    for key in store.keys() {
        let Some(entry) = store.entry(key) else {
            continue;
        };
        let Some(info) = store.files()[entry.file].info(&entry.source_key) else {
            continue;
        };
        // The presented shape: a fused q/k/v tensor counts once per part it is split into.
        let shape = entry
            .transform
            .apply_shape(&info.shape)
            .unwrap_or_else(|| info.shape.clone());
        parameters += shape.iter().map(|&d| d as u64).product::<u64>();
        *dtypes.entry(info.dtype_name.clone()).or_insert(0) += 1;
        tensors += 1;
    }
    ComponentReport {
        name: name.into(),
        files: store
            .files()
            .iter()
            .map(|f| f.path().to_path_buf())
            .collect(),
        tensors,
        parameters,
        dtypes,
        config_inferred: c.config_inferred,
    }
}

/// Describes the model at `path` (a diffusers folder or a single `.safetensors` file) from its
/// headers and configs.
pub fn inspect(path: &Path) -> Result<ModelReport> {
    let w = open_model(path, &LoadOptions::default())?;
    let folder = w.layout == SourceLayout::DiffusersFolder;
    let kind = match w.family {
        ModelFamily::Sd1 => ModelKind::Sd1,
        ModelFamily::Sd2 => ModelKind::Sd2,
        ModelFamily::Sdxl if w.text_encoder.is_none() || w.requires_aesthetics_score => {
            ModelKind::SdxlRefiner
        }
        ModelFamily::Sdxl => ModelKind::SdxlBase,
    };
    let sched = &w.scheduler_config;
    let text = |key: &str| sched.get(key).and_then(Value::as_str).map(String::from);
    let scheduler = text("_class_name");
    let timestep_spacing = text("timestep_spacing");
    // A heuristic: the Turbo folders ship an Euler (ancestral) scheduler with trailing spacing,
    // which ordinary SD/SDXL folders (leading) do not.
    let turbo = matches!(
        scheduler.as_deref(),
        Some("EulerAncestralDiscreteScheduler" | "EulerDiscreteScheduler")
    ) && timestep_spacing.as_deref() == Some("trailing");
    let inpainting = w.unet.config.get("in_channels").and_then(Value::as_u64) == Some(9);
    let mut components = vec![
        component_report("unet", &w.unet),
        component_report("vae", &w.vae),
    ];
    if let Some(te) = &w.text_encoder {
        components.push(component_report("text_encoder", te));
    }
    if let Some(te) = &w.text_encoder_2 {
        components.push(component_report("text_encoder_2", te));
    }
    let tokenizers = if folder {
        ["tokenizer", "tokenizer_2"]
            .into_iter()
            .filter(|t| path.join(t).is_dir())
            .map(String::from)
            .collect()
    } else {
        Vec::new()
    };
    let pipeline = std::fs::read(path.join("model_index.json"))
        .ok()
        .filter(|_| folder)
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("_class_name")?.as_str().map(String::from));
    Ok(ModelReport {
        path: path.to_path_buf(),
        layout: if folder { "folder" } else { "single_file" },
        kind,
        inpainting,
        turbo,
        pipeline,
        prediction_type: text("prediction_type").unwrap_or_else(|| "epsilon".into()),
        scheduler,
        timestep_spacing,
        components,
        tokenizers,
        unrecognized_tensors: w.unrecognized_keys.len(),
    })
}
