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


def kv_heads_of(config: Any) -> int:
    """KV heads of the tensors a layer hands the attention interface, from its config: multi-head latent attention
    (DeepSeek V2 / V3: ``kv_lora_rank``) expands keys to every query head; Falcon's multi-query layers keep one
    unless ``new_decoder_architecture``; a config naming no KV heads has one per query head. The one place the
    package reads this from a config."""
    heads = getattr(config, "num_attention_heads", None) or 1
    if getattr(config, "kv_lora_rank", None):
        return int(heads)
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1
    return int(getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads)


def attention_shape(config: Any) -> tuple[int, int]:
    """(KV heads, query / key head dim) of the tensors a layer hands the attention interface (:func:`kv_heads_of`;
    MLA's keys have head dim ``qk_head_dim``)."""
    if getattr(config, "kv_lora_rank", None):
        dim = getattr(config, "qk_head_dim", None) or config.qk_nope_head_dim + config.qk_rope_head_dim
    else:
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads_of(config), int(dim)


def check_model(model: Any) -> None:
    """Raise ValueError for a model whose attention never reaches "sparsek" (it would silently stay dense)."""
    if hasattr(model, "modules") and not calls_attention_interface(model):
        raise ValueError(
            f"{type(model).__name__} computes attention in its own code, not through transformers' attention "
            "interface, so attn_implementation='sparsek' would never run and the model would stay dense; this "
            "model type is not supported (docs/architectures.md)"
        )


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's positions cover: ``max_position_embeddings`` of its text config (GPT-2's
    ``n_positions`` maps to it), or None where the config names none."""
    text = getattr(config, "get_text_config", None)
    config = text() if callable(text) else config
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_positions(config: Any, length: int, what: str) -> None:
    """ValueError when ``length`` tokens (named ``what`` in the message: the option that set it) exceed the model's
    position range: learned positions fail with an index error, rotary ones run untrained positions silently."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise ValueError(f"{what}={length} is longer than the model's max_position_embeddings={limit}; use {what} <= "
                         f"{limit} or a model (or RoPE scaling in its config) that covers the length")
