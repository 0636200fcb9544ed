"""Selection recall: exact block mass, token-exact coverage, the oracle, and the ``eval selection`` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hf_sparsek.eval.selection_recall import (
    PROBE_NAME,
    attended_fraction,
    block_attention_mass,
    capture_qk,
    coverage,
    oracle_index,
    tiles_per_query_tile,
)
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparsek.block_index import build_block_index
from hf_sparsek.masks import exact_token_mask
from hf_sparsek.ops import build_index_for
from hf_sparsek.patterns import SparsePattern


def _dense_probs(q: torch.Tensor, k: torch.Tensor, q_offset: int, kv_offset: int) -> torch.Tensor:
    """Brute force: (B, Hq, q_len, kv_len) float64 causal softmax."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = q_offset + torch.arange(q.shape[2]).view(-1, 1)
    j = kv_offset + torch.arange(k.shape[2]).view(1, -1)
    return s.masked_fill(j > i, float("-inf")).softmax(-1)


def _qk(batch: int, hq: int, hkv: int, q_len: int, kv_len: int, seed: int = 0, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, hq, q_len, dim, generator=g), torch.randn(batch, hkv, kv_len, dim, generator=g))


@pytest.mark.parametrize("q_len,kv_len,q_offset,kv_offset", [(37, 37, None, 0), (21, 53, 30, 5), (50, 50, 19, 19)])
def test_block_mass_matches_brute_force(q_len, kv_len, q_offset, kv_offset):
    block = 16
    q, k = _qk(2, 4, 2, q_len, kv_len, seed=q_len)
    q_off = kv_offset + kv_len - q_len if q_offset is None else q_offset
    mass = block_attention_mass(q, k, block, q_offset=q_off, kv_offset=kv_offset)
    p = _dense_probs(q, k, q_off, kv_offset).view(2, 2, 2, q_len, kv_len)
    q_tile = (q_off + torch.arange(q_len)) // block - q_off // block
    k_tile = (kv_offset + torch.arange(kv_len)) // block - kv_offset // block
    expect = torch.zeros(2, 2, int(q_tile.max()) + 1, int(k_tile.max()) + 1, dtype=torch.float64)
    for m in range(expect.shape[2]):
        for n in range(expect.shape[3]):
            expect[:, :, m, n] = p[..., q_tile == m, :][..., k_tile == n].sum((2, 3, 4)) / (2 * (q_tile == m).sum())
    assert mass.shape == expect.shape
    torch.testing.assert_close(mass, expect)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)))


def test_coverage_dense_is_one_and_sink_window_matches_brute_force():
    n = 203
    q, k = _qk(1, 6, 2, n, n, seed=3)
    dense = build_block_index(SparsePattern(block_size=64), batch=1, kv_heads=2, q_len=n, kv_len=n)
    torch.testing.assert_close(coverage(q, k, dense), torch.ones(1, 2, dtype=torch.float64))
    pattern = SparsePattern(block_size=64, sink_tokens=5, window=70)
    index = build_block_index(pattern, batch=1, kv_heads=2, q_len=n, kv_len=n)
    mask = exact_token_mask(pattern, n, kv_heads=2).repeat_interleave(3, 1)
    p = _dense_probs(q, k, 0, 0)
    expect = (p * mask).sum(-1).view(1, 2, 3, n).mean((2, 3))
    got = coverage(q, k, index)
    torch.testing.assert_close(got, expect)
    assert 0.05 < float(got.min()) < 0.99  # a real fraction, not a trivial 0 or 1
    per_tile = coverage(q, k, index, per_tile=True)
    assert per_tile.shape == (1, 2, index.n_q_tiles)
    torch.testing.assert_close(per_tile[..., 0], torch.ones(1, 2, dtype=torch.float64))  # first tile: all in window
    frac = attended_fraction(index)
    assert frac.shape == (1, 1)
    assert float(frac[0, 0]) == pytest.approx(float(mask[0, 0].sum()) / (n * (n + 1) / 2))


