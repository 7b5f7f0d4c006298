#!/usr/bin/env python3
"""A lavapipe that offers cooperative matrices, for running the tensor-core kernels on a CPU.

Debian 12's Mesa (22.3) has no VK_KHR_cooperative_matrix; Mesa 26's lavapipe has it (8x8x8
f16 x f16 -> f16/f32, subgroup scope), which is enough to execute `shaders/matmul_coop.wgsl`
(its 8x8-fragment variant) on the CI machine. Mesa 26 needs a newer C library than Debian 12's,
so this script unpacks Debian 13's mesa-vulkan-drivers (from trixie-backports) together with
every library it needs, glibc included, into one directory, without installing anything, and
prints the environment that runs a test binary on it: the Vulkan ICD file, and a cargo runner
that starts the binary with that directory's dynamic loader and libraries. It also unpacks that
release's spirv-tools and names its `spirv-val` in LDM_SPIRV_VAL (tests/shaders.rs validates the
SPIR-V naga writes for every kernel with it).

    eval "$(python3 tools/lavapipe_coop.py /tmp/ldm-lavapipe-coop)"
    LDM_COOP_MATMUL=1 cargo test --test kernels_matmul --test shader_checks

Only the Debian archive (a package registry) is contacted. Exit status 3 means "could not fetch
or unpack": callers treat that as "cannot test here", not as a test failure.
"""

import json
import lzma
import os
import subprocess
import sys
import urllib.request

MIRROR = "http://deb.debian.org/debian"
# mesa-vulkan-drivers comes from backports (Mesa >= 25.2 has the extension); the rest from trixie.
SUITES = ["trixie-backports", "trixie"]
ROOTS = ["mesa-vulkan-drivers", "libc6", "libvulkan1", "spirv-tools"]
# Packages that only carry scripts or data the loader never reads.
SKIP = {"libc-bin", "debconf", "tzdata", "gcc-14-base", "libgcc-s1-dbg"}


def fetch(url):
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def packages(suite):
    text = lzma.decompress(fetch(f"{MIRROR}/dists/{suite}/main/binary-amd64/Packages.xz"))
    out = {}
    for block in text.decode().split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if "Package" in fields:
            out[fields["Package"]] = fields
    return out


def closure(indexes):
    """The roots and their Depends/Pre-Depends, first alternative, newest suite first."""
    chosen, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name in chosen or name in SKIP:
            continue
        fields = next((ix[name] for ix in indexes if name in ix), None)
        if fields is None:
            raise RuntimeError(f"{name} is in none of {SUITES}")
        chosen[name] = fields
        for key in ("Depends", "Pre-Depends"):
            for dep in fields.get(key, "").split(","):
                dep = dep.strip()
                if dep:
                    todo.append(dep.split("|")[0].split()[0].split(":")[0])
    return chosen


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ldm-lavapipe-coop")
    libdir = os.path.join(root, "usr/lib/x86_64-linux-gnu")
    icd = os.path.join(root, "usr/share/vulkan/icd.d/lvp_icd.json")
    stamp = os.path.join(root, ".complete")
    if not os.path.exists(stamp):
        chosen = closure([packages(s) for s in SUITES])
        os.makedirs(os.path.join(root, "debs"), exist_ok=True)
        for name, fields in sorted(chosen.items()):
            deb = os.path.join(root, "debs", os.path.basename(fields["Filename"]))
            if not os.path.exists(deb):
                data = fetch(f"{MIRROR}/{fields['Filename']}")
                with open(deb + ".part", "wb") as f:
                    f.write(data)
                os.replace(deb + ".part", deb)
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        mesa = chosen["mesa-vulkan-drivers"]["Version"]
        # The ICD names its library relative to the system's search path: make it absolute.
        with open(icd) as f:
            manifest = json.load(f)
        manifest["ICD"]["library_path"] = os.path.join(libdir, "libvulkan_lvp.so")
        with open(icd, "w") as f:
            json.dump(manifest, f, indent=2)
        with open(stamp, "w") as f:
            f.write(mesa + "\n")
        print(f"# unpacked Mesa {mesa} lavapipe and {len(chosen)} packages into {root}",
              file=sys.stderr)
    loader = os.path.join(libdir, "ld-linux-x86-64.so.2")
    spirv_val = os.path.join(root, "usr/bin/spirv-val")
    print(f"export VK_ICD_FILENAMES={icd}")
    print(f"export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER='{loader} --library-path {libdir}'")
    # The Khronos SPIR-V validator from the same release, for tests/shaders.rs.
    print(f"export LDM_SPIRV_VAL='{loader} --library-path {libdir} {spirv_val}'")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # network, archive layout, missing dpkg-deb: not a test result
        print(f"# lavapipe_coop: cannot prepare ({type(e).__name__}: {e})", file=sys.stderr)
        sys.exit(3)
