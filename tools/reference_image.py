#!/usr/bin/env python3
"""Reference images from diffusers, for end-to-end parity fixtures.

Runs diffusers' StableDiffusionPipeline in float32 on CPU with
generator=torch.Generator("cpu").manual_seed(seed) and writes, under --out-dir:

  <name>.png          the image
  <name>.safetensors  tensors (all float32):
                        init_latents            the initial noise, [1,4,H/f,W/f] (before init_noise_sigma)
                        latents                 the final latents after the last scheduler step
                                                (diffusion space, i.e. before 1/scaling_factor and the VAE)
                        image                   the decoded image, [1,H,W,3] in 0..1 (before 8-bit rounding)
                        prompt_embeds           text-encoder output for the prompt, [1,77,D]
                        negative_prompt_embeds  the same for the negative prompt (only with guidance > 1)
                        step_NNN                latents after step NNN (only with --trajectory)
  <name>.json         the settings, the timesteps, versions

The initial noise is drawn exactly as the pipeline draws it (torch.randn with the same
generator), and the generator then goes on to the pipeline, so the result is identical to
a plain pipe(..., generator=torch.Generator("cpu").manual_seed(seed)) call.

    HF_HUB_OFFLINE=1 python tools/reference_image.py weights/tiny-shapes \
        --prompt "a blue circle on a yellow background" --seed 42 --steps 20 \
        --guidance 7.5 --sampler pndm --width 64 --height 64 --out-dir tests/fixtures/pipeline
"""
import argparse
import hashlib
import json
import os
import re

import numpy as np
import torch

SAMPLERS = ["pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "lms", "heun", "ddpm"]


def make_scheduler(name, config):
    import diffusers as d

    cls = {
        "pndm": d.PNDMScheduler,
        "ddim": d.DDIMScheduler,
        "euler": d.EulerDiscreteScheduler,
        "euler_a": d.EulerAncestralDiscreteScheduler,
        "dpmpp_2m": d.DPMSolverMultistepScheduler,
        "lms": d.LMSDiscreteScheduler,
        "heun": d.HeunDiscreteScheduler,
        "ddpm": d.DDPMScheduler,
    }[name]
    kw = {}
    if name == "dpmpp_2m":
        kw = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    if name == "pndm" and "skip_prk_steps" not in config:
        # `--sampler pndm` is PLMS (as ldm's sampler table says): PNDMScheduler's own default
        # (the PRK warm-up) only where a PNDM config asks for it
        kw = {"skip_prk_steps": True}
    return cls.from_config(config, **kw)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="diffusers model folder (StableDiffusionPipeline layout)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", choices=SAMPLERS, default="pndm")
    p.add_argument("--width", type=int, default=None, help="default: unet sample_size * vae factor")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--out-dir", default=".")
    p.add_argument("--name", default=None, help="file stem (default: derived from prompt, sampler, seed)")
    p.add_argument("--trajectory", action="store_true", help="also store the latents after every step")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None)
    pipe = pipe.to("cpu")
    pipe.scheduler = make_scheduler(a.sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    f = pipe.vae_scale_factor
    width = a.width or pipe.unet.config.sample_size * f
    height = a.height or pipe.unet.config.sample_size * f
    name = a.name or "%s_%s_s%d" % (re.sub(r"[^a-z0-9]+", "_", a.prompt.lower()).strip("_")[:48] or "empty",
                                    a.sampler, a.seed)

    gen = torch.Generator("cpu").manual_seed(a.seed)
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    init = torch.randn(shape, generator=gen, dtype=torch.float32)  # what randn_tensor does on CPU

    cfg = a.guidance > 1.0
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(a.prompt, "cpu", 1, cfg, a.negative_prompt)

    traj = {}
    timesteps = []

    def on_step(pipe_, i, t, kw):
        timesteps.append(float(t))
        if a.trajectory:
            traj["step_%03d" % i] = kw["latents"].detach().clone()
        traj["_last"] = kw["latents"].detach().clone()
        return kw

    out = pipe(
        prompt=a.prompt,
        negative_prompt=a.negative_prompt,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        width=width,
        height=height,
        generator=gen,
        latents=init.clone(),
        output_type="np",
        callback_on_step_end=on_step,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    img = out.images  # [1,H,W,3] float in 0..1
    os.makedirs(a.out_dir, exist_ok=True)
    pipe.numpy_to_pil(img)[0].save(os.path.join(a.out_dir, name + ".png"))

    tensors = {
        "init_latents": init.contiguous(),
        "latents": traj.pop("_last").float().contiguous(),
        "image": torch.from_numpy(np.ascontiguousarray(img)).float(),
        "prompt_embeds": pe.float().contiguous(),
    }
    if cfg:
        tensors["negative_prompt_embeds"] = ne.float().contiguous()
    tensors.update({k: v.float().contiguous() for k, v in traj.items()})
    save_file(tensors, os.path.join(a.out_dir, name + ".safetensors"))

    weights = {}
    for sub in ("unet", "vae", "text_encoder"):
        d = os.path.join(a.model, sub)
        for fn in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if fn.endswith(".safetensors"):
                weights["%s/%s" % (sub, fn)] = sha256(os.path.join(d, fn))
    settings = {
        "model": a.model,
        "prompt": a.prompt,
        "negative_prompt": a.negative_prompt,
        "seed": a.seed,
        "steps": a.steps,
        "guidance_scale": a.guidance,
        "sampler": a.sampler,
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_config": dict(pipe.scheduler.config),
        "width": width,
        "height": height,
        "dtype": "float32",
        "device": "cpu",
        "generator": "torch.Generator('cpu').manual_seed(seed); init_latents = torch.randn(shape, generator) "
                     "then the same generator goes to the pipeline",
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "timesteps": timesteps,
        "files": {"png": name + ".png", "tensors": name + ".safetensors"},
        "tensor_shapes": {k: list(v.shape) for k, v in tensors.items()},
        "weights_sha256": weights,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "command": "HF_HUB_OFFLINE=1 python tools/reference_image.py %s --prompt %s --negative-prompt %s --seed %d "
                   "--steps %d --guidance %g --sampler %s --width %d --height %d%s"
                   % (a.model, json.dumps(a.prompt), json.dumps(a.negative_prompt), a.seed, a.steps, a.guidance,
                      a.sampler, width, height, " --trajectory" if a.trajectory else ""),
    }
    with open(os.path.join(a.out_dir, name + ".json"), "w") as fh:
        json.dump(settings, fh, indent=2, default=lambda o: o if not isinstance(o, tuple) else list(o))
        fh.write("\n")
    print("wrote %s/%s.{png,safetensors,json}" % (a.out_dir, name))


if __name__ == "__main__":
    main()
