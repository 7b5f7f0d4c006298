#!/usr/bin/env bash
# What a lent-GPU session runs on the device machine, after `bash tools/device_prep.sh` here.
# One `run` call per step, each with carry [".gl", ".whl", ".bench"] and timeout_s 600:
#
#   bash tools/device_call.sh tests   # the test binaries on real Vulkan: tensor-core paths (the
#                                     # default on GPUs) and, again, the FMA paths; ldm info
#   bash tools/device_call.sh sd15    # kernel bench (f16), diffusers vs ldm end to end, SD 1.5 512²
#   bash tools/device_call.sh sd21    # kernel bench (f32), diffusers vs ldm end to end, SD 2.1 768²
#   bash tools/device_call.sh firstlight  # all of a first lease in one call (~6 min): ldm info,
#                                     # tests (tensor cores, then FMA), kernel bench, diffusers vs
#                                     # ldm at SD 1.5 512², profile, memory, cold/warm start
#   DRY_RUN=1 bash tools/device_call.sh firstlight
#                                     # the rehearsal, here on the CPU driver (tests/device_kit.rs
#                                     # runs it in CI so the kit cannot rot): this checkout's
#                                     # debug binaries, the shipped tiny model, tiny sizes, no
#                                     # diffusers and no nvidia-smi
#   PERF_EXTRA="LDM_CONV_TILE=coop" PERF_DIFFUSERS=0 bash tools/device_call.sh perf
#                                     # the short rerun after a change: the touched kernels' tests,
#                                     # kernel bench, ldm (and diffusers) end to end, then ldm
#                                     # again under each PERF_EXTRA setting (PERF_QUICK=1: only
#                                     # the end-to-end part)
#
# Everything it prints is also written under $OUT (gpu.txt, tests.txt, kernels_*.txt,
# diffusers_*.jsonl/.txt, pipeline_*.txt); benches/RESULTS.md says how to fill its tables.
set -uo pipefail
step=${1:?usage: device_call.sh firstlight|perf|tests|sd15|sd21}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Mesa's loader complains on every start without one; a compute engine has no windows.
[ -n "${XDG_RUNTIME_DIR:-}" ] || { mkdir -p -m 700 /tmp/xdg && export XDG_RUNTIME_DIR=/tmp/xdg; }

dry=${DRY_RUN:-0}
# Every step's timeout is sized for the lent GPU's 8-minute budget. The rehearsal runs the same
# steps on the CPU driver, where a loaded machine can take several times as long; it checks that
# each step runs, not how fast, so its limits are 4x (KIT_TIMEOUT_SCALE overrides).
tscale=${KIT_TIMEOUT_SCALE:-1}
[ "$dry" = 1 ] && tscale=${KIT_TIMEOUT_SCALE:-4}
model=/tmp/sd15
bins=/tmp/bins
if [ "$dry" = 1 ]; then
    # This checkout's debug binaries (built by `cargo test`) and the shipped model.
    bins=$(mktemp -d)
    target=${CARGO_TARGET_DIR:-$PWD/target}
    ln -s "$target/debug/ldm" "$bins/ldm"
    for t in kernels_tiling; do
        exe=$(ls -t "$target"/debug/deps/"$t"-* 2>/dev/null | grep -v '\.d$' | head -n 1)
        [ -n "$exe" ] && ln -s "$exe" "$bins/test_$t"
    done
    model=$PWD/weights/tiny-shapes
