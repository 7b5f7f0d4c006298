#!/usr/bin/env python3
"""Build the weight-loading fixtures in tests/fixtures/weights/.

Run:  HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_weight_fixtures.py

For two tiny random Stable Diffusion models (SD1-like: conv proj_in, OpenAI-CLIP text
encoder; SD2-like: linear proj_in, OpenCLIP text encoder) this writes

  <name>/unet/diffusion_pytorch_model.safetensors   (+ config.json)   f32
  <name>/vae/diffusion_pytorch_model.safetensors    (+ config.json)   f32
  <name>/text_encoder/model.safetensors             (+ config.json)   f32
  <name>.ckpt.safetensors   one single-file CompVis/LDM checkpoint     f16

Every weight is rounded to an f16 value before saving, so the f32 folder and the f16 single
file hold exactly the same numbers and the Rust test can compare them for equality.

The single file is made by the inverse of diffusers' single-file loader, following
diffusers/scripts/convert_diffusers_to_original_stable_diffusion.py (GitHub only, not in the
pip package), generalised from its hard-coded 4 blocks x 2 layers to any block count and
layers_per_block. For the OpenCLIP text encoder it also appends what a real SD 2.x checkpoint
holds but diffusers drops: one extra final resblock (SD 2.x conditions on the penultimate
layer), `text_projection` and `logit_scale`. LDM scheduler buffers (betas, alphas_cumprod)
are added too, as real checkpoints carry them.

It also writes <name>-real.shapes.json for the real SD 1.5 and SD 2.1 architectures: the LDM
key -> shape map of a converted checkpoint plus the diffusers configs, built on the meta
device (no weights), so config inference can be tested at real size.
"""

import json
import os
import re
import shutil

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "weights")

# ---------------------------------------------------------------------------------------------
# U-Net: diffusers -> LDM names (generalised convert_unet_state_dict)
# ---------------------------------------------------------------------------------------------

