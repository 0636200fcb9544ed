"""Registration with transformers: the "sparsek" attention function and its mask function.

Both go through transformers' public ``AttentionInterface.register`` / ``AttentionMaskInterface.register``, under
"sparsek" and under one preset-qualified name per preset ("sparsek:sink128-window4096"). The face only translates
what transformers hands over: the mask function never builds a (q_len x kv_len) mask but a small
:class:`SparseKMask` (the padding row mask, the cache offsets, packed-sequence segment ids); the attention function
resolves the layer's pattern once (``model_defaults.layer_pattern``: sliding layers keep exactly the model's window,
Llama 4 chunked layers attend within their chunk, other layer types are refused), turns chunks into segment ids and
calls the op, ``ops.sparse_attention``, once. The op validates, builds the block index (cached on the mask, so the
layers of one forward share it), picks the backend and runs it.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .model_defaults import (
    ATTN_IMPLEMENTATION,
    CONFIG_ATTRIBUTE,
    SUPPORTED_LAYER_TYPES,
    implementation_names,
    layer_kind,
    layer_pattern,
)
from .ops import sparse_attention
from .patterns import SparsePattern
from .runtime import get_settings

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_LAYER_TYPES", "SparseKMask", "register", "sparsek_attention_forward",
           "sparsek_mask"]



@dataclass
class SparseKMask:
    """What one attention call needs to know beyond q, k, v: O(batch x kv_len), never quadratic.

    Queries sit at absolute positions ``q_offset + t``, keys at ``kv_offset + s``; under torch.compile a static
    cache's query offset stays the tensor transformers gives (no host read while tracing).
    ``padding``: (batch, kv_len) booleans over the keys of this call (True = real token); None when none is padded.
    ``segments``: (batch, seq) packed-sequence ids (prefill without offsets only); None for one sequence per row.
    ``attention_mask``: the 2D boolean mask it was made from (left padding decides where Llama 4 chunks start).
    ``q_offset_tensor``: made eagerly from a tensor offset (generate() prepares a static cache step's masks before
    the compiled forward, for models that take a dict of masks): a copy of it, which traced calls read instead of
    the int (a traced int guards on its value: one more graph).

    It stands where transformers would put a (batch, 1, q_len, kv_len) mask, hence ``ndim`` and ``shape``; the
    same object reaches every layer of one mask type in one forward, so they share its block indexes.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int | torch.Tensor
    kv_offset: int
    padding: torch.Tensor | None
    segments: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    q_offset_tensor: torch.Tensor | None = None
    _indexes: dict = field(default_factory=dict, repr=False, compare=False)
    _patterns: dict = field(default_factory=dict, repr=False, compare=False)
    _chunks: tuple | None = field(default=None, repr=False, compare=False)

    ndim = 4  # read by transformers' mask preprocessing when generate() hands a prepared mask back to the model

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def query_offset(self) -> int | torch.Tensor:
        """The offset a call reads: traced, the tensor where there is one (see ``q_offset_tensor``)."""
        return self.q_offset_tensor if self.q_offset_tensor is not None and _compiling() else self.q_offset

    # Model code that reads the mask tensor itself (DeepSeek V3.2's sparse indexer slices it, dynamic-mask models
    # read its dtype, older attention adds it to the scores) cannot run on a mask that is never materialized.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name.startswith("_"):  # copy, pickle and dataclass probes stay AttributeErrors
            raise AttributeError(name)
        raise MaskNotMaterialized(f"reads `attention_mask.{name}`")

    def __getitem__(self, item: Any) -> Any:
        raise MaskNotMaterialized("indexes the attention mask tensor")

    def _arithmetic(self, other: Any) -> Any:
        raise MaskNotMaterialized("adds the attention mask to its scores (its attention does not go through "
                                  "transformers' attention interface)")

    __add__ = __radd__ = __mul__ = __rmul__ = __and__ = __rand__ = _arithmetic


