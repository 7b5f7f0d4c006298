#!/usr/bin/env python3
"""Reference prompt embeddings with AUTOMATIC1111's prompt emphasis, for tests/emphasis.rs.

Our own Python, written from A1111's documented behaviour (the docstring of
`modules/prompt_parser.py::parse_prompt_attention`, `modules/sd_hijack_clip.py::tokenize_line`
and the "Original" emphasis of `modules/sd_emphasis.py`), run on the shipped model's text
encoder with transformers in float32 on CPU:

  1. parse: `(a)` x1.1, `[a]` /1.1, `(a:w)` xw, nesting multiplies, unbalanced brackets close at
     the end, `\\(` etc. literal, `BREAK` splits; runs of equal weight merge;
  2. tokenize each piece on its own (no BOS/EOS), fill chunks of 75 tokens; a BREAK starts a
     new chunk; when a chunk is full and a comma was within the last 20 tokens, the tokens after
     the comma move to the next chunk; each chunk becomes BOS + 75 (padded with EOS) + EOS, weight
     1 for BOS, EOS and padding;
  3. encode each chunk (last hidden state), multiply row i by its weight, then scale the chunk so
     its mean equals the mean before weighting (computed in float64 from the float32 encoder
     output: see the comment in main). cases.json also gives each chunk's `scale_condition`, the
     condition number of that scale factor (see main).

Writes tests/fixtures/emphasis/cases.json (prompts, ids and weights per chunk) and
tests/fixtures/emphasis/embeddings.safetensors (case_NN: [chunks, 77, C] float32), and a whole
pipeline: diffusers' StableDiffusionPipeline given the reference embeddings of a weighted prompt as
`prompt_embeds` (negative: the empty prompt), Euler, 10 steps, CFG 7.5, seed 42, 64x64 ->
pipeline.png and pipeline.safetensors (`latents`, the final latents) in the same folder.

    HF_HUB_OFFLINE=1 python tools/make_emphasis_fixtures.py weights/tiny-shapes tests/fixtures/emphasis
"""
import json
import os
import re
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text):
    res, round_open, square_open = [], [], []

    def multiply(start, m):
        for p in range(start, len(res)):
            res[p][1] *= m

    for m in ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(BREAK.split(tok)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for p in round_open:
        multiply(p, 1.1)
    for p in square_open:
        multiply(p, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def chunks_of(tokenizer, text, chunk_length=75, backtrack=20):
    parsed = parse(text)
    comma = tokenizer.get_vocab()[",</w>"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out, ids, weights = [], [], []
    last_comma = -1

    def close():
        nonlocal ids, weights, last_comma
        pad = chunk_length - len(ids)
        out.append(([bos] + ids + [eos] * pad + [eos], [1.0] + weights + [1.0] * pad + [1.0]))
        ids, weights, last_comma = [], [], -1

    for piece, w in parsed:
        if piece == "BREAK" and w == -1:
            close()
            continue
        for tok in tokenizer(piece, add_special_tokens=False)["input_ids"]:
            if tok == comma:
                last_comma = len(ids)
            elif len(ids) == chunk_length and last_comma != -1 and len(ids) - last_comma <= backtrack:
                moved_ids, moved_w = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close()
                ids, weights = moved_ids, moved_w
            if len(ids) == chunk_length:
                close()
            ids.append(tok)
            weights.append(w)
    if ids or not out:
        close()
    return out


def emphasize(z, weights):
    original_mean = z.mean()
    z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
    return z * (original_mean / z.mean())


PROMPTS = [
    "a blue circle on a yellow background",
    "a (red:1.5) circle on a [blue] background",
    "((masterpiece)), a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "\\(literal\\) (nested (deep:1.2) text:0.8) (unbalanced",
    "a cat BREAK a (dog:-0.5) BREAK",
    # 90+ tokens with commas: the second chunk starts after the last comma within 20 tokens.
    ", ".join(f"(item {i}:1.{i % 10})" if i % 3 == 0 else f"word{i} thing" for i in range(40)),
]


def main():
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"), torch_dtype=torch.float32)
    encoder.eval()
    cases, tensors = [], {}
    with torch.no_grad():
        for n, prompt in enumerate(PROMPTS):
            chunks = chunks_of(tokenizer, prompt)
            zs, conditions = [], []
            for ids, weights in chunks:
                z = encoder(torch.tensor([ids])).last_hidden_state  # [1, 77, C]
                # The relative condition number of the mean-restoring factor mean(z) / mean(w z):
                # each mean is a sum of nearly cancelling terms, so an f32 engine gets the factor
                # right only to about eps_f32 times this (the test allows for that in the factor
                # alone; the weighting itself is compared tightly).
                zd = z.double()
                wz = zd * torch.tensor(weights, dtype=torch.float64)[None, :, None]
                conditions.append(float(zd.abs().mean() / zd.mean().abs() + wz.abs().mean() / wz.mean().abs()))
                # The emphasis itself in float64: the chunk mean of a LayerNorm output is a sum of
                # nearly cancelling terms (about 2.5e-4 against values of 0.6 for this model), so
                # float32 torch gives answers that differ by 1e-4 with the memory layout alone.
                # The exact value is the reference; our kernel's own f32 error is what the test sees.
                w = torch.tensor([weights], dtype=torch.float64)
                zs.append(emphasize(z.double(), w).float()[0])
            tensors[f"case_{n:02}"] = torch.stack(zs).contiguous()
            cases.append(
                {
                    "prompt": prompt,
                    "pieces": parse(prompt),
                    "ids": [c[0] for c in chunks],
                    "weights": [c[1] for c in chunks],
                    "scale_condition": conditions,
                }
            )
    save_file(tensors, os.path.join(out_dir, "embeddings.safetensors"))
    pipeline_fixture(model_dir, out_dir, tokenizer, encoder)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump({"model": model_dir, "cases": cases}, f, indent=1)
    print(f"{len(cases)} cases -> {out_dir}")


PIPELINE_PROMPT = "a (blue:1.4) circle on a [[yellow]] background"


def pipeline_fixture(model_dir, out_dir, tokenizer, encoder):
    import numpy as np
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        (ids, weights), = chunks_of(tokenizer, PIPELINE_PROMPT)
        z = encoder(torch.tensor([ids])).last_hidden_state
        w = torch.tensor([weights], dtype=torch.float64)
        cond = emphasize(z.double(), w).float()
        (neg_ids, _), = chunks_of(tokenizer, "")
        uncond = encoder(torch.tensor([neg_ids])).last_hidden_state
    gen = torch.Generator("cpu").manual_seed(42)
    final = {}

    def on_step(pipe_, i, t, kw):
        final["latents"] = kw["latents"].detach().clone()
        return kw

    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=10, guidance_scale=7.5,
               width=64, height=64, generator=gen, output_type="np", callback_on_step_end=on_step,
               callback_on_step_end_tensor_inputs=["latents"])
    pipe.numpy_to_pil(out.images)[0].save(os.path.join(out_dir, "pipeline.png"))
    save_file({"latents": final["latents"].float().contiguous()}, os.path.join(out_dir, "pipeline.safetensors"))
    with open(os.path.join(out_dir, "pipeline.json"), "w") as f:
        json.dump({"prompt": PIPELINE_PROMPT, "negative_prompt": "", "sampler": "euler", "steps": 10,
                   "guidance_scale": 7.5, "seed": 42, "width": 64, "height": 64}, f, indent=1)


if __name__ == "__main__":
    main()
