"""Selector "moment" (hf_sparsek.selection.moment): against a slow float64 loop of its own definition on awkward
shapes (offsets, padding, GQA / MQA, decode, chunked prefill, sliding keys); through a model as a pattern's selector in
test_selection_oracle.test_model_with_the_exact_selectors."""

from __future__ import annotations

import math

import pytest
import torch
from test_selection import CASES, PATTERNS, _case_id, _check_same_selection, _inputs, _slow_cells, _slow_choice

from hf_sparsek import SparsePattern
from hf_sparsek.selection import select_mass, select_moment, select_tiles
from hf_sparsek.selection.moment import MOMENT_STRIDE, MOMENT_VARIANCE, key_moments, moment_tile_mass
from hf_sparsek.selection.tiles import tile_grid


def _slow_moment_selection(q, k, pattern, q_offset, kv_offset, k_seg, stride=MOMENT_STRIDE):
    """{(b, g, m): (chosen tile set, {tile: estimated mass})} straight from the docstring of selection/moment.py:
    per sampled real row (absolute position stride - 1 mod stride, or the call's last row) and head, a softmax over
    the causal tiles holding a real key of log n + s q.mu + v s^2 / 2 (q*q).sigma^2, averaged over the tile's
    sampled real rows, then over the group's heads."""
    block, q_len, dim = pattern.block_size, q.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    s = 1.0 / math.sqrt(dim)
    result = {}
    for b, g, m, c in _slow_cells(q, k, pattern, q_offset, kv_offset, k_seg):
        k_pos, k_real, kb0 = c["k_pos"], c["k_real"], c["kb0"]
        rows = [t for t in torch.nonzero(c["real_rows"]).flatten().tolist()
                if (q_offset + t) % stride == stride - 1 or t == q_len - 1]
        if not rows:
            continue
        probs = {}
        for h in range(g * group, (g + 1) * group):
            for t in rows:
                x = q[b, h, t].double()
                logits = {}
                for n in range(c["n_k"]):
                    keys = (k_pos // block == kb0 + n) & k_real
                    if kb0 + n > c["qb0"] + m or not keys.any():
                        continue
                    kk = k[b, g, keys].double()
                    mu, var = kk.mean(0), kk.var(0, unbiased=False)
                    logits[n] = (math.log(len(kk)) + s * float(x @ mu)
                                 + MOMENT_VARIANCE * s * s / 2 * float((x * x) @ var))
                top = max(logits.values())
                total = sum(math.exp(v - top) for v in logits.values())
                for n, v in logits.items():
                    probs[n] = probs.get(n, 0.0) + math.exp(v - top) / total / len(rows) / group
        result[b, g, m] = (_slow_choice(pattern, probs, c), probs)
    return result


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_moment_follows_its_definition(name, case):
    pattern = PATTERNS[name].replace(selector="moment")
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=11)
    tiles = select_tiles(q, k, pattern, q_offset, kv_offset, k_seg)
    assert tiles.shape[:2] == (q.shape[0], k.shape[1]) and tiles.shape[-1] == pattern.topk_blocks
    _check_same_selection(tiles, _slow_moment_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)


@pytest.mark.parametrize("stride", [1, 4, 64])
def test_pattern_probe_stride_reaches_the_moment_selector(stride):
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[3], seed=12)
    pattern = PATTERNS["sink64-win64-top3"].replace(selector="moment", probe_stride=stride)
    _check_same_selection(select_tiles(q, k, pattern, q_offset, kv_offset, k_seg),
                          _slow_moment_selection(q, k, pattern, q_offset, kv_offset, k_seg, stride), tol=1e-5)
    assert pattern.describe().endswith(f"by moment (one row in {stride}), block 64")


def test_key_moments_and_mass_rows(monkeypatch):
    """Tile mean / variance / count over real keys only; estimated masses sum to 1 on causal real tiles; chunking
    the sampled rows changes nothing."""
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[1], seed=13)
    mean, var = key_moments(k, kv_offset, 64, k_seg >= 0)
    real = k[1, 0, k_seg[1] >= 0][:64 - 37]  # row 1: 37 padding keys, so its first tile holds 27 real keys
    torch.testing.assert_close(mean[1, 0, 0], real.mean(0))
    torch.testing.assert_close(var[1, 0, 0], real.var(0, unbiased=False))
    pattern = PATTERNS["sink64-win64-top3"].replace(selector="moment")
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    mass = moment_tile_mass(q, k, grid, 64, q_offset, kv_offset, k_seg)
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:3]))
    assert not (mass * ~grid.candidate).any()
    monkeypatch.setattr("hf_sparsek.selection.moment._CHUNK_ELEMENTS", 3 * grid.n_k * q.shape[1] * q.shape[0])
    torch.testing.assert_close(moment_tile_mass(q, k, grid, 64, q_offset, kv_offset, k_seg), mass)  # 3 rows a chunk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moment_keeps_what_the_mean_query_misses(seed):
    """Half a query tile's rows look along +e0, half along -e0 (the mean query is about 0): the per-row estimate
    keeps both key tiles that answer them (keys along +e0, keys along -e0); the mass selector's mean query does not
    (what the selector is for: the mass of the mean query is not the mean of the rows' masses)."""
    gen = torch.Generator().manual_seed(seed)
    dim, block, n = 32, 64, 8
    k = torch.randn(1, 1, n * block, dim, generator=gen) * 0.3
    q = torch.randn(1, 1, n * block, dim, generator=gen) * 0.3
    k[0, 0, 2 * block: 3 * block, 0] += 3.0
    k[0, 0, 4 * block: 5 * block, 0] -= 3.0
    last = (n - 1) * block
    q[0, 0, last: last + 32, 0] += 3.0
    q[0, 0, last + 32:, 0] -= 3.0
    pattern = SparsePattern(block_size=block, window=block, topk_blocks=2, selector="moment")
    assert set(select_moment(q, k, pattern, 0, 0, None)[0, 0, -1].tolist()) == {2, 4}
    assert set(select_mass(q, k, pattern.replace(selector="mass"), 0, 0, None)[0, 0, -1].tolist()) != {2, 4}


def test_moment_rejects_bad_input():
    q = torch.randn(1, 2, 70, 16)
    with pytest.raises(ValueError, match="topk_blocks"):
        select_moment(q, q, SparsePattern(window=64), 0, 0, None)
    pattern = SparsePattern(block_size=64, window=64, topk_blocks=1, selector="moment")
    with pytest.raises(ValueError, match="stride"):
        select_moment(q, q, pattern, 0, 0, None, stride=0)
    with pytest.raises(ValueError, match="backend"):
        select_moment(q, q, pattern, 0, 0, None, backend="cuda")
    with pytest.raises(ValueError, match="probe_stride"):
        SparsePattern(block_size=64, window=64, topk_blocks=1, selector="moment", probe_stride=3)
