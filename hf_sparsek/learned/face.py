"""What the attention face asks of the learned selector: the tiles one layer call visits beyond sink and window."""

from __future__ import annotations

from typing import Any

import torch

from .io import selector_for


def learned_tiles(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, pattern: Any,
                  q_offset: int | torch.Tensor, kv_offset: int, padding: torch.Tensor | None) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, k) int32 absolute key tiles chosen by the layer's trained scorer for ``pattern`` (a
    SparsePattern with ``topk_blocks`` and selector "learned"). Rows the op keeps dense (``min_sparse_len``) still go
    through the scorer, so the decode store follows every call.

    Decode keeps block features per layer (``use_store`` unless the module trains); under torch.compile it raises,
    the learned selector runs eagerly only.
    """
    if torch.compiler.is_compiling():
        raise ValueError("selector 'learned' runs in eager mode only (its decode store reads the host); compile a "
                         "model whose pattern uses selector 'mass' or 'meanpool', or run it without torch.compile")
    if pattern.mass_threshold is not None:
        raise ValueError("selector 'learned' selects an exact budget of topk_blocks tiles; mass_threshold is not "
                         "supported with it (set mass_threshold to null)")
    selector = selector_for(module.config)
    if selector.block_size != pattern.block_size:
        raise ValueError(f"the learned scorer was trained for block_size {selector.block_size}; this layer's "
                         f"pattern has block_size {pattern.block_size}")
    if next(selector.parameters()).device != query.device:
        selector.to(query.device)
    return selector.select(getattr(module, "layer_idx", None), query, key, pattern.topk_blocks,
                           pattern.sink_tokens, pattern.window, int(q_offset), kv_offset, padding,
                           use_store=not module.training)
