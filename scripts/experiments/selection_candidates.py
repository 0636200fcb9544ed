"""Compare candidate block-mass estimators by selection recall on one model's captured q/k (issue 22's choice).

    python -m scripts.experiments.selection_candidates --seq-len 2048 --out /tmp/selexp

Captures q (after RoPE) and k of every layer of SmolLM2-135M on the first 2048-token window of the plays (as
``hf-sparsek eval selection`` does), then for each candidate selector and budget: coverage of true attention mass
and the oracle's coverage at the same tile budget (eval/selection_recall.py), mean over layers and KV heads.
Candidates are defined here (experiment only); the chosen one lives in ``hf_sparsek.selection``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from hf_sparsek.eval.selection_recall import block_attention_mass, coverage, oracle_index, tiles_per_query_tile

from hf_sparsek.ops import build_index_for
from hf_sparsek.patterns import SparsePattern
from hf_sparsek.selection.meanpool import select_meanpool
from hf_sparsek.selection.tiles import choose_tiles, tile_grid


def pool(x: torch.Tensor, offset: int, block: int, how: str) -> torch.Tensor:
    """(B, H, n_tiles, D) mean / max / min over each absolute-grid tile (all rows real here)."""
    b, h, length, d = x.shape
    shift = offset % block
    n = (shift + length + block - 1) // block
    back = n * block - shift - length
    fill = {"mean": 0.0, "max": float("-inf"), "min": float("inf")}[how]
    xp = torch.nn.functional.pad(x, (0, 0, shift, back), value=fill).view(b, h, n, block, d)
    if how == "mean":
        cnt = torch.nn.functional.pad(torch.ones(length), (shift, back)).view(n, block).sum(-1).clamp(min=1)
        return xp.sum(3) / cnt.view(1, 1, n, 1)
    return xp.amax(3) if how == "max" else xp.amin(3)


def probe_logits(q, k, block, rows_per_tile):
    """(B, Hq, n_q, n_k) exact log-mass per key tile of probe rows (the last ``rows`` of each tile), averaged."""
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    n = (length + block - 1) // block
    kf = k.repeat_interleave(hq // hkv, 1)
    out = torch.zeros(b, hq, n, n)
    for m in range(n):
        last = min(length, (m + 1) * block) - 1
        rows = torch.linspace(m * block, last, rows_per_tile + 1)[1:].round().long() if rows_per_tile > 1 else \
            torch.tensor([last])
        s = torch.einsum("bhrd,bhkd->bhrk", q[:, :, rows], kf[:, :, : last + 1]) / math.sqrt(d)
        s = s.masked_fill(torch.arange(last + 1).view(1, -1) > rows.view(-1, 1), float("-inf"))
        p = s.softmax(-1)
        p = torch.nn.functional.pad(p, (0, n * block - last - 1)).view(b, hq, len(rows), n, block).sum(-1).mean(2)
        out[:, :, m] = p.clamp(min=1e-30).log()
    return out


def estimate(name: str, q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """(B, Hq, n_q, n_k) estimated log block mass (up to a per-row constant) of candidate ``name``."""
    d = q.shape[-1]
    hq, hkv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(d)
    qm = pool(q, 0, block, "mean")
    rep = lambda t: t.repeat_interleave(hq // hkv, 1)  # noqa: E731
    km, kmax, kmin = (rep(pool(k, 0, block, h)) for h in ("mean", "max", "min"))
    logc = math.log(block)
    if name.startswith("mean"):
        return scale * torch.einsum("bhmd,bhnd->bhmn", qm, km) + logc
    if name.startswith("quest"):
        qe = qm.unsqueeze(3)
        return scale * torch.maximum(qe * kmax.unsqueeze(2), qe * kmin.unsqueeze(2)).sum(-1)
    if name.startswith("halfquest"):
        qe = qm.unsqueeze(3)
        bound = torch.maximum(qe * kmax.unsqueeze(2), qe * kmin.unsqueeze(2)).sum(-1)
        return scale * 0.5 * (bound + torch.einsum("bhmd,bhnd->bhmn", qm, km))
    if name.startswith("probe1"):
        return probe_logits(q, k, block, 1)
    if name.startswith("probe4"):
        return probe_logits(q, k, block, 4)
    if name.startswith("lastq"):  # the last query row of the tile against the mean key (MInference-like, pooled)
        b, h, length, _ = q.shape
        n = (length + block - 1) // block
        last = torch.clamp((torch.arange(n) + 1) * block - 1, max=length - 1)
        return scale * torch.einsum("bhmd,bhnd->bhmn", q[:, :, last], km) + logc
    raise ValueError(name)


def candidate_tiles(name: str, q, k, pattern: SparsePattern, combine: str = "sum") -> torch.Tensor:
    if name == "meanpool":
        return select_meanpool(q, k, pattern, 0, 0, None)
    b, hq, length, _ = q.shape
    hkv = k.shape[1]
    grid = tile_grid(length, k.shape[2], 0, 0, None, pattern, b, q.device)
    logits = estimate(name, q, k, pattern.block_size)
    cand = grid.candidate.expand(b, hq, grid.n_q, grid.n_k)
    p = logits.masked_fill(~cand, float("-inf")).softmax(-1).view(b, hkv, hq // hkv, grid.n_q, grid.n_k)
    p = p.sum(2) / (hq // hkv) if combine == "sum" else p.amax(2)
    p = p / p.sum(-1, keepdim=True)
    return choose_tiles(p, grid, pattern.topk_blocks, pattern.mass_threshold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default="/tmp/selexp")
    ap.add_argument("--candidates", default="meanpool,mean,quest,halfquest,lastq,probe1,probe4")
    ap.add_argument("--patterns", nargs="+", default=[
        '{"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 4}',
        '{"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 8}',
    ])
    ap.add_argument("--combine", default="sum")
    ap.add_argument("--tag", default="run", help="suffix of the results file name")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cache = os.path.join(args.out, f"qk_{args.seq_len}.pt")
    if os.path.exists(cache):
        captured = torch.load(cache)
    else:
        from hf_sparsek.eval.cli import _first_window
        from hf_sparsek.eval.modeling import load_model
        from hf_sparsek.eval.selection_recall import capture_qk

        model, tok, _ = load_model("smollm2-135m", torch.device("cpu"), torch.float32, None)
        ns = argparse.Namespace(data="shakespeare", text_column="text", split="test", dataset_config=None,
                                max_documents=None, cache_dir=None, seq_len=args.seq_len)
        captured = capture_qk(model, _first_window(ns, tok, torch.device("cpu")))
        torch.save(captured, cache)
    results = []
    for text in args.patterns:
        pattern = SparsePattern.from_dict(json.loads(text))
        block = pattern.block_size
        names = args.candidates.split(",")
        sums = {name: {"cov": [], "ora": [], "tiles": [], "per_layer": [], "seconds": 0.0} for name in names}
        for layer, (q, k, scale) in sorted(captured.items()):
            mass = block_attention_mass(q, k, block, scale, dtype=torch.float32)  # once per layer, all candidates
            floor = oracle_index(q, k, 0, block, sink_tokens=block, local_blocks=2, scale=scale, mass=mass)
            for name in names:
                start = time.perf_counter()
                sel = candidate_tiles(name, q, k, pattern, args.combine)
                index = build_index_for(q, k, pattern, selected_tiles=sel)
                budget = (tiles_per_query_tile(index) - tiles_per_query_tile(floor)).clamp(min=0)
                oracle = oracle_index(q, k, budget, block, sink_tokens=block, local_blocks=2, scale=scale, mass=mass)
                c = float(coverage(q, k, index, scale, dtype=torch.float32).mean())
                o = float(coverage(q, k, oracle, scale, dtype=torch.float32).mean())
                acc = sums[name]
                acc["cov"].append(c)
                acc["ora"].append(o)
                acc["per_layer"].append((layer, round(c, 4), round(o, 4)))
                acc["tiles"].append(float(tiles_per_query_tile(index).double().mean()))
                acc["seconds"] += time.perf_counter() - start
        for name in names:
            acc = sums[name]
            row = {"pattern": text, "candidate": name, "combine": args.combine,
                   "coverage": sum(acc["cov"]) / len(acc["cov"]), "oracle": sum(acc["ora"]) / len(acc["ora"]),
                   "tiles": sum(acc["tiles"]) / len(acc["tiles"]), "per_layer": acc["per_layer"],
                   "seconds": acc["seconds"]}
            results.append(row)
            print(f"{name:10s} {args.combine} {text}: coverage {row['coverage']:.4f} oracle {row['oracle']:.4f} "
                  f"tiles {row['tiles']:.2f} ({row['seconds']:.0f}s)", flush=True)
    with open(os.path.join(args.out, f"candidates_{args.combine}_{args.tag}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
