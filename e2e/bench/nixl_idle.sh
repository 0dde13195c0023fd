#!/usr/bin/env bash
# Idle CPU of `xpyd-agent up --prefill 1 --decode 1` (two NIXL agents in one
# process) with NIXL's UCX progress thread waiting DELAY microseconds for
# events (0: it spins), then three chats whose prompts are prefilled
# remotely, timed (docs/benchmarks.md, "NIXL's progress thread").
#
#   e2e/bench/nixl_idle.sh [DELAY ...]        default: 0 1000
#
# Env: AGENT (target/debug/xpyd-agent, or $CARGO_TARGET_DIR/debug/xpyd-agent).
# Needs curl and bc. Prints figures only; asserts nothing.
set -euo pipefail
AGENT=${AGENT:-${CARGO_TARGET_DIR:-target}/debug/xpyd-agent}
scratch=$(mktemp -d)
[[ $# -gt 0 ]] || set -- 0 1000
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for delay in "$@"; do
    XPYD_NIXL_PROGRESS_DELAY_US=$delay "$AGENT" up --prefill 1 --decode 1 --addr 127.0.0.1:0 \
        --max-local-prefill-length 32 >"$scratch/out$delay" 2>"$scratch/err$delay" &
    pid=$!
    deadline=$((SECONDS + 300))
    until grep -q "http://" "$scratch/out$delay" 2>/dev/null; do
        kill -0 $pid 2>/dev/null || { echo "xpyd-agent exited; log: $scratch/err$delay"; exit 1; }
        ((SECONDS < deadline)) || { echo "not serving within 300 s"; kill $pid; exit 1; }
        sleep 0.5
    done
    url=$(grep -o "http://[0-9.:]*" "$scratch/out$delay" | head -1)
    sleep 5
    cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
    a=$(cpu); sleep 20; b=$(cpu)
    echo "delay ${delay} us: idle CPU $(echo "scale=1; 100 * ($b - $a) / $(getconf CLK_TCK) / 20" | bc) % of a core"
    for run in 1 2 3; do
        start=$(date +%s.%N)
        curl -sf --max-time 120 "$url/v1/chat/completions" -H 'content-type: application/json' \
            -d "{\"model\":\"SmolLM2-135M-Instruct\",\"max_tokens\":8,\"temperature\":0,\"messages\":[
                {\"role\":\"system\",\"content\":\"Run $run, delay $delay. You are a careful geography tutor. You answer questions about capitals, rivers and mountains of the countries of Europe, briefly and correctly, in one sentence.\"},
                {\"role\":\"user\",\"content\":\"Name the capital of France.\"}]}" >/dev/null
        echo "  chat $run: $(echo "$(date +%s.%N) - $start" | bc) s"
    done
    echo "  $(curl -s "$url/metrics" | grep -E '^xpyd_decode_prefills_total\{location="remote",worker="up-decode' | head -1)"
    kill -TERM $pid
    wait $pid 2>/dev/null || true
done
