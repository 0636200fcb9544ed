"""Refresh kept key tile features of the mass / moment selectors, deciding reuse on the device (no host read).

``hf_sparsek.selection.store.SelectionState`` keeps per key tile ``[kmax, kmin]`` (the layout ``select_by_mass``
reads) and, as the tiles' *fingerprints*, the key at the last position of every kept tile. Each call, per (batch
row, KV head): ``_check_kernel`` compares every kept tile's last key with its fingerprint (programs spread over
chunks of tiles, one mismatch count per chunk; no atomics, nothing to zero); ``_refresh_kernel`` sums its row's
counts: none, it pools only the tiles from the kept count on (the tile being filled, and any that filled since);
some (a new prompt, a reordered batch, another conversation through the same layer), it pools every tile from 0.
It writes the fingerprints of the final tiles it pools. ``P`` programs per (row, head) stride over the tiles, so the
common case costs a few tiles' reads, and the rare recompute still spreads over ``P`` programs. One key per kept
tile is compared, not one per sequence: in a model's first layer a key depends on its token and position only, so
one equal key says little about the others. The pooling is ``kernels.selection._pool_kernel``'s for keys: same
values, bit for bit.

No transformers or hf_sparsek imports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection import load_rows, tile_rows

POOL_ROWS = 32  # rows of a tile loaded at once
CHECK_PROGRAMS = 64  # programs per (row, head) when reuse is decided on the device: the recompute's parallelism
CHECK_TILES = 64  # kept tiles' fingerprints compared per program of the check


@triton.jit
def _check_kernel(
    K, FP, MISS, STORED, s_kb, s_kh, s_kl, s_kd, s_pb, s_ph, s_pn, s_tb, stored, shift, length, H, D, n_chunks,
    s_miss, BLOCK: tl.constexpr, TILES: tl.constexpr, D_PAD: tl.constexpr, ON_DEVICE: tl.constexpr,
):
    """MISS[bh, c]: how many kept tiles of chunk ``c`` have a last key other than their fingerprint. ``ON_DEVICE``:
    the kept count is ``STORED[b, h]`` (device memory), and chunk 0 copies it to ``MISS[bh, n_chunks]`` for the
    refresh launch (which overwrites ``STORED``)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if ON_DEVICE:
        stored = tl.load(STORED + b.to(tl.int64) * s_tb + h)
        if c == 0:
            tl.store(MISS + bh.to(tl.int64) * s_miss + n_chunks, stored)
    d = tl.arange(0, D_PAD)
    t = c * TILES + tl.arange(0, TILES)
    pos = (t + 1) * BLOCK - 1 - shift  # the tile's last key, local index
    kept_tile = t < stored
    gone = kept_tile & (pos >= length)  # a kept tile past the keys (a cropped cache): a miss
    ok = (kept_tile & (pos < length))[:, None] & (d < D)[None, :]
    cur = tl.load(K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + pos.to(tl.int64)[:, None] * s_kl
                  + d[None, :] * s_kd, mask=ok, other=0.0)
    kept = tl.load(FP + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph + t.to(tl.int64)[:, None] * s_pn
                   + d[None, :], mask=ok, other=0.0)
    miss = tl.sum(tl.sum((ok & (cur != kept)).to(tl.int32), 1), 0)  # NaN never equals: recompute
    miss += tl.sum(gone.to(tl.int32), 0)
    tl.store(MISS + bh.to(tl.int64) * s_miss + c, miss)


