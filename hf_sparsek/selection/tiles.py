"""The competition of one call (which key tiles may be selected per query tile) and budget -> tile list.

Tiles are on the absolute grid of ``hf_sparsek.block_index``: query tile ``m`` holds absolute positions
``[(q_offset // B + m) * B, ...)`` and key tile ``n`` likewise from ``kv_offset // B``; tile numbers in the output are
``n`` (relative to ``kv_offset // B``), -1 = none. Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import SparsePattern


@dataclass
class TileGrid:
    """Per call: ``n_q`` x ``n_k`` tiles; which pairs are causal with a real key, which the static part already
    covers completely (they do not compete), per batch row."""

    n_q: int
    n_k: int
    candidate: torch.Tensor  # (B, 1, n_q, n_k) bool: causal and the key tile holds a real key
    static_full: torch.Tensor  # (B, 1, n_q, n_k) bool: every causal real pair is already kept by sink or window
    count: torch.Tensor  # (B, 1, 1, n_k) int32: real keys per key tile


def key_tile_info(kv_len: int, kv_offset: int, k_seg: torch.Tensor | None, pattern: SparsePattern, batch: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile: (B, n_k) int32 real keys it holds, and (B, n_k) bool "every real key is a sink token".

    A key's rank in its sequence is counted from the first real key of its row (left padding); packed sequences
    get larger ranks here, so fewer tiles count as sink-only (those then compete: harmless)."""
    block = pattern.block_size
    k_shift = kv_offset % block
    n_k = (k_shift + kv_len + block - 1) // block
    back = n_k * block - k_shift - kv_len
    valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device) if k_seg is None else k_seg >= 0
    tiles_valid = torch.nn.functional.pad(valid, (k_shift, back), value=False).view(batch, n_k, block)
    count = tiles_valid.sum(-1, dtype=torch.int32)
    if not pattern.sink_tokens:
        return count, torch.zeros(batch, n_k, dtype=torch.bool, device=device)
    rank = kv_offset + valid.long().cumsum(-1) - 1
    rank = torch.nn.functional.pad(torch.where(valid, rank, -1), (k_shift, back), value=-1).view(batch, n_k, block)
    return count, rank.amax(-1) < pattern.sink_tokens


def tile_grid(q_len: int, kv_len: int, q_offset: int, kv_offset: int, k_seg: torch.Tensor | None,
              pattern: SparsePattern, batch: int, device: torch.device) -> TileGrid:
    """The competition of one call. A key tile competes for a query tile when it is causal, holds a real key and
    the pattern's sink / window do not already keep all its pairs (the budget goes to new tiles)."""
    block = pattern.block_size
    n_q = (q_offset % block + q_len + block - 1) // block
    count, sink_only = key_tile_info(kv_len, kv_offset, k_seg, pattern, batch, device)
    n_k = count.shape[1]
    qb = q_offset // block + torch.arange(n_q, device=device)
    kb = kv_offset // block + torch.arange(n_k, device=device)
    q_last = torch.clamp((qb + 1) * block - 1, max=q_offset + q_len - 1)  # last real query of each tile
    k_first = torch.clamp(kb * block, min=kv_offset)  # first stored key of each tile
    causal = kb.view(1, -1) <= qb.view(-1, 1)
    candidate = causal.view(1, n_q, n_k) & (count > 0).view(batch, 1, n_k)
    static = sink_only.view(batch, 1, n_k).expand(batch, n_q, n_k)
    if pattern.window is not None:
        static = static | ((q_last.view(-1, 1) - k_first.view(1, -1)) < pattern.window).view(1, n_q, n_k)
    static = static & candidate
    return TileGrid(n_q, n_k, candidate.unsqueeze(1), static.unsqueeze(1), count.view(batch, 1, 1, n_k))


def choose_tiles(mass: torch.Tensor, grid: TileGrid, topk: int, threshold: float | None) -> torch.Tensor:
    """(B, Hkv, n_q, topk) int32 from estimated tile masses (B, Hkv, n_q, n_k), each query tile's row summing to 1.

    Fixed k: the ``topk`` competing tiles with the most mass. Threshold t: of those, in order of mass, the fewest
    whose mass, added to the mass of the tiles the static part keeps, reaches t. Unused slots are -1.
    """
    compete = grid.candidate & ~grid.static_full
    score = mass.masked_fill(~compete, -1.0)
    width = min(topk, grid.n_k)
    values, tiles = torch.topk(score, width, dim=-1)
    keep = values >= 0
    if threshold is not None:
        static_mass = (mass * grid.static_full).sum(-1, keepdim=True)
        before = static_mass + torch.cumsum(values.clamp(min=0), -1) - values.clamp(min=0)
        keep = keep & (before < threshold)
    out = torch.where(keep, tiles, -1).to(torch.int32)
    if width < topk:
        out = torch.nn.functional.pad(out, (0, topk - width), value=-1)
    return out
