#!/usr/bin/env python3
"""Build the SDXL parity fixtures in tests/fixtures/sdxl/.

Run:  HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_sdxl_fixtures.py

A tiny random model with the structure of diffusers' own SDXL pipeline tests
(tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py, get_dummy_components), saved
as a diffusers folder by `StableDiffusionXLPipeline.save_pretrained`:

  model/text_encoder/     CLIPTextModel, hidden 16, 3 layers, quick_gelu (CLIP ViT-L's role)
  model/text_encoder_2/   CLIPTextModelWithProjection, hidden 32, 3 layers, gelu, projection 24
                          (OpenCLIP bigG's role); both with the full 49,408-token vocabulary so
                          the real CLIP tokenizer drives them, and eos_token_id 2 as the real
                          SDXL configs have it (transformers then pools at the argmax id)
  model/tokenizer/        the CLIP tokenizer (pads with EOS)
  model/tokenizer_2/      the same vocabulary padding with "!" (as SDXL's tokenizer_2)
  model/unet/             UNet2DConditionModel: DownBlock2D then CrossAttnDownBlock2D,
                          transformer_layers_per_block (1, 2), use_linear_projection,
                          addition_embed_type "text_time", addition_time_embed_dim 8,
                          projection_class_embeddings_input_dim 6·8 + 24 = 72,
                          cross_attention_dim 16 + 32 = 48
  model/vae/              AutoencoderKL, 4 levels (8x), scaling_factor 0.13025, force_upcast
  model/scheduler/        SDXL base's scheduler_config.json (EulerDiscreteScheduler, leading)
  model/model_index.json  StableDiffusionXLPipeline, force_zeros_for_empty_prompt true
  unet_aesthetic/         config.json and add_embedding.linear_1.weight of a U-Net taking
                          aesthetic-score ids (projection_class_embeddings_input_dim 24 + 5·8);
                          every other weight is model/unet/'s
  unet_inpaint/           config.json and conv_in.weight of a 9-channel U-Net (latents, mask,
                          masked-image latents: diffusers/stable-diffusion-xl-1.0-inpainting-0.1's
                          layout); every other weight is model/unet/'s
  refiner/                a refiner folder as stabilityai/stable-diffusion-xl-refiner-1.0 is laid
                          out (StableDiffusionXLImg2ImgPipeline: text_encoder and tokenizer
                          [null, null], requires_aesthetics_score, force_zeros_for_empty_prompt
                          false) with its own U-Net (5 time ids, 32-wide context: encoder 2
                          only); its text_encoder_2/, tokenizer_2/ and vae/ are model/'s and are
                          not stored twice (tests/sdxl.rs copies them in)

The encoders have different widths and the projection another, so a swapped concatenation, a
missing projection or the wrong encoder's pooled output changes shapes or values visibly.
Weights are stored as f16 (diffusers runs them upcast to f32, as `ldm --dtype f32` does).

Reference outputs (f32, CPU):
  text_encoders.safetensors  input_ids [2, 77] (tokenizer, tokenizer_2 of PROMPT), and per
      encoder: hidden_states[-2] (`te1_penultimate` [1, 77, 16], `te2_penultimate`
      [1, 77, 32]), hidden_states[-3] (`te1_skip1`, `te2_skip1`: clip_skip 1 as SDXL's
      encode_prompt counts it), `te2_text_embeds` [1, 24] (the pooled, projected output);
      ids_eos [1, 77] (no EOS, the largest id at 7) with te2_text_embeds_eos (the same encoder
      with eos_token_id 49407: pooled at the first EOS, here none, so 0) and
      te2_text_embeds_legacy (eos_token_id 2: pooled at the largest id).
  unet_io.safetensors  sample [2, 4, 8, 8], encoder_hidden_states [2, 77, 48], text_embeds
      [2, 24], time_ids [2, 6] (rows differ), out_t999 / out_t421 [2, 4, 8, 8].
  <case>.png, <case>.latents.f32 (NCHW [1, 4, 8, 8]) for StableDiffusionXLPipeline txt2img runs,
  StableDiffusionXLImg2ImgPipeline runs on init.png (procedural), StableDiffusionXLInpaintPipeline
  runs on init.png + mask.png (the 4-channel base U-Net's latent blending, and the 9-channel
  U-Net), and base + refiner handoffs (the base with denoising_end and output_type="latent", its
  latents in <case>.base.latents.f32, then the refiner with denoising_start on them, each
  pipeline with its own generator seeded SEED); cases.json with every case's settings.
"""

