"""The op: ``sparse_attention`` validates its inputs once, builds (or reuses) the block index, makes the one backend
decision (torch SDPA for dense rows where asked, the Triton kernels, or the PyTorch reference) and runs it. Under
torch.compile it is one custom op (``hf_sparsek::sparse_attention``) that builds the index inside, so a model
compiles with ``fullgraph=True``.

Mask picture of ``SparsePattern(sink_tokens=2, window=3)`` on 8 tokens (rows are queries, ``#`` attended)::

    # . . . . . . .
    # # . . . . . .
    # # # . . . . .
    # # # # . . . .
    # # # # # . . .
    # # . # # # . .
    # # . . # # # .
    # # . . . # # #
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

from .block_index import BlockIndex, absolute_position, build_block_index
from .patterns import BlockLayout, SparsePattern
from .reference import reference_attention
from .selection import (
    SelectionState,
    select_tiles,
    select_tiles_at_device_offset,
    selects_at_device_offset,
    written_key_info,
)
from .selection.decode_store import DecodeStore

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _check_layout(
    batch: int, q_len: int, kv_len: int, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
    query_segment_ids: torch.Tensor | None = None,
) -> None:
    """Shape and dtype checks of a padding mask / packed segment ids (metadata only: no device work)."""
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] != kv_len:
            raise ValueError(
                f"attention_mask must be (batch, kv_len) = ({batch}, {kv_len}) of booleans (True = real token), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            # Reading an additive mask (0 = keep, -inf = masked) as booleans would invert the padding.
            raise ValueError(
                f"attention_mask has dtype {attention_mask.dtype}; expected bool or integer with True / 1 = real "
                "token and False / 0 = padding. Convert an additive mask (0 = keep, -inf = masked) with "
                "`attention_mask == 0`"
            )
    for name, ids in (("segment_ids", segment_ids), ("query_segment_ids", query_segment_ids)):
        if ids is not None and (ids.dtype.is_floating_point or ids.dtype.is_complex):
            raise ValueError(f"{name} must be an integer tensor of sequence ids, got dtype {ids.dtype}")
    if query_segment_ids is not None:
        if segment_ids is None or query_segment_ids.shape != (batch, q_len):
            raise ValueError(
                f"query_segment_ids must be (batch, q_len) = ({batch}, {q_len}) and come with segment_ids, got "
                f"shape {tuple(query_segment_ids.shape)}"
                + ("" if segment_ids is not None else " without segment_ids")
            )
        if segment_ids.shape != (batch, kv_len):
            raise ValueError(f"segment_ids must be (batch, kv_len) = ({batch}, {kv_len}), got shape "
                             f"{tuple(segment_ids.shape)}")
    elif segment_ids is not None and (segment_ids.shape != (batch, kv_len) or q_len != kv_len):
        raise ValueError(
            f"segment_ids must be (batch, seq) = ({batch}, {kv_len}) with q_len == kv_len (packed sequences "
            f"without a cache; pass query_segment_ids otherwise), got shape {tuple(segment_ids.shape)} and "
            f"q_len={q_len}"
        )


def sequence_layout(
    batch: int,
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
    query_segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Padding mask / segment ids -> (k_seg, q_seg, k_rank) for the block index; all None when unpadded.

    A key's rank counts from the first key of its segment in this call (sinks of packed sequences)."""
    _check_layout(batch, q_len, kv_len, attention_mask, segment_ids, query_segment_ids)
    if attention_mask is None and segment_ids is None:
        return None, None, None
    if attention_mask is not None:
        valid = attention_mask.to(device=device, dtype=torch.bool)
    else:
        valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    if segment_ids is None:
        k_seg = torch.where(valid, 0, -1).to(torch.int32)
        k_rank = (torch.cumsum(valid.to(torch.int32), -1) - 1).to(torch.int32)
        return k_seg, None, k_rank
    seg = segment_ids.to(device=device, dtype=torch.int32)
    k_seg = torch.where(valid, seg, -1).to(torch.int32)
    q_seg = seg if query_segment_ids is None else query_segment_ids.to(device=device, dtype=torch.int32)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    pos = torch.arange(kv_len, device=device).expand(batch, kv_len)
    seg_start = torch.cummax(torch.where(starts, pos, 0), dim=-1).values
    k_rank = (pos - seg_start).to(torch.int32)
    return k_seg, q_seg, k_rank


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/heads/seq mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]}) for grouped-query attention"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(
            f"sparse attention needs at least one query and one key, got q_len={q.shape[2]}, kv_len={k.shape[2]}"
        )


def _resolve_offsets(q_len: int, kv_len: int, q_offset: object | None, kv_offset: object) -> tuple[int, int]:
    """Checked (q_offset, kv_offset); q_offset defaults to the last q_len key positions (prefill, chunk, decode)."""
    kv_offset = absolute_position("kv_offset", kv_offset)
    q_offset = kv_offset + kv_len - q_len if q_offset is None else absolute_position("q_offset", q_offset)
    if q_offset < 0:
        raise ValueError(
            f"q_offset defaults to kv_offset + kv_len - q_len = {q_offset}, which is negative: more queries "
            f"(q_len={q_len}) than key positions (kv_offset + kv_len = {kv_offset + kv_len}); pass q_offset"
        )
    return q_offset, kv_offset


