"""Per-layer top-k budgets calibrated offline: spend a density budget where it buys the most attention mass.

A uniform ``topk_blocks`` gives every layer the same number of chosen tiles, but layers differ: on SmolLM2-135M a
sink + window covers 0.47-0.71 of the attention mass in layers 3-10 and 0.84-0.98 from layer 11 on, so a tile
chosen in layer 5 buys far more mass than one in layer 20. This module measures that and moves the budget:

1. record q and k of every layer on a few windows of text (:func:`~hf_sparsek.eval.selection_recall.capture_qk`);
2. per layer, the exact mass of every key tile per query tile, and the part of it the static sink / window keeps
   (``hf_sparsek.selection.oracle.tile_mass_within``); for k = 0 .. ``max_topk``, the tiles the pattern's selector
   chooses with budget k, the mass they add and the density they cost (token-exact: a chosen tile adds the causal
   pairs the static part does not keep, as the kernels attend it);
3. greedily, one tile of one layer at a time, add the tile with the most mass per density until the mean density
   over the layers reaches the target (by default the uniform pattern's own), giving each layer its own k.

The result is a :class:`~hf_sparsek.patterns.ModelSparsity` (``layer_overrides`` per layer) that every command
takes as a pattern file. Exact and slow: one dense softmax per layer and window (eval only).

Measured (docs/evaluation.md, SmolLM2-135M at 4K): the calibrated budgets cover more mass at equal density (0.903
against 0.868) and raise perplexity (+9.6% against +5.6%): mean mass covered is the wrong objective across layers,
so no shipped default uses it; the per-layer curves remain a measurement.
"""

from __future__ import annotations

import heapq
from typing import Any

import torch

from hf_sparsek.masks import exact_token_mask
from hf_sparsek.patterns import ModelSparsity, SparsePattern
from hf_sparsek.selection import select_tiles
from hf_sparsek.selection.oracle import tile_mass_within
from hf_sparsek.selection.tiles import choose_tiles, tile_grid

from .selection_recall import capture_qk

CALIBRATED_SELECTORS = ("mass", "meanpool", "probe", "oracle")


def layer_curve(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, max_topk: int) -> dict[str, list[float]]:
    """Mass covered and density of one layer for budgets k = 0 .. ``max_topk`` of ``pattern``'s selector.

    q (B, Hq, L, D), k (B, Hkv, L, D) of one full window (queries and keys from position 0). ``coverage[k]``: mean
    over (batch, KV head, query tile) of the exact mass on the attended pairs; ``density[k]``: attended over causal
    pairs, mean over (batch, KV head). Token-exact: the static part counts the pairs it keeps, a chosen tile adds
    the rest of its causal pairs (as the kernels attend it)."""
    batch, _, length, _ = q.shape
    block = pattern.block_size
    grid = tile_grid(length, length, 0, 0, None, pattern, batch, q.device)
    static_mask = exact_token_mask(pattern.replace(topk_blocks=None), length, length, q_offset=0,
                                   device=q.device)[0, 0]  # (L, L): sink / window, causal
    mass, static_mass = tile_mass_within(q, k, block, 0, 0, None, keep=static_mask)  # (B, Hkv, n_q, n_k)
    pairs = _causal_pairs_per_tile(length, block, grid.n_q, grid.n_k, q.device)  # (n_q, n_k)
    static_pairs = _pairs_per_tile(static_mask, block, grid.n_q, grid.n_k)
    causal = float(pairs.sum())
    static_cov = static_mass.sum(-1)  # (B, Hkv, n_q)
    coverage, density = [float(static_cov.mean())], [float(static_pairs.sum()) / causal]
    for budget in range(1, max_topk + 1):
        tiles = _choose(q, k, pattern.replace(topk_blocks=budget), grid, mass).long()  # (B, Hkv, n_q, budget)
        dump = torch.zeros(*mass.shape[:-1], grid.n_k + 1, dtype=mass.dtype, device=mass.device)
        chosen = dump.scatter_(-1, torch.where(tiles >= 0, tiles, grid.n_k), 1.0)[..., : grid.n_k]
        coverage.append(float((static_cov + (chosen * (mass - static_mass)).sum(-1)).mean()))
        extra = (chosen * (pairs - static_pairs)).sum((-1, -2))  # (B, Hkv)
        density.append(density[0] + float((extra / causal).mean()))
    return {"coverage": coverage, "density": density}


