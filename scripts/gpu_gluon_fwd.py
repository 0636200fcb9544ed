"""Check and time the Gluon forward (kernels/attention_fwd_gluon.py) against the Triton forward, in one GPU run.

    python -m scripts.gpu_gluon_fwd [--sizes 16384,65536] [--stages 0,2,3] [--persistent 1,0]
        [--q-slots 0,1,2] [--patterns dense,...] [--d64 1] [--repeats 1] [--check-stages 2,3] [--out DIR]

(a) Correctness: on fresh random bf16/fp16 inputs (odd lengths, GQA and MQA, head dims 64/128, batch 2, chunked
prefill, transposed (B, S, H, D) views, sink+window, strided and random layouts) the Gluon output is compared with
the float32 reference and its log-sum-exp with the Triton kernel's; a mismatch fails the run (exit 1).
(b) Forward milliseconds (CUDA events, median) of Gluon (each ring depth, 0 = automatic; persistent grid or one program
per work item) vs Triton vs cuDNN SDPA
(dense causal) on B=1, 32/8 heads, head dim 128 (and 64 at 16K), with TFLOP/s counted on the attended pairs. Writes
``gluon_fwd.json`` (with the run's metadata) and ``gluon_fwd.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import traceback

import torch
import triton
import triton.testing
from hf_sparsek.kernels import attention_fwd_gluon as gluon_fwd
from hf_sparsek.kernels import dispatch
from hf_sparsek.kernels.options import KernelOptions

from hf_sparsek import BlockLayout, SparsePattern
from hf_sparsek.block_index import attended_pairs
from hf_sparsek.ops import build_index_for
from hf_sparsek.reference import reference_attention
from hf_sparsek.runtime import kernel_options
from scripts.common import PATTERNS, write_json


def _rand(shape, dtype, gen, seq_major=False):
    if seq_major:
        b, h, s, d = shape
        return torch.randn((b, s, h, d), generator=gen, device="cuda").to(dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen, device="cuda").to(dtype)


def fwd_options(use_gluon: bool, stages: int | None = None, persistent: bool = True,
                q_slots: int | None = None) -> KernelOptions:
    """The current kernel options with the Gluon forward's switches set (made once per timed method)."""
    return dataclasses.replace(kernel_options(), gluon_fwd=use_gluon, gluon_fwd_stages=stages,
                               gluon_fwd_persistent=persistent, gluon_fwd_q_slots=q_slots)


def _launch(q, k, v, index, opts: KernelOptions):
    """One forward through the library's dispatch with these options."""
    return dispatch.forward(
        q, k, v, index.full_count.contiguous(), index.full_tiles.contiguous(), index.part_count.contiguous(),
        index.part_tiles.contiguous(), None, None, None,
        index.block_size, index.q_offset, index.kv_offset, index.sink_tokens, index.window or 0,
        q.shape[-1] ** -0.5, 0.0, opts)


def check(mode, name, batch, hq, hkv, q_len, kv_len, dim, pattern, dtype=torch.bfloat16,
          seq_major=False) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)))
    q = _rand((batch, hq, q_len, dim), dtype, gen, seq_major)
    k = _rand((batch, hkv, kv_len, dim), dtype, gen, seq_major)
    v = _rand((batch, hkv, kv_len, dim), dtype, gen, seq_major)
    index = build_index_for(q, k, pattern)
    supported = dispatch.use_gluon_forward(q, k, v, index.block_size, 0.0, False, fwd_options(True))
    stages, persistent = mode
    row = {"case": name, "stages": stages, "persistent": persistent, "supported": supported}
    if not supported:
        row["ok"] = False
        row["error"] = "not supported by the Gluon forward"
        return row
    out, lse = _launch(q, k, v, index, fwd_options(True, stages, persistent))
    out_t, lse_t = _launch(q, k, v, index, fwd_options(False))
    ref = reference_attention(q.float(), k.float(), v.float(), index, scale=dim**-0.5)
    torch.cuda.synchronize()
    rel = float((out.float() - ref).norm() / ref.norm().clamp_min(1.0))
    rel_t = float((out_t.float() - ref).norm() / ref.norm().clamp_min(1.0))
    fin = torch.isfinite(lse_t)
    lse_ok = bool((torch.isfinite(lse) == fin).all())
    lse_err = float((lse[fin] - lse_t[fin]).abs().max()) if fin.any() else 0.0
    row.update(out_rel=rel, triton_out_rel=rel_t, out_max_abs=float((out.float() - ref).abs().max()),
               lse_max_abs_vs_triton=lse_err, finite=bool(torch.isfinite(out).all()), lse_inf_match=lse_ok)
    row["ok"] = row["finite"] and lse_ok and rel < 1e-2 and lse_err < 1e-2
    return row


