"""Selectors "oracle" and "probe" (hf_sparsek.selection.oracle / .probe): against a slow float64 loop of their own
definition on awkward shapes, the oracle never worse than the mass selector in true mass covered, both through a
model as a pattern's selector."""

from __future__ import annotations

import math

import pytest
import torch
from test_selection import CASES, PATTERNS, _case_id, _check_same_selection, _inputs, _slow_cells, _slow_choice

import hf_sparsek
from hf_sparsek import SparsePattern
from hf_sparsek.selection import select_mass, select_oracle, select_probe, select_tiles
from hf_sparsek.selection.oracle import exact_tile_mass
from hf_sparsek.selection.probe import PROBE_STRIDE
from hf_sparsek.selection.tiles import tile_grid


def _slow_oracle_selection(q, k, pattern, q_offset, kv_offset, k_seg, sampled=lambda t, q_len: True):
    """{(b, g, m): (chosen tile set, {tile: true mass})}: per real query row and head the exact causal softmax over
    the real keys, summed per key tile, averaged over the tile's real rows, then over the group's heads.
    ``sampled(t, q_len)``: which rows (index t of the call) count (the probe selector's sample; all for the oracle)."""
    block, q_len, dim = pattern.block_size, q.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    result = {}
    for b, g, m, c in _slow_cells(q, k, pattern, q_offset, kv_offset, k_seg):
        k_pos, k_real, kb0 = c["k_pos"], c["k_real"], c["kb0"]
        real_rows = [t for t in torch.nonzero(c["real_rows"]).flatten().tolist() if sampled(t, q_len)]
        if not real_rows:
            continue
        probs = {}
        for h in range(g * group, (g + 1) * group):
            for t in real_rows:
                keys = (k_pos <= c["q_pos"][t]) & k_real
                if not keys.any():
                    continue
                logits = k[b, g].double() @ q[b, h, t].double() / math.sqrt(dim)
                p = torch.softmax(logits.masked_fill(~keys, float("-inf")), 0)
                for n in set((k_pos[keys] // block - kb0).tolist()):
                    mass = float(p[k_pos // block == kb0 + n].sum())
                    probs[n] = probs.get(n, 0.0) + mass / len(real_rows) / group
        result[b, g, m] = (_slow_choice(pattern, probs, c), probs)
    return result


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_oracle_follows_its_definition(name, case):
    pattern = PATTERNS[name]
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=5)
    tiles = select_oracle(q, k, pattern, q_offset, kv_offset, k_seg)
    assert tiles.shape[:2] == (q.shape[0], k.shape[1]) and tiles.shape[-1] == pattern.topk_blocks
    _check_same_selection(tiles, _slow_oracle_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)


def _probe_sample(q_offset):
    """The probe selector's rows, from its docstring: absolute positions 15 mod 16, and the call's last row."""
    return lambda t, q_len: (q_offset + t) % PROBE_STRIDE == PROBE_STRIDE - 1 or t == q_len - 1


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_probe_follows_its_definition(name, case):
    pattern = PATTERNS[name].replace(selector="probe")
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=6)
    tiles = select_tiles(q, k, pattern, q_offset, kv_offset, k_seg)
    assert tiles.shape[:2] == (q.shape[0], k.shape[1]) and tiles.shape[-1] == pattern.topk_blocks
    slow = _slow_oracle_selection(q, k, pattern, q_offset, kv_offset, k_seg, _probe_sample(q_offset))
    _check_same_selection(tiles, slow, tol=1e-5)


def test_probe_at_stride_one_is_the_oracle():
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[3], seed=7)
    pattern = PATTERNS["win100-top2-mass0.6"]
    assert torch.equal(select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=1),
                       select_oracle(q, k, pattern, q_offset, kv_offset, k_seg))
    with pytest.raises(ValueError, match="stride"):
        select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=0)


