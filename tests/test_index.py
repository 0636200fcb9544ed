"""The block index against the token-exact rules of the pattern (exact_token_mask), and its build cost."""

from __future__ import annotations

import pytest
import torch

from hf_sparsek import BlockLayout, SparsePattern, build_block_index, exact_token_mask
from hf_sparsek.block_index import attended_pairs, causal_pairs
from hf_sparsek.ops import build_index_for, sequence_layout

PATTERNS = {
    "dense": SparsePattern(block_size=64),
    "sink3-win70": SparsePattern(block_size=64, sink_tokens=3, window=70),
    "win1": SparsePattern(block_size=64, window=1),
    "sink100": SparsePattern(block_size=64, sink_tokens=100),
    "strided3-win10": SparsePattern(block_size=64, window=10, layout=BlockLayout("strided", stride=3, offset=1)),
    "random30-denseh1": SparsePattern(
        block_size=64, layout=BlockLayout("random", density=0.3, seed=4), dense_heads=(1,)
    ),
    "win5-dense128": SparsePattern(block_size=64, window=5, min_sparse_len=128),
    "b128-sink5-win200": SparsePattern(block_size=128, sink_tokens=5, window=200),
}
SHAPES = [(300, 300, 0), (1, 300, 299), (37, 300, 263), (200, 250, 50), (65, 65, 0), (1, 1, 0), (20, 300, 100)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"q{q}-kv{k}-off{o}" for q, k, o in SHAPES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_index_matches_token_rules(name, shape):
    pattern = PATTERNS[name]
    q_len, kv_len, q_offset = shape
    index = build_block_index(pattern, batch=1, kv_heads=2, q_len=q_len, kv_len=kv_len, q_offset=q_offset)
    expected = exact_token_mask(pattern, q_len, kv_len, q_offset=q_offset, kv_heads=2)
    assert torch.equal(index.token_mask().expand_as(expected), expected)


@pytest.mark.parametrize("name", ["sink3-win70", "strided3-win10", "dense", "random30-denseh1"])
def test_index_with_left_padding_matches_rules(name):
    pattern = PATTERNS[name]
    mask = torch.ones(3, 260, dtype=torch.bool)
    mask[0, :70] = False
    mask[2, :3] = False
    k_seg, q_seg, k_rank = sequence_layout(3, 260, 260, mask, None, torch.device("cpu"))
    index = build_block_index(pattern, batch=3, kv_heads=2, q_len=260, kv_len=260, k_seg=k_seg, k_rank=k_rank)
    expected = exact_token_mask(pattern, 260, kv_heads=2, attention_mask=mask)
    assert torch.equal(index.token_mask().expand_as(expected), expected)


def test_index_with_packed_sequences_matches_rules():
    pattern = PATTERNS["sink3-win70"]
    seg = torch.tensor([[0] * 90 + [1] * 100 + [2] * 70, [0] * 260])
    k_seg, q_seg, k_rank = sequence_layout(2, 260, 260, None, seg, torch.device("cpu"))
    index = build_block_index(pattern, batch=2, kv_heads=1, q_len=260, kv_len=260, k_seg=k_seg, q_seg=q_seg,
                              k_rank=k_rank)
    expected = exact_token_mask(pattern, 260, segment_ids=seg)
    assert torch.equal(index.token_mask(), expected)


def test_topk_index_adds_selected_blocks_only():
    pattern = SparsePattern(block_size=64, window=64, topk_blocks=2)
    q, k = torch.randn(1, 4, 500, 32), torch.randn(1, 2, 500, 32)
    index = build_index_for(q, k, pattern)
    mask = index.token_mask()
    window_only = exact_token_mask(pattern.replace(topk_blocks=None), 500, kv_heads=2)
    causal = exact_token_mask(SparsePattern(block_size=64), 500, kv_heads=2)
    assert bool((mask & ~causal).sum() == 0)  # never beyond causal
    assert bool((window_only & ~mask.expand_as(window_only)).sum() == 0)  # the window is always kept
    extra_blocks = (mask.expand_as(window_only) & ~window_only).view(1, 2, 500, -1).sum(-1)
    assert int(extra_blocks.max()) <= 2 * 64  # at most k extra blocks per query row
    assert int(extra_blocks.sum()) > 0


def test_transposed_lists_invert_forward_lists():
    pattern = PATTERNS["random30-denseh1"]
    index = build_block_index(pattern, batch=1, kv_heads=2, q_len=700, kv_len=700)
    f_cnt, f_idx, p_cnt, p_idx = index.transposed()

    def pairs(count, tiles):
        out = set()
        for h in range(tiles.shape[1]):
            for row in range(tiles.shape[2]):
                for x in tiles[0, h, row, : count[0, h, row]].tolist():
                    out.add((h, row, x))
        return out

    fwd_full = {(h, n, m) for h, m, n in pairs(index.full_count, index.full_tiles)}
    assert fwd_full == pairs(f_cnt, f_idx)
    fwd_part = {(h, -n - 1 if n < 0 else n, (-m - 1 if n < 0 else m)) for h, m, n in pairs(index.part_count,
                                                                                           index.part_tiles)}
    assert fwd_part == pairs(p_cnt, p_idx)
    for h in range(2):  # lists come out sorted: deterministic order for the backward
        for n in range(index.n_k_tiles):
            row = f_idx[0, h, n, : f_cnt[0, h, n]].tolist()
            assert row == sorted(row)


def test_million_token_index_is_linear_in_length():
    pattern = SparsePattern(sink_tokens=128, window=4096)
    seq = 1 << 20
    index = build_block_index(pattern, batch=1, kv_heads=8, q_len=seq, kv_len=seq)
    assert index.n_q_tiles == seq // 128
    # Per query tile: 1 sink tile + at most 33 window tiles (widths are host bounds: 34 full, 3 partial -- the
    # diagonal and the window's two edges); the lists never grow with the sequence.
    assert (index.full_tiles.shape[-1], index.part_tiles.shape[-1]) == (34, 3)
    short = build_block_index(pattern, batch=1, kv_heads=8, q_len=16384, kv_len=16384)
    assert short.full_tiles.shape[-1:] == index.full_tiles.shape[-1:]
    assert int(index.full_count[0, 0, -1] + index.part_count[0, 0, -1]) == 34


def test_attended_pairs_is_exact():
    pattern = PATTERNS["strided3-win10"]
    index = build_block_index(pattern, batch=1, kv_heads=1, q_len=37, kv_len=300, q_offset=263)
    expected = int(exact_token_mask(pattern, 37, 300, q_offset=263).sum())
    assert attended_pairs(index) == expected
    assert causal_pairs(37, 300, 263, 0) == int(exact_token_mask(SparsePattern(block_size=64), 37, 300).sum())


def test_index_errors_are_clear():
    with pytest.raises(ValueError, match="dense_heads"):
        build_block_index(SparsePattern(dense_heads=(3,)), batch=1, kv_heads=2, q_len=4, kv_len=4)
    with pytest.raises(ValueError, match="every query needs"):
        build_block_index(SparsePattern(), batch=1, kv_heads=1, q_len=8, kv_len=4, q_offset=0)


def test_block_picture_marks_full_partial_and_skipped_tiles():
    from hf_sparsek.describe import block_picture

    rows = block_picture(SparsePattern(block_size=64, sink_tokens=64, window=256), 512).splitlines()
    assert rows[0] == "+ . . . . . . ."  # diagonal tile: causal mask inside
    assert rows[5] == "# + # # # + . ."  # sink tile full; window edge partial; interior full
    assert rows[7] == "# . . + # # # +"
