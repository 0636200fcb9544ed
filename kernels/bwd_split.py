"""Load balance for the key-major dK/dV pass: split long per-key-tile lists into chunks ("virtual rows").

A key tile that every query tile visits (attention sinks, strided layout columns) would otherwise be one program
looping over all of them while the other programs finish after a few entries. Each chunk becomes its own program;
chunks of a split tile write fp32 partial dK/dV to a scratch buffer, summed afterwards in a fixed order, so the
result stays deterministic (no atomics). Host-side torch code; the kernel reads the virtual lists.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

# Most chunks a heavy tile is split into; the chunk size is at least the median list length, so typical tiles
# stay whole (no scratch, no extra reduction traffic).
MAX_CHUNKS = 16
MIN_CHUNK = 8
# Split only when the longest list is this many times the typical one: mild imbalance (dense causal, random
# layouts) costs less than the extra programs, scratch traffic and reduction.
IMBALANCE = 4
_CACHE_SIZE = 16
_cache: OrderedDict = OrderedDict()


@dataclass
class SplitLists:
    """Virtual-row lists for the dK/dV kernel and how to fold the partial results back."""

    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # full count/tiles, part count/tiles
    tile: torch.Tensor  # (Bi, Hi, R) int32: the key tile of each virtual row
    slot: torch.Tensor  # (Bi, Hi, R) int32: -1 store directly, >= 0 scratch slot, -2 padding row
    n_slots: int
    heavy_tiles: torch.Tensor  # (Bi, Hi, H) int64 key tiles that were split, -1 padding
    slot_table: torch.Tensor  # (Bi, Hi, H, K) int64 scratch slots of each split tile, -1 padding
    # reduce_split's index tensors per (batch, heads, kv_len, kv_offset, block, device): built once, so later calls
    # run without the host synchronisation of boolean-mask indexing (it dominated small backward calls).
    plans: dict = field(default_factory=dict)


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def split_key_lists(
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    chunk: int | None = None,
) -> SplitLists | None:
    """Split per-key-tile query lists longer than ``chunk`` entries; None when no tile needs it.

    Cached on the list tensors (the same index serves every layer and the checkpoint recompute), holding them so
    their storage cannot be reused while cached.
    """
    key = tuple((t.data_ptr(), tuple(t.shape), t._version) for t in (full_count, full_tiles, part_count, part_tiles))
    key = (key, chunk, str(full_count.device))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key][1]
    result = _split(full_count, full_tiles, part_count, part_tiles, chunk)
    _cache[key] = ((full_count, full_tiles, part_count, part_tiles), result)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return result


def _split(full_count, full_tiles, part_count, part_tiles, chunk):
    f, p = full_count.long(), part_count.long()
    total = f + p
    max_total = int(total.max().item()) if total.numel() else 0
    if chunk is None:
        typical = int(total.float().median().item()) if total.numel() else 0
        if max_total < IMBALANCE * max(MIN_CHUNK, typical):
            return None
        chunk = max(MIN_CHUNK, typical, -(-max_total // MAX_CHUNKS))
    pieces = torch.maximum(_ceil_div(f, chunk), _ceil_div(p, chunk)).clamp(min=1)
    if max_total <= chunk or int(pieces.max().item()) == 1:
        return None
    n_b, n_h, _ = f.shape
    device = f.device
    rows = pieces.sum(-1)
    r_max = int(rows.max().item())
    heavy_count = (pieces > 1).sum(-1)
    h_max = max(1, int(heavy_count.max().item()))
    k_max = int(pieces.max().item())
    vfc = torch.zeros(n_b, n_h, r_max, dtype=torch.int32, device=device)
    vpc = torch.zeros_like(vfc)
    vft = torch.zeros(n_b, n_h, r_max, chunk, dtype=torch.int32, device=device)
    vpt = torch.zeros_like(vft)
    vtile = torch.zeros_like(vfc)
    vslot = torch.full_like(vfc, -2)
    heavy_tiles = torch.full((n_b, n_h, h_max), -1, dtype=torch.long, device=device)
    slot_table = torch.full((n_b, n_h, h_max, k_max), -1, dtype=torch.long, device=device)
    n_slots = 0
    offsets = torch.arange(chunk, device=device)
    for bi in range(n_b):
        for hi in range(n_h):
            k = pieces[bi, hi]
            tile = torch.repeat_interleave(torch.arange(k.numel(), device=device), k)
            first_row = torch.cumsum(k, 0) - k
            j = torch.arange(tile.numel(), device=device) - first_row[tile]
            start = j * chunk
            r = tile.numel()
            vfc[bi, hi, :r] = (f[bi, hi, tile] - start).clamp(0, chunk).to(torch.int32)
            vpc[bi, hi, :r] = (p[bi, hi, tile] - start).clamp(0, chunk).to(torch.int32)
            idx = (start.view(-1, 1) + offsets).clamp(max=full_tiles.shape[-1] - 1)
            vft[bi, hi, :r] = full_tiles[bi, hi][tile.view(-1, 1), idx]
            idx = (start.view(-1, 1) + offsets).clamp(max=part_tiles.shape[-1] - 1)
            vpt[bi, hi, :r] = part_tiles[bi, hi][tile.view(-1, 1), idx]
            vtile[bi, hi, :r] = tile.to(torch.int32)
            heavy = k[tile] > 1
            slot = torch.cumsum(heavy.long(), 0) - 1
            vslot[bi, hi, :r] = torch.where(heavy, slot, -1).to(torch.int32)
            n_slots = max(n_slots, int(heavy.sum().item()))
            ht = torch.nonzero(k > 1).flatten()
            heavy_tiles[bi, hi, : ht.numel()] = ht
            # The slots of one heavy tile are consecutive: its first slot plus 0..pieces-1.
            first_slot = slot[first_row[ht]]
            span = torch.arange(k_max, device=device)
            table = first_slot.view(-1, 1) + span
            slot_table[bi, hi, : ht.numel()] = torch.where(span < k[ht].view(-1, 1), table, -1)
    return SplitLists((vfc, vft, vpc, vpt), vtile, vslot, n_slots, heavy_tiles, slot_table)


def reduce_split(split: SplitLists, scratch: torch.Tensor, out: torch.Tensor, kv_offset: int, block: int) -> None:
    """Sum the fp32 partials of each split key tile in slot order and write them into ``out`` (B, Hkv, L, D)."""
    batch, hkv, n_slots, _, dim = scratch.shape
    kv_len = out.shape[2]
    table = split.slot_table.expand(batch, hkv, -1, -1)
    h_max, k_max = table.shape[2:]
    valid = table >= 0
    flat = scratch.view(batch, hkv, n_slots, block * dim)
    gathered = torch.gather(flat, 2, table.clamp(min=0).reshape(batch, hkv, -1, 1).expand(-1, -1, -1, block * dim))
    gathered = gathered.view(batch, hkv, h_max, k_max, block, dim)
    summed = torch.where(valid.view(batch, hkv, h_max, k_max, 1, 1), gathered, 0.0).sum(3)  # fixed order
    src, dst = _reduce_plan(split, batch, hkv, kv_len, kv_offset, block, out.device)
    out.index_put_(dst, summed[src].to(out.dtype))


def _reduce_plan(split: SplitLists, batch: int, hkv: int, kv_len: int, kv_offset: int, block: int,
                 device: torch.device) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Where each summed row of a split tile comes from (batch, head, heavy slot, row) and goes to (batch, head,
    key row), keeping rows inside the sequence; cached on ``split``."""
    key = (batch, hkv, kv_len, kv_offset, block, str(device))
    if key not in split.plans:
        tiles = split.heavy_tiles.expand(batch, hkv, -1)
        rows = tiles.unsqueeze(-1) * block + torch.arange(block, device=device) - kv_offset % block
        ok = (tiles.unsqueeze(-1) >= 0) & (rows >= 0) & (rows < kv_len)
        src = tuple(ok.nonzero(as_tuple=True))
        split.plans[key] = (src, (src[0], src[1], rows[src]))
    return split.plans[key]
