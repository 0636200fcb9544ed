"""``LearnedSelector``: the per-layer scorers of one model and the tiles they choose for one attention call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model_support import attention_shape
from ..selection.store import fingerprints_identify_history
from .config import QUERY_ROWS
from .features import (
    competing_tiles,
    key_tile_features,
    key_tiles_that_compete,
    lagged_query_features,
    own_query_features,
    query_tile_sums,
    tile_count,
)
from .scorer import DISTANCE_BUCKETS, LayerScorer, hard_topk_tiles
from .store import LayerStore

SHORT_QUERY_TILES = 2  # calls with at most this many query tiles (decode) ...
SHORT_MIN_KEY_TILES = 256  # ... and at least this many key tiles score in PyTorch (one program per KV head is slow)


class LearnedSelector(nn.Module):
    """One :class:`LayerScorer` per attention layer that selects (``layers``), the block size they score, and the
    per-layer decode stores (kept outside the parameters; see :mod:`hf_sparsek.learned.store`).

    Made for a model with :meth:`for_model`, or from a saved file with ``hf_sparsek.learned.load_selector``.
    """

    def __init__(self, layers: list[int], kv_heads: int, head_dim: int, block_size: int, mode: str = "query",
                 buckets: int = DISTANCE_BUCKETS, query_rows: str = "previous") -> None:
        super().__init__()
        if not layers:
            raise ValueError("a LearnedSelector needs at least one layer")
        if query_rows not in QUERY_ROWS:
            raise ValueError(f"query_rows must be one of {QUERY_ROWS}, got {query_rows!r}")
        self.block_size, self.mode, self.kv_heads, self.head_dim = block_size, mode, kv_heads, head_dim
        self.query_rows = query_rows
        self.scorers = nn.ModuleDict({str(i): LayerScorer(kv_heads, head_dim, mode, buckets) for i in layers})
        self.stores: dict[int, LayerStore] = {}

    @property
    def layers(self) -> list[int]:
        return sorted(int(i) for i in self.scorers)

    def meta(self) -> dict[str, Any]:
        """What rebuilding this selector needs (saved beside its weights)."""
        any_scorer = next(iter(self.scorers.values()))
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "block_size": self.block_size, "mode": self.mode, "buckets": any_scorer.buckets,
                "query_rows": self.query_rows}

    @classmethod
    def for_model(cls, model: Any, block_size: int, mode: str = "query", layers: list[int] | None = None,
                  query_rows: str = "previous") -> LearnedSelector:
        """A fresh (training-free-equivalent) selector for every layer of ``model`` (or ``layers``)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kv_heads, head_dim = attention_shape(config)
        layers = list(range(config.num_hidden_layers)) if layers is None else list(layers)
        return cls(layers, kv_heads, head_dim, block_size, mode, query_rows=query_rows)

    def scorer(self, layer_idx: int | None) -> LayerScorer:
        key = str(0 if layer_idx is None else layer_idx)
        if key not in self.scorers:
            raise ValueError(f"the learned selector has no scorer for layer {layer_idx} (it has layers "
                             f"{self.layers}); train one for it, or give that layer a pattern without "
                             "selector 'learned'")
        return self.scorers[key]

    def reset_stores(self) -> None:
        self.stores.clear()

    def select(
        self, layer_idx: int | None, q: torch.Tensor, k: torch.Tensor, topk: int, sink_tokens: int,
        window: int | None, q_offset: int, kv_offset: int, valid: torch.Tensor | None, use_store: bool = True,
        backend: str = "auto",
    ) -> torch.Tensor:
        """(B, Hkv, n_q_tiles, width) int32 absolute key tiles to visit beyond the pattern's sink and window, -1 =
        none; q (B, Hq, q_len, D) and k (B, Hkv, kv_len, D) after RoPE, ``valid`` (B, kv_len) real keys or None.

        The ``topk`` best competing tiles per query tile (an exact budget, ``sparsek_topk``'s hard forward); without
        a window the diagonal tile is added, so every row sees its own key. ``backend``: ``"auto"`` runs the Triton
        kernels (``hf_sparsek.kernels.learned_selection``: pooling, then logits and top-k fused) on CUDA and the
        PyTorch definition elsewhere; ``"torch"`` / ``"triton"`` force one (the latter also on CPU under
        ``TRITON_INTERPRET=1``). Calls with at most ``SHORT_QUERY_TILES`` query tiles (decode) and at least
        ``SHORT_MIN_KEY_TILES`` key tiles score in PyTorch on either: one program per KV head would stream every key
        tile alone.
        """
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
        block = self.block_size
        batch, _, q_len, _ = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        if kv_heads != self.kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"the learned selector was made for {self.kv_heads} KV heads of dim {self.head_dim}; "
                             f"this layer has {kv_heads} of dim {q.shape[-1]}")
        q_valid = None
        if valid is not None:
            start = q_offset - kv_offset
            q_valid = valid[:, start : start + q_len]
        # float32 scoring under a training run's autocast too: the fused kernel takes fp32 projections
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            store = self.stores.setdefault(-1 if layer_idx is None else layer_idx, LayerStore()) if use_store else None
            if store is not None and kv_offset == 0:
                if fingerprints_identify_history(layer_idx):
                    k_feat = store.key_features_for(k, valid, kv_offset, block, use_triton, written=q_offset + q_len)
                else:  # a first layer's kept tiles cannot be checked on their last keys: every complete tile
                    # pooled from its keys, as the store would give them
                    end = max(0, min(kv_len, q_offset + q_len)) // block * block
                    k_feat = key_tile_features(k[:, :, :end], None if valid is None else valid[:, :end], 0, block,
                                               use_triton)
                sums, counts, previous = store.query_sums_for(q, q_valid, q_offset, block, kv_heads, use_triton, k)
            else:
                k_feat = key_tile_features(k, valid, kv_offset, block, use_triton)
                sums, counts = query_tile_sums(q, q_valid, q_offset, block, kv_heads, use_triton)
                previous = None
            q_feat = (lagged_query_features(sums, counts, previous) if self.query_rows == "previous"
                      else own_query_features(sums, counts))
            n_q, n_k = tile_count(q_offset, q_len, block), tile_count(kv_offset, kv_len, block)
            if k_feat.shape[2] < n_k:  # tiles not yet complete never compete: zero features
                k_feat = torch.nn.functional.pad(k_feat, (0, 0, 0, n_k - k_feat.shape[2]))
            qb = q_offset // block + torch.arange(n_q, device=q.device)
            scorer = self.scorer(layer_idx)
            if use_triton and (n_q > SHORT_QUERY_TILES or n_k < SHORT_MIN_KEY_TILES):
                tiles = _fused_tiles(scorer, q_feat, k_feat, n_q, block, q_offset, kv_offset, kv_len, sink_tokens,
                                     window, topk, valid)
            else:
                kb = kv_offset // block + torch.arange(n_k, device=q.device)
                competing = competing_tiles(q_offset, q_len, kv_offset, kv_len, block, sink_tokens, window, valid,
                                            batch, q.device)
                tiles = hard_topk_tiles(scorer(q_feat, k_feat, qb, kb), competing, topk, kb)
            if window is None:
                diagonal = qb.view(1, 1, -1, 1).expand(batch, kv_heads, n_q, 1).to(torch.int32)
                tiles = torch.cat([tiles, diagonal], dim=-1)
        return tiles