import inspect
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "sdxl")
TOKENIZER = os.path.join(ROOT, "weights", "tiny-shapes", "tokenizer")

PROMPT = "a red circle"
PROMPT_2 = "a green square"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 6
GUIDANCE = 5.0
SEED = 42

# SDXL base 1.0's scheduler/scheduler_config.json, key for key (see make_pipeline_fixtures.py on
# why it is written by hand: a default written to the file is no longer a default).
SCHEDULER_CONFIG = dict(
    _class_name="EulerDiscreteScheduler",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)

SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
}


def round_to_f16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def clip_config(hidden, act, eos=2):
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=24,
        bos_token_id=0,
        eos_token_id=eos,
        pad_token_id=1,
    )


def spread_embeddings(model):
    # Default init (std 0.02) makes every token look alike; give the embeddings some spread so
    # prompt, prompt_2 and the negative prompt differ.
    with torch.no_grad():
        emb = getattr(model, "text_model", model).embeddings
        emb.token_embedding.weight.normal_(0.0, 1.0)
        emb.position_embedding.weight.normal_(0.0, 0.3)


def build_models():
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_config(16, "quick_gelu")).eval()
    spread_embeddings(text_encoder)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(32, "gelu")).eval()
    spread_embeddings(text_encoder_2)
    with torch.no_grad():
        text_encoder_2.text_projection.weight.normal_(0.0, 1.0)

    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 24,
        cross_attention_dim=16 + 32,
        norm_num_groups=8,
    ).eval()

    vae = AutoencoderKL(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    with torch.no_grad():
        # A random U-Net predicts almost no noise, so every sampler would end near the same
        # image; a louder output layer and added embedding make the samplers and the
        # conditioning (pooled embedding, size/crop ids) matter.
        unet.conv_out.weight.mul_(3.0)
        unet.conv_out.bias.mul_(3.0)
        unet.add_embedding.linear_1.weight.mul_(4.0)
        unet.add_embedding.linear_2.weight.mul_(4.0)
        vae.decoder.conv_out.bias.zero_()
    for m in (text_encoder, text_encoder_2, unet, vae):
        round_to_f16(m)
    return text_encoder, text_encoder_2, unet, vae


def save_model(pipe):
    model_dir = os.path.join(OUT, "model")
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    pipe.to(torch.float16)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    pipe.to(torch.float32)
    # transformers 5 writes tokenizer.json only; SDXL folders as users download them (and as
    # `ldm` reads them) hold vocab.json, merges.txt and the two JSON configs: the shipped CLIP
    # tokenizer's files, with tokenizer_2 padding with "!" as SDXL's does.
    for sub, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        d = os.path.join(model_dir, sub)
        shutil.rmtree(d)
        shutil.copytree(TOKENIZER, d)
        if pad is not None:
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                with open(os.path.join(d, name)) as f:
                    cfg = json.load(f)
                cfg["pad_token"] = pad
                with open(os.path.join(d, name), "w") as f:
                    json.dump(cfg, f, indent=2)
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)


def write_f32(name, t):
    arr = t.detach().to(torch.float32).cpu().numpy().astype("<f4")
    arr.tofile(os.path.join(OUT, name))
    return list(arr.shape)


def contiguous(d):
    return {k: v.detach().to(torch.float32).contiguous() for k, v in d.items()}


def text_encoder_outputs(tok, tok2, te, te2):
    ids1 = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        o1 = te(ids1, output_hidden_states=True)
        o2 = te2(ids2, output_hidden_states=True)
        # eos_token_id 49407 (newer configs) pools at the first EOS, the legacy 2 at the largest
        # id. Within CLIP's vocabulary they differ only on a row without EOS: here pooled at 0
        # (argmax of all-false) against position 7 (the largest id, 49406).
        te2_eos = CLIPTextModelWithProjection(clip_config(32, "gelu", eos=49407)).eval()
        te2_eos.load_state_dict(te2.state_dict())
        ids_eos = ids2.clone()
        ids_eos[ids_eos == 49407] = 300
        ids_eos[0, 0] = 320
        ids_eos[0, 7] = 49406
        eos_out = te2_eos(ids_eos)
        legacy_out = te2(ids_eos)
    tensors = {
        "input_ids": torch.cat([ids1, ids2]).float(),
        "te1_penultimate": o1.hidden_states[-2],
        "te1_skip1": o1.hidden_states[-3],
        "te2_penultimate": o2.hidden_states[-2],
        "te2_skip1": o2.hidden_states[-3],
        "te2_text_embeds": o2.text_embeds,
        "ids_eos": ids_eos.float(),
        "te2_text_embeds_eos": eos_out.text_embeds,
        "te2_text_embeds_legacy": legacy_out.text_embeds,
    }
    save_file(contiguous(tensors), os.path.join(OUT, "text_encoders.safetensors"))


