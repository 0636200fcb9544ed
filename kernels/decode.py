"""Split-KV (flash-decoding) forward for short query runs: decode steps and small chunks (q_len <= 64).

A decode step has one query row per head: the prefill kernel would give each (batch, KV head) one program that
walks every listed key tile alone, so one sequence with a long selection leaves most of the GPU idle. Here the key
tiles a query tile visits are cut into ``n_splits`` contiguous shares; each program attends its share for all the
query rows of the tile and the query heads of its KV group (packed into the M dimension, as in the forward kernel),
and writes an unnormalised partial (acc, running max, running sum). A second kernel merges the partials with their
log-sum-exp weights. With one split the first kernel writes the normalised output directly.

The key tiles come from one of two sources:

* lists: a ``BlockIndex``'s full and partial lists (any pattern, padding, packing, top-k);
* ranges: no index at all. The sink tiles ``[sink_lo, sink_hi)`` (per batch row when padding moves the first real
  key), the window tiles ``[win_lo, win_hi)`` and, optionally, per query tile a list of selected tiles (dynamic
  selection; -1 = none). Tile numbers are relative to the first key tile of the call. Every visited tile is masked
  token-exactly (causal, padding, sink/window rule, or "selected": the whole causal block), so ranges may be
  supersets. A selected tile that also lies in a range is visited once, as selected.

Scores live in the log2 domain (``exp2``), accumulation in fp32; rows that see nothing give zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import element_mask, index_strides, launch_fitting, score_constants, tanh_f32

MAX_Q_LEN = 64  # longest query run this kernel takes (decode, speculative / small chunks, a dense tail)
COMBINE_CHUNK = 32  # splits the combine kernel weighs at a time (x COMBINE_D_BLOCK fp32: 8 KB per program)
COMBINE_D_BLOCK = 64  # head-dim slice per combine program (more programs for a long split list and few rows)
MAX_ROWS = 64  # query rows x heads per program (register budget of the fp32 accumulator at head dim 256)


@triton.jit
def _decode_split_kernel(
    Q, K, V, Out, OP, MP, LP,
    FC, FT, PC, PT, SEL, SINKR, KSEG, KRANK, QOFF,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
    s_ib, s_ih, f_width, p_width, s_sel_b, s_sel_h, sel_width, s_kseg_b, s_krank_b,
    Hkv, G, Hq, q_len, kv_len, q_offset, kv_offset, sink, window,
    sink_lo, sink_hi, win_lo, win_hi, n_hc, n_splits, min_sparse,
    qk_mul, cap2,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HPP: tl.constexpr, HEAD_DIM: tl.constexpr,
    SEL_PAD: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, USE_LISTS: tl.constexpr,
    HAS_SEL: tl.constexpr, HAS_SINKR: tl.constexpr, RANGE_SELECTED: tl.constexpr,
    HAS_KSEG: tl.constexpr, HAS_KRANK: tl.constexpr, SINGLE: tl.constexpr, OFFSET_ON_DEVICE: tl.constexpr,
):
    N_SUB: tl.constexpr = BLOCK // BLOCK_N
    M: tl.constexpr = ROWS * HPP
    split = tl.program_id(0)
    mh = tl.program_id(1)
    bh = tl.program_id(2)
    m = mh // n_hc
    hc = mh % n_hc
    b = (bh // Hkv).to(tl.int64)
    hkv = (bh % Hkv).to(tl.int64)
    if OFFSET_ON_DEVICE:  # a static cache's position, read here: the launch reads nothing on the host
        q_offset = tl.load(QOFF).to(tl.int32)
    qb0 = q_offset // BLOCK
    kb0 = kv_offset // BLOCK
    r = tl.arange(0, M)
    head = hc * HPP + r // ROWS
    t_first = tl.maximum((qb0 + m) * BLOCK - q_offset, 0)
    t_end = tl.minimum((qb0 + m + 1) * BLOCK - q_offset, q_len)
    q_t = t_first + r % ROWS
    row_ok = (q_t < t_end) & (head < G)
    q_abs = q_offset + q_t
    hq = hkv * G + head
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + hq[:, None] * s_qh + q_t[:, None] * s_qt + d[None, :], mask=row_ok[:, None], other=0.0)

    # This program's share of the tile's entries.
    if USE_LISTS:
        irow = b * s_ib + hkv * s_ih + m
        f_cnt = tl.load(FC + irow)
        total = f_cnt + tl.load(PC + irow)
        s_lo = 0
        s_hi = 0
        w_lo = 0
        n_win = 0
        sel_row = irow
    else:
        if HAS_SINKR:
            s_lo = tl.load(SINKR + b * 2)
            s_hi = tl.load(SINKR + b * 2 + 1)
        else:
            s_lo = sink_lo
            s_hi = sink_hi
        range_sel = RANGE_SELECTED
        if OFFSET_ON_DEVICE:  # the window's tiles and the dense rows (min_sparse_len) from the offset read above
            win_hi = (q_offset + q_len - 1) // BLOCK - kb0 + 1
            if window > 0:
                win_lo = tl.maximum(kv_offset, q_offset - window + 1) // BLOCK - kb0
            elif RANGE_SELECTED:
                win_lo = 0
            else:
                win_lo = win_hi
            tile_dense = (qb0 + m + 1) * BLOCK <= min_sparse
            s_lo = tl.where(tile_dense, 0, s_lo)
            s_hi = tl.where(tile_dense, 0, s_hi)
            win_lo = tl.where(tile_dense, 0, win_lo)
            range_sel = tile_dense | RANGE_SELECTED
        w_lo = tl.maximum(win_lo, s_hi)
        n_win = tl.maximum(win_hi - w_lo, 0)
        total = (s_hi - s_lo) + n_win
        sel_row = b * s_sel_b + hkv * s_sel_h + m * sel_width
        if HAS_SEL:
            total += sel_width
            slot = tl.arange(0, SEL_PAD)
            sel_vec = tl.load(SEL + sel_row + slot, mask=slot < sel_width, other=-1)
        f_cnt = 0
    total = tl.where(t_first < t_end, total, 0)  # a query tile this call has no row of
    per_split = tl.cdiv(total, n_splits)  # from the device-side count: no host bound can drop an entry
    j0 = split * per_split
    j1 = tl.minimum(j0 + per_split, total)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)
    kk = tl.arange(0, BLOCK_N)
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    for it in range(j0 * N_SUB, j1 * N_SUB):
        j = it // N_SUB
        use = kk >= 0  # all False for a listed tile another source already visits
        if USE_LISTS:
            if j < f_cnt:
                n = tl.load(FT + irow * f_width + j)
                selected = n >= 0
            else:
                raw = tl.load(PT + irow * p_width + j - f_cnt)
                selected = raw < 0
                n = tl.where(selected, -raw - 1, raw)
        else:
            n_sink = s_hi - s_lo
            if j < n_sink:
                n = s_lo + j
            elif j < n_sink + n_win:
                n = w_lo + (j - n_sink)
            else:
                n = tl.load(SEL + sel_row + (j - n_sink - n_win))
                # not -1 (no tile) and not a tile a range already visits
                fresh = (n >= 0) & ((n < s_lo) | (n >= s_hi)) & ((n < w_lo) | (n >= win_hi))
                use = kk < tl.where(fresh, BLOCK_N, 0)  # a comparison: a clean boolean in the interpreter too
            if HAS_SEL:
                selected = (tl.max((sel_vec == n).to(tl.int32), 0) > 0) | range_sel
            else:
                selected = range_sel
        t0 = (kb0 + n) * BLOCK + (it % N_SUB) * BLOCK_N - kv_offset
        k_t = t0 + kk
        k_in = (k_t >= 0) & (k_t < kv_len) & use
        k = tl.load(k_base + k_t[:, None] * s_kt + d[None, :], mask=k_in[:, None], other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            s = cap2 * tanh_f32(qk * qk_mul)
        else:
            s = qk * qk_mul
        keep = element_mask(
            q_abs[:, None], (k_t + kv_offset)[None, :], q_t[:, None], k_t[None, :], b, selected,
            KSEG, KSEG, KRANK, s_kseg_b, 0, s_krank_b, q_len, kv_len, sink, window,
            HAS_KSEG, False, HAS_KRANK,
        )
        keep = keep & k_in[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + k_t[:, None] * s_vt + d[None, :], mask=k_in[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    if SINGLE:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(Out + b * s_ob + hq[:, None] * s_oh + q_t[:, None] * s_ot + d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        row = (b * Hq + hq) * q_len + q_t  # (batch, query head, row) within one split's partials
        base = split.to(tl.int64) * (tl.num_programs(2) // Hkv) * Hq * q_len
        tl.store(MP + base + row, m_i, mask=row_ok)
        tl.store(LP + base + row, l_i, mask=row_ok)
        tl.store(OP + (base + row)[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    Out, OP, MP, LP, s_ob, s_oh, s_ot, Hq, q_len, rows_per_split, n_splits,
    NS_PAD: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
):
    """One program per (row, ``D_BLOCK`` slice of the head dim): the splits' weights from their (max, sum) at once
    (NS_PAD floats), then the partial outputs ``CHUNK`` splits at a time (a (splits x head dim) tile at once spilled:
    512 splits x D 256 is 512 KB of registers)."""
    row = tl.program_id(0).to(tl.int64)  # ((b * Hq) + hq) * q_len + t
    t = row % q_len
    hq = (row // q_len) % Hq
    b = row // (q_len * Hq)
    s = tl.arange(0, NS_PAD)
    ok = s < n_splits
    at = s.to(tl.int64) * rows_per_split + row
    m_s = tl.load(MP + at, mask=ok, other=float("-inf"))
    l_s = tl.load(LP + at, mask=ok, other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m_safe)) * l_s, 0)
    d = tl.program_id(1) * D_BLOCK + tl.arange(0, D_BLOCK)
    c = tl.arange(0, CHUNK)
    acc = tl.zeros([D_BLOCK], dtype=tl.float32)
    for s0 in range(0, n_splits, CHUNK):
        ok_c = s0 + c < n_splits
        at_c = (s0 + c).to(tl.int64) * rows_per_split + row
        m_c = tl.load(MP + at_c, mask=ok_c, other=float("-inf"))
        w_c = tl.where(m_c == float("-inf"), 0.0, tl.exp2(m_c - m_safe))
        parts = tl.load(OP + at_c[:, None] * HEAD_DIM + d[None, :], mask=ok_c[:, None], other=0.0)
        acc += tl.sum(parts * w_c[:, None], 0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * s_ob + hq * s_oh + t * s_ot + d, out.to(Out.dtype.element_ty))


_DUMMIES: dict[torch.device, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """A small int32 tensor standing for absent pointer arguments, made once per device (not a fill per call)."""
    if device not in _DUMMIES:
        _DUMMIES[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _DUMMIES[device]


def tiles_spanned(q_len: int, block: int) -> int:
    """The most query tiles a run of ``q_len`` rows can touch wherever it starts (its offset on the device)."""
    return 1 + (q_len - 2 + block) // block if q_len > 1 else 1


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def decode_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    block: int, q_offset: int | torch.Tensor, kv_offset: int, sink: int, window: int, scale: float, softcap: float,
    n_splits: int,
    min_sparse_len: int = 0,
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ranges: tuple[int, int, int, int] | None = None,
    sink_ranges: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
    range_selected: bool = False,
    k_seg: torch.Tensor | None = None,
    k_rank: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention output (q's shape and dtype) for q_len <= MAX_Q_LEN, from ``lists`` (a block index's
    full_count, full_tiles, part_count, part_tiles) or ``ranges`` = (sink_lo, sink_hi, win_lo, win_hi) tile numbers
    relative to the call's first key tile (``sink_ranges`` (B, 2) int32 replaces the sink pair per batch row;
    ``selected`` (1|B, 1|Hkv, query tiles, k) int32 adds selected tiles; ``range_selected`` attends range tiles as
    whole causal blocks: a dense pattern). Inputs need a unit stride on the head dim; ``n_splits`` >= 1 shares of
    each query tile's entries (the caller, ``kernels/dispatch.py``, picks it).

    ``q_offset`` may be a one-element integer tensor on the inputs' device (a static cache's position under
    torch.compile; ranges mode only, ``selected`` then given for the most query tiles the run can span): the kernel
    reads it and derives the window's tiles and the rows dense under ``min_sparse_len`` itself, so the launch reads
    nothing on the host and a CUDA graph can hold it (``ranges`` then gives the sink tiles and, as its window pair,
    only a bound on the window's tile count)."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    if q_len > MAX_Q_LEN:
        raise ValueError(f"decode_forward takes q_len <= {MAX_Q_LEN}, got {q_len}")
    if (lists is None) == (ranges is None):
        raise ValueError("pass exactly one of lists (a block index) or ranges")
    group = hq // hkv
    offset_on_device = isinstance(q_offset, torch.Tensor)
    if offset_on_device:
        n_q = tiles_spanned(q_len, block)  # the most a run can span; a tile the run misses does nothing
        if lists is not None or (selected is not None and selected.shape[2] != n_q):
            raise ValueError(f"a device-side q_offset works with ranges only (no index lists), and selected tiles "
                             f"for the {n_q} query tile(s) a run of {q_len} can span, got "
                             f"{None if selected is None else tuple(selected.shape)}")
        q_offset_ptr, q_offset = q_offset, 0
    else:
        q_offset_ptr = None
        n_q = (q_offset % block + q_len + block - 1) // block
    rows = max(1, _next_pow2(min(q_len, block)))
    hpp = max(1, min(_next_pow2(group), max(1, MAX_ROWS // rows)))
    if rows * hpp < 16:  # tl.dot needs M >= 16
        rows = 16 // hpp
    n_hc = -(-group // hpp)
    out = torch.empty_like(q)
    qk_mul, cap2 = score_constants(scale, softcap)
    dummy = _dummy(q.device)
    if lists is not None:
        fc, ft, pc, pt = lists
        s_ib, s_ih = index_strides(fc)
        f_width, p_width = ft.shape[-1], pt.shape[-1]
        max_entries = f_width + p_width
        sel, s_sel_b, s_sel_h, sel_width, sel_pad = dummy, 0, 0, 0, 1
        sink_lo = sink_hi = win_lo = win_hi = 0
    else:
        fc = ft = pc = pt = dummy
        s_ib = s_ih = f_width = p_width = 0
        sink_lo, sink_hi, win_lo, win_hi = (int(x) for x in ranges)
        sink_width = (sink_hi - sink_lo) if sink_ranges is None else -(-max(sink, 1) // block) + 1  # typical
        max_entries = max(0, sink_width) + max(0, win_hi - win_lo)
        if selected is not None:
            sel = selected.to(torch.int32).contiguous()
            sel_width = sel.shape[-1]
            s_sel_b = sel.stride(0) if sel.shape[0] > 1 else 0
            s_sel_h = sel.stride(1) if sel.shape[1] > 1 else 0
            sel_pad = max(2, _next_pow2(sel_width))
            max_entries += sel_width
        else:
            sel, s_sel_b, s_sel_h, sel_width, sel_pad = dummy, 0, 0, 0, 1
    # Each program takes ceil(entries / n_splits) of its tile's entries, counted on the device; the host only caps
    # the split count by what the lists can hold (an estimate: it never decides which entries run).
    n_splits = max(1, min(int(n_splits), max_entries))
    single = n_splits == 1
    if single:
        op = mp = lp = dummy
    else:  # one allocation for the partials: (acc, max, sum) per split and row
        rows_all = n_splits * batch * hq * q_len
        work = torch.empty(rows_all * (dim + 2), device=q.device, dtype=torch.float32)
        op, mp, lp = work[: rows_all * dim], work[rows_all * dim: rows_all * (dim + 1)], work[rows_all * (dim + 1):]
    sinkr = dummy if sink_ranges is None else sink_ranges.to(torch.int32).contiguous()
    kseg = dummy if k_seg is None else k_seg
    krank = dummy if k_rank is None else k_rank
    grid = (n_splits, n_q * n_hc, batch * hkv)
    flags = dict(SOFTCAP=bool(softcap), IEEE=q.dtype == torch.float32, USE_LISTS=lists is not None,
                 HAS_SEL=lists is None and selected is not None, HAS_SINKR=sink_ranges is not None,
                 RANGE_SELECTED=bool(range_selected), HAS_KSEG=k_seg is not None, HAS_KRANK=k_rank is not None,
                 SINGLE=single, OFFSET_ON_DEVICE=offset_on_device)
    launch_fitting("decode", lambda bn, st: _decode_split_kernel[grid](
        q, k, v, out, op, mp, lp,
        fc, ft, pc, pt, sel, sinkr, kseg, krank, dummy if q_offset_ptr is None else q_offset_ptr,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        s_ib, s_ih, f_width, p_width, s_sel_b, s_sel_h, sel_width,
        0 if k_seg is None else k_seg.stride(0), 0 if k_rank is None else k_rank.stride(0),
        hkv, group, hq, q_len, kv_len, q_offset, kv_offset, sink, window,
        sink_lo, sink_hi, win_lo, win_hi, n_hc, n_splits, min_sparse_len,
        qk_mul, cap2,
        BLOCK=block, BLOCK_N=bn, ROWS=rows, HPP=hpp, HEAD_DIM=dim, SEL_PAD=sel_pad, **flags,
        num_warps=num_warps, num_stages=st,
    ), lambda: (dim, block, min(block_n, block), rows, hpp, sel_pad, num_warps, num_stages, q.dtype, q.device,
                tuple(sorted(flags.items()))), min(block_n, block), num_stages)
    if not single:
        d_block = min(dim, COMBINE_D_BLOCK)
        _decode_combine_kernel[(batch * hq * q_len, dim // d_block)](
            out, op, mp, lp, out.stride(0), out.stride(1), out.stride(2), hq, q_len, batch * hq * q_len, n_splits,
            NS_PAD=max(2, _next_pow2(n_splits)), CHUNK=min(COMBINE_CHUNK, max(2, _next_pow2(n_splits))),
            HEAD_DIM=dim, D_BLOCK=d_block, num_warps=4,
        )
    return out
