#!/usr/bin/env python3
"""ldm-wgpu from Python through its C API with ctypes (no build step, no extension module).

    cargo build --release -p ldm-capi
    python3 examples/python/ldm_ctypes.py [--lib target/release/libldm.so] [--model DIR] [-o out.png]

Generates an image with a progress callback, writes the PNG (with its A1111 `parameters` text),
then shows that a cancel from another thread stops a generation within a step. The structs below
mirror include/ldm.h (ABI version 3).
"""

import argparse
import ctypes as C
import os
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

LDM_OK, LDM_PENDING, LDM_ERR_CANCELLED = 0, 1, -3
ABI_VERSION = 3


class Image(C.Structure):
    _fields_ = [("width", C.c_uint32), ("height", C.c_uint32), ("rgb", C.POINTER(C.c_uint8))]


class Progress(C.Structure):
    _fields_ = [
        ("step", C.c_uint32),
        ("total", C.c_uint32),
        ("elapsed_seconds", C.c_double),
        ("preview", Image),
    ]


PROGRESS_FN = C.CFUNCTYPE(C.c_int32, C.POINTER(Progress), C.c_void_p)


class Request(C.Structure):
    _fields_ = [
        ("prompt", C.c_char_p),
        ("negative_prompt", C.c_char_p),
        ("prompt_2", C.c_char_p),
        ("negative_prompt_2", C.c_char_p),
        ("width", C.c_uint32),
        ("height", C.c_uint32),
        ("steps", C.c_uint32),
        ("guidance", C.c_double),
        ("sampler", C.c_char_p),
        ("seed", C.c_uint64),
        ("seed_per_image", C.c_int32),
        ("batch", C.c_uint32),
        ("init_image", C.POINTER(Image)),
        ("strength", C.c_double),
        ("mask", C.POINTER(Image)),
        ("embeddings_dir", C.c_char_p),
        ("loras", C.c_void_p),
        ("lora_count", C.c_uint32),
        ("lora_dir", C.c_char_p),
        ("progress", PROGRESS_FN),
        ("user_data", C.c_void_p),
        ("preview", C.c_int32),
    ]


class EngineOptions(C.Structure):
    _fields_ = [
        ("adapter", C.c_char_p),
        ("pipeline_cache_dir", C.c_char_p),
        ("memory_budget", C.c_uint64),
        ("use_env", C.c_int32),
    ]


class Memory(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in ("live_bytes", "pooled_bytes", "peak_bytes", "budget_bytes")]


class LdmError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(f"ldm status {status}: {message}")
        self.status = status


class Ldm:
    """The library with its functions' signatures declared (handles are opaque void pointers)."""

    def __init__(self, path):
        lib = C.CDLL(path)
        P = C.c_void_p
        sigs = {
            "ldm_version": ([], C.c_char_p),
            "ldm_abi_version": ([], C.c_uint32),
            "ldm_last_error": ([], C.c_char_p),
            "ldm_engine_options_default": ([C.POINTER(EngineOptions)], C.c_int),
            "ldm_engine_new": ([C.POINTER(EngineOptions), C.POINTER(P)], C.c_int),
            "ldm_engine_adapter": ([P, C.POINTER(C.c_char_p)], C.c_int),
            "ldm_engine_free": ([P], C.c_int),
            "ldm_model_load": ([P, C.c_char_p, P, C.POINTER(P)], C.c_int),
            "ldm_model_memory": ([P, C.POINTER(Memory)], C.c_int),
            "ldm_model_free": ([P], C.c_int),
            "ldm_request_default": ([C.POINTER(Request)], C.c_int),
            "ldm_generate": ([P, C.POINTER(Request), C.POINTER(P)], C.c_int),
            "ldm_generate_async": ([P, C.POINTER(Request), C.POINTER(P)], C.c_int),
            "ldm_cancel": ([P], C.c_int),
            "ldm_job_wait": ([P, C.POINTER(P)], C.c_int),
            "ldm_job_free": ([P], C.c_int),
            "ldm_result_image": ([P, C.c_uint32, C.POINTER(Image)], C.c_int),
            "ldm_result_save_png": ([P, C.c_uint32, C.c_char_p], C.c_int),
            "ldm_result_free": ([P], C.c_int),
        }
        for name, (args, res) in sigs.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, res
        self.lib = lib
        if lib.ldm_abi_version() != ABI_VERSION:
            raise RuntimeError(f"libldm ABI {lib.ldm_abi_version()}, this script knows {ABI_VERSION}")

    def check(self, status, ok=(LDM_OK,)):
        if status not in ok:
            raise LdmError(status, self.lib.ldm_last_error().decode())
        return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.path.join(ROOT, "target", "release", "libldm.so"))
    ap.add_argument("--model", default=os.path.join(ROOT, "weights", "tiny-shapes"))
    ap.add_argument("-p", "--prompt", default="a blue circle on a yellow background")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("-o", "--output", default="ldm-python.png")
    a = ap.parse_args()

    ldm = Ldm(a.lib)
    lib = ldm.lib
    print("libldm", lib.ldm_version().decode())
    opts = EngineOptions()
    ldm.check(lib.ldm_engine_options_default(C.byref(opts)))
    opts.use_env = 1
    engine = C.c_void_p()
    ldm.check(lib.ldm_engine_new(C.byref(opts), C.byref(engine)))
    name = C.c_char_p()
    ldm.check(lib.ldm_engine_adapter(engine, C.byref(name)))
    print("adapter:", name.value.decode())
    model = C.c_void_p()
    ldm.check(lib.ldm_model_load(engine, a.model.encode(), None, C.byref(model)))

    # Keep the callback object alive as long as the library may call it.
    @PROGRESS_FN
    def on_progress(p, _user):
        print(f"  step {p.contents.step}/{p.contents.total}")
        return 1

    req = Request()
    ldm.check(lib.ldm_request_default(C.byref(req)))
    prompt = a.prompt.encode()
    req.prompt, req.seed, req.steps, req.progress = prompt, a.seed, 10, on_progress
    result = C.c_void_p()
    ldm.check(lib.ldm_generate(model, C.byref(req), C.byref(result)))
    img = Image()
    ldm.check(lib.ldm_result_image(result, 0, C.byref(img)))
    pixels = bytes(C.cast(img.rgb, C.POINTER(C.c_uint8 * (img.width * img.height * 3))).contents)
    ldm.check(lib.ldm_result_save_png(result, 0, a.output.encode()))
    print(f"{img.width}x{img.height}, {len(pixels)} bytes of RGB -> {a.output}")
    ldm.check(lib.ldm_result_free(result))

    # Cancel from another thread: the job ends with LDM_ERR_CANCELLED within a step.
    started = threading.Event()

    @PROGRESS_FN
    def mark(p, _user):
        started.set()
        return 1

    req.progress, req.steps = mark, 50
    job = C.c_void_p()
    ldm.check(lib.ldm_generate_async(model, C.byref(req), C.byref(job)))
    canceller = threading.Thread(target=lambda: (started.wait(), lib.ldm_cancel(job)))
    canceller.start()
    status = lib.ldm_job_wait(job, None)
    canceller.join()
    print("cancelled:", status == LDM_ERR_CANCELLED, "-", lib.ldm_last_error().decode())
    ldm.check(lib.ldm_job_free(job))

    mem = Memory()
    ldm.check(lib.ldm_model_memory(model, C.byref(mem)))
    print(f"model holds {mem.live_bytes} bytes live, {mem.pooled_bytes} pooled")
    ldm.check(lib.ldm_model_free(model))
    ldm.check(lib.ldm_engine_free(engine))


if __name__ == "__main__":
    main()
