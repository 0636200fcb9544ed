"""Pattern + shapes -> block index: the one data structure the reference and the kernels both consume.

Tiles live on the *absolute* position grid: query tile ``m`` covers absolute positions
``[(q_offset // B + m) * B, (q_offset // B + m + 1) * B)`` and key tile ``n`` likewise from ``kv_offset // B``.
Storage row ``t`` of the query tensor is absolute position ``q_offset + t`` (so a tile may start before the first
row: ``q_shift = q_offset % B`` rows of padding), and key ``s`` is at ``kv_offset + s``. Aligning tiles to absolute
positions makes block layouts independent of how a sequence is cut into calls (prefill, chunks, decode).

For every (batch, KV head, query tile) the index lists the key tiles to visit, split FlexAttention-style:

* ``full_tiles``: every (query, key) pair of the tile is attended; no element mask is needed;
* ``part_tiles``: some pairs are; the kernel evaluates the token-exact predicate. A value ``n >= 0`` means "key
  tile ``n``, keep pairs allowed by the token rules (sink or window)"; ``-(n + 1)`` means "key tile ``n`` is
  selected as a block, keep every pair that is causal, valid and in the same sequence".

The element predicate of a partial tile, for query at absolute ``i`` and key at absolute ``j``::

    j <= i  and  k_seg[j] >= 0  and  (q_seg is None or q_seg[i] == k_seg[j])
            and  (block_selected or rank[j] < sink_tokens or i - j < window)

where ``rank[j]`` is the key's position within its own sequence (``j`` itself without padding or packing).
Batch and head dimensions of the index are 1 when the layout does not depend on them (broadcast).
Building costs O(query tiles x listed tiles), never O(S^2): 1M tokens fit.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .patterns import SparsePattern

# Upper bound on elements of one candidate chunk (query tiles x candidates x heads x batch), to bound memory.
_CHUNK_ELEMENTS = 1 << 24
_HASH_BITS = 24


@dataclass
class BlockIndex:
    """Key tiles to visit per (batch, KV head, query tile), with what the kernel needs for partial tiles.

    Shapes: ``*_count`` are ``(Bi, Hi, n_q_tiles)`` int32, ``*_tiles`` are ``(Bi, Hi, n_q_tiles, width)`` int32,
    with ``Bi`` in {1, batch} and ``Hi`` in {1, kv_heads}. Entries past ``count`` are padding (0).
    """

    block_size: int
    q_len: int
    kv_len: int
    q_offset: int
    kv_offset: int
    n_q_tiles: int
    n_k_tiles: int
    full_count: torch.Tensor
    full_tiles: torch.Tensor
    part_count: torch.Tensor
    part_tiles: torch.Tensor
    sink_tokens: int = 0
    window: int = 0  # 0: no window term
    k_seg: torch.Tensor | None = None  # (B, kv_len) int32, -1 = key not attendable (padding)
    q_seg: torch.Tensor | None = None  # (B, q_len) int32, packed sequences only
    k_rank: torch.Tensor | None = None  # (B, kv_len) int32, position of the key in its own sequence
    _transposed: tuple[torch.Tensor, ...] | None = None

    @property
    def q_shift(self) -> int:
        return self.q_offset % self.block_size

    @property
    def k_shift(self) -> int:
        return self.kv_offset % self.block_size

    @property
    def batch_broadcast(self) -> bool:
        return self.full_count.shape[0] == 1

    @property
    def head_broadcast(self) -> bool:
        return self.full_count.shape[1] == 1

    def attended_tiles(self) -> int:
        """Number of (batch-or-broadcast, head-or-broadcast, query tile, key tile) pairs visited."""
        return int(self.full_count.sum().item() + self.part_count.sum().item())

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query tiles per key tile (for a deterministic key-major backward): full_count, full, part_count, part.

        Same encoding as the forward lists, with query tile numbers in place of key tile numbers.
        """
        if self._transposed is None:
            f_cnt, f_idx = _transpose_lists(self.full_count, self.full_tiles, self.n_k_tiles, encoded=False)
            p_cnt, p_idx = _transpose_lists(self.part_count, self.part_tiles, self.n_k_tiles, encoded=True)
            self._transposed = (f_cnt, f_idx, p_cnt, p_idx)
        return self._transposed

    def density(self) -> float:
        """Attended (query, key) pairs over causal pairs, counted exactly at the token level (small sizes only)."""
        mask = self.token_mask()
        causal = _causal_token_mask(self, mask.device)
        return float(mask.sum().item()) / max(1.0, float(causal.sum().item()) * mask.shape[0] * mask.shape[1])

    def token_mask(self) -> torch.Tensor:
        """Expand the index to a dense (Bi', Hi, q_len, kv_len) boolean mask. For tests and pictures only."""
        return _expand_index(self)


