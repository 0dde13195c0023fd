#!/usr/bin/env bash
# How many simulated workers one machine holds: `xpyd-agent up --device sim`
# with DECODE decode and PREFILL prefill workers in one process, its startup
# time, resident memory and threads, then REQUESTS concurrent chat requests
# whose prompts (~290 tokens) are over the remote-prefill threshold, so each
# goes through a prefill worker and a NIXL write (docs/benchmarks.md).
#
#   e2e/bench/sim_scale.sh [DECODE [PREFILL]]     default: 32 16
#
# Env: REQUESTS (8), MAX_TOKENS (16), AGENT (target/debug/xpyd-agent, or
# $CARGO_TARGET_DIR/debug/xpyd-agent), SIM_PROFILE (passed as --sim-profile).
# Needs curl and bc. Prints figures only; asserts nothing.
set -euo pipefail

DECODE=${1:-32}
PREFILL=${2:-16}
REQUESTS=${REQUESTS:-8}
MAX_TOKENS=${MAX_TOKENS:-16}
AGENT=${AGENT:-${CARGO_TARGET_DIR:-target}/debug/xpyd-agent}
scratch=$(mktemp -d)
profile_args=()
[[ -n "${SIM_PROFILE:-}" ]] && profile_args=(--sim-profile "$SIM_PROFILE")

start=$(date +%s.%N)
"$AGENT" up --device sim --decode "$DECODE" --prefill "$PREFILL" --num-blocks 1024 \
    --addr 127.0.0.1:0 "${profile_args[@]}" >"$scratch/out" 2>"$scratch/err" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
deadline=$((SECONDS + 600))
until grep -q "http://" "$scratch/out" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "xpyd-agent exited; log: $scratch/err"; exit 1; }
    ((SECONDS < deadline)) || { echo "not serving within 600 s; log: $scratch/err"; exit 1; }
    sleep 0.2
done
ready=$(date +%s.%N)
url=$(grep -o "http://[0-9.:]*" "$scratch/out" | head -1)
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "workers: $DECODE decode + $PREFILL prefill; serving after $(echo "$ready - $start" | bc) s"
echo "rss: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status); threads: $(ls /proc/$pid/task | wc -l)"

system=$(printf 'You are a helpful assistant. %.0s' $(seq 40))
pids=()
t0=$(date +%s.%N)
for i in $(seq "$REQUESTS"); do
    curl -s -o /dev/null -w "request $i: HTTP %{http_code} in %{time_total} s\n" --max-time 300 \
        "$url/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "{\"model\":\"SmolLM2-135M-Instruct\",\"max_tokens\":$MAX_TOKENS,\"messages\":[{\"role\":\"system\",\"content\":\"$system $i\"},{\"role\":\"user\",\"content\":\"hi $i\"}]}" &
    pids+=($!)
done
wait "${pids[@]}"
t1=$(date +%s.%N)
echo "$REQUESTS concurrent requests: all done in $(echo "$t1 - $t0" | bc) s"
echo "rss after: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
metrics=$(curl -s "$url/metrics")
echo "remote prefills: $(grep -E '^xpyd_decode_prefills_total.*remote' <<<"$metrics" | awk '{s+=$2} END {print s}')"
echo "xpyd_engine_info{device=\"sim\"} series: $(grep -c '^xpyd_engine_info{.*device="sim"' <<<"$metrics")"
kill -TERM $pid
wait $pid || true
trap - EXIT
rm -rf "$scratch"
