"""SPARSEK, the differentiable top-k of SparseK (Lou et al., arXiv:2406.16747): scores -> a mask that keeps k entries.

For scores ``u`` along one dimension of length n, the soft mask is the Euclidean projection of ``u`` onto
{0 <= m <= 1, sum(m) = k}::

    m = clip(u - tau(u), 0, 1),   tau chosen so that sum(m) = k

``tau`` is exact: the sum is piecewise linear and non-increasing in tau, with kinks at u_i - 1 and u_i; sorting u
once and prefix sums give it at every kink (O(n log n)), and tau is solved on the one linear piece that reaches k.
The Jacobian is that of a projection: with M the entries strictly inside (0, 1),
dm_i/du_j = [i in M] ([i == j] - [j in M] / |M|), so the backward is O(n) and needs no sort.

``hard=True`` gives the paper's use: the forward keeps exactly the k largest scores (a 0/1 mask, ties to the lower
index) while gradients flow through the soft mask (straight-through). ``k >= n`` keeps everything (m = 1);
``k = 0`` keeps nothing.

Picture (n = 6, k = 2)::

    u      0.9  2.0  0.1  1.6  -0.5  1.5
    soft   0    0.97 0    0.57  0    0.47      sum = 2, tau = 1.03
    hard   0    1    0    1     0    0
"""

from __future__ import annotations

import torch

__all__ = ["sparsek_threshold", "sparsek_topk"]


def _check(scores: torch.Tensor, k: int) -> int:
    if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a floating-point tensor, got {type(scores).__name__} "
                         f"{getattr(scores, 'dtype', '')}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an integer >= 0 (entries to keep), got {k!r}")
    return k


@torch.no_grad()
def sparsek_threshold(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """tau per row of ``scores`` (..., n) such that sum(clip(scores - tau, 0, 1)) = min(k, n); shape (...).

    ``k``: an int, or a tensor of per-row budgets broadcastable to (..., 1). Finite scores (``sparsek_topk`` handles
    infinities before it calls this)."""
    if not isinstance(k, torch.Tensor):
        k = _check(scores, k)
    n = scores.shape[-1]
    u = scores.double()
    if n == 0:
        return u.sum(-1)  # an empty row has no threshold to set
    budget = torch.as_tensor(k, dtype=torch.float64, device=u.device).expand(*u.shape[:-1], 1).clamp(0, n)
    ordered = u.sort(-1, descending=True).values  # (..., n)
    prefix = torch.nn.functional.pad(ordered.cumsum(-1), (1, 0))  # prefix[j] = sum of the j largest
    kinks = torch.cat([ordered - 1.0, ordered], -1).sort(-1).values  # candidate taus, ascending (..., 2n)
    ascending = ordered.flip(-1).contiguous()

    def ranks(threshold: torch.Tensor) -> torch.Tensor:  # #{u_i > threshold} per kink
        return n - torch.searchsorted(ascending, threshold.contiguous(), right=True)

    ones = ranks(kinks + 1.0)  # entries at 1: u_i - tau >= 1 ... counted as u_i > tau + 1 (equality adds 0 either way)
    live = ranks(kinks)  # entries above 0
    total = ones + prefix.gather(-1, live) - prefix.gather(-1, ones) - (live - ones) * kinks  # sum(m) at each kink
    # The first kink (ascending tau) where the sum falls to k or below ends the piece that reaches k.
    j = (total <= budget).to(torch.int8).argmax(-1, keepdim=True)
    lo = kinks.gather(-1, (j - 1).clamp(min=0))
    hi = kinks.gather(-1, j)
    f_lo, f_hi = total.gather(-1, (j - 1).clamp(min=0)), total.gather(-1, j)
    slope = (f_lo - f_hi) / (hi - lo).clamp(min=torch.finfo(torch.float64).tiny)
    tau = torch.where((j > 0) & (f_lo > f_hi), lo + (f_lo - budget) / slope, hi)
    tau = torch.where(budget >= n, ordered[..., -1:] - 1.0, tau)  # every entry 1
    tau = torch.where(budget <= 0, ordered[..., :1], tau)  # every entry 0
    return tau.squeeze(-1)


def _soft_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The projection (float64), with infinite scores taken as limits: a -inf entry is never kept (a masked
    candidate: a row of them gives zeros), +inf entries are kept whole ahead of every finite one (k / their count
    each when there are more of them than k), and the finite entries share what budget is left."""
    u = scores.double()
    pos, neg = u == float("inf"), u == float("-inf")
    if not (pos.any() or neg.any()):
        return (u - sparsek_threshold(u, k).unsqueeze(-1)).clamp(0.0, 1.0)
    finite = ~(pos | neg)
    n_pos = pos.sum(-1, keepdim=True).double()
    low = torch.where(finite, u, float("inf")).amin(-1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, 0.0)
    # the others sit 2 below every finite entry: never above a threshold that keeps at most the finite entries
    stand_in = torch.where(finite, u, low - 2.0)
    left = (k - n_pos).clamp(min=0).minimum(finite.sum(-1, keepdim=True).double())
    soft = (stand_in - sparsek_threshold(stand_in, left).unsqueeze(-1)).clamp(0.0, 1.0)
    soft = torch.where(finite, soft, 0.0)
    return torch.where(pos, (k / n_pos.clamp(min=1)).clamp(max=1.0), soft)


class _SparseK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, hard: bool) -> torch.Tensor:
        soft = _soft_mask(scores, k)
        inside = (soft > 0) & (soft < 1) & torch.isfinite(scores)
        ctx.save_for_backward(inside)
        if not hard:
            return soft.to(scores.dtype)
        keep = min(k, scores.shape[-1])
        mask = torch.zeros_like(scores)
        if keep:
            # stable descending sort: among equal scores the lower index wins; -inf (masked) entries are never kept
            top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :keep]
            mask.scatter_(-1, top, 1.0)
            mask = mask.masked_fill(scores == float("-inf"), 0.0)
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        g = torch.where(inside, grad, torch.zeros_like(grad))
        count = inside.sum(-1, keepdim=True).clamp(min=1)
        g = g - inside * (g.sum(-1, keepdim=True) / count)
        return g, None, None


def sparsek_topk(scores: torch.Tensor, k: int, dim: int = -1, hard: bool = False) -> torch.Tensor:
    """SPARSEK mask of ``scores`` along ``dim``: values in [0, 1] summing to min(k, n) (soft), or the k-hot mask of
    the k largest scores with the soft mask's gradients (``hard=True``). Same shape and dtype as ``scores``; any
    leading shape. Differentiable with respect to ``scores``.

    ``-inf`` marks an entry that may not be kept (the sum is then min(k, finite entries); a row of them gives
    zeros); ``+inf`` entries are kept first (each k / their count where more than k); NaN is refused."""
    k = _check(scores, k)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    if torch.isnan(scores).any():
        raise ValueError("scores hold NaN: SPARSEK needs ordered scores (mask candidates with -inf)")
    moved = scores.movedim(dim, -1)
    out = _SparseK.apply(moved, k, bool(hard))
    return out.movedim(-1, dim)
