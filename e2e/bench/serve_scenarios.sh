#!/usr/bin/env bash
# Serving scenarios of docs/benchmarks.md: `xpyd-agent up` on this machine,
# loaded by `xpyd-bench` (the vLLM-style table), one scenario at a time.
#
#   e2e/bench/serve_scenarios.sh [SCENARIO...]    default: agg 1p1d kv rr seed-a seed-b
#
#   agg      aggregated (no prefill workers): input 1000 ± 0, output 100, concurrency 4
#   1p1d     1 prefill + 1 decode worker, the same workload (then the agg/1p1d ratio)
#   handoff  1P1D, 2000-token prompts one at a time: the KV handoff's NIXL write time
#   kv, rr   2 decode workers, KV router vs round robin, shared-prefix sessions
#            (16 sessions x 3 turns, 512-token system prompt, 64-token turns,
#            output 32, concurrency 4): TTFT and prefix-cache hit rate
#   seed-a   input 3000 / output 150 / concurrency 10
#   seed-b   input 7500 / output 200 / 1 request/s (Poisson)
#
# Env: NUM_PROMPTS (agg/1p1d: 24; seed-a: 20; seed-b: 10), WARMUP (2), REQUEST_TIMEOUT
# (seed-a/b: 1800 s; a request past it counts as timed out), PORT
# (8123), SEED (0), OUT (results folder; default a fresh /tmp folder),
# CARGO_TARGET_DIR (the repo's target/), AGENT_EXTRA (more `up` flags).
# Every scenario writes OUT/<scenario>.json (every request's timings) and
# OUT/<scenario>.txt (the table); the machine and its load average are
# printed with each. The disaggregated scenarios use the `up` flags
# --prefill/--decode/--max-local-prefill-length/--router.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PORT="${PORT:-8123}"
SEED="${SEED:-0}"
WARMUP="${WARMUP:-2}"
OUT="${OUT:-$(mktemp -d /tmp/xpyd-serve-bench.XXXXXX)}"
mkdir -p "$OUT"
AGENT="$CARGO_TARGET_DIR/release/xpyd-agent"
# The client is built in the dev profile: its crate (xpyd-e2e) carries the
# Kubernetes client, slow to build optimised, and its work per streamed
# chunk (microseconds) does not move the figures.
BENCH="$CARGO_TARGET_DIR/debug/xpyd-bench"
URL="http://127.0.0.1:$PORT"

echo "building xpyd-agent (release) and xpyd-bench (log: $OUT/build.log) ..." >&2
(cd "$ROOT" && cargo build --release -p xpyd-agent && cargo build -p xpyd-e2e --bin xpyd-bench) \
    >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2; exit 1; }

machine() {
    echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)," \
        "$(free -g | awk '/^Mem:/ {print $2}') GiB; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

AGENT_PID=""
stop_agent() {
    [ -n "$AGENT_PID" ] || return 0
    kill -INT "$AGENT_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$AGENT_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
    AGENT_PID=""
}
trap stop_agent EXIT

