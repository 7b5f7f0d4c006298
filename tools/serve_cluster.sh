#!/usr/bin/env bash
# Scale-out on one machine, the way several machines would do it: two `ldm serve` replicas
# (ports 7861 and 7862) behind nginx with deploy/nginx.conf (port 7860), then concurrent
# txt2img requests through nginx (tools/serve_load.py), and how many each replica served.
#
#   tools/serve_cluster.sh                       # the shipped model, 16 requests from 4 clients
#   MODEL=path/to/model REQUESTS=32 CONCURRENCY=8 STEPS=20 SIZE=512 tools/serve_cluster.sh
#
# Needs nginx (Debian: apt-get install nginx-light; installed here when run as root) and
# python3. On one GPU both replicas share it: this shows the balancing, not a speed-up.
set -euo pipefail
cd "$(dirname "$0")/.."

LDM="${LDM:-target/release/ldm}"
MODEL="${MODEL:-weights/tiny-shapes}"
REQUESTS="${REQUESTS:-16}"
CONCURRENCY="${CONCURRENCY:-4}"
STEPS="${STEPS:-4}"
SIZE="${SIZE:-64}"
PORTS=(7861 7862)

if [ ! -x "$LDM" ]; then
    cargo build --release --locked --bin ldm
fi
if ! command -v nginx >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
    else
        echo "nginx is not installed (apt-get install nginx-light)" >&2
        exit 1
    fi
fi

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Wait until GET $1 answers 200, for at most $2 seconds.
wait_ok() {
    local url="$1" deadline=$((SECONDS + $2))
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" = 200 ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "no 200 from $url after $2 s" >&2
            return 1
        fi
        sleep 0.5
    done
}

for port in "${PORTS[@]}"; do
    "$LDM" serve --host 127.0.0.1 --port "$port" -m "$MODEL" >"$work/replica-$port.log" 2>&1 &
    pids+=("$!")
done
for port in "${PORTS[@]}"; do
    wait_ok "http://127.0.0.1:$port/health" 300 || { tail -n 20 "$work/replica-$port.log"; exit 1; }
    echo "replica on :$port is ready"
done

mkdir -p "$work/nginx"
nginx -c "$PWD/deploy/nginx.conf" -p "$work/nginx" -g 'daemon off;' 2>"$work/nginx.log" &
pids+=("$!")
wait_ok "http://127.0.0.1:7860/health" 30 || { cat "$work/nginx.log"; exit 1; }
echo "nginx on :7860 balances them (deploy/nginx.conf)"

python3 tools/serve_load.py --url http://127.0.0.1:7860 --requests "$REQUESTS" \
    --concurrency "$CONCURRENCY" --steps "$STEPS" --size "$SIZE"

# Each replica's own count of finished txt2img requests (its Prometheus metrics).
for port in "${PORTS[@]}"; do
    served="$(curl -s "http://127.0.0.1:$port/metrics" \
        | awk '/^ldm_http_requests_total\{/ && /txt2img/ && /status="200"/ { n += $NF } END { print n + 0 }')"
    echo "replica :$port served $served txt2img requests"
done
