"""Block selection by estimated attention mass, on the GPU: pooled features, then scores, softmax and top-k fused.

The definition is ``hf_sparsek.selection.mass`` (PyTorch; this file must give the same tiles, ties aside):

* ``_pool_kernel`` writes per tile the features of the Quest bound: query tiles ``[relu(qbar), min(qbar, 0)]``
  (``qbar``: mean of the tile's real rows), key tiles ``[kmax, kmin]`` (over its real keys), so that
  ``scale * qfeat . kfeat = scale * sum_d max(qbar_d * kmax_d, qbar_d * kmin_d)`` is one dot product (float16
  on CUDA: the mantissa tf32 keeps, half the bytes; float32 in the interpreter);
* ``_select_kernel``: one program per (batch, KV head, ``BM`` query tiles), the rows being (query tile, query head of
  the group), whose features it loads once (up to ``HOIST_MAX_FEATURES``). Pass 1 streams over the causal key tiles
  for each row's log-sum-exp; pass 2 streams again, turns the scores into probabilities, averages them over the
  group's heads and keeps a running top-k per query tile of the tiles that compete (causal, real, not kept whole by
  sink / window), plus the mass of the static tiles for the threshold mode. The running top-k inserts a chunk's better
  tiles one by one (``topk_insert``) while the budget fits one chunk, and above that takes sorted merges
  (``topk_merge``: (mass, tile) packed into int64 keys, one bitonic merge per ``KP`` key tiles); ``uses_merge``
  decides.
  Nothing of size (query tiles x key tiles) is written; the tile list is written directly.

Selector "moment" (``hf_sparsek.selection.moment``; ``select_by_moment``) reuses the fused launch: its key tiles'
features are ``[mean, variance]`` (``_pool_kernel`` with ``MOMENTS``), its rows are (query head, sampled row) pairs
(``_sample_rows_kernel`` writes ``[q, c * q * q]`` per sampled row and which slots hold a real row), every logit adds
``log n`` of its key tile, and a query tile's mass is the mean over its real rows (``SAMPLES`` > 0).

No host synchronisation: every size comes from the shapes and the pattern. No transformers or hf_sparsek imports.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import sm_count

NEG: tl.constexpr = tl.constexpr(-1.0e30)  # "no candidate" score: finite, so that exp() of differences never makes NaN
FILLED: tl.constexpr = tl.constexpr(3.0)  # a top-k slot value above any tile mass (masses are <= 1)
ROWS_MIN = 16  # tl.dot needs >= 16 rows: query tiles of a program x padded group size
MASS_ROWS = (64, 32, 16)  # rows (query tiles x padded group) per _select_kernel program, widest first
MASS_MIN_PROGRAMS_PER_SM = 0.75  # the widest rows that still give this many programs per SM (else 16)
MASS_MAX_TOPK_SLOTS = 1024  # query tiles x padded top-k slots a program may keep (the 16-row program's at top-64)
POOL_ROWS = 16  # rows of a tile loaded per step by the pooling kernel (with POOL_WARPS: docs/kernel-decisions.md)
POOL_WARPS = 2
FEATURE_CHUNK = 64  # feature columns per dot product (bounds registers at head dim 256)
HOIST_MAX_FEATURES = 256  # up to this many, a program keeps its rows' features for both passes (head dim <= 128)


@triton.jit
def tile_rows(seg_ptr, t, r0, shift, length, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_SEG: tl.constexpr):
    """Storage rows ``r0 .. r0 + ROWS - 1`` of absolute-grid tile ``t`` (``shift`` grid rows before storage row 0)
    and which are real: stored, and not padding (``seg_ptr[row] < 0``). Shared by every tile-pooling kernel."""
    rows = t * BLOCK - shift + r0 + tl.arange(0, ROWS)
    ok = (rows >= 0) & (rows < length)
    if HAS_SEG:
        ok = ok & (tl.load(seg_ptr + rows, mask=ok, other=-1) >= 0)
    return rows, ok


@triton.jit
def load_rows(base, rows, ok, d, d_ok, s_l, s_d):
    """(ROWS, D_PAD) float32 of ``rows`` (zeros where not ``ok`` or past the head dim)."""
    return tl.load(base + rows.to(tl.int64)[:, None] * s_l + d[None, :] * s_d, mask=ok[:, None] & d_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _operand(x, F16: tl.constexpr):
    """A dot operand: float32 as loaded, or float16 (the same 10-bit mantissa as tf32, saturated at +-65504);
    features already stored as float16 pass through (the dtype test is resolved at compile time)."""
    if F16:
        if x.dtype != tl.float16:
            x = tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16)
    return x


@triton.jit
def _pool_tile(X, SEG, OUT, t, bh, s_xb, s_xh, s_xl, s_xd, s_sb, s_ob, s_oh, s_on, length, shift, seg_start, H, D,
               BLOCK: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr, IS_QUERY: tl.constexpr,
               HAS_SEG: tl.constexpr, HALF_OUT: tl.constexpr, MOMENTS: tl.constexpr = False):
    """The features of tile ``t`` of row ``bh`` (batch x head) of X: query ``[relu(mean), min(mean, 0)]``, key
    ``[max, min]`` (``MOMENTS``: ``[mean, variance]``) over the real rows, elementwise over the row steps and reduced
    over rows once at the end."""
    b = bh // H
    h = bh % H
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    total = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    hi = tl.full([ROWS, D_PAD], float("-inf"), tl.float32)
    if MOMENTS:
        hi = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    lo = tl.full([ROWS, D_PAD], float("inf"), tl.float32)
    count = tl.zeros([ROWS], dtype=tl.float32)
    base = X + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh
    for r0 in tl.static_range(0, BLOCK, ROWS):
        rows, ok = tile_rows(SEG + b.to(tl.int64) * s_sb + seg_start, t, r0, shift, length, BLOCK, ROWS, HAS_SEG)
        x = load_rows(base, rows, ok, d, d_ok, s_xl, s_xd)
        count += ok.to(tl.float32)
        if IS_QUERY or MOMENTS:
            total += x
            if MOMENTS:
                hi += x * x  # the sum of squares
        else:
            hi = tl.maximum(hi, tl.where(ok[:, None], x, float("-inf")))
            lo = tl.minimum(lo, tl.where(ok[:, None], x, float("inf")))
    n = tl.sum(count, 0)
    if MOMENTS:
        first = tl.sum(total, 0) / tl.maximum(n, 1.0)
        second = tl.maximum(tl.sum(hi, 0) / tl.maximum(n, 1.0) - first * first, 0.0)
    elif IS_QUERY:
        mean = tl.sum(total, 0) / tl.maximum(n, 1.0)
        first = tl.maximum(mean, 0.0)
        second = tl.minimum(mean, 0.0)
    else:
        first = tl.where(n > 0, tl.max(hi, 0), 0.0)
        second = tl.where(n > 0, tl.min(lo, 0), 0.0)
    out = OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + t.to(tl.int64) * s_on
    tl.store(out + d, _operand(tl.where(d_ok, first, 0.0), HALF_OUT))
    tl.store(out + D_PAD + d, _operand(tl.where(d_ok, second, 0.0), HALF_OUT))


@triton.jit
def _pool_kernel(
    X, SEG, OUT,
    s_xb, s_xh, s_xl, s_xd, s_sb, s_ob, s_oh, s_on,
    length, shift, seg_start, H, D,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr, IS_QUERY: tl.constexpr, HAS_SEG: tl.constexpr,
    HALF_OUT: tl.constexpr, MOMENTS: tl.constexpr,
):
    _pool_tile(X, SEG, OUT, tl.program_id(0), tl.program_id(1), s_xb, s_xh, s_xl, s_xd, s_sb, s_ob, s_oh, s_on,
               length, shift, seg_start, H, D, BLOCK, ROWS, D_PAD, IS_QUERY, HAS_SEG, HALF_OUT, MOMENTS)


@triton.jit
def _pool_pair_kernel(
    Q, QSEG, QOUT, K, KSEG, KOUT,
    s_qb, s_qh, s_ql, s_qd, s_qsb, s_qob, s_qoh, s_qon,
    s_kb, s_kh, s_kl, s_kd, s_ksb, s_kob, s_koh, s_kon,
    q_len, q_shift, q_seg_start, n_q, HQ, k_len, k_shift, n_k, HK, q_rows, D,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr, HAS_QSEG: tl.constexpr, HAS_KSEG: tl.constexpr,
    HALF_OUT: tl.constexpr,
):
    """Query and key tiles' features in one launch (one launch less per call: host time): program rows
    ``0 .. q_rows - 1`` pool the queries (batch x query heads), the others the keys."""
    t = tl.program_id(0)
    r = tl.program_id(1)
    if r < q_rows:
        if t < n_q:
            _pool_tile(Q, QSEG, QOUT, t, r, s_qb, s_qh, s_ql, s_qd, s_qsb, s_qob, s_qoh, s_qon, q_len, q_shift,
                       q_seg_start, HQ, D, BLOCK, ROWS, D_PAD, True, HAS_QSEG, HALF_OUT)
    else:
        if t < n_k:
            _pool_tile(K, KSEG, KOUT, t, r - q_rows, s_kb, s_kh, s_kl, s_kd, s_ksb, s_kob, s_koh, s_kon, k_len,
                       k_shift, 0, HK, D, BLOCK, ROWS, D_PAD, False, HAS_KSEG, HALF_OUT)


@triton.jit
def _sample_rows_kernel(
    Q, SEG, QF, ROW_OK,
    s_qb, s_qh, s_ql, s_qd, s_sb, s_fb, s_fh, s_fm, s_rb, s_rm,
    q_len, q_offset, seg_start, qb0, H, D, coef,
    BLOCK: tl.constexpr, STRIDE: tl.constexpr, SAMPLES: tl.constexpr, D_PAD: tl.constexpr, HAS_SEG: tl.constexpr,
    HALF_OUT: tl.constexpr,
):
    """Selector "moment"'s query side: per (query tile, batch x head), its ``SAMPLES`` sampled rows' features
    ``[q, coef * q * q]`` into rows ``h * SAMPLES + j`` of QF, and (head 0) which slots hold a real row. Slot ``j``
    covers absolute positions ``[base + j STRIDE, base + (j + 1) STRIDE)``; it holds its last position when that is a
    query of the call, else the call's last row when that falls inside it (the rows of ``select_moment``)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    j = tl.arange(0, SAMPLES)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q_end = q_offset + q_len
    grid_pos = (qb0 + t) * BLOCK + j * STRIDE + STRIDE - 1
    pos = tl.minimum(grid_pos, q_end - 1)
    ok = (grid_pos - STRIDE + 1 <= q_end - 1) & (pos >= q_offset)
    row = pos - q_offset
    if HAS_SEG:
        ok = ok & (tl.load(SEG + b.to(tl.int64) * s_sb + seg_start + row, mask=ok, other=-1) >= 0)
    x = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + row.to(tl.int64)[:, None] * s_ql
                + d[None, :] * s_qd, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    out = (QF + b.to(tl.int64) * s_fb + (h * SAMPLES + j).to(tl.int64)[:, None] * s_fh + t.to(tl.int64) * s_fm
           + d[None, :])
    tl.store(out, _operand(x, HALF_OUT))
    tl.store(out + D_PAD, _operand(coef * x * x, HALF_OUT))
    if h == 0:
        tl.store(ROW_OK + b.to(tl.int64) * s_rb + t.to(tl.int64) * s_rm + j, ok.to(tl.int8))