def _tile_ranges(offset: int, length: int, block: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Absolute first/last valid position of each tile, and whether the tile is clipped by the call's range."""
    first_block = offset // block
    n_tiles = (offset % block + length + block - 1) // block
    starts = (first_block + torch.arange(n_tiles, device=device)) * block
    lo = starts.clamp(min=offset)
    hi = (starts + block - 1).clamp(max=offset + length - 1)
    clipped = (lo != starts) | (hi != starts + block - 1)
    return lo, hi, clipped, n_tiles


def _tile_reduce(values: torch.Tensor, valid: torch.Tensor, shift: int, n_tiles: int, block: int):
    """Per-tile min / max of ``values`` (B, L) over ``valid`` positions, and any/all validity."""
    batch, length = values.shape
    pad_back = n_tiles * block - shift - length
    big = torch.iinfo(torch.int64).max
    vals = torch.nn.functional.pad(values.long(), (shift, pad_back), value=0).view(batch, n_tiles, block)
    ok = torch.nn.functional.pad(valid, (shift, pad_back), value=False).view(batch, n_tiles, block)
    vmin = torch.where(ok, vals, torch.full_like(vals, big)).amin(-1)
    vmax = torch.where(ok, vals, torch.full_like(vals, -big)).amax(-1)
    return vmin, vmax, ok.any(-1), ok.all(-1)


def _random_keep(qb: torch.Tensor, kb: torch.Tensor, head: torch.Tensor, seed: int, density: float) -> torch.Tensor:
    """Deterministic per-(query block, key block, head) coin flip with probability ``density``."""
    x = qb * 0x9E3779B1 + kb * 0x85EBCA77 + head * 0xC2B2AE3D + seed * 0x27D4EB2F + 0x165667B1
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    threshold = int(round(density * (1 << _HASH_BITS)))
    return (x & ((1 << _HASH_BITS) - 1)) < threshold


def random_layout_keep(qb: torch.Tensor, kb: torch.Tensor, head: torch.Tensor, seed: int, density: float):
    """Public rule of the random layout: the diagonal block always, others by the deterministic coin."""
    return (qb == kb) | _random_keep(qb, kb, head, seed, density)


def absolute_position(name: str, value: object) -> int:
    """Check an offset argument: an integer >= 0 (a negative one would make the kernels read before the tensors).

    Plain ints cost nothing; a one-element integer tensor is read once, as ``int()`` would.
    """
    try:
        position = operator.index(value)
    except TypeError:
        position = -1
    if position < 0:
        raise ValueError(f"{name}={value!r}: expected an integer absolute position >= 0")
    return position


def build_block_index(
    pattern: SparsePattern,
    *,
    batch: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    k_seg: torch.Tensor | None = None,
    q_seg: torch.Tensor | None = None,
    k_rank: torch.Tensor | None = None,
    topk_tiles: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> BlockIndex:
    """Build the block index of ``pattern`` for one attention call.

    ``k_seg``/``q_seg``/``k_rank`` describe padding and packed sequences (see the module docstring); leave them
    None for one unpadded sequence per batch row. ``topk_tiles`` (B or 1, Hkv or 1, n_q_tiles, k) holds key tile
    numbers chosen by a dynamic selection (-1 for none); they are added as block-selected tiles.
    """
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"q_len and kv_len must be >= 1, got q_len={q_len}, kv_len={kv_len}")
    q_offset, kv_offset = absolute_position("q_offset", q_offset), absolute_position("kv_offset", kv_offset)
    if q_offset + q_len > kv_offset + kv_len:
        raise ValueError(
            f"queries end at position {q_offset + q_len} but keys end at {kv_offset + kv_len}: every query needs "
            "its own key (q_offset + q_len <= kv_offset + kv_len)"
        )
    bad_heads = [h for h in pattern.dense_heads if h >= kv_heads]
    if bad_heads:
        raise ValueError(f"dense_heads {bad_heads} out of range: the layer has {kv_heads} KV heads")
    device = torch.device(device)
    block = pattern.block_size
    q_lo, q_hi, _, n_q = _tile_ranges(q_offset, q_len, block, device)
    k_lo, k_hi, k_clipped, n_k = _tile_ranges(kv_offset, kv_len, block, device)
    qb0, kb0 = q_offset // block, kv_offset // block

    if topk_tiles is not None and (
        topk_tiles.dim() != 4 or topk_tiles.shape[0] not in (1, batch) or topk_tiles.shape[1] not in (1, kv_heads)
        or topk_tiles.shape[2] != n_q
    ):
        raise ValueError(
            f"topk_tiles must be (1 or batch={batch}, 1 or kv_heads={kv_heads}, n_q_tiles={n_q}, k), "
            f"got shape {tuple(topk_tiles.shape)}"
        )
    # Padding, packing and a per-row top-k selection make the lists differ between batch rows.
    per_batch = k_seg is not None or q_seg is not None or k_rank is not None
    per_batch = per_batch or (topk_tiles is not None and topk_tiles.shape[0] != 1)
    n_b = batch if per_batch else 1
    # Per key tile: validity, segment range and rank range; per query tile: segment range.
    k_positions = (kv_offset + torch.arange(kv_len, device=device)).expand(n_b, kv_len)
    k_valid = torch.ones(n_b, kv_len, dtype=torch.bool, device=device) if k_seg is None else k_seg >= 0
    rank = k_positions if k_rank is None else k_rank
    rank_min, rank_max, k_any, k_all = _tile_reduce(rank, k_valid, kv_offset % block, n_k, block)
    k_all = k_all & ~k_clipped
    if k_seg is not None:
        kseg_min, kseg_max, _, _ = _tile_reduce(k_seg, k_valid, kv_offset % block, n_k, block)
    if q_seg is not None:
        q_ok = torch.ones_like(q_seg, dtype=torch.bool)
        qseg_min, qseg_max, _, _ = _tile_reduce(q_seg, q_ok, q_offset % block, n_q, block)
        if k_seg is None:
            raise ValueError("q_seg needs k_seg (packed sequences give both)")

    sink, window = pattern.sink_tokens, pattern.window or 0
    head_dependent = bool(pattern.dense_heads) or pattern.topk_blocks is not None or (
        pattern.layout is not None and pattern.layout.kind == "random"
    ) or (topk_tiles is not None and topk_tiles.shape[1] != 1)
    n_h = kv_heads if head_dependent else 1
    heads = torch.arange(n_h, device=device)
    dense_head = torch.zeros(n_h, dtype=torch.bool, device=device)
    if pattern.dense_heads and head_dependent:
        dense_head[list(pattern.dense_heads)] = True
    q_block_abs = qb0 + torch.arange(n_q, device=device)
    dense_row = (q_block_abs + 1) * block <= pattern.min_sparse_len
    if pattern.is_dense:
        dense_row[:] = True
    any_dense = bool(dense_row.any().item()) or bool(dense_head.any().item())

    # Sink candidates: key tiles holding any key of rank < sink (per batch row).
    sink_cands = None
    if sink > 0:
        has_sink = (rank_min < sink) & k_any
        width = int(has_sink.sum(-1).max().item()) if n_b else 0  # batch 0: nothing to list
        if width:
            order = torch.sort((~has_sink).to(torch.int8), dim=-1, stable=True).indices[:, :width]
            sink_cands = torch.where(torch.gather(has_sink, 1, order), order, -1)  # (n_b, width)

    fulls, parts = [], []
    # Candidate width per query tile, to pick a chunk size that bounds memory.
    est_width = (0 if sink_cands is None else sink_cands.shape[1]) + (window // block + 2 if window else 0)
    if pattern.layout is not None and pattern.layout.kind == "strided":
        est_width += n_k // pattern.layout.stride + 1
    if any_dense or (pattern.layout is not None and pattern.layout.kind == "random"):
        est_width += n_k
    if topk_tiles is not None:
        est_width += topk_tiles.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, est_width * n_h * n_b))
    for m0 in range(0, n_q, chunk):
        m = torch.arange(m0, min(n_q, m0 + chunk), device=device)
        cand, blk = _candidates(
            pattern, m, q_lo, q_hi, qb0, kb0, n_k, n_b, n_h, heads, dense_head, dense_row, sink_cands,
            topk_tiles, any_dense,
        )  # (n_b, n_h, c, W) int64 tile numbers (-1 = none), bool block-selected
        valid_c = cand >= 0
        n_safe = cand.clamp(min=0)
        qlo = q_lo[m].view(1, 1, -1, 1)
        qhi = q_hi[m].view(1, 1, -1, 1)
        klo, khi = k_lo[n_safe], k_hi[n_safe]

        def gathered(per_tile: torch.Tensor, idx: torch.Tensor = n_safe) -> torch.Tensor:
            """Per-key-tile statistic (n_b, n_k) gathered at the candidates (n_b, n_h, c, W)."""
            return torch.gather(per_tile.view(n_b, 1, 1, n_k).expand(*idx.shape[:3], n_k), 3, idx)

        kany, kall = gathered(k_any), gathered(k_all)
        causal_any, causal_all = klo <= qhi, khi <= qlo
        seg_any = torch.ones_like(valid_c)
        seg_all = torch.ones_like(valid_c)
        if k_seg is not None and q_seg is not None:
            ks_min, ks_max = gathered(kseg_min), gathered(kseg_max)
            qs_min = qseg_min[:, m].view(n_b, 1, -1, 1)
            qs_max = qseg_max[:, m].view(n_b, 1, -1, 1)
            seg_any = (ks_min <= qs_max) & (qs_min <= ks_max)
            seg_all = (ks_min == ks_max) & (qs_min == qs_max) & (ks_min == qs_min)
        token_any = torch.zeros_like(valid_c)
        token_all = torch.zeros_like(valid_c)
        if sink > 0:
            token_any |= gathered(rank_min) < sink
            token_all |= kall & (gathered(rank_max) < sink)
        if window:
            token_any |= (qlo - khi) < window
            token_all |= (qhi - klo) < window
        keep = valid_c & kany & causal_any & seg_any & (blk | token_any)
        full = keep & kall & causal_all & seg_all & (blk | token_all)
        # Deduplicate: a tile listed twice keeps its block-selected entry (a superset of the token one).
        key = torch.where(keep, cand * 2 + (~blk).long(), torch.full_like(cand, 1 << 40))
        key, order = torch.sort(key, dim=-1)
        keep = torch.gather(keep, 3, order)
        full = torch.gather(full, 3, order)
        blk = torch.gather(blk, 3, order)
        n_sorted = key // 2
        dup = torch.zeros_like(keep)
        dup[..., 1:] = n_sorted[..., 1:] == n_sorted[..., :-1]
        keep &= ~dup
        full &= keep
        part = keep & ~full
        fulls.append(_compact(n_sorted, full))
        encoded = torch.where(blk, -(n_sorted + 1), n_sorted)
        parts.append(_compact(encoded, part))

    full_count, full_tiles = _concat_lists(fulls)
    part_count, part_tiles = _concat_lists(parts)
    return BlockIndex(
        block_size=block,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=q_offset,
        kv_offset=kv_offset,
        n_q_tiles=n_q,
        n_k_tiles=n_k,
        full_count=full_count,
        full_tiles=full_tiles,
        part_count=part_count,
        part_tiles=part_tiles,
        sink_tokens=sink,
        window=window,
        k_seg=None if k_seg is None else k_seg.to(torch.int32).contiguous(),
        q_seg=None if q_seg is None else q_seg.to(torch.int32).contiguous(),
        k_rank=None if k_rank is None else k_rank.to(torch.int32).contiguous(),
    )


