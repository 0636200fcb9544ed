"""Backward block-sparse flash attention (Triton), deterministic and atomic-free.

* ``delta = rowsum(dO * O)`` (fp32) and a copy of the LSE with empty rows' ``-inf`` as ``+inf`` (their P is then 0),
  both in padded row-major buffers (rows of a multiple of 16 bytes, so TMA can load them), by a small kernel;
* dK/dV key-major: one program owns ``BLOCK_N`` keys of one KV head and walks the query tiles of the transposed
  index (``BlockIndex.transposed()``), for every query head of its group, so each dK/dV element has one writer;
* dQ query-major over the forward lists, with the same head packing as the forward.

Probabilities are recomputed from the forward's log2-domain LSE; partial tiles apply the same element mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import attention_bwd_gluon
from .attention_fwd import _dot, _dot_acc, _next_pow2, seg_args
from .bwd_split import SplitLists, reduce_split
from .common import (
    element_mask,
    index_strides,
    kv_descriptors,
    launch_fitting,
    load_rows,
    query_tile_rows,
    score_constants,
    tanh_f32,
)
from .tma import ensure_allocator


@dataclass(frozen=True)
class BwdConfig:
    """Tiles of the two backward kernels: dK/dV (keys x query rows) and dQ (packed query rows x keys)."""

    kv_block_n: int
    kv_block_m: int
    kv_warps: int
    kv_stages: int
    q_block_m: int
    q_block_n: int
    q_warps: int
    q_stages: int


# H100 defaults per head dim (bf16/fp16), the fastest of scripts/gpu_kernels.py --tune (D=128 re-tuned after the
# in-MMA accumulation; docs/kernel-decisions.md).
BWD_CONFIGS: dict[int, BwdConfig] = {
    64: BwdConfig(64, 64, 4, 3, 64, 64, 4, 3),
    128: BwdConfig(128, 64, 8, 3, 128, 64, 8, 3),
    256: BwdConfig(32, 64, 4, 2, 64, 32, 4, 2),
}
# What opt-in runtime tuning (kernels/autotune.py) and scripts/gpu_kernels.py --tune try, per head dim.
BWD_CANDIDATES: dict[int, list[BwdConfig]] = {
    64: [BwdConfig(64, 64, 4, 3, 64, 64, 4, 3), BwdConfig(128, 64, 8, 3, 128, 64, 8, 3),
         BwdConfig(128, 32, 4, 3, 128, 32, 4, 3)],
    128: [BwdConfig(128, 64, 8, 3, 128, 64, 8, 3), BwdConfig(128, 64, 8, 2, 128, 64, 8, 2),
          BwdConfig(64, 64, 4, 3, 64, 64, 4, 3), BwdConfig(128, 32, 8, 3, 64, 64, 4, 3),
          BwdConfig(128, 32, 8, 3, 128, 64, 8, 3), BwdConfig(64, 64, 4, 2, 128, 64, 8, 3)],
    256: [BwdConfig(32, 64, 4, 2, 64, 32, 4, 2), BwdConfig(64, 32, 8, 2, 64, 32, 8, 2),
          BwdConfig(64, 64, 8, 2, 64, 64, 8, 2)],
}


@triton.jit
def _bwd_preprocess_kernel(Out, DO, LSE, DELTA, LSE_BWD, s_ob, s_oh, s_ot, s_db, s_dh, s_dt, s_lb, s_lh, H, L, L_PAD,
                           BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta[b, h, t] = sum_d dO * Out in fp32; lse_bwd[b, h, t] = the LSE with -inf (empty rows) as +inf."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    ok = t < L
    o = tl.load(Out + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + t[:, None] * s_dt + d[None, :], mask=ok[:, None], other=0.0)
    row = bh.to(tl.int64) * L_PAD + t
    tl.store(DELTA + row, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)
    lse = tl.load(LSE + b * s_lb + h * s_lh + t, mask=ok, other=0.0)
    tl.store(LSE_BWD + row, tl.where(lse == float("-inf"), float("inf"), lse), mask=ok)


@triton.jit
def _scores_and_tanh(qk, qk_mul, cap2, SOFTCAP: tl.constexpr):
    """Log2-domain scores of raw q.k and, with softcap, the tanh the gradient needs (without softcap the second
    value is unused)."""
    if SOFTCAP:
        th = tanh_f32(qk * qk_mul)
        return cap2 * th, th
    else:
        return qk * qk_mul, qk


@triton.jit
def _softcap_grad(ds, th, SOFTCAP: tl.constexpr):
    """dS times the tanh derivative ``1 - tanh^2`` when soft-capping (the constant factors are applied as without
    softcap)."""
    if SOFTCAP:
        return ds * (1.0 - th * th)
    else:
        return ds


@triton.jit
def _dkdv_step(
    dk, dv, k, v, k_abs, k_t, mt, selected, rem, b, hkv, part, q_desc, do_desc, lse_desc, delta_desc,
    Q, DO, LSE, DELTA, KSEG, QSEG, KRANK, s_qb, s_qh, s_qt, s_db, s_dh, s_dt, s_lb, s_lh,
    s_kseg_b, s_qseg_b, s_krank_b, Hkv, G: tl.constexpr, q_len, kv_len, q_offset, sink, window, qk_mul, cap2,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    HAS_KSEG: tl.constexpr, HAS_QSEG: tl.constexpr, HAS_KRANK: tl.constexpr, USE_TMA: tl.constexpr,
    ROW_TMA: tl.constexpr,
):
    """One (query tile, row block, query head) visit of a key block: accumulate dK (unscaled) and dV; ``part`` (a
    runtime flag) marks a partial tile, which gets the element mask. With USE_TMA the query and dO rows (and their
    LSE and delta with ROW_TMA: their row offset must be 16-byte aligned, so the query offset a multiple of 4) come
    through per-batch descriptors ([head, row(, dim)]; rows outside the sequence read 0): bulk copies instead of
    per-thread addresses and row predicates. LSE here is the backward's copy (``+inf`` for empty
    rows); LSE and DELTA share the strides ``s_lb, s_lh``."""
    h = rem % G
    q_abs = (q_offset // BLOCK + mt) * BLOCK + (rem // G) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_t = q_abs - q_offset
    q_ok = (q_t >= 0) & (q_t < q_len)
    hq = hkv * G + h
    d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        t_first = ((q_offset // BLOCK + mt) * BLOCK + (rem // G) * BLOCK_M - q_offset).to(tl.int32)
        q = tl.reshape(q_desc.load([hq.to(tl.int32), t_first, 0]), [BLOCK_M, HEAD_DIM])
        do = tl.reshape(do_desc.load([hq.to(tl.int32), t_first, 0]), [BLOCK_M, HEAD_DIM])
    else:
        q = tl.load(Q + b * s_qb + hq * s_qh + q_t[:, None] * s_qt + d[None, :], mask=q_ok[:, None], other=0.0)
        do = tl.load(DO + b * s_db + hq * s_dh + q_t[:, None] * s_dt + d[None, :], mask=q_ok[:, None], other=0.0)
    if ROW_TMA:  # rows outside the sequence read 0 (their q and dO are 0 too, so they add nothing)
        lse = tl.reshape(lse_desc.load([hq.to(tl.int32), t_first]), [BLOCK_M])
        delta = tl.reshape(delta_desc.load([hq.to(tl.int32), t_first]), [BLOCK_M])
    else:
        lse = tl.load(LSE + b * s_lb + hq * s_lh + q_t, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + b * s_lb + hq * s_lh + q_t, mask=q_ok, other=0.0)
    qk = _dot(k, tl.trans(q), IEEE)  # (BLOCK_N, BLOCK_M)
    s, th = _scores_and_tanh(qk, qk_mul, cap2, SOFTCAP)
    if part:  # a partial entry: the token-exact element mask
        keep = element_mask(
            q_abs[None, :], k_abs[:, None], q_t[None, :], k_t[:, None], b, selected,
            KSEG, QSEG, KRANK, s_kseg_b, s_qseg_b, s_krank_b, q_len, kv_len, sink, window,
            HAS_KSEG, HAS_QSEG, HAS_KRANK,
        )
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse[None, :])
    dv = _dot_acc(p.to(do.dtype), do, dv, IEEE)
    dp = _dot(v, tl.trans(do), IEEE)
    ds = p * (dp - delta[None, :])
    ds = _softcap_grad(ds, th, SOFTCAP)
    dk = _dot_acc(ds.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    FC, FT, PC, PT,
    VT, VS, SCR_K, SCR_V, s_sb, s_sh, s_ss,
    KSEG, QSEG, KRANK,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_lb, s_lh,
    s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt,
    s_ib, s_ih, f_width, p_width, s_kseg_b, s_qseg_b, s_krank_b,
    Hkv, G: tl.constexpr, q_len, kv_len, q_offset, kv_offset, sink, window,
    qk_mul, cap2, scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    HAS_KSEG: tl.constexpr, HAS_QSEG: tl.constexpr, HAS_KRANK: tl.constexpr, SPLIT: tl.constexpr,
    USE_TMA: tl.constexpr, ROW_TMA: tl.constexpr,
):
    N_SUB_N: tl.constexpr = BLOCK // BLOCK_N
    N_SUB_M: tl.constexpr = BLOCK // BLOCK_M
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)  # 64-bit bases: B*H*L*D exceeds 2**31 at 1M tokens
    hkv = (bh % Hkv).to(tl.int64)
    row = pid // N_SUB_N  # a key tile, or with SPLIT a chunk ("virtual row") of a key tile's query-tile list
    irow = b * s_ib + hkv * s_ih + row
    if SPLIT:
        n = tl.load(VT + irow)
    else:
        n = row
    kb0 = kv_offset // BLOCK
    k_abs = (kb0 + n) * BLOCK + (pid % N_SUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_t = k_abs - kv_offset
    k_in = (k_t >= 0) & (k_t < kv_len)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * s_kb + hkv * s_kh + k_t[:, None] * s_kt + d[None, :], mask=k_in[:, None], other=0.0)
    v = tl.load(V + b * s_vb + hkv * s_vh + k_t[:, None] * s_vt + d[None, :], mask=k_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(Q + b * s_qb, shape=[Hkv * G, q_len, HEAD_DIM], strides=[s_qh, s_qt, 1],
                                           block_shape=[1, BLOCK_M, HEAD_DIM])
        do_desc = tl.make_tensor_descriptor(DO + b * s_db, shape=[Hkv * G, q_len, HEAD_DIM], strides=[s_dh, s_dt, 1],
                                            block_shape=[1, BLOCK_M, HEAD_DIM])
    else:
        q_desc, do_desc = Q, DO
    if ROW_TMA:
        lse_desc = tl.make_tensor_descriptor(LSE + b * s_lb, shape=[Hkv * G, q_len], strides=[s_lh, 1],
                                             block_shape=[1, BLOCK_M])
        delta_desc = tl.make_tensor_descriptor(DELTA + b * s_lb, shape=[Hkv * G, q_len], strides=[s_lh, 1],
                                               block_shape=[1, BLOCK_M])
    else:
        lse_desc, delta_desc = LSE, DELTA

    f_cnt = tl.load(FC + irow)
    p_cnt = tl.load(PC + irow)
    per_tile: tl.constexpr = N_SUB_M * G  # G is a compile-time constant: the per-entry // and % become shifts
    # One loop over the full entries, then the partial ones (a branch applies the element mask to the latter): with
    # two loops, Triton 3.6's code made ptxas serialise every wgmma of the kernel (warning C7515, a wait per MMA).
    for it in range(0, (f_cnt + p_cnt) * per_tile):
        e = it // per_tile
        is_full = e < f_cnt
        raw_f = tl.load(FT + irow * f_width + e, mask=is_full, other=0)
        raw_p = tl.load(PT + irow * p_width + (e - f_cnt), mask=~is_full, other=0)
        raw = tl.where(is_full, raw_f, raw_p)
        mt = tl.where(raw < 0, -raw - 1, raw)
        dk, dv = _dkdv_step(
            dk, dv, k, v, k_abs, k_t, mt, raw < 0, it % per_tile, b, hkv, ~is_full, q_desc, do_desc, lse_desc,
            delta_desc, Q, DO, LSE, DELTA, KSEG, QSEG, KRANK, s_qb, s_qh, s_qt, s_db, s_dh, s_dt, s_lb, s_lh,
            s_kseg_b, s_qseg_b, s_krank_b, Hkv, G, q_len, kv_len, q_offset, sink, window, qk_mul, cap2,
            BLOCK, BLOCK_M, HEAD_DIM, SOFTCAP, IEEE, HAS_KSEG, HAS_QSEG, HAS_KRANK, USE_TMA, ROW_TMA,
        )

    dk = dk * scale
    slot = -1
    if SPLIT:
        slot = tl.load(VS + irow)  # -1: the tile has one chunk, store directly; >= 0: fp32 partial; -2: padding
    if slot >= 0:
        r = (pid % N_SUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        base = b * s_sb + hkv * s_sh + slot * s_ss + r[:, None] * HEAD_DIM + d[None, :]
        tl.store(SCR_K + base, dk)
        tl.store(SCR_V + base, dv)
    elif slot == -1:
        tl.store(DK + b * s_dkb + hkv * s_dkh + k_t[:, None] * s_dkt + d[None, :], dk.to(DK.dtype.element_ty),
                 mask=k_in[:, None])
        tl.store(DV + b * s_dvb + hkv * s_dvh + k_t[:, None] * s_dvt + d[None, :], dv.to(DV.dtype.element_ty),
                 mask=k_in[:, None])


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, k_desc, k_base, v_desc, v_base, t0, kk, d, q_abs, q_t, b, selected,
    KSEG, QSEG, KRANK, s_kt, s_vt, s_kseg_b, s_qseg_b, s_krank_b, q_len, kv_len, kv_offset, sink, window,
    qk_mul, cap2, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    HAS_KSEG: tl.constexpr, HAS_QSEG: tl.constexpr, HAS_KRANK: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One key tile (first storage row ``t0``) of the query-major dQ pass: recompute P and dP, accumulate dS.K
    (unscaled); MASKED applies the partial tile's element mask."""
    k_t = t0 + kk
    k_in = (k_t >= 0) & (k_t < kv_len)
    k = load_rows(k_desc, k_base, t0, k_t, s_kt, d, k_in, MASKED, USE_TMA)
    v = load_rows(v_desc, v_base, t0, k_t, s_vt, d, k_in, MASKED, USE_TMA)
    qk = _dot(q, tl.trans(k), IEEE)
    s, th = _scores_and_tanh(qk, qk_mul, cap2, SOFTCAP)
    if MASKED:
        keep = element_mask(
            q_abs[:, None], (k_t + kv_offset)[None, :], q_t[:, None], k_t[None, :], b, selected,
            KSEG, QSEG, KRANK, s_kseg_b, s_qseg_b, s_krank_b, q_len, kv_len, sink, window,
            HAS_KSEG, HAS_QSEG, HAS_KRANK,
        )
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    ds = _softcap_grad(ds, th, SOFTCAP)
    return _dot_acc(ds.to(k.dtype), k, dq, IEEE)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    FC, FT, PC, PT,
    KSEG, QSEG, KRANK,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_lb, s_lh,
    s_dqb, s_dqh, s_dqt,
    s_ib, s_ih, f_width, p_width, s_kseg_b, s_qseg_b, s_krank_b,
    Hkv, G, q_len, kv_len, q_offset, kv_offset, n_q_tiles, sink, window,
    qk_mul, cap2, scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, HPP: tl.constexpr, HEAD_DIM: tl.constexpr,
    SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    HAS_KSEG: tl.constexpr, HAS_QSEG: tl.constexpr, HAS_KRANK: tl.constexpr, USE_TMA: tl.constexpr,
):
    BLOCK_M: tl.constexpr = SUB_M * HPP
    N_SUB_N: tl.constexpr = BLOCK // BLOCK_N
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)  # 64-bit bases: B*H*L*D exceeds 2**31 at 1M tokens
    hkv = (bh % Hkv).to(tl.int64)
    q_abs, q_t, row_ok, hq, irow, f_cnt, p_cnt = query_tile_rows(
        pid, b, hkv, FC, PC, s_ib, s_ih, G, q_len, q_offset, n_q_tiles, BLOCK, SUB_M, HPP)
    kb0 = kv_offset // BLOCK
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + hq[:, None] * s_qh + q_t[:, None] * s_qt + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + hq[:, None] * s_dh + q_t[:, None] * s_dt + d[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + b * s_lb + hq * s_lh + q_t, mask=row_ok, other=float("inf"))  # the backward's copy
    delta = tl.load(DELTA + b * s_lb + hq * s_lh + q_t, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kk = tl.arange(0, BLOCK_N)
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    k_desc, v_desc = kv_descriptors(k_base, v_base, kv_len, s_kt, s_vt, BLOCK_N, HEAD_DIM, USE_TMA)

    for it in range(0, f_cnt * N_SUB_N):
        n = tl.load(FT + irow * f_width + it // N_SUB_N)
        t0 = (kb0 + n) * BLOCK + (it % N_SUB_N) * BLOCK_N - kv_offset
        dq = _dq_step(
            dq, q, do, lse, delta, k_desc, k_base, v_desc, v_base, t0, kk, d, q_abs, q_t, b, False,
            KSEG, QSEG, KRANK, s_kt, s_vt, s_kseg_b, s_qseg_b, s_krank_b, q_len, kv_len, kv_offset, sink, window,
            qk_mul, cap2, False, SOFTCAP, IEEE, HAS_KSEG, HAS_QSEG, HAS_KRANK, USE_TMA,
        )
    for it in range(0, p_cnt * N_SUB_N):
        raw = tl.load(PT + irow * p_width + it // N_SUB_N)
        selected = raw < 0
        n = tl.where(selected, -raw - 1, raw)
        t0 = (kb0 + n) * BLOCK + (it % N_SUB_N) * BLOCK_N - kv_offset
        dq = _dq_step(
            dq, q, do, lse, delta, k_desc, k_base, v_desc, v_base, t0, kk, d, q_abs, q_t, b, selected,
            KSEG, QSEG, KRANK, s_kt, s_vt, s_kseg_b, s_qseg_b, s_krank_b, q_len, kv_len, kv_offset, sink, window,
            qk_mul, cap2, True, SOFTCAP, IEEE, HAS_KSEG, HAS_QSEG, HAS_KRANK, USE_TMA,
        )

    dq = dq * scale
    tl.store(DQ + b * s_dqb + hq[:, None] * s_dqh + q_t[:, None] * s_dqt + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@dataclass(slots=True)
class BackwardPlan:
    """The choices ``kernels/dispatch.py`` made for one backward call; :func:`prepare_backward` carries them out.

    ``split``: the dK/dV lists cut into chunks (None: one program per key tile). ``gluon_dkdv`` / ``gluon_dq``: the
    Hopper kernels run that pass (with the ring depths, key step, slots and grid given here). ``side_stream``: dQ
    runs on it beside dK/dV (None: one after the other), the dQ kernel launched first when ``dq_first``. ``tma``:
    the Triton dQ kernel loads K/V through TMA; ``rows_tma``: the Triton dK/dV kernel loads query, dO, LSE and
    delta rows through TMA."""

    split: SplitLists | None
    gluon_dkdv: bool
    gluon_dq: bool
    side_stream: torch.cuda.Stream | None
    dq_first: bool
    tma: bool
    rows_tma: bool
    gluon_dkdv_stages: int | None  # None where the Triton kernel runs that pass
    gluon_dq_block_n: int
    gluon_dq_stages: int | None
    gluon_dq_q_slots: int
    gluon_dq_persistent: bool | None


def prepare_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    t_full_count: torch.Tensor, t_full_tiles: torch.Tensor, t_part_count: torch.Tensor, t_part_tiles: torch.Tensor,
    k_seg: torch.Tensor | None, q_seg: torch.Tensor | None, k_rank: torch.Tensor | None,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float, softcap: float,
    plan: BackwardPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[BwdConfig], None]]:
    """Run the delta preprocess kernel for last-dim-contiguous inputs (``lse``: the forward's log2-domain LSE) and
    return dq, dk, dv and ``launch(config)`` that fills them: dK/dV and dQ as ``plan`` says (autotuning calls it
    once per candidate; the Gluon kernels ignore the config)."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    ieee = q.dtype == torch.float32
    qk_mul, cap2 = score_constants(scale, softcap)
    (ks, ks_b), (qs, qs_b), (kr, kr_b) = seg_args(k_seg, q_seg, k_rank, full_count)

    l_pad = -(-q_len // 4) * 4  # fp32 rows of a multiple of 16 bytes (TMA's stride rule)
    delta = torch.empty(batch, hq, l_pad, device=q.device, dtype=torch.float32)
    lse_bwd = torch.empty_like(delta)
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(q_len, pre_block), batch * hq)](
        o, do, lse, delta, lse_bwd, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), hq, q_len, l_pad,
        BLOCK=pre_block, HEAD_DIM=dim,
    )

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    n_k = t_full_count.shape[2]
    split = plan.split
    if split is not None:
        t_full_count, t_full_tiles, t_part_count, t_part_tiles = split.lists
        n_k = t_full_count.shape[2]  # virtual rows
        scr_k = torch.empty(batch, hkv, max(1, split.n_slots), block, dim, device=q.device, dtype=torch.float32)
        scr_v = torch.empty_like(scr_k)
        vt, vs = split.tile, split.slot
    else:
        scr_k = scr_v = vt = vs = t_full_count
    s_ib_t, s_ih_t = index_strides(t_full_count)
    s_ib, s_ih = index_strides(full_count)
    common_strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse_bwd.stride(0), lse_bwd.stride(1),  # delta has the same layout
    )
    flags = dict(
        SOFTCAP=bool(softcap), IEEE=ieee,
        HAS_KSEG=k_seg is not None, HAS_QSEG=q_seg is not None, HAS_KRANK=k_rank is not None,
    )
    dq = torch.empty_like(q)
    n_q = full_count.shape[2]
    tma, rows_tma = plan.tma, plan.rows_tma
    if tma or rows_tma:
        ensure_allocator()
    side = plan.side_stream

    def launch(cfg: BwdConfig) -> None:
        """dK/dV (key-major, then the split reduction) and dQ (query-major, on the side stream if any)."""
        if side is None:
            launch_dkdv(cfg)
            launch_dq(cfg)
            return
        main = torch.cuda.current_stream(q.device)
        side.wait_stream(main)  # delta and the inputs are ready
        if not plan.dq_first:
            launch_dkdv(cfg)
        torch.cuda.set_stream(side)  # (torch.cuda.stream()'s context manager costs more host time per call)
        try:
            launch_dq(cfg)
        finally:
            torch.cuda.set_stream(main)
        if plan.dq_first:
            launch_dkdv(cfg)
        main.wait_stream(side)  # dq is complete before anything later on the caller's stream

    def launch_dkdv(cfg: BwdConfig) -> None:
        if plan.gluon_dkdv:
            attention_bwd_gluon.attention_dkdv_gluon(
                q, k, v, do, lse_bwd, delta, dk, dv, t_full_count, t_full_tiles, t_part_count, t_part_tiles,
                None if split is None else vt, None if split is None else vs,
                None if split is None else scr_k, None if split is None else scr_v,
                block, q_offset, kv_offset, sink, window, scale, stages=plan.gluon_dkdv_stages)
            if split is not None:
                reduce_split(split, scr_k, scr_v, dk, dv, kv_offset, block)
            return
        kv_block_n = min(cfg.kv_block_n, block)
        kv_block_m = min(cfg.kv_block_m, block)
        # the key block here is the program's keys (its grid follows); the query step stays
        launch_fitting("dkdv", lambda bn, st: run_dkdv(bn, kv_block_m, cfg.kv_warps, st),
                       lambda: (dim, block, kv_block_n, kv_block_m, cfg.kv_warps, cfg.kv_stages, q.dtype,
                                split is not None, rows_tma, q.device, tuple(sorted(flags.items()))),
                       kv_block_n, cfg.kv_stages)
        if split is not None:
            reduce_split(split, scr_k, scr_v, dk, dv, kv_offset, block)

    def run_dkdv(kv_block_n: int, kv_block_m: int, warps: int, stages: int) -> None:
        _attn_bwd_dkdv_kernel[(n_k * (block // kv_block_n), batch * hkv)](
            q, k, v, do, lse_bwd, delta, dk, dv,
            t_full_count, t_full_tiles, t_part_count, t_part_tiles,
            vt, vs, scr_k, scr_v, scr_k.stride(0), scr_k.stride(1), scr_k.stride(2),
            ks, qs, kr,
            *common_strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            s_ib_t, s_ih_t, t_full_tiles.shape[-1], t_part_tiles.shape[-1], ks_b, qs_b, kr_b,
            hkv, group, q_len, kv_len, q_offset, kv_offset, sink, window,
            qk_mul, cap2, scale,
            BLOCK=block, BLOCK_N=kv_block_n, BLOCK_M=kv_block_m, HEAD_DIM=dim, **flags, SPLIT=split is not None,
            USE_TMA=rows_tma, ROW_TMA=rows_tma and q_offset % 4 == 0,
            num_warps=warps, num_stages=stages,
        )

    def launch_dq(cfg: BwdConfig) -> None:
        if plan.gluon_dq:
            attention_bwd_gluon.attention_dq_gluon(
                q, k, v, do, lse_bwd, delta, dq, full_count, full_tiles, part_count, part_tiles,
                block, q_offset, kv_offset, sink, window, scale, block_n=plan.gluon_dq_block_n,
                stages=plan.gluon_dq_stages, q_slots=plan.gluon_dq_q_slots, persistent=plan.gluon_dq_persistent)
            return
        block_m = min(cfg.q_block_m, block * _next_pow2(group))
        sub_m = min(block, block_m, max(16, _next_pow2(q_len)))
        hpp = max(1, min(_next_pow2(group), block_m // sub_m))
        q_block_n = min(cfg.q_block_n, block)
        n_hc = math.ceil(group / hpp)
        launch_fitting("dq", lambda bn, st: run_dq(sub_m, hpp, n_hc, bn, cfg.q_warps, st),
                       lambda: (dim, block, sub_m, hpp, q_block_n, cfg.q_warps, cfg.q_stages, q.dtype, tma, q.device,
                                tuple(sorted(flags.items()))),
                       q_block_n, cfg.q_stages)

    def run_dq(sub_m: int, hpp: int, n_hc: int, q_block_n: int, warps: int, stages: int) -> None:
        _attn_bwd_dq_kernel[(n_q * (block // sub_m) * n_hc, batch * hkv)](
            q, k, v, do, lse_bwd, delta, dq,
            full_count, full_tiles, part_count, part_tiles,
            ks, qs, kr,
            *common_strides,
            dq.stride(0), dq.stride(1), dq.stride(2),
            s_ib, s_ih, full_tiles.shape[-1], part_tiles.shape[-1], ks_b, qs_b, kr_b,
            hkv, group, q_len, kv_len, q_offset, kv_offset, n_q, sink, window,
            qk_mul, cap2, scale,
            BLOCK=block, BLOCK_N=q_block_n, SUB_M=sub_m, HPP=hpp, HEAD_DIM=dim, **flags, USE_TMA=tma,
            num_warps=warps, num_stages=stages,
        )

    return dq, dk, dv, launch
