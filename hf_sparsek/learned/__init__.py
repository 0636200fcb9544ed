"""SparseK's learned block selector: a small per-layer scorer over key tiles, distilled from a frozen model's dense
attention, choosing an exact budget of tiles per query tile (SPARSEK's hard top-k) beside the pattern's sink and
window.

A pattern names it with ``selector="learned"`` (and its budget ``topk_blocks``)::

    hf-sparsek distill --model smollm2-135m --output-dir runs/learned --seq-len 2048 --topk 4 --window 256
    model = AutoModelForCausalLM.from_pretrained("runs/learned/final", attn_implementation="sparsek")

Modules: ``features`` (block features, the competing tiles), ``scorer`` (LayerScorer, the hard top-k),
``selector`` (LearnedSelector: the per-layer scorers and one call's tiles), ``store`` (decode keeps block
features), ``io`` (safetensors file, which model a selector belongs to), ``face`` (what the attention function
calls), ``distill`` (training against dense block attention mass), ``cli`` (``hf-sparsek distill``).
"""

from __future__ import annotations

from .io import SCORER_FILE, attach_selector, attached_selector, load_selector, save_selector, selector_for
from .scorer import MODES, LayerScorer, hard_topk_tiles
from .selector import LearnedSelector
from .store import LayerStore

__all__ = [
    "MODES", "SCORER_FILE", "LayerScorer", "LayerStore", "LearnedSelector", "attach_selector", "attached_selector",
    "hard_topk_tiles", "load_selector", "save_selector", "selector_for",
]