@triton.jit
def _refresh_kernel(
    K, SEG, FEAT, FP, MISS, REUSED, STORED, QOFF,
    s_kb, s_kh, s_kl, s_kd, s_sb, s_fb, s_fh, s_fn, s_pb, s_ph, s_pn, s_tb,
    length, shift, stored, hi, final, n_chunks, s_miss, H, D, kv_offset, n_k,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr, HAS_SEG: tl.constexpr, CHECK: tl.constexpr,
    LEARNED: tl.constexpr, MOMENTS: tl.constexpr, CHUNKS: tl.constexpr, ON_DEVICE: tl.constexpr,
):
    p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    fp_base = FP + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    stale = 0
    if ON_DEVICE:  # one decode row at QOFF[0]: the causal and the final tiles from it, the kept count as checked
        kb0 = kv_offset // BLOCK
        q_end = tl.load(QOFF).to(tl.int32) + 1
        hi = tl.minimum(n_k, tl.maximum(0, (q_end - 1) // BLOCK - kb0 + 1))
        final = tl.minimum(hi, tl.maximum(0, tl.minimum(q_end, kv_offset + length) // BLOCK - kb0))
        stored = tl.load(MISS + bh.to(tl.int64) * s_miss + n_chunks)
        stale = (q_end - 1 < (kb0 + stored) * BLOCK).to(tl.int32)  # the row in a kept tile: a cropped / refilled cache
    lo = 0
    if CHECK:
        miss = 0
        for c0 in range(0, n_chunks, CHUNKS):
            cs = c0 + tl.arange(0, CHUNKS)
            miss += tl.sum(tl.load(MISS + bh.to(tl.int64) * s_miss + cs, mask=cs < n_chunks, other=0), 0)
        same = (miss + stale == 0) & (stored > 0)
        lo = tl.where(same, stored, 0)
        if p == 0:
            tl.store(REUSED + b.to(tl.int64) * s_tb + h, same.to(tl.int8))
            if ON_DEVICE:
                tl.store(STORED + b.to(tl.int64) * s_tb + h, final)
    else:
        if p == 0:
            tl.store(REUSED + b.to(tl.int64) * s_tb + h, tl.zeros([], dtype=tl.int8))
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
        if t < final:  # a kept tile: its last key is its fingerprint for the next call's check
            last = tl.load(kbase + tl.cast((t + 1) * BLOCK - 1 - shift, tl.int64) * s_kl + d * s_kd, mask=d_ok,
                           other=0.0)
            tl.store(fp_base + tl.cast(t, tl.int64) * s_pn + d, last, mask=d_ok)


def refresh_key_features(
    k: torch.Tensor,
    k_seg: torch.Tensor | None,
    features: torch.Tensor,
    fingerprints: torch.Tensor,
    reused: torch.Tensor,
    *,
    kv_offset: int,
    block: int,
    stored: int,
    hi: int,
    final: int,
    check: bool,
    learned: bool = False,
    moments: bool = False,
    miss: torch.Tensor | None = None,
) -> None:
    """Write tiles ``[start, hi)`` of ``features`` (B, Hkv, >= hi, 2 * D_pad) float32 from k (B, Hkv, kv_len, D):
    ``start`` = ``stored`` where every kept tile's last key equals its fingerprint (``fingerprints`` (B, Hkv, >=
    max(stored, final), D), k's dtype; only with ``check``), else 0, per (row, head); ``reused`` (B, Hkv) bool gets
    which started at ``stored``; the fingerprints of the tiles ``[start, final)`` are written. Tiles sit on the
    absolute grid from ``kv_offset``; tiles below ``final`` must have every key written. ``k_seg`` (B, kv_len): -1
    marks padding keys (left out), or None. ``learned``: ``features`` is (B, Hkv, >= hi, 3 D), ``[mean, max, min]``
    per tile (the learned selector's store), not the mass layout; ``moments``: ``[mean, variance]`` in the mass
    layout's two halves (selector "moment"). ``miss``: int32 scratch of at least B x Hkv x ceil(stored /
    CHECK_TILES) (allocated when None)."""
    batch, heads, length, dim = k.shape
    d_pad = max(16, 1 << max(0, (dim - 1).bit_length())) if learned else features.shape[-1] // 2
    width_ok = features.shape[-1] == 3 * dim if learned else d_pad >= dim
    if (features.dim() != 4 or features.dtype != torch.float32 or tuple(features.shape[:2]) != (batch, heads)
            or features.shape[2] < hi or not width_ok):
        width = f"3 D = {3 * dim}" if learned else f"2 * D_pad >= {2 * dim}"
        raise ValueError(f"features must be float32 (batch={batch}, kv_heads={heads}, >= {hi} tiles, {width}), got "
                         f"{tuple(features.shape)} {features.dtype}")
    shift = kv_offset % block
    if not 0 <= final <= hi or (final and final * block - shift > length) or (check and stored < 1):
        raise ValueError(f"need 0 <= final <= hi with every key of the final tiles in k, and stored >= 1 with check; "
                         f"got final={final}, hi={hi}, stored={stored}, {length} keys from offset {kv_offset}")
    need = max(stored if check else 0, final)
    if (fingerprints.dim() != 4 or tuple(fingerprints.shape[:2]) != (batch, heads) or fingerprints.shape[2] < need
            or fingerprints.shape[3] != dim or fingerprints.dtype != k.dtype or fingerprints.stride(3) != 1):
        raise ValueError(f"fingerprints must be (batch={batch}, kv_heads={heads}, >= {need} tiles, dim={dim}) "
                         f"{k.dtype} with a contiguous last dim, got {tuple(fingerprints.shape)} {fingerprints.dtype}")
    if tuple(reused.shape) != (batch, heads) or reused.dtype != torch.bool or not reused.is_contiguous():
        raise ValueError(f"reused must be contiguous bool (batch, kv_heads), got {tuple(reused.shape)} {reused.dtype}")
    if batch * heads == 0:
        return
    n_chunks = triton.cdiv(stored, CHECK_TILES) if check else 1
    if miss is None or miss.numel() < batch * heads * n_chunks or miss.dtype != torch.int32:
        miss = torch.empty(batch * heads * n_chunks, device=k.device, dtype=torch.int32)
    fp_strides = (fingerprints.stride(0), fingerprints.stride(1), fingerprints.stride(2))
    if check:
        _check_kernel[(n_chunks, batch * heads)](
            k, fingerprints, miss, reused, *k.stride(), *fp_strides, 0, stored, shift, length, heads, dim, n_chunks,
            n_chunks, BLOCK=block, TILES=CHECK_TILES, D_PAD=_d_pad(dim), ON_DEVICE=False,
        )
    start_max = hi if not check else hi - stored
    programs = max(1, hi if not check else min(hi, max(start_max, CHECK_PROGRAMS)))
    seg_arg, s_sb = _seg_arg(k_seg, features)
    _refresh_kernel[(programs, batch * heads)](
        k, seg_arg, features, fingerprints, miss, reused.view(torch.int8), reused, reused,
        *k.stride(), s_sb, *features.stride()[:3], *fp_strides, heads,
        length, shift, stored, hi, final, n_chunks, n_chunks, heads, dim, kv_offset, features.shape[2],
        BLOCK=block, ROWS=min(POOL_ROWS, block), D_PAD=d_pad, HAS_SEG=k_seg is not None, CHECK=check,
        LEARNED=learned, MOMENTS=moments, CHUNKS=64, ON_DEVICE=False,
    )


def _d_pad(dim: int) -> int:
    return max(16, 1 << max(0, (dim - 1).bit_length()))


def _seg_arg(k_seg: torch.Tensor | None, other: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The key segments as a kernel argument and their row stride (``other`` and 0 without segments)."""
    if k_seg is None:
        return other, 0
    if k_seg.stride(1) != 1:
        raise ValueError("k_seg must have a contiguous sequence dimension")
    return k_seg, k_seg.stride(0)


def check_scratch_size(batch: int, heads: int, tiles: int) -> int:
    """int32 elements of the ``scratch`` :func:`refresh_key_features_at_device_offset` needs for ``tiles`` tiles."""
    return batch * heads * (triton.cdiv(tiles, CHECK_TILES) + 1)


def refresh_key_features_at_device_offset(
    k: torch.Tensor,
    k_seg: torch.Tensor | None,
    features: torch.Tensor,
    fingerprints: torch.Tensor,
    stored: torch.Tensor,
    reused: torch.Tensor,
    scratch: torch.Tensor,
    *,
    q_offset: torch.Tensor,
    kv_offset: int,
    block: int,
) -> None:
    """:func:`refresh_key_features` for one decode row whose position is the one-element integer tensor
    ``q_offset`` on the device, with the kept tile count per (row, KV head) in ``stored`` (B, Hkv) int32, also on the
    device: nothing is read on the host and every launch has a fixed grid, so a CUDA graph can hold the call.

    Per (row, head): the kept tiles' fingerprints are checked (every chunk of the ``features``' tiles is launched;
    tiles past ``stored`` are skipped); where all match and the row lies past the kept tiles, the tiles from
    ``stored`` to the row's tile are pooled, else every tile up to it (a new prompt in the cache, a cropped or
    refilled cache); then ``stored`` becomes the count of tiles whose keys are all written (all below the row) and
    ``reused`` (B, Hkv) bool says which (row, head) kept its tiles. ``features`` (B, Hkv, n_k, 2 * D_pad) float32 and
    ``fingerprints`` (B, Hkv, n_k, D) in k's dtype cover every key tile of k (the static cache: its unwritten slots
    must be -1 in ``k_seg``); ``stored`` and ``reused`` may be views with a unit head stride; ``scratch``: int32 of
    :func:`check_scratch_size` elements. Mass layout only (``[kmax, kmin]``)."""
    batch, heads, length, dim = k.shape
    shift = kv_offset % block
    n_k = (shift + length + block - 1) // block
    if q_offset.numel() != 1 or q_offset.dtype.is_floating_point or q_offset.device != k.device:
        raise ValueError(f"q_offset must be a one-element integer tensor on k's device, got shape "
                         f"{tuple(q_offset.shape)} {q_offset.dtype} on {q_offset.device}")
    if (features.dtype != torch.float32 or tuple(features.shape) != (batch, heads, n_k, features.shape[-1])
            or features.shape[-1] // 2 < dim or features.stride(3) != 1):
        raise ValueError(f"features must be float32 (batch={batch}, kv_heads={heads}, {n_k} tiles, 2 * D_pad >= "
                         f"{2 * dim}) with a contiguous last dim, got {tuple(features.shape)} {features.dtype}")
    if (fingerprints.dtype != k.dtype or tuple(fingerprints.shape) != (batch, heads, n_k, dim)
            or fingerprints.stride(3) != 1):
        raise ValueError(f"fingerprints must be {k.dtype} (batch={batch}, kv_heads={heads}, {n_k} tiles, dim={dim}) "
                         f"with a contiguous last dim, got {tuple(fingerprints.shape)} {fingerprints.dtype}")
    for name, t, dtype in (("stored", stored, torch.int32), ("reused", reused, torch.bool)):
        if tuple(t.shape) != (batch, heads) or t.dtype != dtype or (heads > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be {dtype} (batch={batch}, kv_heads={heads}) with a unit head stride, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if stored.stride(0) != reused.stride(0):
        raise ValueError("stored and reused must share their row stride (views of one store's tensors)")
    if scratch.dtype != torch.int32 or scratch.numel() < check_scratch_size(batch, heads, n_k):
        raise ValueError(f"scratch must be int32 with at least {check_scratch_size(batch, heads, n_k)} elements")
    if batch * heads == 0:
        return
    n_chunks = triton.cdiv(n_k, CHECK_TILES)
    fp_strides = (fingerprints.stride(0), fingerprints.stride(1), fingerprints.stride(2))
    _check_kernel[(n_chunks, batch * heads)](
        k, fingerprints, scratch, stored, *k.stride(), *fp_strides, stored.stride(0), 0, shift, length, heads, dim,
        n_chunks, n_chunks + 1, BLOCK=block, TILES=CHECK_TILES, D_PAD=_d_pad(dim), ON_DEVICE=True,
    )
    seg_arg, s_sb = _seg_arg(k_seg, features)
    _refresh_kernel[(min(n_k, CHECK_PROGRAMS), batch * heads)](
        k, seg_arg, features, fingerprints, scratch, reused.view(torch.int8), stored, q_offset,
        *k.stride(), s_sb, *features.stride()[:3], *fp_strides, stored.stride(0),
        length, shift, 0, 0, 0, n_chunks, n_chunks + 1, heads, dim, kv_offset, n_k,
        BLOCK=block, ROWS=min(POOL_ROWS, block), D_PAD=features.shape[-1] // 2, HAS_SEG=k_seg is not None,
        CHECK=True, LEARNED=False, MOMENTS=False, CHUNKS=64, ON_DEVICE=True,
    )
