#!/usr/bin/env python3
"""Drive a running `ldm serve` with the `webuiapi` package (the A1111 API client many scripts and
bots use), as a manual check that a third-party client works unchanged.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install webuiapi
    target/release/ldm serve &
    /tmp/venv/bin/python tools/webuiapi_check.py --port 7860 [--auth user:pass]
"""

import argparse
import sys

import webuiapi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--auth", help="user:pass for --api-auth servers")
    args = ap.parse_args()

    api = webuiapi.WebUIApi(host=args.host, port=args.port, sampler="DPM++ 2M", steps=args.steps)
    if args.auth:
        user, password = args.auth.split(":", 1)
        api.set_auth(user, password)

    samplers = [s["name"] for s in api.get_samplers()]
    print("samplers:", ", ".join(samplers))
    print("models:", [m["title"] for m in api.get_sd_models()])

    result = api.txt2img(
        prompt="a red circle on a white background",
        negative_prompt="blue",
        seed=7,
        width=args.size,
        height=args.size,
        cfg_scale=7,
        scheduler="Karras",
    )
    image = result.image
    print("txt2img:", image.size, "seed", result.info["seed"], "|", result.info["infotexts"][0])
    assert image.size == (args.size, args.size)

    mask = image.copy().convert("L").point(lambda _: 255)
    result = api.img2img(
        images=[image], mask_image=mask, prompt="a blue square", denoising_strength=0.6,
        width=args.size, height=args.size, seed=8,
    )
    print("img2img:", result.image.size, "|", result.info["infotexts"][0])

    print("progress:", api.get_progress()["progress"])
    print("options:", api.get_options()["sd_model_checkpoint"])
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
