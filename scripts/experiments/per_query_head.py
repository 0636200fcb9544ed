"""Per-query-head tile selection, measured without a kernel change: K and V repeated to one KV head per query head.

Every selector chooses key tiles per KV group (one list for the group's query heads: the mean of their estimated
or true mass). A block index with one row per query head would let each head keep its own tiles. Inside
:func:`per_query_head_selection` the "sparsek" attention function receives K and V repeated ``group`` times along
the head axis, so the op sees one KV head per query head: the attention is the same function of Q, K, V, only the
selection is per query head. It reads ``group`` times the K / V bytes: an accuracy experiment, not a speed path.
Patterns with ``dense_heads`` are refused there (their indices would name query heads, not KV heads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

LABEL_SUFFIX = " [per query head]"


def _repeated_kv_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "sparsek" attention function with K / V repeated to the query heads (a sliding layer is unchanged)."""
    from hf_sparsek.integration import sparsek_attention_forward
    from hf_sparsek.model_defaults import layer_pattern

    group = query.shape[1] // key.shape[1]
    pattern = layer_pattern(module.config, getattr(module, "layer_idx", None), kwargs.get("sliding_window"))
    if group > 1 and pattern is not None and getattr(pattern, "topk_blocks", None):
        if pattern.dense_heads:
            raise ValueError("per-query-head selection: dense_heads name KV heads; use a pattern without them")
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return sparsek_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def per_query_head_selection(enabled: bool = True) -> Iterator[None]:
    """Within the block, "sparsek" layers that select tiles do so per query head (see the module docstring)."""
    if not enabled:
        yield
        return
    from transformers import AttentionInterface

    from hf_sparsek.integration import sparsek_attention_forward
    from hf_sparsek.model_defaults import ATTN_IMPLEMENTATION

    AttentionInterface.register(ATTN_IMPLEMENTATION, _repeated_kv_forward)
    try:
        yield
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, sparsek_attention_forward)
