//! Applying a LoRA layer to a loaded weight, on the GPU: `W' = W + scale · up · [mid] · down`
//! with our own matmul kernel, in the layout our kernels keep weights in ([out, in] for linears,
//! [out, kh, kw, in] for convs).
//!
//! The host only converts the file's tensors to f32 and reorders them (transposes and the
//! OIHW → OHWI permutation the conv loader also does): data layout, no arithmetic. The products
//! and the sum with `W` run in the matmul kernel (f32 accumulation, one rounding to the weight's
//! dtype, the sum fused as its residual epilogue).
//!
//! Applying a set of LoRAs to a loaded model ([`LoraState::set`]) writes each merged weight into
//! the layer's own buffer (a GPU copy), after setting the original values aside; a later set
//! starts again from those originals, and removing a LoRA writes them back, so the base model
//! comes back bit for bit (no subtraction of the delta, which would round). Merging beats
//! applying the LoRA unmerged as an extra low-rank matmul per layer per step: one merge against
//! two more matmuls in every one of the hundreds of LoRA'd layer calls of every step, and the
//! denoising loop's kernels and bind groups stay exactly those of the base model. The price is
//! memory for the originals: one copy of every weight a LoRA changes, while it is applied
//! (SD 1.5 in f16 with a LoRA on every attention, feed-forward and text-encoder linear: 671 MiB).
//! [`LoraBackup`] says where: host memory by default (as A1111 keeps its backups: GPU memory is
//! what Stable Diffusion runs out of), or the GPU (no transfers; for GPUs with room to spare).
//!
//! Tucker-decomposed convs (`lora_mid`): `ΔW[o,i,h,w] = Σ_ab up[o,a]·mid[a,b,h,w]·down[b,i]`,
//! as two products: `T[o,(h,w,b)] = up · mid'` with mid reordered to [a, h, w, b], which read as
//! [(o,h,w), b] is exactly the left operand of `T · down`, whose result is [(o,h,w), i]: our conv
//! layout, with no reordering on the GPU.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::kernels::matmul::{self, Activation};
use crate::nn::WeightSite;
use crate::prompt::{extract_network_tags, LoraTag, NetworkTag};
use crate::weights::lora::{find_lora, Lora, LoraLayer, LoraTarget, LoraTargets};
use crate::{Error, Gpu, Result, Tensor};

/// The file's tensor as f32, with its shape.
fn host(lora: &Lora, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = lora.tensor(name)?;
    Ok((t.to_f32_vec(), t.shape.clone()))
}

/// `m` [rows, cols] row-major → [cols, rows].
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}

/// [a, b, h, w] → [a, h, w, b] (the last of the first two axes moved innermost).
fn move_axis1_last(t: &[f32], a: usize, b: usize, hw: usize) -> Vec<f32> {
    let mut out = vec![0.0; t.len()];
    for i in 0..a {
        for j in 0..b {
            for s in 0..hw {
                out[(i * hw + s) * b + j] = t[(i * b + j) * hw + s];
            }
        }
    }
    out
}

