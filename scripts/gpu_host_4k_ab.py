"""Host and GPU time of one 4K backward with the Gluon vs the Triton backward kernels (MIN_PROGRAMS 256 vs 512).

    PYTHONPATH=$PWD python3 scripts/gpu_host_4k_ab.py [--out DIR]

B=1, 32 query / 8 KV heads, head dim 128, bf16, 4K tokens (256 dK/dV programs: the Gluon backward runs from 256 at
head dim 128, the Triton one below). Per pattern and setting, three alternating repeats of: 200 backward calls
(graph retained) timed on the host without synchronising (host microseconds per call), and
``triton.testing.do_bench``'s median. Writes ``host_4k.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparsek.kernels import attention_bwd_gluon  # noqa: E402

from scripts.gpu_gluon_fwd import PATTERNS  # noqa: E402
from scripts.gpu_target_case import headline_inputs, retained_backward  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    q, k, v, d_out = headline_inputs(4096)
    saved = dict(attention_bwd_gluon.MIN_PROGRAMS)
    res: dict[str, list[dict]] = {}
    try:
        for pattern in ("random", "strided", "dense"):
            bwd = retained_backward(q, k, v, d_out, PATTERNS[pattern])[1]
            for rep in range(3):
                for least in (256, 512) if rep % 2 == 0 else (512, 256):
                    attention_bwd_gluon.MIN_PROGRAMS = {**saved, 128: least}
                    for _ in range(20):
                        bwd()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(200):
                        bwd()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    gpu = float(triton.testing.do_bench(bwd, warmup=25, rep=200, return_mode="median"))
                    key = f"{pattern}/min{least}"
                    res.setdefault(key, []).append({"host_us": (t1 - t0) / 200 * 1e6,
                                                    "wall_us": (t2 - t0) / 200 * 1e6, "do_bench_ms": gpu})
                    print(key, json.dumps(res[key][-1]), flush=True)
    finally:
        attention_bwd_gluon.MIN_PROGRAMS = saved
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_4k.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
