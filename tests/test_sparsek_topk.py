"""SPARSEK (hf_sparsek.sparsek_topk): the exact projection, its gradient, the hard top-k, ties and bad input."""

from __future__ import annotations

import pytest
import torch

from hf_sparsek.sparsek_topk import sparsek_threshold, sparsek_topk


def bisection_tau(u: torch.Tensor, k: int, steps: int = 200) -> torch.Tensor:
    """tau with sum(clip(u - tau, 0, 1)) = k by bisection per row (the slow, obvious definition)."""
    lo = u.amin(-1) - 1.0
    hi = u.amax(-1)
    for _ in range(steps):
        mid = (lo + hi) / 2
        over = (u - mid.unsqueeze(-1)).clamp(0, 1).sum(-1) > k
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("n", [1, 2, 7, 64, 301])
@pytest.mark.parametrize("k_of", ["zero", "one", "half", "n", "more"])
def test_mask_sums_to_k_and_equals_the_bisection_solution(n, k_of):
    k = {"zero": 0, "one": 1, "half": n // 2, "n": n, "more": n + 3}[k_of]
    u = torch.randn(3, 5, n, dtype=torch.float64) * 2
    m = sparsek_topk(u, k)
    assert m.shape == u.shape and m.dtype == u.dtype
    assert (m >= 0).all() and (m <= 1).all()
    torch.testing.assert_close(m.sum(-1), torch.full((3, 5), float(min(k, n)), dtype=torch.float64))
    if 0 < k < n:
        expected = (u - bisection_tau(u, k).unsqueeze(-1)).clamp(0, 1)
        torch.testing.assert_close(m, expected, atol=1e-9, rtol=0)
        # tau itself where it is unique (some entry strictly inside (0, 1))
        tau = sparsek_threshold(u, k)
        inside = ((m > 1e-9) & (m < 1 - 1e-9)).any(-1)
        torch.testing.assert_close(tau[inside], bisection_tau(u, k)[inside], atol=1e-9, rtol=0)


def test_is_the_euclidean_projection_onto_the_capped_simplex():
    """No feasible point is closer to u (checked against random feasible perturbations of the answer)."""
    u = torch.randn(200, dtype=torch.float64)
    m = sparsek_topk(u, 17)
    best = (m - u).square().sum()
    for _ in range(200):
        d = torch.randn_like(u)
        d = d - d.mean()  # keeps the sum
        step = 1e-3 * d
        cand = m + step
        if (cand < 0).any() or (cand > 1).any():
            continue
        assert (cand - u).square().sum() >= best - 1e-12


def test_docstring_example():
    u = torch.tensor([0.9, 2.0, 0.1, 1.6, -0.5, 1.5], dtype=torch.float64)
    m = sparsek_topk(u, 2)
    torch.testing.assert_close(m, torch.tensor([0, 2.9 / 3, 0, 1.7 / 3, 0, 1.4 / 3], dtype=torch.float64))
    assert sparsek_topk(u, 2, hard=True).tolist() == [0, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_gradcheck_float64(k):
    u = (torch.randn(2, 3, 11, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparsek_topk(x, k), (u,))


def test_gradient_is_the_projection_jacobian():
    u = torch.randn(40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, dtype=torch.float64)
    (sparsek_topk(u, 9) * g).sum().backward()
    m = sparsek_topk(u.detach(), 9)
    inside = (m > 0) & (m < 1)
    expected = torch.where(inside, g - g[inside].mean(), torch.zeros_like(g))
    torch.testing.assert_close(u.grad, expected)


def test_ties_share_the_budget():
    u = torch.full((4, 6), 0.3, dtype=torch.float64)
    torch.testing.assert_close(sparsek_topk(u, 2), torch.full_like(u, 2 / 6))
    u = torch.tensor([2.0, 1.0, 1.0, 1.0, -3.0], dtype=torch.float64)  # one clear winner, a three-way tie for the rest
    torch.testing.assert_close(sparsek_topk(u, 2), torch.tensor([1, 1 / 3, 1 / 3, 1 / 3, 0], dtype=torch.float64))
    assert sparsek_topk(u, 2, hard=True).tolist() == [1, 1, 0, 0, 0]  # the tie goes to the lower index


def test_hard_forward_keeps_exactly_k_with_soft_gradients():
    u = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    hard = sparsek_topk(u, 6, hard=True)
    assert torch.equal(hard.sum(-1), torch.full((5,), 6.0, dtype=torch.float64))
    assert torch.equal(hard.bool(), torch.zeros_like(hard, dtype=torch.bool).scatter(-1, u.topk(6).indices, True))
    g = torch.randn(5, 33, dtype=torch.float64)
    (hard * g).sum().backward()
    soft_u = u.detach().clone().requires_grad_()
    (sparsek_topk(soft_u, 6) * g).sum().backward()
    torch.testing.assert_close(u.grad, soft_u.grad)


def test_dim_argument_and_dtypes():
    u = torch.randn(9, 4, 3)
    torch.testing.assert_close(sparsek_topk(u, 2, dim=0), sparsek_topk(u.movedim(0, -1), 2).movedim(-1, 0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = sparsek_topk(u.to(dtype), 2, dim=1)
        assert m.dtype == dtype
        torch.testing.assert_close(m.float().sum(1), torch.full((9, 3), 2.0), atol=2e-2, rtol=0)


@pytest.mark.parametrize("scores, k, match", [
    (torch.randn(4), -1, "k must be an integer >= 0"),
    (torch.randn(4), 1.5, "k must be an integer >= 0"),
    (torch.randn(4), True, "k must be an integer >= 0"),
    (torch.arange(4), 1, "floating-point"),
    (torch.tensor(1.0), 1, "at least one dimension"),
])
def test_bad_input(scores, k, match):
    with pytest.raises(ValueError, match=match):
        sparsek_topk(scores, k)


def test_infinite_scores_are_limits_and_nan_is_refused():
    """-inf marks an entry that may not be kept (a row of them gives zeros, never NaN; the sum is min(k, finite
    entries)); +inf entries are kept first and the finite ones share the rest; NaN is refused. Gradients stay
    finite and flow only through entries strictly inside (0, 1)."""
    inf = float("inf")
    u = torch.tensor([[1.0, inf, 0.5, 0.2], [inf, inf, 0.0, 1.0], [-inf, -inf, -inf, -inf], [3.0, -inf, 1.0, 2.0],
                      [1.0, -inf, -inf, -inf]], dtype=torch.float64, requires_grad=True)
    m = sparsek_topk(u, 2)
    want = torch.tensor([[0.75, 1, 0.25, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0]],
                        dtype=torch.float64)
    torch.testing.assert_close(m.detach(), want)
    assert torch.equal(sparsek_topk(u.detach(), 2, hard=True), torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(sparsek_topk(torch.tensor([inf, inf, inf, 0.0]), 2),
                               torch.tensor([2 / 3, 2 / 3, 2 / 3, 0.0]))
    (m * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(u.grad).all()
    assert u.grad[0].tolist() == [-1.0, 0.0, 1.0, 0.0]  # entries 0 and 2 inside (0, 1): g - mean over them
    mixed = torch.tensor([0.3, -inf, 1.2, 0.7], dtype=torch.float64)
    torch.testing.assert_close(sparsek_topk(mixed, 2), torch.tensor([0.3, 0.0, 1.0, 0.7], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        sparsek_topk(torch.tensor([1.0, float("nan"), 0.5]), 1)
