"""One-line loading with a pattern: ``hf_sparsek.from_pretrained(name, pattern="sink128-window4096")``."""

from __future__ import annotations

from typing import Any

from .integration import ATTN_IMPLEMENTATION
from .model_defaults import set_pattern
from .patterns import ModelSparsity, SparsePattern


def from_pretrained(
    name_or_path: str,
    pattern: ModelSparsity | SparsePattern | dict | str | None = None,
    model_class: Any = None,
    **kwargs: Any,
) -> Any:
    """Load a model with ``attn_implementation="sparsek"`` and, if given, a pattern (else the stored one or the
    model type's default). Other keyword arguments go to ``from_pretrained`` unchanged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = AutoModelForCausalLM if model_class is None else model_class
    if kwargs.get("attn_implementation", ATTN_IMPLEMENTATION) != ATTN_IMPLEMENTATION:
        raise ValueError(f"hf_sparsek.from_pretrained loads with attn_implementation={ATTN_IMPLEMENTATION!r}; "
                         f"got {kwargs['attn_implementation']!r} (use transformers' from_pretrained for others)")
    kwargs["attn_implementation"] = ATTN_IMPLEMENTATION
    if pattern is not None and "config" not in kwargs:
        config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code", "gguf_file", "cache_dir")
                         if k in kwargs}
        kwargs["config"] = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    if pattern is not None:
        set_pattern(kwargs["config"], pattern)
    return model_class.from_pretrained(name_or_path, **kwargs)
