#!/usr/bin/env python3
"""Build the model-parity fixtures in tests/fixtures/models/.

Run:  HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_model_fixtures.py [--debug]

For each case this builds a TINY randomly initialised model with the real architecture
(transformers CLIPTextModel, diffusers AutoencoderKL, diffusers UNet2DConditionModel), saves it
as a component folder (config.json + safetensors, f32) under tests/fixtures/models/<case>/, and
writes io.safetensors next to it: the inputs and the reference outputs, computed on the CPU in
float32. U-Nets are recorded at two timesteps (981 and 333.25), each with batch 2 ([uncond, cond]
as CFG batches it) and batch 1 (the cond half alone). Channel counts are small (16/32) to keep the fixtures near 4 MB; every code path
(shortcut convs, resamplers, per-block head counts, groups of several channels) is still
exercised. Tensors are stored as torch has them (NCHW for images/latents); the Rust test
converts to NHWC on the host.

Weights are re-drawn after construction (library inits such as CLIP's std 0.02 make attention
nearly uniform, which would hide head-layout bugs): matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1²),
norm scales 1 + N(0, 0.1²), embeddings ~ N(0, 1). Everything is seeded, so re-running the script
rewrites identical files.

--debug prints a few intermediate activations (hooks on named submodules), for bisecting a
mismatch against the Rust side; it writes nothing extra.
"""

import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models")
DEBUG = "--debug" in sys.argv


def reinit(model, seed):
    """Draw every parameter again with scales that keep activations O(1) (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                if "embedding" in name:
                    std = 1.0 if "token" in name else 0.5
                else:
                    std = 1.0 / (p[0].numel() ** 0.5)  # fan_in = in * kh * kw
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm scales
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)


def fresh_dir(name):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def save_io(d, tensors):
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, os.path.join(d, "io.safetensors"))


def debug_hooks(model, names):
    if not DEBUG:
        return
    mods = dict(model.named_modules())

    def hook(n):
        def f(_m, _i, o):
            t = o[0] if isinstance(o, tuple) else getattr(o, "sample", o)
            print(f"  {n:50s} {tuple(t.shape)} mean {t.mean():+.6f} std {t.std():.6f} first {t.flatten()[:4].tolist()}")

        return f

    for n in names:
        mods[n].register_forward_hook(hook(n))


# ---------------------------------------------------------------------------------------------
# CLIP text encoders (transformers CLIPTextModel)
# ---------------------------------------------------------------------------------------------


def make_clip(name, act, seed):
    cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg).eval()
    reinit(model, seed)
    d = fresh_dir(name)
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        # diffusers StableDiffusionPipeline.encode_prompt with clip_skip=1: hidden_states[-(1 + 1)]
        # through the final layer norm.
        skip1 = model.final_layer_norm(out.hidden_states[-2])
    save_io(d, {"input_ids": ids.float(), "last_hidden_state": out.last_hidden_state, "clip_skip_1": skip1})
    print(f"{name}: last_hidden_state {tuple(out.last_hidden_state.shape)} std {out.last_hidden_state.std():.4f}")


# ---------------------------------------------------------------------------------------------
# VAE (diffusers AutoencoderKL)
# ---------------------------------------------------------------------------------------------


def make_vae(name, seed):
    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    reinit(model, seed)
    d = fresh_dir(name)
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.rand((1, 3, 32, 32), generator=g) * 2 - 1
    latents = torch.randn((1, 4, 16, 16), generator=g)
    debug_hooks(model, ["encoder.conv_in", "encoder.down_blocks.0", "encoder.mid_block", "decoder.mid_block", "decoder.up_blocks.0"])
    with torch.no_grad():
        h = model.encoder(image)
        moments = model.quant_conv(h)
        dist = model.encode(image).latent_dist
        decoded = model.decode(latents).sample
    save_io(
        d,
        {
            "image": image,
            "moments": moments,
            "mean": dist.mean,
            "logvar": dist.logvar,
            "latents": latents,
            "decoded": decoded,
        },
    )
    print(f"{name}: moments {tuple(moments.shape)} std {moments.std():.4f}; decoded {tuple(decoded.shape)} std {decoded.std():.4f}")


# ---------------------------------------------------------------------------------------------
# U-Nets (diffusers UNet2DConditionModel)
# ---------------------------------------------------------------------------------------------

UNET_SD1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=2,  # the diffusers quirk: this is the number of heads (head dims 8, 16)
    norm_num_groups=8,
)

UNET_SD2 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 16, 32),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=[1, 2, 4],  # heads per block: head dims 16, 8, 8
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=True,
    transformer_layers_per_block=1,
    norm_num_groups=8,
)


TIMESTEP_2 = 333.25


def make_unet(name, cfg, seed):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).eval()
    reinit(model, seed)
    d = fresh_dir(name)
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    sample = torch.randn((2, cfg["in_channels"], 8, 8), generator=g)
    context = torch.randn((2, 77, cfg["cross_attention_dim"]), generator=g)
    timestep = torch.tensor(981.0)
    names = ["time_embedding", "conv_in"] + [f"down_blocks.{i}" for i in range(len(cfg["block_out_channels"]))]
    names += ["mid_block"] + [f"up_blocks.{i}" for i in range(len(cfg["block_out_channels"]))]
    debug_hooks(model, names)
    with torch.no_grad():
        out = model(sample, timestep, encoder_hidden_states=context).sample
    # Two timesteps, with and without CFG batching. Batch 2 is [uncond, cond] as diffusers'
    # pipelines batch classifier-free guidance; batch 1 is the cond half alone (sample[1:],
    # context[1:]), as a guidance_scale <= 1 run feeds it. TIMESTEP_2 is non-integer, as Euler
    # and Karras schedules give, and exact in f32. The extra inputs are slices of the stored
    # ones, so only outputs are added (2-4 KB per case).
    timestep_2 = torch.tensor(TIMESTEP_2)
    with torch.no_grad():
        out_t2 = model(sample, timestep_2, encoder_hidden_states=context).sample
        out_cond = model(sample[1:], timestep, encoder_hidden_states=context[1:]).sample
        out_cond_t2 = model(sample[1:], timestep_2, encoder_hidden_states=context[1:]).sample
    save_io(
        d,
        {
            "sample": sample,
            "timestep": timestep.reshape(1),
            "encoder_hidden_states": context,
            "out": out,
            "timestep_2": timestep_2.reshape(1),
            "out_t2": out_t2,
            "out_cond": out_cond,
            "out_cond_t2": out_cond_t2,
        },
    )
    gap = (out_cond - out[1:]).norm() / out[1:].norm()
    print(f"{name}: out {tuple(out.shape)} std {out.std():.4f}; out_t2 std {out_t2.std():.4f}; "
          f"batch 1 vs batch 2 cond half in torch: relative L2 {gap:.1e}")


def main():
    torch.set_grad_enabled(False)
    make_clip("clip_sd1", "quick_gelu", 100)
    make_clip("clip_sd2", "gelu", 200)
    make_vae("vae", 300)
    make_unet("unet_sd1", UNET_SD1, 400)
    make_unet("unet_sd2", UNET_SD2, 500)
    make_unet("unet_inpaint", dict(UNET_SD1, in_channels=9), 600)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"total fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
