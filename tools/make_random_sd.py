#!/usr/bin/env python3
"""Write a Stable Diffusion pipeline folder with RANDOM weights and the REAL architecture.

For benchmarking only: the images are noise, but every tensor has the shape, and every config the
values, of the published checkpoints, so the engine and diffusers do exactly the work they would do
on the real model. No hub access: each component is built with `from_config` from the configs
below, which copy the hub's config.json files:

  --arch sd15   runwayml/stable-diffusion-v1-5
                unet/config.json (860M: block_out_channels [320,640,1280,1280], attention_head_dim 8,
                cross_attention_dim 768, conv proj_in/out), vae/config.json (83.7M, f=8),
                text_encoder/config.json (openai/clip-vit-large-patch14 text tower: 12 layers,
                hidden 768, quick_gelu), scheduler/scheduler_config.json (PNDMScheduler,
                steps_offset 1, skip_prk_steps), tokenizer/ (pad "<|endoftext|>").
  --arch sd21   stabilityai/stable-diffusion-2-1 (768-v)
                unet/config.json (866M: use_linear_projection, attention_head_dim [5,10,20,20],
                cross_attention_dim 1024, upcast_attention, sample_size 96), vae/config.json
                (sample_size 768), text_encoder/config.json (OpenCLIP ViT-H text tower as
                diffusers keeps it: 23 layers, hidden 1024, gelu), scheduler/scheduler_config.json
                (DDIMScheduler, v_prediction), tokenizer/ (pad "!").
  --arch tiny   the sd15 layout shrunk (2 U-Net levels, 32/64 channels, 2-layer 32-wide text
                encoder, 4-level 16/32-channel VAE, 64 px): a CPU check of this script and of
                tools/bench_diffusers.py in seconds.
  --arch tiny21 the same with the sd21 switches (linear projection, per-block head dims, gelu,
                v_prediction DDIM, pad "!").

Weights are diffusers'/transformers' own initialisation (seeded; component k uses seed + k), which
keeps activations in a sane range through the whole network at fp16. The same --seed gives
byte-identical files with the same torch version. Files (diffusers layout, safetensors):

  model_index.json
  unet/config.json          unet/diffusion_pytorch_model.safetensors
  vae/config.json           vae/diffusion_pytorch_model.safetensors
  text_encoder/config.json  text_encoder/model.safetensors
  tokenizer/                vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
                            (copied from weights/tiny-shapes/tokenizer, the real CLIP BPE vocabulary)
  scheduler/scheduler_config.json
  random_sd.json            what was built: arch, dtype, seed, parameter counts, versions

    HF_HUB_OFFLINE=1 python tools/make_random_sd.py --arch sd15 --dtype fp16 --out /tmp/sd15

Needs torch, diffusers, transformers, safetensors. Runs in about a minute per full-size arch on a
16-core machine (initialisation of ~1.1-1.3 B parameters in f32 on the CPU, then the cast).
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TOKENIZER = os.path.join(HERE, "..", "weights", "tiny-shapes", "tokenizer")
TOKENIZER_FILES = ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]

# ---------------------------------------------------------------------------------------------
# Configs. Each dict is the hub's config.json for that component, less the `_diffusers_version` /
# `architectures` bookkeeping keys (the libraries write their own).

# runwayml/stable-diffusion-v1-5 unet/config.json
UNET_SD15 = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-2-1 unet/config.json
UNET_SD21 = dict(
    UNET_SD15,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
)

# runwayml/stable-diffusion-v1-5 vae/config.json (2-1's differs only in sample_size 768)
VAE_SD15 = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_SD21 = dict(VAE_SD15, sample_size=768)

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
TEXT_SD15 = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower; diffusers
# keeps 23 of its 24 layers, as SD 2.x conditions on the penultimate one)
TEXT_SD21 = dict(
    TEXT_SD15,
    hidden_act="gelu",
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    projection_dim=512,
)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SCHED_SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SCHED_SD21 = dict(SCHED_SD15, _class_name="DDIMScheduler", prediction_type="v_prediction")

# The CPU-check sizes: same block types and switches, tiny widths.
UNET_TINY = dict(
    UNET_SD15,
    block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=8,
)
UNET_TINY21 = dict(UNET_TINY, attention_head_dim=[4, 8], upcast_attention=True,
                   use_linear_projection=True)
VAE_TINY = dict(VAE_SD15, block_out_channels=[16, 32, 32, 32], norm_num_groups=8, sample_size=64)
TEXT_TINY = dict(TEXT_SD15, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=2, projection_dim=32)
TEXT_TINY21 = dict(TEXT_TINY, hidden_act="gelu")

ARCHS = {
    # name: (unet, vae, text encoder, scheduler, SD 2.x tokenizer padding)
    "sd15": (UNET_SD15, VAE_SD15, TEXT_SD15, SCHED_SD15, False),
    "sd21": (UNET_SD21, VAE_SD21, TEXT_SD21, SCHED_SD21, True),
    "tiny": (UNET_TINY, VAE_TINY, TEXT_TINY, SCHED_SD15, False),
    "tiny21": (UNET_TINY21, VAE_TINY, TEXT_TINY21, SCHED_SD21, True),
}

# ---------------------------------------------------------------------------------------------


def copy_tokenizer(src, dst, pad_bang):
    """The real CLIP BPE tokenizer files; SD 2.x repos pad with "!" (id 0) instead of EOS.

    As on the stabilityai/stable-diffusion-2-1 hub repo, only special_tokens_map.json says so;
    tokenizer_config.json keeps "<|endoftext|>" (transformers lets the map win)."""
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            sys.exit(f"error: tokenizer file {path} is missing\n"
                     f"hint: run tools/make_tokenizer.py, or pass --tokenizer DIR")
        shutil.copyfile(path, os.path.join(dst, name))
    if pad_bang:
        path = os.path.join(dst, "special_tokens_map.json")
        with open(path) as f:
            special = json.load(f)
        special["pad_token"] = "!"
        with open(path, "w") as f:
            json.dump(special, f, indent=2)
            f.write("\n")


def save_text_encoder(model, dst):
    """config.json + model.safetensors with the hub's key names.

    transformers 5 saves CLIPTextModel's tensors without the `text_model.` prefix that every
    published SD checkpoint has (and that transformers 4 wrote); both load, but the benchmark
    should read the files real users have, so the prefix is put back here."""
    from safetensors.torch import save_file
    os.makedirs(dst, exist_ok=True)
    model.config.save_pretrained(dst)
    tensors = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-device", default="cpu",
                    help="where the random initialisation runs (default cpu: reproducible files; "
                         "cuda: seconds instead of a minute on a GPU machine, other random values)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help="folder with the CLIP tokenizer files (default: weights/tiny-shapes/tokenizer)")
    args = ap.parse_args()

    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Quiet: the cast warning ("modules that should be kept in float32: []") and shard progress bars.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    unet_cfg, vae_cfg, text_cfg, sched_cfg, pad_bang = ARCHS[args.arch]
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    out = args.out
    if os.path.exists(out):
        if not os.path.isfile(os.path.join(out, "model_index.json")) and os.listdir(out):
            sys.exit(f"error: {out} exists and is not a pipeline folder; refusing to replace it")
        shutil.rmtree(out)
    os.makedirs(out)
    t0 = time.time()

    def built(name, model, seconds):
        print(f"  {name:<13} {n_params(model) / 1e6:8.2f} M params  {seconds:6.1f} s", flush=True)

    counts = {}
    # Initialisation happens in f32 on the CPU (the libraries' init routines are written for it,
    # and CPU random streams do not depend on the thread count); then one cast to --dtype.
    for k, (name, make) in enumerate([
        ("unet", lambda: UNet2DConditionModel.from_config(unet_cfg)),
        ("vae", lambda: AutoencoderKL.from_config(vae_cfg)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))),
    ]):
        t = time.time()
        torch.manual_seed(args.seed + k)
        with torch.no_grad(), torch.device(args.init_device):
            model = make().eval().to(dtype).cpu()
        counts[name] = n_params(model)
        if name == "text_encoder":
            save_text_encoder(model, os.path.join(out, name))
        else:
            model.save_pretrained(os.path.join(out, name), safe_serialization=True,
                                  max_shard_size="100GB")
        built(name, model, time.time() - t)
        del model

    copy_tokenizer(args.tokenizer, os.path.join(out, "tokenizer"), pad_bang)
    os.makedirs(os.path.join(out, "scheduler"))
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"),
               dict(sched_cfg, _diffusers_version=diffusers.__version__))
    write_json(os.path.join(out, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", sched_cfg["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    write_json(os.path.join(out, "random_sd.json"), {
        "what": "RANDOM weights with the real architecture; for benchmarks only (images are noise)",
        "arch": args.arch,
        "dtype": args.dtype,
        "seed": args.seed,
        "init_device": args.init_device,
        "params": counts,
        "image_size": unet_cfg["sample_size"] * 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "made_by": "tools/make_random_sd.py",
    })
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out}: {args.arch} {args.dtype}, {sum(counts.values()) / 1e6:.1f} M params, "
          f"{size / 2**20:.0f} MiB, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
