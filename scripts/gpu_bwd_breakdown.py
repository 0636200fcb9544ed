"""Where the backward's time goes: each backward kernel's GPU time, serial and concurrent, per attended tile.

    PYTHONPATH=$PWD python3 scripts/gpu_bwd_breakdown.py [--cases 65536:sinkwin,16384:strided]
        [--dq-modes item:1:4,pers:2:3] [--dim 128] [--repeats 3] [--out DIR]

For each case (B=1, 32 query / 8 KV heads, head dim 128 or ``--dim``, bf16; patterns as in scripts/gpu_gluon_fwd.py)
and each dQ mode (``--dq-modes``, see ``dq_mode``: Gluon on one program per item or a persistent grid, or the Triton
kernel; query/dO slots, ring depth, the dK/dV list split) it times the forward, the backward alone (graph retained)
with dQ on its side stream launched first (the shipped order) or second, and serially, and profiles the serial
backward (torch.profiler) for each kernel's own GPU time. Per kernel it divides that time by the attended 128 x 128
tile pairs per SM, so the sparse rows' cost per tile can be read against the dense rows' (dK/dV issues 4 matmuls
per tile pair, dQ 3, the forward 2). With ``--repeats`` the modes' order alternates and medians are reported.
Writes ``bwd_breakdown.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

import torch
import triton
import triton.testing
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparsek.kernels import attention_bwd, attention_bwd_gluon, bwd_split  # noqa: E402

from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.gpu_gluon_fwd import PATTERNS  # noqa: E402
from scripts.gpu_target_case import headline_inputs, retained_backward  # noqa: E402

STEPS = 5


def attended_tiles(index, q_heads: int) -> int:
    """Attended (query tile, key tile) pairs summed over batch and query heads (partial tiles count whole)."""
    per_index_head = int((index.full_count.long() + index.part_count.long()).sum())
    return per_index_head * q_heads // index.full_count.shape[1]


def kernel_times(fn) -> dict[str, float]:
    """GPU milliseconds per call of ``fn`` for each kernel it launches (torch.profiler, STEPS calls)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0 and evt.device_type == torch.autograd.DeviceType.CUDA:
            times[evt.key] += us / 1000.0 / STEPS
    return dict(times)


def short_name(kernel: str) -> str:
    """A readable label for a profiler kernel name."""
    for tag in ("dkdv", "dq", "preprocess", "reduce", "fwd"):
        if tag in kernel.lower():
            return tag
    return kernel[:40]


def dq_mode(mode: str, dim: int = 128) -> None:
    """Set the dQ launch mode: ``item`` (Gluon, one program per work item), ``pers`` (Gluon, persistent grid) or
    ``tri`` (the Triton dQ kernel), query/dO slots, K/V ring depth at head dim ``dim`` (64 keys per step), and
    optionally the dK/dV list split: ``cN`` (or a bare N) splits lists into chunks of N entries, ``iN`` keeps the
    automatic chunk but splits from an N-fold imbalance, ``mN`` runs the Gluon backward from N dK/dV programs
    whatever the row length; e.g. ``pers:2:3``, ``item:1:4:c17``, ``pers:1:4:i3:m256``."""
    grid, slots, stages, *split = mode.split(":")
    attention_bwd_gluon.DQ_PERSISTENT = grid == "pers"
    attention_bwd_gluon.DQ_Q_SLOTS = int(slots)
    attention_bwd_gluon.DQ_STAGES[(dim, 64)] = int(stages)
    # ``tri``: the Triton dQ kernel at this head dim instead of the Gluon one
    attention_bwd_gluon.DQ_HEAD_DIMS = tuple(d for d in (64, 128) if d != dim or grid != "tri")
    attention_bwd.SPLIT_CHUNK = None
    bwd_split.IMBALANCE = DEFAULT_IMBALANCE
    attention_bwd_gluon.MIN_PROGRAMS = dict(DEFAULT_MIN_PROGRAMS)
    attention_bwd_gluon.FLOOR_EXEMPT_ROW_TILES = DEFAULT_FLOOR_EXEMPT
    for field in split:
        if field.startswith("i"):
            bwd_split.IMBALANCE = int(field[1:])
        elif field.startswith("m"):  # fewest dK/dV programs for the Gluon backward
            attention_bwd_gluon.MIN_PROGRAMS[dim] = int(field[1:])
            attention_bwd_gluon.FLOOR_EXEMPT_ROW_TILES = 1 << 30  # the floor alone decides
        else:
            attention_bwd.SPLIT_CHUNK = int(field.lstrip("c")) or None
    bwd_split._cache.clear()  # split lists are cached per index and chunk, not per policy


DEFAULT_IMBALANCE = bwd_split.IMBALANCE
DEFAULT_MIN_PROGRAMS = dict(attention_bwd_gluon.MIN_PROGRAMS)
DEFAULT_FLOOR_EXEMPT = attention_bwd_gluon.FLOOR_EXEMPT_ROW_TILES
ORDERS = (("dq_first", True, True), ("dkdv_first", True, False), ("serial", False, True))