def _pairs_per_tile(mask: torch.Tensor, block: int, n_q: int, n_k: int) -> torch.Tensor:
    """(n_q, n_k) float: True pairs of an (L, L) mask per tile pair (tiles from position 0)."""
    length = mask.shape[0]
    padded = torch.nn.functional.pad(mask.float(), (0, n_k * block - length, 0, n_q * block - length))
    return padded.view(n_q, block, n_k, block).sum((1, 3))


def _causal_pairs_per_tile(length: int, block: int, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """(n_q, n_k) float: causal (query, key) pairs in each tile pair of a window of ``length`` from position 0."""
    t = torch.arange(length, device=device)
    start = torch.arange(n_k, device=device) * block
    per_row = (torch.minimum(t.view(-1, 1) + 1, (start + block).clamp(max=length)) - start).clamp(min=0)  # (L, n_k)
    out = torch.zeros(n_q, n_k, device=device)
    return out.index_add_(0, t // block, per_row.float())


def _choose(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, grid: Any, mass: torch.Tensor) -> torch.Tensor:
    """The selector's tiles at this budget; the oracle's straight from the exact mass already computed."""
    if pattern.resolved_selector == "oracle":
        return choose_tiles(mass, grid, pattern.topk_blocks, pattern.mass_threshold)
    return select_tiles(q, k, pattern, 0, 0, None)


def allocate(curves: dict[int, dict[str, list[float]]], target_density: float) -> dict[int, int]:
    """Per layer k: greedy on mass gained per density spent until the mean density over the layers reaches
    ``target_density``. A step that buys no density (no tile left to choose) is skipped."""
    layers = sorted(curves)
    budget = {layer: 0 for layer in layers}
    spent = sum(curves[layer]["density"][0] for layer in layers)
    limit = target_density * len(layers)

    def step(layer: int) -> tuple[float, float] | None:
        cov, dens = curves[layer]["coverage"], curves[layer]["density"]
        now = budget[layer]
        for nxt in range(now + 1, len(cov)):  # the next budget that costs density (ties are skipped over)
            cost = dens[nxt] - dens[now]
            if cost > 1e-12:
                return (cov[nxt] - cov[now]) / cost, cost
        return None

    heap: list[tuple[float, int]] = []
    for layer in layers:
        s = step(layer)
        if s is not None:
            heapq.heappush(heap, (-s[0], layer))
    while heap:
        _, layer = heapq.heappop(heap)
        cov, dens = curves[layer]["coverage"], curves[layer]["density"]
        now = budget[layer]
        nxt = next(n for n in range(now + 1, len(cov)) if dens[n] - dens[now] > 1e-12)
        cost = dens[nxt] - dens[now]
        if spent + cost > limit + 1e-9:
            continue  # this layer's next tile does not fit; cheaper steps of other layers may
        budget[layer], spent = nxt, spent + cost
        s = step(layer)
        if s is not None:
            heapq.heappush(heap, (-s[0], layer))
    return budget


def calibrated_sparsity(base: SparsePattern, budgets: dict[int, int], source: str) -> ModelSparsity:
    """A ModelSparsity with ``base`` as default (its ``topk_blocks`` the most common budget) and one override per
    layer whose budget differs; a budget of 0 drops the selection from that layer."""
    counts: dict[int, int] = {}
    for value in budgets.values():
        counts[value] = counts.get(value, 0) + 1
    common = max(sorted(counts), key=lambda v: counts[v])
    default = base.replace(topk_blocks=common) if common else base.replace(topk_blocks=None)
    overrides = {layer: {"topk_blocks": k or None} for layer, k in sorted(budgets.items()) if k != common}
    if common == 0:  # the overrides add selection back: keep the selector fields the base had
        overrides = {layer: {"topk_blocks": k, "selector": base.selector, "mass_threshold": base.mass_threshold}
                     for layer, k in sorted(budgets.items()) if k}
    return ModelSparsity(default=default, layer_overrides=overrides, source=source)


@torch.inference_mode()
def calibrate(model: Any, windows: torch.Tensor, base: SparsePattern, max_topk: int,
              target_density: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Per-layer budgets for ``base`` (a pattern with ``topk_blocks``: its uniform budget is the comparison and,
    without ``target_density``, the density to match) on ``windows`` (W, L) token ids.

    Returns {"curves": {layer: {coverage, density}}, "budgets": {layer: k}, "uniform": {...}, "calibrated": {...},
    "sparsity": ModelSparsity dict}."""
    from tqdm.auto import tqdm

    from hf_sparsek.model_defaults import layer_kinds

    from .modeling import text_config

    if base.topk_blocks is None:
        raise ValueError("calibrate needs a pattern with topk_blocks (the uniform budget it starts from)")
    if base.resolved_selector not in CALIBRATED_SELECTORS:
        raise ValueError(f"calibrate ranks tiles with the pattern's selector; {base.resolved_selector!r} is not one "
                         f"of {CALIBRATED_SELECTORS} (a learned scorer's tiles come from the model)")
    if base.dense_heads or base.layout is not None or base.min_sparse_len:
        raise ValueError("calibrate takes a sink / window / top-k pattern; dense_heads, a block layout and "
                         f"min_sparse_len are not supported, got {base.describe()}")
    if max_topk < base.topk_blocks:
        raise ValueError(f"max_topk ({max_topk}) must be at least the pattern's topk_blocks ({base.topk_blocks})")
    kinds = layer_kinds(text_config(model))
    sums: dict[int, dict[str, list[float]]] = {}
    for w in tqdm(range(windows.shape[0]), desc="calibrate windows", disable=not progress):
        captured = capture_qk(model, windows[w: w + 1], device=windows.device)  # the GPU's speed where there is one
        for layer, (q, k, _) in tqdm(sorted(captured.items()), desc="layers", leave=False, disable=not progress):
            if layer < len(kinds) and kinds[layer] == "sliding_attention":
                continue  # the model's own sliding layers keep their window; no budget goes there
            curve = layer_curve(q, k, base, max_topk)
            acc = sums.setdefault(layer, {"coverage": [0.0] * (max_topk + 1), "density": [0.0] * (max_topk + 1)})
            for key in acc:
                acc[key] = [a + b / windows.shape[0] for a, b in zip(acc[key], curve[key], strict=True)]
    uniform_density = sum(c["density"][base.topk_blocks] for c in sums.values()) / len(sums)
    target = uniform_density if target_density is None else target_density
    budgets = allocate(sums, target)

    def summary(chosen: dict[int, int]) -> dict[str, float]:
        return {"coverage": sum(sums[layer]["coverage"][chosen[layer]] for layer in sums) / len(sums),
                "density": sum(sums[layer]["density"][chosen[layer]] for layer in sums) / len(sums)}

    sparsity = calibrated_sparsity(base, budgets, f"hf-sparsek eval calibrate: {base.describe()} at mean density "
                                   f"{target:.3f}, {windows.shape[0]} x {windows.shape[1]} tokens")
    return {"curves": {str(layer): c for layer, c in sorted(sums.items())},
            "budgets": {str(layer): b for layer, b in sorted(budgets.items())},
            "target_density": target, "uniform_topk": base.topk_blocks,
            "uniform": summary({layer: base.topk_blocks for layer in sums}),
            "calibrated": summary(budgets), "sparsity": sparsity.to_dict()}


def calibration_table(result: dict[str, Any]) -> str:
    """Markdown: per layer the budget, the mass covered at k = 0, at the uniform k and at the chosen k."""
    uniform_k = result["uniform_topk"]
    lines = [f"| layer | chosen k | coverage k=0 | coverage k={uniform_k} (uniform) | coverage (chosen k) | "
             "density (chosen k) |", "|---:|---:|---:|---:|---:|---:|"]
    for layer, k in result["budgets"].items():
        curve = result["curves"][layer]
        lines.append(f"| {layer} | {k} | {curve['coverage'][0]:.3f} | {curve['coverage'][uniform_k]:.3f} | "
                     f"{curve['coverage'][k]:.3f} | {curve['density'][k]:.3f} |")
    u, c = result["uniform"], result["calibrated"]
    lines.append(f"\nuniform: coverage {u['coverage']:.4f} at density {u['density']:.4f}; calibrated: coverage "
                 f"{c['coverage']:.4f} at density {c['density']:.4f} (exact attention mass, mean over layers)")
    return "\n".join(lines)
