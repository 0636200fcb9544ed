"""Load balance for the key-major dK/dV pass: split long per-key-tile lists into chunks ("virtual rows").

A key tile that every query tile visits (attention sinks, strided layout columns) would otherwise be one program
looping over all of them while the other programs finish after a few entries. Each chunk becomes its own program;
chunks of a split tile write fp32 partial dK/dV to a scratch buffer, summed afterwards in a fixed order, so the
result stays deterministic (no atomics). The split is host-side torch code (cached per index); the reduction is one
small Triton kernel for dK and dV together (a sequence of torch gathers cost a dozen launches and their host time).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Most chunks a heavy tile is split into; the chunk size is at least the median list length, so typical tiles
# stay whole (no scratch, no extra reduction traffic).
MAX_CHUNKS = 16
MIN_CHUNK = 8
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


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def split_key_lists(
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    chunk: int | None, imbalance: int,
) -> SplitLists | None:
    """Split per-key-tile query lists longer than ``chunk`` entries; None when no tile needs it. ``chunk`` None:
    split only when the longest list is ``imbalance`` times the typical one (mild imbalance -- dense causal, random
    layouts: about 2x -- costs less than the extra programs, scratch traffic and reduction), into chunks of at least
    the median length (``KernelOptions.split_chunk`` / ``split_imbalance``).

    Cached on the list tensors (the same index serves every layer and the checkpoint recompute), holding them so
    their storage cannot be reused while cached.
    """
    key = tuple((t.data_ptr(), tuple(t.shape), t._version) for t in (full_count, full_tiles, part_count, part_tiles))
    key = (key, chunk, imbalance, str(full_count.device))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key][1]
    result = _split(full_count, full_tiles, part_count, part_tiles, chunk, imbalance)
    _cache[key] = ((full_count, full_tiles, part_count, part_tiles), result)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return result


def _split(full_count, full_tiles, part_count, part_tiles, chunk, imbalance):
    f, p = full_count.long(), part_count.long()
    total = f + p
    max_total = int(total.max().item()) if total.numel() else 0
    if chunk is None:
        typical = int(total.float().median().item()) if total.numel() else 0
        if max_total < imbalance * max(MIN_CHUNK, typical):
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


@triton.jit
def _reduce_split_kernel(
    SCR_K, SCR_V, DK, DV, TILES, TABLE,
    s_sb, s_sh, s_ss, s_tb, s_th, s_ab, s_ah, s_at, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    Hkv, k_max, kv_len, row_shift,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One (split key tile, ROWS of it) of one (batch, KV head): dK and dV = the sum of its chunks' fp32 partials in
    slot order (fixed, so deterministic), stored for the rows inside the sequence."""
    N_CHUNKS: tl.constexpr = BLOCK // ROWS
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    heavy = pid // N_CHUNKS
    tile = tl.load(TILES + b * s_tb + h * s_th + heavy)
    if tile >= 0:
        r = (pid % N_CHUNKS) * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, HEAD_DIM)
        acc_k = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        acc_v = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for j in range(0, k_max):
            slot = tl.load(TABLE + b * s_ab + h * s_ah + heavy * s_at + j)
            base = b * s_sb + h * s_sh + tl.maximum(slot, 0) * s_ss + r[:, None] * HEAD_DIM + d[None, :]
            used = (r[:, None] * 0 + slot) >= 0  # -1 pads the tile's slot list
            acc_k += tl.load(SCR_K + base, mask=used, other=0.0)
            acc_v += tl.load(SCR_V + base, mask=used, other=0.0)
        k_t = tile * BLOCK + r - row_shift
        ok = (k_t >= 0) & (k_t < kv_len)
        tl.store(DK + b * s_kb + h * s_kh + k_t[:, None] * s_kt + d[None, :], acc_k.to(DK.dtype.element_ty),
                 mask=ok[:, None])
        tl.store(DV + b * s_vb + h * s_vh + k_t[:, None] * s_vt + d[None, :], acc_v.to(DV.dtype.element_ty),
                 mask=ok[:, None])


def reduce_split(split: SplitLists, scr_k: torch.Tensor, scr_v: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                 kv_offset: int, block: int) -> None:
    """Sum the fp32 partials (scratch ``(B, Hkv, slots, block, D)``) of each split key tile in slot order and write
    them into dK and dV ``(B, Hkv, L, D)``: one launch for both."""
    batch, hkv, _, _, dim = scr_k.shape
    tiles, table = split.heavy_tiles, split.slot_table
    h_max, k_max = table.shape[2:]
    rows = min(block, 32)
    bcast = lambda t, dim_: t.stride(dim_) if t.shape[dim_] > 1 else 0  # noqa: E731
    _reduce_split_kernel[(h_max * (block // rows), batch * hkv)](
        scr_k, scr_v, dk, dv, tiles, table,
        scr_k.stride(0), scr_k.stride(1), scr_k.stride(2), bcast(tiles, 0), bcast(tiles, 1),
        bcast(table, 0), bcast(table, 1), table.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        hkv, k_max, dk.shape[2], kv_offset % block,
        BLOCK=block, ROWS=rows, HEAD_DIM=dim, num_warps=4,
    )
