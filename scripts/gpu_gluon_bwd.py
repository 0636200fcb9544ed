"""Check and time the Gluon backward kernels (kernels/attention_bwd_gluon.py) against the Triton ones, in one run.

    python -m scripts.gpu_gluon_bwd [--sizes 16384,65536] [--stages 0,2,3] [--dq-modes p0q1,p1q2]
        [--out DIR]

(a) Correctness: on fresh random bf16/fp16 inputs (odd lengths, GQA and MQA, head dims 64/128, batch 2, chunked
prefill, transposed (B, S, H, D) views, sink+window, strided and random layouts, split key lists) the gradients of
the library path (``triton_block_sparse_attention``) with the Gluon dK/dV and dQ kernels are compared with the
float32 reference's (autograd) and with the Triton kernels'; a mismatch fails the run (exit 1).
(b) Milliseconds (CUDA events, median) of the backward alone and of forward+backward: Triton dK/dV and dQ, Gluon
dK/dV with Triton dQ, Gluon both (each dK/dV ring depth; 0 = automatic), and cuDNN SDPA (dense causal); B=1, 32/8
heads, head dim 128 (and 64 at
16K), TFLOP/s on the attended pairs (FlashAttention's convention: backward 2.5x, forward+backward 3.5x the
forward's 4·D·pairs). Writes ``gluon_bwd.json`` (with the run's metadata) and ``gluon_bwd.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import triton
import triton.testing
from hf_sparsek.kernels import attention_bwd_gluon as gluon_bwd
from hf_sparsek.kernels import dispatch
from hf_sparsek.kernels.options import KernelOptions

import hf_sparsek
from hf_sparsek import SparsePattern
from hf_sparsek.block_index import attended_pairs
from hf_sparsek.ops import build_index_for
from hf_sparsek.reference import reference_attention
from hf_sparsek.runtime import kernel_options
from hf_sparsek.triton_ops import triton_block_sparse_attention
from scripts.common import PATTERNS
from scripts.gpu_gluon_fwd import CASES as FWD_CASES
from scripts.gpu_gluon_fwd import _cudnn, _rand, run_cases, save


def parse_dq_mode(mode: str) -> tuple[bool | None, int]:
    """"p1q2" -> (persistent grid, 2 query/dO slots); "" -> the shipped options."""
    if not mode:
        shipped = KernelOptions()
        return shipped.gluon_dq_persistent, shipped.gluon_dq_q_slots
    if len(mode) != 4 or mode[0] != "p" or mode[2] != "q" or mode[1] not in "01" or mode[3] not in "12":
        raise ValueError(f"dQ mode {mode!r}: p<0|1>q<1|2> (persistent grid, query/dO slots)")
    return mode[1] == "1", int(mode[3])


def bwd_options(on: bool, stages: int | None = None, chunk: int | None = None, dq: bool | None = None,
                dq_mode: str = "") -> KernelOptions:
    """The current options with the Gluon dK/dV kernel (``on``) and the Gluon dQ kernel (``dq``, default: as ``on``)
    forced on or off at both head dims and on small grids (the shipped policy sends those to the Triton kernels),
    the dK/dV ring depth, the split chunk and the dQ grid / query-slot mode (``parse_dq_mode``; two slots take a
    3-slot K/V ring at head dim 128)."""
    current = kernel_options()
    persistent, q_slots = parse_dq_mode(dq_mode)
    dq_stages = {**current.gluon_dq_stages, **({(128, 64): 3} if q_slots == 2 else {})}
    return dataclasses.replace(
        current, gluon_dkdv=on, gluon_dq=on if dq is None else dq, gluon_dq_head_dims=gluon_bwd.HEAD_DIMS,
        gluon_dkdv_min_programs={dim: 0 for dim in gluon_bwd.HEAD_DIMS},
        gluon_dkdv_stages={64: stages, 128: stages} if stages else current.gluon_dkdv_stages,
        split_chunk=chunk, gluon_dq_persistent=persistent, gluon_dq_q_slots=q_slots, gluon_dq_stages=dq_stages)


def _grads(q, k, v, index, d_out, on: bool, chunk: int | None = None, stages: int | None = None,
           dq_mode: str = ""):
    with hf_sparsek.settings(kernels=bwd_options(on, stages, chunk, dq_mode=dq_mode)):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = triton_block_sparse_attention(qq, kk, vv, index, q.shape[-1] ** -0.5)
        return torch.autograd.grad(out, (qq, kk, vv), d_out)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm().clamp_min(1e-6))


def check(mode, name, batch, hq, hkv, q_len, kv_len, dim, pattern, dtype=torch.bfloat16, seq_major=False,
          chunk=None) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)))
    q = _rand((batch, hq, q_len, dim), dtype, gen, seq_major)
    k = _rand((batch, hkv, kv_len, dim), dtype, gen, seq_major)
    v = _rand((batch, hkv, kv_len, dim), dtype, gen, seq_major)
    d_out = torch.randn(q.shape, generator=gen, device="cuda").to(dtype)
    index = build_index_for(q, k, pattern)
    forced = bwd_options(True)
    supported = dispatch.use_gluon_dkdv(q, k, v, d_out, index.block_size, 0.0, False, index.q_offset, None, forced)
    dq_supported = dispatch.use_gluon_dq(q, k, v, d_out, index.block_size, 0.0, False, None, forced)
    stages, dq_mode = mode
    row = {"case": name, "stages": stages, "dq_mode": dq_mode or "shipped", "supported": supported,
           "dq_supported": dq_supported, "split_chunk": chunk}
    if not supported:
        row.update(ok=False, error="not supported by the Gluon dK/dV kernel")
        return row
    g = _grads(q, k, v, index, d_out, True, chunk, stages, dq_mode)
    g2 = _grads(q, k, v, index, d_out, True, chunk, stages, dq_mode)  # deterministic: bit-identical on repeat
    g_t = _grads(q, k, v, index, d_out, False, chunk)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qf, kf, vf, index, scale=dim**-0.5)
    g_ref = torch.autograd.grad(ref, (qf, kf, vf), d_out.float())
    torch.cuda.synchronize()
    for name_, a, a_t, r in zip(("dq", "dk", "dv"), g, g_t, g_ref, strict=True):
        row[f"{name_}_rel"] = _rel(a, r)
        row[f"{name_}_rel_triton"] = _rel(a_t, r)
        row[f"{name_}_max_abs"] = float((a.float() - r).abs().max())
        row[f"{name_}_rel_gluon_vs_triton"] = _rel(a, a_t.float())
    row["finite"] = all(bool(torch.isfinite(a).all()) for a in g)
    row["repeat_identical"] = all(bool(torch.equal(a, b)) for a, b in zip(g, g2, strict=True))
    row["ok"] = (row["finite"] and row["repeat_identical"]
                 and all(row[f"{n}_rel"] < 1e-2 for n in ("dq", "dk", "dv")))
    return row


_SW = SparsePattern(sink_tokens=128, window=512)
# the forward's cases (gpu_gluon_fwd.CASES) with the odd chunked-prefill offset moved to a multiple of 4 (the Gluon
# dK/dV's rule; 1798 is tested by the forward), then split key lists and a 16-row query
CASES = [c if c[0] != "chunked-odd-D64" else ("chunked-odd-D64", 1, 8, 2, 203, 1999, 64, _SW) for c in FWD_CASES] + [
    ("split3-sinkwin-D128", 1, 8, 2, 3000, 3000, 128, _SW, torch.bfloat16, False, 3),
    ("split2-dense-D64", 1, 4, 1, 1500, 1500, 64, SparsePattern(), torch.bfloat16, False, 2),
    ("decode-like-q16-D128", 1, 8, 2, 16, 2048, 128, _SW),
]


def run_checks(modes: list[tuple[int | None, str]]) -> list[dict]:
    """Every case for each (dK/dV ring depth, dQ mode)."""
    return run_cases(check, CASES, modes, ("stages", "dq_mode"))


def _time(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _timed_row(case: str, method: str, fwd_flops: float, q, k, v, d_out, attend) -> dict:
    """Backward alone (``attend()``'s output kept, graph retained) and forward+backward of one method."""
    row = {"case": case, "method": method}
    try:
        out = attend()
        bwd = _time(lambda: torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True))
        fb = _time(lambda: torch.autograd.grad(attend(), (q, k, v), d_out))
        row.update(bwd_ms=bwd, fwd_bwd_ms=fb, bwd_tflops=2.5 * fwd_flops / bwd / 1e9,
                   fwd_bwd_tflops=3.5 * fwd_flops / fb / 1e9)
    except Exception as exc:
        row["error"] = repr(exc)[:300]
    print(json.dumps(row), flush=True)
    return row


