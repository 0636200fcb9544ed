"""Block selection by the exact attention of sampled query rows, on the GPU: scores, softmax, tile sums and top-k fused.

The definition is ``hf_sparsek.selection.probe`` (PyTorch; this file must give the same tiles, ties aside): the rows
at absolute positions ``stride - 1`` modulo ``stride`` and the call's last row score every causal real key exactly;
a query tile's mass on a key tile is the mean over its sampled real rows, then over the KV group's heads, of the
rows' softmax summed over the key tile; competition and budget as ``hf_sparsek.selection.tiles.choose_tiles``.

``_probe_kernel``: one program per (batch, KV head, ``BM`` query tiles). Its rows are (query tile, sample slot,
query head of the group): slot ``j`` of query tile ``m`` is the position ending the ``j``-th stride of the tile,
or the call's last row when that stride holds it (so the last row costs no extra slot). Pass 1 streams over the
causal keys, ``CN`` key tiles at a time, for each row's log-sum-exp; pass 2 streams again, sums each row's
probabilities per key tile, averages over the tile's rows and heads and keeps a running top-k per query tile
(each step's tiles staged, merged ``KP`` at a time by the mass selector's ``kernels.selection.topk_merge``).
Work: two passes of ``1 / stride`` of the dense causal scores; nothing of size (query tiles x key tiles) is written.

Split over the keys: when the (query tiles, KV head) programs are too few to fill the GPU (few heads, a short call,
a decode step) each also takes one slice of the key tiles (:func:`probe_splits`), in three launches: pass 1 per
slice writes each row's partial (max, sum); pass 2 per slice combines them into the row's log-sum-exp, scores its
slice and writes its top-k keys and static mass; ``_probe_merge_kernel`` merges the slices' top-k lists (a tile lies
in one slice, so the union holds the whole call's top-k) and writes the result. Scratch: (slices x programs' rows),
only below the fill threshold. Programs take the query tiles last to first (the causal heavy ones start first).

No host synchronisation: every size comes from the shapes and the pattern. No transformers or hf_sparsek imports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch_fitting, sm_count
from .dispatch import as_float32, interpreter_upcast
from .selection import (
    FEATURE_CHUNK,
    NEG,
    ROWS_MIN,
    _next_pow2,
    check_device_row,
    check_rows_per_program,
    competition,
    desc_key,
    key_tiles,
    prepare_call,
    sorted_result,
    stage,
    topk_merge,
)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
KEYS_PER_STEP = 64  # keys scored per step (CN key tiles of BLOCK; at least one tile)
NUM_WARPS = 8  # 4 warps spill at 64 rows
ROWS_PER_PROGRAM = 128  # sampled rows x heads sharing each key load (query tiles per program: this / rows per tile;
# sm_90, Triton 3.6, D 128, group 4, 8 warps: no spills at 128, spills at 256)
PROBE_PROGRAMS_PER_SM = 2  # below this many (query tiles, KV head) programs per SM the keys are split too
MIN_TILES_PER_SPLIT = 8  # key tiles of one slice at least (each slice costs a partial per row and a merge)
MAX_SPLITS = 64


@triton.jit
def _chunk_scores(q_ptr, k_ptr, seg_ptr, rows_ok, pos, kpos, kv_offset, kv_len, scale, s_qd, s_kl, s_kd,
                  ROWS: tl.constexpr, KEYS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, FC: tl.constexpr,
                  HAS_SEG: tl.constexpr):
    """(ROWS, KEYS) base-2 logits of the sampled rows on the keys at absolute positions ``kpos`` (FC columns of the
    head dim at a time), and which (row, key) pairs are allowed: real row, stored real key, causal."""
    s = kpos - kv_offset  # stored index
    s_ok = (s >= 0) & (s < kv_len)
    if HAS_SEG:
        s_ok = s_ok & (tl.load(seg_ptr + s, mask=s_ok, other=-1) >= 0)
    acc = tl.zeros([ROWS, KEYS], dtype=tl.float32)
    for d0 in tl.static_range(0, D_PAD, FC):
        d = d0 + tl.arange(0, FC)
        d_ok = d < D
        q = tl.load(q_ptr + d[None, :] * s_qd, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptr + s.to(tl.int64)[:, None] * s_kl + d[None, :] * s_kd, mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc += tl.dot(q, tl.trans(k))
    allowed = rows_ok[:, None] & s_ok[None, :] & (kpos[None, :] <= pos[:, None])
    return acc * (scale * LOG2E), allowed


@triton.jit
def sampled_rows(Q, seg_ptr, s_qb, s_qh, s_ql, b, g, qb_r, slot, h_r, row_ok, q_offset, q_end, q_start,
                 GROUP: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr, QUERY_SEG: tl.constexpr):
    """Per (query tile ``qb_r``, sample slot, head ``h_r``) row: its absolute position (the slot's stride's last
    position, or the call's last row inside it), whether it is a real sampled row, and its query pointers (ROWS, 1).
    Shared by selectors "probe" and "refine" (``kernels.refine``)."""
    first = qb_r * BLOCK + slot * STRIDE
    pos = tl.minimum(first + STRIDE - 1, q_end - 1)
    rows_ok = row_ok & (h_r < GROUP) & (first < q_end) & (pos >= q_offset)
    t = pos - q_offset
    if QUERY_SEG:
        rows_ok = rows_ok & (tl.load(seg_ptr + q_start + t, mask=rows_ok, other=-1) >= 0)
    q_ptr = (Q + b.to(tl.int64) * s_qb + (g * GROUP + h_r).to(tl.int64)[:, None] * s_qh
             + t.to(tl.int64)[:, None] * s_ql)
    return pos, rows_ok, q_ptr


@triton.jit
def _probe_kernel(
    Q, K, SEG, CNT, SINK_ONLY, OUT, ML, PB, PS, QOFF,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_sb, s_cb, s_ob, s_oh, s_om,
    q_len, kv_len, n_q, n_k, qb0, kb0, q_offset, q_start, kv_offset, sink, window, scale, threshold,
    n_split, tiles_per_split,
    PHASE: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, HG_P: tl.constexpr, BM: tl.constexpr,
    SLOTS: tl.constexpr,
    STRIDE: tl.constexpr, CN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, FC: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, KP_LOG: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, HAS_TILE_INFO: tl.constexpr, HAS_SEG: tl.constexpr, QUERY_SEG: tl.constexpr,
    OFFSET_ON_DEVICE: tl.constexpr = False,
):
    PER_TILE: tl.constexpr = SLOTS * HG_P
    ROWS: tl.constexpr = BM * PER_TILE
    KEYS: tl.constexpr = CN * BLOCK
    if OFFSET_ON_DEVICE:  # the queries' position read here (a static cache under torch.compile)
        q_offset = tl.load(QOFF).to(tl.int32)
        qb0 = q_offset // BLOCK
        q_start = q_offset - kv_offset
    n_pm = tl.cdiv(n_q, BM)
    pid_m = n_pm - 1 - tl.program_id(0) // n_split  # last query tiles first: the causal heavy programs start early
    split = tl.program_id(0) % n_split
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    g = pid_bh % HKV
    q_end = q_offset + q_len

    # the sampled rows: (query tile, slot, head)
    r = tl.arange(0, ROWS)
    m_r = pid_m * BM + r // PER_TILE
    slot = (r // HG_P) % SLOTS
    h_r = r % HG_P
    seg_ptr = SEG + b.to(tl.int64) * s_sb
    pos, rows_ok, q_ptr = sampled_rows(Q, seg_ptr, s_qb, s_qh, s_ql, b, g, qb0 + m_r, slot, h_r, m_r < n_q,
                                       q_offset, q_end, q_start, GROUP, STRIDE, BLOCK, QUERY_SEG)
    k_ptr = K + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    c_ptr = CNT + b.to(tl.int64) * s_cb
    s_ptr = SINK_ONLY + b.to(tl.int64) * s_cb
    m_last = tl.minimum(pid_m * BM + BM - 1, n_q - 1)
    n_hi = tl.minimum(n_k, qb0 + m_last - kb0 + 1)  # key tiles past the program's last query tile are not causal
    n_lo = 0
    if PHASE != 0:  # this program's slice of the key tiles (a multiple of CN long)
        n_lo = split * tiles_per_split
        n_hi = tl.minimum(n_hi, n_lo + tiles_per_split)
    j = tl.arange(0, KEYS)
    ml_ptr = ML + pid_bh.to(tl.int64) * (2 * n_split * n_pm * ROWS) + pid_m * ROWS + r  # (2, n_split, n_pm * ROWS)

    # pass 1: per sampled row, the log-sum-exp (base 2) of its exact scores over the causal real keys
    if PHASE != 2:
        m_i = tl.full([ROWS], NEG, tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        for n0 in range(n_lo, n_hi, CN):
            x, allowed = _chunk_scores(q_ptr, k_ptr, seg_ptr, rows_ok, pos, (kb0 + n0) * BLOCK + j, kv_offset,
                                       kv_len, scale, s_qd, s_kl, s_kd, ROWS, KEYS, D, D_PAD, FC, HAS_SEG)
            x = tl.where(allowed, x, NEG)
            m_new = tl.maximum(m_i, tl.max(x, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.where(allowed, tl.exp2(x - m_new[:, None]), 0.0), 1)
            m_i = m_new
        if PHASE == 1:  # this slice's partial (max, sum) per row; pass 2 combines the slices
            tl.store(ml_ptr + split * (n_pm * ROWS), m_i)
            tl.store(ml_ptr + (n_split + split) * (n_pm * ROWS), l_i)
            return
    else:
        m_i = tl.full([ROWS], NEG, tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        for sp in range(0, n_split):
            m_s = tl.load(ml_ptr + sp * (n_pm * ROWS))
            l_s = tl.load(ml_ptr + (n_split + sp) * (n_pm * ROWS))
            m_new = tl.maximum(m_i, m_s)
            l_i = l_i * tl.exp2(m_i - m_new) + l_s * tl.exp2(m_s - m_new)
            m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)  # rows without a key: no mass
    # a tile's mass is the mean over its real sampled rows and the group's heads
    per_tile_rows = tl.sum(tl.reshape(rows_ok.to(tl.float32), [BM, PER_TILE]), 1)
    norm = 1.0 / tl.maximum(per_tile_rows, 1.0)

    # pass 2: mass per (query tile, key tile), running top-k of the competing tiles
    mi = tl.arange(0, BM)
    m = pid_m * BM + mi
    m_ok = m < n_q
    qb = qb0 + m
    q_last = tl.minimum((qb + 1) * BLOCK - 1, q_end - 1)
    kk = tl.arange(0, KP)
    cn = tl.arange(0, CN)
    # the running top-k: KP (>= TOPK) sorted keys of (mass, tile); each step's CN tiles are staged, and one merge
    # takes KP // CN steps' worth (-1 = no competing tile)
    empty = desc_key(tl.full([BM, KP], -1.0, tl.float32), tl.full([BM, KP], -1, tl.int32))
    best = empty
    staged = empty
    static_mass = tl.zeros([BM], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, CN):
        x, allowed = _chunk_scores(q_ptr, k_ptr, seg_ptr, rows_ok, pos, (kb0 + n0) * BLOCK + j, kv_offset, kv_len,
                                   scale, s_qd, s_kl, s_kd, ROWS, KEYS, D, D_PAD, FC, HAS_SEG)
        p = tl.where(allowed, tl.exp2(x - lse[:, None]), 0.0)
        row_tile = tl.sum(tl.reshape(p, [ROWS, CN, BLOCK]), 2)  # (ROWS, CN): each row's mass per key tile
        mass = tl.sum(tl.reshape(row_tile, [BM, PER_TILE, CN]), 1) * norm[:, None]
        n = n0 + cn
        n_ok = n < n_k
        cnt, sink_only = key_tiles(c_ptr, s_ptr, n, n_ok, kb0, kv_offset, kv_offset + kv_len, sink, BLOCK,
                                   HAS_TILE_INFO)
        cand, static = competition(m_ok, qb, q_last, n, cnt, sink_only, kb0, kv_offset, window, BLOCK, HAS_WINDOW)
        static_mass += tl.sum(tl.where(static, mass, 0.0), 1)
        part = (n0 // CN) % (KP // CN)
        chunk = desc_key(tl.where(cand & ~static, mass, -1.0), tl.broadcast_to(n[None, :], [BM, CN]))
        staged = stage(staged, chunk, part, BM, KP, CN)
        if part == KP // CN - 1:
            best = topk_merge(best, staged, BM, KP, KP_LOG)
            staged = empty
    best = topk_merge(best, staged, BM, KP, KP_LOG)

    if PHASE == 2:  # this slice's sorted top-k keys and static mass; _probe_merge_kernel takes them from here
        slot_row = (pid_bh.to(tl.int64) * n_split + split) * (n_pm * BM) + pid_m * BM + mi
        tl.store(PB + slot_row[:, None] * KP + kk[None, :], best)
        tl.store(PS + slot_row, static_mass)
    else:
        out = sorted_result(best, static_mass, threshold, KP, TOPK, HAS_THRESHOLD)
        ptr = OUT + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_oh + m.to(tl.int64)[:, None] * s_om + kk[None, :]
        tl.store(ptr, out, mask=m_ok[:, None] & (kk[None, :] < TOPK))


@triton.jit
def _probe_merge_kernel(
    PB, PS, OUT, s_ob, s_oh, s_om, n_q, n_split, threshold,
    HKV: tl.constexpr, BM: tl.constexpr, KP: tl.constexpr, KP_LOG: tl.constexpr, TOPK: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
):
    """The slices' top-k keys (sorted) and static masses of ``BM`` query tiles merged into their tile lists."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_pm = tl.cdiv(n_q, BM)
    mi = tl.arange(0, BM)
    kk = tl.arange(0, KP)
    best = desc_key(tl.full([BM, KP], -1.0, tl.float32), tl.full([BM, KP], -1, tl.int32))
    static_mass = tl.zeros([BM], dtype=tl.float32)
    for sp in range(0, n_split):
        part = (pid_bh.to(tl.int64) * n_split + sp) * (n_pm * BM) + pid_m * BM + mi
        best = topk_merge(best, tl.load(PB + part[:, None] * KP + kk[None, :]), BM, KP, KP_LOG)
        static_mass += tl.load(PS + part)
    out = sorted_result(best, static_mass, threshold, KP, TOPK, HAS_THRESHOLD)
    m = pid_m * BM + mi
    b = pid_bh // HKV
    g = pid_bh % HKV
    ptr = OUT + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_oh + m.to(tl.int64)[:, None] * s_om + kk[None, :]
    tl.store(ptr, out, mask=(m < n_q)[:, None] & (kk[None, :] < TOPK))


def probe_splits(programs: int, n_k: int, cn: int, sms: int) -> int:
    """Key slices per (query tiles, KV head) program: 1 when ``programs`` already give ``PROBE_PROGRAMS_PER_SM``
    per SM, else enough slices for that many (at least ``MIN_TILES_PER_SPLIT`` key tiles each, at most
    ``MAX_SPLITS``). ``n_k`` key tiles, scored ``cn`` per step."""
    target = PROBE_PROGRAMS_PER_SM * sms
    if programs >= target:
        return 1
    want = -(-target // programs)
    return max(1, min(want, MAX_SPLITS, n_k // max(MIN_TILES_PER_SPLIT, cn)))


def select_by_probe(
    q: torch.Tensor,
    k: torch.Tensor,
    k_seg: torch.Tensor | None,
    key_count: torch.Tensor | None,
    sink_only: torch.Tensor | None,
    *,
    block: int,
    q_offset: int | torch.Tensor,
    kv_offset: int,
    sink: int,
    topk: int,
    window: int | None,
    threshold: float | None,
    scale: float,
    stride: int,
    rows_per_program: int = ROWS_PER_PROGRAM,
    splits: int | None = None,
) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk) int32 key tiles (relative to ``kv_offset // block``, -1 = none) per query tile.

    Arguments as ``kernels.selection.select_by_mass``; ``stride``: one sampled row per ``stride`` positions (a
    power of two dividing ``block``). ``rows_per_program``: how many (sampled row, head) pairs of consecutive query
    tiles share one pass over the keys at most (more: fewer key reads, more registers; at least 16 for ``tl.dot``;
    a call with fewer query tiles takes fewer). ``splits``: key slices per program (None: :func:`probe_splits` from
    the device's SMs; 1: one fused launch); the tiles do not depend on it, ties aside. ``q_offset`` may be a
    one-element integer tensor on the device for one query row (a static cache under torch.compile): the kernel reads
    it, so nothing is read on the host; the cache's keys at and after the row must then be marked in ``k_seg``."""
    if interpreter_upcast(q):  # bfloat16 tiles in the interpreter's tl.dot: see kernels/dispatch.py
        q, k = as_float32(q, k)
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    if stride < 1 or stride & (stride - 1) or block % stride:
        raise ValueError(f"the probe kernel samples one row per stride: a power of two dividing block={block}, got "
                         f"stride={stride}")
    check_rows_per_program(rows_per_program)
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")
    on_device = isinstance(q_offset, torch.Tensor)
    if on_device:
        check_device_row("a device-side q_offset", q_len, q_offset)
    qoff, q_offset = (q_offset.reshape(1), 0) if on_device else (None, q_offset)
    n_q, n_k, out, count, sink_flag, has_info = prepare_call(q, k, key_count, sink_only, block, q_offset, kv_offset,
                                                             topk)
    if out.numel() == 0:
        return out
    q_start = q_offset - kv_offset
    seg = k_seg.to(torch.int32) if k_seg is not None else out
    group = hq // hkv
    hg_p = _next_pow2(group)
    slots = block // stride
    per_tile = slots * hg_p
    bm = max(1, rows_per_program // per_tile)
    bm = max(min(bm, _next_pow2(n_q)), _next_pow2(-(-ROWS_MIN // per_tile)))  # short calls: fewer, >= 16 rows
    d_pad = max(16, _next_pow2(dim))
    cn = max(1, KEYS_PER_STEP // block)
    kept = max(cn, ROWS_MIN, _next_pow2(topk))  # keys of the running top-k: a power of two
    n_pm = triton.cdiv(n_q, bm)
    if splits is None:
        splits = probe_splits(n_pm * batch * hkv, n_k, cn, sm_count(q.device))
    per_split = cn * triton.cdiv(triton.cdiv(n_k, min(splits, n_k)), cn)  # key tiles per slice, whole steps
    splits = triton.cdiv(n_k, per_split)
    if splits > 1:
        rows = n_pm * bm * per_tile
        ml = torch.empty(batch * hkv, 2, splits, rows, device=q.device, dtype=torch.float32)
        pb = torch.empty(batch * hkv, splits, n_pm * bm, kept, device=q.device, dtype=torch.int64)
        ps = torch.empty(batch * hkv, splits, n_pm * bm, device=q.device, dtype=torch.float32)
    else:
        ml = pb = ps = out  # unread
    args = (q, k, seg, count, sink_flag, out, ml, pb, ps, out if qoff is None else qoff, *q.stride(), *k.stride(),
            seg.stride(0) if k_seg is not None else 0, count.stride(0) if has_info else 0, *out.stride()[:3],
            q_len, kv_len, n_q, n_k, q_offset // block, kv_offset // block, q_offset, max(q_start, 0), kv_offset,
            sink, window or 0, scale, threshold if threshold is not None else 0.0, splits, per_split)
    meta = dict(HKV=hkv, GROUP=group, HG_P=hg_p, BM=bm, SLOTS=slots, STRIDE=stride, CN=cn, D=dim, D_PAD=d_pad,
                FC=min(FEATURE_CHUNK, d_pad), TOPK=topk, KP=kept, KP_LOG=kept.bit_length() - 1, BLOCK=block,
                HAS_WINDOW=window is not None, HAS_THRESHOLD=threshold is not None, HAS_TILE_INFO=has_info,
                HAS_SEG=k_seg is not None, QUERY_SEG=k_seg is not None and q_start >= 0 and not on_device,
                OFFSET_ON_DEVICE=on_device, num_warps=NUM_WARPS)
    grid = (n_pm * splits, batch * hkv)

    def launch(phase: int) -> None:  # float32 at head dim 256 with 128-key tiles fits with fewer stages than 3
        launch_fitting("probe", lambda _, stages: _probe_kernel[grid](*args, PHASE=phase, **meta, num_stages=stages),
                       lambda: (phase, *sorted(meta.items()), q.dtype, q.device), block, 3, shrink_block=False)

    if splits == 1:
        launch(0)
        return out
    launch(1)
    launch(2)
    _probe_merge_kernel[(n_pm, batch * hkv)](
        pb, ps, out, *out.stride()[:3], n_q, splits, threshold if threshold is not None else 0.0,
        HKV=hkv, BM=bm, KP=kept, KP_LOG=kept.bit_length() - 1, TOPK=topk, HAS_THRESHOLD=threshold is not None,
        num_warps=4)
    return out
