"""The learned block scorer: one small module per attention layer, scoring (query tile, key tile) per KV head.

Query-aware ("query", the default; SeerAttention-style gate)::

    logit(m, n) = s_h * (Wq_h qbar_{m-1}) . (Wk_h kfeat_n) + u_h . kfeat_n + bias_h[bucket(qb_m - kb_n)]

Query-independent ("key", the SparseK paper's score of pooled keys)::

    logit(m, n) = u_h . kfeat_n + bias_h[bucket(qb_m - kb_n)]

``qbar_{m-1}``: the mean query of the previous tile (see :mod:`hf_sparsek.learned.features`); ``kfeat_n``:
[mean, max, min] of key tile n; ``bucket``: log2 of the tile distance. Initialisation: Wq = I, Wk = [I, 0, 0],
s = 1 / sqrt(D), u = 0, bias = 0, so an untrained "query" scorer ranks tiles exactly as the training-free mean-pool
selector does (mean query . mean key), not at random. Parameters per layer: Hkv (4 D^2 + 3 D + 1 + buckets).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import MODES
from .features import KEY_FEATURES

DISTANCE_BUCKETS = 16


def distance_buckets(qb: torch.Tensor, kb: torch.Tensor, buckets: int = DISTANCE_BUCKETS) -> torch.Tensor:
    """(n_q, n_k) bucket of the tile distance qb - kb: 0 for <= 1, then floor(log2(distance)), capped."""
    dist = (qb.view(-1, 1) - kb.view(1, -1)).clamp(min=1).float()
    return torch.log2(dist).floor().long().clamp(max=buckets - 1)


class LayerScorer(nn.Module):
    """The scorer of one layer; ``forward`` gives logits (B, Hkv, n_q, n_k) (float32)."""

    def __init__(self, kv_heads: int, head_dim: int, mode: str = "query", buckets: int = DISTANCE_BUCKETS) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"scorer mode {mode!r}; supported: {MODES}")
        if kv_heads < 1 or head_dim < 1 or buckets < 1:
            raise ValueError(f"kv_heads, head_dim and buckets must be >= 1, got {kv_heads}, {head_dim}, {buckets}")
        self.mode, self.kv_heads, self.head_dim, self.buckets = mode, kv_heads, head_dim, buckets
        eye = torch.eye(head_dim).expand(kv_heads, head_dim, head_dim)
        self.u = nn.Parameter(torch.zeros(kv_heads, KEY_FEATURES * head_dim))
        self.bias = nn.Parameter(torch.zeros(kv_heads, buckets))
        if mode == "query":
            self.wq = nn.Parameter(eye.clone())
            wk = torch.zeros(kv_heads, head_dim, KEY_FEATURES * head_dim)
            wk[:, :, :head_dim] = eye
            self.wk = nn.Parameter(wk)
            self.log_scale = nn.Parameter(torch.full((kv_heads,), -0.5 * math.log(head_dim)))

    def projections(self, q_feat: torch.Tensor, k_feat: torch.Tensor
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """The per-tile factors of :meth:`forward`'s logits without the distance bias: ``s_h Wq qbar``
        (B, Hkv, n_q, D), ``Wk kfeat`` (B, Hkv, n_k, D) (both None in mode "key") and ``u . kfeat`` (B, Hkv, n_k),
        so that logit(m, n) = qp[m] . kp[n] + c[n] + bias (the fused kernel's inputs)."""
        k_feat = k_feat.float()
        const = (k_feat @ self.u.unsqueeze(-1)).squeeze(-1)  # batched matmuls: one launch each, little host work
        if self.mode != "query":
            return None, None, const
        qp = q_feat.float() @ (self.wq * self.log_scale.exp().view(-1, 1, 1)).transpose(-1, -2)
        kp = k_feat @ self.wk.transpose(-1, -2)
        return qp, kp, const

    def forward(self, q_feat: torch.Tensor, k_feat: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """q_feat (B, Hkv, n_q, D), k_feat (B, Hkv, n_k, 3 D), qb (n_q,) / kb (n_k,) absolute tile numbers."""
        k_feat = k_feat.float()
        logits = torch.einsum("bhnf,hf->bhn", k_feat, self.u).unsqueeze(2)
        if self.mode == "query":
            qp = torch.einsum("bhmd,hed->bhme", q_feat.float(), self.wq)
            kp = torch.einsum("bhnf,hef->bhne", k_feat, self.wk)
            gate = torch.einsum("bhme,bhne->bhmn", qp, kp) * self.log_scale.exp().view(1, -1, 1, 1)
            logits = logits + gate
        bias = self.bias[:, distance_buckets(qb, kb, self.buckets)]  # (Hkv, n_q, n_k)
        return logits + bias.unsqueeze(0)


def hard_topk_tiles(logits: torch.Tensor, competing: torch.Tensor, k: int, kb: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, n_q, min(k, n_k)) int32 absolute key tiles: the k best competing tiles per query tile, -1 where
    fewer compete. The forward of ``sparsek_topk(hard=True)`` (exact budget; among equal logits the lower tile)."""
    masked = logits.masked_fill(~competing, float("-inf"))
    width = min(k, masked.shape[-1])
    order = masked.sort(dim=-1, descending=True, stable=True)
    values, idx = order.values[..., :width], order.indices[..., :width]
    return torch.where(torch.isfinite(values), kb[idx], -1).to(torch.int32)
