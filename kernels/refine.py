"""Selector "refine"'s second stage on the GPU: exact scores of sampled rows over the candidate and static tiles only.

The definition is ``hf_sparsek.selection.refine`` (PyTorch; this file must give the same tiles, near-ties aside):
per query tile, its sampled rows (as selector "probe": absolute positions ``stride - 1`` modulo ``stride`` and the
call's last row) take a softmax over the causal real keys of the tile's static tiles (sink-only tiles, the tiles the
window keeps whole) and of its candidates (the first stage's list); a candidate's mass is the mean over the tile's
sampled real rows and the KV group's heads of that softmax summed over its keys; the ``TOPK`` candidates with the
most are written, sorted (equal masses: the lower tile).

``_refine_kernel``: one program per (batch, KV head, query tile); its rows are (sample slot, query head). Pass 1
visits the window's tiles (a range from positions), the sink-only tiles before them (a range: from positions, or
per batch row from the key tiles' flags with padding) and the candidates, one key tile at a time, for each row's
log-sum-exp; pass 2 revisits the candidates only for their mass; the top-k of at most ``CP`` candidates is kept in
registers. Work: (static + candidate tiles) x sampled rows, against every causal tile for selector "probe".

No host synchronisation. No transformers or hf_sparsek imports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch_fitting
from .dispatch import as_float32, interpreter_upcast
from .probe import _chunk_scores, sampled_rows
from .selection import FEATURE_CHUNK, NEG, ROWS_MIN, _next_pow2, prepare_call


@triton.jit
def _visit(m_i, l_i, q_ptr, k_ptr, seg_ptr, rows_ok, pos, n, ok, kb0, kv_offset, kv_len, scale, s_qd, s_kl, s_kd,
           ROWS: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, FC: tl.constexpr,
           HAS_SEG: tl.constexpr):
    """Running (max, sum of exp2) per row updated with key tile ``n`` when ``ok``."""
    rows_ok = rows_ok & ((tl.full([ROWS], 1, tl.int32) * ok) != 0)  # ``ok``: a scalar, host bool or device bool
    x, allowed = _chunk_scores(q_ptr, k_ptr, seg_ptr, rows_ok, pos, (kb0 + n) * BLOCK + tl.arange(0, BLOCK),
                               kv_offset, kv_len, scale, s_qd, s_kl, s_kd, ROWS, BLOCK, D, D_PAD, FC, HAS_SEG)
    x = tl.where(allowed, x, NEG)
    m_new = tl.maximum(m_i, tl.max(x, 1))
    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.where(allowed, tl.exp2(x - m_new[:, None]), 0.0), 1)
    return m_new, l_i


@triton.jit
def _refine_kernel(
    Q, K, SEG, SINK_ONLY, SINK_RANGE, CAND, OUT,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_sb, s_fb, s_rb, s_cb, s_ch, s_cm, s_ob, s_oh, s_om,
    q_len, kv_len, n_q, n_k, qb0, kb0, q_offset, q_start, kv_offset, sink, window, scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, HG_P: tl.constexpr, SLOTS: tl.constexpr, STRIDE: tl.constexpr,
    ROWS: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, FC: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TILE_INFO: tl.constexpr, HAS_SEG: tl.constexpr, QUERY_SEG: tl.constexpr,
):
    m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    g = pid_bh % HKV
    q_end = q_offset + q_len
    qb = qb0 + m
    q_last = tl.minimum((qb + 1) * BLOCK - 1, q_end - 1)

    # the sampled rows of this query tile: (slot, head)
    r = tl.arange(0, ROWS)
    slot = r // HG_P
    h_r = r % HG_P
    seg_ptr = SEG + b.to(tl.int64) * s_sb
    pos, rows_ok, q_ptr = sampled_rows(Q, seg_ptr, s_qb, s_qh, s_ql, b, g, qb, slot, h_r, slot < SLOTS, q_offset,
                                       q_end, q_start, GROUP, STRIDE, BLOCK, QUERY_SEG)
    k_ptr = K + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    diag = qb - kb0  # the query tile's own key tile (relative); later tiles are not causal

    # static tiles: the window's (every tile whose first stored key is within the window of the tile's last row)
    w_lo = diag + 1
    if HAS_WINDOW:
        edge = q_last - window  # tiles starting after this position are kept whole
        w_lo = tl.where(edge >= 0, edge // BLOCK + 1 - kb0, 0)
        w_lo = tl.where(q_last - kv_offset < window, 0, tl.maximum(w_lo, 0))  # tile 0 starts at kv_offset
    # ... and the sink-only tiles before them
    if HAS_TILE_INFO:
        s_lo = tl.load(SINK_RANGE + b.to(tl.int64) * s_rb)
        s_hi = tl.load(SINK_RANGE + b.to(tl.int64) * s_rb + 1)
    else:  # every key real: the tiles whose last key is a sink token
        s_lo = 0
        s_hi = tl.maximum(sink // BLOCK - kb0, 0)
        s_hi = tl.where((sink > 0) & (kv_offset + kv_len <= sink), n_k, s_hi)  # every stored key a sink token
    s_hi = tl.minimum(tl.minimum(s_hi, w_lo), diag + 1)

    c_ptr = CAND + b.to(tl.int64) * s_cb + g.to(tl.int64) * s_ch + m.to(tl.int64) * s_cm
    m_i = tl.full([ROWS], NEG, tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for n in range(w_lo, diag + 1):
        m_i, l_i = _visit(m_i, l_i, q_ptr, k_ptr, seg_ptr, rows_ok, pos, n, n < n_k, kb0, kv_offset, kv_len, scale,
                          s_qd, s_kl, s_kd, ROWS, BLOCK, D, D_PAD, FC, HAS_SEG)
    for n in range(s_lo, s_hi):
        if HAS_TILE_INFO:
            is_sink = tl.load(SINK_ONLY + b.to(tl.int64) * s_fb + n) != 0
        else:
            is_sink = n >= 0
        m_i, l_i = _visit(m_i, l_i, q_ptr, k_ptr, seg_ptr, rows_ok, pos, n, is_sink, kb0, kv_offset, kv_len, scale,
                          s_qd, s_kl, s_kd, ROWS, BLOCK, D, D_PAD, FC, HAS_SEG)
    for j in range(C):
        n = tl.load(c_ptr + j)
        if n >= 0:  # empty slots (-1) cost nothing
            m_i, l_i = _visit(m_i, l_i, q_ptr, k_ptr, seg_ptr, rows_ok, pos, n, True, kb0, kv_offset, kv_len, scale,
                              s_qd, s_kl, s_kd, ROWS, BLOCK, D, D_PAD, FC, HAS_SEG)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)
    n_rows = tl.maximum(tl.sum(rows_ok.to(tl.float32), 0), 1.0)  # (sampled real row, head) pairs

    # pass 2: each candidate's mass; keep (mass, tile) per candidate slot
    jj = tl.arange(0, CP)
    mass = tl.full([CP], -1.0, tl.float32)
    tiles = tl.full([CP], -1, tl.int32)
    for j in range(C):
        n = tl.load(c_ptr + j)
        if n >= 0:
            x, allowed = _chunk_scores(q_ptr, k_ptr, seg_ptr, rows_ok, pos, (kb0 + n) * BLOCK + tl.arange(0, BLOCK),
                                       kv_offset, kv_len, scale, s_qd, s_kl, s_kd, ROWS, BLOCK, D, D_PAD, FC,
                                       HAS_SEG)
            p = tl.sum(tl.sum(tl.where(allowed, tl.exp2(x - lse[:, None]), 0.0), 1), 0) / n_rows
            mass = tl.where(jj == j, p, mass)
            tiles = tl.where(jj == j, n, tiles)

    # top-k: the largest mass, equal masses the lower tile, TOPK times
    kk = tl.arange(0, KP)
    out = tl.full([KP], -1, tl.int32)
    big: tl.constexpr = 1 << 30
    for i in range(TOPK):
        top = tl.max(mass, 0)
        here = (mass == top) & (tiles >= 0)
        tile = tl.min(tl.where(here, tiles, big), 0)
        out = tl.where(kk == i, tl.where(top >= 0, tile, -1), out)
        mass = tl.where(here & (tiles == tile), -2.0, mass)
    ptr = OUT + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_oh + m.to(tl.int64) * s_om + kk
    tl.store(ptr, out, mask=kk < TOPK)


def refine_candidates(
    q: torch.Tensor,
    k: torch.Tensor,
    k_seg: torch.Tensor | None,
    key_count: torch.Tensor | None,
    sink_only: torch.Tensor | None,
    candidates: torch.Tensor,
    *,
    block: int,
    q_offset: int,
    kv_offset: int,
    sink: int,
    topk: int,
    window: int | None,
    scale: float,
    stride: int,
) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk) int32 key tiles (relative to ``kv_offset // block``, -1 = none): of ``candidates``
    (B, Hkv, n_q_tiles, C) (the first stage's tiles, same numbering, -1 = none), the ``topk`` with the most mass by
    the module's definition. ``k_seg`` (B, kv_len) int32, -1 = padding key, or None; ``key_count`` / ``sink_only``
    (B, n_k) per key tile (``hf_sparsek.selection.tiles.key_tile_info``), both given with padding, else None (then
    derived from positions); ``stride``: one sampled row per ``stride`` positions (a power of two dividing
    ``block``)."""
    if interpreter_upcast(q):  # bfloat16 tiles in the interpreter's tl.dot: see kernels/dispatch.py
        q, k = as_float32(q, k)
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    if stride < 1 or stride & (stride - 1) or block % stride:
        raise ValueError(f"the refine kernel samples one row per stride: a power of two dividing block={block}, got "
                         f"stride={stride}")
    n_q, n_k, out, _, _, has_info = prepare_call(q, k, key_count, sink_only, block, q_offset, kv_offset, topk)
    if candidates.dim() != 4 or tuple(candidates.shape[:3]) != (batch, hkv, n_q):
        raise ValueError(f"candidates must be (batch={batch}, kv_heads={hkv}, query tiles={n_q}, C), got "
                         f"{tuple(candidates.shape)}")
    if out.numel() == 0:
        return out
    candidates = candidates.to(torch.int32)
    if has_info:
        flags = (sink_only & (key_count > 0)).to(torch.int32).contiguous()  # pad-only tiles hold no key
        # the sink-only tiles of a row are consecutive: [first, last + 1), empty where none
        ids = torch.arange(n_k, device=q.device, dtype=torch.int32)
        any_sink = flags.amax(-1) > 0
        lo = torch.where(flags > 0, ids, n_k).amin(-1)
        hi = torch.where(flags > 0, ids + 1, 0).amax(-1)
        sink_range = torch.stack([torch.where(any_sink, lo, 0), torch.where(any_sink, hi, 0)], -1).to(torch.int32)
    else:
        flags = sink_range = out
    seg = k_seg.to(torch.int32) if k_seg is not None else out
    group = hq // hkv
    hg_p = _next_pow2(group)
    slots = block // stride  # the stride holding the call's last row samples that row
    rows = max(ROWS_MIN, _next_pow2(slots * hg_p))
    d_pad = max(16, _next_pow2(dim))
    c = candidates.shape[-1]
    q_start = q_offset - kv_offset
    meta = dict(HKV=hkv, GROUP=group, HG_P=hg_p, SLOTS=slots, STRIDE=stride, ROWS=rows, C=c, CP=max(2, _next_pow2(c)),
                TOPK=topk, KP=max(2, _next_pow2(topk)), BLOCK=block, D=dim, D_PAD=d_pad, FC=min(FEATURE_CHUNK, d_pad),
                HAS_WINDOW=window is not None, HAS_TILE_INFO=has_info, HAS_SEG=k_seg is not None,
                QUERY_SEG=k_seg is not None and q_start >= 0)
    # float32 at head dim >= 128 with 128-key tiles needs fewer pipeline stages than the default 3 to fit
    launch_fitting("refine", lambda _, stages: _refine_kernel[(n_q, batch * hkv)](
        q, k, seg, flags, sink_range, candidates, out, *q.stride(), *k.stride(),
        seg.stride(0) if k_seg is not None else 0, flags.stride(0) if has_info else 0,
        sink_range.stride(0) if has_info else 0, *candidates.stride()[:3], *out.stride()[:3],
        q_len, kv_len, n_q, n_k, q_offset // block, kv_offset // block, q_offset, max(q_start, 0), kv_offset, sink,
        window or 0, scale, **meta, num_stages=stages,
    ), lambda: (*sorted(meta.items()), q.dtype, q.device), block, 3, shrink_block=False)
    return out
