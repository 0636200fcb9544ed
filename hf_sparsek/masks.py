"""A pattern's exact token mask (dense booleans): the definition the block index, the reference and the kernels are
tested against.

Dense (q_len x kv_len), so for tests and pictures at small sizes only; attention itself never builds this.
"""

from __future__ import annotations

import torch

from .block_index import random_layout_keep
from .patterns import SparsePattern


def exact_token_mask(
    pattern: SparsePattern,
    q_len: int,
    kv_len: int | None = None,
    *,
    q_offset: int | None = None,
    kv_offset: int = 0,
    kv_heads: int = 1,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Exact (batch, kv_heads, q_len, kv_len) boolean mask of ``pattern``: True where a query attends a key.

    Queries sit at absolute positions ``q_offset + t`` (default: the last ``q_len`` positions), keys at
    ``kv_offset + s``. ``attention_mask`` (batch, kv_len) marks real keys (False = padding); ``segment_ids``
    (batch, kv_len, with q_len == kv_len) marks packed sequences. Dynamic top-k is data dependent and not drawn.

    Picture (sink 2 + window 3, 8 tokens; ``#`` attended)::

        # . . . . . . .
        # # . . . . . .
        # # # . . . . .
        # # # # . . . .
        # # # # # . . .
        # # . # # # . .
        # # . . # # # .
        # # . . . # # #
    """
    if pattern.topk_blocks is not None:
        raise ValueError("exact_token_mask cannot draw a dynamic top-k pattern: its blocks depend on the data")
    kv_len = q_len if kv_len is None else kv_len
    q_offset = kv_offset + kv_len - q_len if q_offset is None else q_offset
    device = torch.device(device)
    block = pattern.block_size
    i = (q_offset + torch.arange(q_len, device=device)).view(1, 1, -1, 1)
    j = (kv_offset + torch.arange(kv_len, device=device)).view(1, 1, 1, -1)
    heads = torch.arange(kv_heads, device=device).view(1, -1, 1, 1)
    batch = 1
    rank = j
    valid = torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=device)
    same_seq = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    if attention_mask is not None:
        am = attention_mask.to(device=device, dtype=torch.bool)[:, -kv_len:]
        batch = am.shape[0]
        valid = am.view(batch, 1, 1, kv_len)
        rank = (torch.cumsum(am.long(), -1) - 1).view(batch, 1, 1, kv_len)
    if segment_ids is not None:
        seg = segment_ids.to(device)
        batch = seg.shape[0]
        same_seq = seg.view(batch, 1, -1, 1) == seg.view(batch, 1, 1, -1)
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        pos = torch.arange(seg.shape[1], device=device).expand_as(seg)
        seg_start = torch.cummax(torch.where(starts, pos, 0), dim=-1).values
        rank = (pos - seg_start).view(batch, 1, 1, -1)
    causal = (j <= i) & valid & same_seq
    if pattern.is_dense:
        chosen = torch.ones_like(causal)
    else:
        chosen = torch.zeros_like(causal)
        if pattern.sink_tokens:
            chosen = chosen | (rank < pattern.sink_tokens)
        if pattern.window is not None:
            chosen = chosen | ((i - j) < pattern.window)
        qb, kb = i // block, j // block
        layout = pattern.layout
        if layout is not None and layout.kind == "strided":
            chosen = chosen | (kb % layout.stride == layout.offset)
        if layout is not None and layout.kind == "random":
            chosen = chosen | random_layout_keep(qb, kb, heads, layout.seed, layout.density)
        if pattern.min_sparse_len:
            chosen = chosen | (i < pattern.min_sparse_len)
        if pattern.dense_tail and q_len > pattern.dense_tail:  # the call's last rows (sparse_attention splits there)
            chosen = chosen | (i >= i.max() - pattern.dense_tail + 1)
        if pattern.dense_heads:
            dense = torch.zeros(kv_heads, dtype=torch.bool, device=device)
            dense[list(pattern.dense_heads)] = True
            chosen = chosen | dense.view(1, -1, 1, 1)
    mask = causal & chosen
    return mask.expand(batch, kv_heads, q_len, kv_len)




def mask_picture(mask: torch.Tensor, on: str = "#", off: str = ".") -> str:
    """Text picture of a 2-D boolean mask (rows are queries)."""
    return "\n".join(" ".join(on if x else off for x in row) for row in mask.tolist())