class MaskNotMaterialized(AttributeError, TypeError, ValueError):
    """Model code used the sparsek mask as a tensor. A ValueError (what this project raises for unsupported input)
    that ``hasattr`` / ``getattr(mask, name, default)`` still read as a missing attribute."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"this model's code {what}: attn_implementation='sparsek' never materializes the (q_len x kv_len) mask, "
            "so models whose own code reads it (sparse indexers, dynamic masks, attention outside transformers' "
            "attention interface) are not supported; use attn_implementation='sdpa' for this model"
        )


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _offset(value: Any) -> int | torch.Tensor:
    """Static caches give the query offset as a tensor: eager reads it once per forward, tracing keeps a copy (the
    cache advances the tensor in place when the first layer writes its keys)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if _compiling() else int(value.item())
    return int(value)


def _probe(mask_function: Callable, batch: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """transformers' index-based mask function at the pairs (q_idx[t], kv_idx[t]) of every batch row: (batch, t)."""
    device = q_idx.device
    b = torch.arange(batch, device=device).view(-1, 1)
    h = torch.zeros(1, 1, dtype=torch.long, device=device)
    out = mask_function(b, h, q_idx.view(1, -1), kv_idx.view(1, -1))
    return torch.as_tensor(out, dtype=torch.bool, device=device).expand(batch, q_idx.numel())


def sparsek_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | SparseKMask | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> SparseKMask:
    """Mask function registered as "sparsek": the padding of this call's keys, the offsets, packed segments.

    transformers folds what it detects from ``position_ids`` (packing, only without a cache and without a 2D mask)
    and the layer's chunking into the ``mask_function`` it hands us. Probing it at the pairs (i, i-1) tells where
    a new segment starts (it hides key i-1 from query i), O(L), once per forward and mask type. Probing it one step
    above the diagonal must hide every later key: a mask that shows a query later keys is not causal and raises.
    Eager reads these flags (and "nothing is padded") in one host sync; under torch.compile nothing is read, the
    padding and segments are always carried, and the causality check is skipped.

    ``attention_mask`` may be a SparseKMask that generate() prepared for this step (static caches): it is rebuilt
    from the 2D mask it came from, for the sizes of this call.
    """
    if use_vmap:
        raise ValueError(
            "attn_implementation='sparsek' cannot honour this model's custom mask overlay (or_mask_function / "
            "and_mask_function, e.g. bidirectional image tokens); use attn_implementation='sdpa' for it"
        )
    if isinstance(attention_mask, SparseKMask):
        attention_mask = attention_mask.attention_mask
    q_offset_tensor = q_offset.clone() if isinstance(q_offset, torch.Tensor) and not _compiling() else None
    q_offset, kv_offset = _offset(q_offset), int(kv_offset)
    device = kwargs.get("device", "cpu") if attention_mask is None else attention_mask.device
    flags: dict[str, torch.Tensor] = {}
    padding = source = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attn_implementation='sparsek' takes a 2D padding mask (batch, seq); got shape "
                f"{tuple(attention_mask.shape)}. Custom 4D masks are not supported by sparse attention."
            )
        source = attention_mask.to(torch.bool)  # transformers reads 2D masks as booleans for every implementation
        if source.shape[-1] < kv_offset + kv_length:  # static caches: slots past the mask are future (causally hidden)
            # kept padded: a mask generate() prepares for a compiled static-cache step then has the cache's length
            # every step, so the compiled forward sees one shape (no recompiles as the 2D mask grows)
            source = F.pad(source, (0, kv_offset + kv_length - source.shape[-1]), value=True)
        padding = source[:, kv_offset : kv_offset + kv_length]
        flags["unpadded"] = padding.all()
    starts = None
    if mask_function is not None and not _compiling():
        # Queries t whose next position t + 1 is one of this call's keys: none of them may see it.
        last = min(q_offset + q_length, kv_offset + kv_length - 1)
        if last > q_offset:
            t = torch.arange(q_offset, last, device=device)
            flags["sees_later"] = _probe(mask_function, batch_size, t, t + 1).any()
    no_cache = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
    if mask_function is not None:
        if attention_mask is None and no_cache and q_length == kv_length and q_length > 1:
            i = torch.arange(1, q_length, device=device)
            starts = ~_probe(mask_function, batch_size, i, i - 1)
            flags["packed"] = starts.any()
    if flags and not _compiling():
        values = dict(zip(flags, torch.stack(list(flags.values())).tolist(), strict=True))
        if values.get("sees_later"):
            raise ValueError(
                "attn_implementation='sparsek' supports causal attention only, but this model's mask lets a query "
                "attend later keys (a non-causal config or bidirectional blocks); use attn_implementation='sdpa'"
            )
        if values.get("unpadded"):
            padding = None
        if not values.get("packed", True):
            starts = None
    segments = None
    if starts is not None:
        first = torch.zeros_like(starts[:, :1], dtype=torch.int32)
        segments = torch.cat([first, torch.cumsum(starts, -1, dtype=torch.int32)], -1)
    return SparseKMask(batch_size, q_length, kv_length, q_offset, kv_offset, padding, segments, source,
                       q_offset_tensor)


