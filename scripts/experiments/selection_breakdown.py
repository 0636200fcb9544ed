"""Where the mass and learned selectors' time goes, and launch variants of their kernels, in one run.

    python -m scripts.experiments.selection_breakdown --out DIR [--seqs 16384,65536]
    python -m scripts.experiments.selection_breakdown --out DIR --cpu-smoke   # tiny, Triton interpreter

B=1, 32 / 8 heads, D 128, bf16, sink 64 + window 256 + top-24 of 64-token tiles (the issue 22 / 23 cost case). Per
length (``triton.testing.do_bench`` medians, ms): the pooling launches alone, ``select_by_mass`` whole with the
default launch, float32 features (``half=False``) and top-1 (the running top-k's share), with the share of rows
whose tiles equal the default's; pooling launches by (rows per step, warps); the learned selector's pieces (key /
query pooling, the scorer's projections, the fused top-k at each gate precision) and whole; host enqueue time per
call (50 calls, one synchronisation); a ``torch.profiler`` table of both selectors' kernels. Writes
``selection_breakdown.json`` and ``profile_<seq>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from hf_sparsek.kernels import learned_selection as ls  # noqa: E402
from hf_sparsek.kernels import selection as ks  # noqa: E402

from hf_sparsek import SparsePattern  # noqa: E402
from hf_sparsek.learned.features import lagged_query_features  # noqa: E402
from hf_sparsek.learned.selector import LearnedSelector  # noqa: E402
from scripts.common import write_json  # noqa: E402

MASS_VARIANTS = {  # select_by_mass launches: the default (float16 features on CUDA), float32 features, top-1
    "base": {},
    "fp32": {"half": False},
    "base_top1": {"topk": 1},
}
POOL_SHAPES = [(16, 2), (32, 4), (64, 4), (16, 4)]  # (rows per step, warps)


def _timer(smoke: bool):
    if smoke:
        def run(fn) -> float:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return run
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _host_us(fn, smoke: bool) -> float:
    calls = 2 if smoke else 50
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return host


def _length(seq: int, device: str, smoke: bool, bench, out_dir: str) -> dict:
    heads, kv_heads, dim, block = (4, 2, 32, 64) if smoke else (32, 8, 128, 64)
    pattern = SparsePattern(block_size=block, sink_tokens=block, window=4 * block, topk_blocks=4 if smoke else 24,
                            selector="mass")
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    q = torch.randn(1, heads, seq, dim, generator=gen, device=device).to(dtype)
    k = torch.randn(1, kv_heads, seq, dim, generator=gen, device=device).to(dtype)
    row: dict = {"seq": seq, "heads": heads, "kv_heads": kv_heads, "dim": dim, "pattern": pattern.to_dict()}
    args = dict(block=block, q_offset=0, kv_offset=0, sink=pattern.sink_tokens, window=pattern.window,
                threshold=None, scale=dim ** -0.5)
    n_t = seq // block
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # the (B, L, H, D) storage models hand over
    for rows, warps in POOL_SHAPES:
        for name, x, is_q in (("q", q, True), ("k", k, False), ("qT", q_t, True)):
            row[f"pool_{name}_r{rows}_w{warps}_ms"] = bench(
                lambda x=x, is_q=is_q, r=rows, w=warps: ks.pool_features(x, 0, block, None, 0, is_q, torch.float16,
                                                                         r, w))
        for name, x, stats in (("learned_k", k, True), ("learned_q", q, False)):
            row[f"pool_{name}_r{rows}_w{warps}_ms"] = bench(
                lambda x=x, s=stats, r=rows, w=warps: ls.pool_tiles(x, 0, block, None, 0, key_stats=s,
                                                                    out_heads=kv_heads, rows=r, num_warps=w))
    if not smoke:
        row["torch_q_tile_sum_ms"] = bench(lambda: q.unflatten(2, (n_t, block)).sum(3, dtype=torch.float32))
        row["torch_k_tile_aminmax_ms"] = bench(lambda: torch.aminmax(k.unflatten(2, (n_t, block)), dim=3))
        row["torch_q_copy_ms"] = bench(lambda: q.clone())
        row["q_bytes"] = q.numel() * q.element_size()
    base = ks.select_by_mass(q, k, None, None, None, topk=pattern.topk_blocks, **args)
    for name, knobs in MASS_VARIANTS.items():
        kw = dict(knobs)
        topk = kw.pop("topk", pattern.topk_blocks)
        call = lambda kw=kw, topk=topk: ks.select_by_mass(q, k, None, None, None, topk=topk, **args, **kw)  # noqa: E731
        try:
            row[f"mass_{name}_ms"] = bench(call)
            if topk == pattern.topk_blocks:
                got = call()
                row[f"mass_{name}_rows_identical"] = float(
                    (got.sort(-1).values == base.sort(-1).values).all(-1).float().mean())
        except Exception as error:  # a variant that does not compile is a result too
            row[f"mass_{name}_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    row["mass_base_host_us"] = _host_us(lambda: ks.select_by_mass(q, k, None, None, None, topk=pattern.topk_blocks,
                                                                  **args), smoke)

    selector = LearnedSelector([0], kv_heads, dim, block).to(device)
    g2 = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for p in selector.parameters():
            p.add_(torch.randn(p.shape, generator=g2, device=device) * 0.05)
    scorer = selector.scorer(0)

    def select():
        return selector.select(0, q, k, pattern.topk_blocks, pattern.sink_tokens, pattern.window, 0, 0, None,
                               use_store=False, backend="triton")

    row["learned_select_ms"] = bench(select)
    row["learned_select_host_us"] = _host_us(select, smoke)
    row["learned_pool_k_ms"] = bench(lambda: ls.pool_tiles(k, 0, block, None, 0, key_stats=True, out_heads=kv_heads))
    row["learned_pool_q_ms"] = bench(lambda: ls.pool_tiles(q, 0, block, None, 0, key_stats=False, out_heads=kv_heads))
    k_feat = ls.pool_tiles(k, 0, block, None, 0, key_stats=True, out_heads=kv_heads)[0]
    sums, counts = ls.pool_tiles(q, 0, block, None, 0, key_stats=False, out_heads=kv_heads)
    q_feat = lagged_query_features(sums, counts[:, :1, :, None], None)
    with torch.no_grad():
        width = ls.gate_width(q_feat.shape[-1])
        row["learned_projections_ms"] = bench(lambda: scorer.kernel_inputs(q_feat, k_feat, width))
        qp, kp, const = scorer.kernel_inputs(q_feat, k_feat, width)
    n_q = q_feat.shape[2]
    bias = scorer.bias.detach().float().contiguous()
    ref = None
    for split in (1, 2) if smoke else (1, 2, 4):
        for name, x, stats in (("k", k, True), ("q", q, False)):
            row[f"learned_pool_{name}_split{split}_ms"] = bench(
                lambda x=x, s=stats, sp=split: ls.pool_tiles(x, 0, block, None, 0, key_stats=s, out_heads=kv_heads,
                                                             d_split=sp))
    for precision in ("ieee", "tf32x3"):
        call = lambda pr=precision: ls.learned_topk(  # noqa: E731
            qp, kp, const, bias, None, n_q=n_q, block=block, q_offset=0, kv_offset=0, kv_len=seq,
            sink=pattern.sink_tokens, window=pattern.window, topk=pattern.topk_blocks, gate_precision=pr)
        try:
            row[f"learned_topk_{precision}_ms"] = bench(call)
            got = call()
            ref = got if ref is None else ref
            row[f"learned_topk_{precision}_rows_identical"] = float((got == ref).all(-1).float().mean())
        except Exception as error:
            row[f"learned_topk_{precision}_error"] = f"{type(error).__name__}: {str(error)[:300]}"

    if not smoke:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            select()
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        with open(os.path.join(out_dir, f"learned_host_{seq}.txt"), "w") as handle:
            handle.write(text.getvalue())
    if torch.cuda.is_available() and not smoke:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                ks.select_by_mass(q, k, None, None, None, topk=pattern.topk_blocks, **args)
                select()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        with open(os.path.join(out_dir, f"profile_{seq}.txt"), "w") as handle:
            handle.write(table)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seqs", default="16384,65536")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    seqs = [700] if smoke else [int(s) for s in args.seqs.split(",")]
    bench = _timer(smoke)
    rows = []
    for seq in seqs:
        rows.append(_length(seq, device, smoke, bench, args.out))
        print(json.dumps(rows[-1], indent=1), flush=True)
    write_json(os.path.join(args.out, "selection_breakdown.json"), {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
