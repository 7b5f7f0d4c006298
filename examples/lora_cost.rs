//! What applying and removing a LoRA costs on a loaded model: the time of `set_loras` (first
//! apply, which also copies the originals aside; a weight change, merged again from the
//! originals; `clear_loras`) and the GPU memory kept for the originals, and a check that removal
//! gives back the base weights bit for bit.
//!
//! `cargo run --release --example lora_cost -- MODEL_DIR LORA.safetensors [f16|f32] [host|gpu]`
//! (a full-size model and a download-sized LoRA with random weights: tools/make_random_sd.py and
//! tools/make_random_lora.py).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use ldm_wgpu::lora::{LoraBackup, LoraSpec};
use ldm_wgpu::pipeline::{ModelOptions, StableDiffusion};
use ldm_wgpu::{Gpu, GpuOptions};

/// Every LoRA-able weight buffer, as bytes, by buffer.
fn weights(sd: &StableDiffusion) -> ldm_wgpu::Result<BTreeMap<u64, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let text_encoder = sd.text_encoder.iter().flat_map(|te| &te.lora_sites);
    for s in sd.unet.lora_sites.iter().chain(text_encoder) {
        if let std::collections::btree_map::Entry::Vacant(e) = out.entry(s.tensor.buffer_id()) {
            e.insert(sd.gpu.download_bytes(&s.tensor)?);
        }
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(lora)) = (args.next(), args.next()) else {
        return Err("usage: lora_cost MODEL_DIR LORA.safetensors [f16|f32] [host|gpu]".into());
    };
    let dtype = args.next().map(|d| d.parse()).transpose()?;
    let lora_backup = match args.next().as_deref() {
        None | Some("host") => LoraBackup::Host,
        Some("gpu") => LoraBackup::Gpu,
        Some(other) => return Err(format!("`{other}`: host or gpu").into()),
    };
    let gpu = Gpu::new(&GpuOptions::from_env()?)?;
    println!("adapter: {}", gpu.adapter);
    let opts = ModelOptions {
        dtype,
        lora_backup,
        ..Default::default()
    };
    let sd = StableDiffusion::load(gpu, &PathBuf::from(model), &opts)?;
    let lora = sd.open_lora(&PathBuf::from(&lora))?;
    let base = weights(&sd)?;
    let timed = |what: &str, f: &dyn Fn() -> ldm_wgpu::Result<()>| -> ldm_wgpu::Result<()> {
        let start = Instant::now();
        f()?;
        sd.gpu.wait()?;
        println!(
            "{what:<28} {:8.1} ms   originals kept: {:7.1} MiB",
            start.elapsed().as_secs_f64() * 1e3,
            sd.lora_saved_bytes() as f64 / 1048576.0
        );
        Ok(())
    };
    println!(
        "{} weights, originals in {lora_backup:?} memory, LoRA `{}`: {} layers",
        sd.dtype.name(),
        lora.name,
        lora.layers.len()
    );
    let spec = |w| [LoraSpec::new(lora.clone(), w)];
    timed("apply (weight 1)", &|| sd.set_loras(&spec(1.0)).map(|_| ()))?;
    timed("change weight to 0.5", &|| {
        sd.set_loras(&spec(0.5)).map(|_| ())
    })?;
    timed("remove", &|| sd.clear_loras())?;
    let restored = weights(&sd)? == base;
    println!("base weights restored bit for bit: {restored}");
    if !restored {
        return Err("removal did not restore the base weights".into());
    }
    Ok(())
}
