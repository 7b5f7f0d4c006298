#!/usr/bin/env python3
"""End-to-end Stable Diffusion timings of PyTorch diffusers: the baseline for `cargo bench --bench pipeline`.

Runs diffusers' StableDiffusionPipeline on a pipeline folder (tools/make_random_sd.py, or a real
one) as a user would run it fast on an NVIDIA GPU: float16 weights and activations, PyTorch's
scaled_dot_product_attention (AttnProcessor2_0), no safety checker, no torch.compile. With no CUDA
device it falls back to float32 on the CPU, which is only a check that the script works.

Settings are our benchmark's: batch 1, classifier-free guidance 7.5 (so the U-Net runs on a batch
of 2), the model's native size (512 px for SD 1.x, 768 for SD 2.x-v; --size overrides), prompt
and seed fixed, the same seed for every run. One case per --sampler/--steps pair; the defaults are
dpmpp_2m with 25 steps and pndm with 50.

For each case, after --warmup untimed images:
  * seconds per image, end to end: median of --runs plain `pipe(prompt)` calls, prompt string in,
    8-bit PIL image out (tokenizer, text encoder, latents, the loop, VAE decode, post-processing);
    the device is synchronised before the clock is read.
  * a breakdown from --runs further, instrumented calls (medians): text encode (encode_prompt:
    tokenize + the text encoder on the prompt and the empty negative prompt), the denoising loop
    (from the first U-Net call to the end of the last scheduler step), U-Net it/s = steps / loop
    time (one "it" = one guided step: the U-Net on 2 latents, the guidance mix and the scheduler
    step, as diffusers' progress bar counts), the median single-step time, and VAE decode
    (vae.decode alone). The marks are CUDA events recorded from wrappers, a U-Net forward pre-hook
    and callback_on_step_end, read after the image: no synchronisation inside the loop.
  * peak GPU memory over the case's runs (torch.cuda.max_memory_allocated, and _reserved).
And once per process, cold start: process start (as the kernel recorded it) -> torch and diffusers
imported -> pipeline loaded onto the device -> first image of the first case finished. The page
cache is whatever it is: after make_random_sd.py wrote the model, the files are in memory.

Output: a table on stdout; with --json OUT, JSON Lines: one {"kind": "cold_start"} line, then one
{"kind": "case"} line per case, every time in seconds.

    HF_HUB_OFFLINE=1 python tools/bench_diffusers.py /tmp/sd15 --json out/diffusers_sd15.jsonl
    HF_HUB_OFFLINE=1 python tools/bench_diffusers.py /tmp/tiny --runs 2   # CPU check

Needs torch and diffusers (transformers, safetensors).
"""
import time

T_SCRIPT = time.time()  # before the heavy imports: the start of the cold-start clock if /proc fails

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import warnings

PROMPT = "a photograph of an astronaut riding a horse on mars, highly detailed"


