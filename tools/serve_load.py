#!/usr/bin/env python3
"""A small, bounded load test of an `ldm serve` (or any A1111-API) server: N txt2img requests
from C concurrent clients, each checked (HTTP 200, every image a PNG), then requests/s and the
p50/p95 latency. Standard library only; loopback or any URL you give.

    python3 tools/serve_load.py --url http://127.0.0.1:7860 --requests 16 --concurrency 4
"""

import argparse
import base64
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_request(url, body, timeout, auth):
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url + "/sdapi/v1/txt2img", data=data, headers={"Content-Type": "application/json"}
    )
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return time.perf_counter() - start, None, str(e)
    elapsed = time.perf_counter() - start
    if status != 200:
        return elapsed, status, payload[:200].decode(errors="replace")
    images = json.loads(payload).get("images", [])
    bad = [i for i, b in enumerate(images) if not base64.b64decode(b).startswith(PNG_SIGNATURE)]
    if not images or bad:
        return elapsed, status, f"{len(images)} images, not PNG: {bad}"
    return elapsed, status, None


def percentile(values, q):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--auth", help="user:pass for --api-auth servers")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        sys.exit("--requests and --concurrency must be at least 1")

    prompts = ["a red circle on a white background", "a small blue square on a yellow background"]
    bodies = [
        {
            "prompt": prompts[i % len(prompts)],
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
            "seed": 1000 + i,
        }
        for i in range(args.requests)
    ]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(
            pool.map(lambda b: one_request(args.url, b, args.timeout, args.auth), bodies)
        )
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results if r[2] is None]
    failures = [(r[1], r[2]) for r in results if r[2] is not None]
    summary = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "ok": len(latencies),
        "failed": len(failures),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3) if wall > 0 else None,
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(percentile(latencies, 95), 3) if latencies else None,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['ok']}/{args.requests} ok, {args.concurrency} clients, "
            f"{args.size}x{args.size}, {args.steps} steps: {summary['requests_per_s']} requests/s, "
            f"p50 {summary['p50_s']} s, p95 {summary['p95_s']} s (wall {summary['wall_s']} s)"
        )
    for status, why in failures[:5]:
        print(f"failed: HTTP {status}: {why}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