def run_case(seq: int, pattern: str, sms: int, modes: list[str], repeats: int, dim: int = 128) -> list[dict]:
    q, k, v, d_out = headline_inputs(seq, dim)
    index, bwd = retained_backward(q, k, v, d_out, PATTERNS[pattern])
    tiles = attended_tiles(index, q.shape[1])

    def fwd():
        with torch.no_grad():
            return triton_block_sparse_attention(q, k, v, index, dim**-0.5)

    fwd_ms = float(triton.testing.do_bench(fwd, warmup=25, rep=400, return_mode="median"))
    reference = bwd()
    results = {mode: {"seq": seq, "dim": dim, "pattern": pattern, "dq_mode": mode, "tiles": tiles,
                      "tiles_per_sm": tiles / sms, "fwd_ms": fwd_ms,
                      **{f"bwd_{name}_each_ms": [] for name, _, _ in ORDERS}} for mode in modes}
    saved = (attention_bwd.CONCURRENT_DQ, attention_bwd.DQ_FIRST, attention_bwd_gluon.DQ_PERSISTENT,
             attention_bwd_gluon.DQ_Q_SLOTS, dict(attention_bwd_gluon.DQ_STAGES), attention_bwd.SPLIT_CHUNK,
             attention_bwd_gluon.DQ_HEAD_DIMS)
    try:
        for rep in range(repeats):
            for mode in modes if rep % 2 == 0 else modes[::-1]:  # alternate which mode goes first
                dq_mode(mode, dim)
                res = results[mode]
                if rep == 0:
                    attention_bwd.CONCURRENT_DQ, attention_bwd.DQ_FIRST = saved[0], saved[1]
                    grads = bwd()
                    res["grads_equal_first_mode"] = all(torch.equal(a, b)
                                                        for a, b in zip(grads, reference, strict=True))
                    res["grads_max_rel_diff_first_mode"] = max(
                        float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
                        for a, b in zip(grads, reference, strict=True))
                    del grads
                for name, concurrent, dq_first in ORDERS:
                    attention_bwd.CONCURRENT_DQ, attention_bwd.DQ_FIRST = concurrent, dq_first
                    res[f"bwd_{name}_each_ms"].append(float(triton.testing.do_bench(
                        bwd, warmup=25, rep=400, return_mode="median")))
                    res[f"bwd_{name}_ms"] = statistics.median(res[f"bwd_{name}_each_ms"])
                if rep == 0:
                    attention_bwd.CONCURRENT_DQ = False
                    per_kernel: dict[str, float] = defaultdict(float)
                    for name, ms in kernel_times(bwd).items():
                        per_kernel[short_name(name)] += ms
                    res["bwd_serial_kernels_ms"] = dict(per_kernel)
                    us_per_tile = {name: ms * 1000.0 / res["tiles_per_sm"] for name, ms in per_kernel.items()}
                    us_per_tile["fwd"] = fwd_ms * 1000.0 / res["tiles_per_sm"]
                    res["us_per_tile_per_sm"] = us_per_tile
                print(json.dumps({"rep": rep, "mode": mode, **{k: v for k, v in res.items() if "each" in k}}),
                      flush=True)
    finally:
        (attention_bwd.CONCURRENT_DQ, attention_bwd.DQ_FIRST, attention_bwd_gluon.DQ_PERSISTENT,
         attention_bwd_gluon.DQ_Q_SLOTS) = saved[:4]
        attention_bwd_gluon.DQ_STAGES.update(saved[4])
        attention_bwd.SPLIT_CHUNK = saved[5]
        attention_bwd_gluon.DQ_HEAD_DIMS = saved[6]
        bwd_split.IMBALANCE = DEFAULT_IMBALANCE
        attention_bwd_gluon.MIN_PROGRAMS = dict(DEFAULT_MIN_PROGRAMS)
        attention_bwd_gluon.FLOOR_EXEMPT_ROW_TILES = DEFAULT_FLOOR_EXEMPT
        bwd_split._cache.clear()
    torch.cuda.empty_cache()
    return list(results.values())


def table(results: list[dict]) -> str:
    """Markdown: per case, forward and backward times and each kernel's microseconds per tile per SM."""
    rows = ["| S | pattern | dQ mode | tiles/SM | fwd ms | bwd dQ first | bwd dK/dV first | bwd serial | dK/dV ms "
            "| dQ ms | other ms | us/tile fwd | dK/dV | dQ | same grads |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ker = r["bwd_serial_kernels_ms"]
        other = sum(ms for name, ms in ker.items() if name not in ("dkdv", "dq"))
        per = r["us_per_tile_per_sm"]
        rows.append(f"| {r['seq']} | {r['pattern']} | {r['dq_mode']} | {r['tiles_per_sm']:.0f} | {r['fwd_ms']:.3f} | "
                    f"{r['bwd_dq_first_ms']:.3f} | {r['bwd_dkdv_first_ms']:.3f} | {r['bwd_serial_ms']:.3f} | "
                    f"{ker.get('dkdv', 0):.3f} | {ker.get('dq', 0):.3f} | {other:.3f} | {per['fwd']:.3f} | "
                    f"{per.get('dkdv', 0):.3f} | {per.get('dq', 0):.3f} | {r['grads_equal_first_mode']} "
                    f"({r.get('grads_max_rel_diff_first_mode', 0):.1e}) |")
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="65536:sinkwin,65536:dense,65536:strided,65536:random,"
                                       "16384:dense,16384:strided,16384:random")
    ap.add_argument("--dq-modes", default="item:1:4",
                    help="Gluon dQ modes: grid (item|pers):query slots:K/V ring depth[:dK/dV split chunk], "
                         "comma-separated")
    ap.add_argument("--dim", type=int, default=128, help="head dim (64 or 128)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timings per mode (the modes' order alternates between repeats; medians reported)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    env = {"gpu": torch.cuda.get_device_name(), "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
           "cudnn": torch.backends.cudnn.version()}
    print(json.dumps(env), flush=True)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for case in args.cases.split(","):
        seq, pattern = case.split(":")
        results += run_case(int(seq), pattern, sms, args.dq_modes.split(","), args.repeats, args.dim)
        with open(os.path.join(args.out, "bwd_breakdown.json"), "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)
        with open(os.path.join(args.out, "bwd_breakdown.md"), "w") as f:
            f.write(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
