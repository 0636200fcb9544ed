"""Pattern + shapes -> block index: the one data structure the reference and the kernels both consume.

Tiles live on the *absolute* position grid: query tile ``m`` covers absolute positions
``[(q_offset // B + m) * B, (q_offset // B + m + 1) * B)`` and key tile ``n`` likewise from ``kv_offset // B``.
Storage row ``t`` of the query tensor is absolute position ``q_offset + t`` (so a tile may start before the first
row: ``q_shift = q_offset % B`` rows of padding), and key ``s`` is at ``kv_offset + s``. Aligning tiles to absolute
positions makes block layouts independent of how a sequence is cut into calls (prefill, chunks, decode).

For every (batch, KV head, query tile) the index lists the key tiles to visit, split FlexAttention-style:

* ``full_tiles``: every (query, key) pair of the tile is attended; no element mask is needed;
* ``part_tiles``: some pairs are; the kernel evaluates the token-exact predicate. A value ``n >= 0`` means "key
  tile ``n``, keep pairs allowed by the token rules (sink or window)"; ``-(n + 1)`` means "key tile ``n`` is
  selected as a block, keep every pair that is causal, valid and in the same sequence".

The element predicate of a partial tile, for query at absolute ``i`` and key at absolute ``j``::

    j <= i  and  k_seg[j] >= 0  and  (q_seg is None or q_seg[i] == k_seg[j])
            and  (block_selected or rank[j] < sink_tokens or i - j < window)

where ``rank[j]`` is the key's position within its own sequence (``j`` itself without padding or packing).
Batch and head dimensions of the index are 1 when the layout does not depend on them (broadcast).
Building costs O(query tiles x listed tiles), never O(S^2): 1M tokens fit.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch

from .patterns import SparsePattern

# Upper bound on elements of one candidate chunk (query tiles x candidates x heads x batch), to bound memory.
_CHUNK_ELEMENTS = 1 << 24
_HASH_BITS = 24
ListBuilder = Literal["auto", "torch", "triton"]
LIST_BUILDERS = ("auto", "torch", "triton")


@dataclass
class BlockIndex:
    """Key tiles to visit per (batch, KV head, query tile), with what the kernel needs for partial tiles.

    Shapes: ``*_count`` are ``(Bi, Hi, n_q_tiles)`` int32, ``*_tiles`` are ``(Bi, Hi, n_q_tiles, width)`` int32,
    with ``Bi`` in {1, batch} and ``Hi`` in {1, kv_heads}. Entries past ``count`` are padding (0). ``width`` is an
    upper bound the host knows from the pattern and the shapes (not the longest row): read it as a row stride and
    loop to the counts.
    """

    block_size: int
    q_len: int
    kv_len: int
    q_offset: int
    kv_offset: int
    n_q_tiles: int
    n_k_tiles: int
    full_count: torch.Tensor
    full_tiles: torch.Tensor
    part_count: torch.Tensor
    part_tiles: torch.Tensor
    sink_tokens: int = 0
    window: int = 0  # 0: no window term
    k_seg: torch.Tensor | None = None  # (B, kv_len) int32, -1 = key not attendable (padding)
    q_seg: torch.Tensor | None = None  # (B, q_len) int32, packed sequences only
    k_rank: torch.Tensor | None = None  # (B, kv_len) int32, position of the key in its own sequence
    # Host-known widths of the transposed (full, partial) lists, from the pattern; None: the number of query tiles.
    t_widths: tuple[int, int] | None = None
    _transposed: tuple[torch.Tensor, ...] | None = None

    @property
    def q_shift(self) -> int:
        return self.q_offset % self.block_size

    @property
    def k_shift(self) -> int:
        return self.kv_offset % self.block_size

    @property
    def batch_broadcast(self) -> bool:
        return self.full_count.shape[0] == 1

    @property
    def head_broadcast(self) -> bool:
        return self.full_count.shape[1] == 1

    def attended_tiles(self) -> int:
        """Number of (batch-or-broadcast, head-or-broadcast, query tile, key tile) pairs visited."""
        return int(self.full_count.sum().item() + self.part_count.sum().item())

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query tiles per key tile (for a deterministic key-major backward): full_count, full, part_count, part.

        Same encoding as the forward lists, with query tile numbers in place of key tile numbers. Widths are
        host-known bounds (``t_widths``), so building them reads nothing back from the device.
        """
        if self._transposed is None:
            w_full, w_part = self.t_widths or (self.n_q_tiles, self.n_q_tiles)
            (f_cnt, f_idx), (p_cnt, p_idx) = _transpose(
                [(self.full_count, self.full_tiles, False, w_full), (self.part_count, self.part_tiles, True, w_part)],
                self.n_k_tiles)
            self._transposed = (f_cnt, f_idx, p_cnt, p_idx)
        return self._transposed

    def density(self) -> float:
        """Attended (query, key) pairs over causal pairs, counted exactly at the token level (small sizes only)."""
        mask = self.token_mask()
        causal = _causal_token_mask(self, mask.device)
        return float(mask.sum().item()) / max(1.0, float(causal.sum().item()) * mask.shape[0] * mask.shape[1])

    def token_mask(self) -> torch.Tensor:
        """Expand the index to a dense (Bi', Hi, q_len, kv_len) boolean mask. For tests and pictures only."""
        return _expand_index(self)


def _n_tiles(offset: int, length: int, block: int) -> int:
    """Tiles of the absolute grid that positions ``[offset, offset + length)`` touch."""
    return (offset % block + length + block - 1) // block