def _check_index(
    index: BlockIndex,
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: SparsePattern | None,
    q_offset: int,
    kv_offset: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
) -> None:
    """A prebuilt index must describe this call: shapes, offsets, pattern terms and padding (shapes only, no sync)."""
    batch, kv_heads, q_len, kv_len = q.shape[0], k.shape[1], q.shape[2], k.shape[2]

    def fail(what: str, got: object, want: object) -> None:
        raise ValueError(f"index does not match this call: index {what}={got}, but the call has {what}={want}")

    for what, got, want in (
        ("q_len", index.q_len, q_len), ("kv_len", index.kv_len, kv_len),
        ("q_offset", index.q_offset, q_offset), ("kv_offset", index.kv_offset, kv_offset),
    ):
        if got != want:
            fail(what, got, want)
    if pattern is not None:
        for what, got, want in (
            ("block_size", index.block_size, pattern.block_size),
            ("sink_tokens", index.sink_tokens, pattern.sink_tokens),
            ("window", index.window, pattern.window or 0),
        ):
            if got != want:
                fail(what, got, want)
    block = index.block_size
    n_q = (q_offset % block + q_len + block - 1) // block
    n_k = (kv_offset % block + kv_len + block - 1) // block
    if (index.n_q_tiles, index.n_k_tiles) != (n_q, n_k):
        fail("(query tiles, key tiles)", (index.n_q_tiles, index.n_k_tiles), (n_q, n_k))
    if index.full_count.dim() != 3 or index.full_count.shape[0] not in (1, batch):
        fail("batch", tuple(index.full_count.shape)[:1], batch)
    if index.full_count.shape[1] not in (1, kv_heads):
        fail("kv_heads", index.full_count.shape[1], kv_heads)
    # The kernels read all four lists with the strides of full_count: their leading dims must agree.
    for name, t in (("full_count", index.full_count), ("part_count", index.part_count)):
        if t.shape != index.full_count.shape[:2] + (n_q,):
            fail(f"{name} shape", tuple(t.shape), index.full_count.shape[:2] + (n_q,))
    for name, t in (("full_tiles", index.full_tiles), ("part_tiles", index.part_tiles)):
        if t.dim() != 4 or t.shape[:3] != index.full_count.shape:
            fail(f"{name} shape", tuple(t.shape), tuple(index.full_count.shape) + ("width",))
    for name, t, length in (("k_seg", index.k_seg, kv_len), ("q_seg", index.q_seg, q_len),
                            ("k_rank", index.k_rank, kv_len)):
        if t is not None and tuple(t.shape) != (batch, length):
            fail(f"{name} shape (batch, length)", tuple(t.shape), (batch, length))
    padded = attention_mask is not None or segment_ids is not None
    if padded != (index.k_seg is not None):
        raise ValueError(
            "index does not match this call: it was built "
            + ("without" if padded else "with")
            + " an attention_mask / segment_ids, and the call passes "
            + ("one" if padded else "none")
            + "; build the index with the same attention_mask and segment_ids"
        )
    if (segment_ids is not None) != (index.q_seg is not None):
        raise ValueError("index does not match this call: build the index with the same segment_ids")
    if index.full_count.device != q.device:
        fail("device", index.full_count.device, q.device)


def build_index_for(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: SparsePattern,
    q_offset: int | None = None,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    query_segment_ids: torch.Tensor | None = None,
    selected_tiles: torch.Tensor | None = None,
    selection_state: SelectionState | None = None,
) -> BlockIndex:
    """The block index ``sparse_attention`` would use for these inputs (exposed for kernels, tests, benchmarks)."""
    batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
    q_offset, kv_offset = _resolve_offsets(q_len, kv_len, q_offset, kv_offset)
    k_seg, q_seg, k_rank = sequence_layout(batch, q_len, kv_len, attention_mask, segment_ids, q.device,
                                           query_segment_ids)
    topk = None
    if selected_tiles is not None:
        topk = _checked_selected_tiles(selected_tiles, batch, k.shape[1], q_len, q_offset, pattern.block_size,
                                       q.device)
    elif pattern.topk_blocks is not None:
        topk = select_tiles(q, k, pattern, q_offset, kv_offset, k_seg, selection_state=selection_state)
    return build_block_index(
        pattern, batch=batch, kv_heads=k.shape[1], q_len=q_len, kv_len=kv_len, q_offset=q_offset,
        kv_offset=kv_offset, k_seg=k_seg, q_seg=q_seg, k_rank=k_rank, topk_tiles=topk, device=q.device,
    )


def _checked_selected_tiles(tiles: torch.Tensor, batch: int, kv_heads: int, q_len: int, q_offset: int, block: int,
                            device: torch.device) -> torch.Tensor:
    """Key tiles chosen outside the op, checked on shape and dtype only (no device read)."""
    n_q = (q_offset % block + q_len + block - 1) // block
    if (not isinstance(tiles, torch.Tensor) or tiles.dim() != 4 or tiles.dtype.is_floating_point
            or tiles.dtype == torch.bool or tiles.shape[0] not in (1, batch) or tiles.shape[1] not in (1, kv_heads)
            or tiles.shape[2] != n_q):
        got = (f"{tuple(tiles.shape)} {tiles.dtype}" if isinstance(tiles, torch.Tensor) else type(tiles).__name__)
        raise ValueError(
            f"selected_tiles must be an integer tensor (1 or batch={batch}, 1 or kv_heads={kv_heads}, "
            f"query tiles={n_q}, k) of key tile numbers on the absolute {block}-token grid (-1 = none), got {got}"
        )
    if tiles.device != device:
        raise ValueError(f"selected_tiles is on {tiles.device}, the inputs on {device}")
    return tiles


def _without_repeats(tiles: torch.Tensor) -> torch.Tensor:
    """Tile lists with each repeated tile number after its first replaced by -1 (sorted rows; no host read)."""
    ordered = tiles.sort(-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return ordered.masked_fill(repeat, -1)


def triton_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None = None
                              ) -> str | None:
    """None when the Triton kernels can run these inputs, else why not: the one question behind the backend choice
    and its errors (``kernels.dispatch.unsupported_reason``, or why the kernels cannot be imported)."""
    try:
        from .kernels.dispatch import unsupported_reason
    except ImportError as exc:  # triton missing, or the kernels package not built for this platform
        return f"the Triton kernels cannot be imported ({exc})"
    return unsupported_reason(q, k, v, softcap)


def _uses_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None, backend: Backend) -> bool:
    """The backend decision: "auto" takes the Triton kernels on CUDA where they can run (else the reference, with a
    one-time warning on GPU); a forced backend that cannot run raises (nothing falls back silently)."""
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        return False
    reason = triton_unsupported_reason(q, k, v, softcap)
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run: {reason}")
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("hf_sparsek: running the PyTorch reference on GPU (slow, same results): %s", reason)
    return False


def _sdpa_applies(q_len: int, kv_len: int, q_offset: int, kv_offset: int) -> bool:
    """Dense causal attention needs no mask tensor in torch SDPA: prefill, or one query at the end of the keys."""
    return (q_len == kv_len and q_offset == kv_offset) or (q_len == 1 and q_offset + 1 == kv_offset + kv_len)


_STATIC_INDEXES: OrderedDict[tuple, BlockIndex] = OrderedDict()
STATIC_INDEX_CAPACITY = 64  # shape classes kept (an index is O(query tiles x listed tiles) int32: KBs to a few MBs)


def _static_index(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int
                  ) -> BlockIndex:
    """The index of a call without padding, packing or selection depends only on the pattern, the KV heads, the
    lengths, the offsets and the device: built once per such shape class and reused across calls and forwards
    (least recently used dropped past ``STATIC_INDEX_CAPACITY``), with its transposed lists for the backward."""
    key = (pattern, k.shape[1], q.shape[2], k.shape[2], q_offset, kv_offset, q.device)
    index = _STATIC_INDEXES.get(key)
    if index is not None:
        _STATIC_INDEXES.move_to_end(key)
        return index
    index = _STATIC_INDEXES[key] = build_index_for(q[:1], k[:1], pattern, q_offset, kv_offset)
    while len(_STATIC_INDEXES) > STATIC_INDEX_CAPACITY:
        _STATIC_INDEXES.popitem(last=False)
    return index


