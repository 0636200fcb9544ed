"""The learned selector's inference on the GPU: tile features pooled in one pass, logits and exact top-k fused.

The definition is ``hf_sparsek.learned`` (``features``, ``scorer``: PyTorch; this file must give the same tiles,
near-ties aside):

* ``_tile_pool_kernel``: per absolute-grid tile, key tiles' ``[mean, max, min]`` over their real keys
  (B, Hkv, n, 3 D), or query tiles' sum over their real rows and the KV group's heads with the count of
  (row, head) pairs; read in the input's dtype, accumulated in float32 (no float copy of q or k);
* ``_learned_topk_kernel``: one program per (batch, KV head, ``BM`` query tiles) streams the causal key tiles, scores
  ``qp . kp + c + bias[bucket(distance)]`` (the scorer's factors come in: ``qp`` = qbar, ``kp`` = s Wq^T Wk kfeat,
  ``c`` = u . kfeat), masks the tiles that do not compete and keeps a running top-k (insertions,
  or sorted merges for budgets above a chunk: ``kernels.selection.uses_merge``); the result is the ``topk`` best
  per query tile, sorted by logit (among equal logits the lower tile, as the definition's stable sort). Nothing of
  size (query tiles x key tiles) is written.

No host synchronisation; no transformers or hf_sparsek imports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection import (
    desc_key,
    fill_from_keys,
    key_tile,
    key_value,
    load_rows,
    merge_stages,
    stage,
    tile_rows,
    topk_merge,
    uses_merge,
)

NONE: tl.constexpr = tl.constexpr(-1.0e30)  # not competing / empty slot: below any real logit
FULL: tl.constexpr = tl.constexpr(1.0e30)  # a slot past TOPK: never the smallest, never replaced
POOL_ROWS = 16  # rows of a tile loaded per step by the pooling kernel, with POOL_WARPS (kernels.selection's launch)
POOL_WARPS = 2
POOL_D_SPLIT = 2  # programs per (tile, head), each pooling a share of the head dim: more loads in flight
FEATURE_CHUNK = 64  # feature columns per dot product (bounds registers at head dim 256)
TOPK_ROWS = 16  # query tiles per top-k program (tl.dot needs >= 16 rows)
KEY_CHUNK = 32  # key tiles scored per step


@triton.jit
def _tile_pool_kernel(
    X, SEG, OUT, CNT,
    s_xb, s_xh, s_xl, s_xd, s_sb, s_ob, s_oh, s_on, s_cb, s_ch,
    length, shift, seg_start, HOUT, D,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr, KEY_STATS: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HOUT
    g = bh % HOUT
    d = tl.program_id(2) * D_PAD + tl.arange(0, D_PAD)  # this program's share of the head dim
    d_ok = d < D
    # elementwise over the row steps and heads, reduced over rows once at the end
    total = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    hi = tl.full([ROWS, D_PAD], float("-inf"), tl.float32)
    lo = tl.full([ROWS, D_PAD], float("inf"), tl.float32)
    count = tl.zeros([ROWS], dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK, ROWS):
        rows, ok = tile_rows(SEG + b.to(tl.int64) * s_sb + seg_start, t, r0, shift, length, BLOCK, ROWS, HAS_SEG)
        count += ok.to(tl.float32)
        for j in tl.static_range(GROUP):
            x = load_rows(X + b.to(tl.int64) * s_xb + (g * GROUP + j).to(tl.int64) * s_xh, rows, ok, d, d_ok, s_xl,
                          s_xd)
            total += x
            if KEY_STATS:
                hi = tl.maximum(hi, tl.where(ok[:, None], x, float("-inf")))
                lo = tl.minimum(lo, tl.where(ok[:, None], x, float("inf")))
    n = tl.sum(count, 0)
    out = OUT + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_oh + t.to(tl.int64) * s_on
    if KEY_STATS:
        tl.store(out + d, tl.sum(total, 0) / tl.maximum(n, 1.0), mask=d_ok)
        tl.store(out + D + d, tl.where(n > 0, tl.max(hi, 0), 0.0), mask=d_ok)
        tl.store(out + 2 * D + d, tl.where(n > 0, tl.min(lo, 0), 0.0), mask=d_ok)
    else:
        tl.store(out + d, tl.sum(total, 0), mask=d_ok)
        tl.store(CNT + b.to(tl.int64) * s_cb + g.to(tl.int64) * s_ch + t, n * GROUP)


@triton.jit
def _gate(qp_ptr, kp_ptr, n, n_ok, m_ok, s_kn, BM: tl.constexpr, CN: tl.constexpr, F: tl.constexpr,
          FC: tl.constexpr, PRECISION: tl.constexpr):
    """(BM, CN) dot products of the query tiles' projected features with key tiles ``n``'s (float32 inputs, products
    at ``PRECISION``: tf32x3 keeps float32's accuracy on tensor cores)."""
    acc = tl.zeros([BM, CN], dtype=tl.float32)
    for f0 in tl.static_range(0, F, FC):
        f = f0 + tl.arange(0, FC)
        qf = tl.load(qp_ptr + f[None, :], mask=m_ok[:, None], other=0.0)
        kf = tl.load(kp_ptr + n.to(tl.int64)[:, None] * s_kn + f[None, :], mask=n_ok[:, None], other=0.0)
        acc += tl.dot(qf, tl.trans(kf), input_precision=PRECISION)
    return acc


@triton.jit
def _chunk_logits(qp_ptr, kp_ptr, kc_ptr, BIAS, FLAG, n, n_k, kb0, qb, limit, m_ok, b, h, s_kn, s_cn, s_bh, s_fb,
                  kv_offset,
                  kv_end, sink, shift, BM: tl.constexpr, CN: tl.constexpr, F: tl.constexpr, FC: tl.constexpr,
                  BLOCK: tl.constexpr, BUCKETS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_FLAG: tl.constexpr,
                  PRECISION: tl.constexpr):
    """(BM, CN) logits of the query tiles on key tiles ``n`` and whether each pair competes."""
    n_ok = n < n_k
    kb = kb0 + n
    if HAS_FLAG:  # padding: whether a tile may compete was worked out from its real keys
        may = tl.load(FLAG + b.to(tl.int64) * s_fb + n, mask=n_ok, other=0) != 0
    else:  # every key real: a tile holds keys, is complete in this call, and is not all sink tokens
        hi = tl.minimum((kb + 1) * BLOCK, kv_end)
        may = n_ok & (hi > tl.maximum(kb * BLOCK, kv_offset)) & ((n > 0) | (shift == 0)) & (hi - 1 >= sink)
    compete = m_ok[:, None] & may[None, :] & (kb[None, :] < limit[:, None])
    logit = tl.zeros([BM, CN], dtype=tl.float32)
    if HAS_GATE:
        logit = _gate(qp_ptr, kp_ptr, n, n_ok, m_ok, s_kn, BM, CN, F, FC, PRECISION)
    logit += tl.load(kc_ptr + n.to(tl.int64) * s_cn, mask=n_ok, other=0.0)[None, :]
    dist = tl.maximum(qb[:, None] - kb[None, :], 1)
    bucket = tl.zeros([BM, CN], dtype=tl.int32)
    for i in tl.static_range(1, BUCKETS):
        bucket += (dist >= (1 << i)).to(tl.int32)
    logit += tl.load(BIAS + h * s_bh + bucket)
    return logit, compete


@triton.jit
def _insert(best_v, best_i, cv, n0, cn, kk):
    """Running top-k per row (BM, KP) updated with one chunk's logits ``cv`` (BM, CN; NONE = not competing) of key
    tiles ``n0 + cn``, which come after every kept tile: a tile equal to the k-th kept one stays out (the lower tile
    wins a tie), and among kept tiles equal to the smallest the highest tile leaves first."""
    kth = tl.min(best_v, 1)
    while tl.max((tl.max(cv, 1) > kth).to(tl.int32), 0) > 0:
        mc = tl.max(cv, 1)
        ac = tl.argmax(cv, 1)  # the lowest tile among the chunk's best
        at_min = best_v == kth[:, None]
        slot = tl.argmax(tl.where(at_min, best_i, -2), 1)  # the highest tile among the smallest kept
        put = (mc > kth)[:, None] & (kk[None, :] == slot[:, None])
        best_v = tl.where(put, mc[:, None], best_v)
        best_i = tl.where(put, (n0 + ac)[:, None], best_i)
        cv = tl.where(cn[None, :] == ac[:, None], NONE, cv)
        kth = tl.min(best_v, 1)
    return best_v, best_i


@triton.jit
def _sorted(best_v, best_i, BM: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr):
    """(BM, KP) int32 kept tiles sorted by logit, descending (among equal logits the lower tile); -1 = none."""
    kk = tl.arange(0, KP)
    big: tl.constexpr = 1 << 30
    live = (best_v < FULL) & (best_v > NONE)
    v = tl.where(live, best_v, -FULL)
    out = tl.full([BM, KP], -1, tl.int32)
    for t in range(TOPK):
        top = tl.max(v, 1)
        here = (v == top[:, None]) & (top[:, None] > -FULL)
        tile = tl.min(tl.where(here, best_i, big), 1)
        out = tl.where(kk[None, :] == t, tl.where(top > -FULL, tile, -1)[:, None], out)
        v = tl.where(here & (best_i == tile[:, None]), -FULL, v)
    return out


@triton.jit
def _learned_topk_kernel(
    QP, KP, KC, BIAS, FLAG, OUT,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_cb, s_ch, s_cn, s_bh, s_fb, s_ob, s_oh, s_om,
    n_q, n_k, qb0, kb0, kv_offset, kv_end, sink, window, shift,
    HKV: tl.constexpr, BM: tl.constexpr, CN: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, TOPK: tl.constexpr,
    KP_: tl.constexpr, KP_LOG: tl.constexpr, CN_LOG: tl.constexpr, MERGE: tl.constexpr, BLOCK: tl.constexpr,
    BUCKETS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_FLAG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    m = pid_m * BM + tl.arange(0, BM)
    m_ok = m < n_q
    qb = qb0 + m
    limit = qb  # key tiles before this one compete (causal, before the diagonal) ...
    if HAS_WINDOW:  # ... and before the first tile the window keeps whole for the tile's last row
        edge = qb * BLOCK + BLOCK - 1 - window
        limit = tl.minimum(limit, tl.where(edge >= 0, edge // BLOCK + 1, 0))
    m_last = tl.minimum(pid_m * BM + BM - 1, n_q - 1)
    n_hi = tl.minimum(n_k, qb0 + m_last - kb0)
    qp_ptr = QP + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + m.to(tl.int64)[:, None] * s_qm
    kp_ptr = KP + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    kc_ptr = KC + b.to(tl.int64) * s_cb + h.to(tl.int64) * s_ch
    cn = tl.arange(0, CN)
    kk = tl.arange(0, KP_)
    if MERGE:  # large budgets: KP_ (>= TOPK) sorted keys of (logit, tile), KP_ key tiles staged per merge
        best = desc_key(tl.full([BM, KP_], NONE, tl.float32), tl.full([BM, KP_], -1, tl.int32))
        empty = best
        for n00 in range(0, n_hi, KP_):
            staged = empty
            for j in tl.static_range(KP_ // CN):
                n = n00 + j * CN + cn
                logit, compete = _chunk_logits(qp_ptr, kp_ptr, kc_ptr, BIAS, FLAG, n, n_k, kb0, qb, limit, m_ok, b, h,
                                               s_kn, s_cn, s_bh, s_fb, kv_offset, kv_end, sink, shift, BM, CN, F, FC,
                                               BLOCK, BUCKETS, HAS_GATE, HAS_FLAG, PRECISION)
                chunk = desc_key(tl.where(compete, logit, NONE), tl.broadcast_to(n[None, :], [BM, CN]))
                staged = stage(staged, chunk, j, BM, KP_, CN)
            best = topk_merge(best, staged, BM, KP_, KP_LOG)
        out = tl.where((key_value(best) > NONE) & (kk[None, :] < TOPK), key_tile(best), -1)
    else:  # budgets within a chunk: a running top-k, unsorted (NONE = empty, FULL = a slot past TOPK), filled from
        # the first chunk by one sort, then insertions
        logit, compete = _chunk_logits(qp_ptr, kp_ptr, kc_ptr, BIAS, FLAG, cn, n_k, kb0, qb, limit, m_ok, b, h, s_kn,
                                       s_cn, s_bh, s_fb, kv_offset, kv_end, sink, shift, BM, CN, F, FC, BLOCK, BUCKETS,
                                       HAS_GATE, HAS_FLAG, PRECISION)
        first = desc_key(tl.where(compete, logit, NONE), tl.broadcast_to(cn[None, :], [BM, CN]))
        best_v, best_i = fill_from_keys(first, FULL, BM, CN, CN_LOG, KP_, TOPK)
        for n0 in range(CN, n_hi, CN):
            n = n0 + cn
            logit, compete = _chunk_logits(qp_ptr, kp_ptr, kc_ptr, BIAS, FLAG, n, n_k, kb0, qb, limit, m_ok, b, h, s_kn,
                                           s_cn, s_bh, s_fb, kv_offset, kv_end, sink, shift, BM, CN, F, FC, BLOCK,
                                           BUCKETS, HAS_GATE, HAS_FLAG, PRECISION)
            best_v, best_i = _insert(best_v, best_i, tl.where(compete, logit, NONE), n0, cn, kk)
        out = _sorted(best_v, best_i, BM, KP_, TOPK)
    tiles = tl.where(out >= 0, kb0 + out, -1)
    ptr = OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + m.to(tl.int64)[:, None] * s_om + kk[None, :]
    tl.store(ptr, tiles, mask=m_ok[:, None] & (kk[None, :] < TOPK))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def gate_width(dim: int) -> int:
    """Feature width the gate's dot products take for head dim ``dim`` (zero-padded): a power of two >= 16 up to
    ``FEATURE_CHUNK``, then a multiple of it."""
    if dim <= FEATURE_CHUNK:
        return max(16, _next_pow2(dim))
    return -(-dim // FEATURE_CHUNK) * FEATURE_CHUNK


def pool_tiles(x: torch.Tensor, offset: int, block: int, seg: torch.Tensor | None, seg_start: int, *,
               key_stats: bool, out_heads: int, rows: int = POOL_ROWS, num_warps: int = POOL_WARPS,
               d_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per absolute-grid tile of x (B, H, L, D) from position ``offset``; rows t with ``seg[:, seg_start + t] < 0``
    left out (``seg`` None: every row real).

    ``key_stats``: (B, H, n, 3 D) float32 ``[mean, max, min]`` (zeros for a tile without a real row), and None.
    Else the sums over each tile's real rows and the ``H // out_heads`` heads of each group, (B, out_heads, n, D)
    float32, and the count of (row, head) pairs summed, (B, out_heads, n) float32. ``rows`` / ``num_warps`` /
    ``d_split`` (programs per tile and head, each a share of the head dim; None: ``POOL_D_SPLIT`` for key stats on
    CUDA where the padded head dim has at least 64 columns, else 1): the launch, which does not change the values.
    """
    batch, heads, length, dim = x.shape
    group = 1 if key_stats else heads // out_heads
    if heads % out_heads or (key_stats and out_heads != heads):
        raise ValueError(f"{heads} heads do not pool into {out_heads} groups{' (key stats: one per head)' * key_stats}")
    shift = offset % block
    n_tiles = (shift + length + block - 1) // block
    width = 3 * dim if key_stats else dim
    out = torch.empty(batch, out_heads, n_tiles, width, device=x.device, dtype=torch.float32)
    count = None if key_stats else torch.empty(batch, out_heads, n_tiles, device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, count
    seg_arg = seg if seg is not None else out
    cnt_arg = count if count is not None else out
    d_pad = max(16, _next_pow2(dim))
    if d_split is None:
        # keys: one head per program, too few programs at 16K (H100: 0.027 -> 0.021 ms split in 2); queries already
        # read a whole KV group per program (split: 0.061 -> 0.063); the interpreter gains nothing from more programs
        d_split = POOL_D_SPLIT if key_stats and d_pad >= 64 and x.is_cuda else 1
    if d_split < 1 or d_pad % d_split or d_pad // d_split < 16:
        raise ValueError(f"d_split must divide the padded head dim {d_pad} into shares of >= 16, got {d_split}")
    _tile_pool_kernel[(n_tiles, batch * out_heads, d_split)](
        x, seg_arg, out, cnt_arg, *x.stride(), seg.stride(0) if seg is not None else 0, *out.stride()[:3],
        *(cnt_arg.stride()[:2]), length, shift, seg_start, out_heads, dim,
        GROUP=group, BLOCK=block, ROWS=min(rows, block), D_PAD=d_pad // d_split, KEY_STATS=key_stats,
        HAS_SEG=seg is not None, num_warps=num_warps,
    )
    return out, count


def learned_topk(
    qp: torch.Tensor | None,
    kp: torch.Tensor | None,
    kc: torch.Tensor,
    bias: torch.Tensor,
    key_flag: torch.Tensor | None,
    *,
    n_q: int,
    block: int,
    q_offset: int,
    kv_offset: int,
    kv_len: int,
    sink: int,
    window: int | None,
    topk: int,
    gate_precision: str | None = None,
) -> torch.Tensor:
    """(B, Hkv, n_q, topk) int32 absolute key tiles: per query tile the ``topk`` competing key tiles with the largest
    ``qp . kp + kc + bias[bucket]``, sorted (ties: lower tile first), -1 where fewer compete.

    ``qp`` (B, Hkv, n_q, F) / ``kp`` (B, Hkv, n_k, F) float32 features, unit stride along F (both None: no gate,
    the query-independent score); ``kc`` (B, Hkv, n_k) float32, any strides; ``bias`` (Hkv, buckets) float32 per log2
    tile distance; ``key_flag`` (B, n_k) int32, whether each key tile may compete (padding), or None: derived from
    positions.
    ``gate_precision``: the gate's dot products, ``tl.dot``'s ``input_precision`` (None: "tf32x3" where NVIDIA
    tensor cores take tf32, sm_80 on, else "ieee").
    """
    batch, hkv, n_k = kc.shape
    out = torch.empty(batch, hkv, n_q, topk, dtype=torch.int32, device=kc.device)
    if out.numel() == 0:
        return out
    has_gate = qp is not None
    if has_gate:
        feats = qp.shape[-1]
        if kp is None or kp.shape[-1] != feats or feats != gate_width(feats):
            raise ValueError(f"qp and kp need the same feature width, padded to gate_width(), got {tuple(qp.shape)} "
                             f"and {None if kp is None else tuple(kp.shape)}")
        if qp.stride(-1) != 1 or kp.stride(-1) != 1:
            raise ValueError("qp and kp need unit stride along their features (any other strides are taken)")
    else:
        qp = kp = kc
        feats = 16
    flag = key_flag if key_flag is not None else out
    bias = bias.contiguous()
    if gate_precision is None:
        tf32 = kc.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(kc.device)[0] >= 8
        gate_precision = "tf32x3" if tf32 else "ieee"
    merge = uses_merge(topk, KEY_CHUNK)
    slots = max(2, _next_pow2(topk))  # the running top-k's width (with merges a multiple of the chunk: uses_merge)
    _learned_topk_kernel[(triton.cdiv(n_q, TOPK_ROWS), batch * hkv)](
        qp, kp, kc, bias, flag, out,
        *qp.stride()[:3], *kp.stride()[:3], *kc.stride(), bias.stride(0),
        flag.stride(0) if key_flag is not None else 0, *out.stride()[:3],
        n_q, n_k, q_offset // block, kv_offset // block, kv_offset, kv_offset + kv_len, sink, window or 0,
        kv_offset % block,
        HKV=hkv, BM=TOPK_ROWS, CN=KEY_CHUNK, F=feats, FC=min(FEATURE_CHUNK, feats), TOPK=topk,
        KP_=slots, KP_LOG=slots.bit_length() - 1, CN_LOG=KEY_CHUNK.bit_length() - 1, MERGE=merge, BLOCK=block,
        BUCKETS=bias.shape[1], HAS_GATE=has_gate, HAS_WINDOW=window is not None, HAS_FLAG=key_flag is not None,
        PRECISION=gate_precision,
        num_stages=merge_stages(merge),
    )
    return out
