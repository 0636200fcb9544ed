"""Dynamic block selection: which key tiles each query tile visits beyond the pattern's static part.

``select_tiles`` dispatches on ``pattern.selector`` (``resolved_selector``): ``"mass"`` (the default) estimates each
key tile's attention mass per query head (:mod:`.mass`), ``"meanpool"`` is the pooled dot product of before
(:mod:`.meanpool`), ``"probe"`` keeps the tiles with the most exact attention of sampled query rows (:mod:`.probe`),
``"refine"`` lets ``"mass"`` pass on 4x the budget and chooses among those by the exact attention of sampled rows
(:mod:`.refine`), ``"moment"`` estimates each key tile's mass per sampled query row from the tile's key mean and
variance (:mod:`.moment`), ``"oracle"`` keeps the tiles with the most true attention mass (:mod:`.oracle`: dense scores,
evaluation only), ``"learned"`` tiles come from a trained scorer outside the op. Every selector returns
(B, Hkv, n_q_tiles, topk_blocks) int32 key tile numbers on the absolute grid (-1 = none) without reading a tensor on
the host, so it runs inside CUDA graphs and torch.compile.
"""

from __future__ import annotations

import torch

from ..patterns import SparsePattern
from .mass import select_mass
from .meanpool import select_meanpool
from .moment import MOMENT_STRIDE, select_moment
from .oracle import select_oracle
from .probe import PROBE_STRIDE, select_probe
from .refine import select_refine
from .store import SelectionState

__all__ = ["SelectionState", "select_mass", "select_meanpool", "select_moment", "select_oracle", "select_probe",
           "select_refine", "select_tiles", "select_tiles_at_device_offset", "selects_at_device_offset",
           "written_key_info"]

DEVICE_OFFSET_SELECTORS = ("mass", "probe")  # selectors that choose for a decode row whose position is on the device


@torch.no_grad()
def select_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: SparsePattern,
    q_offset: int,
    kv_offset: int,
    k_seg: torch.Tensor | None,
    selection_state: SelectionState | None = None,
) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, topk_blocks) int32 key tiles per query tile chosen by ``pattern``'s selector (-1 = none).

    q (B, Hq, q_len, D) at absolute positions ``q_offset + t``; k (B, Hkv, kv_len, D) at ``kv_offset + s``;
    ``k_seg`` (B, kv_len) int32 with -1 for padding keys, or None. ``selection_state``: the layer's kept key tile
    features (:mod:`.store`), used by selectors ``"mass"``, ``"moment"`` and ``"refine"`` (a decode step then pools
    only the tile being filled); the others ignore it; None: no reuse.
    """
    selector = pattern.resolved_selector
    if selector is None:
        raise ValueError("select_tiles needs a pattern with topk_blocks set (the budget a selector fills)")
    # keys at or after the call's last query no query can attend (a static cache's unwritten slots): they must not
    # enter the features, or a static cache would choose other tiles than a dynamic one holding only written keys
    end = q_offset + q.shape[2] - kv_offset
    if 0 < end < k.shape[2]:
        k = k[:, :, :end]
        k_seg = None if k_seg is None else k_seg[:, :end]
    if selector == "meanpool":
        return select_meanpool(q, k, pattern, q_offset, kv_offset, k_seg)
    if selector == "mass":
        return select_mass(q, k, pattern, q_offset, kv_offset, k_seg, selection_state=selection_state)
    if selector == "oracle":
        return select_oracle(q, k, pattern, q_offset, kv_offset, k_seg)
    if selector == "probe":
        return select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=pattern.probe_stride or PROBE_STRIDE)
    if selector == "moment":
        return select_moment(q, k, pattern, q_offset, kv_offset, k_seg, stride=pattern.probe_stride or MOMENT_STRIDE,
                             selection_state=selection_state)
    if selector == "refine":
        return select_refine(q, k, pattern, q_offset, kv_offset, k_seg, selection_state=selection_state)
    raise ValueError(f"selector {selector!r} cannot choose tiles inside the op: the tiles must come from the model's "
                     "trained scorer (pass them as selected_tiles); selectors 'mass', 'meanpool', 'probe', "
                     "'refine', 'moment' and 'oracle' select here")


def selects_at_device_offset(pattern: SparsePattern, q_len: int) -> bool:
    """Whether :func:`select_tiles_at_device_offset` takes this pattern and query run: one row, selector ``"mass"``
    or ``"probe"`` (with a stride the probe kernel samples: a power of two dividing the block)."""
    if q_len != 1 or pattern.resolved_selector not in DEVICE_OFFSET_SELECTORS:
        return False
    if pattern.resolved_selector == "probe":
        stride = pattern.probe_stride or PROBE_STRIDE
        return not stride & (stride - 1) and pattern.block_size % stride == 0
    return True


def written_key_info(k_seg: torch.Tensor | None, batch: int, kv_len: int, kv_offset: int, q_offset: torch.Tensor,
                     pattern: SparsePattern) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a decode row at the device-side position ``q_offset``: (B, kv_len) int32 key segments with the keys at
    and after the row (a static cache's unwritten slots) marked -1, and per key tile the real keys it holds and
    whether all are sink tokens (:func:`hf_sparsek.selection.tiles.key_tile_info`). Device ops only: traced under
    torch.compile, where Inductor fuses this work into a few kernels."""
    from .tiles import key_tile_info

    written = torch.arange(kv_offset, kv_offset + kv_len, device=q_offset.device) <= q_offset.reshape(1)
    seg = torch.where(written, 0 if k_seg is None else k_seg, -1).expand(batch, kv_len).to(torch.int32).contiguous()
    count, sink_only = key_tile_info(kv_len, kv_offset, seg, pattern, batch, q_offset.device)
    return seg, count, sink_only


