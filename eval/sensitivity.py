"""Per-layer patterns chosen by measured sensitivity: what each choice costs the model alone, then the cheapest mix.

Mass covered is the wrong currency across layers (``calibrate``: budgets that cover more mass raised perplexity),
so this module measures what perplexity follows. For every layer and every candidate pattern of that layer (top-k
budgets, windows, one KV head kept dense, the whole layer dense), the model runs with only that layer changed,
every other layer dense, and the final-logit KL(dense || that) is the choice's cost; its density is the analytic
count of the pattern. A multiple-choice knapsack (exact dynamic programme on a density grid) then takes one choice
per layer with the least summed KL whose mean density stays within the target (DuoAttention and the OBS-style
pruning allocations rely on the same additivity; :func:`calibrate_by_sensitivity` measures each mixed pattern's
own KL beside the sum, so the assumption is checked on every run).

The result is a :class:`~hf_sparsek.patterns.ModelSparsity` (``dense_layers`` and ``layer_overrides``) that every
command takes as a pattern file. Slow by design (layers x candidates forwards): an offline calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hf_sparsek.describe import kv_head_count, pattern_density
from hf_sparsek.model_defaults import layer_kinds
from hf_sparsek.patterns import ModelSparsity, SparsePattern

from .layers import _forward_capture, logit_kl
from .modeling import PatternSpec, apply_pattern, text_config

DENSE_CHOICE = "dense"


@dataclass(frozen=True)
class Choice:
    """One candidate for one layer: a label and its pattern (None: the layer stays dense)."""

    label: str
    pattern: SparsePattern | None


def candidate_choices(base: SparsePattern, topks: list[int], windows: list[int] | None = None,
                      kv_heads: int = 1, dense_head_choices: bool = True) -> list[Choice]:
    """``base`` at every (window, top-k) of the lists (top-k 0: no selection), each also with one KV head dense when
    ``dense_head_choices`` (and the layer has more than one), and the dense layer."""
    if any(k < 0 for k in topks):
        raise ValueError(f"topks must be >= 0, got {topks}")
    if base.dense_heads or base.layout is not None or base.min_sparse_len:
        raise ValueError("sensitivity calibration starts from a sink / window / top-k pattern; dense_heads, a block "
                         f"layout and min_sparse_len are chosen here or not supported, got {base.describe()}")
    windows = windows or [base.window]
    heads: list[tuple[int, ...]] = [()]
    if dense_head_choices and kv_heads > 1:
        heads += [(h,) for h in range(kv_heads)]
    out: list[Choice] = []
    for window in windows:
        for k in sorted(set(topks)):
            pattern = base.replace(window=window, topk_blocks=k or None)
            if not k:
                pattern = pattern.replace(selector=None, mass_threshold=None, probe_stride=None)
            for dense in heads:
                label = (f"window {window}" if window else "no window") + f" + top-{k}" + (
                    f" + dense head {dense[0]}" if dense else "")
                out.append(Choice(label, pattern.replace(dense_heads=dense)))
    out.append(Choice(DENSE_CHOICE, None))
    return out


def choice_density(choice: Choice, seq_len: int, kv_heads: int) -> float:
    """Attended over causal pairs of one layer at ``seq_len`` (the analytic count: top-k counted as k full tiles)."""
    return 1.0 if choice.pattern is None else pattern_density(choice.pattern, seq_len, kv_heads)


def allocate(costs: list[list[float]], densities: list[list[float]], target: float,
             resolution: int = 4000) -> list[int]:
    """One choice per layer minimising the summed cost with mean density <= ``target``: a multiple-choice knapsack,
    solved exactly on a density grid of ``resolution`` steps per layer-unit (densities rounded up, so the result
    never exceeds the target). Raises when even the cheapest-density choices exceed it."""
    n = len(costs)
    if n == 0 or len(densities) != n or any(len(c) != len(d) or not c for c, d in zip(costs, densities, strict=True)):
        raise ValueError("costs and densities need one non-empty, equally long list per layer")
    capacity = int(math.floor(target * n * resolution + 1e-6))
    weights = [[int(math.ceil(d * resolution - 1e-6)) for d in row] for row in densities]
    if sum(min(row) for row in weights) > capacity:
        raise ValueError(f"no choice fits a mean density of {target:.4f}: the sparsest choices need "
                         f"{sum(min(row) for row in densities) / n:.4f}")
    best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # best[w]: least cost of the layers so far at total weight exactly w
    picks: list[torch.Tensor] = []
    for row_cost, row_weight in zip(costs, weights, strict=True):
        nxt = torch.full_like(best, math.inf)
        pick = torch.full((capacity + 1,), -1, dtype=torch.long)
        for j, (c, wt) in enumerate(zip(row_cost, row_weight, strict=True)):
            if wt > capacity:
                continue
            shifted = torch.full_like(best, math.inf)
            shifted[wt:] = best[: capacity + 1 - wt] + c
            better = shifted < nxt
            nxt = torch.where(better, shifted, nxt)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = nxt
        picks.append(pick)
    w = int(torch.argmin(best))  # the first of equal least costs: the lowest weight
    chosen = [0] * n
    for layer in range(n - 1, -1, -1):
        j = int(picks[layer][w])
        chosen[layer] = j
        w -= weights[layer][j]
    return chosen


def sparsity_from_choices(choices: dict[int, Choice], source: str) -> ModelSparsity:
    """A ModelSparsity giving each layer its choice: the most common sparse choice as ``default``, dense choices in
    ``dense_layers``, the others as ``layer_overrides`` (only the fields that differ)."""
    sparse = [c.pattern for c in choices.values() if c.pattern is not None]
    if not sparse:
        return ModelSparsity(default=SparsePattern(), dense_layers=tuple(sorted(choices)), source=source)
    default = max(sparse, key=lambda p: (sum(q == p for q in sparse), -sparse.index(p)))
    base = default.to_dict()
    overrides = {}
    for layer, choice in sorted(choices.items()):
        if choice.pattern is not None and choice.pattern != default:
            own = choice.pattern.to_dict()
            overrides[layer] = {k: v for k, v in own.items() if v != base.get(k)}
    dense = tuple(layer for layer, c in sorted(choices.items()) if c.pattern is None)
    return ModelSparsity(default=default, dense_layers=dense, layer_overrides=overrides, source=source)


def _isolated(layer: int, pattern: SparsePattern, n_layers: int) -> ModelSparsity:
    return ModelSparsity(default=pattern, dense_layers=tuple(i for i in range(n_layers) if i != layer))


@torch.inference_mode()
def calibrate_by_sensitivity(model: Any, windows: torch.Tensor, choices: list[Choice], targets: list[float],
                             probes: list[tuple[list[int], list[int]]] | None = None,
                             probe_weights: list[float] | None = None, uniform: SparsePattern | None = None,
                             progress: bool = True) -> dict[str, Any]:
    """Measure every (layer, choice)'s isolated final-logit KL on ``windows`` (W, L) token ids; for each target mean
    density (over the full-attention layers, a dense layer counted as 1) allocate and measure the mixed pattern's
    own KL.

    ``probes``: retrieval prompts (prompt ids, answer ids), e.g. passkeys: each choice's KL is also measured at the
    positions that predict the answer (mean over probes), and each allocation minimises text KL + w x answer KL for
    every w of ``probe_weights`` (default [0]: text only). Returns {"choices", "table": per layer per choice {kl,
    answer_kl, density}, "uniform_kl" / "uniform_answer_kl" (``uniform`` in every layer, when given), "allocations":
    one per (weight, target) {"chosen": {layer: label}, "predicted_kl", "measured_kl", "predicted_answer_kl",
    "measured_answer_kl", "density", "target_density", "probe_weight", "sparsity"}}."""
    from tqdm.auto import tqdm

    if not targets:
        raise ValueError("give at least one target density")
    weights = probe_weights or [0.0]
    if any(w < 0 for w in weights) or (any(weights) and not probes):
        raise ValueError(f"probe_weights must be >= 0, and a non-zero weight needs probes; got {weights}")
    config = text_config(model)
    kinds = layer_kinds(config)
    n = len(kinds)
    layers = [i for i, kind in enumerate(kinds) if kind != "sliding_attention"]
    kv_heads = kv_head_count(config)
    density = [choice_density(c, windows.shape[1], kv_heads) for c in choices]
    device = windows.device
    probe_ids = [torch.tensor([p + a], device=device) for p, a in probes or []]
    probe_pos = [torch.arange(len(p) - 1, len(p) + len(a) - 1, device=device) for p, a in probes or []]
    apply_pattern(model, PatternSpec("dense", None))
    dense_hidden = [_forward_capture(model, windows[w: w + 1])[1] for w in range(windows.shape[0])]
    dense_probe = [_forward_capture(model, ids)[1][:, pos] for ids, pos in zip(probe_ids, probe_pos, strict=True)]

    # The dense side keeps final hidden states, not log-probabilities: (L x vocab) floats per window would not fit
    # at 32K with a 262K vocabulary, so ``logit_kl`` recomputes them per candidate (a head matmul beside a forward).
    def kl_of(sparsity: ModelSparsity) -> tuple[float, float]:
        apply_pattern(model, PatternSpec("sensitivity", sparsity))
        text = sum(logit_kl(model, dense_hidden[w], _forward_capture(model, windows[w: w + 1])[1])
                   for w in range(windows.shape[0])) / windows.shape[0]
        answer = sum(logit_kl(model, dense_probe[i], _forward_capture(model, ids)[1][:, probe_pos[i]])
                     for i, ids in enumerate(probe_ids)) / max(len(probe_ids), 1)
        return text, answer

    costs: list[list[tuple[float, float]]] = []
    bar = tqdm(total=len(layers) * len(choices), desc="sensitivity (layer x choice)", disable=not progress)
    for layer in layers:
        row = []
        for choice in choices:
            row.append((0.0, 0.0) if choice.pattern is None else kl_of(_isolated(layer, choice.pattern, n)))
            bar.update(1)
        costs.append(row)
    bar.close()
    uniform_kl = kl_of(ModelSparsity(default=uniform)) if uniform is not None else (None, None)
    allocations = []
    for weight in weights:
        combined = [[t + weight * a for t, a in row] for row in costs]
        for target in targets:
            picks = allocate(combined, [density] * len(layers), target)
            chosen = {layer: choices[j] for layer, j in zip(layers, picks, strict=True)}
            source = ("hf-sparsek eval sensitivity: least summed isolated final-logit KL"
                      + (f" (+ {weight:g} x answer KL of {len(probe_ids)} retrieval probes)" if weight else "")
                      + f" at mean density <= {target:.4f} over {len(layers)} full-attention layers, "
                      f"{windows.shape[0]} x {windows.shape[1]} tokens")
            sparsity = sparsity_from_choices(chosen, source)
            text, answer = kl_of(sparsity)
            allocations.append({
                "target_density": target, "probe_weight": weight,
                "density": sum(density[j] for j in picks) / len(layers),
                "chosen": {str(layer): c.label for layer, c in chosen.items()},
                "predicted_kl": sum(costs[i][j][0] for i, j in enumerate(picks)), "measured_kl": text,
                "predicted_answer_kl": sum(costs[i][j][1] for i, j in enumerate(picks)),
                "measured_answer_kl": answer, "sparsity": sparsity.to_dict()})
    apply_pattern(model, PatternSpec("dense", None))
    return {"choices": [c.label for c in choices], "probes": len(probe_ids),
            "table": {str(layer): {c.label: {"kl": costs[i][j][0], "answer_kl": costs[i][j][1],
                                             "density": density[j]} for j, c in enumerate(choices)}
                      for i, layer in enumerate(layers)},
            "uniform": None if uniform is None else uniform.describe(), "uniform_kl": uniform_kl[0],
            "uniform_answer_kl": uniform_kl[1],
            "allocations": allocations}


def sensitivity_table(result: dict[str, Any], allocation: dict[str, Any]) -> str:
    """Markdown: per layer the chosen pattern, its isolated KL (and answer KL, with probes) and density; the summed
    and the measured KL below, beside the uniform pattern's."""
    probes = bool(result.get("probes"))
    lines = ["| layer | chosen | isolated KL |" + (" answer KL |" if probes else "") + " density |",
             "|---:|---|---:|" + ("---:|" if probes else "") + "---:|"]
    for layer, label in allocation["chosen"].items():
        cell = result["table"][layer][label]
        answer = f" {cell['answer_kl']:.4f} |" if probes else ""
        lines.append(f"| {layer} | {label} | {cell['kl']:.5f} |{answer} {cell['density']:.3f} |")
    a = allocation
    text = (f"\nmean density {a['density']:.4f} (target {a['target_density']:.4f}); final-logit KL: sum of isolated "
            f"{a['predicted_kl']:.5f}, measured on the mixed pattern {a['measured_kl']:.5f}")
    if probes:
        text += (f"; answer weight {a['probe_weight']:g}, answer KL: sum {a['predicted_answer_kl']:.4f}, measured "
                 f"{a['measured_answer_kl']:.4f}")
    lines.append(text)
    if result.get("uniform") is not None:
        lines.append(f"(the uniform {result['uniform']} in every layer: KL {result['uniform_kl']:.5f}"
                     + (f", answer KL {result['uniform_answer_kl']:.4f})" if probes else ")"))
    return "\n".join(lines)
