#!/usr/bin/env python3
"""A1111 prompt emphasis with SDXL: reference in tests/fixtures/sdxl/emphasis/.

Run (after make_sdxl_fixtures.py):
    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_sdxl_emphasis_fixtures.py

The A1111 web UI is not available offline, so, as tools/make_emphasis_fixtures.py does for SD 1.x,
this is our own Python written from A1111's source semantics, here those of its SDXL conditioning:
sgm's GeneralConditioner runs each embedder, and A1111 wraps each one
(`FrozenCLIPEmbedderForSDXLWithCustomWords` for CLIP-L, `FrozenOpenCLIPEmbedder2WithCustomWords`
for OpenCLIP bigG) in `FrozenCLIPEmbedderWithCustomWordsBase`, so per embedder:
  1. the prompt is parsed and each piece tokenized on its own (make_emphasis_fixtures.py's
     `parse` / `chunks_of`: one 77-token chunk here); OpenCLIP's wrapper pads with id 0 after the
     first EOS (`id_pad = 0`, as diffusers' tokenizer_2 pads with "!");
  2. the embedder's output, the penultimate hidden state without the final layer norm, is weighted
     row by row and rescaled to its mean before weighting ("Original" emphasis, in float64);
  3. the two outputs are concatenated on channels; the pooled output (OpenCLIP's) is the
     unweighted one (`z.pooled` is taken before the emphasis).
The embeddings go to diffusers' StableDiffusionXLPipeline as prompt_embeds / pooled_prompt_embeds
(and the negative ones), with the fixture's euler_neg settings: emphasis.png, .latents.f32 and
cases.json (the prompts, and per encoder the ids and weights).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_sdxl_fixtures as fx  # noqa: E402
from make_emphasis_fixtures import chunks_of, emphasize  # noqa: E402

from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: E402

OUT = os.path.join(fx.OUT, "emphasis")
MODEL = os.path.join(fx.OUT, "model")
PROMPT = "a (red:1.4) circle, [[blurry]] (green square:0.7)"
NEGATIVE = "(blurry:1.3), dark"


def encode(pipe, text):
    """A1111's SDXL conditioning of `text`: context [1, 77, C1 + C2], pooled [1, P]; and the
    (ids, weights) each encoder saw."""
    outs, seen, pooled = [], [], None
    for tokenizer, encoder, pad in ((pipe.tokenizer, pipe.text_encoder, None),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, 0)):
        chunks = chunks_of(tokenizer, text)
        assert len(chunks) == 1, text
        ids, weights = chunks[0]
        if pad is not None:
            first_eos = ids.index(tokenizer.eos_token_id)
            ids = ids[: first_eos + 1] + [pad] * (len(ids) - first_eos - 1)
        with torch.no_grad():
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[-2]
        w = torch.tensor([weights], dtype=torch.float64)
        outs.append(emphasize(z.double(), w).float())
        if pad is not None:
            pooled = out.text_embeds
        seen.append(dict(ids=ids, weights=weights))
    return torch.cat(outs, -1), pooled, seen


def main():
    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(fx.SCHEDULER_CONFIG)
    ctx, pooled, seen = encode(pipe, PROMPT)
    nctx, npooled, nseen = encode(pipe, NEGATIVE)
    final = []

    def on_step_end(p, i, t, kw):
        final[:] = [kw["latents"].clone()]
        return kw

    with torch.no_grad():
        image = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=nctx,
                     negative_pooled_prompt_embeds=npooled, num_inference_steps=fx.STEPS,
                     guidance_scale=fx.GUIDANCE, height=fx.SIZE, width=fx.SIZE,
                     generator=torch.Generator("cpu").manual_seed(fx.SEED),
                     callback_on_step_end=on_step_end,
                     callback_on_step_end_tensor_inputs=["latents"]).images[0]
        plain = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=fx.STEPS,
                     guidance_scale=fx.GUIDANCE, height=fx.SIZE, width=fx.SIZE,
                     generator=torch.Generator("cpu").manual_seed(fx.SEED)).images[0]
    image.save(os.path.join(OUT, "emphasis.png"))
    arr = final[0].float().numpy().astype("<f4")
    arr.tofile(os.path.join(OUT, "emphasis.latents.f32"))
    print(f"emphasis: {fx.psnr_images(image, plain):.1f} dB vs the brackets read as text (diffusers)")
    case = dict(name="emphasis", sampler="euler", prompt=PROMPT, negative_prompt=NEGATIVE,
                image="emphasis/emphasis.png", latents="emphasis/emphasis.latents.f32",
                latents_shape=list(arr.shape), prompt_tokens=seen, negative_tokens=nseen)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(cases=[case]), f)


if __name__ == "__main__":
    main()
