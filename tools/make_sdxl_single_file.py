#!/usr/bin/env python3
"""The tiny SDXL fixture as a single-file SGM checkpoint, checked against diffusers.

Run (after make_sdxl_fixtures.py):
    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_sdxl_single_file.py

Single-file SDXL checkpoints (sd_xl_base_1.0.safetensors and the fine-tunes people download) use
the names of Stability's generative-models (SGM) code. diffusers reads them with
`StableDiffusionXLPipeline.from_single_file`, whose conversion (loaders/single_file_utils.py:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`) maps SGM names to diffusers names. diffusers does not ship the
inverse, so it is written here (`sgm_state_dict`) and checked by running diffusers' forward
conversion on its output: every tensor of the pipeline diffusers builds from the single file must
equal the folder's, bit for bit. The folder's reference images (cases.json) are then the single
file's references too.

Written: tests/fixtures/sdxl/single_file/recipe.json, the recipe tests/sdxl.rs follows to
assemble the single file from the folder's tensors at test time (so the fixture does not store the
8 MB of weights twice): a list of {"key": SGM name, "from": [[component, diffusers key], ...],
"op": "copy" | "concat" (along dim 0: OpenCLIP's fused in_proj) | "transpose" (OpenCLIP's
text_projection, x @ P, is diffusers' Linear weight P.T) | "reshape" (the VAE attention's linear
weights as LDM's 1x1 convs), "shape": stored shape}; and single_file/sdxl-base-real.shapes.json,
SDXL base's key shapes under both namings with its configs (see `write_real_shapes`).
"""

import json
import os
import re
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "sdxl")
MODEL = os.path.join(FIXTURE, "model")
FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}

RESNET = [  # diffusers ResnetBlock2D part -> LDM ResBlock part
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def swap(rest, table):
    for a, b in table:
        if rest.startswith(a):
            return b + rest[len(a):]
    raise KeyError(rest)


def unet_name(key, lpb, attn_levels):
    top = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for a, b in top.items():
        if key.startswith(a):
            return b + key[len(a):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + level * (lpb + 1)
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{swap(rest, RESNET)}"
        if kind == "attentions":
            return f"input_blocks.{base + j}.1.{rest}"
        return f"input_blocks.{base + lpb}.0.op.{rest.removeprefix('conv.')}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{swap(rest, RESNET)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = level * (lpb + 1)
        if kind == "resnets":
            return f"output_blocks.{base + j}.0.{swap(rest, RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{base + j}.1.{rest}"
        slot = 2 if level in attn_levels else 1
        return f"output_blocks.{base + lpb}.{slot}.{rest}"
    raise KeyError(key)


def vae_name(key, levels):
    same = ("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "encoder.conv_out.",
            "decoder.conv_in.", "decoder.conv_out.")
    if key.startswith(same):
        return key
    part, rest = key.split(".", 1)
    resnet = lambda r: r.replace("conv_shortcut.", "nin_shortcut.")
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"{part}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", rest)
    if m:
        attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                ("to_out.0.", "proj_out.")]
        return f"{part}.mid.attn_1.{swap(m[1], attn)}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", rest)
    if m:
        if m[2] == "resnets":
            return f"encoder.down.{m[1]}.block.{m[3]}.{resnet(m[4])}"
        return f"encoder.down.{m[1]}.downsample.{m[4]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", rest)
    if m:
        b = levels - 1 - int(m[1])
        if m[2] == "resnets":
            return f"decoder.up.{b}.block.{m[3]}.{resnet(m[4])}"
        return f"decoder.up.{b}.upsample.{m[4]}"
    raise KeyError(key)


