#!/usr/bin/env python3
"""Golden dequantization of Q4_K and Q6_K blocks, from the `gguf` package.

Random block bytes (with small, finite f16 scales) and what gguf-py's
dequantizer makes of them go to `runtime/tests/data/kquants.json`, which
`runtime/tests/engine_kquants.rs` checks the engine's dequantizer against.

    /tmp/refvenv/bin/python scripts/reference/kquants_ref.py runtime/tests/data/kquants.json
"""

import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

rng = np.random.default_rng(1234)


def f16_bytes(x):
    return np.array([x], dtype=np.float16).view(np.uint8)


def q4_k_blocks(n):
    out = []
    for _ in range(n):
        b = rng.integers(0, 256, size=144, dtype=np.uint8)
        b[0:2] = f16_bytes(rng.uniform(0.001, 0.05))   # d
        b[2:4] = f16_bytes(rng.uniform(0.001, 0.05))   # dmin
        out.append(b)
    return np.concatenate(out)


def q6_k_blocks(n):
    out = []
    for _ in range(n):
        b = rng.integers(0, 256, size=210, dtype=np.uint8)
        b[208:210] = f16_bytes(rng.uniform(0.001, 0.05))  # d (last)
        out.append(b)
    return np.concatenate(out)


def main(out_path):
    doc = {"command": "python3 scripts/reference/kquants_ref.py " + out_path}
    for name, ty, data in [("q4_k", T.Q4_K, q4_k_blocks(2)), ("q6_k", T.Q6_K, q6_k_blocks(2))]:
        values = dequantize(data, ty).reshape(-1)
        doc[name] = {
            "bytes_hex": data.tobytes().hex(),
            "values": [float(v) for v in values.astype(np.float32)],
        }
    with open(out_path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
