"""Shared test setup: deterministic seeds per test, fresh random inputs (never zeros)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    # A different seed per test id, so tests do not all see the same draws.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))


def dense_masked_attention(q, k, v, mask, scale, softcap=None):
    """fp64 masked-softmax attention on a dense (B|1, Hkv|1, Lq, Lk) boolean mask: the math the op must equal."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    mask = mask.expand(q.shape[0], k.shape[1] // group, -1, -1).repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v