def test_pattern_probe_stride_reaches_the_selector():
    """``probe_stride`` in the pattern is the selector's sample: 1 is the oracle, 8 follows its slow definition."""
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[1], seed=8)
    base = PATTERNS["sink64-win64-top3"]
    every = base.replace(selector="probe", probe_stride=1)
    assert torch.equal(select_tiles(q, k, every, q_offset, kv_offset, k_seg),
                       select_oracle(q, k, base, q_offset, kv_offset, k_seg))
    eighth = base.replace(selector="probe", probe_stride=8)
    rows = lambda t, q_len: (q_offset + t) % 8 == 7 or t == q_len - 1  # noqa: E731
    _check_same_selection(select_tiles(q, k, eighth, q_offset, kv_offset, k_seg),
                          _slow_oracle_selection(q, k, eighth, q_offset, kv_offset, k_seg, rows), tol=1e-5)


def test_exact_mass_rows_sum_to_one_and_chunking_is_invisible(monkeypatch):
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[3], seed=2)
    pattern = PATTERNS["sink64-win64-top3"]
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    whole = exact_tile_mass(q, k, 64, q_offset, kv_offset, k_seg)
    torch.testing.assert_close(whole.sum(-1), torch.ones(whole.shape[:3]))
    assert not (whole * ~grid.candidate).any()
    monkeypatch.setattr("hf_sparsek.selection.oracle._CHUNK_ELEMENTS", 7 * k.shape[2])  # a few rows per chunk
    torch.testing.assert_close(exact_tile_mass(q, k, 64, q_offset, kv_offset, k_seg), whole)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_oracle_covers_at_least_the_mass_selector(case):
    """At the same fixed budget the oracle's tiles hold at least as much true mass as the mass selector's (it is
    the ceiling); on random keys the mass selector misses some, so the test sees a strict gain somewhere."""
    pattern = SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=2)
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=9)
    true = exact_tile_mass(q, k, 64, q_offset, kv_offset, k_seg)

    def covered(tiles):
        picked = torch.zeros_like(true).scatter_(-1, tiles.clamp(min=0).long(), 1.0) * 0
        picked.scatter_add_(-1, tiles.clamp(min=0).long(), tiles.ge(0).float())
        return (true * picked.clamp(max=1)).sum(-1)

    oracle = covered(select_oracle(q, k, pattern, q_offset, kv_offset, k_seg))
    mass = covered(select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch"))
    assert (oracle >= mass - 1e-6).all()
    if q.shape[2] > 128:
        assert (oracle > mass + 1e-4).any()


@pytest.mark.parametrize("selector", ["oracle", "probe", "moment"])
def test_model_with_the_exact_selectors(selector):
    """A tiny Llama with selector "oracle" / "probe" / "moment": every tile kept gives SDPA's logits; a small budget
    changes them; the pattern survives a config round trip and generate() runs through the decode path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(1, 97, (2, 300))
    mask = torch.ones_like(ids)
    mask[1, :21] = 0
    real = mask.bool()
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        hf_sparsek.set_pattern(model, SparsePattern(block_size=64, window=64, topk_blocks=5, selector=selector))
        with hf_sparsek.settings(backend="reference"):
            every = model(ids, attention_mask=mask).logits
        small_pattern = SparsePattern(block_size=64, window=64, topk_blocks=1, selector=selector)
        hf_sparsek.set_pattern(model, small_pattern)
        with hf_sparsek.settings(backend="reference"):
            small = model(ids, attention_mask=mask).logits
            out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(every[real], dense[real], rtol=1e-4, atol=1e-4)
    assert (small[real] - dense[real]).abs().max() > 1e-3
    assert out.shape == (2, 305)
    assert SparsePattern.from_dict(small_pattern.to_dict()) == small_pattern


def test_oracle_rejects_a_pattern_without_budget():
    q = torch.randn(1, 2, 70, 16)
    with pytest.raises(ValueError, match="topk_blocks"):
        select_oracle(q, q, SparsePattern(window=64), 0, 0, None)
    with pytest.raises(ValueError, match="selector"):
        SparsePattern(window=64, selector="oracle")
    tiles = select_tiles(q, q, SparsePattern(block_size=64, window=4, topk_blocks=1, selector="oracle"), 0, 0, None)
    assert tiles.shape == (1, 2, 2, 1)
