//! Dispatches per guided U-Net step on SD 1.5's architecture (issue 21, item 4).
//!
//! Every dispatch is a pass over memory and, in wgpu, a barrier; the review
//! (reviews/kernels-h200-2026-12.md §1) counted ~460 per guided SD 1.5 step. This test builds a
//! U-Net with SD 1.5's exact block structure (4 levels, 2 resnets per down level, 3 per up level,
//! transformers at the first three levels and in the mid block, 1 transformer layer each) but
//! tiny widths, loads it on the real engine and records one batch-2 call on a dry-run twin
//! ([`Gpu::dry_run`]): the same kernel choices, nothing executed, so the count is exact and the
//! test takes seconds on lavapipe. The count depends on the kernel policy (split K and other
//! tile choices add reduce dispatches on tensor cores), so the bound holds for the adapter the
//! tests run on; the number is printed (run with --nocapture).
//!
//! What one guided step records in the pipeline's loop: the `unet_input` dispatch, the U-Net
//! call counted here, and the `sampler_step` dispatch (the time embedding row is a copy).

mod common;

use std::path::PathBuf;

use common::*;
use ldm_wgpu::models::unet::{UNet2DConditionModel, UNetConfig};
use ldm_wgpu::weights::{SafetensorsFile, WeightStore};
use ldm_wgpu::{DType, Gpu};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use std::sync::Arc;

/// Dispatches of one guided step outside the U-Net: `unet_input` and `sampler_step`.
const STEP_EXTRA: u64 = 2;

/// The bound on one guided step's dispatches (U-Net call + [`STEP_EXTRA`]). Lowered as fusions
/// land; the baseline before issue 21 item 4 was 458 (lavapipe, f16), 398 after the hoisted
/// projections and conv1's time-embedding epilogue, 337 with every U-Net GroupNorm before a conv
/// applied in that conv's loads (one statistics dispatch instead of two passes: -61), 289 with
/// every transformer LayerNorm applied in the next projection's loads, its statistics computed
/// by the matmul's own workgroups (no dispatch at all: -48), 273 with each transformer's last
/// ff_out and proj_out folded into one projection (-16), 259 with every resnet's 1×1
/// conv_shortcut run as more K of its conv2 (-14), 237 with norm2's statistics left by conv1's
/// workgroups as per-tile pieces and merged by conv2's (no statistics dispatch: -22), 210 with
/// every other GroupNorm that reads a single tensor (norm1 after conv_in, a resnet, a
/// transformer or a downsampler; the transformers' norms; conv_norm_out) merged from its
/// producer's pieces across block boundaries (-27), 198 with the 12 up-block norm1 over
/// [h ; skip] merged from both parts' producers (h's and the skip's; -12: no GroupNorm
/// statistics dispatch is left in the U-Net).
const MAX_GUIDED_STEP_DISPATCHES: u64 = 198;

/// SD 1.5's U-Net config (runwayml/stable-diffusion-v1-5 unet/config.json) with widths cut to
/// [32, 64, 128, 128], 8 groups and a 32-wide context.
fn config() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [32, 64, 128, 128],
        "center_input_sample": false,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"]
    })
}

