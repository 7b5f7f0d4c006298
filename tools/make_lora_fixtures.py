#!/usr/bin/env python3
"""Build the LoRA parity fixtures in tests/fixtures/lora_parity/.

Run:  HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_lora_fixtures.py

Two models, run by diffusers in f32 on the CPU with the prompt, negative prompt, size, seed and
guidance of the pipeline parity fixtures: the tiny random SD-1.x folder of those fixtures
(tests/fixtures/pipeline_parity/model, made by tools/make_pipeline_fixtures.py; not copied; PNDM),
and a tiny random SD-2.x one written here (sd2_model/: tools/make_random_sd.py --arch tiny21,
linear proj_in/proj_out, gelu text encoder, v-prediction DDIM). What this script writes, per
model (the SD 2.x files prefixed `sd2_`):

  kohya_style.safetensors   a kohya / A1111 LoRA (`lora_unet_…` / `lora_te_…`, `.alpha`): every
                            attention projection (q, k, v, out) of every transformer block,
                            ff.net.0.proj and ff.net.2, proj_in / proj_out (1×1 convs, SD 2.x
                            linears), a
                            LoCon 3×3 resnet conv1, a 1×1 conv_shortcut, a time_emb_proj, and
                            the text encoder's q/k/v/out projections and fc1/fc2; alphas that
                            differ from the rank, so a missing alpha/rank scale shows.
  peft_detail.safetensors   a diffusers / PEFT LoRA (`unet.<module>.lora_A.weight` /
                            `lora_B.weight`, `text_encoder.<module>…`) of another rank, on a
                            subset of layers only (attn1/attn2 q and v, the text encoder's q and
                            v), no alphas (scale = the weight).
  <case>.png                diffusers' image with the LoRAs of the case applied through
                            `pipe.load_lora_weights(file, adapter_name=…)` and
                            `pipe.set_adapters(names, adapter_weights=weights)` (unfused: the
                            LoRA runs as PEFT's extra low-rank branch; set_adapters gives the
                            weight to the U-Net and the text encoder alike, A1111's meaning).
  <case>.latents.f32        final latents NCHW [1, 4, 8, 8], before the VAE
  cases.json                the settings, and per model its folder, sampler and cases (each
                            with its LoRAs (file, weight) and files)

Cases: each LoRA alone (kohya at 0.8, PEFT at -0.7: a negative weight), and both together. The
script prints each image's PSNR against the image without LoRAs, against the case with the
text-encoder part left out, and (both together) against the first LoRA alone, i.e. how far past
the tests' 40 dB bound a LoRA ignored (or applied to the U-Net only) lands.

The LoRA factors are random normals scaled so each changes its weight by a set fraction of the
weight's own size (RELATIVE): far past the 40 dB bound in the image, not saturating it.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "tests", "fixtures", "pipeline_parity", "model")
TOKENIZER = os.path.join(ROOT, "weights", "tiny-shapes", "tokenizer")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora_parity")
SD2_MODEL = os.path.join(OUT, "sd2_model")

PROMPT = "a red circle"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 8
GUIDANCE = 7.5
SEED = 42

CASES = [
    ("kohya", [("kohya_style", 0.8)]),
    ("peft_negative", [("peft_detail", -0.7)]),
    ("kohya_and_peft", [("kohya_style", 0.8), ("peft_detail", 0.5)]),
]


def kohya_name(prefix, module):
    return f"{prefix}_{module.replace('.', '_')}"


# How much a LoRA changes each weight at scale 1, relative to the weight's norm: the tiny text
# encoder ends in a LayerNorm that hides small changes, so its LoRAs are louder.
RELATIVE = {"unet": 0.6, "text_encoder": 2.0}
# The PEFT LoRA changes fewer layers, each more.
PEFT_RELATIVE = {"unet": 1.5, "text_encoder": 3.0}
# One alpha for the whole file, as kohya writes it (network_alpha); the ranks differ per layer,
# so alpha / rank does too. (diffusers drops per-layer alphas of attention layers that differ
# from the file's most common one: its kohya conversion names their alpha keys wrongly.)
ALPHA = 2.0


def factors(gen, weight, rank, relative):
    """(down, up) for `weight` [out, in(, kh, kw)] whose product is about `relative` × the
    weight's norm at scale 1 (LoCon: down has the weight's kernel, up is 1×1)."""
    out, cin = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn((rank, cin) + kernel, generator=gen)
    up = torch.randn((out, rank) + tuple(1 for _ in kernel), generator=gen)
    delta = up.reshape(out, rank) @ down.reshape(rank, -1)
    s = (relative * weight.norm() / delta.norm()).sqrt()
    # Rounded through f16, as LoRAs trained in half precision are (stored as f32).
    return (down * s).half().float(), (up * s).half().float()


def lora_modules(unet, text_encoder):
    """The modules the kohya file changes: (model, dotted name, module)."""
    out = []
    for name, m in unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if ".transformer_blocks." in name and leaf in ("to_q", "to_k", "to_v", "0", "proj", "2"):
            if isinstance(m, torch.nn.Linear):
                out.append(("unet", name, m))
        elif leaf in ("proj_in", "proj_out"):
            out.append(("unet", name, m))
    for name in (
        "down_blocks.1.resnets.0.conv1",
        "up_blocks.0.resnets.0.conv_shortcut",
        "mid_block.resnets.0.time_emb_proj",
    ):
        out.append(("unet", name, unet.get_submodule(name)))
    for name, m in text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            out.append(("text_encoder", name, m))
    return out


def te_name(name):
    """The text encoder's module as LoRA files name it (with transformers' `text_model.`)."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def make_kohya(unet, text_encoder):
    gen = torch.Generator("cpu").manual_seed(1)
    tensors = {}
    for i, (model, name, m) in enumerate(lora_modules(unet, text_encoder)):
        rank = 4 if i % 2 == 0 else 3
        alpha = ALPHA
        down, up = factors(gen, m.weight.detach(), rank, RELATIVE[model])
        # Put alpha/rank back in: diffusers and A1111 scale by alpha / rank.
        down = down * (rank / alpha) ** 0.5
        up = up * (rank / alpha) ** 0.5
        key = kohya_name("lora_unet", name) if model == "unet" else kohya_name("lora_te", te_name(name))
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def make_peft(unet, text_encoder):
    gen = torch.Generator("cpu").manual_seed(2)
    tensors = {}
    for name, m in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")):
            down, up = factors(gen, m.weight.detach(), 2, PEFT_RELATIVE["unet"])
            tensors[f"unet.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = up.contiguous()
    for name, m in text_encoder.named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.v_proj")):
            down, up = factors(gen, m.weight.detach(), 2, PEFT_RELATIVE["text_encoder"])
            tensors[f"text_encoder.{te_name(name)}.lora_A.weight"] = down.contiguous()
            tensors[f"text_encoder.{te_name(name)}.lora_B.weight"] = up.contiguous()
    return tensors


def load_pipe(model):
    """The fixture folders have no model_index.json: the pipeline is assembled from its parts
    (as make_pipeline_fixtures.py does), each read in f32 from its f16 file, with the model's own
    scheduler class and config."""
    d = model["dir"]
    f32 = dict(torch_dtype=torch.float32)
    with open(os.path.join(d, "scheduler", "scheduler_config.json")) as f:
        scheduler_class = getattr(diffusers, json.load(f)["_class_name"])
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(d, "vae"), **f32).eval(),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"), **f32).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER, pad_token=model["pad"]),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), **f32).eval(),
        scheduler=scheduler_class.from_pretrained(os.path.join(d, "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, loras, text_encoder=True):
    """The image and final latents with `loras` [(file stem, weight)] applied."""
    pipe.unload_lora_weights()
    if loras:
        names = []
        for stem, _ in loras:
            state = load_safetensors(os.path.join(OUT, f"{stem}.safetensors"))
            if not text_encoder:
                state = {k: v for k, v in state.items() if not k.startswith(("lora_te", "text_encoder."))}
            pipe.load_lora_weights(state, adapter_name=stem)
            names.append(stem)
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    latents = []

    def on_step_end(p, i, t, kw):
        latents.append(kw["latents"].clone())
        return kw

    with torch.no_grad():
        image = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images[0]
    return image, latents[-1]


def load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def psnr(a, b):
    a = np.asarray(a).astype(np.float64)
    b = np.asarray(b).astype(np.float64)
    mse = ((a - b) ** 2).mean()
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def build_sd2_model(path):
    """The tiny SD 2.x-style folder of tools/make_random_sd.py (`--arch tiny21`: linear
    proj_in/proj_out, per-block head dims, gelu text encoder, v-prediction DDIM), without its
    tokenizer copy: the engine gives an SD 2.x folder without one the shipped CLIP tokenizer
    padding with "!", as diffusers is given here."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    script = os.path.join(ROOT, "tools", "make_random_sd.py")
    subprocess.run(
        [sys.executable, script, "--arch", "tiny21", "--dtype", "fp16", "--out", path],
        check=True,
    )
    shutil.rmtree(os.path.join(path, "tokenizer"))
    os.remove(os.path.join(path, "random_sd.json"))


def run_model(model, prefix):
    """Write `prefix`'s LoRA files and cases for one model; the cases.json entry."""
    pipe = load_pipe(model)
    for stem, make in (("kohya_style", make_kohya), ("peft_detail", make_peft)):
        save_file(make(pipe.unet, pipe.text_encoder), os.path.join(OUT, f"{prefix}{stem}.safetensors"))
    base, _ = render(pipe, [])
    entries = []
    first = {}
    for name, loras in CASES:
        name = prefix + name
        loras = [(prefix + stem, w) for stem, w in loras]
        image, latents = render(pipe, loras)
        if len(loras) > 1:
            # Against the first LoRA alone: what ignoring the others would give.
            alone = first[loras[0][0]]
            print(f"{name:20s} vs {loras[0][0]} alone {psnr(image, alone):5.1f} dB")
        elif loras:
            first[loras[0][0]] = image
        image.save(os.path.join(OUT, f"{name}.png"))
        arr = latents.detach().to(torch.float32).numpy().astype("<f4")
        arr.tofile(os.path.join(OUT, f"{name}.latents.f32"))
        unet_only, _ = render(pipe, loras, text_encoder=False)
        a = np.asarray(image).astype(np.float32)
        clipped = float(((a == 0) | (a == 255)).mean())
        print(
            f"{name:20s} vs no LoRA {psnr(image, base):5.1f} dB, "
            f"vs U-Net part only {psnr(image, unet_only):5.1f} dB; "
            f"mean {a.mean():5.1f} std {a.std():5.1f} clipped {100 * clipped:4.1f}%"
        )
        entries.append(
            dict(
                name=name,
                loras=[dict(file=f"{stem}.safetensors", weight=w) for stem, w in loras],
                image=f"{name}.png",
                latents=f"{name}.latents.f32",
                latents_shape=list(arr.shape),
            )
        )
    return dict(
        model=os.path.relpath(model["dir"], ROOT),
        sampler=model["sampler"],
        cases=entries,
    )


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith((".png", ".f32", ".json", ".safetensors")):
            os.remove(os.path.join(OUT, f))
    build_sd2_model(SD2_MODEL)
    models = [
        run_model(dict(dir=MODEL, sampler="pndm", pad="<|endoftext|>"), ""),
        run_model(dict(dir=SD2_MODEL, sampler="ddim", pad="!"), "sd2_"),
    ]
    settings = dict(
        generator="diffusers load_lora_weights + set_adapters (torch CPU generator, float32, CPU)",
        tokenizer="weights/tiny-shapes/tokenizer",
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=SEED,
        models=models,
    )
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(settings, f, indent=1)


if __name__ == "__main__":
    main()