def process_start_time():
    """Wall-clock time at which the kernel started this process (Linux /proc), else T_SCRIPT."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks since boot
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        t = btime + start_ticks / os.sysconf("SC_CLK_TCK")
        # btime is whole seconds: never report a start later than the script's own first line.
        return min(t, T_SCRIPT)
    except (OSError, ValueError, IndexError, StopIteration):
        return T_SCRIPT


def make_scheduler(name, config):
    """The diffusers scheduler our `--sampler NAME` ports (src/sched/mod.rs build_sampler)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)
    table = {
        "ddim": (DDIMScheduler, {}),
        "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    }
    if name not in table:
        sys.exit(f"error: unknown --sampler {name}; choose from {', '.join(table)}")
    cls, overrides = table[name]
    return cls.from_config(config, **overrides)


class Clock:
    """Timestamps on the device's own timeline: CUDA events on a GPU (recorded in stream order, so
    reading them does not stall the pipeline the way a synchronize per step would: diffusers' eager
    U-Net is partly launch-bound, and a sync at every step boundary would cost it the overlap of
    the next step's launches), perf_counter on the CPU. Read them only after a synchronize."""

    def __init__(self, cuda):
        import torch
        self.cuda, self.torch = cuda, torch

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b):
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class Instruments:
    """Marks around encode_prompt and vae.decode, at the first U-Net call and at every step end."""

    def __init__(self, pipe, clock):
        self.pipe, self.clock = pipe, clock
        self.text, self.vae, self.step_ends = [], [], []  # the wrappers below hold these lists
        self.reset()

    def reset(self):
        for log in (self.text, self.vae, self.step_ends):
            log.clear()
        self.unet_first = None
        self.finite = None

    def install(self):
        pipe, clock = self.pipe, self.clock
        encode, decode = pipe.encode_prompt, pipe.vae.decode

        def timed(fn, log):
            def wrapper(*a, **k):
                start = clock.mark()
                out = fn(*a, **k)
                log.append((start, clock.mark()))
                return out
            return wrapper

        pipe.encode_prompt = timed(encode, self.text)      # instance attributes shadow the methods
        pipe.vae.decode = timed(decode, self.vae)

        def unet_pre(module, args):
            if self.unet_first is None:
                self.unet_first = clock.mark()
        self.hook = pipe.unet.register_forward_pre_hook(unet_pre)

    def uninstall(self):
        del self.pipe.encode_prompt
        del self.pipe.vae.decode
        self.hook.remove()

    def on_step_end(self, pipe, i, t, kwargs):
        self.step_ends.append(self.clock.mark())
        if i == pipe.num_timesteps - 1:  # a device tensor: read in summary(), no sync here
            import torch
            self.finite = torch.isfinite(kwargs["latents"]).all()
        return {}

    def summary(self):
        """Call after the image is finished and the device synchronised."""
        sec = self.clock.seconds
        edges = [self.unet_first] + self.step_ends
        steps = [sec(a, b) for a, b in zip(edges, edges[1:])]
        loop = sum(steps)
        return {
            "text_encode_s": sum(sec(a, b) for a, b in self.text),
            "loop_s": loop,
            "step_s": statistics.median(steps),
            "unet_it_s": len(steps) / loop,
            "vae_decode_s": sum(sec(a, b) for a, b in self.vae),
            "steps_seen": len(steps),
            "finite": bool(self.finite),
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="diffusers pipeline folder (e.g. from tools/make_random_sd.py)")
    ap.add_argument("--sampler", default="dpmpp_2m,pndm", help="comma-separated (default dpmpp_2m,pndm)")
    ap.add_argument("--steps", default="25,50", help="comma-separated, one per sampler (default 25,50)")
    ap.add_argument("--runs", type=int, default=5, help="timed images per case, and as many instrumented")
    ap.add_argument("--warmup", type=int, default=2, help="untimed images per case before timing")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: the model's)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default=None,
                    help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--json", default=None, help="write JSON Lines here")
    args = ap.parse_args()

    samplers = args.sampler.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) == 1:
        steps *= len(samplers)
    if len(steps) != len(samplers):
        sys.exit("error: give one --steps value per --sampler (or a single one for all)")

    t_process = process_start_time()
    import torch
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")  # diffusers >= 0.36
    t_imported = time.time()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype_name = args.dtype or ("fp16" if cuda else "fp32")
    dtype = torch.float16 if dtype_name == "fp16" else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, torch_dtype=dtype, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe = pipe.to(device)
    # PyTorch SDPA everywhere (diffusers' default on torch 2; said explicitly so it can't drift).
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    base_scheduler_config = dict(pipe.scheduler.config)
    sync()
    t_ready = time.time()

    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    meta_path = os.path.join(args.model, "random_sd.json")
    arch = json.load(open(meta_path))["arch"] if os.path.isfile(meta_path) else os.path.basename(
        os.path.normpath(args.model))
    common = {
        "model": os.path.abspath(args.model), "arch": arch, "size": size, "batch": 1,
        "guidance": args.guidance, "seed": args.seed, "dtype": dtype_name, "attention": "sdpa",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }

    def image(sampler_steps, callback=None):
        out = pipe(args.prompt, negative_prompt="", height=size, width=size,
                   num_inference_steps=sampler_steps, guidance_scale=args.guidance,
                   generator=torch.Generator("cpu").manual_seed(args.seed), output_type="pil",
                   callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents"] if callback else None)
        sync()
        return out.images[0]

    records = []
    instruments = Instruments(pipe, Clock(cuda))
    for n, (sampler, n_steps) in enumerate(zip(samplers, steps)):
        pipe.scheduler = make_scheduler(sampler, base_scheduler_config)
        if n == 0:  # the cold-start image
            image(n_steps)
            t_first = time.time()
            cold = dict(common, kind="cold_start", sampler=sampler, steps=n_steps,
                        import_s=t_imported - t_process, load_s=t_ready - t_imported,
                        first_image_s=t_first - t_ready, total_s=t_first - t_process)
            records.append(cold)
            print(f"cold start: {cold['total_s']:.2f} s = import {cold['import_s']:.2f} + load "
                  f"{cold['load_s']:.2f} + first image {cold['first_image_s']:.2f} "
                  f"({sampler}, {n_steps} steps)", flush=True)
        for _ in range(args.warmup):
            image(n_steps)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        e2e = []
        for _ in range(args.runs):
            t = time.perf_counter()
            image(n_steps)
            e2e.append(time.perf_counter() - t)
        parts, e2e_instrumented = [], []
        instruments.install()
        try:
            for _ in range(args.runs):
                instruments.reset()
                t = time.perf_counter()
                image(n_steps, instruments.on_step_end)
                e2e_instrumented.append(time.perf_counter() - t)
                parts.append(instruments.summary())
        finally:
            instruments.uninstall()
        med = {k: statistics.median(p[k] for p in parts)
               for k in ("text_encode_s", "loop_s", "step_s", "unet_it_s", "vae_decode_s")}
        rec = dict(common, kind="case", sampler=sampler, steps=n_steps,
                   scheduler=type(pipe.scheduler).__name__,
                   prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
                   runs=args.runs, warmup=args.warmup,
                   s_per_image=statistics.median(e2e), s_per_image_min=min(e2e),
                   s_per_image_all=e2e, s_per_image_instrumented=statistics.median(e2e_instrumented),
                   **med,
                   finite=all(p["finite"] for p in parts),
                   peak_mem_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                   peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        records.append(rec)
        print(f"{sampler} {n_steps} steps: {rec['s_per_image']:.3f} s/image, "
              f"{rec['unet_it_s']:.2f} it/s", flush=True)

    print()
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {common['device']}, "
          f"{dtype_name}, SDPA; {arch} {size}x{size}, batch 1, CFG {args.guidance}")
    head = (f"{'sampler':<16}{'steps':>6}{'s/image':>9}{'min':>8}{'U-Net it/s':>11}{'step ms':>9}"
            f"{'text ms':>9}{'VAE ms':>9}{'peak MiB':>10}  finite")
    print(head)
    print("-" * len(head))
    for r in records:
        if r["kind"] != "case":
            continue
        peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
        print(f"{r['sampler']:<16}{r['steps']:>6}{r['s_per_image']:>9.3f}{r['s_per_image_min']:>8.3f}"
              f"{r['unet_it_s']:>11.2f}{r['step_s'] * 1e3:>9.1f}{r['text_encode_s'] * 1e3:>9.1f}"
              f"{r['vae_decode_s'] * 1e3:>9.1f}{peak:>10}  {r['finite']}")
    c = records[0]
    print(f"cold start {c['total_s']:.2f} s (import {c['import_s']:.2f}, load {c['load_s']:.2f}, "
          f"first image {c['first_image_s']:.2f})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