UNET_TOP = [
    # (LDM, diffusers)
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def unet_prefix_map(n_blocks, lpb, down_attn, up_attn):
    """(LDM prefix, diffusers prefix) pairs for a U-Net with n_blocks levels."""
    pairs = []
    for i in range(n_blocks):
        for j in range(lpb):
            pairs.append((f"input_blocks.{i * (lpb + 1) + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                pairs.append((f"input_blocks.{i * (lpb + 1) + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n_blocks - 1:
            pairs.append((f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(lpb + 1):
            pairs.append((f"output_blocks.{i * (lpb + 1) + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                pairs.append((f"output_blocks.{i * (lpb + 1) + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n_blocks - 1:
            slot = 2 if up_attn[i] else 1
            pairs.append((f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs.append(("middle_block.0.", "mid_block.resnets.0."))
    pairs.append(("middle_block.2.", "mid_block.resnets.1."))
    return pairs


def unet_to_ldm(sd, cfg):
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    prefixes = unet_prefix_map(n, lpb, down_attn, up_attn)
    out = {}
    for k, v in sd.items():
        new = None
        for ldm, hf in UNET_TOP:
            if k.startswith(hf):
                new = ldm + k[len(hf):]
        if new is None:
            # longest matching prefix wins (down_blocks.1.resnets.1. vs .resnets.10. cannot clash
            # because prefixes end with '.')
            for ldm, hf in prefixes:
                if k.startswith(hf):
                    rest = k[len(hf):]
                    if ".resnets." in hf:
                        for l_part, h_part in UNET_RESNET:
                            rest = rest.replace(h_part, l_part)
                    new = ldm + rest
                    break
        assert new is not None, f"unmapped U-Net key {k}"
        out["model.diffusion_model." + new] = v
    return out


# ---------------------------------------------------------------------------------------------
# VAE: diffusers -> LDM names (generalised convert_vae_state_dict)
# ---------------------------------------------------------------------------------------------


def vae_to_ldm(sd, cfg):
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    pairs = [
        ("encoder.norm_out.", "encoder.conv_norm_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
    ]
    for i in range(n):
        for j in range(lpb):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(lpb + 1):
            pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    for part in ("encoder", "decoder"):
        for i in range(2):
            pairs.append((f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}."))
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
    attn_parts = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    out = {}
    for k, v in sd.items():
        new = k
        for ldm, hf in pairs:
            if k.startswith(hf):
                rest = k[len(hf):].replace("conv_shortcut", "nin_shortcut")
                if ".attentions." in hf:
                    for l_part, h_part in attn_parts:
                        if rest.startswith(h_part):
                            rest = l_part + rest[len(h_part):]
                    if v.ndim == 2:  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
                        v = v.reshape(*v.shape, 1, 1)
                new = ldm + rest
                break
        out["first_stage_model." + new] = v
    return out


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------


def clip_to_ldm(sd):
    return {"cond_stage_model.transformer." + k: v for k, v in sd.items()}


def open_clip_to_ldm(sd, hidden, extra_layer):
    """Inverse of diffusers' convert_open_clip_checkpoint; adds the parts diffusers drops."""
    names = [
        ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.final_layer_norm.", "ln_final."),
    ]
    layer_parts = [
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
        ("self_attn.out_proj", "attn.out_proj"),
    ]
    out = {}
    qkv = {}
    for k, v in sd.items():
        if k == "text_model.embeddings.position_ids":
            continue
        done = False
        for hf, ldm in names:
            if k.startswith(hf):
                out[ldm + k[len(hf):]] = v
                done = True
        if done:
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)$", k)
        assert m, f"unmapped text key {k}"
        layer, rest = m.group(1), m.group(2)
        mq = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if mq:
            qkv.setdefault((layer, mq.group(2)), {})[mq.group(1)] = v
            continue
        for hf, ldm in layer_parts:
            rest = rest.replace(hf, ldm)
        out[f"transformer.resblocks.{layer}.{rest}"] = v
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if extra_layer is not None:
        # the final OpenCLIP layer that SD 2.x skips: copy the shapes of layer 0, new values
        n = extra_layer
        for k in list(out):
            if k.startswith("transformer.resblocks.0."):
                v = out[k]
                out[k.replace("resblocks.0.", f"resblocks.{n}.")] = rand_like_f16(v)
        out["text_projection"] = rand_like_f16(torch.empty(hidden, hidden))
        out["logit_scale"] = torch.tensor(4.6052)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def rand_like_f16(t):
    return torch.randn(t.shape).half().float()


def scheduler_buffers():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return {"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0)}


# ---------------------------------------------------------------------------------------------
# Fixture models
# ---------------------------------------------------------------------------------------------


def tiny_models(sd2):
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        # SD1 misnames the head count "attention_head_dim" (8 for SD 1.x); SD2 gives a list
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=32,
            # token ids inside the tiny vocabulary (SD 1.x's config.json has bos 0, eos 2, pad 1)
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                # non-trivial values (not the init's zeros/ones), exactly representable in f16
                p.copy_(torch.randn_like(p).mul(0.5).half().float())
    return unet, vae, text


def contiguous(sd):
    return {k: v.detach().contiguous() for k, v in sd.items()}


def text_model_keys(sd):
    """transformers >= 5 saves CLIPTextModel without the `text_model.` prefix that real SD
    checkpoints (and diffusers' converters) use; put it back."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def write_fixture(name, sd2):
    torch.manual_seed(2 if sd2 else 1)
    unet, vae, text = tiny_models(sd2)
    root = os.path.join(OUT, name)
    shutil.rmtree(root, ignore_errors=True)
    unet.save_pretrained(os.path.join(root, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(root, "vae"), safe_serialization=True)
    text.save_pretrained(os.path.join(root, "text_encoder"), safe_serialization=True)

    ckpt = {}
    ckpt.update(unet_to_ldm(contiguous(unet.state_dict()), dict(unet.config)))
    ckpt.update(vae_to_ldm(contiguous(vae.state_dict()), dict(vae.config)))
    text_sd = text_model_keys(contiguous(text.state_dict()))
    if sd2:
        ckpt.update(open_clip_to_ldm(text_sd, text.config.hidden_size, text.config.num_hidden_layers))
    else:
        ckpt.update(clip_to_ldm(text_sd))
    ckpt.update(scheduler_buffers())
    ckpt = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in ckpt.items()}
    save_file(ckpt, os.path.join(OUT, f"{name}.ckpt.safetensors"))
    os.chmod(os.path.join(OUT, f"{name}.ckpt.safetensors"), 0o644)
    for p in sorted(os.listdir(root)) + [f"../{name}.ckpt.safetensors"]:
        print(name, p)


# ---------------------------------------------------------------------------------------------
# Real-size shape maps (meta device: no weights are allocated)
# ---------------------------------------------------------------------------------------------

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1 unet/config.json
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)
SD_VAE = dict(  # the SD 1.x / 2.x vae/config.json
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    sample_size=512,
)
SD15_TEXT = dict(  # openai/clip-vit-large-patch14 text config
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
SD21_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")


def write_real_shapes(name, unet_cfg, vae_cfg, text_cfg, sd2):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    ckpt = {}
    ckpt.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    ckpt.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    if sd2:
        ckpt.update(open_clip_to_ldm(text_model_keys(text.state_dict()), text_cfg["hidden_size"], text_cfg["num_hidden_layers"]))
    else:
        ckpt.update(clip_to_ldm(text_model_keys(text.state_dict())))
    doc = {
        "ldm_shapes": {k: list(v.shape) for k, v in sorted(ckpt.items())},
        "diffusers_shapes": {
            "unet": {k: list(v.shape) for k, v in unet.state_dict().items()},
            "vae": {k: list(v.shape) for k, v in vae.state_dict().items()},
            "text_encoder": {
                k: list(v.shape)
                for k, v in text_model_keys(text.state_dict()).items()
                if not k.endswith("position_ids")
            },
        },
        "configs": {
            "unet": json.loads(json.dumps(dict(unet.config))),
            "vae": json.loads(json.dumps(dict(vae.config))),
            "text_encoder": json.loads(text.config.to_json_string()),
        },
    }
    with open(os.path.join(OUT, f"{name}-real.shapes.json"), "w") as f:
        json.dump(doc, f, indent=0, sort_keys=True)
    print(name, "real shapes:", len(doc["ldm_shapes"]), "LDM keys")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    write_fixture("sd1-tiny", sd2=False)
    write_fixture("sd2-tiny", sd2=True)
    write_real_shapes("sd15", SD15_UNET, SD_VAE, SD15_TEXT, sd2=False)
    write_real_shapes("sd21", SD21_UNET, dict(SD_VAE, sample_size=768), SD21_TEXT, sd2=True)