def _fused_tiles(scorer: LayerScorer, q_feat: torch.Tensor, k_feat: torch.Tensor, n_q: int, block: int,
                 q_offset: int, kv_offset: int, kv_len: int, sink_tokens: int, window: int | None, topk: int,
                 valid: torch.Tensor | None) -> torch.Tensor:
    """The scorer's hard top-k through the fused kernel: its key-side factors in PyTorch (one matmul per call:
    ``LayerScorer.kernel_inputs``), then the logits, the competition and the top-k in one launch, nothing of size
    (query tiles x key tiles) written."""
    from ..kernels.learned_selection import gate_width, learned_topk

    qp, kp, const = scorer.kernel_inputs(q_feat, k_feat, gate_width(q_feat.shape[-1]))
    flag = None
    if valid is not None:
        flag = key_tiles_that_compete(kv_offset, kv_len, block, sink_tokens, valid, const.shape[0], const.device)
        flag = flag.to(torch.int32)
    tiles = learned_topk(qp, kp, const, scorer.bias.detach().float(), flag, n_q=n_q, block=block,
                         q_offset=q_offset, kv_offset=kv_offset, kv_len=kv_len, sink=sink_tokens, window=window,
                         topk=topk)
    return tiles[..., : min(topk, const.shape[-1])]
