"""Block features the learned scorer reads, on the absolute tile grid, and the tiles that compete for the budget.

Key tile features: [mean, max, min] over the tile's real keys, (B, Hkv, n_tiles, 3 D): computed once per complete
tile (decode keeps them, :mod:`hf_sparsek.learned.store`). Query tile features: the mean query of a tile over its real
rows and the query heads of a KV group, (B, Hkv, n_tiles, D).

Why the scorer of query tile m reads the pooled queries of tile m - 1 ("lagged"): the kernels apply one selection
to every row of a tile, so a selection that read tile m's own rows would depend on rows after the first one, and a
sequence cut into calls (prefill, chunked prefill, decode) would select differently from one long call. Everything
the lagged rule reads exists when tile m's first row arrives, so every way of cutting a sequence selects the same
tiles (the property the block index already has for static patterns).

Competing tiles of query tile m (absolute tile ``qb``): causal key tiles before the diagonal with a real key that
the pattern's sink and window do not already keep whole: not every real key a sink token, and before the first tile
the window keeps whole for the tile's last row, ``floor((qb B + B - 1 - window) / B) + 1``. So the window's edge
tile, which the window covers only in part, competes (selecting it keeps the rest of it), like the package's
training-free selectors' competition (``hf_sparsek.selection.tiles``). All rules use the absolute tile, never the
call's rows: every way of cutting a sequence into calls lets the same tiles compete.
"""

from __future__ import annotations

import torch

KEY_FEATURES = 3  # mean, max, min


def tile_count(offset: int, length: int, block: int) -> int:
    """Tiles on the absolute grid touched by positions offset .. offset + length - 1."""
    return (offset % block + length + block - 1) // block


def _tiles(x: torch.Tensor, valid: torch.Tensor, offset: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, L, F) and valid (B, L) -> (B, H, n, block, F) padded onto the grid, (B, 1, n, block, 1) validity."""
    batch, heads, length, feat = x.shape
    shift = offset % block
    n = tile_count(offset, length, block)
    back = n * block - shift - length
    xp = torch.nn.functional.pad(x, (0, 0, shift, back)).view(batch, heads, n, block, feat)
    ok = torch.nn.functional.pad(valid, (shift, back), value=False).view(batch, 1, n, block, 1)
    return xp, ok


def _segments(valid: torch.Tensor | None) -> torch.Tensor | None:
    """The pooling kernel's row marks: -1 for padding, 0 for a real row (None: every row real)."""
    return None if valid is None else valid.to(torch.int32) - 1


def key_tile_features(k: torch.Tensor, valid: torch.Tensor | None, offset: int, block: int, use_triton: bool = False
                      ) -> torch.Tensor:
    """(B, Hkv, n_tiles, 3 D) float32: [mean, max, min] of the real keys of each tile (zeros for a tile without).

    ``use_triton``: one pass of ``hf_sparsek.kernels.learned_selection`` over k in its own dtype (GPU, or the
    interpreter), instead of these PyTorch ops on a float copy."""
    batch, _, length, _ = k.shape
    if use_triton:
        from ..kernels.learned_selection import pool_tiles

        return pool_tiles(k, offset, block, _segments(valid), 0, key_stats=True, out_heads=k.shape[1])[0]
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=k.device)
    kp, ok = _tiles(k.float(), valid, offset, block)
    count = ok.sum(3)
    mean = (kp * ok).sum(3) / count.clamp(min=1)
    big = torch.finfo(torch.float32).max
    top = kp.masked_fill(~ok, -big).amax(3)
    low = kp.masked_fill(~ok, big).amin(3)
    has = count > 0
    return torch.cat([mean, torch.where(has, top, 0.0), torch.where(has, low, 0.0)], dim=-1)


