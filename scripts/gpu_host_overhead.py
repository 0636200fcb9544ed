"""Host (CPU) time per call of the sparse attention op: through the custom op, the eager fast path, and with
runtime autotuning on; plus a profile.

    PYTHONPATH=$PWD python3 scripts/gpu_host_overhead.py [--seq 4096] [--out DIR]

Why: at 4K tokens a forward kernel takes ~0.2 ms of GPU time (sink 128 + window 1024), so host work per call
(custom-op dispatch, index argument preparation, the autotuner's cache lookup, Triton's launch) can exceed it and
becomes the measured time. Prints
and writes ``host_overhead.json``: microseconds per forward and per forward+backward call (no synchronisation
inside the loop), GPU milliseconds (CUDA events) for comparison, and the top of a cProfile of the autotuned calls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
from hf_sparsek.kernels import autotune

from hf_sparsek import SparsePattern, triton_ops
from hf_sparsek.ops import build_index_for
from hf_sparsek.triton_ops import triton_block_sparse_attention


def _host_us(fn, calls: int) -> float:
    """Mean host microseconds per call: launches queue asynchronously, one synchronisation at the end."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (1, 32, args.seq, 128), (1, 8, args.seq, 128)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    d_out = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=gen)
    index = build_index_for(q, k, SparsePattern(sink_tokens=128, window=1024))
    index.transposed()
    fwd = lambda: triton_block_sparse_attention(q, k, v, index, 128**-0.5)  # noqa: E731
    fwdbwd = lambda: torch.autograd.grad(fwd(), (q, k, v), d_out)  # noqa: E731
    rows = {}
    for name, fast, tuned in (("custom-op", False, False), ("eager", True, False), ("eager+autotune", True, True)):
        triton_ops.EAGER_FAST_PATH = fast
        autotune.ENABLED = tuned
        os.environ["HF_SPARSEK_AUTOTUNE_CACHE"] = os.path.join(args.out, "autotune_host.json")
        autotune.clear_memory()
        rows[name] = {
            "fwd_host_us": _host_us(fwd, args.calls),
            "fwdbwd_host_us": _host_us(fwdbwd, args.calls),
            "fwd_gpu_ms": float(triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")),
            "fwdbwd_gpu_ms": float(triton.testing.do_bench(fwdbwd, warmup=25, rep=100, return_mode="median")),
        }
        print(name, json.dumps(rows[name]))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fwdbwd()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(35)
    rows["profile_autotune_fwdbwd_50_calls"] = text.getvalue()
    print(text.getvalue())
    rows["env"] = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
                   "seq": args.seq}
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
