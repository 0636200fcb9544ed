"""Registration with transformers: the "sparsek" attention function and its mask function.

Both go through transformers' public ``AttentionInterface.register`` / ``AttentionMaskInterface.register``, under
"sparsek" and under one preset-qualified name per preset ("sparsek:sink128-window4096"). The mask function never
builds a (q_len x kv_len) mask: it hands the attention function a small :class:`SparseKMask` with the padding row
mask, the cache offsets and, for packed sequences, the segment ids, and the attention function builds a block index
from them (once per mask and pattern: the layers of one forward share it).

Layer types (``config.layer_types``): "full_attention" layers use the model's pattern, "sliding_attention" layers
keep exactly the model's window, "chunked_attention" layers (Llama 4) attend exactly within their chunk; any other
type is refused with a ValueError.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .model_defaults import ATTN_IMPLEMENTATION, CONFIG_ATTRIBUTE, implementation_names
from .model_defaults import layer_pattern as config_layer_pattern
from .ops import build_index_for, sparse_attention, triton_unsupported_reason
from .patterns import SparsePattern
from .runtime import get_settings

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_LAYER_TYPES", "SparseKMask", "register", "sparsek_attention_forward",
           "sparsek_mask"]

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
logger = logging.getLogger(__name__)
_warned: set[str] = set()


@dataclass
class SparseKMask:
    """What one attention call needs to know beyond q, k, v: O(batch x kv_len), never quadratic.

    Queries sit at absolute positions ``q_offset + t``, keys at ``kv_offset + s``.
    ``padding``: (batch, kv_len) booleans over the keys of this call (True = real token); None when none is padded.
    ``segments``: (batch, seq) packed-sequence ids (prefill without offsets only); None for one sequence per row.
    ``attention_mask``: the 2D boolean mask it was made from (left padding decides where Llama 4 chunks start).

    It stands where transformers would put a (batch, 1, q_len, kv_len) mask, hence ``ndim`` and ``shape``; the
    same object reaches every layer of one mask type in one forward, so they share its block indexes.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    padding: torch.Tensor | None
    segments: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    _indexes: dict = field(default_factory=dict, repr=False, compare=False)
    _patterns: dict = field(default_factory=dict, repr=False, compare=False)
    _chunked: list | None = field(default=None, repr=False, compare=False)

    ndim = 4  # read by transformers' mask preprocessing when generate() hands a prepared mask back to the model

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

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


