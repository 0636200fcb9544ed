"""Key tile features of the ``"mass"`` / ``"moment"`` selectors kept across calls, so a decode step reads features,
not all keys.

The mass selector scores query tiles against per key tile ``[kmax, kmin]`` features (:mod:`.mass`). Pooled from all
keys on every call, a decode step at 512K keys reads as much as dense attention. A :class:`SelectionState` (one per
layer, kept by the caller) holds them instead:

* tiles whose keys are all written (every position below the call's query end and inside its keys) are *final*:
  computed once, when they fill, and kept;
* the tiles after them up to the last causal tile (the one being filled; in a static cache also holding unwritten
  slots) are recomputed on every call, never kept;
* kept tiles are reused only when the call continues the same sequence: same batch, KV heads, head dim, dtype,
  device, block size, ``kv_offset`` and padding kind, a call with cached keys (``q_offset > kv_offset``: a prefill
  recomputes), no fewer final tiles than kept and no query inside a kept tile (a cropped cache, refilled or not,
  recomputes), and the *fingerprints*, the key at the last position of every kept tile, unchanged per (batch row,
  KV head) (a new prompt, a reordered batch, another conversation through the same layer).

One key per kept tile, not one per sequence: in a model's first layer a key depends on its token and position
only, so another sequence with the same token at one position would pass a single-key check there. Even one key per
tile does not tell such rows apart there (same tokens at every tile end, others inside: a beam search's reordered
rows), so the face keeps no state in a first layer (:func:`fingerprints_identify_history`). The
fingerprints are compared on the device: the Triton path (:mod:`hf_sparsek.kernels.selection_store`) checks them
(programs spread over the kept tiles) and then decides per (row, KV head) whether to start from the kept tiles or
from tile 0, in two launches and without a host read. The PyTorch path (CPU) reads the comparison on the host
(free on CPU). Its limit: a cache edited by hand inside a kept tile, leaving every tile's last key as it was, goes
unnoticed (call :meth:`SelectionState.reset` after editing a cache by hand).

The features are laid out as the Triton selection kernel reads them: (B, Hkv, tiles, 2 * D_pad) float32,
``[kmax, 0.., kmin, 0..]`` (selector ``"moment"``: ``[mean, 0.., variance, 0..]``) with ``D_pad = max(16, next
power of two >= D)``; tiles after the last causal one are
zeros or stale values that no selection reads (they are not causal).
"""

from __future__ import annotations

import weakref

import torch

from ..patterns import SparsePattern


def feature_width(dim: int) -> int:
    """``D_pad``: the padded head dim of the feature layout (half the feature columns)."""
    return max(16, 1 << max(0, (dim - 1).bit_length()))


