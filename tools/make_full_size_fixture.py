#!/usr/bin/env python3
"""Reference outputs of the FULL-SIZE SD 1.5 / SD 2.1 models for tests/full_size.rs.

Given a pipeline folder written by tools/make_random_sd.py (random weights, the real configs:
the 860M-parameter U-Net, the 83.7M VAE, the 123M/340M text encoder), this runs each component
through diffusers / transformers on the CPU in float32 on fixed inputs, at a reduced resolution
(32×32 latents, 256×256 pixels) so that the engine on lavapipe can follow in minutes:

  text encoder  CLIPTokenizer(DIR/tokenizer) on [NEGATIVE, PROMPT] (padding="max_length",
                truncation, 77 tokens), as StableDiffusionPipeline.encode_prompt batches them for
                classifier-free guidance; output last_hidden_state [2, 77, C]
  U-Net         latents [2, 4, 32, 32] ~ N(0, 1) (seeded), timestep TIMESTEP, conditioned on the
                text encoder's output above ([uncond; cond]); output [2, 4, 32, 32]
  VAE decoder   latents [1, 4, 32, 32] = N(0, 1) / scaling_factor (what the pipeline hands
                vae.decode); output [1, 3, 256, 256]

The fp16 weights are read into float32 modules, so the reference is exact arithmetic on the very
values the engine loads. Files written to --out (replaced if present; generated on demand, never
committed: ~3 MB):

  io.safetensors  input_ids, text_hidden, unet_sample, unet_timestep, unet_out, vae_latents,
                  vae_out (float32; images and latents NCHW as torch has them)
  meta.json       prompt, negative prompt, arch, the model folder's random_sd.json (the test
                  checks it still matches the folder), library versions, seconds per component

    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_random_sd.py --arch sd15 --dtype fp16 \\
        --out /tmp/ldm-full-size/sd15
    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_full_size_fixture.py --arch sd15 \\
        --model /tmp/ldm-full-size/sd15 --out /tmp/ldm-full-size/sd15-fixture

(the same with sd21; /tmp/ldm-full-size is the default of LDM_FULL_SIZE_DIR in the test). Takes
about a minute per arch on 2 CPU cores, most of it loading; needs ~6 GB of RAM (the U-Net in f32).
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = ""
TIMESTEP = 801
LATENT = 32  # latent side: 256×256 pixels
SEED = 1234


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sd15", "sd21"], required=True)
    ap.add_argument("--model", required=True, help="pipeline folder from tools/make_random_sd.py")
    ap.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    args = ap.parse_args()

    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    info_path = os.path.join(args.model, "random_sd.json")
    if not os.path.isfile(info_path):
        sys.exit(f"error: {info_path} is missing\n"
                 f"hint: make the folder with tools/make_random_sd.py --arch {args.arch} --dtype fp16 "
                 f"--out {args.model}")
    with open(info_path) as f:
        random_sd = json.load(f)
    if random_sd.get("arch") != args.arch:
        sys.exit(f"error: {args.model} holds arch {random_sd.get('arch')!r}, not {args.arch!r}")

    if os.path.exists(args.out):
        if not os.path.isfile(os.path.join(args.out, "meta.json")) and os.listdir(args.out):
            sys.exit(f"error: {args.out} exists and is not a fixture folder; refusing to replace it")
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    seconds = {}
    io = {}
    g = torch.Generator().manual_seed(SEED)

    with torch.no_grad():
        t = time.time()
        tok = CLIPTokenizer.from_pretrained(os.path.join(args.model, "tokenizer"))
        ids = tok([NEGATIVE, PROMPT], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids  # [2, 77]
        te = CLIPTextModel.from_pretrained(os.path.join(args.model, "text_encoder"),
                                           torch_dtype=torch.float32).eval()
        hidden = te(ids)[0]  # [2, 77, C] last_hidden_state, as encode_prompt takes it
        del te
        io["input_ids"] = ids.float()
        io["text_hidden"] = hidden
        seconds["text_encoder"] = round(time.time() - t, 1)
        print(f"text encoder: {tuple(hidden.shape)} std {hidden.std():.4f}  {seconds['text_encoder']} s",
              flush=True)

        t = time.time()
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet"),
                                                    torch_dtype=torch.float32).eval()
        sample = torch.randn((2, 4, LATENT, LATENT), generator=g)  # [2, 4, 32, 32]
        timestep = torch.tensor([float(TIMESTEP)])
        out = unet(sample, TIMESTEP, encoder_hidden_states=hidden).sample  # [2, 4, 32, 32]
        del unet
        io["unet_sample"] = sample
        io["unet_timestep"] = timestep
        io["unet_out"] = out
        seconds["unet"] = round(time.time() - t, 1)
        print(f"unet: {tuple(out.shape)} std {out.std():.4f}  {seconds['unet']} s", flush=True)

        t = time.time()
        vae = AutoencoderKL.from_pretrained(os.path.join(args.model, "vae"),
                                            torch_dtype=torch.float32).eval()
        z = torch.randn((1, 4, LATENT, LATENT), generator=g) / vae.config.scaling_factor
        image = vae.decode(z).sample  # [1, 3, 256, 256]
        del vae
        io["vae_latents"] = z
        io["vae_out"] = image
        seconds["vae_decode"] = round(time.time() - t, 1)
        print(f"vae decode: {tuple(image.shape)} std {image.std():.4f}  {seconds['vae_decode']} s",
              flush=True)

    save_file({k: v.detach().float().contiguous() for k, v in io.items()},
              os.path.join(args.out, "io.safetensors"))
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump({
            "arch": args.arch,
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "timestep": TIMESTEP,
            "seed": SEED,
            "model": os.path.abspath(args.model),
            "random_sd": random_sd,
            "seconds": seconds,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "made_by": "tools/make_full_size_fixture.py",
        }, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