def _as_int(value: Any) -> int:
    # Static caches give the query offset as a tensor (one host read per forward; an int under no cache).
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


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
    q_offset, kv_offset = _as_int(q_offset), _as_int(kv_offset)
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
        am = source
        if am.shape[-1] < kv_offset + kv_length:  # static caches: slots past the mask are future (causally hidden)
            am = F.pad(am, (0, kv_offset + kv_length - am.shape[-1]), value=True)
        padding = am[:, kv_offset : kv_offset + kv_length]
        flags["unpadded"] = padding.all()
    starts = None
    if mask_function is not None:
        # Queries t whose next position t + 1 is one of this call's keys: none of them may see it.
        last = min(q_offset + q_length, kv_offset + kv_length - 1)
        if last > q_offset:
            t = torch.arange(q_offset, last, device=device)
            flags["sees_later"] = _probe(mask_function, batch_size, t, t + 1).any()
        if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length and q_length > 1:
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
    return SparseKMask(batch_size, q_length, kv_length, q_offset, kv_offset, padding, segments, source)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _layer_type(module: torch.nn.Module) -> str | None:
    """The layer's entry in ``config.layer_types`` (None when the config has none); unknown types are refused."""
    types = getattr(module.config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if not types or layer_idx is None or layer_idx >= len(types):
        return None
    kind = types[layer_idx]
    if kind not in SUPPORTED_LAYER_TYPES:
        raise ValueError(
            f"attn_implementation='sparsek' does not support layer type {kind!r} (layer {layer_idx}); supported "
            f"layer types: {SUPPORTED_LAYER_TYPES}. Use attn_implementation='sdpa' for this model."
        )
    return kind


def layer_pattern(module: torch.nn.Module, sliding_window: int | None) -> SparsePattern:
    """The pattern of the layer that ``module`` belongs to. A model's sliding layers keep exactly their window;
    chunked layers are dense within their chunk (the chunks themselves are applied as segments / padding)."""
    kind = _layer_type(module)
    if kind == "sliding_attention" and sliding_window is None:
        raise ValueError(
            f"layer {module.layer_idx} is a 'sliding_attention' layer but the model passed no sliding_window to the "
            "attention function; attn_implementation='sparsek' cannot know its window"
        )
    if sliding_window is not None or kind == "chunked_attention":
        block_size = config_layer_pattern(module.config, None).block_size
        return SparsePattern(block_size=block_size, window=None if sliding_window is None else int(sliding_window))
    return config_layer_pattern(module.config, getattr(module, "layer_idx", None))


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


# One piece of a call: query rows [start, end), the padding and segment ids under which they attend.
Piece = tuple[int, int, "torch.Tensor | None", "torch.Tensor | None"]


def _chunked_pieces(mask: SparseKMask, chunk: int) -> list[Piece]:
    """Query pieces that make a "chunked_attention" layer exact at this call's offsets.

    Llama 4's chunked attention: key j is visible from query i iff both sit in the same chunk of ``chunk`` tokens,
    counted from the row's first real token (as transformers' chunked mask), and j <= i. Prefill (queries = keys)
    takes the chunks as segment ids. Over a cache, the queries are cut where any row starts a chunk; in each piece
    every row's queries share one chunk, whose start hides earlier keys through the padding mask.
    """
    q_len = mask.q_length
    if mask.attention_mask is not None:
        left_pad = (mask.attention_mask.cumsum(-1) == 0).sum(-1).view(-1, 1)
    elif mask.q_offset + q_len <= chunk:
        return [(0, q_len, mask.padding, None)]  # one chunk holds every query and key: plain causal attention
    else:
        device = mask.padding.device if mask.padding is not None else None
        left_pad = torch.zeros(mask.batch_size, 1, dtype=torch.long, device=device)
    device = left_pad.device

    def chunk_of(pos: torch.Tensor) -> torch.Tensor:  # left padding counts to chunk 0
        return torch.div((pos - left_pad).clamp(min=0), chunk, rounding_mode="floor")

    q_pos = mask.q_offset + torch.arange(q_len, device=device).view(1, -1)
    if mask.q_offset == mask.kv_offset and q_len == mask.kv_length:
        return [(0, q_len, mask.padding, chunk_of(q_pos))]
    cuts = [0, q_len]
    if q_len > 1:
        if _compiling():
            raise ValueError("a 'chunked_attention' layer with a cache takes one query per call under torch.compile")
        q_chunk = chunk_of(q_pos)
        starts = (q_chunk[:, 1:] != q_chunk[:, :-1]).any(0).nonzero().flatten() + 1  # one host read
        cuts = [0, *starts.tolist(), q_len]
    k_pos = mask.kv_offset + torch.arange(mask.kv_length, device=device).view(1, -1)
    pieces = []
    for t0, t1 in zip(cuts[:-1], cuts[1:], strict=True):
        in_chunk = k_pos >= left_pad + chunk_of(q_pos[:, t0 : t0 + 1]) * chunk
        pieces.append((t0, t1, in_chunk if mask.padding is None else mask.padding & in_chunk, None))
    return pieces


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
        attention_mask = SparseKMask(batch, q_len, kv_len, kv_len - q_len, 0, None)
    mask = attention_mask
    if mask.kv_length != kv_len:
        if mask.kv_length > kv_len:
            raise ValueError(f"the mask covers {mask.kv_length} keys but the layer has {kv_len}")
        key, value = key[:, :, : mask.kv_length], value[:, :, : mask.kv_length]
        kv_len = mask.kv_length

    if not (query.dtype == key.dtype == value.dtype) and torch.is_autocast_enabled(query.device.type):
        # Under autocast, RoPE leaves q/k in fp32 and v in bf16/fp16; cast like SDPA does (to the autocast dtype).
        target = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(target), key.to(target), value.to(target)
    layer_idx = getattr(module, "layer_idx", None)
    pattern_key = (layer_idx, sliding_window)
    pattern = mask._patterns.get(pattern_key)
    if pattern is None:  # resolved once per layer and forward
        if not _compiling():
            _check_adapters_have_a_pattern(module)
        pattern = mask._patterns[pattern_key] = layer_pattern(module, sliding_window)
    pieces: list[Piece] = [(0, q_len, mask.padding, mask.segments)]
    chunked = sliding_window is None and mask.segments is None and _layer_type(module) == "chunked_attention"
    if chunked:
        if mask._chunked is None:  # once per mask: every chunked layer of the forward shares it
            mask._chunked = _chunked_pieces(mask, _chunk_size(module))
        pieces = mask._chunked
    settings = get_settings()
    all_dense_rows = pattern.is_dense or mask.q_offset + q_len <= pattern.min_sparse_len
    plain = len(pieces) == 1 and pieces[0][2] is None and pieces[0][3] is None
    if all_dense_rows and settings.dense_via_sdpa and plain and not softcap:
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
    outs = []
    for piece, (t0, t1, padding, segments) in enumerate(pieces):
        q_piece = query if len(pieces) == 1 else query[:, :, t0:t1]
        q_offset = mask.q_offset + t0
        index = None
        if pattern.topk_blocks is None:  # a data-dependent selection is rebuilt per layer
            cache_key = (pattern, chunked, piece, key.shape[1], q_len, kv_len, query.device)
            index = mask._indexes.get(cache_key)
            if index is None:
                index = build_index_for(q_piece, key, pattern, q_offset, mask.kv_offset, padding, segments)
                mask._indexes[cache_key] = index
        outs.append(sparse_attention(
            q_piece, key, value, pattern, scale=scaling, softcap=softcap, q_offset=q_offset,
            kv_offset=mask.kv_offset, attention_mask=padding, segment_ids=segments, index=index, backend=backend,
        ))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
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
    """Register "sparsek" and "sparsek:<preset>" with transformers (idempotent). Called on ``import hf_sparsek``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in implementation_names():
        AttentionInterface.register(name, sparsek_attention_forward)
        AttentionMaskInterface.register(name, sparsek_mask)