/// `base + scale · ΔW` for one layer, as a new tensor of `base`'s shape and dtype (`base` in our
/// layout: [out, in] or [out, kh, kw, in]).
pub fn merged_weight(
    gpu: &Gpu,
    lora: &Lora,
    layer: &LoraLayer,
    base: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let dtype = base.dtype();
    let ws = &layer.weight_shape; // torch layout: [out, in(, kh, kw)]
    let (out, cin) = (ws[0], ws[1]);
    let spatial: usize = ws[2..].iter().product();
    let ours: Vec<usize> = match ws.len() {
        2 => vec![out, cin],
        _ => vec![out, ws[2], ws[3], cin],
    };
    if base.shape() != ours.as_slice() {
        return Err(Error::shape(
            "lora",
            format!(
                "{}: weight {:?}, LoRA made for {ws:?}",
                layer.key,
                base.shape()
            ),
        ));
    }
    let r = layer.rank;
    let (up, _) = host(lora, &layer.up)?;
    // The user's weight and alpha/rank scale the up matrix (on the GPU).
    let up = crate::kernels::elementwise::scale(gpu, &gpu.upload(&up, &[out, r], dtype)?, scale)?;
    let (down, dshape) = host(lora, &layer.down)?;
    let flat_base = base.reshape(&[out, cin * spatial])?;
    let merged = match &layer.mid {
        None => {
            // down [r, in(, kh, kw)] → [r, kh, kw, in] → transposed [(kh, kw, in), r].
            let k_hw: usize = dshape[2..].iter().product();
            let down = move_axis1_last(&down, r, cin, k_hw);
            let down_t = gpu.upload(&transpose(&down, r, cin * k_hw), &[cin * k_hw, r], dtype)?;
            matmul::linear(gpu, &up, &down_t, None, Some(&flat_base), Activation::None)?
        }
        Some(mid) => {
            let (mid, _) = host(lora, mid)?;
            // mid [a, b, h, w] → [a, h, w, b] → transposed [(h, w, b), a].
            let mid = move_axis1_last(&mid, r, r, spatial);
            let mid_t = gpu.upload(&transpose(&mid, r, spatial * r), &[spatial * r, r], dtype)?;
            let t = matmul::linear(gpu, &up, &mid_t, None, None, Activation::None)?; // [o, (h w b)]
            let t = t.reshape(&[out * spatial, r])?;
            let down_t = gpu.upload(&transpose(&down, r, cin), &[cin, r], dtype)?; // [in, b]
            let base_rows = base.reshape(&[out * spatial, cin])?;
            matmul::linear(gpu, &t, &down_t, None, Some(&base_rows), Activation::None)?
        }
    };
    merged.reshape(base.shape())
}

/// The specification in f64: `base + scale · ΔW` in our layout, from the file's tensors.
pub fn reference_merged(
    lora: &Lora,
    layer: &LoraLayer,
    base: &[f32],
    scale: f32,
) -> Result<Vec<f64>> {
    let ws = &layer.weight_shape;
    let (out, cin) = (ws[0], ws[1]);
    let (kh, kw) = if ws.len() == 4 {
        (ws[2], ws[3])
    } else {
        (1, 1)
    };
    let r = layer.rank;
    let (up, _) = host(lora, &layer.up)?;
    let (down, dshape) = host(lora, &layer.down)?;
    let down_hw = dshape[2..].iter().product::<usize>();
    let mid = layer.mid.as_ref().map(|m| host(lora, m)).transpose()?;
    let mut result = vec![0.0f64; out * kh * kw * cin];
    for o in 0..out {
        for h in 0..kh {
            for w in 0..kw {
                for i in 0..cin {
                    let mut delta = 0.0f64;
                    for a in 0..r {
                        let u = up[o * r + a] as f64;
                        match &mid {
                            None => {
                                let d = if down_hw == 1 {
                                    down[a * cin + i]
                                } else {
                                    down[((a * cin + i) * kh + h) * kw + w]
                                };
                                delta += u * d as f64;
                            }
                            Some((m, _)) => {
                                for b in 0..r {
                                    let mv = m[((a * r + b) * kh + h) * kw + w] as f64;
                                    delta += u * mv * down[b * cin + i] as f64;
                                }
                            }
                        }
                    }
                    let at = ((o * kh + h) * kw + w) * cin + i;
                    result[at] = base[at] as f64 + scale as f64 * delta;
                }
            }
        }
    }
    Ok(result)
}

/// A LoRA to apply and its weights: A1111's one number for both models by default
/// ([`LoraSpec::new`]); a `<lora:name:te:unet>` tag may give the two their own.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub lora: Lora,
    pub text_encoder_weight: f32,
    pub unet_weight: f32,
}

impl LoraSpec {
    pub fn new(lora: Lora, weight: f32) -> Self {
        LoraSpec {
            lora,
            text_encoder_weight: weight,
            unet_weight: weight,
        }
    }

    fn weight(&self, target: LoraTarget) -> f32 {
        match target {
            LoraTarget::Unet => self.unet_weight,
            LoraTarget::TextEncoder | LoraTarget::TextEncoder2 => self.text_encoder_weight,
        }
    }
}