def unet_outputs(unet):
    g = torch.Generator("cpu").manual_seed(7)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 48, generator=g)
    text_embeds = torch.randn(2, 24, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 128.0, 8.0, 16.0, 64.0, 64.0]])
    tensors = dict(sample=sample, encoder_hidden_states=ctx, text_embeds=text_embeds, time_ids=time_ids)
    with torch.no_grad():
        for t in (999, 421):
            cond = dict(text_embeds=text_embeds, time_ids=time_ids)
            tensors[f"out_t{t}"] = unet(sample, t, ctx, added_cond_kwargs=cond).sample
    save_file(contiguous(tensors), os.path.join(OUT, "unet_io.safetensors"))


def psnr_images(a, b):
    a = np.asarray(a).astype(np.float64)
    b = np.asarray(b).astype(np.float64)
    mse = ((a - b) ** 2).mean()
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def build_aesthetic_unet(unet):
    """The fixture U-Net taking aesthetic-score ids (requires_aesthetics_score, as SDXL's
    refiner): 5 ids (original size, crop, score) instead of 6, so add_embedding.linear_1 takes
    24 + 5 · 8 = 64 inputs. Every other weight is model/unet/'s; only the config and the new
    linear_1 weight are stored (unet_aesthetic/), tests/sdxl.rs splices them in."""
    config = dict(unet.config)
    config["projection_class_embeddings_input_dim"] = 24 + 5 * 8
    aes = UNet2DConditionModel.from_config(config).eval()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    w = state["add_embedding.linear_1.weight"]  # [128, 72]
    g = torch.Generator("cpu").manual_seed(11)
    state["add_embedding.linear_1.weight"] = (torch.randn(w.shape[0], 64, generator=g) * w.std()).half().float()
    aes.load_state_dict(state)
    d = os.path.join(OUT, "unet_aesthetic")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    aes.save_config(d)
    save_file({"add_embedding.linear_1.weight": aes.add_embedding.linear_1.weight.detach().half().contiguous()},
              os.path.join(d, "add_embedding.safetensors"))
    return aes


def build_inpaint_unet(unet):
    """A 9-channel copy of the fixture U-Net, as SDXL's inpainting U-Net (diffusers/
    stable-diffusion-xl-1.0-inpainting-0.1) is made from the base: conv_in gains 5 input
    channels (mask, masked-image latents; random, f16-exact, a little louder than the latent
    channels' so the mask and the masked image visibly steer the output), every other weight
    shared. Only config.json and conv_in.weight are stored (unet_inpaint/)."""
    config = dict(unet.config)
    config["in_channels"] = 9
    unet9 = UNet2DConditionModel.from_config(config).eval()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    w4 = state["conv_in.weight"]  # [C0, 4, 3, 3]
    g = torch.Generator("cpu").manual_seed(9)
    extra = torch.randn(w4.shape[0], 5, 3, 3, generator=g) * (2.0 * w4.std())
    state["conv_in.weight"] = torch.cat([w4, extra], 1).half().float()
    unet9.load_state_dict(state)
    d = os.path.join(OUT, "unet_inpaint")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    unet9.save_config(d)
    save_file({"conv_in.weight": unet9.conv_in.weight.detach().half().contiguous()},
              os.path.join(d, "conv_in.safetensors"))
    return unet9


