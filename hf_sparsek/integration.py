"""Registration with transformers: the "sparsek" attention function and its mask function.

Both go through transformers' public ``AttentionInterface.register`` / ``AttentionMaskInterface.register``. The mask
function never builds a (q_len x kv_len) mask: it hands the attention function a small :class:`SparseKMask` with the
padding row mask and the cache offsets, and the attention function builds a block index from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .model_defaults import model_sparsity
from .ops import build_index_for, sparse_attention, triton_unsupported_reason
from .patterns import SparsePattern
from .runtime import get_settings

ATTN_IMPLEMENTATION = "sparsek"
logger = logging.getLogger(__name__)
_warned: set[str] = set()


@dataclass
class SparseKMask:
    """What one attention call needs to know beyond q, k, v: O(batch x kv_len), never quadratic.

    ``padding``: (batch, kv_len) booleans over the keys of this call (True = real token), None when none is padded.
    Queries sit at absolute positions ``q_offset + t``, keys at ``kv_offset + s``.
    """

    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    padding: torch.Tensor | None
    # The same mask object goes to every layer of one forward: layers with the same pattern share one index.
    _indexes: dict = field(default_factory=dict, repr=False, compare=False)
    _segments: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:  # some model code logs mask shapes
        return (self.q_length, self.kv_length)


def _as_int(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def sparsek_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> SparseKMask:
    """Mask function registered as "sparsek": slices the 2D padding mask to this call's keys, keeps the offsets."""
    q_offset, kv_offset = _as_int(q_offset), _as_int(kv_offset)
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attn_implementation='sparsek' takes a 2D padding mask (batch, seq); got shape "
                f"{tuple(attention_mask.shape)}. Custom 4D masks are not supported by sparse attention."
            )
        am = attention_mask.to(torch.bool)
        if am.shape[-1] < kv_offset + kv_length:
            am = F.pad(am, (0, kv_offset + kv_length - am.shape[-1]), value=True)
        am = am[:, kv_offset : kv_offset + kv_length]
        if not bool(am.all()):
            padding = am
    return SparseKMask(q_length, kv_length, q_offset, kv_offset, padding)


def _segments_from_positions(position_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """Packed sequences (positions restarting inside a row) -> segment ids; None for one sequence per row."""
    if position_ids is None or position_ids.shape[-1] != length:
        return None
    pos = position_ids.expand(batch, -1)
    restarts = torch.diff(pos, dim=-1) != 1
    if not bool(restarts.any()):
        return None
    return torch.cat([torch.zeros_like(pos[:, :1]), torch.cumsum(restarts.long(), -1)], dim=-1)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def layer_pattern(module: torch.nn.Module, sliding_window: int | None) -> SparsePattern:
    """The pattern of the layer that ``module`` belongs to. A model's sliding layers keep exactly their window."""
    sparsity = model_sparsity(module.config)
    if sliding_window is not None:
        return SparsePattern(block_size=sparsity.default.block_size, window=int(sliding_window))
    return sparsity.for_layer(getattr(module, "layer_idx", None))


def sparsek_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: SparseKMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as "sparsek": (B, H, L, D) in, (B, L, H, D) out, like transformers' sdpa."""
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='sparsek' does not support learned attention sinks (s_aux) of this model")
    if dropout and module.training:
        raise ValueError(
            f"attn_implementation='sparsek' has no attention dropout (got dropout={dropout}); set the model's "
            "attention_dropout to 0 for training"
        )
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError("attn_implementation='sparsek' supports causal (decoder) attention only")
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            "attn_implementation='sparsek' received a materialized attention mask tensor; pass a 2D padding mask "
            "(batch, seq) as attention_mask instead of a 4D mask"
        )
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if attention_mask is None:
        attention_mask = SparseKMask(q_len, kv_len, kv_len - q_len, 0, None)
    mask = attention_mask
    if mask.kv_length != kv_len:
        # Static caches hand over the whole buffer: mask_sizes say how much of it is in use.
        key, value = key[:, :, : mask.kv_length], value[:, :, : mask.kv_length]
        kv_len = mask.kv_length
    segments = None
    if mask.padding is None and mask.q_offset == 0 and mask.kv_offset == 0 and q_len == kv_len:
        position_ids = kwargs.get("position_ids")
        seg_key = id(position_ids)  # the tuple below keeps position_ids alive, so the id stays unique
        if seg_key not in mask._segments:
            mask._segments[seg_key] = (position_ids, _segments_from_positions(position_ids, batch, q_len))
        segments = mask._segments[seg_key][1]

    if not (query.dtype == key.dtype == value.dtype) and torch.is_autocast_enabled(query.device.type):
        # Under autocast, RoPE leaves q/k in fp32 and v in bf16/fp16; cast like SDPA does (to the autocast dtype).
        target = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(target), key.to(target), value.to(target)
    pattern = layer_pattern(module, sliding_window)
    settings = get_settings()
    all_dense_rows = pattern.is_dense or mask.q_offset + q_len <= pattern.min_sparse_len
    if all_dense_rows and settings.dense_via_sdpa and mask.padding is None and segments is None and not softcap:
        out = _dense_sdpa(query, key, value, mask, scaling)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    if all_dense_rows:
        pattern = SparsePattern(block_size=pattern.block_size)
    backend = settings.backend
    if backend == "auto" and query.is_cuda:
        reason = triton_unsupported_reason(query, key, value)
        if reason is not None:
            _warn_once(reason, f"hf_sparsek: running the PyTorch reference on GPU (slow, same results): {reason}")
    index = None
    if pattern.topk_blocks is None:  # a data-dependent selection is rebuilt per layer
        cache_key = (pattern, key.shape[1], batch, q_len, kv_len, id(segments), query.device)
        index = mask._indexes.get(cache_key)
        if index is None:
            index = build_index_for(query, key, pattern, mask.q_offset, mask.kv_offset, mask.padding, segments)
            mask._indexes[cache_key] = index
    out = sparse_attention(
        query, key, value, pattern, scale=scaling, softcap=softcap, q_offset=mask.q_offset,
        kv_offset=mask.kv_offset, attention_mask=mask.padding, segment_ids=segments, index=index, backend=backend,
    )
    return out.transpose(1, 2).contiguous(), None


def _dense_sdpa(query, key, value, mask: SparseKMask, scaling: float | None) -> torch.Tensor | None:
    """Dense causal attention through torch SDPA where no mask tensor is needed; None where one would be."""
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    aligned_end = mask.q_offset + q_len == mask.kv_offset + kv_len
    if q_len == kv_len and mask.q_offset == mask.kv_offset:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    if q_len == 1 and aligned_end:
        return F.scaled_dot_product_attention(query, key, value, is_causal=False, scale=scaling, enable_gqa=gqa)
    return None


def register() -> None:
    """Register "sparsek" with transformers (idempotent). Called on ``import hf_sparsek``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparsek_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparsek_mask)
