#!/usr/bin/env python3
"""The README's picture of the shipped model: a grid of `ldm generate` images (issue #20).

One row per prompt, one column per image: each row is ONE `ldm generate` call with
`--batch-size COLS --seed SEED` and otherwise the CLI's defaults (25 steps, guidance 7.5, the
model's scheduler), so a row is what `ldm generate -p PROMPT --seed SEED -b COLS` gives (the
batch draws its noise from one generator, as diffusers does: the first tile of the first row
is exactly the README's first command at `--seed 42`). Tiles are 64x64 with 2 px gaps; the
PNG is a 256-colour palette image (~22 KB) unless --colours 0. Tiles already in --keep are reused.

    XDG_RUNTIME_DIR=... venv/bin/python tools/make_readme_grid.py --ldm target/release/ldm \
        -m weights/tiny-shapes -o docs/tiny-shapes-grid.png

It prints the markdown list of the prompts for under the picture. Regenerate it whenever the
weights change.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

PROMPTS = [
    "a blue circle on a yellow background",
    "a large black square on a white background",
    "a small red triangle on the left on a green background",
    "a large yellow circle at the top on a purple background",
    "a small white square at the bottom on a blue background",
    "a large orange triangle on the right on a black background",
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default="target/release/ldm")
    p.add_argument("-m", "--model", default="weights/tiny-shapes")
    p.add_argument("-o", "--out", default="docs/tiny-shapes-grid.png")
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gap", type=int, default=2)
    p.add_argument("--colours", type=int, default=256,
                   help="save as a palette PNG with this many colours (0: lossless RGB, ~110 KB for 6x4 tiles)")
    p.add_argument("--keep", default=None, help="folder for the tiles (default: a temporary one)")
    a = p.parse_args()

    d = a.keep or tempfile.mkdtemp(prefix="grid_")
    os.makedirs(d, exist_ok=True)
    rows = []
    for r, prompt in enumerate(PROMPTS):
        pat = os.path.join(d, "r%d_%%d.png" % r)
        tiles = [pat % c for c in range(a.cols)]
        if not all(os.path.exists(t) for t in tiles):
            subprocess.run([a.ldm, "generate", "-m", a.model, "-p", prompt, "--seed", str(a.seed),
                            "-b", str(a.cols), "-o", pat, "-q"], check=True)
        rows.append([np.asarray(Image.open(t).convert("RGB")) for t in tiles])
        print("row %d done" % r, file=sys.stderr, flush=True)
    g, n = a.gap, 64
    H = len(rows) * n + (len(rows) + 1) * g
    W = a.cols * n + (a.cols + 1) * g
    canvas = np.full((H, W, 3), 128, np.uint8)
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            y, x = g + r * (n + g), g + c * (n + g)
            canvas[y:y + n, x:x + n] = t
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    img = Image.fromarray(canvas)
    if a.colours:
        # the tiles' pixel noise makes a lossless PNG ~110 KB; a 256-colour palette (max-coverage +
        # k-means, no dithering) is ~22 KB and differs by ~3/255 on average
        img = img.quantize(colors=a.colours, method=Image.Quantize.MAXCOVERAGE, kmeans=2, dither=Image.Dither.NONE)
    img.save(a.out, optimize=True)
    print("wrote %s (%dx%d, %d bytes)" % (a.out, W, H, os.path.getsize(a.out)), file=sys.stderr)
    print("Rows, top to bottom (`--seed %d -b %d`):" % (a.seed, a.cols))
    for prompt in PROMPTS:
        print("1. `%s`" % prompt)


if __name__ == "__main__":
    main()
