"""Selector ``"mass"``: per query tile, the key tiles with the most estimated attention mass.

The definition (chosen by measured recall, docs/evaluation.md "Choosing the mass selector"):

* query tile feature, per query head h (no averaging over the KV group): ``qbar`` = mean of the tile's real rows;
* key tile features, per KV head: ``kmax`` / ``kmin`` = per-dimension max / min over the tile's real keys;
* block logit (Quest's bound on the tile's largest score): ``L[h, m, n] = scale * sum_d max(qbar_d * kmax_d,
  qbar_d * kmin_d) = scale * (relu(qbar) . kmax + min(qbar, 0) . kmin)``, so one strong key keeps its tile visible
  (``scale`` = 1/sqrt(head dim): the selector does not see a model's own softmax scale);
* per head, a softmax over the causal key tiles holding a real key turns logits into estimated mass per tile
  (``p_h``, summing to 1 per query tile, so budgets compare across rows and heads); the KV group's estimate is the
  mean of its heads' ``p_h``;
* tiles the pattern's sink / window already keep whole do not compete (the budget goes to new tiles); of the
  rest, the ``topk_blocks`` with the most mass, or with ``mass_threshold`` t the fewest of those whose mass plus
  the static tiles' mass reaches t (:func:`hf_sparsek.selection.tiles.choose_tiles`).

This module is the PyTorch definition (CPU, and the reference of the Triton kernel in
``hf_sparsek.kernels.selection``); it materialises (query tiles x key tiles) per head, in chunks of query tiles.
"""

from __future__ import annotations

import math

import torch

from ..patterns import SparsePattern
from .store import SelectionState
from .tiles import TileGrid, choose_tiles, key_tile_info, tile_grid

_CHUNK_ELEMENTS = 1 << 24  # query tiles x key tiles x query heads x batch per chunk of the PyTorch path


def query_valid(q_len: int, q_offset: int, kv_offset: int, k_seg: torch.Tensor | None) -> torch.Tensor | None:
    """(B, q_len) bool: query rows at a real position (a padded query row's key is padding), or None (all real)."""
    if k_seg is None:
        return None
    start = q_offset - kv_offset
    if start < 0:  # queries before the stored keys: nothing to read their padding from
        return None
    return k_seg[:, start: start + q_len] >= 0


def tile_view(x: torch.Tensor, offset: int, block: int, valid: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, L, D) on the absolute tile grid from ``offset``: (B, H, n_tiles, block, D) float32, zero-padded, and
    (B, 1, n_tiles, block, 1) bool, which positions are real (``valid`` (B, L), or None: all stored ones)."""
    batch, heads, length, dim = x.shape
    shift = offset % block
    n_tiles = (shift + length + block - 1) // block
    back = n_tiles * block - shift - length
    ok = torch.ones(batch, length, dtype=torch.bool, device=x.device) if valid is None else valid
    okp = torch.nn.functional.pad(ok, (shift, back), value=False).view(batch, 1, n_tiles, block, 1)
    xp = torch.nn.functional.pad(x.float(), (0, 0, shift, back)).view(batch, heads, n_tiles, block, dim)
    return xp, okp


def pool_tiles(x: torch.Tensor, offset: int, block: int, valid: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, max and min over each absolute-grid tile of x (B, H, L, D), real positions only (float32).

    Tiles without a real position get mean 0, max 0 and min 0 (they never compete)."""
    xp, okp = tile_view(x, offset, block, valid)
    count = okp.sum(3)
    mean = (xp * okp).sum(3) / count.clamp(min=1)
    has = count > 0
    big = torch.finfo(torch.float32).max
    kmax = torch.where(okp, xp, -big).amax(3).where(has, 0.0)
    kmin = torch.where(okp, xp, big).amin(3).where(has, 0.0)
    return mean, kmax, kmin


