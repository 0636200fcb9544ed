"""Selector ``"mass"``'s kept key tile features for a static cache's compiled decode steps (inside CUDA graphs).

:class:`~hf_sparsek.selection.store.SelectionState` keeps them across eager calls, deciding on the host how many
tiles are kept; a step captured in a CUDA graph cannot read the host. A :class:`DecodeStore` keeps them in tensors
of fixed shape and address (one per layer, covering every tile of the static cache), with the kept tile count per
(batch row, KV head) on the device: each compiled step checks the kept tiles' fingerprints, pools the tiles from
the kept count to its row's tile, and selects from the features (``kernels/selection_store.py:
refresh_key_features_at_device_offset``). A step so reads a few tiles' keys and every tile's last key, not every
key. Reuse rules and their limit are the eager store's (:mod:`.store`): the same fingerprints, no store in a
model's first layer.

Made (or its counts zeroed) by an eager call of the layer on a static cache (transformers' prefill runs eager
before the compiled decode steps), never under torch.compile: a tensor made while tracing would not outlive its
graph. Kept as an attribute of the attention module, where a traced call reads it (Dynamo guards on it; its
tensors are marked static inputs, so the CUDA graph may update them in place).
"""

from __future__ import annotations

import torch

from ..patterns import SparsePattern
from .store import feature_width, fingerprints_identify_history

STORE_ATTRIBUTE = "_hf_sparsek_decode_store"


class DecodeStore:
    """One layer's kept key tile features for compiled decode steps over keys of one shape (see the module)."""

    def __init__(self, batch: int, kv_heads: int, kv_len: int, dim: int, block: int, kv_offset: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.key_shape = (batch, kv_heads, kv_len, dim)
        self.block, self.kv_offset, self.dtype, self.device = block, kv_offset, dtype, device
        tiles = (kv_offset % block + kv_len + block - 1) // block
        self.features = torch.zeros(batch, kv_heads, tiles, 2 * feature_width(dim), device=device,
                                    dtype=torch.float32)
        self.fingerprints = torch.zeros(batch, kv_heads, tiles, dim, device=device, dtype=dtype)
        self.stored = torch.zeros(batch, kv_heads, device=device, dtype=torch.int32)  # kept tiles per (row, head)
        self.reused = torch.zeros(batch, kv_heads, device=device, dtype=torch.bool)  # the last step kept its tiles
        # the fingerprint check's counts: one per chunk of tiles and (row, head), and a copy of the kept count; one
        # per tile is more than enough, without importing the kernels here (their module picks the interpreter
        # mode when first imported)
        self.scratch = torch.zeros(batch * kv_heads * (tiles + 1), device=device, dtype=torch.int32)
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)  # updated in place inside CUDA graphs

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors a compiled step updates: features, fingerprints, stored, reused, scratch."""
        return self.features, self.fingerprints, self.stored, self.reused, self.scratch

    def fits(self, k: torch.Tensor, block: int, kv_offset: int) -> bool:
        """Whether this store covers these keys (shape, dtype, device, tile grid)."""
        return (tuple(k.shape) == self.key_shape and k.dtype == self.dtype and k.device == self.device
                and block == self.block and kv_offset == self.kv_offset)

    def reset(self) -> None:
        """Forget every kept tile (the next step pools every tile up to its row)."""
        self.stored.zero_()
        self.reused.zero_()


def keeps_decode_store(module: torch.nn.Module, pattern: SparsePattern | None) -> bool:
    """Whether compiled decode steps of this layer keep their key tile features: selector ``"mass"`` (its first
    stage alone runs on the device), and a layer whose last key per tile identifies the history."""
    return (pattern is not None and pattern.topk_blocks is not None and pattern.resolved_selector == "mass"
            and fingerprints_identify_history(getattr(module, "layer_idx", None)))


def prepare_decode_store(module: torch.nn.Module, pattern: SparsePattern | None, k: torch.Tensor, q_len: int,
                         q_offset: int, kv_offset: int) -> None:
    """At an eager call of ``module``: make its :class:`DecodeStore` when the keys are a static cache's (slots past
    the call's queries) that compiled decode steps will read, or zero the kept counts of the one it has at a prefill
    from the cache's start (the fingerprint check would see the new keys too).
    Other eager calls leave it as it is: no launch added to an eager decode step. Nothing for other layers and
    caches."""
    if not keeps_decode_store(module, pattern) or q_offset + q_len >= kv_offset + k.shape[2] or k.dim() != 4:
        return
    store = getattr(module, STORE_ATTRIBUTE, None)
    if isinstance(store, DecodeStore) and store.fits(k, pattern.block_size, kv_offset):
        if q_offset <= kv_offset:
            store.reset()
        return
    setattr(module, STORE_ATTRIBUTE, DecodeStore(*k.shape[:3], k.shape[3], pattern.block_size, kv_offset,
                                                 k.dtype, k.device))


def decode_store_of(module: torch.nn.Module, pattern: SparsePattern | None) -> DecodeStore | None:
    """The :class:`DecodeStore` a traced call of ``module`` reads, if the layer keeps one."""
    if not keeps_decode_store(module, pattern):
        return None
    store = getattr(module, STORE_ATTRIBUTE, None)
    return store if isinstance(store, DecodeStore) else None