def _candidates(pattern, m, q_lo, q_hi, qb0, kb0, n_k, n_b, n_h, heads, dense_head, dense_row, sink_cands,
                topk_tiles, any_dense):
    """Candidate key tiles for query tiles ``m``: (n_b, n_h, c, W) tile numbers and a block-selected flag."""
    block = pattern.block_size
    c = len(m)
    device = m.device
    lists: list[tuple[torch.Tensor, bool]] = []
    last_kb = q_hi[m] // block  # absolute key block of the last causal key
    if sink_cands is not None:
        lists.append((sink_cands.view(n_b, 1, 1, -1).expand(n_b, n_h, c, -1), False))
    if pattern.window:
        w = pattern.window
        first = torch.div(q_lo[m] - w + 1, block, rounding_mode="floor").clamp(min=0) - kb0
        span = (w + block - 2) // block + 2
        n = first.view(-1, 1) + torch.arange(span, device=device)
        n = torch.where(n <= (last_kb - kb0).view(-1, 1), n, -1)
        lists.append((n.view(1, 1, c, span).expand(n_b, n_h, c, span), False))
    if pattern.layout is not None and pattern.layout.kind == "strided":
        lay = pattern.layout
        kb = lay.offset + lay.stride * torch.arange((kb0 + n_k + lay.stride - 1) // lay.stride + 1, device=device)
        kb = kb[(kb >= kb0) & (kb < kb0 + n_k)]
        n = (kb - kb0).view(1, -1).expand(c, -1)
        n = torch.where(kb.view(1, -1) <= last_kb.view(-1, 1), n, -1)
        lists.append((n.view(1, 1, c, -1).expand(n_b, n_h, c, -1), True))
    all_n = torch.arange(n_k, device=device)
    if pattern.layout is not None and pattern.layout.kind == "random":
        lay = pattern.layout
        qb = (qb0 + m).view(1, -1, 1)
        kb = (kb0 + all_n).view(1, 1, -1)
        keep = random_layout_keep(qb, kb, heads.view(-1, 1, 1), lay.seed, lay.density) & (kb <= qb)
        n = torch.where(keep, all_n.view(1, 1, -1), -1)
        lists.append((n.view(1, n_h, c, n_k).expand(n_b, n_h, c, n_k), True))
    if any_dense:
        row_dense = dense_row[m].view(1, -1, 1) | dense_head.view(-1, 1, 1)
        causal = (kb0 + all_n).view(1, 1, -1) <= last_kb.view(1, -1, 1)
        n = torch.where(row_dense & causal, all_n.view(1, 1, -1), -1)
        lists.append((n.view(1, n_h, c, n_k).expand(n_b, n_h, c, n_k), True))
    if topk_tiles is not None:
        t = topk_tiles[:, :, m].long()
        lists.append((t.expand(n_b, n_h, c, t.shape[-1]), True))
    if not lists:
        return (torch.full((n_b, n_h, c, 1), -1, dtype=torch.long, device=device),
                torch.zeros((n_b, n_h, c, 1), dtype=torch.bool, device=device))
    cand = torch.cat([x.long() for x, _ in lists], dim=-1)
    blk = torch.cat([torch.full(x.shape, flag, dtype=torch.bool, device=device) for x, flag in lists], dim=-1)
    cand = torch.where((cand >= 0) & (cand < n_k), cand, -1)
    return cand, blk


def _compact(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move kept entries to the front (order preserved); return counts and the list trimmed to the max count."""
    count = keep.sum(-1)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    packed = torch.gather(values, -1, order)
    width = int(count.max().item()) if count.numel() else 0
    packed = packed[..., :width]
    slot = torch.arange(width, device=values.device)
    packed = torch.where(slot < count.unsqueeze(-1), packed, 0)
    return count.to(torch.int32), packed.to(torch.int32)


def _concat_lists(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(t.shape[-1] for _, t in chunks))
    counts = torch.cat([c for c, _ in chunks], dim=2).contiguous()
    tiles = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for _, t in chunks], dim=2)
    return counts, tiles.contiguous()


def _transpose_lists(count: torch.Tensor, tiles: torch.Tensor, n_k: int, encoded: bool):
    """Invert per-query-tile lists into per-key-tile lists of query tiles (same encoding), deterministically."""
    n_b, n_h, n_q, width = tiles.shape
    device = tiles.device
    present = torch.arange(width, device=device) < count.unsqueeze(-1).long()
    raw = tiles.long()
    selected = raw < 0 if encoded else torch.zeros_like(present)
    key_tile = torch.where(selected, -raw - 1, raw)
    m = torch.arange(n_q, device=device).view(1, 1, n_q, 1).expand_as(raw)
    value = torch.where(selected, -m - 1, m)
    flat = n_q * width  # spelled out (no -1): an index for batch 0 has no elements to infer it from
    flat_key = torch.where(present, key_tile, n_k).reshape(n_b, n_h, flat)
    flat_val = value.reshape(n_b, n_h, flat)
    # Sort by key tile, then query tile: lists come out ascending and the result is deterministic.
    order = torch.sort(flat_key * (n_q + 1) + m.reshape(n_b, n_h, flat), dim=-1).indices
    flat_key = torch.gather(flat_key, -1, order)
    flat_val = torch.gather(flat_val, -1, order)
    counts = torch.zeros(n_b, n_h, n_k + 1, dtype=torch.long, device=device)
    counts.scatter_add_(-1, flat_key, torch.ones_like(flat_key))
    starts = torch.cumsum(counts, -1) - counts
    counts = counts[..., :n_k]
    width_t = max(1, int(counts.max().item()) if counts.numel() else 0)
    pos = torch.arange(flat_key.shape[-1], device=device).expand_as(flat_key)
    rank = pos - torch.gather(starts, -1, flat_key)
    # Absent entries land in a dump region past the n_k lists.
    target = torch.where(flat_key < n_k, flat_key * width_t + rank, n_k * width_t + pos)
    out = torch.zeros(n_b, n_h, n_k * width_t + flat_key.shape[-1], dtype=torch.long, device=device)
    out.scatter_(-1, target, flat_val)
    out = out[..., : n_k * width_t].view(n_b, n_h, n_k, width_t)
    slot = torch.arange(width_t, device=device)
    out = torch.where(slot < counts.unsqueeze(-1), out, 0)
    return counts.to(torch.int32).contiguous(), out.to(torch.int32).contiguous()


def element_mask(
    index: BlockIndex,
    q_abs: torch.Tensor,
    k_abs: torch.Tensor,
    batch_rows: torch.Tensor | None,
    block_selected: torch.Tensor,
) -> torch.Tensor:
    """The token-exact predicate of partial tiles, broadcast over ``q_abs`` and ``k_abs`` (absolute positions).

    ``batch_rows``: batch indices broadcastable against the positions (None when the index has no per-batch data).
    ``block_selected``: whether the pair's tile is block-selected (then sink/window terms are not needed).
    """
    q_t = q_abs - index.q_offset
    k_t = k_abs - index.kv_offset
    in_range = (k_t >= 0) & (k_t < index.kv_len)
    k_safe = k_t.clamp(0, index.kv_len - 1)
    keep = (k_abs <= q_abs) & in_range
    if index.k_seg is not None:
        kseg = index.k_seg[batch_rows, k_safe]
        keep &= kseg >= 0
        if index.q_seg is not None:
            q_safe = q_t.clamp(0, index.q_len - 1)
            keep &= index.q_seg[batch_rows, q_safe] == kseg
    token = torch.zeros_like(keep)
    if index.sink_tokens:
        rank = k_abs if index.k_rank is None else index.k_rank[batch_rows, k_safe]
        token |= rank < index.sink_tokens
    if index.window:
        token |= (q_abs - k_abs) < index.window
    return keep & (block_selected | token)


def _causal_token_mask(index: BlockIndex, device: torch.device) -> torch.Tensor:
    q_abs = index.q_offset + torch.arange(index.q_len, device=device)
    k_abs = index.kv_offset + torch.arange(index.kv_len, device=device)
    return k_abs.view(1, -1) <= q_abs.view(-1, 1)


def _expand_index(index: BlockIndex) -> torch.Tensor:
    """Dense boolean mask (Bi', Hi, q_len, kv_len) of what the index attends; Bi' = batch if per-batch data."""
    device = index.full_count.device
    block = index.block_size
    n_b, n_h = index.full_count.shape[:2]
    if index.k_seg is not None:
        n_b = index.k_seg.shape[0]
    out = torch.zeros(n_b, n_h, index.q_len, index.kv_len, dtype=torch.bool, device=device)
    qb0, kb0 = index.q_offset // block, index.kv_offset // block
    r = torch.arange(block, device=device)
    for b in range(n_b):
        bi = 0 if index.full_count.shape[0] == 1 else b
        for h in range(n_h):
            for m in range(index.n_q_tiles):
                q_abs = (qb0 + m) * block + r
                q_t = q_abs - index.q_offset
                rows = (q_t >= 0) & (q_t < index.q_len)
                entries = [(int(n), True, True) for n in index.full_tiles[bi, h, m, : index.full_count[bi, h, m]]]
                for raw in index.part_tiles[bi, h, m, : index.part_count[bi, h, m]].tolist():
                    entries.append((-raw - 1 if raw < 0 else raw, False, raw < 0))
                for n, is_full, selected in entries:
                    k_abs = (kb0 + n) * block + r
                    k_t = k_abs - index.kv_offset
                    cols = (k_t >= 0) & (k_t < index.kv_len)
                    if is_full:
                        tile = torch.ones(block, block, dtype=torch.bool, device=device)
                    else:
                        rows_b = torch.full((block, block), b, device=device)
                        tile = element_mask(
                            index, q_abs.view(-1, 1), k_abs.view(1, -1), rows_b, torch.tensor(selected, device=device)
                        )
                    tile = tile & rows.view(-1, 1) & cols.view(1, -1)
                    qi = q_t[rows]
                    kj = k_t[cols]
                    sub = out[b, h][qi.min() : qi.max() + 1, kj.min() : kj.max() + 1]
                    sub |= tile[rows][:, cols]
    return out


def attended_pairs(index: BlockIndex, batch_row: int = 0, head: int = 0) -> int:
    """Exact number of (query, key) pairs the index attends for one batch row and KV head, without a dense mask.

    Full tiles count their in-range rows x block; partial tiles are evaluated element-wise, a chunk at a time.
    """
    block = index.block_size
    device = index.full_count.device
    bi = 0 if index.batch_broadcast else batch_row
    hi = 0 if index.head_broadcast else head
    qb0, kb0 = index.q_offset // block, index.kv_offset // block
    r = torch.arange(block, device=device)
    m_all = torch.arange(index.n_q_tiles, device=device)
    q_abs = (qb0 + m_all).view(-1, 1) * block + r  # (n_q, block)
    rows_in = ((q_abs >= index.q_offset) & (q_abs < index.q_offset + index.q_len)).sum(-1)  # (n_q,)
    total = int((index.full_count[bi, hi].long() * rows_in).sum().item()) * block
    width = index.part_tiles.shape[-1]
    cnt = index.part_count[bi, hi].long()
    slots = torch.arange(width, device=device)
    chunk = max(1, (1 << 22) // max(1, width * block * block))
    rows_b = torch.tensor(batch_row, device=device)
    for m0 in range(0, index.n_q_tiles, chunk):
        m1 = min(index.n_q_tiles, m0 + chunk)
        raw = index.part_tiles[bi, hi, m0:m1].long()
        present = slots < cnt[m0:m1].unsqueeze(-1)
        n = torch.where(raw < 0, -raw - 1, raw)
        qa = q_abs[m0:m1].view(-1, 1, block, 1)
        ka = ((kb0 + n).view(m1 - m0, width, 1, 1) * block + r.view(1, 1, 1, -1))
        mask = element_mask(index, qa, ka, rows_b, (raw < 0).view(m1 - m0, width, 1, 1))
        q_ok = (qa >= index.q_offset) & (qa < index.q_offset + index.q_len)
        total += int((mask & q_ok & present.view(m1 - m0, width, 1, 1)).sum().item())
    return total


def causal_pairs(q_len: int, kv_len: int, q_offset: int, kv_offset: int) -> int:
    """Number of (query, key) pairs with key <= query, for density denominators."""
    visible = torch.arange(q_len, dtype=torch.float64) + (q_offset - kv_offset + 1)
    return int(visible.clamp(0, kv_len).sum().item())
