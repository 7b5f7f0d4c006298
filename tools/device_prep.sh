#!/usr/bin/env bash
# Prepare everything a lent-GPU session carries to the device machine, here, at no device time.
# Run from the repository root:   bash tools/device_prep.sh
#
# The device machine (see benches/RESULTS.md, "How to run on a lent GPU") has Python, PyTorch and
# the NVIDIA driver, but no Vulkan loader, no diffusers and no Rust toolchain, and a call carries
# at most 64 MiB (tree included). So this builds, here:
#   .gl/     the Vulkan loader and GL libraries as .deb files (unpacked there by dpkg -x)
#   .whl/    the diffusers wheel (pure Python; everything it needs is already there)
#   .bench/  bins.tar.xz: the `ldm` binary (whose `ldm bench` is the kernel and end-to-end
#            benchmark) and the test binaries that matter on a GPU (kernels against their
#            references, the tensor-core paths, model and pipeline parity), stripped, in one xz
#            stream so their shared code compresses once
# and prints what the call will carry. tools/device_call.sh is what runs there.
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p .git/info
for d in /.gl/ /.whl/ /.bench/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done

if [ ! -f .gl/.complete ]; then
    echo "== Vulkan loader debs =="
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    apt-get $o update -qq
    # shellcheck disable=SC2086
    (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    touch .gl/.complete
fi

if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
    echo "== diffusers wheel =="
    py=python3
    [ -x /work/venv/bin/python ] && py=/work/venv/bin/python
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
fi

echo "== release binaries =="
mkdir -p .bench/stage && rm -f .bench/stage/* .bench/bins.tar.xz
tests=(kernels_matmul kernels_conv2d kernels_attention kernels_norm kernels_elementwise
    kernels_sampler_step kernels_tiling runtime shader_checks models pipeline)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
cargo build --release --locked --bin ldm
cp target/release/ldm .bench/stage/
cargo test --release --locked --no-run "${args[@]}" --message-format=json 2>/dev/null \
    | python3 -c 'import json, shutil, sys
for line in sys.stdin:
    j = json.loads(line)
    if j.get("executable") and j.get("profile", {}).get("test"):
        shutil.copy(j["executable"], ".bench/stage/test_" + j["target"]["name"])'
strip .bench/stage/*
tar -C .bench/stage -cf - . | xz -9e -T1 --lzma2=dict=64MiB >.bench/bins.tar.xz
rm -rf .bench/stage
ls -la .gl .whl .bench
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
extra=$(du -cb .gl .whl .bench | tail -1 | cut -f1)
echo "carried: tree $((tree >> 20)) MiB + .gl/.whl/.bench $((extra >> 20)) MiB (limit 64 MiB)"
