"""llama.cpp side of e2e/bench/engine_vs_llamacpp.sh.

Mirrors runtime/benches/engine.rs workload for workload, through the
low-level ctypes API of llama-cpp-python:

* prefill: one 512- and one 2048-token prompt, token i = 100 + (i * 37) %
  40000, each decoded in a single llama_decode call (n_batch = n_ubatch =
  the prompt), logits for the last token only; the timed region is that one
  call (no warm-up call before it, as in engine.rs).
* decode batch B (1 and 8) at context C (16 and 1024): sequence s gets the
  tokens s*C .. (s+1)*C of the same stream at positions 0..C-1 (untimed,
  one llama_decode call per sequence), then STEPS timed greedy steps; each
  step is ONE llama_decode call holding one token per sequence (distinct seq
  ids 0..B-1, position C + step), followed by a greedy argmax over each
  sequence's logits (the argmax is inside the timed region, as in
  engine.rs). Both sides decode at the same context length and batch.

Prints lines in the same format as engine.rs so the driver script parses
both the same way. n_threads = n_threads_batch = 2 by default (XPYD_BENCH_THREADS).
"""

import ctypes
import os
import sys
import time

import numpy as np
import llama_cpp as L

PROMPTS = (512, 2048)
DECODES = ((16, 1), (16, 8), (1024, 1), (1024, 8))


def token(k):
    return 100 + (k * 37) % 40_000


def first(*names):
    """The first of several names the binding exports (its API has renamed things)."""
    for n in names:
        f = getattr(L, n, None)
        if f is not None:
            return f
    raise AttributeError(f"llama_cpp exports none of {names}")


def cpu_secs():
    # CPU time of this process, all threads (same meaning as engine.rs's getrusage).
    return time.process_time()


def new_context(model, n_ctx, n_seq_max, threads, n_batch):
    p = L.llama_context_default_params()
    p.n_ctx = n_ctx
    p.n_batch = n_batch
    p.n_ubatch = n_batch
    p.n_seq_max = n_seq_max
    p.n_threads = threads
    p.n_threads_batch = threads
    # kv_unified and flash_attn_type keep llama.cpp's defaults (false: one KV
    # stream per sequence, so each sequence attends over its own cache only, as
    # with xpyd's per-sequence block tables; flash attention: auto).
    ctx = first("llama_init_from_model", "llama_new_context_with_model")(model, p)
    if not ctx:
        sys.exit("llama.cpp: context creation failed")
    return ctx


def decode(ctx, batch, seqs, want_logits):
    """seqs: list of (seq_id, [tokens], start_pos). One llama_decode call."""
    n = 0
    rows = []
    for sid, toks, start in seqs:
        for j, t in enumerate(toks):
            batch.token[n] = t
            batch.pos[n] = start + j
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = sid
            last = j == len(toks) - 1
            batch.logits[n] = 1 if (want_logits and last) else 0
            if want_logits and last:
                rows.append(n)
            n += 1
    batch.n_tokens = n
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        sys.exit(f"llama_decode failed: {rc}")
    sync = getattr(L, "llama_synchronize", None)
    if sync is not None:
        sync(ctx)
    return rows


def argmax_rows(ctx, rows, n_vocab):
    out = []
    for r in rows:
        ptr = L.llama_get_logits_ith(ctx, r)
        out.append(int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax()))
    return out


def main():
    model_path = os.environ["XPYD_MODEL"]
    steps = int(os.environ.get("XPYD_BENCH_STEPS", "32"))
    threads = int(os.environ.get("XPYD_BENCH_THREADS", "2"))

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = first("llama_model_load_from_file", "llama_load_model_from_file")(
        model_path.encode(), mp
    )
    if not model:
        sys.exit(f"llama.cpp: cannot load {model_path}")
    if hasattr(L, "llama_model_get_vocab") and hasattr(L, "llama_vocab_n_tokens"):
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    else:
        n_vocab = L.llama_n_vocab(model)

    sysinfo = L.llama_print_system_info()
    sysinfo = sysinfo.decode() if isinstance(sysinfo, bytes) else str(sysinfo)
    print(f"llama.cpp (llama-cpp-python {L.__version__}) threads: {threads}; {sysinfo.strip()}")

    for plen in PROMPTS:
        # Prefill: one prompt, one llama_decode call, last-token logits.
        prompt = [token(i) for i in range(plen)]
        ctx = new_context(model, -(-plen // 256) * 256, 1, threads, plen)
        batch = L.llama_batch_init(plen, 0, 1)
        start, cpu = time.perf_counter(), cpu_secs()
        decode(ctx, batch, [(0, prompt, 0)], True)
        secs, cpu = time.perf_counter() - start, cpu_secs() - cpu
        print(
            f"prefill {plen} tokens: {secs:.2f} s wall, {plen / secs:.1f} tok/s; "
            f"{plen / cpu:.1f} tok per CPU-s"
        )
        L.llama_batch_free(batch)
        L.llama_free(ctx)

    for context, bsz in DECODES:
        # Every sequence gets room for its whole run (as engine.rs's
        # blocks_per_seq, sized for context + steps).
        ctx_len = -(-(context + steps) // 256) * 256
        ctx = new_context(model, bsz * ctx_len, bsz, threads, max(context, bsz))
        batch = L.llama_batch_init(max(context, bsz), 0, bsz)
        nxt = []
        for i in range(bsz):
            toks = [token(k) for k in range(i * context, (i + 1) * context)]
            rows = decode(ctx, batch, [(i, toks, 0)], True)
            nxt += argmax_rows(ctx, rows, n_vocab)
        start, cpu = time.perf_counter(), cpu_secs()
        for step in range(steps):
            rows = decode(ctx, batch, [(i, [nxt[i]], context + step) for i in range(bsz)], True)
            nxt = argmax_rows(ctx, rows, n_vocab)
        secs, cpu = time.perf_counter() - start, cpu_secs() - cpu
        print(
            f"decode batch {bsz}, context {context}: {steps} steps in {secs:.2f} s wall, "
            f"{bsz * steps / secs:.1f} tok/s ({secs * 1000 / steps:.1f} ms/step); "
            f"{bsz * steps / cpu:.1f} tok per CPU-s"
        )
        L.llama_batch_free(batch)
        L.llama_free(ctx)

    first("llama_model_free", "llama_free_model")(model)
    L.llama_backend_free()


if __name__ == "__main__":
    main()
