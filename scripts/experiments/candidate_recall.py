"""Would a two-stage selector reach the oracle? Mass pre-selects candidates, an exact pass picks among them.

    python -m scripts.experiments.candidate_recall --seq-len 4096 --topk 7 --out /tmp/candidate_recall.json

On one window of a held-out play (SmolLM2-135M by default, float32, CPU), per layer: q and k of a dense forward
(``eval.selection_recall.capture_qk``), the true attention mass of every (query tile, key tile) per KV head
(``exact_tile_mass``, group mean), and for the pattern sink 64 + ``--window`` (256) + ``--topk`` tiles of 64:

* ``gain``: the true mass of the competing tiles a selector keeps, summed per query tile, relative to the oracle's
  (the best ``topk`` by true mass; 1.0 = the oracle's);
* ``mass``: today's ``"mass"`` selector; candidates ``c{c}``: the ``c x topk`` tiles it ranks first;
  ``oracle_within_mass_c{c}``: the oracle restricted to those candidates, the ceiling of a second, exact
  stage over them (what exact probing of the candidates could reach at most);
* ``probe_within_mass_c{c}``: probe's estimate (every 16th row, exact full-row softmax) ranks the candidates;
  ``refine_c{c}``: the same with each sampled row's softmax over the candidates, the static tiles and the diagonal
  only (what a second stage reading only those keys can compute);
* ``hit_mass_c{c}``: the share of the oracle's tiles among those candidates; ``probe``: selector ``"probe"``
  (exact scores of every 16th row over every causal key) at ``topk``; ``_p10``: the 10th percentile over
  (query tile, KV head) rows of the ratio (the rows that lose most).

The question it answers: how many candidates must the cheap estimate pass on so that an exact second stage, whose
cost then scales with the budget instead of the length, chooses about as well as the oracle.
"""

from __future__ import annotations

import argparse
import time

import torch

from eval.modeling import load_model
from eval.offline import load_documents
from eval.selection_recall import capture_qk
from hf_sparsek.patterns import SparsePattern
from hf_sparsek.selection import select_mass, select_probe
from hf_sparsek.selection.oracle import exact_tile_mass
from hf_sparsek.selection.probe import probe_rows
from hf_sparsek.selection.tiles import choose_tiles, tile_grid
from scripts.common import write_json


def _gain(mass: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, n_q) true mass of the chosen tiles (-1 = none; duplicates counted once)."""
    return (mass * _within(tiles, mass.shape[-1])).sum(-1)


def _within(tiles: torch.Tensor, n_k: int) -> torch.Tensor:
    """(B, Hkv, n_q, n_k) bool: the tiles listed."""
    return (tiles.unsqueeze(-1) == torch.arange(n_k)).any(-2)  # -1 matches no tile


def restricted_probe_mass(q: torch.Tensor, k: torch.Tensor, allowed_tiles: torch.Tensor, stride: int,
                          block: int = 64) -> torch.Tensor:
    """(B, Hkv, n_q, n_k): probe's estimate (sampled rows, group mean) with each row's softmax over the keys of
    ``allowed_tiles`` (B, Hkv, n_q, n_k) only, causal: what a second stage that reads only the candidates and the
    static tiles can compute (no full-row normaliser)."""
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    rows = probe_rows(length, 0, stride, q.device)
    q_tile = rows // block
    key_tile = torch.arange(length) // block
    scores = torch.einsum("bhgrd,bhsd->bhgrs", q[:, :, rows].view(batch, hkv, group, -1, dim), k) / dim ** 0.5
    allowed = allowed_tiles[:, :, q_tile][..., key_tile] & (torch.arange(length).view(1, -1) <= rows.view(-1, 1))
    probs = scores.masked_fill(~allowed.unsqueeze(2), float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)
    per_tile = probs.view(batch, hkv, -1, length // block, block).sum(-1)  # (B, Hkv, R, n_k)
    out = torch.zeros(batch, hkv, allowed_tiles.shape[2], allowed_tiles.shape[3])
    out.index_add_(2, q_tile, per_tile)
    return out / torch.bincount(q_tile, minlength=out.shape[2]).clamp(min=1).view(1, 1, -1, 1)


def layer_row(q: torch.Tensor, k: torch.Tensor, topk: int, factors: list[int], window: int = 256) -> dict:
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=window, topk_blocks=topk)
    mass = exact_tile_mass(q, k, 64, 0, 0, None)
    grid = tile_grid(q.shape[2], k.shape[2], 0, 0, None, pattern, q.shape[0], q.device)
    oracle = choose_tiles(mass, grid, topk, None)
    best = _gain(mass, oracle)
    rows = best > 1e-6  # query tiles with something to choose
    row: dict = {"oracle_gain": float(best[rows].mean())}

    def rel(tiles: torch.Tensor, name: str) -> None:
        ratio = _gain(mass, tiles)[rows] / best[rows]
        row[name] = float(ratio.mean())
        row[f"{name}_p10"] = float(ratio.quantile(0.1))  # the worst tenth of (query tile, KV head) rows

    oracle_member = _within(oracle, mass.shape[-1])
    probe = exact_tile_mass(q, k, 64, 0, 0, None, rows=probe_rows(q.shape[2], 0, 16, q.device))
    for c in factors:
        cand = select_mass(q, k, pattern.replace(topk_blocks=c * topk), 0, 0, None, backend="torch")
        member = _within(cand, mass.shape[-1])
        if c == 1:
            rel(cand, "mass")
        row[f"hit_mass_c{c}"] = float((oracle_member & member).sum() / oracle_member.sum().clamp(min=1))
        rel(choose_tiles(mass.masked_fill(~member, -1.0), grid, topk, None), f"oracle_within_mass_c{c}")
        rel(choose_tiles(probe.masked_fill(~member, -1.0), grid, topk, None), f"probe_within_mass_c{c}")
        diagonal = torch.eye(mass.shape[2], mass.shape[3], dtype=torch.bool).view(1, 1, *mass.shape[2:])
        allowed = member | grid.static_full | diagonal
        refined = restricted_probe_mass(q, k, allowed, 16)
        rel(choose_tiles(refined.masked_fill(~member, -1.0), grid, topk, None), f"refine_c{c}")
    rel(select_probe(q, k, pattern, 0, 0, None, stride=16), "probe")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=7)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--factors", default="1,2,4")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    factors = [int(x) for x in args.factors.split(",")]
    torch.manual_seed(0)
    model, tok, _ = load_model(args.model, torch.device("cpu"), torch.float32)
    doc = load_documents("shakespeare")[-1]  # a held-out play (the learned selector's split keeps the last plays out)
    ids = torch.tensor([tok(doc)["input_ids"][: args.seq_len]])
    start = time.perf_counter()
    captured = capture_qk(model, ids)
    layers = []
    for layer, (q, k, _) in sorted(captured.items()):
        layers.append({"layer": layer, **layer_row(q, k, args.topk, factors, args.window)})
        print(layers[-1], flush=True)
    keys = [key for key in layers[0] if key != "layer"]
    mean = {key: sum(r[key] for r in layers) / len(layers) for key in keys}
    write_json(args.out, {"model": args.model, "seq_len": args.seq_len, "topk": args.topk, "window": args.window,
                          "seconds": round(time.perf_counter() - start, 1), "mean": mean, "layers": layers})
    print("| measure | mean over layers |\n|---|---:|")
    for key, value in mean.items():
        print(f"| {key} | {value:.3f} |")


if __name__ == "__main__":
    main()
