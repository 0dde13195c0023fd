#!/usr/bin/env bash
# xpyd's CPU engine vs llama.cpp on the same GGUF, same machine, same run.
#
#   e2e/bench/engine_vs_llamacpp.sh
#
# Runs `cargo bench -p xpyd-runtime --bench engine` (runtime/benches/engine.rs)
# and e2e/bench/llamacpp_bench.py (the same workloads through llama.cpp)
# alternately, ROUNDS times each (default 2: xpyd, llama.cpp, xpyd, llama.cpp), and
# prints one table with the best round of each side, plus the machine and its
# load average. Everything else (build logs, llama.cpp's load log) goes to a
# scratch dir whose path is printed at the end.
#
# Env: ROUNDS (2), XPYD_BENCH_STEPS (32), XPYD_BENCH_THREADS (2, llama.cpp side;
# xpyd uses rayon's default, one thread per core), CARGO_TARGET_DIR
# (the repo's target/), LLAMA_CPP_PYTHON_VERSION (pinned below).
#
# The llama.cpp side needs llama-cpp-python built from source into
# ~/.cache/xpyd/bench-venv-llama-cpp-python-<version>/ ; if that venv is
# missing it is created here (5-15 min on 2 cores; needs cmake, gcc, PyPI).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROUNDS="${ROUNDS:-2}"
export XPYD_BENCH_STEPS="${XPYD_BENCH_STEPS:-32}"
export XPYD_BENCH_THREADS="${XPYD_BENCH_THREADS:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# LLAMA_1T=1 (default) adds a llama.cpp column at n_threads=1: on a loaded
# machine ggml's busy-wait barriers make 2 threads far slower than 1.
LLAMA_1T="${LLAMA_1T:-1}"
LCP_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="$HOME/.cache/xpyd"
VENV="$CACHE/bench-venv-llama-cpp-python-$LCP_VERSION"
PY="${PYTHON:-python3.11}"
LOGS="$(mktemp -d /tmp/engine_vs_llamacpp.XXXXXX)"

# The model: XPYD_MODEL from the environment, else from ~/.cache/xpyd/env.
if [[ -z "${XPYD_MODEL:-}" && -f "$CACHE/env" ]]; then
    XPYD_MODEL="$(sed -n 's/^export XPYD_MODEL="\(.*\)"$/\1/p' "$CACHE/env")"
fi
export XPYD_MODEL="${XPYD_MODEL:-$CACHE/smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf}"
[[ -f "$XPYD_MODEL" ]] || { echo "model not found: $XPYD_MODEL (run scripts/setup)" >&2; exit 1; }

# 1. llama-cpp-python venv (benchmark only), built from source for this CPU.
if ! "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
    echo "building llama-cpp-python $LCP_VERSION into $VENV (log: $LOGS/llama-build.log) ..." >&2
    rm -rf "$VENV.tmp"
    "$PY" -m venv "$VENV.tmp"
    (cd /tmp && CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        "$VENV.tmp/bin/python" -m pip install --no-cache-dir "llama-cpp-python==$LCP_VERSION") \
        >"$LOGS/llama-build.log" 2>&1 || { tail -n 30 "$LOGS/llama-build.log" >&2; exit 1; }
    rm -rf "$VENV"
    mv "$VENV.tmp" "$VENV"   # only bin/python is used, so moving the venv is fine
fi

# 2. xpyd's bench binary, built before anything is timed.
echo "building xpyd's engine bench (log: $LOGS/cargo-build.log) ..." >&2
(cd "$ROOT" && cargo bench -p xpyd-runtime --bench engine --no-run) >"$LOGS/cargo-build.log" 2>&1 \
    || { tail -n 30 "$LOGS/cargo-build.log" >&2; exit 1; }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_START="$(loadavg)"
RUN_LOADS=()

