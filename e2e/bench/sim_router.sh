#!/usr/bin/env bash
# The router and the bus at scale, with SIMULATED engines: `xpyd-agent up
# --device sim` on a real NATS server (JetStream), small (1P1D) and large
# (32 decode + 16 prefill) in the same run, each loaded by `xpyd-bench` with
# the same requests. The engines use a zero-time profile (every step takes
# 0 ms), so a request's end-to-end time at the client is xpyd's own cost:
# frontend (HTTP, template, tokenizer), router, bus, the workers'
# scheduling and the remote-prefill handoff (a NIXL write of the sim's tiny
# KV). Prints, per size: the router's select p50/p99 (from its own
# `xpyd_router_select_seconds` histogram, interpolated as Prometheus'
# histogram_quantile does), the client's TTFT and end-to-end latency, and
# the large/small ratios (docs/benchmarks.md). The small deployment runs
# again after the large one, so a change in the machine's load shows.
#
#   e2e/bench/sim_router.sh [DECODE [PREFILL]]     default: 32 16
#
# Env: NUM_PROMPTS (400), CONCURRENCY (16), INPUT_LEN (512; over the
# 256-token threshold, so every prompt is prefilled remotely), OUTPUT_LEN
# (16), SMALL ("1 1": decode and prefill of the small deployment), OUT
# (results folder; default a fresh /tmp folder), CARGO_TARGET_DIR. Uses
# the dev builds of xpyd-agent and xpyd-bench (builds them) and
# $XPYD_NATS_BIN (scripts/setup). Prints figures only; asserts nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
DECODE=${1:-32}
PREFILL=${2:-16}
NUM_PROMPTS=${NUM_PROMPTS:-400}
CONCURRENCY=${CONCURRENCY:-16}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-16}
read -r SMALL_DECODE SMALL_PREFILL <<<"${SMALL:-1 1}"
NATS_BIN=${XPYD_NATS_BIN:-nats-server}
OUT="${OUT:-$(mktemp -d /tmp/xpyd-sim-router.XXXXXX)}"
mkdir -p "$OUT"
AGENT="$CARGO_TARGET_DIR/debug/xpyd-agent"
BENCH="$CARGO_TARGET_DIR/debug/xpyd-bench"

echo "building xpyd-agent and xpyd-bench (log: $OUT/build.log) ..." >&2
(cd "$ROOT" && cargo build -p xpyd-agent -p xpyd-e2e --bin xpyd-agent --bin xpyd-bench) \
    >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2; exit 1; }

cat >"$OUT/zero.json" <<'EOF'
{
  "name": "zero: every engine step takes no time (SIMULATED)",
  "source": "e2e/bench/sim_router.sh: isolates xpyd's own cost per request",
  "step_ms": 0,
  "prefill_token_ms": 0,
  "prefill_attention_ns_per_pair": 0,
  "decode_seq_ms": 0,
  "decode_context_ns_per_token": 0
}
EOF

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# q-quantile of histogram NAME in a /metrics text on stdin, in
# microseconds, interpolated within the bucket as histogram_quantile does.
quantile_us() {
    awk -v name="$1" -v q="$2" '
        index($0, name "_bucket{") == 1 {
            le = $0; sub(/.*le="/, "", le); sub(/".*/, "", le)
            n++; bound[n] = (le == "+Inf") ? -1 : le + 0; count[n] = $NF + 0
        }
        END {
            if (n == 0 || count[n] == 0) { print "n/a"; exit }
            rank = q * count[n]; lo = 0; below = 0
            for (i = 1; i <= n; i++) {
                if (count[i] >= rank) {
                    if (bound[i] < 0) { printf "> %.1f\n", lo * 1e6; exit }
                    inside = count[i] - below
                    v = (inside > 0) ? lo + (bound[i] - lo) * (rank - below) / inside : bound[i]
                    printf "%.1f\n", v * 1e6; exit
                }
                lo = bound[i]; below = count[i]
            }
        }'
}

