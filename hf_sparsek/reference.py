"""Pure-PyTorch block-sparse attention on a :class:`BlockIndex`: the CPU path and the oracle for the kernels.

Query tiles are processed in chunks; each chunk gathers only the key tiles its index lists, so memory is
O(chunk x listed keys) and never O(S^2). Math runs in float32 (float64 for float64 inputs). GQA reads each KV
head once for its group of query heads (no repeat_kv copy). A row with nothing to attend gives zeros and a
log-sum-exp of -inf.
"""

from __future__ import annotations

import math

import torch

from .block_index import BlockIndex, element_mask

# Budget for one chunk's score tensor, in elements (about 256 MB in float32).
_CHUNK_SCORE_ELEMENTS = 1 << 26


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` (B, Hq, Lq, D) over ``k``, ``v`` (B, Hkv, Lk, D) restricted to ``index``.

    Returns the output (B, Hq, Lq, Dv) in ``q.dtype`` and, if asked, the natural-log log-sum-exp (B, Hq, Lq) in
    the compute dtype. Differentiable through autograd.
    """
    batch, hq, q_len, dim = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    group = hq // hkv
    block = index.block_size
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    n_q, n_k = index.n_q_tiles, index.n_k_tiles
    qb0, kb0 = index.q_offset // block, index.kv_offset // block

    qp = _to_tiles(q.to(compute), index.q_shift, n_q, block).view(batch, hkv, group, n_q, block, dim)
    kp = _to_tiles(k.to(compute), index.k_shift, n_k, block)  # (B, Hkv, n_k, block, D)
    vp = _to_tiles(v.to(compute), index.k_shift, n_k, block)

    # One combined list per query tile: kind 1 = full, 2 = partial token rules, 3 = partial block-selected.
    width_f, width_p = index.full_tiles.shape[-1], index.part_tiles.shape[-1]
    slot_f = torch.arange(width_f, device=q.device)
    slot_p = torch.arange(width_p, device=q.device)
    full_ok = slot_f < index.full_count.unsqueeze(-1)
    part_ok = slot_p < index.part_count.unsqueeze(-1)
    raw = index.part_tiles.long()
    tiles = torch.cat([index.full_tiles.long(), torch.where(raw < 0, -raw - 1, raw)], -1)
    kind = torch.cat([torch.where(full_ok, 1, 0), torch.where(part_ok, torch.where(raw < 0, 3, 2), 0)], -1)
    tiles = tiles.expand(batch, hkv, n_q, -1)
    kind = kind.expand(batch, hkv, n_q, -1)
    width = tiles.shape[-1]

    per_tile = hq * block * width * block * max(1, batch)
    chunk = max(1, _CHUNK_SCORE_ELEMENTS // per_tile)
    b_idx = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
    h_idx = torch.arange(hkv, device=q.device).view(1, hkv, 1, 1)
    r = torch.arange(block, device=q.device)
    outs, lses = [], []
    for m0 in range(0, n_q, chunk):
        m1 = min(n_q, m0 + chunk)
        t = tiles[:, :, m0:m1]  # (B, Hkv, c, W)
        kd = kind[:, :, m0:m1]
        kt = kp[b_idx, h_idx, t]  # (B, Hkv, c, W, block, D)
        vt = vp[b_idx, h_idx, t]
        qt = qp[:, :, :, m0:m1]  # (B, Hkv, G, c, block, D)
        scores = torch.einsum("bhgcid,bhcwjd->bhgciwj", qt, kt) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        # Element mask: (B, Hkv, 1, c, block, W, block).
        q_abs = ((qb0 + torch.arange(m0, m1, device=q.device)).view(1, 1, -1, 1, 1, 1) * block
                 + r.view(1, 1, 1, -1, 1, 1))
        # Sizes spelled out (no -1): a batch of 0 has no elements to infer them from.
        k_abs = ((kb0 + t).view(batch, hkv, m1 - m0, 1, width, 1) * block + r.view(1, 1, 1, 1, 1, -1))
        rows = torch.arange(batch, device=q.device).view(batch, 1, 1, 1, 1, 1)
        kd6 = kd.view(batch, hkv, m1 - m0, 1, width, 1)
        partial = element_mask(index, q_abs, k_abs, rows, kd6 == 3)
        mask = (kd6 == 1) | ((kd6 >= 2) & partial)
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        flat = scores.flatten(-2)  # (B, Hkv, G, c, block, W*block)
        lse = torch.logsumexp(flat, dim=-1)
        safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(flat - safe_lse.unsqueeze(-1))  # exp(-inf) = 0 on masked entries and empty rows
        out = torch.einsum("bhgcix,bhcxd->bhgcid", probs, vt.flatten(3, 4))
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(batch, hq, n_q * block, dv)
    out = out[:, :, index.q_shift : index.q_shift + q_len].to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=3).reshape(batch, hq, n_q * block)[:, :, index.q_shift : index.q_shift + q_len]
    return out, lse


def _to_tiles(x: torch.Tensor, shift: int, n_tiles: int, block: int) -> torch.Tensor:
    """Pad the sequence axis so that tile n holds absolute block (first block + n); view as tiles."""
    batch, heads, length, dim = x.shape
    back = n_tiles * block - shift - length
    x = torch.nn.functional.pad(x, (0, 0, shift, back))
    return x.view(batch, heads, n_tiles, block, dim)
