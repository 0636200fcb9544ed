"""hf_sparsek: sparse attention for HuggingFace Transformers.

``import hf_sparsek`` registers ``attn_implementation="sparsek"`` with transformers::

    import hf_sparsek
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sparsek")
    hf_sparsek.set_pattern(model, "sink128-window4096")   # optional: pick another pattern
    model = hf_sparsek.from_pretrained(name, pattern="sink128-window2048")  # or at load time
    print(hf_sparsek.describe(model, seq_len=16384))      # per-layer pattern and density
"""

from __future__ import annotations

import sys as _sys

from ._dependencies import TRANSFORMERS_MIN as _TRANSFORMERS_MIN  # noqa: F401 - imported first: checks the range
from ._source_tree import map_source_subpackages
from .block_index import BlockIndex, build_block_index
from .describe import describe
from .integration import ATTN_IMPLEMENTATION, SparseKMask, register
from .loading import from_pretrained
from .model_defaults import available_model_types, default_sparsity, model_sparsity, set_pattern
from .ops import build_index_for, sparse_attention
from .patterns import BlockLayout, ModelSparsity, SparsePattern
from .presets import PRESETS
from .runtime import get_settings, set_settings, settings
from .token_rules import mask_picture, selection_mask

__version__ = "0.1.0"

register()
map_source_subpackages(_sys.modules[__name__])  # kernels/, eval/, scripts/ from a plain source checkout

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BlockIndex",
    "BlockLayout",
    "ModelSparsity",
    "PRESETS",
    "SparseKMask",
    "SparsePattern",
    "available_model_types",
    "build_block_index",
    "build_index_for",
    "default_sparsity",
    "describe",
    "from_pretrained",
    "get_settings",
    "mask_picture",
    "model_sparsity",
    "register",
    "selection_mask",
    "set_pattern",
    "set_settings",
    "settings",
    "sparse_attention",
]
