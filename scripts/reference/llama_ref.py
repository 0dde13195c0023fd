#!/usr/bin/env python3
"""Reference Llama forward pass in numpy (float64) for golden logits.

Reads a GGUF file with the `gguf` package (parsing only), dequantizes
Q4_0/Q4_1/Q8_0/F16/F32 itself, runs the model on fixed token ids and writes
`runtime/tests/data/golden_logits.json`. It shares no code with the Rust
engine; the engine's test compares against what this writes.

Everything is float64 except the keys (after RoPE) and values, which are
rounded to float16 once, as the engine's KV cache (and llama.cpp's, by
default) holds them; the rest of the attention reads them back exactly.

Produced with (any venv with numpy and gguf):

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install numpy gguf
    /tmp/refvenv/bin/python scripts/reference/llama_ref.py \
        ~/.cache/xpyd/smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf \
        runtime/tests/data/golden_logits.json
"""

import json
import sys

import numpy as np
from gguf import GGUFReader

# "The capital of France is" (SmolLM2 tokenizer) then " Paris", ",", " and"
# so that positions past the prompt are covered too.
TOKENS = [504, 3575, 282, 4649, 314, 7042, 28, 284]
STRIDE = 8  # every STRIDE-th logit of the last position is stored in full


def field(reader, key):
    f = reader.fields[key]
    v = f.contents()
    return v


def dequantize(t):
    """Tensor -> float64 array shaped [rows, cols] (or [n] for 1-D)."""
    raw = np.asarray(t.data)
    dims = [int(d) for d in t.shape]  # ggml order: dims[0] contiguous
    n = int(np.prod(dims))
    kind = t.tensor_type.name
    if kind == "F32":
        x = raw.astype(np.float64).reshape(-1)
    elif kind == "F16":
        x = raw.view(np.float16).astype(np.float64).reshape(-1)
    else:
        b = raw.view(np.uint8).reshape(-1)
        if kind == "Q8_0":
            blk = b.reshape(-1, 34)
            d = blk[:, :2].copy().view(np.float16).astype(np.float64)
            q = blk[:, 2:].copy().view(np.int8).astype(np.float64)
            x = (q * d).reshape(-1)
        elif kind in ("Q4_0", "Q4_1"):
            size = 18 if kind == "Q4_0" else 20
            blk = b.reshape(-1, size)
            d = blk[:, :2].copy().view(np.float16).astype(np.float64)
            qs = blk[:, size - 16:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)
            if kind == "Q4_0":
                x = ((q - 8.0) * d).reshape(-1)
            else:
                m = blk[:, 2:4].copy().view(np.float16).astype(np.float64)
                x = (q * d + m).reshape(-1)
        else:
            raise SystemExit(f"tensor {t.name}: type {kind} not handled")
    assert x.size == n, (t.name, x.size, n)
    if len(dims) == 1:
        return x
    return x.reshape(dims[1], dims[0])


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_adjacent(x, pos, base):
    """x: [T, heads, hd]; rotate pairs (2i, 2i+1) as llama.cpp does for GGUF."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.asarray(pos, dtype=np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def as_kv_cache(x):
    """x rounded to float16 (nearest, ties to even), as the KV cache keeps it."""
    return x.astype(np.float16).astype(np.float64)


def main(path, out_path):
    r = GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    g = lambda k: field(r, k)
    n_layers = int(g("llama.block_count"))
    n_heads = int(g("llama.attention.head_count"))
    n_kv = int(g("llama.attention.head_count_kv"))
    hidden = int(g("llama.embedding_length"))
    eps = float(g("llama.attention.layer_norm_rms_epsilon"))
    base = float(g("llama.rope.freq_base"))
    hd = hidden // n_heads
    W = lambda name: dequantize(tensors[name])

    emb = W("token_embd.weight")  # [vocab, hidden]
    out_w = W("output.weight") if "output.weight" in tensors else emb
    T = len(TOKENS)
    pos = np.arange(T)
    x = emb[TOKENS]  # [T, hidden]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for l in range(n_layers):
        p = f"blk.{l}."
        h = rms_norm(x, W(p + "attn_norm.weight"), eps)
        q = (h @ W(p + "attn_q.weight").T).reshape(T, n_heads, hd)
        k = (h @ W(p + "attn_k.weight").T).reshape(T, n_kv, hd)
        v = (h @ W(p + "attn_v.weight").T).reshape(T, n_kv, hd)
        q, k = rope_adjacent(q, pos, base), rope_adjacent(k, pos, base)
        k, v = as_kv_cache(k), as_kv_cache(v)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, n_heads * hd)
        x = x + o @ W(p + "attn_output.weight").T
        h = rms_norm(x, W(p + "ffn_norm.weight"), eps)
        gate = h @ W(p + "ffn_gate.weight").T
        up = h @ W(p + "ffn_up.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ W(p + "ffn_down.weight").T
    logits = rms_norm(x, W("output_norm.weight"), eps) @ out_w.T  # [T, vocab]

    positions = []
    for t in range(T):
        top = np.argsort(-logits[t])[:20]
        positions.append({
            "top20_ids": [int(i) for i in top],
            "top20_logits": [round(float(logits[t, i]), 5) for i in top],
        })
    last = logits[-1]
    doc = {
        "command": "python3 scripts/reference/llama_ref.py <SmolLM2-135M-Instruct.Q4_1.gguf> "
                   "runtime/tests/data/golden_logits.json (numpy float64, own dequantization, "
                   "K and V rounded to float16 as the KV cache holds them)",
        "model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "tokens": TOKENS,
        "positions": positions,
        "last_stats": {"mean": float(last.mean()), "std": float(last.std()),
                        "min": float(last.min()), "max": float(last.max())},
        "last_stride": STRIDE,
        "last_strided_logits": [round(float(v), 4) for v in last[::STRIDE]],
    }
    with open(out_path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print("top-5 at last position:", positions[-1]["top20_ids"][:5])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
