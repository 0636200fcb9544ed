"""Selector ``"moment"``: per sampled query row, a second-order estimate of each key tile's attention mass.

Why (docs/evaluation.md, "Second-order estimates"): any estimate scored with a tile's *mean* query stops near
``"mass"``'s perplexity however good its key side, because the mass of the mean query is not the mean of the rows'
masses; exact scores of sampled rows (``"probe"``) fix that but read every causal key. This selector keeps the
probe's per-row averaging and replaces the exact scores by the Gaussian moment estimate of a key tile's
log-sum-exp, two feature vectors per key tile, so its work grows with (sampled rows x key tiles), not with keys.

Definition:

* key tile features over its real keys: mean ``mu``, per-dimension (population) variance ``sigma^2`` and the count
  ``n`` of real keys;
* the sampled rows of selector ``"probe"`` (absolute positions ``stride - 1`` modulo ``probe_stride``, default
  :data:`MOMENT_STRIDE`, and the call's last row); for each, per query head, the estimated log-sum-exp of key tile n
  ``L = log n + s q . mu + MOMENT_VARIANCE * s^2 / 2 * (q * q) . sigma^2`` (``s`` = 1/sqrt(head dim); the moment
  generating function of a Gaussian with diagonal covariance, damped by :data:`MOMENT_VARIANCE`);
* a softmax of ``L`` per row over the query tile's candidate tiles (causal, holding a real key), then the mean over
  the tile's sampled real rows and the KV group's heads (each query tile's row sums to 1);
* competition and budget are the other selectors' (:func:`hf_sparsek.selection.tiles.choose_tiles`).

This module is the PyTorch definition (CPU, and the reference of the Triton path: ``select_by_moment`` in
``hf_sparsek.kernels.selection``, the mass selector's fused launch with (head x sampled row) rows per KV group).
"""

from __future__ import annotations

import math

import torch

from ..patterns import SparsePattern
from .mass import query_valid, tile_view
from .probe import probe_rows
from .store import SelectionState
from .tiles import TileGrid, choose_tiles, key_tile_info, tile_grid

MOMENT_STRIDE = 8  # one sampled row in 8 per 64-token tile (SmolLM2-135M 4K: docs/evaluation.md)
MOMENT_VARIANCE = 0.5  # weight of the variance term (0.5 beat 1.0 and 0: docs/evaluation.md)
_CHUNK_ELEMENTS = 1 << 24  # sampled rows x key tiles x query heads x batch per chunk


def key_moments(k: torch.Tensor, kv_offset: int, block: int, valid: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per absolute-grid key tile of k (B, Hkv, L, D), over its real keys (``valid`` (B, L) or None: all): mean and
    population variance (B, Hkv, n_k, D) float32 (tiles without one: 0 and 0)."""
    kp, okp = tile_view(k, kv_offset, block, valid)
    kp = kp * okp
    count = okp.sum(3).clamp(min=1)
    mean = kp.sum(3) / count
    return mean, ((kp - mean.unsqueeze(3)) ** 2 * okp).sum(3) / count


def moment_tile_mass(q: torch.Tensor, k: torch.Tensor, grid: TileGrid, block: int, q_offset: int, kv_offset: int,
                     k_seg: torch.Tensor | None, stride: int = MOMENT_STRIDE, variance: float = MOMENT_VARIANCE,
                     key_features: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hkv, n_q, n_k) float32: the moment estimate of each key tile's mass per query tile (see the module
    docstring; rows of query tiles with a sampled real row sum to 1, others are zero). ``key_features``: kept
    ``[mean, variance]`` per key tile (the :mod:`.store` layout), not pooled here."""
    batch, hq, q_len, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim)
    valid = None if k_seg is None else k_seg >= 0
    if key_features is None:
        mean, var = key_moments(k, kv_offset, block, valid)
    else:
        d_pad = key_features.shape[-1] // 2
        mean, var = key_features[..., :dim], key_features[..., d_pad: d_pad + dim]
    count, _ = key_tile_info(k.shape[2], kv_offset, k_seg, SparsePattern(block_size=block), batch, q.device)
    log_n = count.float().clamp(min=1).log().view(batch, 1, 1, 1, grid.n_k)
    rows = probe_rows(q_len, q_offset, stride, q.device)
    row_tile = (q_offset % block + rows) // block
    valid = query_valid(q_len, q_offset, kv_offset, k_seg)
    valid = torch.ones(batch, q_len, dtype=torch.bool, device=q.device) if valid is None else valid
    real = valid[:, rows].float()  # (B, R)
    keys = torch.cat([mean * scale, var * (variance * 0.5 * scale * scale)], -1)  # (B, Hkv, n_k, 2D)
    out = torch.zeros(batch, hkv, grid.n_q, grid.n_k, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, grid.n_k * hq * batch))
    for r0 in range(0, rows.numel(), chunk):
        idx = rows[r0: r0 + chunk]
        qr = q[:, :, idx].float().view(batch, hkv, group, idx.numel(), dim)
        logits = torch.einsum("bhgtd,bhnd->bhgtn", torch.cat([qr, qr * qr], -1), keys) + log_n
        cand = grid.candidate[:, :, row_tile[r0: r0 + chunk]].unsqueeze(2)  # (B, 1, 1, c, n_k)
        probs = logits.masked_fill(~cand, float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)
        probs = probs * real[:, r0: r0 + chunk].view(batch, 1, -1, 1)
        out.index_add_(2, row_tile[r0: r0 + chunk], probs)
    norm = torch.zeros(batch, grid.n_q, device=q.device).index_add_(1, row_tile, real)
    return out / norm.clamp(min=1).view(batch, 1, grid.n_q, 1)


@torch.no_grad()
def select_moment(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
                  k_seg: torch.Tensor | None, stride: int = MOMENT_STRIDE, backend: str = "auto",
                  selection_state: SelectionState | None = None) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk_blocks) int32 key tiles with the most estimated mass (-1 = none).

    Shapes and positions as :func:`hf_sparsek.selection.select_tiles`. ``backend``: ``"auto"`` runs the Triton
    kernels on CUDA and this PyTorch definition elsewhere; ``"torch"`` / ``"triton"`` force one (the latter also on
    CPU under ``TRITON_INTERPRET=1``, for tests). ``selection_state``: the layer's kept key tile moments
    (:mod:`.store`: a decode step pools only the tile being filled); None pools all keys."""
    if pattern.topk_blocks is None:
        raise ValueError("select_moment needs a pattern with topk_blocks set")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    key_features = None
    if selection_state is not None:
        key_features = selection_state.key_features(k, k_seg, q_offset, q.shape[2], kv_offset, pattern.block_size,
                                                    use_triton, moments=True)
    if use_triton:
        from ..kernels.selection import select_by_moment

        count = sink_only = None  # without padding the kernel derives both from positions
        if k_seg is not None:
            count, sink_only = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, q.shape[0], q.device)
        return select_by_moment(q, k, k_seg, count, sink_only, block=pattern.block_size, q_offset=q_offset,
                                kv_offset=kv_offset, sink=pattern.sink_tokens, topk=pattern.topk_blocks,
                                window=pattern.window, threshold=pattern.mass_threshold,
                                scale=1.0 / math.sqrt(q.shape[-1]), stride=stride, variance=MOMENT_VARIANCE,
                                key_features=key_features)
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    mass = moment_tile_mass(q, k, grid, pattern.block_size, q_offset, kv_offset, k_seg, stride,
                            key_features=key_features)
    return choose_tiles(mass, grid, pattern.topk_blocks, pattern.mass_threshold)
