"""Selector ``"meanpool"`` (the one before issue 22): per query tile, the k key tiles with the highest pooled score.

The score of (query tile, key tile) is the dot product of the mean query of the tile (averaged over the query heads
of a KV group) with the mean key of the key tile, as in MoBA / NSA's block selection. Only causal key tiles with a
real key compete. Costs O(query tiles x key tiles) per KV head and carries no gradient (a hard choice).
"""

from __future__ import annotations

import torch

from ..patterns import SparsePattern
from .mass import pool_tiles
from .tiles import key_tile_info


@torch.no_grad()
def select_meanpool(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: SparsePattern,
    q_offset: int,
    kv_offset: int,
    k_seg: torch.Tensor | None,
) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk) key tile numbers chosen per query tile; -1 where fewer tiles qualify."""
    if pattern.topk_blocks is None:
        raise ValueError("select_meanpool needs a pattern with topk_blocks set")
    batch, hq, q_len, dim = q.shape
    hkv = k.shape[1]
    block = pattern.block_size
    q_pool = pool_tiles(q, q_offset, block, None)[0]
    n_q = q_pool.shape[2]
    q_pool = q_pool.view(batch, hkv, hq // hkv, n_q, dim).mean(2)  # (B, Hkv, n_q, D); sizes spelled out for batch 0
    k_pool = pool_tiles(k, kv_offset, block, None if k_seg is None else k_seg >= 0)[0]
    k_has = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, batch, q.device)[0] > 0  # tiles with a real key
    scores = torch.einsum("bhmd,bhnd->bhmn", q_pool, k_pool)
    qb = q_offset // block + torch.arange(q_pool.shape[2], device=q.device)
    kb = kv_offset // block + torch.arange(k_pool.shape[2], device=q.device)
    allowed = (kb.view(1, -1) <= qb.view(-1, 1)).view(1, 1, len(qb), len(kb)) & k_has.view(batch, 1, 1, len(kb))
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = min(pattern.topk_blocks, scores.shape[-1])
    values, tiles = torch.topk(scores, top, dim=-1)
    out = torch.where(torch.isfinite(values), tiles, -1).to(torch.int32)
    return torch.nn.functional.pad(out, (0, pattern.topk_blocks - top), value=-1)  # always topk_blocks wide