/// A1111's `Lora hashes` entries for the PNG's parameters (`name: short hash`): one per name
/// (`:` and `,` removed from it), the first one wins.
pub fn a1111_lora_hashes(specs: &[LoraSpec]) -> Vec<String> {
    let mut hashes: Vec<String> = Vec::new();
    for spec in specs {
        let name: String = spec
            .lora
            .name
            .chars()
            .filter(|c| !":,".contains(*c))
            .collect();
        if !hashes.iter().any(|h| h.starts_with(&format!("{name}: "))) {
            hashes.push(format!("{name}: {}", spec.lora.short_hash()));
        }
    }
    hashes
}

/// What one applied LoRA changed (for the CLI's report and the PNG's parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedLora {
    pub name: String,
    pub text_encoder_weight: f32,
    pub unet_weight: f32,
    /// Weights changed per model.
    pub modules: BTreeMap<LoraTarget, usize>,
}

/// One model's LoRA sites, as a LoRA sees them.
#[derive(Clone, Copy)]
pub struct ModelSites<'a> {
    pub target: LoraTarget,
    pub sites: &'a [WeightSite],
}

/// Text encoders are stored with or without transformers' `text_model.` prefix.
fn canonical(key: &str) -> &str {
    key.strip_prefix("text_model.").unwrap_or(key)
}

/// The weights of `models` a LoRA file may name, for [`crate::weights::lora::open_lora`].
pub fn lora_targets(models: &[ModelSites<'_>]) -> LoraTargets {
    models.iter().fold(LoraTargets::default(), |targets, m| {
        let shapes = m
            .sites
            .iter()
            .map(|s| (s.key.clone(), s.torch_shape.clone()))
            .collect();
        targets.with(m.target, shapes)
    })
}

/// One layer of one LoRA to merge into a site: (index into the specs, layer index, scale).
type Merge = (usize, usize, f32);

/// What to merge into each changed site: (model, site index) → its merges, in order.
type Plan = BTreeMap<(LoraTarget, usize), Vec<Merge>>;

/// Where the original values of LoRA'd weights are kept while a LoRA is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraBackup {
    /// In host memory: no GPU memory, a download per weight when applying, an upload per
    /// weight when changing or removing (A1111 keeps its backups on the CPU too).
    #[default]
    Host,
    /// On the GPU: one more copy of each changed weight in GPU memory, no transfers.
    Gpu,
}

/// A weight's values before any LoRA.
enum Original {
    Gpu(Tensor),
    Host(Vec<u8>),
}

impl Original {
    fn save(gpu: &Gpu, site: &WeightSite, backup: LoraBackup) -> Result<Self> {
        let t = read_site(gpu, site)?;
        Ok(match backup {
            LoraBackup::Gpu => Original::Gpu(t),
            LoraBackup::Host => Original::Host(gpu.download_bytes(&t)?),
        })
    }

    /// The values on the GPU, in our layout ([out, in] or [out, kh, kw, in]).
    fn tensor(&self, gpu: &Gpu, site: &WeightSite) -> Result<Tensor> {
        match self {
            Original::Gpu(t) => Ok(t.clone()),
            Original::Host(bytes) => {
                let t = gpu.empty(&site.our_shape(), site.tensor.dtype())?;
                gpu.write_bytes(&t, bytes)?;
                Ok(t)
            }
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Original::Gpu(t) => t.size_bytes(),
            Original::Host(b) => b.len() as u64,
        }
    }
}

/// The LoRAs applied to a model and the original values of the weights they changed.
#[derive(Default)]
pub struct LoraState {
    backup: LoraBackup,
    applied: Vec<AppliedLora>,
    /// (model, site index) → the site's values before any LoRA, while a LoRA changes it.
    originals: BTreeMap<(LoraTarget, usize), Original>,
}

impl LoraState {
    pub fn new(backup: LoraBackup) -> Self {
        LoraState {
            backup,
            ..Default::default()
        }
    }

    /// What is applied now.
    pub fn applied(&self) -> &[AppliedLora] {
        &self.applied
    }

    /// Bytes held (where [`LoraBackup`] says) to restore the original weights.
    pub fn saved_bytes(&self) -> u64 {
        self.originals.values().map(Original::bytes).sum()
    }

    pub fn backup(&self) -> LoraBackup {
        self.backup
    }

