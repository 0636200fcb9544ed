"""Time only the library's own method of ``scripts/gpu_kernels.py``'s main group, for a given source tree.

    python scripts/experiments/ab_sparsek_only.py TREE OUT_DIR 4096,16384,65536

Imports TREE's ``scripts.gpu_kernels`` (so an old tree is timed with its own code) and runs its ``bench_case`` with
``methods=("sparsek",)``: no FlexAttention compiles or cuDNN rows, so repeats of two trees fit in one device call.
Writes OUT_DIR/bench.json in gpu_kernels' format, which ``python -m scripts.kernels_ab`` compares.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    tree, out, sizes = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3]
    os.makedirs(out, exist_ok=True)
    sys.path.insert(0, tree)
    os.chdir(tree)
    sys.argv = ["gpu_kernels", "--skip-check", "--only", "main", "--out", out, "--max-seconds", "100000"]
    import torch

    import scripts.gpu_kernels as bench

    for seq in (int(s) for s in sizes.split(",")):
        bench.bench_case("main", 1, 32, 8, seq, 128, torch.bfloat16, bench.pattern_set(seq), methods=("sparsek",))
    bench.RESULTS["env"] = bench.environment()
    with open(os.path.join(out, "bench.json"), "w") as handle:
        json.dump(bench.RESULTS, handle, indent=1, default=str)
    for row in bench.RESULTS["bench"]:
        print(row["case"], row.get("fwd_ms"), row.get("fwdbwd_ms"), row.get("error", ""))


if __name__ == "__main__":
    main()
