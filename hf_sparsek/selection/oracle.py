"""Selector ``"oracle"`` (evaluation only): per query tile, the key tiles with the most TRUE attention mass.

The ceiling the other selectors are measured against (issue 22's block oracle), usable as a pattern's selector so
that perplexity and retrieval can be read at the oracle's choice, not only its recall:

* per query head h and real query row t, the exact softmax ``p_h(t, s)`` over the causal real keys (scale
  1/sqrt(head dim), as the other selectors);
* the mass of key tile n for query tile m: the mean over the tile's real rows of ``sum_{s in n} p_h(t, s)``, then
  the mean over the heads of a KV group (the kernel's index is per KV head), so each query tile's row sums to 1;
* the competition and the budget are the other selectors' (:func:`hf_sparsek.selection.tiles.choose_tiles`):
  tiles the sink / window keep whole do not compete; fixed ``topk_blocks`` or ``mass_threshold``.

It computes the dense scores (in chunks of query rows, float32): as slow as dense attention and never meant for
speed. It reads the keys themselves, so a decode step costs a dense pass over the cache.
"""

from __future__ import annotations

import math

import torch

from ..patterns import SparsePattern
from .mass import query_valid
from .tiles import choose_tiles, tile_grid

_CHUNK_ELEMENTS = 1 << 25  # batch x query heads x query rows x keys of one chunk's scores


def exact_tile_mass(q: torch.Tensor, k: torch.Tensor, block: int, q_offset: int, kv_offset: int,
                    k_seg: torch.Tensor | None, scale: float | None = None, dtype: torch.dtype = torch.float32,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hkv, n_q, n_k): true attention mass of each key tile per query tile, tiles on the absolute grid (rows
    with a real query sum to 1; a tile without a real query row is all zero). The one exact definition: the oracle
    selector, ``hf-sparsek eval selection`` and ``eval calibrate`` read it; ``rows`` samples the query rows
    (:func:`tile_mass_within`), as selector ``"probe"`` does."""
    return tile_mass_within(q, k, block, q_offset, kv_offset, k_seg, scale, dtype=dtype, rows=rows)[0]


def tile_mass_within(q: torch.Tensor, k: torch.Tensor, block: int, q_offset: int, kv_offset: int,
                     k_seg: torch.Tensor | None, scale: float | None = None, keep: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None,
                     tiles: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`exact_tile_mass`, and with ``keep`` ((q_len, kv_len) bool, token-exact) also the part of each tile's
    mass on the kept pairs (None without ``keep``), from one pass over the dense scores (in ``dtype``).

    ``rows``: indices of the query rows to score (a sample; each query tile's mass is the mean over its sampled
    real rows, a tile without one is all zero); None scores every row. ``tiles``: (B, Hkv, n_q, n_k) bool, the key
    tiles each query tile's rows normalise over (their softmax runs over the causal real keys of those tiles only:
    selector ``"refine"``'s second stage); None: every key tile."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    n_q = (q_offset % block + q_len + block - 1) // block
    n_k = (kv_offset % block + kv_len + block - 1) // block
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    device = q.device
    row_ok = query_valid(q_len, q_offset, kv_offset, k_seg)
    row_ok = torch.ones(batch, q_len, dtype=torch.bool, device=device) if row_ok is None else row_ok
    index = torch.arange(q_len, device=device) if rows is None else rows.to(device)
    if rows is not None:
        q, row_ok = q[:, :, index], row_ok[:, index]
        keep = None if keep is None else keep[index]
        q_len = index.numel()
    q_pos = q_offset + index
    k_pos = kv_offset + torch.arange(kv_len, device=device)
    k_shift, q_shift = kv_offset % block, q_offset % block
    back = n_k * block - k_shift - kv_len
    q_tile = (q_shift + index) // block
    key_ok = None if k_seg is None else (k_seg >= 0).view(batch, 1, 1, 1, kv_len)
    kf = k.to(dtype)
    shape = (batch, hkv, n_q, n_k)
    out = torch.zeros(shape, dtype=dtype, device=device)
    inside = None if keep is None else torch.zeros(shape, dtype=dtype, device=device)

    def per_tile(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, G, c, kv_len) -> (B, Hkv, c, n_k): summed over each key tile, mean over the group, real rows."""
        tiles = torch.nn.functional.pad(probs, (k_shift, back)).view(*probs.shape[:4], n_k, block).sum(-1)
        return tiles.mean(2) * rows.view(batch, 1, -1, 1)

    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * hq * kv_len))
    for t0 in range(0, q_len, chunk):
        t1 = min(q_len, t0 + chunk)
        qc = q[:, :, t0:t1].to(dtype).view(batch, hkv, group, t1 - t0, dim)
        scores = torch.einsum("bhgtd,bhsd->bhgts", qc, kf) * scale
        allowed = (k_pos.view(1, -1) <= q_pos[t0:t1].view(-1, 1)).view(1, 1, 1, t1 - t0, kv_len)
        if key_ok is not None:
            allowed = allowed & key_ok
        if tiles is not None:  # (B, Hkv, c, n_k) -> (B, Hkv, 1, c, kv_len) over the stored keys
            per_key = tiles[:, :, q_tile[t0:t1]].repeat_interleave(block, -1)[..., k_shift: k_shift + kv_len]
            allowed = allowed & per_key.unsqueeze(2)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        rows = row_ok[:, t0:t1].to(dtype)
        out.index_add_(2, q_tile[t0:t1], per_tile(probs, rows))
        if inside is not None:
            kept = probs * keep[t0:t1].view(1, 1, 1, t1 - t0, kv_len).to(dtype)
            inside.index_add_(2, q_tile[t0:t1], per_tile(kept, rows))
    counts = torch.zeros(batch, n_q, dtype=dtype, device=device)
    counts.index_add_(1, q_tile, row_ok.to(dtype))
    norm = counts.clamp(min=1).view(batch, 1, n_q, 1)
    return out / norm, None if inside is None else inside / norm


@torch.no_grad()
def select_oracle(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
                  k_seg: torch.Tensor | None) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk_blocks) int32 key tiles with the most true attention mass (-1 = none).

    Shapes and positions as :func:`hf_sparsek.selection.select_tiles`."""
    if pattern.topk_blocks is None:
        raise ValueError("select_oracle needs a pattern with topk_blocks set")
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    mass = exact_tile_mass(q, k, pattern.block_size, q_offset, kv_offset, k_seg)
    return choose_tiles(mass, grid, pattern.topk_blocks, pattern.mass_threshold)