_SW = SparsePattern(sink_tokens=128, window=512)
# (name, batch, q heads, kv heads, q_len, kv_len, head dim, pattern[, dtype, sequence-major]); gpu_gluon_bwd.py
# reuses them
CASES = [
    ("sinkwin-D128-GQA4-b2", 2, 8, 2, 2048, 2048, 128, _SW),
    ("sinkwin-D64-MQA-odd", 1, 8, 1, 2065, 2065, 64, _SW),
    ("dense-D128-odd", 1, 4, 2, 1000, 1000, 128, SparsePattern()),
    ("dense-D64-GQA4", 1, 8, 2, 4096 + 17, 4096 + 17, 64, SparsePattern()),
    ("strided-D128", 1, 4, 2, 2048, 2048, 128, SparsePattern(window=256, layout=BlockLayout("strided", stride=4))),
    ("random10-D128", 1, 4, 2, 4096, 4096, 128, SparsePattern(layout=BlockLayout("random", density=0.1))),
    ("chunked-D128", 1, 8, 2, 300, 2048, 128, _SW),
    ("chunked-odd-D64", 1, 8, 2, 201, 1999, 64, _SW),
    ("bshd-view-D128", 2, 8, 2, 2057, 2057, 128, _SW, torch.bfloat16, True),
    ("fp16-D128", 1, 8, 2, 2048, 2048, 128, _SW, torch.float16),
    ("window-only-D128", 1, 4, 1, 3000, 3000, 128, SparsePattern(window=700)),
    # sink keys without a window: the tiles that hold them are partial and not top-k selected
    ("sink-random-D128", 1, 8, 2, 2500, 2500, 128,
     SparsePattern(sink_tokens=100, layout=BlockLayout("random", density=0.2))),
]


def run_checks(modes: list[tuple[int, bool]]) -> list[dict]:
    """Every case for each (ring depth, persistent grid) mode."""
    return run_cases(check, CASES, modes, ("stages", "persistent"))