def clear_index_cache() -> None:
    """Drop the block indexes kept across calls (they are rebuilt on demand)."""
    _STATIC_INDEXES.clear()


def _index_for_call(
    cache: dict | None, q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
    attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, query_segment_ids: torch.Tensor | None,
    selected_tiles: torch.Tensor | None = None, selection_state: SelectionState | None = None,
) -> BlockIndex:
    """Build the index, or reuse one of ``cache`` built for the same pattern, shapes and kind of layout. A top-k
    selection depends on q and k, so it is rebuilt per call."""
    if pattern.topk_blocks is not None or selected_tiles is not None:
        return build_index_for(q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids, query_segment_ids,
                               selected_tiles, selection_state)
    if attention_mask is None and segment_ids is None and query_segment_ids is None:
        return _static_index(q, k, pattern, q_offset, kv_offset)
    if cache is None:
        return build_index_for(q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids, query_segment_ids)
    key = (pattern, k.shape[1], q.shape[2], k.shape[2], q_offset, kv_offset, attention_mask is not None,
           segment_ids is not None, query_segment_ids is not None, q.device)
    index = cache.get(key)
    if index is None:
        index = cache[key] = build_index_for(q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids,
                                             query_segment_ids)
    return index


def _pattern_from(value: object) -> SparsePattern:
    """A SparsePattern from an object of its fields, a JSON object or a preset name (ValueError otherwise)."""
    from .presets import PRESETS

    if isinstance(value, str):
        if value in PRESETS:
            return PRESETS[value]
        if value.lstrip().startswith("{"):
            value = json.loads(value)
        else:
            raise ValueError(f"pattern {value!r} is not a preset ({sorted(PRESETS)}) nor a JSON object of "
                             "SparsePattern fields")
    if isinstance(value, dict):
        return SparsePattern.from_dict(value)
    raise ValueError(f"pattern must be a SparsePattern, an object of its fields or a preset name, got "
                     f"{type(value).__name__}")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern | dict | str | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    q_offset: int | torch.Tensor | None = None,
    kv_offset: int | torch.Tensor = 0,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    query_segment_ids: torch.Tensor | None = None,
    index: BlockIndex | None = None,
    index_cache: dict | None = None,
    backend: Backend = "auto",
    dense_via_sdpa: bool = False,
    selected_tiles: torch.Tensor | None = None,
    selection_state: SelectionState | DecodeStore | None = None,
) -> torch.Tensor:
    """Causal block-sparse attention. Differentiable.

    Args:
        q: (batch, q_heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim). q_heads must be a multiple
            of kv_heads (GQA / MQA read each KV head once per group, no copies; a pattern with ``per_query_head``
            repeats K / V per query head, see :func:`per_query_head_kv`).
        pattern: which keys each query sees (default: dense causal): a :class:`SparsePattern`, an object of its
            fields (dict or JSON text) or a preset name.
        scale: softmax scale (default 1/sqrt(head_dim)); softcap: tanh logit soft-capping (Gemma 2 style).
        q_offset, kv_offset: absolute positions (integers >= 0, or one-element integer tensors) of the first query /
            key (default: queries are the last q_len positions of the keys, as in prefill, chunked prefill and
            decode against a cache).
        attention_mask: (batch, kv_len) bool or integer, True / 1 for real keys, False / 0 for padding; sinks count
            from the first real key. A floating (additive) mask raises: pass ``mask == 0`` instead.
        segment_ids: (batch, kv_len) integer sequence ids of the keys: no attention across sequences. Without
            ``query_segment_ids`` the queries are the keys (packed sequences, q_len == kv_len).
        query_segment_ids: (batch, q_len) sequence ids of the queries, where they are not the keys' (a cached call).
        index: a prebuilt block index (skips building one). It must match the other arguments: lengths, offsets,
            batch / heads, the pattern's block size, sinks and window, and whether a mask / segment ids were given
            (checked on shapes; the mask's values are not compared).
        index_cache: a dict kept by the caller for one padding mask / segments source (the layers of one forward):
            indexes built here are stored in it and reused by later calls with the same pattern and shapes.
        backend: "auto" (Triton kernels on CUDA when supported, else the reference), "triton" or "reference".
            A forced backend that cannot run raises; nothing falls back silently.
        dense_via_sdpa: rows that are all dense (a dense pattern, or queries under ``min_sparse_len``) without
            padding, segments or softcap run torch SDPA where it needs no mask.
        selected_tiles: key tiles chosen outside the op (a learned scorer), (1 or batch, 1 or kv_heads, query tiles,
            k) integers on the absolute ``block_size`` grid, -1 = none: attended as whole blocks (causal, valid,
            same sequence) beside the pattern's sink and window; the pattern's own selector does not run.
        selection_state: a :class:`hf_sparsek.selection.SelectionState` the caller keeps per layer: selector
            ``"mass"`` keeps its key tile features there across calls, so a decode step pools only the tile being
            filled instead of every key (reused only while the calls continue one sequence; see
            ``hf_sparsek.selection.store``). None: no reuse. Under torch.compile a
            :class:`hf_sparsek.selection.decode_store.DecodeStore` made for these keys instead (a static cache's
            decode steps: kept in device tensors a CUDA graph updates); a SelectionState raises there.

    Returns:
        (batch, q_heads, q_len, head_dim) in q's dtype. Rows with nothing to attend are zeros. A batch of 0 gives
        an empty output; q_len or kv_len 0 raises.
    """
    _validate(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; supported: {BACKENDS}")
    _check_layout(q.shape[0], q.shape[2], k.shape[2], attention_mask, segment_ids, query_segment_ids)
    if index is None and pattern is None:
        pattern = SparsePattern()
    if pattern is not None and not isinstance(pattern, SparsePattern):
        pattern = _pattern_from(pattern)
    if index is not None and selected_tiles is not None:
        raise ValueError("pass either a prebuilt index or selected_tiles, not both (the index already holds tiles)")
    if pattern is not None and index is None and _every_row_dense(pattern, q.shape[2], k.shape[2], q_offset, kv_offset):
        pattern, selected_tiles = SparsePattern(block_size=pattern.block_size), None  # no selection, tail or repeat
    if pattern is not None and pattern.dense_tail and q.shape[2] > pattern.dense_tail and not pattern.is_dense:
        if index is not None or selected_tiles is not None:
            raise ValueError("dense_tail splits the call in two (its last rows dense); a prebuilt index or "
                             "selected_tiles describe the whole call: set dense_tail=0 in the pattern, or pass neither")
        return _with_dense_tail(q, k, v, pattern, scale, softcap, q_offset, kv_offset, attention_mask, segment_ids,
                                query_segment_ids, index_cache, backend, dense_via_sdpa, selection_state)
    if pattern is not None and pattern.per_query_head:
        k, v, pattern = per_query_head_kv(q, k, v, pattern, selected_tiles, index)
    if torch.compiler.is_compiling() and isinstance(selection_state, SelectionState):
        raise ValueError("a SelectionState is not supported under torch.compile (it keeps Python state across "
                         "calls); pass None there, or a DecodeStore (hf_sparsek.selection.decode_store)")
    if torch.compiler.is_compiling() and index is None:
        return _traced_call(q, k, v, attention_mask, segment_ids, query_segment_ids, q_offset, kv_offset, pattern,
                            scale, softcap, backend, dense_via_sdpa, selected_tiles, selection_state, index_cache)
    if isinstance(selection_state, DecodeStore):
        raise ValueError("a DecodeStore serves compiled decode steps only; eager calls take a SelectionState "
                         "(hf_sparsek.selection.SelectionState) or None")
    q_offset, kv_offset = _resolve_offsets(q.shape[2], k.shape[2], q_offset, kv_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if index is None:
        out = _decode_without_index(q, k, v, pattern, q_offset, kv_offset, attention_mask, segment_ids,
                                    query_segment_ids, selected_tiles, index_cache, scale, softcap, backend,
                                    dense_via_sdpa, selection_state)
        if out is not None:
            return out
        index = _prepare_index(q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids, query_segment_ids,
                               index_cache, softcap, dense_via_sdpa, selected_tiles, selection_state)
    else:
        _check_index(index, q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids)
    return _attend(q, k, v, index, scale, softcap, backend)


def _every_row_dense(pattern: SparsePattern, q_len: int, kv_len: int, q_offset: object, kv_offset: object) -> bool:
    """Whether every query of the call lies below ``min_sparse_len``, so that the call is dense attention and skips
    the pattern's per-call work (selection, a dense tail's split, the per-query-head repeat). The one place that
    decides it. Tensor offsets are read here in eager mode (the call reads them anyway); under torch.compile they
    say no (the op's body, which gets them as ints, decides)."""
    if not pattern.min_sparse_len:
        return False
    if torch.compiler.is_compiling() and (isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor)):
        return False
    try:
        q_offset, kv_offset = _resolve_offsets(q_len, kv_len, q_offset, kv_offset)
    except (ValueError, TypeError):
        return False  # left to the offsets' own checks, with their messages
    return q_offset + q_len <= pattern.min_sparse_len


def _with_dense_tail(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                     scale: float | None, softcap: float | None, q_offset: object, kv_offset: object,
                     attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
                     query_segment_ids: torch.Tensor | None, index_cache: dict | None, backend: Backend,
                     dense_via_sdpa: bool, selection_state: SelectionState | None) -> torch.Tensor:
    """``dense_tail`` t: the call's first rows under the pattern, its last t rows dense, as two calls over the same
    keys (causality hides the keys after a row; offsets stay tensors where given as tensors: nothing is read on the
    host). Packed sequences pass each part's query segment ids."""
    tail = pattern.dense_tail
    head = q.shape[2] - tail
    q_start = kv_offset + k.shape[2] - q.shape[2] if q_offset is None else q_offset
    if query_segment_ids is None and segment_ids is not None:
        query_segment_ids = segment_ids  # the queries are the keys
    q_seg = (None, None) if query_segment_ids is None else (query_segment_ids[:, :head], query_segment_ids[:, head:])
    common = dict(scale=scale, softcap=softcap, kv_offset=kv_offset, index_cache=index_cache, backend=backend,
                  dense_via_sdpa=dense_via_sdpa)
    keys, mask, seg = k.shape[2], attention_mask, segment_ids
    if not isinstance(q_start, torch.Tensor) and not isinstance(kv_offset, torch.Tensor):
        keys = max(1, min(keys, q_start + head - kv_offset))  # the first part's causal keys only
        mask = None if mask is None else mask[:, :keys]
        seg = None if seg is None else seg[:, :keys]
    first = sparse_attention(q[:, :, :head], k[:, :, :keys], v[:, :, :keys], pattern.replace(dense_tail=0),
                             q_offset=q_start, attention_mask=mask, segment_ids=seg, query_segment_ids=q_seg[0],
                             selection_state=selection_state, **common)
    dense = SparsePattern(block_size=pattern.block_size)
    step = _tail_step(q, k, v, tail, pattern.block_size, q_start + head, softcap, backend, segment_ids)
    last = [sparse_attention(q[:, :, head + s: head + s + step], k, v, dense, q_offset=q_start + head + s,
                             attention_mask=attention_mask, segment_ids=segment_ids,
                             query_segment_ids=None if q_seg[1] is None else q_seg[1][:, s: s + step], **common)
            for s in range(0, tail, step)]
    return torch.cat([first, *last], dim=2)


def _tail_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tail: int, block: int, tail_start: object,
               softcap: float | None, backend: Backend, segment_ids: torch.Tensor | None) -> int:
    """Rows per call of a dense tail: the longest run the split-KV kernel takes (``kernels/dispatch.py:
    use_split_kv``: the whole tail where the prefill kernel would give its rows a program or two per KV head to walk
    every key, else runs of 16; no gradients, no packing, Triton), else the whole tail in one call. The rows'
    results are the same either way (each row attends on its own). What the tail costs: docs/kernel-decisions.md,
    "Dense tail rows"."""
    if segment_ids is not None:
        return tail
    for step in (tail, DECODE_MAX_Q_LEN):
        if step <= tail and _split_kv_takes(q, k, v, step, softcap, backend, block, tail_start):
            return step
    return tail


