"""The library's own host time per 4K forward / backward call, with every kernel launch stubbed out (CPU only).

    PYTHONPATH=$PWD python3 scripts/cpu_host_path.py [--seq 4096] [--profile]

On the GPU machine a 4K backward call took 0.5-1.2 ms of host time (scripts/gpu_host_profile.py); this separates the
Python around the launches (index lists, split bookkeeping, allocations, autograd) from the launches themselves:
the Triton kernels are replaced by no-ops and the inputs are CPU tensors (the interpreter's dispatch, which skips
the CUDA-only side stream and Gluon checks). B=1, 32 query / 8 KV heads, head dim 128, bf16.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the library path, whose kernels are stubbed below

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparsek.kernels import attention_bwd, attention_fwd, bwd_split  # noqa: E402

from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.gpu_gluon_fwd import PATTERNS  # noqa: E402
from scripts.gpu_target_case import retained_backward  # noqa: E402


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    for module, names in ((attention_bwd, ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_bwd_preprocess_kernel")),
                          (attention_fwd, ("_attn_fwd_kernel",)), (bwd_split, ("_reduce_split_kernel",))):
        for name in names:
            setattr(module, name, _NoLaunch())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="cProfile the strided backward calls")
    args = ap.parse_args()
    stub_kernels()
    q = torch.randn(1, 32, args.seq, 128, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, args.seq, 128, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, args.seq, 128, dtype=torch.bfloat16, requires_grad=True)
    d_out = torch.randn_like(q)
    for pattern in ("random", "strided", "dense"):
        index, bwd = retained_backward(q, k, v, d_out, PATTERNS[pattern])

        for _ in range(5):
            bwd()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            bwd()
        t1 = time.perf_counter()
        for _ in range(args.calls):
            triton_block_sparse_attention(q, k, v, index, 128**-0.5)
        t2 = time.perf_counter()
        bwd_us, fwd_us = 1e6 * (t1 - t0) / args.calls, 1e6 * (t2 - t1) / args.calls
        print(f"{pattern}: backward {bwd_us:.0f} us, forward {fwd_us:.0f} us of host time per call, kernels stubbed")
        if args.profile and pattern == "strided":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                bwd()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
