#!/usr/bin/env python3
"""Why tiny-shapes does not follow position phrases: two measurements (issue #20).

  leak   How much of a shape's position the noisiest *training* sample still carries. With
         SD's betas alphas_cumprod[999] = 0.0047, so x_999 = 0.068 x0 + 0.998 eps. For two
         latents differing only in the shape's position, an ideal (matched-filter) observer
         tells them apart with d' = sqrt(a / (1 - a)) * ||x0_A - x0_B|| and pairwise accuracy
         Phi(d' / 2). Needs the latent cache train_tiny.py writes (--latents).
  x0     How much the model's prediction of the image at the first sampling steps moves when
         only the position phrase changes, against a change of colour: ||x0(left) - x0(right)||
         etc. for "a large red square {position} on a white background", at t = 999, 900, 700,
         400, one seed. The data's own left/right difference (mean latents) is printed beside it.
         Also the text encoder's relative L2 distance between the prompts' hidden states.

    HF_HUB_OFFLINE=1 venv/bin/python tools/position_probe.py leak --latents /tmp/run/latents.pt
    HF_HUB_OFFLINE=1 venv/bin/python tools/position_probe.py x0 -m weights/tiny-shapes
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import COLOUR_NAMES, POSITION_NAMES, POSITIONS, SHAPES, SIZE_NAMES  # noqa: E402

PHRASES = [POSITIONS[p][1] for p in POSITION_NAMES]


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def cmd_leak(a):
    c = torch.load(a.latents)
    m = c["mean"] * a.scaling
    at = c["attrs"].numpy()  # shape, colour, background, size, position
    from diffusers import DDPMScheduler

    # SD's betas, as training without --zero-snr uses them
    acp = float(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000).alphas_cumprod[999])
    snr = acp / (1 - acp)
    for size, name in enumerate(SIZE_NAMES):
        ds = []
        for i in np.where(at[:, 3] == size)[0][:400]:
            same = (at[:, :4] == at[i, :4]).all(axis=1) & (at[:, 4] != at[i, 4])
            for k in np.where(same)[0][:3]:
                ds.append(float((m[i] - m[k]).norm()) * math.sqrt(snr))
        d = float(np.median(ds))
        print("%s shapes: %d pairs differing only in position, median d' %.2f at t = 999: "
              "pairwise accuracy %.0f%%" % (name, len(ds), d, 100 * phi(d / 2)))


def cmd_x0(a):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    m = a.model
    tok = CLIPTokenizer.from_pretrained(m + "/tokenizer")
    te = CLIPTextModel.from_pretrained(m + "/text_encoder").float().eval()
    unet = UNet2DConditionModel.from_pretrained(m + "/unet").float().eval()
    sch = DDIMScheduler.from_pretrained(m + "/scheduler")
    acp, v_pred = sch.alphas_cumprod, sch.config.prediction_type == "v_prediction"

    def embed(p):
        ids = tok(p, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return te(ids)[0]

    prompts = ["a large red square %s on a white background" % p for p in PHRASES]
    with torch.no_grad():
        embs = [embed(p) for p in prompts]
        blue = embed("a large blue square on the left on a white background")
        rel = lambda u, v: float((u - v).norm() / u.norm())
        print("text encoder, relative L2 from 'on the left': %s | red -> blue %.3f"
              % ("  ".join("%s %.3f" % (p.split()[-1], rel(embs[0], e)) for p, e in zip(PHRASES[1:], embs[1:])),
                 rel(embs[0], blue)))
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(a.seed))
        for t in (999, 900, 700, 400):
            al = acp[t]

            def x0(e):
                o = unet(x, t, e).sample
                return al.sqrt() * x - (1 - al).sqrt() * o if v_pred else (x - (1 - al).sqrt() * o) / al.sqrt().clamp(min=1e-4)

            xs = [x0(e) for e in embs]
            d = lambda u, v: float((u - v).norm())
            print("t %3d: ||x0(left) - x0(right)|| %.2f  (left - top) %.2f  (left - center) %.2f  | red -> blue %.2f"
                  % (t, d(xs[0], xs[1]), d(xs[0], xs[2]), d(xs[0], xs[4]), d(xs[0], x0(blue))))
    if a.latents:
        c = torch.load(a.latents)
        lat, at = c["mean"] * a.scaling, c["attrs"].numpy()
        want = (SHAPES.index("square"), COLOUR_NAMES.index("red"), COLOUR_NAMES.index("white"), SIZE_NAMES.index("large"))
        sel = lambda pos: lat[(at[:, :4] == np.array(want)).all(axis=1) & (at[:, 4] == POSITION_NAMES.index(pos))].mean(0)
        print("data: ||mean x0(left) - mean x0(right)|| for large red squares on white: %.2f"
              % float((sel("left") - sel("right")).norm()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    l = sub.add_parser("leak")
    l.add_argument("--latents", required=True)
    l.add_argument("--scaling", type=float, default=0.4242936)
    x = sub.add_parser("x0")
    x.add_argument("-m", "--model", default="weights/tiny-shapes")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--latents", default=None, help="also print the data's own left/right difference")
    x.add_argument("--scaling", type=float, default=0.4242936)
    a = p.parse_args()
    torch.set_num_threads(1)
    {"leak": cmd_leak, "x0": cmd_x0}[a.cmd](a)


if __name__ == "__main__":
    main()
