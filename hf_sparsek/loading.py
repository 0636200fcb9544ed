"""One-line loading with a pattern: ``hf_sparsek.from_pretrained(name, pattern="sink128-window4096")``."""

from __future__ import annotations

from typing import Any

from .model_defaults import (
    ATTN_IMPLEMENTATION,
    is_sparsek_implementation,
    model_sparsity,
    preset_of_implementation,
    set_pattern,
)
from .model_support import check_model
from .patterns import ModelSparsity, SparsePattern


def from_pretrained(
    name_or_path: str,
    pattern: ModelSparsity | SparsePattern | dict | str | None = None,
    model_class: Any = None,
    **kwargs: Any,
) -> Any:
    """Load a model with ``attn_implementation="sparsek"`` and, if given, a pattern (else the stored one or the
    model type's default). ``attn_implementation="sparsek:<preset>"`` is accepted in place of ``pattern``. Other
    keyword arguments go to ``from_pretrained`` unchanged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = AutoModelForCausalLM if model_class is None else model_class
    implementation = kwargs.get("attn_implementation", ATTN_IMPLEMENTATION)
    if not is_sparsek_implementation(implementation):
        raise ValueError(f"hf_sparsek.from_pretrained loads with attn_implementation={ATTN_IMPLEMENTATION!r} or "
                         f"'{ATTN_IMPLEMENTATION}:<preset>'; got {implementation!r} (use transformers' "
                         "from_pretrained for others)")
    if pattern is not None and preset_of_implementation(implementation) is not None:
        raise ValueError(f"two patterns given: pattern={pattern!r} and attn_implementation={implementation!r}; "
                         "pass one of them")
    kwargs["attn_implementation"] = implementation
    if pattern is not None and "config" not in kwargs:
        config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code", "gguf_file", "cache_dir", "subfolder",
                                                "token", "local_files_only", "force_download", "proxies")
                         if k in kwargs}
        kwargs["config"] = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    if pattern is not None:
        set_pattern(kwargs["config"], pattern)
    model = model_class.from_pretrained(name_or_path, **kwargs)
    check_model(model)  # a model whose attention never reaches "sparsek" would silently stay dense
    # the choice written into the config the layers read now (a multimodal model's text config), so that a save
    # before any forward keeps it
    model_sparsity(getattr(model.config, "text_config", None) or model.config)
    return model