def build_refiner(te2, tok2, vae, scheduler):
    """The refiner: text_encoder_2 alone (so a 32-wide context), a U-Net of its own taking 5
    time ids (24 + 5 · 8 = 64 added-embedding inputs), requires_aesthetics_score and
    force_zeros_for_empty_prompt false, as stabilityai/stable-diffusion-xl-refiner-1.0's
    model_index.json has them. Saved to refiner/ without the parts shared with model/."""
    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=5 * 8 + 24,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(3.0)
        unet.conv_out.bias.mul_(3.0)
        unet.add_embedding.linear_1.weight.mul_(4.0)
        unet.add_embedding.linear_2.weight.mul_(4.0)
    round_to_f16(unet)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=te2,
        tokenizer=None,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    refiner.set_progress_bar_config(disable=True)
    d = os.path.join(OUT, "refiner")
    if os.path.isdir(d):
        shutil.rmtree(d)
    refiner.to(torch.float16)
    refiner.save_pretrained(d, safe_serialization=True)
    refiner.to(torch.float32)
    for shared in ("text_encoder_2", "tokenizer_2", "vae"):
        shutil.rmtree(os.path.join(d, shared))
    with open(os.path.join(d, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    with open(os.path.join(d, "model_index.json")) as f:
        index = json.load(f)
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"]
    print(f"refiner unet: {sum(p.numel() for p in unet.parameters())} parameters")
    return refiner


def render_handoff(base, refiner, base_config, case):
    """diffusers' documented base + refiner example: the base stops at denoising_end and returns
    latents, the refiner starts from them at denoising_start (the same steps, sampler and
    prompts); each run gets a generator seeded SEED."""
    cls, opts = SAMPLERS[case["sampler"]]
    base.scheduler = cls.from_config(base_config, **opts)
    refiner.scheduler = cls.from_config(base_config, **opts)
    final = []

    def on_step_end(p, i, t, kw):
        final[:] = [kw["latents"].clone()]
        return kw

    common = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    if "negative_prompt" in case:
        common["negative_prompt"] = case["negative_prompt"]
    with torch.no_grad():
        latents = base(**common, height=SIZE, width=SIZE, denoising_end=case["denoising_end"],
                       output_type="latent", generator=torch.Generator("cpu").manual_seed(SEED)).images
        write_f32(f"{case['name']}.base.latents.f32", latents)
        images = refiner(**common, image=latents, denoising_start=case["denoising_start"],
                         generator=torch.Generator("cpu").manual_seed(SEED),
                         callback_on_step_end=on_step_end,
                         callback_on_step_end_tensor_inputs=["latents"]).images
    return images[0], final[0]


def procedural_mask():
    """The inpainting mask: a rectangle whose edges are off the 8-pixel latent grid (so
    diffusers' "nearest" downsampling and a block average differ), as make_pipeline_fixtures.py's."""
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[10:42, 21:51] = 255
    return Image.fromarray(mask)


def procedural_image():
    """64x64 RGB img2img input: a gradient with a disc (as make_pipeline_fixtures.py's)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r = 255 * x / (SIZE - 1)
    g = 255 * y / (SIZE - 1)
    b = np.full_like(r, 96.0)
    disc = (x - 40) ** 2 + (y - 24) ** 2 < 14**2
    r[disc], g[disc], b[disc] = 230, 40, 40
    return Image.fromarray(np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8))


def render(pipe, base_config, case):
    cls, opts = SAMPLERS[case["sampler"]]
    pipe.scheduler = cls.from_config(base_config, **opts)
    final = []

    def on_step_end(p, i, t, kw):
        final[:] = [kw["latents"].clone()]
        return kw

    kwargs = dict(
        prompt=case.get("prompt", PROMPT),
        num_inference_steps=STEPS,
        guidance_scale=case.get("guidance_scale", GUIDANCE),
        generator=torch.Generator("cpu").manual_seed(SEED),
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    if "init_image" in case:
        kwargs.update(image=Image.open(os.path.join(OUT, case["init_image"])), strength=case["strength"])
    if "mask" in case:
        kwargs.update(mask_image=Image.open(os.path.join(OUT, case["mask"])), height=SIZE, width=SIZE)
    elif "init_image" not in case:
        kwargs.update(height=SIZE, width=SIZE)
    for key in ("negative_prompt", "prompt_2", "negative_prompt_2", "clip_skip", "aesthetic_score",
                "negative_aesthetic_score"):
        if key in case:
            kwargs[key] = case[key]
    # Sizes in the cases are (width, height) as the CLI takes them; diffusers' tuples are
    # (height, width).
    if "original_size" in case:
        w, h = case["original_size"]
        kwargs["original_size"] = (h, w)
    if "crop_top_left" in case:
        x, y = case["crop_top_left"]
        kwargs["crops_coords_top_left"] = (y, x)
    if "target_size" in case:
        w, h = case["target_size"]
        kwargs["target_size"] = (h, w)
    with torch.no_grad():
        images = pipe(**kwargs).images
    return images[0], final[0]


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith((".png", ".f32", ".json", ".safetensors")) and f not in ("init.png", "mask.png"):
            os.remove(os.path.join(OUT, f))
    te, te2, unet, vae = build_models()
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    tok2 = CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!")
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    save_model(pipe)
    for name, m in (("text_encoder", te), ("text_encoder_2", te2), ("unet", unet), ("vae", vae)):
        print(f"{name}: {sum(p.numel() for p in m.parameters())} parameters")
    assert CLIPTokenizer.from_pretrained(os.path.join(OUT, "model", "tokenizer_2")).pad_token == "!"
    scheduler = EulerDiscreteScheduler.from_pretrained(os.path.join(OUT, "model", "scheduler"))
    pipe.scheduler = scheduler

    text_encoder_outputs(tok, tok2, te, te2)
    unet_outputs(unet)

    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    assert not img2img.config.requires_aesthetics_score
    procedural_image().save(os.path.join(OUT, "init.png"))
    # requires_aesthetics_score (the refiner's conditioning) with both encoders: model_index.json
    # of this variant is the model's plus `"requires_aesthetics_score": true`.
    aesthetic = StableDiffusionXLImg2ImgPipeline(**{**pipe.components, "unet": build_aesthetic_unet(unet)},
                                                 requires_aesthetics_score=True)
    aesthetic.set_progress_bar_config(disable=True)
    procedural_mask().save(os.path.join(OUT, "mask.png"))
    # StableDiffusionXLInpaintPipeline's own default strength is 0.9999 (not 1: the first step is
    # dropped and the latents start from the image noised to the second timestep); the cases
    # state it, and `ldm` defaults to it for SDXL inpainting.
    assert inspect.signature(StableDiffusionXLInpaintPipeline.__call__).parameters["strength"].default == 0.9999
    inpaint4 = StableDiffusionXLInpaintPipeline(**pipe.components)
    inpaint4.set_progress_bar_config(disable=True)
    inpaint9 = StableDiffusionXLInpaintPipeline(**{**pipe.components, "unet": build_inpaint_unet(unet)})
    inpaint9.set_progress_bar_config(disable=True)
    refiner = build_refiner(te2, tok2, vae, scheduler)
    neg = dict(negative_prompt=NEGATIVE)
    mask = dict(init_image="init.png", mask="mask.png")
    cases = [
        dict(name="euler_neg", sampler="euler", **neg),
        dict(name="euler_a_neg", sampler="euler_a", **neg),
        dict(name="dpmpp_2m_neg", sampler="dpmpp_2m", **neg),
        # No negative prompt: force_zeros_for_empty_prompt gives zero embeddings (pooled too).
        dict(name="euler_zero_neg", sampler="euler"),
        # An explicit empty negative prompt is encoded (diffusers zeroes only a missing one).
        dict(name="euler_empty_neg", sampler="euler", negative_prompt=""),
        # Guidance <= 1: one U-Net pass on the prompt alone.
        dict(name="euler_cfg1", sampler="euler", guidance_scale=1.0),
        dict(name="dpmpp_2m_cfg1", sampler="dpmpp_2m", guidance_scale=1.0),
        # A second prompt / negative prompt for text_encoder_2.
        dict(name="euler_prompt2", sampler="euler", prompt_2=PROMPT_2, negative_prompt_2="ugly", **neg),
        # Micro-conditioning other than the defaults ((W, H) / (X, Y) here).
        dict(name="euler_sizes", sampler="euler", original_size=[128, 96], crop_top_left=[16, 8],
             target_size=[64, 128], **neg),
        # StableDiffusionXLImg2ImgPipeline (base: no aesthetic-score ids): the posterior sample of
        # the init image, then the noise, at strength 0.6 / 0.3.
        dict(name="img2img_euler_neg", sampler="euler", init_image="init.png", strength=0.6, **neg),
        dict(name="img2img_euler_a_zero_neg", sampler="euler_a", init_image="init.png", strength=0.3),
        dict(name="img2img_dpmpp_2m_cfg1", sampler="dpmpp_2m", init_image="init.png", strength=0.6,
             guidance_scale=1.0),
        # Aesthetic-score ids (unet_aesthetic/): the defaults 6.0 / 2.5 (the negative pass gets
        # its own score), then other scores with zero negative embeddings.
        dict(name="img2img_aesthetic_euler_neg", sampler="euler", init_image="init.png", strength=0.6,
             unet="unet_aesthetic", **neg),
        dict(name="img2img_aesthetic_scores", sampler="euler", init_image="init.png", strength=0.6,
             unet="unet_aesthetic", aesthetic_score=8.5, negative_aesthetic_score=1.0),
        # StableDiffusionXLInpaintPipeline with the base's 4-channel U-Net (latent blending) at its
        # default strength 0.9999, at 1 (pure noise) and 0.6 (ancestral: the step noise comes
        # after both VAE posterior samples).
        dict(name="inpaint_blend_euler_neg", sampler="euler", strength=0.9999, **mask, **neg),
        dict(name="inpaint_blend_dpmpp_2m_s100", sampler="dpmpp_2m", strength=1.0, **mask, **neg),
        dict(name="inpaint_blend_euler_a_s60_zero_neg", sampler="euler_a", strength=0.6, **mask),
        # ... and with the 9-channel U-Net (unet_inpaint/): at strength 1 the init image is not
        # encoded (only the masked image is).
        dict(name="inpaint9_euler_neg", sampler="euler", strength=0.9999, unet="unet_inpaint", **mask,
             **neg),
        dict(name="inpaint9_dpmpp_2m_s100", sampler="dpmpp_2m", strength=1.0, unet="unet_inpaint",
             **mask, **neg),
        dict(name="inpaint9_euler_a_s60_cfg1", sampler="euler_a", strength=0.6, unet="unet_inpaint",
             guidance_scale=1.0, **mask),
        # Base (denoising_end 0.8, latents out) then refiner (denoising_start 0.8): with 6 leading
        # steps the cutoff is t = 200, so the base runs 831..333 and the refiner 167 and 1; at
        # 0.6 (t = 400) the base runs 831..499 and the refiner 333, 167, 1.
        dict(name="handoff_euler_neg", sampler="euler", denoising_end=0.8, denoising_start=0.8,
             refiner="refiner", **neg),
        dict(name="handoff_dpmpp_2m_neg_06", sampler="dpmpp_2m", denoising_end=0.6, denoising_start=0.6,
             refiner="refiner", **neg),
        # No negative prompt: zeros on the base (force_zeros_for_empty_prompt), the encoded ""
        # on the refiner (its folder says false); euler_a: the refiner's generator draws only
        # step noise (no noise is added to the handed-over latents).
        dict(name="handoff_euler_a_zero_neg", sampler="euler_a", denoising_end=0.8,
             denoising_start=0.8, refiner="refiner"),
    ]
    entries = []
    ref = None
    for case in cases:
        if "refiner" in case:
            img, latents = render_handoff(pipe, refiner, scheduler.config, case)
        else:
            if "mask" in case:
                runner = inpaint9 if case.get("unet") == "unet_inpaint" else inpaint4
            else:
                runner = aesthetic if "unet" in case else img2img if "init_image" in case else pipe
            img, latents = render(runner, scheduler.config, case)
        name = case["name"]
        img.save(os.path.join(OUT, f"{name}.png"))
        entry = dict(case, image=f"{name}.png", latents=f"{name}.latents.f32")
        entry["latents_shape"] = write_f32(entry["latents"], latents)
        if "refiner" in case:
            entry["base_latents"] = f"{name}.base.latents.f32"
        entries.append(entry)
        a = np.asarray(img).astype(np.float32)
        ref = img if ref is None else ref
        print(f"{name:20s} mean {a.mean():6.1f} std {a.std():5.1f} "
              f"clipped {100 * float(((a == 0) | (a == 255)).mean()):4.1f}%  "
              f"vs euler_neg {psnr_images(img, ref):5.1f} dB")
    settings = dict(
        generator="diffusers StableDiffusionXLPipeline (torch CPU generator, float32, CPU)",
        model="model",
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=SEED,
        cases=entries,
    )
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(settings, f, indent=1)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