/// diffusers' key names and shapes for that config.
fn unet_keys() -> Vec<(String, Vec<usize>)> {
    let ch = [32usize, 64, 128, 128];
    let attn = [true, true, true, false];
    let (temb, ctx) = (4 * ch[0], 32usize);
    let mut keys: Vec<(String, Vec<usize>)> = Vec::new();
    let lin = |keys: &mut Vec<_>, p: &str, o: usize, i: usize, bias: bool| {
        keys.push((format!("{p}.weight"), vec![o, i]));
        if bias {
            keys.push((format!("{p}.bias"), vec![o]));
        }
    };
    let norm = |keys: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize| {
        keys.push((format!("{p}.weight"), vec![c]));
        keys.push((format!("{p}.bias"), vec![c]));
    };
    let conv = |keys: &mut Vec<(String, Vec<usize>)>, p: &str, o: usize, i: usize, k: usize| {
        keys.push((format!("{p}.weight"), vec![o, i, k, k]));
        keys.push((format!("{p}.bias"), vec![o]));
    };
    let resnet = |keys: &mut Vec<(String, Vec<usize>)>, p: &str, i: usize, o: usize| {
        norm(keys, &format!("{p}.norm1"), i);
        conv(keys, &format!("{p}.conv1"), o, i, 3);
        keys.push((format!("{p}.time_emb_proj.weight"), vec![o, temb]));
        keys.push((format!("{p}.time_emb_proj.bias"), vec![o]));
        norm(keys, &format!("{p}.norm2"), o);
        conv(keys, &format!("{p}.conv2"), o, o, 3);
        if i != o {
            conv(keys, &format!("{p}.conv_shortcut"), o, i, 1);
        }
    };
    let transformer = |keys: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize| {
        norm(keys, &format!("{p}.norm"), c);
        conv(keys, &format!("{p}.proj_in"), c, c, 1);
        conv(keys, &format!("{p}.proj_out"), c, c, 1);
        let b = format!("{p}.transformer_blocks.0");
        for n in ["norm1", "norm2", "norm3"] {
            norm(keys, &format!("{b}.{n}"), c);
        }
        for (a, kv_in) in [("attn1", c), ("attn2", ctx)] {
            keys.push((format!("{b}.{a}.to_q.weight"), vec![c, c]));
            keys.push((format!("{b}.{a}.to_k.weight"), vec![c, kv_in]));
            keys.push((format!("{b}.{a}.to_v.weight"), vec![c, kv_in]));
            keys.push((format!("{b}.{a}.to_out.0.weight"), vec![c, c]));
            keys.push((format!("{b}.{a}.to_out.0.bias"), vec![c]));
        }
        keys.push((format!("{b}.ff.net.0.proj.weight"), vec![8 * c, c]));
        keys.push((format!("{b}.ff.net.0.proj.bias"), vec![8 * c]));
        keys.push((format!("{b}.ff.net.2.weight"), vec![c, 4 * c]));
        keys.push((format!("{b}.ff.net.2.bias"), vec![c]));
    };
    lin(&mut keys, "time_embedding.linear_1", temb, ch[0], true);
    lin(&mut keys, "time_embedding.linear_2", temb, temb, true);
    conv(&mut keys, "conv_in", ch[0], 4, 3);
    let mut prev = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..2 {
            let p = format!("down_blocks.{i}");
            resnet(
                &mut keys,
                &format!("{p}.resnets.{j}"),
                if j == 0 { prev } else { c },
                c,
            );
            if attn[i] {
                transformer(&mut keys, &format!("{p}.attentions.{j}"), c);
            }
        }
        if i + 1 < ch.len() {
            conv(
                &mut keys,
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
        prev = c;
    }
    resnet(&mut keys, "mid_block.resnets.0", ch[3], ch[3]);
    transformer(&mut keys, "mid_block.attentions.0", ch[3]);
    resnet(&mut keys, "mid_block.resnets.1", ch[3], ch[3]);
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut prev = rev[0];
    for (i, &c) in rev.iter().enumerate() {
        let skip_in = rev[(i + 1).min(3)];
        for j in 0..3 {
            let res_skip = if j == 2 { skip_in } else { c };
            let c_in = if j == 0 { prev } else { c };
            let p = format!("up_blocks.{i}");
            resnet(&mut keys, &format!("{p}.resnets.{j}"), c_in + res_skip, c);
            if attn[3 - i] {
                transformer(&mut keys, &format!("{p}.attentions.{j}"), c);
            }
        }
        if i + 1 < rev.len() {
            conv(
                &mut keys,
                &format!("up_blocks.{i}.upsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
        prev = c;
    }
    norm(&mut keys, "conv_norm_out", ch[0]);
    conv(&mut keys, "conv_out", 4, ch[0], 3);
    keys
}

/// The tiny SD 1.5-shaped U-Net on `gpu` (small random weights).
fn load_unet(gpu: &Gpu, dtype: DType) -> (UNet2DConditionModel, WeightStore) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dispatch_count");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("unet.safetensors");
    let mut rng = Rng::new(21);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = unet_keys()
        .into_iter()
        .map(|(k, s)| {
            let n = s.iter().product();
            let bytes = rng
                .normals(n, 0.05)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (k, s, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
    let file = Arc::new(SafetensorsFile::open(&path).unwrap());
    let store = WeightStore::from_files("unet", vec![file]).unwrap();
    let config = UNetConfig::from_json(&config()).unwrap();
    let unet = UNet2DConditionModel::load(gpu, &store.root(), config, dtype).unwrap();
    store.check_all_used().unwrap();
    (unet, store)
}

#[test]
fn guided_sd15_step_dispatch_count() {
    let gpu = gpu();
    let dtype = *dtypes().last().unwrap(); // f16 where offered, as the pipeline runs
    let (unet, _store) = load_unet(gpu, dtype);
    let dry = gpu.dry_run().unwrap();
    let sample = dry.empty(&[2, 8, 8, 4], dtype).unwrap(); // [2, 8, 8, 4]
    let context = dry.empty(&[2, 77, 32], dtype).unwrap(); // [2, 77, 32]
    let timesteps: Vec<f64> = vec![999.0, 500.0, 1.0];

    let before = dry.stats().dispatches;
    let table = unet.schedule_time_embeddings(&dry, &timesteps, 2).unwrap();
    let prepared = unet.prepare_image(&dry, table, &context).unwrap();
    let per_image = dry.stats().dispatches - before;

    let before = dry.stats().dispatches;
    let labels_before = dry.dry_run_dispatches_by_label();
    let _out = unet.forward_prepared(&dry, &sample, &prepared, 1).unwrap(); // [2, 8, 8, 4]
    let unet_call = dry.stats().dispatches - before;
    // Which kernels the U-Net call dispatches, most frequent first: where the next fusion pays.
    let mut by_label: Vec<(String, u64)> = dry
        .dry_run_dispatches_by_label()
        .into_iter()
        .map(|(label, n)| {
            let earlier = labels_before
                .iter()
                .find(|(l, _)| *l == label)
                .map_or(0, |(_, m)| *m);
            (label, n - earlier)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    by_label.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    assert_eq!(by_label.iter().map(|(_, n)| n).sum::<u64>(), unet_call);
    for (label, n) in &by_label {
        eprintln!("{n:5}  {label}");
    }
    // Every GroupNorm takes its statistics from its input's producers.
    let stats: Vec<_> = by_label
        .iter()
        .filter(|(label, _)| label.starts_with("group_norm"))
        .collect();
    assert!(stats.is_empty(), "GroupNorm passes in the U-Net: {stats:?}");
    let step = unet_call + STEP_EXTRA;
    eprintln!(
        "SD 1.5 architecture, {}, {}: {per_image} dispatches per image (time embeddings and their \
         projections, the context's K/V), \
         {unet_call} per guided U-Net call, {step} per guided step",
        gpu.adapter,
        dtype.name()
    );
    assert!(
        step <= MAX_GUIDED_STEP_DISPATCHES,
        "{step} dispatches per guided step > {MAX_GUIDED_STEP_DISPATCHES}"
    );
}
