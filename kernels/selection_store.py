"""Refresh kept key tile features of the mass / moment selectors in one launch, deciding reuse on the device (no host
read).

``hf_sparsek.selection.store.SelectionState`` keeps per key tile ``[kmax, kmin]`` (the layout ``select_by_mass``
reads). Each call, per (batch row, KV head), ``_refresh_kernel`` compares the key at the last position of the kept
tiles with the kept fingerprint: equal, it pools only the tiles from the kept count on (the tile being filled, and
any that filled since); different (a new prompt, a reordered batch), it pools every tile from 0. ``P`` programs per
(row, head) stride over the tiles, so the common case costs a few tiles' reads, and the rare recompute still
spreads over ``P`` programs. Then it writes the new fingerprint (into the other buffer: programs of the same row
still read the old one). The pooling is ``kernels.selection._pool_kernel``'s for keys: same values, bit for bit.

No transformers or hf_sparsek imports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection import load_rows, tile_rows

POOL_ROWS = 32  # rows of a tile loaded at once
CHECK_PROGRAMS = 64  # programs per (row, head) when reuse is decided on the device: the recompute's parallelism


@triton.jit
def _refresh_kernel(
    K, SEG, FEAT, FP_OLD, FP_NEW, REUSED,
    s_kb, s_kh, s_kl, s_kd, s_sb, s_fb, s_fh, s_fn, s_pb, s_ph,
    length, shift, stored, hi, old_pos, new_pos, H, D,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr, HAS_SEG: tl.constexpr, CHECK: tl.constexpr,
    WRITE_FP: tl.constexpr, LEARNED: tl.constexpr, MOMENTS: tl.constexpr,
):
    p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    fp_off = b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    lo = 0
    if CHECK:
        cur = tl.load(kbase + old_pos * s_kl + d * s_kd, mask=d_ok, other=0.0)
        kept = tl.load(FP_OLD + fp_off + d, mask=d_ok, other=0.0)
        same = tl.sum((cur != kept).to(tl.int32), 0) == 0  # NaN never equals: recompute
        lo = tl.where(same, stored, 0)
        if p == 0:
            tl.store(REUSED + bh, same.to(tl.int8))
    else:
        if p == 0:
            tl.store(REUSED + bh, tl.zeros([], dtype=tl.int8))
    fbase = FEAT + b.to(tl.int64) * s_fb + h.to(tl.int64) * s_fh
    for t in range(lo + p, hi, n_prog):
        top = tl.full([D_PAD], float("-inf"), tl.float32)
        bottom = tl.full([D_PAD], float("inf"), tl.float32)
        total = tl.zeros([D_PAD], dtype=tl.float32)
        squares = tl.zeros([D_PAD], dtype=tl.float32)
        count = tl.zeros([ROWS], dtype=tl.float32)
        for r0 in tl.static_range(0, BLOCK, ROWS):
            rows, ok = tile_rows(SEG + b.to(tl.int64) * s_sb, t, r0, shift, length, BLOCK, ROWS, HAS_SEG)
            x = load_rows(kbase, rows, ok, d, d_ok, s_kl, s_kd)
            count += ok.to(tl.float32)
            if LEARNED or MOMENTS:
                total += tl.sum(x, 0)
            if MOMENTS:
                squares += tl.sum(x * x, 0)
            else:
                top = tl.maximum(top, tl.max(tl.where(ok[:, None], x, float("-inf")), 0))
                bottom = tl.minimum(bottom, tl.min(tl.where(ok[:, None], x, float("inf")), 0))
        n = tl.sum(count, 0)
        out = fbase + t * s_fn  # < 2^31: tiles x feature columns of one (row, head)
        top = tl.where(n > 0, top, 0.0)
        bottom = tl.where(n > 0, bottom, 0.0)
        if MOMENTS:  # selector "moment": [mean, variance] (zeros for a tile without a real key)
            mean = total / tl.maximum(n, 1.0)
            tl.store(out + d, tl.where(d_ok, mean, 0.0))
            tl.store(out + D_PAD + d, tl.where(d_ok, tl.maximum(squares / tl.maximum(n, 1.0) - mean * mean, 0.0),
                                               0.0))
        elif LEARNED:
            tl.store(out + d, total / tl.maximum(n, 1.0), mask=d_ok)
            tl.store(out + D + d, top, mask=d_ok)
            tl.store(out + 2 * D + d, bottom, mask=d_ok)
        else:
            tl.store(out + d, tl.where(d_ok, top, 0.0))
            tl.store(out + D_PAD + d, tl.where(d_ok, bottom, 0.0))
    if WRITE_FP:
        if p == 0:
            row = tl.load(kbase + new_pos * s_kl + d * s_kd, mask=d_ok, other=0.0)
            tl.store(FP_NEW + fp_off + d, row, mask=d_ok)


def refresh_key_features(
    k: torch.Tensor,
    k_seg: torch.Tensor | None,
    features: torch.Tensor,
    fp_old: torch.Tensor,
    fp_new: torch.Tensor,
    reused: torch.Tensor,
    *,
    kv_offset: int,
    block: int,
    stored: int,
    hi: int,
    old_pos: int,
    new_pos: int,
    check: bool,
    learned: bool = False,
    moments: bool = False,
) -> None:
    """Write tiles ``[start, hi)`` of ``features`` (B, Hkv, >= hi, 2 * D_pad) float32 from k (B, Hkv, kv_len, D),
    ``start`` = ``stored`` where the key at local index ``old_pos`` equals ``fp_old`` (B, Hkv, D) (only with
    ``check``), else 0, per (row, head); ``reused`` (B, Hkv) bool gets which started at ``stored``; ``fp_new``
    (B, Hkv, D), k's dtype, gets the key at ``new_pos`` (skipped when ``new_pos`` < 0). ``k_seg`` (B, kv_len): -1
    marks padding keys (left out), or None. ``learned``: ``features`` is (B, Hkv, >= hi, 3 D), ``[mean, max, min]``
    per tile (the learned selector's store), not the mass layout; ``moments``: ``[mean, variance]`` in the mass
    layout's two halves (selector "moment")."""
    batch, heads, length, dim = k.shape
    d_pad = max(16, 1 << max(0, (dim - 1).bit_length())) if learned else features.shape[-1] // 2
    width_ok = features.shape[-1] == 3 * dim if learned else d_pad >= dim
    if (features.dim() != 4 or features.dtype != torch.float32 or tuple(features.shape[:2]) != (batch, heads)
            or features.shape[2] < hi or not width_ok):
        width = f"3 D = {3 * dim}" if learned else f"2 * D_pad >= {2 * dim}"
        raise ValueError(f"features must be float32 (batch={batch}, kv_heads={heads}, >= {hi} tiles, {width}), got "
                         f"{tuple(features.shape)} {features.dtype}")
    for name, fp in (("fp_old", fp_old), ("fp_new", fp_new)):
        if tuple(fp.shape) != (batch, heads, dim) or fp.dtype != k.dtype or not fp.is_contiguous():
            raise ValueError(f"{name} must be contiguous (batch, kv_heads, dim) {k.dtype}, got "
                             f"{tuple(fp.shape)} {fp.dtype}")
    if tuple(reused.shape) != (batch, heads) or reused.dtype != torch.bool or not reused.is_contiguous():
        raise ValueError(f"reused must be contiguous bool (batch, kv_heads), got {tuple(reused.shape)} {reused.dtype}")
    if batch * heads == 0:
        return
    start_max = hi if not check else hi - stored
    programs = max(1, hi if not check else min(hi, max(start_max, CHECK_PROGRAMS)))
    seg_arg = k_seg if k_seg is not None else features
    s_sb = k_seg.stride(0) if k_seg is not None else 0
    if k_seg is not None and k_seg.stride(1) != 1:
        raise ValueError("k_seg must have a contiguous sequence dimension")
    _refresh_kernel[(programs, batch * heads)](
        k, seg_arg, features, fp_old, fp_new, reused.view(torch.int8),
        *k.stride(), s_sb, *features.stride()[:3], fp_old.stride(0), fp_old.stride(1),
        length, kv_offset % block, stored, hi, max(old_pos, 0), max(new_pos, 0), heads, dim,
        BLOCK=block, ROWS=min(POOL_ROWS, block), D_PAD=d_pad, HAS_SEG=k_seg is not None, CHECK=check,
        WRITE_FP=new_pos >= 0, LEARNED=learned, MOMENTS=moments,
    )
