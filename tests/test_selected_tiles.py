"""``sparse_attention(selected_tiles=...)``: key tiles chosen outside the op (a learned scorer) are attended as whole
blocks beside the pattern's sink and window, exactly as the token-exact definition says, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_masked_attention

from hf_sparsek import SparsePattern, sparse_attention
from hf_sparsek.block_index import build_block_index
from hf_sparsek.ops import build_index_for

BLOCK = 64


def _random_tiles(batch: int, heads: int, q_len: int, q_offset: int, k: int) -> torch.Tensor:
    """Causal key tiles per query tile (absolute grid), with -1 holes and repeats.

    The first entry is two tiles behind the query tile (clamped at 0), so the last query tile always names a tile that
    the tests' sink (5 tokens) and window (40 tokens) leave out, whatever the random draws give."""
    n_q = (q_offset % BLOCK + q_len + BLOCK - 1) // BLOCK
    last = (q_offset // BLOCK + torch.arange(n_q)).view(1, 1, n_q, 1)
    draw = (torch.rand(batch, heads, n_q, k) * (last + 1).float()).long()
    tiles = torch.where(torch.rand(batch, heads, n_q, k) < 0.2, -1, draw)
    tiles[..., :1] = (last - 2).clamp(min=0).expand(batch, heads, n_q, 1)
    return tiles.to(torch.int32)


@pytest.mark.parametrize("case", [
    dict(batch=2, hq=4, hkv=2, q_len=200, kv_len=200, heads=2, k=3),
    dict(batch=1, hq=3, hkv=1, q_len=1, kv_len=301, heads=1, k=4),
    dict(batch=2, hq=4, hkv=2, q_len=70, kv_len=333, heads=1, k=2),
], ids=["prefill-B2-GQA", "decode-MQA", "chunk-B2"])
def test_selected_tiles_match_token_exact_definition(case):
    batch, hq, hkv, q_len, kv_len = (case[n] for n in ("batch", "hq", "hkv", "q_len", "kv_len"))
    q = torch.randn(batch, hq, q_len, 32, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, hkv, kv_len, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, hkv, kv_len, 32, dtype=torch.float64, requires_grad=True)
    pattern = SparsePattern(block_size=BLOCK, sink_tokens=5, window=40)
    q_offset = kv_len - q_len
    tiles = _random_tiles(batch, case["heads"], q_len, q_offset, case["k"])
    out = sparse_attention(q, k, v, pattern, selected_tiles=tiles, backend="reference")
    index = build_block_index(pattern, batch=batch, kv_heads=hkv, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                              topk_tiles=tiles)
    expected = dense_masked_attention(q, k, v, index.token_mask(), 32**-0.5)
    torch.testing.assert_close(out, expected)
    # The tiles add to the window: more pairs than the pattern alone, never fewer.
    plain = build_index_for(q, k, pattern).token_mask()
    assert bool((index.token_mask() >= plain).all()) and index.token_mask().sum() > plain.sum()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_selected_tiles_bad_shape_or_dtype_raise():
    q, k, v = (torch.randn(1, 2, 130, 16) for _ in range(3))
    pattern = SparsePattern(block_size=BLOCK, window=64)
    with pytest.raises(ValueError, match="selected_tiles must be an integer tensor"):
        sparse_attention(q, k, v, pattern, selected_tiles=torch.zeros(1, 2, 5, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="selected_tiles must be an integer tensor"):
        sparse_attention(q, k, v, pattern, selected_tiles=torch.ones(1, 2, 3, 2))
    index = build_index_for(q, k, pattern)
    with pytest.raises(ValueError, match="either a prebuilt index or selected_tiles"):
        sparse_attention(q, k, v, index=index, selected_tiles=torch.zeros(1, 2, 3, 2, dtype=torch.int32))


def test_selected_tiles_compiled_equals_eager():
    q, k, v = (torch.randn(2, 4, 150, 16, requires_grad=True) for _ in range(3))
    pattern = SparsePattern(block_size=BLOCK, sink_tokens=4, window=32)
    tiles = _random_tiles(2, 4, 150, 0, 2)

    def fn(q, k, v, tiles):
        return sparse_attention(q, k, v, pattern, selected_tiles=tiles, backend="reference")

    eager = fn(q, k, v, tiles)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v, tiles)
    torch.testing.assert_close(compiled, eager)
    grads = torch.autograd.grad(compiled.sum(), (q, k, v))
    expected = torch.autograd.grad(eager.sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
