"""Warp-specialised forward for Hopper: one TMA producer warpgroup feeds two consumer warpgroups.

Same math and outputs as ``attention_fwd._attn_fwd_kernel`` (online softmax in the log2 domain, fp32
accumulation, O and the log2 LSE, zeros and ``-inf`` for rows that attend nothing), written in the form Triton's
Hopper warp-specialisation pass (``tl.range(..., warp_specialize=True)``, Triton >= 3.6) accepts:

- one loop: full tiles, then partial tiles, in a single ``tl.range`` (the pass handles one loop per kernel);
- Q, K and V through TMA descriptors (the pass only hands TMA-loaded data from producer to consumers);
- no branch inside the loop (the pass skips loops with an ``else`` region), so every tile goes through the
  mask, written as two bounds per key column (a few integer ops per score) instead of the general predicate;
- the partial list read into registers before the loop, so the consumers' mask depends on no load inside it.

Hence its limits: one query head per program (``HPP == 1``), no segment / rank tensors (left padding, packed
documents, per-token ranks use the general kernel) and partial lists of at most ``P_MAX`` tiles per row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import query_tile_rows

# None: automatic (CUDA Hopper, Triton >= 3.6, inputs the kernel supports); False: never; True: whenever the
# inputs are supported (also in the interpreter, for tests).
WARP_SPECIALIZE: bool | None = None
ROWS = 128  # query rows per program: two consumer warpgroups of 64 rows (wgmma's M)
MAX_PARTIAL = 32  # longest partial list per row held in registers


@dataclass(frozen=True)
class WsConfig:
    """Key-tile width and pipeline depth of the warp-specialised forward (4 warps per warpgroup, 3 warpgroups)."""

    block_n: int
    num_stages: int


# H100 defaults (shared memory: Q 128 rows + num_stages x (K and V tiles) must fit in 227 KB).
WS_CONFIGS: dict[int, WsConfig] = {64: WsConfig(128, 3), 128: WsConfig(128, 2)}
WS_CANDIDATES: dict[int, list[WsConfig]] = {
    64: [WsConfig(128, 3), WsConfig(64, 4), WsConfig(128, 2)],
    128: [WsConfig(128, 2), WsConfig(64, 3), WsConfig(64, 2)],
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_has_hopper_ws() -> bool:
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 6)


def ws_applicable(q: torch.Tensor, block: int, has_segments: bool, softcap: float, p_width: int,
                  tma_ok: bool) -> bool:
    """Whether the warp-specialised forward runs these inputs (else the general kernel, same results)."""
    if WARP_SPECIALIZE is False or has_segments or softcap or not tma_ok:
        return False
    if q.shape[-1] not in WS_CONFIGS or block % ROWS or q.shape[2] < ROWS or p_width > MAX_PARTIAL:
        return False
    if WARP_SPECIALIZE is True:
        return _interpreting() or q.dtype in (torch.float16, torch.bfloat16)
    if not q.is_cuda or _interpreting() or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9 and _triton_has_hopper_ws()


@triton.jit
def column_bounds(k_t, kv_offset, kv_len, selected, is_part, sink, window, BIG: tl.constexpr):
    """Query positions ``[lo, hi)`` that attend each key column of a tile: for partial tiles the element mask of
    ``common.element_mask`` without segment / rank tensors (causal, keys in range, sinks, window, selected
    tiles); for full tiles every row."""
    k_abs = k_t + kv_offset
    k_in = (k_t >= 0) & (k_t < kv_len)
    all_rows = selected | ((sink > 0) & (k_abs < sink))
    lo = tl.where(k_in, k_abs, BIG)
    hi = tl.where(all_rows, BIG, tl.where(window > 0, k_abs + tl.minimum(window, BIG), -BIG))
    return tl.where(is_part, lo, -BIG), tl.where(is_part, hi, BIG)


@triton.jit
def _attn_fwd_ws_kernel(
    Q, K, V, Out, LSE,
    FC, FT, PC, PT,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
    s_ib, s_ih, f_width, p_width,
    Hkv, G, q_len, kv_len, q_offset, kv_offset, n_q_tiles, sink, window,
    qk_mul,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, HEAD_DIM: tl.constexpr, P_MAX: tl.constexpr,
):
    BIG: tl.constexpr = 1 << 30
    N_SUB_N: tl.constexpr = BLOCK // BLOCK_N
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)  # 64-bit bases: B*H*L*D exceeds 2**31 at 1M tokens
    hkv = (bh % Hkv).to(tl.int64)
    q_abs, q_t, row_ok, hq, irow, f_cnt, p_cnt = query_tile_rows(
        pid, b, hkv, FC, PC, s_ib, s_ih, G, q_len, q_offset, n_q_tiles, BLOCK, SUB_M, 1)
    # this program's head and first storage row, as scalars (the same numbers query_tile_rows spreads over rows)
    per_tile = (BLOCK // SUB_M) * G
    head = hkv * G + (pid % per_tile) % G
    first_t = (q_offset // BLOCK + n_q_tiles - 1 - pid // per_tile) * BLOCK + ((pid % per_tile) // G) * SUB_M
    first_t = first_t - q_offset
    q_desc = tl.make_tensor_descriptor(Q + b * s_qb + head * s_qh, shape=[q_len, HEAD_DIM], strides=[s_qt, 1],
                                       block_shape=[SUB_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + b * s_kb + hkv * s_kh, shape=[kv_len, HEAD_DIM], strides=[s_kt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * s_vb + hkv * s_vh, shape=[kv_len, HEAD_DIM], strides=[s_vt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    q = q_desc.load([first_t, 0])  # rows outside [0, q_len) read as zeros and are never stored

    m_i = tl.full([SUB_M], float("-inf"), tl.float32)
    l_i = tl.zeros([SUB_M], tl.float32)
    acc = tl.zeros([SUB_M, HEAD_DIM], tl.float32)
    kk = tl.arange(0, BLOCK_N)
    kb0 = kv_offset // BLOCK
    pr = tl.arange(0, P_MAX)
    prow = tl.load(PT + irow * p_width + pr, mask=pr < p_cnt, other=0)
    n_full = f_cnt * N_SUB_N
    for it in tl.range(0, (f_cnt + p_cnt) * N_SUB_N, warp_specialize=True):
        is_part = it >= n_full
        j = tl.where(is_part, it - n_full, it)
        sub_n = (j % N_SUB_N) * BLOCK_N
        raw = tl.sum(tl.where(pr == j // N_SUB_N, prow, 0))  # this partial tile (or 0 past the list), no load
        selected = raw < 0
        pn = tl.where(selected, -raw - 1, raw)
        fn = tl.load(FT + irow * f_width + j // N_SUB_N, mask=not is_part, other=0)
        t0 = (kb0 + tl.where(is_part, pn, fn)) * BLOCK + sub_n - kv_offset  # first key row (storage)
        k = k_desc.load([t0, 0])
        lo, hi = column_bounds((kb0 + pn) * BLOCK + sub_n - kv_offset + kk, kv_offset, kv_len, selected, is_part,
                               sink, window, BIG)
        keep = (q_abs[:, None] >= lo[None, :]) & (q_abs[:, None] < hi[None, :])
        qk = tl.where(keep, tl.dot(q, tl.trans(k)), float("-inf"))
        # max before scaling (qk_mul > 0), then one fused multiply-add per score; guard rows with nothing yet
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_mul)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk * qk_mul - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([t0, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    d = tl.arange(0, HEAD_DIM)
    tl.store(Out + b * s_ob + hq[:, None] * s_oh + q_t[:, None] * s_ot + d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + b * s_lb + hq * s_lh + q_t, lse, mask=row_ok)