class SelectionState:
    """One layer's kept key tile features (see the module docstring); empty until a call fills it.

    Pass it as ``selection_state=`` to :func:`hf_sparsek.sparse_attention` / ``select_tiles`` on every call of the
    layer; ``None`` there means no reuse (features pooled from all keys)."""

    def __init__(self) -> None:
        self.fresh_starts = 0  # calls the host knew had to start from tile 0 (tests, diagnostics)
        self.reset()

    def reset(self) -> None:
        """Forget every kept tile (the next call computes from its keys)."""
        self.signature: tuple | None = None
        self.features: torch.Tensor | None = None  # (B, Hkv, capacity, 2 * D_pad) float32
        self.tiles = 0  # final tiles kept, host-known from shapes only
        self.fingerprints: torch.Tensor | None = None  # (B, Hkv, capacity, D) in k's dtype: each tile's last key
        self._miss: torch.Tensor | None = None  # Triton path: the check's mismatch counts (scratch)
        self.reused: torch.Tensor | None = None  # (B, Hkv) bool, on the device: the last call reused kept tiles

    def key_features(self, k: torch.Tensor, k_seg: torch.Tensor | None, q_offset: int, q_len: int, kv_offset: int,
                     block: int, use_triton: bool, moments: bool = False) -> torch.Tensor:
        """(B, Hkv, n_k, 2 * D_pad) float32 features of this call's key tiles (``n_k`` tiles of the absolute grid from
        ``kv_offset``), valid up to the last causal tile; updates the kept tiles for the next call.

        k (B, Hkv, kv_len, D) at absolute positions ``kv_offset + s``; ``k_seg`` (B, kv_len) with -1 for padding
        keys, or None; queries at ``q_offset .. q_offset + q_len - 1``; ``use_triton``: refresh with the Triton
        kernel (no host read) instead of PyTorch ops; ``moments``: selector ``"moment"``'s ``[mean, variance]`` per
        tile instead of ``[kmax, kmin]`` (switching kinds starts afresh)."""
        if k.dim() != 4 or (k_seg is not None and tuple(k_seg.shape) != (k.shape[0], k.shape[2])):
            raise ValueError(f"k must be (batch, kv_heads, kv_len, dim) and k_seg (batch, kv_len) or None, got "
                             f"{tuple(k.shape)} and {None if k_seg is None else tuple(k_seg.shape)}")
        if block < 1 or q_len < 1 or kv_offset < 0 or q_offset < 0:
            raise ValueError(f"need block >= 1, q_len >= 1 and offsets >= 0, got block={block}, q_len={q_len}, "
                             f"q_offset={q_offset}, kv_offset={kv_offset}")
        batch, heads, kv_len, dim = k.shape
        kb0, shift = divmod(kv_offset, block)
        n_k = (shift + kv_len + block - 1) // block
        q_end = q_offset + q_len
        hi = min(n_k, max(0, (q_end - 1) // block - kb0 + 1))  # tiles up to the last causal one
        final = min(hi, max(0, min(q_end, kv_offset + kv_len) // block - kb0))  # every key written
        signature = (batch, heads, dim, k.dtype, k.device, block, kv_offset, k_seg is not None, moments)
        fresh = (signature != self.signature or self.features is None or q_offset <= kv_offset
                 or final < self.tiles or q_offset < (kb0 + self.tiles) * block)
        if fresh:
            if self.features is not None:
                self.fresh_starts += 1
            self.reset()
            self.signature = signature
        self._reserve(batch, heads, n_k, dim, k.dtype, k.device)
        if use_triton:
            self._refresh_triton(k, k_seg, kv_offset, block, hi, final, moments)
        else:
            self._refresh_torch(k, k_seg, kv_offset, block, hi, final, moments)
        self.tiles = final
        return self.features[:, :, :n_k]

    def _reserve(self, batch: int, heads: int, n_k: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Room for ``n_k`` tiles and 1/8 more (kept tiles copied): a decode step allocates nothing until its keys
        grew by an eighth (at 512K keys: every 64K steps), and the headroom costs 1/8 of the features' memory."""
        have = 0 if self.features is None else self.features.shape[2]
        if have >= n_k:
            return
        size = n_k + n_k // 8 + 16
        grown = torch.zeros(batch, heads, size, 2 * feature_width(dim), device=device, dtype=torch.float32)
        prints = torch.zeros(batch, heads, size, dim, device=device, dtype=dtype)
        if self.tiles:
            grown[:, :, : self.tiles] = self.features[:, :, : self.tiles]
            prints[:, :, : self.tiles] = self.fingerprints[:, :, : self.tiles]
        self.features, self.fingerprints = grown, prints

    @staticmethod
    def _tile_ends(kv_offset: int, block: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """Local key indices of the last key of tiles ``lo .. hi - 1`` (tiles on the absolute grid from kv_offset)."""
        kb0 = kv_offset // block
        return (kb0 + torch.arange(lo, hi, device=device) + 1) * block - 1 - kv_offset

    def _refresh_torch(self, k: torch.Tensor, k_seg: torch.Tensor | None, kv_offset: int, block: int, hi: int,
                       final: int, moments: bool) -> None:
        from .mass import pool_tiles
        from .moment import key_moments

        lo = 0
        if self.tiles:
            ends = self._tile_ends(kv_offset, block, 0, self.tiles, k.device)
            same = (k[:, :, ends] == self.fingerprints[:, :, : self.tiles]).all(-1).all(-1)
            if bool(same.all()):  # a host read: this path runs on CPU
                lo = self.tiles
            self.reused = same if lo else torch.zeros_like(same)
        else:
            self.reused = torch.zeros(k.shape[0], k.shape[1], dtype=torch.bool, device=k.device)
        if hi > lo:
            kb0 = kv_offset // block
            a = max(0, (kb0 + lo) * block - kv_offset)
            b = min(k.shape[2], (kb0 + hi) * block - kv_offset)
            valid = None if k_seg is None else k_seg[:, a:b] >= 0
            if moments:
                first, second = key_moments(k[:, :, a:b], kv_offset + a, block, valid)
            else:
                _, first, second = pool_tiles(k[:, :, a:b], kv_offset + a, block, valid)
            dim, d_pad = k.shape[-1], self.features.shape[-1] // 2
            self.features[:, :, lo:hi, :dim] = first
            self.features[:, :, lo:hi, d_pad: d_pad + dim] = second
        if final > lo:
            self.fingerprints[:, :, lo:final] = k[:, :, self._tile_ends(kv_offset, block, lo, final, k.device)]

    def _refresh_triton(self, k: torch.Tensor, k_seg: torch.Tensor | None, kv_offset: int, block: int, hi: int,
                        final: int, moments: bool) -> None:
        from ..kernels.selection_store import CHECK_TILES, refresh_key_features

        batch, heads = k.shape[:2]
        if self.reused is None or self.reused.shape != (batch, heads):
            self.reused = torch.zeros(batch, heads, device=k.device, dtype=torch.bool)
        chunks = max(1, -(-self.tiles // CHECK_TILES))
        if self._miss is None or self._miss.numel() < batch * heads * chunks or self._miss.device != k.device:
            self._miss = torch.empty(batch * heads * (chunks + chunks // 8 + 1), device=k.device, dtype=torch.int32)
        refresh_key_features(k, k_seg, self.features, self.fingerprints, self.reused, kv_offset=kv_offset,
                             block=block, stored=self.tiles, hi=hi, final=final, check=self.tiles > 0,
                             moments=moments, miss=self._miss)


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprints_identify_history(layer_idx: object) -> bool:
    """Whether a kept key tile may be reused on its last key alone in the layer at ``layer_idx``: False for the
    model's first layer (0) and for a module without an int ``layer_idx``.

    A first layer's keys depend on their token and position only. A batch row that now holds another history
    (beam search reorders the cache's rows between steps) with the same token at every kept tile's last position
    but others inside a tile passes the check there while the tile's keys differ: its kept features would be stale
    (measured: a 3-beam search with selector "moment" chose from them). A deeper layer's key carries the tokens
    before it through the attention below (every one of them where the layers below see at least a tile of
    keys back), so its last key per tile tells such rows apart."""
    return isinstance(layer_idx, int) and not isinstance(layer_idx, bool) and layer_idx >= 1


def selection_state_for(module: torch.nn.Module, pattern: SparsePattern | None) -> SelectionState | None:
    """The :class:`SelectionState` kept for one attention module (one layer of one model) whose pattern selects
    with ``"mass"``, else None. Kept in a weak dictionary keyed by the module: it goes with the model, and two
    models never share one. Selector ``"refine"`` keeps one too (its first stage is ``"mass"``), and ``"moment"``
    (its key features in the moment layout). None for a layer whose last key per tile does not identify the
    history (:func:`fingerprints_identify_history`): there the features are pooled from all keys on every call."""
    if pattern is None or pattern.topk_blocks is None or pattern.resolved_selector not in ("mass", "refine",
                                                                                            "moment"):
        return None
    if not fingerprints_identify_history(getattr(module, "layer_idx", None)):
        return None
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = SelectionState()
    return state
