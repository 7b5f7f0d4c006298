"""Writes tests/fixtures/rng_cases.json: torch.randn bit patterns for tests/rng.rs.

Ground truth is real torch (torch.Generator('cpu').manual_seed(seed), float32), run in a child
process per math variant (ATEN_CPU_CAPABILITY=avx2 / default). The pure-python port in
/work/shared/reference/torch_cpu_randn.py is checked against torch on the small cases, and
A1111's rng_philox.py (re-typed below, numpy float64 math) gives the Philox cases.

Usage: HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_rng_fixtures.py
"""
import json, os, subprocess, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "rng_cases.json")
SEEDS = [0, 1, 42, 2**32 + 5, 123456789]
SIZES = [1, 15, 16, 17, 100, 16384]  # 16384 = 1x4x64x64 latents
SUCCESSIVE = [[5, 16384, 3, 17, 1, 1], [1, 1, 16, 15, 100]]
PREFIX = 64


def summarize(t):
    bits = np.ascontiguousarray(t, dtype=np.float32).ravel().view(np.uint32)
    return {"n": int(bits.size), "prefix_bits": [int(b) for b in bits[:PREFIX]],
            "bits_sum": int(bits.astype(np.uint64).sum())}


def child(variant):
    """Runs inside a process started with ATEN_CPU_CAPABILITY set; prints JSON."""
    import torch
    cap = torch.backends.cpu.get_cpu_capability()
    want = "DEFAULT" if variant == "scalar" else ("AVX2", "AVX512")
    assert (cap == want) if variant == "scalar" else (cap in want), (variant, cap)
    cases = []
    for seed in SEEDS:
        for calls in [[n] for n in SIZES] + SUCCESSIVE:
            g = torch.Generator("cpu").manual_seed(seed)
            outs = [summarize(torch.randn((n,), generator=g).numpy()) for n in calls]
            cases.append({"seed": seed, "variant": variant, "calls": calls, "outputs": outs})
    # The pipeline's latent shape, to be sure a 4-D shape draws like a flat one.
    g = torch.Generator("cpu").manual_seed(42)
    flat = torch.randn((16384,), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(torch.randn((1, 4, 64, 64), generator=g).ravel(), flat)
    json.dump({"torch": torch.__version__, "capability": cap, "cases": cases}, sys.stdout)


# --- A1111 modules/rng_philox.py, same numpy expressions (uint32 * float32 array -> float64) ---
philox_m = [0xD2511F53, 0xCD9E8D57]
philox_w = [0x9E3779B9, 0xBB67AE85]
two_pow32_inv = np.array([2.3283064e-10], dtype=np.float32)
two_pow32_inv_2pi = np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)


def uint32(x):
    return x.view(np.uint32).reshape(-1, 2).transpose(1, 0)


def philox4_round(counter, key):
    v1 = uint32(counter[0].astype(np.uint64) * philox_m[0])
    v2 = uint32(counter[2].astype(np.uint64) * philox_m[1])
    counter[0] = v2[1] ^ counter[1] ^ key[0]
    counter[1] = v2[0]
    counter[2] = v1[1] ^ counter[3] ^ key[1]
    counter[3] = v1[0]


def philox4_32(counter, key, rounds=10):
    for _ in range(rounds - 1):
        philox4_round(counter, key)
        key[0] = key[0] + philox_w[0]
        key[1] = key[1] + philox_w[1]
    philox4_round(counter, key)
    return counter


def box_muller(x, y):
    u = x * two_pow32_inv + two_pow32_inv / 2
    v = y * two_pow32_inv_2pi + two_pow32_inv_2pi / 2
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    def __init__(self, seed):
        self.seed, self.offset = seed, 0

    def randn(self, n):
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.empty(n, dtype=np.uint64)
        key.fill(self.seed)
        key = uint32(key)
        g = philox4_32(counter, key)
        return box_muller(g[0], g[1])


def main():
    py = sys.executable
    data = {}
    for variant, cap in (("avx2", "AVX2"), ("scalar", "default")):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        out = subprocess.run([py, __file__, "--child", variant], env=env, check=True,
                             capture_output=True, text=True).stdout
        data[variant] = json.loads(out)

    # Cross-check the reference port on the cheap cases (it is pure python, slow at 16384).
    sys.path.insert(0, "/work/shared/reference")
    import torch_cpu_randn as ref
    for variant in ("avx2", "scalar"):
        for case in data[variant]["cases"]:
            if len(case["calls"]) == 1 and case["calls"][0] <= 100:
                emu = ref.randn_f32(case["seed"], case["calls"][0], variant)
                assert summarize(emu) == case["outputs"][0], (variant, case["seed"], case["calls"])

    philox = []
    a1111_doc = [-0.92466259, -0.42534415, -2.6438457, 0.14518388]  # rng_philox.py docstring
    assert np.allclose(PhiloxGenerator(0).randn(12)[:4], a1111_doc, rtol=0, atol=1e-6)
    for seed in SEEDS:
        for calls in [[n] for n in SIZES] + SUCCESSIVE[:1]:
            g = PhiloxGenerator(seed)
            philox.append({"seed": seed, "calls": calls,
                           "outputs": [summarize(g.randn(n)) for n in calls]})

    fixture = {
        "about": "torch.randn float32 bit patterns; bits_sum = sum of all u32 bit patterns "
                 "(u64); prefix_bits = first 64. Made by tools/make_rng_fixtures.py",
        "torch": data["avx2"]["torch"],
        "cases": data["avx2"]["cases"] + data["scalar"]["cases"],
        "philox": philox,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
