#!/usr/bin/env bash
# What a lent-GPU session runs on the device machine, after `bash tools/device_prep.sh` here.
# One `run` call per step, each with carry [".gl", ".whl", ".bench"] and timeout_s 600:
#
#   bash tools/device_call.sh tests   # the test binaries on real Vulkan: tensor-core paths (the
#                                     # default on GPUs) and, again, the FMA paths; ldm info
#   bash tools/device_call.sh sd15    # kernel bench (f16), diffusers vs ldm end to end, SD 1.5 512²
#   bash tools/device_call.sh sd21    # kernel bench (f32), diffusers vs ldm end to end, SD 2.1 768²
#
# Everything it prints is also written under $OUT (gpu.txt, tests.txt, kernels_*.txt,
# diffusers_*.jsonl/.txt, pipeline_*.txt); benches/RESULTS.md says how to fill its tables.
set -uo pipefail
step=${1:?usage: device_call.sh tests|sd15|sd21}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# Setup (a fresh machine is bare): Vulkan loader, NVIDIA ICD, diffusers, our binaries.
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && export VK_DRIVER_FILES=$icd
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
bins=/tmp/bins
mkdir -p $bins
python3 -c "import lzma, tarfile; tarfile.open(fileobj=lzma.open('.bench/bins.tar.xz')).extractall('$bins')"
chmod +x $bins/*
# The test binaries find their fixtures through the path they were built in.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }

case $step in
tests)
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
        | tee "$out/gpu.txt"
    $bins/ldm info 2>&1 | tee -a "$out/gpu.txt"
    {
        for t in $bins/test_*; do
            echo "== $(basename "$t") (default paths: tensor cores where offered)"
            timeout -k 5 90 "$t" 2>&1 | grep -E "^test |test result|panicked|rel|ran" | tail -n 40
        done
        for t in kernels_matmul kernels_conv2d kernels_attention models pipeline; do
            echo "== test_$t with LDM_COOP_MATMUL=0 (FMA kernels)"
            LDM_COOP_MATMUL=0 timeout -k 5 90 $bins/test_$t 2>&1 | grep -E "test result|panicked"
        done
    } 2>&1 | tee "$out/tests.txt"
    ;;
sd15 | sd21)
    if [ "$step" = sd15 ]; then dtype=f16; else dtype=f32; fi
    python3 tools/make_random_sd.py --arch "$step" --dtype fp16 --out /tmp/$step || exit 1
    timeout -k 5 200 python3 tools/bench_diffusers.py /tmp/$step --json "$out/diffusers_$step.jsonl" \
        2>&1 | tee "$out/diffusers_$step.txt"
    LDM_BENCH_DTYPE=$dtype timeout -k 5 100 $bins/bench_kernels --bench 2>&1 \
        | tee "$out/kernels_$dtype.txt"
    for run in "dpmpp_2m 25" "pndm 50"; do
        set -- $run
        timeout -k 5 120 $bins/bench_pipeline --bench --model /tmp/$step --sampler "$1" --steps "$2" \
            2>&1 | tee -a "$out/pipeline_$step.txt"
    done
    ;;
*)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
