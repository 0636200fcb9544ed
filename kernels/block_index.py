"""The block index's forward lists in one Triton launch: per (batch, KV head, query tile), the candidate key tiles
(sink range, window range, dense rows, selected tiles) classified, deduplicated and compacted into sorted lists.

The definition is ``hf_sparsek.block_index._build_lists`` (PyTorch; this kernel must give the same lists, bit for
bit). One program per (query tile, batch x head) holds the row's ``C`` candidates (a power of two >= their number):

* candidate ``i`` is a key tile ``n`` (-1 / out of range: none) and whether it is block-selected (dense rows and
  selected tiles) or ruled by the token rules (sink and window ranges);
* classification: kept when some (query, key) pair of the tiles can be attended, full when every pair is; the
  per-tile statistics come from positions (no padding) or from a (batch, key tile, 5) table (padding);
* sort key ``n * 4 + block-selected * 2 + full``; of the candidates of one tile the largest key wins (a block-
  selected entry attends a superset of a token-rule one), found by a (C x C) comparison instead of a sort;
* a winner's slot in its list is the number of winners of the same list with a smaller tile; slots past a row's
  count are written 0, so the lists need no zeroing launch.

With padding, ``_key_tile_table_kernel`` first writes that table (and which key tiles hold a sink key) from the key
segments and ranks in one launch, in place of the PyTorch reductions of ``_key_tile_table``.

No host synchronisation: every size comes from the shapes and the pattern. No transformers or hf_sparsek imports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BIG: tl.constexpr = tl.constexpr(2147483647)  # sort key of a dropped candidate: past every kept one
MAX_CANDIDATES = 128  # more candidates per row: the (C x C) comparison would spill; the caller uses PyTorch ops


@triton.jit
def _floor_div(x, d):
    """floor(x / d) for int64 ``x`` of any sign and ``d`` > 0 (Triton's ``//`` truncates toward zero)."""
    return tl.where(x >= 0, x // d, -((d - 1 - x) // d))


@triton.jit
def _candidates(TOPK, SINK_ROW, b, h, m, i, n_sink, n_win, n_dense, n_topk, win_first, dense_rows,
                s_tb, s_th, s_tm, s_tk, s_sb, SINK_FIXED: tl.constexpr):
    """Key tile (int32, -1 for none) of candidates ``i`` of row (b, h, m): sink, window, dense row, selected."""
    in_sink = i < n_sink
    w = i - n_sink
    in_win = (w >= 0) & (w < n_win)
    d = w - n_win
    in_dense = (d >= 0) & (d < n_dense)
    t = d - n_dense
    in_topk = (t >= 0) & (t < n_topk)
    if SINK_FIXED:
        sink_tile = i
    else:
        sink_tile = tl.load(SINK_ROW + b.to(tl.int64) * s_sb + i, mask=in_sink, other=-1)
    picked = tl.load(TOPK + b.to(tl.int64) * s_tb + h.to(tl.int64) * s_th + m.to(tl.int64) * s_tm
                     + t.to(tl.int64) * s_tk, mask=in_topk, other=-1).to(tl.int32)
    dense_tile = tl.where(m < dense_rows, d, -1)
    tile = tl.where(in_sink, sink_tile, tl.where(in_win, win_first + w, tl.where(in_dense, dense_tile, picked)))
    return tl.where(in_sink | in_win | in_dense | in_topk, tile, -1)


@triton.jit
def _tile_stats(TABLE, b, n_safe, s_ab, s_an, kb0, kv_offset, kv_end, BLOCK: tl.constexpr, PADDED: tl.constexpr):
    """(first position, last position, last position if whole and all valid else max, rank min, rank max) of key
    tiles ``n_safe`` (int64): from positions without padding, else read from the host's table."""
    if PADDED:
        row = TABLE + b.to(tl.int64) * s_ab + n_safe.to(tl.int64) * s_an
        return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    start = (kb0 + n_safe).to(tl.int64) * BLOCK
    lo = tl.maximum(start, kv_offset)
    hi = tl.minimum(start + (BLOCK - 1), kv_end - 1)
    whole = (lo == start) & (hi - lo == BLOCK - 1)
    return lo, hi, tl.where(whole, hi, 9223372036854775807), lo, hi


@triton.jit
def _row_lists_kernel(
    TOPK, SINK_ROW, TABLE, FC, FT, PC, PT,
    s_tb, s_th, s_tm, s_tk, s_sb, s_ab, s_an,
    n_h, n_q, n_k, qb0, kb0, q_offset, q_end, kv_offset, kv_end, sink, window,
    n_sink, n_win, n_dense, n_topk, win_min, dense_rows, w_full, w_part,
    BLOCK: tl.constexpr, C: tl.constexpr, PADDED: tl.constexpr, SINK_FIXED: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TOKEN_RULES: tl.constexpr,
):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_h
    h = bh % n_h
    i = tl.arange(0, C)

    q_start = (qb0 + m).to(tl.int64) * BLOCK
    q_lo = tl.maximum(q_start, q_offset)
    q_hi = tl.minimum(q_start + (BLOCK - 1), q_end - 1)
    win_first = (_floor_div(q_lo - (window - 1), BLOCK) - kb0).to(tl.int32)
    win_first = tl.maximum(win_first, win_min)
    cand = _candidates(TOPK, SINK_ROW, b, h, m, i, n_sink, n_win, n_dense, n_topk, win_first, dense_rows,
                       s_tb, s_th, s_tm, s_tk, s_sb, SINK_FIXED)
    n_tok = n_sink + n_win
    blk = i >= n_tok

    # classification (block_index._build_lists): kept, full
    n_safe = tl.minimum(tl.maximum(cand, 0), n_k - 1)
    k_lo, k_hi, k_hi_full, r_min, r_max = _tile_stats(TABLE, b, n_safe, s_ab, s_an, kb0, kv_offset, kv_end,
                                                      BLOCK, PADDED)
    keep = (n_safe == cand) & (k_lo <= q_hi)
    full = k_hi_full <= q_lo
    if HAS_TOKEN_RULES:  # some candidates follow the sink / window rules (else all are block-selected)
        tok_any = blk
        tok_all = blk
        if HAS_SINK:
            tok_any = tok_any | (r_min < sink)
            tok_all = tok_all | (r_max < sink)
        if HAS_WINDOW:
            tok_any = tok_any | (k_hi > q_lo - window)
            tok_all = tok_all | (k_lo > q_hi - window)
        keep = keep & tok_any
        full = full & tok_all
    full = full & keep

    # one entry per tile: the largest key (ties: the later candidate) wins
    key = tl.where(keep, cand * 4 + blk.to(tl.int32) * 2 + full.to(tl.int32), BIG)
    ki = key[:, None]
    kj = key[None, :]
    same = ((kj >> 2) == (ki >> 2)) & (kj != BIG)
    beaten = same & ((kj > ki) | ((kj == ki) & (i[None, :] > i[:, None])))
    winner = (key != BIG) & (tl.max(beaten.to(tl.int32), 1) == 0)
    won_full = winner & ((key & 1) != 0)
    won_part = winner & ((key & 1) == 0)

    # slot of a winner: the winners of its list with a smaller tile
    tile = key >> 2
    before = tile[None, :] < tile[:, None]
    slot_full = tl.sum((before & won_full[None, :]).to(tl.int32), 1)
    slot_part = tl.sum((before & won_part[None, :]).to(tl.int32), 1)
    count_full = tl.sum(won_full.to(tl.int32), 0)
    count_part = tl.sum(won_part.to(tl.int32), 0)
    encoded = tl.where((key & 2) != 0, -(tile + 1), tile)  # block-selected partial tile n is stored as -(n + 1)

    row = (bh.to(tl.int64) * n_q + m)
    tl.store(FC + row, count_full)
    tl.store(PC + row, count_part)
    full_row = FT + row * w_full
    part_row = PT + row * w_part
    tl.store(full_row + slot_full, tile, mask=won_full & (slot_full < w_full))
    tl.store(part_row + slot_part, encoded, mask=won_part & (slot_part < w_part))
    zero = tl.zeros([C], dtype=tl.int32)
    tl.store(full_row + i, zero, mask=(i >= count_full) & (i < w_full))
    tl.store(part_row + i, zero, mask=(i >= count_part) & (i < w_part))


@triton.jit
def _key_tile_table_kernel(
    KSEG, KRANK, TABLE, HAS_SINK,
    s_sb, s_rb, s_ab, s_an, s_hb,
    n_k, kb0, kv_offset, kv_len, sink,
    BLOCK: tl.constexpr, NB: tl.constexpr, HAS_SEG: tl.constexpr, HAS_RANK: tl.constexpr,
    WRITE_SINK: tl.constexpr,
):
    """Per (batch row, key tile): first position (max when no valid key), last position, last if whole and all
    valid (else max), rank min / max over valid keys (max / -max when none); and whether a sink key is there."""
    b = tl.program_id(1)
    n = tl.program_id(0) * NB + tl.arange(0, NB)
    n_ok = n < n_k
    start = (kb0 + n).to(tl.int64) * BLOCK
    pos = start[:, None] + tl.arange(0, BLOCK)[None, :]  # absolute positions of the tiles' keys
    t = pos - kv_offset
    inside = (t >= 0) & (t < kv_len) & n_ok[:, None]
    valid = inside
    if HAS_SEG:
        valid = valid & (tl.load(KSEG + b.to(tl.int64) * s_sb + t, mask=inside, other=-1) >= 0)
    if HAS_RANK:
        rank = tl.load(KRANK + b.to(tl.int64) * s_rb + t, mask=inside, other=0).to(tl.int64)
    else:
        rank = pos
    big = 9223372036854775807
    r_min = tl.min(tl.where(valid, rank, big), 1)
    r_max = tl.max(tl.where(valid, rank, -big), 1)
    n_valid = tl.sum(valid.to(tl.int32), 1)
    lo = tl.maximum(start, kv_offset)
    hi = tl.minimum(start + (BLOCK - 1), kv_offset + kv_len - 1)
    whole = (lo == start) & (hi - lo == BLOCK - 1)
    row = TABLE + b.to(tl.int64) * s_ab + n.to(tl.int64) * s_an
    tl.store(row, tl.where(n_valid > 0, lo, big), mask=n_ok)
    tl.store(row + 1, hi, mask=n_ok)
    tl.store(row + 2, tl.where((n_valid == BLOCK) & whole, hi, big), mask=n_ok)
    tl.store(row + 3, r_min, mask=n_ok)
    tl.store(row + 4, r_max, mask=n_ok)
    if WRITE_SINK:
        tl.store(HAS_SINK + b.to(tl.int64) * s_hb + n, ((r_min < sink) & (n_valid > 0)).to(tl.int8), mask=n_ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def candidate_slots(n_sink: int, n_win: int, n_dense: int, n_topk: int) -> int:
    """Candidates per row as the kernel holds them (a power of two); above ``MAX_CANDIDATES`` it does not run."""
    return _next_pow2(max(1, n_sink + n_win + n_dense + n_topk))


def build_row_lists(
    *,
    n_b: int,
    n_h: int,
    n_q: int,
    n_k: int,
    block: int,
    q_offset: int,
    q_len: int,
    kv_offset: int,
    kv_len: int,
    sink: int,
    window: int,
    n_sink: int,
    n_win: int,
    n_dense: int,
    dense_rows: int,
    full_width: int,
    part_width: int,
    sink_row: torch.Tensor | None,
    table: torch.Tensor | None,
    topk: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """full_count, full_tiles, part_count, part_tiles (int32, contiguous) of the block index, in one launch.

    Candidates of query tile ``m``: the sink tiles ``0 .. n_sink-1`` (or, with ``sink_row`` (n_b or 1, n_sink) int32,
    those tiles, -1 = none), the window's ``n_win`` tiles from its first reachable one (not below ``n_sink`` when
    the sink tiles are fixed), the dense row's tiles ``0 .. n_dense-1`` while ``m < dense_rows``, and ``topk``
    (1 or n_b, 1 or n_h, n_q, k) integer key tiles (-1 = none). ``table``: (n_b, n_k, 5) int64 key tile statistics
    with padding (first / last position, last if whole and all valid, rank min / max; see
    ``hf_sparsek.block_index._key_tile_table``), None without (then taken from positions). Tile numbers are
    relative to ``kv_offset // block``; widths are the host-known list strides.
    """
    n_topk = 0 if topk is None else topk.shape[-1]
    slots = candidate_slots(n_sink, n_win, n_dense, n_topk)
    if slots > MAX_CANDIDATES:
        raise ValueError(f"{slots} candidate slots per query tile: the list kernel holds at most {MAX_CANDIDATES}")
    if table is not None and (table.dtype != torch.int64 or table.dim() != 3 or tuple(table.shape) != (n_b, n_k, 5)
                              or table.stride(2) != 1):
        raise ValueError(f"table must be int64 (n_b={n_b}, n_k={n_k}, 5) with unit column stride, got "
                         f"{tuple(table.shape)} {table.dtype}")
    full_count = torch.empty(n_b, n_h, n_q, dtype=torch.int32, device=device)
    part_count = torch.empty_like(full_count)
    full_tiles = torch.empty(n_b, n_h, n_q, full_width, dtype=torch.int32, device=device)
    part_tiles = torch.empty(n_b, n_h, n_q, part_width, dtype=torch.int32, device=device)
    if full_count.numel() == 0:
        return full_count, full_tiles, part_count, part_tiles
    t_strides = _broadcast_strides(topk, n_b, n_h) if topk is not None else (0, 0, 0, 0)
    s_sb = 0 if sink_row is None or sink_row.shape[0] == 1 else sink_row.stride(0)
    if sink_row is not None and sink_row.shape[-1] and sink_row.stride(-1) != 1:
        raise ValueError("sink_row must have a unit column stride")
    sink_fixed = sink_row is None
    win_min = n_sink if (sink_fixed and n_sink) else -(1 << 30)
    _row_lists_kernel[(n_q, n_b * n_h)](
        full_count if topk is None else topk, full_count if sink_row is None else sink_row,
        full_count if table is None else table, full_count, full_tiles, part_count, part_tiles,
        *t_strides, s_sb, *((table.stride(0), table.stride(1)) if table is not None else (0, 0)),
        n_h, n_q, n_k, q_offset // block, kv_offset // block, q_offset, q_offset + q_len, kv_offset,
        kv_offset + kv_len, sink, window, n_sink, n_win, n_dense, n_topk, win_min, dense_rows, full_width,
        part_width, BLOCK=block, C=slots, PADDED=table is not None, SINK_FIXED=sink_fixed, HAS_SINK=sink > 0,
        HAS_WINDOW=window > 0, HAS_TOKEN_RULES=n_sink + n_win > 0,
        num_warps=4,  # sm_90 ptxas (Triton 3.6): 86 registers at C=32, 255 at 64 and 128 (4 bytes spilled at 64)
    )
    return full_count, full_tiles, part_count, part_tiles


def key_tile_table(
    k_seg: torch.Tensor | None,
    k_rank: torch.Tensor | None,
    *,
    batch: int,
    n_k: int,
    block: int,
    kv_offset: int,
    kv_len: int,
    sink: int,
    sink_tiles: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(batch, n_k, 5) int64 key tile statistics of a padded call in one launch, the ``table`` of
    :func:`build_row_lists` (``hf_sparsek.block_index._key_tile_table``'s padded branch), and, when ``sink_tiles``
    is given, (batch, sink_tiles) bool: whether each of the first tiles holds a valid key of rank < ``sink``.

    ``k_seg`` (batch, kv_len) integers, < 0 for padding keys (None: all valid); ``k_rank`` (batch, kv_len) integer
    ranks (None: the keys' absolute positions)."""
    device = (k_seg if k_seg is not None else k_rank).device
    for name, t in (("k_seg", k_seg), ("k_rank", k_rank)):
        if t is not None and (tuple(t.shape) != (batch, kv_len) or t.stride(1) != 1):
            raise ValueError(f"{name} must be (batch={batch}, kv_len={kv_len}) with unit column stride, got "
                             f"{tuple(t.shape)}")
    table = torch.empty(batch, n_k, 5, dtype=torch.int64, device=device)
    has_sink = torch.empty(batch, n_k, dtype=torch.int8, device=device) if sink_tiles is not None else None
    if table.numel():
        nb = max(1, 1024 // block)  # key tiles per program: (nb, block) keys in registers
        _key_tile_table_kernel[(triton.cdiv(n_k, nb), batch)](
            table if k_seg is None else k_seg, table if k_rank is None else k_rank, table,
            table if has_sink is None else has_sink,
            0 if k_seg is None else k_seg.stride(0), 0 if k_rank is None else k_rank.stride(0), *table.stride()[:2],
            0 if has_sink is None else has_sink.stride(0), n_k, kv_offset // block, kv_offset, kv_len, sink,
            BLOCK=block, NB=nb, HAS_SEG=k_seg is not None, HAS_RANK=k_rank is not None,
            WRITE_SINK=has_sink is not None,
        )
    return table, None if has_sink is None else has_sink.view(torch.bool)[:, :sink_tiles]


def _broadcast_strides(topk: torch.Tensor, n_b: int, n_h: int) -> tuple[int, int, int, int]:
    """Strides of the selected tiles (1 or n_b, 1 or n_h, n_q, k), 0 along a broadcast batch or head."""
    if topk.dim() != 4 or topk.shape[0] not in (1, n_b) or topk.shape[1] not in (1, n_h):
        raise ValueError(f"topk must be (1 or {n_b}, 1 or {n_h}, n_q, k), got {tuple(topk.shape)}")
    s_b, s_h, s_m, s_k = topk.stride()
    return (0 if topk.shape[0] == 1 else s_b), (0 if topk.shape[1] == 1 else s_h), s_m, s_k