def _split_kv_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_len: int, softcap: float | None,
                    backend: Backend, block: int, q_offset: object) -> bool:
    """Whether the split-KV kernel runs a run of ``q_len`` rows of these inputs starting at ``q_offset`` (an int;
    a device tensor or None: the most tiles it can span count): no gradients, the Triton backend, and the kernel
    options' rule on the run's length and the prefill kernel's program count (``kernels/dispatch.py:
    use_split_kv``)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if not _uses_triton(q, k, v, softcap, backend):
        return False
    from .kernels.dispatch import query_tiles, use_split_kv
    from .runtime import kernel_options

    row_programs = q.shape[0] * k.shape[1] * query_tiles(q_len, block, q_offset)
    return use_split_kv(q_len, False, kernel_options(), row_programs, q.device)


def per_query_head_pattern(pattern: SparsePattern, kv_heads: int, group: int) -> SparsePattern:
    """The pattern for K / V repeated ``group`` times per KV head: dense KV head ``h`` becomes query heads
    ``h * group .. h * group + group - 1`` (range-checked against ``kv_heads`` first)."""
    bad = [h for h in pattern.dense_heads if h >= kv_heads]
    if bad:
        raise ValueError(f"dense_heads {bad} out of range: the layer has {kv_heads} KV heads")
    return pattern.replace(dense_heads=tuple(h * group + j for h in pattern.dense_heads for j in range(group)))


def per_query_head_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                      selected_tiles: torch.Tensor | None = None, index: BlockIndex | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, SparsePattern]:
    """``per_query_head``: K and V repeated to one KV head per query head, so the selector (which chooses one tile
    list per KV head) chooses per query head; a dense KV head becomes its group's query heads. The attention is
    the same function of Q, K, V (autograd sums the repeats' gradients); the kernels read group-size times the K /
    V bytes. One KV head (MQA) becomes a view broadcast over the query heads, with no copy, where the kernels read
    such a view at full speed (``kernels/dispatch.py: broadcast_heads_fit``). A call whose query heads equal its KV
    heads is unchanged."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v, pattern
    if selected_tiles is not None or index is not None:
        raise ValueError("per_query_head: the op selects per query head itself; selected_tiles and a prebuilt index "
                         "are per KV head (drop per_query_head, or pass neither)")
    pattern = per_query_head_pattern(pattern, k.shape[1], group)
    if k.shape[1] == 1 and _broadcast_heads_fit(k.shape[-1]):
        return k.expand(-1, group, -1, -1), v.expand(-1, group, -1, -1), pattern
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), pattern


