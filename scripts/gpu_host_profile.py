"""Where the host time of a 4K call goes on the GPU machine: bursts of calls timed on the host, and cProfile.

    PYTHONPATH=$PWD python3 scripts/gpu_host_profile.py [--out DIR]

B=1, 32 query / 8 KV heads, head dim 128, bf16, 4K tokens; patterns random 10%, strided 16 + window 512, dense.
Per pattern and backward path (``triton``: the Triton dK/dV and dQ kernels; ``gluon``: the Gluon ones, the program
floor lifted): the host time of one forward and one backward call, measured in bursts of ``--burst`` calls that
start on an idle GPU (fewer launches than the launch queue holds, so the host never waits for the GPU inside a
burst; median of ``--bursts``), the GPU time (``triton.testing.do_bench``, median), and a cProfile of the backward
bursts (top functions by own time, and the callers of Triton's launch path) in ``host_profile_<pattern>_<path>.txt``.
Writes ``host_profile.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparsek.kernels import attention_bwd_gluon  # noqa: E402

from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.gpu_gluon_fwd import PATTERNS  # noqa: E402
from scripts.gpu_target_case import headline_inputs, retained_backward  # noqa: E402


def host_us_per_call(fn: Callable[[], object], burst: int, bursts: int) -> list[float]:
    """Host microseconds per call, one value per burst; each burst starts after a synchronise."""
    values = []
    for _ in range(bursts):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(burst):
            fn()
        values.append((time.perf_counter() - t0) / burst * 1e6)
    torch.cuda.synchronize()
    return values


def set_path(path: str, saved_floor: dict[int, int], saved_exempt: int) -> None:
    if path == "gluon":
        attention_bwd_gluon.MIN_PROGRAMS = {dim: 0 for dim in saved_floor}
    elif path == "triton":
        attention_bwd_gluon.MIN_PROGRAMS = {dim: 10**9 for dim in saved_floor}
        attention_bwd_gluon.FLOOR_EXEMPT_ROW_TILES = 10**9
    else:  # shipped
        attention_bwd_gluon.MIN_PROGRAMS = dict(saved_floor)
        attention_bwd_gluon.FLOOR_EXEMPT_ROW_TILES = saved_exempt


def profile_text(fn: Callable[[], object], burst: int, bursts: int) -> str:
    prof = cProfile.Profile()
    for _ in range(bursts):
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(burst):
            fn()
        prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    stats.print_callers("jit.py.*\\(run\\)")
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--bursts", type=int, default=40)
    ap.add_argument("--patterns", default="random,strided,dense")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    q, k, v, d_out = headline_inputs(args.seq)
    scale = q.shape[-1] ** -0.5
    saved_floor = dict(attention_bwd_gluon.MIN_PROGRAMS)
    saved_exempt = attention_bwd_gluon.FLOOR_EXEMPT_ROW_TILES
    res: dict[str, dict] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                            "triton": triton.__version__, "seq": args.seq, "burst": args.burst, "rows": {}}
    try:
        for pattern in args.patterns.split(","):
            index, bwd = retained_backward(q, k, v, d_out, PATTERNS[pattern])

            def fwd(index=index) -> None:
                with torch.no_grad():
                    triton_block_sparse_attention(q, k, v, index, scale)

            for path in ("triton", "gluon", "shipped"):
                set_path(path, saved_floor, saved_exempt)
                for _ in range(20):
                    bwd()
                    fwd()
                row = {
                    "fwd_host_us": statistics.median(host_us_per_call(fwd, args.burst, args.bursts)),
                    "bwd_host_us": statistics.median(host_us_per_call(bwd, args.burst, args.bursts)),
                    "fwd_gpu_ms": float(triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")),
                    "bwd_gpu_ms": float(triton.testing.do_bench(bwd, warmup=25, rep=200, return_mode="median")),
                }
                res["rows"][f"{pattern}/{path}"] = row
                print(pattern, path, json.dumps({key: round(val, 4) for key, val in row.items()}), flush=True)
                if path != "shipped":
                    text = profile_text(bwd, args.burst, 10)
                    with open(os.path.join(args.out, f"host_profile_{pattern}_{path}.txt"), "w") as f:
                        f.write(text)
                    if pattern == "random" and path == "gluon":
                        print(text[:6000], flush=True)
            if pattern == "random":
                with open(os.path.join(args.out, "host_profile_random_forward.txt"), "w") as f:
                    f.write(profile_text(fwd, args.burst, 10))
    finally:
        set_path("shipped", saved_floor, saved_exempt)
    with open(os.path.join(args.out, "host_profile.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