def query_tile_sums(q: torch.Tensor, valid: torch.Tensor | None, offset: int, block: int, kv_heads: int,
                    use_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: the sum of the real query rows over the group's heads (B, Hkv, n, D) and their count (B, 1, n, 1)
    (rows x group heads), float32. ``use_triton``: as :func:`key_tile_features`."""
    batch, hq, length, dim = q.shape
    if use_triton:
        from ..kernels.learned_selection import pool_tiles

        sums, counts = pool_tiles(q, offset, block, _segments(valid), 0, key_stats=False, out_heads=kv_heads)
        return sums, counts[:, :1, :, None]
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    grouped = q.float().view(batch, kv_heads, hq // kv_heads, length, dim).sum(2)
    qp, ok = _tiles(grouped, valid, offset, block)
    return (qp * ok).sum(3), ok.sum(3).float() * (hq // kv_heads)


def own_query_features(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Query features of each tile of a call from its own rows (selector option ``query_rows="own"``): the mean of
    the tile's rows so far (B, Hkv, n, D). ``sums``/``counts`` as for :func:`lagged_query_features`: a decode step's
    tile includes the rows of earlier calls where the store knows them, so a step reads every row of its tile up to
    itself; a prefill's tile reads all its rows, later ones included (so cutting a sequence into calls differently
    can change a selection, as with the training-free selectors)."""
    return sums / counts.clamp(min=1)


def lagged_query_features(sums: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Query features of each tile of a call: the mean of the tile before it (B, Hkv, n, D).

    ``sums``/``counts`` are the call's per-tile sums (its first tile completed with rows of earlier calls where
    known); ``previous`` the mean of the tile before the call's first one (None where unknown: the first tile then
    reads its own rows, the one case where cutting a sequence differently can change a selection).
    """
    means = sums / counts.clamp(min=1)
    first = means[:, :, :1] if previous is None else previous.unsqueeze(2).to(means.dtype)
    return torch.cat([first, means[:, :, :-1]], dim=2)


def key_ranks(valid: torch.Tensor | None, batch: int, kv_len: int, kv_offset: int, device: torch.device
              ) -> torch.Tensor:
    """(B, kv_len) rank of each key in its sequence, as the block index counts sinks (padding: from the first real
    key of the call; none: the absolute position)."""
    if valid is None:
        return (kv_offset + torch.arange(kv_len, device=device)).expand(batch, kv_len)
    return torch.cumsum(valid.long(), -1) - 1


def competing_tiles(
    q_offset: int, q_len: int, kv_offset: int, kv_len: int, block: int, sink_tokens: int, window: int | None,
    valid: torch.Tensor | None, batch: int, device: torch.device,
) -> torch.Tensor:
    """(B, 1, n_q_tiles, n_k_tiles) boolean: the key tiles each query tile's budget chooses among (module doc)."""
    n_q, n_k = tile_count(q_offset, q_len, block), tile_count(kv_offset, kv_len, block)
    qb = (q_offset // block + torch.arange(n_q, device=device)).view(-1, 1)
    kb = (kv_offset // block + torch.arange(n_k, device=device)).view(1, -1)
    limit = qb if window is None else torch.minimum(
        qb, torch.div(qb * block + block - 1 - window, block, rounding_mode="floor") + 1)
    before = kb < limit  # (n_q, n_k)
    per_key = key_tiles_that_compete(kv_offset, kv_len, block, sink_tokens, valid, batch, device)
    return (before.view(1, 1, n_q, n_k) & per_key.view(batch, 1, 1, n_k))


def key_tiles_that_compete(kv_offset: int, kv_len: int, block: int, sink_tokens: int, valid: torch.Tensor | None,
                           batch: int, device: torch.device) -> torch.Tensor:
    """(B, n_k_tiles) boolean: key tiles that hold a real key, are complete in this call and are not all sink
    tokens (the key side of :func:`competing_tiles`)."""
    n_k = tile_count(kv_offset, kv_len, block)
    ok = torch.ones(batch, kv_len, dtype=torch.bool, device=device) if valid is None else valid.bool()
    rank = key_ranks(valid, batch, kv_len, kv_offset, device)
    shift = kv_offset % block
    back = n_k * block - shift - kv_len
    okp = torch.nn.functional.pad(ok, (shift, back), value=False).view(batch, n_k, block)
    rankp = torch.nn.functional.pad(rank, (shift, back), value=1 << 40).view(batch, n_k, block)
    has_key = okp.any(-1)
    complete = torch.ones_like(has_key)
    if shift:  # the first tile is cut by the call: its keys before kv_offset are unknown here
        complete[:, 0] = False
    sink = (~okp | (rankp < sink_tokens)).all(-1) if sink_tokens else torch.zeros_like(has_key)  # all sink
    return has_key & ~sink & complete
