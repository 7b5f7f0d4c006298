#!/usr/bin/env python3
"""SDXL textual-inversion fixtures in tests/fixtures/sdxl/embeddings/ (on the tiny SDXL model).

Run (after make_sdxl_fixtures.py):
    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_sdxl_embedding_fixtures.py

SDXL embeddings (the A1111 / civitai format) hold one set of vectors per text encoder:
`clip_l` [n, 768] for text_encoder (CLIP ViT-L) and `clip_g` [n, 1280] for text_encoder_2
(OpenCLIP bigG); here [n, 16] and [n, 32], the tiny model's widths. diffusers loads them with
`load_textual_inversion` twice (its documented SDXL recipe):
    pipe.load_textual_inversion(state["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
Written:
  lib/xlstyle.safetensors   two vectors per encoder
  lib/xldot.safetensors     one vector per encoder
  lib/l_only.safetensors    clip_l only (must be skipped with SDXL: nothing for text_encoder_2)
  ti_euler.png / .latents.f32   StableDiffusionXLPipeline (f32, CPU), the fixture's euler_neg
                            settings with prompt "a red circle in the style of xlstyle" and
                            negative prompt "xldot"; cases.json has them.
The vectors are random with the spread of each encoder's own token table. The added ids are past
the vocabulary (49408, ...), so text_encoder_2's legacy pooling (argmax of the ids, eos_token_id 2)
pools at the embedding's position, as transformers does: the test must reproduce that too.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_sdxl_fixtures as fx  # noqa: E402

from diffusers import StableDiffusionXLPipeline  # noqa: E402

OUT = os.path.join(fx.OUT, "embeddings")
MODEL = os.path.join(fx.OUT, "model")
PROMPT = "a red circle in the style of xlstyle"
NEGATIVE = "xldot"


def vectors(gen, encoder, n):
    table = encoder.get_input_embeddings().weight.detach()
    return (torch.randn(n, table.shape[1], generator=gen) * table.std() + table.mean()).float().contiguous()


def main():
    os.makedirs(os.path.join(OUT, "lib"), exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(21)
    files = {}
    for name, n in (("xlstyle", 2), ("xldot", 1)):
        files[name] = {"clip_l": vectors(gen, pipe.text_encoder, n),
                       "clip_g": vectors(gen, pipe.text_encoder_2, n)}
        save_file(files[name], os.path.join(OUT, "lib", f"{name}.safetensors"))
    save_file({"clip_l": vectors(gen, pipe.text_encoder, 1)}, os.path.join(OUT, "lib", "l_only.safetensors"))

    case = dict(name="ti_euler", sampler="euler", prompt=PROMPT, negative_prompt=NEGATIVE)
    plain, _ = fx.render(pipe, fx.SCHEDULER_CONFIG, case)
    for name, state in files.items():
        pipe.load_textual_inversion(state["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    print("ids:", pipe.tokenizer(pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)).input_ids)
    image, latents = fx.render(pipe, fx.SCHEDULER_CONFIG, case)
    image.save(os.path.join(OUT, "ti_euler.png"))
    arr = latents.detach().float().numpy().astype("<f4")
    arr.tofile(os.path.join(OUT, "ti_euler.latents.f32"))
    print(f"ti_euler: {fx.psnr_images(image, plain):.1f} dB vs the same prompts without embeddings")
    case.update(image="embeddings/ti_euler.png", latents="embeddings/ti_euler.latents.f32",
                latents_shape=list(arr.shape))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(cases=[case]), f, indent=2)


if __name__ == "__main__":
    main()