def run_cases(check_fn, cases: list[tuple], modes: list[tuple], mode_keys: tuple[str, ...]) -> list[dict]:
    """``check_fn(mode, *case)`` for every case and mode, printed as JSON lines as they finish; an exception is
    recorded as a failed row (with ``mode_keys`` naming the mode's fields) and the sweep goes on. gpu_gluon_bwd.py
    runs its checks through it too."""
    rows = []
    for mode in modes:
        for case in cases:
            try:
                row = check_fn(mode, *case)
            except Exception as exc:  # record and go on
                row = {"case": case[0], **dict(zip(mode_keys, mode, strict=True)), "ok": False, "error": repr(exc),
                       "trace": traceback.format_exc()[-1500:]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _pairs(index, batch, hq) -> int:
    return attended_pairs(index) * batch * hq


def _cudnn(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def bench_shape(seq: int, dim: int, stages: list[int], persistent: list[bool], q_slots: list[int | None],
                repeats: int, patterns: list[str] | None = None) -> list[dict]:
    """Every pattern (or those named) at one shape (B=1, 32/8 heads, bf16): Triton, Gluon per ring depth and grid,
    cuDNN on dense; the methods of a pattern timed in turn ``repeats`` times, interleaved and in reverse
    order on odd repeats (so drift and the position in the sequence hit them alike)."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q = _rand((1, 32, seq, dim), torch.bfloat16, gen)
    k = _rand((1, 8, seq, dim), torch.bfloat16, gen)
    v = _rand((1, 8, seq, dim), torch.bfloat16, gen)
    for pname, pat in PATTERNS.items():
        if patterns and pname not in patterns:
            continue
        index = build_index_for(q, k, pat)
        flops = 4 * dim * _pairs(index, 1, 32)
        methods = [("triton", functools.partial(_launch, q, k, v, index, fwd_options(False)))]
        methods += [(f"gluon-s{st or 'auto'}{'-persistent' if pe else ''}-q{qs or 'auto'}",
                     functools.partial(_launch, q, k, v, index, fwd_options(True, st, pe, qs)))
                    for st in stages for pe in persistent for qs in q_slots
                    if _fits(st, qs, dim, index)]
        if pname == "dense":
            methods.append(("cudnn", lambda: _cudnn(q, k, v)))
        for rep in range(repeats):
            for method, fn in (methods if rep % 2 == 0 else methods[::-1]):
                row = {"case": f"S{seq}-D{dim}-{pname}", "method": method, "repeat": rep}
                try:
                    ms = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
                    row.update(fwd_ms=ms, tflops=flops / ms / 1e9)
                except Exception as exc:
                    row["error"] = repr(exc)[:300]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _fits(stages: int | None, q_slots: int | None, dim: int, index) -> bool:
    """Whether this ring depth and query-slot count fit in shared memory (the launcher's own rule)."""
    try:
        gluon_fwd.slots_for(dim, 128, index.full_tiles.shape[-1] + index.part_tiles.shape[-1], stages, q_slots)
    except ValueError:
        return False
    return True


def bench(sizes: list[int], stages: list[int], persistent: list[bool], q_slots: list[int | None],
          repeats: int, saved=lambda rows: None, patterns: list[str] | None = None,
          dims: tuple[int, ...] = (64,)) -> list[dict]:
    rows = []
    for seq, dim in [(s, 128) for s in sizes] + [(16384, d) for d in dims]:
        rows += bench_shape(seq, dim, stages, persistent, q_slots, repeats, patterns)
        saved(rows)
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    """Per case and method: the median over repeats (and every repeat's milliseconds)."""
    lines = ["| case | method | fwd ms (median of repeats) | TFLOP/s | every repeat |", "|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["method"]), []).append(r)
    for (case, method), rs in groups.items():
        ok = [r for r in rs if "fwd_ms" in r]
        if not ok:
            lines.append(f"| {case} | {method} | {rs[0].get('error', '')} | | |")
            continue
        ms = statistics.median(r["fwd_ms"] for r in ok)
        tf = statistics.median(r["tflops"] for r in ok)
        each = " ".join(f"{r['fwd_ms']:.3f}" for r in ok)
        lines.append(f"| {case} | {method} | {ms:.3f} | {tf:.0f} | {each} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,65536")
    ap.add_argument("--stages", default="0,2,3", help="K/V ring depths to time (0: the automatic choice)")
    ap.add_argument("--persistent", default="1,0", help="grids to check and time: 1 persistent, 0 one per item")
    ap.add_argument("--q-slots", default="0", help="query slots to time: 1, 2, 0 (the launcher's choice)")
    ap.add_argument("--patterns", default="", help="patterns to time (default: all of " + ",".join(PATTERNS) + ")")
    ap.add_argument("--d64", type=int, default=1, help="also time head dim 64 at 16K (1) or not (0)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved timings of each method")
    ap.add_argument("--check-stages", default="2,3", help="ring depths the checks run with")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cudnn": torch.backends.cudnn.version()}
    print(json.dumps(env), flush=True)
    stages = [int(s) or None for s in args.stages.split(",")]
    persistent = [bool(int(p)) for p in args.persistent.split(",")]
    checks = run_checks([(int(st), pe) for st in args.check_stages.split(",") for pe in persistent])
    ok = all(r["ok"] for r in checks)
    save(args.out, "gluon_fwd", env, checks, [], "")
    rows = [] if (args.skip_bench or not ok) else bench(
        [int(s) for s in args.sizes.split(",")], stages, persistent, [int(x) or None for x in args.q_slots.split(",")],
        args.repeats, lambda rows: save(args.out, "gluon_fwd", env, checks, rows, table(rows)),
        args.patterns.split(",") if args.patterns else None, (64,) if args.d64 else ())
    print(save(args.out, "gluon_fwd", env, checks, rows, table(rows)))
    print("checks:", "all OK" if ok else "FAILED")
    return 0 if ok else 1


def save(out: str, stem: str, env: dict, checks: list[dict], rows: list[dict], md: str) -> str:
    """Write ``stem``.json (environment, checks, timings) and ``stem``.md (the table); returns the table. The GPU
    scripts call it after the checks and after each benchmark shape, so a run stopped by its time limit keeps what
    it measured."""
    ok = all(r["ok"] for r in checks)
    write_json(os.path.join(out, f"{stem}.json"), {"env": env, "checks": checks, "bench": rows, "all_ok": ok})
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
