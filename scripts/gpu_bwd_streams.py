"""A/B of the backward's launch order: dQ on a side stream concurrent with dK/dV, or the two one after the other.

    PYTHONPATH=$PWD python3 scripts/gpu_bwd_streams.py [--repeats 5] [--out DIR]

Small and medium shapes, where a single run of ``gpu_kernels.py --bwd-ab`` is noisy (the 4K and S=512 cases are
bound by host time): each case alternates the two settings ``--repeats`` times and keeps every timing
(``triton.testing.do_bench`` median of forward+backward, ms), so the comparison shows its spread. Writes
``bwd_streams.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import triton
import triton.testing
from hf_sparsek.kernels import attention_bwd

from hf_sparsek import BlockLayout, SparsePattern
from hf_sparsek.ops import build_index_for
from hf_sparsek.triton_ops import triton_block_sparse_attention
from scripts.gpu_profile_case import PATTERNS

SW, STRIDED, RANDOM10 = PATTERNS["sinkwin"], PATTERNS["strided"], PATTERNS["random"]
# (name, batch, q heads, kv heads, seq, head dim, dtype, pattern)
CASES = [
    ("4K-dense", 1, 32, 8, 4096, 128, torch.bfloat16, SparsePattern()),
    ("4K-strided", 1, 32, 8, 4096, 128, torch.bfloat16, STRIDED),
    ("4K-random10", 1, 32, 8, 4096, 128, torch.bfloat16, SparsePattern(layout=BlockLayout("random", density=0.1))),
    ("16K-sinkwin", 1, 32, 8, 16384, 128, torch.bfloat16, SW),
    ("orig-B16-S512-dense", 16, 96, 96, 512, 64, torch.float16, SparsePattern(block_size=64)),
    ("orig-B16-S512-sink64-win128", 16, 96, 96, 512, 64, torch.float16,
     SparsePattern(block_size=64, sink_tokens=64, window=128)),
    ("8K-D64-GQA3-sink128-win512", 4, 9, 3, 8192, 64, torch.bfloat16, SparsePattern(sink_tokens=128, window=512)),
    ("64K-random10", 1, 32, 8, 65536, 128, torch.bfloat16, RANDOM10),
    ("128K-random10", 1, 32, 8, 131072, 128, torch.bfloat16, RANDOM10),
]


def time_case(batch, hq, hkv, seq, dim, dtype, pattern, repeats: int) -> dict[str, list[float]]:
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q, k, v = (torch.randn(batch, h, seq, dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for h in (hq, hkv, hkv))
    d_out = torch.randn_like(q)
    index = build_index_for(q, k, pattern)
    index.transposed()

    def step() -> None:
        torch.autograd.grad(triton_block_sparse_attention(q, k, v, index, dim**-0.5), (q, k, v), d_out)

    times: dict[str, list[float]] = {"concurrent": [], "serial": []}
    for _ in range(repeats):
        for mode in times:
            attention_bwd.CONCURRENT_DQ = mode == "concurrent"
            times[mode].append(float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")))
    attention_bwd.CONCURRENT_DQ = True
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    wanted = set(filter(None, args.cases.split(",")))
    rows = []
    print("| case | concurrent ms (median of repeats) | serial ms | serial / concurrent | spread c / s |")
    print("|---|---:|---:|---:|---|")
    for name, *shape in CASES:
        if wanted and name not in wanted:
            continue
        t = time_case(*shape, repeats=args.repeats)
        c, s = statistics.median(t["concurrent"]), statistics.median(t["serial"])
        rows.append({"case": name, "concurrent_ms": t["concurrent"], "serial_ms": t["serial"],
                     "median_concurrent": c, "median_serial": s})
        print(f"| {name} | {c:.3f} | {s:.3f} | {s / c:.2f} | {min(t['concurrent']):.3f}-{max(t['concurrent']):.3f}"
              f" / {min(t['serial']):.3f}-{max(t['serial']):.3f} |", flush=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "repeats": args.repeats}
    with open(os.path.join(args.out, "bwd_streams.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