def _broadcast_heads_fit(head_dim: int) -> bool:
    """The kernels' rule for K / V broadcast over the heads; without Triton only the reference runs, which reads
    any view."""
    try:
        from .kernels.dispatch import broadcast_heads_fit
    except ImportError:
        return True
    return broadcast_heads_fit(head_dim)


DECODE_MAX_Q_LEN = 16  # a query run this short always takes the split-KV kernel (kernels/dispatch.py SHORT_RUN_ROWS)
SPLIT_KV_MAX_Q_LEN = 64  # the longest it takes, where the prefill kernel would have few programs (decode.MAX_Q_LEN)


def _decode_without_index(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
    attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, query_segment_ids: torch.Tensor | None,
    selected_tiles: torch.Tensor | None, index_cache: dict | None, scale: float, softcap: float | None,
    backend: Backend, dense_via_sdpa: bool, selection_state: SelectionState | None = None,
) -> torch.Tensor | None:
    """A short query run (decode, small chunks) of a pattern made of sink, window and selected tiles runs the
    split-KV kernel straight from the pattern's parameters: no block index is built. None where that does not apply
    (static layouts, dense heads, packed sequences, gradients, rows split by ``min_sparse_len``, the reference
    backend, SDPA's dense shortcut): the caller builds an index."""
    q_len, kv_len, block = q.shape[2], k.shape[2], pattern.block_size
    if q_len > SPLIT_KV_MAX_Q_LEN or segment_ids is not None or query_segment_ids is not None:
        return None
    if pattern.layout is not None or pattern.dense_heads:
        return None
    if q_offset < pattern.min_sparse_len:  # rows on both sides of it (a call wholly below it came here dense)
        return None
    plain = attention_mask is None and not softcap and selected_tiles is None
    if dense_via_sdpa and pattern.is_dense and plain and _sdpa_applies(q_len, kv_len, q_offset, kv_offset):
        return None
    if not _split_kv_takes(q, k, v, q_len, softcap, backend, block, q_offset):
        return None
    k_seg = k_rank = sink_ranges = None
    if attention_mask is not None:
        k_seg, k_rank, sink_ranges = _decode_layout(q, k, attention_mask, pattern, kv_offset, index_cache)
    selected = None
    if selected_tiles is not None:  # from outside: a repeated tile is visited once, as the block index lists it
        selected = _without_repeats(_checked_selected_tiles(selected_tiles, q.shape[0], k.shape[1], q_len, q_offset,
                                                            block, q.device))
    elif pattern.topk_blocks is not None:
        selected = select_tiles(q, k, pattern, q_offset, kv_offset, k_seg, selection_state=selection_state)
    kb0 = kv_offset // block
    last_tile = (q_offset + q_len - 1) // block - kb0 + 1
    sink, window = pattern.sink_tokens, pattern.window or 0
    if pattern.is_dense:  # every causal key, as whole blocks
        ranges, range_selected, sink = (0, 0, 0, last_tile), True, 0
    else:
        sink_hi = max(0, (sink - 1) // block - kb0 + 1) if sink else 0
        if window:
            first = max(kv_offset, q_offset - window + 1) // block - kb0
            ranges = (0, sink_hi, first, last_tile)
        else:
            ranges = (0, sink_hi, 0, 0)
        range_selected = False
    from .triton_ops import triton_decode_without_index

    return triton_decode_without_index(
        q, k, v, block=block, q_offset=q_offset, kv_offset=kv_offset, sink=sink, window=window, scale=scale,
        softcap=softcap, ranges=ranges, sink_ranges=sink_ranges if sink else None, selected=selected,
        range_selected=range_selected, k_seg=k_seg, k_rank=k_rank)


def _decode_layout(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor, pattern: SparsePattern,
                   kv_offset: int, cache: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padding of a decode call: key segments and ranks (as the index has them) and, per batch row, the key tiles
    holding its sink (its first ``sink_tokens`` real keys), relative to the call's first tile; device ops only, made
    once per mask when ``cache`` (the layers of one forward) is given."""
    key = _layout_key("decode-layout", q.shape[0], k.shape[2], kv_offset, pattern)
    if cache is not None and key in cache and tuple(cache[key][0].shape) == (q.shape[0], k.shape[2]):
        return cache[key]
    batch, kv_len, block = q.shape[0], k.shape[2], pattern.block_size
    k_seg, _, k_rank = sequence_layout(batch, q.shape[2], kv_len, attention_mask, None, q.device)
    pos = torch.arange(kv_len, device=q.device)
    in_sink = (k_seg >= 0) & (k_rank < pattern.sink_tokens)
    lo = torch.where(in_sink, pos, kv_len).amin(-1)
    hi = torch.where(in_sink, pos, -1).amax(-1)
    kb0 = kv_offset // block
    lo_tile = torch.div(lo + kv_offset, block, rounding_mode="floor") - kb0
    hi_tile = torch.div(hi + kv_offset, block, rounding_mode="floor") - kb0 + 1
    any_sink = hi >= 0
    sink_ranges = torch.stack([torch.where(any_sink, lo_tile, 0), torch.where(any_sink, hi_tile, 0)], -1)
    result = (k_seg, k_rank, sink_ranges.to(torch.int32).contiguous())
    if cache is not None:
        cache[key] = result
    return result


def _layout_key(name: str, batch: int, kv_len: int, kv_offset: int, pattern: SparsePattern) -> tuple:
    """The index cache's key for a layout of the call's keys. Traced, without the length and offset: a symbolic
    size in a dict key would pin it (one graph per decode step of a growing or sliding cache); the traced cache is
    one forward's mask's (the face cuts the keys to its length and passes its offset), and a hit is checked on its
    shape."""
    sizes = () if torch.compiler.is_compiling() else (batch, kv_len, kv_offset)
    return (name, *sizes, pattern.block_size, pattern.sink_tokens)


def _prepare_index(
    q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
    attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, query_segment_ids: torch.Tensor | None,
    index_cache: dict | None, softcap: float | None, dense_via_sdpa: bool,
    selected_tiles: torch.Tensor | None = None, selection_state: SelectionState | None = None,
) -> BlockIndex | None:
    """The call's block index; None where torch SDPA runs it (all rows dense, nothing masked, asked for)."""
    if _every_row_dense(pattern, q.shape[2], k.shape[2], q_offset, kv_offset):  # the backward op comes here directly
        pattern, selected_tiles = SparsePattern(block_size=pattern.block_size), None
    plain = attention_mask is None and segment_ids is None and not softcap and selected_tiles is None
    if dense_via_sdpa and pattern.is_dense and plain and _sdpa_applies(q.shape[2], k.shape[2], q_offset, kv_offset):
        return None
    return _index_for_call(index_cache, q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids,
                           query_segment_ids, selected_tiles, selection_state)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex | None, scale: float,
            softcap: float | None, backend: Backend) -> torch.Tensor:
    """Run the call on the chosen backend: torch SDPA (``index`` None), the Triton kernels or the reference."""
    if index is None:
        gqa = q.shape[1] != k.shape[1]  # prefill is causal; one query at the end of the keys sees them all
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=gqa)
    if _uses_triton(q, k, v, softcap, backend):
        from .triton_ops import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, index, scale, softcap)
    return reference_attention(q, k, v, index, scale=scale, softcap=softcap)


