"""SparseK's learned block selector: a small per-layer scorer over key tiles, distilled from a frozen model's dense
attention, choosing an exact budget of tiles per query tile (SPARSEK's hard top-k) beside the pattern's sink and
window.

A pattern names it with ``selector="learned"`` (and its budget ``topk_blocks``)::

    hf-sparsek distill --model smollm2-135m --output-dir runs/learned --seq-len 2048 \\
        --pattern '{"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 4}'
    model = AutoModelForCausalLM.from_pretrained("runs/learned/final", attn_implementation="sparsek")

Modules: ``features`` (block features, the competing tiles), ``scorer`` (LayerScorer, the hard top-k),
``selector`` (LearnedSelector: the per-layer scorers and one call's tiles), ``store`` (decode keeps block
features), ``io`` (safetensors file, which model a selector belongs to), ``face`` (what the attention function
calls), ``config`` / ``distill`` (training against dense block attention mass), ``cli`` (``hf-sparsek distill``).
Names load on first use, so the command line imports no torch to parse its options.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DistillConfig": "config", "DistillResult": "distill", "distill": "distill",
    "SCORER_FILE": "io", "attach_selector": "io", "attached_selector": "io", "load_selector": "io",
    "save_selector": "io", "selector_for": "io", "uses_learned_selector": "io",
    "MODES": "config", "LayerScorer": "scorer", "hard_topk_tiles": "scorer",
    "LearnedSelector": "selector", "LayerStore": "store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)
