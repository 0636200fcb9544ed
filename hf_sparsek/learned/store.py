"""Per-layer block metadata kept across the calls of one generation, so a decode step reads block features, not keys.

What one layer keeps (:class:`LayerStore`):

* the key features of every complete key tile (all its slots written: below the call's query end, so a static
  cache's unwritten slots never fill one), computed once when the tile fills (``[mean, max, min]``, see
  :mod:`hf_sparsek.learned.features`), with the last key of every stored tile as its fingerprint;
* the mean query of the last complete query tile and the running sum of the current one, with the keys of those
  rows (which sequence they belong to).

A call reuses them when it continues the same sequence: the batch and kv_offset are unchanged, the keys are at
least as long as the stored tiles and the fingerprints match (every stored tile's last key is still the key at that
position: one key per tile, since in a first layer a key depends on its token and position only; a first layer
keeps no key tiles at all, ``hf_sparsek.selection.store.fingerprints_identify_history``). Anything else
(a new prompt, a cropped or reordered cache, a different batch) recomputes the key features from this call's
keys. Query state (the last few, one per sequence batch the model alternates between)
continues a call that starts where one ended, per row, for rows whose keys at the pooled positions are the kept
ones (a beam search's reorder, another cache); other rows read their own rows.
Calls at kv_offset > 0 (sliding caches) never use the store.

On the GPU (``use_triton``) the fingerprints are compared on the device, as the ``"mass"`` selector's store does
(``hf_sparsek.kernels.selection_store`` with ``learned=True``): per (batch row, KV head) the kernel pools only the
tiles that filled since the last call when the fingerprints match, every complete tile when they do not, so a decode
step reads no tensor on the host. What the host can tell from shapes (batch, heads, dtype, fewer complete tiles than
kept) still restarts the store there; ``reused`` (B, Hkv) says on the device which rows the kernel continued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .features import key_tile_features, query_tile_sums

QUERY_STATES = 4  # query states kept per layer: conversations (caches) that one model can alternate between


@dataclass
class QueryState:
    """Where one sequence batch's query pooling stopped: what the call starting at ``next`` continues from."""

    next: int  # the position the next call's first query must have to continue
    batch: int
    keys_from: int  # the first position of ``keys``
    keys: torch.Tensor | None  # (B, Hkv) int64: a hash of the keys at the rows the state pooled (whose rows they are)
    sum: torch.Tensor  # (B, Hkv, D): running sum of next's tile so far
    count: torch.Tensor  # (B, 1, 1): rows x heads so far
    previous: torch.Tensor | None  # (B, Hkv, D): mean query of the tile before next's tile