def _tile_ranges(offset: int, length: int, block: int, device: torch.device, whole: bool = False):
    """Absolute first/last position inside the call's range of each tile (int64) and, if asked, whether the tile
    is whole (not clipped by the range)."""
    first = offset // block * block
    starts = torch.arange(first, first + _n_tiles(offset, length, block) * block, block, device=device)
    lo = starts.clamp(min=offset)
    hi = (starts + (block - 1)).clamp(max=offset + length - 1)
    return (lo, hi, (lo == starts) & (hi - lo == block - 1)) if whole else (lo, hi)


def _tile_reduce(values: torch.Tensor, valid: torch.Tensor, shift: int, n_tiles: int, block: int):
    """Per-tile min / max of ``values`` (B, L, V) over ``valid`` (B, L) positions, and any / all validity."""
    batch, length, n_val = values.shape
    pad_back = n_tiles * block - shift - length
    big = torch.iinfo(torch.int64).max
    vals = torch.nn.functional.pad(values.long(), (0, 0, shift, pad_back)).view(batch, n_tiles, block, n_val)
    ok = torch.nn.functional.pad(valid, (shift, pad_back), value=False).view(batch, n_tiles, block)
    okv = ok.unsqueeze(-1)
    vmin = torch.where(okv, vals, big).amin(2)
    vmax = torch.where(okv, vals, -big).amax(2)
    return vmin, vmax, ok.any(-1), ok.all(-1)


def _random_keep(qb: torch.Tensor, kb: torch.Tensor, head: torch.Tensor, seed: int, density: float) -> torch.Tensor:
    """Deterministic per-(query block, key block, head) coin flip with probability ``density``."""
    x = qb * 0x9E3779B1 + kb * 0x85EBCA77 + head * 0xC2B2AE3D + seed * 0x27D4EB2F + 0x165667B1
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    threshold = int(round(density * (1 << _HASH_BITS)))
    return (x & ((1 << _HASH_BITS) - 1)) < threshold


def random_layout_keep(qb: torch.Tensor, kb: torch.Tensor, head: torch.Tensor, seed: int, density: float):
    """Public rule of the random layout: the diagonal block always, others by the deterministic coin."""
    return (qb == kb) | _random_keep(qb, kb, head, seed, density)


