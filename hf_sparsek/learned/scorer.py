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
CONST_COLUMNS = 16  # the folded key weights' columns past the gate: u . kfeat, then zeros (16-float aligned rows)


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

    def kernel_inputs(self, q_feat: torch.Tensor, k_feat: torch.Tensor, width: int
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """The fused kernel's factors of :meth:`forward`'s logits without the distance bias: ``qp`` (B, Hkv, n_q,
        width), ``kp`` (B, Hkv, n_k, width) (both None in mode "key") and ``c`` (B, Hkv, n_k), float32, so that
        logit(m, n) = qp[m] . kp[n] + c[n] + bias.

        The gate is folded onto the keys: s (Wq qbar) . (Wk kfeat) = qbar . (A kfeat) with A = s Wq^T Wk, so ``qp``
        is qbar itself (zero-padded to ``width``) and ``kp`` and ``c`` come out of one matmul of the key features
        with :meth:`folded_key_weights` (one launch instead of five; the same function of the parameters, float32
        rounding aside). ``kp`` and ``c`` are views of that product (row stride ``width + CONST_COLUMNS``)."""
        k_feat = k_feat.float()
        if self.mode != "query":
            return None, None, (k_feat @ self.u.detach().unsqueeze(-1)).squeeze(-1)
        both = k_feat @ self.folded_key_weights(width, k_feat.device)
        qp = q_feat.float()
        if width != qp.shape[-1]:
            qp = torch.nn.functional.pad(qp, (0, width - qp.shape[-1]))
        return qp.contiguous(), both[..., :width], both[..., width]

    def folded_key_weights(self, width: int, device: torch.device) -> torch.Tensor:
        """(Hkv, 3 D, width + CONST_COLUMNS) float32 ``W`` with kfeat @ W = [A kfeat, zeros to ``width``, u . kfeat,
        zeros], A = s Wq^T Wk (computed in float64). Cached until a parameter changes (their version counters: an
        optimizer step or ``load_state_dict`` bumps them) or the device does; parameters made under
        ``torch.inference_mode`` have no version counter, so nothing could tell a change: computed on every call."""
        params = (self.wq, self.wk, self.u, self.log_scale)
        if any(p.is_inference() for p in params):
            return self._fold(width, device)
        key = (width, str(device), tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        cached = self.__dict__.get("_folded")
        if cached is not None and cached[0] == key:
            return cached[1]
        w = self._fold(width, device)
        self.__dict__["_folded"] = (key, w)
        return w

    def _fold(self, width: int, device: torch.device) -> torch.Tensor:
        dim = self.head_dim
        if width < dim:
            raise ValueError(f"the gate's width {width} is below the head dim {dim}")
        with torch.no_grad():
            a = self.wq.double().transpose(-1, -2) @ self.wk.double() * self.log_scale.double().exp().view(-1, 1, 1)
            w = torch.zeros(self.kv_heads, KEY_FEATURES * dim, width + CONST_COLUMNS, dtype=torch.float64,
                            device=self.wq.device)
            w[:, :, :dim] = a.transpose(-1, -2)
            w[:, :, width] = self.u.double()
            return w.float().to(device)

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
