"""Whether a loaded model's attention goes through transformers' attention interface at all.

A model whose attention layers compute attention in their own code (bloom, mpt, gpt_neo, ... in transformers 5.25;
docs/architectures.md lists them) accepts ``attn_implementation="sparsek"`` without ever calling it: it would run
dense attention while the user believes it sparse. transformers offers no hook at load time, so the loaders and
setters of this package (``hf_sparsek.from_pretrained``, ``set_pattern``, ``describe`` on a model) check here and
refuse such models. The check reads the source of the model's module classes once per class.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

INTERFACE_NAMES = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface")


@cache
def _class_calls_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (TypeError, OSError, AttributeError):
        return False
    return any(name in source for name in INTERFACE_NAMES)


def calls_attention_interface(model: Any) -> bool:
    """True when some module of ``model`` dispatches attention through transformers' attention interface."""
    modules = model.modules() if hasattr(model, "modules") else ()
    return any(_class_calls_interface(type(module)) for module in modules)


def check_model(model: Any) -> None:
    """Raise ValueError for a model whose attention never reaches "sparsek" (it would silently stay dense)."""
    if hasattr(model, "modules") and not calls_attention_interface(model):
        raise ValueError(
            f"{type(model).__name__} computes attention in its own code, not through transformers' attention "
            "interface, so attn_implementation='sparsek' would never run and the model would stay dense; this "
            "model type is not supported (docs/architectures.md)"
        )
