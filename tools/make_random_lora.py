#!/usr/bin/env python3
"""Write a kohya / A1111 LoRA with RANDOM factors for a diffusers model folder, shaped like the
LoRAs people download: for benchmarking how long applying and removing one takes
(`cargo run --release --example lora_cost`), not for images.

    HF_HUB_OFFLINE=1 venv/bin/python tools/make_random_lora.py MODEL_DIR OUT.safetensors \
        [--rank 32] [--alpha 16] [--dtype fp16]

It reads only the safetensors headers of MODEL_DIR/unet and MODEL_DIR/text_encoder and writes a
`lora_unet_…` layer for every linear of every transformer block (attn1/attn2 q, k, v, out;
ff.net.0.proj, ff.net.2) and every proj_in / proj_out, and a `lora_te_…` layer for every
self-attention and MLP linear of the text encoder — kohya's default "LoRA" network (no LoCon
convs) — with one alpha for the file. SD 1.5 at rank 32: 192 U-Net + 72 text-encoder layers,
36 MiB in fp16, the size of a typical downloaded LoRA.
"""

import argparse
import json
import os
import struct

import torch
from safetensors.torch import save_file

UNET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v["shape"] for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    args = p.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    gen = torch.Generator("cpu").manual_seed(0)
    unet = header(os.path.join(args.model, "unet", "diffusion_pytorch_model.safetensors"))
    te = header(os.path.join(args.model, "text_encoder", "model.safetensors"))
    layers = []
    for key, shape in unet.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and (
            (".transformer_blocks." in key and module.endswith(UNET_LEAVES))
            or module.endswith(("proj_in", "proj_out"))
        ):
            layers.append(("lora_unet_" + module.replace(".", "_"), shape))
    for key, shape in te.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and ".layers." in key and module.endswith(TE_LEAVES):
            name = module if module.startswith("text_model.") else "text_model." + module
            layers.append(("lora_te_" + name.replace(".", "_"), shape))
    tensors = {}
    r = args.rank
    for name, shape in layers:
        out, cin = shape[0], shape[1]
        kernel = [1] * (len(shape) - 2)
        tensors[f"{name}.lora_down.weight"] = (torch.randn([r, cin] + kernel, generator=gen) * 0.01).to(dtype)
        tensors[f"{name}.lora_up.weight"] = (torch.randn([out, r] + kernel, generator=gen) * 0.01).to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(args.alpha, dtype=dtype)
    save_file(tensors, args.out)
    n_unet = sum(1 for n, _ in layers if n.startswith("lora_unet_"))
    size = os.path.getsize(args.out) / 2**20
    print(f"{args.out}: {n_unet} U-Net + {len(layers) - n_unet} text-encoder layers, rank {r}, {size:.1f} MiB")


if __name__ == "__main__":
    main()
