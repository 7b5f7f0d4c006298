#!/usr/bin/env python3
"""Build the SDXL-Turbo parity fixtures in tests/fixtures/sdxl/turbo/.

Run (after tools/make_sdxl_fixtures.py, whose model/ folder it reads):
    HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_sdxl_turbo_fixtures.py

SDXL-Turbo (stabilityai/sdxl-turbo) is an SDXL base architecture whose folder differs in its
scheduler: EulerAncestralDiscreteScheduler with timestep_spacing "trailing" (its
scheduler/scheduler_config.json, written below key for key), run as its model card says: 1-4
steps, guidance_scale 0 (one U-Net pass on the prompt alone, no negative pass). The tiny SDXL
model of tests/fixtures/sdxl/model/ stands in for the weights; tests/sdxl.rs copies it with
turbo/scheduler_config.json put in place of its scheduler's.

Outputs (f32, CPU), per case: <case>.png and <case>.latents.f32 (NCHW [1, 4, 8, 8]), and
cases.json with each case's settings:
  turbo_1step, turbo_4step          the folder's scheduler (Euler a, trailing), 1 and 4 steps
  turbo_euler_4step                 `--sampler euler` on the Turbo folder: diffusers'
                                    EulerDiscreteScheduler.from_config(folder's config) keeps
                                    the folder's trailing spacing
  turbo_4step_leading               `--timestep-spacing leading`: the folder's scheduler with
                                    timestep_spacing overridden
"""

import json
import os

import numpy as np
import torch

from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "tests", "fixtures", "sdxl", "model")
OUT = os.path.join(ROOT, "tests", "fixtures", "sdxl", "turbo")

PROMPT = "a red circle"
SIZE = 64
SEED = 42

# stabilityai/sdxl-turbo, scheduler/scheduler_config.json (without _diffusers_version).
TURBO_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def write_f32(path, t):
    arr = t.detach().to(torch.float32).cpu().numpy().astype("<f4")
    arr.tofile(path)
    return list(arr.shape)


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "scheduler_config.json"), "w") as f:
        json.dump(TURBO_SCHEDULER, f, indent=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    turbo = EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER)
    cases = [
        dict(name="turbo_1step", steps=1),
        dict(name="turbo_4step", steps=4),
        dict(name="turbo_euler_4step", steps=4, sampler="euler"),
        dict(name="turbo_4step_leading", steps=4, timestep_spacing="leading"),
    ]
    entries = []
    for case in cases:
        if case.get("sampler") == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(turbo.config)
        elif "timestep_spacing" in case:
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
                turbo.config, timestep_spacing=case["timestep_spacing"])
        else:
            pipe.scheduler = turbo
        final = []

        def on_step_end(p, i, t, kw):
            final[:] = [kw["latents"].clone()]
            return kw

        pipe.scheduler.set_timesteps(case["steps"])
        timesteps = [int(t) for t in pipe.scheduler.timesteps]
        with torch.no_grad():
            image = pipe(prompt=PROMPT, num_inference_steps=case["steps"], guidance_scale=0.0,
                         height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(SEED),
                         callback_on_step_end=on_step_end,
                         callback_on_step_end_tensor_inputs=["latents"]).images[0]
        name = case["name"]
        image.save(os.path.join(OUT, f"{name}.png"))
        entry = dict(case, timesteps=timesteps, image=f"{name}.png", latents=f"{name}.latents.f32")
        entry["latents_shape"] = write_f32(os.path.join(OUT, entry["latents"]), final[0])
        entries.append(entry)
        a = np.asarray(image).astype(np.float32)
        print(f"{name:22s} timesteps {timesteps} mean {a.mean():6.1f} std {a.std():5.1f}")
    settings = dict(
        generator="diffusers StableDiffusionXLPipeline (torch CPU generator, float32, CPU)",
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        guidance_scale=0.0,
        seed=SEED,
        cases=entries,
    )
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(settings, f, indent=1)


if __name__ == "__main__":
    main()