OPEN_CLIP_LAYER = [  # diffusers CLIPEncoderLayer part -> OpenCLIP resblock part
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


def recipe(folder):
    """[(SGM key, [(component, diffusers key), ...], op)] for the whole pipeline."""
    out = []
    unet = folder["unet"]
    lpb = len({k.split(".")[3] for k in unet if k.startswith("down_blocks.0.resnets.")})
    attn_levels = {int(k.split(".")[1]) for k in unet
                   if k.startswith("up_blocks.") and ".attentions." in k}
    for k in unet:
        out.append(("model.diffusion_model." + unet_name(k, lpb, attn_levels),
                    [("unet", k)], "copy"))
    vae = folder["vae"]
    levels = len({k.split(".")[2] for k in vae if k.startswith("decoder.up_blocks.")})
    for k in vae:
        name = vae_name(k, levels)
        op = "copy"
        if ".mid.attn_1." in name and not ".norm." in name and name.endswith("weight"):
            op = "reshape"
        out.append(("first_stage_model." + name, [("vae", k)], op))
    for k in folder["text_encoder"]:
        name = k if k.startswith("text_model.") else "text_model." + k
        out.append(("conditioner.embedders.0.transformer." + name, [("text_encoder", k)], "copy"))
    te2 = folder["text_encoder_2"]
    p = "conditioner.embedders.1.model."
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for k in te2:
        if k in top:
            out.append((p + top[k], [("text_encoder_2", k)], "copy"))
        elif k == "text_projection.weight":
            out.append((p + "text_projection", [("text_encoder_2", k)], "transpose"))
        else:
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k)
            layer, rest = m[1], m[2]
            blk = f"{p}transformer.resblocks.{layer}."
            q = re.match(r"self_attn\.q_proj\.(weight|bias)", rest)
            if q:
                parts = [("text_encoder_2", f"text_model.encoder.layers.{layer}.self_attn."
                                            f"{x}_proj.{q[1]}") for x in "qkv"]
                out.append((f"{blk}attn.in_proj_{q[1]}", parts, "concat"))
            elif re.match(r"self_attn\.[kv]_proj\.", rest):
                continue  # fused into in_proj with q
            else:
                out.append((blk + swap(rest, OPEN_CLIP_LAYER), [("text_encoder_2", k)], "copy"))
    return out


def build(folder, steps):
    sd = {}
    for key, parts, op in steps:
        ts = [folder[c][k] for c, k in parts]
        if op == "concat":
            t = torch.cat(ts, 0)
        elif op == "transpose":
            t = ts[0].T.contiguous()
        elif op == "reshape":
            t = ts[0].reshape(*ts[0].shape, 1, 1)
        else:
            t = ts[0]
        assert key not in sd, key
        sd[key] = t
    return sd


def check_with_diffusers(path):
    """diffusers' own conversion of the single file must give the folder's tensors exactly."""
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float16)
    pipe = StableDiffusionXLPipeline.from_single_file(path, config=MODEL,
                                                      torch_dtype=torch.float16)
    for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:
        a = getattr(ref, name).state_dict()
        b = getattr(pipe, name).state_dict()
        assert a.keys() == b.keys(), (name, set(a) ^ set(b))
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (name, k)
        print(f"{name}: {len(a)} tensors identical after diffusers' single-file conversion")
    print("scheduler:", type(pipe.scheduler).__name__,
          "force_zeros_for_empty_prompt:", pipe.config.force_zeros_for_empty_prompt)


# stabilityai/stable-diffusion-xl-base-1.0's configs, the keys that shape the models (what
# from_single_file fetches for an SDXL base checkpoint).
REAL_UNET = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
REAL_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
    force_upcast=True,
)
REAL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
REAL_TEXT_2 = dict(REAL_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


def write_real_shapes():
    """single_file/sdxl-base-real.shapes.json: SDXL base's SGM key shapes (through the same
    recipe, on meta tensors: no weights), the diffusers shapes, and the configs, so the test can
    check renaming and config inference at real size without the 7 GB file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**REAL_UNET),
            "vae": AutoencoderKL(**REAL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**REAL_TEXT)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**REAL_TEXT_2)),
        }
    folder = {c: dict(m.state_dict()) for c, m in models.items()}
    sd = build(folder, recipe(folder))
    doc = {
        "ldm_shapes": {k: list(v.shape) for k, v in sd.items()},
        "diffusers_shapes": {c: {k: list(v.shape) for k, v in f.items()} for c, f in folder.items()},
        "configs": {"unet": REAL_UNET, "vae": REAL_VAE, "text_encoder": REAL_TEXT,
                    "text_encoder_2": REAL_TEXT_2},
    }
    path = os.path.join(FIXTURE, "single_file", "sdxl-base-real.shapes.json")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    print(f"wrote {path}: {len(sd)} SGM keys")


def main():
    write_real_shapes()
    folder = {c: load_file(os.path.join(MODEL, f)) for c, f in FILES.items()}
    steps = recipe(folder)
    used = {(c, k) for _, parts, _ in steps for c, k in parts}
    left = [(c, k) for c in folder for k in folder[c] if (c, k) not in used]
    assert not left, left
    sd = build(folder, steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sdxl-tiny.safetensors")
        save_file(sd, path)
        print(f"{len(sd)} SGM tensors, {os.path.getsize(path)} bytes")
        check_with_diffusers(path)
    doc = [{"key": k, "from": [list(p) for p in parts], "op": op, "shape": list(sd[k].shape)}
           for k, parts, op in steps]
    with open(os.path.join(FIXTURE, "single_file", "recipe.json"), "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(e) for e in doc) + "\n]\n")
    print("wrote", os.path.join(FIXTURE, "single_file", "recipe.json"))


if __name__ == "__main__":
    sys.exit(main())