# --- torch.compile: one custom op that builds the index inside ----------------------------------------------------


def _pattern_text(pattern: SparsePattern) -> str:
    """The pattern as a constant string argument of the custom op (plain formatting: Dynamo traces it)."""
    layout = pattern.layout
    text = "" if layout is None else f"{layout.kind}:{layout.stride}:{layout.offset}:{layout.density}:{layout.seed}"
    heads = ",".join(str(h) for h in pattern.dense_heads)
    return (f"{pattern.block_size};{pattern.sink_tokens};{pattern.window};{text};{pattern.topk_blocks};{heads};"
            f"{pattern.min_sparse_len};{pattern.selector};{pattern.mass_threshold};{pattern.probe_stride};"
            f"{int(pattern.per_query_head)}")


@lru_cache(maxsize=256)
def _pattern_of_text(text: str) -> SparsePattern:
    block, sink, window, layout, topk, heads, min_sparse, selector, threshold, probe_stride, per_head = text.split(";")

    def number(value: str, kind: type = int) -> int | float | None:
        return None if value == "None" else kind(value)

    block_layout = None
    if layout:
        kind, stride, offset, density, seed = layout.split(":")
        block_layout = BlockLayout(kind, stride=number(stride), offset=int(offset), density=number(density, float),
                                   seed=int(seed))
    return SparsePattern(block_size=int(block), sink_tokens=int(sink), window=number(window), layout=block_layout,
                         topk_blocks=number(topk), dense_heads=tuple(int(h) for h in heads.split(",") if h),
                         min_sparse_len=int(min_sparse), selector=None if selector == "None" else selector,
                         mass_threshold=number(threshold, float), probe_stride=number(probe_stride),
                         per_query_head=per_head == "1")


