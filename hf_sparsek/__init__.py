"""hf_sparsek: sparse attention for HuggingFace Transformers.

``import hf_sparsek`` registers ``attn_implementation="sparsek"`` with transformers::

    import hf_sparsek
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sparsek")
    hf_sparsek.set_pattern(model, "sink128-window4096")   # optional: pick another pattern
    # or name a preset where only attn_implementation can be given (lm-eval's model_args, pipelines):
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sparsek:sink128-window4096")
    model = hf_sparsek.from_pretrained(name, pattern="sink128-window2048")  # or at load time
    print(hf_sparsek.describe(model, seq_len=16384))      # per-layer pattern and density
"""

from __future__ import annotations

import importlib
import sys as _sys
from typing import Any

from _hf_sparsek_autoload import run_after_transformers as _run_after_transformers

from ._dependencies import TRANSFORMERS_MIN as _TRANSFORMERS_MIN  # noqa: F401 - imported first: checks the range
from ._source_tree import map_source_subpackages
from .describe import describe
from .patterns import BlockLayout, ModelSparsity, SparsePattern
from .presets import PRESETS
from .runtime import get_settings, set_settings, settings

__version__ = "0.1.0"

# Names whose modules import torch or transformers load on first use (PEP 562), so that ``import hf_sparsek`` and the
# ``hf-sparsek`` command line (its entry point imports this package) start without them.
_LAZY = {
    "ATTN_IMPLEMENTATION": "model_defaults",
    "KernelOptions": "kernels.options",
    "sparsek_topk": "sparsek_topk",
    "implementation_names": "model_defaults",
    "is_sparsek_implementation": "model_defaults",
    "available_model_types": "model_defaults",
    "default_sparsity": "model_defaults",
    "model_sparsity": "model_defaults",
    "set_pattern": "model_defaults",
    "BlockIndex": "block_index",
    "build_block_index": "block_index",
    "SparseKMask": "integration",
    "register": "integration",
    "from_pretrained": "loading",
    "build_index_for": "ops",
    "sparse_attention": "ops",
    "exact_token_mask": "masks",
    "mask_picture": "masks",
}
_SUBMODULES = frozenset({"block_index", "integration", "loading", "masks", "model_defaults", "ops", "reference",
                         "selection", "triton_ops"})  # ``hf_sparsek.ops.x`` works before anything imported ops


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register() -> None:
    from .integration import register

    register()


# ``import hf_sparsek`` registers "sparsek" with transformers: at once when its modeling code is loaded, else the
# moment it loads (before any from_pretrained can ask for "sparsek"), without importing torch here. The hook is the
# one the site-packages startup file uses (_hf_sparsek_autoload.py, installed beside the package).
_run_after_transformers(_register)
map_source_subpackages(_sys.modules[__name__])  # kernels/, eval/ from a plain source checkout

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BlockIndex",
    "BlockLayout",
    "KernelOptions",
    "ModelSparsity",
    "PRESETS",
    "SparseKMask",
    "SparsePattern",
    "available_model_types",
    "build_block_index",
    "build_index_for",
    "default_sparsity",
    "describe",
    "exact_token_mask",
    "from_pretrained",
    "get_settings",
    "implementation_names",
    "is_sparsek_implementation",
    "mask_picture",
    "model_sparsity",
    "register",
    "set_pattern",
    "set_settings",
    "settings",
    "sparse_attention",
    "sparsek_topk",
]
