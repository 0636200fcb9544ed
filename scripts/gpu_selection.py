"""Cost of dynamic selection beside the attention it feeds (issue 22): the mass selector's Triton kernel at 16K / 64K.

    python -m scripts.gpu_selection --out $OUT            # H200: B=1, 32/8 heads, D=128, bf16 (about a minute)
    python -m scripts.gpu_selection --out DIR --cpu-smoke  # tiny sizes on CPU, kernels in the Triton interpreter

Pattern: top-24 blocks of 64 tokens + sink 64 + window 256 (selector "mass"; "meanpool" timed beside it). Per
length, medians of ``triton.testing.do_bench``:

* ``selection_ms``: ``select_mass`` alone (pooling kernels + the fused score / softmax / top-k kernel);
  ``mass_rows{R}_w{W}_selection_ms``: the same with R (query tile, head) rows per program and W warps (the default
  launch: ``mass_rows_per_program``, 4 warps), and whether its tiles equal the default launch's;
* ``attention_ms``: the Triton forward alone on an index built beforehand (no grad);
* ``call_ms``: the whole ``sparse_attention`` call (selection + index + attention), as a model layer runs it;
* ``meanpool_selection_ms``: the mean-pool selector (PyTorch ops) for comparison;
* ``learned_selection_ms`` / ``learned_call_ms``: the learned selector (a per-layer scorer with random weights: the
  same ops and shapes as a trained one) through its Triton kernels alone and with the attention over its tiles;
  ``learned_torch_selection_ms``: its PyTorch definition; ``learned_rows_identical``: rows on which both agree;
* ``probe_selection_ms`` / ``probe_call_ms``: selector ``"probe"`` (the fused kernel of ``hf_sparsek.kernels.probe``:
  exact attention of every 16th query row; ``probe_stride32_selection_ms`` samples every 32nd) alone and as the
  whole call; ``probe_rows{64,256}_selection_ms``: the kernel with fewer / more sampled rows sharing each key load
  (default 128);
* ``moment_selection_ms`` / ``moment_call_ms``: selector ``"moment"`` (``select_by_moment``: the key tiles' mean /
  variance, every 8th query row's features, the mass kernel's fused launch over (head x sampled row) rows) alone and
  as the whole call; ``moment_stride16_selection_ms`` samples every 16th row; ``moment_rows{R}_w{W}_selection_ms``
  its launch shapes;
* ``refine_selection_ms`` / ``refine_call_ms``: selector ``"refine"`` (``hf_sparsek.selection.refine``: the mass
  kernel with 4x the budget, then the fused exact stage over those candidates) alone and as the whole call;
  ``refine_stage2_ms``: its second stage alone on candidates made beforehand;
* ``index_build_torch_ms`` / ``index_build_triton_ms``: the block index from the selected tiles, by the PyTorch
  ops or by the Triton list kernel (``build_block_index(builder=...)``; the call uses the kernel on CUDA);
* with ``--baseline-kernels DIR``: an earlier copy of the kernels package as ``DIR/kernels_baseline`` (for
  example ``git archive <commit> kernels | tar -x -C DIR && mv DIR/kernels DIR/kernels_baseline``; not in git), timed
  in the same run: ``baseline_mass_kernel_ms`` / ``mass_kernel_ms`` (``select_by_mass``, default launch: pooling and
  the fused kernel), ``baseline_probe_kernel_ms`` / ``probe_kernel_ms`` (``select_by_probe``, stride 16),
  ``baseline_learned_selection_ms`` (the learned selector with the baseline's ``learned_topk``)
  and whether both choose the same tile sets;
* with ``--minference-file``: ``minference_call_ms``, MInference's block-sparse top-k attention
  (``block_sparse_attention`` of ``minference/ops/block_sparse_flash_attention.py``: mean-pooled q/k scores, its
  ``torch.topk`` index, its padding copies and its Triton kernel, all timed) with ``top_k`` = the tiles our
  pattern's longest row visits
  (equal budget); its kernel takes one KV head per query head, so K/V are repeated to the query heads beforehand
  (outside the timing). The file is not part of this repository: fetch github.com/microsoft/MInference (MIT) and
  pass the path.

Target: ``selection_ms <= 0.15 * attention_ms``. A check at the first length compares the kernels' tiles with the
PyTorch definitions on the same bf16 inputs (tf32 dot products on the GPU: near-ties may differ; the mass the
kernel's tiles capture, under the definition's estimate, is reported beside the definition's own).
Writes ``selection_bench.json`` through ``scripts/common.write_json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--cpu-smoke" in sys.argv:  # before triton is imported: @triton.jit picks interpreted mode at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from hf_sparsek import SparsePattern, build_block_index  # noqa: E402
from hf_sparsek.ops import build_index_for, sparse_attention  # noqa: E402
from hf_sparsek.selection import select_meanpool  # noqa: E402
from hf_sparsek.selection.mass import select_mass, tile_mass  # noqa: E402
from hf_sparsek.selection.moment import (  # noqa: E402
    MOMENT_STRIDE,
    MOMENT_VARIANCE,
    moment_tile_mass,
    select_moment,
)
from hf_sparsek.selection.oracle import exact_tile_mass  # noqa: E402
from hf_sparsek.selection.probe import probe_rows, select_probe  # noqa: E402
from hf_sparsek.selection.refine import candidate_pattern, select_refine  # noqa: E402
from hf_sparsek.selection.tiles import tile_grid  # noqa: E402
from scripts.common import write_json  # noqa: E402

TARGET_SHARE = 0.15


def _inputs(seq: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq, dim, generator=gen, device=device).to(dtype)
    k = torch.randn(1, kv_heads, seq, dim, generator=gen, device=device).to(dtype)
    v = torch.randn(1, kv_heads, seq, dim, generator=gen, device=device).to(dtype)
    return q, k, v


def _timer(smoke: bool):
    if smoke:
        def run(fn) -> float:
            fn()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        return run
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _agreement(kernel: torch.Tensor, torch_tiles: torch.Tensor, mass: torch.Tensor) -> dict:
    """Share of identical tile rows, and the mass (under the definition's own estimate) each tile set captures."""

    def captured(tiles: torch.Tensor) -> float:
        picked = torch.gather(mass, -1, tiles.clamp(min=0).long()) * (tiles >= 0)
        return float(picked.sum(-1).mean())

    same = (kernel.sort(-1).values == torch_tiles.sort(-1).values).all(-1).float().mean()
    return {"rows_identical": float(same), "mass_kernel_tiles": captured(kernel),
            "mass_definition_tiles": captured(torch_tiles)}


def _check(q, k, pattern) -> dict:
    """Kernel tiles vs the PyTorch definition, for the mass, probe, moment and refine selectors."""
    grid = tile_grid(q.shape[2], k.shape[2], 0, 0, None, pattern, 1, q.device)
    mass = tile_mass(q, k, grid, pattern.block_size, 0, 0, None)
    out = _agreement(select_mass(q, k, pattern, 0, 0, None, backend="triton"),
                     select_mass(q, k, pattern, 0, 0, None, backend="torch"), mass)
    probe = pattern.replace(selector="probe")
    probed = exact_tile_mass(q, k, pattern.block_size, 0, 0, None, rows=probe_rows(q.shape[2], 0, 16, q.device))
    out["probe"] = _agreement(select_probe(q, k, probe, 0, 0, None, backend="triton"),
                              select_probe(q, k, probe, 0, 0, None, backend="torch"), probed)
    moment = pattern.replace(selector="moment")
    estimate = moment_tile_mass(q, k, grid, pattern.block_size, 0, 0, None)
    out["moment"] = _agreement(select_moment(q, k, moment, 0, 0, None, backend="triton"),
                               select_moment(q, k, moment, 0, 0, None, backend="torch"), estimate)
    refine = pattern.replace(selector="refine")
    out["refine"] = _agreement(select_refine(q, k, refine, 0, 0, None, backend="triton"),
                               select_refine(q, k, refine, 0, 0, None, backend="torch"), probed)
    return out


@torch.no_grad()
def _same_sets(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tile lists hold the same tiles per row (order aside)."""
    return bool(torch.equal(a.sort(-1).values, b.sort(-1).values))


def _bench_length(seq: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str,
                  pattern: SparsePattern, bench, minference=None, baseline=None) -> dict:
    """The timings of one length (see the module docstring)."""
    from hf_sparsek.triton_ops import triton_block_sparse_attention

    q, k, v = _inputs(seq, heads, kv_heads, dim, dtype, device)
    index = build_index_for(q, k, pattern)
    meanpool = pattern.replace(selector="meanpool")
    scale = dim ** -0.5
    row = {"seq": seq, "batch": 1, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
           "dtype": str(dtype).replace("torch.", ""), "pattern": pattern.to_dict()}
    select = lambda: select_mass(q, k, pattern, 0, 0, None, backend="triton")  # noqa: E731
    bench(select)  # discarded: a length's first timing read 0.191 ms where the same call timed later read 0.143
    row["selection_ms"] = bench(select)
    row["meanpool_selection_ms"] = bench(lambda: select_meanpool(q, k, meanpool, 0, 0, None))
    probe = pattern.replace(selector="probe")
    row["probe_selection_ms"] = bench(lambda: select_probe(q, k, probe, 0, 0, None, backend="triton"))
    row["probe_stride32_selection_ms"] = bench(lambda: select_probe(q, k, probe, 0, 0, None, stride=32,
                                                                    backend="triton"))
    from hf_sparsek.kernels.probe import select_by_probe

    for rows in (64, 256):  # key reuse vs registers (the default shares each key load among 128 rows)
        row[f"probe_rows{rows}_selection_ms"] = bench(lambda r=rows: select_by_probe(
            q, k, None, None, None, block=pattern.block_size, q_offset=0, kv_offset=0, sink=pattern.sink_tokens,
            topk=pattern.topk_blocks, window=pattern.window, threshold=None, scale=scale, stride=16,
            rows_per_program=r))
    from hf_sparsek.kernels.selection import select_by_mass

    mass_tiles = select_mass(q, k, pattern, 0, 0, None, backend="triton")
    for rows, warps in ((16, 8), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)):  # the mass kernel's launch shape
        mass_call = lambda r=rows, w=warps: select_by_mass(  # noqa: E731
            q, k, None, None, None, block=pattern.block_size, q_offset=0, kv_offset=0, sink=pattern.sink_tokens,
            topk=pattern.topk_blocks, window=pattern.window, threshold=None, scale=scale, rows_per_program=r,
            num_warps=w)
        row[f"mass_rows{rows}_w{warps}_selection_ms"] = bench(mass_call)
        row[f"mass_rows{rows}_w{warps}_same_tiles"] = bool(torch.equal(mass_call(), mass_tiles))
    row.update(_learned_cost(q, k, v, pattern, bench, baseline))
    if baseline is not None:
        args = dict(block=pattern.block_size, q_offset=0, kv_offset=0, sink=pattern.sink_tokens,
                    topk=pattern.topk_blocks, window=pattern.window, threshold=None, scale=scale)
        row["mass_kernel_ms"] = bench(lambda: select_by_mass(q, k, None, None, None, **args))
        row["baseline_mass_kernel_ms"] = bench(lambda: baseline.selection.select_by_mass(q, k, None, None, None,
                                                                                          **args))
        row["baseline_mass_same_tile_sets"] = _same_sets(baseline.selection.select_by_mass(
            q, k, None, None, None, **args), select_by_mass(q, k, None, None, None, **args))
        row["probe_kernel_ms"] = bench(lambda: select_by_probe(q, k, None, None, None, stride=16, **args))
        row["baseline_probe_kernel_ms"] = bench(lambda: baseline.probe.select_by_probe(q, k, None, None, None,
                                                                                        stride=16, **args))
        row["baseline_probe_same_tile_sets"] = _same_sets(baseline.probe.select_by_probe(
            q, k, None, None, None, stride=16, **args), select_by_probe(q, k, None, None, None, stride=16, **args))
    row.update(_moment_cost(q, k, v, pattern, bench))
    refine = pattern.replace(selector="refine")
    row["refine_selection_ms"] = bench(lambda: select_refine(q, k, refine, 0, 0, None, backend="triton"))
    from hf_sparsek.kernels.refine import refine_candidates

    candidates = select_mass(q, k, candidate_pattern(refine), 0, 0, None, backend="triton")
    row["refine_stage2_ms"] = bench(lambda: refine_candidates(
        q, k, None, None, None, candidates, block=pattern.block_size, q_offset=0, kv_offset=0,
        sink=pattern.sink_tokens, topk=pattern.topk_blocks, window=pattern.window, scale=scale, stride=16))
    row["refine_call_ms"] = bench(lambda: sparse_attention(q, k, v, refine, backend="triton"))
    row["probe_call_ms"] = bench(lambda: sparse_attention(q, k, v, probe, backend="triton"))
    row["attention_ms"] = bench(lambda: triton_block_sparse_attention(q, k, v, index, scale))
    row["call_ms"] = bench(lambda: sparse_attention(q, k, v, pattern, backend="triton"))
    tiles = select_mass(q, k, pattern, 0, 0, None, backend="triton")
    shape = dict(batch=1, kv_heads=kv_heads, q_len=seq, kv_len=seq, topk_tiles=tiles, device=q.device)
    for builder in ("torch", "triton"):
        row[f"index_build_{builder}_ms"] = bench(lambda b=builder: build_block_index(pattern, builder=b, **shape))
    row["selection_share_of_attention"] = row["selection_ms"] / row["attention_ms"]
    row["learned_call_over_call"] = row["learned_call_ms"] / row["call_ms"]  # issue 23: <= 1
    row["probe_share_of_attention"] = row["probe_selection_ms"] / row["attention_ms"]
    row["refine_share_of_attention"] = row["refine_selection_ms"] / row["attention_ms"]
    row["moment_share_of_attention"] = row["moment_selection_ms"] / row["attention_ms"]
    row["meets_target"] = row["selection_share_of_attention"] <= TARGET_SHARE
    if minference is not None:
        visited = int((index.full_count + index.part_count).max().item())
        group = heads // kv_heads
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16  # its kernel: 16-bit only
        q_m, k_rep, v_rep = q.to(half), k.repeat_interleave(group, 1).to(half), v.repeat_interleave(group, 1).to(half)
        call = lambda: minference.block_sparse_attention(q_m, k_rep, v_rep, visited)  # noqa: E731
        out = call()
        row["minference_top_k"] = visited
        row["minference_finite"] = bool(torch.isfinite(out).all().item())
        row["minference_call_ms"] = bench(call)
        row["call_over_minference"] = row["call_ms"] / row["minference_call_ms"]
        row["probe_call_over_minference"] = row["probe_call_ms"] / row["minference_call_ms"]
    return row


def _moment_cost(q, k, v, pattern: SparsePattern, bench) -> dict:
    """Selector "moment" (stride 8 and 16): alone, as the whole call, and its launch shapes."""
    from hf_sparsek.kernels.selection import select_by_moment

    moment = pattern.replace(selector="moment")
    row = {"moment_selection_ms": bench(lambda: select_moment(q, k, moment, 0, 0, None, backend="triton")),
           "moment_stride16_selection_ms": bench(lambda: select_moment(q, k, moment, 0, 0, None, stride=16,
                                                                       backend="triton"))}
    default = select_moment(q, k, moment, 0, 0, None, backend="triton")
    for rows, warps in ((32, 4), (64, 4), (128, 4), (128, 8), (256, 8)):
        call = lambda r=rows, w=warps: select_by_moment(  # noqa: E731
            q, k, None, None, None, block=pattern.block_size, q_offset=0, kv_offset=0, sink=pattern.sink_tokens,
            topk=pattern.topk_blocks, window=pattern.window, threshold=None, scale=q.shape[-1] ** -0.5,
            stride=MOMENT_STRIDE, variance=MOMENT_VARIANCE, rows_per_program=r, num_warps=w)
        row[f"moment_rows{rows}_w{warps}_selection_ms"] = bench(call)
        row[f"moment_rows{rows}_w{warps}_same_tiles"] = _same_sets(call(), default)
    row["moment_call_ms"] = bench(lambda: sparse_attention(q, k, v, moment, backend="triton"))
    return row


def _learned_cost(q, k, v, pattern: SparsePattern, bench, baseline=None) -> dict:
    """The learned selector's cost at inference (issue 23: no more than the training-free selector's): a fresh
    per-layer scorer with perturbed weights (the same ops and shapes as a trained one) choosing the pattern's budget,
    alone through the Triton kernels (the default on CUDA) and through the PyTorch definition, and with the attention
    over its tiles (``selected_tiles``), as a model layer runs it (no decode store: a prefill).
    ``learned_rows_identical``: the share of (query tile, KV head) rows whose tiles the two backends agree on."""
    from hf_sparsek.learned.selector import LearnedSelector

    selector = LearnedSelector([0], k.shape[1], q.shape[-1], pattern.block_size).to(q.device)
    gen = torch.Generator(device=q.device).manual_seed(0)
    with torch.no_grad():  # off the identity initialisation, so every term of the scorer does work
        for p in selector.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=q.device) * 0.05)
    learned = pattern.replace(selector="learned")

    def select(backend: str = "auto") -> torch.Tensor:
        return selector.select(0, q, k, pattern.topk_blocks, pattern.sink_tokens, pattern.window, 0, 0, None,
                               use_store=False, backend=backend)

    def call() -> torch.Tensor:
        return sparse_attention(q, k, v, learned, backend="triton", selected_tiles=select())

    same = (select("triton") == select("torch")).all(-1).float().mean().item()
    row = {"learned_selection_ms": bench(select), "learned_torch_selection_ms": bench(lambda: select("torch")),
           "learned_call_ms": bench(call), "learned_rows_identical": same}
    if baseline is not None:  # the same selector with the baseline's fused top-k (the lab may swap it; ops may not)
        import hf_sparsek.kernels.learned_selection as current

        ours = current.learned_topk
        tiles = select()
        base = baseline.learned_selection.learned_topk  # takes its key constants contiguous
        current.learned_topk = lambda qp, kp, kc, *a, **kw: base(qp, kp, kc.contiguous(), *a, **kw)
        try:
            row["baseline_learned_selection_ms"] = bench(select)
            row["baseline_learned_same_tile_sets"] = _same_sets(select(), tiles)
        finally:
            current.learned_topk = ours
    return row


def _load_minference(path: str | None):
    """MInference's block-sparse module from a file (it imports only numpy, torch and triton), or None."""
    if path is None:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("minference_block_sparse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_baseline(folder: str | None):
    """``kernels_baseline`` (an earlier copy of the kernels package) from ``folder``, or None."""
    if folder is None:
        return None
    import importlib

    sys.path.insert(0, os.path.abspath(folder))
    package = importlib.import_module("kernels_baseline")
    for name in ("selection", "learned_selection", "probe"):
        importlib.import_module(f"kernels_baseline.{name}")
    return package


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, Triton interpreter")
    ap.add_argument("--seqs", default=None, help="comma-separated lengths (default 16384,65536; smoke 400)")
    ap.add_argument("--topk", type=int, default=24)
    ap.add_argument("--minference-file", default=None,
                    help="path of MInference's minference/ops/block_sparse_flash_attention.py to time beside ours")
    ap.add_argument("--baseline-kernels", default=None,
                    help="folder holding an earlier copy of the kernels package as kernels_baseline, timed beside ours")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU check")
    device = "cpu" if smoke else "cuda"
    heads, kv_heads, dim, dtype = (4, 2, 64, torch.float32) if smoke else (32, 8, 128, torch.bfloat16)
    seqs = [int(s) for s in (args.seqs or ("400" if smoke else "16384,65536")).split(",")]
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=256, topk_blocks=args.topk, selector="mass")
    bench = _timer(smoke)
    minference = _load_minference(args.minference_file)
    baseline = _load_baseline(args.baseline_kernels)
    if not smoke:  # the first timing must not pay the GPU's clock ramp from idle (it read 15% high once)
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(200):
            a @ a
        torch.cuda.synchronize()
    results = []
    for i, seq in enumerate(seqs):
        row = _bench_length(seq, heads, kv_heads, dim, dtype, device, pattern, bench, minference, baseline)
        if i == 0:
            row["check"] = _check(*_inputs(seq, heads, kv_heads, dim, dtype, device)[:2], pattern)
        results.append(row)
        print(json.dumps(row), flush=True)
    env = {"device": torch.cuda.get_device_name() if not smoke else "cpu (Triton interpreter)",
           "torch": torch.__version__, "smoke": smoke}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    write_json(os.path.join(args.out, "selection_bench.json"),
               {"env": env, "target_share": TARGET_SHARE, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
