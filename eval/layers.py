"""Which layers need to stay dense: per-layer attention-output error and final-logit KL, sparse vs dense.

``compare_layers``: one input, the whole model under a pattern vs dense. For every layer, the relative error
||out_sparse - out_dense|| / ||out_dense|| of its attention output (forward hooks on each ``self_attn``; errors
compound through the layers) and the KL(dense || sparse) of the final next-token distributions.

``isolate_layers``: the pattern on one layer at a time (all others dense): the final-logit KL that layer alone
causes. Layers with a large isolated KL are the ones to list in ``dense_layers``.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from hf_sparsek.model_defaults import layer_kinds

from .modeling import PatternSpec, _decoder, apply_pattern, layer_densities, text_config


def _attention_modules(model: Any) -> list[torch.nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not mods:
        raise ValueError(f"no '*.self_attn' modules found in {type(model).__name__}; cannot hook attention outputs")
    return mods


@torch.inference_mode()
def _forward_capture(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(attention outputs of every layer, final hidden states) for one forward."""
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o).float()))
             for m in _attention_modules(model)]
    try:
        hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return outs, hidden


@torch.inference_mode()
def logit_kl(model: Any, hidden_p: torch.Tensor, hidden_q: torch.Tensor, chunk: int = 1024) -> float:
    """Mean over positions of KL(p || q) of the next-token distributions from two final hidden states."""
    head = model.get_output_embeddings()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    total, count = 0.0, 0
    for s in range(0, hidden_p.shape[1], chunk):
        lp = head(hidden_p[:, s : s + chunk]).float()
        lq = head(hidden_q[:, s : s + chunk]).float()
        if cap:
            lp, lq = torch.tanh(lp / cap) * cap, torch.tanh(lq / cap) * cap
        lp, lq = lp.log_softmax(-1), lq.log_softmax(-1)
        total += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
        count += lp.shape[0] * lp.shape[1]
    return total / count


def compare_layers(model: Any, ids: torch.Tensor, spec: PatternSpec) -> dict[str, Any]:
    """Per-layer relative error of the attention output and the final-logit KL, ``spec`` vs dense sdpa."""
    if spec.sparsity is None:
        raise ValueError("layers compares a sparse pattern against dense: pass a pattern other than 'dense'")
    apply_pattern(model, PatternSpec("dense", None))
    dense_outs, dense_hidden = _forward_capture(model, ids)
    apply_pattern(model, spec)
    sparse_outs, sparse_hidden = _forward_capture(model, ids)
    kinds = layer_kinds(text_config(model))
    dens = layer_densities(model.config, spec.sparsity, ids.shape[1])
    rows = []
    for i, (d, s) in enumerate(zip(dense_outs, sparse_outs, strict=True)):
        rel = float((s - d).norm() / d.norm().clamp_min(1e-30))
        rows.append({"layer": i, "kind": kinds[i] if i < len(kinds) else "?", "density": dens[i],
                     "rel_error": rel})
    return {"pattern": spec.label, "seq_len": ids.shape[1], "layers": rows,
            "logit_kl": logit_kl(model, dense_hidden, sparse_hidden)}


def isolate_layers(model: Any, ids: torch.Tensor, spec: PatternSpec, layers: list[int] | None = None) -> list[dict]:
    """For each full-attention layer: the final-logit KL when only that layer uses ``spec`` (others dense)."""
    if spec.sparsity is None:
        raise ValueError("isolate needs a sparse pattern")
    config = text_config(model)
    kinds = layer_kinds(config)
    n = len(kinds)
    candidates = [i for i, k in enumerate(kinds) if k != "sliding_attention"] if layers is None else layers
    apply_pattern(model, PatternSpec("dense", None))
    _, dense_hidden = _forward_capture(model, ids)
    rows = []
    for layer in tqdm(candidates, desc="isolate layers", leave=False):
        only = spec.sparsity.replace(dense_layers=tuple(i for i in range(n) if i != layer))
        apply_pattern(model, PatternSpec(f"{spec.label}@{layer}", only))
        _, hidden = _forward_capture(model, ids)
        rows.append({"layer": layer, "isolated_logit_kl": logit_kl(model, dense_hidden, hidden)})
    return rows