@torch.no_grad()
def select_tiles_at_device_offset(q: torch.Tensor, k: torch.Tensor, pattern: SparsePattern, q_offset: torch.Tensor,
                                  kv_offset: int, k_seg: torch.Tensor | None,
                                  key_info: tuple[torch.Tensor, ...] | None = None,
                                  key_features: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`select_tiles` for one decode row whose position ``q_offset`` is a one-element integer tensor on the
    device (a static cache under torch.compile): (B, Hkv, 1, topk_blocks) int32 key tiles, nothing read on the host,
    so a CUDA graph can hold the call. Triton kernels only; the patterns :func:`selects_at_device_offset` takes.

    :func:`select_tiles` slices off the keys at and after the row (a static cache's unwritten slots); here they are
    marked as padding by device ops instead: the same features, candidates and tiles (ties aside). ``key_info``:
    :func:`written_key_info` made beforehand (else made here from ``k_seg``); ``key_features``: selector "mass"'s
    key tile features kept by a :class:`~.decode_store.DecodeStore`, refreshed up to the row (else pooled here
    from every key)."""
    import math

    if pattern.topk_blocks is None or not selects_at_device_offset(pattern, q.shape[2]):
        raise ValueError(f"selection with a device-side position takes one query row and selector 'mass' or 'probe' "
                         f"(a power-of-two probe_stride dividing the block), got q_len={q.shape[2]} and "
                         f"{pattern.describe()}")
    if key_info is None:
        key_info = written_key_info(k_seg, q.shape[0], k.shape[2], kv_offset, q_offset, pattern)
    seg, count, sink_only = key_info
    common = dict(block=pattern.block_size, q_offset=q_offset.reshape(1), kv_offset=kv_offset,
                  sink=pattern.sink_tokens, topk=pattern.topk_blocks, window=pattern.window,
                  threshold=pattern.mass_threshold, scale=1.0 / math.sqrt(q.shape[-1]))
    if pattern.resolved_selector == "probe":
        if key_features is not None:
            raise ValueError("key_features serve selector 'mass' only; selector 'probe' reads the keys themselves")
        from ..kernels.probe import select_by_probe

        return select_by_probe(q, k, seg, count, sink_only, stride=pattern.probe_stride or PROBE_STRIDE, **common)
    from ..kernels.selection import select_by_mass_at_device_offset

    return select_by_mass_at_device_offset(q, k, seg, count, sink_only, key_features=key_features, **common)
