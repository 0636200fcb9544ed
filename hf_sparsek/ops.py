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

from .block_index import BlockIndex, absolute_position, build_block_index
from .patterns import SparsePattern
from .reference import reference_attention
from .selection import select_topk_tiles

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_layout(
    batch: int, q_len: int, kv_len: int, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None
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
    if segment_ids is not None:
        if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex:
            raise ValueError(f"segment_ids must be an integer tensor of sequence ids, got dtype {segment_ids.dtype}")
        if segment_ids.shape != (batch, kv_len) or q_len != kv_len:
            raise ValueError(
                f"segment_ids must be (batch, seq) = ({batch}, {kv_len}) with q_len == kv_len (packed sequences "
                f"without a cache), got shape {tuple(segment_ids.shape)} and q_len={q_len}"
            )


def sequence_layout(
    batch: int,
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Padding mask / packed segment ids -> (k_seg, q_seg, k_rank) for the block index; all None when unpadded."""
    _check_layout(batch, q_len, kv_len, attention_mask, segment_ids)
    if attention_mask is None and segment_ids is None:
        return None, None, None
    if attention_mask is not None:
        valid = attention_mask.to(device=device, dtype=torch.bool)
    else:
        valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    q_seg = None
    if segment_ids is None:
        k_seg = torch.where(valid, 0, -1).to(torch.int32)
        k_rank = (torch.cumsum(valid.to(torch.int32), -1) - 1).to(torch.int32)
        return k_seg, None, k_rank
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
) -> BlockIndex:
    """The block index ``sparse_attention`` would use for these inputs (exposed for kernels, tests, benchmarks)."""
    batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
    q_offset, kv_offset = _resolve_offsets(q_len, kv_len, q_offset, kv_offset)
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
        q_offset, kv_offset: absolute positions (integers >= 0) of the first query / key (default: queries are the
            last q_len positions of the keys, as in prefill, chunked prefill and decode against a cache).
        attention_mask: (batch, kv_len) bool or integer, True / 1 for real keys, False / 0 for padding; sinks count
            from the first real key. A floating (additive) mask raises: pass ``mask == 0`` instead.
        segment_ids: (batch, seq) integer packed-sequence ids (q_len == kv_len): no attention across sequences.
        index: a prebuilt block index (skips building one). It must match the other arguments: lengths, offsets,
            batch / heads, the pattern's block size, sinks and window, and whether a mask / segment ids were given
            (checked on shapes; the mask's values are not compared).
        backend: "auto" (Triton kernel on CUDA when supported, else the reference), "triton" or "reference".
            A forced backend that cannot run raises; nothing falls back silently.

    Returns:
        (batch, q_heads, q_len, head_dim) in q's dtype. Rows with nothing to attend are zeros. A batch of 0 gives
        an empty output; q_len or kv_len 0 raises.
    """
    _validate(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; supported: {BACKENDS}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if index is None:
        pattern = SparsePattern() if pattern is None else pattern
        index = build_index_for(q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids)
    else:
        q_offset, kv_offset = _resolve_offsets(q.shape[2], k.shape[2], q_offset, kv_offset)
        _check_layout(q.shape[0], q.shape[2], k.shape[2], attention_mask, segment_ids)
        _check_index(index, q, k, pattern, q_offset, kv_offset, attention_mask, segment_ids)
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