    /// Make `specs` the applied set (an empty one restores the base model): every site a spec
    /// changes gets `original + Σ scale·ΔW` (in the order given), every site changed before and
    /// not now gets its original values back. Everything is checked before any weight changes;
    /// an error while merging restores the base model.
    pub fn set(
        &mut self,
        gpu: &Gpu,
        models: &[ModelSites<'_>],
        specs: &[LoraSpec],
    ) -> Result<Vec<AppliedLora>> {
        let (plan, applied) = plan(models, specs)?;
        let sites = |target: LoraTarget| {
            models
                .iter()
                .find(|m| m.target == target)
                .map(|m| m.sites)
                .unwrap_or(&[])
        };
        let result = self.write(gpu, &plan, &sites, specs);
        if let Err(e) = result {
            self.write(gpu, &Plan::new(), &sites, &[])?;
            self.applied.clear();
            return Err(e);
        }
        gpu.flush()?;
        self.applied = applied.clone();
        Ok(applied)
    }

    /// Bring every site to `plan`'s state: merged from its original, or the original itself.
    fn write<'s>(
        &mut self,
        gpu: &Gpu,
        plan: &Plan,
        sites: &dyn Fn(LoraTarget) -> &'s [WeightSite],
        specs: &[LoraSpec],
    ) -> Result<()> {
        let restore: Vec<(LoraTarget, usize)> = self
            .originals
            .keys()
            .filter(|k| !plan.contains_key(k))
            .copied()
            .collect();
        for key in restore {
            let site = &sites(key.0)[key.1];
            if let Some(original) = self.originals.remove(&key) {
                write_site(gpu, site, &original.tensor(gpu, site)?)?;
            }
        }
        for (&(target, index), merges) in plan {
            let site = &sites(target)[index];
            let original = match self.originals.entry((target, index)) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(Original::save(gpu, site, self.backup)?)
                }
            };
            let mut weight = original.tensor(gpu, site)?;
            for &(spec, layer, scale) in merges {
                let lora = &specs[spec].lora;
                weight = merged_weight(gpu, lora, &lora.layers[layer], &weight, scale)?;
            }
            write_site(gpu, site, &weight)?;
        }
        Ok(())
    }
}

/// Match every layer of every spec to a site; the merges per site and the per-LoRA report.
fn plan(models: &[ModelSites<'_>], specs: &[LoraSpec]) -> Result<(Plan, Vec<AppliedLora>)> {
    let index: HashMap<(LoraTarget, &str), usize> = models
        .iter()
        .flat_map(|m| {
            m.sites
                .iter()
                .enumerate()
                .map(move |(i, s)| ((m.target, canonical(&s.key)), i))
        })
        .collect();
    let mut plan = Plan::new();
    let mut applied = Vec::new();
    for (si, spec) in specs.iter().enumerate() {
        let lora = &spec.lora;
        if lora.layers.is_empty() {
            return Err(Error::InvalidInput(format!(
                "LoRA `{}` changes no weight of this model",
                lora.name
            )));
        }
        let mut unmatched = Vec::new();
        let mut modules = BTreeMap::new();
        for (li, layer) in lora.layers.iter().enumerate() {
            let Some(&site) = index.get(&(layer.target, canonical(&layer.key))) else {
                unmatched.push(format!("{}:{}", layer.target.name(), layer.key));
                continue;
            };
            let shape = &models
                .iter()
                .find(|m| m.target == layer.target)
                .map_or(&[][..], |m| &m.sites[site].torch_shape[..]);
            if *shape != layer.weight_shape.as_slice() {
                return Err(Error::shape(
                    "lora",
                    format!(
                        "LoRA `{}`: `{}` is made for {} `{}` {:?}, which is {:?} in this model",
                        lora.name,
                        layer.down,
                        layer.target.name(),
                        layer.key,
                        layer.weight_shape,
                        shape
                    ),
                ));
            }
            *modules.entry(layer.target).or_insert(0) += 1;
            let scale = spec.weight(layer.target) * layer.alpha_scale();
            if scale != 0.0 {
                plan.entry((layer.target, site))
                    .or_default()
                    .push((si, li, scale));
            }
        }
        if !unmatched.is_empty() {
            let first: Vec<&str> = unmatched.iter().take(5).map(|s| s.as_str()).collect();
            return Err(Error::InvalidInput(format!(
                "LoRA `{}`: {} of its {} layers change weights this model does not have \
                 (first: {})",
                lora.name,
                unmatched.len(),
                lora.layers.len(),
                first.join(", ")
            )));
        }
        applied.push(AppliedLora {
            name: lora.name.clone(),
            text_encoder_weight: spec.text_encoder_weight,
            unet_weight: spec.unet_weight,
            modules,
        });
    }
    Ok((plan, applied))
}

/// The site's current values as a new tensor in our layout ([out, in] or [out, kh, kw, in]).
fn read_site(gpu: &Gpu, site: &WeightSite) -> Result<Tensor> {
    let dtype = site.tensor.dtype();
    let out = gpu.empty(&site.our_shape(), dtype)?;
    let bytes = out.size_bytes();
    let at = (site.offset * dtype.size()) as u64;
    gpu.copy_bytes(&site.tensor, at, &out, 0, bytes)?;
    Ok(out)
}

/// Overwrite the site's values in the layer's buffer (in place: the layer keeps its buffer).
fn write_site(gpu: &Gpu, site: &WeightSite, values: &Tensor) -> Result<()> {
    let dtype = site.tensor.dtype();
    if values.numel() != site.numel() || values.dtype() != dtype {
        return Err(Error::shape(
            "lora",
            format!(
                "{:?} written into `{}` {:?}",
                values, site.key, site.torch_shape
            ),
        ));
    }
    let at = (site.offset * dtype.size()) as u64;
    gpu.copy_bytes(values, 0, &site.tensor, at, values.size_bytes())
}

/// What a prompt's A1111 extra-network tags ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLoras {
    /// The prompt without its `<kind:…>` tags: what the text encoder reads.
    pub text: String,
    /// Each `<lora:NAME…>` / `<lyco:NAME…>` tag, in order, with its file.
    pub loras: Vec<(PathBuf, LoraTag)>,
    /// Other extra-network tags (`<hypernet:…>`): removed from the text, not applied.
    pub ignored: Vec<NetworkTag>,
}

