"""``describe.pattern_density`` for top-k patterns: an upper bound on what the selectors attend, counted per query
tile, that adds no selected blocks to rows already dense (``min_sparse_len``, early tiles)."""

from __future__ import annotations

import pytest
import torch

from hf_sparsek import SparsePattern
from hf_sparsek.block_index import _expand_index, attended_pairs, build_block_index, causal_pairs
from hf_sparsek.describe import pattern_density
from hf_sparsek.ops import build_index_for

CASES = [
    dict(block_size=64, sink_tokens=64, window=128, topk_blocks=3),
    dict(block_size=64, sink_tokens=64, window=128, topk_blocks=4, selector="probe", probe_stride=4,
         min_sparse_len=256),
    dict(block_size=64, window=64, topk_blocks=5, selector="mass"),
    dict(block_size=64, window=100, topk_blocks=2, selector="meanpool", dense_heads=(1,)),
    dict(block_size=128, sink_tokens=30, window=200, topk_blocks=2, selector="refine", dense_tail=40),
    dict(block_size=64, sink_tokens=64, window=64, topk_blocks=6, selector="probe", probe_stride=8,
         per_query_head=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.get("selector") or "default")
@pytest.mark.parametrize("seq_len", [717, 1501])
def test_the_bound_holds_on_random_inputs(case, seq_len):
    """What the selector really attends on fresh random inputs (per KV head, averaged as the bound is) never
    exceeds the bound."""
    pattern = SparsePattern.from_dict(case)
    q, k = torch.randn(1, 4, seq_len, 32), torch.randn(1, 2, seq_len, 32)
    tail = pattern.dense_tail
    plain = pattern.replace(dense_tail=0, per_query_head=False)
    if pattern.per_query_head:
        k = k.repeat_interleave(2, 1)
    head = seq_len - tail
    index = build_index_for(q[:, :, :head], k[:, :, :head], plain)
    heads = index.full_count.shape[1] if not index.head_broadcast else k.shape[1]
    pairs = sum(attended_pairs(index, 0, h) for h in range(heads)) / heads
    pairs += causal_pairs(seq_len, seq_len, 0, 0) - causal_pairs(head, head, 0, 0)
    actual = pairs / causal_pairs(seq_len, seq_len, 0, 0)
    bound = pattern_density(pattern, seq_len, kv_heads=k.shape[1])
    assert actual <= bound + 1e-12
    assert bound < 1.0  # long enough that the bound is informative


def _per_row_bound(pattern: SparsePattern, seq_len: int) -> float:
    """The tightest row-by-row form: each row's static keys plus k blocks, at most its causal keys (brute force)."""
    static = pattern.replace(topk_blocks=None, selector=None, probe_stride=None)
    mask = _expand_index(build_block_index(static, batch=1, kv_heads=1, q_len=seq_len, kv_len=seq_len))[0, 0]
    have = mask.sum(-1)
    causal = torch.arange(1, seq_len + 1)
    rows = torch.minimum(have + pattern.topk_blocks * pattern.block_size, causal)
    return rows.sum().item() / causal.sum().item()


@pytest.mark.parametrize("min_sparse_len", [0, 192, 448])
def test_the_bound_lies_between_the_row_by_row_count_and_the_flat_k_blocks_a_row(min_sparse_len):
    """Per tile, it is at least the per-row bound and at most the old flat count (static + k blocks on every row,
    which counted k extra blocks on rows below ``min_sparse_len`` that already attend every key)."""
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=96, topk_blocks=3, selector="probe",
                            probe_stride=4, min_sparse_len=min_sparse_len)
    seq_len = 700
    static = pattern.replace(topk_blocks=None, selector=None, probe_stride=None)
    flat = pattern_density(static, seq_len) + 3 * 64 * seq_len / causal_pairs(seq_len, seq_len, 0, 0)
    bound = pattern_density(pattern, seq_len)
    assert _per_row_bound(pattern, seq_len) <= bound + 1e-12
    assert bound < flat
    assert pattern_density(pattern.replace(min_sparse_len=768), seq_len) == 1.0  # every row dense


def test_rows_dense_below_min_sparse_len_add_nothing_where_the_selection_would_keep_every_key():
    """Gemma 3's default keeps every key on rows below 1984 (28 blocks fill what sink and window leave), so
    ``min_sparse_len`` 1984 counts the same pairs: the flat count said 26.1% at 16K against 24.9% without it."""
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=128, topk_blocks=28, selector="probe",
                            probe_stride=8, per_query_head=True, dense_tail=64)
    for seq_len in (4096, 16384):
        assert pattern_density(pattern.replace(min_sparse_len=1984), seq_len) == pytest.approx(
            pattern_density(pattern, seq_len), abs=1e-12)
