#!/usr/bin/env python3
"""Reference outputs of diffusers' tiled VAE for tests/vae_tiling.rs.

Run:  HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_vae_tiling_fixture.py

Loads the fixture VAE of the model-parity tests (tests/fixtures/models/vae: block_out_channels
(16, 32), so f = 2, sample_size 32), sets diffusers' tiling knobs to 16-px tiles (8 latents,
overlap 0.25: decode tiles start every 6 latents, blend 4 px, keep 12 px; encode tiles start
every 12 px, blend 2 latents, keep 6 latents) and writes tests/fixtures/vae_tiling/io.safetensors
with, computed on the CPU in float32 (NCHW, as torch has them):

  latents [1, 4, 20, 24] -> decoded_tiled / decoded      48×40 px: 4×4 tiles, the last row and
                                                          column partial
  latents_odd [2, 4, 13, 19] -> decoded_odd_tiled         batch 2, non-last partial tiles and
                                                          1-latent tiles (diffusers blends them
                                                          against the neighbour's *last* rows
                                                          whatever its size)
  image [1, 3, 40, 48] -> moments_tiled / moments         encode, 4×4 tiles
  image_odd [2, 3, 26, 38] -> moments_odd_tiled           batch 2, 14- and 2-px tiles

`decoded` / `moments` are the untiled outputs, for the tiled-vs-untiled comparison. Seeded:
re-running rewrites identical files.
"""

import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
TILE_SAMPLE = 16
OVERLAP = 0.25


def main():
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "models", "vae")).eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_tiling()
    vae.tile_sample_min_size = TILE_SAMPLE
    vae.tile_latent_min_size = TILE_SAMPLE // f
    vae.tile_overlap_factor = OVERLAP

    g = torch.Generator().manual_seed(400)
    latents = torch.randn((1, 4, 20, 24), generator=g)
    latents_odd = torch.randn((2, 4, 13, 19), generator=g)
    image = torch.rand((1, 3, 40, 48), generator=g) * 2 - 1
    image_odd = torch.rand((2, 3, 26, 38), generator=g) * 2 - 1

    def untiled_decode(z):
        return vae.decoder(vae.post_quant_conv(z))

    def untiled_encode(x):
        return vae.quant_conv(vae.encoder(x))

    with torch.no_grad():
        out = {
            "latents": latents,
            "latents_odd": latents_odd,
            "image": image,
            "image_odd": image_odd,
            "decoded_tiled": vae.tiled_decode(latents).sample,
            "decoded": untiled_decode(latents),
            "decoded_odd_tiled": vae.tiled_decode(latents_odd).sample,
            "moments_tiled": vae._tiled_encode(image),
            "moments": untiled_encode(image),
            "moments_odd_tiled": vae._tiled_encode(image_odd),
        }
    d = os.path.join(ROOT, "vae_tiling")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in out.items()}, os.path.join(d, "io.safetensors"))

    def psnr(a, b):  # peak-to-peak of the reference as the signal range
        mse = ((a - b) ** 2).mean()
        return 10 * torch.log10((b.max() - b.min()) ** 2 / mse).item()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    for name, t in out.items():
        print(f"{name}: {tuple(t.shape)}")
    print(f"diffusers tiled vs untiled decode: rel L2 {rel(out['decoded_tiled'], out['decoded']):.4f}, "
          f"PSNR {psnr(out['decoded_tiled'], out['decoded']):.2f} dB")
    print(f"diffusers tiled vs untiled encode: rel L2 {rel(out['moments_tiled'], out['moments']):.4f}, "
          f"PSNR {psnr(out['moments_tiled'], out['moments']):.2f} dB")


if __name__ == "__main__":
    main()
