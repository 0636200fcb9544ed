"""Does the H100's clock drop under sustained load, and does it move our timings? (methodology check)

    PYTHONPATH=$PWD python3 scripts/gpu_clock_drift.py [--heat-seconds 40] [--out DIR]

Samples the SM clock, power and temperature (``nvidia-smi -lms 100``) while timing the headline case's forward
(64K sink 128 + window 4096, B=1, 32/8 heads, head dim 128, bf16) in phases: cold, right after a stretch of 64K
dense forward+backward (the heaviest case of the benchmark sweep), and after a rest. Each timing is a
``triton.testing.do_bench`` median; beside it the median SM clock sampled while it ran. Writes ``clock_drift.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparsek import SparsePattern  # noqa: E402
from hf_sparsek.ops import build_index_for  # noqa: E402
from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.gpu_target_case import headline_inputs  # noqa: E402


def clock_samples(path: str, start: float, end: float) -> list[float]:
    """SM clocks (MHz) the sampler wrote between two wall-clock times."""
    out = []
    with open(path) as f:
        for row in csv.reader(f):
            try:
                stamp, mhz = float(row[0]), float(row[1])
            except (ValueError, IndexError):
                continue
            if start <= stamp <= end:
                out.append(mhz)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heat-seconds", type=float, default=40.0)
    ap.add_argument("--rest-seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    samples = os.path.join(args.out, "smi_samples.csv")
    sampler_cmd = ("while true; do echo \"$(date +%s.%N),$(nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu "
                   "--format=csv,noheader,nounits | head -1)\"; sleep 0.1; done")
    sampler = subprocess.Popen(["bash", "-c", f"{sampler_cmd} > {samples}"])
    try:
        q, k, v, d_out = headline_inputs(65536)
        scale = 128**-0.5
        sinkwin = build_index_for(q, k, SparsePattern(sink_tokens=128, window=4096))
        dense = build_index_for(q, k, SparsePattern())
        dense.transposed()

        def fwd() -> None:
            with torch.no_grad():
                triton_block_sparse_attention(q, k, v, sinkwin, scale)

        def heavy() -> None:
            torch.autograd.grad(triton_block_sparse_attention(q, k, v, dense, scale), (q, k, v), d_out)

        fwd()
        heavy()
        torch.cuda.synchronize()
        phases = []

        def timed(phase: str) -> None:
            for _ in range(args.repeats):
                t0 = time.time()
                ms = float(triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median"))
                t1 = time.time()
                time.sleep(0.3)  # let the sampler catch up before reading
                mhz = clock_samples(samples, t0, t1)
                phases.append({"phase": phase, "fwd_ms": ms, "sm_mhz_median": statistics.median(mhz) if mhz else None,
                               "sm_mhz_min": min(mhz) if mhz else None, "samples": len(mhz)})
                print(json.dumps(phases[-1]), flush=True)

        timed("cold")
        t_end = time.time() + args.heat_seconds
        t0 = time.time()
        while time.time() < t_end:
            heavy()
            torch.cuda.synchronize()
        heat = clock_samples(samples, t0, time.time())
        print(json.dumps({"heat_sm_mhz_median": statistics.median(heat) if heat else None,
                          "heat_sm_mhz_min": min(heat) if heat else None}), flush=True)
        timed("after_heat")
        time.sleep(args.rest_seconds)
        timed("after_rest")
    finally:
        sampler.terminate()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(os.path.join(args.out, "clock_drift.json"), "w") as f:
        json.dump({"env": env, "heat_seconds": args.heat_seconds, "heat_sm_mhz": heat, "timings": phases}, f, indent=1)
    for name in ("cold", "after_heat", "after_rest"):
        rows = [p for p in phases if p["phase"] == name]
        print(name, "fwd ms", [round(p["fwd_ms"], 3) for p in rows], "MHz", [p["sm_mhz_median"] for p in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
