"""Block indexes kept across calls: a call without padding, packing or selection reuses the index of its shape
class (no per-call build), and gives the same result as a fresh build."""

from __future__ import annotations

import torch

from hf_sparsek import SparsePattern, ops, sparse_attention


def test_static_index_is_built_once_per_shape_class(monkeypatch):
    ops.clear_index_cache()
    builds = []
    real = ops.build_index_for
    monkeypatch.setattr(ops, "build_index_for", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=70)
    q, k, v = torch.randn(2, 4, 150, 32), torch.randn(2, 2, 150, 32), torch.randn(2, 2, 150, 32)
    first = sparse_attention(q, k, v, pattern, backend="reference")
    again = sparse_attention(q * 2, k, v, pattern, backend="reference")
    assert len(builds) == 1
    q3 = torch.randn(3, 4, 150, 32)  # another batch size: the same index (it broadcasts over batch)
    k3, v3 = torch.randn(3, 2, 150, 32), torch.randn(3, 2, 150, 32)
    third = sparse_attention(q3, k3, v3, pattern, backend="reference")
    assert len(builds) == 1
    sparse_attention(q[:, :, :1], k, v, pattern, backend="reference")  # a decode step: another shape class
    assert len(builds) == 2
    fresh = ops.build_index_for(q3, k3, pattern)
    torch.testing.assert_close(third, sparse_attention(q3, k3, v3, index=fresh, backend="reference"))
    torch.testing.assert_close(again, sparse_attention(q * 2, k, v, index=ops.build_index_for(q, k, pattern),
                                                       backend="reference"))
    assert not torch.equal(first, again)


def test_padded_and_selected_calls_are_not_kept(monkeypatch):
    ops.clear_index_cache()
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=70)
    q, k, v = torch.randn(2, 4, 130, 32), torch.randn(2, 2, 130, 32), torch.randn(2, 2, 130, 32)
    mask = torch.ones(2, 130, dtype=torch.bool)
    mask[1, :20] = False
    sparse_attention(q, k, v, pattern, attention_mask=mask, backend="reference")
    sparse_attention(q, k, v, pattern, selected_tiles=torch.zeros(1, 1, 3, 1, dtype=torch.int32),
                     backend="reference")
    assert len(ops._STATIC_INDEXES) == 0


def test_cache_keeps_at_most_its_capacity(monkeypatch):
    ops.clear_index_cache()
    monkeypatch.setattr(ops, "STATIC_INDEX_CAPACITY", 3)
    pattern = SparsePattern(block_size=64, window=64)
    for length in range(10, 16):
        t = torch.randn(1, 1, length, 16)
        sparse_attention(t, t, t, pattern, backend="reference")
    assert len(ops._STATIC_INDEXES) == 3
