"""Writes tests/fixtures/samplers/<sampler>.json: diffusers' schedules and full sampling loops.

For each sampler (built like `X.from_config(pipe.scheduler.config)` from the SD 1.5 scheduler
config) and case, records timesteps, sigmas, init_noise_sigma, the scale_model_input factor per
model call, and the latents after the complete loop of a fake, deterministic "U-Net"
    eps = f(x, t) = 0.1 * x * cos(t / 300) + 0.05 * sin(t / 200)
(x = the scaled model input), run on 1x4x4x4 latents drawn from torch.Generator('cpu').manual_seed(7)
which then also supplies the step noise (as diffusers' pipelines share one generator). Guided cases
run the model on a batch of 2 (the second half using a different f) with guidance scale 7.5.
img2img cases follow StableDiffusionImg2ImgPipeline (get_timesteps, set_begin_index, add_noise)
and record add_noise at the next timestep after every call (inpainting's latent blending).

Usage: HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_sampler_fixtures.py [SAMPLER ...]
"""
import inspect, json, math, os

import numpy as np
import torch
import diffusers
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler,
                       DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler,
                       LMSDiscreteScheduler, PNDMScheduler, TCDScheduler,
                       UniPCMultistepScheduler)
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "tests", "fixtures", "samplers")

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, with the spacing spelled out.
SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None,
}
# The same as published on the hub (no timestep_spacing: each class then uses its own default).
SD15_HUB = {k: v for k, v in SD15.items() if k != "timestep_spacing"}
# stabilityai/stable-diffusion-2-1 style: v-prediction, with trailing spacing for this test.
SD2_V = dict(SD15, prediction_type="v_prediction", timestep_spacing="trailing")
# A zero-terminal-SNR v-prediction model (arXiv 2305.08891; the shipped tiny-shapes is one). Some
# classes honour the rescale (DDIM, DDPM, LCM, TCD exactly; Euler, Euler a, DPM-Solver++ and UniPC
# with alphas_cumprod[-1] = 2**-24, so sigma_max = 4096), the others ignore the key.
SD2_V_ZERO_SNR = dict(SD2_V, rescale_betas_zero_snr=True)

