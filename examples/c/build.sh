#!/usr/bin/env bash
# Builds libldm (the C API) and examples/c/ldm_example.c against include/ldm.h with `cc`, runs it
# on the shipped model, and checks that its PNG is the very file the `ldm` CLI writes for the
# same settings; then links the static library, and runs examples/python/ldm_ctypes.py on the
# shared one. What CI runs; needs a Vulkan driver (lavapipe will do).
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
lib="$target/debug"

cargo build --locked -p ldm-capi 2>&1 | tail -n 1
cargo build --locked -p ldm-wgpu --bin ldm 2>&1 | tail -n 1
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude examples/c/ldm_example.c \
    -L"$lib" -lldm -Wl,-rpath,"$lib" -lpthread -o "$out/ldm_example"
# The same program against the static library (what an app bundling libldm.a links).
cc -std=c11 -Wall -Wextra -Werror -Iinclude examples/c/ldm_example.c \
    "$lib/libldm.a" -lpthread -ldl -lm -o "$out/ldm_example_static"

model=weights/tiny-shapes
"$out/ldm_example" "$model" "$out/c.png"
"$lib/ldm" generate -m "$model" -p "a blue circle on a yellow background" --seed 42 -s 10 \
    -o "$out/cli.png" -q --no-pipeline-cache >/dev/null
cmp "$out/c.png" "$out/cli.png"
echo "the C API's PNG equals the CLI's, byte for byte ($(wc -c <"$out/c.png") bytes)"
"$out/ldm_example_static" --version
# Python through ctypes (no build step) on the shared library: the same file again.
if command -v python3 >/dev/null; then
    python3 examples/python/ldm_ctypes.py --lib "$lib/libldm.so" --model "$model" \
        -o "$out/python.png" >/dev/null
    cmp "$out/python.png" "$out/cli.png"
    echo "the Python (ctypes) example's PNG equals it too"
fi