def _offset_tensor(value: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """An offset as a one-element int64 tensor on the inputs' device (-1: the default query offset); a static
    cache's tensor offset stays a tensor, so tracing reads no value from it (the op body reads it once)."""
    if value is None:
        return torch.full((1,), -1, dtype=torch.int64, device=device)
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(1)
    return torch.full((1,), value, dtype=torch.int64, device=device)


def _traced_call(q, k, v, attention_mask, segment_ids, query_segment_ids, q_offset, kv_offset, pattern, scale,
                 softcap, backend, dense_via_sdpa, selected_tiles=None, store: DecodeStore | None = None,
                 index_cache: dict | None = None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _compiled_decode_applies(q, k, v, pattern, segment_ids, query_segment_ids, kv_offset, softcap, backend,
                                selected_tiles):
        # traced here: the padding layout and the selection's key info are device ops Inductor fuses; the selection
        # and the attention are graph-safe ops
        if store is not None and not (pattern.resolved_selector == "mass" and store.fits(k, pattern.block_size,
                                                                                          kv_offset)):
            store = None  # another selector or other keys (a per-query-head repeat): features pooled from all keys
        return _decode_step(q, k, v, attention_mask, _offset_tensor(q_offset, q.device), kv_offset, pattern, scale,
                            float(softcap or 0.0), decode_select_op, decode_attend_op, store, index_cache)
    offsets = torch.cat([_offset_tensor(q_offset, q.device), _offset_tensor(kv_offset, q.device)])
    return sparse_attention_op(q, k, v, attention_mask, segment_ids, query_segment_ids, offsets,
                               _pattern_text(pattern), scale, float(softcap or 0.0), backend, dense_via_sdpa,
                               selected_tiles)


def _compiled_decode_applies(q, k, v, pattern: SparsePattern, segment_ids, query_segment_ids, kv_offset, softcap,
                             backend, selected_tiles) -> bool:
    """Whether a traced call is a decode step the split-KV kernel runs with its query offset left on the device
    (decided from shapes and the pattern only): then it is the CUDA-graph-safe op :func:`sparse_decode_op`."""
    if q.shape[2] > DECODE_MAX_Q_LEN or segment_ids is not None or query_segment_ids is not None:
        return False
    if selected_tiles is not None or not isinstance(kv_offset, int):
        return False
    if pattern.layout is not None:
        return False
    if pattern.topk_blocks is not None and not selects_at_device_offset(pattern, q.shape[2]):
        return False  # other selectors and longer runs: the op that reads the position on the host
    return _split_kv_takes(q, k, v, q.shape[2], softcap, backend, pattern.block_size, None)


@torch.library.custom_op("hf_sparsek::sparse_decode", mutates_args=())
def sparse_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, q_offset: torch.Tensor,
    kv_offset: int, pattern: str, scale: float, softcap: float,
) -> torch.Tensor:
    """A decode step of a sink / window / dense pattern, or of a ``"mass"`` / ``"probe"`` top-k pattern for one query
    row, under torch.compile, reading nothing on the host: the query offset (-1: the last q_len key positions) stays
    a device tensor the kernels read, padding becomes key segments and per-row sink tiles by device ops, and the
    top-k tiles are chosen with the cache's unwritten slots masked (:func:`hf_sparsek.selection.
    select_tiles_at_device_offset`; no selection store: it keeps Python state). Dense heads run dense, each run of
    consecutive dense or sparse KV heads as one call on views. Not tagged cudagraph_unsafe: a compiled decode step
    can be one CUDA graph. Inference only (no autograd formula: the compiled path sends calls that need gradients to
    the other op)."""
    return _decode_step(q, k, v, attention_mask, q_offset, kv_offset, _pattern_of_text(pattern), scale, softcap,
                        _decode_select, _decode_attend)


def _decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
                 q_offset: torch.Tensor, kv_offset: int, pat: SparsePattern, scale: float, softcap: float,
                 select, attend, store: DecodeStore | None = None, cache: dict | None = None) -> torch.Tensor:
    """A decode step with its position on the device: the padding layout and the selection's key info by device
    ops, then per run of consecutive dense or sparse KV heads (views, no copies of the cache) ``select`` (top-k
    tiles) and ``attend`` (the split-KV kernel): the custom ops under torch.compile, their bodies inside
    :func:`sparse_decode_op`. ``store``: the layer's kept key tile features (selector "mass"; the selection then
    updates them in place and pools only the tiles filled since, :func:`decode_select_kept_op`). ``cache``: the
    forward's index cache (one padding mask and query position for all its layers): the layout and the key info are
    made by the first layer and reused by the others, so a traced forward computes them once, not once a layer."""
    q_len, kv_len = q.shape[2], k.shape[2]
    position = torch.where(q_offset < 0, kv_offset + kv_len - q_len, q_offset).reshape(1).to(torch.int32)
    layout = (None, None, None)
    if attention_mask is not None:
        _check_layout(q.shape[0], q_len, kv_len, attention_mask, None)
        layout = _decode_layout(q, k, attention_mask, pat, kv_offset, cache)
    key_info = None
    if pat.topk_blocks is not None:
        key = _layout_key("decode-key-info", q.shape[0], kv_len, kv_offset, pat)
        key_info = None if cache is None else cache.get(key)
        if key_info is None or tuple(key_info[0].shape) != (q.shape[0], kv_len):
            key_info = written_key_info(layout[0], q.shape[0], kv_len, kv_offset, position, pat)
            if cache is not None:
                cache[key] = key_info
    group = q.shape[1] // k.shape[1]
    parts = []
    for lo, hi, dense in _head_runs(pat.dense_heads, k.shape[1]):
        part = SparsePattern(block_size=pat.block_size) if dense else pat.replace(dense_heads=())
        qs, ks, vs = q[:, lo * group: hi * group], k[:, lo:hi], v[:, lo:hi]
        selected = None
        if part.topk_blocks is not None and store is not None:
            selected = decode_select_kept_op(qs, ks, *key_info, position, kv_offset, _pattern_text(part),
                                             *store.tensors(), lo)
        elif part.topk_blocks is not None:
            selected = select(qs, ks, *key_info, position, kv_offset, _pattern_text(part))
        parts.append(attend(qs, ks, vs, *layout, selected, position, kv_offset, _pattern_text(part), scale, softcap))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).contiguous()


def _head_runs(dense_heads: tuple[int, ...], kv_heads: int) -> list[tuple[int, int, bool]]:
    """The KV heads as maximal runs ``(first, end, dense)`` of dense or sparse heads, in order."""
    bad = [h for h in dense_heads if h >= kv_heads]
    if bad:
        raise ValueError(f"dense_heads {bad} out of range: the layer has {kv_heads} KV heads")
    runs: list[tuple[int, int, bool]] = []
    for h in range(kv_heads):
        dense = h in dense_heads
        if runs and runs[-1][2] == dense:
            runs[-1] = (runs[-1][0], h + 1, dense)
        else:
            runs.append((h, h + 1, dense))
    return runs


def _decode_select(q: torch.Tensor, k: torch.Tensor, seg: torch.Tensor, count: torch.Tensor,
                   sink_only: torch.Tensor, position: torch.Tensor, kv_offset: int, pattern: str) -> torch.Tensor:
    """The top-k tiles of a decode row at ``position`` (:func:`hf_sparsek.selection.select_tiles_at_device_offset`
    with its key info made beforehand)."""
    return select_tiles_at_device_offset(q, k, _pattern_of_text(pattern), position, kv_offset, None,
                                         key_info=(seg, count, sink_only)).contiguous()


@torch.library.custom_op("hf_sparsek::decode_select_kept",
                         mutates_args=("features", "fingerprints", "stored", "reused", "scratch"))
def decode_select_kept_op(q: torch.Tensor, k: torch.Tensor, seg: torch.Tensor, count: torch.Tensor,
                          sink_only: torch.Tensor, position: torch.Tensor, kv_offset: int, pattern: str,
                          features: torch.Tensor, fingerprints: torch.Tensor, stored: torch.Tensor,
                          reused: torch.Tensor, scratch: torch.Tensor, head_lo: int) -> torch.Tensor:
    """:func:`_decode_select` from a :class:`DecodeStore`'s kept features (its tensors, whole; these heads are
    ``head_lo ..`` of them): first the kept tiles are checked and the tiles filled since pooled, in place
    (``kernels/selection_store.py: refresh_key_features_at_device_offset``), then the row selects from them.
    Graph-safe: fixed grids, nothing read on the host; the store's tensors are static inputs of the graph."""
    from .kernels.selection_store import refresh_key_features_at_device_offset

    pat = _pattern_of_text(pattern)
    heads = slice(head_lo, head_lo + k.shape[1])
    refresh_key_features_at_device_offset(k, seg, features[:, heads], fingerprints[:, heads], stored[:, heads],
                                          reused[:, heads], scratch, q_offset=position, kv_offset=kv_offset,
                                          block=pat.block_size)
    return select_tiles_at_device_offset(q, k, pat, position, kv_offset, None, key_info=(seg, count, sink_only),
                                         key_features=features[:, heads]).contiguous()


