"""A/B timing of the Gluon kernels of two source trees through the library path, interleaved in one process.

    git archive <commit> kernels | tar -x -C ab_base      # the baseline's kernels/ folder
    python -m scripts.experiments.gpu_ab_kernels --base ab_base/kernels [--seq 65536] [--dim 128] [--repeats 5]
        [--patterns sinkwin,dense,strided,random] [--swap fwd,dkdv,dq] [--passes fwd,bwd,fwd_bwd] [--out DIR]

Single runs spread by 5-20% on the H100 (docs/kernel-decisions.md), so a change is read against its baseline
in the same process: the baseline's ``attention_fwd_gluon`` / ``attention_bwd_gluon`` are loaded as a second package
and their launchers take the place of the working tree's for the "base" timings (the library's dispatch, index and
autograd code are the working tree's for both). Each repeat times forward, the backward alone (graph retained;
``--passes`` picks) and forward+backward of "base" and "new" in turn (``triton.testing.do_bench`` median; which goes
first alternates), B=1, 32/8 heads, head dim 128 (or ``--dim``), bf16; ``--swap`` limits the baseline to some of the
launchers, to tell which kernel a difference comes from. Before timing, both trees' outputs and gradients are
compared (they must agree to bf16 rounding). Writes ``ab_kernels.json`` (every timing, medians, new/base ratios) and
``ab_kernels.md``. The baseline's launchers are called with this tree's arguments (``kernels/dispatch.py`` passes
the ring depths, slots and grid as keywords), so the baseline must come from a commit with the same launcher
signatures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys

import torch
import triton
import triton.testing
from hf_sparsek.kernels import attention_bwd_gluon, attention_fwd_gluon

from hf_sparsek.ops import build_index_for
from hf_sparsek.triton_ops import triton_block_sparse_attention
from scripts.common import PATTERNS, headline_inputs, write_json

LAUNCHERS = {attention_fwd_gluon: ("attention_forward_gluon",),
             attention_bwd_gluon: ("attention_dkdv_gluon", "attention_dq_gluon")}


def load_base(folder: str):
    """The baseline's kernels/ folder as package ``kernels_base``: (its attention_fwd_gluon, attention_bwd_gluon)."""
    spec = importlib.util.spec_from_file_location("kernels_base", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules["kernels_base"] = package
    spec.loader.exec_module(package)
    return (importlib.import_module("kernels_base.attention_fwd_gluon"),
            importlib.import_module("kernels_base.attention_bwd_gluon"))


SWAPS = {"fwd": "attention_forward_gluon", "dkdv": "attention_dkdv_gluon", "dq": "attention_dq_gluon"}


@contextlib.contextmanager
def launchers_of(base_fwd, base_bwd, swap: tuple[str, ...] = tuple(SWAPS)):
    """The baseline's Gluon launchers named in ``swap`` (fwd, dkdv, dq) in place of the working tree's, for the
    timings of "base"."""
    saved = {(mod, name): getattr(mod, name) for mod, names in LAUNCHERS.items() for name in names}
    for mod, base in ((attention_fwd_gluon, base_fwd), (attention_bwd_gluon, base_bwd)):
        for name in LAUNCHERS[mod]:
            if name in [SWAPS[key] for key in swap]:
                setattr(mod, name, getattr(base, name))
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a kernels/ folder of the baseline commit")
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--patterns", default="sinkwin,dense,strided,random")
    ap.add_argument("--swap", default="fwd,dkdv,dq", help="launchers the baseline provides in its timings")
    ap.add_argument("--passes", default="fwd,fwd_bwd", help="what to time: fwd, bwd (alone), fwd_bwd")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    base_fwd, base_bwd = load_base(args.base)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "seq": args.seq, "dim": args.dim, "base": args.base, "swap": args.swap}
    swap = tuple(args.swap.split(","))
    passes = args.passes.split(",")
    print(json.dumps(env), flush=True)
    q, k, v, d_out = headline_inputs(args.seq, args.dim)
    scale = args.dim**-0.5
    times: dict[str, list[float]] = {}
    checks: dict[str, dict] = {}
    ok = True
    for pname in args.patterns.split(","):
        index = build_index_for(q, k, PATTERNS[pname])
        index.transposed()

        def fwd(index=index):
            with torch.no_grad():
                return triton_block_sparse_attention(q, k, v, index, scale)

        def fwd_bwd(index=index):
            out = triton_block_sparse_attention(q, k, v, index, scale)
            return (out, *torch.autograd.grad(out, (q, k, v), d_out))

        new = fwd_bwd()
        with launchers_of(base_fwd, base_bwd, swap):
            old = fwd_bwd()
        errs = {name: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))
                for name, a, b in zip(("out", "dq", "dk", "dv"), new, old, strict=True)}
        checks[pname] = {"rel_diff_new_vs_base": errs, "ok": all(e < 1e-2 for e in errs.values())}
        ok &= checks[pname]["ok"]
        print(json.dumps({"pattern": pname, **checks[pname]}), flush=True)
        del new, old
        for rep in range(args.repeats):
            for tree in ("base", "new") if rep % 2 == 0 else ("new", "base"):  # alternate who goes first
                ctx = launchers_of(base_fwd, base_bwd, swap) if tree == "base" else contextlib.nullcontext()
                with ctx:
                    out = triton_block_sparse_attention(q, k, v, index, scale) if "bwd" in passes else None

                    def bwd(out=out):
                        return torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True)

                    for name, fn in [(n, f) for n, f in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", fwd_bwd))
                                     if n in passes]:
                        ms = float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))
                        times.setdefault(f"{pname}/{name}/{tree}", []).append(ms)
                        print(json.dumps({"pattern": pname, "repeat": rep, "tree": tree, name: ms}), flush=True)
        save(args.out, env, checks, times)
        torch.cuda.empty_cache()
    print(save(args.out, env, checks, times))
    print("checks:", "all OK" if ok else "FAILED")
    return 0 if ok else 1


def save(out: str, env: dict, checks: dict, times: dict[str, list[float]]) -> str:
    """Write ab_kernels.json / .md (called after each pattern, so a run stopped by its time limit keeps what it
    measured); returns the table: per pattern and pass, base and new medians and their ratio."""
    os.makedirs(out, exist_ok=True)
    rows, summary = [], {}
    for key in times:
        pattern, name, tree = key.split("/")
        if tree != "new" or f"{pattern}/{name}/base" not in times:
            continue
        base, new = statistics.median(times[f"{pattern}/{name}/base"]), statistics.median(times[key])
        summary[f"{pattern}/{name}"] = {"base_ms": base, "new_ms": new, "new_over_base": new / base}
        each = " / ".join(f"{b:.3f}, {n:.3f}" for b, n in zip(times[f"{pattern}/{name}/base"], times[key], strict=True))
        rows.append(f"| {pattern} | {name} | {base:.3f} | {new:.3f} | {new / base:.3f} | {each} |")
    write_json(os.path.join(out, "ab_kernels.json"), {"env": env, "checks": checks, "times_ms": times,
                                                       "summary": summary})
    md = ("| pattern | pass | base ms (median) | new ms (median) | new / base | each repeat (base, new) |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    with open(os.path.join(out, "ab_kernels.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
