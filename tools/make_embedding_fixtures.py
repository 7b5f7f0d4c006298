#!/usr/bin/env python3
"""Textual-inversion fixtures for tests/embeddings.rs, from diffusers' `load_textual_inversion`.

Writes into tests/fixtures/embeddings/ (model: the shipped weights/tiny-shapes, CLIP width 128):
  lib/shapestyle.safetensors   A1111 format: {"emb_params": [2, 128]} (two vectors)
  lib/dotted.safetensors       diffusers format: {"<dotted>": [128]} (one vector, own key)
  lib/xl_style.safetensors     SDXL format: {"clip_l": [1, 768], "clip_g": [1, 1280]}
                               (no vectors of width 128: must be reported, not used, here)
  lib/pickled.pt               a torch pickle (must be refused without being unpickled)
  cases.json                   prompts, diffusers' token ids (after maybe_convert_prompt) and
  embeds.safetensors           case_NN: diffusers' prompt_embeds [1, 77, 128] (float32)
  pipeline.json/.png/.safetensors  a whole StableDiffusionPipeline run using both embeddings
                               (one in the prompt, one in the negative prompt): Euler, 8 steps,
                               CFG 7.5, seed 3, 64x64; `latents` are the final latents.
The vectors are random with the spread of the model's own token table (a trained embedding's
vectors look like tokens, not like noise of another scale).

    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_embedding_fixtures.py weights/tiny-shapes tests/fixtures/embeddings
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

model, out = sys.argv[1], sys.argv[2]
lib = os.path.join(out, "lib")
os.makedirs(lib, exist_ok=True)

pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
table = pipe.text_encoder.get_input_embeddings().weight.detach()
width = table.shape[1]
g = torch.Generator().manual_seed(11)
std, mean = table.std().item(), table.mean().item()
style = (torch.randn(2, width, generator=g) * std + mean).float()
dotted = (torch.randn(width, generator=g) * std + mean).float()
save_file({"emb_params": style.contiguous()}, os.path.join(lib, "shapestyle.safetensors"))
save_file({"<dotted>": dotted.contiguous()}, os.path.join(lib, "dotted.safetensors"))
save_file({"clip_l": torch.randn(1, 768, generator=g), "clip_g": torch.randn(1, 1280, generator=g)},
          os.path.join(lib, "xl_style.safetensors"))
torch.save({"string_to_param": {"*": torch.zeros(1, width)}, "name": "pickled"},
           os.path.join(lib, "pickled.pt"))

pipe.load_textual_inversion(os.path.join(lib, "shapestyle.safetensors"), token="shapestyle")
pipe.load_textual_inversion(os.path.join(lib, "dotted.safetensors"), token="dotted")

prompts = [
    "a red square in the style of shapestyle",
    "dotted",
    "shapestyle, a blue circle, dotted background, shapestyle",
    "no embedding here at all",
]
cases, tensors = [], {}
for i, prompt in enumerate(prompts):
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    tensors[f"case_{i:02}"] = embeds.float().contiguous()
    cases.append({"prompt": prompt, "converted": converted, "ids": ids})
save_file(tensors, os.path.join(out, "embeds.safetensors"))
with open(os.path.join(out, "cases.json"), "w") as f:
    json.dump({"model_vocab": int(table.shape[0]), "cases": cases}, f, indent=1)

meta = {"prompt": "a red square in the style of shapestyle", "negative_prompt": "dotted",
        "steps": 8, "guidance_scale": 7.5, "seed": 3, "width": 64, "height": 64,
        "sampler": "euler"}
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
result = pipe(meta["prompt"], negative_prompt=meta["negative_prompt"], num_inference_steps=meta["steps"],
              guidance_scale=meta["guidance_scale"], width=64, height=64,
              generator=torch.Generator("cpu").manual_seed(meta["seed"]), output_type="latent")
latents = result.images
with torch.no_grad():
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
image = pipe.image_processor.postprocess(image, output_type="pil")[0]
image.save(os.path.join(out, "pipeline.png"))
save_file({"latents": latents.float().contiguous()}, os.path.join(out, "pipeline.safetensors"))
with open(os.path.join(out, "pipeline.json"), "w") as f:
    json.dump(meta, f, indent=1)
print("wrote", out)