machine() {
    echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# run LABEL DECODE PREFILL: one deployment, loaded; figures into $OUT/LABEL.*
run() {
    local label=$1 decode=$2 prefill=$3
    local nats_port http_port
    nats_port=$(free_port)
    "$NATS_BIN" -a 127.0.0.1 -p "$nats_port" -js -sd "$OUT/nats-$label" >"$OUT/nats-$label.log" 2>&1 &
    local nats=$!
    PIDS+=("$nats")
    http_port=$(free_port)
    local t0=$SECONDS
    "$AGENT" up --device sim --sim-profile "$OUT/zero.json" --decode "$decode" --prefill "$prefill" \
        --num-blocks 4096 --nats "nats://127.0.0.1:$nats_port" --addr "127.0.0.1:$http_port" \
        --scope "bench/$label" >"$OUT/$label.up.out" 2>"$OUT/$label.up.err" &
    local agent=$!
    PIDS+=("$agent")
    local url="http://127.0.0.1:$http_port"
    until grep -q "http://" "$OUT/$label.up.out" 2>/dev/null; do
        kill -0 $agent 2>/dev/null || { echo "xpyd-agent exited; log: $OUT/$label.up.err" >&2; exit 1; }
        ((SECONDS - t0 < 600)) || { echo "not serving within 600 s; log: $OUT/$label.up.err" >&2; exit 1; }
        sleep 0.2
    done
    grep -q "SIMULATED" "$OUT/$label.up.out" "$OUT/$label.up.err" ||
        { echo "no SIMULATED label in xpyd-agent up's output" >&2; exit 1; }
    echo "== $label: $decode decode + $prefill prefill SIMULATED workers (zero-time profile), real NATS; serving after $((SECONDS - t0)) s"
    machine
    # What the idle deployment costs (polling, heartbeats) before any load.
    local ticks0 ticks1
    ticks0=$(awk '{print $14 + $15}' "/proc/$agent/stat")
    sleep 5
    ticks1=$(awk '{print $14 + $15}' "/proc/$agent/stat")
    echo "idle: xpyd-agent up used $(awk -v d=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f", d / hz / 5 * 100 }') % of one core over 5 s"
    "$BENCH" --base-url "$url" --endpoint chat --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" --warmup 8 --seed 1 \
        --percentile-metrics ttft,e2el --metric-percentiles 50,99 --no-progress \
        --result-file "$OUT/$label.json" >"$OUT/$label.txt"
    curl -s "$url/metrics" >"$OUT/$label.metrics"
    curl -s -D - -o /dev/null "$url/v1/models" >/dev/null
    sed -n '/====/,$p' "$OUT/$label.txt"
    local p50 p99 decisions remote
    p50=$(quantile_us xpyd_router_select_seconds 0.5 <"$OUT/$label.metrics")
    p99=$(quantile_us xpyd_router_select_seconds 0.99 <"$OUT/$label.metrics")
    decisions=$(awk '/^xpyd_router_select_seconds_count/ {print $2}' "$OUT/$label.metrics")
    remote=$(awk '/^xpyd_decode_prefills_total.*remote/ {s += $2} END {print s + 0}' "$OUT/$label.metrics")
    echo "router select (its own histogram, $decisions decisions): p50 $p50 us, p99 $p99 us"
    echo "remote prefills: $remote"
    echo "$p50 $p99" >"$OUT/$label.select"
    machine
    kill -TERM $agent 2>/dev/null || true
    wait $agent 2>/dev/null || true
    kill -TERM $nats 2>/dev/null || true
    wait $nats 2>/dev/null || true
}

# A figure of xpyd-bench's table: "Mean E2EL (ms):  12.3" -> 12.3
figure() { sed -n "s|^$2 *||p" "$OUT/$1.txt" | awk '{print $NF}' | head -1; }

echo "SIMULATED engines (--device sim); results in $OUT"
machine
run small "$SMALL_DECODE" "$SMALL_PREFILL"
run large "$DECODE" "$PREFILL"
# Again, so a change in the machine's load during the run shows.
run small-again "$SMALL_DECODE" "$SMALL_PREFILL"

echo "== large ($DECODE D + $PREFILL P) / small ($SMALL_DECODE D + $SMALL_PREFILL P), SIMULATED engines"
read -r s50 s99 <"$OUT/small.select"
read -r l50 l99 <"$OUT/large.select"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo "router select p99: $l99 us / $s99 us = $(ratio "$l99" "$s99")x"
for f in "Mean TTFT (ms):" "P99 TTFT (ms):" "Mean E2EL (ms):" "P99 E2EL (ms):" "Request throughput (req/s):"; do
    a=$(figure large "$f"); b=$(figure small "$f")
    echo "$f $a / $b = $(ratio "$a" "$b")x"
done
