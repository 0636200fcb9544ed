"""The brief's small shape (B16 H96 S512 D64 fp16, causal) on the kernel's 64- and 128-token grids: does the Gluon
forward (128-token tiles, Hopper) bring a sink + window call to SDPA's speed? One GPU call, about a minute.

    python -m scripts.experiments.small_shape_grid --out $OUT
    python -m scripts.experiments.small_shape_grid --cpu-smoke --out /tmp/x

A sink / window pattern masks by token position, so its result does not depend on the block size: the same tokens
on a 64-token or a 128-token grid. Per pattern: SDPA dense, the whole call, the kernel alone on a prebuilt index,
which forward ran (Gluon or Triton), and the largest difference from the 64-grid output. Writes
``small_shape_grid.json``.
"""

from __future__ import annotations

import argparse
import json
import os

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default=os.environ.get("OUT", "small_grid_out"))
ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, PyTorch reference")
ARGS = ap.parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_sparsek import SparsePattern  # noqa: E402
from hf_sparsek.ops import build_index_for, sparse_attention  # noqa: E402
from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.common import bench_ms, gluon_forward_runs, write_json  # noqa: E402


def main() -> None:
    device = "cpu" if ARGS.cpu_smoke else "cuda"
    batch, heads, seq, dim = (2, 4, 300, 64) if ARGS.cpu_smoke else (16, 96, 512, 64)
    dtype = torch.float32 if ARGS.cpu_smoke else torch.float16
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, device=device, dtype=dtype) for _ in range(3))
    rows: list[dict] = []
    patterns = {
        "dense b64": SparsePattern(block_size=64),
        "dense b128": SparsePattern(block_size=128),
        "sink64+win128 b64": SparsePattern(block_size=64, sink_tokens=64, window=128),
        "sink64+win128 b128": SparsePattern(block_size=128, sink_tokens=64, window=128),
        "sink128+win128 b128": SparsePattern(block_size=128, sink_tokens=128, window=128),
        "sink64+win64 b128": SparsePattern(block_size=128, sink_tokens=64, window=64),
    }
    with torch.no_grad():
        sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        outputs = {}
        for name, pattern in patterns.items():
            index = build_index_for(q, k, pattern)
            row = {"pattern": name, "sdpa_ms": sdpa,
                   "whole_call_ms": bench_ms(lambda pattern=pattern: sparse_attention(q, k, v, pattern)),
                   "kernel_ms": bench_ms(lambda index=index: triton_block_sparse_attention(q, k, v, index, dim**-0.5))
                   if not ARGS.cpu_smoke else None,
                   "gluon": gluon_forward_runs(q, k, v, index, 0.0) if not ARGS.cpu_smoke else False}
            outputs[name] = sparse_attention(q, k, v, pattern).float()
            stem = name.rsplit(" ", 1)[0]
            twin = outputs.get(f"{stem} b64")
            row["max_diff_vs_b64"] = None if twin is None else float((outputs[name] - twin).abs().max())
            row["whole_over_sdpa"] = row["whole_call_ms"] / sdpa
            rows.append(row)
            print(json.dumps(row))
    write_json(os.path.join(ARGS.out, "small_shape_grid.json"), {"rows": rows})


if __name__ == "__main__":
    main()