def bench_shape(seq: int, dim: int, stages: list[int | None], dq_modes: list[str]) -> list[dict]:
    """Every pattern at one shape (B=1, 32/8 heads, bf16): backward and forward+backward, Triton dK/dV vs Gluon
    dK/dV per ring depth; cuDNN on dense."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q = _rand((1, 32, seq, dim), torch.bfloat16, gen).requires_grad_()
    k = _rand((1, 8, seq, dim), torch.bfloat16, gen).requires_grad_()
    v = _rand((1, 8, seq, dim), torch.bfloat16, gen).requires_grad_()
    d_out = torch.randn(q.shape, generator=gen, device="cuda").to(torch.bfloat16)
    for pname, pat in PATTERNS.items():
        index = build_index_for(q, k, pat)
        index.transposed()
        fwd_flops = 4 * dim * attended_pairs(index) * 32
        variants = [("triton", False, None, False, ""), ("gluon-dkdv", True, None, False, "")]
        variants += [(f"gluon-both-s{st or 'auto'}-dq-{mode or 'shipped'}", True, st, True, mode)
                     for st in stages for mode in dq_modes]
        for method, on, st, dq, mode in variants:
            with hf_sparsek.settings(kernels=bwd_options(on, st, dq=dq, dq_mode=mode)):
                rows.append(_timed_row(f"S{seq}-D{dim}-{pname}", method, fwd_flops, q, k, v, d_out,
                                       lambda index=index: triton_block_sparse_attention(q, k, v, index, dim**-0.5)))
        if pname == "dense":
            rows.append(_timed_row(f"S{seq}-D{dim}-{pname}", "cudnn", fwd_flops, q, k, v, d_out,
                                   lambda: _cudnn(q, k, v)))
    return rows


def bench(sizes: list[int], stages: list[int | None], dq_modes: list[str], saved=lambda rows: None) -> list[dict]:
    rows = []
    for seq, dim in [(s, 128) for s in sizes] + [(16384, 64)]:
        rows += bench_shape(seq, dim, stages, dq_modes)
        saved(rows)
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | method | bwd ms | bwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "bwd_ms" not in r:
            lines.append(f"| {r['case']} | {r['method']} | {r.get('error', '')} | | | |")
            continue
        lines.append(f"| {r['case']} | {r['method']} | {r['bwd_ms']:.3f} | {r['bwd_tflops']:.0f} "
                     f"| {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,65536")
    ap.add_argument("--stages", default="0", help="query/dO ring depths to time (0: the shipped choice)")
    ap.add_argument("--check-stages", default="0", help="ring depths the checks run with (0: the shipped choice)")
    ap.add_argument("--dq-modes", default="",
                    help="dQ modes to check and time, comma-separated p<0|1>q<1|2> (persistent grid, query/dO "
                         "slots); empty: the shipped one")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true", help="time only (checks already passed at this commit)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cudnn": torch.backends.cudnn.version(), "flop_convention": "bwd 2.5x, fwd+bwd 3.5x of 4*D*pairs"}
    print(json.dumps(env), flush=True)
    dq_modes = args.dq_modes.split(",")
    for mode in dq_modes:
        parse_dq_mode(mode)  # a bad mode fails before any work
    checks = [] if args.skip_check else run_checks([(int(s) or None, m) for s in args.check_stages.split(",")
                                                    for m in dq_modes])
    ok = all(r["ok"] for r in checks)
    stages = [int(s) or None for s in args.stages.split(",")]
    save(args.out, "gluon_bwd", env, checks, [], "")
    rows = [] if (args.skip_bench or not ok) else bench(
        [int(s) for s in args.sizes.split(",")], stages, dq_modes,
        lambda rows: save(args.out, "gluon_bwd", env, checks, rows, table(rows)))
    print(save(args.out, "gluon_bwd", env, checks, rows, table(rows)))
    print("checks:", "all OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