SAMPLERS = {  # name -> (class, config overrides applied on top, as the --sampler flag does)
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde_karras": (DPMSolverMultistepScheduler,
                         {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "unipc_bh1": (UniPCMultistepScheduler, {"solver_type": "bh1"}),
    "unipc_karras": (UniPCMultistepScheduler, {"use_karras_sigmas": True}),
    "deis": (DEISMultistepScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2_karras": (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}),
    "kdpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "kdpm2_a_karras": (KDPM2AncestralDiscreteScheduler, {"use_karras_sigmas": True}),
}
# Multistep solvers: solver order 3 and UniPC's other settings, given in the model's config (as
# a scheduler_config.json would), on top of the sampler's own overrides.
EXTRA_CONFIGS = {
    "unipc": [("sd15_order3", dict(SD15, solver_order=3)),
              ("sd15_disable_corrector", dict(SD15, disable_corrector=[0, 1, 5])),
              ("sd15_no_lower_order_final", dict(SD15, lower_order_final=False,
                                                 final_sigmas_type="sigma_min")),
              ("sd15_order1", dict(SD15, solver_order=1)),
              ("sd2_v_zero_snr", SD2_V_ZERO_SNR)],
    "unipc_bh1": [("sd15_order3", dict(SD15, solver_order=3))],
    "unipc_karras": [("sd15_sigma_min", dict(SD15, final_sigmas_type="sigma_min"))],
    "deis": [("sd15_order3", dict(SD15, solver_order=3)),
             ("sd15_order1", dict(SD15, solver_order=1)),
             ("sd15_karras", dict(SD15, use_karras_sigmas=True))],
}
# Added to every case's config. UniPC bh1's last step to sigma 0 is NaN in diffusers (B(h) = h =
# -inf times the `pred_res = 0` of a first-order step); with a final sigma_min it is finite, so the
# bh1 loops are compared there (our bh1 drops the absent term, as the code's intent is).
BASE_EXTRA = {"unipc_bh1": {"final_sigmas_type": "sigma_min"}}
GUIDANCE = 7.5
SHAPE = (1, 4, 4, 4)


def fake_unet(x, t, cond=False):
    t = float(t)
    if cond:
        return 0.1 * x * math.cos(t / 250) - 0.02 * math.sin(t / 100)
    return 0.1 * x * math.cos(t / 300) + 0.05 * math.sin(t / 200)


def build(cls, overrides, base):
    loaded = PNDMScheduler.from_config(base)  # what the pipeline holds after from_pretrained
    return cls.from_config(loaded.config, **overrides)


def flat(t):
    return [float(v) for v in t.reshape(-1).tolist()]


def run(sched, steps, guided=False, strength=None, eta=None):
    gen = torch.Generator("cpu").manual_seed(7)
    sched.set_timesteps(steps)
    case = {"timesteps": flat(sched.timesteps.to(torch.float64)),
            "init_noise_sigma": float(sched.init_noise_sigma)}
    if hasattr(sched, "sigmas"):
        case["sigmas"] = flat(torch.as_tensor(sched.sigmas).to(torch.float64))
    timesteps = sched.timesteps
    if strength is None:
        latents = torch.randn(SHAPE, generator=gen)
        case["initial_latents"] = flat(latents)
        latents = latents * sched.init_noise_sigma
    else:
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        original = torch.linspace(-1.0, 1.0, 64).reshape(SHAPE)
        noise = torch.randn(SHAPE, generator=gen)
        lt = timesteps[:1]
        one, zero = torch.ones(SHAPE), torch.zeros(SHAPE)
        case["strength"] = strength
        case["truncated_timesteps"] = flat(timesteps.to(torch.float64))
        case["add_noise"] = [float(sched.add_noise(one, zero, lt).reshape(-1)[0]),
                             float(sched.add_noise(zero, one, lt).reshape(-1)[0])]
        latents = sched.add_noise(original, noise, lt)
        case["add_noise_next"] = []
    step_kwargs = {}
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = gen
    if "eta" in inspect.signature(sched.step).parameters:
        # The pipeline passes its eta (default 0.0) to every sampler whose step takes one; TCD's
        # own default of 0.3 is never used by StableDiffusionPipeline.
        step_kwargs["eta"] = 0.0 if eta is None else eta
    scales = []
    for i, t in enumerate(timesteps):
        x_in = torch.cat([latents] * 2) if guided else latents
        x_in = sched.scale_model_input(x_in, t)
        scales.append(float((x_in.reshape(-1)[0] / latents.reshape(-1)[0]).double()))
        if guided:
            uncond, cond = fake_unet(x_in[:1], t), fake_unet(x_in[1:], t, cond=True)
            eps = uncond + GUIDANCE * (cond - uncond)
        else:
            eps = fake_unet(x_in, t)
        latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if strength is not None and i < len(timesteps) - 1:
            nt = timesteps[i + 1:i + 2]
            one, zero = torch.ones(SHAPE), torch.zeros(SHAPE)
            case["add_noise_next"].append([float(sched.add_noise(one, zero, nt).reshape(-1)[0]),
                                           float(sched.add_noise(zero, one, nt).reshape(-1)[0])])
    case["model_input_scales"] = scales
    case["final_latents"] = flat(latents)
    return case


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    acp = build(DDIMScheduler, {}, SD15).alphas_cumprod
    only = sys.argv[1:]  # regenerate only these samplers (default: all)
    for name, (cls, overrides) in SAMPLERS.items():
        if only and name not in only:
            continue
        cases = []
        variants = [("sd15", SD15, s, False, None) for s in (20, 50)]
        eta = {"ddim": 0.5, "tcd": 0.3}.get(name)
        variants.append(("sd15_img2img", SD15, 20, False, 0.6))
        variants.append(("sd2_v_trailing", SD2_V, 20, False, None))
        variants.append(("sd15_hub_config", SD15_HUB, 20, False, None))
        if name != "unipc":  # (UniPC has it among its EXTRA_CONFIGS)
            variants.append(("sd2_v_zero_snr", SD2_V_ZERO_SNR, 20, False, None))
            variants.append(("sd2_v_zero_snr_guided", SD2_V_ZERO_SNR, 20, True, None))
        if name in ("euler_a", "dpmpp_2m", "ddim", "unipc", "deis", "kdpm2", "kdpm2_a"):
            variants.append(("sd15_guided", SD15, 20, True, None))
        if name.startswith(("dpmpp", "unipc", "deis")):
            variants.append(("sd15", SD15, 10, False, None))  # < 15 steps: lower_order_final path
        if name.startswith(("unipc", "deis", "kdpm2")):
            variants.append(("sd15", SD15, 4, False, None))  # few steps, the warm-up throughout
            variants.append(("sd15_img2img", SD15, 10, False, 0.5))
        for label, config in EXTRA_CONFIGS.get(name, []):
            variants += [(label, config, 12, False, None), (label, config, 20, False, None)]
        if name in ("lcm", "tcd"):
            variants.append(("sd15", SD15, 4, False, None))  # what they are for: few steps
        for label, base, steps, guided, strength in variants:
            base = dict(base, **BASE_EXTRA.get(name, {}))
            sched = build(cls, overrides, base)
            case = run(sched, steps, guided, strength)
            case.update(label=label, steps=steps, guidance=GUIDANCE if guided else None,
                        config=base, sampler_overrides=overrides, eta=None)
            cases.append(case)
        if eta is not None:  # DDIM / TCD with eta > 0: fresh noise on every step
            case = run(build(cls, overrides, SD15), 20, eta=eta)
            case.update(label="sd15_eta", steps=20, guidance=None, config=SD15,
                        sampler_overrides=overrides, eta=eta)
            cases.append(case)
        path = os.path.join(OUT_DIR, f"{name}.json")
        fixture = {"sampler": name, "class": cls.__name__, "diffusers": diffusers.__version__,
                   "torch": torch.__version__, "cases": cases}
        if name == "ddim":
            fixture["alphas_cumprod"] = flat(acp.to(torch.float64))
        with open(path, "w") as f:
            json.dump(fixture, f, separators=(",", ":"))
        print("wrote", os.path.normpath(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