def absolute_position(name: str, value: object) -> int:
    """Check an offset argument: an integer >= 0 (a negative one would make the kernels read before the tensors).

    Plain ints cost nothing; a one-element integer tensor is read once, as ``int()`` would. An int is used as it
    is: under torch.compile it may be symbolic (a static cache's offset in a mask generate() prepared), and
    ``operator.index`` would specialize the trace on its value (one recompile per decode step).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        position = value
    else:
        try:
            position = operator.index(value)
        except TypeError:
            position = -1
    if position < 0:
        raise ValueError(f"{name}={value!r}: expected an integer absolute position >= 0")
    return position


def build_block_index(
    pattern: SparsePattern,
    *,
    batch: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    k_seg: torch.Tensor | None = None,
    q_seg: torch.Tensor | None = None,
    k_rank: torch.Tensor | None = None,
    topk_tiles: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    builder: ListBuilder = "auto",
) -> BlockIndex:
    """Build the block index of ``pattern`` for one attention call.

    ``k_seg``/``q_seg``/``k_rank`` describe padding and packed sequences (see the module docstring); leave them
    None for one unpadded sequence per batch row. ``topk_tiles`` (B or 1, Hkv or 1, n_q_tiles, k) holds key tile
    numbers chosen by a dynamic selection (-1 for none); they are added as block-selected tiles.

    No host synchronisation: every list width is an upper bound known from the pattern and the shapes (a GPU build
    only queues work), and entries past a row's count are 0. The one exception is packed sequences (``q_seg``):
    each segment has its own sink tiles, so the sink list is sized by one device read of the longest one.
    Without ``q_seg``, the valid keys of a row must have distinct ranks (``k_rank``: their position in the row's
    sequence, as a padding mask gives): the first ``sink`` of them then lie in at most ``sink`` tiles.

    ``builder`` makes the forward lists: ``"auto"`` one Triton launch (``hf_sparsek.kernels.block_index``) on CUDA
    where it applies (sink / window / dense rows / selected tiles, no block layout, dense heads or packing), else
    the PyTorch ops; ``"torch"`` / ``"triton"`` force one (the latter raises where it does not apply; on CPU it needs
    ``TRITON_INTERPRET=1``). Both give the same index, bit for bit.
    """
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"q_len and kv_len must be >= 1, got q_len={q_len}, kv_len={kv_len}")
    q_offset, kv_offset = absolute_position("q_offset", q_offset), absolute_position("kv_offset", kv_offset)
    if q_offset + q_len > kv_offset + kv_len:
        raise ValueError(
            f"queries end at position {q_offset + q_len} but keys end at {kv_offset + kv_len}: every query needs "
            "its own key (q_offset + q_len <= kv_offset + kv_len)"
        )
    bad_heads = [h for h in pattern.dense_heads if h >= kv_heads]
    if bad_heads:
        raise ValueError(f"dense_heads {bad_heads} out of range: the layer has {kv_heads} KV heads")
    if q_seg is not None and k_seg is None:
        raise ValueError("q_seg needs k_seg (packed sequences give both)")
    device = torch.device(device)
    block = pattern.block_size
    n_q, n_k = _n_tiles(q_offset, q_len, block), _n_tiles(kv_offset, kv_len, block)
    if topk_tiles is not None and (
        topk_tiles.dim() != 4 or topk_tiles.shape[0] not in (1, batch) or topk_tiles.shape[1] not in (1, kv_heads)
        or topk_tiles.shape[2] != n_q
    ):
        raise ValueError(
            f"topk_tiles must be (1 or batch={batch}, 1 or kv_heads={kv_heads}, n_q_tiles={n_q}, k), "
            f"got shape {tuple(topk_tiles.shape)}"
        )
    plan = _plan(pattern, batch, kv_heads, q_offset, q_len, kv_offset, k_seg, q_seg, k_rank, topk_tiles, n_q, n_k)
    by_kernel = _lists_by_kernel(plan, builder, device)
    table = has_sink = None
    if by_kernel and plan.padded:
        table, has_sink = _kernel_tile_table(plan, kv_offset, kv_len, k_seg, k_rank)
    elif not by_kernel:  # without padding the kernel takes the key tiles' statistics from positions
        table, has_sink = _key_tile_table(plan, kv_offset, kv_len, k_seg, q_seg, k_rank, device)
    sink_row = None if by_kernel and plan.sink_fixed else _sink_candidates(plan, has_sink, device)
    _finish_widths(plan)
    if by_kernel:
        lists = _kernel_lists(plan, q_offset, q_len, kv_offset, kv_len, table, sink_row, topk_tiles, device)
    else:
        lists = _torch_lists(plan, q_offset, q_len, q_seg, table, sink_row, topk_tiles, device)
    return BlockIndex(
        block_size=block,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=q_offset,
        kv_offset=kv_offset,
        n_q_tiles=n_q,
        n_k_tiles=n_k,
        full_count=lists[0],
        full_tiles=lists[1],
        part_count=lists[2],
        part_tiles=lists[3],
        sink_tokens=plan.sink,
        window=plan.window,
        k_seg=None if k_seg is None else k_seg.to(torch.int32).contiguous(),
        q_seg=None if q_seg is None else q_seg.to(torch.int32).contiguous(),
        k_rank=None if k_rank is None else k_rank.to(torch.int32).contiguous(),
        t_widths=plan.t_widths,
    )


@dataclass
class _Plan:
    """What the host decides from the pattern and the shapes: layout dimensions, candidate sources, list widths."""

    pattern: SparsePattern
    block: int
    n_q: int
    n_k: int
    qb0: int
    kb0: int
    n_b: int
    n_h: int
    n_causal: int  # key tiles 0 .. n_causal-1 can be causal for some query of the call
    sink: int
    window: int
    padded: bool  # per-key statistics come from data (k_seg / k_rank / q_seg)
    packed: bool
    k_clipped: bool  # the first key tile starts before kv_offset
    sink_width: int  # sink candidates per row (packed: set from the device by _sink_candidates)
    sink_fixed: bool  # ranks are positions: the sink tiles are 0 .. sink_width-1
    window_span: int
    strided: tuple[int, int, int] | None  # first tile, stride, count
    random_width: int
    dense_rows: int  # query tiles 0 .. dense_rows-1 attend every causal tile
    dense_heads: tuple[int, ...]
    dense_width: int
    topk_width: int
    cand_width: int = 0
    full_width: int = 1
    part_width: int = 1
    t_widths: tuple[int, int] = (1, 1)


def _plan(pattern, batch, kv_heads, q_offset, q_len, kv_offset, k_seg, q_seg, k_rank, topk_tiles, n_q, n_k) -> _Plan:
    """Host-side decisions: every width from pattern parameters and shapes, never from tensor contents."""
    block = pattern.block_size
    qb0, kb0 = q_offset // block, kv_offset // block
    padded = k_seg is not None or k_rank is not None or q_seg is not None
    per_batch = padded or (topk_tiles is not None and topk_tiles.shape[0] != 1)
    layout = pattern.layout
    head_dependent = bool(pattern.dense_heads) or pattern.topk_blocks is not None or (
        layout is not None and layout.kind == "random") or (topk_tiles is not None and topk_tiles.shape[1] != 1)
    n_causal = max(0, min(n_k, (q_offset + q_len - 1) // block - kb0 + 1))
    sink, window = pattern.sink_tokens, pattern.window or 0
    sink_fixed = k_rank is None
    if not sink:
        sink_width = 0
    elif sink_fixed:  # tiles holding positions < sink
        sink_width = max(0, min(-(-sink // block) - kb0, n_causal))
    else:  # distinct ranks: the first `sink` valid keys lie in at most `sink` tiles (packed: resized on device)
        sink_width = min(sink, n_causal)
    strided = None
    if layout is not None and layout.kind == "strided":
        first = (layout.offset - kb0) % layout.stride
        count = max(0, -(-(n_causal - first) // layout.stride))
        strided = (first, layout.stride, count) if count else None
    dense_rows = n_q if pattern.is_dense else min(n_q, max(0, pattern.min_sparse_len // block - qb0))
    dense_heads = tuple(pattern.dense_heads)
    if dense_heads:
        dense_width = n_causal
    else:  # the last dense row's causal key tiles
        dense_width = max(0, min(n_causal, qb0 + dense_rows - kb0)) if dense_rows else 0
    return _Plan(
        pattern=pattern, block=block, n_q=n_q, n_k=n_k, qb0=qb0, kb0=kb0, n_b=batch if per_batch else 1,
        n_h=kv_heads if head_dependent else 1, n_causal=n_causal, sink=sink, window=window, padded=padded,
        packed=q_seg is not None, k_clipped=kv_offset % block != 0, sink_width=sink_width, sink_fixed=sink_fixed,
        # Window of query tile m: key tiles floor((q_lo - w + 1) / B) .. m's own, at most this many.
        window_span=(window + block - 2) // block + 1 if window else 0,
        strided=strided, random_width=n_causal if layout is not None and layout.kind == "random" else 0,
        dense_rows=dense_rows, dense_heads=dense_heads, dense_width=dense_width,
        topk_width=0 if topk_tiles is None else topk_tiles.shape[-1],
    )


def _finish_widths(plan: _Plan) -> None:
    """List widths from the candidate sources (all host-known once the sink width is)."""
    cand_width = (plan.sink_width + plan.window_span + (plan.strided[2] if plan.strided else 0) + plan.random_width
                  + plan.dense_width + plan.topk_width)
    plan.cand_width = cand_width
    plan.full_width = max(1, min(cand_width, plan.n_causal))
    plan.part_width = plan.full_width
    sink_edge = plan.sink_width > 0 and (not plan.sink_fixed or plan.sink % plan.block != 0)
    if not plan.padded:
        # Partial tiles of a row: its diagonal tile, a clipped first key tile, the tile holding the sink's end,
        # the window's two edge tiles; every other listed tile is whole, causal and inside one rule.
        plan.part_width = min(plan.full_width, 1 + plan.k_clipped + sink_edge + (2 if plan.window else 0))
    # Transposed lists: the query tiles listing one key tile. Sinks, layouts, dense rows and a top-k selection can
    # be listed by every query tile; a window tile only by the query tiles within the window's reach.
    any_blk = plan.strided is not None or plan.random_width or plan.dense_width or plan.topk_width
    window_only = plan.window and not plan.sink_width and not any_blk
    t_full = min(plan.n_q, plan.window_span) if window_only else plan.n_q
    t_part = plan.n_q if (plan.padded or plan.k_clipped or sink_edge) else min(plan.n_q, 1 + (2 if plan.window else 0))
    plan.t_widths = (max(1, t_full), max(1, t_part))


def _key_tile_table(plan: _Plan, kv_offset: int, kv_len: int, k_seg, q_seg, k_rank, device):
    """Per key tile statistics, one row per tile so that one gather serves them all: columns ``lo`` (first
    position; int64 max when the tile has no valid key), ``hi`` (last position), ``hi_full`` (``hi`` when the tile
    is whole and all valid, else int64 max) and, with padding, ``rank min/max`` (and ``segment min/max`` when
    packed). (n_k, 3) without padding, else (batch, n_k, 5 or 7). Also, where ranks are data, whether each tile
    holds a sink key (batch, n_k)."""
    block = plan.block
    big = torch.iinfo(torch.int64).max
    k_lo, k_hi, whole = _tile_ranges(kv_offset, kv_len, block, device, whole=True)
    if not plan.padded:
        return torch.stack([k_lo, k_hi, torch.where(whole, k_hi, big)], -1), None
    n_b, n_k = plan.n_b, plan.n_k
    valid = torch.ones(n_b, kv_len, dtype=torch.bool, device=device) if k_seg is None else k_seg >= 0
    if k_rank is None:
        rank = (kv_offset + torch.arange(kv_len, device=device)).expand(n_b, kv_len)
    else:
        rank = k_rank.long()
    values = torch.stack([rank, k_seg.long()], -1) if q_seg is not None else rank.unsqueeze(-1)
    vmin, vmax, k_any, k_all = _tile_reduce(values, valid, kv_offset % block, n_k, block)
    lo = torch.where(k_any, k_lo, big)
    hi_full = torch.where(k_all & whole, k_hi, big)
    columns = [lo, k_hi.expand(n_b, n_k), hi_full, vmin[..., 0], vmax[..., 0]]
    if q_seg is not None:
        columns += [vmin[..., 1], vmax[..., 1]]
    has_sink = None
    if plan.sink and not plan.sink_fixed:
        has_sink = ((vmin[..., 0] < plan.sink) & k_any)[:, : plan.n_causal]
    return torch.stack(columns, -1), has_sink


def _sink_candidates(plan: _Plan, has_sink: torch.Tensor | None, device) -> torch.Tensor | None:
    """Sink key tiles: (1, Ws) the fixed tiles 0 .. Ws-1, or (batch, Ws) the first tiles holding a key of rank <
    sink, -1 past the last (packed sequences: Ws read from the device, the build's one synchronisation)."""
    if not plan.sink_width:
        return None
    if plan.sink_fixed:
        return torch.arange(plan.sink_width, dtype=torch.int32, device=device).view(1, -1)
    if plan.packed:
        plan.sink_width = int(has_sink.sum(-1).max()) if has_sink.numel() else 0  # the packed layout's sync
        if not plan.sink_width:
            return None
    order = torch.sort((~has_sink).to(torch.int8), dim=-1, stable=True).indices[:, : plan.sink_width]
    return torch.where(torch.gather(has_sink, 1, order), order, -1).to(torch.int32)


def _list_kernel_reason(plan: _Plan, slots: int, max_slots: int) -> str | None:
    """None when the Triton list kernel builds this plan's forward lists (``slots`` candidates per query tile, at
    most ``max_slots``), else why not: host-known facts only."""
    if plan.packed:
        return "packed sequences (q_seg) have per-segment sink lists"
    if plan.strided is not None or plan.random_width:
        return "block layouts (strided / random) are built by the PyTorch ops"
    if plan.dense_heads:
        return "dense heads are built by the PyTorch ops"
    if slots > max_slots:
        return f"{slots} candidate slots per query tile (the kernel holds at most {max_slots})"
    return None


def _lists_by_kernel(plan: _Plan, builder: ListBuilder, device: torch.device) -> bool:
    """Whether the forward lists come from the Triton kernel: ``builder``'s choice, "auto" on CUDA where the kernel
    applies and imports. Decided before any device work, from the plan (shapes and pattern) alone."""
    if builder not in LIST_BUILDERS:
        raise ValueError(f"builder={builder!r}; supported: {LIST_BUILDERS}")
    if builder == "torch" or (builder == "auto" and device.type != "cuda"):
        return False
    try:
        from .kernels.block_index import MAX_CANDIDATES, candidate_slots
    except ImportError as exc:  # triton missing, or the kernels package not built for this platform
        if builder == "triton":
            raise ValueError(f"builder='triton' cannot run: the Triton kernels cannot be imported ({exc})") from exc
        return False
    slots = candidate_slots(plan.sink_width, plan.window_span, plan.dense_width, plan.topk_width)
    reason = _list_kernel_reason(plan, slots, MAX_CANDIDATES)
    if builder == "triton" and reason is not None:
        raise ValueError(f"builder='triton' cannot build this index: {reason}")
    return reason is None


def _kernel_lists(plan: _Plan, q_offset: int, q_len: int, kv_offset: int, kv_len: int, table, sink_row, topk_tiles,
                  device):
    """The forward lists in one Triton launch (``hf_sparsek.kernels.block_index``); ``table`` only with padding."""
    from .kernels.block_index import build_row_lists

    return build_row_lists(
        n_b=plan.n_b, n_h=plan.n_h, n_q=plan.n_q, n_k=plan.n_k, block=plan.block, q_offset=q_offset, q_len=q_len,
        kv_offset=kv_offset, kv_len=kv_len, sink=plan.sink, window=plan.window, n_sink=plan.sink_width,
        n_win=plan.window_span, n_dense=plan.dense_width, dense_rows=plan.dense_rows, full_width=plan.full_width,
        part_width=plan.part_width, sink_row=sink_row, table=table if plan.padded else None, topk=topk_tiles,
        device=device)


def _kernel_tile_table(plan: _Plan, kv_offset: int, kv_len: int, k_seg, k_rank):
    """:func:`_key_tile_table` of a padded, unpacked call in one Triton launch (same table and sink flags)."""
    from .kernels.block_index import key_tile_table

    if k_seg is None and k_rank is None:
        raise ValueError("a padded plan needs k_seg or k_rank")
    with_sink = plan.sink and not plan.sink_fixed
    return key_tile_table(
        None if k_seg is None else k_seg.contiguous(), None if k_rank is None else k_rank.contiguous(),
        batch=plan.n_b, n_k=plan.n_k, block=plan.block, kv_offset=kv_offset, kv_len=kv_len, sink=plan.sink,
        sink_tiles=plan.n_causal if with_sink else None)


def _torch_lists(plan: _Plan, q_offset: int, q_len: int, q_seg, table, sink_row, topk_tiles, device):
    """The forward lists by PyTorch ops (every plan; the definition the kernel is tested against)."""
    block = plan.block
    q_lo, q_hi = _tile_ranges(q_offset, q_len, block, device)
    q_segs = None
    if q_seg is not None:
        q_ok = torch.ones_like(q_seg, dtype=torch.bool)
        qs_min, qs_max, _, _ = _tile_reduce(q_seg.unsqueeze(-1), q_ok, q_offset % block, plan.n_q, block)
        q_segs = (qs_min[..., 0], qs_max[..., 0])
    return _build_lists(plan, q_lo, q_hi, table, q_segs, sink_row, topk_tiles, device)


_BIG = (1 << 31) - 1  # sort key of an empty slot: past every entry (int32 lists)


def _build_lists(plan: _Plan, q_lo, q_hi, table, q_segs, sink_row, topk_tiles, device):
    """full_count, full_tiles, part_count, part_tiles: per chunk of query tiles, the candidate key tiles of every
    source are classified (skipped / partial / full), deduplicated and compacted by two sorts."""
    n_b, n_h, n_q, n_k, block = plan.n_b, plan.n_h, plan.n_q, plan.n_k, plan.block
    w_f, w_p = plan.full_width, plan.part_width
    if plan.cand_width == 0:
        zeros = torch.zeros(n_b, n_h, n_q, dtype=torch.int32, device=device)
        return zeros, zeros.new_zeros(n_b, n_h, n_q, w_f), zeros.clone(), zeros.new_zeros(n_b, n_h, n_q, w_p)
    i32 = dict(dtype=torch.int32, device=device)
    n_tok = plan.sink_width + plan.window_span
    n_blk = plan.cand_width - n_tok
    # 1 on block-selected columns (token-rule sources come first): a Python int when every column agrees.
    blk_col = (torch.arange(plan.cand_width, **i32) >= n_tok).to(torch.int32) if n_tok and n_blk else int(n_blk > 0)
    win_first = None
    if plan.window:
        win_first = torch.div(q_lo - (plan.window - 1), block, rounding_mode="floor") - plan.kb0
        if plan.sink_fixed and plan.sink_width:
            win_first = win_first.clamp(min=plan.sink_width)  # fixed sink tiles come first: no overlap to remove
        win_first = win_first.to(torch.int32).view(-1, 1) + torch.arange(plan.window_span, **i32)
    strided_row = None
    if plan.strided is not None:
        first, stride, count = plan.strided
        strided_row = torch.arange(first, first + stride * count, stride, **i32)
    all_n = torch.arange(max(plan.random_width, plan.dense_width), **i32) if plan.random_width or plan.dense_width \
        else None
    heads = torch.arange(n_h, device=device) if plan.random_width or plan.dense_heads else None
    head_dense = None
    for h in plan.dense_heads:
        head_dense = (heads == h) if head_dense is None else head_dense | (heads == h)
    n_sources = sum(map(bool, (plan.sink_width, plan.window_span, strided_row is not None, plan.random_width,
                               plan.dense_width, plan.topk_width)))
    # Overlapping sources list a tile twice: sort once to keep one entry per tile (the block-selected one).
    dedupe = plan.topk_width > 0 or (n_sources > 1 and not (n_blk == 0 and plan.sink_fixed))
    batch_rows = torch.arange(n_b, device=device).view(n_b, 1, 1, 1) if table.dim() == 3 else None
    slot_f, slot_p = slice(0, w_f), slice(0, w_p)

    chunk = max(1, _CHUNK_ELEMENTS // max(1, plan.cand_width * n_h * n_b))
    out = []
    for m0 in range(0, n_q, chunk):
        m1 = min(n_q, m0 + chunk)
        c = m1 - m0
        shape = (n_b, n_h, c)
        sources = []
        if sink_row is not None:
            sources.append(sink_row.view(sink_row.shape[0], 1, 1, sink_row.shape[1]))
        if win_first is not None:
            sources.append(win_first[m0:m1].view(1, 1, c, plan.window_span))
        if strided_row is not None:
            sources.append(strided_row.view(1, 1, 1, plan.strided[2]))
        if plan.random_width:
            lay = plan.pattern.layout
            qb = (plan.qb0 + torch.arange(m0, m1, device=device)).view(1, c, 1)
            kb = plan.kb0 + torch.arange(plan.random_width, device=device).view(1, 1, -1)
            keep = random_layout_keep(qb, kb, heads.view(-1, 1, 1), lay.seed, lay.density)
            sources.append(torch.where(keep, all_n[: plan.random_width], -1).view(1, n_h, c, plan.random_width))
        if plan.dense_width:
            dense = torch.arange(m0, m1, device=device).view(1, c, 1) < plan.dense_rows
            if head_dense is not None:
                dense = dense | head_dense.view(-1, 1, 1)
            sources.append(torch.where(dense, all_n[: plan.dense_width], -1).unsqueeze(0))
        if topk_tiles is not None:
            sources.append(topk_tiles[:, :, m0:m1].to(torch.int32))
        cand = torch.cat([s.expand(*shape, s.shape[-1]) for s in sources], -1) if len(sources) > 1 else \
            sources[0].expand(*shape, sources[0].shape[-1])
        n_safe = cand.clamp(0, n_k - 1)
        valid = n_safe == cand
        stats = (table[n_safe] if batch_rows is None else table[batch_rows, n_safe]).unbind(-1)
        k_lo, k_hi, k_hi_full = stats[:3]
        qlo, qhi = q_lo[m0:m1].view(1, 1, c, 1), q_hi[m0:m1].view(1, 1, c, 1)
        keep = valid & (k_lo <= qhi)  # some causal valid key
        full = k_hi_full <= qlo  # whole, all valid and all causal
        if q_segs is not None:
            ks_min, ks_max = stats[5], stats[6]
            qs_min = q_segs[0][:, m0:m1].view(n_b, 1, c, 1)
            qs_max = q_segs[1][:, m0:m1].view(n_b, 1, c, 1)
            keep &= (ks_min <= qs_max) & (qs_min <= ks_max)
            full &= (ks_min == ks_max) & (qs_min == qs_max) & (ks_min == qs_min)
        if n_tok:
            r_min, r_max = (stats[3], stats[4]) if plan.padded else (k_lo, k_hi)
            tok_any = tok_all = None
            if plan.sink:
                tok_any, tok_all = r_min < plan.sink, r_max < plan.sink
            if plan.window:
                w_any, w_all = k_hi > qlo - plan.window, k_lo > qhi - plan.window
                tok_any = w_any if tok_any is None else tok_any | w_any
                tok_all = w_all if tok_all is None else tok_all | w_all
            if n_blk:
                blk_true = blk_col.bool()
                tok_any, tok_all = tok_any | blk_true, tok_all | blk_true
            keep &= tok_any
            full &= tok_all
        full &= keep
        if dedupe:
            # Key: tile, then block-selected, then full; the last entry of a tile is the one kept (a block-selected
            # entry attends a superset of a token-rule one, and both agree on being full when both are).
            key = torch.where(keep, cand * 4 + blk_col * 2 + full, _BIG).sort(-1).values
            tile = key >> 2
            last = (tile != torch.nn.functional.pad(tile[..., 1:], (0, 1), value=-1)) & (key != _BIG)
            full = last & (key & 1).bool()
            part = last ^ full
            tile_code = key >> 1  # tile * 2 + block-selected
        else:
            tile = cand
            part = keep ^ full
            tile_code = cand * 2 + blk_col
        full_count = full.sum(-1, dtype=torch.int32)
        part_count = part.sum(-1, dtype=torch.int32)
        full_tiles = torch.where(full, tile, _BIG).sort(-1).values[..., slot_f] % _BIG  # empty slots -> 0
        code = torch.where(part, tile_code, _BIG).sort(-1).values[..., slot_p] % _BIG
        part_tiles = (code >> 1) ^ -(code & 1)  # block-selected: -(tile + 1) == ~tile
        out.append((full_count, full_tiles, part_count, part_tiles))
    if len(out) == 1:
        return out[0]
    return tuple(torch.cat([o[i] for o in out], dim=2) for i in range(4))


def _transpose_lists(count: torch.Tensor, tiles: torch.Tensor, n_k: int, encoded: bool, width: int | None = None):
    """Invert per-query-tile lists into per-key-tile lists of query tiles (same encoding), deterministically and
    without a device read: ``width`` is a host-known bound on the query tiles listing one key tile (default: all)."""
    return _transpose([(count, tiles, encoded, tiles.shape[2] if width is None else width)], n_k)[0]


def _transpose(lists: list[tuple[torch.Tensor, torch.Tensor, bool, int]], n_k: int):
    """:func:`_transpose_lists` of several (count, tiles, encoded, width) lists of one index: one sort of
    (key tile, list, query tile) keys and one binary search for where each key tile's list starts, then a gather
    per list at its own width."""
    n_b, n_h, n_q = lists[0][0].shape
    device = lists[0][0].device
    n_lists = len(lists)
    m2 = torch.arange(0, 2 * n_q, 2, device=device).view(n_q, 1)
    keys = []
    for i, (count, tiles, encoded, _) in enumerate(lists):
        # key = ((key tile * n_lists + i) * n_q + query tile) * 2 + block-selected
        raw = tiles.long()
        present = torch.arange(raw.shape[-1], device=device) < count.unsqueeze(-1)
        if encoded:
            selected = raw < 0
            key = torch.where(selected, ~raw, raw) * (2 * n_lists * n_q) + (m2 + 2 * i * n_q) + selected
        else:
            key = raw * (2 * n_lists * n_q) + (m2 + 2 * i * n_q)
        keys.append(torch.where(present, key, torch.iinfo(torch.int64).max).view(n_b, n_h, n_q * raw.shape[-1]))
    # Sorted by key tile, list, then query tile: lists come out ascending and the result is deterministic.
    flat = (torch.cat(keys, -1) if n_lists > 1 else keys[0]).sort(-1).values
    n_rows = n_k * n_lists
    bounds = (torch.arange(n_rows + 1, device=device) * (2 * n_q)).expand(n_b, n_h, n_rows + 1).contiguous()
    starts = torch.searchsorted(flat, bounds)
    counts = starts[..., 1:] - starts[..., :-1]  # (n_b, n_h, n_k * n_lists): row = key tile * n_lists + list
    out = []
    for i, (_, _, encoded, width) in enumerate(lists):
        count = counts[..., i::n_lists]
        at = (starts[..., i:-1:n_lists, None] + torch.arange(width, device=device)).clamp(max=flat.shape[-1] - 1)
        entry = flat.gather(-1, at.view(n_b, n_h, n_k * width)).view(n_b, n_h, n_k, width)
        q_tile = (entry >> 1) % n_q
        if encoded:
            q_tile = q_tile ^ -(entry & 1)  # block-selected: -(m + 1) == ~m
        q_tile = torch.where(torch.arange(width, device=device) < count.unsqueeze(-1), q_tile, 0)
        out.append((count.to(torch.int32), q_tile.to(torch.int32)))
    return out


def element_mask(
    index: BlockIndex,
    q_abs: torch.Tensor,
    k_abs: torch.Tensor,
    batch_rows: torch.Tensor | None,
    block_selected: torch.Tensor,
) -> torch.Tensor:
    """The token-exact predicate of partial tiles, broadcast over ``q_abs`` and ``k_abs`` (absolute positions).

    ``batch_rows``: batch indices broadcastable against the positions (None when the index has no per-batch data).
    ``block_selected``: whether the pair's tile is block-selected (then sink/window terms are not needed).
    """
    q_t = q_abs - index.q_offset
    k_t = k_abs - index.kv_offset
    in_range = (k_t >= 0) & (k_t < index.kv_len)
    k_safe = k_t.clamp(0, index.kv_len - 1)
    keep = (k_abs <= q_abs) & in_range
    if index.k_seg is not None:
        kseg = index.k_seg[batch_rows, k_safe]
        keep &= kseg >= 0
        if index.q_seg is not None:
            q_safe = q_t.clamp(0, index.q_len - 1)
            keep &= index.q_seg[batch_rows, q_safe] == kseg
    token = torch.zeros_like(keep)
    if index.sink_tokens:
        rank = k_abs if index.k_rank is None else index.k_rank[batch_rows, k_safe]
        token |= rank < index.sink_tokens
    if index.window:
        token |= (q_abs - k_abs) < index.window
    return keep & (block_selected | token)


def _causal_token_mask(index: BlockIndex, device: torch.device) -> torch.Tensor:
    q_abs = index.q_offset + torch.arange(index.q_len, device=device)
    k_abs = index.kv_offset + torch.arange(index.kv_len, device=device)
    return k_abs.view(1, -1) <= q_abs.view(-1, 1)


def _expand_index(index: BlockIndex) -> torch.Tensor:
    """Dense boolean mask (Bi', Hi, q_len, kv_len) of what the index attends; Bi' = batch if per-batch data."""
    device = index.full_count.device
    block = index.block_size
    n_b, n_h = index.full_count.shape[:2]
    if index.k_seg is not None:
        n_b = index.k_seg.shape[0]
    out = torch.zeros(n_b, n_h, index.q_len, index.kv_len, dtype=torch.bool, device=device)
    qb0, kb0 = index.q_offset // block, index.kv_offset // block
    r = torch.arange(block, device=device)
    for b in range(n_b):
        bi = 0 if index.full_count.shape[0] == 1 else b
        for h in range(n_h):
            for m in range(index.n_q_tiles):
                q_abs = (qb0 + m) * block + r
                q_t = q_abs - index.q_offset
                rows = (q_t >= 0) & (q_t < index.q_len)
                entries = [(int(n), True, True) for n in index.full_tiles[bi, h, m, : index.full_count[bi, h, m]]]
                for raw in index.part_tiles[bi, h, m, : index.part_count[bi, h, m]].tolist():
                    entries.append((-raw - 1 if raw < 0 else raw, False, raw < 0))
                for n, is_full, selected in entries:
                    k_abs = (kb0 + n) * block + r
                    k_t = k_abs - index.kv_offset
                    cols = (k_t >= 0) & (k_t < index.kv_len)
                    if is_full:
                        tile = torch.ones(block, block, dtype=torch.bool, device=device)
                    else:
                        rows_b = torch.full((block, block), b, device=device)
                        tile = element_mask(
                            index, q_abs.view(-1, 1), k_abs.view(1, -1), rows_b, torch.tensor(selected, device=device)
                        )
                    tile = tile & rows.view(-1, 1) & cols.view(1, -1)
                    qi = q_t[rows]
                    kj = k_t[cols]
                    sub = out[b, h][qi.min() : qi.max() + 1, kj.min() : kj.max() + 1]
                    sub |= tile[rows][:, cols]
    return out


def attended_pairs(index: BlockIndex, batch_row: int = 0, head: int = 0) -> int:
    """Exact number of (query, key) pairs the index attends for one batch row and KV head, without a dense mask."""
    return int(attended_pairs_per_tile(index, batch_row, head).sum().item())


def _tile_rows(index: BlockIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """(absolute query positions (n_q_tiles, block), which of them are rows of the call): the query tiles' rows."""
    block, device = index.block_size, index.full_count.device
    tiles, r = torch.arange(index.n_q_tiles, device=device), torch.arange(block, device=device)
    q_abs = (index.q_offset // block + tiles).view(-1, 1) * block + r
    return q_abs, (q_abs >= index.q_offset) & (q_abs < index.q_offset + index.q_len)


def rows_per_tile(index: BlockIndex) -> torch.Tensor:
    """The call's rows in each query tile (int64, (n_q_tiles,))."""
    return _tile_rows(index)[1].sum(-1)


def attended_pairs_per_tile(index: BlockIndex, batch_row: int = 0, head: int = 0) -> torch.Tensor:
    """Exact (query, key) pairs the index attends per query tile (int64, (n_q_tiles,)) for one batch row and KV head.

    Full tiles count their in-range rows x block; partial tiles are evaluated element-wise, a chunk at a time.
    """
    block = index.block_size
    device = index.full_count.device
    bi = 0 if index.batch_broadcast else batch_row
    hi = 0 if index.head_broadcast else head
    kb0 = index.kv_offset // block
    r = torch.arange(block, device=device)
    q_abs, in_call = _tile_rows(index)  # (n_q, block)
    rows_in = in_call.sum(-1)  # (n_q,)
    total = index.full_count[bi, hi].long() * rows_in * block
    width = index.part_tiles.shape[-1]
    cnt = index.part_count[bi, hi].long()
    slots = torch.arange(width, device=device)
    chunk = max(1, (1 << 22) // max(1, width * block * block))
    rows_b = torch.tensor(batch_row, device=device)
    for m0 in range(0, index.n_q_tiles, chunk):
        m1 = min(index.n_q_tiles, m0 + chunk)
        raw = index.part_tiles[bi, hi, m0:m1].long()
        present = slots < cnt[m0:m1].unsqueeze(-1)
        n = torch.where(raw < 0, -raw - 1, raw)
        qa = q_abs[m0:m1].view(-1, 1, block, 1)
        ka = ((kb0 + n).view(m1 - m0, width, 1, 1) * block + r.view(1, 1, 1, -1))
        mask = element_mask(index, qa, ka, rows_b, (raw < 0).view(m1 - m0, width, 1, 1))
        q_ok = (qa >= index.q_offset) & (qa < index.q_offset + index.q_len)
        total[m0:m1] += (mask & q_ok & present.view(m1 - m0, width, 1, 1)).flatten(1).sum(-1)
    return total


def causal_pairs_per_tile(index: BlockIndex) -> torch.Tensor:
    """Causal (query, key) pairs of each query tile's in-range rows over the index's keys (int64, (n_q_tiles,))."""
    q_abs, in_call = _tile_rows(index)
    visible = (q_abs - index.kv_offset + 1).clamp(0, index.kv_len)
    return (visible * in_call).sum(-1)


def causal_pairs(q_len: int, kv_len: int, q_offset: int, kv_offset: int) -> int:
    """Number of (query, key) pairs with key <= query, for density denominators."""
    visible = torch.arange(q_len, dtype=torch.float64) + (q_offset - kv_offset + 1)
    return int(visible.clamp(0, kv_len).sum().item())
