#!/usr/bin/env python3
"""SDXL LoRA parity fixtures in tests/fixtures/sdxl/lora/ (on the tiny SDXL model).

Run (after make_sdxl_fixtures.py):
    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_sdxl_lora_fixtures.py

One random LoRA (as tools/make_lora_fixtures.py makes SD 1.x/2.x ones: factors scaled so each
changes its weight by a set fraction of the weight's size, rounded through f16) on every linear of
every transformer block, proj_in/proj_out, a LoCon 3x3 resnet conv1, a 1x1 conv_shortcut, a
time_emb_proj, the upsampler conv that follows an attention level (LDM slot 2), and every linear of
both text encoders' layers, written in two spellings:

  peft.safetensors        diffusers / PEFT names (`unet.…lora_A.weight`, `text_encoder.…`,
                          `text_encoder_2.…`), rank 4, no alphas (scale = the weight), as
                          `StableDiffusionXLPipeline.save_lora_weights` writes them
  kohya_sgm.safetensors   kohya's SDXL names: `lora_unet_<SGM module>` (`input_blocks_4_1_…`,
                          `middle_block_1_…`, `output_blocks_…`), `lora_te1_text_model_…`,
                          `lora_te2_text_model_…`, `lora_down`/`lora_up`/`alpha`; the same
                          products, with ranks 4 and 3 alternating and alpha 2 (the factors
                          rescaled by sqrt(rank / alpha) each, so alpha / rank restores them)

Reference: diffusers' `load_lora_weights(peft file)` + `set_adapters([...], [w])` on the folder's
StableDiffusionXLPipeline (f32, CPU), case euler_neg's settings; cases.json lists each case. The
script prints each image against the image without the LoRA, and against the LoRA without its
text_encoder_2 part (what a LoRA applied to only two of the three models would give), and tries
diffusers on the kohya file too (its kohya SDXL conversion assumes SDXL base's block layout).
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_sdxl_fixtures as fx  # noqa: E402
from make_sdxl_single_file import unet_name  # noqa: E402

from diffusers import StableDiffusionXLPipeline  # noqa: E402

OUT = os.path.join(fx.OUT, "lora")
MODEL = os.path.join(fx.OUT, "model")
RELATIVE = {"unet": 0.6, "text_encoder": 2.0, "text_encoder_2": 2.0}
ALPHA = 2.0
WEIGHT = 0.8


def factors(gen, weight, rank, relative):
    out, cin = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn((rank, cin) + kernel, generator=gen)
    up = torch.randn((out, rank) + tuple(1 for _ in kernel), generator=gen)
    delta = up.reshape(out, rank) @ down.reshape(rank, -1)
    s = (relative * weight.norm() / delta.norm()).sqrt()
    return (down * s).half().float(), (up * s).half().float()


def modules(pipe):
    out = []
    for name, m in pipe.unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if ".transformer_blocks." in name and isinstance(m, torch.nn.Linear):
            out.append(("unet", name, m))
        elif leaf in ("proj_in", "proj_out"):
            out.append(("unet", name, m))
    for name in ("down_blocks.1.resnets.0.conv1", "up_blocks.0.resnets.0.conv_shortcut",
                 "mid_block.resnets.0.time_emb_proj", "up_blocks.0.upsamplers.0.conv"):
        out.append(("unet", name, pipe.unet.get_submodule(name)))
    for model in ("text_encoder", "text_encoder_2"):
        for name, m in getattr(pipe, model).named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                out.append((model, name if name.startswith("text_model.") else f"text_model.{name}", m))
    return out


def make_files(pipe):
    gen = torch.Generator("cpu").manual_seed(5)
    unet_keys = list(pipe.unet.state_dict().keys())
    lpb = len({k.split(".")[3] for k in unet_keys if k.startswith("down_blocks.0.resnets.")})
    attn_levels = {int(k.split(".")[1]) for k in unet_keys if k.startswith("up_blocks.") and ".attentions." in k}
    peft, kohya = {}, {}
    for i, (model, name, m) in enumerate(modules(pipe)):
        down, up = factors(gen, m.weight.detach(), 4, RELATIVE[model])
        peft[f"{model}.{name}.lora_A.weight"] = down.contiguous()
        peft[f"{model}.{name}.lora_B.weight"] = up.contiguous()
        # kohya: another rank on every other layer (zero-padded factors give the same product)
        rank = 4 if i % 2 == 0 else 3
        if rank == 3:
            # a rank-3 product: drop the last component from the PEFT one too
            down, up = down[:3].clone(), up[:, :3].clone()
            peft[f"{model}.{name}.lora_A.weight"] = torch.cat([down, torch.zeros_like(down[:1])]).contiguous()
            peft[f"{model}.{name}.lora_B.weight"] = torch.cat([up, torch.zeros_like(up[:, :1])], 1).contiguous()
        s = (rank / ALPHA) ** 0.5
        if model == "unet":
            key = "lora_unet_" + unet_name(f"{name}.weight", lpb, attn_levels).removesuffix(".weight").replace(".", "_")
        else:
            key = ("lora_te1_" if model == "text_encoder" else "lora_te2_") + name.replace(".", "_")
        kohya[f"{key}.lora_down.weight"] = (down * s).contiguous()
        kohya[f"{key}.lora_up.weight"] = (up * s).contiguous()
        kohya[f"{key}.alpha"] = torch.tensor(ALPHA)
    return peft, kohya


def render(pipe, state, weight, case):
    pipe.unload_lora_weights()
    if state is not None:
        pipe.load_lora_weights(state, adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[weight])
    return fx.render(pipe, fx.SCHEDULER_CONFIG, case)


def main():
    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    peft, kohya = make_files(pipe)
    save_file(peft, os.path.join(OUT, "peft.safetensors"))
    save_file(kohya, os.path.join(OUT, "kohya_sgm.safetensors"))
    print(f"{len(peft) // 2} layers; peft {len(peft)} tensors, kohya {len(kohya)} tensors")

    base = dict(name="euler_neg", sampler="euler", negative_prompt=fx.NEGATIVE)
    plain, _ = render(pipe, None, 0, base)
    cases = []
    for name, file, weight in (("lora_peft", "peft", WEIGHT), ("lora_peft_negative", "peft", -0.6)):
        image, latents = render(pipe, load_file(os.path.join(OUT, f"{file}.safetensors")), weight, base)
        image.save(os.path.join(OUT, f"{name}.png"))
        arr = latents.detach().float().numpy().astype("<f4")
        arr.tofile(os.path.join(OUT, f"{name}.latents.f32"))
        cases.append(dict(base, name=name, lora=f"{file}.safetensors", weight=weight,
                          image=f"lora/{name}.png", latents=f"lora/{name}.latents.f32",
                          latents_shape=list(arr.shape)))
        no_te2 = {k: v for k, v in peft.items() if not k.startswith("text_encoder_2.")}
        partial, _ = render(pipe, no_te2, weight, base)
        print(f"{name}: {fx.psnr_images(image, plain):.1f} dB vs no LoRA, "
              f"{fx.psnr_images(image, partial):.1f} dB vs the LoRA without text_encoder_2")
    try:
        image, _ = render(pipe, load_file(os.path.join(OUT, "kohya_sgm.safetensors")), WEIGHT, base)
        ref = fx.Image.open(os.path.join(OUT, "lora_peft.png"))
        print(f"diffusers with kohya_sgm: {fx.psnr_images(image, ref):.1f} dB vs peft")
    except Exception as e:  # noqa: BLE001
        print(f"diffusers cannot load kohya_sgm.safetensors here: {type(e).__name__}: {str(e)[:300]}")
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(weight_note="set_adapters weight (U-Net and both text encoders)", cases=cases), f, indent=2)


if __name__ == "__main__":
    main()
