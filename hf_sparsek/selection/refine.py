"""Selector ``"refine"``: the ``"mass"`` estimate passes candidates on, exact scores of sampled rows choose among them.

Why (``scripts/experiments/candidate_recall.py``, SmolLM2-135M at 4K, top-7 of 64-token tiles, CPU; its output ``git
show 9d20d58:scripts/results/candidate_recall_smollm2-135m_4k_cpu.json``): ``"mass"`` keeps 0.897 of the oracle's true
tile mass (its worst tenth of rows 0.740), ``"probe"`` 0.978 (0.932); the oracle's own choice is found among mass's
top 4k tiles 99.3% of the time, and probe's estimate restricted to them keeps 0.977 (0.930). So the exact stage need
not read every causal key, only the candidates: its work scales with the budget, not with the length.

Definition:

1. candidates: the ``REFINE_FACTOR x topk_blocks`` competing tiles with the most estimated mass
   (:func:`hf_sparsek.selection.mass.select_mass`, the same competition: tiles the sink / window keep whole do not
   compete);
2. the sampled rows of selector ``"probe"`` (absolute positions ``stride - 1`` modulo ``probe_stride``, default 16,
   and the call's last row) score exactly (scale 1/sqrt(head dim)) the causal real keys of the query tile's
   candidates and static tiles (``TileGrid.static_full``: sink-only tiles and the tiles the window keeps whole)
   only; each row's softmax runs over those keys, so no pass over the other keys is needed;
3. a candidate's mass: the mean over the tile's sampled real rows of that softmax summed over the candidate's keys,
   then the mean over the KV group's heads; the ``topk_blocks`` candidates with the most, sorted (equal masses:
   the lower tile first); -1 where fewer candidates exist.

Fixed k only (``mass_threshold`` is refused: the restricted softmax is not the row's true mass). This module is the
PyTorch definition (CPU) and the reference of the fused second stage (``hf_sparsek.kernels.refine``).
"""

from __future__ import annotations

import math

import torch

from ..patterns import SparsePattern
from .mass import select_mass
from .oracle import tile_mass_within
from .probe import PROBE_STRIDE, probe_rows
from .store import SelectionState
from .tiles import key_tile_info, tile_grid

REFINE_FACTOR = 4  # candidates per budget slot passed from the mass estimate to the exact stage


def candidate_pattern(pattern: SparsePattern) -> SparsePattern:
    """The first stage's pattern: selector ``"mass"`` with ``REFINE_FACTOR`` times the budget."""
    return pattern.replace(selector="mass", topk_blocks=REFINE_FACTOR * pattern.topk_blocks, mass_threshold=None)


def best_tiles(mass: torch.Tensor, candidates: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, Hkv, n_q, topk) int32: of ``candidates`` (B, Hkv, n_q, C) tile numbers (-1 = none), the ``topk`` with the
    most ``mass`` (B, Hkv, n_q, n_k), sorted; equal masses: the lower tile first; -1 where fewer."""
    valid = candidates >= 0
    values = torch.gather(mass, -1, candidates.clamp(min=0).long()).masked_fill(~valid, -1.0)
    # order by (mass descending, tile ascending): sort by tile first, then stably by mass
    by_tile = torch.sort(torch.where(valid, candidates, torch.iinfo(torch.int32).max), dim=-1, stable=True).indices
    values, cands = torch.gather(values, -1, by_tile), torch.gather(candidates, -1, by_tile)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :topk]
    out = torch.where(torch.gather(values, -1, order) >= 0, torch.gather(cands, -1, order), -1).to(torch.int32)
    if out.shape[-1] < topk:
        out = torch.nn.functional.pad(out, (0, topk - out.shape[-1]), value=-1)
    return out


@torch.no_grad()
def select_refine(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: int, kv_offset: int,
                  k_seg: torch.Tensor | None, selection_state: SelectionState | None = None, backend: str = "auto"
                  ) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk_blocks) int32 key tiles (-1 = none), by the module's definition.

    Shapes and positions as :func:`hf_sparsek.selection.select_tiles`; ``selection_state`` serves the first stage
    (the mass selector's kept key features). ``backend``: ``"auto"`` runs both stages' Triton kernels on CUDA and
    these PyTorch definitions elsewhere; ``"torch"`` / ``"triton"`` force one (the latter also on CPU under
    ``TRITON_INTERPRET=1``)."""
    if pattern.topk_blocks is None:
        raise ValueError("select_refine needs a pattern with topk_blocks set")
    if pattern.mass_threshold is not None:
        raise ValueError("selector 'refine' selects a fixed topk_blocks; mass_threshold is not supported with it")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    stride = pattern.probe_stride or PROBE_STRIDE
    block = pattern.block_size
    candidates = select_mass(q, k, candidate_pattern(pattern), q_offset, kv_offset, k_seg,
                             backend="triton" if use_triton else "torch", selection_state=selection_state)
    if use_triton:
        from ..kernels.refine import refine_candidates

        count = sink_only = None
        if k_seg is not None:
            count, sink_only = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, q.shape[0], q.device)
        return refine_candidates(q, k, k_seg, count, sink_only, candidates, block=block, q_offset=q_offset,
                                 kv_offset=kv_offset, sink=pattern.sink_tokens, topk=pattern.topk_blocks,
                                 window=pattern.window, scale=1.0 / math.sqrt(q.shape[-1]), stride=stride)
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    tile_ids = torch.arange(grid.n_k, device=q.device)
    member = (candidates.unsqueeze(-1) == tile_ids).any(-2)  # (B, Hkv, n_q, n_k); -1 matches no tile
    rows = probe_rows(q.shape[2], q_offset, stride, q.device)
    mass, _ = tile_mass_within(q, k, block, q_offset, kv_offset, k_seg, rows=rows,
                               tiles=member | grid.static_full)
    return best_tiles(mass, candidates, pattern.topk_blocks)