@decode_select_kept_op.register_fake
def _(q, k, seg, count, sink_only, position, kv_offset, pattern, features, fingerprints, stored, reused, scratch,
      head_lo):
    return q.new_empty((q.shape[0], k.shape[1], 1, _pattern_of_text(pattern).topk_blocks), dtype=torch.int32)


def _decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_seg: torch.Tensor | None,
                   k_rank: torch.Tensor | None, sink_ranges: torch.Tensor | None, selected: torch.Tensor | None,
                   position: torch.Tensor, kv_offset: int, pattern: str, scale: float, softcap: float) -> torch.Tensor:
    """One pattern's decode step over these heads through the split-KV kernel, the position on the device."""
    pat = _pattern_of_text(pattern)
    kv_len, block = k.shape[2], pat.block_size
    kb0 = kv_offset // block
    sink, window = pat.sink_tokens, pat.window or 0
    sink_hi = max(0, (sink - 1) // block - kb0 + 1) if sink else 0
    n_k = (kv_offset % block + kv_len + block - 1) // block
    window_tiles = min(n_k, (window + block - 2) // block + 2) if window else 0
    dense = pat.is_dense
    from .triton_ops import triton_decode_without_index

    return triton_decode_without_index(
        q, k, v, block=block, q_offset=position, kv_offset=kv_offset, sink=0 if dense else sink,
        window=0 if dense else window, scale=scale, softcap=softcap or None,
        ranges=(0, 0 if dense else sink_hi, 0, n_k if dense else window_tiles),
        sink_ranges=sink_ranges if (sink and not dense) else None, selected=selected, range_selected=dense,
        k_seg=k_seg, k_rank=k_rank, min_sparse_len=pat.min_sparse_len).contiguous()


# The decode step's two graph-safe pieces under torch.compile (not cudagraph_unsafe: nothing read on the host).
decode_select_op = torch.library.custom_op("hf_sparsek::decode_select", _decode_select, mutates_args=())
decode_attend_op = torch.library.custom_op("hf_sparsek::decode_attend", _decode_attend, mutates_args=())


@decode_select_op.register_fake
def _(q, k, seg, count, sink_only, position, kv_offset, pattern):
    return q.new_empty((q.shape[0], k.shape[1], 1, _pattern_of_text(pattern).topk_blocks), dtype=torch.int32)


@decode_attend_op.register_fake
def _(q, k, v, k_seg, k_rank, sink_ranges, selected, position, kv_offset, pattern, scale, softcap):
    return q.new_empty(q.shape[:3] + v.shape[3:])


@sparse_decode_op.register_fake
def _(q, k, v, attention_mask, q_offset, kv_offset, pattern, scale, softcap):
    return q.new_empty(q.shape[:3] + v.shape[3:])


def _offsets_of(offsets: torch.Tensor) -> tuple[int | None, int]:
    q_offset, kv_offset = offsets.tolist()
    return (None if q_offset < 0 else q_offset), kv_offset


def _eager_call(q, k, v, attention_mask, segment_ids, query_segment_ids, offsets, pattern, scale, softcap, backend,
                dense_via_sdpa, selected_tiles) -> torch.Tensor:
    q_offset, kv_offset = _offsets_of(offsets)
    return sparse_attention(
        q, k, v, _pattern_of_text(pattern), scale=scale, softcap=softcap or None,
        q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
        segment_ids=segment_ids, query_segment_ids=query_segment_ids, backend=backend, dense_via_sdpa=dense_via_sdpa,
        selected_tiles=selected_tiles,
    )


# The body builds the index with host reads: never inside a CUDA graph (Inductor keeps it out of captured regions).
@torch.library.custom_op("hf_sparsek::sparse_attention", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None, query_segment_ids: torch.Tensor | None, offsets: torch.Tensor, pattern: str,
    scale: float, softcap: float, backend: str, dense_via_sdpa: bool, selected_tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sparse_attention`` as one op for torch.compile: the index (data-dependent widths) is built inside. The
    output is contiguous whatever the kernels' layout, as the fake says."""
    return _eager_call(q, k, v, attention_mask, segment_ids, query_segment_ids, offsets, pattern, scale, softcap,
                       backend, dense_via_sdpa, selected_tiles).contiguous()


@sparse_attention_op.register_fake
def _(q, k, v, attention_mask, segment_ids, query_segment_ids, offsets, pattern, scale, softcap, backend,
      dense_via_sdpa, selected_tiles=None):
    return q.new_empty(q.shape[:3] + v.shape[3:])


@torch.library.custom_op("hf_sparsek::sparse_attention_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def sparse_attention_backward_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None, query_segment_ids: torch.Tensor | None, offsets: torch.Tensor, pattern: str,
    scale: float, softcap: float, backend: str, dense_via_sdpa: bool, selected_tiles: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sparse_attention_op`: rebuilds the index and runs the same backend's backward (the
    kernels' own, or ``torch.func.vjp`` of the PyTorch math: an op's body runs below autograd, which would record
    no graph)."""
    q_offset, kv_offset = _resolve_offsets(q.shape[2], k.shape[2], *_offsets_of(offsets))
    index = _prepare_index(q, k, _pattern_of_text(pattern), q_offset, kv_offset, attention_mask, segment_ids,
                           query_segment_ids, None, softcap, dense_via_sdpa, selected_tiles)
    if index is not None and _uses_triton(q, k, v, softcap, backend):
        from .triton_ops import triton_block_sparse_attention_grads

        grads = triton_block_sparse_attention_grads(grad, q, k, v, index, scale, softcap)
    else:
        _, pullback = torch.func.vjp(lambda *qkv: _attend(*qkv, index, scale, softcap or None, backend), q, k, v)
        grads = pullback(grad)
    return tuple(g.contiguous() for g in grads)  # contiguous, as the fake says


@sparse_attention_backward_op.register_fake
def _(grad, q, k, v, attention_mask, segment_ids, query_segment_ids, offsets, pattern, scale, softcap, backend,
      dense_via_sdpa, selected_tiles=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_N_DIFFERENTIABLE = 3  # q, k, v; the masks, offsets, constants and selected tiles get no gradient
_N_INPUTS = 13


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:7], inputs[12])
    ctx.constants = inputs[7:12]


def _backward(ctx, grad):
    q, k, v, attention_mask, segment_ids, query_segment_ids, offsets, selected_tiles = ctx.saved_tensors
    grads = sparse_attention_backward_op(grad.contiguous(), q, k, v, attention_mask, segment_ids, query_segment_ids,
                                         offsets, *ctx.constants, selected_tiles)
    return (*grads, *([None] * (_N_INPUTS - _N_DIFFERENTIABLE)))


torch.library.register_autograd("hf_sparsek::sparse_attention", _backward, setup_context=_setup_context)
