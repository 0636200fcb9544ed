"""The per-query-head selection experiment (scripts/experiments/per_query_head.py) is what it claims: a GQA model
inside it computes what the same model with K / V projections repeated to one KV head per query head computes
with the library's grouped selection, and it changes nothing outside the block or for patterns without top-k."""

from __future__ import annotations

import pytest
import torch

import hf_sparsek
from scripts.experiments.per_query_head import per_query_head_selection

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random 6 / 2-head Llama and its multi-head twin (K / V weights repeated per query head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=97, hidden_size=HEADS * HEAD_DIM, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=HEADS, max_position_embeddings=1024)
    gqa = LlamaForCausalLM(LlamaConfig(num_key_value_heads=KV_HEADS, **kw)).eval()
    mha = LlamaForCausalLM(LlamaConfig(num_key_value_heads=HEADS, **kw)).eval()
    state = gqa.state_dict()
    for name, weight in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (kv_heads * dim, hidden) -> (heads * dim, hidden)
            rows = weight.view(KV_HEADS, HEAD_DIM, -1).repeat_interleave(HEADS // KV_HEADS, dim=0)
            state[name] = rows.reshape(HEADS * HEAD_DIM, -1)
    mha.load_state_dict(state)
    return gqa, mha


def _logits(model: torch.nn.Module, ids: torch.Tensor, pattern: dict) -> torch.Tensor:
    hf_sparsek.set_pattern(model, pattern)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("selector", ["oracle", "mass"])
def test_per_query_head_equals_the_repeated_kv_model(selector: str) -> None:
    gqa, mha = _models()
    ids = torch.randint(0, 97, (2, 389), generator=torch.Generator().manual_seed(1))
    pattern = {"block_size": 64, "sink_tokens": 16, "window": 64, "topk_blocks": 1, "selector": selector}
    grouped = _logits(gqa, ids, pattern)
    with per_query_head_selection():
        per_head = _logits(gqa, ids, pattern)
    twin = _logits(mha, ids, pattern)
    torch.testing.assert_close(per_head, twin, atol=2e-5, rtol=1e-4)
    assert (per_head - grouped).abs().max() > 1e-3  # the choice differs from the grouped one on this input
    torch.testing.assert_close(_logits(gqa, ids, pattern), grouped)  # restored after the block


def test_patterns_without_topk_are_unchanged() -> None:
    gqa, _ = _models()
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(2))
    pattern = {"block_size": 64, "sink_tokens": 16, "window": 96}
    outside = _logits(gqa, ids, pattern)
    with per_query_head_selection():
        torch.testing.assert_close(_logits(gqa, ids, pattern), outside)


def test_dense_heads_are_refused() -> None:
    gqa, _ = _models()
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(3))
    with per_query_head_selection(), pytest.raises(ValueError, match="dense_heads name KV heads"):
        _logits(gqa, ids, {"block_size": 64, "sink_tokens": 16, "window": 64, "topk_blocks": 1, "dense_heads": [1]})