@dataclass
class LayerStore:
    """One layer's kept block metadata (see the module docstring); empty until a call fills it."""

    batch: int = -1
    key_tiles: int = 0
    key_features: torch.Tensor | None = None  # (B, Hkv, key_tiles, 3 D)
    fingerprint: torch.Tensor | None = None  # (B, Hkv, key_tiles, D): the last key of every stored tile
    q_states: list[QueryState] = field(default_factory=list)  # the last QUERY_STATES query states, oldest first
    recomputed: int = 0  # how many calls found the store unusable and recomputed (tests, diagnostics)
    reused: torch.Tensor | None = None  # (B, Hkv) bool on the device (Triton path): rows the last call continued
    _buffer: torch.Tensor | None = None  # Triton path: (B, Hkv, capacity, 3 D), key_features is its first tiles
    _prints: torch.Tensor | None = None  # Triton path: (B, Hkv, capacity, D), fingerprint is its first tiles
    _miss: torch.Tensor | None = None  # Triton path: the fingerprint check's mismatch counts (scratch)
    _signature: tuple | None = None  # Triton path: what the kept tiles were made for

    def reset(self) -> None:
        recomputed = self.recomputed
        self.__init__()  # type: ignore[misc]
        self.recomputed = recomputed

    def key_features_for(self, k: torch.Tensor, valid: torch.Tensor | None, kv_offset: int, block: int,
                         use_triton: bool = False, written: int | None = None) -> torch.Tensor:
        """Features of this call's complete key tiles (B, Hkv, n_complete, 3 D), from the store where it still
        describes these keys; new complete tiles are computed from their keys alone and kept.

        ``written``: how many of k's positions hold keys (the call's query end; None: all). A static cache hands
        over every slot up to its size: a tile is complete only once all its slots are written, never earlier
        (its features would be kept from unwritten slots)."""
        kv_len = k.shape[2] if written is None else max(0, min(k.shape[2], written))
        if use_triton and kv_offset == 0:
            return self._key_features_triton(k, valid, block, kv_len // block)
        batch = k.shape[0]
        complete = kv_len // block
        usable = (kv_offset == 0 and self.batch == batch and self.key_features is not None
                  and self.key_tiles <= complete)
        if usable and self.key_tiles:
            ends = torch.arange(1, self.key_tiles + 1, device=k.device) * block - 1
            usable = bool(torch.equal(k[:, :, ends].float(), self.fingerprint))
        if not usable:
            if self.key_features is not None:
                self.recomputed += 1
            self.batch, self.key_tiles = batch, 0
            self.key_features = k.new_zeros(batch, k.shape[1], 0, 3 * k.shape[-1], dtype=torch.float32)
        if complete > self.key_tiles:
            lo, hi = self.key_tiles * block, complete * block
            part_valid = None if valid is None else valid[:, lo:hi]
            new = key_tile_features(k[:, :, lo:hi], part_valid, 0, block, use_triton)
            old = self.key_features if self.key_tiles else new[:, :, :0]
            self.key_features = torch.cat([old, new], dim=2)
            ends = torch.arange(self.key_tiles + 1, complete + 1, device=k.device) * block - 1
            prints = k[:, :, ends].float()
            self.fingerprint = torch.cat([self.fingerprint, prints], dim=2) if self.key_tiles else prints
            self.key_tiles = complete
        return self.key_features

    def _key_features_triton(self, k: torch.Tensor, valid: torch.Tensor | None, block: int, complete: int
                             ) -> torch.Tensor:
        """:meth:`key_features_for` with the reuse decided on the device (module docstring): two launches, no host
        read. Kept tiles live in a buffer with 1/8 headroom, so a decode step allocates nothing."""
        from ..kernels.selection_store import CHECK_TILES, refresh_key_features

        batch, heads, _, dim = k.shape
        signature = (batch, heads, dim, k.dtype, k.device, block, valid is not None)
        if signature != self._signature or self._buffer is None or self.key_tiles > complete:
            if self._buffer is not None:
                self.recomputed += 1
            self._buffer, self._prints, self.key_tiles, self.fingerprint = None, None, 0, None
            self._signature = signature
        self.batch = batch
        if self._buffer is None or self._buffer.shape[2] < complete:
            size = complete + complete // 8 + 16
            grown = torch.zeros(batch, heads, size, 3 * dim, device=k.device, dtype=torch.float32)
            prints = torch.zeros(batch, heads, size, dim, device=k.device, dtype=k.dtype)
            if self.key_tiles:
                grown[:, :, : self.key_tiles] = self._buffer[:, :, : self.key_tiles]
                prints[:, :, : self.key_tiles] = self._prints[:, :, : self.key_tiles]
            self._buffer, self._prints = grown, prints
        if self.reused is None or self.reused.shape != (batch, heads) or self.reused.device != k.device:
            self.reused = torch.zeros(batch, heads, device=k.device, dtype=torch.bool)
        chunks = max(1, -(-self.key_tiles // CHECK_TILES))
        if self._miss is None or self._miss.numel() < batch * heads * chunks or self._miss.device != k.device:
            self._miss = torch.empty(batch * heads * (chunks + chunks // 8 + 1), device=k.device, dtype=torch.int32)
        seg = None if valid is None else (valid.to(torch.int32) - 1).contiguous()
        refresh_key_features(k, seg, self._buffer, self._prints, self.reused, kv_offset=0, block=block,
                             stored=self.key_tiles, hi=complete, final=complete, check=self.key_tiles > 0,
                             learned=True, miss=self._miss)
        self.fingerprint = self._prints[:, :, :complete]
        self.key_tiles = complete
        self.key_features = self._buffer[:, :, :complete]
        return self.key_features

    def query_sums_for(self, q: torch.Tensor, valid: torch.Tensor | None, q_offset: int, block: int, kv_heads: int,
                       use_triton: bool = False, k: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This call's per-tile query sums and counts, its first tile completed with the rows of earlier calls, and
        the mean of the tile before it (None where the store does not know them); then keeps the state for the
        next call.

        ``k``: the call's keys from position 0 (the cache). A kept state belongs to the rows whose keys it kept (the
        positions it pooled, at most two tiles), and the store keeps the last ``QUERY_STATES`` of them: each row of
        this call takes the state of a kept row with the same keys there, on the device (a beam search reorders the
        cache's rows between calls; two caches on one model alternate). A row that matches none reads its own rows,
        as a call the store knows nothing about. ``k`` None: the last state that ends where this call starts."""
        batch, _, q_len, _ = q.shape
        sums, counts = query_tile_sums(q, valid, q_offset, block, kv_heads, use_triton)
        candidates = [st for st in reversed(self.q_states) if st.next == q_offset and st.batch == batch]
        previous = None
        if candidates:
            used: list[QueryState] = []
            if k is None:
                st = candidates[0]
                used.append(st)
                q_sum, q_count, previous, found = st.sum, st.count, st.previous, None
            else:
                q_sum = torch.zeros_like(candidates[0].sum)
                q_count = torch.zeros_like(candidates[0].count)
                found = torch.zeros(batch, 1, 1, dtype=torch.bool, device=q.device)
                known = torch.zeros_like(found)
                last = torch.zeros_like(q_sum)
                for st in candidates:
                    if st.keys is None or k.shape[2] < q_offset or st.keys.device != k.device:
                        continue
                    now = _rows_hash(k[:, :, st.keys_from: q_offset])
                    if now.shape != st.keys.shape:
                        continue
                    match = (now.unsqueeze(1) == st.keys.unsqueeze(0)).all(-1)  # (B now, B kept)
                    hit = match.any(1).view(batch, 1, 1) & ~found
                    source = match.to(torch.int8).argmax(1)
                    q_sum = torch.where(hit, st.sum[source], q_sum)
                    q_count = torch.where(hit, st.count[source], q_count)
                    if st.previous is not None:
                        last = torch.where(hit, st.previous[source], last)
                        known = known | hit
                    found = found | hit
                    used.append(st)
                previous = last
            if q_offset % block:
                sums = torch.cat([sums[:, :, :1] + q_sum.unsqueeze(2), sums[:, :, 1:]], dim=2)
                counts = torch.cat([counts[:, :, :1] + q_count.unsqueeze(2), counts[:, :, 1:]], dim=2)
            if found is not None:  # rows without a kept previous tile: their first tile's own rows
                previous = torch.where(known, previous, sums[:, :, 0] / counts[:, :, 0].clamp(min=1))
            self.q_states = [st for st in self.q_states if all(st is not u for u in used)]
        elif q_offset >= block:
            self.recomputed += 1
        means = sums / counts.clamp(min=1)
        end = q_offset + q_len
        n = sums.shape[2]
        if end % block:  # the last tile is still filling: keep its sum; the tile before it is complete
            state_sum, state_count = sums[:, :, -1].clone(), counts[:, :, -1].clone()
            state_previous = means[:, :, -2].clone() if n > 1 else previous
        else:
            state_sum, state_count = torch.zeros_like(sums[:, :, -1]), torch.zeros_like(counts[:, :, -1])
            state_previous = means[:, :, -1].clone()
        keys_from = max(0, (end // block - 1) * block)  # the rows the kept state pooled: this tile and the last
        keys = None if k is None or k.shape[2] < end else _rows_hash(k[:, :, keys_from: end])
        self.q_states = [*self.q_states, QueryState(end, batch, keys_from, keys, state_sum, state_count,
                                                    state_previous)][-QUERY_STATES:]
        self.batch = batch
        return sums, counts, previous


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _rows_hash(x: torch.Tensor) -> torch.Tensor:
    """(B, H) int64 hash of x (B, H, rows, D): its bits times fixed odd weights, summed in int64 (exact and
    independent of the order of the sum, so the same keys always give the same hash, whatever their strides)."""
    bits = x.view(_INT_OF_SIZE[x.element_size()]).long()
    rows, dim = x.shape[2], x.shape[3]
    weights = torch.arange(rows * dim, device=x.device, dtype=torch.int64).view(rows, dim)
    weights = weights * -7046029254386353131 + 0x2545F4914F6CDD1D  # odd multipliers: wrap-around, deterministic
    return (bits * (weights | 1)).sum((2, 3))
