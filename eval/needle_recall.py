"""Needle recall: does a pattern's prefill selection keep the keys the answer row reads in a passkey prompt?

Passkey accuracy says whether a sparse model finds the needle; this says where it is lost. For each passkey prompt,
each attention layer and each query head, the prompt's last row (the row ``generate()``'s prefill uses to predict
the first answer token) is scored against dense attention:

* ``needle_mass``: the share of that row's dense attention on the needle sentence's tokens (how much the head
  reads the needle at all: retrieval heads read a lot);
* ``needle_kept``: the share of that mass on the (query, key) pairs the pattern's block index attends, the index
  built exactly as ``sparse_attention`` builds it for the whole prompt (top-k selectors included);
* ``row_kept``: the share of the row's whole attention on attended pairs.

Eval only: q and k come from one dense forward (:func:`capture_qk`), so a layer is scored on the activations dense
attention gives it, not on those of the sparse layers below it (as in :mod:`.selection_recall`). Later answer
tokens come from decode steps, which choose tiles for their own row; they are not measured here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_sparsek.ops import build_index_for, per_query_head_pattern
from hf_sparsek.patterns import SparsePattern

from .modeling import PatternSpec
from .selection_recall import _allowed_rows, capture_qk

TOP_HEADS = 10  # the (layer, query head) pairs that read the needle most, summarised on their own
ACTIVATIONS = ("dense", "sparse")  # whose q and k each pattern is scored on


def last_row_recall(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, needle: tuple[int, int],
                    scale: float | None = None) -> dict[str, torch.Tensor]:
    """Needle mass and kept shares of the last query row, per query head, for one prompt of one layer.

    q (1, Hq, n, D) and k (1, Hkv, n, D) of the whole prompt (positions 0..n-1); ``needle`` the prompt's
    [start, end) token span. Returns float64 tensors of shape (Hq,): ``needle_mass`` (dense attention of the last
    row on the needle), ``needle_covered`` (the part of it on pairs the pattern's index attends) and ``row_kept``
    (the row's whole attention on attended pairs). A ``per_query_head`` pattern is indexed as the op runs it, one
    key head per query head.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"q and k must be (1, heads, length, dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    n, hq, hkv = q.shape[2], q.shape[1], k.shape[1]
    if k.shape[2] != n or k.shape[3] != q.shape[3] or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same length and head dim, and query "
                         "heads a multiple of KV heads")
    start, end = needle
    if not 0 <= start < end <= n:
        raise ValueError(f"needle span {needle} is not inside the prompt's {n} tokens")
    group = hq // hkv
    keys = k
    if pattern.per_query_head and group > 1:
        keys = k.repeat_interleave(group, dim=1)
        pattern = per_query_head_pattern(pattern, hkv, group)
    if n <= pattern.min_sparse_len or (pattern.dense_tail and n > pattern.dense_tail):  # the last row dense
        pattern = SparsePattern(block_size=pattern.block_size)
    index = build_index_for(q, keys, pattern)
    last_tile = (n - 1 + index.q_shift) // index.block_size
    allowed = _allowed_rows(index, last_tile, n - 1, n)[0, :, 0]  # (index heads, n)
    allowed = allowed.repeat_interleave(hq // allowed.shape[0], dim=0)  # one row per query head
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.double().repeat_interleave(group, dim=1)[0]  # (Hq, n, D)
    probs = (torch.einsum("hd,hkd->hk", q[0, :, -1].double(), kf) * scale).softmax(-1)  # the last row sees all keys
    kept = probs * allowed
    return {"needle_mass": probs[:, start:end].sum(-1), "needle_covered": kept[:, start:end].sum(-1),
            "row_kept": kept.sum(-1)}


@torch.inference_mode()
def needle_recall(model: Any, cases: Mapping[tuple[int, float], Sequence[Any]], specs: list[PatternSpec],
                  device: torch.device | str | None = None, activations: str = "dense") -> list[dict[str, Any]]:
    """One row per (pattern, length, depth, layer): per query head, the mean over trials of the dense needle mass,
    the share of it the pattern keeps (summed over trials, then divided) and the row's kept share; one summary row
    per (pattern, length, depth) with ``layer`` None: the needle mass kept over all layers and heads, over the
    ``TOP_HEADS`` heads that read the needle most, and per trial.

    ``cases``: {(length, depth): [NeedleCase or (prompt, answer, (start, end))]}. Dense specs are skipped (they
    keep everything). The model's own sliding-window layers are skipped (their attention is not the causal softmax
    the pattern replaces). q and k are held on ``device`` (default: the model's) in the model's dtype, so top-k
    selectors choose as they do in the model. ``activations``: ``"dense"`` scores every pattern on one dense
    forward's q and k (and needle mass); ``"sparse"`` on each pattern's own forward (the pattern applied to the
    model, which keeps the last one), so a layer's choice is the one the sparse model makes from what the sparse
    layers below it computed; the needle mass is then that row's full softmax over the same q and k.
    """
    from hf_sparsek.model_defaults import layer_kinds, resolve_layer_pattern

    from .modeling import apply_pattern, density_summary, text_config

    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    specs = [s for s in specs if s.sparsity is not None]
    if not specs:
        raise ValueError("needle recall measures sparse patterns: pass at least one pattern other than 'dense'")
    config = text_config(model)
    kinds = layer_kinds(config)
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    sums: dict[tuple[str, int, float, int], dict[str, torch.Tensor]] = {}
    per_trial: dict[tuple[str, int, float], list[list[float]]] = {}
    for (length, depth), trials in tqdm(cases.items(), desc="needle recall", leave=False):
        for case in trials:
            prompt, needle = case[0], tuple(case[2])
            ids = torch.tensor([prompt], dtype=torch.long, device=param.device)
            dense = capture_qk(model, ids, device, dtype=None) if activations == "dense" else None
            trial = {spec.label: [0.0, 0.0] for spec in specs}
            for spec in specs:
                if dense is None:
                    apply_pattern(model, spec)
                captured = dense if dense is not None else capture_qk(model, ids, device, dtype=None, sparse=True)
                for layer, (q, k, scale) in sorted(captured.items()):
                    kind = kinds[layer] if layer < len(kinds) else None
                    if kind == "sliding_attention":
                        continue
                    pattern = resolve_layer_pattern(spec.sparsity, layer, kind, None)
                    got = last_row_recall(q, k, pattern, needle, scale)
                    acc = sums.setdefault((spec.label, length, depth, layer), {})
                    for name, value in got.items():
                        acc[name] = acc.get(name, 0.0) + value.cpu()
                    acc["trials"] = acc.get("trials", 0) + 1
                    trial[spec.label][0] += float(got["needle_covered"].sum())
                    trial[spec.label][1] += float(got["needle_mass"].sum())
            for label, (covered, mass) in trial.items():
                per_trial.setdefault((label, length, depth), []).append([covered, mass])
    rows = []
    for spec in specs:
        for length, depth in cases:
            layer_rows = []
            for (label, ln, dp, layer), acc in sums.items():
                if (label, ln, dp) != (spec.label, length, depth):
                    continue
                n = acc["trials"]
                mass, covered = acc["needle_mass"], acc["needle_covered"]
                layer_rows.append({
                    "pattern": spec.label, "length": length, "depth": depth, "layer": layer, "activations": activations,
                    "kind": kinds[layer] if layer < len(kinds) else "full_attention", "trials": n,
                    "needle_mass": [float(x) for x in mass / n],
                    "needle_kept": [float(c / m) if m > 0 else 1.0 for c, m in zip(covered, mass, strict=True)],
                    "row_kept": [float(x) for x in acc["row_kept"] / n],
                })
            rows += sorted(layer_rows, key=lambda r: r["layer"])
            rows.append(_summary(spec, length, depth, layer_rows, per_trial[(spec.label, length, depth)],
                                 density_summary(model.config, spec.sparsity, length)))
    return rows


def _summary(spec: PatternSpec, length: int, depth: float, layer_rows: list[dict[str, Any]],
             trials: list[list[float]], density: dict[str, Any]) -> dict[str, Any]:
    """The (pattern, length, depth) row: needle mass kept over every (layer, head), and over the top heads."""
    heads = [(m, k, r["layer"], h) for r in layer_rows
             for h, (m, k) in enumerate(zip(r["needle_mass"], r["needle_kept"], strict=True))]
    total = sum(m for m, *_ in heads)
    top = sorted(heads, key=lambda x: -x[0])[:TOP_HEADS]
    top_mass = sum(m for m, *_ in top)
    return {
        "pattern": spec.label, "length": length, "depth": depth, "layer": None, "trials": len(trials),
        "activations": layer_rows[0]["activations"] if layer_rows else None,
        "needle_kept": sum(m * k for m, k, *_ in heads) / total if total > 0 else 1.0,
        "top_heads": [{"layer": layer, "head": h, "needle_mass": m, "needle_kept": k} for m, k, layer, h in top],
        "top_heads_kept": sum(m * k for m, k, *_ in top) / top_mass if top_mass > 0 else 1.0,
        "trial_kept": [c / m if m > 0 else 1.0 for c, m in trials], **density,
    }


def needle_recall_table(rows: list[dict[str, Any]], needle_rows: list[dict[str, Any]] | None = None) -> str:
    """Markdown: per (pattern, length, depth), the needle mass kept over all layers and over the top heads, the
    worst of the top heads, and (given passkey rows with per-trial results) the kept share of passed / failed
    trials."""
    passed = {(r["pattern"], r["length"], r["depth"]): r.get("passed") for r in needle_rows or []}
    lines = ["| pattern | length | depth | density | needle mass kept, all heads | top heads | worst top head "
             "(layer.head: mass, kept) | kept in passed / failed trials |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r["layer"] is not None:
            continue
        worst = min(r["top_heads"], key=lambda x: x["needle_kept"], default=None)
        worst_txt = "" if worst is None else (f"{worst['layer']}.{worst['head']}: {worst['needle_mass']:.2f}, "
                                              f"{worst['needle_kept']:.2f}")
        split = ""
        outcome = passed.get((r["pattern"], r["length"], r["depth"]))
        if outcome is not None and len(outcome) == len(r["trial_kept"]):
            good = [k for k, p in zip(r["trial_kept"], outcome, strict=True) if p]
            bad = [k for k, p in zip(r["trial_kept"], outcome, strict=True) if not p]
            split = f"{_mean_txt(good)} ({len(good)}) / {_mean_txt(bad)} ({len(bad)})"
        lines.append(f"| {r['pattern']} | {r['length']} | {r['depth']:g} | {r.get('density', float('nan')):.3f} | "
                     f"{r['needle_kept']:.3f} | {r['top_heads_kept']:.3f} | {worst_txt} | {split} |")
    return "\n".join(lines)


def _mean_txt(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"