ADAPTER_PATTERN_FILE = "sparsek_pattern.json"  # written beside an adapter by hf-sparsek finetune


def _frozen_adapter_layers(module: torch.nn.Module) -> bool:
    """Whether peft adapter layers loaded for inference (their weights frozen) sit in ``module``."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer):
            weights = [p for name in sub.adapter_layer_names for p in getattr(sub, name).parameters()]
            if weights and not any(p.requires_grad for p in weights):
                return True
    return False


def _check_adapters_have_a_pattern(module: torch.nn.Module) -> None:
    """Refuse to run a loaded peft adapter under a pattern nobody chose.

    Why: peft's own loaders (``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``) read the adapter's config
    and weights and nothing into the base model's config, where the pattern lives, so a base whose pattern was never
    chosen would silently run its model type's default instead of the pattern the adapter was trained under. An
    adapter being trained (``get_peft_model``: weights not frozen) runs under the default as any model does.
    """
    if getattr(module.config, CONFIG_ATTRIBUTE, None) is not None or not _frozen_adapter_layers(module):
        return
    raise ValueError(
        "this sparsek model runs a loaded peft adapter but no sparse pattern was chosen for it, so it would run "
        f"the {getattr(module.config, 'model_type', None)!r} default, not the pattern the adapter was trained under "
        "(peft does not restore it). Before the first forward: hf_sparsek.set_pattern(model, '<adapter folder>/"
        f"{ADAPTER_PATTERN_FILE}') for an adapter saved by hf-sparsek finetune, or hf_sparsek.set_pattern(model, "
        "<the pattern it was trained under>)"
    )


def _chunk_size(module: torch.nn.Module) -> int:
    chunk = getattr(module.config, "attention_chunk_size", None)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"a 'chunked_attention' layer needs config.attention_chunk_size >= 1, got {chunk!r}")
    return chunk


def _chunk_segments(mask: SparseKMask, chunk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(query, key) segment ids that make a "chunked_attention" layer exact at this call's offsets; None when one
    chunk holds every query and key (plain causal attention).

    Llama 4's chunked attention: key j is visible from query i iff both sit in the same chunk of ``chunk`` tokens,
    counted from the row's first real token (as transformers' chunked mask), and j <= i. The chunk number of a
    position is its segment id, for the queries and the keys alike (prefill, cached continuations, decode).
    """
    if mask.attention_mask is not None:
        left_pad = (mask.attention_mask.cumsum(-1) == 0).sum(-1).view(-1, 1)
    elif isinstance(mask.query_offset(), int) and mask.q_offset + mask.q_length <= chunk:
        return None
    else:
        device = mask.padding.device if mask.padding is not None else None
        left_pad = torch.zeros(mask.batch_size, 1, dtype=torch.long, device=device)

    def chunk_of(first: int | torch.Tensor, length: int) -> torch.Tensor:  # left padding counts to chunk 0
        pos = first + torch.arange(length, device=left_pad.device).view(1, -1)
        return torch.div((pos - left_pad).clamp(min=0), chunk, rounding_mode="floor")

    return chunk_of(mask.query_offset(), mask.q_length), chunk_of(mask.kv_offset, mask.kv_length)


def _learned_tiles(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, pattern: Any,
                   mask: SparseKMask, segments: torch.Tensor | None) -> torch.Tensor | None:
    """The key tiles the layer's trained scorer chooses (selector "learned"), else None (the op selects)."""
    if getattr(pattern, "resolved_selector", None) != "learned":
        return None
    if segments is not None:
        raise ValueError("selector 'learned' does not support packed sequences or chunked layers (segment ids); "
                         "use selector 'mass' for them")
    from .learned.face import learned_tiles

    return learned_tiles(module, query, key, pattern, mask.query_offset(), mask.kv_offset, mask.padding)


