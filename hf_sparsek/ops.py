"""Public functional API: ``sparse_attention`` (dispatch to the Triton kernel or the reference).

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

import math
from typing import Literal

import torch

from .block_index import BlockIndex, build_block_index
from .patterns import SparsePattern
from .reference import reference_attention
from .selection import select_topk_tiles

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sequence_layout(
    batch: int,
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Padding mask / packed segment ids -> (k_seg, q_seg, k_rank) for the block index; all None when unpadded."""
    if attention_mask is None and segment_ids is None:
        return None, None, None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] != kv_len:
            raise ValueError(
                f"attention_mask must be (batch, kv_len) = ({batch}, {kv_len}) of booleans (True = real token), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(device=device, dtype=torch.bool)
    else:
        valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    q_seg = None
    if segment_ids is None:
        k_seg = torch.where(valid, 0, -1).to(torch.int32)
        k_rank = (torch.cumsum(valid.to(torch.int32), -1) - 1).to(torch.int32)
        return k_seg, None, k_rank
    if segment_ids.shape != (batch, kv_len) or q_len != kv_len:
        raise ValueError(
            f"segment_ids must be (batch, seq) = ({batch}, {kv_len}) with q_len == kv_len (packed sequences without "
            f"a cache), got shape {tuple(segment_ids.shape)} and q_len={q_len}"
        )
    seg = segment_ids.to(device=device, dtype=torch.int32)
    k_seg = torch.where(valid, seg, -1).to(torch.int32)
    q_seg = seg
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


def build_index_for(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: SparsePattern,
    q_offset: int | None = None,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> BlockIndex:
    """The block index ``sparse_attention`` would use for these inputs (exposed for kernels, tests, benchmarks)."""
    batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
    q_offset = kv_offset + kv_len - q_len if q_offset is None else int(q_offset)
    k_seg, q_seg, k_rank = sequence_layout(batch, q_len, kv_len, attention_mask, segment_ids, q.device)
    topk = None
    if pattern.topk_blocks is not None:
        topk = select_topk_tiles(q, k, pattern, q_offset, kv_offset, k_seg)
    return build_block_index(
        pattern, batch=batch, kv_heads=k.shape[1], q_len=q_len, kv_len=kv_len, q_offset=q_offset,
        kv_offset=kv_offset, k_seg=k_seg, q_seg=q_seg, k_rank=k_rank, topk_tiles=topk, device=q.device,
    )


def triton_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the Triton kernel can run these inputs, else why not (used by dispatch and its errors)."""
    try:
        from .triton_ops import unsupported_reason
    except ImportError as exc:  # triton missing, or the kernels package not built for this platform
        return f"the Triton kernels cannot be imported ({exc})"
    return unsupported_reason(q, k, v)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    q_offset: int | None = None,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    index: BlockIndex | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Causal block-sparse attention. Differentiable.

    Args:
        q: (batch, q_heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim). q_heads must be a multiple
            of kv_heads (GQA / MQA read each KV head once per group, no copies).
        pattern: which keys each query sees (default: dense causal). See :class:`SparsePattern`.
        scale: softmax scale (default 1/sqrt(head_dim)); softcap: tanh logit soft-capping (Gemma 2 style).
        q_offset, kv_offset: absolute positions of the first query / key (default: queries are the last q_len
            positions of the keys, as in prefill, chunked prefill and decode against a cache).
        attention_mask: (batch, kv_len) booleans, False for padding keys; sinks count from the first real key.
        segment_ids: (batch, seq) packed-sequence ids (q_len == kv_len): no attention across sequences.
        index: a prebuilt block index (skips building one; must match the other arguments).
        backend: "auto" (Triton kernel on CUDA when supported, else the reference), "triton" or "reference".
            A forced backend that cannot run raises; nothing falls back silently.

    Returns:
        (batch, q_heads, q_len, head_dim) in q's dtype. Rows with nothing to attend are zeros.
    """
    _validate(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; supported: {BACKENDS}")
    pattern = SparsePattern() if pattern is None else pattern
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if index is None:
        index = build_index_for(q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids)
    use_triton = False
    if backend in ("auto", "triton"):
        reason = triton_unsupported_reason(q, k, v) if q.is_cuda or backend == "triton" else "inputs are not on CUDA"
        if backend == "triton" and reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}")
        use_triton = reason is None
    if use_triton:
        from .triton_ops import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, index, scale, softcap)
    return reference_attention(q, k, v, index, scale=scale, softcap=softcap)
