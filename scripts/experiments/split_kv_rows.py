"""Which kernel should run a short run of 17-64 query rows at the end of a long cache? Times the rows three ways:
the default dispatch (``kernels/dispatch.py: use_split_kv``: one split-KV launch where the prefill kernel would
have few programs, else the prefill kernel), runs of 16 through the split-KV kernel, and the dispatch with
``split_kv_max_rows=16`` (every run over 16 rows on the prefill kernel, as before that rule). Checks that the two
dispatches give the same output.

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


def prefill_kernel_over_16_rows(fn):
    """Run ``fn`` with runs of more than 16 rows kept off the split-KV kernel (``split_kv_max_rows=16``)."""
    from dataclasses import replace

    import hf_sparsek

    kernels = hf_sparsek.get_settings().kernels
    with hf_sparsek.settings(kernels=replace(kernels, split_kv_max_rows=16)):
        return fn()


def _cases(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern) -> dict:
    """The three ways to run q's rows, the last of k's positions."""
    from hf_sparsek import sparse_attention

    q_len, kv_len = q.shape[2], k.shape[2]

    def call():
        return sparse_attention(q, k, v, pattern)

    def runs():
        return [sparse_attention(q[:, :, s:s + 16], k, v, pattern, q_offset=kv_len - q_len + s)
                for s in range(0, q_len, 16)]

    return {"default dispatch": call, "runs of 16": runs,
            "prefill kernel over 16 rows": lambda: prefill_kernel_over_16_rows(call)}


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
                    base, old = call(), prefill_kernel_over_16_rows(call)
                    diff = float((base.float() - old.float()).abs().max())
                    for case, fn in cases.items():
                        ms = _time_ms(fn, cpu)
                        rows.append({"shape": label, "batch": batch, "heads": f"{hq}/{hkv}", "head_dim": dim,
                                     "kv_len": kv_len, "q_len": q_len, "pattern": name, "case": case, "ms": ms,
                                     "max_abs_diff_vs_prefill_kernel": diff})
                        print(f"{label:24s} B{batch} {kv_len:6d} q{q_len:3d} {name:22s} {case:32s} {ms:8.3f} ms "
                              f"(diff {diff:.2e})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "split_kv_rows.json"),
               {"command": "python -m scripts.experiments.split_kv_rows " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