# 3. Alternate the two, ROUNDS times each.
for r in $(seq 1 "$ROUNDS"); do
    RUN_LOADS+=("xpyd#$r $(cut -d' ' -f1 /proc/loadavg)")
    echo "round $r/$ROUNDS: xpyd (load $(loadavg)) ..." >&2
    (cd "$ROOT" && cargo bench -q -p xpyd-runtime --bench engine 2>"$LOGS/xpyd-$r.err") >"$LOGS/xpyd-$r.out" \
        || { cat "$LOGS/xpyd-$r.err" >&2; exit 1; }
    RUN_LOADS+=("llama.cpp#$r $(cut -d' ' -f1 /proc/loadavg)")
    echo "round $r/$ROUNDS: llama.cpp (load $(loadavg)) ..." >&2
    "$VENV/bin/python" "$ROOT/e2e/bench/llamacpp_bench.py" >"$LOGS/llama-$r.out" 2>"$LOGS/llama-$r.err" \
        || { tail -n 30 "$LOGS/llama-$r.err" >&2; exit 1; }
    if [[ "$LLAMA_1T" == 1 ]]; then
        RUN_LOADS+=("llama.cpp-1t#$r $(cut -d' ' -f1 /proc/loadavg)")
        echo "round $r/$ROUNDS: llama.cpp, 1 thread (load $(loadavg)) ..." >&2
        XPYD_BENCH_THREADS=1 "$VENV/bin/python" "$ROOT/e2e/bench/llamacpp_bench.py" \
            >"$LOGS/llama1t-$r.out" 2>"$LOGS/llama1t-$r.err" \
            || { tail -n 30 "$LOGS/llama1t-$r.err" >&2; exit 1; }
    fi
done
LOAD_END="$(loadavg)"

# 4. One table: the best round of each side, for wall tok/s and tok per CPU-s.
"$VENV/bin/python" - "$LOGS" "$ROUNDS" "$LLAMA_1T" <<'EOF'
import re, sys
logs, rounds, one_t = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
pat = {
    f"prefill {n} tok": rf"^prefill {n} tokens: .*?, ([\d.]+) tok/s; ([\d.]+) tok per CPU-s"
    for n in (512, 2048)
}
pat.update({
    f"decode batch {b}, context {c}":
        rf"^decode batch {b}, context {c}: .*?, ([\d.]+) tok/s .*?; ([\d.]+) tok per CPU-s"
    for c in (16, 1024) for b in (1, 8)
})
def best(side):
    out = {}
    for r in range(1, rounds + 1):
        text = open(f"{logs}/{side}-{r}.out").read()
        for k, p in pat.items():
            m = re.search(p, text, re.M)
            if not m:
                sys.exit(f"{side} round {r}: no '{k}' line in {logs}/{side}-{r}.out")
            w, c = float(m[1]), float(m[2])
            ow, oc = out.get(k, (0.0, 0.0))
            out[k] = (max(ow, w), max(oc, c))
    return out
x, l = best("xpyd"), best("llama")
l1 = best("llama1t") if one_t else None
rows = [("metric", "xpyd", "llama.cpp", "xpyd/llama.cpp")
        + (("llama.cpp 1 thread", "xpyd/llama.cpp 1t") if one_t else ())]
for k in pat:
    for i, unit in ((0, "tok/s (wall)"), (1, "tok per CPU-s")):
        row = (f"{k}, {unit}", f"{x[k][i]:.1f}", f"{l[k][i]:.1f}", f"{x[k][i] / l[k][i]:.2f}")
        if one_t:
            row += (f"{l1[k][i]:.1f}", f"{x[k][i] / l1[k][i]:.2f}")
        rows.append(row)
w = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
for j, r in enumerate(rows):
    print("| " + " | ".join(v.ljust(w[c]) for c, v in enumerate(r)) + " |")
    if j == 0:
        print("|" + "|".join("-" * (n + 2) for n in w) + "|")
EOF

model_name="$(lscpu | sed -n 's/^Model name: *//p' | head -n1)"
echo
echo "machine: $model_name, $(nproc) cores; load average (1/5/15 min) $LOAD_START at start, $LOAD_END at end"
echo "1-min load average as each run started: ${RUN_LOADS[*]}"
echo "best of $ROUNDS alternating rounds each; decode steps $XPYD_BENCH_STEPS; model $(basename "$XPYD_MODEL")"
echo "xpyd:      $(grep -m1 '^threads:' "$LOGS/xpyd-1.out")"
echo "llama.cpp: $(grep -m1 '^llama.cpp' "$LOGS/llama-1.out")"
echo "raw outputs: $LOGS"
