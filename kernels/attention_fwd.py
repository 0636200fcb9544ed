"""Forward block-sparse flash attention (Triton): online softmax over the key tiles a ``BlockIndex`` lists.

One program owns ``SUB_M`` rows of one query tile for ``HPP`` query heads of one KV group (packed into the M
dimension, so the K/V tiles it loads serve several heads: GQA/MQA without ``repeat_kv``). It first walks the full
tiles (no mask), then the partial tiles with the token-exact element mask. Scores live in the log2 domain (scale
folded with 1/ln 2, ``exp2``); accumulation is fp32. Writes O and the log2-domain log-sum-exp (``-inf`` for rows
that attend nothing, whose output is 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
class FwdConfig:
    """Tile shape and launch parameters of the forward kernel (BLOCK_M = SUB_M x heads per program)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# H100 defaults per head dim (bf16/fp16), the fastest of scripts/gpu_kernels.py --tune (sink128+window4096, GQA
# 32/8 heads; D=128 re-tuned with TMA loads; docs/kernel-decisions.md); sound for any input.
FWD_CONFIGS: dict[int, FwdConfig] = {
    64: FwdConfig(128, 64, 4, 3),
    128: FwdConfig(128, 128, 8, 2),
    256: FwdConfig(128, 64, 8, 2),
}
# Short sequences (at most SHORT_Q_LEN queries) at head dim 64: half-height programs, twice as many of them (the brief's
# B16 H96 S512 fp16 shape: 0.275 ms against 0.347 ms with the default, H200; docs/kernel-decisions.md).
SHORT_Q_LEN = 1024
SHORT_FWD_CONFIGS: dict[int, FwdConfig] = {64: FwdConfig(64, 64, 4, 2)}
# What opt-in runtime tuning (kernels/autotune.py) and scripts/gpu_kernels.py --tune try, per head dim.
FWD_CANDIDATES: dict[int, list[FwdConfig]] = {
    64: [FwdConfig(128, 64, 4, 3), FwdConfig(128, 128, 8, 3), FwdConfig(128, 64, 8, 3), FwdConfig(128, 128, 4, 3)],
    128: [FwdConfig(128, 128, 8, 2), FwdConfig(128, 128, 8, 3), FwdConfig(128, 64, 8, 3), FwdConfig(128, 64, 4, 3),
          FwdConfig(128, 64, 8, 4), FwdConfig(64, 64, 4, 3)],
    256: [FwdConfig(128, 64, 8, 2), FwdConfig(64, 64, 8, 2), FwdConfig(64, 32, 4, 2), FwdConfig(128, 32, 8, 2)],
}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with the add inside the MMA (wgmma accumulates in place: no second fp32 tile in registers)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _scores(qk, qk_mul, cap2, SOFTCAP: tl.constexpr):
    """Raw q.k -> log2-domain scores (with tanh soft-capping when SOFTCAP)."""
    if SOFTCAP:
        return cap2 * tanh_f32(qk * qk_mul)
    else:
        return qk * qk_mul


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    FC, FT, PC, PT,
    KSEG, QSEG, KRANK,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
    s_ib, s_ih, f_width, p_width, s_kseg_b, s_qseg_b, s_krank_b,
    Hkv, G, q_len, kv_len, q_offset, kv_offset, n_q_tiles, sink, window,
    qk_mul, cap2,
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


    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kk = tl.arange(0, BLOCK_N)
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    k_desc, v_desc = kv_descriptors(k_base, v_base, kv_len, s_kt, s_vt, BLOCK_N, HEAD_DIM, USE_TMA)

    # Full tiles: every pair attended, keys in range; no mask.
    for it in range(0, f_cnt * N_SUB_N):
        n = tl.load(FT + irow * f_width + it // N_SUB_N)
        t0 = (kb0 + n) * BLOCK + (it % N_SUB_N) * BLOCK_N - kv_offset
        k_t = t0 + kk
        k = load_rows(k_desc, k_base, t0, k_t, s_kt, d, k_t, False, USE_TMA)
        qk = _dot(q, tl.trans(k), IEEE)
        if SOFTCAP:
            s = _scores(qk, qk_mul, cap2, SOFTCAP)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            s = s - m_new[:, None]
        else:  # max before scaling (qk_mul > 0), then one fused multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_mul)
            s = qk * qk_mul - m_new[:, None]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = load_rows(v_desc, v_base, t0, k_t, s_vt, d, k_t, False, USE_TMA)
        acc = _dot_acc(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new

    # Partial tiles: token-exact element mask; rows may see nothing yet (guard -inf - -inf).
    for it in range(0, p_cnt * N_SUB_N):
        raw = tl.load(PT + irow * p_width + it // N_SUB_N)
        selected = raw < 0
        n = tl.where(selected, -raw - 1, raw)
        t0 = (kb0 + n) * BLOCK + (it % N_SUB_N) * BLOCK_N - kv_offset  # first key row of the tile (storage)
        k_t = t0 + kk
        k_abs = k_t + kv_offset
        k_in = (k_t >= 0) & (k_t < kv_len)
        k = load_rows(k_desc, k_base, t0, k_t, s_kt, d, k_in, True, USE_TMA)
        s = _scores(_dot(q, tl.trans(k), IEEE), qk_mul, cap2, SOFTCAP)
        keep = element_mask(
            q_abs[:, None], k_abs[None, :], q_t[:, None], k_t[None, :], b, selected,
            KSEG, QSEG, KRANK, s_kseg_b, s_qseg_b, s_krank_b, q_len, kv_len, sink, window,
            HAS_KSEG, HAS_QSEG, HAS_KRANK,
        )
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = load_rows(v_desc, v_base, t0, k_t, s_vt, d, k_in, True, USE_TMA)
        acc = _dot_acc(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(Out + b * s_ob + hq[:, None] * s_oh + q_t[:, None] * s_ot + d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + b * s_lb + hq * s_lh + q_t, lse, mask=row_ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def seg_args(k_seg, q_seg, k_rank, dummy: torch.Tensor) -> tuple:
    """Tensor/stride arguments for the optional per-batch tensors (a dummy pointer when absent)."""
    out = []
    for t in (k_seg, q_seg, k_rank):
        out.append((dummy, 0) if t is None else (t, t.stride(0)))
    return out


def pick_fwd_config(head_dim: int, block: int, group: int, q_len: int,
                    config: FwdConfig | None = None) -> tuple[int, int, int, int, int]:
    """(SUB_M, HPP, BLOCK_N, num_warps, num_stages) for these shapes."""
    if config is None and q_len <= SHORT_Q_LEN:
        config = SHORT_FWD_CONFIGS.get(head_dim)
    cfg = config or FWD_CONFIGS[head_dim]
    block_m = min(cfg.block_m, block * _next_pow2(group))
    sub_m = min(block, block_m, max(16, _next_pow2(q_len)))
    hpp = max(1, min(_next_pow2(group), block_m // sub_m))
    block_n = min(cfg.block_n, block)
    return sub_m, hpp, block_n, cfg.num_warps, cfg.num_stages


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError unless q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) share a head dim the kernels take and Hq is a
    multiple of Hkv."""
    dim = q.shape[-1]
    if dim not in FWD_CONFIGS or k.shape[-1] != dim or v.shape[-1] != dim:
        raise ValueError(f"head dims must match and be one of {sorted(FWD_CONFIGS)}: q {q.shape}, k {k.shape}")
    if q.shape[1] % k.shape[1] or k.shape[0] != q.shape[0] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def prepare_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    k_seg: torch.Tensor | None, q_seg: torch.Tensor | None, k_rank: torch.Tensor | None,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float, softcap: float, *, tma: bool,
) -> tuple[torch.Tensor, torch.Tensor, Callable[[FwdConfig | None], None]]:
    """The Triton forward for checked (:func:`check_shapes`), last-dim-contiguous inputs: O (q's shape and dtype),
    the log2-domain LSE (B, Hq, Lq) fp32, and ``launch(config)`` that fills them (None: the head dim's default
    config; autotuning calls it once per candidate). ``tma``: K/V tiles load through TMA descriptors."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    n_q = full_count.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, q_len, device=q.device, dtype=torch.float32)
    qk_mul, cap2 = score_constants(scale, softcap)
    (ks, ks_b), (qs, qs_b), (kr, kr_b) = seg_args(k_seg, q_seg, k_rank, full_count)
    s_ib, s_ih = index_strides(full_count)
    if tma:
        ensure_allocator()

    def launch(cfg: FwdConfig | None) -> None:
        sub_m, hpp, block_n, warps, stages = pick_fwd_config(dim, block, group, q_len, cfg)
        grid = (n_q * (block // sub_m) * math.ceil(group / hpp), batch * hkv)
        launch_fitting("fwd", lambda bn, st: run(grid, sub_m, hpp, bn, warps, st),
                       lambda: (dim, block, sub_m, hpp, block_n, warps, stages, q.dtype, bool(softcap), tma, q.device),
                       block_n, stages)

    def run(grid: tuple[int, int], sub_m: int, hpp: int, block_n: int, warps: int, stages: int) -> None:
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            full_count, full_tiles, part_count, part_tiles,
            ks, qs, kr,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            s_ib, s_ih, full_tiles.shape[-1], part_tiles.shape[-1], ks_b, qs_b, kr_b,
            hkv, group, q_len, kv_len, q_offset, kv_offset, n_q, sink, window,
            qk_mul, cap2,
            BLOCK=block, BLOCK_N=block_n, SUB_M=sub_m, HPP=hpp, HEAD_DIM=dim,
            SOFTCAP=bool(softcap), IEEE=q.dtype == torch.float32,
            HAS_KSEG=k_seg is not None, HAS_QSEG=q_seg is not None, HAS_KRANK=k_rank is not None, USE_TMA=tma,
            num_warps=warps, num_stages=stages,
        )

    return out, lse, launch
