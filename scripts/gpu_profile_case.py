"""Per-kernel GPU time of one forward+backward of the sparse attention (torch.profiler), to see where a case spends.

    PYTHONPATH=$PWD python3 scripts/gpu_profile_case.py --seq 4096 --pattern strided [--out DIR]

Patterns as in scripts/gpu_kernels.py: ``strided`` (window 512 + every 16th key tile), ``sinkwin`` (sink 128 +
window 4096), ``random`` (10% of the key tiles, seed 1). B=1, 32 query / 8 KV heads, head dim 128,
bf16. Writes ``profile_<pattern>_<seq>.txt`` (the profiler's table, sorted by CUDA time) to --out.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from hf_sparsek import BlockLayout, SparsePattern
from hf_sparsek.ops import build_index_for
from hf_sparsek.triton_ops import triton_block_sparse_attention

PATTERNS = {
    "strided": SparsePattern(window=512, layout=BlockLayout("strided", stride=16)),
    "sinkwin": SparsePattern(sink_tokens=128, window=4096),
    "random": SparsePattern(layout=BlockLayout("random", density=0.1, seed=1)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--pattern", choices=sorted(PATTERNS), default="strided")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, args.seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(1, 8, args.seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(1, 8, args.seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    d_out = torch.randn_like(q)
    index = build_index_for(q, k, PATTERNS[args.pattern])
    index.transposed()

    def step() -> None:
        torch.autograd.grad(triton_block_sparse_attention(q, k, v, index, 128**-0.5), (q, k, v), d_out)

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    with open(os.path.join(args.out, f"profile_{args.pattern}_{args.seq}.txt"), "w") as f:
        f.write(f"10 steps, B=1 32/8 heads D=128 bf16, {args.pattern}, S={args.seq}, {torch.cuda.get_device_name()}, "
                f"torch {torch.__version__}\n{table}\n")


if __name__ == "__main__":
    main()