def test_oracle_finds_a_planted_block_that_a_window_misses():
    block, length = 64, 512
    q, k = _qk(1, 2, 1, length, length, seed=7)
    q = q * 0.1
    k = k * 0.1
    # Keys 32..47 (tile 2) point along the mean query: every later query puts nearly all its mass there.
    direction = torch.ones(q.shape[-1]) / math.sqrt(q.shape[-1])
    q = q + 3.0 * direction
    k[0, 0, 128:192] += 12.0 * direction
    rows = slice(320, length)  # query tiles 5..7: tile 2 is far outside the window
    window = build_block_index(SparsePattern(block_size=block, window=block), batch=1, kv_heads=1, q_len=length,
                               kv_len=length)
    oracle = oracle_index(q, k, 1, block)
    win_cov = coverage(q, k, window, per_tile=True)[0, 0, rows.start // block :]
    ora_cov = coverage(q, k, oracle, per_tile=True)[0, 0, rows.start // block :]
    assert bool((ora_cov > 0.9).all()), ora_cov
    assert bool((win_cov < 0.1).all()), win_cov
    assert tiles_per_query_tile(oracle).max() == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_is_the_ceiling_of_the_topk_selector(seed):
    q, k = _qk(2, 4, 2, 450, 450, seed=seed)
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=2)
    selected = build_index_for(q, k, pattern)
    static = build_index_for(q, k, pattern.replace(topk_blocks=None))
    budget = (tiles_per_query_tile(selected) - tiles_per_query_tile(static)).clamp(min=0)
    oracle = oracle_index(q, k, budget, 64, sink_tokens=4, window=64)
    assert torch.equal(tiles_per_query_tile(oracle), tiles_per_query_tile(selected).expand_as(
        tiles_per_query_tile(oracle)))
    ora, sel = coverage(q, k, oracle, per_tile=True), coverage(q, k, selected, per_tile=True)
    assert bool((ora >= sel - 1e-12).all())
    assert float((ora - sel).max()) > 1e-3  # random data: the pooled-score selector is not already optimal


def test_oracle_rejects_bad_budgets():
    q, k = _qk(1, 2, 1, 70, 70)
    with pytest.raises(ValueError, match="pattern_budget_tiles"):
        oracle_index(q, k, -1, 64)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        block_attention_mass(q, k.expand(1, 3, 70, 16), 64)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def test_capture_qk_is_transparent_and_restores_attention():
    model = _tiny_llama()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 300, (1, 96))
    with torch.inference_mode():
        expect = model(input_ids=ids).logits
    captured = capture_qk(model, ids)
    assert sorted(captured) == [0, 1]
    q, k, scale = captured[1]
    assert q.shape == (1, 4, 96, 8) and k.shape == (1, 2, 96, 8)
    assert scale == pytest.approx(8 ** -0.5)
    assert model.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        model.set_attn_implementation(PROBE_NAME)
        got = model(input_ids=ids).logits  # not recording: plain sdpa underneath
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, expect)


def test_cli_selection(tmp_path) -> None:
    from conftest import tiny_llama_with_docs

    from hf_sparsek.cli import main

    model_dir, docs = tiny_llama_with_docs(tmp_path, documents=1, words_per_document=3000, layers=2)
    out = tmp_path / "out"
    patterns = ['{"block_size": 64, "window": 64}', '{"block_size": 64, "sink_tokens": 64, "window": 64, '
                '"topk_blocks": 1}']
    assert main(["eval", "selection", "--model", str(model_dir), "--data", str(docs),
                 "--seq-len", "320", "--device", "cpu", "--out", str(out), "--patterns", *patterns]) == 0
    data = json.loads((out / "selection_model.json").read_text())
    rows = data["results"]
    assert [(r["layer"], r["pattern"]) for r in rows] == [(0, "window64"), (0, rows[1]["pattern"]),
                                                          (1, "window64"), (1, rows[1]["pattern"])]
    for r in rows:
        assert len(r["coverage"]) == len(r["oracle_coverage"]) == 2  # one value per KV head
        assert all(0.0 < c < 1.0 for c in r["coverage"])  # 320 tokens, 64-token window: part of the mass is lost
        assert all(o >= c - 1e-5 for o, c in zip(r["oracle_coverage"], r["coverage"], strict=True))
        assert 0.0 < r["density"][0] < 1.0
    assert (out / "selection_model.md").read_text().startswith("| layer | pattern |")
    assert (out / "selection_model.png").stat().st_size > 1000