def tile_mass(q: torch.Tensor, k: torch.Tensor, grid: TileGrid, block: int, q_offset: int, kv_offset: int,
              k_seg: torch.Tensor | None, scale: float | None = None, key_features: torch.Tensor | None = None
              ) -> torch.Tensor:
    """(B, Hkv, n_q, n_k) float32: estimated attention mass of each key tile per query tile (rows sum to 1).

    ``key_features``: kept ``[kmax, kmin]`` per key tile (the ``hf_sparsek.selection.store`` layout), not pooled."""
    batch, hq, q_len, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    qbar, _, _ = pool_tiles(q, q_offset, block, query_valid(q_len, q_offset, kv_offset, k_seg))
    if key_features is None:
        _, kmax, kmin = pool_tiles(k, kv_offset, block, None if k_seg is None else k_seg >= 0)
    else:
        d_pad = key_features.shape[-1] // 2
        kmax, kmin = key_features[..., :dim], key_features[..., d_pad: d_pad + dim]
    qbar = qbar.view(batch, hkv, group, grid.n_q, dim)
    keys = torch.cat([kmax, kmin], -1)  # (B, Hkv, n_k, 2D)
    out = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, grid.n_k * hq * batch))
    for m0 in range(0, grid.n_q, chunk):
        qc = qbar[:, :, :, m0: m0 + chunk]
        feats = torch.cat([qc.clamp(min=0), qc.clamp(max=0)], -1)  # (B, Hkv, G, c, 2D)
        logits = torch.einsum("bhgmd,bhnd->bhgmn", feats, keys) * scale
        cand = grid.candidate[:, :, m0: m0 + chunk].unsqueeze(2)  # (B, 1, 1, c, n_k)
        probs = logits.masked_fill(~cand, float("-inf")).softmax(-1).nan_to_num(0.0)
        out.append(probs.mean(2))
    return torch.cat(out, 2)


@torch.no_grad()
def select_mass(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
                k_seg: torch.Tensor | None, backend: str = "auto", selection_state: SelectionState | None = None
                ) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk_blocks) int32 key tiles with the most estimated mass (-1 = none).

    q (B, Hq, q_len, D), k (B, Hkv, kv_len, D), queries at absolute ``q_offset + t``, keys at ``kv_offset + s``;
    ``k_seg`` (B, kv_len) marks padding keys with -1. ``backend``: ``"auto"`` runs the Triton kernel
    (``hf_sparsek.kernels.selection``) on CUDA and this PyTorch definition elsewhere; ``"torch"`` / ``"triton"``
    force one (the latter also on CPU under ``TRITON_INTERPRET=1``, for tests). ``selection_state``: the layer's
    :class:`~hf_sparsek.selection.store.SelectionState`: key tile features come from it (kept tiles reused, new ones
    pooled and kept) instead of from every key; None pools all keys.
    """
    if pattern.topk_blocks is None:
        raise ValueError("select_mass needs a pattern with topk_blocks set")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    key_features = None
    if selection_state is not None:
        key_features = selection_state.key_features(k, k_seg, q_offset, q.shape[2], kv_offset, pattern.block_size,
                                                    use_triton)
    if use_triton:
        from ..kernels.selection import select_by_mass

        count = sink_only = None  # without padding the kernel derives both from positions (fewer launches)
        if k_seg is not None:
            count, sink_only = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, q.shape[0], q.device)
        return select_by_mass(q, k, k_seg, count, sink_only, block=pattern.block_size, q_offset=q_offset,
                              kv_offset=kv_offset, sink=pattern.sink_tokens, topk=pattern.topk_blocks,
                              window=pattern.window,
                              threshold=pattern.mass_threshold, scale=1.0 / math.sqrt(q.shape[-1]),
                              key_features=key_features)
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    mass = tile_mass(q, k, grid, pattern.block_size, q_offset, kv_offset, k_seg, key_features=key_features)
    return choose_tiles(mass, grid, pattern.topk_blocks, pattern.mass_threshold)