/// Read `<lora:NAME:w>` tags out of `prompt` (A1111's `extra_networks.parse_prompt`): the tags
/// leave the text, and each LoRA is looked up as `dir/NAME.safetensors`. Errors: a malformed
/// tag, a LoRA not in `dir`.
pub fn prompt_loras(prompt: &str, dir: &Path) -> Result<PromptLoras> {
    let (text, tags) = extract_network_tags(prompt);
    let mut loras = Vec::new();
    let mut ignored = Vec::new();
    for tag in tags {
        match tag.as_lora().map_err(Error::InvalidInput)? {
            Some(lora) => loras.push((find_lora(dir, &lora.name)?, lora)),
            None => ignored.push(tag),
        }
    }
    Ok(PromptLoras {
        text,
        loras,
        ignored,
    })
}

/// Where `<lora:NAME:w>` tags look when no folder is given: `loras/` beside the model (inside a
/// diffusers folder, next to a single file) if it exists, else the current directory.
pub fn default_lora_dir(model: &Path) -> PathBuf {
    let beside = if model.is_dir() {
        model.join("loras")
    } else {
        model.parent().unwrap_or(Path::new(".")).join("loras")
    };
    if beside.is_dir() {
        beside
    } else {
        PathBuf::from(".")
    }
}

/// The prompt as a PNG records it, the A1111 way: as typed (its `<lora:…>` tags kept), with a
/// `<lora:name:w>` tag added for each LoRA given apart from the prompt (`files`: path, weight).
pub fn prompt_with_lora_tags(prompt: &str, files: &[(PathBuf, f32)]) -> String {
    let mut out = prompt.to_string();
    for (path, weight) in files {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        if !out.is_empty() {
            out.push(' ');
        }
        out += &lora_tag_text(&name, *weight, *weight);
    }
    out
}

/// The tag A1111 writes for a LoRA in a prompt: `<lora:name:w>`, or `<lora:name:te:unet>` when
/// the two weights differ.
pub fn lora_tag_text(name: &str, text_encoder_weight: f32, unet_weight: f32) -> String {
    if text_encoder_weight == unet_weight {
        format!("<lora:{name}:{text_encoder_weight}>")
    } else {
        format!("<lora:{name}:{text_encoder_weight}:{unet_weight}>")
    }
}
