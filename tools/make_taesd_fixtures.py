#!/usr/bin/env python3
"""Tiny-autoencoder (diffusers AutoencoderTiny, TAESD) fixtures for tests/taesd.rs.

Two randomly initialised models, run by diffusers in float32 on CPU:

  tiny/   a small config (16 channels, 1-2 blocks per level), saved as a diffusers folder;
  tiny_f4/ three levels (4 pixels per latent, the shipped tiny model's VAE factor), weights only;
  real/   the real TAESD architecture (64 channels, blocks 1-3-3-3 / 3-3-3-1), saved in the
          original two-file layout (taesd_encoder.safetensors, taesd_decoder.safetensors: keys
          `N.…`, the decoder's shifted by its leading Clamp module), weights stored in float16 and
          rounded to float16 before running, so that the files are small and the reference saw
          exactly the stored values.

For each: io.safetensors with `latents` [1, 4, 8, 8] -> `decoded` [1, 3, 64, 64] (decoder only)
and `image` [1, 3, 64, 64] in [-1, 1] -> `encoded` [1, 4, 8, 8].
Random weights are drawn with a larger scale than torch's default init so that the decoder's
ReLUs do not silence most of the network.

    HF_HUB_OFFLINE=1 python tools/make_taesd_fixtures.py tests/fixtures/taesd
"""
import os
import sys

import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in) ** 0.5)


def run(model, seed):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g) * 2.0
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = model.decode(latents).sample
        encoded = model.encode(image).latents
    return {"latents": latents, "decoded": decoded, "image": image, "encoded": encoded}


def main():
    out = sys.argv[1]
    # tiny: a diffusers folder.
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 2, 1, 1),
        num_decoder_blocks=(1, 1, 2, 1),
    ).eval()
    randomise(tiny, 1)
    tiny.save_pretrained(os.path.join(out, "tiny"), safe_serialization=True)
    save_file({k: v.contiguous() for k, v in run(tiny, 2).items()}, os.path.join(out, "tiny", "io.safetensors"))

    # tiny_f4: three levels (4 pixels per latent), the shipped tiny model's latent space, for the
    # pipeline's --vae-decoder path.
    f4 = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16),
        decoder_block_out_channels=(16, 16, 16),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
    ).eval()
    randomise(f4, 5)
    f4.save_pretrained(os.path.join(out, "tiny_f4"), safe_serialization=True)

    # real: the TAESD architecture, original file layout, f16 weights.
    real = AutoencoderTiny().eval()
    randomise(real, 3)
    with torch.no_grad():
        for p in real.parameters():
            p.copy_(p.half().float())
    os.makedirs(os.path.join(out, "real"), exist_ok=True)
    state = real.state_dict()
    enc = {k[len("encoder.layers."):]: v.half().contiguous() for k, v in state.items() if k.startswith("encoder.layers.")}
    dec = {}
    for k, v in state.items():
        if k.startswith("decoder.layers."):
            index, rest = k[len("decoder.layers."):].split(".", 1)
            dec[f"{int(index) + 1}.{rest}"] = v.half().contiguous()
    save_file(enc, os.path.join(out, "real", "taesd_encoder.safetensors"))
    save_file(dec, os.path.join(out, "real", "taesd_decoder.safetensors"))
    save_file({k: v.contiguous() for k, v in run(real, 4).items()}, os.path.join(out, "real", "io.safetensors"))
    print("written", out)


if __name__ == "__main__":
    main()