# start_agent NAME FLAGS...: starts `up` and waits (120 s at most) for /health.
start_agent() {
    local name=$1; shift
    # shellcheck disable=SC2086
    "$AGENT" up --addr "127.0.0.1:$PORT" "$@" ${AGENT_EXTRA:-} >"$OUT/$name.agent.log" 2>&1 &
    AGENT_PID=$!
    for _ in $(seq 1 1200); do
        if curl -fsS "$URL/health" >/dev/null 2>&1; then return 0; fi
        kill -0 "$AGENT_PID" 2>/dev/null || { tail -n 20 "$OUT/$name.agent.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "xpyd-agent up did not answer /health within 120 s" >&2
    tail -n 20 "$OUT/$name.agent.log" >&2
    exit 1
}

# scenario NAME "AGENT FLAGS" BENCH FLAGS...
scenario() {
    local name=$1 agent_flags=$2; shift 2
    echo
    echo "### $name"
    machine | tee "$OUT/$name.txt"
    # shellcheck disable=SC2086
    start_agent "$name" $agent_flags
    echo "command: xpyd-agent up $agent_flags ${AGENT_EXTRA:-}; xpyd-bench $*" | tee -a "$OUT/$name.txt"
    "$BENCH" --base-url "$URL" --seed "$SEED" --warmup "$WARMUP" \
        --result-file "$OUT/$name.json" "$@" | tee -a "$OUT/$name.txt" \
        || echo "xpyd-bench: no request of $name succeeded (its table above lists why)" | tee -a "$OUT/$name.txt"
    # The workers' own view: prefills local/remote and the KV handoffs.
    curl -fsS "$URL/metrics" | grep -E '^xpyd_(decode_prefills_total|transfer_|decode_remote_prefill_seconds_(sum|count))' \
        >"$OUT/$name.metrics" || true
    python3 - "$OUT/$name.metrics" <<'PY' | tee -a "$OUT/$name.txt"
import re, sys
samples = []
for line in open(sys.argv[1]):
    series, value = line.rsplit(" ", 1)
    name, _, labels = series.partition("{")
    samples.append((name, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
def total(name, **want):
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == w for k, w in want.items()))
print(f"prefills: {total('xpyd_decode_prefills_total', location='local'):.0f} local, "
      f"{total('xpyd_decode_prefills_total', location='remote'):.0f} remote")
n = total("xpyd_transfer_seconds_count")
if n:
    landed = total("xpyd_decode_remote_prefill_seconds_sum") / max(total("xpyd_decode_remote_prefill_seconds_count"), 1)
    print(f"KV handoffs: {n:.0f}; mean NIXL write {1e3 * total('xpyd_transfer_seconds_sum') / n:.1f} ms "
          f"of {total('xpyd_transfer_bytes_total', direction='sent') / n / 2**20:.1f} MiB; "
          f"enqueue to KV landed (prefill compute included) {1e3 * landed:.0f} ms")
PY
    stop_agent
    echo "after: load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/$name.txt"
}

# ratio A B FIELD...: B's figure over A's, from the JSON exports.
ratio() {
    python3 - "$OUT/$1.json" "$OUT/$2.json" "${@:3}" <<'PY'
import json, sys
a, b = (json.load(open(p))["metrics"] for p in sys.argv[1:3])
def get(m, path):
    for k in path.split("."):
        m = m[k]
    return m
for f in sys.argv[3:]:
    x, y = get(a, f), get(b, f)
    if x is None or y is None:
        print(f"{f:<32} {x!s:>12} {y!s:>12}   (not reported)")
        continue
    print(f"{f:<32} {x:>12.2f} {y:>12.2f}   ratio {y / x if x else float('nan'):.2f}")
PY
}

COMMON_1K=(--input-len 1000 --output-len 100 --max-concurrency 4 --num-prompts "${NUM_PROMPTS:-24}")
SHARED=(--workload shared-prefix --sessions 16 --turns 3 --system-prompt-len 512 --turn-len 64
        --output-len 32 --max-concurrency 4 --percentile-metrics ttft,tpot,itl,e2el)
FIGURES=(request_throughput output_throughput ttft.mean_ms ttft.median_ms tpot.mean_ms itl.mean_ms)

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(agg 1p1d kv rr seed-a seed-b)
for s in "${scenarios[@]}"; do
    case "$s" in
        agg) scenario agg "--num-blocks 512 --prefill 0 --decode 1" "${COMMON_1K[@]}" ;;
        1p1d) scenario 1p1d "--num-blocks 512 --prefill 1 --decode 1 --max-local-prefill-length 0" \
                "${COMMON_1K[@]}"
              if [ -f "$OUT/agg.json" ]; then
                  echo "aggregated vs 1P1D (second column over first):"; ratio agg 1p1d "${FIGURES[@]}"
              fi ;;
        handoff) scenario handoff "--num-blocks 512 --prefill 1 --decode 1 --max-local-prefill-length 0 --max-model-len 4096 --max-batch-tokens 2048" \
                --input-len 2000 --output-len 4 --max-concurrency 1 --num-prompts "${NUM_PROMPTS:-4}" ;;
        kv) scenario kv "--num-blocks 1024 --prefill 0 --decode 2 --router kv" "${SHARED[@]}" ;;
        rr) scenario rr "--num-blocks 1024 --prefill 0 --decode 2 --router round_robin" "${SHARED[@]}"
            if [ -f "$OUT/kv.json" ]; then
                echo "KV router vs round robin (second column over first):"
                ratio kv rr ttft.mean_ms ttft.median_ms prefix_cache_hit_ratio request_throughput
            fi ;;
        seed-a) scenario seed-a "--num-blocks 2048 --max-model-len 4096" \
                    --input-len 3000 --output-len 150 --max-concurrency 10 \
                    --num-prompts "${NUM_PROMPTS:-20}" --request-timeout "${REQUEST_TIMEOUT:-1800}" ;;
        seed-b) scenario seed-b "--num-blocks 4096 --max-model-len 8192" \
                    --input-len 7500 --output-len 200 --request-rate 1 \
                    --num-prompts "${NUM_PROMPTS:-10}" --request-timeout "${REQUEST_TIMEOUT:-1800}" ;;
        *) echo "unknown scenario '$s' (agg 1p1d kv rr seed-a seed-b)" >&2; exit 2 ;;
    esac
done
echo
echo "results: $OUT"
