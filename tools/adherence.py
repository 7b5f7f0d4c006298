#!/usr/bin/env python3
"""Prompt adherence of the shipped `tiny-shapes` model, measured from the pixels (issue #20).

A detector reads one 64x64 image of the training grammar (one flat shape on a plain background)
and returns the five attributes the captions talk about:

* background colour: the median of the 2-pixel border, snapped to the nearest of the 8 palette
  colours (Euclidean RGB);
* shape pixels: a soft coverage alpha, the projection of each pixel onto the line from the
  background colour to the shape colour (0 = background, 1 = shape); the shape is the largest
  connected component of alpha > 0.5 (fewer than MIN_AREA pixels: "no shape", which counts as a
  miss for shape, colour, size and position);
* shape colour: the median of the pixels with alpha > 0.5, snapped to the palette; it is first
  estimated from the pixels far (> FAR) from the background colour, then alpha is computed;
* shape class: from the component's geometry: the apex up (the top third of the box much
  narrower than the bottom third) makes a triangle; otherwise the fill ratio = sum(alpha) /
  bounding-box area (square 1.0, circle pi/4 = 0.785; after the VAE's round trip squares keep
  >= 0.85) tells a square from a circle;
* size: the bounding box's larger side (small = 16 px, large = 32 px, each +-10%): < 24 is small;
* position: the bounding box's centre (for every shape of the generator it is the shape's
  nominal centre, unlike the area centroid of a triangle), the nearest of the 5 centres.

Sub-commands:

  validate  run the detector on the training generator's own images (make_dataset with another
            seed) and print its accuracy per attribute: the test that it can be trusted.
  prompts   write the fixed evaluation prompt set (JSON) to stdout.
  eval      generate one image per prompt at `ldm generate`'s defaults (25 steps, guidance 7.5,
            the model's scheduler: DDIM for tiny-shapes, 64x64, seed = the prompt's seed) and
            score the attributes each prompt states. --backend ldm runs the CLI (what users get,
            ~45 s an image on lavapipe here); --backend diffusers runs diffusers'
            StableDiffusionPipeline on the same folder with the same seeds and settings (the
            pipeline-parity tests hold ldm to it; on the 24 README-grid images: pixels within 3/255,
            identical detections),
            ~2 s an image on one CPU thread. Prints a markdown row and writes JSON.

    HF_HUB_OFFLINE=1 venv/bin/python tools/adherence.py validate --n 500
    HF_HUB_OFFLINE=1 venv/bin/python tools/adherence.py eval -m weights/tiny-shapes --json /tmp/adh.json
    XDG_RUNTIME_DIR=... venv/bin/python tools/adherence.py eval --backend ldm --ldm target/release/ldm --limit 12
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import (COLOUR_NAMES, COLOURS, POSITION_NAMES, POSITIONS, SHAPES,  # noqa: E402
                        SIZE_NAMES, make_dataset)

PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)
CENTRES = np.array([POSITIONS[p][0] for p in POSITION_NAMES], np.float32)
ATTRS = ["background", "colour", "shape", "size", "position"]
MIN_AREA = 20  # pixels; a small shape covers ~200
FAR = 60.0  # RGB distance from the background that surely belongs to the shape


def nearest_colour(rgb):
    return int(np.argmin(((PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(1)))


def _largest_component(mask):
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return mask & False
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def detect(img):
    """img: uint8 [64,64,3]. Returns a dict of attribute indices (None where nothing was found)
    and the measurements behind them."""
    x = img.astype(np.float32)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3),
                             x[2:-2, :2].reshape(-1, 3), x[2:-2, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    out = {"background": nearest_colour(bg_rgb), "colour": None, "shape": None, "size": None,
           "position": None, "bg_rgb": bg_rgb.round(1).tolist()}
    dist = np.sqrt(((x - bg_rgb) ** 2).sum(-1))
    far = _largest_component(dist > FAR)
    if far.sum() < MIN_AREA:
        out["area"] = int(far.sum())
        return out
    fg_rgb = np.median(x[far], axis=0)
    d = fg_rgb - bg_rgb
    alpha = np.clip(((x - bg_rgb) @ d) / float(d @ d), 0.0, 1.0)
    # the component of alpha > 0.5 that holds the far pixels; soft coverage inside a 1-px dilation
    core = _largest_component(alpha > 0.5)
    if core.sum() < MIN_AREA:
        out["area"] = int(core.sum())
        return out
    from scipy import ndimage

    region = ndimage.binary_dilation(core, iterations=1)
    a = np.where(region, alpha, 0.0)
    ys, xs = np.nonzero(core)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # sub-pixel extents: the largest coverage in each column (row), summed
    w = float(a.max(0).sum())
    h = float(a.max(1).sum())
    area = float(a.sum())
    fill = area / max(w * h, 1.0)
    cx = (x0 + x1) / 2.0
    cy = (y0 + y1) / 2.0
    # apex: the mean soft width of the top third of the box over that of the bottom third
    # (triangle <= 0.31 as drawn, <= 0.58 after the VAE's round trip; circle, square >= 0.63)
    rows = a.sum(1)
    q = max(1, (y1 - y0) // 3)
    taper = rows[y0:y0 + q].mean() / max(rows[y1 - q:y1].mean(), 1e-6)
    if taper < 0.6:
        shape = 2  # triangle
    elif fill > 0.855:
        shape = 1  # square (0.95-0.99 as drawn, >= 0.85 after the VAE; circle <= 0.85)
    else:
        shape = 0  # circle
    out.update({
        "colour": nearest_colour(np.median(x[core], axis=0)),
        "shape": shape,
        "size": 0 if max(w, h) < 24.0 else 1,
        "position": int(np.argmin(((CENTRES - np.array([cx, cy], np.float32)) ** 2).sum(1))),
        "fg_rgb": fg_rgb.round(1).tolist(), "area": round(area, 1), "fill": round(fill, 3),
        "taper": round(float(taper), 3), "w": round(w, 1), "h": round(h, 1), "cx": cx, "cy": cy,
    })
    return out


# ------------------------------------------------------------------------------ prompt set


def prompt_text(t):
    """t: dict with 'shape' and optional 'size', 'colour', 'position', 'background' (names).
    The training template, in its order, with "a" always."""
    words = ["a"]
    if t.get("size"):
        words.append(t["size"])
    if t.get("colour"):
        words.append(t["colour"])
    words.append(t["shape"])
    if t.get("position"):
        words.append(POSITIONS[t["position"]][1])
    if t.get("background"):
        words.append("on a %s background" % t["background"])
    return " ".join(words)


def prompt_set(n_full=100, n_partial=100, seed=2020):
    """The fixed evaluation set: n_full prompts stating all five attributes (distinct
    combinations), then n_partial prompts stating the shape and each other attribute with
    probability 1/2 (at least one). Each has its own seed (seed*1000 + index)."""
    rng = np.random.RandomState(seed)
    out, seen = [], set()
    while len(out) < n_full:
        s, c, b, z, p = (rng.randint(3), rng.randint(8), rng.randint(8), rng.randint(2), rng.randint(5))
        if b == c or (s, c, b, z, p) in seen:
            continue
        seen.add((s, c, b, z, p))
        out.append({"shape": SHAPES[s], "colour": COLOUR_NAMES[c], "background": COLOUR_NAMES[b],
                    "size": SIZE_NAMES[z], "position": POSITION_NAMES[p], "set": "full"})
    while len(out) < n_full + n_partial:
        s, c, b, z, p = (rng.randint(3), rng.randint(8), rng.randint(8), rng.randint(2), rng.randint(5))
        keep = rng.rand(4) < 0.5
        if b == c or not keep.any():
            continue
        t = {"shape": SHAPES[s], "set": "partial"}
        for k, name in zip(keep, [("size", SIZE_NAMES[z]), ("colour", COLOUR_NAMES[c]),
                                  ("position", POSITION_NAMES[p]), ("background", COLOUR_NAMES[b])]):
            if k:
                t[name[0]] = name[1]
        out.append(t)
    for i, t in enumerate(out):
        t["prompt"] = prompt_text(t)
        t["seed"] = seed * 1000 + i
    return out


def truth_indices(t):
    idx = {"shape": SHAPES.index(t["shape"])}
    if t.get("colour"):
        idx["colour"] = COLOUR_NAMES.index(t["colour"])
    if t.get("background"):
        idx["background"] = COLOUR_NAMES.index(t["background"])
    if t.get("size"):
        idx["size"] = SIZE_NAMES.index(t["size"])
    if t.get("position"):
        idx["position"] = POSITION_NAMES.index(t["position"])
    return idx


def score(rows):
    """rows: list of (truth index dict, detection dict). Accuracy per stated attribute, and the
    share of images with every stated attribute right."""
    hit = {k: 0 for k in ATTRS}
    tot = {k: 0 for k in ATTRS}
    allok = 0
    for truth, det in rows:
        ok = True
        for k, v in truth.items():
            tot[k] += 1
            good = det.get(k) is not None and det[k] == v
            hit[k] += good
            ok &= good
        allok += ok
    acc = {k: (hit[k] / tot[k] if tot[k] else None) for k in ATTRS}
    acc["all"] = allok / max(1, len(rows))
    acc["n"] = {k: tot[k] for k in ATTRS}
    acc["n_images"] = len(rows)
    acc["no_shape"] = sum(1 for _, d in rows if d.get("shape") is None)
    return acc


def md_row(label, acc):
    f = lambda v: "–" if v is None else "%.0f%%" % (100 * v)  # noqa: E731
    return "| %s | %s | %s | %s | %s | %s | %s | %d |" % (
        label, f(acc["background"]), f(acc["colour"]), f(acc["shape"]), f(acc["size"]),
        f(acc["position"]), f(acc["all"]), acc["n_images"])


MD_HEAD = ("| model / prompts | background | colour | shape | size | position | all stated right | images |\n"
           "|---|---|---|---|---|---|---|---|")


# -------------------------------------------------------------------------------- backends


def gen_diffusers(model, prompts, seeds, steps, guidance, threads, batch=8):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    imgs = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
        out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                   generator=gens).images
        imgs += [np.asarray(o.convert("RGB")) for o in out]
    return imgs


def gen_ldm(ldm, model, prompts, seeds, steps, guidance, keep_dir=None):
    """One `ldm generate` call per prompt, no sampling flags unless asked (the CLI's defaults)."""
    from PIL import Image

    d = keep_dir or tempfile.mkdtemp(prefix="adherence_")
    os.makedirs(d, exist_ok=True)
    imgs = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        path = os.path.join(d, "%04d.png" % i)
        cmd = [ldm, "generate", "-m", model, "-p", p, "--seed", str(s), "-o", path, "-q"]
        if steps is not None:
            cmd += ["--steps", str(steps)]
        if guidance is not None:
            cmd += ["--guidance", str(guidance)]
        subprocess.run(cmd, check=True)
        imgs.append(np.asarray(Image.open(path).convert("RGB")))
    return imgs


# ------------------------------------------------------------------------------- commands


def cmd_validate(a):
    imgs, attrs = make_dataset(a.n, a.seed)
    rows, wrong = [], []
    for img, r in zip(imgs, attrs):
        s, c, b, z, p = (int(v) for v in r)
        truth = {"shape": s, "colour": c, "background": b, "size": z, "position": p}
        det = detect(img)
        rows.append((truth, det))
        if any(det.get(k) != v for k, v in truth.items()):
            wrong.append((truth, det))
    acc = score(rows)
    print(MD_HEAD)
    print(md_row("detector on make_dataset(%d, seed %d)" % (a.n, a.seed), acc))
    for t, d in wrong[:10]:
        print("miss:", t, {k: d.get(k) for k in ("background", "colour", "shape", "size", "position", "fill",
                                                   "taper", "w", "h", "cx", "cy")})
    return acc


def cmd_eval(a):
    ps = prompt_set(a.n_full, a.n_partial, a.set_seed)
    if a.subset:
        ps = [t for t in ps if t["set"] == a.subset]
    if a.limit:
        ps = ps[:a.limit]
    prompts = [t["prompt"] for t in ps]
    seeds = [t["seed"] for t in ps]
    t0 = time.time()
    if a.backend == "ldm":
        imgs = gen_ldm(a.ldm, a.model, prompts, seeds, a.steps, a.guidance, a.keep)
    else:
        imgs = gen_diffusers(a.model, prompts, seeds, a.steps or 25,
                             7.5 if a.guidance is None else a.guidance, a.threads)
        if a.keep:
            from PIL import Image

            os.makedirs(a.keep, exist_ok=True)
            for i, im in enumerate(imgs):
                Image.fromarray(im).save(os.path.join(a.keep, "%04d.png" % i))
    secs = time.time() - t0
    res = {"model": a.model, "backend": a.backend, "steps": a.steps or 25,
           "guidance": 7.5 if a.guidance is None else a.guidance, "seconds": round(secs, 1), "sets": {}}
    per = []
    for t, img in zip(ps, imgs):
        det = detect(img)
        per.append({"prompt": t["prompt"], "seed": t["seed"], "set": t["set"], "truth": truth_indices(t),
                    "detected": {k: det.get(k) for k in ATTRS}})
    print(MD_HEAD)
    for name in ("full", "partial", "all"):
        rows = [(r["truth"], r["detected"]) for r in per if name == "all" or r["set"] == name]
        if not rows:
            continue
        acc = score(rows)
        res["sets"][name] = acc
        print(md_row("%s (%s prompts)" % (a.label or os.path.basename(os.path.normpath(a.model)), name), acc))
    res["images"] = per
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print("%d images in %.0fs (%s)" % (len(imgs), secs, a.backend), file=sys.stderr)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--n", type=int, default=500)
    v.add_argument("--seed", type=int, default=777)
    q = sub.add_parser("prompts")
    e = sub.add_parser("eval")
    for s in (q, e):
        s.add_argument("--n-full", type=int, default=100)
        s.add_argument("--n-partial", type=int, default=100)
        s.add_argument("--set-seed", type=int, default=2020)
    e.add_argument("-m", "--model", default="weights/tiny-shapes")
    e.add_argument("--backend", choices=["diffusers", "ldm"], default="diffusers")
    e.add_argument("--ldm", default="target/release/ldm")
    e.add_argument("--steps", type=int, default=None, help="default: the CLI's (25)")
    e.add_argument("--guidance", type=float, default=None, help="default: the CLI's (7.5)")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--subset", choices=["full", "partial"], default=None)
    e.add_argument("--limit", type=int, default=0, help="only the first N prompts (of the subset)")
    e.add_argument("--label", default=None)
    e.add_argument("--json", default=None)
    e.add_argument("--keep", default=None, help="also write the images to this folder")
    a = p.parse_args()
    if a.cmd == "validate":
        cmd_validate(a)
    elif a.cmd == "prompts":
        json.dump(prompt_set(a.n_full, a.n_partial, a.set_seed), sys.stdout, indent=1)
        print()
    else:
        cmd_eval(a)


if __name__ == "__main__":
    main()
