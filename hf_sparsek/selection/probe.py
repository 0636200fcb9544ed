"""Selector ``"probe"``: key tiles chosen by the exact attention of a sample of query rows.

Measured by perplexity (docs/evaluation.md, "What closes the gap to the oracle"): the ``"mass"`` selector's weak part
is its Quest bound on pooled keys, not the pooling of queries; the exact softmax of every 16th query row, summed per
key tile, closed 57% of the perplexity gap between ``"mass"`` and the oracle on SmolLM2-135M (every 8th row: 70%).

Definition: the rows at absolute positions ``p`` with ``p % PROBE_STRIDE == PROBE_STRIDE - 1``, and the last row of
the call (so a decode step and every query tile has one), each score every causal real key exactly (scale
1/sqrt(head dim)); a query tile's estimate is the mean over its sampled real rows of their mass per key tile, then
the mean over the KV group's heads (:func:`hf_sparsek.selection.oracle.tile_mass_within`); competition and budget are
the other selectors' (:func:`hf_sparsek.selection.tiles.choose_tiles`).

Its work is two passes over 1/16 of the dense causal scores (about half of a 12.5%-density forward's matmuls). On
CUDA it runs fused in Triton (``hf_sparsek.kernels.probe``: one launch, or three with the keys split over more
programs where the heads or query tiles are few; no (query tiles x key tiles) tensor, no host synchronisation);
this module is its PyTorch definition and reference.
"""

from __future__ import annotations

import math

import torch

from ..patterns import SparsePattern
from .oracle import exact_tile_mass
from .tiles import choose_tiles, key_tile_info, tile_grid

PROBE_STRIDE = 16


def probe_rows(q_len: int, q_offset: int, stride: int, device: torch.device) -> torch.Tensor:
    """Indices (into the call's rows) of the sampled rows: absolute positions ``stride - 1`` modulo ``stride``, and
    the last row; ascending, from host integers alone (no device read: CUDA-graph safe)."""
    first = (stride - 1 - q_offset) % stride
    rows = torch.arange(min(first, q_len), q_len, stride, device=device)
    last = first + stride * ((q_len - 1 - first) // stride) if first < q_len else -1
    if last != q_len - 1:
        rows = torch.cat([rows, torch.full((1,), q_len - 1, dtype=rows.dtype, device=device)])
    return rows


@torch.no_grad()
def select_probe(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
                 k_seg: torch.Tensor | None, stride: int = PROBE_STRIDE, backend: str = "auto") -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk_blocks) int32 key tiles with the most probed attention mass (-1 = none).

    Shapes and positions as :func:`hf_sparsek.selection.select_tiles`. ``backend``: ``"auto"`` runs the fused
    Triton kernel (``hf_sparsek.kernels.probe``) on CUDA when ``stride`` is a power of two dividing the block (the
    default 16 always is) and this PyTorch definition elsewhere; ``"torch"`` / ``"triton"`` force one (the latter
    also on CPU under ``TRITON_INTERPRET=1``, for tests)."""
    if pattern.topk_blocks is None:
        raise ValueError("select_probe needs a pattern with topk_blocks set")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    block = pattern.block_size
    kernel_stride = not stride & (stride - 1) and block % stride == 0
    if backend == "triton" or (backend == "auto" and q.is_cuda and kernel_stride):
        from ..kernels.probe import select_by_probe

        count = sink_only = None  # without padding the kernel derives both from positions
        if k_seg is not None:
            count, sink_only = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, q.shape[0], q.device)
        return select_by_probe(q, k, k_seg, count, sink_only, block=block, q_offset=q_offset, kv_offset=kv_offset,
                               sink=pattern.sink_tokens, topk=pattern.topk_blocks, window=pattern.window,
                               threshold=pattern.mass_threshold, scale=1.0 / math.sqrt(q.shape[-1]), stride=stride)
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    rows = probe_rows(q.shape[2], q_offset, stride, q.device)
    mass = exact_tile_mass(q, k, block, q_offset, kv_offset, k_seg, rows=rows)
    return choose_tiles(mass, grid, pattern.topk_blocks, pattern.mass_threshold)