elif true; then
# Setup (a fresh machine is bare): Vulkan loader, NVIDIA ICD, diffusers, our binaries.
if ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
# The NVIDIA ICD: the first manifest with which the loader finds a Vulkan adapter (without one
# wgpu would fall back to GL, and every number would be about the wrong backend).
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json \
    /usr/share/vulkan/icd.d/nvidia_icd.json; do
    [ -f "$icd" ] && { export VK_DRIVER_FILES=$icd; break; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p $bins
python3 -c "import lzma, tarfile; tarfile.open(fileobj=lzma.open('.bench/bins.tar.xz')).extractall('$bins')"
chmod +x $bins/*
# The test binaries find their fixtures through the path they were built in.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
fi
# `ldm bench` in the rehearsal: the cheapest cases and a 64² image of the tiny model.
if [ "$dry" = 1 ]; then
    kbench=(--quick --reps 1 --filter 8x8.mid.proj_in)
    pbench=(--size 64 --steps 2 --images 1)
else
    kbench=(--reps 10)
    pbench=(--steps 25 --images 3)
fi

case $step in
tests)
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
        | tee "$out/gpu.txt"
    $bins/ldm info 2>&1 | tee -a "$out/gpu.txt"
    {
        for t in $bins/test_*; do
            echo "== $(basename "$t") (default paths: tensor cores where offered)"
            timeout -k 5 $((90 * tscale)) "$t" 2>&1 | grep -E "^test |test result|panicked|rel|ran" | tail -n 40
        done
        for t in kernels_matmul kernels_conv2d kernels_attention models pipeline; do
            echo "== test_$t with LDM_COOP_MATMUL=0 (FMA kernels)"
            LDM_COOP_MATMUL=0 timeout -k 5 $((90 * tscale)) $bins/test_$t 2>&1 | grep -E "test result|panicked"
        done
    } 2>&1 | tee "$out/tests.txt"
    ;;
sd15 | sd21)
    if [ "$step" = sd15 ]; then dtype=f16; else dtype=f32; fi
    python3 tools/make_random_sd.py --arch "$step" --dtype fp16 --out /tmp/$step || exit 1
    timeout -k 5 $((200 * tscale)) python3 tools/bench_diffusers.py /tmp/$step --json "$out/diffusers_$step.jsonl" \
        2>&1 | tee "$out/diffusers_$step.txt"
    timeout -k 5 $((100 * tscale)) $bins/ldm bench --dtype $dtype "${kbench[@]}" 2>&1 \
        | tee "$out/kernels_$dtype.txt"
    for run in "dpmpp_2m 25" "pndm 50"; do
        set -- $run
        timeout -k 5 $((120 * tscale)) $bins/ldm bench --model /tmp/$step --sampler "$1" --steps "$2" \
            2>&1 | tee -a "$out/pipeline_$step.txt"
    done
    ;;
firstlight | perf)
    # One call that fits a lease (issue "first light"): everything in order, each step with its
    # own timeout, at most 8 files under $OUT (the tool brings back no more). `perf` is the short
    # rerun after a change (see the header).
    t_start=$(date +%s)
    stamp() { echo "[$(($(date +%s) - t_start)) s] $*"; }
    elapsed() { echo $(($(date +%s) - t_start)); }
    # The random SD 1.5 folder is made on the CPU cores and in GPU memory by PyTorch while the
    # Vulkan tests run; it is done long before the benchmarks need it.
    # FL_ARCH=tiny FL_INIT=cpu rehearse the whole call on a machine without CUDA (lavapipe).
    if [ "$dry" = 1 ]; then
        (echo "rehearsal: the shipped model $model"; echo "exit 0") >"$out/make_sd15.txt" &
    else
        (python3 tools/make_random_sd.py --arch "${FL_ARCH:-sd15}" --dtype fp16 \
            --init-device "${FL_INIT:-cuda}" --out /tmp/sd15 \
            >"$out/make_sd15.txt" 2>&1; echo "exit $?" >>"$out/make_sd15.txt") &
    fi
    maker=$!
    {
        stamp "gpu"
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total \
            --format=csv || echo "no nvidia-smi"
        timeout -k 5 $((60 * tscale)) $bins/ldm info 2>&1
        if ! timeout -k 5 $((60 * tscale)) $bins/ldm info 2>&1 | grep -q "^chosen:.*Vulkan"; then
            echo "NO VULKAN ADAPTER: VK_DRIVER_FILES=${VK_DRIVER_FILES:-unset}"
            ls -la /usr/local/nvidia/share/vulkan/icd.d /etc/vulkan/icd.d /usr/share/vulkan/icd.d
            ldconfig -p | grep -E "vulkan|GLX_nvidia|nvidia-glcore" | head
            VK_LOADER_DEBUG=error,warn timeout $((30 * tscale)) $bins/ldm info 2>&1 | head -n 40
        fi
    } 2>&1 | tee "$out/gpu.txt"
    if [ "$step" = perf ] && [ "${PERF_QUICK:-0}" = 0 ]; then
        # The suites of the kernels a performance change touches, with every line of output
        # (a failure's message names the case and the error).
        for t in kernels_conv2d kernels_matmul kernels_attention shader_checks models pipeline; do
            stamp "test_$t"
            timeout -k 5 $((75 * tscale)) $bins/test_$t 2>&1 | grep -vE "^test .* ok$|^$|XDG_RUNTIME_DIR"
        done 2>&1 | tee "$out/tests.txt"
        stamp "kernel bench"
        timeout -k 5 $((100 * tscale)) $bins/ldm bench --dtype f16 "${kbench[@]}" 2>&1 \
            | tee "$out/kernels_f16.txt"
    fi
    if [ "$step" = firstlight ]; then
        {
            # Tensor-core paths are the default on this adapter; then the same suites forced to FMA.
            for t in kernels_matmul kernels_conv2d kernels_attention kernels_norm kernels_elementwise \
                kernels_sampler_step kernels_tiling shader_checks runtime models pipeline; do
                [ -x "$bins/test_$t" ] || { stamp "test_$t: not carried"; continue; }
                [ "$(elapsed)" -lt $((150 * tscale)) ] || { stamp "test_$t skipped: out of time"; continue; }
                stamp "test_$t (default paths)"
                timeout -k 5 $((75 * tscale)) $bins/test_$t 2>&1 | grep -E "^test |test result|panicked|rel|error" \
                    | tail -n 60
            done
            for t in kernels_matmul kernels_conv2d kernels_attention models; do
                [ -x "$bins/test_$t" ] || continue
                [ "$(elapsed)" -lt $((190 * tscale)) ] || { stamp "test_$t (FMA) skipped: out of time"; continue; }
                stamp "test_$t with LDM_COOP_MATMUL=0 (FMA kernels)"
                LDM_COOP_MATMUL=0 timeout -k 5 $((60 * tscale)) $bins/test_$t 2>&1 \
                    | grep -E "test result|panicked|FAILED"
            done
        } 2>&1 | tee "$out/tests.txt"
        stamp "kernel bench"
        timeout -k 5 $((100 * tscale)) $bins/ldm bench --dtype f16 "${kbench[@]}" 2>&1 \
            | tee "$out/kernels_f16.txt"
    fi
    stamp "waiting for the model folder"
    wait $maker
    tail -n 5 "$out/make_sd15.txt"
    stamp "diffusers"
    if [ "$dry" = 1 ]; then
        echo "skipped (rehearsal: no diffusers here)" | tee "$out/diffusers_sd15.txt"
    else
    [ "$step" = perf ] && [ "${PERF_DIFFUSERS:-1}" = 0 ] && echo "skipped (PERF_DIFFUSERS=0)" ||
    timeout -k 5 $((120 * tscale)) python3 tools/bench_diffusers.py /tmp/sd15 --sampler dpmpp_2m --steps 25 \
        --runs 3 --warmup 1 --json "$out/diffusers_sd15.jsonl" 2>&1 | tee "$out/diffusers_sd15.txt"
    fi
    # GPU memory as the driver sees it, every 100 ms, while our engine runs (the pool's own peak
    # is printed by the bench). Cold start: an empty driver shader cache of its own.
    # (`ldm bench` points the driver's shader cache at an empty folder of its own for the cold
    # start.)
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 100 \
            >"$out/smi_memory.csv" 2>&1 &
    else
        sleep 100000 &
    fi
    smi=$!
    stamp "ldm"
    {
        timeout -k 5 $((150 * tscale)) $bins/ldm bench --model "$model" --sampler dpmpp_2m "${pbench[@]}"
        stamp "ldm done"
        # perf: the same with other settings, one run each (PERF_EXTRA="VAR=value ...").
        for setting in ${PERF_EXTRA:-}; do
            [ "$step" = perf ] && [ "$(elapsed)" -lt $((330 * tscale)) ] || break
            stamp "ldm with $setting"
            env "$setting" timeout -k 5 $((100 * tscale)) $bins/ldm bench --model "$model" \
                --sampler dpmpp_2m "${pbench[@]}"
        done
        if [ "$step" = firstlight ] && [ "$(elapsed)" -lt $((330 * tscale)) ]; then
            stamp "ldm, FMA kernels only (LDM_COOP_MATMUL=0)"
            LDM_COOP_MATMUL=0 timeout -k 5 $((100 * tscale)) $bins/ldm bench --model "$model" \
                --sampler dpmpp_2m "${pbench[@]}" | grep -E "per image|it/s|total"
        fi
    } 2>&1 | tee "$out/pipeline_sd15.txt"
    kill $smi
    [ -f "$out/smi_memory.csv" ] &&
        sort -t, -k2 -n "$out/smi_memory.csv" | tail -n 1 | sed 's/^/peak nvidia-smi memory.used: /'
    stamp "end"
    ;;
*)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