@triton.jit
def _scores(qf_ptr, qf_all, kf_ptr, n, n_ok, rows_ok, s_kn,
            ROWS: tl.constexpr, CN: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, HOIST: tl.constexpr,
            F16: tl.constexpr):
    """(ROWS, CN) dot products of the rows' features with the features of key tiles ``n``: with ``HOIST`` the rows'
    features ``qf_all`` (ROWS, F) loaded once per program, else loaded here FC columns at a time."""
    if HOIST:
        f = tl.arange(0, F)
        kf = tl.load(kf_ptr + n.to(tl.int64)[:, None] * s_kn + f[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot(qf_all, tl.trans(_operand(kf, F16)))
    else:
        acc = tl.zeros([ROWS, CN], dtype=tl.float32)
        for f0 in tl.static_range(0, F, FC):
            f = f0 + tl.arange(0, FC)
            qf = tl.load(qf_ptr + f[None, :], mask=rows_ok[:, None], other=0.0)
            kf = tl.load(kf_ptr + n.to(tl.int64)[:, None] * s_kn + f[None, :], mask=n_ok[:, None], other=0.0)
            acc += tl.dot(_operand(qf, F16), tl.trans(_operand(kf, F16)))
    return acc


@triton.jit
def key_tiles(c_ptr, s_ptr, n, n_ok, kb0, kv_offset, kv_end, sink, BLOCK: tl.constexpr, HAS_TILE_INFO: tl.constexpr):
    """Real keys per key tile ``n`` and whether all are sink tokens: read (padding) or from positions (none)."""
    if HAS_TILE_INFO:
        cnt = tl.load(c_ptr + n, mask=n_ok, other=0)
        sink_only = tl.load(s_ptr + n, mask=n_ok, other=0) != 0
    else:  # without padding a key's rank is its absolute position
        lo = tl.maximum((kb0 + n) * BLOCK, kv_offset)
        hi = tl.minimum((kb0 + n + 1) * BLOCK, kv_end)
        cnt = tl.where(n_ok, tl.maximum(hi - lo, 0), 0)
        sink_only = (cnt > 0) & (hi - 1 < sink)
    return cnt, sink_only


@triton.jit
def topk_insert(best_v, best_i, cv, n0, cn, kk):
    """Running top-k per row (BM, KP) updated with one chunk's competing masses ``cv`` (BM, CN; -1 = not competing)
    of key tiles ``n0 + cn``. Unsorted slots: -1 = empty, FILLED = past TOPK (never replaced)."""
    kth = tl.min(best_v, 1)
    # insert the chunk's best tile in place of the smallest kept one while some row has a better tile; the
    # number of insertions over a whole row is about k * log(key tiles / k), far fewer than k per chunk
    while tl.max((tl.max(cv, 1) > kth).to(tl.int32), 0) > 0:
        mc = tl.max(cv, 1)
        ac = tl.argmax(cv, 1)
        slot = tl.argmin(best_v, 1)
        put = (mc > kth)[:, None] & (kk[None, :] == slot[:, None])  # strict: an equal tile keeps the earlier
        best_v = tl.where(put, mc[:, None], best_v)
        best_i = tl.where(put, (n0 + ac)[:, None], best_i)
        cv = tl.where(cn[None, :] == ac[:, None], -1.0, cv)  # rows that did not insert had nothing above kth
        kth = tl.min(best_v, 1)
    return best_v, best_i


TILE_BIAS: tl.constexpr = tl.constexpr(1 << 30)  # a sort key's low half: TILE_BIAS - tile (tiles -1 .. 2**30 - 1)


@triton.jit
def desc_key(v, tile):
    """int64 sort keys of float32 values ``v`` at int32 tiles ``tile``: in descending key order the larger value
    comes first and, among equal values, the lower tile (the float's bits made monotone, the tile below them)."""
    bits = (v + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes +0.0, equal values compare equal
    mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (mono.to(tl.int64) << 32) | (TILE_BIAS + tile.to(tl.int64) * -1)


@triton.jit
def key_value(key):
    """The float32 value of :func:`desc_key` keys."""
    mono = (key >> 32).to(tl.int32)
    return tl.where(mono < 0, mono ^ 0x7FFFFFFF, mono).to(tl.float32, bitcast=True)


@triton.jit
def key_tile(key):
    """The int32 tile of :func:`desc_key` keys."""
    return ((key & 0x7FFFFFFF) * -1 + TILE_BIAS).to(tl.int32)


@triton.jit
def stage(staged, chunk, j, BM: tl.constexpr, KP: tl.constexpr, CN: tl.constexpr):
    """``staged`` (BM, KP) with columns ``j * CN .. j * CN + CN - 1`` replaced by ``chunk`` (BM, CN)."""
    if KP == CN:
        out = chunk
    else:
        r = tl.arange(0, KP // CN)
        parts = tl.where(r[None, :, None] == j, chunk[:, None, :], tl.reshape(staged, [BM, KP // CN, CN]))
        out = tl.reshape(parts, [BM, KP])
    return out


@triton.jit
def _axis_bit(R: tl.constexpr, AX: tl.constexpr):
    """int32 ``[0, 1]`` on axis ``AX`` of a rank-``R`` shape (size 1 elsewhere)."""
    y = tl.arange(0, 2)
    for n in tl.static_range(R):
        if n != AX:
            y = tl.expand_dims(y, n)
    return y


@triton.jit
def _swap(h, AX: tl.constexpr, desc, R: tl.constexpr):
    """Compare-and-swap of the pairs along axis ``AX`` (size 2) of ``h``: the smaller first where ``desc`` is 0,
    the larger first where it is 1 (min / max over the pair: no gather, and cheap in the interpreter too)."""
    lo = tl.min(h, axis=AX, keep_dims=True)
    hi = tl.max(h, axis=AX, keep_dims=True)
    return tl.where((_axis_bit(R, AX) ^ desc) != 0, hi, lo)


@triton.jit
def _sort_ascending(x, BM: tl.constexpr, KP: tl.constexpr, LOG: tl.constexpr):
    """(BM, KP = 2**LOG) sorted ascending per row: a bitonic network on the row as a hypercube, axis ``1 + j``
    holding bit ``LOG - 1 - j`` of the position."""
    h = tl.reshape(x, [BM] + [2] * LOG)
    for s in tl.static_range(1, LOG + 1):  # sorted runs of 2**s, ascending where bit s of the position is 0
        if s < LOG:
            desc = _axis_bit(LOG + 1, LOG - s)
        else:
            desc = 0
        for j in tl.static_range(s):
            h = _swap(h, LOG - (s - 1 - j), desc, LOG + 1)
    return tl.reshape(h, [BM, KP])


@triton.jit
def topk_merge(best, chunk, BM: tl.constexpr, KP: tl.constexpr, LOG: tl.constexpr):
    """The ``KP`` largest keys per row of ``best`` (sorted descending) and ``chunk`` (any order), sorted descending:
    ``chunk`` sorted ascending, so that ``best`` then ``chunk`` is bitonic; the elementwise max holds the ``KP``
    largest (a bitonic half-cleaner) and ``LOG`` compare-and-swap steps sort it. A running top-k that takes a whole
    chunk in one network, where an insertion takes one serial pass over the kept slots per new tile."""
    kth = tl.min(best, 1)
    if tl.max((tl.max(chunk, 1) > kth).to(tl.int32), 0) > 0:  # some row gains a tile
        top = tl.maximum(best, _sort_ascending(chunk, BM, KP, LOG))
        h = tl.reshape(top, [BM] + [2] * LOG)
        for j in tl.static_range(LOG):
            h = _swap(h, 1 + j, 1, LOG + 1)
        best = tl.reshape(h, [BM, KP])
    return best


@triton.jit
def fill_from_keys(keys, past, BM: tl.constexpr, W: tl.constexpr, W_LOG: tl.constexpr, KP: tl.constexpr,
                   TOPK: tl.constexpr):
    """The insertion path's first step: slots (values, tiles) (BM, KP <= W) holding the ``TOPK`` largest of the
    first chunk's :func:`desc_key` keys (BM, W) (larger value, then lower tile), in the last ``TOPK`` slots,
    ``past`` (never replaced) in the others. One sort where inserting would take up to ``TOPK`` serial passes
    (H100, 16K: the learned kernel 0.097 -> 0.079 ms; sorting 64 or 128 tiles first was slower, 0.085 / 0.094)."""
    keys = _sort_ascending(keys, BM, W, W_LOG)
    if KP < W:  # the KP largest: the last group of KP in ascending order
        g = tl.arange(0, W // KP)
        keys = tl.sum(tl.where(g[None, :, None] == W // KP - 1, tl.reshape(keys, [BM, W // KP, KP]), 0), 1)
    live = tl.arange(0, KP)[None, :] >= KP - TOPK
    return tl.where(live, key_value(keys), past), tl.where(live, key_tile(keys), -1)


@triton.jit
def sorted_result(best, static_mass, threshold, KP: tl.constexpr, TOPK: tl.constexpr, HAS_THRESHOLD: tl.constexpr):
    """(BM, KP) int32 tile list from :func:`topk_merge`'s sorted keys of tile masses: the first ``TOPK`` competing
    tiles (mass >= 0), cut by the threshold's cumulative mass (static tiles' mass first) when HAS_THRESHOLD; -1 =
    none."""
    kk = tl.arange(0, KP)
    v = key_value(best)
    keep = (v >= 0) & (kk[None, :] < TOPK)
    if HAS_THRESHOLD:
        v = tl.where(keep, v, 0.0)
        before = static_mass[:, None] + tl.cumsum(v, 1) - v
        keep = keep & (before < threshold)
    return tl.where(keep, key_tile(best), -1)


@triton.jit
def topk_result(best_v, best_i, static_mass, threshold, BM: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr,
                HAS_THRESHOLD: tl.constexpr):
    """(BM, KP) int32 tile list: the kept tiles sorted by mass, descending (ties: lower slot first), cut by the
    threshold's cumulative mass (static tiles' mass first) when HAS_THRESHOLD; -1 = none."""
    kk = tl.arange(0, KP)
    best_v = tl.where(best_v < FILLED, best_v, -2.0)
    out_v = tl.full([BM, KP], -1.0, tl.float32)
    out_i = tl.full([BM, KP], -1, tl.int32)
    for t in range(TOPK):
        top = tl.argmax(best_v, 1)
        here = kk[None, :] == top[:, None]
        out_v = tl.where(kk[None, :] == t, tl.max(best_v, 1)[:, None], out_v)
        out_i = tl.where(kk[None, :] == t, tl.sum(tl.where(here, best_i, 0), 1)[:, None], out_i)
        best_v = tl.where(here, -2.0, best_v)
    keep = out_v >= 0
    if HAS_THRESHOLD:
        v = tl.maximum(out_v, 0.0)
        before = static_mass[:, None] + tl.cumsum(v, 1) - v
        keep = keep & (before < threshold)
    return tl.where(keep, out_i, -1)


@triton.jit
def competition(m_ok, qb, q_last, n, cnt, sink_only, kb0, kv_offset, window, BLOCK: tl.constexpr,
                HAS_WINDOW: tl.constexpr):
    """(BM, CN) masks for query tiles ``qb`` x key tiles ``kb0 + n``: ``cand`` (causal, the key tile holds a real
    key) and ``static`` (a candidate the sink or the window keeps whole: it does not compete for the budget)."""
    cand = m_ok[:, None] & ((kb0 + n)[None, :] <= qb[:, None]) & (cnt > 0)[None, :]
    static = sink_only[None, :] & cand
    if HAS_WINDOW:
        k_first = tl.maximum((kb0 + n) * BLOCK, kv_offset)
        static = static | (cand & ((q_last[:, None] - k_first[None, :]) < window))
    return cand, static


@triton.jit
def sampled_rows_ok(ROW_OK, s_rb, s_rm, b, m_r, h_r, rows_ok, SAMPLES: tl.constexpr):
    """Selector "moment": a row (query tile ``m_r``, group row ``h_r`` = head x ``SAMPLES`` + slot) counts only
    where its slot holds a real sampled query row (``ROW_OK`` (B, n_q, SAMPLES) int8); others (``SAMPLES`` 0) pass."""
    if SAMPLES > 0:
        slot_ok = tl.load(ROW_OK + b.to(tl.int64) * s_rb + m_r.to(tl.int64) * s_rm + h_r % SAMPLES, mask=rows_ok,
                          other=0)
        rows_ok = rows_ok & (slot_ok != 0)
    return rows_ok


@triton.jit
def group_denominator(rows_ok, BM: tl.constexpr, HG_P: tl.constexpr, GROUP: tl.constexpr, SAMPLES: tl.constexpr):
    """(BM,) what a query tile's group-summed probabilities are divided by: the group's heads (mass), or its real
    (head, sampled row) rows (moment; at least 1)."""
    if SAMPLES > 0:
        return tl.maximum(tl.sum(tl.reshape(rows_ok.to(tl.float32), [BM, HG_P]), 1), 1.0)
    else:
        return tl.full([BM], GROUP, tl.float32)


@triton.jit
def log_count(s, cnt, LOG_COUNT: tl.constexpr):
    """Selector "moment"'s estimated logits add ``log n`` (n real keys of the key tile, at least 1)."""
    if LOG_COUNT:
        s = s + tl.log(tl.maximum(cnt, 1).to(tl.float32))[None, :]
    return s


@triton.jit
def group_rows(QF, KF, s_qb, s_qh, s_qm, s_kb, s_kh, b, g, m0, n_q, ROWS: tl.constexpr, GROUP: tl.constexpr,
               HG_P: tl.constexpr, ROW_OK=None, s_rb=0, s_rm=0, SAMPLES: tl.constexpr = 0):
    """The (query tile, head of the KV group) rows of a program from query tile ``m0``: their tile numbers, which
    are real, their query feature pointers (ROWS, 1) and the KV head's key feature base. With ``SAMPLES`` (selector
    "moment") a group row is (head, sampled row) and counts only where the slot holds a real row."""
    r = tl.arange(0, ROWS)
    m_r = m0 + r // HG_P
    h_r = r % HG_P
    rows_ok = (h_r < GROUP) & (m_r < n_q)
    rows_ok = sampled_rows_ok(ROW_OK, s_rb, s_rm, b, m_r, h_r, rows_ok, SAMPLES)
    qf_ptr = (QF + b.to(tl.int64) * s_qb + (g * GROUP + h_r).to(tl.int64)[:, None] * s_qh
              + m_r.to(tl.int64)[:, None] * s_qm)
    kf_ptr = KF + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    return m_r, rows_ok, qf_ptr, kf_ptr


@triton.jit
def _chunk_mass(qf_ptr, qf_all, kf_ptr, c_ptr, s_ptr, n, n_k, rows_ok, qb_r, lse, m_ok, qb, q_last, kb0, kv_offset,
                kv_end, sink, window, scale, s_kn, denom, ROWS: tl.constexpr, BM: tl.constexpr, HG_P: tl.constexpr,
                CN: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BLOCK: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_TILE_INFO: tl.constexpr, HOIST: tl.constexpr, F16: tl.constexpr,
                LOG_COUNT: tl.constexpr):
    """Pass 2 on key tiles ``n``: the group-mean probability mass (BM, CN) of each query tile on each (the rows'
    sum over ``denom``), and the ``cand`` / ``static`` masks of :func:`competition`."""
    n_ok = n < n_k
    cnt, sink_only = key_tiles(c_ptr, s_ptr, n, n_ok, kb0, kv_offset, kv_end, sink, BLOCK, HAS_TILE_INFO)
    s = log_count(_scores(qf_ptr, qf_all, kf_ptr, n, n_ok, rows_ok, s_kn, ROWS, CN, F, FC, HOIST, F16) * scale, cnt,
                  LOG_COUNT)
    cand_r = rows_ok[:, None] & ((kb0 + n)[None, :] <= qb_r[:, None]) & (cnt > 0)[None, :]
    p = tl.where(cand_r, tl.exp(s - lse[:, None]), 0.0)
    mass = tl.sum(tl.reshape(p, [BM, HG_P, CN]), 1) / denom[:, None]
    cand, static = competition(m_ok, qb, q_last, n, cnt, sink_only, kb0, kv_offset, window, BLOCK, HAS_WINDOW)
    return mass, cand, static


@triton.jit
def _select_kernel(
    QF, KF, CNT, SINK_ONLY, OUT, ROW_OK,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_cb, s_ob, s_oh, s_om, s_rb, s_rm,
    n_q, n_k, qb0, kb0, q_end, kv_offset, kv_end, sink, window, scale, threshold,
    HKV: tl.constexpr, GROUP: tl.constexpr, HG_P: tl.constexpr, BM: tl.constexpr, CN: tl.constexpr,
    F: tl.constexpr, FC: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, KP_LOG: tl.constexpr,
    CN_LOG: tl.constexpr, MERGE: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, HAS_TILE_INFO: tl.constexpr, HOIST: tl.constexpr, F16: tl.constexpr,
    SAMPLES: tl.constexpr, LOG_COUNT: tl.constexpr,
):
    ROWS: tl.constexpr = BM * HG_P
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    g = pid_bh % HKV
    m_r, rows_ok, qf_ptr, kf_ptr = group_rows(QF, KF, s_qb, s_qh, s_qm, s_kb, s_kh, b, g, pid_m * BM, n_q, ROWS,
                                              GROUP, HG_P, ROW_OK, s_rb, s_rm, SAMPLES)
    denom = group_denominator(rows_ok, BM, HG_P, GROUP, SAMPLES)
    qb_r = qb0 + m_r
    c_ptr = CNT + b.to(tl.int64) * s_cb
    s_ptr = SINK_ONLY + b.to(tl.int64) * s_cb
    m_last = tl.minimum(pid_m * BM + BM - 1, n_q - 1)
    n_hi = tl.minimum(n_k, qb0 + m_last - kb0 + 1)  # key tiles past the program's last query tile are not causal
    cn = tl.arange(0, CN)
    qf_all = 0.0
    if HOIST:  # the rows' features, loaded once for both passes
        qf_all = _operand(tl.load(qf_ptr + tl.arange(0, F)[None, :], mask=rows_ok[:, None], other=0.0), F16)

    # pass 1: per row (query tile, head), the log-sum-exp of the estimated logits over its candidate tiles
    m_i = tl.full([ROWS], NEG, tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for n0 in range(0, n_hi, CN):
        n = n0 + cn
        n_ok = n < n_k
        cnt, _ = key_tiles(c_ptr, s_ptr, n, n_ok, kb0, kv_offset, kv_end, sink, BLOCK, HAS_TILE_INFO)
        s = log_count(_scores(qf_ptr, qf_all, kf_ptr, n, n_ok, rows_ok, s_kn, ROWS, CN, F, FC, HOIST, F16) * scale,
                      cnt, LOG_COUNT)
        cand = rows_ok[:, None] & ((kb0 + n)[None, :] <= qb_r[:, None]) & (cnt > 0)[None, :]
        s = tl.where(cand, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(cand, tl.exp(s - m_new[:, None]), 0.0), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), 0.0)

    # pass 2: group-mean probabilities per (query tile, key tile), running top-k of the competing tiles
    mi = tl.arange(0, BM)
    m = pid_m * BM + mi
    m_ok = m < n_q
    qb = qb0 + m
    q_last = tl.minimum((qb + 1) * BLOCK - 1, q_end - 1)
    kk = tl.arange(0, KP)
    static_mass = tl.zeros([BM], dtype=tl.float32)
    if MERGE:  # large budgets: KP (>= TOPK) sorted keys of (mass, tile), KP key tiles staged per merge
        best = desc_key(tl.full([BM, KP], -1.0, tl.float32), tl.full([BM, KP], -1, tl.int32))
        empty = best
        for n00 in range(0, n_hi, KP):
            staged = empty
            for j in tl.static_range(KP // CN):
                n0 = n00 + j * CN
                n = n0 + cn
                mass, cand, static = _chunk_mass(qf_ptr, qf_all, kf_ptr, c_ptr, s_ptr, n, n_k, rows_ok, qb_r, lse,
                                                 m_ok, qb, q_last, kb0, kv_offset, kv_end, sink, window, scale,
                                                 s_kn, denom, ROWS, BM, HG_P, CN, F, FC, BLOCK, HAS_WINDOW,
                                                 HAS_TILE_INFO, HOIST, F16, LOG_COUNT)
                static_mass += tl.sum(tl.where(static, mass, 0.0), 1)
                chunk = desc_key(tl.where(cand & ~static, mass, -1.0), tl.broadcast_to(n[None, :], [BM, CN]))
                staged = stage(staged, chunk, j, BM, KP, CN)
            best = topk_merge(best, staged, BM, KP, KP_LOG)
        out = sorted_result(best, static_mass, threshold, KP, TOPK, HAS_THRESHOLD)
    else:  # budgets within a chunk: a running top-k, unsorted (-1 = empty, FILLED = a slot past TOPK), filled
        # from the first chunk by one sort, then insertions
        mass, cand, static = _chunk_mass(qf_ptr, qf_all, kf_ptr, c_ptr, s_ptr, cn, n_k, rows_ok, qb_r, lse, m_ok, qb,
                                         q_last, kb0, kv_offset, kv_end, sink, window, scale, s_kn, denom, ROWS, BM,
                                         HG_P, CN, F, FC, BLOCK, HAS_WINDOW, HAS_TILE_INFO, HOIST, F16, LOG_COUNT)
        static_mass += tl.sum(tl.where(static, mass, 0.0), 1)
        first = desc_key(tl.where(cand & ~static, mass, -1.0), tl.broadcast_to(cn[None, :], [BM, CN]))
        best_v, best_i = fill_from_keys(first, FILLED, BM, CN, CN_LOG, KP, TOPK)
        for n0 in range(CN, n_hi, CN):
            n = n0 + cn
            mass, cand, static = _chunk_mass(qf_ptr, qf_all, kf_ptr, c_ptr, s_ptr, n, n_k, rows_ok, qb_r, lse, m_ok,
                                             qb, q_last, kb0, kv_offset, kv_end, sink, window, scale, s_kn, denom,
                                             ROWS, BM, HG_P, CN, F, FC, BLOCK, HAS_WINDOW, HAS_TILE_INFO, HOIST, F16,
                                             LOG_COUNT)
            static_mass += tl.sum(tl.where(static, mass, 0.0), 1)
            best_v, best_i = topk_insert(best_v, best_i, tl.where(cand & ~static, mass, -1.0), n0, cn, kk)
        out = topk_result(best_v, best_i, static_mass, threshold, BM, KP, TOPK, HAS_THRESHOLD)
    ptr = OUT + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_oh + m.to(tl.int64)[:, None] * s_om + kk[None, :]
    tl.store(ptr, out, mask=m_ok[:, None] & (kk[None, :] < TOPK))


@triton.jit
def _short_logits_kernel(
    QF, KF, CNT, SINK_ONLY, LOGITS, PM, PL, ROW_OK, QOFF,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_cb, s_rb, s_rm,
    n_q, n_k, n_k_pad, n_chunks, qb0, kb0, kv_offset, kv_end, sink, scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, HG_P: tl.constexpr, BM: tl.constexpr, CN: tl.constexpr,
    F: tl.constexpr, FC: tl.constexpr, BLOCK: tl.constexpr, HAS_TILE_INFO: tl.constexpr, F16: tl.constexpr,
    SAMPLES: tl.constexpr, LOG_COUNT: tl.constexpr, OFFSET_ON_DEVICE: tl.constexpr,
):
    """Few query tiles (decode), stage 1: one program per (chunk of CN key tiles, batch x KV head) writes the
    estimated logits of every (query tile, head) row on its tiles and the chunk's max / sum of exp per row.
    ``OFFSET_ON_DEVICE``: the queries' position is read from ``QOFF`` (a static cache under torch.compile)."""
    ROWS: tl.constexpr = BM * HG_P
    if OFFSET_ON_DEVICE:
        qb0 = tl.load(QOFF).to(tl.int32) // BLOCK
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    g = pid_bh % HKV
    m_r, rows_ok, qf_ptr, kf_ptr = group_rows(QF, KF, s_qb, s_qh, s_qm, s_kb, s_kh, b, g, 0, n_q, ROWS, GROUP, HG_P,
                                              ROW_OK, s_rb, s_rm, SAMPLES)
    n = c * CN + tl.arange(0, CN)
    n_ok = n < n_k
    cnt, _ = key_tiles(CNT + b.to(tl.int64) * s_cb, SINK_ONLY + b.to(tl.int64) * s_cb, n, n_ok, kb0, kv_offset,
                       kv_end, sink, BLOCK, HAS_TILE_INFO)
    s = log_count(_scores(qf_ptr, 0.0, kf_ptr, n, n_ok, rows_ok, s_kn, ROWS, CN, F, FC, False, F16) * scale, cnt,
                  LOG_COUNT)
    cand = rows_ok[:, None] & ((kb0 + n)[None, :] <= (qb0 + m_r)[:, None]) & (cnt > 0)[None, :]
    s = tl.where(cand, s, NEG)
    m_c = tl.max(s, 1)
    l_c = tl.sum(tl.where(cand, tl.exp(s - m_c[:, None]), 0.0), 1)
    row = pid_bh.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    tl.store(LOGITS + row[:, None] * n_k_pad + n[None, :], s)
    tl.store(PM + row * n_chunks + c, m_c)
    tl.store(PL + row * n_chunks + c, l_c)


@triton.jit
def _short_mass_kernel(
    CNT, SINK_ONLY, LOGITS, PM, PL, MASS, STATIC, ROW_OK, QOFF,
    s_cb, s_rb, s_rm, n_q, n_k, n_k_pad, n_chunks, qb0, kb0, q_end, kv_offset, kv_end, sink, window,
    HKV: tl.constexpr, GROUP: tl.constexpr, HG_P: tl.constexpr, BM: tl.constexpr, CN: tl.constexpr,
    CB: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TILE_INFO: tl.constexpr,
    SAMPLES: tl.constexpr, OFFSET_ON_DEVICE: tl.constexpr,
):
    """Few query tiles, stage 2: per (chunk, batch x KV head), each row's log-sum-exp from every chunk's max / sum,
    then the group-mean mass of the chunk's tiles: competing tiles' mass (-1 for the others) and the static tiles'
    summed mass per query tile. ``OFFSET_ON_DEVICE``: the position from ``QOFF``, ``q_end`` then the query count."""
    ROWS: tl.constexpr = BM * HG_P
    if OFFSET_ON_DEVICE:
        q_off = tl.load(QOFF).to(tl.int32)
        qb0 = q_off // BLOCK
        q_end = q_off + q_end
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    r = tl.arange(0, ROWS)
    row = pid_bh.to(tl.int64) * ROWS + r
    m_i = tl.full([ROWS], NEG, tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for c0 in range(0, n_chunks, CB):
        cc = c0 + tl.arange(0, CB)
        ok = cc < n_chunks
        pm = tl.load(PM + row[:, None] * n_chunks + cc[None, :], mask=ok[None, :], other=NEG)
        pl = tl.load(PL + row[:, None] * n_chunks + cc[None, :], mask=ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, tl.max(pm, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(pl * tl.exp(pm - m_new[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), 0.0)
    n = c * CN + tl.arange(0, CN)
    n_ok = n < n_k
    s = tl.load(LOGITS + row[:, None] * n_k_pad + n[None, :])
    p = tl.where(s > NEG, tl.exp(s - lse[:, None]), 0.0)  # non-candidates were written as NEG
    rows_ok = ((r % HG_P) < GROUP) & ((r // HG_P) < n_q)
    rows_ok = sampled_rows_ok(ROW_OK, s_rb, s_rm, b, r // HG_P, r % HG_P, rows_ok, SAMPLES)
    mass = tl.sum(tl.reshape(p, [BM, HG_P, CN]), 1) / group_denominator(rows_ok, BM, HG_P, GROUP, SAMPLES)[:, None]
    cnt, sink_only = key_tiles(CNT + b.to(tl.int64) * s_cb, SINK_ONLY + b.to(tl.int64) * s_cb, n, n_ok, kb0,
                               kv_offset, kv_end, sink, BLOCK, HAS_TILE_INFO)
    m = tl.arange(0, BM)
    qb = qb0 + m
    q_last = tl.minimum((qb + 1) * BLOCK - 1, q_end - 1)
    cand, static = competition(m < n_q, qb, q_last, n, cnt, sink_only, kb0, kv_offset, window, BLOCK, HAS_WINDOW)
    out = pid_bh.to(tl.int64) * BM + m
    tl.store(MASS + out[:, None] * n_k_pad + n[None, :], tl.where(cand & ~static, mass, -1.0))
    tl.store(STATIC + out * n_chunks + c, tl.sum(tl.where(static, mass, 0.0), 1))


SHORT_QUERY_TILES = 2  # at most this many query tiles (decode, q_len <= 16): the split path over key tiles
SHORT_MIN_KEY_TILES = 256  # below this one program per (batch, KV head) reads all key tiles quickly enough


def _select_short(qf, kf, count, sink_flag, has_info, *, half, batch, hkv, group, n_q, n_k, q_offset, q_len, kv_offset,
                  kv_len, block, sink, topk, window, threshold, scale, row_ok=None, samples=0) -> torch.Tensor:
    """Few query tiles: selection spread over key tiles (two launches and a ``torch.topk``), instead of one program
    per (batch, KV head) streaming every key tile with a serial running top-k. ``q_offset`` may be a one-element
    integer tensor on the device (then ``n_q`` is the most tiles the queries can span): the kernels read it."""
    hg_p = _next_pow2(group)
    bm = max(_next_pow2(n_q), ROWS_MIN // hg_p)
    rows = bm * hg_p
    feats = qf.shape[-1]
    cn = 16 if feats > 256 else 32
    n_chunks = triton.cdiv(n_k, cn)
    n_k_pad = n_chunks * cn
    dev = qf.device
    logits = torch.empty(batch * hkv, rows, n_k_pad, device=dev, dtype=torch.float32)
    pm = torch.empty(batch * hkv, rows, n_chunks, device=dev, dtype=torch.float32)
    pl = torch.empty_like(pm)
    on_device = isinstance(q_offset, torch.Tensor)
    qoff = q_offset if on_device else logits  # an unread placeholder when the position is an int
    qb0, q_end = (0, q_len) if on_device else (q_offset // block, q_offset + q_len)
    kb0 = kv_offset // block
    s_cb = count.stride(0) if has_info else 0
    rows_arg = row_ok if row_ok is not None else logits
    s_rb, s_rm = (row_ok.stride(0), row_ok.stride(1)) if row_ok is not None else (0, 0)
    _short_logits_kernel[(n_chunks, batch * hkv)](
        qf, kf, count, sink_flag, logits, pm, pl, rows_arg, qoff, *qf.stride()[:3], *kf.stride()[:3], s_cb, s_rb,
        s_rm, n_q, n_k, n_k_pad, n_chunks, qb0, kb0, kv_offset, kv_offset + kv_len, sink, scale,
        HKV=hkv, GROUP=group, HG_P=hg_p, BM=bm, CN=cn, F=feats, FC=min(FEATURE_CHUNK, feats), BLOCK=block,
        HAS_TILE_INFO=has_info, F16=half, SAMPLES=samples, LOG_COUNT=samples > 0, OFFSET_ON_DEVICE=on_device,
    )
    mass = torch.empty(batch * hkv, bm, n_k_pad, device=dev, dtype=torch.float32)
    static = torch.empty(batch * hkv, bm, n_chunks, device=dev, dtype=torch.float32)
    _short_mass_kernel[(n_chunks, batch * hkv)](
        count, sink_flag, logits, pm, pl, mass, static, rows_arg, qoff, s_cb, s_rb, s_rm, n_q, n_k, n_k_pad,
        n_chunks, qb0, kb0, q_end, kv_offset, kv_offset + kv_len, sink, window or 0,
        HKV=hkv, GROUP=group, HG_P=hg_p, BM=bm, CN=cn, CB=min(64, _next_pow2(n_chunks)), BLOCK=block,
        HAS_WINDOW=window is not None, HAS_TILE_INFO=has_info, SAMPLES=samples, OFFSET_ON_DEVICE=on_device,
    )
    mass = mass.view(batch, hkv, bm, n_k_pad)[:, :, :n_q, :n_k]
    width = min(topk, n_k)
    values, tiles = torch.topk(mass, width, dim=-1)
    keep = values >= 0
    if threshold is not None:  # as hf_sparsek.selection.tiles.choose_tiles
        kept = values.clamp(min=0)
        before = static.view(batch, hkv, bm, n_chunks)[:, :, :n_q].sum(-1, keepdim=True) + kept.cumsum(-1) - kept
        keep = keep & (before < threshold)
    out = torch.where(keep, tiles, -1).to(torch.int32)
    if width < topk:
        out = torch.nn.functional.pad(out, (0, topk - width), value=-1)
    return out


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _chunk_tiles(feats: int) -> int:
    """Key tiles scored per step by ``_select_kernel`` (fewer at wide features to bound registers)."""
    return 16 if feats > 256 else 32


def uses_merge(topk: int, chunk: int) -> bool:
    """Whether a running top-k of ``topk`` over steps of ``chunk`` key tiles takes sorted merges (``topk_merge``)
    rather than insertions (``topk_insert``): merges where the budget outgrows one chunk. Insertion costs one serial
    pass per tile that enters, about k log(n / k) of them; a merge one sorting network per chunk. Measured on the
    H100 (docs/kernel-decisions.md, "Running top-k"): at top-24 of 32-tile chunks insertion was as fast (mass
    kernel, within 7%) or faster (learned kernel, 1.3-1.5x); at top-96 merges took the mass kernel from 0.77 to
    0.24 ms at 16K."""
    return _next_pow2(topk) > chunk


def merge_stages(merge: bool) -> int:
    """Software-pipeline stages of a selection kernel: Triton's default (3) with insertion; 1 with merges, whose
    staged chunks' loads the pipeline would otherwise multi-buffer past shared memory (sm_90, Triton 3.6, D 128:
    top-96 needed 288 KB at 3 stages, 40 KB at 1)."""
    return 1 if merge else 3


def pool_features(x: torch.Tensor, offset: int, block: int, seg: torch.Tensor | None, seg_start: int,
                  is_query: bool, dtype: torch.dtype = torch.float32, rows: int = POOL_ROWS,
                  num_warps: int = POOL_WARPS, moments: bool = False) -> torch.Tensor:
    """(B, H, n_tiles, 2 * D_pad) tile features of x (B, H, L, D) on the absolute grid from ``offset``, float32 or
    ``dtype`` float16 (saturated at +-65504); ``moments`` (keys): ``[mean, variance]`` instead of ``[max, min]``.

    Rows t with ``seg[:, seg_start + t] < 0`` are padding and left out (``seg`` None: all rows real). ``rows`` /
    ``num_warps``: the launch (rows loaded per step), which does not change the values."""
    batch, heads, length, dim = x.shape
    shift = offset % block
    n_tiles = (shift + length + block - 1) // block
    d_pad = max(16, _next_pow2(dim))
    out = torch.empty(batch, heads, n_tiles, 2 * d_pad, device=x.device, dtype=dtype)
    if out.numel() == 0:
        return out
    seg_arg = seg if seg is not None else out
    s_sb = seg.stride(0) if seg is not None else 0
    _pool_kernel[(n_tiles, batch * heads)](
        x, seg_arg, out, *x.stride(), s_sb, *out.stride()[:3], length, shift, seg_start, heads, dim,
        BLOCK=block, ROWS=min(rows, block), D_PAD=d_pad, IS_QUERY=is_query, HAS_SEG=seg is not None,
        HALF_OUT=dtype == torch.float16, MOMENTS=moments and not is_query, num_warps=num_warps,
    )
    return out


def pool_feature_pair(q: torch.Tensor, q_offset: int, q_seg: torch.Tensor | None, q_seg_start: int, k: torch.Tensor,
                      kv_offset: int, k_seg: torch.Tensor | None, block: int, dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pool_features` of q (queries) and k (keys) in one launch: the same values."""
    batch, hq, q_len, dim = q.shape
    hk, k_len = k.shape[1], k.shape[2]
    n_q = (q_offset % block + q_len + block - 1) // block
    n_k = (kv_offset % block + k_len + block - 1) // block
    d_pad = max(16, _next_pow2(dim))
    qf = torch.empty(batch, hq, n_q, 2 * d_pad, device=q.device, dtype=dtype)
    kf = torch.empty(batch, hk, n_k, 2 * d_pad, device=q.device, dtype=dtype)
    if qf.numel() == 0 and kf.numel() == 0:
        return qf, kf
    qs = q_seg if q_seg is not None else qf
    ks = k_seg if k_seg is not None else kf
    _pool_pair_kernel[(max(n_q, n_k), batch * (hq + hk))](
        q, qs, qf, k, ks, kf, *q.stride(), q_seg.stride(0) if q_seg is not None else 0, *qf.stride()[:3],
        *k.stride(), k_seg.stride(0) if k_seg is not None else 0, *kf.stride()[:3],
        q_len, q_offset % block, q_seg_start, n_q, hq, k_len, kv_offset % block, n_k, hk, batch * hq, dim,
        BLOCK=block, ROWS=min(POOL_ROWS, block), D_PAD=d_pad, HAS_QSEG=q_seg is not None,
        HAS_KSEG=k_seg is not None, HALF_OUT=dtype == torch.float16, num_warps=POOL_WARPS,
    )
    return qf, kf


def mass_rows_per_program(n_q: int, group: int, programs_per_row: int, sms: int, topk: int = 1) -> int:
    """Rows per ``_select_kernel`` program for ``n_q`` query tiles, a KV group of ``group`` query heads and
    ``programs_per_row`` = batch x KV heads on ``sms`` SMs: the widest of ``MASS_ROWS`` whose grid still gives
    ``MASS_MIN_PROGRAMS_PER_SM`` programs per SM and whose running top-k (query tiles x ``topk`` slots, padded) is no
    larger than ``MASS_MAX_TOPK_SLOTS`` or the 16-row program's. Wider programs share each key tile's features among
    more query tiles (H200, 32 / 8 heads, D 128, 16K / 64K: 64 rows took 0.230 / 1.149 ms against 0.361 / 1.926 for
    16, ``git show e1b9bef:scripts/results/selection_cost_h200.json``); short calls keep more, narrower programs so
    that every SM has work, and large budgets keep the register-resident top-k of the 16-row program."""
    hg_p = _next_pow2(group)
    slots = max(2, _next_pow2(topk))
    limit = max(MASS_MAX_TOPK_SLOTS, max(1, ROWS_MIN // hg_p) * slots)
    for rows in MASS_ROWS:
        tiles = max(1, rows // hg_p)
        if tiles * slots > limit:
            continue
        if -(-n_q // tiles) * programs_per_row >= MASS_MIN_PROGRAMS_PER_SM * sms:
            return rows
    return ROWS_MIN


class SelectionCall(NamedTuple):
    """A checked selection call: tile counts, the output and the per-tile key info as the kernels read it."""

    n_q: int
    n_k: int
    out: torch.Tensor  # (B, Hkv, n_q, topk) int32, to fill
    count: torch.Tensor  # (B, n_k) int32 real keys per tile, or ``out`` as an unread placeholder
    sink_flag: torch.Tensor  # (B, n_k) int32 "all sink tokens", or ``out``
    has_info: bool  # count / sink_flag given (padding); else the kernels derive both from positions


def check_device_row(caller: str, q_len: int, q_offset: torch.Tensor) -> None:
    """A position kept on the device fits one query row only, given as a one-element integer tensor."""
    if q_len != 1 or q_offset.numel() != 1 or q_offset.dtype.is_floating_point:
        raise ValueError(f"{caller} takes one query row and a one-element integer offset, got q_len={q_len} and an "
                         f"offset of shape {tuple(q_offset.shape)} {q_offset.dtype}")


def prepare_call(q: torch.Tensor, k: torch.Tensor, key_count: torch.Tensor | None, sink_only: torch.Tensor | None,
                 block: int, q_offset: int, kv_offset: int, topk: int) -> SelectionCall:
    """Check q / k and the optional per-tile key info of a selection launch (mass or probe) and make its output."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim or hkv < 1 or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same batch and head dim, and query "
                         "heads a multiple of KV heads")
    n_q = (q_offset % block + q_len + block - 1) // block
    n_k = (kv_offset % block + kv_len + block - 1) // block
    has_info = key_count is not None
    if has_info and (sink_only is None or tuple(key_count.shape) != (batch, n_k)
                     or tuple(sink_only.shape) != (batch, n_k)):
        raise ValueError(f"key_count and sink_only must both be (batch={batch}, key tiles={n_k}) or both None, got "
                         f"{None if key_count is None else tuple(key_count.shape)} and "
                         f"{None if sink_only is None else tuple(sink_only.shape)}")
    out = torch.empty(batch, hkv, n_q, topk, dtype=torch.int32, device=q.device)
    count = key_count.to(torch.int32).contiguous() if has_info else out
    sink_flag = sink_only.to(torch.int32).contiguous() if has_info else out
    return SelectionCall(n_q, n_k, out, count, sink_flag, has_info)


def check_rows_per_program(rows: int | None) -> None:
    """ValueError unless ``rows`` (one program's rows of a selection launch) is None or a power of two >= 16."""
    if rows is not None and (rows < ROWS_MIN or rows & (rows - 1)):
        raise ValueError(f"rows_per_program must be a power of two >= {ROWS_MIN}, got {rows}")


def query_side(q: torch.Tensor, k_seg: torch.Tensor | None, q_offset: int, kv_offset: int,
               half: bool | None) -> tuple[int, torch.Tensor | None, bool, torch.dtype]:
    """What the selectors' launches share about the queries: (their start among the keys, their segment ids (the
    keys' where the queries lie among them, else None), ``half`` resolved (None: on CUDA), the feature dtype)."""
    q_start = q_offset - kv_offset
    q_seg = k_seg if (k_seg is not None and q_start >= 0) else None
    half = q.is_cuda if half is None else half
    return q_start, q_seg, half, torch.float16 if half else torch.float32


def checked_key_features(key_features: torch.Tensor, batch: int, hkv: int, n_k: int, width: int) -> torch.Tensor:
    """Key-tile features kept by the selection store, checked against the call: float32 (B, Hkv, n_k, width)."""
    if key_features.dtype != torch.float32 or tuple(key_features.shape) != (batch, hkv, n_k, width):
        raise ValueError(f"key_features must be float32 (batch={batch}, kv_heads={hkv}, key tiles={n_k}, {width}), "
                         f"got {tuple(key_features.shape)} {key_features.dtype}")
    return key_features


def select_by_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    k_seg: torch.Tensor | None,
    key_count: torch.Tensor | None,
    sink_only: torch.Tensor | None,
    *,
    block: int,
    q_offset: int,
    kv_offset: int,
    sink: int,
    topk: int,
    window: int | None,
    threshold: float | None,
    scale: float,
    key_features: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    num_warps: int = 4,
    half: bool | None = None,
) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk) int32 key tiles (relative to ``kv_offset // block``, -1 = none) per query tile.

    q (B, Hq, q_len, D), k (B, Hkv, kv_len, D), any float dtype and strides; ``k_seg`` (B, kv_len) int32 with -1 for
    padding keys, or None; ``key_count`` (B, n_k) real keys per key tile and ``sink_only`` (B, n_k) bool, tiles
    whose real keys are all sink tokens (rank < ``sink``), both None without padding (then computed in the kernel
    from positions). ``window`` None: no window term; ``threshold`` None: fixed k. ``key_features``: the key tiles'
    features kept from earlier calls (``hf_sparsek.selection.store``; (B, Hkv, n_k, 2 * D_pad) float32, valid up to
    the last causal tile) instead of pooling every key of k here. ``rows_per_program``: (query tile, query head)
    rows of one ``_select_kernel`` program (a power of two >= 16; more rows share each key feature load among more
    query tiles, fewer programs; None: :func:`mass_rows_per_program`); ``num_warps`` of that launch. Neither
    changes the tiles. ``half``: the pooled features stored and multiplied as float16, which keeps the 10-bit
    mantissa that tf32 dot products keep of float32 (near-ties may differ from the float32 definition, as with tf32),
    halves the feature reads and doubles the tensor-core rate; values past +-65504 saturate. None: on CUDA (the
    interpreter's float32 dot products are exact, and the tests compare them with the definition).
    """
    check_rows_per_program(rows_per_program)
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    n_q, n_k, out, count, sink_flag, has_info = prepare_call(q, k, key_count, sink_only, block, q_offset, kv_offset,
                                                             topk)
    if rows_per_program is None:
        rows_per_program = mass_rows_per_program(n_q, hq // hkv, batch * hkv, sm_count(q.device), topk)
    if out.numel() == 0:
        return out
    q_start, q_seg, half, fdt = query_side(q, k_seg, q_offset, kv_offset, half)
    if key_features is None:  # both sides in one launch
        qf, kf = pool_feature_pair(q, q_offset, q_seg, max(q_start, 0), k, kv_offset, k_seg, block, fdt)
    else:
        qf = pool_features(q, q_offset, block, q_seg, max(q_start, 0), True, fdt)
        kf = checked_key_features(key_features, batch, hkv, n_k, qf.shape[-1])
    return _launch_select(qf, kf, count, sink_flag, out, has_info, half=half, group=hq // hkv, n_q=n_q, n_k=n_k,
                          q_offset=q_offset, q_len=q_len, kv_offset=kv_offset, kv_len=kv_len, block=block, sink=sink,
                          topk=topk, window=window, threshold=threshold, scale=scale,
                          rows_per_program=rows_per_program, num_warps=num_warps)


def select_by_mass_at_device_offset(
    q: torch.Tensor,
    k: torch.Tensor,
    k_seg: torch.Tensor,
    key_count: torch.Tensor,
    sink_only: torch.Tensor,
    *,
    block: int,
    q_offset: torch.Tensor,
    kv_offset: int,
    sink: int,
    topk: int,
    window: int | None,
    threshold: float | None,
    scale: float,
    half: bool | None = None,
    key_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_by_mass` for one decode row whose position is a one-element integer tensor on the device (a
    static cache under torch.compile): (B, Hkv, 1, topk) int32 key tiles, nothing read on the host, so a CUDA graph
    can hold the call. The keys at and after the row's end must be marked in ``k_seg`` (-1: the cache's unwritten
    slots) and counted out of ``key_count`` / ``sink_only``, as the caller's keys sliced at the row would be; then
    the tiles equal :func:`select_by_mass`'s few-query-tiles path on the sliced keys. Always that path (two launches
    and a ``torch.topk`` over every key tile of the cache): the causal tile count is not known on the host.
    ``key_features``: every key tile's features kept by a decode store (valid up to the row's tile; see
    ``kernels/selection_store.py: refresh_key_features_at_device_offset``) instead of pooling every key here."""
    batch, hq, q_len, dim = q.shape
    check_device_row("select_by_mass_at_device_offset", q_len, q_offset)
    n_q, n_k, out, count, sink_flag, _ = prepare_call(q, k, key_count, sink_only, block, 0, kv_offset, topk)
    if out.numel() == 0:
        return out
    _, _, half, fdt = query_side(q, None, 0, kv_offset, half)
    if key_features is None:
        qf, kf = pool_feature_pair(q, 0, None, 0, k, kv_offset, k_seg, block, fdt)
    else:
        qf = pool_features(q, 0, block, None, 0, True, fdt)
        kf = checked_key_features(key_features, batch, k.shape[1], n_k, qf.shape[-1])
    return _select_short(qf, kf, count, sink_flag, True, half=half, batch=batch, hkv=k.shape[1], group=hq // k.shape[1],
                         n_q=n_q, n_k=n_k, q_offset=q_offset.reshape(1), q_len=1, kv_offset=kv_offset,
                         kv_len=k.shape[2], block=block, sink=sink, topk=topk, window=window, threshold=threshold,
                         scale=scale)


def _launch_select(qf, kf, count, sink_flag, out, has_info, *, half, group, n_q, n_k, q_offset, q_len, kv_offset,
                   kv_len, block, sink, topk, window, threshold, scale, rows_per_program, num_warps,
                   row_ok=None, samples=0) -> torch.Tensor:
    """The selection launch shared by "mass" and "moment": ``qf`` (B, Hkv x ``group``, n_q, F) rows scored against
    ``kf`` (B, Hkv, n_k, F), ``group`` rows per KV head averaged (with ``row_ok`` (B, n_q, ``samples``) int8: the
    real ones, and ``log n`` added to every logit). Fills and returns ``out``."""
    batch, hkv = kf.shape[0], kf.shape[1]
    if n_q <= SHORT_QUERY_TILES and n_k >= SHORT_MIN_KEY_TILES:
        return _select_short(qf, kf, count, sink_flag, has_info, half=half, batch=batch, hkv=hkv, group=group,
                             n_q=n_q, n_k=n_k, q_offset=q_offset, q_len=q_len, kv_offset=kv_offset, kv_len=kv_len,
                             block=block, sink=sink, topk=topk, window=window, threshold=threshold, scale=scale,
                             row_ok=row_ok, samples=samples)
    hg_p = _next_pow2(group)
    bm = max(1, rows_per_program // hg_p)
    feats = qf.shape[-1]
    cn = _chunk_tiles(feats)
    merge = uses_merge(topk, cn)
    slots = max(2, _next_pow2(topk))  # the running top-k's width (with merges a multiple of the chunk: uses_merge)
    rows_arg = row_ok if row_ok is not None else out
    s_rb, s_rm = (row_ok.stride(0), row_ok.stride(1)) if row_ok is not None else (0, 0)
    _select_kernel[(triton.cdiv(n_q, bm), batch * hkv)](
        qf, kf, count, sink_flag, out, rows_arg, *qf.stride()[:3], *kf.stride()[:3],
        count.stride(0) if has_info else 0, *out.stride()[:3], s_rb, s_rm, n_q, n_k, q_offset // block,
        kv_offset // block, q_offset + q_len, kv_offset, kv_offset + kv_len, sink, window or 0, scale,
        threshold if threshold is not None else 0.0,
        HKV=hkv, GROUP=group, HG_P=hg_p, BM=bm, CN=cn, F=feats, FC=min(FEATURE_CHUNK, feats), TOPK=topk,
        KP=slots, KP_LOG=slots.bit_length() - 1, CN_LOG=cn.bit_length() - 1, MERGE=merge, BLOCK=block,
        HAS_WINDOW=window is not None, HAS_THRESHOLD=threshold is not None, HAS_TILE_INFO=has_info,
        HOIST=feats <= HOIST_MAX_FEATURES and bm * hg_p <= 128, F16=half, SAMPLES=samples, LOG_COUNT=samples > 0,
        num_warps=num_warps, num_stages=merge_stages(merge),
    )
    return out


def select_by_moment(
    q: torch.Tensor,
    k: torch.Tensor,
    k_seg: torch.Tensor | None,
    key_count: torch.Tensor | None,
    sink_only: torch.Tensor | None,
    *,
    block: int,
    q_offset: int,
    kv_offset: int,
    sink: int,
    topk: int,
    window: int | None,
    threshold: float | None,
    scale: float,
    stride: int,
    variance: float,
    key_features: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    num_warps: int = 4,
    half: bool | None = None,
) -> torch.Tensor:
    """Selector "moment" (``hf_sparsek.selection.moment``) on the GPU: (B, Hkv, n_q_tiles, topk) int32 key tiles.

    Arguments as :func:`select_by_mass`; ``stride`` (a power of two dividing ``block``): one sampled query row per
    ``stride`` positions (and the call's last); ``variance``: the weight of the variance term; ``key_features``:
    kept ``[mean, variance]`` per key tile (the store's moment layout) instead of pooling every key. Two launches
    before the selection's: the key tiles' mean / variance, the sampled rows' ``[q, variance * scale / 2 * q * q]``
    (each (head, sampled row) is one row of the KV group's average)."""
    if stride < 1 or stride & (stride - 1) or block % stride:
        raise ValueError(f"stride must be a power of two dividing the block ({block}), got {stride}")
    check_rows_per_program(rows_per_program)
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    n_q, n_k, out, count, sink_flag, has_info = prepare_call(q, k, key_count, sink_only, block, q_offset, kv_offset,
                                                             topk)
    samples = block // stride
    group = (hq // hkv) * samples
    if rows_per_program is None:
        rows_per_program = mass_rows_per_program(n_q, group, batch * hkv, sm_count(q.device), topk)
    if out.numel() == 0:
        return out
    q_start, q_seg, half, fdt = query_side(q, k_seg, q_offset, kv_offset, half)
    d_pad = max(16, _next_pow2(dim))
    if key_features is None:
        kf = pool_features(k, kv_offset, block, k_seg, 0, False, fdt, moments=True)
    else:
        kf = checked_key_features(key_features, batch, hkv, n_k, 2 * d_pad)
    qf = torch.empty(batch, hq * samples, n_q, 2 * d_pad, device=q.device, dtype=fdt)
    row_ok = torch.empty(batch, n_q, samples, device=q.device, dtype=torch.int8)
    _sample_rows_kernel[(n_q, batch * hq)](
        q, q_seg if q_seg is not None else row_ok, qf, row_ok, *q.stride(),
        q_seg.stride(0) if q_seg is not None else 0, *qf.stride()[:3], *row_ok.stride()[:2],
        q_len, q_offset, max(q_start, 0), q_offset // block, hq, dim, variance * scale / 2,
        BLOCK=block, STRIDE=stride, SAMPLES=samples, D_PAD=d_pad, HAS_SEG=q_seg is not None, HALF_OUT=half,
    )
    return _launch_select(qf, kf, count, sink_flag, out, has_info, half=half, group=group, n_q=n_q, n_k=n_k,
                          q_offset=q_offset, q_len=q_len, kv_offset=kv_offset, kv_len=kv_len, block=block, sink=sink,
                          topk=topk, window=window, threshold=threshold, scale=scale,
                          rows_per_program=rows_per_program, num_warps=num_warps, row_ok=row_ok, samples=samples)