@functools.cache
def _warn_output_attentions() -> None:
    """Once per process, as transformers' sdpa and flash attention do: no weights come back (never materialized)."""
    logging.getLogger(__name__).warning(
        "attn_implementation='sparsek' does not return attention weights (output_attentions=True gives none); load "
        "the model with attn_implementation='eager' to get them (dense attention)")


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
    if kwargs.get("output_attentions", False):
        _warn_output_attentions()
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            "attn_implementation='sparsek' received a materialized attention mask tensor; pass a 2D padding mask "
            "(batch, seq) as attention_mask instead of a 4D mask"
        )
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    mask = attention_mask
    if mask is None:
        mask = SparseKMask(batch, q_len, kv_len, kv_len - q_len, 0, None)
    if mask.kv_length != kv_len:
        if mask.kv_length > kv_len:
            raise ValueError(f"the mask covers {mask.kv_length} keys but the layer has {kv_len}")
        key, value = key[:, :, : mask.kv_length], value[:, :, : mask.kv_length]

    if not (query.dtype == key.dtype == value.dtype) and torch.is_autocast_enabled(query.device.type):
        # Under autocast, RoPE leaves q/k in fp32 and v in bf16/fp16; cast like SDPA does (to the autocast dtype).
        target = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(target), key.to(target), value.to(target)
    layer_idx = getattr(module, "layer_idx", None)
    pattern = mask._patterns.get((layer_idx, sliding_window))
    if pattern is None:  # resolved once per layer and forward
        if not _compiling():
            _check_adapters_have_a_pattern(module)
        pattern = mask._patterns[layer_idx, sliding_window] = layer_pattern(module.config, layer_idx, sliding_window)
    segments, query_segments = mask.segments, None
    if sliding_window is None and segments is None and layer_kind(module.config, layer_idx) == "chunked_attention":
        if mask._chunks is None:  # once per mask: every chunked layer of the forward shares it
            mask._chunks = (_chunk_segments(mask, _chunk_size(module)),)
        if mask._chunks[0] is not None:
            query_segments, segments = mask._chunks[0]
    settings = get_settings()
    selected = _learned_tiles(module, query, key, pattern, mask, segments)
    state = None  # selector "mass": the layer's key tile features kept across the calls of a generation
    if selected is None and not module.training:
        state = _kept_features(module, pattern, query, key, value, mask, softcap, settings.backend)
    out = sparse_attention(
        query, key, value, pattern, scale=scaling, softcap=softcap, q_offset=mask.query_offset(),
        kv_offset=mask.kv_offset,
        attention_mask=mask.padding, segment_ids=segments, query_segment_ids=query_segments,
        index_cache=mask._indexes, backend=settings.backend, dense_via_sdpa=settings.dense_via_sdpa,
        selected_tiles=selected, selection_state=state,
    )
    return out.transpose(1, 2).contiguous(), None


def _kept_features(module: torch.nn.Module, pattern: SparsePattern, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, mask: SparseKMask, softcap: float | None, backend: str) -> Any:
    """The layer's kept key tile features for this call: eager, its SelectionState (and, on a static cache the
    Triton kernels decode, its DecodeStore made ready for the compiled steps to come); traced, its DecodeStore."""
    from .selection.decode_store import decode_store_of, prepare_decode_store

    if _compiling():
        return decode_store_of(module, pattern)
    from .ops import _uses_triton
    from .selection.store import selection_state_for

    if isinstance(mask.q_offset, int) and _uses_triton(query, key, value, softcap, backend):
        prepare_decode_store(module, pattern, key, query.shape[2], mask.q_offset, mask.kv_offset)
    return selection_state_for(module, pattern)


def register() -> None:
    """Register "sparsek" and "sparsek:<preset>" with transformers (idempotent). Called on ``import hf_sparsek``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in implementation_names():
        AttentionInterface.register(name, sparsek_attention_forward)
        AttentionMaskInterface.register(name, sparsek_mask)
