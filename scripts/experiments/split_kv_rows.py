"""Should the split-KV kernel take query runs of up to 64 rows (today 16)? Times a short run of rows at the end of a
long cache three ways: the default dispatch (<= 16 rows split-KV, else the prefill kernel), runs of 16 through the
split-KV kernel, and one split-KV launch with the limit raised to 64 (its register budget, MAX_ROWS, allows 64
rows x 1 head at D 256). Checks that the raised launch gives the default's output.

    python -m scripts.experiments.split_kv_rows --out $OUT          # GPU, about a minute
    python -m scripts.experiments.split_kv_rows --out DIR --cpu-smoke
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

SHAPES = [  # (label, batch, q heads, kv heads, head dim, cache length)
    ("gemma3-270m full layer", 1, 4, 1, 256, 16384),
    ("gemma3-270m full layer", 1, 4, 1, 256, 32768),
    ("llama 32/8 D128", 1, 32, 8, 128, 32768),
    ("llama 32/8 D128", 8, 32, 8, 128, 32768),
]


def raised_limit(fn):
    """Run ``fn`` with the split-KV kernel's query-run limit raised to 64 rows (experiments only)."""
    from hf_sparsek.kernels import decode

    from hf_sparsek import ops

    saved = decode.MAX_Q_LEN, ops.DECODE_MAX_Q_LEN
    decode.MAX_Q_LEN = ops.DECODE_MAX_Q_LEN = 64
    try:
        return fn()
    finally:
        decode.MAX_Q_LEN, ops.DECODE_MAX_Q_LEN = saved


def _cases(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern) -> dict:
    """The three ways to run q's rows, the last of k's positions."""
    from hf_sparsek import sparse_attention

    q_len, kv_len = q.shape[2], k.shape[2]

    def call():
        return sparse_attention(q, k, v, pattern)

    def runs():
        return [sparse_attention(q[:, :, s:s + 16], k, v, pattern, q_offset=kv_len - q_len + s)
                for s in range(0, q_len, 16)]

    return {"default dispatch": call, "runs of 16": runs, "one split-KV launch (limit 64)": lambda: raised_limit(call)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    from hf_sparsek import SparsePattern
    from scripts.common import write_json
    from scripts.experiments.per_query_head_cost import _time_ms

    cpu = args.cpu_smoke
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    shapes = [(label, b, hq, hkv, d, 300) for label, b, hq, hkv, d, _ in SHAPES[:2]] if cpu else SHAPES
    patterns = {"dense": SparsePattern(block_size=64),
                "sink 64 + window 4096": SparsePattern(block_size=64, sink_tokens=64, window=4096)}
    rows = []
    with torch.no_grad():
        for label, batch, hq, hkv, dim, kv_len in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            k, v = (torch.randn(batch, hkv, kv_len, dim, device=device, dtype=dtype, generator=g) for _ in range(2))
            for q_len in (16, 32, 64):
                q = torch.randn(batch, hq, q_len, dim, device=device, dtype=dtype, generator=g)
                for name, pattern in patterns.items():
                    cases = _cases(q, k, v, pattern)
                    call = cases["default dispatch"]
                    base, raised = call(), raised_limit(call)
                    diff = float((base.float() - raised.float()).abs().max())
                    for case, fn in cases.items():
                        ms = _time_ms(fn, cpu)
                        rows.append({"shape": label, "batch": batch, "heads": f"{hq}/{hkv}", "head_dim": dim,
                                     "kv_len": kv_len, "q_len": q_len, "pattern": name, "case": case, "ms": ms,
                                     "max_abs_diff_raised_vs_default": diff})
                        print(f"{label:24s} B{batch} {kv_len:6d} q{q_len:3d} {name:22s} {case:32s} {ms:8.3f} ms "
                              f"(diff {diff:.2e})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "split_kv_rows.json"),
               {"command": "python -m scripts.experiments.split_kv_rows " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
